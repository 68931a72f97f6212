//! Credit movements: grant, deduct (reserve), refund, settle, void and
//! expire; the audit chain, reconcile and backpressure.
//!
//! Every movement is three steps, as TigerBeetle's state machine is
//! (prefetch → execute → commit):
//! * `load` locks the accounts (`penora_store::accounts`, the one lock) and
//!   reads everything the batch needs into a typed [`snapshot::Snapshot`]
//!   (the tables' queries live in [`tables`], one module per table);
//! * `decide` is pure: from the snapshot and the requests it makes each
//!   answer and the [`plan::Plan`] of what to write, with no I/O, so a rule
//!   is a change to a function of plain data, checked against the model in
//!   `tests/decide.rs` without a database;
//! * [`plan::apply`] writes the plan with set-based statements: balances,
//!   entries and their `ledger-audit` outbox rows, lots and their
//!   movements, reservations, handled events.
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
//! * idempotency keys, all per user (contract §15: `(user_id, app_name,
//!   project_code)` for deductions, `(user_id, reference)` for grants,
//!   `(user_id, reservation, reference)` for partial refunds, `(user_id,
//!   event_id)` for ImageGene's events), are read under the account's lock
//!   inside the movement's transaction; a request that finds its key used
//!   answers from the stored first result, or with a conflict when its
//!   parameters differ;
//! * a broken rule found on the way (lots holding more than the balance, a
//!   lot change that does not apply) is [`DbError::Invariant`]: the
//!   transaction rolls back.
//!
//! Deductions and refunds are written for a batch ([`deduct_all`],
//! [`refund_all`]): a lone request is a batch of one, and group commit
//! changes how many commits the work takes, never an answer. Grants,
//! settlements, voids and expiries come one at a time.

pub mod allowances;
pub mod audit;
pub mod backpressure;
pub mod chain;
pub mod checkpoint;
pub mod events_out;
pub mod grant_rules;
pub mod limits;
pub mod plan;
pub mod reconcile;
pub mod snapshot;
pub mod tables;

mod deduct;
mod grant;
mod lot_ops;
mod reads;
mod refund;
mod settle;
mod window;

pub use deduct::{Deduct, DeductReceipt, Queued, deduct, deduct_all};
pub use grant::{Grant, GrantReceipt, grant};
pub use lot_ops::{
    LOT_STATUSES, LotView, Void, VoidReceipt, balance_at, expire_lots, lots, notice_expiring,
    users_with_due_lots, void_lot, void_lot_as,
};
pub use penora_domain::{LotCategory, SettledBy};
pub use penora_store::accounts::OnBusy;
pub use plan::Allocation;
pub use reads::{
    ACCOUNT_SUMMARIES_SQL, ACCOUNT_SUMMARY_SQL, AccountSummary, LedgerRow, account_summaries,
    account_summary, transactions,
};
pub use refund::{QueuedRefund, Refund, RefundReceipt, refund, refund_all, refund_one};
pub use settle::{Settle, SettleReceipt, SettleResult, settle, settle_for};
pub use window::EventTime;

/// The movements' steps, by movement, for the model tests and the
/// benchmarks: each `load` reads a snapshot, each `decide` is pure.
pub mod steps {
    pub use crate::deduct::{decide as decide_deducts, live as live_deducts, load as load_deducts};
    pub use crate::grant::{
        complete as complete_grant, decide as decide_grant, load as load_grant,
    };
    pub use crate::lot_ops::{decide_expiry, decide_void, load_void};
    pub use crate::refund::{decide as decide_refunds, live as live_refunds, load as load_refunds};
    pub use crate::settle::{decide as decide_settle, load as load_settle};
}

use deadpool_postgres::Client;
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
    /// The deduction would take spending past a spend limit (contract §16).
    #[error(
        "spend limit exceeded: the {period} limit of {limit} credits for {} has {spent} spent",
        app_name.as_deref().unwrap_or("all apps")
    )]
    SpendLimitExceeded {
        /// The app the limit holds; `None`: every app.
        app_name: Option<String>,
        /// Its period.
        period: penora_domain::period::Period,
        /// Its `max_credits`.
        limit: i64,
        /// What it counted in the current period before this deduction.
        spent: i64,
        /// When the next period starts.
        resets_at: time::OffsetDateTime,
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
/// ([`penora_store::shard_parts`]), each part in its own transactions, so no
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
    let (groups, parts) = match penora_store::shard_parts(&*client, requests, user_of).await {
        Ok(split) => split,
        Err(e) => return requests.iter().map(|_| Err(e.clone().into())).collect(),
    };
    if parts.len() <= 1 {
        return answer_in_order(client, requests, rule, on_busy, &once).await;
    }
    let mut answers = Vec::with_capacity(parts.len());
    for part in &parts {
        answers.push(answer_in_order(client, part, rule, on_busy, &once).await);
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

/// The slots of a batch (see [`Slots`]) whose first `answers.len()`
/// requests were decided: their answers, then `None` for the rest.
fn slots<T>(answers: Vec<Answer<T>>, batch: usize) -> Vec<Option<Answer<T>>> {
    let mut slots: Vec<Option<Answer<T>>> = answers.into_iter().map(Some).collect();
    slots.resize_with(batch, || None);
    slots
}

/// The answer of a batch of one.
fn only<T>(mut answers: Vec<Answer<T>>) -> Answer<T> {
    answers
        .pop()
        .unwrap_or_else(|| Err(DbError::Other("a request went unanswered".into()).into()))
}

/// Counts credits moved, by kind and app (an app no key names counts as
/// `other`).
fn count_moved(kind: &'static str, app: &str, amount: i64) {
    metrics::counter!("penora_credits_moved_total", "kind" => kind, "app" => penora_domain::labels::app_label(app))
        .increment(amount.unsigned_abs());
}
