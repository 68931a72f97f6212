//! Event time decides refunds, not processing time (CONTRACT §11): a
//! `generation.failed` event from inside the refund window refunds however
//! late the worker gets to it, even after the timer settled the reservation
//! because its window passed; a success event's settlement stays final.

use std::time::Duration;

use penora_domain::timefmt::rfc3339_millis;
use serde_json::json;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::support::{Stack, stack, wait_for};

fn failed(id: &str, user: &str, code: &str, at: OffsetDateTime) -> String {
    json!({"event_id": id, "user_id": user, "project_code": code,
           "reason": "GPU out of memory", "occurred_at": rfc3339_millis(at)})
    .to_string()
}

/// The reservation's state and who settled it.
async fn state(s: &Stack, code: &str) -> (String, Option<String>) {
    let c = s.pool.get().await.expect("db");
    let row = c
        .query_one(
            "SELECT state, settled_by FROM reservations WHERE project_code = $1",
            &[&code],
        )
        .await
        .expect("reservation");
    (row.get(0), row.get(1))
}

async fn balance(s: &Stack, user: &str) -> i64 {
    s.scalar("SELECT balance FROM accounts WHERE user_id = $1", user)
        .await
}

/// Deducts through the API; returns when the reservation was made.
async fn deducted_at(s: &Stack, user: &str, amount: i64, code: &str) -> OffsetDateTime {
    let made = s.deduct(user, amount, code).await;
    OffsetDateTime::parse(made["timestamp"].as_str().expect("timestamp"), &Rfc3339).expect("time")
}

async fn settled_by_window(s: &Stack, code: &str) {
    wait_for(
        "the timer settles the reservation",
        Duration::from_secs(15),
        || async { state(s, code).await == ("settled".into(), Some("window".into())) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failure_from_inside_the_window_refunds_after_the_window_passed() {
    // The event waits in the queue while the worker is down, longer than the
    // 2 s window: its time is believed as long as it is within the lateness
    // bound of its arrival (by default the window itself).
    let mut s = stack(
        &[
            ("REFUND_WINDOW_SECS", "2"),
            ("MAX_EVENT_LATENESS_SECS", "60"),
        ],
        &[],
    )
    .await;
    s.start_worker().await;
    s.grant("late", 50).await;
    let created = deducted_at(&s, "late", 10, "slow-news").await;
    // The failure happened a second into the window, but its event reaches
    // the worker only after the timer settled the reservation.
    settled_by_window(&s, "slow-news").await;
    s.stop_worker().await;
    s.publish_event(
        "failed",
        &failed(
            "ev-late",
            "late",
            "slow-news",
            created + Duration::from_secs(1),
        ),
    )
    .await;
    s.start_worker().await;
    wait_for(
        "the late event refunds",
        Duration::from_secs(15),
        || async { balance(&s, "late").await == 50 },
    )
    .await;
    assert_eq!(
        state(&s, "slow-news").await,
        ("refunded".into(), Some("window".into()))
    );
    // The same event again, and an event from after the window: nothing more.
    s.publish_event(
        "failed",
        &failed(
            "ev-late",
            "late",
            "slow-news",
            created + Duration::from_secs(1),
        ),
    )
    .await;
    s.wait_idle().await;
    assert_eq!(balance(&s, "late").await, 50);
    let kinds = s
        .scalar(
            "SELECT count(*) FROM ledger_entries WHERE user_id = $1 AND project_code = 'slow-news'",
            "late",
        )
        .await;
    assert_eq!(kinds, 3, "deduct, settle (the window), refund");
    let audited = s
        .scalar(
            "SELECT coalesce(max(seq), 0) FROM audit_checkpoints WHERE user_id = $1",
            "late",
        )
        .await;
    let entries = s
        .scalar(
            "SELECT count(*) FROM ledger_entries WHERE user_id = $1",
            "late",
        )
        .await;
    assert_eq!(
        audited, entries,
        "every entry, the refund's too, is audited"
    );

    // An event from after the window closed is refused and parked.
    s.deduct("late", 5, "too-late").await;
    settled_by_window(&s, "too-late").await;
    s.publish_event(
        "failed",
        &failed(
            "ev-after",
            "late",
            "too-late",
            OffsetDateTime::now_utc() + Duration::from_secs(3600),
        ),
    )
    .await;
    let dead = s.topology.dead_queue("penora.generation-events");
    wait_for(
        "the late event is parked",
        Duration::from_secs(15),
        || async { s.depth(&dead).await == 1 },
    )
    .await;
    assert_eq!(balance(&s, "late").await, 45);
    s.stop_worker().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_success_event_settles_for_good_and_a_replayed_dead_letter_refunds_once() {
    let mut s = stack(&[("REFUND_WINDOW_SECS", "2")], &[]).await;
    s.start_worker().await;
    s.grant("u", 100).await;

    // Settled by a success event (processed after the window passed): a
    // failure event from inside the window no longer refunds.
    let created = deducted_at(&s, "u", 10, "won").await;
    settled_by_window(&s, "won").await;
    let succeeded = json!({"event_id": "ev-ok", "user_id": "u", "project_code": "won",
                           "occurred_at": rfc3339_millis(created)})
    .to_string();
    s.publish_event("succeeded", &succeeded).await;
    wait_for("the success is final", Duration::from_secs(15), || async {
        state(&s, "won").await == ("settled".into(), Some("final".into()))
    })
    .await;
    // Recorded with the settlement, in its transaction.
    let c = s.pool.get().await.expect("db");
    let recorded: String = c
        .query_one(
            "SELECT outcome FROM processed_events WHERE event_id = 'ev-ok'",
            &[],
        )
        .await
        .expect("the success event is recorded")
        .get(0);
    assert_eq!(recorded, "already settled", "the timer settled it first");
    drop(c);
    s.publish_event("failed", &failed("ev-no", "u", "won", created))
        .await;
    let dead = s.topology.dead_queue("penora.generation-events");
    wait_for("the failure is parked", Duration::from_secs(15), || async {
        s.depth(&dead).await == 1
    })
    .await;
    assert_eq!(balance(&s, "u").await, 90);
    s.ops(&["dlq", "purge", "penora.generation-events", "--yes"])
        .await;

    // An event that arrived before its reservation is parked; the
    // reservation is made, its window passes, and the dead letter replayed
    // then refunds it, once (its occurred_at, a moment before the
    // reservation, within the clock skew, counts as the reservation's
    // creation; and it is judged against its first arrival, which the
    // replay keeps, not the replay's).
    let early = failed("ev-early", "u", "ahead", OffsetDateTime::now_utc());
    s.publish_event("failed", &early).await;
    wait_for(
        "the early event is parked",
        Duration::from_secs(15),
        || async { s.depth(&dead).await == 1 },
    )
    .await;
    s.deduct("u", 7, "ahead").await;
    settled_by_window(&s, "ahead").await;
    assert_eq!(balance(&s, "u").await, 83);
    let replay = s.ops(&["dlq", "replay", "penora.generation-events"]).await;
    assert!(replay.status.success(), "{replay:?}");
    wait_for("the replay refunds", Duration::from_secs(15), || async {
        balance(&s, "u").await == 90
    })
    .await;
    // ImageGene sends it again: handled once.
    s.publish_event("failed", &early).await;
    s.wait_idle().await;
    assert_eq!(balance(&s, "u").await, 90);
    assert_eq!(s.depth(&dead).await, 0);
    let reconcile = s.ops(&["reconcile"]).await;
    assert!(reconcile.status.success(), "{reconcile:?}");
    s.stop_worker().await;
}
