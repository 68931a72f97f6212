//! The console's operations page: queue depths, dead letters (list, show,
//! replay), outbox rows set aside (retry), webhook endpoints with their
//! recent failed deliveries, and the last reconcile and audit verify, each
//! with the `penora-ops` command that does the same.
//!
//! Looking at dead letters reads them and puts them back in order without
//! counting a delivery (`penora_platform::dead_letters`); the page shows
//! the first [`SHOWN`] of each dead queue.

use std::fmt::Write;

use axum::{extract::State, http::StatusCode};
use penora_platform::broker::{self, Publisher, Topology};
use penora_platform::dead_letters::{self, Looked};
use penora_store::{ops_runs, outbox};
use time::OffsetDateTime;

use super::{Acting, OrPage, Page, Session, html, problem};
use crate::{error::ApiError, state::AppState};

/// Dead letters shown per queue.
pub const SHOWN: usize = 20;

/// What the broker told, or why it could not.
struct BrokerView {
    stats: Vec<broker::QueueStat>,
    parked: Vec<(String, Looked)>,
}

async fn broker_view(state: &AppState) -> anyhow::Result<BrokerView> {
    let settings = &state.settings.broker;
    let topology = Topology::from_settings(settings);
    let connection = broker::connect(settings.url.expose(), "penora-console").await?;
    let result = async {
        let ch = connection.create_channel().await?;
        let stats = broker::queue_stats(&ch, &topology).await?;
        let publisher = Publisher::new(settings.url.clone(), "penora-console", topology.clone());
        let mut parked = Vec::new();
        for work in broker::WORK_QUEUES {
            let dead = topology.dead_queue(work);
            let waiting = stats
                .iter()
                .find(|s| s.name == dead)
                .map_or(0, |s| s.messages);
            if waiting > 0 {
                let looked = dead_letters::look(&publisher, &ch, &topology, work, SHOWN).await?;
                parked.push((work.to_owned(), looked));
            }
        }
        let _ = ch.close(200, "bye".into()).await;
        anyhow::Ok(BrokerView { stats, parked })
    }
    .await;
    let _ = connection.close(200, "bye".into()).await;
    result
}

/// The operations page.
pub async fn page(State(state): State<AppState>, session: Session) -> Page {
    let notice = String::new();
    render(&state, &session, &notice).await
}

async fn render(state: &AppState, session: &Session, notice: &str) -> Page {
    let now = OffsetDateTime::now_utc();
    let admin = session.is_admin();
    let csrf = html::esc(&session.csrf);
    let mut out = format!("<h1>Operations</h1>{notice}");

    // The broker.
    match broker_view(state).await {
        Ok(view) => {
            // One row per work queue: ready, waiting in its retry queues,
            // parked in its dead queue.
            let topology = Topology::from_settings(&state.settings.broker);
            let rows: Vec<Vec<String>> = broker::WORK_QUEUES
                .iter()
                .map(|work| {
                    let name = topology.queue(work);
                    let dead = topology.dead_queue(work);
                    let retry = format!("{name}.retry.");
                    let (mut ready, mut retrying, mut parked, mut consumers) = (0, 0, 0, 0);
                    for q in &view.stats {
                        let n = i64::from(q.messages);
                        if q.name == name {
                            ready += n;
                            consumers += q.consumers;
                        } else if q.name == dead {
                            parked += n;
                        } else if q.name.starts_with(&retry) {
                            retrying += n;
                        }
                    }
                    vec![
                        format!("<code>{}</code>", html::esc(work)),
                        html::grouped(ready),
                        html::grouped(retrying),
                        if parked > 0 {
                            format!("<strong class=\"neg\">{}</strong>", html::grouped(parked))
                        } else {
                            "0".into()
                        },
                        consumers.to_string(),
                    ]
                })
                .collect();
            let _ = write!(
                out,
                "<section aria-labelledby=\"queues\"><h2 id=\"queues\">Queues</h2>{}\
                 <p class=\"cli\">Same as: <code>penora-ops queues</code> (each queue on its own, \
                 with rates from the management API)</p></section>",
                html::table(
                    &["Queue", "Ready", "Waiting to retry", "Parked", "Consumers"],
                    &[1, 2, 3, 4],
                    &rows,
                    "No queue."
                )
            );
            let _ = write!(
                out,
                "<section aria-labelledby=\"dead\"><h2 id=\"dead\">Dead letters</h2>"
            );
            if view.parked.is_empty() {
                out.push_str("<p class=\"empty\">No message is parked.</p>");
            }
            for (work, looked) in &view.parked {
                let _ = write!(
                    out,
                    "<h3><code>{}</code>: {} parked{}</h3>",
                    html::esc(work),
                    looked.total,
                    if looked.total > looked.parked.len() {
                        format!(" (the first {} shown)", looked.parked.len())
                    } else {
                        String::new()
                    }
                );
                let rows: Vec<Vec<String>> = looked
                    .parked
                    .iter()
                    .map(|m| {
                        let id = m.message_id.clone().unwrap_or_default();
                        let mut row = vec![
                            m.position.to_string(),
                            format!("<code>{}</code>", html::esc(&dead_letters::escaped(&id))),
                            html::esc(m.original_routing_key.as_deref().unwrap_or("")),
                            m.attempts.map_or_else(String::new, |a| a.to_string()),
                            html::esc(m.parked_at.as_deref().unwrap_or("")),
                            html::esc(&dead_letters::escaped(m.error.as_deref().unwrap_or(""))),
                            format!(
                                "<details><summary>Show</summary><pre class=\"mono\">{}</pre></details>",
                                html::esc(&dead_letters::escaped(
                                    &serde_json::to_string_pretty(m).unwrap_or_default()
                                ))
                            ),
                        ];
                        if admin {
                            row.push(if id.is_empty() {
                                "<span class=\"muted\">no message id</span>".into()
                            } else {
                                format!(
                                    "<form method=\"post\" action=\"/console/ops/dead-letters/replay\" class=\"inline\">\
                                     <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                                     <input type=\"hidden\" name=\"queue\" value=\"{}\">\
                                     <input type=\"hidden\" name=\"id\" value=\"{}\">\
                                     <button type=\"submit\">Replay</button></form>",
                                    html::esc(work),
                                    html::esc(&id)
                                )
                            });
                        }
                        row
                    })
                    .collect();
                let mut head = vec![
                    "#",
                    "Message id",
                    "Routing key",
                    "Attempts",
                    "Parked at",
                    "Error",
                    "Message",
                ];
                if admin {
                    head.push("Action");
                }
                out.push_str(&html::table(&head, &[0, 3], &rows, "None."));
                let _ = write!(
                    out,
                    "<p class=\"cli\">Same as: <code>penora-ops dlq list {0}</code>, \
                     <code>penora-ops dlq show {0} --id &lt;id&gt;</code>, \
                     <code>penora-ops dlq replay {0} --id &lt;id&gt;</code></p>",
                    html::esc(work)
                );
            }
            out.push_str("</section>");
        }
        Err(e) => {
            tracing::warn!(error = %e, "console: the broker could not be read");
            out.push_str(
                "<section><h2>Queues and dead letters</h2><div class=\"notice error\" role=\"alert\">\
                 RabbitMQ did not answer; queue depths and dead letters cannot be shown now. \
                 <code>unavailable</code></div></section>",
            );
        }
    }

    let client = state.pool.get().await.or_page(session)?;
    // The outbox.
    match outbox::set_aside(&client).await {
        Ok(rows) => {
            let rows: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    let mut row = vec![
                        r.id.to_string(),
                        format!("<code>{}</code>", html::esc(&r.routing_key)),
                        html::esc(&r.user_id),
                        r.refusals.to_string(),
                        html::esc(&r.set_aside_at),
                        html::esc(r.last_error.as_deref().unwrap_or("")),
                    ];
                    if admin {
                        row.push(format!(
                            "<form method=\"post\" action=\"/console/ops/outbox/retry\" class=\"inline\">\
                             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                             <input type=\"hidden\" name=\"id\" value=\"{}\">\
                             <button type=\"submit\">Retry</button></form>",
                            r.id
                        ));
                    }
                    row
                })
                .collect();
            let mut head = vec![
                "Row",
                "Routing key",
                "User",
                "Refusals",
                "Set aside",
                "Last error",
            ];
            if admin {
                head.push("Action");
            }
            let _ = write!(
                out,
                "<section aria-labelledby=\"outbox\"><h2 id=\"outbox\">Outbox rows set aside</h2>{}\
                 <p class=\"cli\">Same as: <code>penora-ops outbox list</code>, <code>penora-ops outbox retry --id &lt;row&gt;</code></p></section>",
                html::table(&head, &[0, 3], &rows, "No row is set aside.")
            );
        }
        Err(e) => return Err(session.problem(e)),
    }

    // Webhooks.
    let endpoints = client
        .query(
            "SELECT e.id, e.url, array_to_string(e.events, ', '), e.app, e.created_at, \
                    (SELECT count(*) FROM webhook_deliveries d WHERE d.endpoint_id = e.id AND d.state IN ('failing', 'parked')) \
             FROM webhook_endpoints e WHERE e.deleted_at IS NULL ORDER BY e.created_at DESC LIMIT 100",
            &[],
        )
        .await;
    let failed = client
        .query(
            "SELECT d.endpoint_id, d.event_id, d.event_type, d.user_id, d.state, d.attempts, d.last_attempt_at, \
                    (SELECT coalesce(a.status_code::text, a.error) FROM webhook_attempts a \
                      WHERE a.event_id = d.event_id AND a.endpoint_id = d.endpoint_id ORDER BY a.id DESC LIMIT 1) \
             FROM webhook_deliveries d WHERE d.state IN ('failing', 'parked') \
             ORDER BY d.last_attempt_at DESC NULLS LAST LIMIT 20",
            &[],
        )
        .await;
    match (endpoints, failed) {
        (Ok(endpoints), Ok(failed)) => {
            let rows: Vec<Vec<String>> = endpoints
                .iter()
                .map(|e| {
                    vec![
                        format!("<code>{}</code>", html::esc(e.get::<_, &str>(0))),
                        html::esc(e.get::<_, &str>(1)),
                        html::esc(e.get::<_, &str>(2)),
                        html::esc(e.get::<_, &str>(3)),
                        html::when(e.get(4), now),
                        e.get::<_, i64>(5).to_string(),
                    ]
                })
                .collect();
            let frows: Vec<Vec<String>> = failed
                .iter()
                .map(|d| {
                    vec![
                        format!("<code>{}</code>", html::esc(d.get::<_, &str>(0))),
                        format!("<code>{}</code>", html::esc(d.get::<_, &str>(1))),
                        html::esc(d.get::<_, &str>(2)),
                        html::esc(d.get::<_, &str>(3)),
                        html::esc(d.get::<_, &str>(4)),
                        d.get::<_, i32>(5).to_string(),
                        html::when_opt(d.get(6), now, "never"),
                        html::esc(&dead_letters::escaped(
                            d.get::<_, Option<&str>>(7).unwrap_or(""),
                        )),
                    ]
                })
                .collect();
            let _ = write!(
                out,
                "<section aria-labelledby=\"webhooks\"><h2 id=\"webhooks\">Webhook endpoints</h2>{}\
                 <h3>Recent failed deliveries</h3>{}\
                 <p class=\"cli\">Same as: <code>penora-ops webhooks list</code>, <code>penora-ops webhooks deliveries &lt;endpoint&gt;</code></p></section>",
                html::table(
                    &[
                        "Endpoint",
                        "URL",
                        "Events",
                        "App",
                        "Registered",
                        "Failing now"
                    ],
                    &[5],
                    &rows,
                    "No webhook endpoint."
                ),
                html::table(
                    &[
                        "Endpoint",
                        "Event",
                        "Type",
                        "User",
                        "State",
                        "Attempts",
                        "Last attempt",
                        "Last answer"
                    ],
                    &[5],
                    &frows,
                    "No failed delivery."
                )
            );
        }
        (Err(e), _) | (_, Err(e)) => return Err(session.problem(ApiError::from(e))),
    }

    // Reconcile and audit verify.
    let mut rows = Vec::new();
    for (kind, command) in [
        (ops_runs::RECONCILE, "penora-ops reconcile"),
        (ops_runs::AUDIT_VERIFY, "penora-ops audit verify"),
    ] {
        match ops_runs::last(&client, kind).await {
            Ok(Some(run)) => rows.push(vec![
                format!("<code>{command}</code>"),
                if run.ok {
                    "<strong class=\"pos\">OK</strong>".into()
                } else {
                    "<strong class=\"neg\">FAILED</strong>".into()
                },
                html::esc(&run.summary),
                html::when(run.finished_at, now),
                format!(
                    "{:.1} s",
                    (run.finished_at - run.started_at).as_seconds_f64()
                ),
            ]),
            Ok(None) => rows.push(vec![
                format!("<code>{command}</code>"),
                "<span class=\"muted\">never run</span>".into(),
                String::new(),
                String::new(),
                String::new(),
            ]),
            Err(e) => return Err(session.problem(e)),
        }
    }
    let _ = write!(
        out,
        "<section aria-labelledby=\"checks\"><h2 id=\"checks\">Last checks</h2>{}\
         <p class=\"cli\">Run them with the commands shown; each run is recorded here.</p></section>",
        html::table(
            &["Command", "Result", "Summary", "Finished", "Took"],
            &[4],
            &rows,
            ""
        )
    );
    Ok(super::html(
        StatusCode::OK,
        html::page("Operations", Some(&session.bar()), &out),
    ))
}

/// Replays one dead letter to the queue it was parked from.
pub async fn replay(State(state): State<AppState>, Acting { session, form }: Acting) -> Page {
    let (Some(queue), Some(id)) = (form.get("queue"), form.get("id")) else {
        return Err(problem(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "queue and id are required",
            Some(&session.bar()),
        ));
    };
    let settings = &state.settings.broker;
    let topology = Topology::from_settings(settings);
    let replayed = async {
        let connection = broker::connect(settings.url.expose(), "penora-console").await?;
        let result = async {
            let ch = connection.create_channel().await?;
            let publisher =
                Publisher::new(settings.url.clone(), "penora-console", topology.clone());
            let n = dead_letters::replay_one(&publisher, &ch, &topology, queue, id).await?;
            let _ = ch.close(200, "bye".into()).await;
            anyhow::Ok(n)
        }
        .await;
        let _ = connection.close(200, "bye".into()).await;
        result
    }
    .await;
    let notice = match replayed {
        Ok(0) => {
            return Err(problem(
                StatusCode::NOT_FOUND,
                "not_found",
                &dead_letters::nothing_parked(Some(id), &topology.dead_queue(queue)),
                Some(&session.bar()),
            ));
        }
        Ok(n) => {
            tracing::info!(key_id = %session.key_id, queue, message_id = %dead_letters::escaped(id), "console: dead letter replayed");
            format!(
                "<div class=\"notice ok\" role=\"status\" data-replayed=\"{n}\">Replayed {n} message (<code>{}</code>) to <code>{}</code>.</div>",
                html::esc(&dead_letters::escaped(id)),
                html::esc(queue)
            )
        }
        Err(e) => {
            return Err(problem(
                StatusCode::CONFLICT,
                "not_replayed",
                &format!("Not replayed: {e}"),
                Some(&session.bar()),
            ));
        }
    };
    render(&state, &session, &notice).await
}

/// Puts a set-aside outbox row back to be published.
pub async fn retry_outbox(State(state): State<AppState>, Acting { session, form }: Acting) -> Page {
    let Some(id) = form.get("id").and_then(|i| i.parse::<i64>().ok()) else {
        return Err(problem(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "id: must be an outbox row's id",
            Some(&session.bar()),
        ));
    };
    let client = state.pool.get().await.or_page(&session)?;
    let n = outbox::put_back(&client, Some(id))
        .await
        .or_page(&session)?;
    drop(client);
    if n == 0 {
        return Err(problem(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("No set-aside outbox row {id}"),
            Some(&session.bar()),
        ));
    }
    state.jobs_committed();
    tracing::info!(key_id = %session.key_id, row = id, "console: outbox row put back");
    let notice = format!(
        "<div class=\"notice ok\" role=\"status\">Outbox row {id} put back; the relay publishes it within a second.</div>"
    );
    render(&state, &session, &notice).await
}
