//! Spend limits over HTTP (contract §16): `PUT`/`GET`/`DELETE /limits`, the
//! `403 spend_limit_exceeded` answer with its fields, exactness under
//! concurrency with group commit on and off, per-app and all-apps limits,
//! refunds giving room back, `user-info`'s `limits`, and bad input refused
//! with nothing changed.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::{BOOT_KEY, TestApp, expect_error, spawn_app, spawn_app_with};

async fn send(app: &TestApp, method: Method, body: &Value, key: &str) -> reqwest::Response {
    app.http
        .request(method, format!("{}/api/unified/limits", app.base))
        .header("X-API-Key", key)
        .json(body)
        .send()
        .await
        .expect("sent")
}

async fn set(app: &TestApp, body: Value) -> Value {
    let r = send(app, Method::PUT, &body, BOOT_KEY).await;
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.expect("json")
}

async fn deduct_in(
    app: &TestApp,
    user: &str,
    which: &str,
    amount: i64,
    code: &str,
) -> (StatusCode, Value) {
    let r = app
        .post(
            "/api/unified/deduct-credits",
            &json!({"user_id": user, "amount": amount, "app_name": which, "project_code": code}),
        )
        .await;
    let status = r.status();
    (status, r.json().await.expect("json"))
}

/// 200 deductions of 1 at once against a daily limit of 50: exactly 50 go
/// through, 150 are refused `spend_limit_exceeded`, and the ledger shows 50.
async fn exactly_fifty_of_two_hundred(app: TestApp) {
    app.grant("u1", 1_000).await;
    set(
        &app,
        json!({"user_id": "u1", "period": "day", "max_credits": 50}),
    )
    .await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let http = app.http.clone();
        let url = format!("{}/api/unified/deduct-credits", app.base);
        tasks.push(tokio::spawn(async move {
            http.post(url)
                .header("X-API-Key", BOOT_KEY)
                .json(&json!({"user_id": "u1", "amount": 1, "app_name": "imagegene", "project_code": format!("c{i}")}))
                .send()
                .await
                .expect("sent")
        }));
    }
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        let r = t.await.expect("task");
        match r.status() {
            StatusCode::OK => ok += 1,
            StatusCode::FORBIDDEN => {
                let body: Value = r.json().await.expect("json");
                assert_eq!(body["code"], "spend_limit_exceeded", "{body}");
                assert_eq!(body["limit"], 50, "{body}");
                assert_eq!(body["spent"], 50, "{body}");
                refused += 1;
            }
            other => panic!("unexpected {other}: {}", r.text().await.unwrap_or_default()),
        }
    }
    assert_eq!((ok, refused), (50, 150));
    assert_eq!(app.balance("u1").await, 950);
    assert_eq!(
        app.scalar("SELECT count(*) FROM reservations WHERE user_id = $1", "u1")
            .await,
        50
    );
    app.assert_reconciled().await;
}

#[tokio::test]
async fn two_hundred_concurrent_deductions_against_a_limit_of_fifty_let_exactly_fifty_through() {
    exactly_fifty_of_two_hundred(spawn_app().await).await;
}

#[tokio::test]
async fn the_limit_is_exact_with_group_commit_off_too() {
    exactly_fifty_of_two_hundred(spawn_app_with(&[("DEDUCT_BATCH_MAX", "1")]).await).await;
}

#[tokio::test]
async fn an_app_limit_holds_its_app_an_all_apps_limit_both_and_a_refund_gives_room_back() {
    let app = spawn_app().await;
    app.grant("u1", 1_000).await;
    set(
        &app,
        json!({"user_id": "u1", "app_name": "imagegene", "period": "day", "max_credits": 10}),
    )
    .await;
    let all = set(
        &app,
        json!({"user_id": "u1", "period": "month", "max_credits": 30}),
    )
    .await;
    assert_eq!(all["limits"].as_array().map(Vec::len), Some(2), "{all}");

    assert_eq!(
        deduct_in(&app, "u1", "imagegene", 10, "a").await.0,
        StatusCode::OK
    );
    let (status, body) = deduct_in(&app, "u1", "imagegene", 1, "b").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["code"], "spend_limit_exceeded");
    assert_eq!(body["period"], "day");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("imagegene")),
        "{body}"
    );
    assert!(
        body["resets_at"]
            .as_str()
            .is_some_and(|t| t.ends_with("T00:00:00.000Z")),
        "{body}"
    );
    // Penora is held by the all-apps monthly limit only.
    assert_eq!(
        deduct_in(&app, "u1", "penora", 20, "p1").await.0,
        StatusCode::OK
    );
    let (status, body) = deduct_in(&app, "u1", "penora", 1, "p2").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(
        (body["limit"].clone(), body["spent"].clone()),
        (json!(30), json!(30))
    );
    // A refund gives its room back, in both limits.
    let r = app
        .post(
            "/api/unified/refund-credits",
            &json!({"user_id": "u1", "project_code": "a", "app_name": "imagegene", "amount": 4, "reference": "r1"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        deduct_in(&app, "u1", "imagegene", 4, "c").await.0,
        StatusCode::OK
    );
    assert_eq!(
        deduct_in(&app, "u1", "penora", 1, "p3").await.0,
        StatusCode::FORBIDDEN
    );

    // user-info and GET show the spending.
    let info: Value = app
        .get("/api/unified/user-info?user_id=u1")
        .await
        .json()
        .await
        .expect("json");
    let limits = info["limits"].as_array().expect("limits").clone();
    let day = limits.iter().find(|l| l["period"] == "day").expect("daily");
    assert_eq!(
        (day["spent"].clone(), day["remaining"].clone()),
        (json!(10), json!(0))
    );
    assert_eq!(day["app_name"], "imagegene");
    let month = limits
        .iter()
        .find(|l| l["period"] == "month")
        .expect("monthly");
    assert_eq!(
        (
            month["spent"].clone(),
            month["remaining"].clone(),
            month["app_name"].clone()
        ),
        (json!(30), json!(0), Value::Null)
    );
    let listed: Value = app
        .get("/api/unified/limits?user_id=u1")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(listed["limits"], json!(limits));

    // Removed (the key in the query; a JSON `null` body is no body), the
    // app's spending is free again.
    let r = app
        .http
        .delete(format!(
            "{}/api/unified/limits?user_id=u1&app_name=imagegene&period=day",
            app.base
        ))
        .header("X-API-Key", BOOT_KEY)
        .header("Content-Type", "application/json")
        .body("null")
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), StatusCode::OK);
    let r = send(
        &app,
        Method::DELETE,
        &json!({"user_id": "u1", "period": "month"}),
        BOOT_KEY,
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let left: Value = r.json().await.expect("json");
    assert_eq!(left["limits"], json!([]));
    assert_eq!(
        deduct_in(&app, "u1", "imagegene", 100, "free").await.0,
        StatusCode::OK
    );
    expect_error(
        app.delete("/api/unified/limits?user_id=u1&period=day")
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    app.assert_reconciled().await;
}

#[tokio::test]
async fn bad_limits_are_refused_naming_the_field_and_change_nothing() {
    let app = spawn_app().await;
    app.grant("u1", 100).await;
    for (body, field) in [
        (
            json!({"user_id": "u1", "period": "year", "max_credits": 5}),
            "period",
        ),
        (json!({"user_id": "u1", "max_credits": 5}), "period"),
        (json!({"user_id": "u1", "period": "day"}), "max_credits"),
        (
            json!({"user_id": "u1", "period": "day", "max_credits": -1}),
            "max_credits",
        ),
        (
            json!({"user_id": "u1", "period": "day", "max_credits": 1.5}),
            "max_credits",
        ),
        (
            json!({"user_id": "u1", "period": "day", "max_credits": "5"}),
            "max_credits",
        ),
        (
            json!({"user_id": "u1", "period": "day", "max_credits": 9_007_199_254_740_992_i64}),
            "max_credits",
        ),
        (
            json!({"user_id": "u1", "app_name": "no spaces", "period": "day", "max_credits": 5}),
            "app_name",
        ),
    ] {
        let error = expect_error(
            send(&app, Method::PUT, &body, BOOT_KEY).await,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        )
        .await;
        assert!(error.contains(field), "{body}: {error}");
    }
    expect_error(
        send(
            &app,
            Method::PUT,
            &json!({"period": "day", "max_credits": 5}),
            BOOT_KEY,
        )
        .await,
        StatusCode::BAD_REQUEST,
        "user_id_required",
    )
    .await;
    expect_error(
        send(
            &app,
            Method::PUT,
            &json!({"user_id": "nobody", "period": "day", "max_credits": 5}),
            BOOT_KEY,
        )
        .await,
        StatusCode::NOT_FOUND,
        "user_not_found",
    )
    .await;
    // A key without `admin` may read, not set.
    let reader = app
        .key("imagegene", &[penora_platform::keys::Scope::Read])
        .await;
    expect_error(
        send(
            &app,
            Method::PUT,
            &json!({"user_id": "u1", "period": "day", "max_credits": 5}),
            &reader,
        )
        .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    let r = app
        .get_with_key("/api/unified/limits?user_id=u1", &reader)
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let listed: Value = r.json().await.expect("json");
    assert_eq!(listed["limits"], json!([]), "nothing was set");
    assert_eq!(
        app.scalar("SELECT count(*) FROM spend_limits WHERE user_id = $1", "u1")
            .await,
        0
    );
    // A limit of 0 stops all spending.
    set(
        &app,
        json!({"user_id": "u1", "period": "week", "max_credits": 0}),
    )
    .await;
    let (status, body) = deduct_in(&app, "u1", "imagegene", 1, "z").await;
    assert_eq!(
        (status, body["code"].clone()),
        (StatusCode::FORBIDDEN, json!("spend_limit_exceeded"))
    );
    assert_eq!(app.balance("u1").await, 100);
}
