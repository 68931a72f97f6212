//! Many deductions, or many refunds, in one transaction (group commit).
//!
//! The refund half ([`refund_many`]) serves the worker's `generation.failed`
//! events the same way; the rest of this note is about deductions.
//!
//! Under load the API hands the deductions that are waiting at the same
//! moment to [`deduct_many`], which carries them out with a fixed number of
//! set-based statements and one commit, instead of one transaction (and one
//! WAL flush) each. On one hot account this turns a queue of row-lock waits
//! into one guarded `UPDATE` per batch.
//!
//! Every rule of [`super::deduct`] holds for each request of the batch:
//! * the account rows are locked first (in `user_id` order, so two batches
//!   cannot deadlock), then the reservations are claimed;
//! * each request is decided in arrival order against the balance left by the
//!   ones before it, so it gets the answer it would have had alone
//!   (`insufficient_credits` with the balance it saw, `user_not_found`, a
//!   replay or a conflict from its key's stored reservation);
//! * the debit is one guarded `UPDATE … WHERE balance >= total` per user,
//!   backed by the `CHECK (balance >= 0)`; each accepted request still gets its
//!   own reservation, ledger row (with its own `balance_after`) and
//!   `ledger-audit` job, all committed together or not at all;
//! * a key met twice in one batch ends the batch: the requests from the
//!   repeat on are left unanswered, and the caller passes them in again as
//!   the next batch (where the repeat replays or conflicts), so every request
//!   is decided after the ones that came before it, as one by one.
//!
//! When anything unexpected happens (a concurrent request of another user
//! claimed one of the keys, a lock timeout, a lost connection), the whole
//! batch rolls back and the caller runs each request alone with
//! [`super::deduct`]: batching never changes an answer, only how many
//! commits it takes.

use std::collections::{HashMap, HashSet};

use deadpool_postgres::{Client, Transaction};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{Deduct, DeductReceipt, LedgerError, Outcome, RefundReceipt, answer_from_reservation};
use crate::{
    db::DbError,
    domain::{EntryKind, ReservationState},
    messages::{JOBS_EXCHANGE, LEDGER_AUDIT, LedgerAuditJob},
};

/// Locks the batch's accounts, in one order.
const LOCK_ACCOUNTS_SQL: &str = "SELECT user_id, balance FROM accounts \
     WHERE user_id = ANY($1::text[]) ORDER BY user_id FOR UPDATE";

/// Locks the accounts of `users` in user_id order (one order everywhere: no
/// deadlock between batches) and returns their balances.
async fn lock_accounts<'a>(
    tx: &Transaction<'_>,
    users: impl Iterator<Item = &'a str>,
) -> Result<HashMap<String, i64>, DbError> {
    let mut users: Vec<&str> = users.collect();
    users.sort_unstable();
    users.dedup();
    let lock = tx.prepare_cached(LOCK_ACCOUNTS_SQL).await?;
    Ok(tx
        .query(&lock, &[&users])
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}
/// The stored reservations of the batch's keys.
const FIND_RESERVATIONS_SQL: &str = "SELECT r.user_id, r.amount, r.balance_after_deduct, r.state, \
            r.refundable_until, r.created_at, r.app_name, r.project_code \
     FROM reservations r \
     JOIN unnest($1::text[], $2::text[]) AS k(app_name, project_code) \
       ON r.app_name = k.app_name AND r.project_code = k.project_code";
/// Claims the accepted requests' keys (in key order, so two batches claiming
/// overlapping keys wait for each other instead of deadlocking).
const CLAIM_RESERVATIONS_SQL: &str = "INSERT INTO reservations \
       (app_name, project_code, user_id, amount, description, balance_after_deduct, refundable_until) \
     SELECT v.app_name, v.project_code, v.user_id, v.amount, v.description, v.balance_after, \
            now() + make_interval(secs => v.window_secs) \
     FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::int8[], $7::float8[]) \
       AS v(app_name, project_code, user_id, amount, description, balance_after, window_secs) \
     ORDER BY v.app_name, v.project_code \
     ON CONFLICT (app_name, project_code) DO NOTHING \
     RETURNING app_name, project_code, created_at, refundable_until";
/// One guarded debit per user, of the sum of that user's accepted requests.
const DEBIT_MANY_SQL: &str = "UPDATE accounts a SET balance = a.balance - v.total, updated_at = now() \
     FROM unnest($1::text[], $2::int8[]) AS v(user_id, total) \
     WHERE a.user_id = v.user_id AND a.balance >= v.total";
/// The ledger rows, in arrival order (ids grow with the balances they show).
const INSERT_ENTRIES_SQL: &str = "INSERT INTO ledger_entries \
       (user_id, kind, amount, balance_after, app_name, description, project_code) \
     SELECT v.user_id, 'deduct', -v.amount, v.balance_after, v.app_name, v.description, v.project_code \
     FROM unnest($1::text[], $2::int8[], $3::int8[], $4::text[], $5::text[], $6::text[]) \
       WITH ORDINALITY AS v(user_id, amount, balance_after, app_name, description, project_code, n) \
     ORDER BY v.n \
     RETURNING id, app_name, project_code";
/// The `ledger-audit` jobs of those rows.
const INSERT_JOBS_SQL: &str = "INSERT INTO outbox (user_id, exchange, routing_key, message_id, correlation_id, payload) \
     SELECT v.user_id, $2, $3, v.message_id, v.correlation_id, v.payload \
     FROM unnest($1::text[], $4::uuid[], $5::text[], $6::jsonb[]) \
       AS v(user_id, message_id, correlation_id, payload)";

/// Writes the `ledger-audit` jobs of a batch's ledger rows, with their
/// request ids, in one statement of the caller's transaction.
async fn insert_audit_jobs(
    tx: &Transaction<'_>,
    jobs: &[(LedgerAuditJob, Option<&str>)],
) -> Result<(), LedgerError> {
    let users: Vec<&str> = jobs.iter().map(|(j, _)| j.user_id.as_str()).collect();
    let ids: Vec<Uuid> = jobs.iter().map(|_| Uuid::now_v7()).collect();
    let correlations: Vec<Option<&str>> = jobs.iter().map(|(_, c)| *c).collect();
    let payloads = jobs
        .iter()
        .map(|(j, _)| serde_json::to_value(j))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| DbError::Other(format!("job encoding: {e}")))?;
    let stmt = tx.prepare_cached(INSERT_JOBS_SQL).await?;
    tx.execute(
        &stmt,
        &[
            &users,
            &JOBS_EXCHANGE,
            &LEDGER_AUDIT,
            &ids,
            &correlations,
            &payloads,
        ],
    )
    .await?;
    Ok(())
}

/// One request of a batch.
#[derive(Debug, Clone)]
pub struct Queued {
    /// The deduction.
    pub deduct: Deduct,
    /// The request id, carried to its audit job.
    pub correlation_id: Option<String>,
}

/// What became of one request of a batch.
pub type Answer = Result<Outcome<DeductReceipt>, LedgerError>;

/// Carries out `batch` in one transaction. Returns one slot per request, in
/// order: `Some(answer)` for a leading run of requests, then `None` from the
/// first request whose key repeats an earlier one of the batch; the caller
/// passes those in again. An `Err` means nothing was done: the caller runs
/// every request alone.
pub async fn deduct_many(
    client: &mut Client,
    batch: &[Queued],
) -> Result<Vec<Option<Answer>>, LedgerError> {
    let mut answers: Vec<Option<Answer>> = batch.iter().map(|_| None).collect();
    let mut keys = HashSet::new();
    let live: Vec<usize> = (0..batch.len())
        .take_while(|&i| {
            let d = &batch[i].deduct;
            keys.insert((d.app_name.as_str(), d.project_code.as_str()))
        })
        .collect();

    let tx = client.transaction().await?;
    let mut balances =
        lock_accounts(&tx, live.iter().map(|&i| batch[i].deduct.user_id.as_str())).await?;

    let apps: Vec<&str> = live
        .iter()
        .map(|&i| batch[i].deduct.app_name.as_str())
        .collect();
    let codes: Vec<&str> = live
        .iter()
        .map(|&i| batch[i].deduct.project_code.as_str())
        .collect();
    let find = tx.prepare_cached(FIND_RESERVATIONS_SQL).await?;
    let stored: HashMap<(String, String), tokio_postgres::Row> = tx
        .query(&find, &[&apps, &codes])
        .await?
        .into_iter()
        .map(|r| ((r.get(6), r.get(7)), r))
        .collect();

    // Decide each request in arrival order, as if it ran alone.
    let mut accepted: Vec<(usize, i64)> = Vec::new();
    for &i in &live {
        let d = &batch[i].deduct;
        let key = (d.app_name.to_string(), d.project_code.to_string());
        if let Some(row) = stored.get(&key) {
            answers[i] = Some(answer_from_reservation(row, d));
            continue;
        }
        let amount = d.amount.get();
        match balances.get_mut(d.user_id.as_str()) {
            None => answers[i] = Some(Err(LedgerError::UserNotFound)),
            Some(balance) if *balance < amount => {
                answers[i] = Some(Err(LedgerError::InsufficientCredits {
                    balance: *balance,
                    requested: amount,
                }));
            }
            Some(balance) => {
                *balance -= amount;
                accepted.push((i, *balance));
            }
        }
    }
    if accepted.is_empty() {
        tx.rollback().await?;
        return Ok(answers);
    }

    let column = |f: &dyn Fn(&Deduct) -> &str| -> Vec<String> {
        accepted
            .iter()
            .map(|&(i, _)| f(&batch[i].deduct).to_owned())
            .collect()
    };
    let a_apps = column(&|d| d.app_name.as_str());
    let a_codes = column(&|d| d.project_code.as_str());
    let a_users = column(&|d| d.user_id.as_str());
    let a_amounts: Vec<i64> = accepted
        .iter()
        .map(|&(i, _)| batch[i].deduct.amount.get())
        .collect();
    let a_descriptions: Vec<Option<&str>> = accepted
        .iter()
        .map(|&(i, _)| batch[i].deduct.description.as_deref())
        .collect();
    let a_after: Vec<i64> = accepted.iter().map(|&(_, after)| after).collect();
    let a_windows: Vec<f64> = accepted
        .iter()
        .map(|&(i, _)| batch[i].deduct.refund_window.as_secs_f64())
        .collect();

    let claim = tx.prepare_cached(CLAIM_RESERVATIONS_SQL).await?;
    let claimed = tx
        .query(
            &claim,
            &[
                &a_apps,
                &a_codes,
                &a_users,
                &a_amounts,
                &a_descriptions,
                &a_after,
                &a_windows,
            ],
        )
        .await?;
    if claimed.len() != accepted.len() {
        // Another user's request took one of these keys since we looked.
        tx.rollback().await?;
        return Err(DbError::Conflict("a key of the batch was claimed concurrently".into()).into());
    }
    let times: HashMap<(String, String), (OffsetDateTime, OffsetDateTime)> = claimed
        .iter()
        .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3))))
        .collect();

    let mut totals: HashMap<&str, i64> = HashMap::new();
    for (user, amount) in a_users.iter().zip(&a_amounts) {
        *totals.entry(user.as_str()).or_default() += amount;
    }
    let (t_users, t_totals): (Vec<&str>, Vec<i64>) = totals.into_iter().unzip();
    let debit = tx.prepare_cached(DEBIT_MANY_SQL).await?;
    let debited = tx.execute(&debit, &[&t_users, &t_totals]).await?;
    if debited != t_users.len() as u64 {
        // Cannot happen with the rows locked; never commit a partial batch.
        tx.rollback().await?;
        return Err(DbError::Other("a batch debit did not apply to every account".into()).into());
    }

    let insert = tx.prepare_cached(INSERT_ENTRIES_SQL).await?;
    let entries = tx
        .query(
            &insert,
            &[
                &a_users,
                &a_amounts,
                &a_after,
                &a_apps,
                &a_descriptions,
                &a_codes,
            ],
        )
        .await?;
    let entry_ids: HashMap<(String, String), i64> = entries
        .iter()
        .map(|r| ((r.get(1), r.get(2)), r.get(0)))
        .collect();

    let mut jobs = Vec::with_capacity(accepted.len());
    for (k, &(i, after)) in accepted.iter().enumerate() {
        let key = (a_apps[k].clone(), a_codes[k].clone());
        let entry_id = *entry_ids
            .get(&key)
            .ok_or_else(|| DbError::Other("a batch ledger row is missing".into()))?;
        let job = LedgerAuditJob {
            entry_id,
            user_id: a_users[k].clone(),
            kind: EntryKind::Deduct.as_str().to_owned(),
            amount: -a_amounts[k],
            balance_after: after,
        };
        jobs.push((job, batch[i].correlation_id.as_deref()));
    }
    insert_audit_jobs(&tx, &jobs).await?;
    tx.commit().await?;

    for (k, &(i, after)) in accepted.iter().enumerate() {
        let d = &batch[i].deduct;
        let key = (a_apps[k].clone(), a_codes[k].clone());
        let Some(&(created_at, refundable_until)) = times.get(&key) else {
            // Committed but not reported: the caller's lone run replays it.
            continue;
        };
        metrics::counter!("penora_credits_moved_total", "kind" => "reserved", "app" => d.app_name.to_string())
            .increment(a_amounts[k].unsigned_abs());
        answers[i] = Some(Ok(Outcome::fresh(DeductReceipt {
            user_id: a_users[k].clone(),
            credits_deducted: a_amounts[k],
            new_balance: after,
            app_name: a_apps[k].clone(),
            project_code: a_codes[k].clone(),
            reservation_status: ReservationState::Reserved,
            refundable_until,
            timestamp: created_at,
        })));
    }
    Ok(answers)
}

// ---------------------------------------------------------------- refunds

/// The reservations of a refund batch, locked in key order.
const LOCK_RESERVATIONS_SQL: &str = "SELECT r.app_name, r.project_code, r.user_id, r.amount, \
            r.state = 'reserved' AND r.refundable_until >= now() \
     FROM reservations r \
     WHERE (r.app_name, r.project_code) IN (SELECT * FROM unnest($1::text[], $2::text[])) \
     ORDER BY r.app_name, r.project_code FOR UPDATE";
/// Events of the batch handled before.
const SEEN_EVENTS_SQL: &str = "SELECT user_id, event_id FROM processed_events \
     WHERE (user_id, event_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))";
/// One credit per user, of the sum of that user's refunds.
const CREDIT_MANY_SQL: &str = "UPDATE accounts a SET balance = a.balance + v.total, updated_at = now() \
     FROM unnest($1::text[], $2::int8[]) AS v(user_id, total) \
     WHERE a.user_id = v.user_id";
/// The refunds' ledger rows, in batch order.
const INSERT_REFUND_ENTRIES_SQL: &str = "INSERT INTO ledger_entries \
       (user_id, kind, amount, balance_after, app_name, description, project_code) \
     SELECT v.user_id, 'refund', v.amount, v.balance_after, v.app_name, v.description, v.project_code \
     FROM unnest($1::text[], $2::int8[], $3::int8[], $4::text[], $5::text[], $6::text[]) \
       WITH ORDINALITY AS v(user_id, amount, balance_after, app_name, description, project_code, n) \
     ORDER BY v.n \
     RETURNING id, app_name, project_code, created_at";
/// The reservations, marked refunded with their answers.
const MARK_REFUNDED_SQL: &str = "UPDATE reservations r SET state = 'refunded', refunded_at = v.at, \
            refund_reason = v.reason, balance_after_refund = v.balance_after \
     FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::int8[]) \
       AS v(app_name, project_code, at, reason, balance_after) \
     WHERE r.app_name = v.app_name AND r.project_code = v.project_code";
/// The events, recorded as handled.
const RECORD_EVENTS_SQL: &str = "INSERT INTO processed_events (user_id, event_id, kind, outcome) \
     SELECT v.user_id, v.event_id, 'failed', 'refunded' FROM unnest($1::text[], $2::text[]) AS v(user_id, event_id) \
     ON CONFLICT DO NOTHING";

/// One refund of a batch: a `generation.failed` event.
#[derive(Debug, Clone)]
pub struct QueuedRefund {
    /// Whose reservation.
    pub user_id: String,
    /// The reservation's app.
    pub app_name: String,
    /// The reservation's key.
    pub project_code: String,
    /// Why.
    pub reason: Option<String>,
    /// The event's id, recorded in `processed_events` with the refund.
    pub event_id: String,
    /// The request id, carried to the audit job.
    pub correlation_id: Option<String>,
}

/// Refunds many reservations in one transaction, with the rules of
/// [`super::refund`] (account rows locked first in `user_id` order, then the
/// reservations in key order; one guarded state change each) and the event's
/// `processed_events` row in the same commit. Only the plain case is done
/// here: a reserved reservation of that user, inside its window, named once
/// in the batch by an event not seen before. Every other request gets `None`
/// and the caller runs it alone, which gives its exact answer (a replay, a
/// duplicate, not found, settled, window closed). An `Err` means nothing was
/// done.
pub async fn refund_many(
    client: &mut Client,
    batch: &[QueuedRefund],
) -> Result<Vec<Option<RefundReceipt>>, LedgerError> {
    let mut answers: Vec<Option<RefundReceipt>> = batch.iter().map(|_| None).collect();
    let mut keys = HashSet::new();
    let mut events = HashSet::new();
    let once: Vec<usize> = (0..batch.len())
        .filter(|&i| {
            let r = &batch[i];
            let fresh_key = keys.insert((r.app_name.as_str(), r.project_code.as_str()));
            let fresh_event = events.insert((r.user_id.as_str(), r.event_id.as_str()));
            fresh_key && fresh_event
        })
        .collect();
    if once.is_empty() {
        return Ok(answers);
    }
    let tx = client.transaction().await?;
    let mut balances = lock_accounts(&tx, once.iter().map(|&i| batch[i].user_id.as_str())).await?;
    let apps: Vec<&str> = once.iter().map(|&i| batch[i].app_name.as_str()).collect();
    let codes: Vec<&str> = once
        .iter()
        .map(|&i| batch[i].project_code.as_str())
        .collect();
    let lock = tx.prepare_cached(LOCK_RESERVATIONS_SQL).await?;
    // key -> (user, amount, refundable now)
    let reservations: HashMap<(String, String), (String, i64, bool)> = tx
        .query(&lock, &[&apps, &codes])
        .await?
        .into_iter()
        .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3), r.get(4))))
        .collect();
    let e_users: Vec<&str> = once.iter().map(|&i| batch[i].user_id.as_str()).collect();
    let e_ids: Vec<&str> = once.iter().map(|&i| batch[i].event_id.as_str()).collect();
    let seen_stmt = tx.prepare_cached(SEEN_EVENTS_SQL).await?;
    let seen: HashSet<(String, String)> = tx
        .query(&seen_stmt, &[&e_users, &e_ids])
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();

    // (index in batch, amount, balance after)
    let mut refunds: Vec<(usize, i64, i64)> = Vec::new();
    for &i in &once {
        let r = &batch[i];
        if seen.contains(&(r.user_id.clone(), r.event_id.clone())) {
            continue;
        }
        let key = (r.app_name.clone(), r.project_code.clone());
        let Some((owner, amount, refundable)) = reservations.get(&key) else {
            continue;
        };
        if owner != &r.user_id || !refundable {
            continue;
        }
        let Some(balance) = balances.get_mut(&r.user_id) else {
            continue;
        };
        *balance = balance.saturating_add(*amount);
        refunds.push((i, *amount, *balance));
    }
    if refunds.is_empty() {
        tx.rollback().await?;
        return Ok(answers);
    }

    let f_users: Vec<&str> = refunds
        .iter()
        .map(|&(i, ..)| batch[i].user_id.as_str())
        .collect();
    let f_apps: Vec<&str> = refunds
        .iter()
        .map(|&(i, ..)| batch[i].app_name.as_str())
        .collect();
    let f_codes: Vec<&str> = refunds
        .iter()
        .map(|&(i, ..)| batch[i].project_code.as_str())
        .collect();
    let f_reasons: Vec<Option<&str>> = refunds
        .iter()
        .map(|&(i, ..)| batch[i].reason.as_deref())
        .collect();
    let f_amounts: Vec<i64> = refunds.iter().map(|&(_, amount, _)| amount).collect();
    let f_after: Vec<i64> = refunds.iter().map(|&(.., after)| after).collect();

    let mut totals: HashMap<&str, i64> = HashMap::new();
    for (user, amount) in f_users.iter().zip(&f_amounts) {
        *totals.entry(user).or_default() += amount;
    }
    let (t_users, t_totals): (Vec<&str>, Vec<i64>) = totals.into_iter().unzip();
    let credit = tx.prepare_cached(CREDIT_MANY_SQL).await?;
    if tx.execute(&credit, &[&t_users, &t_totals]).await? != t_users.len() as u64 {
        tx.rollback().await?;
        return Err(DbError::Other("a batch credit did not apply to every account".into()).into());
    }
    let insert = tx.prepare_cached(INSERT_REFUND_ENTRIES_SQL).await?;
    let entries = tx
        .query(
            &insert,
            &[
                &f_users, &f_amounts, &f_after, &f_apps, &f_reasons, &f_codes,
            ],
        )
        .await?;
    let entry_of: HashMap<(String, String), (i64, OffsetDateTime)> = entries
        .iter()
        .map(|r| ((r.get(1), r.get(2)), (r.get(0), r.get(3))))
        .collect();
    let mut at = Vec::with_capacity(refunds.len());
    let mut jobs = Vec::with_capacity(refunds.len());
    for (k, &(i, amount, after)) in refunds.iter().enumerate() {
        let Some(&(entry_id, created_at)) =
            entry_of.get(&(f_apps[k].to_owned(), f_codes[k].to_owned()))
        else {
            tx.rollback().await?;
            return Err(DbError::Other("a batch ledger row is missing".into()).into());
        };
        at.push(created_at);
        let job = LedgerAuditJob {
            entry_id,
            user_id: f_users[k].to_owned(),
            kind: EntryKind::Refund.as_str().to_owned(),
            amount,
            balance_after: after,
        };
        jobs.push((job, batch[i].correlation_id.as_deref()));
    }
    insert_audit_jobs(&tx, &jobs).await?;
    let mark = tx.prepare_cached(MARK_REFUNDED_SQL).await?;
    let marked = tx
        .execute(&mark, &[&f_apps, &f_codes, &at, &f_reasons, &f_after])
        .await?;
    if marked != refunds.len() as u64 {
        tx.rollback().await?;
        return Err(DbError::Other("a batch reservation did not change".into()).into());
    }
    let f_events: Vec<&str> = refunds
        .iter()
        .map(|&(i, ..)| batch[i].event_id.as_str())
        .collect();
    let record = tx.prepare_cached(RECORD_EVENTS_SQL).await?;
    tx.execute(&record, &[&f_users, &f_events]).await?;
    tx.commit().await?;

    for (k, &(i, amount, after)) in refunds.iter().enumerate() {
        metrics::counter!("penora_credits_moved_total", "kind" => "refunded", "app" => f_apps[k].to_owned())
            .increment(amount.unsigned_abs());
        answers[i] = Some(RefundReceipt {
            user_id: f_users[k].to_owned(),
            credits_refunded: amount,
            new_balance: after,
            app_name: f_apps[k].to_owned(),
            project_code: f_codes[k].to_owned(),
            reservation_status: ReservationState::Refunded,
            reason: batch[i].reason.clone(),
            timestamp: at[k],
        });
    }
    Ok(answers)
}
