//! Settings, loaded once at start-up from the environment, by section.
//!
//! Rules:
//! * one type per concern ([`Db`], [`Http`], [`Broker`], [`Worker`],
//!   [`Images`], [`Ledger`], [`Workspace`], [`Audit`], [`Webhooks`], [`Log`]), one file
//!   each, each with its own loader that reads only its own variables;
//! * each binary has a settings type of its own made of the sections it
//!   uses ([`ApiSettings`], [`WorkerSettings`], [`OpsSettings`],
//!   [`BenchSettings`]), loaded by one call, so a bad value of a setting a
//!   binary does not use (an image setting for `penora-ops`) cannot stop it;
//! * every variable has a documented default (README, "Configuration"); a
//!   value that does not parse stops start-up with an error naming the
//!   variable;
//! * this crate is the only place that reads a setting from the environment;
//!   the functions of other crates take the section they need.

mod apps;
mod audit;
mod broker;
mod db;
mod http;
mod images;
mod ledger;
mod log;
mod read;
mod webhooks;
mod worker;
mod workspace;

use std::fmt;

pub use apps::{ApiSettings, BenchSettings, OpsSettings, WorkerSettings};
pub use audit::{Audit, MIN_AUDIT_KEY_LEN};
pub use broker::{Broker, QueueType};
pub use db::Db;
pub use http::{Http, MIN_BOOTSTRAP_KEY_LEN, SMALL_BODY_BYTES};
pub use images::{ImageStorageFormat, Images};
pub use ledger::Ledger;
pub use log::{Log, LogFormat};
pub use webhooks::Webhooks;
pub use worker::Worker;
pub use workspace::Workspace;

/// A secret that never prints (Debug and Display show `[redacted]`).
///
/// It stays here rather than in `penora-domain`: every secret is a setting
/// (a URL with a password, a key), and the crates that hold one already
/// depend on this one.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; call only where it is used, never to log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A setting that could not be read; names the variable.
#[derive(Debug, thiserror::Error)]
#[error("invalid value for {variable}: {reason}")]
pub struct ConfigError {
    /// The environment variable at fault.
    pub variable: &'static str,
    /// Why its value was refused.
    pub reason: String,
}

#[cfg(test)]
mod tests;
