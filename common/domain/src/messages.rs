//! Names of the RabbitMQ topology and the bodies of the jobs we publish.
//!
//! These names are the public contract (§6): the API writes jobs with these
//! exchanges and routing keys into the outbox, and the worker declares and
//! consumes the same names. Change them only with a migration plan.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Exchange for Penora's own jobs (direct).
pub const JOBS_EXCHANGE: &str = "penora.jobs";
/// Exchange on which ImageGene publishes generation events (topic).
pub const EVENTS_EXCHANGE: &str = "imagegene.events";
/// Queue and routing key of save-project jobs.
pub const SAVE_PROJECT: &str = "penora.save-project";
/// Queue and routing key of ledger-audit jobs.
pub const LEDGER_AUDIT: &str = "penora.ledger-audit";
/// Queue of ImageGene's generation events (bound with `generation.*`).
pub const GENERATION_EVENTS: &str = "penora.generation-events";

/// Check the audit chain links one committed transaction wrote, and move
/// each chain's checkpoint on (one job per commit: contract §6 as amended).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerAuditCommit {
    /// The chains the transaction extended, one per user.
    pub chains: Vec<CommittedChain>,
}

/// A user's chain as a commit left it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommittedChain {
    /// Whose chain.
    pub user_id: String,
    /// The entries the commit wrote, in chain order.
    pub entry_ids: Vec<i64>,
    /// The chain's seq after the commit (its last entry's).
    pub seq: i64,
}

/// Audit one ledger entry: the job of an entry written before the chain
/// moved into the ledger (V18), still handled for the jobs of such entries
/// a queue may hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerAuditJob {
    /// The ledger entry's id.
    pub entry_id: i64,
    /// Whose ledger.
    pub user_id: String,
    /// grant, deduct, refund or settle.
    pub kind: String,
    /// Signed amount.
    pub amount: i64,
    /// Balance after the movement.
    pub balance_after: i64,
}

/// Finish saving one project (check and store its content).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveProjectJob {
    /// Whose project.
    pub user_id: String,
    /// The project's id.
    pub project_id: Uuid,
    /// The app that saved it.
    pub app_source: String,
    /// The reservation to settle once saved, if the save named one.
    pub project_code: Option<String>,
}

/// An ImageGene generation event (`generation.failed` or `generation.succeeded`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationEvent {
    /// Unique per event; handling is idempotent by it.
    pub event_id: String,
    /// Whose reservation.
    pub user_id: String,
    /// The reservation's key.
    pub project_code: String,
    /// Why the generation failed (failures only).
    #[serde(default)]
    pub reason: Option<String>,
    /// When it happened (RFC 3339).
    pub occurred_at: String,
    /// Contract §13: on `generation.failed`, the credits to give back (a
    /// partial refund); on `generation.succeeded`, the credits to charge
    /// (the rest is refunded). Absent: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<i64>,
}

/// Headers the worker sets on messages it retries or parks.
pub mod headers {
    /// What every header the worker sets begins with.
    pub const PREFIX: &str = "x-penora-";
    /// Attempt number of the next delivery (1 = first).
    pub const ATTEMPT: &str = "x-penora-attempt";
    /// When the first attempt failed (RFC 3339).
    pub const FIRST_FAILURE_AT: &str = "x-penora-first-failure-at";
    /// The last error.
    pub const ERROR: &str = "x-penora-error";
    /// When it was parked (RFC 3339).
    pub const PARKED_AT: &str = "x-penora-parked-at";
    /// The exchange the message was first published to.
    pub const ORIGINAL_EXCHANGE: &str = "x-penora-original-exchange";
    /// Its first routing key.
    pub const ORIGINAL_ROUTING_KEY: &str = "x-penora-original-routing-key";
}
