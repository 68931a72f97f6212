//! CORS: off unless configured, then only for the configured origins.

use reqwest::{Method, StatusCode};

use crate::support::{TestApp, spawn_app, spawn_app_with};

async fn preflight(app: &TestApp, origin: &str) -> reqwest::Response {
    app.http
        .request(
            Method::OPTIONS,
            format!("{}/api/unified/deduct-credits", app.base),
        )
        .header("Origin", origin)
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "content-type,x-api-key")
        .send()
        .await
        .expect("sent")
}

async fn get_from(app: &TestApp, origin: &str) -> reqwest::Response {
    app.http
        .get(format!("{}/api/unified/user-info?user_id=u1", app.base))
        .header("Origin", origin)
        .header("X-API-Key", crate::support::BOOT_KEY)
        .send()
        .await
        .expect("sent")
}

#[tokio::test]
async fn without_configuration_no_origin_is_allowed() {
    let app = spawn_app().await;
    app.grant("u1", 1).await;
    let r = preflight(&app, "https://app.imagegene.example").await;
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let r = get_from(&app, "https://app.imagegene.example").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn only_the_configured_origins_are_allowed() {
    let app = spawn_app_with(&[(
        "CORS_ALLOWED_ORIGINS",
        "https://app.imagegene.example, https://penora.example",
    )])
    .await;
    app.grant("u1", 1).await;
    let r = preflight(&app, "https://app.imagegene.example").await;
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.imagegene.example"
    );
    let allowed = r.headers()["access-control-allow-headers"]
        .to_str()
        .expect("ascii")
        .to_ascii_lowercase();
    assert!(allowed.contains("x-api-key"), "{allowed}");
    let r = get_from(&app, "https://penora.example").await;
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://penora.example"
    );
    for other in [
        "https://evil.example",
        "https://app.imagegene.example.evil.example",
        "null",
    ] {
        let r = preflight(&app, other).await;
        assert!(
            r.headers().get("access-control-allow-origin").is_none(),
            "{other}"
        );
        let r = get_from(&app, other).await;
        assert!(
            r.headers().get("access-control-allow-origin").is_none(),
            "{other}"
        );
    }
}
