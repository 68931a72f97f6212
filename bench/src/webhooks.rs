//! The `events` workload (issue 26): what events out cost deductions, and how
//! long an event takes from its commit to a subscribed receiver.
//!
//! Two phases of `secs` each, back to back on the same data: `deduct` at 16
//! connections with a stream of grants beside it (one every 20 ms, each a
//! `credits.granted` event), first with no webhook endpoint, then with one
//! subscribed to every event (`["*"]`), a local receiver answering 204. The
//! figures: deductions per second in each phase, and the receiver's latency
//! from the envelope's `created_at` (stamped in the movement's transaction)
//! to its arrival, p50 and p99 over every event it got. Deductions emit no
//! event here (the seeded balances never cross a threshold), so the phase
//! difference is what the subscribed endpoint's deliveries cost beside them.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use axum::{Router, body::Bytes, extract::State, http::HeaderMap, routing::post};
use serde_json::json;

use crate::{
    measure::{Stats, drive, histogram, run_tag},
    workloads::{Ctx, post_ok, quiesce, service_op},
};

/// The figures of the `events` workload.
#[derive(Debug, Clone, Copy)]
pub struct EventsPoint {
    /// Seconds per phase.
    pub secs: f64,
    /// Deductions at 16 connections without an endpoint.
    pub without: Stats,
    /// The same with an endpoint subscribed to every event.
    pub with: Stats,
    /// Events the receiver got (first deliveries).
    pub delivered: u64,
    /// Grants made while subscribed (events the receiver must get).
    pub granted: u64,
    /// Event-to-delivery latency, ms.
    pub p50_ms: f64,
    pub p99_ms: f64,
}

const CONNECTIONS: usize = 16;

#[derive(Default)]
struct Seen {
    ids: std::collections::HashSet<String>,
    latencies_us: Vec<u64>,
}

async fn receive(
    State(seen): State<Arc<Mutex<Seen>>>,
    headers: HeaderMap,
    body: Bytes,
) -> &'static str {
    let arrived = time::OffsetDateTime::now_utc();
    let id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let created = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["created_at"].as_str().map(str::to_owned))
        .and_then(|t| {
            time::OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339).ok()
        });
    if let Ok(mut s) = seen.lock()
        && s.ids.insert(id)
        && let Some(created) = created
    {
        s.latencies_us
            .push((arrived - created).whole_microseconds().max(1) as u64);
    }
    ""
}

/// Deductions at 16 connections for `secs`, and a grant every 20 ms beside
/// them; returns the deductions' figures and the grants made.
async fn deduct_with_grants(ctx: &Arc<Ctx>, secs: f64) -> (Stats, u64) {
    let tag = run_tag();
    let stop = Arc::new(AtomicBool::new(false));
    let grants = {
        let (ctx, stop, tag) = (ctx.clone(), stop.clone(), tag.clone());
        tokio::spawn(async move {
            let mut made = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let body = json!({"user_id": format!("bench_ev_{}", made % 1000), "amount": 5,
                                  "reason": "bench", "reference": format!("ev{tag}_{made}")});
                if post_ok(&ctx, "/api/unified/add-credits", &body).await {
                    made += 1;
                }
            }
            made
        })
    };
    let c2 = ctx.clone();
    let stats = drive(CONNECTIONS, secs, move |task, i| {
        let (ctx, t) = (c2.clone(), tag.clone());
        async move { service_op(ctx, "deduct", &t, task, i).await }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    (stats, grants.await.unwrap_or(0))
}

/// Runs the workload (see the module's header).
pub async fn events_workload(ctx: &Arc<Ctx>, secs: f64) -> anyhow::Result<EventsPoint> {
    quiesce(&ctx.pool).await?;
    let (without, _) = deduct_with_grants(ctx, secs).await;
    quiesce(&ctx.pool).await?;

    let seen = Arc::new(Mutex::new(Seen::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let app = Router::new()
        .route("/hook", post(receive))
        .with_state(seen.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let answer = ctx
        .http
        .post(format!("{}/api/unified/webhooks", ctx.args.api))
        .header("X-API-Key", &ctx.args.services.key)
        .json(&json!({"url": url, "events": ["*"], "description": "penora-bench"}))
        .send()
        .await?;
    let status = answer.status();
    let body: serde_json::Value = answer.json().await.unwrap_or_default();
    anyhow::ensure!(
        status.is_success(),
        "registering the bench's webhook answered {status}: {body} (the services need WEBHOOK_ALLOW_PRIVATE=true)"
    );
    let endpoint = body["id"]
        .as_str()
        .context("the webhook registration answered no id")?
        .to_owned();

    let (with, granted) = deduct_with_grants(ctx, secs).await;
    // Every grant's event reaches the receiver (or the wait gives up).
    let waited = Instant::now();
    loop {
        let got = seen.lock().map(|s| s.ids.len() as u64).unwrap_or(0);
        if got >= granted || waited.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = ctx
        .http
        .delete(format!("{}/api/unified/webhooks/{endpoint}", ctx.args.api))
        .header("X-API-Key", &ctx.args.services.key)
        .send()
        .await;
    server.abort();
    let (delivered, mut h) = {
        let s = seen
            .lock()
            .map_err(|_| anyhow::anyhow!("receiver poisoned"))?;
        let mut h = histogram();
        for &l in &s.latencies_us {
            let _ = h.record(l.min(120_000_000));
        }
        (s.ids.len() as u64, h)
    };
    if h.is_empty() {
        let _ = h.record(1);
    }
    let point = EventsPoint {
        secs,
        without,
        with,
        delivered,
        granted,
        p50_ms: h.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
    };
    eprintln!(
        "   events x{CONNECTIONS}: deduct {:.0}/s without an endpoint, {:.0}/s with one subscribed ({:+.1} %); \
         {} of {} grant events delivered, event to delivery p50 {:.1} ms p99 {:.1} ms",
        without.per_sec,
        with.per_sec,
        (with.per_sec / without.per_sec.max(1e-9) - 1.0) * 100.0,
        delivered,
        granted,
        point.p50_ms,
        point.p99_ms
    );
    Ok(point)
}
