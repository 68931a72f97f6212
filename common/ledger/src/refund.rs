//! Refunds (`refund-credits` and `generation.failed` events): a reservation's
//! credits come back, once.
//!
//! One implementation for any number of requests: the worker hands the
//! events that arrived together to [`refund_all`]; a lone request
//! ([`refund`]) is a batch of one.
//!
//! Rules, for each request of a batch:
//! * the account rows are locked first (in `user_id` order), then the
//!   reservations (in key order); the state change is one guarded `UPDATE`
//!   that the `reservations_one_way` trigger also enforces;
//! * a reservation is refundable while it is `reserved` and inside its
//!   window; a refunded one answers the first refund again (a replay), a
//!   settled one or one whose window closed is refused;
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

use std::{
    borrow::Cow,
    collections::{HashMap, HashSet},
};

use deadpool_postgres::{Client, Transaction};
use serde::Serialize;
use time::OffsetDateTime;

use super::{
    Answer, LedgerError, Locked, NewEntry, OnBusy, Outcome, Slots, answer_all, count_moved, key_of,
    lock_accounts,
    lots::{Drawn, LotFate, Plan, drawn_from, due_lots, give_back},
    only, state_of,
    window::{self, EventTime, Verdict},
};
use penora_domain::{AppName, EntryKind, ProjectCode, ReservationState, UserId};
use penora_store::DbError;

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

/// A refund decided in a batch.
struct Decided<'a> {
    q: &'a QueuedRefund,
    slot: usize,
    app_name: String,
    /// Credits given back by this refund.
    amount: i64,
    /// The reservation's refunds, this one included.
    refunded_total: i64,
    reserved: i64,
    state: ReservationState,
    balance_after: i64,
}

/// One transaction of refunds (see [`super::Slots`]).
async fn refund_once(
    client: &mut Client,
    batch: &[QueuedRefund],
    on_busy: OnBusy,
) -> Slots<RefundReceipt> {
    let mut answers: Vec<Option<Answer<RefundReceipt>>> = batch.iter().map(|_| None).collect();
    let mut keys = HashSet::new();
    let mut events = HashSet::new();
    let live: Vec<&QueuedRefund> = batch
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
        .collect();

    let tx = client.transaction().await?;
    let Locked { mut balances, busy } =
        lock_accounts(&tx, live.iter().map(|q| q.refund.user_id.as_str()), on_busy).await?;
    let mut found = lock_reservations(&tx, &live, &busy).await?;
    let seen = seen_events(&tx, &live).await?;
    let referenced = referenced_refunds(&tx, &live).await?;
    let locked: Vec<&str> = balances.keys().map(String::as_str).collect();
    let due = due_lots(&tx, &locked).await?;

    // Lots past their expiry go first, so that every balance below is
    // what the user can spend.
    let mut plan = Plan::default();
    let mut expired_for = HashSet::new();
    for q in &live {
        let user = q.refund.user_id.as_str();
        if let (Some(lots), Some(balance)) = (due.get(user), balances.get_mut(user))
            && expired_for.insert(user)
        {
            plan.expire_due(user, lots, balance, q.correlation_id.as_deref())?;
        }
    }

    let mut fresh: Vec<Decided<'_>> = Vec::new();
    // Requests answered with the refund that completed their reservation.
    let mut unreferenced_replays: Vec<usize> = Vec::new();
    // Events answered from a reservation refunded before.
    let mut replayed_events: Vec<&QueuedRefund> = Vec::new();
    for (slot, q) in live.iter().enumerate() {
        let r = &q.refund;
        if let Some(first_outcome) = q
            .event_id
            .as_ref()
            .and_then(|e| seen.get(&(r.user_id.to_string(), e.clone())))
        {
            answers[slot] = Some(Err(LedgerError::EventSeen {
                first_outcome: first_outcome.clone(),
            }));
            continue;
        }
        if busy.contains(r.user_id.as_str()) {
            answers[slot] = Some(Err(LedgerError::AccountBusy));
            continue;
        }
        let rows = found.remove(&slot).unwrap_or_default();
        let Some(balance) = balances.get_mut(r.user_id.as_str()) else {
            answers[slot] = Some(Err(not_found(r)));
            continue;
        };
        let row = match rows.as_slice() {
            [] => {
                answers[slot] = Some(Err(not_found(r)));
                continue;
            }
            [row] => row,
            _ => {
                answers[slot] = Some(Err(LedgerError::Invalid {
                    field: "app_name",
                    reason: format!(
                        "project_code {:?} names reservations of several apps; say which with app_name",
                        r.project_code.as_str()
                    ),
                }));
                continue;
            }
        };
        let app_name: String = row.get("app_name");
        let reserved: i64 = row.get("amount");
        let refunded: i64 = row.get("refunded_amount");
        let state = state_of(row.get("state"))?;
        let held = if matches!(
            state,
            ReservationState::Reserved | ReservationState::PartiallyRefunded
        ) {
            reserved - refunded
        } else {
            0
        };
        if let Some(first) = r.reference.as_ref().and_then(|reference| {
            referenced.get(&(
                r.user_id.to_string(),
                app_name.clone(),
                r.project_code.to_string(),
                reference.clone(),
            ))
        }) {
            answers[slot] = Some(replay_referenced(
                q, first, &app_name, state, refunded, held,
            ));
            if q.event_id.is_some() {
                replayed_events.push(q);
            }
            continue;
        }
        if r.amount.is_some() && r.reference.is_none() {
            answers[slot] = Some(Err(LedgerError::Invalid {
                field: "reference",
                reason: "is required with amount, so that a retried partial refund refunds once"
                    .into(),
            }));
            continue;
        }
        let verdict = window::judge(
            q.event_time.as_ref(),
            row.get("created_at"),
            row.get("refundable_until"),
            row.get("now"),
        );
        match state {
            ReservationState::Refunded if r.amount.is_none() && r.reference.is_none() => {
                if q.event_id.is_some() {
                    replayed_events.push(q);
                }
                unreferenced_replays.push(slot);
                answers[slot] = Some(Ok(Outcome::replay(RefundReceipt {
                    user_id: r.user_id.to_string(),
                    // The refund that completed it, read below.
                    credits_refunded: 0,
                    new_balance: row.get("balance_after_refund"),
                    app_name,
                    project_code: r.project_code.to_string(),
                    reservation_status: ReservationState::Refunded,
                    refunded_total: reserved,
                    remaining_reserved: 0,
                    reference: None,
                    reason: row.get("refund_reason"),
                    timestamp: row.get("refunded_at"),
                })));
            }
            ReservationState::Refunded => {
                answers[slot] = Some(Err(LedgerError::NotRefundable(format!(
                    "reservation {:?} is fully refunded; nothing is left to refund",
                    r.project_code.as_str()
                ))));
            }
            ReservationState::Settled
                if row.get::<_, Option<&str>>("settled_by") != Some("window") =>
            {
                answers[slot] = Some(Err(LedgerError::NotRefundable(format!(
                    "reservation {:?} is already settled; its credits are spent",
                    r.project_code.as_str()
                ))));
            }
            // Reserved, or settled only because its window passed: the
            // time the refund is judged at decides.
            _ if verdict != Verdict::Open => {
                answers[slot] = Some(Err(window::refused(
                    verdict,
                    r.project_code.as_str(),
                    row.get("created_at"),
                    row.get("refundable_until"),
                )));
            }
            _ => {
                let left = reserved - refunded;
                let amount = r.amount.unwrap_or(left);
                if amount > left {
                    answers[slot] = Some(Err(LedgerError::Invalid {
                        field: "amount",
                        reason: format!(
                            "only {left} of the reservation's {reserved} credits can still be refunded"
                        ),
                    }));
                    continue;
                }
                let refunded_total = refunded + amount;
                let state = if refunded_total == reserved {
                    ReservationState::Refunded
                } else if state == ReservationState::Settled {
                    ReservationState::Settled
                } else {
                    ReservationState::PartiallyRefunded
                };
                fresh.push(Decided {
                    q,
                    slot,
                    app_name,
                    amount,
                    refunded_total,
                    reserved,
                    state,
                    balance_after: *balance,
                });
            }
        }
    }
    add_unreferenced_refunds(&tx, &unreferenced_replays, &mut answers).await?;
    if fresh.is_empty() && replayed_events.is_empty() && plan.entries.is_empty() {
        tx.rollback().await?;
        return Ok(answers);
    }

    // Where each refund's credits go back to.
    let reservation_keys: Vec<(&str, &str, &str)> = fresh
        .iter()
        .map(|f| {
            (
                f.q.refund.user_id.as_str(),
                f.app_name.as_str(),
                f.q.refund.project_code.as_str(),
            )
        })
        .collect();
    let drawn = drawn_from(&tx, &reservation_keys).await?;
    for f in fresh.iter_mut() {
        let r = &f.q.refund;
        let balance = balances
            .get_mut(r.user_id.as_str())
            .ok_or_else(|| DbError::Other("a refund's account is not locked".into()))?;
        let lots = drawn
            .get(&key_of(
                r.user_id.as_str(),
                &f.app_name,
                r.project_code.as_str(),
            ))
            .map(Vec::as_slice)
            .unwrap_or_default();
        give_back_to_lots(
            &mut plan,
            Returned {
                user: r.user_id.as_str(),
                app: &f.app_name,
                code: r.project_code.as_str(),
                amount: f.amount,
                reason: r.reason.as_deref(),
                reference: r.reference.as_deref(),
                correlation_id: f.q.correlation_id.as_deref(),
            },
            lots,
            balance,
        )?;
        f.balance_after = *balance;
    }
    let written = plan.apply(&tx).await?;
    let now = written
        .first()
        .map_or_else(OffsetDateTime::now_utc, |&(_, at)| at);
    if !fresh.is_empty() {
        mark_refunded(&tx, &fresh, now).await?;
    }
    let mut recorded: Vec<(&QueuedRefund, &str)> = fresh
        .iter()
        .filter(|f| f.q.event_id.is_some())
        .map(|f| {
            let outcome = if f.amount == f.reserved {
                "refunded"
            } else {
                "partially refunded"
            };
            (f.q, outcome)
        })
        .collect();
    recorded.extend(replayed_events.iter().map(|q| (*q, "already refunded")));
    record_events(&tx, &recorded).await?;
    tx.commit().await?;

    for f in &fresh {
        count_moved("refunded", &f.app_name, f.amount);
        answers[f.slot] = Some(Ok(Outcome::fresh(RefundReceipt {
            user_id: f.q.refund.user_id.to_string(),
            credits_refunded: f.amount,
            new_balance: f.balance_after,
            app_name: f.app_name.clone(),
            project_code: f.q.refund.project_code.to_string(),
            reservation_status: f.state,
            refunded_total: f.refunded_total,
            remaining_reserved: if f.state == ReservationState::PartiallyRefunded {
                f.reserved - f.refunded_total
            } else {
                0
            },
            reference: f.q.refund.reference.clone(),
            reason: f.q.refund.reason.clone(),
            timestamp: now,
        })));
    }
    Ok(answers)
}

/// A refund's credits on their way back.
pub(super) struct Returned<'a> {
    pub user: &'a str,
    pub app: &'a str,
    pub code: &'a str,
    pub amount: i64,
    pub reason: Option<&'a str>,
    pub reference: Option<&'a str>,
    pub correlation_id: Option<&'a str>,
}

/// Adds to `plan` the refund entry of `ret` and its movements back into
/// the lots the reservation drew from (`drawn`), the last drawn first; the
/// part that meets an expired or voided lot is expired or voided at once,
/// with an entry of its own. `balance` ends as what the user can spend.
pub(super) fn give_back_to_lots<'a>(
    plan: &mut Plan<'a>,
    ret: Returned<'a>,
    drawn: &[Drawn],
    balance: &mut i64,
) -> Result<(), DbError> {
    let reservation = Some((ret.app, ret.code));
    *balance = balance
        .checked_add(ret.amount)
        .ok_or_else(|| DbError::Other("a refund overflows the balance".into()))?;
    let entry = |kind, amount, balance_after, description| NewEntry {
        user_id: ret.user,
        kind,
        amount,
        balance_after,
        app_name: Cow::Borrowed(ret.app),
        description,
        project_code: Some(ret.code),
        reference: if kind == EntryKind::Refund {
            ret.reference
        } else {
            None
        },
        correlation_id: ret.correlation_id,
    };
    let refund_at = plan.entry(entry(EntryKind::Refund, ret.amount, *balance, ret.reason));
    let parts = give_back(drawn, ret.amount);
    let given: i64 = parts.iter().map(|(_, p)| p).sum();
    if given != ret.amount {
        return Err(DbError::Other(format!(
            "reservation ({}, {}) of {}: its lots took {} less than the refund of {}",
            ret.app,
            ret.code,
            ret.user,
            ret.amount - given,
            ret.amount
        )));
    }
    let mut closed: [(EntryKind, LotFate, i64); 2] = [
        (EntryKind::Expire, LotFate::Expired, 0),
        (EntryKind::Void, LotFate::Voided, 0),
    ];
    for (lot, part) in &parts {
        let delta = if lot.fate == LotFate::Open { *part } else { 0 };
        plan.moves(
            refund_at,
            ret.user,
            lot.lot_id,
            EntryKind::Refund,
            *part,
            delta,
            reservation,
        );
        for c in closed.iter_mut().filter(|c| c.1 == lot.fate) {
            c.2 += part;
        }
    }
    for (kind, fate, total) in closed {
        if total == 0 {
            continue;
        }
        *balance -= total;
        let description = match kind {
            EntryKind::Void => "refund to a voided lot",
            _ => "refund to an expired lot",
        };
        let at = plan.entry(entry(kind, -total, *balance, Some(description)));
        for (lot, part) in parts.iter().filter(|(l, _)| l.fate == fate) {
            plan.moves(at, ret.user, lot.lot_id, kind, -part, 0, reservation);
        }
    }
    Ok(())
}

/// Puts in the replayed answers at `slots` the amount of the refund that
/// completed the reservation (its last refund: all of it, for a reservation
/// refunded at once, with or without a reference).
async fn add_unreferenced_refunds(
    tx: &Transaction<'_>,
    slots: &[usize],
    answers: &mut [Option<Answer<RefundReceipt>>],
) -> Result<(), DbError> {
    let keys: Vec<(usize, String, String, String)> = slots
        .iter()
        .filter_map(|&slot| match answers.get(slot) {
            Some(Some(Ok(o))) => Some((
                slot,
                o.value.user_id.clone(),
                o.value.app_name.clone(),
                o.value.project_code.clone(),
            )),
            _ => None,
        })
        .collect();
    if keys.is_empty() {
        return Ok(());
    }
    let users: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
    let apps: Vec<&str> = keys.iter().map(|k| k.2.as_str()).collect();
    let codes: Vec<&str> = keys.iter().map(|k| k.3.as_str()).collect();
    let stmt = tx
        .prepare_cached(
            "SELECT DISTINCT ON (e.user_id, e.app_name, e.project_code) \
                    e.user_id, e.app_name, e.project_code, e.amount FROM ledger_entries e \
             JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(user_id, app_name, project_code) \
               ON e.user_id = k.user_id AND e.app_name = k.app_name AND e.project_code = k.project_code \
             WHERE e.kind = 'refund' AND e.user_id = ANY($1) \
             ORDER BY e.user_id, e.app_name, e.project_code, e.id DESC",
        )
        .await?;
    let found: HashMap<super::ReservationKey, i64> = tx
        .query(&stmt, &[&users, &apps, &codes])
        .await?
        .iter()
        .map(|r| (super::reservation_key(r), r.get("amount")))
        .collect();
    for (slot, user, app, code) in keys {
        if let (Some(Some(Ok(o))), Some(&amount)) = (
            answers.get_mut(slot),
            found.get(&key_of(&user, &app, &code)),
        ) {
            o.value.credits_refunded = amount;
        }
    }
    Ok(())
}

/// The answer to a refund whose reference was used before: the first
/// refund again, or a conflict when the amount differs.
fn replay_referenced(
    q: &QueuedRefund,
    first: &tokio_postgres::Row,
    app_name: &str,
    state: ReservationState,
    refunded: i64,
    held: i64,
) -> Answer<RefundReceipt> {
    let r = &q.refund;
    let amount: i64 = first.get("amount");
    if r.amount.is_some_and(|a| a != amount) {
        return Err(LedgerError::IdempotencyConflict(format!(
            "reference {:?} was already used for a refund of {amount} credits of reservation {:?}; use a new reference for a new refund",
            r.reference.as_deref().unwrap_or_default(),
            r.project_code.as_str()
        )));
    }
    Ok(Outcome::replay(RefundReceipt {
        user_id: r.user_id.to_string(),
        credits_refunded: amount,
        new_balance: first.get("balance_after"),
        app_name: app_name.to_owned(),
        project_code: r.project_code.to_string(),
        reservation_status: state,
        refunded_total: refunded,
        remaining_reserved: held,
        reference: r.reference.clone(),
        reason: first.get("description"),
        timestamp: first.get("created_at"),
    }))
}

/// The refunds made before under the references of `live`'s requests, by
/// (user, app, code, reference).
async fn referenced_refunds(
    tx: &Transaction<'_>,
    live: &[&QueuedRefund],
) -> Result<HashMap<(String, String, String, String), tokio_postgres::Row>, DbError> {
    let (mut users, mut codes, mut refs) = (Vec::new(), Vec::new(), Vec::new());
    for q in live {
        if let Some(reference) = q.refund.reference.as_deref() {
            users.push(q.refund.user_id.as_str());
            codes.push(q.refund.project_code.as_str());
            refs.push(reference);
        }
    }
    if refs.is_empty() {
        return Ok(HashMap::new());
    }
    let stmt = tx
        .prepare_cached(
            "SELECT e.user_id, e.app_name, e.project_code, e.reference, e.amount, e.balance_after, \
                    e.description, e.created_at \
             FROM ledger_entries e \
             JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(user_id, project_code, reference) \
               ON e.user_id = k.user_id AND e.project_code = k.project_code AND e.reference = k.reference \
             WHERE e.kind = 'refund' AND e.reference IS NOT NULL AND e.user_id = ANY($1)",
        )
        .await?;
    Ok(tx
        .query(&stmt, &[&users, &codes, &refs])
        .await?
        .into_iter()
        .map(|r| {
            (
                (
                    r.get("user_id"),
                    r.get("app_name"),
                    r.get("project_code"),
                    r.get("reference"),
                ),
                r,
            )
        })
        .collect())
}

fn not_found(r: &Refund) -> LedgerError {
    LedgerError::NotFound(format!(
        "no reservation with project_code {:?} for this user",
        r.project_code.as_str()
    ))
}

/// Locks the reservations that `live`'s requests name, in key order, and
/// returns them by the request's place in `live`. A request that names its
/// app is looked up by the reservation's key; one that does not is first
/// resolved to the apps that have a reservation of this user with its code
/// (usually one; several are refused by the caller). The reservations of
/// `busy` accounts are left alone.
async fn lock_reservations(
    tx: &Transaction<'_>,
    live: &[&QueuedRefund],
    busy: &HashSet<String>,
) -> Result<HashMap<usize, Vec<tokio_postgres::Row>>, DbError> {
    let mut apps_of: HashMap<usize, Vec<String>> = HashMap::new();
    let unnamed: Vec<usize> = (0..live.len())
        .filter(|&i| live[i].refund.app_name.is_none())
        .collect();
    if !unnamed.is_empty() {
        let users: Vec<&str> = unnamed
            .iter()
            .map(|&i| live[i].refund.user_id.as_str())
            .collect();
        let codes: Vec<&str> = unnamed
            .iter()
            .map(|&i| live[i].refund.project_code.as_str())
            .collect();
        let resolve = tx
            .prepare_cached(
                "SELECT k.n, r.app_name FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS k(user_id, project_code, n) \
                 JOIN reservations r ON r.user_id = k.user_id AND r.project_code = k.project_code \
                 WHERE r.user_id = ANY($1)",
            )
            .await?;
        for row in tx.query(&resolve, &[&users, &codes]).await? {
            let n: i64 = row.get("n");
            apps_of
                .entry(unnamed[n as usize - 1])
                .or_default()
                .push(row.get("app_name"));
        }
    }
    let (mut places, mut apps, mut codes, mut users) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, q) in live.iter().enumerate() {
        if busy.contains(q.refund.user_id.as_str()) {
            continue;
        }
        let named = q.refund.app_name.as_ref().map(|a| vec![a.to_string()]);
        for app in named.or_else(|| apps_of.remove(&i)).unwrap_or_default() {
            places.push(i as i64);
            apps.push(app);
            codes.push(q.refund.project_code.as_str());
            users.push(q.refund.user_id.as_str());
        }
    }
    if places.is_empty() {
        // Nothing to lock (and, on Citus, no shard to send a locking query to).
        return Ok(HashMap::new());
    }
    let lock = tx
        .prepare_cached(
            "SELECT k.place, r.app_name, r.amount, r.refunded_amount, r.state, r.settled_by, \
                    r.created_at, r.refundable_until, now() AS now, \
                    r.refunded_at, r.refund_reason, r.balance_after_refund \
             FROM unnest($1::int8[], $2::text[], $3::text[], $4::text[]) \
               AS k(place, app_name, project_code, user_id) \
             JOIN reservations r ON r.app_name = k.app_name AND r.project_code = k.project_code \
               AND r.user_id = k.user_id \
             WHERE r.user_id = ANY($4) \
             ORDER BY r.user_id, r.app_name, r.project_code \
             FOR UPDATE OF r",
        )
        .await?;
    let mut found: HashMap<usize, Vec<tokio_postgres::Row>> = HashMap::new();
    for row in tx.query(&lock, &[&places, &apps, &codes, &users]).await? {
        let place: i64 = row.get("place");
        found.entry(place as usize).or_default().push(row);
    }
    Ok(found)
}

/// The events of `live` handled before, with what they did.
async fn seen_events(
    tx: &Transaction<'_>,
    live: &[&QueuedRefund],
) -> Result<HashMap<(String, String), String>, DbError> {
    let (users, ids): (Vec<&str>, Vec<&str>) = live
        .iter()
        .filter_map(|q| Some((q.refund.user_id.as_str(), q.event_id.as_deref()?)))
        .unzip();
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let seen = tx
        .prepare_cached(
            "SELECT user_id, event_id, outcome FROM processed_events \
             WHERE (user_id, event_id) IN (SELECT * FROM unnest($1::text[], $2::text[])) \
               AND user_id = ANY($1)",
        )
        .await?;
    Ok(tx
        .query(&seen, &[&users, &ids])
        .await?
        .into_iter()
        .map(|r| ((r.get("user_id"), r.get("event_id")), r.get("outcome")))
        .collect())
}

/// Records the refunds on their reservations: the total given back, and,
/// for those now fully refunded, the answers a replay gives.
async fn mark_refunded(
    tx: &Transaction<'_>,
    fresh: &[Decided<'_>],
    at: OffsetDateTime,
) -> Result<(), DbError> {
    let users: Vec<&str> = fresh.iter().map(|f| f.q.refund.user_id.as_str()).collect();
    let apps: Vec<&str> = fresh.iter().map(|f| f.app_name.as_str()).collect();
    let codes: Vec<&str> = fresh
        .iter()
        .map(|f| f.q.refund.project_code.as_str())
        .collect();
    let reasons: Vec<Option<&str>> = fresh.iter().map(|f| f.q.refund.reason.as_deref()).collect();
    let after: Vec<i64> = fresh.iter().map(|f| f.balance_after).collect();
    let totals: Vec<i64> = fresh.iter().map(|f| f.refunded_total).collect();
    let states: Vec<&str> = fresh.iter().map(|f| f.state.as_str()).collect();
    let mark = tx
        .prepare_cached(
            "UPDATE reservations r SET state = v.state, refunded_amount = v.total, \
                    refunded_at = CASE WHEN v.state = 'refunded' THEN $4::timestamptz END, \
                    refund_reason = CASE WHEN v.state = 'refunded' THEN v.reason END, \
                    balance_after_refund = CASE WHEN v.state = 'refunded' THEN v.balance_after END \
             FROM unnest($1::text[], $2::text[], $3::text[], $5::text[], $6::int8[], $7::int8[], $8::text[]) \
               AS v(user_id, app_name, project_code, reason, balance_after, total, state) \
             WHERE r.user_id = v.user_id AND r.app_name = v.app_name AND r.project_code = v.project_code \
               AND r.user_id = ANY($1)",
        )
        .await?;
    if tx
        .execute(
            &mark,
            &[
                &users, &apps, &codes, &at, &reasons, &after, &totals, &states,
            ],
        )
        .await?
        != fresh.len() as u64
    {
        return Err(DbError::Other("a batch reservation did not change".into()));
    }
    Ok(())
}

/// Records the events as handled, with what each did.
async fn record_events(
    tx: &Transaction<'_>,
    recorded: &[(&QueuedRefund, &str)],
) -> Result<(), DbError> {
    let mut users = Vec::with_capacity(recorded.len());
    let mut ids = Vec::with_capacity(recorded.len());
    let mut outcomes = Vec::with_capacity(recorded.len());
    for (q, outcome) in recorded {
        if let Some(id) = q.event_id.as_deref() {
            users.push(q.refund.user_id.as_str());
            ids.push(id);
            outcomes.push(*outcome);
        }
    }
    if ids.is_empty() {
        return Ok(());
    }
    let record = tx
        .prepare_cached(
            "INSERT INTO processed_events (user_id, event_id, kind, outcome) \
             SELECT v.user_id, v.event_id, 'failed', v.outcome \
             FROM unnest($1::text[], $2::text[], $3::text[]) AS v(user_id, event_id, outcome) \
             ON CONFLICT DO NOTHING",
        )
        .await?;
    tx.execute(&record, &[&users, &ids, &outcomes]).await?;
    Ok(())
}
