//! Bad input gets a clear error with the right code, and moves nothing.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{BOOT_KEY, PNG_1X1, TestApp, expect_error, spawn_app};

/// What must not change when a request is refused.
async fn snapshot(app: &TestApp, user: &str) -> (i64, i64, i64, i64) {
    (
        app.balance(user).await,
        app.ledger_rows(user).await,
        app.outbox_rows(user).await,
        app.scalar("SELECT count(*) FROM reservations WHERE user_id = $1", user)
            .await,
    )
}

#[tokio::test]
async fn bad_amounts_are_refused_naming_the_field_and_move_nothing() {
    let app = spawn_app().await;
    app.grant("u1", 100).await;
    let before = snapshot(&app, "u1").await;
    let cases = [
        json!(0),
        json!(-5),
        json!(5.5),
        json!("5"),
        json!(1e30),
        json!(99999999999999999999u128 as f64),
        json!(1_000_001),
        json!(null),
        json!(true),
        json!([5]),
        json!({"n": 5}),
    ];
    for (i, amount) in cases.iter().enumerate() {
        for route in ["/api/unified/deduct-credits", "/api/unified/add-credits"] {
            let body = json!({"user_id": "u1", "amount": amount, "app_name": "imagegene",
                              "project_code": format!("bad{i}"), "reason": "r", "reference": format!("ref{i}")});
            let msg = expect_error(
                app.post(route, &body).await,
                StatusCode::BAD_REQUEST,
                "invalid_request",
            )
            .await;
            assert!(msg.starts_with("amount:"), "{route} {amount}: {msg}");
        }
    }
    let missing = json!({"user_id": "u1", "app_name": "imagegene"});
    let msg = expect_error(
        app.post("/api/unified/deduct-credits", &missing).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
    assert!(msg.contains("amount") && msg.contains("required"), "{msg}");
    // A huge integer literal that does not fit any integer type.
    let r = app
        .http
        .post(format!("{}/api/unified/deduct-credits", app.base))
        .header("X-API-Key", BOOT_KEY)
        .header("content-type", "application/json")
        .body(r#"{"user_id":"u1","amount":123456789012345678901234567890,"app_name":"imagegene"}"#)
        .send()
        .await
        .expect("sent");
    expect_error(r, StatusCode::BAD_REQUEST, "invalid_request").await;
    assert_eq!(snapshot(&app, "u1").await, before);
}

#[tokio::test]
async fn bad_user_ids_are_refused() {
    let app = spawn_app().await;
    app.grant("u1", 100).await;
    let before = snapshot(&app, "u1").await;
    for user in [json!(""), json!(null)] {
        let r = app
            .post(
                "/api/unified/deduct-credits",
                &json!({"user_id": user, "amount": 1, "app_name": "imagegene"}),
            )
            .await;
        assert_eq!(
            expect_error(r, StatusCode::BAD_REQUEST, "user_id_required").await,
            "User ID required"
        );
    }
    let long = "x".repeat(129);
    for user in [
        json!("has space"),
        json!("slash/ed"),
        json!("ü"),
        json!(long),
        json!(42),
    ] {
        let r = app
            .post(
                "/api/unified/deduct-credits",
                &json!({"user_id": user, "amount": 1, "app_name": "imagegene"}),
            )
            .await;
        let msg = expect_error(r, StatusCode::BAD_REQUEST, "invalid_request").await;
        assert!(msg.starts_with("user_id"), "{user}: {msg}");
    }
    let r = app
        .get(&format!(
            "/api/unified/user-info?user_id={}",
            "y".repeat(129)
        ))
        .await;
    expect_error(r, StatusCode::BAD_REQUEST, "invalid_request").await;
    let r = app.get("/api/unified/user-info?user_id=").await;
    expect_error(r, StatusCode::BAD_REQUEST, "user_id_required").await;
    assert_eq!(snapshot(&app, "u1").await, before);
}

#[tokio::test]
async fn bad_bodies_get_json_errors_from_every_layer() {
    let app = spawn_app().await;
    app.grant("u1", 100).await;
    let before = snapshot(&app, "u1").await;
    let send = |body: Vec<u8>, content_type: Option<&'static str>| {
        let mut req = app
            .http
            .post(format!("{}/api/unified/deduct-credits", app.base))
            .header("X-API-Key", BOOT_KEY)
            .body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        req.send()
    };
    let r = send(b"{\"user_id\": \"u1\",".to_vec(), Some("application/json"))
        .await
        .expect("sent");
    let msg = expect_error(r, StatusCode::BAD_REQUEST, "invalid_request").await;
    assert!(msg.starts_with("Malformed JSON"), "{msg}");
    let r = send(b"[1,2]".to_vec(), Some("application/json"))
        .await
        .expect("sent");
    expect_error(r, StatusCode::BAD_REQUEST, "invalid_request").await;
    let r = send(
        b"{\"user_id\":\"u1\"} trailing".to_vec(),
        Some("application/json"),
    )
    .await
    .expect("sent");
    expect_error(r, StatusCode::BAD_REQUEST, "invalid_request").await;
    let r = send(
        br#"{"user_id":"u1","amount":1}"#.to_vec(),
        Some("text/plain"),
    )
    .await
    .expect("sent");
    expect_error(
        r,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;
    let r = send(br#"{"user_id":"u1","amount":1}"#.to_vec(), None)
        .await
        .expect("sent");
    expect_error(
        r,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;
    let mut huge = br#"{"user_id":"u1","amount":1,"app_name":"imagegene","description":""#.to_vec();
    huge.extend(std::iter::repeat_n(b'a', 3 * 1024 * 1024));
    huge.extend(br#""}"#);
    let r = send(huge, Some("application/json")).await.expect("sent");
    expect_error(r, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
    assert_eq!(snapshot(&app, "u1").await, before);
}

#[tokio::test]
async fn unknown_routes_and_wrong_methods_get_json_errors() {
    let app = spawn_app().await;
    let r = app.get("/api/unified/nothing-here").await;
    expect_error(r, StatusCode::NOT_FOUND, "not_found").await;
    let r = app.get("/api/unified/deduct-credits").await;
    expect_error(r, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
    let r = app.post("/api/unified/user-info", &json!({})).await;
    expect_error(r, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
}

#[tokio::test]
async fn text_fields_and_names_are_bounded() {
    let app = spawn_app().await;
    app.grant("u1", 100).await;
    let before = snapshot(&app, "u1").await;
    let cases = [
        (
            "/api/unified/deduct-credits",
            json!({"user_id": "u1", "amount": 1, "app_name": "imagegene", "description": "d".repeat(501)}),
            "description",
        ),
        (
            "/api/unified/deduct-credits",
            json!({"user_id": "u1", "amount": 1, "app_name": "Image Gene"}),
            "app_name",
        ),
        (
            "/api/unified/deduct-credits",
            json!({"user_id": "u1", "amount": 1}),
            "app_name",
        ),
        (
            "/api/unified/deduct-credits",
            json!({"user_id": "u1", "amount": 1, "app_name": "imagegene", "project_code": "p".repeat(129)}),
            "project_code",
        ),
        (
            "/api/unified/deduct-credits",
            json!({"user_id": "u1", "amount": 1, "app_name": "imagegene", "project_code": "a b"}),
            "project_code",
        ),
        (
            "/api/unified/save-project",
            json!({"user_id": "u1", "app_source": "imagegene", "project_type": "x", "title": "t".repeat(201), "content": PNG_1X1}),
            "title",
        ),
        (
            "/api/unified/save-project",
            json!({"user_id": "u1", "app_source": "imagegene", "project_type": "x", "title": "t", "content": PNG_1X1, "metadata": [1]}),
            "metadata",
        ),
        (
            "/api/unified/save-project",
            json!({"user_id": "u1", "app_source": "imagegene", "project_type": "x", "title": "t"}),
            "content",
        ),
        (
            "/api/unified/save-project",
            json!({"user_id": "u1", "app_source": "imagegene", "title": "t", "content": PNG_1X1}),
            "project_type",
        ),
        (
            "/api/unified/add-credits",
            json!({"user_id": "u1", "amount": 1, "reference": "r"}),
            "reason",
        ),
        (
            "/api/unified/add-credits",
            json!({"user_id": "u1", "amount": 1, "reason": "r"}),
            "reference",
        ),
        (
            "/api/unified/add-credits",
            json!({"user_id": "u1", "amount": 1, "reason": "r", "reference": "x".repeat(129)}),
            "reference",
        ),
    ];
    for (route, body, field) in cases {
        let msg = expect_error(
            app.post(route, &body).await,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        )
        .await;
        assert!(
            msg.starts_with(field),
            "{route} expected an error on {field}: {msg}"
        );
    }
    assert_eq!(snapshot(&app, "u1").await, before);
}

#[tokio::test]
async fn bad_query_parameters_are_refused_naming_them() {
    let app = spawn_app().await;
    app.grant("u1", 1).await;
    for (path, field) in [
        ("/api/unified/transactions?user_id=u1&limit=abc", "limit"),
        ("/api/unified/transactions?user_id=u1&limit=0", "limit"),
        ("/api/unified/transactions?user_id=u1&limit=201", "limit"),
        ("/api/unified/transactions?user_id=u1&cursor=-3", "cursor"),
        ("/api/unified/projects?user_id=u1&limit=1.5", "limit"),
        ("/api/unified/projects?user_id=u1&app=Not%20An%20App", "app"),
        ("/api/unified/quote?width=0&height=512", "width"),
        ("/api/unified/quote?width=512", "height"),
        (
            "/api/unified/quote?width=512&height=512&quality=ultra",
            "quality",
        ),
        (
            "/api/unified/quote?width=512&height=512&variations=11",
            "variations",
        ),
    ] {
        let msg = expect_error(
            app.get(path).await,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        )
        .await;
        assert!(msg.starts_with(field), "{path}: {msg}");
    }
}

#[tokio::test]
async fn quote_prices_by_the_guides_list() {
    let app = spawn_app().await;
    for (query, credits) in [
        ("width=512&height=512", 2),
        ("width=1024&height=1024", 5),
        ("width=1024&height=1024&quality=high", 8),
        ("width=2048&height=2048", 8),
        ("width=1024&height=1024&variations=3", 9),
    ] {
        let body: Value = app
            .get(&format!("/api/unified/quote?{query}"))
            .await
            .json()
            .await
            .expect("json");
        assert_eq!(body["success"], json!(true));
        assert_eq!(body["credits"], json!(credits), "{query}: {body}");
    }
}
