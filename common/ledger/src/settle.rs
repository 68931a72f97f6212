//! Settlements: a reservation becomes final, its credits spent.
//!
//! Rules: idempotent (settling a settled reservation changes nothing, and a
//! refunded one stays refunded); the account row is locked before the
//! reservation, as every movement does; the `settle` ledger row (amount 0)
//! and its audit job commit with the state change, and so does the record of
//! the success event that asked for it (`processed_events`); what a
//! settlement for less gives back is judged against the refund window like
//! a refund ([`super::window`]): after the window, a reservation can only be
//! settled in full; a request without `app_name` names the user's only
//! reservation with its code, as a refund does.

use penora_domain::SettledBy;
use std::borrow::Cow;

use deadpool_postgres::Client;
use serde::Serialize;

use super::{
    LedgerError, NewEntry, count_moved, key_of, lock_account,
    lots::{Plan, drawn_from, due_lots},
    refund::{Returned, give_back_to_lots},
    state_of,
    window::{self, EventTime, Verdict},
};
use penora_domain::{AppName, EntryKind, ProjectCode, ReservationState, UserId};

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
    let request = Settle {
        user_id,
        app_name: Some(app_name),
        project_code,
        by,
        reason,
        charge: None,
        reference: None,
        correlation_id,
        event_id,
        event_time: None,
    };
    Ok(settle_for(client, &request).await?.result)
}

/// A settlement, possibly for less than what is held (contract §13).
#[derive(Debug, Clone)]
pub struct Settle<'a> {
    /// Whose reservation.
    pub user_id: &'a UserId,
    /// The reservation's app; when `None`, the user's only reservation
    /// with this code.
    pub app_name: Option<&'a AppName>,
    /// The reservation's key.
    pub project_code: &'a ProjectCode,
    /// Why it is settled: final, or only its window passing.
    pub by: SettledBy,
    /// Why, for people.
    pub reason: &'a str,
    /// How many of the credits still held are charged; the rest is
    /// refunded in the same transaction. `None`: all of them.
    pub charge: Option<i64>,
    /// The settlement's reference, kept on its ledger entry.
    pub reference: Option<&'a str>,
    /// The request id, carried to the audit jobs.
    pub correlation_id: Option<&'a str>,
    /// The `generation.succeeded` event that asks for it.
    pub event_id: Option<&'a str>,
    /// When that event happened, as far as it is believed: what the
    /// settlement gives back is judged at it ([`super::window`]). `None`
    /// (an HTTP request): now.
    pub event_time: Option<EventTime>,
}

/// What a settlement did.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SettleReceipt {
    /// How it ended.
    #[serde(skip)]
    #[schema(ignore)]
    pub result: SettleResult,
    /// Whose credits.
    pub user_id: String,
    /// The reservation's app.
    pub app_name: String,
    /// The reservation's key.
    pub project_code: String,
    /// The reservation's state now: `settled`, or `refunded` when nothing
    /// was charged.
    #[schema(value_type = String, example = "settled")]
    pub reservation_status: ReservationState,
    /// Credits the reservation finally cost.
    pub credits_charged: i64,
    /// Credits this settlement gave back (what was held beyond the charge).
    pub credits_refunded: i64,
    /// Credits given back by every refund of the reservation.
    pub refunded_total: i64,
    /// What the user can spend now.
    pub new_balance: i64,
}

/// Settles a reservation, charging `charge` of what it still holds and
/// refunding the rest to the lots it came from, in one transaction.
pub async fn settle_for(client: &mut Client, s: &Settle<'_>) -> Result<SettleReceipt, LedgerError> {
    let user = s.user_id.as_str();
    let code = s.project_code.as_str();
    let tx = client.transaction().await?;
    let Some(mut balance) = lock_account(&tx, user).await? else {
        return Err(LedgerError::NotFound(format!(
            "no account for user {user:?}"
        )));
    };
    let app = match s.app_name {
        Some(app) => app.to_string(),
        None => only_app(&tx, user, code).await?,
    };
    let app = app.as_str();
    let select = tx
        .prepare_cached(
            "SELECT state, amount, refunded_amount, settled_by, created_at, refundable_until, \
                    now() AS now \
             FROM reservations \
             WHERE app_name = $1 AND project_code = $2 AND user_id = $3 FOR UPDATE",
        )
        .await?;
    let Some(row) = tx.query_opt(&select, &[&app, &code, &user]).await? else {
        return Err(LedgerError::NotFound(format!(
            "no reservation with project_code {code:?} of app {app:?} for this user"
        )));
    };
    let reserved: i64 = row.get("amount");
    let refunded: i64 = row.get("refunded_amount");
    let state = state_of(row.get("state"))?;
    let window_only = row.get::<_, Option<&str>>("settled_by") == Some("window");
    let left = reserved - refunded;
    let mut receipt = SettleReceipt {
        result: SettleResult::AlreadySettled,
        user_id: user.to_owned(),
        app_name: app.to_owned(),
        project_code: code.to_owned(),
        reservation_status: state,
        credits_charged: left,
        credits_refunded: 0,
        refunded_total: refunded,
        new_balance: balance,
    };
    if state == ReservationState::Refunded {
        receipt.result = SettleResult::AlreadyRefunded;
        receipt.credits_charged = 0;
        return Ok(receipt);
    }
    let charge = s.charge.unwrap_or(left);
    if charge > left {
        return Err(LedgerError::Invalid {
            field: "amount",
            reason: format!(
                "the reservation holds {left} credits (of {reserved}); it cannot be settled for {charge}"
            ),
        });
    }
    if state == ReservationState::Settled && !(window_only && s.by == SettledBy::Final) {
        if s.charge.is_some_and(|c| c != left) {
            return Err(LedgerError::IdempotencyConflict(format!(
                "reservation {code:?} was already settled for {left} credits"
            )));
        }
        record_event(&tx, user, s.event_id, "already settled").await?;
        tx.commit().await?;
        return Ok(receipt);
    }

    let rest = left - charge;
    if rest > 0 {
        // Giving back is a refund: only inside the window.
        let verdict = window::judge(
            s.event_time.as_ref(),
            row.get("created_at"),
            row.get("refundable_until"),
            row.get("now"),
        );
        if verdict != Verdict::Open {
            return Err(match verdict {
                Verdict::Closed => LedgerError::NotRefundable(format!(
                    "the refund window of reservation {code:?} closed at {}; it can only be settled in full ({left} credits)",
                    penora_domain::timefmt::rfc3339_millis(row.get("refundable_until"))
                )),
                other => window::refused(
                    other,
                    code,
                    row.get("created_at"),
                    row.get("refundable_until"),
                ),
            });
        }
    }

    // Lots past their expiry first, so that the balances below are what the
    // user can spend; then what is not charged goes back to its lots.
    let mut plan = Plan::default();
    if let Some(lots) = due_lots(&tx, &[user]).await?.get(user) {
        plan.expire_due(user, lots, &mut balance, s.correlation_id)?;
    }
    if rest > 0 {
        let drawn = drawn_from(&tx, &[(user, app, code)]).await?;
        let lots = drawn
            .get(&key_of(user, app, code))
            .map(Vec::as_slice)
            .unwrap_or_default();
        give_back_to_lots(
            &mut plan,
            Returned {
                user,
                app,
                code,
                amount: rest,
                reason: Some(s.reason),
                reference: None,
                correlation_id: s.correlation_id,
            },
            lots,
            &mut balance,
        )?;
    }
    let refunded_total = refunded + rest;
    let fully_refunded = refunded_total == reserved;
    let new_state = if fully_refunded {
        ReservationState::Refunded
    } else {
        ReservationState::Settled
    };
    if state != ReservationState::Settled && !fully_refunded {
        plan.entry(NewEntry {
            user_id: user,
            kind: EntryKind::Settle,
            amount: 0,
            balance_after: balance,
            app_name: Cow::Borrowed(app),
            description: Some(s.reason),
            project_code: Some(code),
            reference: s.reference,
            correlation_id: s.correlation_id,
        });
    }
    let written = plan.apply(&tx).await?;
    let at = written
        .last()
        .map(|&(_, at)| at)
        .unwrap_or_else(time::OffsetDateTime::now_utc);
    let settled_by = if state == ReservationState::Settled {
        // A window settlement made final: it keeps its time.
        "final"
    } else {
        s.by.as_str()
    };
    tx.execute(
        "UPDATE reservations SET state = $4, refunded_amount = $5, \
                settled_at = CASE WHEN state = 'settled' THEN settled_at \
                                  WHEN $4 = 'settled' THEN $6::timestamptz END, \
                settle_reason = CASE WHEN state = 'settled' THEN settle_reason \
                                     WHEN $4 = 'settled' THEN $7 END, \
                settled_by = CASE WHEN state = 'settled' AND $4 = 'settled' THEN $8 \
                                  WHEN state = 'settled' THEN settled_by \
                                  WHEN $4 = 'settled' THEN $8 END, \
                refunded_at = CASE WHEN $4 = 'refunded' THEN $6 END, \
                refund_reason = CASE WHEN $4 = 'refunded' THEN $7 END, \
                balance_after_refund = CASE WHEN $4 = 'refunded' THEN $9::bigint END \
         WHERE app_name = $1 AND project_code = $2 AND user_id = $3",
        &[
            &app,
            &code,
            &user,
            &new_state.as_str(),
            &refunded_total,
            &at,
            &s.reason,
            &settled_by,
            &balance,
        ],
    )
    .await?;
    let was_settled = state == ReservationState::Settled;
    let outcome = if was_settled && rest == 0 {
        "already settled"
    } else {
        "settled"
    };
    record_event(&tx, user, s.event_id, outcome).await?;
    tx.commit().await?;
    if !was_settled {
        count_moved("settled", app, charge);
    }
    if rest > 0 {
        count_moved("refunded", app, rest);
    }
    receipt.result = if was_settled && rest == 0 {
        SettleResult::AlreadySettled
    } else {
        SettleResult::Settled
    };
    receipt.reservation_status = new_state;
    receipt.credits_charged = charge;
    receipt.credits_refunded = rest;
    receipt.refunded_total = refunded_total;
    receipt.new_balance = balance;
    Ok(receipt)
}

/// The app of the user's only reservation with `code`; several apps are
/// an error that asks for `app_name` (as for a refund).
async fn only_app(
    tx: &deadpool_postgres::Transaction<'_>,
    user: &str,
    code: &str,
) -> Result<String, LedgerError> {
    let rows = tx
        .query(
            "SELECT app_name FROM reservations WHERE user_id = $1 AND project_code = $2",
            &[&user, &code],
        )
        .await?;
    match rows.as_slice() {
        [] => Err(LedgerError::NotFound(format!(
            "no reservation with project_code {code:?} for this user"
        ))),
        [row] => Ok(row.try_get("app_name")?),
        _ => Err(LedgerError::Invalid {
            field: "app_name",
            reason: format!(
                "project_code {code:?} names reservations of several apps; say which with app_name"
            ),
        }),
    }
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
