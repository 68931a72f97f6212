//! The transactional outbox.
//!
//! Rule: a job is inserted here inside the transaction that makes the change it
//! describes, so a committed change always has its job, whatever happens to the
//! broker or the process afterwards. Publishing happens after the commit.

use deadpool_postgres::GenericClient;
use serde::Serialize;
use uuid::Uuid;

use crate::{db::DbError, messages::JOBS_EXCHANGE};

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
    let stmt = tx
        .prepare_cached(
            "INSERT INTO outbox (user_id, exchange, routing_key, message_id, correlation_id, payload) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .await?;
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
