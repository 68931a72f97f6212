//! What the ledger shows: a user's entries, and account summaries.
//!
//! Rules: reads never lock and never write; a summary counts the credits
//! held by reservations that are not final yet; a summary is the ledger's
//! part of `user-info` only (credits): the workspace's part (storage,
//! projects) is `penora_workspace::projects::usage`, and the API puts the two
//! together.

use deadpool_postgres::GenericClient;
use serde::Serialize;
use time::OffsetDateTime;

use penora_domain::UserId;
use penora_store::DbError;

use crate::tables::lots::SPENDABLE_L;

/// Columns of a summary, over `accounts a`: spendable credits by category
/// and the next expiry come from the lots (contract §12: a lot past its
/// `expires_at` is not spendable, even before its `expire` entry).
static SUMMARY_COLUMNS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "a.user_id, \
       coalesce(s.paid, 0)::bigint AS paid_credits, coalesce(s.promotional, 0)::bigint AS promotional_credits, \
       s.next_expiry_at, \
       (SELECT coalesce(sum(n.remaining), 0)::bigint FROM credit_lots n \
          WHERE n.user_id = a.user_id AND n.status = 'active' AND n.expires_at = s.next_expiry_at) AS next_expiry_amount, \
       (SELECT coalesce(sum(r.amount - r.refunded_amount), 0)::bigint FROM reservations r \
          WHERE r.user_id = a.user_id AND r.state IN ('reserved', 'partially_refunded')) AS reserved_credits \
     FROM accounts a \
     LEFT JOIN LATERAL ( \
       SELECT sum(l.remaining) FILTER (WHERE l.category = 'paid') AS paid, \
              sum(l.remaining) FILTER (WHERE l.category = 'promotional') AS promotional, \
              min(l.expires_at) AS next_expiry_at \
       FROM credit_lots l WHERE l.user_id = a.user_id AND {SPENDABLE_L}) s ON true"
    )
});

/// SQL of `user-info`'s credit part (one user).
pub static ACCOUNT_SUMMARY_SQL: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("SELECT {} WHERE a.user_id = $1", *SUMMARY_COLUMNS));

/// SQL of many users' credit parts at once (the API's batched `user-info`).
pub static ACCOUNT_SUMMARIES_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT {} WHERE a.user_id = ANY($1::text[])",
        *SUMMARY_COLUMNS
    )
});

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
    #[serde(serialize_with = "penora_domain::timefmt::serde_millis::serialize")]
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
            id: r.get("id"),
            kind: r.get("kind"),
            amount: r.get("amount"),
            balance_after: r.get("balance_after"),
            app_name: r.get("app_name"),
            description: r.get("description"),
            project_code: r.get("project_code"),
            created_at: r.get("created_at"),
        })
        .collect())
}

/// A user's credits, as `user-info` shows them.
#[derive(Debug, Clone)]
pub struct AccountSummary {
    /// Spendable credits (paid and promotional).
    pub balance: i64,
    /// Spendable paid credits.
    pub paid: i64,
    /// Spendable promotional credits.
    pub promotional: i64,
    /// The soonest expiry of spendable credits, and how many expire then.
    pub next_expiry: Option<(i64, OffsetDateTime)>,
    /// Credits held by reservations that are not final yet.
    pub reserved_credits: i64,
}

impl AccountSummary {
    fn from_row(r: &tokio_postgres::Row) -> Self {
        let paid: i64 = r.get("paid_credits");
        let promotional: i64 = r.get("promotional_credits");
        let next: Option<OffsetDateTime> = r.get("next_expiry_at");
        Self {
            balance: paid + promotional,
            paid,
            promotional,
            next_expiry: next.map(|at| (r.get("next_expiry_amount"), at)),
            reserved_credits: r.get("reserved_credits"),
        }
    }
}

/// The summaries of `users` who have an account, by user id.
pub async fn account_summaries(
    client: &impl GenericClient,
    users: &[&str],
) -> Result<std::collections::HashMap<String, AccountSummary>, DbError> {
    let stmt = client.prepare_cached(&ACCOUNT_SUMMARIES_SQL).await?;
    Ok(client
        .query(&stmt, &[&users])
        .await?
        .iter()
        .map(|r| (r.get("user_id"), AccountSummary::from_row(r)))
        .collect())
}

/// The user's summary; `None` when the user has no account.
pub async fn account_summary(
    client: &impl GenericClient,
    user_id: &UserId,
) -> Result<Option<AccountSummary>, DbError> {
    let stmt = client.prepare_cached(&ACCOUNT_SUMMARY_SQL).await?;
    Ok(client
        .query_opt(&stmt, &[&user_id.as_str()])
        .await?
        .as_ref()
        .map(AccountSummary::from_row))
}
