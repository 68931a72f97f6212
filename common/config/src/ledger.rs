//! `Ledger`: the money rules and the API's way of carrying out deductions.
//!
//! `penora-ops` reads this section for `MAX_DEDUCT_AMOUNT` (a grant has the
//! same ceiling as a deduction); the deduction batching and the audit
//! backpressure are the API's, kept here because they shape how money moves
//! rather than how HTTP is served.

use std::time::Duration;

use penora_domain::pricing::PriceTable;

use crate::{ConfigError, read::Vars};

/// The ledger's rules and the batching of deductions.
#[derive(Debug, Clone)]
pub struct Ledger {
    /// `REFUND_WINDOW_SECS`: how long a reservation can be refunded.
    pub refund_window: Duration,
    /// `MAX_DEDUCT_AMOUNT`: largest single deduction (and grant).
    pub max_deduct_amount: i64,
    /// `PRICE_TABLE`: credit prices used by `/quote`.
    pub price_table: PriceTable,
    /// `DEDUCT_BATCH_MAX`: most deductions the API carries out in one
    /// transaction (1 turns group commit off).
    pub deduct_batch_max: usize,
    /// `DEDUCT_BATCHES_IN_FLIGHT`: deduction transactions the API runs at once;
    /// requests arriving meanwhile wait and go together in the next one.
    pub deduct_batches_in_flight: usize,
    /// `DEDUCT_QUEUE_MAX`: most deductions waiting for a batch; past it a
    /// deduction is answered `503 busy` with `Retry-After` at once.
    pub deduct_queue_max: usize,
    /// `AUDIT_LAG_LIMIT_MS`: while the audit runs further behind the ledger
    /// than this (the workers' commit-to-audit lag), new deductions wait up
    /// to half a second, then are answered `503 busy` with `Retry-After`;
    /// 0 turns the backpressure off.
    pub audit_lag_limit: Duration,
    /// `LOW_BALANCE_THRESHOLD`: the spendable balance below which a movement
    /// emits `balance.low`, for accounts without their own threshold
    /// (`PUT /api/unified/alerts`).
    pub low_balance_threshold: i64,
}

impl Ledger {
    /// Reads this section through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        Self::read(&Vars::new(&lookup))
    }

    pub(crate) fn read(vars: &Vars<'_>) -> Result<Self, ConfigError> {
        Ok(Self {
            refund_window: refund_window(vars)?,
            max_deduct_amount: vars.positive("MAX_DEDUCT_AMOUNT", 1_000_000)?,
            price_table: match vars.get("PRICE_TABLE") {
                None => PriceTable::default(),
                Some(raw) => raw.parse().map_err(|reason| ConfigError {
                    variable: "PRICE_TABLE",
                    reason,
                })?,
            },
            deduct_batch_max: vars.positive("DEDUCT_BATCH_MAX", 128)?,
            deduct_batches_in_flight: vars.positive("DEDUCT_BATCHES_IN_FLIGHT", 2)?,
            deduct_queue_max: vars.positive("DEDUCT_QUEUE_MAX", 10_000)?,
            audit_lag_limit: Duration::from_millis(vars.parse("AUDIT_LAG_LIMIT_MS", "2000")?),
            low_balance_threshold: low_balance_threshold(vars)?,
        })
    }
}

/// `REFUND_WINDOW_SECS`; also the default of the worker's
/// `MAX_EVENT_LATENESS_SECS`, which reads it through here.
pub(crate) fn refund_window(vars: &Vars<'_>) -> Result<Duration, ConfigError> {
    Ok(Duration::from_secs(
        vars.parse("REFUND_WINDOW_SECS", "3600")?,
    ))
}

/// `LOW_BALANCE_THRESHOLD` (default 10, at least 0); the worker reads it
/// through here too.
pub(crate) fn low_balance_threshold(vars: &Vars<'_>) -> Result<i64, ConfigError> {
    let threshold: i64 = vars.parse("LOW_BALANCE_THRESHOLD", "10")?;
    if threshold < 0 {
        return Err(ConfigError {
            variable: "LOW_BALANCE_THRESHOLD",
            reason: "must be 0 or more".into(),
        });
    }
    Ok(threshold)
}
