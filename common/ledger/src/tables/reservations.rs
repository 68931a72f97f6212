//! `reservations`: read by key (a deduction's replay), locked by key (a
//! refund or a settlement), typed.

use std::collections::HashMap;

use deadpool_postgres::Transaction;
use penora_domain::{AppName, ProjectCode, UserId};
use penora_store::DbError;

use super::column;
use crate::snapshot::{ResKey, Reservation};

/// The columns a [`Reservation`] is read from, over `reservations r`.
const COLUMNS: &str = "r.user_id, r.app_name, r.project_code, r.amount, r.refunded_amount, \
     r.state, r.settled_by, r.created_at, r.refundable_until, r.balance_after_deduct, \
     r.balance_after_refund, r.refunded_at, r.refund_reason, r.settled_at, r.settle_reason";

impl TryFrom<&tokio_postgres::Row> for Reservation {
    type Error = DbError;

    fn try_from(r: &tokio_postgres::Row) -> Result<Self, DbError> {
        Ok(Self {
            amount: column(r, "amount")?,
            refunded: column(r, "refunded_amount")?,
            state: column(r, "state")?,
            settled_by: column(r, "settled_by")?,
            created_at: column(r, "created_at")?,
            refundable_until: column(r, "refundable_until")?,
            balance_after_deduct: column(r, "balance_after_deduct")?,
            balance_after_refund: column(r, "balance_after_refund")?,
            refunded_at: column(r, "refunded_at")?,
            refund_reason: column(r, "refund_reason")?,
            settled_at: column(r, "settled_at")?,
            settle_reason: column(r, "settle_reason")?,
        })
    }
}

fn key_of(r: &tokio_postgres::Row) -> Result<ResKey, DbError> {
    Ok((
        column::<UserId>(r, "user_id")?,
        column::<AppName>(r, "app_name")?,
        column::<ProjectCode>(r, "project_code")?,
    ))
}

/// The reservations of `keys`; locked (`FOR UPDATE`, in key order) when
/// `lock`. One index probe per key: the `LIMIT 1` keeps the planner from
/// turning the look-up into a join that reads each user's every reservation
/// (a hot account has many thousands: 13–30 ms per batch once). On Citus,
/// the form verified there: the keys' users route the query to their shards.
pub async fn by_keys(
    tx: &Transaction<'_>,
    keys: &[ResKey],
    lock: bool,
) -> Result<HashMap<ResKey, Reservation>, DbError> {
    let mut out = HashMap::new();
    if keys.is_empty() {
        return Ok(out);
    }
    let users: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
    let apps: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
    let codes: Vec<&str> = keys.iter().map(|k| k.2.as_str()).collect();
    let sql = match (penora_store::distributed(), lock) {
        (false, false) => format!(
            "SELECT {COLUMNS} FROM unnest($1::text[], $2::text[], $3::text[]) AS k(user_id, app_name, project_code) \
             CROSS JOIN LATERAL (SELECT * FROM reservations r \
                WHERE r.user_id = k.user_id AND r.app_name = k.app_name AND r.project_code = k.project_code \
                LIMIT 1) r"
        ),
        (true, false) => format!(
            "SELECT {COLUMNS} FROM reservations r \
             JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(user_id, app_name, project_code) \
               ON r.user_id = k.user_id AND r.app_name = k.app_name AND r.project_code = k.project_code \
             WHERE r.user_id = ANY($1)"
        ),
        (_, true) => format!(
            "SELECT {COLUMNS} FROM reservations r \
             JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(user_id, app_name, project_code) \
               ON r.user_id = k.user_id AND r.app_name = k.app_name AND r.project_code = k.project_code \
             WHERE r.user_id = ANY($1) \
             ORDER BY r.user_id, r.app_name, r.project_code \
             FOR UPDATE OF r"
        ),
    };
    let stmt = tx.prepare_cached(&sql).await?;
    for r in tx.query(&stmt, &[&users, &apps, &codes]).await? {
        out.insert(key_of(&r)?, Reservation::try_from(&r)?);
    }
    Ok(out)
}

/// For each `(user, code)` of `wanted`, the apps that have a reservation of
/// that user with that code (usually one): how a request without
/// `app_name` finds its reservation (refunds and settlements alike).
pub async fn apps_of(
    tx: &Transaction<'_>,
    wanted: &[(&UserId, &ProjectCode)],
) -> Result<HashMap<(UserId, ProjectCode), Vec<AppName>>, DbError> {
    let mut out: HashMap<(UserId, ProjectCode), Vec<AppName>> = HashMap::new();
    if wanted.is_empty() {
        return Ok(out);
    }
    let users: Vec<&str> = wanted.iter().map(|w| w.0.as_str()).collect();
    let codes: Vec<&str> = wanted.iter().map(|w| w.1.as_str()).collect();
    let stmt = tx
        .prepare_cached(
            "SELECT r.user_id, r.project_code, r.app_name \
             FROM unnest($1::text[], $2::text[]) AS k(user_id, project_code) \
             JOIN reservations r ON r.user_id = k.user_id AND r.project_code = k.project_code \
             WHERE r.user_id = ANY($1) ORDER BY r.app_name",
        )
        .await?;
    for r in tx.query(&stmt, &[&users, &codes]).await? {
        out.entry((column(&r, "user_id")?, column(&r, "project_code")?))
            .or_default()
            .push(column(&r, "app_name")?);
    }
    for apps in out.values_mut() {
        apps.dedup();
    }
    Ok(out)
}
