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
    measure::{drive, run_tag},
    raw::raw_broker,
    report::{Row, chart, peak_rss_mb, render},
    services,
    workloads::{Ctx, audit_lag_p99, quiesce, raw_op, refunds, save_workload, seed, service_op},
};

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
        default_value = "deduct,hot,user-info,flow,save,refunds"
    )]
    pub workloads: Vec<String>,
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
}

/// Runs the tool with `args`.
pub async fn run(args: Args) -> anyhow::Result<()> {
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
        chart(path, &rows).with_context(|| format!("drawing {path}"))?;
    }
    Ok(())
}
