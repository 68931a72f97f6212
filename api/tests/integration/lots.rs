//! Credit lots (contract §12) and partial refunds (§13), through the API
//! against the real PostgreSQL. Time is moved with `testing::travel` (the
//! test database's clock), never waited for.

use std::time::Duration;

use penora_platform::keys::Scope;
use penora_testing::travel;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{TestApp, expect_error, spawn_app};

/// Grants a lot through the API with `extra` fields; returns the answer.
async fn grant_lot(app: &TestApp, user: &str, amount: i64, reference: &str, extra: Value) -> Value {
    let mut body =
        json!({"user_id": user, "amount": amount, "reason": "test", "reference": reference});
    for (k, v) in extra.as_object().expect("object") {
        body[k] = v.clone();
    }
    let r = app.post("/api/unified/add-credits", &body).await;
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.expect("json")
}

/// An RFC 3339 time `secs` from now.
fn in_secs(secs: i64) -> String {
    penora_domain::timefmt::rfc3339_millis(
        time::OffsetDateTime::now_utc() + time::Duration::seconds(secs),
    )
}

async fn get_json(app: &TestApp, path: &str) -> Value {
    let r = app.get(path).await;
    assert_eq!(r.status(), StatusCode::OK, "{path}");
    r.json().await.expect("json")
}

async fn user_info(app: &TestApp, user: &str) -> Value {
    get_json(app, &format!("/api/unified/user-info?user_id={user}")).await
}

async fn post_json(app: &TestApp, path: &str, body: Value) -> (StatusCode, Value) {
    let r = app.post(path, &body).await;
    (r.status(), r.json().await.expect("json"))
}

async fn refund(
    app: &TestApp,
    user: &str,
    code: &str,
    part: Option<(i64, &str)>,
) -> (StatusCode, Value) {
    let mut body = json!({"user_id": user, "project_code": code, "app_name": "imagegene"});
    if let Some((amount, reference)) = part {
        body["amount"] = json!(amount);
        body["reference"] = json!(reference);
    }
    post_json(app, "/api/unified/refund-credits", body).await
}

fn allocations(deduct: &Value) -> Vec<(i64, i64)> {
    deduct["allocations"]
        .as_array()
        .expect("allocations")
        .iter()
        .map(|a| {
            (
                a["lot_id"].as_i64().expect("a number"),
                a["amount"].as_i64().expect("a number"),
            )
        })
        .collect()
}

async fn clock_forward(app: &TestApp, secs: f64) {
    let mut client = app.pool.get().await.expect("db");
    travel(&mut client, Duration::from_secs_f64(secs)).await;
}

#[tokio::test]
async fn deductions_burn_lots_down_by_priority_then_expiry_then_category_then_age() {
    let app = spawn_app().await;
    let u = "burn";
    let lot = |b: &Value| b["lot_id"].as_i64().expect("a number");
    let a = lot(&grant_lot(&app, u, 3, "a", json!({})).await);
    let b = lot(&grant_lot(
        &app,
        u,
        3,
        "b",
        json!({"category": "promotional", "priority": 50}),
    )
    .await);
    let c = lot(&grant_lot(&app, u, 3, "c", json!({"expires_at": in_secs(2 * 86_400)})).await);
    let d = lot(&grant_lot(&app, u, 3, "d", json!({"expires_at": in_secs(86_400)})).await);
    let e = lot(&grant_lot(&app, u, 3, "e", json!({"priority": 20})).await);
    let f = lot(&grant_lot(
        &app,
        u,
        3,
        "f",
        json!({"category": "promotional", "priority": 50}),
    )
    .await);
    // Priority first (e), then the soonest expiry (d, c), then promotional
    // before paid (b, f before a), then the oldest (b before f).
    let (status, first) = app.deduct(u, 4, "one").await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(allocations(&first), vec![(e, 3), (d, 1)]);
    let (_, second) = app.deduct(u, 5, "two").await;
    assert_eq!(allocations(&second), vec![(d, 2), (c, 3)]);
    // One deduction spanning three lots.
    let (_, third) = app.deduct(u, 7, "three").await;
    assert_eq!(allocations(&third), vec![(b, 3), (f, 3), (a, 1)]);
    assert_eq!(third["new_balance"], json!(2));
    // A replay answers the same allocations.
    let (_, again) = app.deduct(u, 7, "three").await;
    assert_eq!(allocations(&again), allocations(&third));

    let info = user_info(&app, u).await;
    assert_eq!(info["credits"], json!(2));
    assert_eq!(
        info["credits_breakdown"],
        json!({"paid": 2, "promotional": 0})
    );
    assert_eq!(
        info["next_expiry"],
        Value::Null,
        "the expiring lots are spent"
    );
    let listed = get_json(&app, &format!("/api/unified/credit-lots?user_id={u}")).await;
    let ids: Vec<i64> = listed["lots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["lot_id"].as_i64().expect("a number"))
        .collect();
    assert_eq!(ids, vec![f, e, d, c, b, a], "newest first");
    let depleted = get_json(
        &app,
        &format!("/api/unified/credit-lots?user_id={u}&status=depleted"),
    )
    .await;
    assert_eq!(depleted["lots"].as_array().expect("an array").len(), 5);
    app.assert_reconciled().await;
}

#[tokio::test]
async fn a_lot_expires_exactly_at_its_expiry_even_before_the_timer_writes_the_entry() {
    let app = spawn_app().await;
    let u = "exp";
    grant_lot(&app, u, 5, "paid", json!({})).await;
    let promo = grant_lot(
        &app,
        u,
        10,
        "promo",
        json!({"category": "promotional", "expires_at": in_secs(60)}),
    )
    .await;
    let promo_id = promo["lot_id"].as_i64().expect("a number");
    assert_eq!(promo["priority"], json!(10));
    let info = user_info(&app, u).await;
    assert_eq!(info["credits"], json!(15));
    assert_eq!(info["next_expiry"]["amount"], json!(10));

    // Just before its expiry the lot is spent first.
    // Moves the clock to `offset_ms` from the lot's expiry.
    let to = |offset_ms: i64| {
        let app = &app;
        async move {
            let client = app.pool.get().await.expect("db");
            let row = client
                .query_one(
                    "SELECT expires_at, clock_timestamp() AS now FROM credit_lots WHERE lot_id = $1",
                    &[&promo_id],
                )
                .await
                .expect("lot");
            let (expires_at, now): (time::OffsetDateTime, time::OffsetDateTime) =
                (row.get("expires_at"), row.get("now"));
            let target = expires_at + time::Duration::milliseconds(offset_ms);
            clock_forward(app, (target - now).as_seconds_f64()).await;
        }
    };
    // (2 s before: moving the clock takes a while on Citus.)
    to(-2000).await;
    let (status, before) = app.deduct(u, 3, "before").await;
    assert_eq!(status, StatusCode::OK, "{before}");
    assert_eq!(allocations(&before), vec![(promo_id, 3)]);
    app.assert_reconciled().await;

    // From 1 ms after its expiry on, it is not spendable, though no entry
    // says so yet.
    to(1).await;
    assert_eq!(
        app.scalar(
            "SELECT count(*) FROM ledger_entries WHERE user_id = $1 AND kind = 'expire'",
            u
        )
        .await,
        0
    );
    let info = user_info(&app, u).await;
    assert_eq!(info["credits"], json!(5));
    assert_eq!(
        info["credits_breakdown"],
        json!({"paid": 5, "promotional": 0})
    );
    assert_eq!(info["next_expiry"], Value::Null);
    let lots = get_json(
        &app,
        &format!("/api/unified/credit-lots?user_id={u}&status=expired"),
    )
    .await;
    assert_eq!(lots["lots"][0]["lot_id"], json!(promo_id));
    assert_eq!(lots["lots"][0]["remaining"], json!(0));
    app.assert_reconciled().await;

    let (status, body) = app.deduct(u, 6, "after").await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{body}");
    let (status, after) = app.deduct(u, 5, "after-2").await;
    assert_eq!(status, StatusCode::OK, "{after}");
    assert_eq!(after["new_balance"], json!(0));
    assert_ne!(allocations(&after)[0].0, promo_id);
    // That movement wrote the expiry first: -7, before its deduction.
    let expired = app
        .scalar(
            "SELECT amount FROM ledger_entries WHERE user_id = $1 AND kind = 'expire'",
            u,
        )
        .await;
    assert_eq!(expired, -7);
    assert_eq!(app.balance(u).await, 0);
    app.assert_reconciled().await;
}

#[tokio::test]
async fn a_refund_into_an_expired_lot_expires_that_part_at_once() {
    let app = spawn_app().await;
    let u = "late";
    let paid = grant_lot(&app, u, 5, "paid", json!({})).await["lot_id"]
        .as_i64()
        .unwrap();
    let promo = grant_lot(
        &app,
        u,
        10,
        "promo",
        json!({"category": "promotional", "expires_at": in_secs(60)}),
    )
    .await["lot_id"]
        .as_i64()
        .unwrap();
    let (_, d) = app.deduct(u, 12, "gen").await;
    assert_eq!(allocations(&d), vec![(promo, 10), (paid, 2)]);
    clock_forward(&app, 61.0).await;
    assert_eq!(user_info(&app, u).await["credits"], json!(3));

    // 4 back: the last lot drawn first (2 paid, spendable again), then 2
    // to the expired promotional lot, which expire at once.
    let (status, part) = refund(&app, u, "gen", Some((4, "r1"))).await;
    assert_eq!(status, StatusCode::OK, "{part}");
    assert_eq!(part["new_balance"], json!(5));
    assert_eq!(part["reservation_status"], json!("partially_refunded"));
    assert_eq!(part["remaining_reserved"], json!(8));
    // The rest goes to the expired lot only: spendable credits unchanged.
    let (status, rest) = refund(&app, u, "gen", None).await;
    assert_eq!(status, StatusCode::OK, "{rest}");
    assert_eq!(rest["credits_refunded"], json!(8));
    assert_eq!(rest["new_balance"], json!(5));
    assert_eq!(rest["reservation_status"], json!("refunded"));
    assert_eq!(user_info(&app, u).await["credits"], json!(5));
    assert_eq!(
        app.scalar(
            "SELECT coalesce(sum(amount), 0)::bigint FROM ledger_entries \
             WHERE user_id = $1 AND kind = 'expire' AND project_code = 'gen'",
            u
        )
        .await,
        -10,
        "the parts given back to the expired lot expired with their refunds"
    );
    app.assert_reconciled().await;
}

#[tokio::test]
async fn a_voided_lot_loses_its_credits_once_and_refunds_into_it_are_voided() {
    let app = spawn_app().await;
    let u = "void";
    grant_lot(&app, u, 5, "paid", json!({})).await;
    let promo = grant_lot(&app, u, 10, "promo", json!({"category": "promotional"})).await["lot_id"]
        .as_i64()
        .unwrap();
    app.deduct(u, 4, "gen").await;
    let path = format!("/api/unified/credit-lots/{promo}/void");
    let (status, first) =
        post_json(&app, &path, json!({"user_id": u, "reason": "chargeback"})).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["credits_voided"], json!(6));
    assert_eq!(first["new_balance"], json!(5));
    let rows = app.ledger_rows(u).await;
    let r = app
        .post(&path, &json!({"user_id": u, "reason": "chargeback"}))
        .await;
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    let again: Value = r.json().await.expect("json");
    assert_eq!(again["credits_voided"], json!(6));
    assert_eq!(
        app.ledger_rows(u).await,
        rows,
        "a second void writes nothing"
    );

    // The reservation drew from the voided lot: its refund gives nothing spendable.
    let (status, back) = refund(&app, u, "gen", None).await;
    assert_eq!(status, StatusCode::OK, "{back}");
    assert_eq!(back["credits_refunded"], json!(4));
    assert_eq!(back["new_balance"], json!(5));
    assert_eq!(user_info(&app, u).await["credits"], json!(5));

    // Unknown lots, other users' lots and weaker keys are refused.
    expect_error(
        app.post(
            "/api/unified/credit-lots/999999/void",
            &json!({"user_id": u}),
        )
        .await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    grant_lot(&app, "other", 1, "o", json!({})).await;
    expect_error(
        app.post(&path, &json!({"user_id": "other"})).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let spend = app.key("imagegene", &[Scope::Read, Scope::Spend]).await;
    expect_error(
        app.post_with_key(&path, &json!({"user_id": u}), &spend)
            .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    app.assert_reconciled().await;
}

#[tokio::test]
async fn a_reservation_is_refunded_in_parts_never_past_what_it_reserved() {
    let app = spawn_app().await;
    let u = "parts";
    app.grant(u, 20).await;
    app.deduct(u, 8, "four").await;
    let mut last = Value::Null;
    for (i, reference) in ["v1", "v2", "v3", "v4"].iter().enumerate() {
        let (status, body) = refund(&app, u, "four", Some((2, reference))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["refunded_total"], json!(2 * (i as i64 + 1)));
        last = body;
    }
    assert_eq!(last["reservation_status"], json!("refunded"));
    assert_eq!(last["new_balance"], json!(20));
    // A fifth part: nothing is left.
    let (status, fifth) = refund(&app, u, "four", Some((1, "v5"))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{fifth}");
    assert_eq!(fifth["code"], json!("not_refundable"));
    // The same reference again refunds once: the first answer.
    let r = app
        .post(
            "/api/unified/refund-credits",
            &json!({"user_id": u, "project_code": "four", "app_name": "imagegene", "amount": 2, "reference": "v1"}),
        )
        .await;
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    let replay: Value = r.json().await.expect("json");
    assert_eq!(replay["credits_refunded"], json!(2));
    assert_eq!(replay["new_balance"], json!(14));
    // The same reference with another amount is a conflict.
    let (status, body) = refund(&app, u, "four", Some((1, "v1"))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], json!("idempotency_conflict"));
    assert_eq!(app.balance(u).await, 20);

    // More than is left, and an amount without a reference, are refused.
    app.deduct(u, 5, "five").await;
    let (status, body) = refund(&app, u, "five", Some((6, "w1"))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = post_json(
        &app,
        "/api/unified/refund-credits",
        json!({"user_id": u, "project_code": "five", "app_name": "imagegene", "amount": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]
            .as_str()
            .expect("a string")
            .contains("reference"),
        "{body}"
    );
    // The Idempotency-Key header is the reference.
    let r = app
        .http
        .post(format!("{}/api/unified/refund-credits", app.base))
        .header("X-API-Key", crate::support::BOOT_KEY)
        .header("Idempotency-Key", "hdr-1")
        .json(&json!({"user_id": u, "project_code": "five", "app_name": "imagegene", "amount": 1}))
        .send()
        .await
        .expect("sent");
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["reference"], json!("hdr-1"));
    assert_eq!(body["remaining_reserved"], json!(4));
    app.assert_reconciled().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_concurrent_partial_refunds_never_sum_past_the_reservation() {
    let app = spawn_app().await;
    let u = "race";
    app.grant(u, 50).await;
    app.deduct(u, 8, "hot").await;
    let tasks: Vec<_> =
        (0..30)
            .map(|i| {
                let http = app.http.clone();
                let url = format!("{}/api/unified/refund-credits", app.base);
                tokio::spawn(async move {
                    http.post(url)
                    .header("X-API-Key", crate::support::BOOT_KEY)
                    .json(&json!({"user_id": "race", "project_code": "hot", "app_name": "imagegene",
                                  "amount": 1, "reference": format!("c{i}")}))
                    .send()
                    .await
                    .expect("sent")
                    .status()
                })
            })
            .collect();
    let mut ok = 0;
    for t in tasks {
        let status = t.await.expect("task");
        match status {
            StatusCode::OK => ok += 1,
            StatusCode::CONFLICT | StatusCode::BAD_REQUEST => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(ok, 8, "exactly the 8 reserved credits come back");
    assert_eq!(app.balance(u).await, 50);
    assert_eq!(
        app.scalar(
            "SELECT refunded_amount FROM reservations WHERE user_id = $1",
            u
        )
        .await,
        8
    );
    app.assert_reconciled().await;
}

#[tokio::test]
async fn settling_for_less_refunds_the_rest_in_the_same_transaction() {
    let app = spawn_app().await;
    let u = "settle";
    app.grant(u, 20).await;
    app.deduct(u, 10, "four-images").await;
    // 1 of 4 variations failed: refund it, then settle the rest for 6.
    let (status, part) = refund(&app, u, "four-images", Some((2, "variation-4"))).await;
    assert_eq!(status, StatusCode::OK, "{part}");
    let settle =
        json!({"user_id": u, "project_code": "four-images", "app_name": "imagegene", "amount": 6});
    let (status, body) = post_json(&app, "/api/unified/settle-credits", settle.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["reservation_status"], json!("settled"));
    assert_eq!(body["credits_charged"], json!(6));
    assert_eq!(body["credits_refunded"], json!(2));
    assert_eq!(body["refunded_total"], json!(4));
    assert_eq!(body["new_balance"], json!(14));
    // Idempotent; another amount conflicts; refunds are over.
    let r = app.post("/api/unified/settle-credits", &settle).await;
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    let mut other = settle.clone();
    other["amount"] = json!(5);
    let (status, body) = post_json(&app, "/api/unified/settle-credits", other).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, body) = refund(&app, u, "four-images", Some((1, "late"))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(app.balance(u).await, 14);

    // More than held is a bad request; without amount, all of it is charged.
    app.deduct(u, 3, "b").await;
    let (status, body) = post_json(
        &app,
        "/api/unified/settle-credits",
        json!({"user_id": u, "project_code": "b", "app_name": "imagegene", "amount": 4}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = post_json(
        &app,
        "/api/unified/settle-credits",
        json!({"user_id": u, "project_code": "b", "app_name": "imagegene"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["credits_charged"], json!(3));
    assert_eq!(app.balance(u).await, 11);
    app.assert_reconciled().await;
}

#[tokio::test]
async fn a_grant_checks_its_lot_options() {
    let app = spawn_app().await;
    for (field, value) in [
        ("category", json!("gift")),
        ("priority", json!(101)),
        ("priority", json!(-1)),
        ("priority", json!("high")),
        ("expires_at", json!(in_secs(-1))),
        ("expires_at", json!("tomorrow")),
    ] {
        let r = app
            .post(
                "/api/unified/add-credits",
                &json!({"user_id": "opts", "amount": 5, "reason": "t", "reference": "x", field: value}),
            )
            .await;
        let error = expect_error(r, StatusCode::BAD_REQUEST, "invalid_request").await;
        assert!(error.starts_with(field), "{error}");
    }
    assert_eq!(
        app.scalar("SELECT count(*) FROM accounts WHERE user_id = $1", "opts")
            .await,
        0
    );
    // The same reference with other lot options is a conflict.
    let at = in_secs(3600);
    grant_lot(
        &app,
        "opts",
        5,
        "x",
        json!({"category": "promotional", "expires_at": at}),
    )
    .await;
    let r = app
        .post(
            "/api/unified/add-credits",
            &json!({"user_id": "opts", "amount": 5, "reason": "t", "reference": "x"}),
        )
        .await;
    expect_error(r, StatusCode::CONFLICT, "idempotency_conflict").await;
    let replay = grant_lot(
        &app,
        "opts",
        5,
        "x",
        json!({"category": "promotional", "expires_at": at}),
    )
    .await;
    assert_eq!(replay["expires_at"], json!(at));
}

#[tokio::test]
async fn the_balance_at_a_past_instant_comes_from_the_ledger() {
    let app = spawn_app().await;
    let u = "past";
    grant_lot(&app, u, 10, "p", json!({})).await;
    grant_lot(
        &app,
        u,
        4,
        "promo",
        json!({"category": "promotional", "expires_at": in_secs(30)}),
    )
    .await;
    let t1 = db_now(&app).await;
    app.deduct(u, 6, "d1").await; // 4 promotional, 2 paid
    let t2 = db_now(&app).await;
    refund(&app, u, "d1", Some((3, "r"))).await; // 2 paid back, 1 promotional
    let t3 = db_now(&app).await;
    clock_forward(&app, 31.0).await; // the promotional lot (1 left) expires
    let balance_at = |t: time::OffsetDateTime| {
        let app = &app;
        async move {
            let t = penora_domain::timefmt::rfc3339_millis(t - time::Duration::seconds(31));
            get_json(app, &format!("/api/unified/balance?user_id={u}&at={t}")).await["credits"]
                .as_i64()
                .unwrap()
        }
    };
    assert_eq!(balance_at(t1).await, 14);
    assert_eq!(balance_at(t2).await, 8);
    assert_eq!(balance_at(t3).await, 11);
    // Now: the expired credit is gone, though no entry says so yet.
    let now = get_json(&app, &format!("/api/unified/balance?user_id={u}")).await;
    assert_eq!(now["credits"], json!(10));
    // The future, and unknown users, are refused.
    let future = in_secs(60);
    expect_error(
        app.get(&format!("/api/unified/balance?user_id={u}&at={future}"))
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
    expect_error(
        app.get("/api/unified/balance?user_id=nobody").await,
        StatusCode::NOT_FOUND,
        "user_not_found",
    )
    .await;
}

/// The database's clock now (the time the ledger records).
pub async fn db_now(app: &TestApp) -> time::OffsetDateTime {
    let client = app.pool.get().await.expect("db");
    client
        .query_one("SELECT clock_timestamp() AS t", &[])
        .await
        .expect("now")
        .get("t")
}

#[tokio::test]
async fn a_grant_after_an_expiry_answers_what_the_user_can_spend() {
    let app = spawn_app().await;
    let u = "regrant";
    grant_lot(&app, u, 5, "paid", json!({})).await;
    grant_lot(
        &app,
        u,
        10,
        "promo",
        json!({"category": "promotional", "expires_at": in_secs(60)}),
    )
    .await;
    clock_forward(&app, 61.0).await;
    let more = grant_lot(&app, u, 2, "more", json!({})).await;
    assert_eq!(more["new_balance"], json!(7), "{more}");
    assert_eq!(user_info(&app, u).await["credits"], json!(7));
    assert_eq!(
        app.scalar(
            "SELECT amount FROM ledger_entries WHERE user_id = $1 AND kind = 'expire'",
            u
        )
        .await,
        -10
    );
    app.assert_reconciled().await;
}

#[tokio::test]
async fn a_whole_refund_asked_again_answers_the_refund_that_completed_it() {
    let app = spawn_app().await;
    let u = "again";
    app.grant(u, 20).await;
    app.deduct(u, 8, "once").await;
    // Refunded at once under an Idempotency-Key, then asked again without.
    let r = app
        .http
        .post(format!("{}/api/unified/refund-credits", app.base))
        .header("X-API-Key", crate::support::BOOT_KEY)
        .header("Idempotency-Key", "refund-once")
        .json(&json!({"user_id": u, "project_code": "once", "app_name": "imagegene"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), StatusCode::OK);
    let r = app
        .post(
            "/api/unified/refund-credits",
            &json!({"user_id": u, "project_code": "once", "app_name": "imagegene"}),
        )
        .await;
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    let again: Value = r.json().await.expect("json");
    assert_eq!(again["credits_refunded"], json!(8), "{again}");
    assert_eq!(again["new_balance"], json!(20));
    // Refunded in parts: asking for the whole answers the last part.
    app.deduct(u, 6, "parts").await;
    refund(&app, u, "parts", Some((4, "p1"))).await;
    refund(&app, u, "parts", Some((2, "p2"))).await;
    let (status, whole) = refund(&app, u, "parts", None).await;
    assert_eq!(status, StatusCode::OK, "{whole}");
    assert_eq!(whole["credits_refunded"], json!(2));
    assert_eq!(whole["reservation_status"], json!("refunded"));
    assert_eq!(app.balance(u).await, 20);
}
