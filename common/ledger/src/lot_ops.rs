//! What is done to lots themselves (contract §12): the timer's expiry,
//! voids, the listing and the balance at a past instant.
//!
//! Rules: like every movement, expiry and voids lock the user's account
//! first; an expiry or a void writes its ledger entry, lot movements and
//! audit job in one transaction; a void is idempotent (a voided lot answers
//! the first void again); reads never lock.

use std::borrow::Cow;

use deadpool_postgres::{Client, GenericClient};
use serde::Serialize;
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::{
    Answer, LedgerError, NewEntry, Outcome, count_moved, lock_account,
    lots::{Plan, due_lots},
};
use penora_domain::{EntryKind, UserId};
use penora_store::DbError;

/// Users with lots past their expiry whose `expire` entry is not written,
/// soonest first, at most `limit`.
pub async fn users_with_due_lots(
    client: &impl GenericClient,
    limit: i64,
) -> Result<Vec<String>, DbError> {
    let stmt = client
        .prepare_cached(
            "SELECT user_id FROM credit_lots \
             WHERE status = 'active' AND remaining > 0 AND expires_at <= now() \
             GROUP BY user_id ORDER BY min(expires_at) LIMIT $1",
        )
        .await?;
    Ok(client
        .query(&stmt, &[&limit])
        .await?
        .into_iter()
        .map(|r| r.get("user_id"))
        .collect())
}

/// Writes the `expire` entries of `user`'s lots past their expiry. Returns
/// how many credits expired (0 when another movement did it first).
pub async fn expire_lots(client: &mut Client, user: &str) -> Result<i64, LedgerError> {
    let tx = client.transaction().await?;
    let Some(mut balance) = lock_account(&tx, user).await? else {
        return Ok(0);
    };
    let due = due_lots(&tx, &[user]).await?;
    let Some(lots) = due.get(user) else {
        return Ok(0);
    };
    let mut plan = Plan::default();
    let expired = plan.expire_due(user, lots, &mut balance, None)?;
    plan.apply(&tx).await?;
    tx.commit().await?;
    count_moved("expired", "penora", expired);
    Ok(expired)
}

/// The answer to a void.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct VoidReceipt {
    /// Whose lot.
    pub user_id: String,
    /// The lot.
    pub lot_id: i64,
    /// The lot's status now: `voided`, or `expired` when it had expired
    /// before (an expired lot has nothing left to void).
    pub status: String,
    /// Credits the void took away.
    pub credits_voided: i64,
    /// What the user can spend now.
    pub new_balance: i64,
}

/// Voids lot `lot_id` of `user`: its remaining credits go, with a `void`
/// entry; credits refunded into it later are voided at once. Idempotent.
/// With `only_app` (a key bound to an app), a lot another app granted is
/// refused ([`LedgerError::AppMismatch`]) and nothing changes.
pub async fn void_lot(
    client: &mut Client,
    user: &UserId,
    lot_id: i64,
    (reason, only_app): (&str, Option<&str>),
    correlation_id: Option<&str>,
) -> Answer<VoidReceipt> {
    let user = user.as_str();
    let tx = client.transaction().await?;
    let Some(mut balance) = lock_account(&tx, user).await? else {
        return Err(LedgerError::UserNotFound);
    };
    let lot = tx
        .query_opt(
            "SELECT status, remaining, app_name, coalesce(expires_at <= now(), false) AS past_expiry \
             FROM credit_lots WHERE user_id = $1 AND lot_id = $2 FOR UPDATE",
            &[&user, &lot_id],
        )
        .await?
        .ok_or_else(|| LedgerError::NotFound(format!("no lot {lot_id} for this user")))?;
    // A key bound to an app voids only the lots that app granted.
    let lot_app: String = lot.try_get("app_name")?;
    if let Some(own) = only_app.filter(|own| *own != lot_app) {
        return Err(LedgerError::AppMismatch(format!(
            "This API key acts for app `{own}` only; lot {lot_id} was granted by app `{lot_app}`"
        )));
    }
    let mut plan = Plan::default();
    let due = due_lots(&tx, &[user]).await?;
    // A lot past its expiry (with credits left or not) has nothing to void.
    let expired_now: bool = lot.get("past_expiry");
    if let Some(lots) = due.get(user) {
        plan.expire_due(user, lots, &mut balance, correlation_id)?;
    }
    let status: String = lot.get("status");
    let receipt = |status: &str, credits_voided, new_balance| VoidReceipt {
        user_id: user.to_owned(),
        lot_id,
        status: status.to_owned(),
        credits_voided,
        new_balance,
    };
    let replay = match status.as_str() {
        "voided" => {
            let voided: i64 = tx
                .query_one(
                    "SELECT coalesce(sum(-amount), 0)::bigint AS voided FROM lot_movements \
                     WHERE user_id = $1 AND lot_id = $2 AND kind = 'void' AND project_code IS NULL",
                    &[&user, &lot_id],
                )
                .await?
                .get("voided");
            Some(receipt("voided", voided, balance))
        }
        "expired" => Some(receipt("expired", 0, balance)),
        _ if expired_now => Some(receipt("expired", 0, balance)),
        _ => None,
    };
    if let Some(answer) = replay {
        if !plan.entries.is_empty() {
            plan.apply(&tx).await?;
            tx.commit().await?;
        }
        return Ok(Outcome::replay(answer));
    }
    let remaining: i64 = lot.get("remaining");
    if remaining > 0 {
        balance -= remaining;
        let at = plan.entry(NewEntry {
            user_id: user,
            kind: EntryKind::Void,
            amount: -remaining,
            balance_after: balance,
            app_name: Cow::Owned(lot.get("app_name")),
            description: Some(reason),
            project_code: None,
            reference: None,
            correlation_id,
        });
        plan.moves(
            at,
            user,
            lot_id,
            EntryKind::Void,
            -remaining,
            -remaining,
            None,
        );
    }
    plan.close(user, lot_id, "voided");
    plan.apply(&tx).await?;
    tx.commit().await?;
    count_moved("voided", "penora", remaining);
    Ok(Outcome::fresh(receipt("voided", remaining, balance)))
}

/// A lot as `GET /credit-lots` shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LotView {
    /// The lot's id (also the paging cursor).
    pub lot_id: i64,
    /// `paid` or `promotional`.
    pub category: String,
    /// Lower is spent first.
    pub priority: i32,
    /// Credits the grant put in.
    pub granted: i64,
    /// Credits left to spend (0 once expired or voided).
    pub remaining: i64,
    /// When its credits expire (`null`: never).
    #[serde(serialize_with = "penora_domain::timefmt::serde_millis::option::serialize")]
    #[schema(value_type = Option<String>)]
    pub expires_at: Option<OffsetDateTime>,
    /// `active`, `depleted`, `expired` or `voided`.
    pub status: String,
    /// The grant's reference (`null` for the balance from before lots).
    pub reference: Option<String>,
    /// When it was granted.
    #[serde(serialize_with = "penora_domain::timefmt::serde_millis::serialize")]
    #[schema(value_type = String)]
    pub created_at: OffsetDateTime,
}

/// The statuses a listing may ask for.
pub const LOT_STATUSES: [&str; 4] = ["active", "depleted", "expired", "voided"];

/// `user`'s lots, newest first, `limit` of them before lot `before`, only
/// those of `status` when given.
pub async fn lots(
    client: &impl GenericClient,
    user: &UserId,
    status: Option<&str>,
    limit: i64,
    before: Option<i64>,
) -> Result<Vec<LotView>, DbError> {
    let stmt = client
        .prepare_cached(
            "SELECT * FROM ( \
               SELECT lot_id, category, priority, granted, expires_at, reference, created_at, \
                      CASE WHEN status = 'voided' THEN 'voided' \
                           WHEN status = 'expired' OR expires_at <= now() THEN 'expired' \
                           WHEN remaining = 0 THEN 'depleted' ELSE 'active' END AS shown, \
                      CASE WHEN status = 'active' AND (expires_at IS NULL OR expires_at > now()) \
                           THEN remaining ELSE 0 END AS spendable \
               FROM credit_lots WHERE user_id = $1 AND ($2::bigint IS NULL OR lot_id < $2)) l \
             WHERE $3::text IS NULL OR shown = $3 \
             ORDER BY lot_id DESC LIMIT $4",
        )
        .await?;
    Ok(client
        .query(&stmt, &[&user.as_str(), &before, &status, &limit])
        .await?
        .into_iter()
        .map(|r| LotView {
            lot_id: r.get("lot_id"),
            category: r.get("category"),
            priority: r.get("priority"),
            granted: r.get("granted"),
            remaining: r.get("spendable"),
            expires_at: r.get("expires_at"),
            status: r.get("shown"),
            reference: r.get("reference"),
            created_at: r.get("created_at"),
        })
        .collect())
}

/// What `user` could spend at `at`, from the ledger: the sum of the entries
/// made by then, less what the lots past their expiry at `at` still held
/// then (their `expire` entries may have been written later).
/// `None` when the user has no account.
pub async fn balance_at(
    client: &impl GenericClient,
    user: &UserId,
    at: OffsetDateTime,
) -> Result<Option<i64>, DbError> {
    let stmt = client
        .prepare_cached(
            "SELECT ((SELECT coalesce(sum(e.amount), 0) FROM ledger_entries e \
                      WHERE e.user_id = a.user_id AND e.created_at <= $2) \
                  - (SELECT coalesce(sum(m.amount), 0) FROM lot_movements m \
                      JOIN credit_lots l ON l.user_id = m.user_id AND l.lot_id = m.lot_id \
                      WHERE m.user_id = a.user_id AND l.user_id = a.user_id \
                        AND l.expires_at <= $2 AND m.created_at <= $2))::bigint AS credits \
             FROM accounts a WHERE a.user_id = $1",
        )
        .await?;
    Ok(client
        .query_opt(&stmt, &[&user.as_str(), &at])
        .await?
        .map(|r| r.get("credits")))
}
