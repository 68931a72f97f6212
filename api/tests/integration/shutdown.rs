//! Stopping: the API has one shutdown deadline (`SHUTDOWN_DEADLINE_SECS`,
//! passed to `run_until_stopped`). A request in progress when the stop comes
//! is answered if it finishes within the deadline; one that does not never
//! holds the process past it.
//!
//! A request is held in progress the way a long operator transaction holds
//! one: the test locks the account's row, and the deduction waits for it.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::support::{ApiProcess, Stoppable, TestApp};

/// Locks `user`'s account row in an open transaction on the returned
/// connection (released by `ROLLBACK` or by dropping it).
async fn hold_account(app: &TestApp, user: &str) -> deadpool_postgres::Object {
    let holder = app.pool.get().await.expect("db");
    holder.batch_execute("BEGIN").await.expect("begin");
    holder
        .execute(
            "SELECT 1 FROM accounts WHERE user_id = $1 FOR UPDATE",
            &[&user],
        )
        .await
        .expect("row lock");
    holder
}

/// Waits until a session of the test database waits for a row lock: the
/// deduction is in progress, inside the API.
async fn until_a_request_waits_for_the_lock(app: &TestApp) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = app
            .pool
            .get()
            .await
            .expect("db")
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if waiting > 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the deduction never reached the row lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A deduction of 5 for `user` sent to `base` in a task of its own: its
/// status, or `None` when the connection ended without an answer.
fn deduct_in_background(
    base: &str,
    user: &str,
    code: &str,
) -> tokio::task::JoinHandle<Option<StatusCode>> {
    let request = reqwest::Client::new()
        .post(format!("{base}/api/unified/deduct-credits"))
        .header("X-API-Key", crate::support::BOOT_KEY)
        .json(
            &json!({"user_id": user, "amount": 5, "app_name": "imagegene", "project_code": code}),
        );
    tokio::spawn(async move { request.send().await.ok().map(|r| r.status()) })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_in_progress_when_the_stop_comes_is_answered_within_the_deadline() {
    let mut api =
        Stoppable::start(&[("DB_LOCK_TIMEOUT_MS", "9000")], Duration::from_secs(10)).await;
    api.app.grant("u1", 20).await;
    let holder = hold_account(&api.app, "u1").await;
    let answer = deduct_in_background(&api.app.base, "u1", "in-flight");
    until_a_request_waits_for_the_lock(&api.app).await;
    api.stop();
    // Stopping: no new connection is taken...
    let refused = reqwest::Client::new()
        .get(format!("{}/health/live", api.app.base))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(refused.is_err(), "a new connection was served: {refused:?}");
    // ...and the one in progress finishes once its row is free.
    holder.batch_execute("ROLLBACK").await.expect("released");
    let status = answer.await.expect("the request task");
    assert_eq!(status, Some(StatusCode::OK));
    let took = api.stopped(Duration::from_secs(10)).await;
    assert!(
        took < Duration::from_secs(8),
        "the API stopped once its last request was answered, not at the deadline: {took:?}"
    );
    assert_eq!(api.app.balance("u1").await, 15, "the deduction committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_still_in_progress_at_the_deadline_does_not_hold_the_api() {
    let deadline = Duration::from_secs(1);
    let mut api = Stoppable::start(&[("DB_LOCK_TIMEOUT_MS", "9000")], deadline).await;
    api.app.grant("u1", 20).await;
    let holder = hold_account(&api.app, "u1").await;
    let answer = deduct_in_background(&api.app.base, "u1", "stuck");
    until_a_request_waits_for_the_lock(&api.app).await;
    api.stop();
    let took = api.stopped(Duration::from_secs(10)).await;
    assert!(
        took >= deadline - Duration::from_millis(100),
        "it waited for the request in progress: {took:?}"
    );
    assert!(
        took < deadline + Duration::from_secs(2),
        "it stopped at its deadline: {took:?}"
    );
    drop(holder);
    drop(answer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn penora_api_exits_at_its_shutdown_deadline_after_sigterm_with_a_request_in_progress() {
    let mut api = ApiProcess::start(&[
        ("SHUTDOWN_DEADLINE_SECS", "1"),
        ("DB_LOCK_TIMEOUT_MS", "9000"),
    ])
    .await;
    api.app.grant("u1", 20).await;
    let holder = hold_account(&api.app, "u1").await;
    let answer = deduct_in_background(&api.base, "u1", "sigterm");
    until_a_request_waits_for_the_lock(&api.app).await;
    let (status, took) = api.terminate(Duration::from_secs(15)).await;
    assert!(status.success(), "{status:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "exited at SHUTDOWN_DEADLINE_SECS=1: {took:?}"
    );
    drop(holder);
    drop(answer);
}
