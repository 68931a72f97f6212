//! Penora Credits' platform: what every process needs to run beside the
//! money rules: the broker (topology, publisher, the management API), the
//! outbox relay, API keys, telemetry, an HTTP client, and start-up and
//! shutdown helpers.

pub mod broker;
pub mod dead_letters;
pub mod http_client;
pub mod keys;
pub mod limits;
pub mod refreshed;
pub mod relay;
pub mod shutdown;
pub mod tasks;
pub mod telemetry;
pub mod webhooks;

/// The version of this build, as `/health` reports it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
