//! Grants (`add-credits`, `penora-ops credits grant`): credits in, once per
//! `(user_id, reference)` (contract §15: another user's grant with the same
//! reference is a grant of its own).
//!
//! Rules: the account is created on a user's first grant; the balance never
//! passes `i64::MAX` (the upsert refuses instead); the reference is claimed
//! by the ledger row itself (a unique index on grant references), so a repeat
//! rolls back and answers from the first grant, or with a conflict when its
//! amount differs.

use deadpool_postgres::{Client, GenericClient};
use penora_domain::LotCategory;
use serde::Serialize;
use time::OffsetDateTime;

use super::{
    Answer, LedgerError, Outcome, count_moved, insert_audit_jobs, lock_account,
    lots::{Plan, due_lots},
};
use penora_domain::messages::LedgerAuditJob;
use penora_domain::{AppName, Credits, EntryKind, UserId};
use penora_store::DbError;

/// A grant.
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
    /// The lot's category.
    pub category: LotCategory,
    /// The lot's priority (0–100, lower spent first).
    pub priority: i32,
    /// When the lot's credits expire (`None`: never).
    pub expires_at: Option<OffsetDateTime>,
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
    #[serde(serialize_with = "penora_domain::timefmt::serde_millis::serialize")]
    pub timestamp: OffsetDateTime,
    /// The lot the grant made.
    pub lot_id: i64,
    /// The lot's category.
    pub category: LotCategory,
    /// The lot's priority.
    pub priority: i32,
    /// When the lot expires (`null`: never).
    #[serde(serialize_with = "penora_domain::timefmt::serde_millis::option::serialize")]
    pub expires_at: Option<OffsetDateTime>,
}

/// Grants credits, once per user and `reference`.
pub async fn grant(
    client: &mut Client,
    g: &Grant,
    correlation_id: Option<&str>,
) -> Answer<GrantReceipt> {
    let tx = client.transaction().await?;
    // Lots past their expiry first (an existing account, locked as every
    // movement does), so that the grant's balance is what the user can spend.
    let user = g.user_id.as_str();
    if let Some(mut balance) = lock_account(&tx, user).await?
        && let Some(due) = due_lots(&tx, &[user]).await?.get(user)
    {
        let mut plan = Plan::default();
        plan.expire_due(user, due, &mut balance, correlation_id)?;
        plan.apply(&tx).await?;
    }
    let upsert = tx
        .prepare_cached(
            "INSERT INTO accounts (user_id, balance) VALUES ($1, $2) \
             ON CONFLICT (user_id) DO UPDATE \
               SET balance = accounts.balance + EXCLUDED.balance, updated_at = EXCLUDED.updated_at \
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
    let new_balance: i64 = row.get("balance");
    let claim = tx
        .prepare_cached(
            "INSERT INTO ledger_entries (user_id, kind, amount, balance_after, app_name, description, reference) \
             VALUES ($1, 'grant', $2, $3, $4, $5, $6) \
             ON CONFLICT (user_id, reference) WHERE kind = 'grant' DO NOTHING \
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
    let entry_id: i64 = row.get("id");
    let lot = tx
        .prepare_cached(
            "WITH lot AS ( \
               INSERT INTO credit_lots \
                 (user_id, category, priority, granted, remaining, expires_at, app_name, reference) \
               VALUES ($1, $2, $3, $4, $4, $5, $6, $7) RETURNING user_id, lot_id) \
             INSERT INTO lot_movements (user_id, lot_id, entry_id, kind, amount) \
             SELECT user_id, lot_id, $8, 'grant', $4 FROM lot RETURNING lot_id",
        )
        .await?;
    let lot_id: i64 = tx
        .query_one(
            &lot,
            &[
                &g.user_id.as_str(),
                &g.category.as_str(),
                &g.priority,
                &g.amount.get(),
                &g.expires_at,
                &g.app_name.as_str(),
                &g.reference,
                &entry_id,
            ],
        )
        .await?
        .get("lot_id");
    let job = LedgerAuditJob {
        entry_id,
        user_id: g.user_id.to_string(),
        kind: EntryKind::Grant.as_str().into(),
        amount: g.amount.get(),
        balance_after: new_balance,
    };
    let payload =
        serde_json::to_value(&job).map_err(|e| DbError::Other(format!("job encoding: {e}")))?;
    insert_audit_jobs(&tx, &[g.user_id.as_str()], &[correlation_id], &[payload]).await?;
    tx.commit().await?;
    count_moved("granted", g.app_name.as_str(), g.amount.get());
    Ok(Outcome::fresh(GrantReceipt {
        user_id: g.user_id.to_string(),
        credits_added: g.amount.get(),
        new_balance,
        reference: g.reference.clone(),
        entry_id,
        timestamp: row.get("created_at"),
        lot_id,
        category: g.category,
        priority: g.priority,
        expires_at: g.expires_at,
    }))
}

async fn replay_grant(client: &impl GenericClient, g: &Grant) -> Answer<GrantReceipt> {
    let row = client
        .query_opt(
            "SELECT e.user_id, e.amount, e.balance_after, e.id, e.created_at, \
                    l.lot_id, l.category, l.priority, l.expires_at \
             FROM ledger_entries e \
             JOIN credit_lots l ON l.user_id = e.user_id AND l.reference = e.reference \
             WHERE e.kind = 'grant' AND e.user_id = $1 AND e.reference = $2 AND l.user_id = $1",
            &[&g.user_id.as_str(), &g.reference],
        )
        .await?
        .ok_or_else(|| {
            DbError::Other(format!(
                "grant reference {:?} claimed but not found",
                g.reference
            ))
        })?;
    let user_id: String = row.get("user_id");
    let amount: i64 = row.get("amount");
    let category = LotCategory::from_db(row.get("category"))
        .ok_or_else(|| DbError::Other("a lot of unknown category".into()))?;
    let priority: i32 = row.get("priority");
    let expires_at: Option<OffsetDateTime> = row.get("expires_at");
    if amount != g.amount.get()
        || category != g.category
        || priority != g.priority
        || expires_at != g.expires_at
    {
        return Err(LedgerError::IdempotencyConflict(format!(
            "reference {:?} was already used for a grant of {amount} {} credits to this user; use a new reference for a new grant",
            g.reference,
            category.as_str()
        )));
    }
    Ok(Outcome::replay(GrantReceipt {
        user_id,
        credits_added: amount,
        new_balance: row.get("balance_after"),
        reference: g.reference.clone(),
        entry_id: row.get("id"),
        timestamp: row.get("created_at"),
        lot_id: row.get("lot_id"),
        category,
        priority,
        expires_at,
    }))
}
