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
use serde::Serialize;

use crate::{
    LedgerError, OnBusy, count_moved,
    plan::{self, HandledEvent, NewEntry, Plan, ReservationChange, Returned},
    snapshot::{ResKey, Snapshot, res_key},
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
    let mut plan = Plan::default();
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
    let record = |plan: &mut Plan, outcome: &str| {
        if let Some(event_id) = s.event_id {
            plan.events.push(HandledEvent {
                user_id: user.clone(),
                event_id: event_id.to_owned(),
                kind: "succeeded",
                outcome: outcome.to_owned(),
            });
        }
    };
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
    if row.state == ReservationState::Refunded {
        receipt.result = SettleResult::AlreadyRefunded;
        receipt.credits_charged = 0;
        return Ok((receipt, plan));
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
    let window_only = row.settled_by_window();
    if row.state == ReservationState::Settled && !(window_only && s.by == SettledBy::Final) {
        if s.charge.is_some_and(|c| c != left) {
            return Err(LedgerError::IdempotencyConflict(format!(
                "reservation {:?} was already settled for {left} credits",
                code.as_str()
            )));
        }
        record(&mut plan, "already settled");
        return Ok((receipt, plan));
    }
    let rest = left - charge;
    if rest > 0 {
        // Giving back is a refund: only inside the window.
        let verdict = window::judge(
            s.event_time.as_ref(),
            row.created_at,
            row.refundable_until,
            snap.now,
        );
        if verdict != Verdict::Open {
            return Err(match verdict {
                Verdict::Closed => LedgerError::NotRefundable(format!(
                    "the refund window of reservation {:?} closed at {}; it can only be settled in full ({left} credits)",
                    code.as_str(),
                    penora_domain::timefmt::rfc3339_millis(row.refundable_until)
                )),
                other => {
                    window::refused(other, code.as_str(), row.created_at, row.refundable_until)
                }
            });
        }
    }
    // Lots past their expiry first, so that the balances below are what the
    // user can spend; then what is not charged goes back to its lots.
    let mut balance = account.balance;
    let mut lots = account.lots.clone();
    plan.expire_due(user, &mut lots, &mut balance, snap.now, s.correlation_id)?;
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
            },
            &mut drawn,
            &mut balance,
        )?;
    }
    let refunded_total = row.refunded + rest;
    let fully_refunded = refunded_total == row.amount;
    let new_state = if fully_refunded {
        ReservationState::Refunded
    } else {
        ReservationState::Settled
    };
    let was_settled = row.state == ReservationState::Settled;
    if !was_settled && !fully_refunded {
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
        });
    }
    let settled = new_state == ReservationState::Settled;
    plan.changes.push(ReservationChange {
        user_id: user.clone(),
        app_name: app.clone(),
        project_code: code.clone(),
        state: new_state,
        refunded: refunded_total,
        // A window settlement made final keeps its time and reason.
        settled_at: if was_settled {
            row.settled_at
        } else if settled {
            Some(snap.now)
        } else {
            None
        },
        settle_reason: if was_settled {
            row.settle_reason.clone()
        } else if settled {
            Some(s.reason.to_owned())
        } else {
            None
        },
        settled_by: match (was_settled, settled) {
            (true, true) => Some(SettledBy::Final),
            (true, false) => row.settled_by,
            (false, true) => Some(s.by),
            (false, false) => None,
        },
        refunded_at: fully_refunded.then_some(snap.now),
        refund_reason: fully_refunded.then(|| s.reason.to_owned()),
        balance_after_refund: fully_refunded.then_some(balance),
    });
    let already = was_settled && rest == 0;
    record(
        &mut plan,
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
    receipt.reservation_status = new_state;
    receipt.credits_charged = charge;
    receipt.credits_refunded = rest;
    receipt.refunded_total = refunded_total;
    receipt.new_balance = balance;
    Ok((receipt, plan))
}

/// Settles a reservation, charging `charge` of what it still holds and
/// refunding the rest to the lots it came from, in one transaction.
pub async fn settle_for(client: &mut Client, s: &Settle<'_>) -> Result<SettleReceipt, LedgerError> {
    let tx = client.transaction().await?;
    let (snap, key) = load(&tx, s).await?;
    let (receipt, plan) = decide(&snap, &key, s)?;
    if plan.is_empty() {
        tx.rollback().await?;
        return Ok(receipt);
    }
    plan::apply(&tx, &plan).await?;
    tx.commit().await?;
    if receipt.result == SettleResult::Settled {
        if receipt.credits_charged > 0 && receipt.reservation_status == ReservationState::Settled {
            count_moved("settled", &receipt.app_name, receipt.credits_charged);
        }
        if receipt.credits_refunded > 0 {
            count_moved("refunded", &receipt.app_name, receipt.credits_refunded);
        }
    }
    Ok(receipt)
}
