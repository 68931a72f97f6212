//! `penora-bench`: measures Penora Credits against raw PostgreSQL and
//! RabbitMQ, in one run and on the same data.
//!
//! For each workload and concurrency it drives the service over HTTP
//! (keep-alive connections, one task per connection, back to back for a fixed
//! time) and then the same SQL transactions straight against PostgreSQL with
//! the same concurrency, and reports throughput, latency percentiles (from an
//! HDR histogram) and the ratio service/raw. `scripts/bench.sh` starts
//! everything and calls it; it is not part of the test suite.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use clap::Parser;

use crate::{
    dbwork::{Cpu, Work, between, snapshot},
    measure::{drive, run_tag},
    raw::raw_broker,
    report::{Results, Row, chart, peak_rss_mb, render},
    services,
    workloads::{
        Ctx, MOVEMENTS, audit_lag_p99, caught_up, last_entry, quiesce, raw_minimal_op, raw_op,
        refunds, save_workload, seed, service_op,
    },
};

/// A movement workload at one concurrency, measured end to end and in
/// database work, beside the raw minimal deduction.
#[derive(Debug, Clone)]
pub struct MovementPoint {
    pub workload: String,
    pub concurrency: usize,
    pub secs: f64,
    pub service: crate::measure::Stats,
    /// Acknowledged operations per second until every one was audited and
    /// every job published.
    pub end_to_end: f64,
    pub work: Work,
    pub minimal: crate::measure::Stats,
    pub minimal_work: Work,
    /// Commit-to-audit lag p99 (ms) and the entries it covers.
    pub lag: Option<(f64, i64)>,
    /// CPU µs per deduction of each program, service then raw minimal.
    pub cpu: Vec<(String, f64)>,
    pub minimal_cpu: Vec<(String, f64)>,
    /// Where a deduction's time went inside penora-api (its histograms).
    pub time: Vec<crate::apitime::Part>,
}

/// Gives the fresh database the history of one in service: a few seconds of
/// deductions through the service (spread and on the hot account), audited,
/// then `ANALYZE`. Without it, the services' prepared statements are planned
/// against empty tables (reservations, audit heads and records, outbox) and
/// keep those plans, sequential scans, until autovacuum first analyzes the
/// tables, up to a minute later: the first phases would measure that.
async fn warm_up(ctx: &Arc<Ctx>, c: usize) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let tag = run_tag();
    for w in MOVEMENTS {
        let (c2, t2) = (ctx.clone(), tag.clone());
        drive(c, 2.0, move |task, i| {
            let (ctx, t) = (c2.clone(), t2.clone());
            async move { service_op(ctx, w, &t, task, i).await }
        })
        .await;
    }
    quiesce(&ctx.pool).await?;
    ctx.pool
        .get()
        .await?
        .batch_execute(&format!("{} ANALYZE", crate::dbwork::MARK))
        .await?;
    eprintln!(
        "warmed up and analyzed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Runs `workload` through the service for `secs` at `c` connections and
/// waits until its work is audited and its jobs published (end to end), then
/// the raw minimal deduction as long, each between snapshots of the
/// database's counters. The caller has quiesced the services.
async fn movement_point(
    ctx: &Arc<Ctx>,
    workload: &str,
    c: usize,
    secs: f64,
) -> anyhow::Result<MovementPoint> {
    let tag = run_tag();
    let first = last_entry(&ctx.pool).await?;
    let before = snapshot(&ctx.pool).await?;
    let cpu_before = Cpu::now();
    let since = time::OffsetDateTime::now_utc();
    let watch = crate::workloads::LagWatch::start(&ctx.pool);
    let scraped = crate::apitime::scrape(ctx).await;
    let started = std::time::Instant::now();
    let (c2, w2, t2) = (ctx.clone(), workload.to_owned(), tag.clone());
    let service = drive(c, secs, move |task, i| {
        let (ctx, w, t) = (c2.clone(), w2.clone(), t2.clone());
        async move { service_op(ctx, &w, &t, task, i).await }
    })
    .await;
    let time = crate::apitime::between(&scraped, &crate::apitime::scrape(ctx).await);
    caught_up(&ctx.pool, first).await?;
    let end_to_end = service.ops as f64 / started.elapsed().as_secs_f64();
    let lag = Some(audit_lag_p99(&ctx.pool, since, watch).await?);
    let after = snapshot(&ctx.pool).await?;
    let cpu_after = Cpu::now();
    let (c2, w2, t2) = (ctx.clone(), workload.to_owned(), tag);
    let minimal = drive(c, secs, move |task, i| {
        let (ctx, w, t) = (c2.clone(), w2.clone(), t2.clone());
        async move { raw_minimal_op(ctx, &w, &t, task, i).await }
    })
    .await;
    let minimal_after = snapshot(&ctx.pool).await?;
    let cpu_minimal = Cpu::now();
    let point = MovementPoint {
        workload: workload.to_owned(),
        concurrency: c,
        secs,
        service,
        end_to_end,
        work: between(&before, &after, service.ops),
        minimal,
        minimal_work: between(&after, &minimal_after, minimal.ops),
        lag,
        cpu: cpu_before.per_op(&cpu_after, service.ops),
        minimal_cpu: cpu_after.per_op(&cpu_minimal, minimal.ops),
        time,
    };
    eprintln!(
        "{workload:>9} x{c:<3} {secs:.0} s: service {:.0}/s, end to end {:.0}/s, raw minimal {:.0}/s | per movement: \
         WAL {:.0} B ({:.1} records) vs {:.0} B, statements {} µs vs {} µs, commits {:.2} vs {:.2}",
        service.per_sec,
        end_to_end,
        minimal.per_sec,
        point.work.wal_bytes,
        point.work.wal_records,
        point.minimal_work.wal_bytes,
        point
            .work
            .statement_us
            .map_or("n/a".into(), |v| format!("{v:.0}")),
        point
            .minimal_work
            .statement_us
            .map_or("n/a".into(), |v| format!("{v:.0}")),
        point.work.commits,
        point.minimal_work.commits,
    );
    eprintln!(
        "{:>9} client p50 {:.1} ms, p99 {:.1} ms | in penora-api (mean / p99 ms): {}",
        "",
        service.p50_ms,
        service.p99_ms,
        point
            .time
            .iter()
            .map(|p| format!(
                "{} {:.1}/{:.1} ({:.0})",
                p.short, p.mean_ms, p.p99_ms, p.count
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(point)
}

#[derive(Parser, Debug)]
#[command(
    name = "penora-bench",
    args_override_self = true,
    about = "Benchmark Penora Credits against raw PostgreSQL and RabbitMQ"
)]
pub struct Args {
    /// The API's base URL.
    #[arg(long)]
    pub api: String,
    #[command(flatten)]
    pub services: services::Services,
    /// Users to seed.
    #[arg(long, default_value_t = 100_000)]
    pub users: i64,
    /// Seconds per workload and concurrency.
    #[arg(long, default_value_t = 10.0)]
    pub secs: f64,
    /// Concurrencies (keep-alive connections).
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub concurrency: Vec<usize>,
    /// Workloads to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "deduct,limits,hot,user-info,flow,save,refunds,events"
    )]
    pub workloads: Vec<String>,
    /// Users of the `limits` workload: as many with two spend limits each
    /// (`bench_lim_*`), and as many without (`bench_*`).
    #[arg(long, default_value_t = 10_000)]
    pub limit_users: i64,
    /// Concurrencies of the `save` workload (each with 16 deducting
    /// connections beside it).
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    pub save_concurrency: Vec<usize>,
    /// generation.failed events published at once in the refunds workload.
    #[arg(long, default_value_t = 5000)]
    pub refund_events: usize,
    /// PID of penora-api (for its peak RSS).
    #[arg(long)]
    pub api_pid: Option<u32>,
    /// PID of penora-worker (for its peak RSS).
    #[arg(long)]
    pub worker_pid: Option<u32>,
    /// The cgroup the services' image threads joined (for the report).
    #[arg(long, default_value = "none")]
    pub image_cgroup: String,
    /// Write the report here (Markdown).
    #[arg(long)]
    pub markdown: Option<String>,
    /// Write the chart here (SVG).
    #[arg(long)]
    pub svg: Option<String>,
    /// The command that ran this benchmark, for the report.
    #[arg(long, default_value = "scripts/bench.sh")]
    pub command: String,
    /// Seconds of the sustained points (`deduct` and `hot` at the highest
    /// concurrency, measured end to end); 0 runs none.
    #[arg(long, default_value_t = 0.0)]
    pub sustained_secs: f64,
    /// No warm-up and no `ANALYZE` before the first phase: what a new
    /// deployment's first seconds see (plans made on empty tables).
    #[arg(long)]
    pub no_warm_up: bool,
}

/// Runs the tool with `args`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let max_conc = args.concurrency.iter().copied().max().unwrap_or(64);
    let pool =
        penora_store::pool_with(&args.services.database_url, max_conc + 4, 5000).context("pool")?;
    seed(&pool, args.users, args.limit_users)
        .await
        .context("seeding")?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(max_conc)
        .timeout(Duration::from_secs(30))
        .build()?;
    // The flow's image: a real small artwork (a PNG header over filler
    // bytes was once enough; the API now decodes what it stores).
    let image_bytes = penora_workspace::imaging::samples::photo_like_png(96, 96, 2);
    let image = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(&image_bytes)
    };
    let artwork_bytes = penora_workspace::imaging::samples::photo_like_png(1024, 1024, 1);
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
        artwork_stored: penora_workspace::imaging::prepare(
            artwork_bytes,
            &penora_workspace::imaging::StoragePolicy {
                reencode: true,
                quality: 85.0,
                max_pixels: 1 << 24,
            },
        )?
        .data,
    });
    if ctx.args.no_warm_up {
        eprintln!("no warm-up: the first phase runs on a database without statistics");
    } else {
        warm_up(&ctx, max_conc).await?;
    }
    let mut rows = Vec::new();
    let mut save_rows = Vec::new();
    let mut audit_lag: Option<(f64, i64)> = None;
    let mut movements = Vec::new();
    let mut refund_row = None;
    let mut events_row = None;
    let mut limits = None;
    for w in &workloads {
        if w == "limits" {
            let setup = crate::limits::set_limits(&ctx).await?;
            let mut points = Vec::new();
            for &c in &concurrency {
                points.push(crate::limits::limits_point(&ctx, c, secs).await?);
            }
            limits = Some((setup, points));
            continue;
        }
        if w == "save" {
            for &c in &ctx.args.save_concurrency.clone() {
                save_rows.push(save_workload(&ctx, c, secs).await?);
            }
            continue;
        }
        if w == "events" {
            events_row = Some(crate::webhooks::events_workload(&ctx, secs).await?);
            continue;
        }
        if w == "refunds" {
            quiesce(&ctx.pool).await?;
            let service = refunds(&ctx).await?;
            let raw = raw_broker(&ctx.args.services, ctx.args.refund_events).await?;
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
            let service = if MOVEMENTS.contains(&w.as_str()) {
                let point = movement_point(&ctx, w, c, secs).await?;
                if w == "deduct" && c == max_conc {
                    audit_lag = point.lag;
                }
                let service = point.service;
                movements.push(point);
                service
            } else {
                let (c2, w2, t2) = (ctx.clone(), w.clone(), tag.clone());
                drive(c, secs, move |task, i| {
                    let (ctx, w, t) = (c2.clone(), w2.clone(), t2.clone());
                    async move { service_op(ctx, &w, &t, task, i).await }
                })
                .await
            };
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
    let mut sustained = Vec::new();
    if ctx.args.sustained_secs > 0.0 {
        for w in MOVEMENTS {
            if workloads.iter().any(|x| x == w) {
                quiesce(&ctx.pool).await?;
                sustained.push(movement_point(&ctx, w, max_conc, ctx.args.sustained_secs).await?);
            }
        }
    }
    let api_rss = peak_rss_mb(ctx.args.api_pid);
    let worker_rss = peak_rss_mb(ctx.args.worker_pid);
    let results = Results {
        rows,
        saves: save_rows,
        refunds: refund_row,
        events: events_row,
        limits,
        movements,
        sustained,
        audit_lag,
        api_rss,
        worker_rss,
    };
    let report = render(&ctx.args, &results);
    println!("{report}");
    if let Some(path) = &ctx.args.markdown {
        // What a change cost, measured before and after it, is kept beside
        // the report (docs/benchmarks-changes.md) and follows every run's
        // tables.
        let changes = std::path::Path::new(path).with_file_name("benchmarks-changes.md");
        let report = match std::fs::read_to_string(&changes) {
            Ok(kept) => format!("{report}\n{kept}"),
            Err(_) => report,
        };
        std::fs::write(path, &report).with_context(|| format!("writing {path}"))?;
    }
    if let Some(path) = &ctx.args.svg {
        chart(path, &results.rows).with_context(|| format!("drawing {path}"))?;
    }
    Ok(())
}
