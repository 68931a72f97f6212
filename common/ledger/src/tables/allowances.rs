//! `allowances` (migration V17): a user's recurring allowances, with the
//! period last granted and when the next one starts.

use deadpool_postgres::{GenericClient, Transaction};
use penora_domain::{AppName, LotCategory, LotStatus, UserId, period::Period};
use penora_store::DbError;
use time::OffsetDateTime;

use super::column;

/// An allowance as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowanceRow {
    /// Whose.
    pub user_id: UserId,
    /// Its name, unique per user.
    pub allowance_id: String,
    /// Credits granted each period (before any rollover).
    pub amount: i64,
    /// Day, week or month (UTC calendar).
    pub period: Period,
    /// The category of the lots it grants.
    pub category: LotCategory,
    /// At most this many unspent credits of a period's lot carry into the next.
    pub max_rollover: i64,
    /// The app its grants are written for.
    pub app_name: AppName,
    /// When its first period starts.
    pub starts_at: OffsetDateTime,
    /// The start of the period last granted (`None`: none yet).
    pub period_start: Option<OffsetDateTime>,
    /// When the next period starts (the end of the one last granted).
    pub next_grant_at: OffsetDateTime,
    /// When it was made.
    pub created_at: OffsetDateTime,
    /// When its terms last changed.
    pub updated_at: OffsetDateTime,
}

const COLUMNS: &str = "user_id, allowance_id, amount, period, category, max_rollover, app_name, \
     starts_at, period_start, next_grant_at, created_at, updated_at";

impl TryFrom<&tokio_postgres::Row> for AllowanceRow {
    type Error = DbError;

    fn try_from(r: &tokio_postgres::Row) -> Result<Self, DbError> {
        Ok(Self {
            user_id: column(r, "user_id")?,
            allowance_id: column(r, "allowance_id")?,
            amount: column(r, "amount")?,
            period: column(r, "period")?,
            category: column(r, "category")?,
            max_rollover: column(r, "max_rollover")?,
            app_name: column(r, "app_name")?,
            starts_at: column(r, "starts_at")?,
            period_start: column(r, "period_start")?,
            next_grant_at: column(r, "next_grant_at")?,
            created_at: column(r, "created_at")?,
            updated_at: column(r, "updated_at")?,
        })
    }
}

/// `user`'s allowance `id`, locked for the transaction (the account is
/// locked first, as every movement does).
pub async fn one_for_update(
    tx: &Transaction<'_>,
    user: &UserId,
    id: &str,
) -> Result<Option<AllowanceRow>, DbError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM allowances WHERE user_id = $1 AND allowance_id = $2 FOR UPDATE"
    );
    let row = tx.query_opt(&sql, &[user, &id]).await?;
    row.as_ref().map(AllowanceRow::try_from).transpose()
}

/// `user`'s allowances, by id.
pub async fn of_user(
    client: &impl GenericClient,
    user: &UserId,
) -> Result<Vec<AllowanceRow>, DbError> {
    let sql = format!("SELECT {COLUMNS} FROM allowances WHERE user_id = $1 ORDER BY allowance_id");
    let rows = client.query(&sql, &[user]).await?;
    rows.iter().map(AllowanceRow::try_from).collect()
}

/// Writes `row` (made or changed) as a whole; `updated_at` is the
/// transaction's time when its terms changed.
pub async fn upsert(tx: &Transaction<'_>, row: &AllowanceRow) -> Result<(), DbError> {
    tx.execute(
        "INSERT INTO allowances (user_id, allowance_id, amount, period, category, max_rollover, \
                                 app_name, starts_at, period_start, next_grant_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
         ON CONFLICT (user_id, allowance_id) DO UPDATE SET \
           amount = EXCLUDED.amount, period = EXCLUDED.period, category = EXCLUDED.category, \
           max_rollover = EXCLUDED.max_rollover, app_name = EXCLUDED.app_name, \
           starts_at = EXCLUDED.starts_at, period_start = EXCLUDED.period_start, \
           next_grant_at = EXCLUDED.next_grant_at, updated_at = now()",
        &[
            &row.user_id,
            &row.allowance_id,
            &row.amount,
            &row.period,
            &row.category,
            &row.max_rollover,
            &row.app_name,
            &row.starts_at,
            &row.period_start,
            &row.next_grant_at,
        ],
    )
    .await?;
    Ok(())
}

/// Records that the period from `start` to `end` was granted.
pub async fn advance(
    tx: &Transaction<'_>,
    user: &UserId,
    id: &str,
    start: OffsetDateTime,
    end: OffsetDateTime,
) -> Result<(), DbError> {
    let n = tx
        .execute(
            "UPDATE allowances SET period_start = $3, next_grant_at = $4 \
             WHERE user_id = $1 AND allowance_id = $2",
            &[user, &id, &start, &end],
        )
        .await?;
    if n != 1 {
        return Err(DbError::Invariant(format!(
            "{user}: allowance {id:?} vanished under its lock"
        )));
    }
    Ok(())
}

/// Deletes `user`'s allowance `id`; whether there was one.
pub async fn delete(tx: &Transaction<'_>, user: &UserId, id: &str) -> Result<bool, DbError> {
    Ok(tx
        .execute(
            "DELETE FROM allowances WHERE user_id = $1 AND allowance_id = $2",
            &[user, &id],
        )
        .await?
        == 1)
}

/// The allowances whose next period has started at `now`, soonest first,
/// at most `limit`: `(user, allowance_id)`.
pub async fn due(
    client: &impl GenericClient,
    now: OffsetDateTime,
    limit: i64,
) -> Result<Vec<(UserId, String)>, DbError> {
    let rows = client
        .query(
            "SELECT user_id, allowance_id FROM allowances WHERE next_grant_at <= $1 \
             ORDER BY next_grant_at, user_id, allowance_id LIMIT $2",
            &[&now, &limit],
        )
        .await?;
    rows.iter()
        .map(|r| Ok((column(r, "user_id")?, column(r, "allowance_id")?)))
        .collect()
}

/// How many users and allowances there are of each period and category.
pub async fn summary(
    client: &impl GenericClient,
) -> Result<Vec<(Period, LotCategory, i64, i64)>, DbError> {
    let rows = client
        .query(
            "SELECT period, category, count(DISTINCT user_id) AS users, count(*) AS allowances \
             FROM allowances GROUP BY period, category ORDER BY period, category",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok((
                column(r, "period")?,
                column(r, "category")?,
                column(r, "users")?,
                column(r, "allowances")?,
            ))
        })
        .collect()
}

/// A lot an allowance granted, as the next period's rollover sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantedLot {
    /// Its id.
    pub lot_id: i64,
    /// Credits it was granted.
    pub granted: i64,
    /// Its status.
    pub status: LotStatus,
    /// Credits left in it.
    pub remaining: i64,
    /// When it expires.
    pub expires_at: Option<OffsetDateTime>,
    /// Credits its expiry took (its `expire` movements, not counting the
    /// ones that take back at once a refund made after it expired).
    pub expired: i64,
}

/// The reference of a lot `user` was granted by an allowance named `id`
/// (one deleted since, say) that expires at `end`: that period is granted.
pub async fn granted_until(
    client: &impl GenericClient,
    user: &UserId,
    id: &str,
    end: OffsetDateTime,
) -> Result<Option<String>, DbError> {
    let prefix = format!("{}{id}:", crate::allowances::ALLOWANCE_REFERENCE_PREFIX);
    let row = client
        .query_opt(
            "SELECT reference FROM credit_lots \
             WHERE user_id = $1 AND starts_with(reference, $2) AND expires_at = $3 \
             ORDER BY lot_id DESC LIMIT 1",
            &[user, &prefix, &end],
        )
        .await?;
    row.map(|r| column(&r, "reference")).transpose()
}

/// The lot `user` was granted under `reference`, if any.
pub async fn lot_by_reference(
    client: &impl GenericClient,
    user: &UserId,
    reference: &str,
) -> Result<Option<GrantedLot>, DbError> {
    let row = client
        .query_opt(
            "SELECT l.lot_id, l.granted, l.status, l.remaining, l.expires_at, \
                    coalesce((SELECT -sum(m.amount) FROM lot_movements m \
                              WHERE m.user_id = $1 AND m.lot_id = l.lot_id \
                                AND m.kind = 'expire' AND m.project_code IS NULL), 0)::int8 AS expired \
             FROM credit_lots l WHERE l.user_id = $1 AND l.reference = $2",
            &[user, &reference],
        )
        .await?;
    row.map(|r| {
        Ok(GrantedLot {
            lot_id: column(&r, "lot_id")?,
            granted: column(&r, "granted")?,
            status: column(&r, "status")?,
            remaining: column(&r, "remaining")?,
            expires_at: column(&r, "expires_at")?,
            expired: column(&r, "expired")?,
        })
    })
    .transpose()
}
