//! Many deductions in one transaction (group commit).
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
//! * a key met twice in one batch is carried out once, and the later copies
//!   are left to the caller, which runs them alone after the commit (they
//!   replay).
//!
//! When anything unexpected happens (a concurrent request of another user
//! claimed one of the keys, a lock timeout, a lost connection), the whole
//! batch rolls back and the caller runs each request alone with
//! [`super::deduct`]: batching never changes an answer, only how many
//! commits it takes.

use std::collections::{HashMap, HashSet};

use deadpool_postgres::Client;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{Deduct, DeductReceipt, LedgerError, Outcome, answer_from_reservation};
use crate::{
    db::DbError,
    domain::{EntryKind, ReservationState},
    messages::{JOBS_EXCHANGE, LEDGER_AUDIT, LedgerAuditJob},
};

/// Locks the batch's accounts, in one order.
const LOCK_ACCOUNTS_SQL: &str = "SELECT user_id, balance FROM accounts \
     WHERE user_id = ANY($1::text[]) ORDER BY user_id FOR UPDATE";
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
/// order: `Some(answer)`, or `None` for a repeated key that the caller must
/// run alone after this returns. An `Err` means nothing was done: the caller
/// runs every request alone.
pub async fn deduct_many(
    client: &mut Client,
    batch: &[Queued],
) -> Result<Vec<Option<Answer>>, LedgerError> {
    let mut answers: Vec<Option<Answer>> = batch.iter().map(|_| None).collect();
    let mut keys = HashSet::new();
    let live: Vec<usize> = (0..batch.len())
        .filter(|&i| {
            let d = &batch[i].deduct;
            keys.insert((d.app_name.as_str(), d.project_code.as_str()))
        })
        .collect();

    let tx = client.transaction().await?;
    let mut users: Vec<&str> = live
        .iter()
        .map(|&i| batch[i].deduct.user_id.as_str())
        .collect();
    users.sort_unstable();
    users.dedup();
    let lock = tx.prepare_cached(LOCK_ACCOUNTS_SQL).await?;
    let mut balances: HashMap<String, i64> = tx
        .query(&lock, &[&users])
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();

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
        return Err(DbError::Conflict(
            "a key of the batch was claimed concurrently".into(),
        )
        .into());
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

    let mut job_ids = Vec::with_capacity(accepted.len());
    let mut job_correlations = Vec::with_capacity(accepted.len());
    let mut job_payloads = Vec::with_capacity(accepted.len());
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
        job_ids.push(Uuid::now_v7());
        job_correlations.push(batch[i].correlation_id.as_deref());
        job_payloads.push(
            serde_json::to_value(&job)
                .map_err(|e| DbError::Other(format!("job encoding: {e}")))?,
        );
    }
    let jobs = tx.prepare_cached(INSERT_JOBS_SQL).await?;
    tx.execute(
        &jobs,
        &[
            &a_users,
            &JOBS_EXCHANGE,
            &LEDGER_AUDIT,
            &job_ids,
            &job_correlations,
            &job_payloads,
        ],
    )
    .await?;
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
