//! The `accounts` table: the lock every writer of a user's rows takes first,
//! and the guarded balance change.
//!
//! Rules:
//! * one lock, spelled once: `FOR NO KEY UPDATE` on the account row, taken
//!   by every movement of credits and every change to the workspace, in
//!   `user_id` order when a transaction takes several (so two transactions
//!   queue instead of deadlocking). It is the lock an `UPDATE` of the
//!   balance takes anyway; it still lets the foreign-key checks of rows
//!   inserted for the account elsewhere (the worker's audit records) through;
//!   the statements that take it are this module's ([`lock`], [`lock_one`],
//!   [`create_and_lock`], [`lock_storage`]): no other module spells a lock
//!   on `accounts` (an `UPDATE` of the row, such as the workspace's quota
//!   reservation, takes this same lock by itself);
//! * the balance changes only through [`move_balances`]: one guarded
//!   `UPDATE` per transaction (a debit applies only where the balance
//!   covers it), backed by the `accounts_balance_non_negative` constraint.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use deadpool_postgres::Transaction;
use penora_domain::UserId;

use crate::DbError;

/// The lock on an account row, spelled once: every statement of this module
/// that locks accounts ends with it.
macro_rules! account_lock {
    () => {
        "FOR NO KEY UPDATE"
    };
}

/// What a transaction does about an account row that another transaction
/// holds (a long operator transaction, another batch of the same user).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnBusy {
    /// Wait for the lock, at most `DB_LOCK_TIMEOUT_MS` (then
    /// [`DbError::LockTimeout`]). For a lone request, or a batch of one
    /// user's requests.
    Wait,
    /// Lock what is free (`SKIP LOCKED`) and report the held accounts, so
    /// that one held account never holds up the other users of a batch.
    Skip,
}

/// The accounts a transaction locked.
#[derive(Debug, Clone)]
pub struct Locked {
    /// Balances of the locked accounts, by user.
    pub balances: BTreeMap<UserId, i64>,
    /// Each locked account's own low-balance threshold (`None`: the
    /// service's default), read by the same statement as the balance.
    pub thresholds: BTreeMap<UserId, Option<i64>>,
    /// Each locked account's audit chain head (`chain_seq`, `chain_hash`;
    /// `None`: no link yet), read by the same statement (V18).
    pub heads: BTreeMap<UserId, (i64, Option<Vec<u8>>)>,
    /// Accounts that exist but another transaction holds ([`OnBusy::Skip`]).
    pub busy: BTreeSet<UserId>,
    /// The transaction's `now()` (read with the lock, no round trip of its
    /// own): the instant its rules are judged at and its rows are stamped.
    pub now: time::OffsetDateTime,
}

/// Locks the accounts of `users` (in `user_id` order, `FOR NO KEY UPDATE`)
/// and returns their balances. With [`OnBusy::Skip`], an account another
/// transaction holds is not waited for but returned in `busy`; a user in
/// neither has no account.
pub async fn lock(
    tx: &Transaction<'_>,
    users: &[&str],
    on_busy: OnBusy,
) -> Result<Locked, DbError> {
    let mut users: Vec<&str> = users.to_vec();
    users.sort_unstable();
    users.dedup();
    let stmt = tx
        .prepare_cached(match on_busy {
            OnBusy::Wait => concat!(
                "SELECT user_id, balance, low_balance_threshold, chain_seq, chain_hash, now() AS now FROM accounts \
                 WHERE user_id = ANY($1::text[]) ORDER BY user_id ",
                account_lock!()
            ),
            OnBusy::Skip => concat!(
                "SELECT user_id, balance, low_balance_threshold, chain_seq, chain_hash, now() AS now FROM accounts \
                 WHERE user_id = ANY($1::text[]) ORDER BY user_id ",
                account_lock!(),
                " SKIP LOCKED"
            ),
        })
        .await?;
    let mut balances = BTreeMap::new();
    let mut thresholds = BTreeMap::new();
    let mut heads = BTreeMap::new();
    let mut now = None;
    if !users.is_empty() {
        for r in tx.query(&stmt, &[&users]).await? {
            let user: UserId = r.try_get("user_id")?;
            thresholds.insert(user.clone(), r.try_get("low_balance_threshold")?);
            heads.insert(
                user.clone(),
                (r.try_get("chain_seq")?, r.try_get("chain_hash")?),
            );
            balances.insert(user, r.try_get("balance")?);
            now = Some(r.try_get("now")?);
        }
    }
    let now = match now {
        Some(now) => now,
        // No account locked: the instant still matters (a grant's new
        // account, the answers' times).
        None => tx.query_one("SELECT now()", &[]).await?.try_get(0)?,
    };
    let mut busy = BTreeSet::new();
    if on_busy == OnBusy::Skip && balances.len() < users.len() {
        // Missing: no account, or a held one. A plain read never waits.
        let missing: Vec<&str> = users
            .into_iter()
            .filter(|u| !balances.contains_key(*u))
            .collect();
        let exists = tx
            .prepare_cached("SELECT user_id FROM accounts WHERE user_id = ANY($1::text[])")
            .await?;
        for r in tx.query(&exists, &[&missing]).await? {
            busy.insert(r.try_get("user_id")?);
        }
    }
    Ok(Locked {
        balances,
        thresholds,
        heads,
        busy,
        now,
    })
}

/// Locks one user's account ([`lock`], waiting); its balance, or `None`
/// without an account.
pub async fn lock_one(tx: &Transaction<'_>, user: &str) -> Result<Option<i64>, DbError> {
    Ok(lock(tx, &[user], OnBusy::Wait).await?.balances.remove(user))
}

/// Locks one user's account (the lock of [`lock`], waiting) and returns the
/// bytes its workspace holds (`storage_used_bytes`), or `None` without an
/// account: the workspace's writers (a save that must make room, a
/// deletion) take the lock the movements of credits take, so one user's
/// saves and movements queue on one row.
pub async fn lock_storage(tx: &Transaction<'_>, user: &str) -> Result<Option<i64>, DbError> {
    let stmt = tx
        .prepare_cached(concat!(
            "SELECT storage_used_bytes FROM accounts WHERE user_id = $1 ",
            account_lock!()
        ))
        .await?;
    match tx.query_opt(&stmt, &[&user]).await? {
        Some(row) => Ok(Some(row.try_get("storage_used_bytes")?)),
        None => Ok(None),
    }
}

/// Makes `user`'s account (balance 0) when there is none, then locks it
/// ([`lock`]). Two transactions making the same new account
/// queue on its row like any other.
pub async fn create_and_lock(tx: &Transaction<'_>, user: &str) -> Result<Locked, DbError> {
    let create = tx
        .prepare_cached(
            "INSERT INTO accounts (user_id, balance) VALUES ($1, 0) ON CONFLICT (user_id) DO NOTHING",
        )
        .await?;
    tx.execute(&create, &[&user]).await?;
    let locked = lock(tx, &[user], OnBusy::Wait).await?;
    if !locked.balances.contains_key(user) {
        return Err(DbError::Invariant(format!(
            "account {user:?} made but not found"
        )));
    }
    Ok(locked)
}

/// One account's change in a movement: its balance moves by `delta`, and
/// its audit chain head moves from `from_seq` to (`seq`, `hash`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move<'a> {
    /// Whose.
    pub user_id: &'a str,
    /// The sum of the user's entries' amounts.
    pub delta: i64,
    /// The head's seq the movement read under the lock.
    pub from_seq: i64,
    /// The new head's seq.
    pub seq: i64,
    /// The new head's hash.
    pub hash: &'a [u8],
}

/// Moves each user's balance and audit chain head ([`Move`], one per user),
/// with one guarded `UPDATE` (a debit applies only where the balance covers
/// it; the head moves only from the seq the movement read). Every account
/// must exist and be locked by the caller; anything else is an invariant
/// breach, and the caller's transaction must not commit.
pub async fn move_balances(tx: &Transaction<'_>, moves: &[Move<'_>]) -> Result<(), DbError> {
    if moves.is_empty() {
        return Ok(());
    }
    let mut users = Vec::with_capacity(moves.len());
    let mut seen: HashSet<&str> = HashSet::with_capacity(moves.len());
    for m in moves {
        if !seen.insert(m.user_id) {
            return Err(DbError::Invariant(format!(
                "{}: two balance moves in one statement",
                m.user_id
            )));
        }
        users.push(m.user_id);
    }
    let deltas: Vec<i64> = moves.iter().map(|m| m.delta).collect();
    let from: Vec<i64> = moves.iter().map(|m| m.from_seq).collect();
    let seqs: Vec<i64> = moves.iter().map(|m| m.seq).collect();
    let hashes: Vec<&[u8]> = moves.iter().map(|m| m.hash).collect();
    let update = tx
        .prepare_cached(
            "UPDATE accounts a SET balance = a.balance + v.delta, updated_at = now(), \
                    chain_seq = v.seq, chain_hash = v.hash \
             FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::bytea[]) \
               AS v(user_id, delta, from_seq, seq, hash) \
             WHERE a.user_id = v.user_id AND a.user_id = ANY($1) AND a.balance + v.delta >= 0 \
               AND a.balance <= 9223372036854775807 - greatest(v.delta, 0) \
               AND a.chain_seq = v.from_seq",
        )
        .await?;
    if tx
        .execute(&update, &[&users, &deltas, &from, &seqs, &hashes])
        .await?
        != users.len() as u64
    {
        return Err(DbError::Invariant(
            "a balance change did not apply to every account (short, past the largest balance, \
             or its audit chain moved under the lock)"
                .into(),
        ));
    }
    Ok(())
}

/// Sets `user`'s own low-balance threshold (`None`: back to the service's
/// default) in one `UPDATE`, which takes the account's row lock, so a
/// movement decides each crossing with one threshold. Returns whether the
/// account exists (nothing changes when it does not).
pub async fn set_low_balance_threshold(
    client: &impl deadpool_postgres::GenericClient,
    user: &str,
    threshold: Option<i64>,
) -> Result<bool, DbError> {
    let stmt = client
        .prepare_cached(
            "UPDATE accounts SET low_balance_threshold = $2, updated_at = now() WHERE user_id = $1",
        )
        .await?;
    Ok(client.execute(&stmt, &[&user, &threshold]).await? == 1)
}

/// `user`'s own low-balance threshold: `None` without an account,
/// `Some(None)` when the account uses the service's default.
pub async fn low_balance_threshold(
    client: &impl deadpool_postgres::GenericClient,
    user: &str,
) -> Result<Option<Option<i64>>, DbError> {
    let stmt = client
        .prepare_cached("SELECT low_balance_threshold FROM accounts WHERE user_id = $1")
        .await?;
    match client.query_opt(&stmt, &[&user]).await? {
        Some(row) => Ok(Some(row.try_get("low_balance_threshold")?)),
        None => Ok(None),
    }
}
