//! The `limits` workload (issue 27): what spend limits cost deductions.
//!
//! Before the timed part, every user of a set of its own (`bench_lim_0` …,
//! `--limit-users` of them, seeded like the others) gets two limits through
//! `PUT /limits`: all apps per month and `imagegene` per day, both far above
//! what the run can spend, so every deduction pays for judging two limits
//! and writing its day's spending, and none is refused. Then, at each
//! concurrency, `deduct` of 1 runs in turns on as many users without a limit
//! (`bench_0` …) and on the limited ones: plain, limited, limited, plain, each
//! for `secs` (the order cancels a drift of the shared machine over the
//! point), the services quiesced between turns.
//!
//! Rules:
//! * overhead = plain throughput / limited throughput − 1: the extra time a
//!   deduction takes at the same concurrency (the target: < 10 %);
//! * the database's work per deduction (statement time, commits, WAL; the
//!   worker's audit included) is read around the same turns, so the report
//!   can say where an overhead goes;
//! * a limited deduction answered anything but 2xx is an error of the
//!   point (a refusal would mean the limits were set too low).

use std::{sync::Arc, time::Instant};

use anyhow::Context as _;
use serde_json::json;

use crate::{
    dbwork::{MARK, Top, Work, between, snapshot},
    measure::{Stats, drive, run_tag, user_of},
    workloads::{Ctx, post_ok, quiesce},
};

/// The prefix of the limited users (`bench_lim_<n>`; seeded with the others).
pub const LIMITED: &str = "bench_lim_";

/// The app whose daily limit every limited user has (the one `deduct` names).
const APP: &str = "imagegene";

/// The limits every limited user gets: (app or all apps, period, max_credits).
/// Far above what a run spends (balances are 10^9): they never refuse.
const LIMITS: [(Option<&str>, &str, i64); 2] = [
    (None, "month", 1_000_000_000_000),
    (Some(APP), "day", 1_000_000_000_000),
];

/// The `limits` workload at one concurrency.
#[derive(Debug, Clone)]
pub struct LimitsPoint {
    pub concurrency: usize,
    /// Seconds per turn (two turns each).
    pub secs: f64,
    /// Users in each set.
    pub users: i64,
    /// Deductions on users without a limit (both turns).
    pub plain: Stats,
    /// Deductions on users with two limits each (both turns).
    pub limited: Stats,
    pub plain_work: Work,
    pub limited_work: Work,
}

impl LimitsPoint {
    /// Plain throughput / limited throughput − 1, in %.
    pub fn overhead_pct(&self) -> f64 {
        (self.plain.per_sec / self.limited.per_sec.max(1e-9) - 1.0) * 100.0
    }
}

/// The limits set before the points, and how long setting them took.
#[derive(Debug, Clone, Copy)]
pub struct LimitsSetup {
    pub users: i64,
    pub limits: u64,
    pub secs: f64,
}

/// The name of limited user `n`.
fn limited_user(n: i64) -> String {
    format!("{LIMITED}{n}")
}

/// `PUT /limits` with `body`; the answer's status and body.
async fn put_limit(ctx: &Ctx, body: &serde_json::Value) -> anyhow::Result<()> {
    let answer = ctx
        .http
        .put(format!("{}/api/unified/limits", ctx.args.api))
        .header("X-API-Key", &ctx.args.services.key)
        .json(body)
        .send()
        .await
        .context("PUT /limits")?;
    let status = answer.status();
    if status.is_success() {
        return Ok(());
    }
    let text = answer.text().await.unwrap_or_default();
    anyhow::bail!("PUT /limits {body} answered {status}: {text}")
}

/// Gives every limited user its two limits through the API (64 connections),
/// then warms the limited path up and analyzes the limit tables, so that the
/// services' prepared statements are not planned against empty tables.
pub async fn set_limits(ctx: &Arc<Ctx>) -> anyhow::Result<LimitsSetup> {
    let users = ctx.args.limit_users;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..64i64 {
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = t;
            while n < users {
                for (app, period, max) in LIMITS {
                    let body = json!({"user_id": limited_user(n), "app_name": app, "period": period, "max_credits": max});
                    put_limit(&ctx, &body).await?;
                }
                n += 64;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await.context("a task setting limits")??;
    }
    let setup = LimitsSetup {
        users,
        limits: users as u64 * LIMITS.len() as u64,
        secs: started.elapsed().as_secs_f64(),
    };
    eprintln!(
        "   limits: {} limits set on {users} users through the API in {:.1} s",
        setup.limits, setup.secs
    );
    let c = ctx.args.concurrency.iter().copied().max().unwrap_or(64);
    turn(ctx, true, c, 2.0).await;
    quiesce(&ctx.pool).await?;
    ctx.pool
        .get()
        .await?
        .batch_execute(&format!("{MARK} ANALYZE spend_limits; ANALYZE spend_days"))
        .await?;
    Ok(setup)
}

/// One turn of `deduct` of 1 at `c` connections for `secs`, on the limited
/// users or on as many plain ones.
async fn turn(ctx: &Arc<Ctx>, limited: bool, c: usize, secs: f64) -> Stats {
    let tag = run_tag();
    let users = ctx.args.limit_users;
    let ctx = ctx.clone();
    drive(c, secs, move |task, i| {
        let ctx = ctx.clone();
        let code = format!("l{tag}_{task}_{i}");
        async move {
            let user = user_of(task, i, users);
            let user = if limited {
                user.replacen("bench_", LIMITED, 1)
            } else {
                user
            };
            post_ok(
                &ctx,
                "/api/unified/deduct-credits",
                &json!({"user_id": user, "amount": 1, "app_name": APP, "project_code": code}),
            )
            .await
        }
    })
    .await
}

/// Two turns' figures as one: operations and errors added, rates and
/// percentiles averaged (the turns are equally long).
fn both(a: Stats, b: Stats) -> Stats {
    Stats {
        ops: a.ops + b.ops,
        errors: a.errors + b.errors,
        per_sec: (a.per_sec + b.per_sec) / 2.0,
        p50_ms: (a.p50_ms + b.p50_ms) / 2.0,
        p99_ms: (a.p99_ms + b.p99_ms) / 2.0,
        p999_ms: (a.p999_ms + b.p999_ms) / 2.0,
    }
}

/// Two phases' database work as one, per operation of both.
fn both_work(a: Work, b: Work) -> Work {
    let ops = a.ops + b.ops;
    let (wa, wb) = (
        a.ops as f64 / ops.max(1) as f64,
        b.ops as f64 / ops.max(1) as f64,
    );
    let mut top: Vec<Top> = a.top;
    for t in b.top {
        match top
            .iter_mut()
            .find(|x| x.query == t.query && x.toplevel == t.toplevel)
        {
            Some(x) => {
                x.calls += t.calls;
                x.total_ms += t.total_ms;
                x.wal_bytes += t.wal_bytes;
            }
            None => top.push(t),
        }
    }
    top.sort_by(|x, y| y.total_ms.total_cmp(&x.total_ms));
    top.truncate(crate::dbwork::TOP);
    Work {
        ops,
        commits: a.commits * wa + b.commits * wb,
        wal_bytes: a.wal_bytes * wa + b.wal_bytes * wb,
        wal_records: a.wal_records * wa + b.wal_records * wb,
        statement_us: a
            .statement_us
            .zip(b.statement_us)
            .map(|(x, y)| x * wa + y * wb),
        top,
    }
}

/// Runs the workload at `c` connections (see the module's header); the
/// limits are set.
pub async fn limits_point(ctx: &Arc<Ctx>, c: usize, secs: f64) -> anyhow::Result<LimitsPoint> {
    quiesce(&ctx.pool).await?;
    let s0 = snapshot(&ctx.pool).await?;
    let plain1 = turn(ctx, false, c, secs).await;
    quiesce(&ctx.pool).await?;
    let s1 = snapshot(&ctx.pool).await?;
    let limited1 = turn(ctx, true, c, secs).await;
    quiesce(&ctx.pool).await?;
    let limited2 = turn(ctx, true, c, secs).await;
    quiesce(&ctx.pool).await?;
    let s2 = snapshot(&ctx.pool).await?;
    let plain2 = turn(ctx, false, c, secs).await;
    quiesce(&ctx.pool).await?;
    let s3 = snapshot(&ctx.pool).await?;
    let plain_work = both_work(between(&s0, &s1, plain1.ops), between(&s2, &s3, plain2.ops));
    let limited = both(limited1, limited2);
    let point = LimitsPoint {
        concurrency: c,
        secs,
        users: ctx.args.limit_users,
        plain: both(plain1, plain2),
        limited,
        plain_work,
        limited_work: between(&s1, &s2, limited.ops),
    };
    let us = |w: &Work| w.statement_us.map_or("n/a".into(), |v| format!("{v:.0}"));
    eprintln!(
        "   limits x{c:<3} deduct {:.0}/s (p99 {:.2} ms) plain, {:.0}/s (p99 {:.2} ms, {} errors) with 2 limits: \
         overhead {:+.1} % | statements {} µs vs {} µs, WAL {:.0} B vs {:.0} B per deduction",
        point.plain.per_sec,
        point.plain.p99_ms,
        point.limited.per_sec,
        point.limited.p99_ms,
        point.limited.errors,
        point.overhead_pct(),
        us(&point.plain_work),
        us(&point.limited_work),
        point.plain_work.wal_bytes,
        point.limited_work.wal_bytes,
    );
    Ok(point)
}
