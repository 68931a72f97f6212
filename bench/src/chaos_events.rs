//! Events out under faults (issue 26): a receiver subscribed to every event
//! before the chaos traffic starts, then checked against the ledger.
//!
//! The receiver answers `500` to the first arrival of one event in seven, so
//! retries happen beside the faults. After the run:
//! * every delivery's signature verifies (Standard Webhooks, computed here
//!   with the secret the registration answered, not by the service's code);
//! * every grant entry has a `credits.granted` delivered at least once, every
//!   refund entry a `credits.refunded` (same user, reservation and amount),
//!   every expire entry a `credits.expired` (entries written after the
//!   subscription: the cluster tests' own grants came before it);
//! * no event for a change that did not commit: every `credits.granted`
//!   delivered names a grant entry, every `credits.refunded` a refund entry,
//!   every `reservation.settled` a settled reservation.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};

use crate::chaos::Ctx;

/// One delivery as the receiver got it.
#[derive(Debug, Clone)]
struct Arrival {
    id: String,
    timestamp: String,
    signature: String,
    body: Bytes,
}

#[derive(Default)]
struct Got {
    arrivals: Vec<Arrival>,
    seen: HashSet<String>,
    refused: u64,
}

/// The subscribed receiver.
pub struct Receiver {
    got: Arc<Mutex<Got>>,
    secret: String,
    /// The last ledger entry written before the subscription: what came
    /// before (a cluster test's grant in the same database) owes it nothing.
    since: i64,
    server: tokio::task::JoinHandle<()>,
}

async fn receive(
    State(got): State<Arc<Mutex<Got>>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let arrival = Arrival {
        id: header("webhook-id"),
        timestamp: header("webhook-timestamp"),
        signature: header("webhook-signature"),
        body,
    };
    let Ok(mut got) = got.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR;
    };
    // The first arrival of one event in seven is refused: a retry follows.
    let first = got.seen.insert(arrival.id.clone());
    let refuse = first && arrival.id.bytes().map(u32::from).sum::<u32>() % 7 == 0;
    got.arrivals.push(arrival);
    if refuse {
        got.refused += 1;
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::NO_CONTENT
    }
}

impl Receiver {
    /// Starts a receiver on 127.0.0.1 and subscribes it to every event.
    pub async fn subscribe(ctx: &Ctx) -> anyhow::Result<Self> {
        let got = Arc::new(Mutex::new(Got::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/events", listener.local_addr()?);
        let app = Router::new()
            .route("/events", post(receive))
            .with_state(got.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let body = json!({"url": url, "events": ["*"], "description": "penora-chaos"});
        let (status, answer) = ctx
            .send(reqwest::Method::POST, "/api/unified/webhooks", Some(&body))
            .await
            .ok_or_else(|| anyhow::anyhow!("registering the chaos receiver: no answer"))?;
        anyhow::ensure!(
            status == 200 || status == 201,
            "registering the chaos receiver answered {status}: {answer} (the services need WEBHOOK_ALLOW_PRIVATE=true)"
        );
        let secret = answer["secret"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("the registration answered no secret: {answer}"))?
            .to_owned();
        let (db, connection) =
            tokio_postgres::connect(&ctx.args.services.database_url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let since: i64 = db
            .query_one("SELECT coalesce(max(id), 0) FROM ledger_entries", &[])
            .await?
            .try_get(0)?;
        eprintln!(
            "chaos: a webhook receiver at {url} is subscribed to every event (ledger entries after #{since})"
        );
        Ok(Self {
            got,
            secret,
            since,
            server,
        })
    }

    /// The checks of the module's header; returns the violations. Waits (up
    /// to two minutes) for the deliveries the ledger implies.
    pub async fn check(&self, db: &tokio_postgres::Client) -> anyhow::Result<Vec<String>> {
        let implied = Implied::read(db, self.since).await?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut missing = loop {
            let events = self.events();
            let missing = implied.missing(&events);
            if missing.is_empty() || Instant::now() > deadline {
                break missing;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let events = self.events();
        let mut violations = Vec::new();
        violations.append(&mut missing);
        violations.extend(implied.unmatched(&events));
        violations.extend(self.bad_signatures());
        let (arrivals, refused) = self
            .got
            .lock()
            .map(|g| (g.arrivals.len(), g.refused))
            .unwrap_or_default();
        let mut by_type: HashMap<String, usize> = HashMap::new();
        for e in events.values() {
            *by_type
                .entry(e["type"].as_str().unwrap_or("?").to_owned())
                .or_default() += 1;
        }
        let mut by_type: Vec<_> = by_type.into_iter().collect();
        by_type.sort();
        eprintln!(
            "chaos: webhooks: {} events received ({arrivals} deliveries, {refused} answered 500 on purpose): {by_type:?}",
            events.len()
        );
        self.server.abort();
        Ok(violations)
    }

    /// The distinct events received, by id.
    fn events(&self) -> HashMap<String, Value> {
        let got = self
            .got
            .lock()
            .map(|g| g.arrivals.clone())
            .unwrap_or_default();
        got.into_iter()
            .filter_map(|a| Some((a.id, serde_json::from_slice(&a.body).ok()?)))
            .collect()
    }

    fn bad_signatures(&self) -> Vec<String> {
        let key = self
            .secret
            .strip_prefix("whsec_")
            .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
            .unwrap_or_default();
        let got = self
            .got
            .lock()
            .map(|g| g.arrivals.clone())
            .unwrap_or_default();
        let mut bad = Vec::new();
        for a in got {
            let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(&key) else {
                bad.push("the webhook secret is no HMAC key".into());
                break;
            };
            mac.update(format!("{}.{}.", a.id, a.timestamp).as_bytes());
            mac.update(&a.body);
            let expected =
                base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
            let ok = a
                .signature
                .split(' ')
                .any(|s| s.strip_prefix("v1,") == Some(expected.as_str()));
            let body: Value = serde_json::from_slice(&a.body).unwrap_or(Value::Null);
            if !ok {
                bad.push(format!(
                    "webhook {} arrived with a signature that does not verify",
                    a.id
                ));
            } else if body["id"].as_str() != Some(a.id.as_str()) {
                bad.push(format!(
                    "webhook {}: webhook-id is not the envelope's id",
                    a.id
                ));
            }
        }
        bad
    }
}

/// What the ledger implies, read after the run.
struct Implied {
    /// (user, reference) of every grant entry after the subscription.
    grants: HashSet<(String, String)>,
    /// (user, project_code, amount) of every refund entry, with how many.
    refunds: HashMap<(String, String, i64), usize>,
    /// Users with expire entries, and how many.
    expiries: HashMap<String, usize>,
    /// (user, project_code) of every settled reservation.
    settled: HashSet<(String, String)>,
}

fn text(v: &Value, field: &str) -> String {
    match &v["data"][field] {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Implied {
    /// Reads the entries after entry `since` (an identity: one written
    /// after the subscription has a greater id).
    async fn read(db: &tokio_postgres::Client, since: i64) -> anyhow::Result<Self> {
        let mut grants = HashSet::new();
        let mut refunds: HashMap<(String, String, i64), usize> = HashMap::new();
        let mut expiries: HashMap<String, usize> = HashMap::new();
        for r in db
            .query(
                "SELECT user_id, kind, amount, coalesce(reference, ''), coalesce(project_code, '') \
                 FROM ledger_entries WHERE kind IN ('grant', 'refund', 'expire') AND id > $1",
                &[&since],
            )
            .await?
        {
            let (user, kind): (String, String) = (r.try_get(0)?, r.try_get(1)?);
            match kind.as_str() {
                "grant" => {
                    grants.insert((user, r.try_get(3)?));
                }
                "refund" => {
                    *refunds
                        .entry((user, r.try_get(4)?, r.try_get(2)?))
                        .or_default() += 1
                }
                _ => *expiries.entry(user).or_default() += 1,
            }
        }
        let mut settled = HashSet::new();
        for r in db
            .query(
                "SELECT user_id, project_code FROM reservations WHERE state = 'settled'",
                &[],
            )
            .await?
        {
            settled.insert((r.try_get(0)?, r.try_get(1)?));
        }
        Ok(Self {
            grants,
            refunds,
            expiries,
            settled,
        })
    }

    fn of_type<'a>(
        events: &'a HashMap<String, Value>,
        kind: &'a str,
    ) -> impl Iterator<Item = &'a Value> {
        events.values().filter(move |e| e["type"] == kind)
    }

    /// Changes without their event.
    fn missing(&self, events: &HashMap<String, Value>) -> Vec<String> {
        let mut out = Vec::new();
        let granted: HashSet<(String, String)> = Self::of_type(events, "credits.granted")
            .map(|e| (text(e, "user_id"), text(e, "reference")))
            .collect();
        let mut lost = self.grants.difference(&granted).count();
        if lost > 0 {
            out.push(format!(
                "{lost} grant entries have no credits.granted delivered"
            ));
        }
        let mut refunded: HashMap<(String, String, i64), usize> = HashMap::new();
        for e in Self::of_type(events, "credits.refunded") {
            let amount = e["data"]["amount"].as_i64().unwrap_or(0);
            *refunded
                .entry((text(e, "user_id"), text(e, "project_code"), amount))
                .or_default() += 1;
        }
        lost = self
            .refunds
            .iter()
            .map(|(k, n)| n.saturating_sub(*refunded.get(k).unwrap_or(&0)))
            .sum();
        if lost > 0 {
            out.push(format!(
                "{lost} refund entries have no credits.refunded delivered"
            ));
        }
        let mut expired: HashMap<String, usize> = HashMap::new();
        for e in Self::of_type(events, "credits.expired") {
            *expired.entry(text(e, "user_id")).or_default() += 1;
        }
        lost = self
            .expiries
            .iter()
            .map(|(u, n)| n.saturating_sub(*expired.get(u).unwrap_or(&0)))
            .sum();
        if lost > 0 {
            out.push(format!(
                "{lost} expire entries have no credits.expired delivered"
            ));
        }
        out
    }

    /// Events without their change.
    fn unmatched(&self, events: &HashMap<String, Value>) -> Vec<String> {
        let mut out = Vec::new();
        for e in Self::of_type(events, "credits.granted") {
            if !self
                .grants
                .contains(&(text(e, "user_id"), text(e, "reference")))
            {
                out.push(format!("credits.granted {} names no grant entry", e["id"]));
            }
        }
        for e in Self::of_type(events, "credits.refunded") {
            let amount = e["data"]["amount"].as_i64().unwrap_or(0);
            if !self
                .refunds
                .contains_key(&(text(e, "user_id"), text(e, "project_code"), amount))
            {
                out.push(format!(
                    "credits.refunded {} names no refund entry",
                    e["id"]
                ));
            }
        }
        for e in Self::of_type(events, "reservation.settled") {
            if !self
                .settled
                .contains(&(text(e, "user_id"), text(e, "project_code")))
            {
                out.push(format!(
                    "reservation.settled {} names no settled reservation",
                    e["id"]
                ));
            }
        }
        out
    }
}
