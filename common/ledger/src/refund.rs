//! Refunds (`refund-credits` and `generation.failed` events): a reservation's
//! credits come back, all that is left at once or in parts, each part once.
//!
//! One implementation for any number of requests: the worker hands the
//! events that arrived together to [`refund_all`]; a lone request
//! ([`refund`]) is a batch of one.
//!
//! Three steps ([`load`] → [`decide`] → `plan::apply`), as every movement.
//!
//! Rules, for each request of a batch:
//! * the account rows are locked first (in `user_id` order), then the
//!   reservations (in key order); the state change is one guarded `UPDATE`
//!   that the `reservations_one_way` trigger also enforces;
//! * a reservation gives back while it holds credits (`reserved` or
//!   `partially_refunded`) and is inside its window, in parts
//!   (`amount`, idempotent by `reference`) or all that is left; the same
//!   reference answers its first refund again; a whole refund asked again
//!   of a fully refunded reservation answers the refund that completed it;
//!   a settled one or one whose window closed is refused;
//! * the window is judged as [`super::window`] says: at the event's
//!   believed time for `generation.failed`, at the request's for HTTP; a
//!   reservation the timer settled because its window passed is still
//!   refunded by an event from inside the window (CONTRACT §11), every other
//!   settlement is final;
//! * a request without `app_name` names the user's only reservation with its
//!   code; several apps are an error that asks for `app_name`;
//! * an event's id is recorded in `processed_events`, with what it did, in
//!   the refund's own commit; an event seen before changes nothing and
//!   answers [`LedgerError::EventSeen`];
//! * two requests of one batch that name the same user and code, or the
//!   same event, are never in one transaction: the second starts the next
//!   batch, and is decided after the first commits.

use std::collections::{BTreeMap, HashSet};

use deadpool_postgres::{Client, Transaction};
use penora_domain::{AppName, ProjectCode, ReservationState, UserId};
use penora_store::DbError;
use serde::Serialize;
use time::OffsetDateTime;

use crate::{
    Answer, LedgerError, OnBusy, Outcome, Slots, answer_all, count_moved, only,
    plan::{self, HandledEvent, Plan, ReservationChange, Returned},
    slots,
    snapshot::{ResKey, Reservation, Snapshot, res_key},
    tables,
    window::{self, EventTime, Verdict},
};

/// A refund.
#[derive(Debug, Clone)]
pub struct Refund {
    /// Whose reservation.
    pub user_id: UserId,
    /// The reservation's key.
    pub project_code: ProjectCode,
    /// The reservation's app; when `None`, the user's only reservation with this code.
    pub app_name: Option<AppName>,
    /// Why, for people.
    pub reason: Option<String>,
    /// How many credits to give back (contract §13); `None`: all that is
    /// still refundable.
    pub amount: Option<i64>,
    /// What makes this refund idempotent: the same reference refunds once.
    /// `None`: the refund of whatever is left, once.
    pub reference: Option<String>,
    /// The id of the API key that asked for it, recorded on the entries.
    pub acted_by: Option<String>,
}

/// The answer to a refund.
#[derive(Debug, Clone, Serialize)]
pub struct RefundReceipt {
    /// Whose credits.
    pub user_id: String,
    /// How many came back.
    pub credits_refunded: i64,
    /// The balance right after the refund.
    pub new_balance: i64,
    /// The reservation's app.
    pub app_name: String,
    /// The reservation's key.
    pub project_code: String,
    /// `refunded` once nothing is left, `partially_refunded` before (or
    /// `settled`, for a reservation the window settled).
    pub reservation_status: ReservationState,
    /// Credits given back by every refund of the reservation so far.
    pub refunded_total: i64,
    /// Credits of the reservation still held (0 once refunded or settled).
    pub remaining_reserved: i64,
    /// The refund's reference.
    pub reference: Option<String>,
    /// Why.
    pub reason: Option<String>,
    /// When the refund was made.
    #[serde(serialize_with = "penora_domain::timefmt::serde_millis::serialize")]
    pub timestamp: OffsetDateTime,
}

/// One request of a batch.
#[derive(Debug, Clone)]
pub struct QueuedRefund {
    /// The refund.
    pub refund: Refund,
    /// The `generation.failed` event that asks for it, recorded in
    /// `processed_events` with the refund.
    pub event_id: Option<String>,
    /// The request id, carried to the audit job.
    pub correlation_id: Option<String>,
    /// When the event happened, as far as it is believed: it, not the time
    /// of processing, decides whether the refund is inside the window
    /// ([`super::window`]). `None` (an HTTP refund): now.
    pub event_time: Option<EventTime>,
}

/// Returns a reservation's credits, once. Asking again answers the first
/// refund's result.
pub async fn refund(
    client: &mut Client,
    r: &Refund,
    correlation_id: Option<&str>,
) -> Answer<RefundReceipt> {
    let queued = QueuedRefund {
        refund: r.clone(),
        event_id: None,
        correlation_id: correlation_id.map(str::to_owned),
        event_time: None,
    };
    refund_one(client, queued).await
}

/// Carries out one request (an event's refund, say) as a batch of one.
pub async fn refund_one(client: &mut Client, q: QueuedRefund) -> Answer<RefundReceipt> {
    only(refund_all(client, std::slice::from_ref(&q), OnBusy::Wait).await)
}

/// Refunds every one of `batch`, in order, in as few transactions as the
/// keys allow. Each answer is the one the request would have had alone, or
/// [`LedgerError::AccountBusy`] with [`OnBusy::Skip`] when another
/// transaction holds its account.
pub async fn refund_all(
    client: &mut Client,
    batch: &[QueuedRefund],
    on_busy: OnBusy,
) -> Vec<Answer<RefundReceipt>> {
    answer_all(
        client,
        batch,
        "refund",
        on_busy,
        |q| q.refund.user_id.as_str(),
        refund_once,
    )
    .await
}

/// The requests of `batch` that share its transaction: up to the first
/// that names a user and code, or an event, met before in the batch.
pub fn live(batch: &[QueuedRefund]) -> &[QueuedRefund] {
    let mut keys = HashSet::new();
    let mut events = HashSet::new();
    let n = batch
        .iter()
        .take_while(|q| {
            let r = &q.refund;
            let fresh_key = keys.insert((r.user_id.as_str(), r.project_code.as_str()));
            let fresh_event = q
                .event_id
                .as_deref()
                .is_none_or(|e| events.insert((r.user_id.as_str(), e)));
            fresh_key && fresh_event
        })
        .count();
    &batch[..n]
}

/// The reservations a request may name: its app's, or, without one, every
/// app's reservation of the user with its code.
fn candidates<'s>(s: &'s Snapshot, r: &Refund) -> Vec<(&'s ResKey, &'s Reservation)> {
    let mut found: Vec<_> = s
        .reservations
        .iter()
        .filter(|(k, _)| {
            k.0 == r.user_id
                && k.2 == r.project_code
                && r.app_name.as_ref().is_none_or(|app| k.1 == *app)
        })
        .collect();
    found.sort_by(|a, b| a.0.1.as_str().cmp(b.0.1.as_str()));
    found
}

/// Locks the accounts of `live` (then the reservations it names, in key
/// order) and reads what deciding it needs: the accounts' lots, the
/// reservations, the events seen, the refunds made under its references,
/// the refund that completed each refunded reservation, and the lots each
/// reservation drew from.
pub async fn load(
    tx: &Transaction<'_>,
    live: &[QueuedRefund],
    on_busy: OnBusy,
) -> Result<Snapshot, LedgerError> {
    let users: Vec<&str> = live.iter().map(|q| q.refund.user_id.as_str()).collect();
    let mut s = tables::locked_accounts(tx, &users, on_busy).await?;
    let open: Vec<&QueuedRefund> = live
        .iter()
        .filter(|q| s.accounts.contains_key(&q.refund.user_id))
        .collect();
    let unnamed: Vec<(&UserId, &ProjectCode)> = open
        .iter()
        .filter(|q| q.refund.app_name.is_none())
        .map(|q| (&q.refund.user_id, &q.refund.project_code))
        .collect();
    let mut apps = tables::reservations::apps_of(tx, &unnamed).await?;
    let mut keys: Vec<ResKey> = Vec::new();
    for q in &open {
        let r = &q.refund;
        match &r.app_name {
            Some(app) => keys.push(res_key(&r.user_id, app, &r.project_code)),
            None => {
                for app in apps
                    .remove(&(r.user_id.clone(), r.project_code.clone()))
                    .unwrap_or_default()
                {
                    keys.push(res_key(&r.user_id, &app, &r.project_code));
                }
            }
        }
    }
    s.reservations = tables::reservations::by_keys(tx, &keys, true).await?;
    let events: Vec<(&UserId, &str)> = live
        .iter()
        .filter_map(|q| Some((&q.refund.user_id, q.event_id.as_deref()?)))
        .collect();
    s.events = tables::events::seen(tx, &events).await?;
    let mut referenced: Vec<(&ResKey, &str)> = Vec::new();
    for q in &open {
        if let Some(reference) = q.refund.reference.as_deref() {
            for (key, _) in candidates(&s, &q.refund) {
                referenced.push((key, reference));
            }
        }
    }
    let refunds = tables::entries::refunds_by_reference(tx, &referenced).await?;
    let refunded: Vec<&ResKey> = s
        .reservations
        .iter()
        .filter(|(_, r)| r.state == ReservationState::Refunded)
        .map(|(k, _)| k)
        .collect();
    let completing = tables::entries::last_refunds(tx, &refunded).await?;
    let giving: Vec<ResKey> = s
        .reservations
        .iter()
        .filter(|(_, r)| r.state.holds() || r.settled_by_window())
        .map(|(k, _)| k.clone())
        .collect();
    s.drawn = tables::lots::drawn_from(tx, &giving, s.now).await?;
    s.refunds = refunds;
    s.completing_refund = completing;
    Ok(s)
}

fn not_found(r: &Refund) -> LedgerError {
    LedgerError::NotFound(format!(
        "no reservation with project_code {:?} for this user",
        r.project_code.as_str()
    ))
}

/// Decides `live` (no user and code, nor event, twice) against `s`, in
/// arrival order, each as if it ran alone: its answer, and what the batch
/// writes. Pure. An `Err` is a broken rule: the whole batch fails.
pub fn decide(
    s: &Snapshot,
    live: &[QueuedRefund],
) -> Result<(Vec<Answer<RefundReceipt>>, Plan), LedgerError> {
    let mut plan = Plan::default();
    // Lots past their expiry go first, so that every balance below is what
    // the user can spend.
    let mut balances: BTreeMap<&UserId, i64> = plan
        .expire_all(
            s,
            live.iter()
                .map(|q| (&q.refund.user_id, q.correlation_id.as_deref())),
        )?
        .into_iter()
        .map(|(user, (balance, _))| (user, balance))
        .collect();
    let mut drawn = s.drawn.clone();
    let mut answers = Vec::with_capacity(live.len());
    for q in live {
        let answer = match found(s, q, &balances) {
            Err(refused) => Err(refused),
            Ok((key, row)) => match earlier(s, q, key, row, &mut plan) {
                Some(answer) => answer,
                None => {
                    let balance = balances.get_mut(&q.refund.user_id).ok_or_else(|| {
                        DbError::Invariant("a refund of an account not locked".into())
                    })?;
                    let lots = drawn.entry(key.clone()).or_default();
                    give_back(s.now, q, (key, row), lots, balance, &mut plan)?
                }
            },
        };
        answers.push(answer);
    }
    Ok((answers, plan))
}

/// The reservation `q` names, or why there is none to refund: its event
/// was handled before, its account is held or missing, no reservation or
/// several (of several apps, without `app_name`) have its code.
fn found<'s>(
    s: &'s Snapshot,
    q: &QueuedRefund,
    balances: &BTreeMap<&UserId, i64>,
) -> Result<(&'s ResKey, &'s Reservation), LedgerError> {
    let r = &q.refund;
    if let Some(first) = q
        .event_id
        .as_ref()
        .and_then(|e| s.events.get(&(r.user_id.clone(), e.clone())))
    {
        return Err(LedgerError::EventSeen {
            first_outcome: first.clone(),
        });
    }
    if s.busy.contains(&r.user_id) {
        return Err(LedgerError::AccountBusy);
    }
    if !balances.contains_key(&r.user_id) {
        return Err(not_found(r));
    }
    match candidates(s, r).as_slice() {
        [] => Err(not_found(r)),
        [one] => Ok(*one),
        _ => Err(LedgerError::Invalid {
            field: "app_name",
            reason: format!(
                "project_code {:?} names reservations of several apps; say which with app_name",
                r.project_code.as_str()
            ),
        }),
    }
}

/// The answer of a refund that moves nothing: a replay of the refund made
/// before under its reference (or of the whole refund that completed the
/// reservation), a conflict, or a refusal (no reference with an amount; a
/// settled reservation; the window closed). `None`: credits come back.
fn earlier(
    s: &Snapshot,
    q: &QueuedRefund,
    key: &ResKey,
    row: &Reservation,
    plan: &mut Plan,
) -> Option<Answer<RefundReceipt>> {
    let r = &q.refund;
    let code = r.project_code.as_str();
    // A replay records its event as handled, with what the first did.
    let mut replayed = |receipt: RefundReceipt| {
        if let Some(event_id) = &q.event_id {
            plan.events.push(HandledEvent {
                user_id: r.user_id.clone(),
                event_id: event_id.clone(),
                kind: "failed",
                outcome: "already refunded".into(),
            });
        }
        Some(Ok(Outcome::replay(receipt)))
    };
    let receipt = |credits_refunded, new_balance, reason, timestamp| RefundReceipt {
        user_id: r.user_id.to_string(),
        credits_refunded,
        new_balance,
        app_name: key.1.to_string(),
        project_code: code.to_owned(),
        reservation_status: row.state,
        refunded_total: row.refunded,
        remaining_reserved: row.held(),
        reference: r.reference.clone(),
        reason,
        timestamp,
    };
    if let Some(reference) = &r.reference
        && let Some(first) = s.refunds.get(&(key.clone(), reference.clone()))
    {
        if r.amount.is_some_and(|a| a != first.amount) {
            return Some(Err(LedgerError::IdempotencyConflict(format!(
                "reference {reference:?} was already used for a refund of {} credits of reservation {code:?}; use a new reference for a new refund",
                first.amount
            ))));
        }
        return replayed(receipt(
            first.amount,
            first.balance_after,
            first.description.clone(),
            first.at,
        ));
    }
    if r.amount.is_some() && r.reference.is_none() {
        return Some(Err(LedgerError::Invalid {
            field: "reference",
            reason: "is required with amount, so that a retried partial refund refunds once".into(),
        }));
    }
    match row.state {
        ReservationState::Refunded if r.amount.is_none() && r.reference.is_none() => {
            replayed(receipt(
                s.completing_refund.get(key).copied().unwrap_or(0),
                row.balance_after_refund.unwrap_or(0),
                row.refund_reason.clone(),
                row.refunded_at.unwrap_or(s.now),
            ))
        }
        ReservationState::Refunded => Some(Err(LedgerError::NotRefundable(format!(
            "reservation {code:?} is fully refunded; nothing is left to refund"
        )))),
        ReservationState::Settled if !row.settled_by_window() => {
            Some(Err(LedgerError::NotRefundable(format!(
                "reservation {code:?} is already settled; its credits are spent"
            ))))
        }
        // Reserved, or settled only because its window passed: the time the
        // refund is judged at decides.
        _ => match window::judge(
            q.event_time.as_ref(),
            row.created_at,
            row.refundable_until,
            s.now,
        ) {
            Verdict::Open => None,
            verdict => Some(Err(window::refused(
                verdict,
                code,
                row.created_at,
                row.refundable_until,
            ))),
        },
    }
}

/// Credits of reservation `key` come back to the lots it drew from: the
/// amount asked (or all that is left), the reservation's new state, the
/// event recorded. The outer `Err` is a broken rule (the lots took less
/// than the refund): the whole batch fails, nothing of it is written.
fn give_back(
    now: time::OffsetDateTime,
    q: &QueuedRefund,
    (key, row): (&ResKey, &Reservation),
    lots: &mut [crate::snapshot::Drawn],
    balance: &mut i64,
    plan: &mut Plan,
) -> Result<Answer<RefundReceipt>, DbError> {
    let r = &q.refund;
    let left = row.amount - row.refunded;
    let amount = r.amount.unwrap_or(left);
    if amount > left {
        return Ok(Err(LedgerError::Invalid {
            field: "amount",
            reason: format!(
                "only {left} of the reservation's {} credits can still be refunded",
                row.amount
            ),
        }));
    }
    let refunded_total = row.refunded + amount;
    let state = if refunded_total == row.amount {
        ReservationState::Refunded
    } else if row.state == ReservationState::Settled {
        ReservationState::Settled
    } else {
        ReservationState::PartiallyRefunded
    };
    plan.give_back(
        Returned {
            user: &r.user_id,
            app: &key.1,
            code: &r.project_code,
            amount,
            reason: r.reason.as_deref(),
            reference: r.reference.as_deref(),
            correlation_id: q.correlation_id.as_deref(),
            acted_by: r.acted_by.as_deref(),
            made_at: row.created_at,
        },
        lots,
        balance,
    )?;
    let done = state == ReservationState::Refunded;
    plan.changes.push(ReservationChange {
        user_id: r.user_id.clone(),
        app_name: key.1.clone(),
        project_code: r.project_code.clone(),
        state,
        refunded: refunded_total,
        settled_at: row.settled_at,
        settle_reason: row.settle_reason.clone(),
        settled_by: row.settled_by,
        refunded_at: done.then_some(now),
        refund_reason: if done { r.reason.clone() } else { None },
        balance_after_refund: done.then_some(*balance),
    });
    if let Some(event_id) = &q.event_id {
        plan.events.push(HandledEvent {
            user_id: r.user_id.clone(),
            event_id: event_id.clone(),
            kind: "failed",
            outcome: if amount == row.amount {
                "refunded"
            } else {
                "partially refunded"
            }
            .into(),
        });
    }
    Ok(Ok(Outcome::fresh(RefundReceipt {
        user_id: r.user_id.to_string(),
        credits_refunded: amount,
        new_balance: *balance,
        app_name: key.1.to_string(),
        project_code: r.project_code.to_string(),
        reservation_status: state,
        refunded_total,
        remaining_reserved: if state == ReservationState::PartiallyRefunded {
            row.amount - refunded_total
        } else {
            0
        },
        reference: r.reference.clone(),
        reason: r.reason.clone(),
        timestamp: now,
    })))
}

/// One transaction of refunds (see [`crate::Slots`]).
async fn refund_once(
    client: &mut Client,
    batch: &[QueuedRefund],
    on_busy: OnBusy,
) -> Slots<RefundReceipt> {
    let live = live(batch);
    let tx = client.transaction().await?;
    let snapshot = load(&tx, live, on_busy).await?;
    let (answers, plan) = decide(&snapshot, live)?;
    if plan::commit(tx, &plan, &snapshot).await?.is_some() {
        for a in answers.iter().flatten().filter(|a| !a.replayed) {
            count_moved("refunded", &a.value.app_name, a.value.credits_refunded);
        }
    }
    Ok(slots(answers, batch.len()))
}
