//! Regression tests for what `scripts/chaos.sh` (faults under load) found.

use reqwest::StatusCode;

use serde_json::json;

use crate::support::{PNG_1X1, expect_error, spawn_app};

/// Found: while the database refused new connections ("database … is not
/// currently accepting connections", SQLSTATE 55000, not an `08` code), the
/// API answered 500 `internal` and the worker parked its jobs as poison
/// (dead letters, unaudited entries, a save never settled). A refused
/// connection is an outage: 503 `unavailable`, and the same request succeeds
/// once the database is back.
#[tokio::test]
async fn a_database_refusing_connections_is_unavailable_not_an_internal_error() {
    let app = spawn_app().await;
    app.grant("u1", 10).await;
    let admin = penora_testing::admin_client().await;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{0}\" ALLOW_CONNECTIONS false; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{0}'",
            app.db.name
        ))
        .await
        .expect("database away");
    let mut outcome = String::new();
    for (path, body) in [
        (
            "/api/unified/deduct-credits",
            json!({"user_id": "u1", "amount": 3, "app_name": "imagegene", "project_code": "c1"}),
        ),
        (
            "/api/unified/refund-credits",
            json!({"user_id": "u1", "project_code": "c0", "app_name": "imagegene"}),
        ),
        (
            "/api/unified/add-credits",
            json!({"user_id": "u1", "amount": 3, "reason": "r", "reference": "g1"}),
        ),
        (
            "/api/unified/save-project",
            json!({"user_id": "u1", "app_source": "imagegene", "project_type": "a", "title": "t", "content": PNG_1X1}),
        ),
    ] {
        let r = app.post(path, &body).await;
        outcome = expect_error(r, StatusCode::SERVICE_UNAVAILABLE, "unavailable").await;
    }
    for path in [
        "/api/unified/user-info?user_id=u1",
        "/api/unified/transactions?user_id=u1",
        "/api/unified/projects?user_id=u1",
    ] {
        expect_error(
            app.get(path).await,
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
        )
        .await;
    }
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" ALLOW_CONNECTIONS true",
            app.db.name
        ))
        .await
        .expect("database back");
    assert!(
        !outcome.contains("accepting"),
        "no internal detail in the body: {outcome}"
    );
    let (status, body) = app.deduct("u1", 3, "c1").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(app.balance("u1").await, 7);
}

/// The same refusal, classified where the worker decides between retrying
/// and parking: a connection the pool could not open is transient.
#[tokio::test]
async fn a_refused_connection_is_transient_for_the_worker() {
    let db = penora_testing::TestDb::new().await;
    let admin = penora_testing::admin_client().await;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" ALLOW_CONNECTIONS false",
            db.name
        ))
        .await
        .expect("database away");
    let pool = penora_store::pool_for(&db.url, 1).expect("pool");
    let err = penora_store::DbError::from(pool.get().await.expect_err("refused"));
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" ALLOW_CONNECTIONS true",
            db.name
        ))
        .await
        .expect("database back");
    assert!(err.is_transient(), "{err}");
}
