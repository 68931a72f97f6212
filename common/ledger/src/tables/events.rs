//! `processed_events`: an event from ImageGene is handled once per user and
//! event id, recorded in the commit of what it did (the one home of that
//! rule: refunds and settlements both read and write it here).

use std::collections::HashMap;

use deadpool_postgres::Transaction;
use penora_domain::UserId;
use penora_store::DbError;

use super::column;

/// An event recorded as handled (`processed_events`), with what it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandledEvent {
    /// Whose.
    pub user_id: UserId,
    /// The event's id.
    pub event_id: String,
    /// `failed` or `succeeded`.
    pub kind: &'static str,
    /// What handling it did.
    pub outcome: String,
}

/// The events of `wanted` handled before, with what each did.
pub async fn seen(
    tx: &Transaction<'_>,
    wanted: &[(&UserId, &str)],
) -> Result<HashMap<(UserId, String), String>, DbError> {
    if wanted.is_empty() {
        return Ok(HashMap::new());
    }
    let users: Vec<&str> = wanted.iter().map(|(u, _)| u.as_str()).collect();
    let ids: Vec<&str> = wanted.iter().map(|(_, e)| *e).collect();
    let stmt = tx
        .prepare_cached(
            "SELECT user_id, event_id, outcome FROM processed_events \
             WHERE (user_id, event_id) IN (SELECT * FROM unnest($1::text[], $2::text[])) \
               AND user_id = ANY($1)",
        )
        .await?;
    let mut out = HashMap::new();
    for r in tx.query(&stmt, &[&users, &ids]).await? {
        out.insert(
            (column(&r, "user_id")?, column(&r, "event_id")?),
            column(&r, "outcome")?,
        );
    }
    Ok(out)
}

/// Records `events` as handled, with what each did.
pub async fn record(tx: &Transaction<'_>, events: &[HandledEvent]) -> Result<(), DbError> {
    if events.is_empty() {
        return Ok(());
    }
    let users: Vec<&str> = events.iter().map(|e| e.user_id.as_str()).collect();
    let ids: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind).collect();
    let outcomes: Vec<&str> = events.iter().map(|e| e.outcome.as_str()).collect();
    let stmt = tx
        .prepare_cached(
            "INSERT INTO processed_events (user_id, event_id, kind, outcome) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) \
             ON CONFLICT DO NOTHING",
        )
        .await?;
    tx.execute(&stmt, &[&users, &ids, &kinds, &outcomes])
        .await?;
    Ok(())
}
