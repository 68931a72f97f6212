//! Backpressure on the audit (`AUDIT_LAG_LIMIT_MS`): while the worker's
//! audit runs further behind the ledger than the limit, new deductions are
//! held back with `503 busy` and `Retry-After`, and change nothing; once it
//! has caught up they flow again.

use std::time::Duration;

use serde_json::json;

use crate::support::{stack, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deductions_are_held_back_while_the_audit_lags_and_flow_again_once_it_caught_up() {
    // A worker that records one entry at a time, so a backlog takes a while
    // to drain.
    let mut s = stack(
        &[
            ("AUDIT_LAG_LIMIT_MS", "1000"),
            ("WORKER_BATCH_MAX", "1"),
            ("WORKER_BATCHES_IN_FLIGHT", "1"),
        ],
        &[],
    )
    .await;
    let users: Vec<String> = (0..40).map(|i| format!("u{i}")).collect();
    for u in &users {
        s.grant(u, 1_000).await;
    }
    // The audit falls behind: no worker records anything while 400
    // deductions are committed, and for 1.5 s more.
    let s_ref = &s;
    futures_util::future::join_all(users.iter().map(|u| async move {
        for i in 0..10 {
            s_ref.deduct(u, 1, &format!("early{i}")).await;
        }
    }))
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let balance_before: i64 = s
        .scalar("SELECT balance FROM accounts WHERE user_id = $1", "u1")
        .await;
    // The worker starts and records the backlog, seconds late: it reports
    // the lag, and the API holds new deductions back.
    s.start_worker().await;
    let mut held = None;
    for i in 0..100 {
        let code = format!("late{i}");
        let r = s
            .post(
                "/api/unified/deduct-credits",
                &json!({"user_id": "u1", "amount": 1, "app_name": "imagegene", "project_code": code}),
            )
            .await;
        if r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            let retry_after = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body: serde_json::Value = r.json().await.expect("json");
            held = Some((code, retry_after, body));
            break;
        }
        assert!(r.status().is_success(), "deduct: {}", r.status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, retry_after, body) = held.expect("a deduction was held back while the audit lagged");
    assert_eq!(retry_after.as_deref(), Some("1"), "Retry-After in seconds");
    assert_eq!(body["code"], json!("busy"), "{body}");
    assert_eq!(body["success"], json!(false), "{body}");
    // The dashboard's figure: the lag the API held the deduction on.
    let lag = s.api_metric("penora_audit_backlog_lag_seconds").await;
    assert!(lag > 1.0, "the API's audit lag gauge reads {lag} s");
    // The refused deduction changed nothing.
    assert_eq!(
        s.scalar(
            &format!(
                "SELECT count(*) FROM reservations WHERE user_id = $1 AND project_code = '{code}'"
            ),
            "u1"
        )
        .await,
        0
    );
    assert!(
        s.scalar("SELECT balance FROM accounts WHERE user_id = $1", "u1")
            .await
            <= balance_before,
        "nothing was given back or charged twice"
    );
    // The audit catches up, the report goes stale, and the same request goes
    // through.
    wait_for(
        "the held-back deduction goes through",
        Duration::from_secs(10),
        || async {
            s.post(
                "/api/unified/deduct-credits",
                &json!({"user_id": "u1", "amount": 1, "app_name": "imagegene", "project_code": code}),
            )
            .await
            .status()
            .is_success()
        },
    )
    .await;
    s.wait_idle().await;
    assert_eq!(
        s.scalar(
            "SELECT count(*) FROM audit_pending WHERE user_id = $1",
            "u1"
        )
        .await,
        0,
        "every entry audited"
    );
    s.stop_worker().await;
}
