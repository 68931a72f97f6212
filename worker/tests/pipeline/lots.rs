//! Credit lots and partial refunds through the worker (contract §12, §13):
//! the timer's expiry, events with `amount`, a window passing after a
//! partial refund. The clock is moved with `testing::travel`.

use std::time::Duration;

use penora_testing::travel;
use serde_json::json;

use crate::support::{Stack, stack, wait_for};

async fn clock_forward(s: &Stack, secs: f64) {
    let mut client = s.pool.get().await.expect("db");
    travel(&mut client, Duration::from_secs_f64(secs)).await;
}

async fn reconciled(s: &Stack) {
    let out = s.ops(&["reconcile"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn in_secs(secs: i64) -> String {
    penora_domain::timefmt::rfc3339_millis(
        time::OffsetDateTime::now_utc() + time::Duration::seconds(secs),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_timer_writes_the_expire_entry_of_a_lot_past_its_expiry_within_the_interval() {
    let mut s = stack(&[], &[]).await;
    s.grant("u1", 5).await;
    let r = s
        .post(
            "/api/unified/add-credits",
            &json!({"user_id": "u1", "amount": 10, "reason": "signup bonus", "reference": "bonus",
                    "category": "promotional", "expires_at": in_secs(60)}),
        )
        .await;
    assert!(r.status().is_success());
    s.deduct("u1", 4, "gen").await;
    s.start_worker().await;
    reconciled(&s).await;
    clock_forward(&s, 60.001).await;
    // SETTLE_INTERVAL_SECS is 1: the entry is there within 2 intervals.
    wait_for("the expire entry", Duration::from_secs(2), || async {
        s.scalar(
            "SELECT count(*) FROM ledger_entries WHERE user_id = $1 AND kind = 'expire' AND amount = -6",
            "u1",
        )
        .await
            == 1
    })
    .await;
    assert_eq!(
        s.scalar("SELECT balance FROM accounts WHERE user_id = $1", "u1")
            .await,
        5
    );
    wait_for("every entry audited", Duration::from_secs(10), || async {
        s.scalar(
            "SELECT coalesce(max(seq), 0) FROM audit_checkpoints WHERE user_id = $1",
            "u1",
        )
        .await
            == 4
    })
    .await;
    reconciled(&s).await;
    // (`audit verify` would find the moved times: the travel edits history.)
    s.stop_worker().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_with_an_amount_refund_part_and_settle_for_less() {
    let mut s = stack(&[], &[]).await;
    s.start_worker().await;
    s.grant("u1", 20).await;
    s.deduct("u1", 8, "four").await;
    let failed = |id: &str| {
        json!({"event_id": id, "user_id": "u1", "project_code": "four", "reason": "variation failed",
               "occurred_at": in_secs(0), "amount": 2})
        .to_string()
    };
    // One variation failed (the event delivered twice), then another.
    s.publish_event("failed", &failed("ev-a")).await;
    s.publish_event("failed", &failed("ev-a")).await;
    s.publish_event("failed", &failed("ev-b")).await;
    wait_for("two partial refunds", Duration::from_secs(10), || async {
        s.scalar(
            "SELECT refunded_amount FROM reservations WHERE user_id = $1",
            "u1",
        )
        .await
            == 4
    })
    .await;
    s.wait_idle().await;
    assert_eq!(
        s.scalar(
            "SELECT refunded_amount FROM reservations WHERE user_id = $1",
            "u1"
        )
        .await,
        4,
        "the repeated event refunded once"
    );
    // The rest succeeded, and cost 3 of the 4 still held.
    let succeeded = json!({"event_id": "ev-c", "user_id": "u1", "project_code": "four",
                           "occurred_at": in_secs(0), "amount": 3})
    .to_string();
    s.publish_event("succeeded", &succeeded).await;
    wait_for("settled for 3", Duration::from_secs(10), || async {
        s.scalar(
            "SELECT count(*) FROM reservations WHERE user_id = $1 AND state = 'settled' AND refunded_amount = 5",
            "u1",
        )
        .await
            == 1
    })
    .await;
    assert_eq!(
        s.scalar("SELECT balance FROM accounts WHERE user_id = $1", "u1")
            .await,
        17
    );
    s.wait_idle().await;
    reconciled(&s).await;
    s.stop_worker().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partly_refunded_reservation_settles_the_rest_when_its_window_passes() {
    let mut s = stack(&[], &[]).await;
    s.grant("u1", 20).await;
    s.deduct("u1", 8, "gen").await;
    let r = s
        .post(
            "/api/unified/refund-credits",
            &json!({"user_id": "u1", "project_code": "gen", "app_name": "imagegene",
                    "amount": 3, "reference": "first-variation"}),
        )
        .await;
    assert!(r.status().is_success());
    clock_forward(&s, 3601.0).await;
    // (In the moved clock, the reservation was made 3,601 s ago.)
    let occurred = in_secs(-3590);
    s.start_worker().await;
    wait_for("the timer settles", Duration::from_secs(10), || async {
        s.scalar(
            "SELECT count(*) FROM reservations WHERE user_id = $1 AND state = 'settled' \
               AND settled_by = 'window' AND refunded_amount = 3",
            "u1",
        )
        .await
            == 1
    })
    .await;
    assert_eq!(
        s.scalar("SELECT balance FROM accounts WHERE user_id = $1", "u1")
            .await,
        15
    );
    // A failure event from inside the window still refunds what was left.
    let late = json!({"event_id": "ev-late", "user_id": "u1", "project_code": "gen",
                      "reason": "lost", "occurred_at": occurred})
    .to_string();
    s.publish_event("failed", &late).await;
    wait_for(
        "the late event refunds the rest",
        Duration::from_secs(10),
        || async {
            s.scalar(
                "SELECT count(*) FROM reservations WHERE user_id = $1 AND state = 'refunded'",
                "u1",
            )
            .await
                == 1
        },
    )
    .await;
    assert_eq!(
        s.scalar("SELECT balance FROM accounts WHERE user_id = $1", "u1")
            .await,
        20
    );
    s.wait_idle().await;
    reconciled(&s).await;
    s.stop_worker().await;
}
