//! Deductions (`deduct-credits`): reserve and take credits at once, once per
//! `(user_id, app_name, project_code)` (contract §15: keys are per user).
//!
//! One implementation for any number of requests (group commit): the API
//! hands the deductions waiting at the same moment to [`deduct_all`], which
//! carries them out with a fixed number of set-based statements and one
//! commit; a lone request ([`deduct`]) is a batch of one. On one hot account
//! this turns a queue of row-lock waits into one guarded `UPDATE` per batch.
//!
//! Three steps ([`load`] → [`decide`] → `plan::apply`): `load` locks the
//! batch's accounts and reads their lots and the stored reservations of its
//! keys into a [`Snapshot`]; `decide` (pure) answers each request and
//! builds the [`Plan`]; `apply` writes it.
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
    collections::{BTreeMap, HashSet},
    time::Duration,
};

use deadpool_postgres::Client;
use penora_domain::{AppName, Credits, EntryKind, ProjectCode, ReservationState, UserId};
use serde::Serialize;
use time::OffsetDateTime;

use crate::{
    Answer, LedgerError, OnBusy, Outcome, Slots, answer_all, count_moved,
    limits::{SpendDelta, Spending, day_of},
    only,
    plan::{self, Allocation, NewEntry, NewReservation, Plan, draw},
    slots,
    snapshot::{ResKey, Snapshot, res_key},
    tables,
};

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

/// The requests of `batch` that share its transaction: up to the first key
/// met twice (the repeat, and what follows it, go in the next batch).
pub fn live(batch: &[Queued]) -> &[Queued] {
    let mut keys = HashSet::new();
    let n = batch
        .iter()
        .take_while(|q| {
            let d = &q.deduct;
            keys.insert((
                d.user_id.as_str(),
                d.app_name.as_str(),
                d.project_code.as_str(),
            ))
        })
        .count();
    &batch[..n]
}

/// Locks the accounts of `live` and reads what deciding it needs: their
/// lots, the stored reservations of its keys and, for those, the lots they
/// drew from (a replay answers its allocations).
pub async fn load(
    tx: &deadpool_postgres::Transaction<'_>,
    live: &[Queued],
    on_busy: OnBusy,
) -> Result<Snapshot, LedgerError> {
    let users: Vec<&str> = live.iter().map(|q| q.deduct.user_id.as_str()).collect();
    let keys: Vec<ResKey> = live
        .iter()
        .map(|q| {
            res_key(
                &q.deduct.user_id,
                &q.deduct.app_name,
                &q.deduct.project_code,
            )
        })
        .collect();
    // Ids for every deduction and one expiry (more are taken if the plan
    // needs them).
    let mut s = tables::locked_accounts_reading(tx, &users, on_busy, &keys, live.len() + 1).await?;
    let replayed: Vec<ResKey> = keys
        .into_iter()
        .filter(|k| s.reservations.contains_key(k))
        .collect();
    s.drawn = tables::lots::drawn_from(tx, &replayed, s.now).await?;
    Ok(s)
}

/// Decides `live` (no key twice) against `s`, in arrival order, each as if
/// it ran alone: its answer, and what the batch writes. Pure.
pub fn decide(
    s: &Snapshot,
    live: &[Queued],
) -> Result<(Vec<Answer<DeductReceipt>>, Plan), LedgerError> {
    let mut plan = Plan::default();
    // Each user's lots: the due ones expire first (their entries lead the
    // batch), the rest is what the user can spend.
    let mut accounts = plan.expire_all(
        s,
        live.iter()
            .map(|q| (&q.deduct.user_id, q.correlation_id.as_deref())),
    )?;
    // Each limited user's spending, counted on as the batch is decided.
    let mut spending: BTreeMap<&UserId, Spending> = s
        .accounts
        .iter()
        .filter_map(|(u, a)| Some((u, a.spending.clone()?)))
        .collect();
    let today = day_of(s.now);
    let mut answers = Vec::with_capacity(live.len());
    for q in live {
        let d = &q.deduct;
        let key = res_key(&d.user_id, &d.app_name, &d.project_code);
        if let Some(stored) = s.reservations.get(&key) {
            answers.push(replay(stored, d, s.drawn.get(&key)));
            continue;
        }
        let amount = d.amount.get();
        // The limits are judged once the balance covers the deduction.
        let over = spending
            .get(&d.user_id)
            .and_then(|sp| sp.check(&d.app_name, amount, s.now).err());
        let answer = match (accounts.get_mut(&d.user_id), over) {
            (None, _) if s.busy.contains(&d.user_id) => Err(LedgerError::AccountBusy),
            (None, _) => Err(LedgerError::UserNotFound),
            (Some((balance, _)), _) if *balance < amount => Err(LedgerError::InsufficientCredits {
                balance: *balance,
                requested: amount,
            }),
            (Some(_), Some(refused)) => Err(refused),
            (Some((balance, lots)), None) => {
                *balance -= amount;
                if let Some(sp) = spending.get_mut(&d.user_id) {
                    sp.add(&d.app_name, today, amount);
                }
                plan.spend.push(SpendDelta {
                    user_id: d.user_id.clone(),
                    app_name: d.app_name.clone(),
                    day: today,
                    delta: amount,
                });
                let allocations = draw(lots, amount, s.now);
                let refundable_until = s.now + d.refund_window;
                let at = plan.entry(NewEntry {
                    user_id: d.user_id.clone(),
                    kind: EntryKind::Deduct,
                    amount: -amount,
                    balance_after: *balance,
                    app_name: d.app_name.clone(),
                    description: d.description.clone(),
                    project_code: Some(d.project_code.clone()),
                    reference: None,
                    correlation_id: q.correlation_id.clone(),
                    acted_by: None,
                });
                for al in &allocations {
                    plan.moves(
                        at,
                        &d.user_id,
                        al.lot_id,
                        EntryKind::Deduct,
                        -al.amount,
                        -al.amount,
                        Some((&d.app_name, &d.project_code)),
                    );
                }
                plan.reservations.push(NewReservation {
                    user_id: d.user_id.clone(),
                    app_name: d.app_name.clone(),
                    project_code: d.project_code.clone(),
                    amount,
                    description: d.description.clone(),
                    balance_after: *balance,
                    refundable_until,
                });
                Ok(Outcome::fresh(DeductReceipt {
                    user_id: d.user_id.to_string(),
                    credits_deducted: amount,
                    new_balance: *balance,
                    app_name: d.app_name.to_string(),
                    project_code: d.project_code.to_string(),
                    reservation_status: ReservationState::Reserved,
                    refundable_until,
                    timestamp: s.now,
                    allocations,
                }))
            }
        };
        answers.push(answer);
    }
    Ok((answers, plan))
}

/// The answer a deduction gets from its key's stored reservation (the same
/// user's): the first result again, with the lots it drew from, or a
/// conflict when the amount differs.
fn replay(
    stored: &crate::snapshot::Reservation,
    d: &Deduct,
    drawn: Option<&Vec<crate::snapshot::Drawn>>,
) -> Answer<DeductReceipt> {
    if stored.amount != d.amount.get() {
        return Err(LedgerError::IdempotencyConflict(format!(
            "project_code {:?} of app {:?} was already used with an amount of {}; use a new project_code for a new deduction",
            d.project_code.as_str(),
            d.app_name.as_str(),
            stored.amount
        )));
    }
    Ok(Outcome::replay(DeductReceipt {
        user_id: d.user_id.to_string(),
        credits_deducted: stored.amount,
        new_balance: stored.balance_after_deduct,
        app_name: d.app_name.to_string(),
        project_code: d.project_code.to_string(),
        reservation_status: stored.state,
        refundable_until: stored.refundable_until,
        timestamp: stored.created_at,
        // A deduction drew each of its lots once, in burn-down order.
        allocations: drawn
            .map(|lots| {
                lots.iter()
                    .map(|l| Allocation {
                        lot_id: l.lot_id,
                        amount: l.drawn,
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }))
}

/// One transaction of deductions (see [`crate::Slots`]).
async fn deduct_once(
    client: &mut Client,
    batch: &[Queued],
    on_busy: OnBusy,
) -> Slots<DeductReceipt> {
    let live = live(batch);
    let tx = client.transaction().await?;
    let snapshot = load(&tx, live, on_busy).await?;
    let (answers, plan) = decide(&snapshot, live)?;
    if plan::commit(tx, &plan, &snapshot).await?.is_some() {
        for a in answers.iter().flatten().filter(|a| !a.replayed) {
            count_moved("reserved", &a.value.app_name, a.value.credits_deducted);
        }
    }
    Ok(slots(answers, batch.len()))
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
