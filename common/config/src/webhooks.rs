//! `Webhooks`: how events are delivered to registered endpoints (contract
//! §14): the key their secrets are encrypted with, which targets are
//! allowed, how long and how often a delivery is retried, how many run at
//! once, and the circuit breaker. Read by the API (registration) and the
//! worker (delivery).

use std::time::Duration;

use crate::{ConfigError, Secret, read::Vars};

/// The webhook settings.
#[derive(Debug, Clone)]
pub struct Webhooks {
    /// `WEBHOOK_SECRET_KEY`: 64 hex characters (32 bytes), the key the
    /// endpoints' signing secrets are encrypted with at rest. Unset: the
    /// API refuses to register an endpoint (`503 webhooks_not_configured`)
    /// and the worker leaves deliveries waiting (retried) until it is set.
    pub secret_key: Option<Secret>,
    /// `WEBHOOK_ALLOW_PRIVATE`: allow private, loopback and link-local
    /// targets and `http` (local development and tests only).
    pub allow_private: bool,
    /// `WEBHOOK_RETRY_HOURS` (default 24), or `WEBHOOK_RETRY_SECS` when set
    /// (tests): how long after its first attempt a failing delivery is
    /// retried before it is parked.
    pub retry_window: Duration,
    /// `WEBHOOK_RETRY_BASE_MS` (default 10,000): the delay before the
    /// second attempt, doubling with each attempt (equal jitter).
    pub retry_base: Duration,
    /// `WEBHOOK_RETRY_MAX_MS` (default 3,600,000): the longest delay.
    pub retry_max: Duration,
    /// `WEBHOOK_TIMEOUT_MS` (default and most 10,000): how long an endpoint
    /// has to answer.
    pub timeout: Duration,
    /// `WEBHOOK_CONCURRENCY` (default 64): deliveries one worker runs at
    /// once, all endpoints together.
    pub concurrency: u16,
    /// `WEBHOOK_ENDPOINT_CONCURRENCY` (default 4): deliveries to one
    /// endpoint one worker runs at once.
    pub endpoint_concurrency: usize,
    /// `WEBHOOK_CIRCUIT_FAILURES` (default 5): consecutive failures after
    /// which an endpoint's circuit opens.
    pub circuit_failures: u32,
    /// `WEBHOOK_CIRCUIT_COOLDOWN_MS` (default 60,000): how long an open
    /// circuit stays open before one delivery tries the endpoint again.
    pub circuit_cooldown: Duration,
}

impl Webhooks {
    /// Reads this section through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        Self::read(&Vars::new(&lookup))
    }

    pub(crate) fn read(vars: &Vars<'_>) -> Result<Self, ConfigError> {
        let secret_key = match vars.get("WEBHOOK_SECRET_KEY") {
            None => None,
            Some(k) => {
                let k = k.trim().to_owned();
                if k.len() != 64 || !k.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(ConfigError {
                        variable: "WEBHOOK_SECRET_KEY",
                        reason: "expected 64 hex characters (32 bytes; `openssl rand -hex 32`)"
                            .into(),
                    });
                }
                Some(Secret::new(k))
            }
        };
        let retry_window = match vars.get("WEBHOOK_RETRY_SECS") {
            Some(_) => Duration::from_secs(vars.positive("WEBHOOK_RETRY_SECS", 1u64)?),
            None => Duration::from_secs(
                vars.positive("WEBHOOK_RETRY_HOURS", 24u64)?
                    .saturating_mul(3600),
            ),
        };
        let retry_base = Duration::from_millis(vars.positive("WEBHOOK_RETRY_BASE_MS", 10_000u64)?);
        let retry_max = Duration::from_millis(vars.positive("WEBHOOK_RETRY_MAX_MS", 3_600_000u64)?);
        if retry_base > retry_max {
            return Err(ConfigError {
                variable: "WEBHOOK_RETRY_BASE_MS",
                reason: "must not be larger than WEBHOOK_RETRY_MAX_MS".into(),
            });
        }
        let timeout = Duration::from_millis(vars.positive("WEBHOOK_TIMEOUT_MS", 10_000u64)?);
        if timeout > Duration::from_secs(10) {
            return Err(ConfigError {
                variable: "WEBHOOK_TIMEOUT_MS",
                reason: "at most 10000 (the contract's 10 s)".into(),
            });
        }
        Ok(Self {
            secret_key,
            allow_private: vars.flag("WEBHOOK_ALLOW_PRIVATE", false)?,
            retry_window,
            retry_base,
            retry_max,
            timeout,
            concurrency: vars.positive("WEBHOOK_CONCURRENCY", 64)?,
            endpoint_concurrency: vars.positive("WEBHOOK_ENDPOINT_CONCURRENCY", 4)?,
            circuit_failures: vars.positive("WEBHOOK_CIRCUIT_FAILURES", 5)?,
            circuit_cooldown: Duration::from_millis(
                vars.positive("WEBHOOK_CIRCUIT_COOLDOWN_MS", 60_000u64)?,
            ),
        })
    }
}
