//! Settlements: a reservation becomes final, its credits spent.
//!
//! Three steps ([`load`] → [`decide`] → `plan::apply`), as every movement.
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

use deadpool_postgres::{Client, Transaction};
use penora_domain::{EntryKind, ReservationState, SettledBy};
use penora_store::DbError;
use serde::Serialize;

use crate::{
    LedgerError, OnBusy, count_moved,
    plan::{self, HandledEvent, NewEntry, Plan, ReservationChange, Returned},
    snapshot::{ResKey, Reservation, Snapshot, res_key},
    tables,
    window::{self, EventTime, Verdict},
};
use penora_domain::{AppName, ProjectCode, UserId};

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

/// Locks the account, then the reservation `s` names (its app's, or the
/// user's only one with its code), and reads what deciding needs: the
/// account's lots, the reservation, the lots it drew from, whether its event
/// was seen.
pub async fn load(tx: &Transaction<'_>, s: &Settle<'_>) -> Result<(Snapshot, ResKey), LedgerError> {
    let user = s.user_id;
    let mut snap = tables::locked_accounts(tx, &[user.as_str()], OnBusy::Wait).await?;
    if !snap.accounts.contains_key(user) {
        return Err(LedgerError::NotFound(format!(
            "no account for user {:?}",
            user.as_str()
        )));
    }
    let app = match s.app_name {
        Some(app) => app.clone(),
        None => {
            let apps = tables::reservations::apps_of(tx, &[(user, s.project_code)])
                .await?
                .remove(&(user.clone(), s.project_code.clone()))
                .unwrap_or_default();
            match apps.as_slice() {
                [] => {
                    return Err(LedgerError::NotFound(format!(
                        "no reservation with project_code {:?} for this user",
                        s.project_code.as_str()
                    )));
                }
                [one] => one.clone(),
                _ => {
                    return Err(LedgerError::Invalid {
                        field: "app_name",
                        reason: format!(
                            "project_code {:?} names reservations of several apps; say which with app_name",
                            s.project_code.as_str()
                        ),
                    });
                }
            }
        }
    };
    let key = res_key(user, &app, s.project_code);
    snap.reservations = tables::reservations::by_keys(tx, std::slice::from_ref(&key), true).await?;
    snap.drawn = tables::lots::drawn_from(tx, std::slice::from_ref(&key), snap.now).await?;
    if let Some(event_id) = s.event_id {
        snap.events = tables::events::seen(tx, &[(user, event_id)]).await?;
    }
    Ok((snap, key))
}

/// Decides settlement `s` of reservation `key` against `snap`: its
/// answer, and what it writes. Pure.
pub fn decide(
    snap: &Snapshot,
    key: &ResKey,
    s: &Settle<'_>,
) -> Result<(SettleReceipt, Plan), LedgerError> {
    let (user, app, code) = (&key.0, &key.1, &key.2);
    if let Some(first) = s
        .event_id
        .and_then(|e| snap.events.get(&(user.clone(), e.to_owned())))
    {
        return Err(LedgerError::EventSeen {
            first_outcome: first.clone(),
        });
    }
    let account = snap
        .accounts
        .get(user)
        .ok_or_else(|| LedgerError::NotFound(format!("no account for user {:?}", user.as_str())))?;
    let Some(row) = snap.reservations.get(key) else {
        return Err(LedgerError::NotFound(format!(
            "no reservation with project_code {:?} of app {:?} for this user",
            code.as_str(),
            app.as_str()
        )));
    };
    let mut plan = Plan::default();
    let left = row.amount - row.refunded;
    let mut receipt = SettleReceipt {
        result: SettleResult::AlreadySettled,
        user_id: user.to_string(),
        app_name: app.to_string(),
        project_code: code.to_string(),
        reservation_status: row.state,
        credits_charged: left,
        credits_refunded: 0,
        refunded_total: row.refunded,
        new_balance: account.balance,
    };
    match earlier(snap, row, s, code)? {
        Some(SettleResult::AlreadyRefunded) => {
            receipt.result = SettleResult::AlreadyRefunded;
            receipt.credits_charged = 0;
            return Ok((receipt, plan));
        }
        Some(_) => {
            record(&mut plan, s, user, "already settled");
            return Ok((receipt, plan));
        }
        None => {}
    }
    let charge = s.charge.unwrap_or(left);
    let rest = left - charge;
    // Lots past their expiry first, so that the balances below are what the
    // user can spend; then what is not charged goes back to its lots.
    let (mut balance, _) = plan
        .expire_all(snap, [(user, s.correlation_id)])?
        .remove(user)
        .ok_or_else(|| DbError::Invariant("a settlement of an account not locked".into()))?;
    if rest > 0 {
        let mut drawn = snap.drawn.get(key).cloned().unwrap_or_default();
        plan.give_back(
            Returned {
                user,
                app,
                code,
                amount: rest,
                reason: Some(s.reason),
                reference: None,
                correlation_id: s.correlation_id,
                acted_by: None,
                made_at: row.created_at,
            },
            &mut drawn,
            &mut balance,
        )?;
    }
    let change = change(snap.now, key, row, s, rest, balance);
    let was_settled = row.state == ReservationState::Settled;
    if !was_settled && change.state == ReservationState::Settled {
        plan.entry(NewEntry {
            user_id: user.clone(),
            kind: EntryKind::Settle,
            amount: 0,
            balance_after: balance,
            app_name: app.clone(),
            description: Some(s.reason.to_owned()),
            project_code: Some(code.clone()),
            reference: s.reference.map(str::to_owned),
            correlation_id: s.correlation_id.map(str::to_owned),
            acted_by: None,
        });
    }
    let already = was_settled && rest == 0;
    record(
        &mut plan,
        s,
        user,
        if already {
            "already settled"
        } else {
            "settled"
        },
    );
    receipt.result = if already {
        SettleResult::AlreadySettled
    } else {
        SettleResult::Settled
    };
    receipt.reservation_status = change.state;
    receipt.credits_charged = charge;
    receipt.credits_refunded = rest;
    receipt.refunded_total = change.refunded;
    receipt.new_balance = balance;
    plan.changes.push(change);
    Ok((receipt, plan))
}

/// Records the success event that asked for the settlement as handled.
fn record(plan: &mut Plan, s: &Settle<'_>, user: &UserId, outcome: &str) {
    if let Some(event_id) = s.event_id {
        plan.events.push(HandledEvent {
            user_id: user.clone(),
            event_id: event_id.to_owned(),
            kind: "succeeded",
            outcome: outcome.to_owned(),
        });
    }
}

/// Whether settlement `s` finds the reservation settled or refunded before
/// (`Some`: nothing changes), or is refused: a charge above what it holds,
/// another charge than the settlement before, or a charge below it (a
/// refund of the rest) after the window. `None`: it settles now.
fn earlier(
    snap: &Snapshot,
    row: &Reservation,
    s: &Settle<'_>,
    code: &ProjectCode,
) -> Result<Option<SettleResult>, LedgerError> {
    let left = row.amount - row.refunded;
    if row.state == ReservationState::Refunded {
        return Ok(Some(SettleResult::AlreadyRefunded));
    }
    let charge = s.charge.unwrap_or(left);
    if charge > left {
        return Err(LedgerError::Invalid {
            field: "amount",
            reason: format!(
                "the reservation holds {left} credits (of {}); it cannot be settled for {charge}",
                row.amount
            ),
        });
    }
    // A settlement by the window only is made final by a final one.
    if row.state == ReservationState::Settled
        && !(row.settled_by_window() && s.by == SettledBy::Final)
    {
        if charge != left {
            return Err(LedgerError::IdempotencyConflict(format!(
                "reservation {:?} was already settled for {left} credits",
                code.as_str()
            )));
        }
        return Ok(Some(SettleResult::AlreadySettled));
    }
    if charge == left {
        return Ok(None);
    }
    // Giving back is a refund: only inside the window.
    match window::judge(
        s.event_time.as_ref(),
        row.created_at,
        row.refundable_until,
        snap.now,
    ) {
        Verdict::Open => Ok(None),
        Verdict::Closed => Err(LedgerError::NotRefundable(format!(
            "the refund window of reservation {:?} closed at {}; it can only be settled in full ({left} credits)",
            code.as_str(),
            penora_domain::timefmt::rfc3339_millis(row.refundable_until)
        ))),
        other => Err(window::refused(
            other,
            code.as_str(),
            row.created_at,
            row.refundable_until,
        )),
    }
}

/// The reservation after a settlement that gives `rest` back: `settled`
/// (or `refunded`, when nothing was charged); a window settlement made
/// final keeps its time and reason.
fn change(
    now: time::OffsetDateTime,
    key: &ResKey,
    row: &Reservation,
    s: &Settle<'_>,
    rest: i64,
    balance: i64,
) -> ReservationChange {
    let refunded = row.refunded + rest;
    let fully_refunded = refunded == row.amount;
    let was_settled = row.state == ReservationState::Settled;
    let settled = !fully_refunded;
    ReservationChange {
        user_id: key.0.clone(),
        app_name: key.1.clone(),
        project_code: key.2.clone(),
        state: if fully_refunded {
            ReservationState::Refunded
        } else {
            ReservationState::Settled
        },
        refunded,
        settled_at: if was_settled {
            row.settled_at
        } else {
            settled.then_some(now)
        },
        settle_reason: if was_settled {
            row.settle_reason.clone()
        } else {
            settled.then(|| s.reason.to_owned())
        },
        settled_by: match (was_settled, settled) {
            (true, true) => Some(SettledBy::Final),
            (true, false) => row.settled_by,
            (false, true) => Some(s.by),
            (false, false) => None,
        },
        refunded_at: fully_refunded.then_some(now),
        refund_reason: fully_refunded.then(|| s.reason.to_owned()),
        balance_after_refund: fully_refunded.then_some(balance),
    }
}

/// Settles a reservation, charging `charge` of what it still holds and
/// refunding the rest to the lots it came from, in one transaction.
pub async fn settle_for(client: &mut Client, s: &Settle<'_>) -> Result<SettleReceipt, LedgerError> {
    let tx = client.transaction().await?;
    let (snap, key) = load(&tx, s).await?;
    let (receipt, plan) = decide(&snap, &key, s)?;
    if plan::commit(tx, &plan, &snap).await?.is_some() && receipt.result == SettleResult::Settled {
        if receipt.credits_charged > 0 && receipt.reservation_status == ReservationState::Settled {
            count_moved("settled", &receipt.app_name, receipt.credits_charged);
        }
        if receipt.credits_refunded > 0 {
            count_moved("refunded", &receipt.app_name, receipt.credits_refunded);
        }
    }
    Ok(receipt)
}
