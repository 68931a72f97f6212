//! The refund window bounds every way credits come back (issue 24, item 2):
//! a settlement for less is a refund of what it does not charge, judged
//! against the window like one; an event's time is believed only near its
//! arrival and never long before its reservation. And the smaller items of
//! the same round that live on these routes: `settle-credits` finds a
//! reservation without `app_name` as `refund-credits` does, voiding a lot
//! honours the key's app, free text refuses bidirectional controls.
//!
//! Time is moved with `testing::travel` (the test database's clock).

use std::time::Duration;

use penora_domain::{AppName, ProjectCode, UserId};
use penora_ledger as ledger;
use penora_ledger::{EventTime, LedgerError, Settle, SettledBy};
use penora_platform::keys::Scope;
use penora_testing::travel;
use reqwest::StatusCode;
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::support::{TestApp, expect_error, spawn_app};

const SKEW: Duration = Duration::from_secs(60);

async fn clock_forward(app: &TestApp, secs: u64) {
    let mut client = app.pool.get().await.expect("db");
    travel(&mut client, Duration::from_secs(secs)).await;
}

async fn settle_http(app: &TestApp, body: Value) -> (StatusCode, Value) {
    let r = app.post("/api/unified/settle-credits", &body).await;
    (r.status(), r.json().await.expect("json"))
}

/// The reservation's state, who settled it, and what it refunded.
async fn reservation(app: &TestApp, user: &str, code: &str) -> (String, Option<String>, i64) {
    let c = app.pool.get().await.expect("db");
    let row = c
        .query_one(
            "SELECT state, settled_by, refunded_amount FROM reservations \
             WHERE user_id = $1 AND project_code = $2",
            &[&user, &code],
        )
        .await
        .expect("reservation");
    (row.get(0), row.get(1), row.get(2))
}

async fn created_at(app: &TestApp, user: &str, code: &str) -> OffsetDateTime {
    let c = app.pool.get().await.expect("db");
    c.query_one(
        "SELECT created_at FROM reservations WHERE user_id = $1 AND project_code = $2",
        &[&user, &code],
    )
    .await
    .expect("reservation")
    .get(0)
}

async fn settle_by_timer(app: &TestApp, user: &str, code: &str) {
    let mut c = app.pool.get().await.expect("db");
    ledger::settle(
        &mut c,
        &UserId::parse(user).expect("user"),
        &AppName::imagegene(),
        &ProjectCode::parse(code).expect("code"),
        (SettledBy::Window, "refund window passed"),
        None,
        None,
    )
    .await
    .expect("settled by the window");
}

#[tokio::test]
async fn settling_for_less_after_the_window_gives_nothing_back() {
    let app = spawn_app().await;
    let u = "late-settle";
    app.grant(u, 50).await;
    let (status, _) = app.deduct(u, 10, "gen-1").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = app.deduct(u, 10, "gen-2").await;
    assert_eq!(status, StatusCode::OK);
    clock_forward(&app, 3600 + 10).await;

    // Its window closed; the timer has not run yet: settling for 0 (or any
    // amount below what it holds) would be a refund, and is refused.
    for amount in [0, 3] {
        let (status, body) = settle_http(
            &app,
            json!({"user_id": u, "project_code": "gen-1", "app_name": "imagegene", "amount": amount}),
        )
        .await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        assert_eq!(body["code"], json!("not_refundable"), "{body}");
        let msg = body["error"].as_str().expect("error");
        assert!(msg.contains("closed") && msg.contains("in full"), "{msg}");
    }
    assert_eq!(app.balance(u).await, 30, "nothing came back");
    assert_eq!(
        reservation(&app, u, "gen-1").await,
        ("reserved".into(), None, 0)
    );

    // The timer settled the other one: the same, even though a settlement
    // by the window can be made final.
    settle_by_timer(&app, u, "gen-2").await;
    let (status, body) = settle_http(
        &app,
        json!({"user_id": u, "project_code": "gen-2", "app_name": "imagegene", "amount": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(app.balance(u).await, 30);
    assert_eq!(
        reservation(&app, u, "gen-2").await,
        ("settled".into(), Some("window".into()), 0)
    );

    // Settling in full gives nothing back: still allowed, and final.
    let (status, body) = settle_http(
        &app,
        json!({"user_id": u, "project_code": "gen-1", "app_name": "imagegene"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["credits_charged"], json!(10));
    assert_eq!(body["credits_refunded"], json!(0));
    let (status, body) = settle_http(
        &app,
        json!({"user_id": u, "project_code": "gen-2", "app_name": "imagegene", "amount": 10}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        reservation(&app, u, "gen-2").await,
        ("settled".into(), Some("final".into()), 0)
    );
    assert_eq!(app.balance(u).await, 30);
    app.assert_reconciled().await;
}

/// What a `generation.succeeded` event with `amount: 4` at `at` does.
async fn succeeded(
    app: &TestApp,
    user: &str,
    code: &str,
    at: OffsetDateTime,
) -> Result<ledger::SettleReceipt, LedgerError> {
    let user = UserId::parse(user).expect("user");
    let code = ProjectCode::parse(code).expect("code");
    let mut c = app.pool.get().await.expect("db");
    ledger::settle_for(
        &mut c,
        &Settle {
            user_id: &user,
            app_name: Some(&AppName::imagegene()),
            project_code: &code,
            by: SettledBy::Final,
            reason: "generation succeeded",
            charge: Some(4),
            reference: None,
            correlation_id: None,
            event_id: None,
            event_time: Some(EventTime {
                at,
                clock_skew: SKEW,
            }),
        },
    )
    .await
}

#[tokio::test]
async fn an_event_gives_back_only_what_its_believed_time_allows() {
    let app = spawn_app().await;
    let u = "event-settle";
    app.grant(u, 50).await;
    for code in ["inside", "after", "before"] {
        let (status, _) = app.deduct(u, 10, code).await;
        assert_eq!(status, StatusCode::OK);
    }
    clock_forward(&app, 3600 + 10).await;
    for code in ["inside", "after", "before"] {
        settle_by_timer(&app, u, code).await;
    }
    // A success from inside the window, processed after it (a worker
    // outage): it charges 4 and gives the rest back, as a failure event
    // from inside the window would (CONTRACT §11).
    let made = created_at(&app, u, "inside").await;
    let done = succeeded(&app, u, "inside", made + Duration::from_secs(60))
        .await
        .expect("inside the window");
    assert_eq!((done.credits_charged, done.credits_refunded), (4, 6));
    // From after the window: nothing back, nothing changed.
    let made = created_at(&app, u, "after").await;
    match succeeded(&app, u, "after", made + Duration::from_secs(3700)).await {
        Err(LedgerError::NotRefundable(m)) => assert!(m.contains("closed"), "{m}"),
        other => panic!("expected not_refundable, got {other:?}"),
    }
    // Long before the reservation was made: not about it.
    let made = created_at(&app, u, "before").await;
    match succeeded(&app, u, "before", made - Duration::from_secs(86_400)).await {
        Err(LedgerError::NotRefundable(m)) => assert!(m.contains("before reservation"), "{m}"),
        other => panic!("expected not_refundable, got {other:?}"),
    }
    for code in ["after", "before"] {
        assert_eq!(
            reservation(&app, u, code).await,
            ("settled".into(), Some("window".into()), 0)
        );
    }
    assert_eq!(app.balance(u).await, 20 + 6);
    app.assert_reconciled().await;
}

#[test]
fn an_event_time_far_before_its_arrival_is_judged_at_its_arrival() {
    let arrived = OffsetDateTime::now_utc();
    let hour = Duration::from_secs(3600);
    let claimed = arrived - 48 * hour;
    assert_eq!(
        EventTime::believed(claimed, arrived, hour, SKEW).at,
        arrived
    );
    let recent = arrived - hour / 2;
    assert_eq!(EventTime::believed(recent, arrived, hour, SKEW).at, recent);
}

#[tokio::test]
async fn settle_credits_finds_the_reservation_without_app_name_as_refunds_do() {
    let app = spawn_app().await;
    let u = "no-app";
    app.grant(u, 50).await;
    app.deduct(u, 6, "solo").await;
    let (status, body) = settle_http(
        &app,
        json!({"user_id": u, "project_code": "solo", "amount": 4}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["app_name"], json!("imagegene"));
    assert_eq!(
        (
            body["credits_charged"].clone(),
            body["credits_refunded"].clone()
        ),
        (json!(4), json!(2))
    );
    // One code, two apps: say which.
    for app_name in ["imagegene", "penora"] {
        let r = app
            .post(
                "/api/unified/deduct-credits",
                &json!({"user_id": u, "amount": 3, "app_name": app_name, "project_code": "both"}),
            )
            .await;
        assert_eq!(r.status(), StatusCode::OK);
    }
    let r = app
        .post(
            "/api/unified/settle-credits",
            &json!({"user_id": u, "project_code": "both"}),
        )
        .await;
    let msg = expect_error(r, StatusCode::BAD_REQUEST, "invalid_request").await;
    assert!(msg.starts_with("app_name:"), "{msg}");
    let r = app
        .post(
            "/api/unified/settle-credits",
            &json!({"user_id": u, "project_code": "missing"}),
        )
        .await;
    expect_error(r, StatusCode::NOT_FOUND, "not_found").await;
    // A key bound to an app settles its own app's reservation.
    let key = app.key("penora", &[Scope::Spend]).await;
    let r = app
        .post_with_key(
            "/api/unified/settle-credits",
            &json!({"user_id": u, "project_code": "both"}),
            &key,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["app_name"], json!("penora"));
    app.assert_reconciled().await;
}

#[tokio::test]
async fn a_key_bound_to_an_app_voids_only_that_apps_lots() {
    let app = spawn_app().await;
    let u = "voids";
    let grant = |app_name: &'static str, reference: &'static str| {
        let body = json!({"user_id": u, "amount": 5, "reason": "t", "reference": reference, "app_name": app_name});
        let app = &app;
        async move {
            let r = app.post("/api/unified/add-credits", &body).await;
            assert_eq!(r.status(), StatusCode::OK);
            let body: Value = r.json().await.expect("json");
            body["lot_id"].as_i64().expect("lot id")
        }
    };
    let penoras = grant("penora", "p-lot").await;
    let imagegenes = grant("imagegene", "i-lot").await;
    let key = app.key("imagegene", &[Scope::Admin]).await;
    let void = |lot: i64| {
        let key = key.clone();
        let app = &app;
        async move {
            app.post_with_key(
                &format!("/api/unified/credit-lots/{lot}/void"),
                &json!({"user_id": u, "reason": "fraud"}),
                &key,
            )
            .await
        }
    };
    let msg = expect_error(void(penoras).await, StatusCode::FORBIDDEN, "app_mismatch").await;
    assert!(msg.contains("penora"), "{msg}");
    assert_eq!(app.balance(u).await, 10, "nothing voided");
    let r = void(imagegenes).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(app.balance(u).await, 5);
    app.assert_reconciled().await;
}

#[tokio::test]
async fn free_text_with_bidirectional_controls_is_refused_and_changes_nothing() {
    let app = spawn_app().await;
    let u = "bidi";
    app.grant(u, 20).await;
    app.deduct(u, 5, "r1").await;
    // "Trojan Source": shown as `refund 100`, stored as something else.
    for reason in [
        "refund \u{202E}001\u{202C}",
        "a\u{2066}b",
        "zero\u{200B}width",
    ] {
        let r = app
            .post(
                "/api/unified/refund-credits",
                &json!({"user_id": u, "project_code": "r1", "app_name": "imagegene", "reason": reason}),
            )
            .await;
        let msg = expect_error(r, StatusCode::BAD_REQUEST, "invalid_request").await;
        assert!(msg.starts_with("reason:") && msg.contains("U+"), "{msg}");
        let r = app
            .post(
                "/api/unified/add-credits",
                &json!({"user_id": u, "amount": 1, "reason": reason, "reference": "x"}),
            )
            .await;
        expect_error(r, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
    assert_eq!(app.balance(u).await, 15, "nothing moved");
    // Emoji and scripts that need joiners pass.
    let r = app
        .post(
            "/api/unified/refund-credits",
            &json!({"user_id": u, "project_code": "r1", "app_name": "imagegene", "reason": "👩\u{200D}🎨 می\u{200C}خواهم"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
}
