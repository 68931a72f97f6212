//! `Broker`: RabbitMQ as every binary that touches it sees it: where it is,
//! the names and shape of the topology, publisher confirms, the outbox
//! relay's policy (the API and the worker both relay) and the management
//! API (`penora-ops queues`, `wait-idle`, the version the services log).
//!
//! `RETRY_MAX_ATTEMPTS` is here because it fixes how many delay queues the
//! topology declares, which `penora-ops` must name as the worker does; the
//! delays themselves (`RETRY_BASE_MS`, `RETRY_MAX_MS`) are only the
//! worker's, in [`crate::Worker`].

use std::time::Duration;

use crate::{ConfigError, Secret, read::Vars};

/// The kind of RabbitMQ queue to declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    /// Replicated, durable queues (RabbitMQ 3.10+): the default.
    Quorum,
    /// Classic durable queues, for brokers without quorum support.
    Classic,
}

/// RabbitMQ: connection, topology, confirms, outbox relay, management API.
#[derive(Debug, Clone)]
pub struct Broker {
    /// `AMQP_URL`: RabbitMQ connection string (vhost included).
    pub url: Secret,
    /// `AMQP_PREFIX`: prepended to every exchange and queue name (empty in
    /// production; lets several environments or tests share one vhost).
    pub prefix: String,
    /// `AMQP_QUEUE_TYPE`: `quorum` (default) or `classic`.
    pub queue_type: QueueType,
    /// `RETRY_MAX_ATTEMPTS`: attempts of a job or event before it is parked
    /// (the topology has one delay queue per attempt but the last).
    pub retry_max_attempts: u32,
    /// `EVENTS_QUEUE_MAX_LENGTH`: most messages waiting in ImageGene's
    /// events queue; past it the broker refuses new ones (`reject-publish`,
    /// the publisher's confirm is a nack) instead of filling its disk.
    pub events_queue_max_length: u32,
    /// `AMQP_CONFIRM_TIMEOUT_MS`: longest wait for the publisher confirms of
    /// one publish; a message not confirmed by then counts as refused.
    pub confirm_timeout: Duration,
    /// `OUTBOX_MAX_ATTEMPTS`: refusals by the broker after which an outbox
    /// row is set aside (`penora-ops outbox list`, `outbox retry`).
    pub outbox_max_attempts: u32,
    /// `OUTBOX_RETRY_BASE_MS`: wait before a refused outbox row is tried
    /// again, doubling with each refusal up to 5 minutes.
    pub outbox_retry_base: Duration,
    /// `RABBITMQ_MANAGEMENT_URL`: the management API (`http` or `https`);
    /// unset, it is never contacted.
    pub management_url: Option<Secret>,
}

impl Broker {
    /// Reads this section through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        Self::read(&Vars::new(&lookup))
    }

    pub(crate) fn read(vars: &Vars<'_>) -> Result<Self, ConfigError> {
        let prefix = vars.get("AMQP_PREFIX").unwrap_or_default();
        if !prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            return Err(ConfigError {
                variable: "AMQP_PREFIX",
                reason: "may only contain letters, digits, _ - and .".into(),
            });
        }
        Ok(Self {
            url: Secret::new(
                vars.get("AMQP_URL")
                    .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
            ),
            prefix,
            queue_type: match vars.get("AMQP_QUEUE_TYPE").as_deref() {
                None | Some("quorum") => QueueType::Quorum,
                Some("classic") => QueueType::Classic,
                Some(other) => {
                    return Err(ConfigError {
                        variable: "AMQP_QUEUE_TYPE",
                        reason: format!("expected `quorum` or `classic`, got `{other}`"),
                    });
                }
            },
            retry_max_attempts: vars.positive("RETRY_MAX_ATTEMPTS", 8)?,
            events_queue_max_length: vars.positive("EVENTS_QUEUE_MAX_LENGTH", 1_000_000)?,
            confirm_timeout: Duration::from_millis(
                vars.positive("AMQP_CONFIRM_TIMEOUT_MS", 10_000)?,
            ),
            outbox_max_attempts: vars.positive("OUTBOX_MAX_ATTEMPTS", 10)?,
            outbox_retry_base: Duration::from_millis(vars.positive("OUTBOX_RETRY_BASE_MS", 1000)?),
            management_url: management_url(vars)?,
        })
    }
}

/// `RABBITMQ_MANAGEMENT_URL`: an `http` or `https` URL, or unset (the
/// management API is then never contacted; nothing is derived from
/// `AMQP_URL`, whose credentials must not travel in clear to a guessed
/// port).
fn management_url(vars: &Vars<'_>) -> Result<Option<Secret>, ConfigError> {
    let Some(raw) = vars.get("RABBITMQ_MANAGEMENT_URL") else {
        return Ok(None);
    };
    match url::Url::parse(raw.trim()) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
            Ok(Some(Secret::new(raw.trim())))
        }
        _ => Err(ConfigError {
            variable: "RABBITMQ_MANAGEMENT_URL",
            reason: "expected an http:// or https:// URL".into(),
        }),
    }
}
