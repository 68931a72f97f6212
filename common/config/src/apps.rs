//! The settings of each binary: the sections it uses and no other, read by
//! one call. A variable of a section a binary does not load is never read
//! by it, so its value, however bad, cannot stop that binary.

use crate::{
    Audit, Broker, ConfigError, Db, Http, Images, Ledger, Log, Webhooks, Worker, Workspace,
    read::Vars,
};

/// The process environment as a lookup.
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// `penora-api`'s settings.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// `LOG_FORMAT`.
    pub log: Log,
    /// PostgreSQL.
    pub db: Db,
    /// Listening, limits, keys, CORS, `/metrics`.
    pub http: Http,
    /// RabbitMQ: the outbox relay publishes the API's jobs.
    pub broker: Broker,
    /// Saves: image checks, encoding, save slots.
    pub images: Images,
    /// Money rules and the batching of deductions.
    pub ledger: Ledger,
    /// Storage quota and projects cap.
    pub workspace: Workspace,
    /// Webhook registration: the secrets' key, which targets are allowed.
    pub webhooks: Webhooks,
}

impl ApiSettings {
    /// Reads the API's sections from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(env)
    }

    /// Reads the API's sections through `lookup` (a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let vars = Vars::new(&lookup);
        Ok(Self {
            log: Log::read(&vars)?,
            db: Db::read(&vars)?,
            http: Http::read(&vars)?,
            broker: Broker::read(&vars)?,
            images: Images::read(&vars)?,
            ledger: Ledger::read(&vars)?,
            workspace: Workspace::read(&vars)?,
            webhooks: Webhooks::read(&vars)?,
        })
    }
}

/// `penora-worker`'s settings.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// `LOG_FORMAT`.
    pub log: Log,
    /// PostgreSQL.
    pub db: Db,
    /// RabbitMQ: consuming, retries, parking, the outbox relay.
    pub broker: Broker,
    /// The worker's own: metrics address, batching, timers, event time.
    pub worker: Worker,
    /// Queued saves and thumbnails.
    pub images: Images,
    /// The audit records' MAC key.
    pub audit: Audit,
    /// Webhook delivery.
    pub webhooks: Webhooks,
}

impl WorkerSettings {
    /// Reads the worker's sections from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(env)
    }

    /// Reads the worker's sections through `lookup` (a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let vars = Vars::new(&lookup);
        Ok(Self {
            log: Log::read(&vars)?,
            db: Db::read(&vars)?,
            broker: Broker::read(&vars)?,
            worker: Worker::read(&vars)?,
            images: Images::read(&vars)?,
            audit: Audit::read(&vars)?,
            webhooks: Webhooks::read(&vars)?,
        })
    }
}

/// `penora-ops`'s settings: no HTTP, image or worker section, so the
/// operator CLI runs whatever those say.
#[derive(Debug, Clone)]
pub struct OpsSettings {
    /// PostgreSQL (only `DATABASE_URL` is used: the CLI opens two
    /// connections and never migrates on its own).
    pub db: Db,
    /// RabbitMQ: `queues`, `dlq`, `event`, `wait-idle`.
    pub broker: Broker,
    /// `MAX_DEDUCT_AMOUNT`, the ceiling of `credits grant`.
    pub ledger: Ledger,
    /// The storage quota `reconcile` checks usage against.
    pub workspace: Workspace,
    /// The key `audit verify` checks the MACs with.
    pub audit: Audit,
}

impl OpsSettings {
    /// Reads the CLI's sections from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(env)
    }

    /// Reads the CLI's sections through `lookup` (a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let vars = Vars::new(&lookup);
        Ok(Self {
            db: Db::read(&vars)?,
            broker: Broker::read(&vars)?,
            ledger: Ledger::read(&vars)?,
            workspace: Workspace::read(&vars)?,
            audit: Audit::read(&vars)?,
        })
    }
}

/// The settings `penora-bench` and `penora-chaos` share with the services
/// they drive: the broker's topology and the worker's timers.
#[derive(Debug, Clone)]
pub struct BenchSettings {
    /// RabbitMQ: the topology and publisher the tools share with the services.
    pub broker: Broker,
    /// The worker's `SETTLE_INTERVAL_SECS`, which the invariant checks wait on.
    pub worker: Worker,
}

impl BenchSettings {
    /// Reads the tools' sections through `lookup` (their command line, with
    /// everything else at its default).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let vars = Vars::new(&lookup);
        Ok(Self {
            broker: Broker::read(&vars)?,
            worker: Worker::read(&vars)?,
        })
    }
}
