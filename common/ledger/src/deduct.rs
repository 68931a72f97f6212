//! Deductions (`deduct-credits`): reserve and take credits at once, once per
//! `(user_id, app_name, project_code)` (contract §15: keys are per user).
//!
//! One implementation for any number of requests (group commit): the API
//! hands the deductions waiting at the same moment to [`deduct_all`], which
//! carries them out with a fixed number of set-based statements and one
//! commit; a lone request ([`deduct`]) is a batch of one. On one hot account
//! this turns a queue of row-lock waits into one guarded `UPDATE` per batch.
//!
//! Rules, for each request of a batch:
//! * the account rows are locked first (in `user_id` order, so two batches
//!   cannot deadlock), then the reservations are claimed in key order;
//! * each request is decided in arrival order against the balance left by the
//!   ones before it, so it gets the answer it would have had alone
//!   (`insufficient_credits` with the balance it saw, `user_not_found`, a
//!   replay or a conflict from its key's stored reservation);
//! * the debit is one guarded `UPDATE` per user, backed by the `CHECK
//!   (balance >= 0)`; each accepted request gets its own reservation, ledger
//!   row (with its own `balance_after`) and `ledger-audit` job, all committed
//!   together or not at all;
//! * a key met twice in one batch ends the batch: the repeat and the requests
//!   after it go in the next batch (where the repeat replays or conflicts);
//! * a key claimed meanwhile by a concurrent transaction rolls the batch
//!   back, and it runs again, where the key is seen (keys are per user and
//!   every writer locks the user's account first, so this is a guard that
//!   should never fire).

use std::{
    borrow::Cow,
    collections::{HashMap, HashSet},
    time::Duration,
};

use deadpool_postgres::Client;
use serde::Serialize;
use time::OffsetDateTime;

use super::{
    Answer, LedgerError, Locked, NewEntry, OnBusy, Outcome, ReservationKey, Slots, answer_all,
    by_reservation, count_moved, key_of, lock_accounts,
    lots::{Allocation, Plan, active_lots, draw, drawn_from},
    only, reservation_key, state_of,
};
use penora_domain::{AppName, Credits, EntryKind, ProjectCode, ReservationState, UserId};
use penora_store::DbError;

/// The stored reservations of a batch's keys, one index probe per key: the
/// `LIMIT 1` keeps the planner from turning the look-up into a join that
/// reads each user's every reservation (a hot account has many thousands,
/// and a cached generic plan did exactly that: 13–30 ms per batch).
const STORED_BY_KEYS_SQL: &str = "SELECT r.user_id, r.amount, r.balance_after_deduct, r.state, \
            r.refundable_until, r.created_at, r.app_name, r.project_code \
     FROM unnest($1::text[], $2::text[], $3::text[]) AS k(user_id, app_name, project_code) \
     CROSS JOIN LATERAL (SELECT * FROM reservations r \
        WHERE r.user_id = k.user_id AND r.app_name = k.app_name AND r.project_code = k.project_code \
        LIMIT 1) r";

/// [`STORED_BY_KEYS_SQL`] on Citus, as verified there: the keys' users
/// route the query to their shards and the join picks the keys out.
const STORED_BY_USERS_SQL: &str = "SELECT r.user_id, r.amount, r.balance_after_deduct, r.state, \
            r.refundable_until, r.created_at, r.app_name, r.project_code \
     FROM reservations r \
     JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(user_id, app_name, project_code) \
       ON r.user_id = k.user_id AND r.app_name = k.app_name AND r.project_code = k.project_code \
     WHERE r.user_id = ANY($1)";

/// A deduction.
#[derive(Debug, Clone)]
pub struct Deduct {
    /// Whose credits.
    pub user_id: UserId,
    /// How many.
    pub amount: Credits,
    /// Which app spends them.
    pub app_name: AppName,
    /// What for, for people.
    pub description: Option<String>,
    /// The idempotency key (made by the service when the client gave none).
    pub project_code: ProjectCode,
    /// How long the reservation can be refunded.
    pub refund_window: Duration,
}

/// The answer to a deduction (the guide's fields and the contract's).
#[derive(Debug, Clone, Serialize)]
pub struct DeductReceipt {
    /// Whose credits.
    pub user_id: String,
    /// How many were taken.
    pub credits_deducted: i64,
    /// The balance right after this deduction.
    pub new_balance: i64,
    /// Which app.
    pub app_name: String,
    /// The reservation's key.
    pub project_code: String,
    /// The reservation's state now.
    pub reservation_status: ReservationState,
    /// Until when the reservation can be refunded.
    #[serde(serialize_with = "penora_domain::timefmt::serde_millis::serialize")]
    pub refundable_until: OffsetDateTime,
    /// When the deduction was made.
    #[serde(serialize_with = "penora_domain::timefmt::serde_millis::serialize")]
    pub timestamp: OffsetDateTime,
    /// The lots the credits came from, in the order drawn (contract §12).
    pub allocations: Vec<Allocation>,
}

/// One request of a batch.
#[derive(Debug, Clone)]
pub struct Queued {
    /// The deduction.
    pub deduct: Deduct,
    /// The request id, carried to its audit job.
    pub correlation_id: Option<String>,
}

/// Reserves and deducts credits for one request.
pub async fn deduct(
    client: &mut Client,
    d: &Deduct,
    correlation_id: Option<&str>,
) -> Answer<DeductReceipt> {
    let queued = Queued {
        deduct: d.clone(),
        correlation_id: correlation_id.map(str::to_owned),
    };
    only(deduct_all(client, std::slice::from_ref(&queued), OnBusy::Wait).await)
}

/// Reserves and deducts credits for every one of `batch`, in order, in as
/// few transactions as the keys allow. Each answer is the one the request
/// would have had alone, or [`LedgerError::AccountBusy`] with
/// [`OnBusy::Skip`] when another transaction holds its account.
pub async fn deduct_all(
    client: &mut Client,
    batch: &[Queued],
    on_busy: OnBusy,
) -> Vec<Answer<DeductReceipt>> {
    answer_all(
        client,
        batch,
        "deduct",
        on_busy,
        |q| q.deduct.user_id.as_str(),
        deduct_once,
    )
    .await
}

/// A request accepted in a batch, the balance it leaves and the lots it
/// draws from.
struct Accepted<'a> {
    q: &'a Queued,
    slot: usize,
    balance_after: i64,
    allocations: Vec<Allocation>,
}

/// One transaction of deductions (see [`super::Slots`]).
async fn deduct_once(
    client: &mut Client,
    batch: &[Queued],
    on_busy: OnBusy,
) -> Slots<DeductReceipt> {
    let mut answers: Vec<Option<Answer<DeductReceipt>>> = batch.iter().map(|_| None).collect();
    let mut keys = HashSet::new();
    let live: Vec<&Deduct> = batch
        .iter()
        .map(|q| &q.deduct)
        .take_while(|d| {
            keys.insert((
                d.user_id.as_str(),
                d.app_name.as_str(),
                d.project_code.as_str(),
            ))
        })
        .collect();

    let tx = client.transaction().await?;
    let Locked { mut balances, busy } =
        lock_accounts(&tx, live.iter().map(|d| d.user_id.as_str()), on_busy).await?;
    let users: Vec<&str> = live.iter().map(|d| d.user_id.as_str()).collect();
    let apps: Vec<&str> = live.iter().map(|d| d.app_name.as_str()).collect();
    let codes: Vec<&str> = live.iter().map(|d| d.project_code.as_str()).collect();
    let find = tx
        .prepare_cached(if penora_store::distributed() {
            STORED_BY_USERS_SQL
        } else {
            STORED_BY_KEYS_SQL
        })
        .await?;
    let stored: HashMap<ReservationKey, tokio_postgres::Row> = tx
        .query(&find, &[&users, &apps, &codes])
        .await?
        .into_iter()
        .map(|r| (reservation_key(&r), r))
        .collect();

    // The users' lots: due ones expire first (their entries lead the
    // batch), the rest is what each user can spend.
    let locked: Vec<&str> = balances.keys().map(String::as_str).collect();
    let mut lots = active_lots(&tx, &locked).await?;
    let mut plan = Plan::default();
    let mut spendable: HashMap<&str, i64> = HashMap::with_capacity(balances.len());
    for (q, d) in batch.iter().zip(&live) {
        let user = d.user_id.as_str();
        let Some(balance) = balances.get_mut(user) else {
            continue;
        };
        if spendable.contains_key(user) {
            continue;
        }
        let user_lots = lots.get(user).map(Vec::as_slice).unwrap_or_default();
        plan.expire_due(user, user_lots, balance, q.correlation_id.as_deref())?;
        let left: i64 = user_lots
            .iter()
            .filter(|l| !l.due)
            .map(|l| l.remaining)
            .sum();
        if left != *balance {
            return Err(DbError::Other(format!(
                "{user}: lots hold {left} credits, the balance is {balance}"
            ))
            .into());
        }
        spendable.insert(user, *balance);
    }

    // Decide each request in arrival order, as if it ran alone.
    let mut accepted: Vec<Accepted<'_>> = Vec::new();
    let mut replays: Vec<usize> = Vec::new();
    for (slot, (q, d)) in batch.iter().zip(&live).enumerate() {
        let key = key_of(
            d.user_id.as_str(),
            d.app_name.as_str(),
            d.project_code.as_str(),
        );
        if let Some(row) = stored.get(&key) {
            answers[slot] = Some(answer_from_reservation(row, d));
            replays.push(slot);
            continue;
        }
        let amount = d.amount.get();
        match spendable.get_mut(d.user_id.as_str()) {
            None if busy.contains(d.user_id.as_str()) => {
                answers[slot] = Some(Err(LedgerError::AccountBusy));
            }
            None => answers[slot] = Some(Err(LedgerError::UserNotFound)),
            Some(balance) if *balance < amount => {
                answers[slot] = Some(Err(LedgerError::InsufficientCredits {
                    balance: *balance,
                    requested: amount,
                }));
            }
            Some(balance) => {
                *balance -= amount;
                let user_lots = lots
                    .get_mut(d.user_id.as_str())
                    .map(Vec::as_mut_slice)
                    .unwrap_or_default();
                accepted.push(Accepted {
                    q,
                    slot,
                    balance_after: *balance,
                    allocations: draw(user_lots, amount),
                });
            }
        }
    }
    add_allocations(&tx, &live, &replays, &mut answers).await?;
    if accepted.is_empty() && plan.entries.is_empty() {
        tx.rollback().await?;
        return Ok(answers);
    }

    let claimed = claim_reservations(&tx, &accepted).await?;
    if claimed.len() != accepted.len() {
        // A concurrent batch took one of these keys since we looked.
        tx.rollback().await?;
        return Err(DbError::Conflict("a key of the batch was claimed concurrently".into()).into());
    }
    for a in &accepted {
        let d = &a.q.deduct;
        let at = plan.entry(NewEntry {
            user_id: d.user_id.as_str(),
            kind: EntryKind::Deduct,
            amount: -d.amount.get(),
            balance_after: a.balance_after,
            app_name: Cow::Borrowed(d.app_name.as_str()),
            description: d.description.as_deref(),
            project_code: Some(d.project_code.as_str()),
            reference: None,
            correlation_id: a.q.correlation_id.as_deref(),
        });
        for al in &a.allocations {
            plan.moves(
                at,
                d.user_id.as_str(),
                al.lot_id,
                EntryKind::Deduct,
                -al.amount,
                -al.amount,
                Some((d.app_name.as_str(), d.project_code.as_str())),
            );
        }
    }
    plan.apply(&tx).await?;
    tx.commit().await?;

    for a in &accepted {
        let d = &a.q.deduct;
        let key = key_of(
            d.user_id.as_str(),
            d.app_name.as_str(),
            d.project_code.as_str(),
        );
        let Some(&(created_at, refundable_until)) = claimed.get(&key) else {
            // Committed but not reported: the next batch replays it.
            continue;
        };
        count_moved("reserved", d.app_name.as_str(), d.amount.get());
        answers[a.slot] = Some(Ok(Outcome::fresh(DeductReceipt {
            user_id: d.user_id.to_string(),
            credits_deducted: d.amount.get(),
            new_balance: a.balance_after,
            app_name: d.app_name.to_string(),
            project_code: d.project_code.to_string(),
            reservation_status: ReservationState::Reserved,
            refundable_until,
            timestamp: created_at,
            allocations: a.allocations.clone(),
        })));
    }
    Ok(answers)
}

/// Adds the allocations of the replayed deductions at `slots` (read from
/// the ledger's lot movements) to their answers.
async fn add_allocations(
    tx: &deadpool_postgres::Transaction<'_>,
    live: &[&Deduct],
    slots: &[usize],
    answers: &mut [Option<Answer<DeductReceipt>>],
) -> Result<(), DbError> {
    if slots.is_empty() {
        return Ok(());
    }
    let keys: Vec<(&str, &str, &str)> = slots
        .iter()
        .map(|&i| {
            let d = live[i];
            (
                d.user_id.as_str(),
                d.app_name.as_str(),
                d.project_code.as_str(),
            )
        })
        .collect();
    // A deduction drew each of its lots once, in burn-down order.
    let mut found = drawn_from(tx, &keys).await?;
    for (&slot, key) in slots.iter().zip(&keys) {
        if let Some(Some(Ok(outcome))) = answers.get_mut(slot) {
            outcome.value.allocations = found
                .remove(&key_of(key.0, key.1, key.2))
                .unwrap_or_default()
                .into_iter()
                .map(|d| Allocation {
                    lot_id: d.lot_id,
                    amount: d.drawn,
                })
                .collect();
        }
    }
    Ok(())
}

/// Claims the accepted requests' keys (in key order, so two batches claiming
/// overlapping keys wait for each other instead of deadlocking). Returns the
/// claimed keys with their reservation's times.
async fn claim_reservations(
    tx: &deadpool_postgres::Transaction<'_>,
    accepted: &[Accepted<'_>],
) -> Result<std::collections::HashMap<ReservationKey, (OffsetDateTime, OffsetDateTime)>, DbError> {
    let column =
        |f: fn(&Deduct) -> &str| -> Vec<&str> { accepted.iter().map(|a| f(&a.q.deduct)).collect() };
    let apps = column(|d| d.app_name.as_str());
    let codes = column(|d| d.project_code.as_str());
    let users = column(|d| d.user_id.as_str());
    let amounts: Vec<i64> = accepted.iter().map(|a| a.q.deduct.amount.get()).collect();
    let descriptions: Vec<Option<&str>> = accepted
        .iter()
        .map(|a| a.q.deduct.description.as_deref())
        .collect();
    let after: Vec<i64> = accepted.iter().map(|a| a.balance_after).collect();
    let windows: Vec<f64> = accepted
        .iter()
        .map(|a| a.q.deduct.refund_window.as_secs_f64())
        .collect();
    let claim = tx
        .prepare_cached(
            "INSERT INTO reservations \
               (app_name, project_code, user_id, amount, description, balance_after_deduct, refundable_until) \
             SELECT v.app_name, v.project_code, v.user_id, v.amount, v.description, v.balance_after, \
                    now() + make_interval(secs => v.window_secs) \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::int8[], $7::float8[]) \
               AS v(app_name, project_code, user_id, amount, description, balance_after, window_secs) \
             ORDER BY v.user_id, v.app_name, v.project_code \
             ON CONFLICT (user_id, app_name, project_code) DO NOTHING \
             RETURNING user_id, app_name, project_code, created_at, refundable_until",
        )
        .await?;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] = [
        &apps,
        &codes,
        &users,
        &amounts,
        &descriptions,
        &after,
        &windows,
    ];
    let rows = tx.query(&claim, &params).await?;
    Ok(by_reservation(&rows, "created_at", "refundable_until"))
}

/// The answer a deduction gets from its key's stored reservation (the same
/// user's): the first result again, or a conflict when the amount differs.
fn answer_from_reservation(row: &tokio_postgres::Row, d: &Deduct) -> Answer<DeductReceipt> {
    let user_id: String = row.get("user_id");
    let amount: i64 = row.get("amount");
    if amount != d.amount.get() {
        return Err(LedgerError::IdempotencyConflict(format!(
            "project_code {:?} of app {:?} was already used with an amount of {amount}; use a new project_code for a new deduction",
            d.project_code.as_str(),
            d.app_name.as_str()
        )));
    }
    Ok(Outcome::replay(DeductReceipt {
        user_id,
        credits_deducted: amount,
        new_balance: row.get("balance_after_deduct"),
        app_name: d.app_name.to_string(),
        project_code: d.project_code.to_string(),
        reservation_status: state_of(row.get("state"))?,
        refundable_until: row.get("refundable_until"),
        timestamp: row.get("created_at"),
        allocations: Vec::new(),
    }))
}
