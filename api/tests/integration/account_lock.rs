//! One account lock: the workspace's writers lock a user's account row with
//! the lock the movements of credits take (`penora_store::accounts`, `FOR NO
//! KEY UPDATE`), so a user's saves, deletions and movements queue on one row,
//! and none of them waits for a foreign-key check on it (`FOR KEY SHARE`,
//! what an insert of a row that references the account holds).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{TestApp, base64_of, expect_error, spawn_app_with};

fn save_body(user: &str, content: &str) -> Value {
    json!({"user_id": user, "app_source": "imagegene", "project_type": "ai_artwork",
           "title": "t", "content": content})
}

/// Statements of the test database waiting for a lock.
async fn lock_waits(app: &TestApp) -> i64 {
    let client = app.pool.get().await.expect("db");
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
            &[],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn saves_and_deductions_of_one_user_sent_at_once_all_succeed() {
    let app =
        Arc::new(spawn_app_with(&[("DB_POOL_SIZE", "16"), ("SAVE_QUEUE_WAIT_MS", "30000")]).await);
    app.grant("u1", 100).await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let saver = app.clone();
        tasks.push(tokio::spawn(async move {
            let r = saver
                .post(
                    "/api/unified/save-project",
                    &save_body("u1", &base64_of(1000)),
                )
                .await;
            (format!("save {i}"), r.status(), StatusCode::ACCEPTED)
        }));
        let deducter = app.clone();
        tasks.push(tokio::spawn(async move {
            let (status, _) = deducter.deduct("u1", 3, &format!("at-once-{i}")).await;
            (format!("deduct {i}"), status, StatusCode::OK)
        }));
    }
    for t in tasks {
        let (what, got, expected) = t.await.expect("task");
        assert_eq!(got, expected, "{what}");
    }
    assert_eq!(app.balance("u1").await, 100 - 8 * 3);
    assert_eq!(
        app.scalar(
            "SELECT storage_used_bytes FROM accounts WHERE user_id = $1",
            "u1"
        )
        .await,
        8 * (1000 + 1),
        "eight contents of 1000 bytes and their titles"
    );
    app.assert_reconciled().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_workspace_waits_for_the_ledgers_account_lock_and_not_for_a_foreign_key_check() {
    let app = Arc::new(spawn_app_with(&[("DB_LOCK_TIMEOUT_MS", "5000")]).await);
    app.grant("u1", 100).await;
    let first = app
        .saved_url_project("u1", "https://cdn.example.com/1.png")
        .await;
    let second = app
        .saved_url_project("u1", "https://cdn.example.com/2.png")
        .await;

    // A concurrent insert of a row referencing the account holds its
    // foreign-key check's lock: the workspace's writers go on (with `FOR
    // UPDATE` they waited for it, here until the lock timeout, 503).
    let mut holder = app.pool.get().await.expect("db");
    let key_share = holder.transaction().await.expect("begin");
    key_share
        .execute(
            "SELECT 1 FROM accounts WHERE user_id = 'u1' FOR KEY SHARE",
            &[],
        )
        .await
        .expect("key share");
    let started = Instant::now();
    // Past the quota: the save locks the account to tell what is left.
    let r = app
        .post(
            "/api/unified/save-project",
            &save_body("u1", &base64_of(1_048_576)),
        )
        .await;
    expect_error(r, StatusCode::PAYLOAD_TOO_LARGE, "storage_limit_exceeded").await;
    let r = app
        .delete(&format!("/api/unified/projects/{first}?user_id=u1"))
        .await;
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "{}",
        r.text().await.unwrap_or_default()
    );
    let mut worker = app.pool.get().await.expect("db");
    let queued = app
        .post(
            "/api/unified/save-project",
            &save_body("u1", "https://cdn.example.com/3.png"),
        )
        .await
        .json::<Value>()
        .await
        .expect("json");
    let queued = queued["project_id"]
        .as_str()
        .expect("project_id")
        .parse()
        .expect("uuid");
    let finished = penora_workspace::projects::finish_save(&mut worker, "u1", queued, Ok(None))
        .await
        .expect("the worker's half of a save");
    assert!(
        matches!(finished, penora_workspace::projects::Finished::Saved { .. }),
        "{finished:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "nothing waited for the foreign-key check: {:?}",
        started.elapsed()
    );
    key_share.rollback().await.expect("rollback");

    // The ledger's lock held (a movement in progress): a deletion waits for
    // it, then goes through.
    let ledger = holder.transaction().await.expect("begin");
    penora_store::accounts::lock_one(&ledger, "u1")
        .await
        .expect("the ledger's lock")
        .expect("the account");
    let deletion = tokio::spawn({
        let app = app.clone();
        async move {
            app.delete(&format!("/api/unified/projects/{second}?user_id=u1"))
                .await
                .status()
        }
    });
    let waiting = Instant::now();
    while lock_waits(&app).await < 1 {
        assert!(
            waiting.elapsed() < Duration::from_secs(4),
            "the deletion waits for the account"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!deletion.is_finished(), "the deletion waits");
    ledger.rollback().await.expect("rollback");
    assert_eq!(deletion.await.expect("task"), StatusCode::OK);
    app.assert_reconciled().await;
}
