//! The transactional outbox: its rows, written and read.
//!
//! Rule: a job is inserted here inside the transaction that makes the change it
//! describes, so a committed change always has its job, whatever happens to the
//! broker or the process afterwards. Publishing happens after the commit
//! (`penora_platform::relay`).

use deadpool_postgres::GenericClient;
use serde::Serialize;
use uuid::Uuid;

use penora_domain::events::{self, Envelope, EventType};
use penora_domain::messages::JOBS_EXCHANGE;
use time::OffsetDateTime;

use crate::DbError;

/// SQL writing one outbox row (also driven raw by the benchmark).
pub const INSERT_SQL: &str = "INSERT INTO outbox (user_id, exchange, routing_key, message_id, correlation_id, payload) \
     VALUES ($1, $2, $3, $4, $5, $6)";

/// A job to write on the jobs exchange.
#[derive(Debug, Clone)]
pub struct Job<'a> {
    /// Whose change it describes.
    pub user_id: &'a str,
    /// Its queue's routing key.
    pub routing_key: &'a str,
    /// Its body.
    pub payload: serde_json::Value,
    /// The request id, carried as the message's correlation id.
    pub correlation_id: Option<&'a str>,
}

/// Writes `jobs` on the jobs exchange in one statement of the caller's
/// transaction (the only place outbox rows are written). Returns the
/// message ids the published messages will carry, in order.
pub async fn enqueue_jobs(tx: &impl GenericClient, jobs: &[Job<'_>]) -> Result<Vec<Uuid>, DbError> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = jobs.iter().map(|_| Uuid::now_v7()).collect();
    let users: Vec<&str> = jobs.iter().map(|j| j.user_id).collect();
    let keys: Vec<&str> = jobs.iter().map(|j| j.routing_key).collect();
    let correlations: Vec<Option<&str>> = jobs.iter().map(|j| j.correlation_id).collect();
    let payloads: Vec<&serde_json::Value> = jobs.iter().map(|j| &j.payload).collect();
    let stmt = tx
        .prepare_cached(
            "INSERT INTO outbox (user_id, exchange, routing_key, message_id, correlation_id, payload) \
             SELECT v.user_id, $2, v.routing_key, v.message_id, v.correlation_id, v.payload \
             FROM unnest($1::text[], $3::text[], $4::uuid[], $5::text[], $6::jsonb[]) \
               AS v(user_id, routing_key, message_id, correlation_id, payload)",
        )
        .await?;
    tx.execute(
        &stmt,
        &[
            &users,
            &JOBS_EXCHANGE,
            &keys,
            &ids,
            &correlations,
            &payloads,
        ],
    )
    .await?;
    Ok(ids)
}

/// Writes a job for `routing_key` on the jobs exchange, in the caller's
/// transaction. Returns the message id that the published message will carry.
pub async fn enqueue_job(
    tx: &impl GenericClient,
    user_id: &str,
    routing_key: &str,
    payload: &impl Serialize,
    correlation_id: Option<&str>,
) -> Result<Uuid, DbError> {
    let payload =
        serde_json::to_value(payload).map_err(|e| DbError::Other(format!("job encoding: {e}")))?;
    let ids = enqueue_jobs(
        tx,
        &[Job {
            user_id,
            routing_key,
            payload,
            correlation_id,
        }],
    )
    .await?;
    ids.into_iter()
        .next()
        .ok_or_else(|| DbError::Invariant("a job was not written".into()))
}

/// An event to publish on `penora.events` (contract §14).
#[derive(Debug, Clone)]
pub struct Event<'a> {
    /// Whose change it reports (`data.user_id` is set from it).
    pub user_id: &'a str,
    /// Its type, the routing key.
    pub kind: EventType,
    /// What it concerns besides the user (an object; `user_id` is added).
    pub data: serde_json::Value,
    /// The request id, carried as the message's correlation id.
    pub correlation_id: Option<&'a str>,
}

/// Writes `events` for `penora.events` in one statement of the caller's
/// transaction (the transaction of the change they report), each in §14's
/// envelope with its `evt_` id made from its message id, stamped `at`; a
/// `balance.low` event gets its `topup_reference` from that id.
/// Returns their event ids, in order.
pub async fn enqueue_events(
    tx: &impl GenericClient,
    events: &[Event<'_>],
    at: OffsetDateTime,
) -> Result<Vec<String>, DbError> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = events.iter().map(|_| Uuid::now_v7()).collect();
    let users: Vec<&str> = events.iter().map(|e| e.user_id).collect();
    let keys: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    let correlations: Vec<Option<&str>> = events.iter().map(|e| e.correlation_id).collect();
    let mut payloads = Vec::with_capacity(events.len());
    for (e, id) in events.iter().zip(&ids) {
        let mut data = match &e.data {
            serde_json::Value::Object(m) => m.clone(),
            serde_json::Value::Null => serde_json::Map::new(),
            other => {
                return Err(DbError::Invariant(format!(
                    "an event's data must be an object, not {other}"
                )));
            }
        };
        data.insert("user_id".into(), e.user_id.into());
        if e.kind == EventType::BalanceLow {
            // Made from the event's own id, so an auto top-up keyed by it
            // is idempotent however often the event is delivered.
            data.insert(
                "topup_reference".into(),
                events::topup_reference(*id).into(),
            );
        }
        let envelope = Envelope::new(*id, e.kind, at, serde_json::Value::Object(data));
        payloads.push(
            serde_json::to_value(&envelope)
                .map_err(|err| DbError::Other(format!("event encoding: {err}")))?,
        );
    }
    let stmt = tx
        .prepare_cached(
            "INSERT INTO outbox (user_id, exchange, routing_key, message_id, correlation_id, payload) \
             SELECT v.user_id, $2, v.routing_key, v.message_id, v.correlation_id, v.payload \
             FROM unnest($1::text[], $3::text[], $4::uuid[], $5::text[], $6::jsonb[]) \
               AS v(user_id, routing_key, message_id, correlation_id, payload)",
        )
        .await?;
    tx.execute(
        &stmt,
        &[
            &users,
            &events::EXCHANGE,
            &keys,
            &ids,
            &correlations,
            &payloads,
        ],
    )
    .await?;
    Ok(ids.into_iter().map(events::event_id).collect())
}

/// How many outbox rows wait to be published (set-aside ones included).
pub async fn pending(client: &impl GenericClient) -> Result<i64, DbError> {
    let row = client
        .query_one(
            "SELECT count(*) FROM outbox WHERE published_at IS NULL",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// The outbox's backlog.
#[derive(Debug, Clone, Copy)]
pub struct Backlog {
    /// Rows waiting to be published (set-aside ones not counted).
    pub waiting: i64,
    /// Age of the oldest of them, in seconds.
    pub oldest_secs: f64,
    /// Rows set aside after repeated refusals.
    pub set_aside: i64,
}

/// The outbox's backlog, and its set-aside rows.
pub async fn backlog(client: &impl GenericClient) -> Result<Backlog, DbError> {
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE set_aside_at IS NULL) AS waiting, \
                    coalesce(extract(epoch FROM now() - min(created_at) FILTER (WHERE set_aside_at IS NULL)), 0)::float8 AS oldest_secs, \
                    count(*) FILTER (WHERE set_aside_at IS NOT NULL) AS set_aside \
             FROM outbox WHERE published_at IS NULL",
            &[],
        )
        .await?;
    Ok(Backlog {
        waiting: row.get("waiting"),
        oldest_secs: row.get("oldest_secs"),
        set_aside: row.get("set_aside"),
    })
}

/// Sets the backlog gauges.
pub fn record_backlog(b: Backlog) {
    metrics::gauge!("penora_outbox_pending_rows").set(b.waiting as f64);
    metrics::gauge!("penora_outbox_oldest_age_seconds").set(b.oldest_secs);
    metrics::gauge!("penora_outbox_set_aside_rows").set(b.set_aside as f64);
}

/// Deletes rows marked published more than `days` days ago (by versions
/// before published rows were deleted at once); returns how many.
pub async fn prune(client: &impl GenericClient, days: i32) -> Result<u64, DbError> {
    Ok(client
        .execute(
            "DELETE FROM outbox WHERE published_at < now() - make_interval(days => $1)",
            &[&days],
        )
        .await?)
}

/// An outbox row the broker kept refusing, set aside so that the others
/// keep flowing (contract §11).
#[derive(Debug, Clone, Serialize)]
pub struct SetAside {
    /// The row.
    pub id: i64,
    /// Whose change.
    pub user_id: String,
    /// Where it is published.
    pub exchange: String,
    /// With which routing key.
    pub routing_key: String,
    /// Its message id.
    pub message_id: String,
    /// How often the broker refused it.
    pub refusals: i32,
    /// The broker's last answer.
    pub last_error: Option<String>,
    /// When it was written (RFC 3339, ms).
    pub created_at: String,
    /// When it was set aside (RFC 3339, ms).
    pub set_aside_at: String,
}

/// The rows set aside and not published, oldest first.
pub async fn set_aside(client: &impl GenericClient) -> Result<Vec<SetAside>, DbError> {
    Ok(client
        .query(
            "SELECT id, user_id, exchange, routing_key, message_id::text, refusals, last_error, \
                    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS created_at, \
                    to_char(set_aside_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS set_aside_at \
             FROM outbox WHERE set_aside_at IS NOT NULL AND published_at IS NULL ORDER BY id",
            &[],
        )
        .await?
        .into_iter()
        .map(|r| SetAside {
            id: r.get("id"),
            user_id: r.get("user_id"),
            exchange: r.get("exchange"),
            routing_key: r.get("routing_key"),
            message_id: r.get("message_id"),
            refusals: r.get("refusals"),
            last_error: r.get("last_error"),
            created_at: r.get("created_at"),
            set_aside_at: r.get("set_aside_at"),
        })
        .collect())
}

/// Puts set-aside rows back to be published (all, or row `id`): the
/// services' relays publish them within a second. How many.
pub async fn put_back(client: &impl GenericClient, id: Option<i64>) -> Result<u64, DbError> {
    Ok(client
        .execute(
            "UPDATE outbox SET set_aside_at = NULL, refusals = 0, retry_at = NULL \
             WHERE set_aside_at IS NOT NULL AND published_at IS NULL \
               AND ($1::int8 IS NULL OR id = $1)",
            &[&id],
        )
        .await?)
}
