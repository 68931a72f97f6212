//! Webhooks end to end (contract §14): events published to `penora.events`
//! through the outbox and the relay, fanned out, and delivered by the
//! worker to real HTTP receivers (axum on 127.0.0.1, port 0) started by
//! each test. Signatures are checked here the way a receiver checks them,
//! with the hmac and sha2 crates, not with the service's signing code.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use penora_domain::events::EventType;
use penora_store::outbox::{Event, enqueue_events};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::time::Instant;

use crate::support::{Stack, stack, wait_for};

/// Webhook settings of these tests: private targets allowed (the receivers
/// are on 127.0.0.1), quick retries, and a circuit that stays closed unless
/// a test asks.
const HOOKS: &[(&str, &str)] = &[
    ("WEBHOOK_ALLOW_PRIVATE", "true"),
    ("WEBHOOK_RETRY_BASE_MS", "200"),
    ("WEBHOOK_RETRY_MAX_MS", "400"),
    ("WEBHOOK_CIRCUIT_FAILURES", "1000"),
];

fn with(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut all = HOOKS.to_vec();
    all.extend_from_slice(extra);
    all
}

/// What a receiver does with a request.
#[derive(Debug, Clone)]
enum Mode {
    /// 200.
    Ok,
    /// 500 this many more times, then 200.
    Fail(u32),
    /// Never answers.
    Hang,
    /// 302 to this URL.
    Redirect(String),
}

/// One request a receiver got.
#[derive(Debug, Clone)]
struct Hit {
    id: String,
    timestamp: String,
    signature: String,
    body: Vec<u8>,
    at: Instant,
}

/// An HTTP receiver on 127.0.0.1, port 0.
#[derive(Clone)]
struct Receiver {
    url: String,
    port: u16,
    hits: Arc<Mutex<Vec<Hit>>>,
    mode: Arc<Mutex<Mode>>,
}

impl Receiver {
    async fn start(mode: Mode) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let r = Self {
            url: format!("http://{addr}/hook"),
            port: addr.port(),
            hits: Arc::default(),
            mode: Arc::new(Mutex::new(mode)),
        };
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(r.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        r
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().expect("hits").clone()
    }

    fn count(&self) -> usize {
        self.hits.lock().expect("hits").len()
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().expect("mode") = mode;
    }
}

async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> Response {
    let h = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    r.hits.lock().expect("hits").push(Hit {
        id: h("webhook-id"),
        timestamp: h("webhook-timestamp"),
        signature: h("webhook-signature"),
        body: body.to_vec(),
        at: Instant::now(),
    });
    let mode = {
        let mut m = r.mode.lock().expect("mode");
        let now = m.clone();
        if let Mode::Fail(n) = &mut *m {
            *n = n.saturating_sub(1);
        }
        now
    };
    match mode {
        Mode::Ok | Mode::Fail(0) => (StatusCode::OK, "ok").into_response(),
        Mode::Fail(_) => (StatusCode::INTERNAL_SERVER_ERROR, "no").into_response(),
        Mode::Hang => std::future::pending::<Response>().await,
        Mode::Redirect(to) => (StatusCode::FOUND, [(header::LOCATION, to)]).into_response(),
    }
}

/// Whether `hit` carries a valid Standard Webhooks signature under
/// `secret`, checked as a receiver would: HMAC-SHA256 keyed with the base64
/// after `whsec_`, over `id.timestamp.body`, compared in constant time.
fn signed_by(secret: &str, hit: &Hit) -> bool {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_").expect("whsec_"))
        .expect("base64 secret");
    hit.signature.split(' ').any(|sig| {
        let Some(given) = sig
            .strip_prefix("v1,")
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        else {
            return false;
        };
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&key).expect("key");
        mac.update(format!("{}.{}.", hit.id, hit.timestamp).as_bytes());
        mac.update(&hit.body);
        mac.verify_slice(&given).is_ok()
    })
}

/// What `api/tests/js/verify_webhook.mjs` (the README's receiver code, run
/// by Node) says of `hit` under `secret`: "valid" or "invalid".
async fn node_verifies(secret: &str, hit: &Hit) -> String {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../api/tests/js/verify_webhook.mjs"
    );
    let body = std::env::temp_dir().join(format!("penora-hook-{}.json", uuid::Uuid::new_v4()));
    std::fs::write(&body, &hit.body).expect("body written");
    let out = tokio::process::Command::new("node")
        .arg(script)
        .env("WEBHOOK_SECRET", secret)
        .env("WEBHOOK_ID", &hit.id)
        .env("WEBHOOK_TIMESTAMP", &hit.timestamp)
        .env("WEBHOOK_SIGNATURE", &hit.signature)
        .env("WEBHOOK_BODY_FILE", &body)
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!("node is needed for this test ({e}); scripts/services.sh installs it")
        });
    let _ = std::fs::remove_file(&body);
    let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_ne!(
        out.status.code(),
        Some(2),
        "the published test vector: {said}"
    );
    said
}

/// Registers an endpoint through the API; returns its id and secret.
async fn register(s: &Stack, url: &str, events: Value, app: Option<&str>) -> (String, String) {
    let mut body = json!({"url": url, "events": events, "description": "test receiver"});
    if let Some(app) = app {
        body["app"] = json!(app);
    }
    let r = s.post("/api/unified/webhooks", &body).await;
    let status = r.status();
    let answer: Value = r.json().await.expect("json");
    assert_eq!(status, 201, "{answer}");
    (
        answer["id"].as_str().expect("id").to_owned(),
        answer["secret"].as_str().expect("secret").to_owned(),
    )
}

/// Writes an event in a transaction of its own, as a change would; the
/// relay publishes it to `penora.events`. Returns its id.
async fn emit(s: &Stack, user: &str, kind: EventType, data: Value) -> String {
    let mut client = s.pool.get().await.expect("db");
    let tx = client.transaction().await.expect("tx");
    let ids = enqueue_events(
        &tx,
        &[Event {
            user_id: user,
            kind,
            data,
            correlation_id: None,
        }],
        time::OffsetDateTime::now_utc(),
    )
    .await
    .expect("event written");
    tx.commit().await.expect("commit");
    ids.into_iter().next().expect("one id")
}

/// Sends `webhook.test` to an endpoint through the API; returns its event id.
async fn send_test(s: &Stack, endpoint: &str) -> String {
    let r = s
        .post(
            &format!("/api/unified/webhooks/{endpoint}/test"),
            &json!({}),
        )
        .await;
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.expect("json");
    v["event_id"].as_str().expect("event_id").to_owned()
}

async fn state(s: &Stack, event: &str, endpoint: &str) -> String {
    let client = s.pool.get().await.expect("db");
    client
        .query_opt(
            "SELECT state FROM webhook_deliveries WHERE event_id = $1 AND endpoint_id = $2",
            &[&event, &endpoint],
        )
        .await
        .expect("query")
        .map(|r| r.get("state"))
        .unwrap_or_default()
}

/// The attempts of a delivery: (status, error), in order.
async fn attempts(s: &Stack, event: &str, endpoint: &str) -> Vec<(Option<i32>, Option<String>)> {
    let client = s.pool.get().await.expect("db");
    client
        .query(
            "SELECT status_code, error FROM webhook_attempts \
             WHERE event_id = $1 AND endpoint_id = $2 ORDER BY id",
            &[&event, &endpoint],
        )
        .await
        .expect("query")
        .iter()
        .map(|r| (r.get("status_code"), r.get("error")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_is_delivered_once_with_its_exact_envelope_and_a_valid_signature() {
    let mut s = stack(HOOKS, &[]).await;
    s.start_worker().await;
    let rx = Receiver::start(Mode::Ok).await;
    let (endpoint, secret) = register(&s, &rx.url, json!(["credits.granted"]), None).await;
    let before = time::OffsetDateTime::now_utc().unix_timestamp();
    let event = emit(
        &s,
        "u1",
        EventType::CreditsGranted,
        json!({"amount": 5, "lot_id": 7}),
    )
    .await;
    wait_for("delivered", Duration::from_secs(20), || async {
        state(&s, &event, &endpoint).await == "delivered"
    })
    .await;
    s.wait_idle().await;
    let hits = rx.hits();
    assert_eq!(hits.len(), 1, "delivered once");
    let hit = &hits[0];
    assert_eq!(hit.id, event, "webhook-id is the event id");
    let ts: i64 = hit.timestamp.parse().expect("unix seconds");
    assert!(ts >= before - 1 && ts <= before + 60, "{ts} vs {before}");
    assert!(signed_by(&secret, hit), "a receiver accepts the signature");
    let mut tampered = hit.clone();
    tampered.body.push(b' ');
    assert!(!signed_by(&secret, &tampered), "and refuses another body");
    let envelope: Value = serde_json::from_slice(&hit.body).expect("JSON body");
    let created_at = envelope["created_at"]
        .as_str()
        .expect("created_at")
        .to_owned();
    assert_eq!(
        envelope,
        json!({"id": event, "type": "credits.granted", "created_at": created_at,
               "data": {"user_id": "u1", "amount": 5, "lot_id": 7}})
    );
    assert_eq!(
        attempts(&s, &event, &endpoint).await,
        vec![(Some(200), None)]
    );
    // The README's JavaScript receiver accepts it too (and refuses it with
    // another secret).
    assert_eq!(node_verifies(&secret, hit).await, "valid");
    let other = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode([9u8; 32])
    );
    assert_eq!(node_verifies(&other, hit).await, "invalid");
    // The operator sees it.
    let out = s.ops(&["webhooks", "deliveries", &endpoint]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&event) && text.contains("delivered") && text.contains("200"),
        "{text}"
    );
    let list = s.ops(&["webhooks", "list"]).await;
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        text.contains(&endpoint) && !text.contains(&secret[6..]),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_receiver_failing_twice_gets_the_third_attempt_with_the_same_id_and_nothing_more() {
    let mut s = stack(HOOKS, &[]).await;
    s.start_worker().await;
    let rx = Receiver::start(Mode::Fail(2)).await;
    let (endpoint, secret) = register(&s, &rx.url, json!(["*"]), None).await;
    let event = send_test(&s, &endpoint).await;
    wait_for("delivered", Duration::from_secs(20), || async {
        state(&s, &event, &endpoint).await == "delivered"
    })
    .await;
    s.wait_idle().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let hits = rx.hits();
    assert_eq!(
        hits.len(),
        3,
        "two failures, one success, and nothing after"
    );
    assert!(
        hits.iter().all(|h| h.id == event),
        "the same webhook-id every time"
    );
    assert!(hits.iter().all(|h| signed_by(&secret, h)));
    let envelope: Value = serde_json::from_slice(&hits[2].body).expect("JSON");
    assert_eq!(envelope["type"], "webhook.test");
    assert_eq!(
        attempts(&s, &event, &endpoint).await,
        vec![
            (Some(500), Some("answered 500".into())),
            (Some(500), Some("answered 500".into())),
            (Some(200), None)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_receiver_that_never_answers_is_parked_after_the_window_then_replayed() {
    let mut s = stack(
        &with(&[("WEBHOOK_RETRY_SECS", "2"), ("WEBHOOK_TIMEOUT_MS", "400")]),
        &[],
    )
    .await;
    s.start_worker().await;
    let rx = Receiver::start(Mode::Hang).await;
    let (endpoint, _) = register(&s, &rx.url, json!(["*"]), None).await;
    let event = send_test(&s, &endpoint).await;
    let dead = s.topology.dead_queue(penora_domain::events::WEBHOOKS);
    wait_for("parked", Duration::from_secs(30), || async {
        s.depth(&dead).await == 1
    })
    .await;
    assert_eq!(state(&s, &event, &endpoint).await, "parked");
    let tries = attempts(&s, &event, &endpoint).await;
    assert!(tries.len() >= 2, "retried within the window: {tries:?}");
    assert!(
        tries.iter().all(|(status, e)| status.is_none()
            && e.as_deref()
                .is_some_and(|e| e.contains("no answer within 400 ms"))),
        "{tries:?}"
    );
    rx.set(Mode::Ok);
    let replay = s.ops(&["dlq", "replay", "penora.webhooks"]).await;
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    wait_for(
        "delivered after the replay",
        Duration::from_secs(20),
        || async { state(&s, &event, &endpoint).await == "delivered" },
    )
    .await;
    assert_eq!(s.depth(&dead).await, 0);
    assert!(rx.hits().iter().all(|h| h.id == event));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hanging_endpoint_does_not_delay_another_endpoints_deliveries() {
    // The contract's 10 s timeout: the hanging endpoint holds its slots
    // for all of the test.
    let mut s = stack(&with(&[("WEBHOOK_ENDPOINT_CONCURRENCY", "2")]), &[]).await;
    s.start_worker().await;
    let hanging = Receiver::start(Mode::Hang).await;
    let healthy = Receiver::start(Mode::Ok).await;
    register(&s, &hanging.url, json!(["*"]), None).await;
    register(&s, &healthy.url, json!(["*"]), None).await;
    let started = Instant::now();
    for i in 0..8 {
        emit(
            &s,
            "u1",
            EventType::BalanceLow,
            json!({"balance": i, "threshold": 10}),
        )
        .await;
    }
    wait_for(
        "the healthy endpoint got every event",
        Duration::from_secs(30),
        || async { healthy.count() == 8 },
    )
    .await;
    let last = healthy.hits().iter().map(|h| h.at).max().expect("hits");
    let took = last - started;
    assert!(
        took < Duration::from_secs(5),
        "the healthy endpoint waited {took:?} behind the hanging one"
    );
    // The hanging endpoint has had its two slots, never more.
    let held = hanging.count();
    assert!(
        (1..=2).contains(&held),
        "hanging endpoint got {held} requests at once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redirect_is_not_followed_and_counts_as_a_failure() {
    let mut s = stack(HOOKS, &[]).await;
    s.start_worker().await;
    let elsewhere = Receiver::start(Mode::Ok).await;
    let redirecting = Receiver::start(Mode::Redirect(elsewhere.url.clone())).await;
    let (endpoint, _) = register(&s, &redirecting.url, json!(["*"]), None).await;
    let event = send_test(&s, &endpoint).await;
    wait_for(
        "two attempts answered 302",
        Duration::from_secs(20),
        || async { attempts(&s, &event, &endpoint).await.len() >= 2 },
    )
    .await;
    for (status, error) in attempts(&s, &event, &endpoint).await {
        assert_eq!(status, Some(302));
        assert_eq!(error.as_deref(), Some("answered 302"));
    }
    assert_eq!(state(&s, &event, &endpoint).await, "failing");
    assert_eq!(elsewhere.count(), 0, "the redirect's target got nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn loopback_is_refused_at_registration_and_when_a_name_later_resolves_to_it() {
    // No WEBHOOK_ALLOW_PRIVATE here.
    let mut s = stack(
        &[
            ("WEBHOOK_RETRY_BASE_MS", "200"),
            ("WEBHOOK_RETRY_MAX_MS", "400"),
        ],
        &[],
    )
    .await;
    let rx = Receiver::start(Mode::Ok).await;
    for url in [
        format!("https://127.0.0.1:{}/hook", rx.port),
        format!("https://2130706433:{}/hook", rx.port),
        format!("https://[::ffff:127.0.0.1]:{}/hook", rx.port),
        format!("https://localhost:{}/hook", rx.port),
        rx.url.clone(),
    ] {
        let r = s
            .post(
                "/api/unified/webhooks",
                &json!({"url": url, "events": ["*"]}),
            )
            .await;
        let status = r.status();
        let body: Value = r.json().await.expect("json");
        assert_eq!(status, 400, "{url}: {body}");
        assert_eq!(body["code"], "invalid_request");
        assert!(
            body["error"].as_str().expect("error").starts_with("url:"),
            "{body}"
        );
    }
    // A name that does not resolve now is taken (delivery checks it on
    // every connection); the worker's resolver then answers 127.0.0.1.
    let name = "hooks.rebind.penora.invalid";
    let url = format!("https://{name}:{}/hook", rx.port);
    let (endpoint, _) = register(&s, &url, json!(["*"]), None).await;
    let resolver = Arc::new(penora_platform::webhooks::client::MapResolver::default());
    resolver.set(name, "127.0.0.1".parse().expect("ip"));
    s.start_worker_resolving(resolver.clone()).await;
    let event = send_test(&s, &endpoint).await;
    wait_for("refused attempts", Duration::from_secs(20), || async {
        attempts(&s, &event, &endpoint).await.len() >= 2
    })
    .await;
    for (status, error) in attempts(&s, &event, &endpoint).await {
        assert_eq!(status, None);
        assert!(
            error
                .as_deref()
                .is_some_and(|e| e.contains("non-public address (127.0.0.1)")),
            "{error:?}"
        );
    }
    // The IPv4-mapped form of loopback is refused the same way.
    resolver.set(name, "::ffff:127.0.0.1".parse().expect("ip"));
    let before = attempts(&s, &event, &endpoint).await.len();
    wait_for(
        "another refused attempt",
        Duration::from_secs(20),
        || async { attempts(&s, &event, &endpoint).await.len() > before },
    )
    .await;
    let last = attempts(&s, &event, &endpoint)
        .await
        .pop()
        .expect("attempt");
    assert!(last.1.is_some_and(|e| e.contains("non-public")));
    assert_eq!(rx.count(), 0, "nothing reached the loopback receiver");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_app_bound_endpoint_gets_its_apps_events_a_wildcard_all_and_a_deleted_one_none() {
    let mut s = stack(HOOKS, &[]).await;
    s.start_worker().await;
    let bound = Receiver::start(Mode::Ok).await;
    let all = Receiver::start(Mode::Ok).await;
    let gone = Receiver::start(Mode::Ok).await;
    register(
        &s,
        &bound.url,
        json!(["credits.granted"]),
        Some("imagegene"),
    )
    .await;
    register(&s, &all.url, json!(["*"]), None).await;
    let (deleted, _) = register(&s, &gone.url, json!(["*"]), None).await;
    let r = s
        .http
        .delete(format!("{}/api/unified/webhooks/{deleted}", s.base))
        .header("X-API-Key", crate::support::BOOT_KEY)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
    let ig = emit(
        &s,
        "u1",
        EventType::CreditsGranted,
        json!({"app": "imagegene", "amount": 1}),
    )
    .await;
    emit(
        &s,
        "u2",
        EventType::CreditsGranted,
        json!({"app": "penora", "amount": 1}),
    )
    .await;
    emit(
        &s,
        "u1",
        EventType::BalanceLow,
        json!({"app": "imagegene", "balance": 1}),
    )
    .await;
    emit(
        &s,
        "u3",
        EventType::ProjectSaved,
        json!({"project_id": "p1"}),
    )
    .await;
    wait_for(
        "the wildcard endpoint got all four",
        Duration::from_secs(20),
        || async { all.count() == 4 },
    )
    .await;
    s.wait_idle().await;
    let got: Vec<String> = bound.hits().iter().map(|h| h.id.clone()).collect();
    assert_eq!(got, vec![ig], "only its app's credits.granted");
    assert_eq!(gone.count(), 0, "a deleted endpoint gets nothing");
    assert_eq!(all.count(), 4, "and each event once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_is_fanned_out_once_however_often_the_fan_out_gets_it() {
    let mut s = stack(HOOKS, &[]).await;
    let rx = Receiver::start(Mode::Ok).await;
    let (endpoint, _) = register(&s, &rx.url, json!(["*"]), None).await;
    // The envelope's bytes as the relay publishes them (`payload::text`),
    // read in the transaction that writes it, before any relay can take it.
    let (event, body) = {
        let mut client = s.pool.get().await.expect("db");
        let tx = client.transaction().await.expect("tx");
        let ids = enqueue_events(
            &tx,
            &[Event {
                user_id: "u1",
                kind: EventType::CreditsExpired,
                data: json!({"amount": 3}),
                correlation_id: None,
            }],
            time::OffsetDateTime::now_utc(),
        )
        .await
        .expect("event written");
        let row = tx
            .query_one(
                "SELECT payload::text AS p FROM outbox WHERE routing_key = 'credits.expired'",
                &[],
            )
            .await
            .expect("outbox row");
        let body: String = row.get("p");
        tx.commit().await.expect("commit");
        (ids.into_iter().next().expect("id"), body)
    };
    // The same envelope published a second time to penora.events (a relay
    // that crashed between the confirm and its commit publishes again).
    let publisher = penora_platform::broker::Publisher::new(
        penora_config::Secret::new(crate::support::amqp_url()),
        "test",
        s.topology.clone(),
    );
    publisher
        .publish_all(vec![penora_platform::broker::Outgoing {
            exchange: s.topology.exchange(penora_domain::events::EXCHANGE),
            routing_key: "credits.expired".into(),
            payload: body.clone().into_bytes(),
            properties: lapin::BasicProperties::default(),
        }])
        .await
        .expect("published");
    let fanout = s.topology.queue(penora_domain::events::WEBHOOK_FANOUT);
    wait_for(
        "both copies queued for the fan-out",
        Duration::from_secs(20),
        || async { s.depth(&fanout).await == 2 },
    )
    .await;
    s.start_worker().await;
    wait_for("delivered", Duration::from_secs(20), || async {
        state(&s, &event, &endpoint).await == "delivered"
    })
    .await;
    s.wait_idle().await;
    assert_eq!(s.depth(&fanout).await, 0, "both copies fanned out");
    let rows = s
        .scalar(
            "SELECT count(*) FROM webhook_deliveries WHERE event_id = $1",
            &event,
        )
        .await;
    assert_eq!(rows, 1, "one delivery row");
    assert_eq!(rx.count(), 1, "one delivery for two copies of the event");
    assert_eq!(
        rx.hits()[0].body,
        body.as_bytes(),
        "the bytes published, exactly"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_between_fan_out_and_delivery_loses_nothing() {
    let mut s = stack(HOOKS, &[]).await;
    let rx = Receiver::start(Mode::Hang).await;
    let (endpoint, secret) = register(&s, &rx.url, json!(["*"]), None).await;
    let event = emit(
        &s,
        "u1",
        EventType::ProjectDeleted,
        json!({"project_id": "p9"}),
    )
    .await;
    let worker = s.spawn_worker_process().await;
    // Fanned out, and the delivery under way (the receiver holds it).
    wait_for(
        "the delivery reached the receiver",
        Duration::from_secs(20),
        || async { rx.count() == 1 },
    )
    .await;
    assert_eq!(state(&s, &event, &endpoint).await, "pending");
    worker.kill().await;
    rx.set(Mode::Ok);
    s.start_worker().await;
    wait_for(
        "delivered by the next worker",
        Duration::from_secs(30),
        || async { state(&s, &event, &endpoint).await == "delivered" },
    )
    .await;
    let hits = rx.hits();
    assert!(hits.len() >= 2);
    assert!(hits.iter().all(|h| h.id == event && signed_by(&secret, h)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_open_circuit_stops_attempts_for_its_cooldown_then_lets_one_try() {
    let mut s = stack(
        &[
            ("WEBHOOK_ALLOW_PRIVATE", "true"),
            ("WEBHOOK_RETRY_BASE_MS", "200"),
            ("WEBHOOK_RETRY_MAX_MS", "400"),
            ("WEBHOOK_CIRCUIT_FAILURES", "2"),
            ("WEBHOOK_CIRCUIT_COOLDOWN_MS", "1500"),
        ],
        &[],
    )
    .await;
    s.start_worker().await;
    let rx = Receiver::start(Mode::Fail(3)).await;
    let (endpoint, _) = register(&s, &rx.url, json!(["*"]), None).await;
    let event = send_test(&s, &endpoint).await;
    wait_for("delivered", Duration::from_secs(30), || async {
        state(&s, &event, &endpoint).await == "delivered"
    })
    .await;
    let at: Vec<Instant> = rx.hits().iter().map(|h| h.at).collect();
    assert_eq!(at.len(), 4, "three failures and the success");
    // Two failures open the circuit: the next attempts wait for the
    // cooldown (deferred, not attempted), then one tries, fails and opens it
    // again, and the one after the next cooldown succeeds.
    assert!(
        at[1] - at[0] < Duration::from_millis(1200),
        "{:?}",
        at[1] - at[0]
    );
    for gap in [at[2] - at[1], at[3] - at[2]] {
        assert!(
            gap >= Duration::from_millis(1400),
            "tried again after {gap:?} with the circuit open"
        );
    }
    assert_eq!(
        attempts(&s, &event, &endpoint).await.len(),
        4,
        "deferrals are not attempts"
    );
}
