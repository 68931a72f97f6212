//! Credit movements: grant, deduct (reserve), refund and settle.
//!
//! Rules every function here keeps:
//! * one movement is one transaction: the guarded balance update, its ledger
//!   row, the reservation change and its `ledger-audit` outbox row commit
//!   together or not at all;
//! * the balance changes only through a guarded `UPDATE` (`balance >= amount`)
//!   backed by the `accounts_balance_non_negative` constraint;
//! * locks are taken in one order, the account row first and the reservation
//!   second, so concurrent movements queue up instead of deadlocking;
//! * idempotency keys (`(app_name, project_code)` for deducts, `reference` for
//!   grants) are claimed with `ON CONFLICT DO NOTHING`; a request that loses
//!   the claim rolls back and answers from the stored first result, or with a
//!   conflict when its parameters differ.

pub mod batch;

use std::time::Duration;

use deadpool_postgres::{Client, GenericClient, Transaction};
use serde::Serialize;
use time::OffsetDateTime;

use crate::{
    db::DbError,
    domain::{AppName, Credits, EntryKind, ProjectCode, ReservationState, UserId},
    messages::{LEDGER_AUDIT, LedgerAuditJob},
    outbox,
};

/// SQL of a deduct's guarded debit (also driven raw by the benchmark).
pub const DEBIT_SQL: &str = "UPDATE accounts SET balance = balance - $2, updated_at = now() \
     WHERE user_id = $1 AND balance >= $2 RETURNING balance";
/// SQL claiming a deduct's idempotency key by inserting its reservation.
pub const CLAIM_RESERVATION_SQL: &str = "INSERT INTO reservations \
       (app_name, project_code, user_id, amount, description, balance_after_deduct, refundable_until) \
     VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7)) \
     ON CONFLICT (app_name, project_code) DO NOTHING \
     RETURNING created_at, refundable_until";
/// SQL appending a ledger row.
pub const INSERT_ENTRY_SQL: &str = "INSERT INTO ledger_entries \
       (user_id, kind, amount, balance_after, app_name, description, project_code, reference) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id, created_at";
/// SQL of `user-info`'s summary.
pub const ACCOUNT_SUMMARY_SQL: &str = "SELECT a.balance, a.storage_used_bytes, \
       (SELECT count(*) FROM projects p WHERE p.user_id = a.user_id AND p.status <> 'deleted'), \
       (SELECT coalesce(sum(r.amount), 0)::bigint FROM reservations r \
          WHERE r.user_id = a.user_id AND r.state = 'reserved') \
     FROM accounts a WHERE a.user_id = $1";

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

/// A ledger row as written, for the audit job.
struct Entry<'a> {
    user_id: &'a str,
    kind: EntryKind,
    amount: i64,
    balance_after: i64,
    app_name: &'a str,
    description: Option<&'a str>,
    project_code: Option<&'a str>,
    reference: Option<&'a str>,
}

/// Appends a ledger row and its `ledger-audit` job; returns the row's id and time.
async fn append_entry(
    tx: &Transaction<'_>,
    e: Entry<'_>,
    correlation_id: Option<&str>,
) -> Result<(i64, OffsetDateTime), DbError> {
    let stmt = tx.prepare_cached(INSERT_ENTRY_SQL).await?;
    let row = tx
        .query_one(
            &stmt,
            &[
                &e.user_id,
                &e.kind.as_str(),
                &e.amount,
                &e.balance_after,
                &e.app_name,
                &e.description,
                &e.project_code,
                &e.reference,
            ],
        )
        .await?;
    let id: i64 = row.get(0);
    let job = LedgerAuditJob {
        entry_id: id,
        user_id: e.user_id.to_owned(),
        kind: e.kind.as_str().to_owned(),
        amount: e.amount,
        balance_after: e.balance_after,
    };
    outbox::enqueue_job(tx, e.user_id, LEDGER_AUDIT, &job, correlation_id).await?;
    Ok((id, row.get(1)))
}

// ---------------------------------------------------------------- grant

/// A grant (`add-credits`).
#[derive(Debug, Clone)]
pub struct Grant {
    /// Who receives the credits (the account is created if new).
    pub user_id: UserId,
    /// How many.
    pub amount: Credits,
    /// The app on whose behalf (default `penora`).
    pub app_name: AppName,
    /// Why, for people (a purchase, a bonus).
    pub reason: String,
    /// Idempotency reference (e.g. the payment id).
    pub reference: String,
}

/// The result of a grant.
#[derive(Debug, Clone, Serialize)]
pub struct GrantReceipt {
    /// Who received the credits.
    pub user_id: String,
    /// How many.
    pub credits_added: i64,
    /// The balance right after this grant.
    pub new_balance: i64,
    /// The idempotency reference.
    pub reference: String,
    /// The ledger entry's id.
    pub entry_id: i64,
    /// When the grant was made.
    #[serde(serialize_with = "crate::timefmt::serde_millis::serialize")]
    pub timestamp: OffsetDateTime,
}

/// Grants credits, once per `reference`.
pub async fn grant(
    client: &mut Client,
    g: &Grant,
    correlation_id: Option<&str>,
) -> Result<Outcome<GrantReceipt>, LedgerError> {
    let tx = client.transaction().await?;
    let upsert = tx
        .prepare_cached(
            "INSERT INTO accounts (user_id, balance) VALUES ($1, $2) \
             ON CONFLICT (user_id) DO UPDATE \
               SET balance = accounts.balance + EXCLUDED.balance, updated_at = now() \
               WHERE accounts.balance <= 9223372036854775807 - EXCLUDED.balance \
             RETURNING balance",
        )
        .await?;
    let Some(row) = tx
        .query_opt(&upsert, &[&g.user_id.as_str(), &g.amount.get()])
        .await?
    else {
        return Err(LedgerError::Invalid {
            field: "amount",
            reason: "would take the balance past the largest possible balance".into(),
        });
    };
    let new_balance: i64 = row.get(0);
    let claim = tx
        .prepare_cached(
            "INSERT INTO ledger_entries (user_id, kind, amount, balance_after, app_name, description, reference) \
             VALUES ($1, 'grant', $2, $3, $4, $5, $6) \
             ON CONFLICT (reference) WHERE kind = 'grant' DO NOTHING \
             RETURNING id, created_at",
        )
        .await?;
    let claimed = tx
        .query_opt(
            &claim,
            &[
                &g.user_id.as_str(),
                &g.amount.get(),
                &new_balance,
                &g.app_name.as_str(),
                &g.reason,
                &g.reference,
            ],
        )
        .await?;
    let Some(row) = claimed else {
        // The reference was used before: undo this attempt and answer from the first.
        tx.rollback().await?;
        return replay_grant(client, g).await;
    };
    let entry_id: i64 = row.get(0);
    let job = LedgerAuditJob {
        entry_id,
        user_id: g.user_id.to_string(),
        kind: EntryKind::Grant.as_str().into(),
        amount: g.amount.get(),
        balance_after: new_balance,
    };
    outbox::enqueue_job(&tx, g.user_id.as_str(), LEDGER_AUDIT, &job, correlation_id).await?;
    tx.commit().await?;
    metrics::counter!("penora_credits_moved_total", "kind" => "granted", "app" => g.app_name.to_string())
        .increment(g.amount.get().unsigned_abs());
    Ok(Outcome::fresh(GrantReceipt {
        user_id: g.user_id.to_string(),
        credits_added: g.amount.get(),
        new_balance,
        reference: g.reference.clone(),
        entry_id,
        timestamp: row.get(1),
    }))
}

async fn replay_grant(client: &Client, g: &Grant) -> Result<Outcome<GrantReceipt>, LedgerError> {
    let row = client
        .query_opt(
            "SELECT user_id, amount, balance_after, id, created_at FROM ledger_entries \
             WHERE kind = 'grant' AND reference = $1",
            &[&g.reference],
        )
        .await?
        .ok_or_else(|| {
            DbError::Other(format!(
                "grant reference {:?} claimed but not found",
                g.reference
            ))
        })?;
    let (user_id, amount): (String, i64) = (row.get(0), row.get(1));
    if user_id != g.user_id.as_str() || amount != g.amount.get() {
        return Err(LedgerError::IdempotencyConflict(format!(
            "reference {:?} was already used for a grant of {amount} credits to another request (user or amount differ)",
            g.reference
        )));
    }
    Ok(Outcome::replay(GrantReceipt {
        user_id,
        credits_added: amount,
        new_balance: row.get(2),
        reference: g.reference.clone(),
        entry_id: row.get(3),
        timestamp: row.get(4),
    }))
}

// ---------------------------------------------------------------- deduct

/// A deduction (`deduct-credits`): reserve and take credits at once.
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
    #[serde(serialize_with = "crate::timefmt::serde_millis::serialize")]
    pub refundable_until: OffsetDateTime,
    /// When the deduction was made.
    #[serde(serialize_with = "crate::timefmt::serde_millis::serialize")]
    pub timestamp: OffsetDateTime,
}

/// Reserves and deducts credits, once per `(app_name, project_code)`.
pub async fn deduct(
    client: &mut Client,
    d: &Deduct,
    correlation_id: Option<&str>,
) -> Result<Outcome<DeductReceipt>, LedgerError> {
    let user = d.user_id.as_str();
    let amount = d.amount.get();
    let window_secs = d.refund_window.as_secs_f64();
    let tx = client.transaction().await?;
    let debit = tx.prepare_cached(DEBIT_SQL).await?;
    let Some(row) = tx.query_opt(&debit, &[&user, &amount]).await? else {
        tx.rollback().await?;
        // Not enough credits, no account, or an earlier identical request took them.
        if let Some(first) = find_reservation(client, d).await? {
            return first;
        }
        let balance = client
            .query_opt("SELECT balance FROM accounts WHERE user_id = $1", &[&user])
            .await?;
        return Err(match balance {
            None => LedgerError::UserNotFound,
            Some(r) => LedgerError::InsufficientCredits {
                balance: r.get(0),
                requested: amount,
            },
        });
    };
    let new_balance: i64 = row.get(0);
    let claim = tx.prepare_cached(CLAIM_RESERVATION_SQL).await?;
    let claimed = tx
        .query_opt(
            &claim,
            &[
                &d.app_name.as_str(),
                &d.project_code.as_str(),
                &user,
                &amount,
                &d.description,
                &new_balance,
                &window_secs,
            ],
        )
        .await?;
    let Some(reservation) = claimed else {
        tx.rollback().await?;
        return find_reservation(client, d).await?.unwrap_or_else(|| {
            Err(DbError::Other("reservation claimed but not found".into()).into())
        });
    };
    append_entry(
        &tx,
        Entry {
            user_id: user,
            kind: EntryKind::Deduct,
            amount: -amount,
            balance_after: new_balance,
            app_name: d.app_name.as_str(),
            description: d.description.as_deref(),
            project_code: Some(d.project_code.as_str()),
            reference: None,
        },
        correlation_id,
    )
    .await?;
    tx.commit().await?;
    metrics::counter!("penora_credits_moved_total", "kind" => "reserved", "app" => d.app_name.to_string())
        .increment(amount.unsigned_abs());
    Ok(Outcome::fresh(DeductReceipt {
        user_id: user.to_owned(),
        credits_deducted: amount,
        new_balance,
        app_name: d.app_name.to_string(),
        project_code: d.project_code.to_string(),
        reservation_status: ReservationState::Reserved,
        refundable_until: reservation.get(1),
        timestamp: reservation.get(0),
    }))
}

/// The first answer for this deduction's key, or a conflict when the stored
/// reservation has another user or amount; `None` when there is none.
async fn find_reservation(
    client: &Client,
    d: &Deduct,
) -> Result<Option<Result<Outcome<DeductReceipt>, LedgerError>>, LedgerError> {
    let row = client
        .query_opt(
            "SELECT user_id, amount, balance_after_deduct, state, refundable_until, created_at \
             FROM reservations WHERE app_name = $1 AND project_code = $2",
            &[&d.app_name.as_str(), &d.project_code.as_str()],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    Ok(Some(answer_from_reservation(&row, d)))
}

/// The answer a deduction gets from its key's stored reservation (columns:
/// user_id, amount, balance_after_deduct, state, refundable_until,
/// created_at): the first result again, or a conflict when the user or
/// amount differ.
fn answer_from_reservation(
    row: &tokio_postgres::Row,
    d: &Deduct,
) -> Result<Outcome<DeductReceipt>, LedgerError> {
    let (user_id, amount): (String, i64) = (row.get(0), row.get(1));
    if user_id != d.user_id.as_str() || amount != d.amount.get() {
        let what = if user_id != d.user_id.as_str() {
            "another user".to_owned()
        } else {
            format!("an amount of {amount}")
        };
        return Err(LedgerError::IdempotencyConflict(format!(
            "project_code {:?} of app {:?} was already used with {what}; use a new project_code for a new deduction",
            d.project_code.as_str(),
            d.app_name.as_str()
        )));
    }
    Ok(Outcome::replay(DeductReceipt {
        user_id,
        credits_deducted: amount,
        new_balance: row.get(2),
        app_name: d.app_name.to_string(),
        project_code: d.project_code.to_string(),
        reservation_status: state_of(&row.get::<_, String>(3))?,
        refundable_until: row.get(4),
        timestamp: row.get(5),
    }))
}

fn state_of(raw: &str) -> Result<ReservationState, DbError> {
    ReservationState::from_db(raw)
        .ok_or_else(|| DbError::Other(format!("unknown reservation state {raw:?}")))
}

// ---------------------------------------------------------------- refund

/// A refund (`refund-credits` or a `generation.failed` event).
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
    /// Always `refunded`.
    pub reservation_status: ReservationState,
    /// Why.
    pub reason: Option<String>,
    /// When the refund was made.
    #[serde(serialize_with = "crate::timefmt::serde_millis::serialize")]
    pub timestamp: OffsetDateTime,
}

/// Returns a reservation's credits, once. Asking again answers the first
/// refund's result.
pub async fn refund(
    client: &mut Client,
    r: &Refund,
    correlation_id: Option<&str>,
) -> Result<Outcome<RefundReceipt>, LedgerError> {
    let user = r.user_id.as_str();
    let not_found = || {
        LedgerError::NotFound(format!(
            "no reservation with project_code {:?} for this user",
            r.project_code.as_str()
        ))
    };
    let tx = client.transaction().await?;
    let lock = tx
        .prepare_cached("SELECT balance FROM accounts WHERE user_id = $1 FOR UPDATE")
        .await?;
    if tx.query_opt(&lock, &[&user]).await?.is_none() {
        return Err(not_found());
    }
    let select = tx
        .prepare_cached(
            "SELECT app_name, amount, state, refundable_until < now() AS expired, refundable_until, \
                    refunded_at, refund_reason, balance_after_refund \
             FROM reservations \
             WHERE user_id = $1 AND project_code = $2 AND ($3::text IS NULL OR app_name = $3) \
             FOR UPDATE",
        )
        .await?;
    let app_filter = r.app_name.as_ref().map(AppName::as_str);
    let rows = tx
        .query(&select, &[&user, &r.project_code.as_str(), &app_filter])
        .await?;
    let row = match rows.as_slice() {
        [] => return Err(not_found()),
        [row] => row,
        _ => {
            return Err(LedgerError::Invalid {
                field: "app_name",
                reason: format!(
                    "project_code {:?} names reservations of several apps; say which with app_name",
                    r.project_code.as_str()
                ),
            });
        }
    };
    let app_name: String = row.get(0);
    let amount: i64 = row.get(1);
    match state_of(&row.get::<_, String>(2))? {
        ReservationState::Refunded => {
            tx.rollback().await?;
            return Ok(Outcome::replay(RefundReceipt {
                user_id: user.to_owned(),
                credits_refunded: amount,
                new_balance: row.get(7),
                app_name,
                project_code: r.project_code.to_string(),
                reservation_status: ReservationState::Refunded,
                reason: row.get(6),
                timestamp: row.get(5),
            }));
        }
        ReservationState::Settled => {
            return Err(LedgerError::NotRefundable(format!(
                "reservation {:?} is already settled; its credits are spent",
                r.project_code.as_str()
            )));
        }
        ReservationState::Reserved => {}
    }
    if row.get::<_, bool>(3) {
        let until: OffsetDateTime = row.get(4);
        return Err(LedgerError::NotRefundable(format!(
            "the refund window of reservation {:?} closed at {}",
            r.project_code.as_str(),
            crate::timefmt::rfc3339_millis(until)
        )));
    }
    let credit = tx
        .prepare_cached(
            "UPDATE accounts SET balance = balance + $2, updated_at = now() WHERE user_id = $1 RETURNING balance",
        )
        .await?;
    let new_balance: i64 = tx.query_one(&credit, &[&user, &amount]).await?.get(0);
    let (_, at) = append_entry(
        &tx,
        Entry {
            user_id: user,
            kind: EntryKind::Refund,
            amount,
            balance_after: new_balance,
            app_name: &app_name,
            description: r.reason.as_deref(),
            project_code: Some(r.project_code.as_str()),
            reference: None,
        },
        correlation_id,
    )
    .await?;
    let mark = tx
        .prepare_cached(
            "UPDATE reservations SET state = 'refunded', refunded_at = $3, refund_reason = $4, balance_after_refund = $5 \
             WHERE app_name = $1 AND project_code = $2",
        )
        .await?;
    tx.execute(
        &mark,
        &[
            &app_name,
            &r.project_code.as_str(),
            &at,
            &r.reason,
            &new_balance,
        ],
    )
    .await?;
    tx.commit().await?;
    metrics::counter!("penora_credits_moved_total", "kind" => "refunded", "app" => app_name.clone())
        .increment(amount.unsigned_abs());
    Ok(Outcome::fresh(RefundReceipt {
        user_id: user.to_owned(),
        credits_refunded: amount,
        new_balance,
        app_name,
        project_code: r.project_code.to_string(),
        reservation_status: ReservationState::Refunded,
        reason: r.reason.clone(),
        timestamp: at,
    }))
}

// ---------------------------------------------------------------- settle

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

/// Makes a reservation final (its credits are spent). Idempotent.
pub async fn settle(
    client: &mut Client,
    user_id: &UserId,
    app_name: &AppName,
    project_code: &ProjectCode,
    reason: &str,
    correlation_id: Option<&str>,
) -> Result<SettleResult, LedgerError> {
    let user = user_id.as_str();
    let tx = client.transaction().await?;
    let lock = tx
        .prepare_cached("SELECT balance FROM accounts WHERE user_id = $1 FOR UPDATE")
        .await?;
    let Some(account) = tx.query_opt(&lock, &[&user]).await? else {
        return Err(LedgerError::NotFound(format!(
            "no account for user {user:?}"
        )));
    };
    let balance: i64 = account.get(0);
    let select = tx
        .prepare_cached(
            "SELECT state, amount FROM reservations WHERE app_name = $1 AND project_code = $2 AND user_id = $3 FOR UPDATE",
        )
        .await?;
    let Some(row) = tx
        .query_opt(
            &select,
            &[&app_name.as_str(), &project_code.as_str(), &user],
        )
        .await?
    else {
        return Err(LedgerError::NotFound(format!(
            "no reservation with project_code {:?} of app {:?} for this user",
            project_code.as_str(),
            app_name.as_str()
        )));
    };
    match state_of(&row.get::<_, String>(0))? {
        ReservationState::Settled => return Ok(SettleResult::AlreadySettled),
        ReservationState::Refunded => return Ok(SettleResult::AlreadyRefunded),
        ReservationState::Reserved => {}
    }
    let (_, at) = append_entry(
        &tx,
        Entry {
            user_id: user,
            kind: EntryKind::Settle,
            amount: 0,
            balance_after: balance,
            app_name: app_name.as_str(),
            description: Some(reason),
            project_code: Some(project_code.as_str()),
            reference: None,
        },
        correlation_id,
    )
    .await?;
    tx.execute(
        "UPDATE reservations SET state = 'settled', settled_at = $3, settle_reason = $4 \
         WHERE app_name = $1 AND project_code = $2",
        &[&app_name.as_str(), &project_code.as_str(), &at, &reason],
    )
    .await?;
    tx.commit().await?;
    let amount: i64 = row.get(1);
    metrics::counter!("penora_credits_moved_total", "kind" => "settled", "app" => app_name.to_string())
        .increment(amount.unsigned_abs());
    Ok(SettleResult::Settled)
}

// ---------------------------------------------------------------- reads

/// One ledger row as `GET /transactions` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LedgerRow {
    /// The entry's id (also the paging cursor).
    pub id: i64,
    /// grant, deduct, refund or settle.
    pub kind: String,
    /// Signed amount.
    pub amount: i64,
    /// Balance right after.
    pub balance_after: i64,
    /// The app.
    pub app_name: String,
    /// What for.
    pub description: Option<String>,
    /// The reservation's key, for deduct, refund and settle.
    pub project_code: Option<String>,
    /// When.
    #[serde(serialize_with = "crate::timefmt::serde_millis::serialize")]
    pub created_at: OffsetDateTime,
}

/// The user's ledger, newest first, `limit` rows before entry `before`.
pub async fn transactions(
    client: &impl GenericClient,
    user_id: &UserId,
    limit: i64,
    before: Option<i64>,
) -> Result<Vec<LedgerRow>, DbError> {
    let stmt = client
        .prepare_cached(
            "SELECT id, kind, amount, balance_after, app_name, description, project_code, created_at \
             FROM ledger_entries WHERE user_id = $1 AND ($2::bigint IS NULL OR id < $2) \
             ORDER BY id DESC LIMIT $3",
        )
        .await?;
    let rows = client
        .query(&stmt, &[&user_id.as_str(), &before, &limit])
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| LedgerRow {
            id: r.get(0),
            kind: r.get(1),
            amount: r.get(2),
            balance_after: r.get(3),
            app_name: r.get(4),
            description: r.get(5),
            project_code: r.get(6),
            created_at: r.get(7),
        })
        .collect())
}

/// A user's balance and storage, as `user-info` shows them.
#[derive(Debug, Clone)]
pub struct AccountSummary {
    /// Spendable credits.
    pub balance: i64,
    /// Credits held by reservations that are not final yet.
    pub reserved_credits: i64,
    /// Bytes held by queued and saved projects.
    pub storage_used_bytes: i64,
    /// Projects, any status.
    pub total_projects: i64,
}

/// SQL of many users' summaries at once (the API's batched `user-info`).
pub const ACCOUNT_SUMMARIES_SQL: &str = "SELECT a.user_id, a.balance, a.storage_used_bytes, \
       (SELECT count(*) FROM projects p WHERE p.user_id = a.user_id AND p.status <> 'deleted'), \
       (SELECT coalesce(sum(r.amount), 0)::bigint FROM reservations r \
          WHERE r.user_id = a.user_id AND r.state = 'reserved') \
     FROM accounts a WHERE a.user_id = ANY($1::text[])";

/// The summaries of `users` who have an account, by user id.
pub async fn account_summaries(
    client: &impl GenericClient,
    users: &[&str],
) -> Result<std::collections::HashMap<String, AccountSummary>, DbError> {
    let stmt = client.prepare_cached(ACCOUNT_SUMMARIES_SQL).await?;
    Ok(client
        .query(&stmt, &[&users])
        .await?
        .into_iter()
        .map(|r| {
            (
                r.get(0),
                AccountSummary {
                    balance: r.get(1),
                    storage_used_bytes: r.get(2),
                    total_projects: r.get(3),
                    reserved_credits: r.get(4),
                },
            )
        })
        .collect())
}

/// The user's summary; `None` when the user has no account.
pub async fn account_summary(
    client: &impl GenericClient,
    user_id: &UserId,
) -> Result<Option<AccountSummary>, DbError> {
    let stmt = client.prepare_cached(ACCOUNT_SUMMARY_SQL).await?;
    Ok(client
        .query_opt(&stmt, &[&user_id.as_str()])
        .await?
        .map(|r| AccountSummary {
            balance: r.get(0),
            storage_used_bytes: r.get(1),
            total_projects: r.get(2),
            reserved_credits: r.get(3),
        }))
}
