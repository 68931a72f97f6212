//! Health, metrics, the OpenAPI document and the docs page.

use axum::{body::Body, http::Request};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::support::{BOOT_KEY, spawn_app};

#[tokio::test]
async fn health_reports_the_database_the_broker_and_the_outbox() {
    let app = spawn_app().await;
    app.grant("u1", 5).await;
    let r = app
        .http
        .get(format!("{}/health", app.base))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["database"], json!("ok"));
    assert_eq!(
        body["outbox_pending"],
        json!(2),
        "the grant's audit job and its credits.granted event wait"
    );
    assert!(["ok", "degraded"].contains(&body["status"].as_str().unwrap_or_default()));
    assert_eq!(body["version"], json!(env!("CARGO_PKG_VERSION")));
}

#[tokio::test]
async fn without_a_database_requests_get_503_unavailable_and_health_says_so() {
    let settings = penora_testing::TestDb::new().await.settings(&[
        ("PENORA_API_KEY", BOOT_KEY),
        // Nothing listens on port 1.
        ("DATABASE_URL", "postgres://postgres@127.0.0.1:1/penora"),
        ("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f"),
    ]);
    let pool = penora_store::pool(&settings.db).expect("pool");
    let images =
        penora_workspace::cpu_pool::CpuPool::start("test-images", 1, None).expect("threads");
    let state = penora_api::state::AppState::new(
        settings.api(),
        pool,
        penora_api::metrics_handle(),
        images,
    );
    let router = penora_api::routes::app(state);
    let request = Request::get("/api/unified/user-info?user_id=u1")
        .header("X-API-Key", BOOT_KEY)
        .body(Body::empty())
        .expect("request");
    let response = router.clone().oneshot(request).await.expect("answer");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
        .await
        .expect("body");
    let body: Value = serde_json::from_slice(&bytes).expect("json");
    assert_eq!(
        body,
        json!({"success": false, "error": "Credit system temporarily unavailable", "code": "unavailable"})
    );
    let response = router
        .clone()
        .oneshot(
            Request::get("/health")
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("answer");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
        .await
        .expect("body");
    let body: Value = serde_json::from_slice(&bytes).expect("json");
    assert_eq!(body["status"], json!("unavailable"));
    assert_eq!(body["broker"], json!("unavailable"));
    // The liveness probe stays green: a database outage is no reason to
    // restart the service.
    let response = router
        .oneshot(
            Request::get("/health/live")
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("answer");
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
        .await
        .expect("body");
    let body: Value = serde_json::from_slice(&bytes).expect("json");
    assert_eq!(body, json!({"status": "alive"}));
}

#[tokio::test]
async fn the_openapi_document_is_generated_for_every_route() {
    let app = spawn_app().await;
    let doc: Value = app
        .get("/api/unified/openapi.json")
        .await
        .json()
        .await
        .expect("json");
    // Every POST says what its Idempotency-Key header means.
    for path in [
        "deduct-credits",
        "add-credits",
        "refund-credits",
        "save-project",
    ] {
        let path = format!("/api/unified/{path}");
        let text = doc["paths"][&path]["post"]["description"]
            .as_str()
            .unwrap_or_default();
        assert!(text.contains("Idempotency-Key"), "POST {path}: {text:?}");
    }
    assert!(
        doc["openapi"]
            .as_str()
            .unwrap_or_default()
            .starts_with("3.")
    );
    let paths = doc["paths"].as_object().expect("paths");
    for (path, method) in [
        ("/api/unified/user-info", "get"),
        ("/api/unified/deduct-credits", "post"),
        ("/api/unified/refund-credits", "post"),
        ("/api/unified/save-project", "post"),
        ("/api/unified/projects", "get"),
        ("/api/unified/projects/{project_id}/content", "get"),
        ("/api/unified/add-credits", "post"),
        ("/api/unified/transactions", "get"),
        ("/api/unified/quote", "get"),
        ("/api/unified/allowances", "put"),
        ("/api/unified/allowances", "get"),
        ("/api/unified/allowances", "delete"),
        ("/health", "get"),
        ("/metrics", "get"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} missing"
        );
    }
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["api_key_header"]["name"], json!("X-API-Key"));
    assert_eq!(schemes["api_key_query"]["in"], json!("query"));
    let deduct = &doc["components"]["schemas"]["DeductRequest"]["properties"];
    for field in [
        "user_id",
        "amount",
        "app_name",
        "description",
        "project_code",
    ] {
        assert!(deduct.get(field).is_some(), "DeductRequest.{field}");
    }
}

#[tokio::test]
async fn the_docs_page_is_served_from_the_service_alone() {
    let app = spawn_app().await;
    let r = app
        .http
        .get(format!("{}/api/unified/docs", app.base))
        .send()
        .await
        .expect("sent");
    assert!(r.status().is_redirection());
    let html = app
        .http
        .get(format!("{}/api/unified/docs/", app.base))
        .send()
        .await
        .expect("sent")
        .text()
        .await
        .expect("html");
    assert!(html.contains("swagger-ui"), "{html}");
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "nothing from the internet: {html}"
    );
    let init = app
        .http
        .get(format!(
            "{}/api/unified/docs/swagger-initializer.js",
            app.base
        ))
        .send()
        .await
        .expect("sent")
        .text()
        .await
        .expect("js");
    assert!(init.contains("/api/unified/openapi.json"), "{init}");
    assert!(
        init.contains("\"validatorUrl\": \"none\""),
        "no call to an online validator: {init}"
    );
    for asset in [
        "swagger-ui.css",
        "swagger-ui-bundle.js",
        "swagger-ui-standalone-preset.js",
    ] {
        let r = app
            .http
            .get(format!("{}/api/unified/docs/{asset}", app.base))
            .send()
            .await
            .expect("sent");
        assert_eq!(r.status(), StatusCode::OK, "{asset} is served locally");
    }
}

#[tokio::test]
async fn metrics_count_requests_and_credit_movements() {
    let app = spawn_app().await;
    app.grant("u1", 50).await;
    app.deduct("u1", 5, "m1").await;
    // An app no key names: counted, under `other`.
    let r = app
        .post(
            "/api/unified/deduct-credits",
            &serde_json::json!({"user_id": "u1", "amount": 1, "app_name": "zz-made-up", "project_code": "m2"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    app.get("/api/unified/user-info?user_id=nobody").await;
    let text = app
        .http
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .expect("sent")
        .text()
        .await
        .expect("text");
    assert!(text.contains("penora_http_requests_total{route=\"/api/unified/deduct-credits\",method=\"POST\",status=\"200\"}"), "{text}");
    assert!(
        text.contains("penora_http_request_duration_seconds_bucket"),
        "{text}"
    );
    assert!(
        text.contains("penora_credits_moved_total{kind=\"reserved\",app=\"imagegene\"}"),
        "{text}"
    );
    assert!(
        text.contains("penora_credits_moved_total{kind=\"granted\",app=\"penora\"}"),
        "{text}"
    );
    assert!(
        text.contains("penora_http_rejections_total{code=\"user_not_found\"}"),
        "{text}"
    );
    assert!(text.contains("penora_db_pool_connections"), "{text}");
    assert!(
        text.contains("penora_credits_moved_total{kind=\"reserved\",app=\"other\"}")
            && !text.contains("zz-made-up"),
        "{text}"
    );
    assert!(
        !text.contains("u1") && !text.contains(BOOT_KEY),
        "no user ids or keys as labels"
    );
}
