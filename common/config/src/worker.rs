//! `Worker`: what only `penora-worker` uses: its metrics address, how it
//! consumes and batches, its retry delays, its timers, how it judges an
//! event's time, and its name in the audit-lag report.

use std::{net::SocketAddr, time::Duration};

use crate::{ConfigError, ledger, read::Vars};

/// The worker's own settings.
#[derive(Debug, Clone)]
pub struct Worker {
    /// `WORKER_METRICS_ADDR`: worker's `/metrics` and `/health`.
    pub metrics_addr: SocketAddr,
    /// `WORKER_PREFETCH`: unacknowledged messages a worker holds per queue.
    pub prefetch: u16,
    /// `WORKER_BATCH_MAX`: most deliveries of one queue the worker handles in
    /// one transaction (1 turns group commit off).
    pub batch_max: usize,
    /// `WORKER_BATCHES_IN_FLIGHT`: batches of one queue a worker runs at once.
    pub batches_in_flight: usize,
    /// `RETRY_BASE_MS`: delay before the second attempt (doubles each time).
    pub retry_base: Duration,
    /// `RETRY_MAX_MS`: longest delay between attempts.
    pub retry_max: Duration,
    /// `SETTLE_INTERVAL_SECS`: how often expired reservations are settled.
    pub settle_interval: Duration,
    /// `SHUTDOWN_DEADLINE_SECS`: how long in-flight work may take after SIGTERM.
    pub shutdown_deadline: Duration,
    /// `PROJECT_RETENTION_DAYS`: projects older than this are deleted by the
    /// worker; unset keeps them forever.
    pub project_retention: Option<Duration>,
    /// `MAX_EVENT_LATENESS_SECS`: how far before its arrival an event's
    /// `occurred_at` is believed (default: the refund window,
    /// `REFUND_WINDOW_SECS`); an older one is judged at its arrival.
    pub max_event_lateness: Duration,
    /// `EVENT_CLOCK_SKEW_SECS`: how far an event's `occurred_at` may lie
    /// before its reservation was made (the two clocks differ a little); an
    /// event from before that refunds nothing.
    pub event_clock_skew: Duration,
    /// `HOSTNAME` (set by the system or the container; default `worker`):
    /// the first part of this worker's name in the audit-lag report.
    pub host_name: String,
    /// `EXPIRY_NOTICE_SECS`: how long before a lot's expiry the timer writes
    /// its `credits.expiring` event (once per lot).
    pub expiry_notice: Duration,
    /// `LOW_BALANCE_THRESHOLD` (the ledger section's, read through it): the
    /// threshold of accounts without their own, for the worker's movements.
    pub low_balance_threshold: i64,
}

impl Worker {
    /// Reads this section through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        Self::read(&Vars::new(&lookup))
    }

    pub(crate) fn read(vars: &Vars<'_>) -> Result<Self, ConfigError> {
        let retry_base = Duration::from_millis(vars.positive("RETRY_BASE_MS", 1000)?);
        let retry_max = Duration::from_millis(vars.positive("RETRY_MAX_MS", 60_000)?);
        if retry_base > retry_max {
            return Err(ConfigError {
                variable: "RETRY_BASE_MS",
                reason: "must not be larger than RETRY_MAX_MS".into(),
            });
        }
        Ok(Self {
            metrics_addr: vars.parse("WORKER_METRICS_ADDR", "127.0.0.1:9091")?,
            prefetch: vars.positive("WORKER_PREFETCH", 256)?,
            batch_max: vars.positive("WORKER_BATCH_MAX", 64)?,
            batches_in_flight: vars.positive("WORKER_BATCHES_IN_FLIGHT", 2)?,
            retry_base,
            retry_max,
            settle_interval: Duration::from_secs(vars.positive("SETTLE_INTERVAL_SECS", 30)?),
            shutdown_deadline: Duration::from_secs(vars.positive("SHUTDOWN_DEADLINE_SECS", 20)?),
            project_retention: vars
                .get("PROJECT_RETENTION_DAYS")
                .map(|_| vars.positive::<u64>("PROJECT_RETENTION_DAYS", 1))
                .transpose()?
                .map(|days| Duration::from_secs(days.saturating_mul(86_400))),
            // The refund window is the ledger's setting; only its value is
            // borrowed as the default, so the worker need not load the
            // whole ledger section.
            max_event_lateness: match vars.get("MAX_EVENT_LATENESS_SECS") {
                None => ledger::refund_window(vars)?,
                Some(_) => Duration::from_secs(vars.parse("MAX_EVENT_LATENESS_SECS", "0")?),
            },
            event_clock_skew: Duration::from_secs(vars.parse("EVENT_CLOCK_SKEW_SECS", "60")?),
            host_name: vars.get("HOSTNAME").unwrap_or_else(|| "worker".into()),
            expiry_notice: Duration::from_secs(vars.parse("EXPIRY_NOTICE_SECS", "259200")?),
            low_balance_threshold: ledger::low_balance_threshold(vars)?,
        })
    }
}
