//! `penora-bench`: measures Penora Credits against raw PostgreSQL and
//! RabbitMQ, in one run and on the same data.
//!
//! For each workload and concurrency it drives the service over HTTP
//! (keep-alive connections, one task per connection, back to back for a fixed
//! time) and then the same SQL transactions straight against PostgreSQL with
//! the same concurrency, and reports throughput, latency percentiles (from an
//! HDR histogram) and the ratio service/raw. `scripts/bench.sh` starts
//! everything and calls it; it is not part of the test suite.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Parser;
use deadpool_postgres::Pool;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use lapin::{
    BasicProperties,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    },
    types::FieldTable,
};
use penora_common::broker::{Outgoing, Publisher, Topology};
use serde_json::json;

mod shared;

#[derive(Parser, Debug)]
#[command(
    name = "penora-bench",
    args_override_self = true,
    about = "Benchmark Penora Credits against raw PostgreSQL and RabbitMQ"
)]
struct Args {
    /// The API's base URL.
    #[arg(long)]
    api: String,
    #[command(flatten)]
    services: shared::Services,
    /// Users to seed.
    #[arg(long, default_value_t = 100_000)]
    users: i64,
    /// Seconds per workload and concurrency.
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// Concurrencies (keep-alive connections).
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<usize>,
    /// Workloads to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "deduct,hot,user-info,flow,save,refunds"
    )]
    workloads: Vec<String>,
    /// Concurrencies of the `save` workload (each with 16 deducting
    /// connections beside it).
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    save_concurrency: Vec<usize>,
    /// generation.failed events published at once in the refunds workload.
    #[arg(long, default_value_t = 5000)]
    refund_events: usize,
    /// PID of penora-api (for its peak RSS).
    #[arg(long)]
    api_pid: Option<u32>,
    /// PID of penora-worker (for its peak RSS).
    #[arg(long)]
    worker_pid: Option<u32>,
    /// The cgroup the services' image threads joined (for the report).
    #[arg(long, default_value = "none")]
    image_cgroup: String,
    /// Write the report here (Markdown).
    #[arg(long)]
    markdown: Option<String>,
    /// Write the chart here (SVG).
    #[arg(long)]
    svg: Option<String>,
    /// The command that ran this benchmark, for the report.
    #[arg(long, default_value = "scripts/bench.sh")]
    command: String,
}

/// Throughput and latency of one run.
#[derive(Debug, Clone, Copy, Default)]
struct Stats {
    ops: u64,
    errors: u64,
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
}

/// One line of the report.
#[derive(Debug, Clone)]
struct Row {
    workload: String,
    concurrency: usize,
    service: Stats,
    raw: Stats,
}

/// Latencies in microseconds, 1 µs to 120 s, 3 significant figures.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid histogram bounds")
}

fn stats(h: &Histogram<u64>, ops: u64, errors: u64, elapsed: Duration) -> Stats {
    Stats {
        ops,
        errors,
        per_sec: ops as f64 / elapsed.as_secs_f64(),
        p50_ms: h.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
        p999_ms: h.value_at_quantile(0.999) as f64 / 1000.0,
    }
}

/// Runs `op` back to back from `concurrency` tasks for `secs`; `op(task, i)`
/// returns whether it succeeded.
async fn drive<F, Fut>(concurrency: usize, secs: f64, op: F) -> Stats
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let (op, stop) = (op.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            let (mut ok, mut err) = (0u64, 0u64);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let good = op(t, i).await;
                let _ = h.record(t0.elapsed().as_micros() as u64);
                if good {
                    ok += 1;
                } else {
                    err += 1;
                }
                i += 1;
            }
            (h, ok, err)
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = histogram();
    let (mut ok, mut err) = (0, 0);
    for t in tasks {
        if let Ok((h, o, e)) = t.await {
            let _ = all.add(&h);
            ok += o;
            err += e;
        }
    }
    stats(&all, ok, err, started.elapsed())
}

static RUN: AtomicU64 = AtomicU64::new(0);

/// A unique tag per run, so project codes never repeat.
fn run_tag() -> String {
    let n = RUN.fetch_add(1, Ordering::Relaxed);
    format!("{}{n}", &uuid::Uuid::new_v4().simple().to_string()[..6])
}

fn user_of(task: usize, i: u64, users: i64) -> String {
    // A cheap spread over all users (multiplicative hashing).
    let x =
        (task as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    format!("bench_{}", (x % users.max(1) as u64))
}

async fn seed(pool: &Pool, users: i64) -> anyhow::Result<()> {
    let client = pool.get().await?;
    let have: i64 = client
        .query_one(
            "SELECT count(*) FROM accounts WHERE user_id LIKE 'bench\\_%'",
            &[],
        )
        .await?
        .get(0);
    if have > users {
        return Ok(());
    }
    let started = Instant::now();
    // Each seeded user gets a grant ledger row, so balances equal ledger sums.
    client
        .batch_execute(&format!(
            "INSERT INTO accounts (user_id, balance) \
               SELECT 'bench_' || i, 1000000000 FROM generate_series(0, {last}) i ON CONFLICT DO NOTHING; \
             INSERT INTO accounts (user_id, balance) VALUES ('bench_hot', 1000000000000) ON CONFLICT DO NOTHING; \
             INSERT INTO ledger_entries (user_id, kind, amount, balance_after, app_name, description, reference) \
               SELECT user_id, 'grant', balance, balance, 'penora', 'benchmark seed', 'seed-' || user_id \
               FROM accounts WHERE user_id LIKE 'bench\\_%' \
             ON CONFLICT (reference) WHERE kind = 'grant' DO NOTHING; \
             ANALYZE accounts; ANALYZE ledger_entries;",
            last = users - 1
        ))
        .await?;
    eprintln!(
        "seeded {users} users in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The raw baseline of a deduction: a hand-written transaction doing the same
/// work as the service (a guarded debit, one reservation, one ledger row, one
/// outbox row), one statement each.
const RAW_DEBIT_SQL: &str = "UPDATE accounts SET balance = balance - $2, updated_at = now() \
     WHERE user_id = $1 AND balance >= $2 RETURNING balance";
const RAW_CLAIM_SQL: &str = "INSERT INTO reservations \
       (app_name, project_code, user_id, amount, description, balance_after_deduct, refundable_until) \
     VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7)) \
     ON CONFLICT (app_name, project_code) DO NOTHING \
     RETURNING created_at, refundable_until";
const RAW_ENTRY_SQL: &str = "INSERT INTO ledger_entries \
       (user_id, kind, amount, balance_after, app_name, description, project_code, reference) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id, created_at";

/// One raw deduction (see [`RAW_DEBIT_SQL`]).
async fn raw_deduct(pool: &Pool, user: &str, code: &str) -> bool {
    let Ok(mut client) = pool.get().await else {
        return false;
    };
    let result: Result<bool, tokio_postgres::Error> = async {
        let tx = client.transaction().await?;
        let debit = tx
            .prepare_cached(RAW_DEBIT_SQL)
            .await?;
        let Some(row) = tx.query_opt(&debit, &[&user, &1i64]).await? else { return Ok(false) };
        let balance: i64 = row.get(0);
        let claim = tx
            .prepare_cached(RAW_CLAIM_SQL)
            .await?;
        let desc: Option<&str> = None;
        if tx
            .query_opt(&claim, &[&"benchraw", &code, &user, &1i64, &desc, &balance, &3600f64])
            .await?
            .is_none()
        {
            return Ok(false);
        }
        let entry = tx
            .prepare_cached(RAW_ENTRY_SQL)
            .await?;
            let reference: Option<&str> = None;
        let id: i64 = tx
            .query_one(&entry, &[&user, &"deduct", &-1i64, &balance, &"benchraw", &desc, &code, &reference])
            .await?
            .get(0);
        let outbox = tx
            .prepare_cached(penora_common::outbox::INSERT_SQL)
            .await?;
        let payload = json!({"entry_id": id, "user_id": user, "kind": "deduct", "amount": -1, "balance_after": balance});
        let corr: Option<&str> = None;
        tx.execute(
            &outbox,
            &[&user, &"penora.jobs", &"penora.ledger-audit", &uuid::Uuid::now_v7(), &corr, &payload],
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }
    .await;
    result.unwrap_or(false)
}

/// The statement of `user-info` (`ledger::account_summary`).
async fn raw_user_info(pool: &Pool, user: &str) -> bool {
    let Ok(client) = pool.get().await else {
        return false;
    };
    let Ok(stmt) = client
        .prepare_cached(penora_common::ledger::ACCOUNT_SUMMARY_SQL)
        .await
    else {
        return false;
    };
    client
        .query_opt(&stmt, &[&user])
        .await
        .is_ok_and(|r| r.is_some())
}

/// The statements of `projects::save` (quota update, project, content, outbox).
async fn raw_save(pool: &Pool, user: &str, data: &[u8]) -> bool {
    let Ok(mut client) = pool.get().await else {
        return false;
    };
    let result: Result<bool, tokio_postgres::Error> = async {
        let tx = client.transaction().await?;
        let size = data.len() as i64;
        let reserve = tx
            .prepare_cached(penora_common::projects::RESERVE_STORAGE_SQL)
            .await?;
        if tx.query_opt(&reserve, &[&user, &size, &1_048_576i64]).await?.is_none() {
            return Ok(false);
        }
        let id = uuid::Uuid::now_v7();
        let code: Option<&str> = None;
        let insert = tx
            .prepare_cached(penora_common::projects::INSERT_PROJECT_SQL)
            .await?;
        tx.query_opt(&insert, &[&user, &id, &"benchraw", &"ai_artwork", &"bench", &size, &json!({}), &code, &size])
            .await?;
        let content = tx
            .prepare_cached(penora_common::projects::INSERT_CONTENT_SQL)
            .await?;
        let url: Option<&str> = None;
        let info = penora_common::imaging::probe(data).ok();
        let etag = penora_common::projects::etag_of(data);
        tx.execute(
            &content,
            &[
                &user,
                &id,
                &data,
                &url,
                &info.map(|i| i.media_type),
                &info.map(|i| i.width as i32),
                &info.map(|i| i.height as i32),
                &etag,
            ],
        )
        .await?;
        let outbox = tx
            .prepare_cached(penora_common::outbox::INSERT_SQL)
            .await?;
        let corr: Option<&str> = None;
        let payload = json!({"user_id": user, "project_id": id, "app_source": "benchraw", "project_code": null});
        tx.execute(&outbox, &[&user, &"penora.jobs", &"penora.save-project", &uuid::Uuid::now_v7(), &corr, &payload])
            .await?;
        tx.commit().await?;
        Ok(true)
    }
    .await;
    result.unwrap_or(false)
}

/// The `save` workload at one concurrency: saves with deductions beside them.
#[derive(Debug, Clone)]
struct SaveRow {
    concurrency: usize,
    artwork_bytes: usize,
    saves: Stats,
    raw: Stats,
    deduct_alone: Stats,
    deduct_with_saves: Stats,
}

/// Connections deducting beside the saves.
const DEDUCTS_BESIDE_SAVES: usize = 16;

struct Ctx {
    args: Args,
    http: reqwest::Client,
    pool: Pool,
    image: String,
    image_bytes: Vec<u8>,
    /// A realistic 1024×1024 artwork (photo-like PNG, about 2 MB), base64.
    artwork: String,
    /// The WebP the service stores for it (what the raw baseline inserts).
    artwork_stored: Vec<u8>,
    artwork_png_len: usize,
}

/// One save of the 1024² artwork for `user`; the body is written without
/// going through `serde_json::Value` (2.7 MB per request).
async fn save_artwork(ctx: &Ctx, user: &str) -> bool {
    let body = format!(
        r#"{{"user_id":"{user}","app_source":"imagegene","project_type":"ai_artwork","title":"bench","content":"{}"}}"#,
        ctx.artwork
    );
    ctx.http
        .post(format!("{}/api/unified/save-project", ctx.args.api))
        .header("X-API-Key", &ctx.args.services.key)
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

/// The `save` workload at `c` connections: 16 deducting connections alone,
/// then the same beside `c` saving connections, then raw inserts of the
/// same PNG (no image work).
async fn save_workload(ctx: &Arc<Ctx>, c: usize, secs: f64) -> anyhow::Result<SaveRow> {
    let deducts = |ctx: Arc<Ctx>| {
        let tag = run_tag();
        drive(DEDUCTS_BESIDE_SAVES, secs, move |task, i| {
            let (ctx, t) = (ctx.clone(), tag.clone());
            async move { service_op(ctx, "deduct", &t, task, i).await }
        })
    };
    quiesce(&ctx.pool).await?;
    let deduct_alone = deducts(ctx.clone()).await;
    quiesce(&ctx.pool).await?;
    let c2 = ctx.clone();
    let saves = drive(c, secs, move |task, i| {
        let ctx = c2.clone();
        async move { save_artwork(&ctx, &user_of(task + 7919, i, ctx.args.users)).await }
    });
    let (saves, deduct_with_saves) = tokio::join!(saves, deducts(ctx.clone()));
    quiesce(&ctx.pool).await?;
    let c2 = ctx.clone();
    let raw = drive(c, secs, move |task, i| {
        let ctx = c2.clone();
        async move {
            raw_save(
                &ctx.pool,
                &user_of(task + 7919, i, ctx.args.users),
                &ctx.artwork_stored,
            )
            .await
        }
    })
    .await;
    eprintln!(
        "     save x{c:<3} {:>6.1} saves/s p99 {:>7.1} ms ({} refused) | deduct x{DEDUCTS_BESIDE_SAVES} p99 alone {:.2} ms, beside saves {:.2} ms | raw insert {:.0}/s",
        saves.per_sec,
        saves.p99_ms,
        saves.errors,
        deduct_alone.p99_ms,
        deduct_with_saves.p99_ms,
        raw.per_sec
    );
    Ok(SaveRow {
        concurrency: c,
        artwork_bytes: ctx.artwork_png_len,
        saves,
        raw,
        deduct_alone,
        deduct_with_saves,
    })
}

async fn post_ok(ctx: &Ctx, path: &str, body: &serde_json::Value) -> bool {
    ctx.http
        .post(format!("{}{path}", ctx.args.api))
        .header("X-API-Key", &ctx.args.services.key)
        .json(body)
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

async fn get_ok(ctx: &Ctx, path: &str) -> bool {
    ctx.http
        .get(format!("{}{path}", ctx.args.api))
        .header("X-API-Key", &ctx.args.services.key)
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

async fn service_op(ctx: Arc<Ctx>, workload: &str, tag: &str, task: usize, i: u64) -> bool {
    let users = ctx.args.users;
    let code = format!("b{tag}_{task}_{i}");
    match workload {
        "deduct" => {
            let user = user_of(task, i, users);
            post_ok(&ctx, "/api/unified/deduct-credits", &json!({"user_id": user, "amount": 1, "app_name": "imagegene", "project_code": code})).await
        }
        "hot" => post_ok(&ctx, "/api/unified/deduct-credits", &json!({"user_id": "bench_hot", "amount": 1, "app_name": "imagegene", "project_code": code})).await,
        "user-info" => get_ok(&ctx, &format!("/api/unified/user-info?user_id={}", user_of(task, i, users))).await,
        "flow" => {
            let user = user_of(task, i, users);
            get_ok(&ctx, &format!("/api/unified/user-info?user_id={user}")).await
                && post_ok(&ctx, "/api/unified/deduct-credits", &json!({"user_id": user, "amount": 5, "app_name": "imagegene", "project_code": code})).await
                && post_ok(
                    &ctx,
                    "/api/unified/save-project",
                    &json!({"user_id": user, "app_source": "imagegene", "project_type": "ai_artwork",
                            "title": "bench", "content": ctx.image, "project_code": code}),
                )
                .await
        }
        _ => false,
    }
}

async fn raw_op(ctx: Arc<Ctx>, workload: &str, tag: &str, task: usize, i: u64) -> bool {
    let users = ctx.args.users;
    let code = format!("r{tag}_{task}_{i}");
    match workload {
        "deduct" => raw_deduct(&ctx.pool, &user_of(task, i, users), &code).await,
        "hot" => raw_deduct(&ctx.pool, "bench_hot", &code).await,
        "user-info" => raw_user_info(&ctx.pool, &user_of(task, i, users)).await,
        "flow" => {
            let user = user_of(task, i, users);
            raw_user_info(&ctx.pool, &user).await
                && raw_deduct(&ctx.pool, &user, &code).await
                && raw_save(&ctx.pool, &user, &ctx.image_bytes).await
        }
        _ => false,
    }
}

/// Waits until the services have caught up with everything committed so far
/// (every outbox row published, every ledger entry but the seed's grants
/// audited), so that one
/// phase's background work does not run during the next phase's measurement.
/// The raw baseline writes the same outbox rows as the service, so the
/// services relay and audit them too.
async fn quiesce(pool: &Pool) -> anyhow::Result<()> {
    let client = pool.get().await?;
    let started = Instant::now();
    loop {
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM outbox WHERE published_at IS NULL) \
                        + (SELECT count(*) FROM projects WHERE status = 'queued'), \
                        (SELECT count(*) FROM ledger_entries WHERE description IS DISTINCT FROM 'benchmark seed') \
                        - (SELECT count(*) FROM audit_records)",
                &[],
            )
            .await?;
        let (unpublished, unaudited): (i64, i64) = (row.get(0), row.get(1));
        if unpublished == 0 && unaudited <= 0 {
            break;
        }
        if started.elapsed() > Duration::from_secs(300) {
            eprintln!(
                "bench: services still behind after 300 s ({unpublished} unpublished or queued saves, {unaudited} unaudited); going on"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if started.elapsed() > Duration::from_secs(1) {
        eprintln!(
            "bench: waited {:.1} s for the services to catch up",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// p99 of the time from a ledger entry's commit to its audit record, for
/// entries created since `since` (waits until they are all audited).
async fn audit_lag_p99(pool: &Pool, since: time::OffsetDateTime) -> anyhow::Result<(f64, i64)> {
    let client = pool.get().await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let missing: i64 = client
            .query_one(
                "SELECT count(*) FROM ledger_entries l WHERE l.created_at >= $1 \
                 AND NOT EXISTS (SELECT 1 FROM audit_records a WHERE a.entry_id = l.id)",
                &[&since],
            )
            .await?
            .get(0);
        if missing == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let row = client
        .query_one(
            "SELECT coalesce(percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM a.created_at - l.created_at)), 0)::float8, count(*) \
             FROM ledger_entries l JOIN audit_records a ON a.entry_id = l.id WHERE l.created_at >= $1",
            &[&since],
        )
        .await?;
    Ok((row.get::<_, f64>(0) * 1000.0, row.get(1)))
}

/// Refunds: N reservations, N `generation.failed` events published at once,
/// time until every refund is in the balance.
async fn refunds(ctx: &Arc<Ctx>) -> anyhow::Result<Stats> {
    let n = ctx.args.refund_events;
    let tag = run_tag();
    // The reservations, made through the API at 64 connections.
    let made = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..64usize {
        let (ctx, made, tag) = (ctx.clone(), made.clone(), tag.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = t;
            while i < n {
                let user = format!("bench_{}", i as i64 % ctx.args.users);
                if post_ok(&ctx, "/api/unified/deduct-credits", &json!({"user_id": user, "amount": 1, "app_name": "imagegene", "project_code": format!("rf{tag}_{i}")})).await {
                    made.fetch_add(1, Ordering::Relaxed);
                }
                i += 64;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let settings = ctx.args.services.settings()?;
    let publisher = Publisher::new(
        settings.amqp_url.clone(),
        "penora-bench",
        Topology::from_settings(&settings),
    );
    let topology = Topology::from_settings(&settings);
    let now = penora_common::timefmt::rfc3339_millis(time::OffsetDateTime::now_utc());
    let events: Vec<Outgoing> = (0..n)
        .map(|i| Outgoing {
            exchange: topology.exchange("imagegene.events"),
            routing_key: "generation.failed".into(),
            payload: json!({"event_id": format!("ev{tag}_{i}"), "user_id": format!("bench_{}", i as i64 % ctx.args.users),
                            "project_code": format!("rf{tag}_{i}"), "reason": "bench", "occurred_at": now})
            .to_string()
            .into_bytes(),
            properties: BasicProperties::default().with_content_type("application/json".into()),
        })
        .collect();
    let client = ctx.pool.get().await?;
    let pattern = format!("rf{tag}\\_%");
    let started = Instant::now();
    publisher.publish_all(events).await?;
    let published = started.elapsed();
    loop {
        let done: i64 = client
            .query_one(
                "SELECT count(*) FROM reservations WHERE app_name = 'imagegene' AND project_code LIKE $1 AND state = 'refunded'",
                &[&pattern],
            )
            .await?
            .get(0);
        if done as u64 >= made.load(Ordering::Relaxed) {
            break;
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("refunds did not finish within 300 s ({done} of {n})");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    eprintln!(
        "refunds: published {n} events in {:.0} ms",
        published.as_secs_f64() * 1000.0
    );
    let done = made.load(Ordering::Relaxed);
    Ok(Stats {
        ops: done,
        errors: n as u64 - done,
        per_sec: done as f64 / elapsed.as_secs_f64(),
        ..Stats::default()
    })
}

/// Raw RabbitMQ: N messages of the events' size published with confirms to a
/// queue of our own and consumed with acks.
async fn raw_broker(ctx: &Arc<Ctx>) -> anyhow::Result<Stats> {
    let n = ctx.args.refund_events;
    let conn =
        penora_common::broker::connect(&ctx.args.services.amqp_url, "penora-bench-raw").await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let queue = format!("{}bench-raw-{}", ctx.args.services.prefix, run_tag());
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        queue.clone().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await?;
    let body = json!({"event_id": "ev0000000000_0000", "user_id": "bench_12345", "project_code": "rf000000000_0000",
                      "reason": "bench", "occurred_at": "2026-11-24T06:00:00.000Z"})
    .to_string();
    let consumer_ch = conn.create_channel().await?;
    consumer_ch.basic_qos(64, Default::default()).await?;
    let mut consumer = consumer_ch
        .basic_consume(
            queue.clone().into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let started = Instant::now();
    let mut confirms = Vec::with_capacity(n);
    for _ in 0..n {
        confirms.push(
            ch.basic_publish(
                "".into(),
                queue.clone().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?,
        );
    }
    for c in confirms {
        c.await?;
    }
    let mut got = 0;
    while got < n {
        match tokio::time::timeout(Duration::from_secs(30), consumer.next()).await {
            Ok(Some(Ok(d))) => {
                d.ack(BasicAckOptions::default()).await?;
                got += 1;
            }
            _ => bail!("raw consumer stalled at {got} of {n}"),
        }
    }
    let elapsed = started.elapsed();
    let _ = ch
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "bye".into()).await;
    Ok(Stats {
        ops: n as u64,
        per_sec: n as f64 / elapsed.as_secs_f64(),
        ..Stats::default()
    })
}

fn peak_rss_mb(pid: Option<u32>) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let max_conc = args.concurrency.iter().copied().max().unwrap_or(64);
    let pool = penora_common::db::pool_with(&args.services.database_url, max_conc + 4, 5000)
        .context("pool")?;
    seed(&pool, args.users).await.context("seeding")?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(max_conc)
        .timeout(Duration::from_secs(30))
        .build()?;
    // The flow's image: a real small artwork (a PNG header over filler
    // bytes was once enough; the API now decodes what it stores).
    let image_bytes = penora_common::imaging::samples::photo_like_png(96, 96, 2);
    let image = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(&image_bytes)
    };
    let artwork_bytes = penora_common::imaging::samples::photo_like_png(1024, 1024, 1);
    let artwork = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(&artwork_bytes)
    };
    eprintln!(
        "flow image: {} bytes of PNG; save artwork: {} bytes of PNG",
        image_bytes.len(),
        artwork_bytes.len()
    );
    let workloads = args.workloads.clone();
    let concurrency = args.concurrency.clone();
    let secs = args.secs;
    let ctx = Arc::new(Ctx {
        args,
        http,
        pool,
        image,
        image_bytes,
        artwork,
        artwork_png_len: artwork_bytes.len(),
        artwork_stored: penora_common::imaging::prepare(
            artwork_bytes,
            &penora_common::imaging::StoragePolicy {
                reencode: true,
                quality: 85.0,
                max_pixels: 1 << 24,
            },
        )?
        .data,
    });
    let mut rows = Vec::new();
    let mut save_rows = Vec::new();
    let mut audit_lag: Option<(f64, i64)> = None;
    let mut refund_row = None;
    for w in &workloads {
        if w == "save" {
            for &c in &ctx.args.save_concurrency.clone() {
                save_rows.push(save_workload(&ctx, c, secs).await?);
            }
            continue;
        }
        if w == "refunds" {
            quiesce(&ctx.pool).await?;
            let service = refunds(&ctx).await?;
            let raw = raw_broker(&ctx).await?;
            eprintln!(
                "refunds: service {:.0} events/s, raw RabbitMQ {:.0} msgs/s",
                service.per_sec, raw.per_sec
            );
            refund_row = Some(Row {
                workload: "refunds".into(),
                concurrency: 0,
                service,
                raw,
            });
            continue;
        }
        for &c in &concurrency {
            let tag = run_tag();
            quiesce(&ctx.pool).await?;
            let since = time::OffsetDateTime::now_utc();
            let (c2, w2, t2) = (ctx.clone(), w.clone(), tag.clone());
            let service = drive(c, secs, move |task, i| {
                let (ctx, w, t) = (c2.clone(), w2.clone(), t2.clone());
                async move { service_op(ctx, &w, &t, task, i).await }
            })
            .await;
            if w == "deduct" && c == max_conc {
                audit_lag = Some(audit_lag_p99(&ctx.pool, since).await?);
            }
            quiesce(&ctx.pool).await?;
            let (c2, w2, t2) = (ctx.clone(), w.clone(), tag.clone());
            let raw = drive(c, secs, move |task, i| {
                let (ctx, w, t) = (c2.clone(), w2.clone(), t2.clone());
                async move { raw_op(ctx, &w, &t, task, i).await }
            })
            .await;
            eprintln!(
                "{w:>9} x{c:<3} service {:>8.0}/s p99 {:>7.2} ms | raw {:>8.0}/s p99 {:>7.2} ms | ratio {:.2}",
                service.per_sec,
                service.p99_ms,
                raw.per_sec,
                raw.p99_ms,
                service.per_sec / raw.per_sec.max(1e-9)
            );
            rows.push(Row {
                workload: w.clone(),
                concurrency: c,
                service,
                raw,
            });
        }
    }
    let api_rss = peak_rss_mb(ctx.args.api_pid);
    let worker_rss = peak_rss_mb(ctx.args.worker_pid);
    let report = render(
        &ctx.args,
        &rows,
        &save_rows,
        refund_row.as_ref(),
        audit_lag,
        api_rss,
        worker_rss,
    );
    println!("{report}");
    if let Some(path) = &ctx.args.markdown {
        std::fs::write(path, &report).with_context(|| format!("writing {path}"))?;
    }
    if let Some(path) = &ctx.args.svg {
        chart(path, &rows).with_context(|| format!("drawing {path}"))?;
    }
    Ok(())
}

fn render(
    args: &Args,
    rows: &[Row],
    saves: &[SaveRow],
    refunds: Option<&Row>,
    audit_lag: Option<(f64, i64)>,
    api_rss: Option<f64>,
    worker_rss: Option<f64>,
) -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let date = penora_common::timefmt::rfc3339_millis(time::OffsetDateTime::now_utc());
    let mut s = String::new();
    s.push_str("# Benchmarks\n\n");
    s.push_str(&format!(
        "Measured {date} on this machine: {cores} cores, load generator, service, PostgreSQL and RabbitMQ sharing them. \
         {} users seeded; {} s per workload and concurrency; release builds.\n\nCommand: `{}`\n\n",
        args.users, args.secs, args.command
    ));
    s.push_str("Service = over HTTP through penora-api (keep-alive connections). Raw = the SQL transaction the service \
                runs for one request alone, straight against PostgreSQL with tokio-postgres and prepared statements, \
                one transaction per operation, same concurrency, same data (under load the service puts concurrent \
                deductions, refunds and audit records into shared transactions, and answers concurrent user-info \
                reads with one statement: that is where it catches up with or beats raw). \
                Ratio = service throughput / raw throughput.\n\n\
                How these figures got here, step by step with before and after: [performance.md](performance.md).\n\n");
    s.push_str("| workload | conns | service ops/s | p50 ms | p99 ms | p99.9 ms | errors | raw ops/s | raw p99 ms | ratio |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {:.0} | {:.2} | {:.2} |\n",
            r.workload,
            r.concurrency,
            r.service.per_sec,
            r.service.p50_ms,
            r.service.p99_ms,
            r.service.p999_ms,
            r.service.errors,
            r.raw.per_sec,
            r.raw.p99_ms,
            r.service.per_sec / r.raw.per_sec.max(1e-9)
        ));
    }
    if !saves.is_empty() {
        s.push_str(&format!(
            "\n**save**: a realistic 1024×1024 artwork (photo-like PNG, {} bytes) saved over and over, each by another user; \
             the API stores it as WebP (decode + encode on its image threads at nice 19). Beside the saving connections, \
             {DEDUCTS_BESIDE_SAVES} connections deduct; their p99 is compared with the same {DEDUCTS_BESIDE_SAVES} connections \
             deducting alone just before. Raw = inserting the WebP the service stores for it straight into PostgreSQL (no image work). \
             Refused = answered other than 202 (`503 busy` when every save slot stayed taken). \
             The image threads' cgroup (`IMAGE_CPU_CGROUP`): `{}`.\n\n\
             | save conns | saves/s | save p50 ms | save p99 ms | refused | deduct p99 alone ms | deduct p99 beside saves ms | change | raw inserts/s |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            saves[0].artwork_bytes,
            args.image_cgroup
        ));
        for r in saves {
            s.push_str(&format!(
                "| {} | {:.1} | {:.0} | {:.0} | {} | {:.2} | {:.2} | {:+.0} % | {:.0} |\n",
                r.concurrency,
                r.saves.per_sec,
                r.saves.p50_ms,
                r.saves.p99_ms,
                r.saves.errors,
                r.deduct_alone.p99_ms,
                r.deduct_with_saves.p99_ms,
                (r.deduct_with_saves.p99_ms / r.deduct_alone.p99_ms.max(1e-9) - 1.0) * 100.0,
                r.raw.per_sec
            ));
        }
    }
    if let Some(r) = refunds {
        s.push_str(&format!(
            "\n**refunds**: {} `generation.failed` events published at once; every refund in the balance at **{:.0} events/s** \
             end to end. Raw RabbitMQ publish-with-confirms + consume-with-ack of as many messages of the same size \
             (one quorum queue): {:.0} messages/s (ratio {:.2}).\n",
            r.service.ops,
            r.service.per_sec,
            r.raw.per_sec,
            r.service.per_sec / r.raw.per_sec.max(1e-9)
        ));
    }
    if let Some((p99, n)) = audit_lag {
        s.push_str(&format!(
            "\n**commit-to-audit lag** under the `deduct` load at the highest concurrency: p99 **{p99:.0} ms** over {n} ledger entries \
             (ledger entry created → its audit record created).\n"
        ));
    }
    let mb = |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.0} MB"));
    s.push_str(&format!(
        "\n**peak RSS** (VmHWM at the end of the run): penora-api {}, penora-worker {}.\n",
        mb(api_rss),
        mb(worker_rss)
    ));
    s.push_str("\n![throughput and p99 against concurrency](benchmarks.svg)\n");
    s
}

fn chart(path: &str, rows: &[Row]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1200, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(600);
    let workloads: Vec<String> = {
        let mut w: Vec<String> = rows.iter().map(|r| r.workload.clone()).collect();
        w.dedup();
        w
    };
    let concs: Vec<usize> = {
        let mut c: Vec<usize> = rows.iter().map(|r| r.concurrency).collect();
        c.sort_unstable();
        c.dedup();
        c
    };
    let x_of = |c: usize| concs.iter().position(|&x| x == c).unwrap_or(0) as f64;
    let colors = [RED, BLUE, GREEN, MAGENTA, CYAN];
    for (area, title, value) in [
        (&left, "throughput (ops/s, log) vs connections", 0usize),
        (&right, "p99 latency (ms, log) vs connections", 1usize),
    ] {
        let pick = |s: &Stats| if value == 0 { s.per_sec } else { s.p99_ms };
        let max_y = rows
            .iter()
            .flat_map(|r| [pick(&r.service), pick(&r.raw)])
            .fold(1.0f64, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(60)
            // Log scale: throughputs span 100 to 30,000/s, latencies 0.3 to 500 ms.
            .build_cartesian_2d(
                -0.2f64..(concs.len() as f64 - 0.8),
                (0.1f64..max_y).log_scale(),
            )?;
        chart
            .configure_mesh()
            .x_labels(concs.len())
            .x_label_formatter(&|x| {
                concs
                    .get(x.round().max(0.0) as usize)
                    .map_or_else(String::new, |c| c.to_string())
            })
            .draw()?;
        for (i, w) in workloads.iter().enumerate() {
            let color = colors[i % colors.len()];
            let pts = |raw: bool| -> Vec<(f64, f64)> {
                rows.iter()
                    .filter(|r| &r.workload == w)
                    .map(|r| {
                        (
                            x_of(r.concurrency),
                            pick(if raw { &r.raw } else { &r.service }),
                        )
                    })
                    .collect()
            };
            chart
                .draw_series(LineSeries::new(pts(false), color.stroke_width(2)))?
                .label(format!("{w} (service)"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
            chart
                .draw_series(LineSeries::new(pts(true), color.mix(0.4).stroke_width(1)))?
                .label(format!("{w} (raw)"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.mix(0.4)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
