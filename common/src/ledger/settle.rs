//! Settlements: a reservation becomes final, its credits spent.
//!
//! Rules: idempotent (settling a settled reservation changes nothing, and a
//! refunded one stays refunded); the account row is locked before the
//! reservation, as every movement does; the `settle` ledger row (amount 0)
//! and its audit job commit with the state change, and so does the record of
//! the success event that asked for it (`processed_events`).

use deadpool_postgres::Client;

use super::{LedgerError, NewEntry, count_moved, state_of, write_entries};
use crate::domain::{AppName, EntryKind, ProjectCode, ReservationState, UserId};

/// Why a reservation is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettledBy {
    /// Its refund window passed (the timer): a failure event from inside
    /// the window may still refund it (CONTRACT §11).
    Window,
    /// A success event, a save naming it, an explicit settlement: final.
    Final,
}

impl SettledBy {
    fn as_str(self) -> &'static str {
        match self {
            Self::Window => "window",
            Self::Final => "final",
        }
    }
}

/// How a settle request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleResult {
    /// The reservation is now settled.
    Settled,
    /// It was settled before; nothing changed.
    AlreadySettled,
    /// It was refunded before; it stays refunded.
    AlreadyRefunded,
}

/// Settles a reservation (its credits are spent). Idempotent; a final
/// settlement of a reservation the window settled makes it final.
pub async fn settle(
    client: &mut Client,
    user_id: &UserId,
    app_name: &AppName,
    project_code: &ProjectCode,
    (by, reason): (SettledBy, &str),
    correlation_id: Option<&str>,
    event_id: Option<&str>,
) -> Result<SettleResult, LedgerError> {
    let user = user_id.as_str();
    let tx = client.transaction().await?;
    let lock = tx
        .prepare_cached("SELECT balance FROM accounts WHERE user_id = $1 FOR NO KEY UPDATE")
        .await?;
    let Some(account) = tx.query_opt(&lock, &[&user]).await? else {
        return Err(LedgerError::NotFound(format!(
            "no account for user {user:?}"
        )));
    };
    let select = tx
        .prepare_cached(
            "SELECT state, amount, settled_by FROM reservations \
             WHERE app_name = $1 AND project_code = $2 AND user_id = $3 FOR UPDATE",
        )
        .await?;
    let Some(row) = tx
        .query_opt(
            &select,
            &[&app_name.as_str(), &project_code.as_str(), &user],
        )
        .await?
    else {
        return Err(LedgerError::NotFound(format!(
            "no reservation with project_code {:?} of app {:?} for this user",
            project_code.as_str(),
            app_name.as_str()
        )));
    };
    match state_of(row.get("state"))? {
        ReservationState::Settled => {
            if by == SettledBy::Final && row.get::<_, Option<&str>>("settled_by") == Some("window")
            {
                tx.execute(
                    "UPDATE reservations SET settled_by = 'final' \
                     WHERE user_id = $1 AND app_name = $2 AND project_code = $3",
                    &[&user, &app_name.as_str(), &project_code.as_str()],
                )
                .await?;
            }
            record_event(&tx, user, event_id, "already settled").await?;
            tx.commit().await?;
            return Ok(SettleResult::AlreadySettled);
        }
        ReservationState::Refunded => return Ok(SettleResult::AlreadyRefunded),
        ReservationState::Reserved => {}
    }
    let written = write_entries(
        &tx,
        &[NewEntry {
            user_id: user,
            kind: EntryKind::Settle,
            amount: 0,
            balance_after: account.get("balance"),
            app_name: app_name.as_str(),
            description: Some(reason),
            project_code: project_code.as_str(),
            correlation_id,
        }],
    )
    .await?;
    let at = written.first().map(|&(_, at)| at);
    tx.execute(
        "UPDATE reservations SET state = 'settled', settled_at = $3, settle_reason = $4, \
                settled_by = $5 \
         WHERE app_name = $1 AND project_code = $2 AND user_id = $6",
        &[
            &app_name.as_str(),
            &project_code.as_str(),
            &at,
            &reason,
            &by.as_str(),
            &user,
        ],
    )
    .await?;
    record_event(&tx, user, event_id, "settled").await?;
    tx.commit().await?;
    count_moved("settled", app_name.as_str(), row.get("amount"));
    Ok(SettleResult::Settled)
}

/// Records a `generation.succeeded` event as handled, with what it did, in
/// the settlement's own transaction.
async fn record_event(
    tx: &deadpool_postgres::Transaction<'_>,
    user: &str,
    event_id: Option<&str>,
    outcome: &str,
) -> Result<(), LedgerError> {
    if let Some(event_id) = event_id {
        tx.execute(
            "INSERT INTO processed_events (user_id, event_id, kind, outcome) \
             VALUES ($1, $2, 'succeeded', $3) ON CONFLICT DO NOTHING",
            &[&user, &event_id, &outcome],
        )
        .await?;
    }
    Ok(())
}
