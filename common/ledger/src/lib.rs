//! Credit movements: grant, deduct (reserve), refund and settle.
//!
//! Rules every movement keeps:
//! * one movement is one transaction: the guarded balance update, its ledger
//!   row, the reservation change and its `ledger-audit` outbox row commit
//!   together or not at all;
//! * the balance changes only through a guarded `UPDATE` (`balance + delta >=
//!   0`) backed by the `accounts_balance_non_negative` constraint;
//! * locks are taken in one order: the account rows first (in `user_id`
//!   order), then the reservations (in key order), so concurrent movements
//!   queue up instead of deadlocking; an account is locked `FOR NO KEY
//!   UPDATE`, the lock its balance `UPDATE` takes anyway: movements of one
//!   account still go one at a time, but the foreign-key checks of rows
//!   inserted for that account elsewhere (the worker's audit records, say)
//!   do not wait for them;
//! * idempotency keys (`(app_name, project_code)` for deducts, `reference` for
//!   grants, the event id for `generation.failed` refunds) are claimed inside
//!   the movement's transaction; a request that finds its key used answers
//!   from the stored first result, or with a conflict when its parameters
//!   differ.
//!
//! Deductions and refunds have one implementation each, written for a batch
//! ([`deduct`], [`refund`]): a lone request is a batch of one, and group
//! commit changes how many commits the work takes, never an answer. Grants
//! and settlements come one at a time and are written once for one.

pub mod audit;
pub mod backpressure;
pub mod reconcile;

mod deduct;
mod grant;
mod lot_ops;
mod lots;
mod reads;
mod refund;
mod settle;
mod window;

use std::{
    borrow::Cow,
    collections::{HashMap, HashSet},
};

use deadpool_postgres::{Client, Transaction};
use time::OffsetDateTime;
use tokio_postgres::{
    Row,
    types::{FromSql, ToSql},
};
use uuid::Uuid;

pub use deduct::{Deduct, DeductReceipt, Queued, deduct, deduct_all};
pub use grant::{Grant, GrantReceipt, grant};
pub use lot_ops::{
    LOT_STATUSES, LotView, VoidReceipt, balance_at, expire_lots, lots, users_with_due_lots,
    void_lot,
};
pub use lots::{Allocation, SPENDABLE_ORDER};
pub use penora_domain::{LotCategory, SettledBy};
pub use reads::{
    ACCOUNT_SUMMARIES_SQL, ACCOUNT_SUMMARY_SQL, AccountSummary, LedgerRow, account_summaries,
    account_summary, transactions,
};
pub use refund::{QueuedRefund, Refund, RefundReceipt, refund, refund_all, refund_one};
pub use settle::{Settle, SettleReceipt, SettleResult, settle, settle_for};
pub use window::EventTime;

use penora_domain::messages::{JOBS_EXCHANGE, LEDGER_AUDIT, LedgerAuditJob};
use penora_domain::{EntryKind, ReservationState};
use penora_store::DbError;

/// The prefix of the references of refunds that ImageGene's events ask
/// for (`event:<event_id>`); HTTP references may not use it.
pub const EVENT_REFERENCE_PREFIX: &str = "event:";

/// Why a credit movement was refused. Each variant maps to one API error.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The user has no account.
    #[error("user not found")]
    UserNotFound,
    /// The balance is lower than the amount.
    #[error("insufficient credits: balance {balance}, requested {requested}")]
    InsufficientCredits {
        /// Balance at the time of the attempt.
        balance: i64,
        /// Amount asked for.
        requested: i64,
    },
    /// The idempotency key was used before with other parameters.
    #[error("{0}")]
    IdempotencyConflict(String),
    /// No such reservation for this user.
    #[error("{0}")]
    NotFound(String),
    /// The reservation is settled, or its refund window has passed.
    #[error("{0}")]
    NotRefundable(String),
    /// The event that asked for this movement was handled before.
    #[error("duplicate event (first outcome: {first_outcome})")]
    EventSeen {
        /// What the event's first handling did.
        first_outcome: String,
    },
    /// Another transaction holds the account, and the batch was asked not
    /// to wait for it ([`OnBusy::Skip`]): nothing was done; carry the
    /// request out again where waiting holds up no one else.
    #[error("the account is held by another transaction")]
    AccountBusy,
    /// The key acts for another app than the one the movement concerns.
    #[error("{0}")]
    AppMismatch(String),
    /// The request is valid JSON but cannot be carried out as asked.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field at fault.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<tokio_postgres::Error> for LedgerError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Db(e.into())
    }
}

impl From<deadpool_postgres::PoolError> for LedgerError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Self::Db(e.into())
    }
}

/// An answer together with whether it is a replay of an earlier request.
#[derive(Debug, Clone)]
pub struct Outcome<T> {
    /// The answer (the first one, for a replay).
    pub value: T,
    /// True when nothing moved because the request had been carried out before.
    pub replayed: bool,
}

impl<T> Outcome<T> {
    fn fresh(value: T) -> Self {
        Self {
            value,
            replayed: false,
        }
    }

    fn replay(value: T) -> Self {
        Self {
            value,
            replayed: true,
        }
    }
}

/// What became of one request.
pub type Answer<T> = Result<Outcome<T>, LedgerError>;

// ------------------------------------------------------- batches, run to the end

/// What a batch does about an account row that another transaction holds
/// (a long operator transaction, another batch of the same user).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnBusy {
    /// Wait for the lock, at most `DB_LOCK_TIMEOUT_MS`; past that every
    /// request of the batch is answered with [`DbError::LockTimeout`]. For
    /// a lone request, or a batch of one user's requests.
    Wait,
    /// Lock what is free (`SKIP LOCKED`) and answer the busy accounts'
    /// requests with [`LedgerError::AccountBusy`], so that one held account
    /// never holds up the other users of a batch.
    Skip,
}

/// What one transaction of a rule answers for a batch: one slot per
/// request, in order, `Some(answer)` for a leading run (never empty), then
/// `None` from the first request that must wait for the ones before it to
/// commit (its key repeats an earlier one of the batch). An `Err` means
/// nothing was done.
type Slots<T> = Result<Vec<Option<Answer<T>>>, LedgerError>;

/// How many times a request is carried out again, as a new batch, when a
/// concurrent transaction claimed one of its batch's keys first.
const CONFLICT_RETRIES: u32 = 3;

/// Answers every one of `requests`, in order, with as few transactions of
/// `once` (the rule `rule`) as the keys allow: a batch that stops at a
/// repeated key is followed by the next batch; a batch that lost a key to a
/// concurrent transaction runs again (where the key is now seen, and the
/// request replays or conflicts); a batch that fails as a whole is followed
/// by each remaining request alone, so that a failure is the answer of the
/// request that causes it only. A lock wait that timed out answers the whole
/// batch with it: running the requests again would only wait again.
///
/// On a distributed database (Citus) the batch is first split per shard
/// ([`penora_store::shard_groups`]), each part in its own transactions, so no
/// transaction holds locks on two shards; each user's requests keep their
/// order.
async fn answer_all<Q, T, F>(
    client: &mut Client,
    requests: &[Q],
    rule: &'static str,
    on_busy: OnBusy,
    user_of: fn(&Q) -> &str,
    once: F,
) -> Vec<Answer<T>>
where
    Q: Clone,
    F: AsyncFn(&mut Client, &[Q], OnBusy) -> Slots<T>,
{
    if !penora_store::distributed() {
        return answer_in_order(client, requests, rule, on_busy, &once).await;
    }
    let users: Vec<&str> = requests.iter().map(user_of).collect();
    let groups = match penora_store::shard_groups(&*client, &users).await {
        Ok(groups) => groups,
        Err(e) => return requests.iter().map(|_| Err(e.clone().into())).collect(),
    };
    if groups.len() <= 1 {
        return answer_in_order(client, requests, rule, on_busy, &once).await;
    }
    let mut answers = Vec::with_capacity(groups.len());
    for group in &groups {
        let part: Vec<Q> = group.iter().map(|&i| requests[i].clone()).collect();
        answers.push(answer_in_order(client, &part, rule, on_busy, &once).await);
    }
    penora_store::in_places(requests.len(), &groups, answers, || {
        Err(DbError::Other("a request went unanswered".into()).into())
    })
}

/// [`answer_all`] for requests that may share a transaction.
async fn answer_in_order<Q, T, F>(
    client: &mut Client,
    requests: &[Q],
    rule: &'static str,
    on_busy: OnBusy,
    once: &F,
) -> Vec<Answer<T>>
where
    F: AsyncFn(&mut Client, &[Q], OnBusy) -> Slots<T>,
{
    let mut answers = Vec::with_capacity(requests.len());
    let mut alone = false;
    let mut conflicts = 0;
    while answers.len() < requests.len() {
        let rest = &requests[answers.len()..];
        let batch = if alone { &rest[..1] } else { rest };
        match once(client, batch, on_busy).await {
            Ok(got) => {
                let before = answers.len();
                answers.extend(got.into_iter().map_while(|a| a));
                if answers.len() == before {
                    let e = format!("a {rule} batch answered none of its requests");
                    answers.push(Err(DbError::Other(e).into()));
                }
                conflicts = 0;
            }
            Err(LedgerError::Db(DbError::Conflict(_))) if conflicts < CONFLICT_RETRIES => {
                conflicts += 1;
            }
            Err(LedgerError::Db(e @ DbError::LockTimeout(_))) => {
                answers.extend(batch.iter().map(|_| Err(e.clone().into())));
                conflicts = 0;
            }
            Err(e) if batch.len() > 1 => {
                tracing::debug!(error = %e, rule, size = batch.len(), "batch failed; one by one");
                metrics::counter!(format!("penora_{rule}_batch_fallbacks_total")).increment(1);
                alone = true;
                conflicts = 0;
            }
            Err(e) => {
                answers.push(Err(e));
                conflicts = 0;
            }
        }
    }
    answers
}

/// The answer of a batch of one.
fn only<T>(mut answers: Vec<Answer<T>>) -> Answer<T> {
    answers
        .pop()
        .unwrap_or_else(|| Err(DbError::Other("a request went unanswered".into()).into()))
}

// ------------------------------------------------------- shared steps

/// The accounts a batch locked.
struct Locked {
    /// Balances of the locked accounts.
    balances: HashMap<String, i64>,
    /// Accounts that exist but another transaction holds ([`OnBusy::Skip`]).
    busy: HashSet<String>,
}

/// Locks the accounts of `users` in user_id order (one order everywhere: no
/// deadlock between batches), `FOR NO KEY UPDATE`, and returns their
/// balances. With [`OnBusy::Skip`], an account another transaction holds is
/// not waited for but returned in `busy`; a user in neither set has no
/// account.
async fn lock_accounts<'a>(
    tx: &Transaction<'_>,
    users: impl Iterator<Item = &'a str>,
    on_busy: OnBusy,
) -> Result<Locked, DbError> {
    let mut users: Vec<&str> = users.collect();
    users.sort_unstable();
    users.dedup();
    let lock = tx
        .prepare_cached(match on_busy {
            OnBusy::Wait => {
                "SELECT user_id, balance FROM accounts \
                 WHERE user_id = ANY($1::text[]) ORDER BY user_id FOR NO KEY UPDATE"
            }
            OnBusy::Skip => {
                "SELECT user_id, balance FROM accounts \
                 WHERE user_id = ANY($1::text[]) ORDER BY user_id FOR NO KEY UPDATE SKIP LOCKED"
            }
        })
        .await?;
    let balances: HashMap<String, i64> = tx
        .query(&lock, &[&users])
        .await?
        .into_iter()
        .map(|r| (r.get("user_id"), r.get("balance")))
        .collect();
    let mut busy = HashSet::new();
    if on_busy == OnBusy::Skip && balances.len() < users.len() {
        // Missing: no account, or a held one. A plain read never waits.
        let missing: Vec<&str> = users
            .into_iter()
            .filter(|u| !balances.contains_key(*u))
            .collect();
        let exists = tx
            .prepare_cached("SELECT user_id FROM accounts WHERE user_id = ANY($1::text[])")
            .await?;
        busy = tx
            .query(&exists, &[&missing])
            .await?
            .into_iter()
            .map(|r| r.get("user_id"))
            .collect();
    }
    Ok(Locked { balances, busy })
}

/// Locks one user's account, `FOR NO KEY UPDATE` as [`lock_accounts`]
/// does; its balance, or `None` without an account.
async fn lock_account(tx: &Transaction<'_>, user: &str) -> Result<Option<i64>, DbError> {
    let lock = tx
        .prepare_cached("SELECT balance FROM accounts WHERE user_id = $1 FOR NO KEY UPDATE")
        .await?;
    Ok(tx
        .query_opt(&lock, &[&user])
        .await?
        .map(|r| r.get("balance")))
}

/// Moves each user's balance by the sum of that user's `deltas`, with one
/// guarded `UPDATE` (a debit applies only where the balance covers it). Every
/// account must exist and be locked by the caller; anything else is an error
/// and the caller's transaction must not commit.
async fn move_balances(tx: &Transaction<'_>, deltas: &[(&str, i64)]) -> Result<(), DbError> {
    let mut totals: HashMap<&str, i64> = HashMap::new();
    for &(user, delta) in deltas {
        let total = totals.entry(user).or_default();
        *total = total
            .checked_add(delta)
            .ok_or_else(|| DbError::Other("a batch total overflows".into()))?;
    }
    let (users, totals): (Vec<&str>, Vec<i64>) = totals.into_iter().unzip();
    let update = tx
        .prepare_cached(
            "UPDATE accounts a SET balance = a.balance + v.delta, updated_at = now() \
             FROM unnest($1::text[], $2::int8[]) AS v(user_id, delta) \
             WHERE a.user_id = v.user_id AND a.user_id = ANY($1) AND a.balance + v.delta >= 0",
        )
        .await?;
    if tx.execute(&update, &[&users, &totals]).await? != users.len() as u64 {
        return Err(DbError::Other(
            "a batch balance change did not apply to every account".into(),
        ));
    }
    Ok(())
}

/// A ledger row to write.
struct NewEntry<'a> {
    user_id: &'a str,
    kind: EntryKind,
    /// Signed: negative takes credits away.
    amount: i64,
    balance_after: i64,
    app_name: Cow<'a, str>,
    description: Option<&'a str>,
    /// The reservation's key, for deduct, refund and settle entries (and
    /// the expire or void entry of a refund that met a closed lot).
    project_code: Option<&'a str>,
    /// A grant's or a refund's reference.
    reference: Option<&'a str>,
    /// The request id, carried to the entry's audit job.
    correlation_id: Option<&'a str>,
}

/// Writes `entries` in order, so ids grow with the balances they show, and
/// the `ledger-audit` job of each, in two statements of the caller's
/// transaction. No two entries may share user, kind, app and project code
/// (a transaction writes at most one entry of each kind per reservation,
/// and one expire entry per user and app for lots past their expiry).
/// Returns each entry's id and time, in order.
async fn write_entries(
    tx: &Transaction<'_>,
    entries: &[NewEntry<'_>],
) -> Result<Vec<(i64, OffsetDateTime)>, DbError> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let users: Vec<&str> = entries.iter().map(|e| e.user_id).collect();
    let apps: Vec<&str> = entries.iter().map(|e| e.app_name.as_ref()).collect();
    let codes: Vec<Option<&str>> = entries.iter().map(|e| e.project_code).collect();
    let kinds: Vec<&str> = entries.iter().map(|e| e.kind.as_str()).collect();
    let amounts: Vec<i64> = entries.iter().map(|e| e.amount).collect();
    let after: Vec<i64> = entries.iter().map(|e| e.balance_after).collect();
    let descriptions: Vec<Option<&str>> = entries.iter().map(|e| e.description).collect();
    let references: Vec<Option<&str>> = entries.iter().map(|e| e.reference).collect();
    let insert = tx
        .prepare_cached(
            "INSERT INTO ledger_entries \
               (user_id, kind, amount, balance_after, app_name, description, project_code, reference) \
             SELECT v.user_id, v.kind, v.amount, v.balance_after, v.app_name, v.description, v.project_code, v.reference \
             FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::text[], $6::text[], $7::text[], $8::text[]) \
               WITH ORDINALITY AS v(user_id, kind, amount, balance_after, app_name, description, project_code, reference, n) \
             ORDER BY v.n \
             RETURNING id, user_id, kind, app_name, project_code, created_at",
        )
        .await?;
    let params: [&(dyn ToSql + Sync); 8] = [
        &users,
        &kinds,
        &amounts,
        &after,
        &apps,
        &descriptions,
        &codes,
        &references,
    ];
    let rows = tx.query(&insert, &params).await?;
    type EntryKey = (String, String, String, Option<String>);
    let written: HashMap<EntryKey, (i64, OffsetDateTime)> = rows
        .iter()
        .map(|r| {
            (
                (
                    r.get("user_id"),
                    r.get("kind"),
                    r.get("app_name"),
                    r.get("project_code"),
                ),
                (r.get("id"), r.get("created_at")),
            )
        })
        .collect();
    if written.len() != entries.len() {
        return Err(DbError::Other(
            "two ledger rows of one transaction share their key".into(),
        ));
    }
    let mut out = Vec::with_capacity(entries.len());
    let mut payloads = Vec::with_capacity(entries.len());
    for e in entries {
        let key = (
            e.user_id.to_owned(),
            e.kind.as_str().to_owned(),
            e.app_name.to_string(),
            e.project_code.map(str::to_owned),
        );
        let &(id, at) = written
            .get(&key)
            .ok_or_else(|| DbError::Other("a batch ledger row is missing".into()))?;
        out.push((id, at));
        let job = LedgerAuditJob {
            entry_id: id,
            user_id: e.user_id.to_owned(),
            kind: e.kind.as_str().to_owned(),
            amount: e.amount,
            balance_after: e.balance_after,
        };
        payloads.push(
            serde_json::to_value(&job).map_err(|e| DbError::Other(format!("job encoding: {e}")))?,
        );
    }
    insert_audit_jobs(
        tx,
        &users,
        &entries.iter().map(|e| e.correlation_id).collect::<Vec<_>>(),
        &payloads,
    )
    .await?;
    Ok(out)
}

/// Writes `ledger-audit` jobs (one per user, request id and payload) in one
/// statement of the caller's transaction.
async fn insert_audit_jobs(
    tx: &Transaction<'_>,
    users: &[&str],
    correlations: &[Option<&str>],
    payloads: &[serde_json::Value],
) -> Result<(), DbError> {
    let ids: Vec<Uuid> = users.iter().map(|_| Uuid::now_v7()).collect();
    let stmt = tx
        .prepare_cached(
            "INSERT INTO outbox (user_id, exchange, routing_key, message_id, correlation_id, payload) \
             SELECT v.user_id, $2, $3, v.message_id, v.correlation_id, v.payload \
             FROM unnest($1::text[], $4::uuid[], $5::text[], $6::jsonb[]) \
               AS v(user_id, message_id, correlation_id, payload)",
        )
        .await?;
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

/// `rows` by their reservation key `(user_id, app_name, project_code)`, with
/// the values of columns `a` and `b`.
fn by_reservation<A, B>(rows: &[Row], a: &str, b: &str) -> HashMap<ReservationKey, (A, B)>
where
    A: for<'r> FromSql<'r>,
    B: for<'r> FromSql<'r>,
{
    rows.iter()
        .map(|r| (reservation_key(r), (r.get(a), r.get(b))))
        .collect()
}

/// A reservation's key, `(user_id, app_name, project_code)`: unique per user
/// (contract §15), so two users' reservations may share app and code.
type ReservationKey = (String, String, String);

/// The key of the reservation a row names (columns `user_id`, `app_name`,
/// `project_code`).
fn reservation_key(row: &Row) -> ReservationKey {
    (
        row.get("user_id"),
        row.get("app_name"),
        row.get("project_code"),
    )
}

/// The key `(user_id, app_name, project_code)` as owned strings.
fn key_of(user_id: &str, app_name: &str, project_code: &str) -> ReservationKey {
    (
        user_id.to_owned(),
        app_name.to_owned(),
        project_code.to_owned(),
    )
}

fn state_of(raw: &str) -> Result<ReservationState, DbError> {
    ReservationState::from_db(raw)
        .ok_or_else(|| DbError::Other(format!("unknown reservation state {raw:?}")))
}

/// Counts credits moved, by kind and app (an app no key names counts as
/// `other`).
fn count_moved(kind: &'static str, app: &str, amount: i64) {
    metrics::counter!("penora_credits_moved_total", "kind" => kind, "app" => penora_domain::labels::app_label(app))
        .increment(amount.unsigned_abs());
}
