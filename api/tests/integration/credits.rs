//! Credit movements under concurrency and repetition: invariants 1, 2, 4, 5.

use std::sync::Arc;

use penora_domain::{AppName, ProjectCode, UserId};
use penora_ledger as ledger;
use penora_ledger::SettleResult;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{TestApp, expect_error, spawn_app, spawn_app_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_deducts_of_5_on_500_succeed_exactly_100_times() {
    two_hundred_concurrent_deducts_of_5_on_500_succeed_exactly_100_times_with("128").await;
}

/// The same with group commit off: every deduction is a batch of one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_deducts_of_5_on_500_succeed_exactly_100_times_without_group_commit()
{
    two_hundred_concurrent_deducts_of_5_on_500_succeed_exactly_100_times_with("1").await;
}

async fn two_hundred_concurrent_deducts_of_5_on_500_succeed_exactly_100_times_with(
    batch_max: &str,
) {
    let app =
        Arc::new(spawn_app_with(&[("DB_POOL_SIZE", "16"), ("DEDUCT_BATCH_MAX", batch_max)]).await);
    app.grant("storm", 500).await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            app.deduct("storm", 5, &format!("img_{i}")).await
        }));
    }
    let mut ok = 0;
    let mut refused = 0;
    for t in tasks {
        let (status, body) = t.await.expect("task");
        match status {
            StatusCode::OK => ok += 1,
            StatusCode::PAYMENT_REQUIRED => {
                assert_eq!(body["code"], json!("insufficient_credits"));
                refused += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!((ok, refused), (100, 100));
    assert_eq!(app.balance("storm").await, 0);
    assert_eq!(app.ledger_sum("storm").await, 0);
    assert_eq!(
        app.scalar(
            "SELECT count(*) FROM reservations WHERE user_id = $1",
            "storm"
        )
        .await,
        100
    );
    app.assert_reconciled().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_deducts_with_one_project_code_charge_once() {
    fifty_concurrent_deducts_with_one_project_code_charge_once_with("128").await;
}

/// The same with group commit off: every deduction is a batch of one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_deducts_with_one_project_code_charge_once_without_group_commit() {
    fifty_concurrent_deducts_with_one_project_code_charge_once_with("1").await;
}

async fn fifty_concurrent_deducts_with_one_project_code_charge_once_with(batch_max: &str) {
    let app =
        Arc::new(spawn_app_with(&[("DB_POOL_SIZE", "16"), ("DEDUCT_BATCH_MAX", batch_max)]).await);
    app.grant("u1", 100).await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            let r = app
                .post(
                    "/api/unified/deduct-credits",
                    &json!({"user_id": "u1", "amount": 5, "app_name": "imagegene", "project_code": "img_same"}),
                )
                .await;
            let replayed = r.headers().get("idempotent-replayed").is_some();
            let status = r.status();
            let body: Value = r.json().await.expect("json");
            (status, replayed, body)
        }));
    }
    let mut replays = 0;
    for t in tasks {
        let (status, replayed, body) = t.await.expect("task");
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            body["new_balance"],
            json!(95),
            "every answer is the first one: {body}"
        );
        replays += usize::from(replayed);
    }
    assert_eq!(replays, 49, "one fresh answer, 49 replays");
    assert_eq!(app.balance("u1").await, 95);
    assert_eq!(app.ledger_rows("u1").await, 2, "the grant and one deduct");
    app.assert_reconciled().await;
}

#[tokio::test]
async fn a_project_code_reused_with_another_amount_is_a_conflict_and_another_users_is_their_own() {
    let app = spawn_app().await;
    app.grant("u1", 100).await;
    app.grant("u2", 100).await;
    assert_eq!(app.deduct("u1", 5, "img_1").await.0, StatusCode::OK);
    let (status, body) = app.deduct("u1", 6, "img_1").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], json!("idempotency_conflict"));
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("amount of 5"),
        "{body}"
    );
    // Keys are per user (§15): u2's img_1 is u2's own reservation.
    let (status, body) = app.deduct("u2", 5, "img_1").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["new_balance"], json!(95));
    assert_eq!(
        app.balance("u1").await,
        95,
        "u1 untouched by u2's deduction"
    );
    // Each user's refund returns that user's credits only.
    let r = app
        .post(
            "/api/unified/refund-credits",
            &json!({"user_id": "u2", "project_code": "img_1", "app_name": "imagegene"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(app.balance("u2").await, 100);
    assert_eq!(app.balance("u1").await, 95);
    let (status, body) = app.deduct("u2", 5, "img_1").await;
    assert_eq!(status, StatusCode::OK, "a replay of u2's own: {body}");
    assert_eq!(body["reservation_status"], json!("refunded"));
    // The same code under another app is another reservation.
    let r = app
        .post(
            "/api/unified/deduct-credits",
            &json!({"user_id": "u2", "amount": 5, "app_name": "penora", "project_code": "img_1"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(app.balance("u1").await, 95);
    assert_eq!(app.balance("u2").await, 95);
    app.assert_reconciled().await;
}

#[tokio::test]
async fn a_replayed_deduct_with_an_empty_balance_still_answers_the_first_result() {
    let app = spawn_app().await;
    app.grant("u1", 5).await;
    assert_eq!(app.deduct("u1", 5, "img_all").await.0, StatusCode::OK);
    let (status, body) = app.deduct("u1", 5, "img_all").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["new_balance"], json!(0));
    assert_eq!(app.balance("u1").await, 0);
}

async fn refund(app: &TestApp, user: &str, code: &str) -> reqwest::Response {
    app.post(
        "/api/unified/refund-credits",
        &json!({"user_id": user, "project_code": code, "reason": "generation failed"}),
    )
    .await
}

#[tokio::test]
async fn a_refund_returns_the_reserved_credits_once_and_then_answers_the_first_result() {
    let app = spawn_app().await;
    app.grant("u1", 20).await;
    app.deduct("u1", 8, "img_r").await;
    let r = refund(&app, "u1", "img_r").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().get("idempotent-replayed").is_none());
    let first: Value = r.json().await.expect("json");
    assert_eq!(first["credits_refunded"], json!(8));
    assert_eq!(first["new_balance"], json!(20));
    assert_eq!(first["reservation_status"], json!("refunded"));
    let r = refund(&app, "u1", "img_r").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers().get("idempotent-replayed").map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    let second: Value = r.json().await.expect("json");
    assert_eq!(second, first, "the second answer is the first one");
    assert_eq!(app.balance("u1").await, 20);
    let (_, replay) = app.deduct("u1", 8, "img_r").await;
    assert_eq!(replay["reservation_status"], json!("refunded"));
    assert_eq!(
        app.balance("u1").await,
        20,
        "a replayed deduct after a refund moves nothing"
    );
    app.assert_reconciled().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_refunds_of_one_reservation_refund_once() {
    let app = Arc::new(spawn_app_with(&[("DB_POOL_SIZE", "16")]).await);
    app.grant("u1", 10).await;
    app.deduct("u1", 10, "img_c").await;
    let mut tasks = Vec::new();
    for _ in 0..30 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            refund(&app, "u1", "img_c").await.status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task"), StatusCode::OK);
    }
    assert_eq!(app.balance("u1").await, 10);
    assert_eq!(
        app.scalar(
            "SELECT count(*) FROM ledger_entries WHERE user_id = $1 AND kind = 'refund'",
            "u1"
        )
        .await,
        1
    );
    app.assert_reconciled().await;
}

#[tokio::test]
async fn refunding_an_unknown_reservation_is_not_found() {
    let app = spawn_app().await;
    app.grant("u1", 10).await;
    app.deduct("u1", 5, "img_mine").await;
    expect_error(
        refund(&app, "u1", "img_unknown").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    expect_error(
        refund(&app, "nobody", "img_mine").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    app.grant("u2", 1).await;
    // Another user's reservation is not found either (and not refunded).
    expect_error(
        refund(&app, "u2", "img_mine").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let missing = app
        .post("/api/unified/refund-credits", &json!({"user_id": "u1"}))
        .await;
    let msg = expect_error(missing, StatusCode::BAD_REQUEST, "invalid_request").await;
    assert!(msg.contains("project_code"), "{msg}");
    assert_eq!(app.balance("u1").await, 5);
}

#[tokio::test]
async fn a_settled_reservation_is_not_refundable() {
    let app = spawn_app().await;
    app.grant("u1", 10).await;
    app.deduct("u1", 4, "img_s").await;
    let mut client = app.pool.get().await.expect("db");
    let user = UserId::parse("u1").expect("valid");
    let appn = AppName::parse("app_name", "imagegene").expect("valid");
    let code = ProjectCode::parse("img_s").expect("valid");
    for expected in [SettleResult::Settled, SettleResult::AlreadySettled] {
        let got = ledger::settle(
            &mut client,
            &user,
            &appn,
            &code,
            (ledger::SettledBy::Final, "generation succeeded"),
            None,
            None,
        )
        .await
        .expect("settles");
        assert_eq!(got, expected);
    }
    let msg = expect_error(
        refund(&app, "u1", "img_s").await,
        StatusCode::CONFLICT,
        "not_refundable",
    )
    .await;
    assert!(msg.contains("settled"), "{msg}");
    assert_eq!(app.balance("u1").await, 6);
    assert_eq!(
        app.scalar(
            "SELECT count(*) FROM ledger_entries WHERE user_id = $1 AND kind = 'settle'",
            "u1"
        )
        .await,
        1
    );
    app.assert_reconciled().await;
}

#[tokio::test]
async fn a_refund_after_the_window_is_not_refundable() {
    let app = spawn_app_with(&[("REFUND_WINDOW_SECS", "0")]).await;
    app.grant("u1", 10).await;
    let (_, body) = app.deduct("u1", 4, "img_late").await;
    assert_eq!(
        body["refundable_until"], body["timestamp"],
        "a zero window closes at once"
    );
    let msg = expect_error(
        refund(&app, "u1", "img_late").await,
        StatusCode::CONFLICT,
        "not_refundable",
    )
    .await;
    assert!(msg.contains("window"), "{msg}");
    assert_eq!(app.balance("u1").await, 6);
}

#[tokio::test]
async fn a_refund_names_the_app_when_one_code_has_reservations_of_several_apps() {
    let app = spawn_app().await;
    app.grant("u1", 20).await;
    app.deduct("u1", 3, "shared").await;
    let r = app
        .post(
            "/api/unified/deduct-credits",
            &json!({"user_id": "u1", "amount": 4, "app_name": "penora", "project_code": "shared"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let msg = expect_error(
        refund(&app, "u1", "shared").await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
    assert!(msg.contains("app_name"), "{msg}");
    let r = app
        .post(
            "/api/unified/refund-credits",
            &json!({"user_id": "u1", "project_code": "shared", "app_name": "penora"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["credits_refunded"], json!(4));
    assert_eq!(app.balance("u1").await, 17);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grants_are_idempotent_by_user_and_reference_even_in_a_storm() {
    let app = Arc::new(spawn_app_with(&[("DB_POOL_SIZE", "16")]).await);
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            let r = app
                .post(
                    "/api/unified/add-credits",
                    &json!({"user_id": "buyer", "amount": 100, "reason": "purchase", "reference": "pay_1"}),
                )
                .await;
            (r.status(), r.headers().get("idempotent-replayed").is_some())
        }));
    }
    let mut replays = 0;
    for t in tasks {
        let (status, replayed) = t.await.expect("task");
        assert_eq!(status, StatusCode::OK);
        replays += usize::from(replayed);
    }
    assert_eq!(replays, 39);
    assert_eq!(app.balance("buyer").await, 100);
    let r = app
        .post(
            "/api/unified/add-credits",
            &json!({"user_id": "buyer", "amount": 200, "reason": "purchase", "reference": "pay_1"}),
        )
        .await;
    expect_error(r, StatusCode::CONFLICT, "idempotency_conflict").await;
    let r = app
        .post(
            "/api/unified/add-credits",
            &json!({"user_id": "other", "amount": 100, "reason": "purchase", "reference": "pay_1"}),
        )
        .await;
    // References are per user (§15): another user's pay_1 is their own grant.
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().get("idempotent-replayed").is_none());
    assert_eq!(app.balance("other").await, 100);
    assert_eq!(app.balance("buyer").await, 100);
    assert_eq!(app.ledger_rows("buyer").await, 1);
    app.assert_reconciled().await;
}

#[tokio::test]
async fn every_credit_movement_writes_its_ledger_audit_job_in_the_same_transaction() {
    // (One job per commit, naming its entries with the chain's seq after
    // the commit: each movement here is a commit of its own.)
    let app = spawn_app().await;
    app.grant("u1", 30).await;
    app.deduct("u1", 5, "a").await;
    app.deduct("u1", 5, "b").await;
    app.deduct("u1", 5, "a").await; // replay: no movement, no job
    refund(&app, "u1", "b").await;
    let client = app.pool.get().await.expect("db");
    let rows = client
        .query(
            "SELECT l.id, o.payload FROM ledger_entries l \
             LEFT JOIN LATERAL (SELECT o.payload FROM outbox o, jsonb_array_elements(o.payload->'chains') c \
               WHERE o.user_id = l.user_id AND o.routing_key = 'penora.ledger-audit' \
                 AND c->>'user_id' = l.user_id AND c->'entry_ids' @> to_jsonb(l.id) \
                 AND (c->>'seq')::bigint = l.chain_seq) o ON true \
             WHERE l.user_id = 'u1' ORDER BY l.id",
            &[],
        )
        .await
        .expect("query");
    assert_eq!(rows.len(), 4, "grant, two deducts, one refund");
    for row in rows {
        let payload: Option<Value> = row.get(1);
        let payload = payload.expect("every ledger entry has its audit job");
        assert_eq!(payload["chains"][0]["user_id"], json!("u1"));
    }
    assert_eq!(
        app.scalar("SELECT count(*) FROM outbox WHERE user_id = $1 AND routing_key = 'penora.ledger-audit'", "u1").await,
        4
    );
    // Besides the jobs, only events out (contract §14): the grant's and the
    // refund's.
    assert_eq!(
        app.scalar(
            "SELECT count(*) FROM outbox WHERE user_id = $1 AND exchange NOT IN ('penora.jobs', 'penora.events')",
            "u1"
        )
        .await,
        0
    );
}

#[tokio::test]
async fn transactions_are_listed_newest_first_in_pages() {
    let app = spawn_app().await;
    app.grant("u1", 100).await;
    for i in 0..5 {
        app.deduct("u1", i + 1, &format!("t{i}")).await;
    }
    let page1: Value = app
        .get("/api/unified/transactions?user_id=u1&limit=4")
        .await
        .json()
        .await
        .expect("json");
    let txs = page1["transactions"].as_array().expect("array");
    assert_eq!(txs.len(), 4);
    assert_eq!(txs[0]["amount"], json!(-5));
    assert_eq!(txs[0]["balance_after"], json!(85));
    assert_eq!(txs[0]["kind"], json!("deduct"));
    assert_eq!(txs[0]["project_code"], json!("t4"));
    let cursor = page1["next_cursor"].as_str().expect("a next page");
    let page2: Value = app
        .get(&format!(
            "/api/unified/transactions?user_id=u1&limit=4&cursor={cursor}"
        ))
        .await
        .json()
        .await
        .expect("json");
    let txs = page2["transactions"].as_array().expect("array");
    assert_eq!(txs.len(), 2);
    assert_eq!(txs[1]["kind"], json!("grant"));
    assert_eq!(txs[1]["amount"], json!(100));
    assert_eq!(page2["next_cursor"], json!(null));
}

#[tokio::test]
async fn the_database_refuses_a_negative_balance_and_ledger_edits_by_itself() {
    let app = spawn_app().await;
    app.grant("u1", 5).await;
    let client = app.pool.get().await.expect("db");
    let negative = client
        .execute("UPDATE accounts SET balance = -1 WHERE user_id = 'u1'", &[])
        .await;
    assert!(negative.is_err(), "the balance constraint holds");
    let edit = client
        .execute("UPDATE ledger_entries SET amount = 500", &[])
        .await;
    assert!(edit.is_err(), "the ledger is append-only");
    let delete = client.execute("DELETE FROM ledger_entries", &[]).await;
    assert!(delete.is_err(), "the ledger is append-only");
    assert_eq!(app.ledger_sum("u1").await, 5);
}
