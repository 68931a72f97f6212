//! `ledger_entries`, as movements read them: the refunds made before under
//! a reference, the refund that completed a reservation, a grant made
//! before under a reference. (Entries are written by `plan::apply`.)

use std::collections::HashMap;

use deadpool_postgres::{GenericClient, Transaction};
use penora_domain::UserId;
use penora_store::DbError;

use super::column;
use crate::snapshot::{PastGrant, PastRefund, ResKey};

/// The refunds made before under the `(reservation, reference)` pairs of
/// `wanted`.
pub async fn refunds_by_reference(
    tx: &Transaction<'_>,
    wanted: &[(&ResKey, &str)],
) -> Result<HashMap<(ResKey, String), PastRefund>, DbError> {
    let mut out = HashMap::new();
    if wanted.is_empty() {
        return Ok(out);
    }
    let users: Vec<&str> = wanted.iter().map(|(k, _)| k.0.as_str()).collect();
    let apps: Vec<&str> = wanted.iter().map(|(k, _)| k.1.as_str()).collect();
    let codes: Vec<&str> = wanted.iter().map(|(k, _)| k.2.as_str()).collect();
    let refs: Vec<&str> = wanted.iter().map(|(_, r)| *r).collect();
    let stmt = tx
        .prepare_cached(
            "SELECT e.user_id, e.app_name, e.project_code, e.reference, e.amount, e.balance_after, \
                    e.description, e.created_at \
             FROM ledger_entries e \
             JOIN unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS k(user_id, app_name, project_code, reference) \
               ON e.user_id = k.user_id AND e.app_name = k.app_name AND e.project_code = k.project_code \
                  AND e.reference = k.reference \
             WHERE e.kind = 'refund' AND e.reference IS NOT NULL AND e.user_id = ANY($1)",
        )
        .await?;
    for r in tx.query(&stmt, &[&users, &apps, &codes, &refs]).await? {
        let key: ResKey = (
            column(&r, "user_id")?,
            column(&r, "app_name")?,
            column(&r, "project_code")?,
        );
        out.insert(
            (key, column(&r, "reference")?),
            PastRefund {
                amount: column(&r, "amount")?,
                balance_after: column(&r, "balance_after")?,
                description: column(&r, "description")?,
                at: column(&r, "created_at")?,
            },
        );
    }
    Ok(out)
}

/// For each reservation of `keys`: the amount of its last refund (the one
/// that completed a fully refunded reservation).
pub async fn last_refunds(
    tx: &Transaction<'_>,
    keys: &[&ResKey],
) -> Result<HashMap<ResKey, i64>, DbError> {
    let mut out = HashMap::new();
    if keys.is_empty() {
        return Ok(out);
    }
    let users: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
    let apps: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
    let codes: Vec<&str> = keys.iter().map(|k| k.2.as_str()).collect();
    let stmt = tx
        .prepare_cached(
            "SELECT DISTINCT ON (e.user_id, e.app_name, e.project_code) \
                    e.user_id, e.app_name, e.project_code, e.amount FROM ledger_entries e \
             JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(user_id, app_name, project_code) \
               ON e.user_id = k.user_id AND e.app_name = k.app_name AND e.project_code = k.project_code \
             WHERE e.kind = 'refund' AND e.user_id = ANY($1) \
             ORDER BY e.user_id, e.app_name, e.project_code, e.id DESC",
        )
        .await?;
    for r in tx.query(&stmt, &[&users, &apps, &codes]).await? {
        out.insert(
            (
                column(&r, "user_id")?,
                column(&r, "app_name")?,
                column(&r, "project_code")?,
            ),
            column(&r, "amount")?,
        );
    }
    Ok(out)
}

/// The grant made before by `user` under `reference`, with its lot.
pub async fn grant_by_reference(
    client: &impl GenericClient,
    user: &UserId,
    reference: &str,
) -> Result<Option<PastGrant>, DbError> {
    let row = client
        .query_opt(
            "SELECT e.amount, e.balance_after, e.id, e.created_at, \
                    l.lot_id, l.category, l.priority, l.expires_at \
             FROM ledger_entries e \
             JOIN credit_lots l ON l.user_id = e.user_id AND l.reference = e.reference \
             WHERE e.kind = 'grant' AND e.user_id = $1 AND e.reference = $2 AND l.user_id = $1",
            &[user, &reference],
        )
        .await?;
    row.map(|r| {
        Ok(PastGrant {
            amount: column(&r, "amount")?,
            balance_after: column(&r, "balance_after")?,
            entry_id: column(&r, "id")?,
            at: column(&r, "created_at")?,
            lot_id: column(&r, "lot_id")?,
            category: column(&r, "category")?,
            priority: column(&r, "priority")?,
            expires_at: column(&r, "expires_at")?,
        })
    })
    .transpose()
}

/// `n` ids from the ledger's identity sequence, ascending. Taken under the
/// accounts' locks, so a user's ids grow along its chain (`crate::chain`).
/// No statement for none.
pub async fn next_ids(tx: &Transaction<'_>, n: usize) -> Result<Vec<i64>, DbError> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let stmt = tx
        .prepare_cached(
            "SELECT nextval(pg_get_serial_sequence('ledger_entries', 'id')) AS id \
             FROM generate_series(1, $1::int4)",
        )
        .await?;
    let count = i32::try_from(n)
        .map_err(|_| DbError::Invariant("too many ledger entries in one plan".into()))?;
    let mut ids = Vec::with_capacity(n);
    for r in tx.query(&stmt, &[&count]).await? {
        ids.push(column::<i64>(&r, "id")?);
    }
    if ids.len() != n {
        return Err(DbError::Invariant(
            "the ledger's sequence gave fewer ids than asked".into(),
        ));
    }
    ids.sort_unstable();
    Ok(ids)
}
