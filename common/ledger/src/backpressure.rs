//! Backpressure on the audit: new deductions wait, then are refused, while
//! the audit runs more than `AUDIT_LAG_LIMIT_MS` behind the ledger.
//!
//! The lag is the commit-to-audit lag the audit writers see: each worker
//! notes, for every batch of records it commits, how long ago the oldest of
//! their ledger entries was committed ([`observe`]), and reports the largest
//! such lag of each quarter second to `audit_lag` ([`report_loop`]: one small
//! row per worker, written only while it records). Each API process reads the
//! largest report younger than [`FRESH`] four times a second ([`watch_loop`])
//! into an [`AuditLag`], which the deduction route consults. A worker with
//! nothing to record stops reporting and its report goes stale: an idle
//! audit is no backlog. (A worker that is down does not report either: that
//! is an outage, which the queue-depth alert covers, not a load to shed.)

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

/// How often workers report and API processes read.
pub const PERIOD: Duration = Duration::from_millis(250);

/// A report older than this no longer counts.
pub const FRESH: Duration = Duration::from_millis(1500);

/// No lag observed since the last report.
const NONE: u64 = u64::MAX;

/// The largest lag (ms) observed by this process since its last report.
static OBSERVED: AtomicU64 = AtomicU64::new(NONE);

/// Notes that a batch of audit records was committed whose oldest ledger
/// entry was committed `lag` ago.
pub fn observe(lag: Duration) {
    let ms = u64::try_from(lag.as_millis()).unwrap_or(NONE - 1);
    metrics::histogram!("penora_audit_lag_seconds").record(lag.as_secs_f64());
    let _ = OBSERVED.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(if v == NONE { ms } else { v.max(ms) })
    });
}

/// Writes this worker's largest observed lag to `audit_lag` every
/// [`PERIOD`] in which it recorded anything, until `stop` fires; rows of
/// workers gone for an hour are removed.
pub async fn report_loop(pool: Pool, worker: String, stop: CancellationToken) {
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(PERIOD) => {}
        }
        ticks += 1;
        let observed = OBSERVED.swap(NONE, Ordering::Relaxed);
        let cleanup = ticks.is_multiple_of(240);
        if observed == NONE && !cleanup {
            continue;
        }
        let Ok(client) = pool.get().await else {
            continue;
        };
        if observed != NONE {
            let lag = i64::try_from(observed).unwrap_or(i64::MAX);
            if let Err(e) = client
                .execute(
                    "INSERT INTO audit_lag (worker, lag_ms, reported_at) VALUES ($1, $2, now()) \
                     ON CONFLICT (worker) DO UPDATE SET lag_ms = $2, reported_at = now()",
                    &[&worker, &lag],
                )
                .await
            {
                tracing::debug!(error = %e, "reporting the audit lag failed");
            }
        }
        if cleanup {
            let _ = client
                .execute(
                    "DELETE FROM audit_lag WHERE reported_at < now() - interval '1 hour'",
                    &[],
                )
                .await;
        }
    }
}

/// The audit lag as an API process last read it.
#[derive(Debug, Clone, Default)]
pub struct AuditLag(Arc<AtomicU64>);

impl AuditLag {
    /// The lag, in milliseconds (0 when no worker reports one).
    pub fn millis(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Sets the lag (what [`watch_loop`] read).
    pub fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::Relaxed);
        metrics::gauge!("penora_audit_backlog_lag_seconds").set(ms as f64 / 1000.0);
    }
}

/// Reads the largest fresh report into `lag` every [`PERIOD`] until `stop`
/// fires. When the database cannot be read, the last figure stands.
pub async fn watch_loop(pool: Pool, lag: AuditLag, stop: CancellationToken) {
    let fresh = FRESH.as_secs_f64();
    loop {
        if let Ok(client) = pool.get().await
            && let Ok(row) = client
                .query_one(
                    "SELECT coalesce(max(lag_ms), 0) FROM audit_lag \
                     WHERE reported_at > now() - make_interval(secs => $1)",
                    &[&fresh],
                )
                .await
        {
            lag.set(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0));
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(PERIOD) => {}
        }
    }
}
