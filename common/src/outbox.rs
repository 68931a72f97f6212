//! The transactional outbox.
//!
//! Rule: a job is inserted here inside the transaction that makes the change it
//! describes, so a committed change always has its job, whatever happens to the
//! broker or the process afterwards. Publishing happens after the commit.

use deadpool_postgres::GenericClient;
use serde::Serialize;
use uuid::Uuid;

use crate::{db::DbError, messages::JOBS_EXCHANGE};

/// SQL writing one outbox row (also driven raw by the benchmark).
pub const INSERT_SQL: &str = "INSERT INTO outbox (user_id, exchange, routing_key, message_id, correlation_id, payload) \
     VALUES ($1, $2, $3, $4, $5, $6)";

/// Writes a job for `routing_key` on the jobs exchange, in the caller's
/// transaction. Returns the message id that the published message will carry.
pub async fn enqueue_job(
    tx: &impl GenericClient,
    user_id: &str,
    routing_key: &str,
    payload: &impl Serialize,
    correlation_id: Option<&str>,
) -> Result<Uuid, DbError> {
    let message_id = Uuid::now_v7();
    let payload =
        serde_json::to_value(payload).map_err(|e| DbError::Other(format!("job encoding: {e}")))?;
    let stmt = tx.prepare_cached(INSERT_SQL).await?;
    tx.execute(
        &stmt,
        &[
            &user_id,
            &JOBS_EXCHANGE,
            &routing_key,
            &message_id,
            &correlation_id,
            &payload,
        ],
    )
    .await?;
    Ok(message_id)
}

/// How many outbox rows wait to be published.
pub async fn pending(client: &impl GenericClient) -> Result<i64, DbError> {
    let row = client
        .query_one(
            "SELECT count(*) FROM outbox WHERE published_at IS NULL",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// Publishes up to `batch` waiting outbox rows and marks them sent, only after
/// the broker confirmed every one. Rows are locked with `FOR UPDATE SKIP
/// LOCKED`, so any number of API and worker processes can relay at once
/// without publishing a row twice concurrently; a crash between the confirm
/// and the commit publishes a row again later, which the idempotent handlers
/// absorb. Returns how many rows were published.
pub async fn relay_once(
    pool: &deadpool_postgres::Pool,
    publisher: &crate::broker::Publisher,
    batch: i64,
) -> Result<usize, RelayError> {
    let mut client = pool.get().await.map_err(DbError::from)?;
    let tx = client.transaction().await.map_err(DbError::from)?;
    let take = tx
        .prepare_cached(
            "SELECT id, exchange, routing_key, message_id, correlation_id, payload::text, \
                    extract(epoch FROM now() - created_at)::float8 AS waited_secs \
             FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .await
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
    if let Err(e) = publisher.publish_all(messages).await {
        // Keep the rows unsent, but say why on them (for operators).
        tx.rollback().await.map_err(DbError::from)?;
        let text = e.to_string();
        let _ = client
            .execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = $2 WHERE id = ANY($1) AND published_at IS NULL",
                &[&ids, &text],
            )
            .await;
        return Err(e.into());
    }
    let mark = tx
        // `published_at IS NULL` lets this use the `outbox_pending` index: the
        // table's key is (user_id, id), and without it every relay batch
        // scanned the whole outbox, published rows included (kept 7 days).
        .prepare_cached(
            "UPDATE outbox SET published_at = now() WHERE id = ANY($1) AND published_at IS NULL",
        )
        .await
        .map_err(DbError::from)?;
    tx.execute(&mark, &[&ids]).await.map_err(DbError::from)?;
    tx.commit().await.map_err(DbError::from)?;
    for row in &rows {
        metrics::histogram!("penora_outbox_relay_lag_seconds")
            .record(row.get::<_, f64>("waited_secs"));
    }
    metrics::counter!("penora_outbox_published_total").increment(rows.len() as u64);
    Ok(rows.len())
}

/// Publishes until the outbox is empty or an error stops it.
pub async fn relay_all(
    pool: &deadpool_postgres::Pool,
    publisher: &crate::broker::Publisher,
) -> Result<usize, RelayError> {
    const BATCH: i64 = 200;
    let mut total = 0;
    loop {
        let n = relay_once(pool, publisher, BATCH).await?;
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

/// Number of waiting rows and the age of the oldest, in seconds.
pub async fn backlog(client: &impl GenericClient) -> Result<(i64, f64), DbError> {
    let row = client
        .query_one(
            "SELECT count(*) AS waiting, \
                    coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest_secs \
             FROM outbox WHERE published_at IS NULL",
            &[],
        )
        .await?;
    Ok((row.get("waiting"), row.get("oldest_secs")))
}

/// Deletes rows published more than `days` days ago; returns how many.
pub async fn prune(client: &impl GenericClient, days: i32) -> Result<u64, DbError> {
    Ok(client
        .execute(
            "DELETE FROM outbox WHERE published_at < now() - make_interval(days => $1)",
            &[&days],
        )
        .await?)
}

/// Publishes the outbox until `stop` fires: at once when `wake` is notified
/// (by the process that committed jobs), and every second.
/// While the broker is away it backs off (up to 10 s between tries) and the
/// rows wait safely. Used by the API (right after its commits) and by the
/// worker (the sweep that catches whatever the API could not publish).
pub async fn publish_loop(
    pool: deadpool_postgres::Pool,
    publisher: std::sync::Arc<crate::broker::Publisher>,
    wake: std::sync::Arc<tokio::sync::Notify>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut failures: u32 = 0;
    let mut gauges_at: Option<std::time::Instant> = None;
    while !stop.is_cancelled() {
        match relay_all(&pool, &publisher).await {
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
            && let Ok((pending, age)) = backlog(&client).await
        {
            gauges_at = Some(std::time::Instant::now());
            metrics::gauge!("penora_outbox_pending_rows").set(pending as f64);
            metrics::gauge!("penora_outbox_oldest_age_seconds").set(age);
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
