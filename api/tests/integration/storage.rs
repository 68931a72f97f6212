//! Storage quota (invariant 6), saves and content.

use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{PNG_1X1, base64_of, expect_error, spawn_app, spawn_app_with};

fn save_body(user: &str, content: &str) -> Value {
    json!({"user_id": user, "app_source": "imagegene", "project_type": "ai_artwork", "title": "t", "content": content})
}

/// What the title `t` of [`save_body`] counts in the quota besides the
/// content.
const TITLE: i64 = 1;

#[tokio::test]
async fn a_save_that_would_cross_the_quota_is_refused_with_413_and_changes_nothing() {
    let app = spawn_app().await;
    app.grant("u1", 1).await;
    let r = app
        .post(
            "/api/unified/save-project",
            &save_body("u1", &base64_of(1_000_000)),
        )
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = app
        .post(
            "/api/unified/save-project",
            &save_body("u1", &base64_of(50_000)),
        )
        .await;
    let msg = expect_error(r, StatusCode::PAYLOAD_TOO_LARGE, "storage_limit_exceeded").await;
    assert!(
        msg.contains("needs 50001 bytes") && msg.contains("48575 bytes remain"),
        "{msg}"
    );
    assert_eq!(
        app.scalar(
            "SELECT storage_used_bytes FROM accounts WHERE user_id = $1",
            "u1"
        )
        .await,
        1_000_000 + TITLE
    );
    assert_eq!(
        app.scalar("SELECT count(*) FROM projects WHERE user_id = $1", "u1")
            .await,
        1
    );
    assert_eq!(
        app.scalar("SELECT count(*) FROM outbox WHERE user_id = $1 AND routing_key = 'penora.save-project'", "u1").await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_concurrent_saves_of_200_kb_under_1_mib_accept_exactly_5() {
    // About the quota, not the save slots: the two saves past the eight
    // slots wait for one however slow a loaded machine is.
    let app =
        Arc::new(spawn_app_with(&[("DB_POOL_SIZE", "16"), ("SAVE_QUEUE_WAIT_MS", "30000")]).await);
    app.grant("u1", 1).await;
    let content = Arc::new(base64_of(200 * 1024));
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (app, content) = (app.clone(), content.clone());
        tasks.push(tokio::spawn(async move {
            app.post("/api/unified/save-project", &save_body("u1", &content))
                .await
                .status()
        }));
    }
    let mut accepted = 0;
    for t in tasks {
        match t.await.expect("task") {
            StatusCode::ACCEPTED => accepted += 1,
            StatusCode::PAYLOAD_TOO_LARGE => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(accepted, 5);
    assert_eq!(
        app.scalar(
            "SELECT storage_used_bytes FROM accounts WHERE user_id = $1",
            "u1"
        )
        .await,
        5 * (200 * 1024 + TITLE)
    );
    app.assert_reconciled().await;
}

#[tokio::test]
async fn a_save_naming_a_project_code_is_idempotent() {
    let app = spawn_app().await;
    app.grant("u1", 10).await;
    let mut body = save_body("u1", PNG_1X1);
    body["project_code"] = json!("img_saved");
    let first = app.post("/api/unified/save-project", &body).await;
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let first: Value = first.json().await.expect("json");
    let again = app.post("/api/unified/save-project", &body).await;
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    assert!(again.headers().get("idempotent-replayed").is_some());
    let again: Value = again.json().await.expect("json");
    assert_eq!(again["project_id"], first["project_id"]);
    assert_eq!(
        app.scalar("SELECT count(*) FROM projects WHERE user_id = $1", "u1")
            .await,
        1
    );
    assert_eq!(
        app.scalar(
            "SELECT storage_used_bytes FROM accounts WHERE user_id = $1",
            "u1"
        )
        .await,
        70 + TITLE
    );
    body["title"] = json!("another title");
    let r = app.post("/api/unified/save-project", &body).await;
    expect_error(r, StatusCode::CONFLICT, "idempotency_conflict").await;
}

#[tokio::test]
async fn data_urls_and_urls_are_measured_as_the_contract_says() {
    let app = spawn_app().await;
    app.grant("u1", 1).await;
    let data_url = format!("data:image/png;base64,{PNG_1X1}");
    let r: Value = app
        .post("/api/unified/save-project", &save_body("u1", &data_url))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(r["size_bytes"], json!(70));
    let url = "https://cdn.imagegene.example/u1/sunset.png";
    let r: Value = app
        .post("/api/unified/save-project", &save_body("u1", url))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(r["size_bytes"], json!(url.len()));
    let r = app
        .post(
            "/api/unified/save-project",
            &save_body("u1", "this is not an image!"),
        )
        .await;
    let msg = expect_error(r, StatusCode::BAD_REQUEST, "invalid_request").await;
    assert!(msg.starts_with("content:"), "{msg}");
}

#[tokio::test]
async fn saving_for_an_unknown_user_is_user_not_found() {
    let app = spawn_app().await;
    let r = app
        .post("/api/unified/save-project", &save_body("ghost", PNG_1X1))
        .await;
    expect_error(r, StatusCode::NOT_FOUND, "user_not_found").await;
}

#[tokio::test]
async fn content_is_served_once_saved_and_refused_while_queued() {
    let app = spawn_app().await;
    app.grant("u1", 1).await;
    let r: Value = app
        .post("/api/unified/save-project", &save_body("u1", PNG_1X1))
        .await
        .json()
        .await
        .expect("json");
    let id = r["project_id"].as_str().expect("id").to_owned();
    let url = r["content_url"].as_str().expect("content_url").to_owned();
    assert_eq!(
        url,
        format!("/api/unified/projects/{id}/content?user_id=u1")
    );
    let msg = expect_error(
        app.get(&url).await,
        StatusCode::CONFLICT,
        "content_not_available",
    )
    .await;
    assert!(msg.contains("queued"), "{msg}");

    // What the worker does once it has checked the bytes (next issue): mark it saved.
    let client = app.pool.get().await.expect("db");
    client
        .batch_execute(&format!(
            "UPDATE projects SET status = 'saved' WHERE id = '{id}'; \
             UPDATE project_contents SET media_type = 'image/png' WHERE project_id = '{id}'"
        ))
        .await
        .expect("marked saved");
    let r = app.get(&url).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "image/png");
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    let bytes = r.bytes().await.expect("bytes");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");

    let unknown = format!(
        "/api/unified/projects/{}/content?user_id=u1",
        uuid::Uuid::new_v4()
    );
    expect_error(app.get(&unknown).await, StatusCode::NOT_FOUND, "not_found").await;
    app.grant("u2", 1).await;
    let other = format!("/api/unified/projects/{id}/content?user_id=u2");
    expect_error(app.get(&other).await, StatusCode::NOT_FOUND, "not_found").await;
    let bad = "/api/unified/projects/not-a-uuid/content?user_id=u1";
    expect_error(
        app.get(bad).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
}

#[tokio::test]
async fn a_url_project_redirects_once_saved() {
    let app = spawn_app().await;
    app.grant("u1", 1).await;
    let url = "https://cdn.imagegene.example/u1/a.png";
    let id = app.saved_url_project("u1", url).await;
    let r = app
        .get(&format!("/api/unified/projects/{id}/content?user_id=u1"))
        .await;
    assert!(r.status().is_redirection(), "{}", r.status());
    assert_eq!(r.headers()["location"], url);
}

#[tokio::test]
async fn projects_are_listed_in_pages() {
    let app = spawn_app().await;
    app.grant("u1", 1).await;
    for _ in 0..5 {
        app.post("/api/unified/save-project", &save_body("u1", PNG_1X1))
            .await;
    }
    let p1: Value = app
        .get("/api/unified/projects?user_id=u1&limit=3")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(p1["all_projects"].as_array().map(Vec::len), Some(3));
    assert_eq!(p1["total_count"], json!(5));
    let cursor = p1["next_cursor"].as_str().expect("cursor");
    let p2: Value = app
        .get(&format!(
            "/api/unified/projects?user_id=u1&limit=3&cursor={cursor}"
        ))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(p2["all_projects"].as_array().map(Vec::len), Some(2));
    assert_eq!(p2["next_cursor"], json!(null));
    let mut ids: Vec<Value> = p1["all_projects"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(p2["all_projects"].as_array().into_iter().flatten())
        .map(|p| p["id"].clone())
        .collect();
    ids.dedup();
    assert_eq!(ids.len(), 5, "no project twice, none missing");
    let r = app
        .get("/api/unified/projects?user_id=u1&cursor=bogus")
        .await;
    expect_error(r, StatusCode::BAD_REQUEST, "invalid_request").await;
}
