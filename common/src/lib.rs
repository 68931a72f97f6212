//! Penora Credits: what the API, the worker and the operator CLI share.
//!
//! Domain types and their validation, settings, the database (pool,
//! migrations, queries per table), the ledger rules, the outbox, the names of
//! the queue topology, and test helpers behind the `testing` feature.

pub mod audit;
pub mod backpressure;
pub mod broker;
pub mod config;
pub mod cpu_pool;
pub mod db;
pub mod domain;
pub mod http_client;
pub mod imaging;
pub mod keys;
pub mod ledger;
pub mod limits;
pub mod messages;
pub mod outbox;
pub mod pricing;
pub mod projects;
pub mod reconcile;
pub mod refreshed;
pub mod shutdown;
pub mod telemetry;
pub mod timefmt;

#[cfg(feature = "testing")]
pub mod testing;

/// The version of this build, as `/health` reports it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
