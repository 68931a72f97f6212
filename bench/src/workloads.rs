//! The benchmark's workloads over HTTP (deduct, hot, user-info, flow, save,
//! refunds), each beside its raw baseline, and the waits between phases
//! (until the services have caught up with what was committed).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::bail;
use deadpool_postgres::Pool;
use penora_platform::broker::{Publisher, Topology};
use serde_json::json;

use crate::{
    bench::Args,
    dbwork::MARK,
    events,
    measure::{Stats, drive, run_tag, user_of},
    raw::{raw_deduct, raw_minimal_deduct, raw_save, raw_user_info},
    report::SaveRow,
};

/// Seeds `users` users (`bench_*`), the hot account, the raw minimal
/// baseline's own users, and `limited` users for the `limits` workload
/// (`bench_lim_*`, limits set later through the API).
pub async fn seed(pool: &Pool, users: i64, limited: i64) -> anyhow::Result<()> {
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
    // Each seeded user gets a grant ledger row and its lot, so balances
    // equal ledger sums and lots.
    client
        .batch_execute(&format!(
            "INSERT INTO accounts (user_id, balance) \
               SELECT 'bench_' || i, 1000000000 FROM generate_series(0, {last}) i ON CONFLICT DO NOTHING; \
             INSERT INTO accounts (user_id, balance) VALUES ('bench_hot', 1000000000000) ON CONFLICT DO NOTHING; \
             INSERT INTO accounts (user_id, balance) \
               SELECT '{limited_prefix}' || i, 1000000000 FROM generate_series(0, {limited_last}) i ON CONFLICT DO NOTHING; \
             INSERT INTO accounts (user_id, balance) \
               SELECT 'benchmin_' || i, 1000000000 FROM generate_series(0, {last}) i ON CONFLICT DO NOTHING; \
             INSERT INTO accounts (user_id, balance) VALUES ('benchmin_hot', 1000000000000) ON CONFLICT DO NOTHING; \
             INSERT INTO ledger_entries (user_id, kind, amount, balance_after, app_name, description, reference) \
               SELECT user_id, 'grant', balance, balance, 'penora', 'benchmark seed', 'seed-' || user_id \
               FROM accounts WHERE user_id LIKE 'bench\\_%' \
             ON CONFLICT (user_id, reference) WHERE kind = 'grant' DO NOTHING; \
             INSERT INTO credit_lots (user_id, category, priority, granted, remaining, app_name, reference) \
               SELECT user_id, 'paid', 50, amount, amount, 'penora', reference FROM ledger_entries \
               WHERE kind = 'grant' AND user_id LIKE 'bench\\_%' \
             ON CONFLICT (user_id, reference) DO NOTHING; \
             INSERT INTO lot_movements (user_id, lot_id, entry_id, kind, amount) \
               SELECT l.user_id, l.lot_id, e.id, 'grant', l.granted FROM credit_lots l \
               JOIN ledger_entries e ON e.user_id = l.user_id AND e.reference = l.reference AND e.kind = 'grant' \
               WHERE l.user_id LIKE 'bench\\_%' AND NOT EXISTS ( \
                 SELECT 1 FROM lot_movements m WHERE m.user_id = l.user_id AND m.lot_id = l.lot_id); \
             ANALYZE accounts; ANALYZE ledger_entries; ANALYZE credit_lots; ANALYZE lot_movements;",
            last = users - 1,
            limited_prefix = crate::limits::LIMITED,
            limited_last = limited - 1,
        ))
        .await?;
    eprintln!(
        "seeded {users} users in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Connections deducting beside the saves.
pub const DEDUCTS_BESIDE_SAVES: usize = 16;

pub struct Ctx {
    pub args: Args,
    pub http: reqwest::Client,
    pub pool: Pool,
    pub image: String,
    pub image_bytes: Vec<u8>,
    /// A realistic 1024×1024 artwork (photo-like PNG, about 2 MB), base64.
    pub artwork: String,
    /// The WebP the service stores for it (what the raw baseline inserts).
    pub artwork_stored: Vec<u8>,
    pub artwork_png_len: usize,
}

/// One save of the 1024² artwork for `user`; the body is written without
/// going through `serde_json::Value` (2.7 MB per request).
pub async fn save_artwork(ctx: &Ctx, user: &str) -> bool {
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
pub async fn save_workload(ctx: &Arc<Ctx>, c: usize, secs: f64) -> anyhow::Result<SaveRow> {
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

pub async fn post_ok(ctx: &Ctx, path: &str, body: &serde_json::Value) -> bool {
    ctx.http
        .post(format!("{}{path}", ctx.args.api))
        .header("X-API-Key", &ctx.args.services.key)
        .json(body)
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

pub async fn get_ok(ctx: &Ctx, path: &str) -> bool {
    ctx.http
        .get(format!("{}{path}", ctx.args.api))
        .header("X-API-Key", &ctx.args.services.key)
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

pub async fn service_op(ctx: Arc<Ctx>, workload: &str, tag: &str, task: usize, i: u64) -> bool {
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

/// The raw minimal deduction for the movement workloads (`deduct`, `hot`),
/// on the minimal baseline's own users.
pub async fn raw_minimal_op(ctx: Arc<Ctx>, workload: &str, tag: &str, task: usize, i: u64) -> bool {
    let code = format!("m{tag}_{task}_{i}");
    let user = match workload {
        "hot" => "benchmin_hot".to_owned(),
        _ => user_of(task, i, ctx.args.users).replacen("bench_", "benchmin_", 1),
    };
    raw_minimal_deduct(&ctx.pool, &user, &code).await
}

/// Workloads whose every operation is a credit movement.
pub const MOVEMENTS: [&str; 2] = ["deduct", "hot"];

pub async fn raw_op(ctx: Arc<Ctx>, workload: &str, tag: &str, task: usize, i: u64) -> bool {
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
pub async fn quiesce(pool: &Pool) -> anyhow::Result<()> {
    let client = pool.get().await?;
    let started = Instant::now();
    loop {
        let row = client
            .query_one(
                &format!(
                    "{MARK} SELECT (SELECT count(*) FROM outbox WHERE published_at IS NULL) \
                        + (SELECT count(*) FROM projects WHERE status = 'queued') AS unpublished, \
                        (SELECT coalesce(sum(a.chain_seq - coalesce(c.seq, 0)), 0)::int8 FROM accounts a \
                           LEFT JOIN audit_checkpoints c ON c.user_id = a.user_id \
                         WHERE a.chain_seq > coalesce(c.seq, 0)) AS unaudited"
                ),
                &[],
            )
            .await?;
        let (unpublished, unaudited): (i64, i64) = (row.get("unpublished"), row.get("unaudited"));
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
/// The last ledger entry so far (entries after it belong to the next phase).
pub async fn last_entry(pool: &Pool) -> anyhow::Result<i64> {
    let client = pool.get().await?;
    Ok(client
        .query_one(
            &format!("{MARK} SELECT coalesce(max(id), 0) FROM ledger_entries"),
            &[],
        )
        .await?
        .get(0))
}

/// Waits until every job is published and every ledger entry after `after`
/// (the raw minimal baseline's aside) has its audit record: the end of the
/// work accepted since, for the end-to-end figure. Each poll starts at the
/// first entry the last one found unaudited, so polling stays cheap while
/// the services catch up.
pub async fn caught_up(pool: &Pool, after: i64) -> anyhow::Result<()> {
    let client = pool.get().await?;
    let started = Instant::now();
    let mut from = after + 1;
    loop {
        let row = client
            .query_one(
                &format!(
                    "{MARK} SELECT (SELECT count(*) FROM outbox WHERE published_at IS NULL) AS unpublished, \
                        (SELECT p.id FROM audit_pending p WHERE p.id >= $1 AND p.app_name <> 'benchmin' \
                         ORDER BY p.id LIMIT 1) AS unaudited"
                ),
                &[&from],
            )
            .await?;
        let unpublished: i64 = row.get("unpublished");
        let unaudited: Option<i64> = row.get("unaudited");
        if unpublished == 0 && unaudited.is_none() {
            return Ok(());
        }
        if let Some(id) = unaudited {
            from = id;
        }
        if started.elapsed() > Duration::from_secs(300) {
            anyhow::bail!(
                "the services did not catch up within 300 s ({unpublished} jobs unpublished, entry {from} unaudited)"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn audit_lag_p99(
    pool: &Pool,
    since: time::OffsetDateTime,
    watch: LagWatch,
) -> anyhow::Result<(f64, i64)> {
    let client = pool.get().await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let missing: i64 = client
            .query_one(
                &format!(
                    "{MARK} SELECT count(*) FROM audit_pending p WHERE p.created_at >= $1 \
                 AND p.app_name <> 'benchmin'"
                ),
                &[&since],
            )
            .await?
            .get(0);
        if missing == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let moves = watch.finish().await?;
    // Each link's lag: from its commit to the first checkpoint seen at or
    // past it (checkpoints polled every 50 ms: a link checked in a move the
    // poll missed is counted at the next one, up to 50 ms late).
    let rows = client
        .query(
            &format!(
                "{MARK} SELECT user_id, chain_seq, created_at FROM ledger_entries \
             WHERE created_at >= $1 AND app_name <> 'benchmin' AND chain_seq IS NOT NULL"
            ),
            &[&since],
        )
        .await?;
    let mut lags: Vec<f64> = Vec::with_capacity(rows.len());
    for r in &rows {
        let user: String = r.get(0);
        let seq: i64 = r.get(1);
        let at: time::OffsetDateTime = r.get(2);
        if let Some(checked) = moves
            .get(&user)
            .and_then(|m| m.iter().find(|(s, _)| *s >= seq).map(|(_, t)| *t))
        {
            lags.push((checked - at).as_seconds_f64().max(0.0));
        }
    }
    lags.sort_by(f64::total_cmp);
    let p99 = if lags.is_empty() {
        0.0
    } else {
        lags[((lags.len() as f64 * 0.99).ceil() as usize).clamp(1, lags.len()) - 1]
    };
    Ok((p99 * 1000.0, lags.len() as i64))
}

/// Each user's checkpoint moves: (seq, `checked_at`), in order.
type Moves = std::collections::HashMap<String, Vec<(i64, time::OffsetDateTime)>>;

/// Watches the audit checkpoints move while a phase runs: every 50 ms, the
/// checkpoints moved since the last look (their seq and `checked_at`), by
/// user, for [`audit_lag_p99`].
pub struct LagWatch {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<Moves>>,
}

impl LagWatch {
    /// Starts watching.
    pub fn start(pool: &Pool) -> Self {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let pool = pool.clone();
        let task = tokio::spawn(async move {
            let client = pool.get().await?;
            let mut moves = Moves::new();
            let mut last: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
            let mut done = false;
            // Rows moved since a second before the latest move seen (a
            // checkpoint's `checked_at` is its statement's start: it may
            // commit after a later one).
            let mut seen = time::OffsetDateTime::now_utc();
            loop {
                let from = seen - time::Duration::seconds(1);
                for r in client
                    .query(
                        &format!("{MARK} SELECT user_id, seq, checked_at FROM audit_checkpoints WHERE checked_at >= $1"),
                        &[&from],
                    )
                    .await?
                {
                    let user: String = r.get(0);
                    let seq: i64 = r.get(1);
                    let at: time::OffsetDateTime = r.get(2);
                    seen = seen.max(at);
                    if last.get(&user).is_none_or(|&l| l < seq) {
                        last.insert(user.clone(), seq);
                        moves.entry(user).or_default().push((seq, at));
                    }
                }
                if done {
                    return Ok(moves);
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    _ = stopped.changed() => { done = true; }
                }
            }
        });
        Self { stop, task }
    }

    /// Stops watching (after one last look); each user's checkpoint moves.
    async fn finish(self) -> anyhow::Result<Moves> {
        let _ = self.stop.send(true);
        self.task.await?
    }
}

/// Refunds: N reservations, N `generation.failed` events published at once,
/// time until every refund is in the balance.
pub async fn refunds(ctx: &Arc<Ctx>) -> anyhow::Result<Stats> {
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
        settings.broker.url.clone(),
        "penora-bench",
        Topology::from_settings(&settings.broker),
    );
    let topology = Topology::from_settings(&settings.broker);
    let now = penora_domain::timefmt::rfc3339_millis(time::OffsetDateTime::now_utc());
    let events: Vec<_> = (0..n)
        .map(|i| {
            events::failed(
                &topology,
                &format!("ev{tag}_{i}"),
                &format!("bench_{}", i as i64 % ctx.args.users),
                &format!("rf{tag}_{i}"),
                "bench",
                &now,
                None,
            )
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
