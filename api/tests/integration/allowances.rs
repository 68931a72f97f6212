//! `PUT`/`GET`/`DELETE /api/unified/allowances` (contract §16) through
//! HTTP: the first period granted at once and once only, bad input refused
//! naming the field with nothing changed, scopes, and the lot left alone by
//! a delete. (The periods after the first, with a controlled clock, are in
//! `penora-ledger`'s `tests/allowances.rs`.)

use penora_platform::keys::Scope;
use reqwest::{Response, StatusCode};
use serde_json::{Value, json};

use crate::support::{BOOT_KEY, TestApp, expect_error, spawn_app};

async fn put(app: &TestApp, body: &Value, key: &str) -> Response {
    app.http
        .put(format!("{}/api/unified/allowances", app.base))
        .header("X-API-Key", key)
        .json(body)
        .send()
        .await
        .expect("request sent")
}

#[tokio::test]
async fn an_allowance_grants_its_first_period_at_once_and_a_repeated_put_grants_nothing_more() {
    let app = spawn_app().await;
    app.grant("maya", 30).await; // a bought pack, paid, never expires
    let body = json!({"user_id": "maya", "allowance_id": "pro-monthly", "amount": 500,
                      "period": "month", "max_rollover": 100});
    let r = put(&app, &body, BOOT_KEY).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().get("idempotent-replayed").is_none());
    let first: Value = r.json().await.expect("json");
    assert_eq!(first["success"], json!(true));
    assert_eq!(first["created"], json!(true));
    let a = &first["allowance"];
    assert_eq!(
        (
            &a["amount"],
            &a["period"],
            &a["category"],
            &a["max_rollover"],
            &a["app_name"]
        ),
        (
            &json!(500),
            &json!("month"),
            &json!("promotional"),
            &json!(100),
            &json!("penora")
        )
    );
    let grant = &first["current_grant"];
    assert_eq!(grant["credits_added"], json!(500));
    assert_eq!(grant["period_end"], a["next_grant_at"]);
    assert!(
        grant["reference"]
            .as_str()
            .unwrap()
            .starts_with("allowance:pro-monthly:")
    );
    assert!(
        a["next_grant_at"]
            .as_str()
            .unwrap()
            .ends_with("-01T00:00:00.000Z")
    );
    assert_eq!(app.balance("maya").await, 530);

    // The same PUT again: replayed, nothing granted.
    let r = put(&app, &body, BOOT_KEY).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    let again: Value = r.json().await.expect("json");
    assert_eq!(again["created"], json!(false));
    assert_eq!(again["changed"], json!(false));
    assert_eq!(again["current_grant"]["lot_id"], grant["lot_id"]);
    assert_eq!(again["current_grant"]["replayed"], json!(true));
    assert_eq!(app.balance("maya").await, 530);
    assert_eq!(app.ledger_rows("maya").await, 2);

    // Spending draws the allowance lot (promotional, expiring) before the pack.
    let (status, d) = app.deduct("maya", 40, "img-1").await;
    assert_eq!(status, StatusCode::OK, "{d}");
    assert_eq!(
        d["allocations"],
        json!([{"lot_id": grant["lot_id"], "amount": 40}])
    );

    // A change takes effect at the next period: no grant now.
    let r = put(
        &app,
        &json!({"user_id": "maya", "allowance_id": "pro-monthly", "amount": 800,
                              "period": "month"}),
        BOOT_KEY,
    )
    .await;
    let changed: Value = r.json().await.expect("json");
    assert_eq!(changed["changed"], json!(true));
    assert_eq!(changed["allowance"]["amount"], json!(800));
    assert_eq!(app.balance("maya").await, 490);

    let list: Value = app
        .get("/api/unified/allowances?user_id=maya")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(list["allowances"].as_array().map(Vec::len), Some(1));
    assert_eq!(list["allowances"][0]["allowance_id"], json!("pro-monthly"));
    assert_eq!(list["allowances"][0]["next_grant_at"], a["next_grant_at"]);

    // Delete: gone, the lot stays with what is left of it.
    let r = app
        .delete("/api/unified/allowances?user_id=maya&allowance_id=pro-monthly")
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = app
        .delete("/api/unified/allowances?user_id=maya&allowance_id=pro-monthly")
        .await;
    expect_error(r, StatusCode::NOT_FOUND, "not_found").await;
    assert_eq!(app.balance("maya").await, 490);
    let lots: Value = app
        .get("/api/unified/credit-lots?user_id=maya")
        .await
        .json()
        .await
        .expect("json");
    let allowance_lot = lots["lots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["lot_id"] == grant["lot_id"])
        .expect("the allowance lot");
    assert_eq!(allowance_lot["remaining"], json!(460));
    assert_eq!(allowance_lot["status"], json!("active"));
    // credits.granted names the allowance.
    let named = app
        .scalar(
            "SELECT count(*) FROM outbox WHERE user_id = $1 AND routing_key = 'credits.granted' \
             AND payload->'data'->>'allowance_id' = 'pro-monthly'",
            "maya",
        )
        .await;
    assert_eq!(named, 1);
    app.assert_reconciled().await;
}

#[tokio::test]
async fn bad_allowances_are_refused_naming_the_field_and_change_nothing() {
    let app = spawn_app().await;
    let base = json!({"user_id": "noor", "allowance_id": "daily", "amount": 5, "period": "day"});
    let with = |field: &str, value: Value| {
        let mut b = base.clone();
        b[field] = value;
        b
    };
    let without = |field: &str| {
        let mut b = base.clone();
        b.as_object_mut().unwrap().remove(field);
        b
    };
    for (body, field) in [
        (with("period", json!("year")), "period"),
        (without("period"), "period"),
        (with("amount", json!(0)), "amount"),
        (with("amount", json!(2.5)), "amount"),
        (without("amount"), "amount"),
        (with("allowance_id", json!("a:b")), "allowance_id"),
        (with("allowance_id", json!("")), "allowance_id"),
        (with("category", json!("gift")), "category"),
        (with("max_rollover", json!(-1)), "max_rollover"),
        (with("starts_at", json!("tomorrow")), "starts_at"),
    ] {
        let r = put(&app, &body, BOOT_KEY).await;
        let error = expect_error(r, StatusCode::BAD_REQUEST, "invalid_request").await;
        assert!(error.contains(field), "{field}: {error}");
    }
    let r = put(&app, &without("user_id"), BOOT_KEY).await;
    expect_error(r, StatusCode::BAD_REQUEST, "user_id_required").await;
    // Nothing was made, not even the account.
    assert_eq!(
        app.scalar("SELECT count(*) FROM accounts WHERE user_id = $1", "noor")
            .await,
        0
    );
    let r = app.get("/api/unified/allowances?user_id=noor").await;
    expect_error(r, StatusCode::NOT_FOUND, "user_not_found").await;
    // Scopes: read lists, only admin sets and deletes.
    let reader = app.key("*", &[Scope::Read]).await;
    let r = put(&app, &base, &reader).await;
    expect_error(r, StatusCode::FORBIDDEN, "forbidden").await;
    let r = put(&app, &base, BOOT_KEY).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = app
        .get_with_key("/api/unified/allowances?user_id=noor", &reader)
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = app
        .delete_with_key(
            "/api/unified/allowances?user_id=noor&allowance_id=daily",
            &reader,
        )
        .await;
    expect_error(r, StatusCode::FORBIDDEN, "forbidden").await;
    // A key bound to another app may neither change nor delete it.
    let imagegene = app.key("imagegene", &[Scope::Read, Scope::Admin]).await;
    let r = put(&app, &base, &imagegene).await;
    expect_error(r, StatusCode::FORBIDDEN, "app_mismatch").await;
    let r = app
        .delete_with_key(
            "/api/unified/allowances?user_id=noor&allowance_id=daily",
            &imagegene,
        )
        .await;
    expect_error(r, StatusCode::FORBIDDEN, "app_mismatch").await;
    // A grant may not take an allowance's reference.
    let r = app
        .post(
            "/api/unified/add-credits",
            &json!({"user_id": "noor", "amount": 5, "reason": "x",
                    "reference": "allowance:daily:2030-01-01T00:00:00.000Z"}),
        )
        .await;
    let error = expect_error(r, StatusCode::BAD_REQUEST, "invalid_request").await;
    assert!(error.contains("reference"), "{error}");
    app.assert_reconciled().await;
}
