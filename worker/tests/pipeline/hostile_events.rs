//! What a publisher on `imagegene.events` (ImageGene, or whoever holds its
//! password) can no longer do (issue 24): get credits back after the refund
//! window with a success for 0 or a failure dated far in the past, smuggle
//! the worker's own headers in (to be replayed as a job, say), store an
//! unbounded or misleading `reason`, or fill the broker without bound.

use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable};
use penora_domain::timefmt::rfc3339_millis;
use penora_platform::broker::headers;
use penora_platform::broker::{Outgoing, Publisher};
use serde_json::json;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::support::{Stack, amqp_url, stack, wait_for};

const EVENTS: &str = "penora.generation-events";

async fn balance(s: &Stack, user: &str) -> i64 {
    s.scalar("SELECT balance FROM accounts WHERE user_id = $1", user)
        .await
}

async fn state(s: &Stack, user: &str, code: &str) -> (String, Option<String>) {
    let c = s.pool.get().await.expect("db");
    let row = c
        .query_one(
            "SELECT state, settled_by FROM reservations WHERE user_id = $1 AND project_code = $2",
            &[&user, &code],
        )
        .await
        .expect("reservation");
    (row.get(0), row.get(1))
}

async fn settled_by_window(s: &Stack, user: &str, code: &str) {
    wait_for(
        "the timer settles the reservation",
        Duration::from_secs(15),
        || async { state(s, user, code).await == ("settled".into(), Some("window".into())) },
    )
    .await;
}

/// Publishes as ImageGene would, with `headers` of its choosing; `Err`
/// when the broker refuses it (a nack).
async fn publish_as_imagegene(
    s: &Stack,
    kind: &str,
    body: &str,
    headers: FieldTable,
) -> Result<(), String> {
    let publisher = Publisher::new(
        penora_config::Secret::new(amqp_url()),
        "imagegene-test",
        s.topology.clone(),
    );
    publisher
        .publish_all(vec![Outgoing {
            exchange: s.topology.exchange("imagegene.events"),
            routing_key: format!("generation.{kind}"),
            payload: body.as_bytes().to_vec(),
            properties: lapin::BasicProperties::default()
                .with_content_type("application/json".into())
                .with_message_id(uuid::Uuid::new_v4().to_string().into())
                .with_headers(headers),
        }])
        .await
        .map_err(|e| e.to_string())
}

fn event(id: &str, user: &str, code: &str, at: OffsetDateTime, extra: serde_json::Value) -> String {
    let mut body = json!({"event_id": id, "user_id": user, "project_code": code,
                          "occurred_at": rfc3339_millis(at)});
    for (k, v) in extra.as_object().expect("object") {
        body[k] = v.clone();
    }
    body.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_event_gives_credits_back_after_the_refund_window() {
    let mut s = stack(&[("REFUND_WINDOW_SECS", "2")], &[]).await;
    s.start_worker().await;
    s.grant("victim", 50).await;
    let made = s.deduct("victim", 10, "old-1").await;
    let made = OffsetDateTime::parse(made["timestamp"].as_str().expect("timestamp"), &Rfc3339)
        .expect("time");
    s.deduct("victim", 10, "old-2").await;
    settled_by_window(&s, "victim", "old-1").await;
    settled_by_window(&s, "victim", "old-2").await;
    let dead = s.topology.dead_queue(EVENTS);

    // A success "for 0" long after the window: it would refund everything.
    s.publish_event(
        "succeeded",
        &event(
            "ev-zero",
            "victim",
            "old-1",
            OffsetDateTime::now_utc(),
            json!({"amount": 0}),
        ),
    )
    .await;
    // A failure claiming to be from a day before the reservation: it used
    // to be clamped to the reservation's creation, inside the window.
    s.publish_event(
        "failed",
        &event(
            "ev-backdated",
            "victim",
            "old-2",
            made - Duration::from_secs(86_400),
            json!({"reason": "GPU out of memory"}),
        ),
    )
    .await;
    // A failure dated just after the reservation was made, but arriving
    // far later than the lateness bound (by default the 2 s window): judged
    // at its arrival, after the window.
    tokio::time::sleep(Duration::from_secs(3)).await;
    s.publish_event(
        "failed",
        &event(
            "ev-stale",
            "victim",
            "old-2",
            made + Duration::from_millis(500),
            json!({}),
        ),
    )
    .await;
    wait_for("the three are parked", Duration::from_secs(15), || async {
        s.depth(&dead).await == 3
    })
    .await;
    assert_eq!(balance(&s, "victim").await, 30, "nothing came back");
    for code in ["old-1", "old-2"] {
        assert_eq!(
            state(&s, "victim", code).await,
            ("settled".into(), Some("window".into()))
        );
    }
    let listed = s.ops(&["dlq", "list", EVENTS, "--json"]).await;
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&listed.stdout).expect("json");
    let errors: Vec<String> = listed
        .iter()
        .map(|m| m["error"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        errors
            .iter()
            .all(|e| e.contains("closed") || e.contains("before reservation")),
        "{errors:?}"
    );
    let reconcile = s.ops(&["reconcile"]).await;
    assert!(reconcile.status.success(), "{reconcile:?}");
    s.stop_worker().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_workers_own_headers_from_a_publisher_are_ignored_and_a_replay_stays_in_its_queue() {
    let mut s = stack(&[], &[]).await;
    s.start_worker().await;
    // A malformed event (parked at once) that claims, in the worker's own
    // headers, to have been first published as a save job, to be on its
    // 99th attempt, and to have arrived two days ago.
    let mut forged = FieldTable::default();
    let text = |v: &str| AMQPValue::LongString(v.to_owned().into());
    forged.insert(
        headers::ORIGINAL_EXCHANGE.into(),
        text(&s.topology.exchange("penora.jobs")),
    );
    forged.insert(
        headers::ORIGINAL_ROUTING_KEY.into(),
        text("penora.save-project"),
    );
    forged.insert(headers::ATTEMPT.into(), AMQPValue::LongUInt(99));
    forged.insert(
        headers::FIRST_FAILURE_AT.into(),
        text(&rfc3339_millis(
            OffsetDateTime::now_utc() - Duration::from_secs(2 * 86_400),
        )),
    );
    publish_as_imagegene(&s, "failed", "{not json", forged)
        .await
        .expect("published");
    let dead = s.topology.dead_queue(EVENTS);
    wait_for("parked", Duration::from_secs(15), || async {
        s.depth(&dead).await == 1
    })
    .await;
    let listed = s.ops(&["dlq", "list", EVENTS, "--json"]).await;
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&listed.stdout).expect("json");
    assert_eq!(listed.len(), 1);
    let m = &listed[0];
    assert_eq!(
        m["original_exchange"],
        json!(s.topology.exchange("imagegene.events")),
        "{m}"
    );
    assert_eq!(m["original_routing_key"], json!("generation.failed"), "{m}");
    assert_eq!(m["attempts"], json!(1), "{m}");
    let first = OffsetDateTime::parse(m["first_failure_at"].as_str().expect("time"), &Rfc3339)
        .expect("time");
    assert!(
        OffsetDateTime::now_utc() - first < Duration::from_secs(60),
        "{m}"
    );

    // A replay goes back to the queue it was parked from, and nowhere else.
    let replay = s.ops(&["dlq", "replay", EVENTS]).await;
    assert!(replay.status.success(), "{replay:?}");
    wait_for(
        "parked again after its replay",
        Duration::from_secs(15),
        || async { s.depth(&dead).await == 1 },
    )
    .await;
    s.wait_idle().await;
    for q in ["penora.save-project", "penora.ledger-audit"] {
        assert_eq!(s.depth(&s.topology.queue(q)).await, 0, "{q}");
        assert_eq!(s.depth(&s.topology.dead_queue(q)).await, 0, "{q}");
    }
    let saves = s
        .scalar("SELECT count(*) FROM projects WHERE user_id <> $1", "")
        .await;
    assert_eq!(saves, 0);
    s.stop_worker().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_events_reason_is_cleaned_and_bounded_like_an_http_one() {
    let mut s = stack(&[], &[]).await;
    s.start_worker().await;
    s.grant("r", 20).await;
    s.deduct("r", 5, "long-reason").await;
    let reason = format!(
        "GPU \u{202E}yromem fo tuo\u{202C}\u{1b}[2J {}",
        "x".repeat(20_000)
    );
    s.publish_event(
        "failed",
        &event(
            "ev-r",
            "r",
            "long-reason",
            OffsetDateTime::now_utc(),
            json!({"reason": reason}),
        ),
    )
    .await;
    wait_for("refunded", Duration::from_secs(15), || async {
        balance(&s, "r").await == 20
    })
    .await;
    let c = s.pool.get().await.expect("db");
    let stored: String = c
        .query_one(
            "SELECT refund_reason FROM reservations WHERE user_id = 'r' AND project_code = 'long-reason'",
            &[],
        )
        .await
        .expect("reservation")
        .get(0);
    assert_eq!(stored.chars().count(), 500);
    assert!(stored.starts_with("GPU yromem fo tuo[2J x"), "{stored:.40}");
    assert!(
        !stored
            .chars()
            .any(|c| c.is_control() || penora_domain::is_bidi_or_invisible_format(c))
    );
    s.stop_worker().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_events_queue_refuses_new_events_instead_of_growing() {
    // No worker: events wait; past the bound the broker says no.
    let s = stack(&[("EVENTS_QUEUE_MAX_LENGTH", "5")], &[]).await;
    let mut accepted = 0;
    for i in 0..12 {
        let body = event(
            &format!("ev-{i}"),
            "nobody",
            "none",
            OffsetDateTime::now_utc(),
            json!({}),
        );
        if publish_as_imagegene(&s, "failed", &body, FieldTable::default())
            .await
            .is_ok()
        {
            accepted += 1;
        }
    }
    // A quorum queue may take the message that crosses the bound before it
    // starts refusing (RabbitMQ 3.10 here held 6 with a limit of 5, and
    // sometimes nacked that sixth one though it kept it: a publisher that
    // retries sends a duplicate, which its event id makes harmless); every
    // one past that is refused.
    let depth = s.depth(&s.topology.queue(EVENTS)).await;
    assert!((5..=6).contains(&accepted), "accepted {accepted} of 12");
    assert!((5..=6).contains(&depth), "{depth} waiting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_broker_dead_lettered_keeps_none_of_the_headers_it_was_published_with() {
    use lapin::options::{BasicGetOptions, BasicNackOptions};
    let s = stack(&[], &[]).await;
    // Published with the worker's own headers, claiming an arrival two days
    // ago; then returned unacknowledged past the queue's delivery limit, so
    // the broker (not the worker, which would have dropped them) parks it
    // with the headers it was published with.
    let mut forged = FieldTable::default();
    let text = |v: &str| AMQPValue::LongString(v.to_owned().into());
    forged.insert(
        headers::FIRST_FAILURE_AT.into(),
        text(&rfc3339_millis(
            OffsetDateTime::now_utc() - Duration::from_secs(2 * 86_400),
        )),
    );
    forged.insert(
        headers::ORIGINAL_ROUTING_KEY.into(),
        text("penora.save-project"),
    );
    forged.insert(headers::ATTEMPT.into(), AMQPValue::LongUInt(1));
    let body = event(
        "ev-loop",
        "nobody",
        "none",
        OffsetDateTime::now_utc(),
        json!({}),
    );
    publish_as_imagegene(&s, "failed", &body, forged)
        .await
        .expect("published");
    let (work, dead) = (s.topology.queue(EVENTS), s.topology.dead_queue(EVENTS));
    let connection = penora_platform::broker::connect(&amqp_url(), "penora-tests")
        .await
        .expect("broker");
    let ch = connection.create_channel().await.expect("channel");
    let mut returns = 0;
    while let Some(got) = ch
        .basic_get(work.clone().into(), BasicGetOptions { no_ack: false })
        .await
        .expect("get")
    {
        got.delivery
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
            .expect("returned");
        returns += 1;
        assert!(returns <= 60, "the broker never applied the delivery limit");
    }
    let _ = connection.close(200, "bye".into()).await;
    // And one the publisher gave a time to live: it expires in the queue
    // (no worker runs) and the broker dead-letters it, headers and all.
    let mut forged_again = FieldTable::default();
    forged_again.insert(
        headers::FIRST_FAILURE_AT.into(),
        text(&rfc3339_millis(
            OffsetDateTime::now_utc() - Duration::from_secs(2 * 86_400),
        )),
    );
    let publisher = Publisher::new(
        penora_config::Secret::new(amqp_url()),
        "imagegene-test",
        s.topology.clone(),
    );
    publisher
        .publish_all(vec![Outgoing {
            exchange: s.topology.exchange("imagegene.events"),
            routing_key: "generation.failed".into(),
            payload: event(
                "ev-ttl",
                "nobody",
                "none",
                OffsetDateTime::now_utc(),
                json!({}),
            )
            .into_bytes(),
            properties: lapin::BasicProperties::default()
                .with_message_id("ev-ttl".into())
                .with_expiration("1".into())
                .with_headers(forged_again),
        }])
        .await
        .expect("published");
    wait_for("parked by the broker", Duration::from_secs(10), || async {
        s.depth(&dead).await == 2
    })
    .await;
    let listed = s.ops(&["dlq", "list", EVENTS, "--json"]).await;
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&listed.stdout).expect("json");
    assert_eq!(listed.len(), 2);
    for m in &listed {
        assert_eq!(m["original_routing_key"], json!("generation.failed"), "{m}");
        assert_eq!(m["first_failure_at"], json!(null), "{m}");
        assert_eq!(m["attempts"], json!(null), "{m}");
    }
    assert!(
        listed.iter().any(|m| m["error"]
            .as_str()
            .unwrap_or_default()
            .contains("delivery_limit")),
        "{listed:?}"
    );
    // Looked at again: still two (a copy put back never expires again).
    s.ops(&["dlq", "show", EVENTS]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(s.depth(&dead).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_from_the_end_of_time_is_judged_at_its_arrival_without_stopping_its_batch() {
    let mut s = stack(&[], &[]).await;
    s.grant("far", 30).await;
    for code in ["far-1", "far-2", "far-3"] {
        s.deduct("far", 10, code).await;
    }
    // Three events arrive together (one batch): the middle one dated at the
    // last instant the format allows (adding the clock skew to it used to
    // overflow, and the panic left the whole batch unacknowledged).
    let end = OffsetDateTime::parse("9999-12-31T23:59:59.999Z", &Rfc3339).expect("time");
    for (id, code, at) in [
        ("ev-far-1", "far-1", OffsetDateTime::now_utc()),
        ("ev-far-2", "far-2", end),
        ("ev-far-3", "far-3", OffsetDateTime::now_utc()),
    ] {
        s.publish_event("failed", &event(id, "far", code, at, json!({})))
            .await;
    }
    s.start_worker().await;
    wait_for("all three refunded", Duration::from_secs(15), || async {
        balance(&s, "far").await == 30
    })
    .await;
    s.wait_idle().await;
    assert_eq!(s.depth(&s.topology.dead_queue(EVENTS)).await, 0);
    s.stop_worker().await;
}
