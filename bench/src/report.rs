//! The benchmark's report: the Markdown tables of docs/benchmarks.md, the
//! SVG chart, and the services' peak memory.

use crate::{
    bench::{Args, MovementPoint},
    dbwork::one_line,
    limits::{LimitsPoint, LimitsSetup},
    measure::Stats,
    workloads::DEDUCTS_BESIDE_SAVES,
};

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Row {
    pub workload: String,
    pub concurrency: usize,
    pub service: Stats,
    pub raw: Stats,
}

/// The `save` workload at one concurrency: saves with deductions beside them.
#[derive(Debug, Clone)]
pub struct SaveRow {
    pub concurrency: usize,
    pub artwork_bytes: usize,
    pub saves: Stats,
    pub raw: Stats,
    pub deduct_alone: Stats,
    pub deduct_with_saves: Stats,
}

pub fn peak_rss_mb(pid: Option<u32>) -> Option<f64> {
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

/// Everything one run measured.
pub struct Results {
    pub rows: Vec<Row>,
    pub saves: Vec<SaveRow>,
    pub refunds: Option<Row>,
    pub events: Option<crate::webhooks::EventsPoint>,
    /// The `limits` workload: the limits set, and one point per concurrency.
    pub limits: Option<(LimitsSetup, Vec<LimitsPoint>)>,
    pub movements: Vec<MovementPoint>,
    pub sustained: Vec<MovementPoint>,
    pub audit_lag: Option<(f64, i64)>,
    pub api_rss: Option<f64>,
    pub worker_rss: Option<f64>,
}

pub fn render(args: &Args, results: &Results) -> String {
    let Results {
        rows,
        saves,
        refunds,
        events,
        limits,
        movements,
        sustained,
        audit_lag,
        api_rss,
        worker_rss,
    } = results;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let date = penora_domain::timefmt::rfc3339_millis(time::OffsetDateTime::now_utc());
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
    if !movements.is_empty() {
        s.push_str(&movement_tables(movements));
    }
    if !sustained.is_empty() {
        s.push_str(&format!(
            "\n### Sustained ({:.0} s per point)\n\n",
            sustained[0].secs
        ));
        s.push_str(&movement_tables(sustained));
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
    if let Some(e) = events {
        s.push_str(&format!(
            "\n**events out**: `deduct` at 16 connections for {:.0} s with a grant every 20 ms beside it: {:.0}/s with no \
             webhook endpoint, {:.0}/s with one subscribed to every event ({:+.1} %). Event to delivery (the envelope's \
             `created_at` to its arrival at a local receiver): p50 **{:.1} ms**, p99 **{:.1} ms**, over {} events \
             ({} grants made while subscribed).\n",
            e.secs,
            e.without.per_sec,
            e.with.per_sec,
            (e.with.per_sec / e.without.per_sec.max(1e-9) - 1.0) * 100.0,
            e.p50_ms,
            e.p99_ms,
            e.delivered,
            e.granted
        ));
    }
    if let Some((setup, points)) = limits {
        s.push_str(&limits_section(setup, points));
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
        mb(*api_rss),
        mb(*worker_rss)
    ));
    s.push_str("\n![throughput and p99 against concurrency](benchmarks.svg)\n");
    s
}

/// The `limits` workload: limited against plain `deduct` per concurrency,
/// the overhead against the target, and the limited deductions' top
/// statements at the highest concurrency.
fn limits_section(setup: &LimitsSetup, points: &[LimitsPoint]) -> String {
    let us = |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.0}"));
    let Some(first) = points.first() else {
        return String::new();
    };
    let mut s = format!(
        "\n**spend limits** (issue 27; target: limits cost deductions less than 10 %): `deduct` of 1 on {} users \
         with two limits each (all apps per month, `imagegene` per day, far above what the run spends; {} limits \
         set through `PUT /limits` in {:.1} s before), beside `deduct` on as many users without a limit, in turns \
         plain, limited, limited, plain of {:.0} s each (figures: both turns). Overhead = plain ops/s ÷ limited \
         ops/s − 1, the extra time a deduction takes with limits. Database work per deduction as in the table \
         above (the worker's audit included).\n\n\
         | conns | plain ops/s | plain p50 ms | plain p99 ms | limited ops/s | limited p50 ms | limited p99 ms | \
         limited errors | **overhead** | statement µs plain | statement µs limited | commits plain / limited | \
         WAL B plain / limited |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        first.users, setup.limits, setup.secs, first.secs
    );
    for p in points {
        s.push_str(&format!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {} | **{:+.1} %** | {} | {} | {:.2} / {:.2} | {:.0} / {:.0} |\n",
            p.concurrency,
            p.plain.per_sec,
            p.plain.p50_ms,
            p.plain.p99_ms,
            p.limited.per_sec,
            p.limited.p50_ms,
            p.limited.p99_ms,
            p.limited.errors,
            p.overhead_pct(),
            us(p.plain_work.statement_us),
            us(p.limited_work.statement_us),
            p.plain_work.commits,
            p.limited_work.commits,
            p.plain_work.wal_bytes,
            p.limited_work.wal_bytes,
        ));
    }
    if let Some(top) = points.iter().max_by_key(|p| p.concurrency) {
        let met = if top.overhead_pct() < 10.0 {
            "within"
        } else {
            "**over**"
        };
        s.push_str(&format!(
            "\nLimit overhead at {} connections: **{:+.1} %** ({met} the 10 % target).\n",
            top.concurrency,
            top.overhead_pct()
        ));
        if !top.limited_work.top.is_empty() {
            s.push_str(&format!(
                "\nTop statements of the limited deductions at {} connections ({} acknowledged):\n\n\
                 | statement | total ms | calls | µs per call | µs per deduction | WAL B per deduction |\n\
                 |---|---:|---:|---:|---:|---:|\n",
                top.concurrency, top.limited_work.ops
            ));
            for t in &top.limited_work.top {
                s.push_str(&format!(
                    "| {}`{}` | {:.0} | {} | {:.0} | {:.1} | {:.0} |\n",
                    if t.toplevel { "" } else { "(inside another) " },
                    one_line(&t.query, 110),
                    t.total_ms,
                    t.calls,
                    t.total_ms * 1000.0 / t.calls.max(1) as f64,
                    t.total_ms * 1000.0 / top.limited_work.ops.max(1) as f64,
                    t.wal_bytes / top.limited_work.ops.max(1) as f64,
                ));
            }
        }
    }
    s
}

/// The end-to-end and database-work tables of the movement workloads, and
/// the top statements of the service at the highest concurrency.
fn movement_tables(points: &[MovementPoint]) -> String {
    let us = |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.0}"));
    let ratio = |a: f64, b: f64| a / b.max(1e-9);
    let mut s = String::from(
        "\n**End to end and database work per movement.** End to end = acknowledged deductions / the time until \
         every one was audited and every job published. Raw minimal = a guarded debit and one ledger row, one \
         transaction per deduction (what a pgbench script of a deduction runs), on accounts of its own. Per \
         acknowledged deduction, from `pg_stat_database` (commits), `pg_stat_wal` (WAL) and `pg_stat_statements` \
         (statement time, the benchmark's own polling left out), between snapshots taken once the services were \
         idle, so the service's figures include the worker's audit and the relay's publishing.\n\n\
         | workload | conns | service /s | p99 ms | end to end /s | raw minimal /s | ratio | e2e ratio | lag p99 ms | \
         commits | WAL B | WAL records | statement µs | raw commits | raw WAL B | raw WAL records | raw statement µs | WAL ratio |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for p in points {
        s.push_str(&format!(
            "| {} | {} | {:.0} | {:.1} | {:.0} | {:.0} | {:.2} | {:.2} | {} | {:.2} | {:.0} | {:.1} | {} | {:.2} | {:.0} | {:.1} | {} | {:.1} |\n",
            p.workload,
            p.concurrency,
            p.service.per_sec,
            p.service.p99_ms,
            p.end_to_end,
            p.minimal.per_sec,
            ratio(p.service.per_sec, p.minimal.per_sec),
            ratio(p.end_to_end, p.minimal.per_sec),
            p.lag.map_or_else(|| "n/a".to_owned(), |(ms, _)| format!("{ms:.0}")),
            p.work.commits,
            p.work.wal_bytes,
            p.work.wal_records,
            us(p.work.statement_us),
            p.minimal_work.commits,
            p.minimal_work.wal_bytes,
            p.minimal_work.wal_records,
            us(p.minimal_work.statement_us),
            ratio(p.work.wal_bytes, p.minimal_work.wal_bytes),
        ));
    }
    let max_conc = points.iter().map(|p| p.concurrency).max().unwrap_or(0);
    for p in points
        .iter()
        .filter(|p| p.concurrency == max_conc && !p.cpu.is_empty())
    {
        s.push_str(&format!(
            "\nCPU per deduction, `{}` at {} connections (µs, from `/proc`, snapshots as above; the machine's {} cores \
             are shared by all of these):\n\n| program | service | raw minimal |\n|---|---:|---:|\n",
            p.workload,
            p.concurrency,
            std::thread::available_parallelism().map_or(0, |n| n.get()),
        ));
        let mut total = (0.0, 0.0);
        for (name, us) in &p.cpu {
            let raw = p
                .minimal_cpu
                .iter()
                .find(|(n, _)| n == name)
                .map_or(0.0, |(_, v)| *v);
            total = (total.0 + us, total.1 + raw);
            s.push_str(&format!("| {name} | {us:.0} | {raw:.0} |\n"));
        }
        s.push_str(&format!("| all | {:.0} | {:.0} |\n", total.0, total.1));
    }
    for p in points
        .iter()
        .filter(|p| p.concurrency == max_conc && !p.time.is_empty())
    {
        s.push_str(&format!(
            "\nWhere a deduction's time goes, `{}` at {} connections: the client saw p50 {:.1} ms, p99 {:.1} ms; \
             inside penora-api, from its histograms (`/metrics`, read before and after the phase; p99 interpolated \
             within the histograms' buckets):\n\n| part | per | count | mean ms | p99 ms |\n|---|---|---:|---:|---:|\n",
            p.workload, p.concurrency, p.service.p50_ms, p.service.p99_ms,
        ));
        for t in &p.time {
            s.push_str(&format!(
                "| {} | {} | {:.0} | {:.2} | {:.1} |\n",
                t.what, t.per, t.count, t.mean_ms, t.p99_ms
            ));
        }
    }
    for p in points
        .iter()
        .filter(|p| p.concurrency == max_conc && !p.work.top.is_empty())
    {
        s.push_str(&format!(
            "\nTop statements of the service, `{}` at {} connections ({} acknowledged):\n\n\
             (statements run inside another, e.g. foreign-key checks, are marked: their time is also in their caller's)\n\n\
             | statement | total ms | calls | µs per call | µs per deduction | WAL B per deduction |\n|---|---:|---:|---:|---:|---:|\n",
            p.workload, p.concurrency, p.work.ops
        ));
        for t in &p.work.top {
            s.push_str(&format!(
                "| {}`{}` | {:.0} | {} | {:.0} | {:.1} | {:.0} |\n",
                if t.toplevel { "" } else { "(inside another) " },
                one_line(&t.query, 110),
                t.total_ms,
                t.calls,
                t.total_ms * 1000.0 / t.calls.max(1) as f64,
                t.total_ms * 1000.0 / p.work.ops.max(1) as f64,
                t.wal_bytes / p.work.ops.max(1) as f64,
            ));
        }
    }
    s
}

pub fn chart(path: &str, rows: &[Row]) -> anyhow::Result<()> {
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
