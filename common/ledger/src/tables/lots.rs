//! `credit_lots` (and the `lot_movements` a reservation made): the lots a
//! movement reads, typed.
//!
//! "Spendable now" and the burn-down order are decided in Rust
//! ([`crate::snapshot::Lot`]); what SQL must still say of a lot (a listing,
//! a guard) is spelled once here: [`NOT_DUE_L`], [`SPENDABLE_L`], [`DUE`].

use std::collections::HashMap;

use deadpool_postgres::{GenericClient, Transaction};
use penora_domain::{AppName, LotStatus, ProjectCode, UserId};
use penora_store::DbError;
use time::OffsetDateTime;

use super::column;
use crate::snapshot::{Drawn, Lot, LotFate, LotRecord, ResKey, burn_order};

/// Over `credit_lots l`: not past its expiry now.
pub const NOT_DUE_L: &str = "(l.expires_at IS NULL OR l.expires_at > now())";
/// Over `credit_lots l`: spendable now (active, credits left, not past its
/// expiry).
pub const SPENDABLE_L: &str =
    "l.status = 'active' AND l.remaining > 0 AND (l.expires_at IS NULL OR l.expires_at > now())";
/// Over `credit_lots`: past its expiry, its `expire` entry not written.
pub const DUE: &str = "status = 'active' AND remaining > 0 AND expires_at <= now()";

impl TryFrom<&tokio_postgres::Row> for Lot {
    type Error = DbError;

    fn try_from(r: &tokio_postgres::Row) -> Result<Self, DbError> {
        Ok(Self {
            lot_id: column(r, "lot_id")?,
            remaining: column(r, "remaining")?,
            app_name: column(r, "app_name")?,
            category: column(r, "category")?,
            priority: column(r, "priority")?,
            expires_at: column(r, "expires_at")?,
            created_at: column(r, "created_at")?,
        })
    }
}

/// The active lots with credits left of `users`, each user's in burn-down
/// order, due ones included.
pub async fn active(
    tx: &Transaction<'_>,
    users: &[&str],
) -> Result<HashMap<UserId, Vec<Lot>>, DbError> {
    let mut out: HashMap<UserId, Vec<Lot>> = HashMap::new();
    if users.is_empty() {
        return Ok(out);
    }
    let stmt = tx
        .prepare_cached(
            "SELECT user_id, lot_id, remaining, app_name, category, priority, expires_at, created_at \
             FROM credit_lots WHERE user_id = ANY($1::text[]) AND status = 'active' AND remaining > 0",
        )
        .await?;
    for r in tx.query(&stmt, &[&users]).await? {
        out.entry(column(&r, "user_id")?)
            .or_default()
            .push(Lot::try_from(&r)?);
    }
    for lots in out.values_mut() {
        burn_order(lots);
    }
    Ok(out)
}

/// The lots each reservation of `keys` drew from, with what was given back
/// to each, in burn-down order, and what became of each lot at `now`.
pub async fn drawn_from(
    tx: &Transaction<'_>,
    keys: &[ResKey],
    now: OffsetDateTime,
) -> Result<HashMap<ResKey, Vec<Drawn>>, DbError> {
    let mut out: HashMap<ResKey, Vec<(Lot, Drawn)>> = HashMap::new();
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let users: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
    let apps: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
    let codes: Vec<&str> = keys.iter().map(|k| k.2.as_str()).collect();
    let stmt = tx
        .prepare_cached(
            "SELECT m.user_id, m.app_name AS res_app, m.project_code, m.lot_id, \
                    coalesce(sum(-m.amount) FILTER (WHERE m.kind = 'deduct'), 0)::bigint AS drawn, \
                    coalesce(sum(m.amount) FILTER (WHERE m.kind = 'refund'), 0)::bigint AS returned, \
                    l.status, l.remaining, l.app_name, l.category, l.priority, l.expires_at, l.created_at \
             FROM lot_movements m \
             JOIN credit_lots l ON l.user_id = m.user_id AND l.lot_id = m.lot_id \
             JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(user_id, app_name, project_code) \
               ON m.user_id = k.user_id AND m.app_name = k.app_name AND m.project_code = k.project_code \
             WHERE m.user_id = ANY($1) AND l.user_id = ANY($1) \
             GROUP BY m.user_id, m.app_name, m.project_code, m.lot_id, l.lot_id, l.status, l.remaining, \
                      l.app_name, l.category, l.priority, l.expires_at, l.created_at",
        )
        .await?;
    for r in tx.query(&stmt, &[&users, &apps, &codes]).await? {
        let lot = Lot::try_from(&r)?;
        let status: LotStatus = column(&r, "status")?;
        let fate = match status {
            LotStatus::Voided => LotFate::Voided,
            LotStatus::Expired => LotFate::Expired,
            LotStatus::Active if lot.due_at(now) => LotFate::Expired,
            LotStatus::Active => LotFate::Open,
        };
        let key: ResKey = (
            column::<UserId>(&r, "user_id")?,
            column::<AppName>(&r, "res_app")?,
            column::<ProjectCode>(&r, "project_code")?,
        );
        let drawn = Drawn {
            lot_id: lot.lot_id,
            drawn: column(&r, "drawn")?,
            returned: column(&r, "returned")?,
            fate,
        };
        out.entry(key).or_default().push((lot, drawn));
    }
    Ok(out
        .into_iter()
        .map(|(key, mut lots)| {
            lots.sort_by_key(|(lot, _)| lot.burn_key());
            (key, lots.into_iter().map(|(_, d)| d).collect())
        })
        .collect())
}

/// Lot `lot_id` of `user`, any status, locked for its change (the caller
/// holds the account's lock), with what an earlier void of it took.
pub async fn one_for_change(
    tx: &Transaction<'_>,
    user: &UserId,
    lot_id: i64,
) -> Result<Option<LotRecord>, DbError> {
    let row = tx
        .query_opt(
            "SELECT l.lot_id, l.remaining, l.app_name, l.category, l.priority, l.expires_at, \
                    l.created_at, l.status, \
                    (SELECT coalesce(sum(-m.amount), 0) FROM lot_movements m \
                      WHERE m.user_id = l.user_id AND m.lot_id = l.lot_id AND m.kind = 'void' \
                        AND m.project_code IS NULL)::bigint AS voided \
             FROM credit_lots l WHERE l.user_id = $1 AND l.lot_id = $2 FOR UPDATE",
            &[user, &lot_id],
        )
        .await?;
    row.map(|r| {
        Ok(LotRecord {
            lot: Lot::try_from(&r)?,
            status: column(&r, "status")?,
            voided: column(&r, "voided")?,
        })
    })
    .transpose()
}

/// Users with lots past their expiry whose `expire` entry is not written,
/// soonest first, at most `limit`.
pub async fn users_with_due(
    client: &impl GenericClient,
    limit: i64,
) -> Result<Vec<String>, DbError> {
    let stmt = client
        .prepare_cached(&format!(
            "SELECT user_id FROM credit_lots WHERE {DUE} \
             GROUP BY user_id ORDER BY min(expires_at) LIMIT $1"
        ))
        .await?;
    client
        .query(&stmt, &[&limit])
        .await?
        .iter()
        .map(|r| column(r, "user_id"))
        .collect()
}

/// Over `credit_lots`: active with credits left, expiring after now but
/// within `$1` seconds, its `credits.expiring` not yet written.
const TO_NOTICE: &str = "status = 'active' AND remaining > 0 AND expiry_noticed_at IS NULL \
     AND expires_at > now() AND expires_at <= now() + make_interval(secs => $1)";

/// Users with lots to notice (see [`TO_NOTICE`]) within `notice_secs`,
/// soonest expiry first, at most `limit`.
pub async fn users_to_notice(
    client: &impl GenericClient,
    notice_secs: f64,
    limit: i64,
) -> Result<Vec<String>, DbError> {
    let stmt = client
        .prepare_cached(&format!(
            "SELECT user_id FROM credit_lots WHERE {TO_NOTICE} \
             GROUP BY user_id ORDER BY min(expires_at) LIMIT $2"
        ))
        .await?;
    client
        .query(&stmt, &[&notice_secs, &limit])
        .await?
        .iter()
        .map(|r| column(r, "user_id"))
        .collect()
}

/// A lot whose coming expiry was just noticed.
#[derive(Debug, Clone)]
pub struct Noticed {
    /// The lot.
    pub lot: Lot,
    /// The transaction's `now()`.
    pub now: OffsetDateTime,
}

/// Marks `user`'s lots to notice within `notice_secs` as noticed (the
/// caller holds the account's lock) and returns them.
pub async fn mark_noticed(
    tx: &Transaction<'_>,
    user: &str,
    notice_secs: f64,
) -> Result<Vec<Noticed>, DbError> {
    let stmt = tx
        .prepare_cached(&format!(
            "UPDATE credit_lots SET expiry_noticed_at = now() \
             WHERE user_id = $2 AND {TO_NOTICE} \
             RETURNING lot_id, remaining, app_name, category, priority, expires_at, created_at, now() AS now"
        ))
        .await?;
    tx.query(&stmt, &[&notice_secs, &user])
        .await?
        .iter()
        .map(|r| {
            Ok(Noticed {
                lot: Lot::try_from(r)?,
                now: column(r, "now")?,
            })
        })
        .collect()
}
