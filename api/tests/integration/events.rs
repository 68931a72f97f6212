//! Events out (contract §14) seen from outside: each movement's events reach
//! the exchange `penora.events` (this test's prefix) with their type as
//! routing key, an `evt_` id and the documented `data`, published by the
//! API's outbox relay from the movement's own transaction; `balance.low`
//! fires once per crossing (also under group commit), `balance.depleted` at
//! 0; a refused movement writes none; `PUT /alerts` sets the threshold.
//!
//! Each test binds a queue of its own to the exchange and reads what the
//! relay published once the outbox is empty.

use std::time::Duration;

use deadpool_postgres::Pool;
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use penora_domain::events::{EXCHANGE, Envelope};
use penora_platform::broker::{self, Topology};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{BOOT_KEY, TestApp, expect_error, spawn_app, spawn_app_with};

/// Where the tests find RabbitMQ.
fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// An API with a broker (a queue prefix of its own) and a queue bound to
/// its `penora.events` with `#`.
struct Stream {
    app: TestApp,
    channel: lapin::Channel,
    queue: String,
    _connection: lapin::Connection,
}

impl Stream {
    async fn start(overrides: &[(&str, &str)]) -> Self {
        let prefix = format!("t{}_", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let amqp = amqp_url();
        let mut vars = vec![
            ("AMQP_URL", amqp.as_str()),
            ("AMQP_PREFIX", prefix.as_str()),
        ];
        vars.extend_from_slice(overrides);
        let app = spawn_app_with(&vars).await;
        let topology = Topology::from_settings(&app.db.settings(&vars).broker);
        let connection = broker::connect(&amqp, "penora-events-test")
            .await
            .unwrap_or_else(|e| panic!("RabbitMQ is not reachable at {amqp}: {e}"));
        topology.declare(&connection).await.expect("topology");
        let channel = connection.create_channel().await.expect("channel");
        let queue = channel
            .queue_declare(
                "".into(),
                // Server-named, gone with the test's connection.
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("queue")
            .name()
            .to_string();
        channel
            .queue_bind(
                queue.clone().into(),
                topology.exchange(EXCHANGE).into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bound");
        Self {
            app,
            channel,
            queue,
            _connection: connection,
        }
    }

    /// Every event published since the last call: waits until the outbox
    /// has nothing left to publish (the relay publishes with confirms, so
    /// what it published is in the queue), then takes the queue's messages.
    async fn take(&self) -> Vec<(String, Envelope)> {
        drained(&self.app.pool).await;
        let mut got = Vec::new();
        while let Some(m) = self
            .channel
            .basic_get(self.queue.clone().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
        {
            let envelope: Envelope = serde_json::from_slice(&m.delivery.data).expect("an envelope");
            got.push((m.delivery.routing_key.to_string(), envelope));
        }
        got
    }
}

/// Waits (polling, at most 20 s) until the outbox holds no unpublished row.
async fn drained(pool: &Pool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let client = pool.get().await.expect("db");
        let left: i64 = client
            .query_one(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL",
                &[],
            )
            .await
            .expect("outbox")
            .get(0);
        if left == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{left} outbox rows never published"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn kinds(events: &[(String, Envelope)]) -> Vec<&str> {
    events.iter().map(|(k, _)| k.as_str()).collect()
}

async fn post(app: &TestApp, path: &str, body: Value) -> Value {
    let r = app.post(path, &body).await;
    let status = r.status();
    let body: Value = r.json().await.expect("json");
    assert_eq!(status, StatusCode::OK, "{path}: {body}");
    body
}

async fn deduct(app: &TestApp, user: &str, amount: i64, code: &str) -> Value {
    let (status, body) = app.deduct(user, amount, code).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

fn in_secs(secs: i64) -> String {
    penora_domain::timefmt::rfc3339_millis(
        time::OffsetDateTime::now_utc() + time::Duration::seconds(secs),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_ledger_event_reaches_penora_events_with_its_routing_key_id_and_data() {
    let s = Stream::start(&[]).await;
    let app = &s.app;
    let paid = post(
        app,
        "/api/unified/add-credits",
        json!({"user_id": "ev", "amount": 20, "reason": "purchase", "reference": "paid-1"}),
    )
    .await;
    let promo = post(
        app,
        "/api/unified/add-credits",
        json!({"user_id": "ev", "amount": 10, "reason": "bonus", "reference": "promo-1",
               "category": "promotional", "expires_at": in_secs(60)}),
    )
    .await;
    // 4 from the promotional lot (drawn first), settled for 3: 1 back.
    deduct(app, "ev", 4, "g1").await;
    post(
        app,
        "/api/unified/settle-credits",
        json!({"user_id": "ev", "project_code": "g1", "amount": 3, "app_name": "imagegene"}),
    )
    .await;
    deduct(app, "ev", 5, "g2").await; // the promotional lot keeps 2
    let got = s.take().await;
    assert_eq!(
        kinds(&got),
        [
            "credits.granted",
            "credits.granted",
            "credits.refunded",
            "reservation.settled"
        ],
        "{got:?}"
    );
    for (key, e) in &got {
        assert_eq!(&e.kind, key, "the routing key is the type");
        assert!(e.id.starts_with("evt_") && e.id.len() == 36, "{}", e.id);
        assert_eq!(e.data["user_id"], "ev");
        assert!(e.created_at.ends_with('Z'), "{}", e.created_at);
    }
    let data = |i: usize| got[i].1.data.clone();
    assert_eq!(
        data(0),
        json!({"user_id": "ev", "app": "penora", "amount": 20, "balance": 20,
               "lot_id": paid["lot_id"], "category": "paid", "expires_at": null,
               "reference": "paid-1"})
    );
    assert_eq!(data(1)["lot_id"], promo["lot_id"]);
    assert_eq!(data(1)["category"], "promotional");
    assert_eq!(data(1)["expires_at"], promo["expires_at"]);
    assert_eq!(data(1)["balance"], 30);
    assert_eq!(
        data(2),
        json!({"user_id": "ev", "app": "imagegene", "project_code": "g1", "amount": 1,
               "balance": 27, "reason": "settled by the client", "reference": null})
    );
    assert_eq!(
        data(3),
        json!({"user_id": "ev", "app": "imagegene", "project_code": "g1", "amount": 3,
               "returned": 1, "settled_by": "final"})
    );

    // The promotional lot expires; the refund of g2 meets it: its 2 left
    // expire first, then the 5 given back expire at once. The balance never
    // crosses 10, and the transient rise of the refund is no crossing.
    let mut client = app.pool.get().await.expect("db");
    penora_testing::travel(&mut client, Duration::from_secs_f64(60.001)).await;
    post(
        app,
        "/api/unified/refund-credits",
        json!({"user_id": "ev", "project_code": "g2", "reason": "generation failed"}),
    )
    .await;
    let got = s.take().await;
    assert_eq!(
        kinds(&got),
        ["credits.expired", "credits.refunded", "credits.expired"],
        "{got:?}"
    );
    let promo_lot = promo["lot_id"].clone();
    assert_eq!(
        got[0].1.data,
        json!({"user_id": "ev", "app": "penora", "amount": 2, "balance": 20,
               "lot_ids": [promo_lot]})
    );
    assert_eq!(got[1].1.data["amount"], 5);
    assert_eq!(got[1].1.data["balance"], 20, "the balance after the refund");
    assert_eq!(got[1].1.data["reason"], "generation failed");
    assert_eq!(got[2].1.data["amount"], 5);
    assert_eq!(got[2].1.data["app"], "imagegene");

    // 20 → 5 crosses 10; 5 → 0 depletes.
    deduct(app, "ev", 15, "g3").await;
    deduct(app, "ev", 5, "g4").await;
    let got = s.take().await;
    assert_eq!(kinds(&got), ["balance.low", "balance.depleted"], "{got:?}");
    let low = &got[0].1;
    let hex = low.id.strip_prefix("evt_").expect("evt_ id");
    assert_eq!(
        low.data,
        json!({"user_id": "ev", "app": "imagegene", "balance": 5, "threshold": 10,
               "topup_reference": format!("topup_{hex}")})
    );
    assert_eq!(
        got[1].1.data,
        json!({"user_id": "ev", "app": "imagegene", "balance": 0})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn balance_low_fires_once_per_crossing_and_re_arms_only_above_the_threshold() {
    let s = Stream::start(&[]).await;
    let app = &s.app;
    app.grant("u1", 15).await;
    for (amount, code) in [(3, "a"), (4, "b"), (3, "c"), (2, "d")] {
        deduct(app, "u1", amount, code).await; // 12, 8, 5, 3
    }
    let lows = |got: &[(String, Envelope)]| -> Vec<i64> {
        got.iter()
            .filter(|(k, _)| k == "balance.low")
            .map(|(_, e)| e.data["balance"].as_i64().expect("balance"))
            .collect()
    };
    let got = s.take().await;
    assert_eq!(lows(&got), [8], "{got:?}");
    assert!(!kinds(&got).contains(&"balance.depleted"));
    // Back to 20 re-arms; a fall to 9 fires again.
    app.grant("u1", 17).await;
    deduct(app, "u1", 11, "e").await;
    let got = s.take().await;
    assert_eq!(lows(&got), [9], "{got:?}");
    // Below the threshold already: no balance.low, balance.depleted at 0.
    deduct(app, "u1", 9, "f").await;
    let got = s.take().await;
    assert_eq!(kinds(&got), ["balance.depleted"], "{got:?}");
    assert_eq!(got[0].1.data["balance"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_concurrent_deductions_from_105_to_5_emit_one_balance_low() {
    let s = std::sync::Arc::new(Stream::start(&[]).await);
    s.app.grant("hot", 105).await;
    let _ = s.take().await;
    let mut tasks = Vec::new();
    for i in 0..100 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.app.deduct("hot", 1, &format!("c{i}")).await.0
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task"), StatusCode::OK);
    }
    assert_eq!(s.app.balance("hot").await, 5);
    let got = s.take().await;
    assert_eq!(kinds(&got), ["balance.low"], "{got:?}");
    assert_eq!(got[0].1.data["balance"], 9);
    // Group commit did batch them: fewer transactions than deductions (an
    // entry's time is its transaction's now()).
    let client = s.app.pool.get().await.expect("db");
    let row = client
        .query_one(
            "SELECT count(*) AS entries, count(DISTINCT created_at) AS transactions \
             FROM ledger_entries WHERE user_id = 'hot' AND kind = 'deduct'",
            &[],
        )
        .await
        .expect("count");
    let (entries, transactions): (i64, i64) = (row.get("entries"), row.get("transactions"));
    assert_eq!(entries, 100);
    assert!(transactions < 100, "{transactions} transactions: no batch");
}

/// Events written to the outbox for `user` (no broker: nothing is
/// published, the rows stay).
async fn outbox_events(app: &TestApp, user: &str) -> Vec<String> {
    let client = app.pool.get().await.expect("db");
    client
        .query(
            "SELECT routing_key FROM outbox WHERE user_id = $1 AND exchange = $2 ORDER BY id",
            &[&user, &EXCHANGE],
        )
        .await
        .expect("outbox")
        .iter()
        .map(|r| r.get("routing_key"))
        .collect()
}

#[tokio::test]
async fn a_refused_movement_writes_no_event() {
    let app = spawn_app().await;
    app.grant("u1", 12).await;
    deduct(&app, "u1", 1, "p1").await;
    let before = outbox_events(&app, "u1").await;
    assert_eq!(before, ["credits.granted"]);
    // 402: more than the balance of 11 (which would cross 10 and reach 0).
    let (status, _) = app.deduct("u1", 12, "p2").await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
    // 409: the same key with another amount.
    let (status, _) = app.deduct("u1", 5, "p1").await;
    assert_eq!(status, StatusCode::CONFLICT);
    // A replay moves nothing and reports nothing.
    let (status, _) = app.deduct("u1", 1, "p1").await;
    assert_eq!(status, StatusCode::OK);
    // 404: a refund of an unknown reservation; 400: a refund of more than held.
    let r = app
        .post(
            "/api/unified/refund-credits",
            &json!({"user_id": "u1", "project_code": "nope"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = app
        .post(
            "/api/unified/refund-credits",
            &json!({"user_id": "u1", "project_code": "p1", "amount": 2, "reference": "r"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(outbox_events(&app, "u1").await, before);
}

async fn alerts(
    app: &TestApp,
    method: reqwest::Method,
    body: Option<Value>,
    key: &str,
) -> reqwest::Response {
    let mut req = app
        .http
        .request(method, format!("{}/api/unified/alerts", app.base))
        .header("X-API-Key", key);
    if let Some(body) = body {
        req = req.json(&body);
    }
    req.send().await.expect("sent")
}

async fn read_alerts(app: &TestApp, user: &str) -> Value {
    let r = app
        .get(&format!("/api/unified/alerts?user_id={user}"))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.expect("json")
}

#[tokio::test]
async fn the_alerts_route_sets_reads_and_resets_the_threshold_and_refuses_bad_input() {
    let app = spawn_app_with(&[("LOW_BALANCE_THRESHOLD", "10")]).await;
    app.grant("u1", 100).await;
    let default =
        json!({"success": true, "user_id": "u1", "low_balance_threshold": 10, "default": true});
    assert_eq!(read_alerts(&app, "u1").await, default);

    let put = |body: Value| alerts(&app, reqwest::Method::PUT, Some(body), BOOT_KEY);
    // A whole number written as a float is a whole number (JSON Schema's
    // integer, and JavaScript's), as for every amount.
    let r = put(json!({"user_id": "u1", "low_balance_threshold": 7.0})).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(read_alerts(&app, "u1").await["low_balance_threshold"], 7);
    let r = put(json!({"user_id": "u1", "low_balance_threshold": 50})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let set =
        json!({"success": true, "user_id": "u1", "low_balance_threshold": 50, "default": false});
    assert_eq!(r.json::<Value>().await.expect("json"), set);
    assert_eq!(read_alerts(&app, "u1").await, set);

    // Refused, naming the field, and nothing changes.
    for bad in [
        json!({"user_id": "u1", "low_balance_threshold": -1}),
        json!({"user_id": "u1", "low_balance_threshold": "5"}),
        json!({"user_id": "u1", "low_balance_threshold": 2.5}),
        json!({"user_id": "u1", "low_balance_threshold": 1e30}),
        json!({"user_id": "u1"}),
    ] {
        let msg = expect_error(
            put(bad.clone()).await,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        )
        .await;
        assert!(msg.contains("low_balance_threshold"), "{bad}: {msg}");
    }
    expect_error(
        put(json!({"low_balance_threshold": 5})).await,
        StatusCode::BAD_REQUEST,
        "user_id_required",
    )
    .await;
    expect_error(
        put(json!({"user_id": "ghost", "low_balance_threshold": 5})).await,
        StatusCode::NOT_FOUND,
        "user_not_found",
    )
    .await;
    let r = app.get("/api/unified/alerts?user_id=ghost").await;
    expect_error(r, StatusCode::NOT_FOUND, "user_not_found").await;
    // Setting needs admin; reading needs read.
    let reader = app.key("*", &[penora_platform::keys::Scope::Read]).await;
    let r = alerts(
        &app,
        reqwest::Method::PUT,
        Some(json!({"user_id": "u1", "low_balance_threshold": 1})),
        &reader,
    )
    .await;
    expect_error(r, StatusCode::FORBIDDEN, "forbidden").await;
    let r = app
        .get_with_key("/api/unified/alerts?user_id=u1", &reader)
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(read_alerts(&app, "u1").await, set);

    // The next movement judges with the user's threshold: 100 → 40 crosses 50.
    deduct(&app, "u1", 60, "big").await;
    assert_eq!(
        outbox_events(&app, "u1").await,
        ["credits.granted", "balance.low"]
    );
    let client = app.pool.get().await.expect("db");
    let data: Value = client
        .query_one(
            "SELECT payload->'data' FROM outbox WHERE user_id = 'u1' AND routing_key = 'balance.low'",
            &[],
        )
        .await
        .expect("row")
        .get(0);
    assert_eq!(data["threshold"], 50);
    assert_eq!(data["balance"], 40);

    // null goes back to the default.
    let r = put(json!({"user_id": "u1", "low_balance_threshold": null})).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(read_alerts(&app, "u1").await, default);
}
