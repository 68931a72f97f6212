//! The outbox relay: rows committed in the outbox are published to the
//! broker with publisher confirms, and deleted once confirmed.
//!
//! Rule: publishing happens after the commit that wrote a row; a row the
//! broker refuses is retried with backoff and set aside after
//! `OUTBOX_MAX_ATTEMPTS`; an outage never counts as a refusal.

use deadpool_postgres::GenericClient;
use penora_store::{
    DbError,
    outbox::{backlog, record_backlog},
};
use uuid::Uuid;

/// What the relay does about rows the broker refuses.
#[derive(Debug, Clone, Copy)]
pub struct RelayPolicy {
    /// Refusals after which a row is set aside (`OUTBOX_MAX_ATTEMPTS`).
    pub max_attempts: u32,
    /// Wait before a refused row is tried again (`OUTBOX_RETRY_BASE_MS`),
    /// doubling with each refusal up to [`RETRY_CEILING_SECS`].
    pub retry_base: std::time::Duration,
}

/// Longest wait between two tries of a refused row.
pub const RETRY_CEILING_SECS: f64 = 300.0;

impl RelayPolicy {
    /// The policy the broker settings ask for.
    pub fn from_settings(broker: &penora_config::Broker) -> Self {
        Self {
            max_attempts: broker.outbox_max_attempts,
            retry_base: broker.outbox_retry_base,
        }
    }
}

impl Default for RelayPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 10,
            retry_base: std::time::Duration::from_secs(1),
        }
    }
}

/// The rows a relay takes, oldest first (`$1` at most).
const TAKE_SQL: &str = "SELECT id, exchange, routing_key, message_id, correlation_id, payload::text, \
        extract(epoch FROM now() - created_at)::float8 AS waited_secs \
     FROM outbox WHERE published_at IS NULL \
       AND set_aside_at IS NULL AND (retry_at IS NULL OR retry_at <= now()) \
     ORDER BY id LIMIT $1";

/// The advisory lock a relay holds on a distributed database ("relay" in ASCII).
const RELAY_LOCK_KEY: i64 = 0x72_65_6c_61_79;

/// Publishes up to `batch` waiting outbox rows and deletes them, each only
/// after the broker confirmed it. Rows are locked with `FOR UPDATE SKIP
/// LOCKED`, so any number of API and worker processes can relay at once
/// without publishing a row twice concurrently (on Citus, where rows of
/// several shards cannot be locked by one query, one relay at a time holds
/// an advisory lock instead); a crash between the confirm
/// and the commit publishes a row again later, which the idempotent handlers
/// absorb. A row the broker refuses (unroutable, nacked, not confirmed in
/// time) is tried again after a backoff and, after `policy.max_attempts`
/// refusals, set aside with its error; the rows around it are published all
/// the same. Returns how many rows were published.
pub async fn relay_once(
    pool: &deadpool_postgres::Pool,
    publisher: &crate::broker::Publisher,
    batch: i64,
    policy: RelayPolicy,
) -> Result<usize, RelayError> {
    let mut client = pool.get().await.map_err(DbError::from)?;
    let tx = client.transaction().await.map_err(DbError::from)?;
    let take = if penora_store::distributed() {
        // Citus cannot lock rows of several shards in one query: one relay
        // at a time takes the rows instead (the others find the lock taken
        // and wait for their next turn).
        let turn: bool = tx
            .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&RELAY_LOCK_KEY])
            .await
            .map_err(DbError::from)?
            .get(0);
        if !turn {
            return Ok(0);
        }
        tx.prepare_cached(TAKE_SQL).await
    } else {
        tx.prepare_cached(&format!("{TAKE_SQL} FOR UPDATE SKIP LOCKED"))
            .await
    }
    .map_err(DbError::from)?;
    let rows = tx.query(&take, &[&batch]).await.map_err(DbError::from)?;
    if rows.is_empty() {
        return Ok(0);
    }
    let topology = publisher.topology();
    let mut ids = Vec::with_capacity(rows.len());
    let mut messages = Vec::with_capacity(rows.len());
    let now = time::OffsetDateTime::now_utc().unix_timestamp().max(0) as u64;
    for row in &rows {
        let id: i64 = row.get("id");
        let exchange: String = row.get("exchange");
        let routing_key: String = row.get("routing_key");
        let message_id: Uuid = row.get("message_id");
        let correlation_id: Option<String> = row.get("correlation_id");
        let payload: String = row.get("payload");
        let mut props = lapin::BasicProperties::default()
            .with_message_id(message_id.to_string().into())
            .with_content_type("application/json".into())
            .with_type(routing_key.clone().into())
            .with_timestamp(now);
        if let Some(c) = correlation_id {
            props = props.with_correlation_id(c.into());
        }
        ids.push(id);
        messages.push(crate::broker::Outgoing {
            exchange: topology.exchange(&exchange),
            routing_key,
            payload: payload.into_bytes(),
            properties: props,
        });
    }
    let each = match publisher.publish_each(messages).await {
        Ok(each) => each,
        Err(e) => {
            // The broker is away: the rows stay unsent, and say why (for
            // operators). An outage is no refusal; nothing is set aside.
            tx.rollback().await.map_err(DbError::from)?;
            let text = e.to_string();
            let _ = client
                .execute(
                    "UPDATE outbox SET attempts = attempts + 1, last_error = $2 \
                     WHERE id = ANY($1) AND published_at IS NULL",
                    &[&ids, &text],
                )
                .await;
            return Err(e.into());
        }
    };
    let mut sent = Vec::with_capacity(ids.len());
    let (mut refused, mut errors) = (Vec::new(), Vec::new());
    for ((id, row), result) in ids.iter().zip(&rows).zip(each) {
        match result {
            Ok(()) => {
                sent.push(*id);
                metrics::histogram!("penora_outbox_relay_lag_seconds")
                    .record(row.get::<_, f64>("waited_secs"));
                if row.get::<_, &str>("exchange") == penora_domain::events::EXCHANGE {
                    // The type is one of §14's eleven: a bounded label.
                    let kind = penora_domain::events::EventType::from_db(row.get("routing_key"))
                        .map_or("other", |t| t.as_str());
                    metrics::counter!("penora_events_published_total", "type" => kind).increment(1);
                }
            }
            Err(e) => {
                refused.push(*id);
                errors.push(e.to_string());
            }
        }
    }
    if !sent.is_empty() {
        // A confirmed row is deleted: the broker holds the message now (a
        // persistent message on a durable queue). Marking it published
        // instead wrote a whole new version of the row and of its index
        // entries, and a prune deleted it a week later: about 370 bytes of WAL
        // per job (measured, docs/performance.md step 16C) for nothing anyone
        // read. `published_at IS NULL` lets this
        // use the `outbox_pending` index (the table's key is (user_id, id)).
        let delete = tx
            .prepare_cached("DELETE FROM outbox WHERE id = ANY($1) AND published_at IS NULL")
            .await
            .map_err(DbError::from)?;
        tx.execute(&delete, &[&sent]).await.map_err(DbError::from)?;
    }
    if !refused.is_empty() {
        let refuse = tx
            .prepare_cached(
                "UPDATE outbox o SET attempts = o.attempts + 1, refusals = o.refusals + 1, \
                        last_error = v.error, \
                        retry_at = now() + make_interval(secs => \
                            least($3::float8 * power(2, o.refusals), $4::float8)), \
                        set_aside_at = CASE WHEN o.refusals + 1 >= $5 THEN now() END \
                 FROM unnest($1::int8[], $2::text[]) AS v(id, error) \
                 WHERE o.id = v.id AND o.published_at IS NULL \
                 RETURNING o.id, o.routing_key, o.refusals, o.last_error, \
                           o.set_aside_at IS NOT NULL AS set_aside",
            )
            .await
            .map_err(DbError::from)?;
        let max = i32::try_from(policy.max_attempts).unwrap_or(i32::MAX);
        for row in tx
            .query(
                &refuse,
                &[
                    &refused,
                    &errors,
                    &policy.retry_base.as_secs_f64(),
                    &RETRY_CEILING_SECS,
                    &max,
                ],
            )
            .await
            .map_err(DbError::from)?
        {
            let (id, key, refusals, error): (i64, String, i32, Option<String>) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            metrics::counter!("penora_outbox_refusals_total").increment(1);
            if row.get::<_, bool>("set_aside") {
                metrics::counter!("penora_outbox_set_aside_total").increment(1);
                tracing::error!(outbox_id = id, routing_key = %key, refusals, error = ?error,
                    "outbox row set aside after repeated refusals; `penora-ops outbox list` shows it, `penora-ops outbox retry` puts it back");
            } else {
                tracing::warn!(outbox_id = id, routing_key = %key, refusals, error = ?error,
                    "the broker refused an outbox row; it will be tried again");
            }
        }
    }
    tx.commit().await.map_err(DbError::from)?;
    metrics::counter!("penora_outbox_published_total").increment(sent.len() as u64);
    Ok(sent.len())
}

/// Publishes until the outbox has nothing ready or an error stops it.
pub async fn relay_all(
    pool: &deadpool_postgres::Pool,
    publisher: &crate::broker::Publisher,
    policy: RelayPolicy,
) -> Result<usize, RelayError> {
    const BATCH: i64 = 200;
    let mut total = 0;
    loop {
        let n = relay_once(pool, publisher, BATCH, policy).await?;
        total += n;
        if (n as i64) < BATCH {
            return Ok(total);
        }
    }
}

/// Why a relay pass stopped.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The database failed; the rows stay as they were.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The broker failed; the rows stay unsent.
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
}

/// Publishes the outbox until `stop` fires: at once when `wake` is notified
/// (by the process that committed jobs), and every second.
/// While the broker is away it backs off (up to 10 s between tries) and the
/// rows wait safely. Used by the API (right after its commits) and by the
/// worker (the sweep that catches whatever the API could not publish).
pub async fn publish_loop(
    pool: deadpool_postgres::Pool,
    publisher: std::sync::Arc<crate::broker::Publisher>,
    policy: RelayPolicy,
    wake: std::sync::Arc<tokio::sync::Notify>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut failures: u32 = 0;
    let mut gauges_at: Option<std::time::Instant> = None;
    while !stop.is_cancelled() {
        match relay_all(&pool, &publisher, policy).await {
            Ok(_) => failures = 0,
            Err(e) => {
                failures = failures.saturating_add(1);
                if failures == 1 || failures.is_multiple_of(60) {
                    tracing::warn!(error = %e, "cannot publish the outbox; jobs wait in PostgreSQL");
                }
            }
        }
        // The backlog gauges at most once a second: under load this loop
        // runs after every commit, and counting is not free.
        if gauges_at.is_none_or(|at| at.elapsed() >= std::time::Duration::from_secs(1))
            && let Ok(client) = pool.get().await
            && let Ok(b) = backlog(&client).await
        {
            gauges_at = Some(std::time::Instant::now());
            record_backlog(b);
        }
        let pause = std::time::Duration::from_secs(u64::from(failures.clamp(1, 10)));
        tokio::select! {
            () = stop.cancelled() => break,
            // While failing, a wake-up does not shorten the back-off.
            () = wake.notified(), if failures == 0 => {},
            () = tokio::time::sleep(pause) => {},
        }
    }
}
