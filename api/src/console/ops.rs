//! The console's operations page: queue depths, dead letters (list, show,
//! replay), outbox rows set aside (retry), webhook endpoints with their
//! recent failed deliveries, and the last reconcile and audit verify, each
//! with the `penora-ops` command that does the same.
//!
//! Rules:
//! * every signed-in key sees the queue depths and the last checks; the
//!   rest (message bodies, webhook URLs, outbox rows of every app) and the
//!   actions are an operator's: an admin key bound to no app, as the API's
//!   own webhook and key routes ask;
//! * showing the page changes nothing: the depths come from passive
//!   declares. Looking at dead letters reads them and puts them back in order
//!   (`penora_platform::dead_letters`), so it is an operator's POST, never a
//!   GET; that look and a replay run in a task of their own, so a browser
//!   that goes away cannot cut one between the copies published and the
//!   originals acknowledged.

use std::fmt::Write;

use axum::{extract::State, http::StatusCode};
use penora_platform::broker::{self, Publisher, Topology};
use penora_platform::dead_letters::{self, Looked};
use penora_store::{ops_runs, outbox};
use time::OffsetDateTime;

use super::{Acting, OrPage, Page, Session, html, problem};
use crate::{error::ApiError, state::AppState};

/// Dead letters shown per look.
pub const SHOWN: usize = 20;

/// What an operator asked to see or did, shown above the sections.
#[derive(Default)]
struct Shown {
    /// A line saying what was done.
    notice: String,
    /// A dead queue looked at: its work queue and what was parked.
    parked: Option<(String, Looked)>,
}

/// Depth and consumers of every queue (passive declares: nothing changes).
async fn queue_stats(state: &AppState) -> anyhow::Result<Vec<broker::QueueStat>> {
    let settings = &state.settings.broker;
    let topology = Topology::from_settings(settings);
    let connection = broker::connect(settings.url.expose(), "penora-console").await?;
    let result = async {
        let ch = connection.create_channel().await?;
        let stats = broker::queue_stats(&ch, &topology).await?;
        let _ = ch.close(200, "bye".into()).await;
        anyhow::Ok(stats)
    }
    .await;
    let _ = connection.close(200, "bye".into()).await;
    result
}

/// What an operator asks of the broker's dead letters.
enum Job {
    /// The first [`SHOWN`] parked in a work queue's dead queue.
    Look(&'static str),
    /// The message with this id back to its work queue.
    Replay(&'static str, String),
}

/// What it did.
enum Done {
    Looked(Looked),
    Replayed(usize),
}

/// Does `job` on a connection of its own, in a task of its own: it finishes
/// even when the request that asked for it is dropped (a look or a replay
/// cut between publishing and acknowledging would leave copies behind).
async fn on_the_broker(state: &AppState, job: Job) -> anyhow::Result<Done> {
    let settings = state.settings.broker.clone();
    tokio::spawn(async move {
        let topology = Topology::from_settings(&settings);
        let connection = broker::connect(settings.url.expose(), "penora-console").await?;
        let result = async {
            let ch = connection.create_channel().await?;
            let publisher =
                Publisher::new(settings.url.clone(), "penora-console", topology.clone());
            let done = match &job {
                Job::Look(work) => dead_letters::look(&publisher, &ch, &topology, work, SHOWN)
                    .await
                    .map(Done::Looked),
                Job::Replay(work, id) => {
                    dead_letters::replay_one(&publisher, &ch, &topology, work, id)
                        .await
                        .map(Done::Replayed)
                }
            };
            let _ = ch.close(200, "bye".into()).await;
            done
        }
        .await;
        let _ = connection.close(200, "bye".into()).await;
        result
    })
    .await?
}

/// The operations page.
pub async fn page(State(state): State<AppState>, session: Session) -> Page {
    render(&state, &session, Shown::default()).await
}

async fn render(state: &AppState, session: &Session, shown: Shown) -> Page {
    let now = OffsetDateTime::now_utc();
    let operator = session.is_operator();
    let csrf = html::esc(&session.csrf);
    let mut out = format!("<h1>Operations</h1>{}", shown.notice);
    if !operator {
        out.push_str(
            "<p class=\"muted\">Dead letters, outbox rows and webhook endpoints are shown to an \
             admin key bound to no app.</p>",
        );
    }

    // The queues: one row per work queue, with what waits to be retried and
    // what is parked.
    let topology = Topology::from_settings(&state.settings.broker);
    match queue_stats(state).await {
        Ok(stats) => {
            let mut rows = Vec::new();
            for work in broker::WORK_QUEUES {
                let name = topology.queue(work);
                let dead = topology.dead_queue(work);
                let retry = format!("{name}.retry.");
                let (mut ready, mut retrying, mut parked, mut consumers) = (0, 0, 0, 0);
                for q in &stats {
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
                let look = if operator && parked > 0 {
                    format!(
                        "<form method=\"post\" action=\"/console/ops/dead-letters\" class=\"inline\">\
                         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                         <input type=\"hidden\" name=\"queue\" value=\"{}\">\
                         <button type=\"submit\" class=\"secondary\">Show parked</button></form>",
                        html::esc(work)
                    )
                } else {
                    String::new()
                };
                rows.push(vec![
                    format!("<code>{}</code>", html::esc(work)),
                    html::grouped(ready),
                    html::grouped(retrying),
                    if parked > 0 {
                        format!("<strong class=\"neg\">{}</strong>", html::grouped(parked))
                    } else {
                        "0".into()
                    },
                    consumers.to_string(),
                    look,
                ]);
            }
            let _ = write!(
                out,
                "<section aria-labelledby=\"queues\"><h2 id=\"queues\">Queues</h2>{}\
                 <p class=\"cli\">Same as: <code>penora-ops queues</code> (each queue on its own, \
                 with rates from the management API)</p></section>",
                html::table(
                    &[
                        "Queue",
                        "Ready",
                        "Waiting to retry",
                        "Parked",
                        "Consumers",
                        "Dead letters"
                    ],
                    &[1, 2, 3, 4],
                    &rows,
                    "No queue."
                )
            );
        }
        Err(e) => {
            tracing::warn!(error = %e, "console: the broker could not be read");
            out.push_str(
                "<section><h2>Queues</h2><div class=\"notice error\" role=\"alert\">\
                 RabbitMQ did not answer; queue depths and dead letters cannot be shown now. \
                 <code>unavailable</code></div></section>",
            );
        }
    }
    if let Some((work, looked)) = &shown.parked {
        out.push_str(&parked_section(work, looked, &csrf));
    }

    let client = state.pool.get().await.or_page(session)?;
    if operator {
        out.push_str(&outbox_section(&client, &csrf).await.or_page(session)?);
        out.push_str(&webhooks_section(&client, now).await.or_page(session)?);
    }

    // Reconcile and audit verify.
    let mut rows = Vec::new();
    for (kind, command) in [
        (ops_runs::RECONCILE, "penora-ops reconcile"),
        (ops_runs::AUDIT_VERIFY, "penora-ops audit verify"),
    ] {
        rows.push(
            match ops_runs::last(&client, kind).await.or_page(session)? {
                Some(run) => vec![
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
                ],
                None => vec![
                    format!("<code>{command}</code>"),
                    "<span class=\"muted\">never run</span>".into(),
                    String::new(),
                    String::new(),
                    String::new(),
                ],
            },
        );
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

/// The dead letters of `work` looked at, each shown in full on demand, with
/// a replay button.
fn parked_section(work: &str, looked: &Looked, csrf: &str) -> String {
    let rows: Vec<Vec<String>> = looked
        .parked
        .iter()
        .map(|m| {
            let id = m.message_id.clone().unwrap_or_default();
            vec![
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
                if id.is_empty() {
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
                },
            ]
        })
        .collect();
    let more = if looked.total > looked.parked.len() {
        format!(" (the first {} shown)", looked.parked.len())
    } else {
        String::new()
    };
    format!(
        "<section aria-labelledby=\"dead\"><h2 id=\"dead\">Dead letters of <code>{work}</code>: {total} parked{more}</h2>{table}\
         <p class=\"cli\">Same as: <code>penora-ops dlq list {work}</code>, \
         <code>penora-ops dlq show {work} --id &lt;id&gt;</code>, \
         <code>penora-ops dlq replay {work} --id &lt;id&gt;</code></p></section>",
        work = html::esc(work),
        total = looked.total,
        table = html::table(
            &[
                "#",
                "Message id",
                "Routing key",
                "Attempts",
                "Parked at",
                "Error",
                "Message",
                "Action"
            ],
            &[0, 3],
            &rows,
            "No message is parked."
        )
    )
}

/// The outbox rows set aside, each with a retry button.
async fn outbox_section(
    client: &deadpool_postgres::Client,
    csrf: &str,
) -> Result<String, ApiError> {
    let rows: Vec<Vec<String>> = outbox::set_aside(client)
        .await?
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                format!("<code>{}</code>", html::esc(&r.routing_key)),
                html::esc(&r.user_id),
                r.refusals.to_string(),
                html::esc(&r.set_aside_at),
                html::esc(r.last_error.as_deref().unwrap_or("")),
                format!(
                    "<form method=\"post\" action=\"/console/ops/outbox/retry\" class=\"inline\">\
                     <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                     <input type=\"hidden\" name=\"id\" value=\"{}\">\
                     <button type=\"submit\">Retry</button></form>",
                    r.id
                ),
            ]
        })
        .collect();
    Ok(format!(
        "<section aria-labelledby=\"outbox\"><h2 id=\"outbox\">Outbox rows set aside</h2>{}\
         <p class=\"cli\">Same as: <code>penora-ops outbox list</code>, <code>penora-ops outbox retry --id &lt;row&gt;</code></p></section>",
        html::table(
            &[
                "Row",
                "Routing key",
                "User",
                "Refusals",
                "Set aside",
                "Last error",
                "Action"
            ],
            &[0, 3],
            &rows,
            "No row is set aside."
        )
    ))
}

/// The webhook endpoints, how many deliveries of each are failing, and the
/// latest failed deliveries with their last answer. Every statement on the
/// distributed tables names the user (Citus routes it to one shard) or
/// groups by the endpoint; the counts are merged here.
async fn webhooks_section(
    client: &deadpool_postgres::Client,
    now: OffsetDateTime,
) -> Result<String, ApiError> {
    let endpoints = client
        .query(
            "SELECT id, url, array_to_string(events, ', '), app, created_at \
             FROM webhook_endpoints WHERE deleted_at IS NULL ORDER BY created_at DESC LIMIT 100",
            &[],
        )
        .await?;
    let failing: std::collections::HashMap<String, i64> = client
        .query(
            "SELECT endpoint_id, count(*) FROM webhook_deliveries \
             WHERE state IN ('failing', 'parked') GROUP BY endpoint_id",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let failed = client
        .query(
            "SELECT d.endpoint_id, d.event_id, d.event_type, d.user_id, d.state, d.attempts, d.last_attempt_at, \
                    (SELECT coalesce(a.status_code::text, a.error) FROM webhook_attempts a \
                      WHERE a.user_id = d.user_id AND a.event_id = d.event_id AND a.endpoint_id = d.endpoint_id \
                      ORDER BY a.id DESC LIMIT 1) \
             FROM webhook_deliveries d WHERE d.state IN ('failing', 'parked') \
             ORDER BY d.last_attempt_at DESC NULLS LAST LIMIT 20",
            &[],
        )
        .await?;
    let rows: Vec<Vec<String>> = endpoints
        .iter()
        .map(|e| {
            let id: &str = e.get(0);
            vec![
                format!("<code>{}</code>", html::esc(id)),
                html::esc(e.get::<_, &str>(1)),
                html::esc(e.get::<_, &str>(2)),
                html::esc(e.get::<_, Option<&str>>(3).unwrap_or("any")),
                html::when(e.get(4), now),
                failing.get(id).copied().unwrap_or(0).to_string(),
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
    Ok(format!(
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
    ))
}

/// The queue a form names, one of the work queues (or its dead queue).
fn work_queue(form: &super::Form) -> Result<&'static str, ApiError> {
    let raw = form.get("queue").unwrap_or("");
    let raw = raw.strip_suffix(".dead").unwrap_or(raw);
    broker::WORK_QUEUES
        .iter()
        .find(|w| **w == raw)
        .copied()
        .ok_or_else(|| {
            ApiError::InvalidRequest(format!("queue: one of {}", broker::WORK_QUEUES.join(", ")))
        })
}

/// Looks at the first [`SHOWN`] dead letters of a queue.
pub async fn look(State(state): State<AppState>, Acting { session, form }: Acting) -> Page {
    session.require_operator().map_err(|r| *r)?;
    let work = work_queue(&form).or_page(&session)?;
    let looked = match on_the_broker(&state, Job::Look(work)).await {
        Ok(Done::Looked(looked)) => Ok(looked),
        Ok(Done::Replayed(_)) => Err(anyhow::anyhow!("a look that replayed")),
        Err(e) => Err(e),
    }
    .map_err(|e| {
        tracing::warn!(error = %e, "console: dead letters could not be read");
        session.problem(ApiError::Unavailable(
            "RabbitMQ did not answer; try again shortly".into(),
        ))
    })?;
    let shown = Shown {
        notice: String::new(),
        parked: Some((work.to_owned(), looked)),
    };
    render(&state, &session, shown).await
}

/// Replays one dead letter to the queue it was parked from.
pub async fn replay(State(state): State<AppState>, Acting { session, form }: Acting) -> Page {
    session.require_operator().map_err(|r| *r)?;
    let work = work_queue(&form).or_page(&session)?;
    let Some(id) = form.get("id").map(str::to_owned) else {
        return Err(session.problem(ApiError::InvalidRequest("id: is required".into())));
    };
    let replayed = match on_the_broker(&state, Job::Replay(work, id.clone())).await {
        Ok(Done::Replayed(n)) => Ok(n),
        Ok(Done::Looked(_)) => Err(anyhow::anyhow!("a replay that looked")),
        Err(e) => Err(e),
    };
    let notice = match replayed {
        Ok(0) => {
            return Err(problem(
                StatusCode::NOT_FOUND,
                "not_found",
                &dead_letters::nothing_parked(Some(&id), &topology_of(&state).dead_queue(work)),
                Some(&session.bar()),
            ));
        }
        Ok(n) => {
            tracing::info!(key_id = %session.key_id, queue = work, message_id = %dead_letters::escaped(&id), "console: dead letter replayed");
            format!(
                "<div class=\"notice ok\" role=\"status\" data-replayed=\"{n}\">Replayed {n} message (<code>{}</code>) to <code>{}</code>.</div>",
                html::esc(&dead_letters::escaped(&id)),
                html::esc(work)
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
    let shown = Shown {
        notice,
        parked: None,
    };
    render(&state, &session, shown).await
}

fn topology_of(state: &AppState) -> Topology {
    Topology::from_settings(&state.settings.broker)
}

/// Puts a set-aside outbox row back to be published.
pub async fn retry_outbox(State(state): State<AppState>, Acting { session, form }: Acting) -> Page {
    session.require_operator().map_err(|r| *r)?;
    let Some(id) = form.get("id").and_then(|i| i.parse::<i64>().ok()) else {
        return Err(session.problem(ApiError::InvalidRequest(
            "id: must be an outbox row's id".into(),
        )));
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
    let shown = Shown {
        notice: format!(
            "<div class=\"notice ok\" role=\"status\">Outbox row {id} put back; the relay publishes it within a second.</div>"
        ),
        parked: None,
    };
    render(&state, &session, shown).await
}
