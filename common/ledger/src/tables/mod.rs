//! The ledger's tables, one module each: its queries and its typed rows
//! (read with `try_get`, never a panicking `get`). The account lock is the
//! store's (`penora_store::accounts`), shared with the workspace.

pub mod allowances;
pub mod entries;
pub mod events;
pub mod limits;
pub mod lots;
pub mod reservations;

use penora_store::DbError;

/// A column of `row`, or an invariant breach naming it.
pub(crate) fn column<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a tokio_postgres::Row,
    name: &str,
) -> Result<T, DbError> {
    row.try_get(name)
        .map_err(|e| DbError::Invariant(format!("column {name}: {e}")))
}

/// Locks the accounts of `users` (`penora_store::accounts::lock`) and reads
/// their lots: a snapshot at the transaction's `now()` holding the locked
/// accounts and the busy ones, for a movement's `load` to fill in.
pub async fn locked_accounts(
    tx: &deadpool_postgres::Transaction<'_>,
    users: &[&str],
    on_busy: penora_store::accounts::OnBusy,
) -> Result<crate::snapshot::Snapshot, DbError> {
    locked_accounts_reading(tx, users, on_busy, &[], 0).await
}

/// [`locked_accounts`], with the stored reservations of `keys` (none: no
/// statement) and `ids` ledger ids for the plan (`Snapshot::ids`). The
/// statements after the lock (lots, spending, reservations, ids) go to the
/// server together, one round trip.
pub async fn locked_accounts_reading(
    tx: &deadpool_postgres::Transaction<'_>,
    users: &[&str],
    on_busy: penora_store::accounts::OnBusy,
    keys: &[crate::snapshot::ResKey],
    ids: usize,
) -> Result<crate::snapshot::Snapshot, DbError> {
    let locked = penora_store::accounts::lock(tx, users, on_busy).await?;
    let mut snap = crate::snapshot::Snapshot::at(locked.now);
    let mut locked_heads = locked.heads;
    let names: Vec<&str> = locked.balances.keys().map(|u| u.as_str()).collect();
    let ids = if names.is_empty() { 0 } else { ids };
    let (mut lots, mut spending, reservations, ids) = tokio::try_join!(
        lots::active(tx, &names),
        limits::spending(tx, &names, locked.now),
        async {
            if keys.is_empty() {
                Ok(std::collections::HashMap::new())
            } else {
                reservations::by_keys(tx, keys, false).await
            }
        },
        entries::next_ids(tx, ids),
    )?;
    snap.reservations = reservations;
    snap.ids = ids;
    for (user, balance) in locked.balances {
        let lots = lots.remove(&user).unwrap_or_default();
        let threshold = locked.thresholds.get(&user).copied().flatten();
        let spending = spending.remove(&user);
        let chain = head_of(&mut locked_heads, &user);
        snap.accounts.insert(
            user,
            crate::snapshot::Account {
                balance,
                lots,
                threshold,
                spending,
                chain,
            },
        );
    }
    snap.busy = locked.busy;
    Ok(snap)
}

/// The chain head `lock` read for `user` (none: a chain not begun).
pub(crate) fn head_of(
    heads: &mut std::collections::BTreeMap<penora_domain::UserId, (i64, Option<Vec<u8>>)>,
    user: &penora_domain::UserId,
) -> crate::chain::Head {
    heads
        .remove(user)
        .map(|(seq, hash)| crate::chain::Head { seq, hash })
        .unwrap_or_default()
}
