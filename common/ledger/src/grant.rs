//! Grants (`add-credits`, `penora-ops credits grant`): credits in, once per
//! `(user_id, reference)` (contract §15: another user's grant with the same
//! reference is a grant of its own).
//!
//! Three steps ([`load`] → [`decide`] → `plan::apply`), as every movement.
//!
//! Rules: the account is created on a user's first grant (and locked, as
//! every movement locks it); lots past their expiry are expired first, so
//! the grant's `balance_after` is what the user can spend; the balance never
//! passes `i64::MAX` (refused as an invalid amount, nothing written); the
//! reference is looked up under the account's lock, so a repeat answers from
//! the first grant, or with a conflict when its amount, category, priority
//! or expiry differs (the unique index on grant references stays as the
//! guard behind it).

use deadpool_postgres::{Client, Transaction};
use penora_domain::{AppName, Credits, EntryKind, LotCategory, UserId};
use penora_store::{DbError, accounts};
use serde::Serialize;
use time::OffsetDateTime;

use crate::{
    Answer, LedgerError, Outcome, count_moved,
    plan::{self, Applied, NewEntry, NewLot, Plan},
    snapshot::{Account, PastGrant, Snapshot},
    tables,
};

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
    /// The id of the API key that asked for it, recorded on the entry.
    pub acted_by: Option<String>,
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

/// Makes the account when it is new, locks it, and reads its lots and the
/// grant made before under `g.reference`.
pub async fn load(tx: &Transaction<'_>, g: &Grant) -> Result<Snapshot, LedgerError> {
    let user = &g.user_id;
    let mut locked = accounts::create_and_lock(tx, user.as_str()).await?;
    let mut snap = Snapshot::at(locked.now);
    let balance = locked.balances.get(user).copied().unwrap_or(0);
    let lots = tables::lots::active(tx, &[user.as_str()])
        .await?
        .remove(user)
        .unwrap_or_default();
    let threshold = locked.thresholds.get(user).copied().flatten();
    let chain = tables::head_of(&mut locked.heads, user);
    snap.accounts.insert(
        user.clone(),
        Account {
            balance,
            lots,
            threshold,
            spending: None,
            chain,
        },
    );
    if let Some(first) = tables::entries::grant_by_reference(tx, user, &g.reference).await? {
        snap.grants
            .insert((user.clone(), g.reference.clone()), first);
    }
    Ok(snap)
}

/// Decides grant `g` against `snap`: a replay of the grant made under its
/// reference (the plan writes nothing), a conflict, or a new grant. The
/// receipt of a new grant has its `entry_id` and `lot_id` at 0 until
/// [`grant`] fills them in from what `apply` wrote. Pure.
pub fn decide(
    snap: &Snapshot,
    g: &Grant,
    correlation_id: Option<&str>,
) -> Result<(Outcome<GrantReceipt>, Plan), LedgerError> {
    let user = &g.user_id;
    let mut plan = Plan::default();
    if let Some(first) = snap.grants.get(&(user.clone(), g.reference.clone())) {
        return Ok((replay(first, g)?, plan));
    }
    let account = snap.accounts.get(user).ok_or_else(|| {
        DbError::Invariant(format!("{user}: the account of a grant is not locked"))
    })?;
    let mut balance = account.balance;
    let mut lots = account.lots.clone();
    plan.expire_due(user, &mut lots, &mut balance, snap.now, correlation_id)?;
    let amount = g.amount.get();
    let Some(new_balance) = balance.checked_add(amount) else {
        return Err(LedgerError::Invalid {
            field: "amount",
            reason: "would take the balance past the largest possible balance".into(),
        });
    };
    let entry = plan.entry(NewEntry {
        user_id: user.clone(),
        kind: EntryKind::Grant,
        amount,
        balance_after: new_balance,
        app_name: g.app_name.clone(),
        description: Some(g.reason.clone()),
        project_code: None,
        reference: Some(g.reference.clone()),
        correlation_id: correlation_id.map(str::to_owned),
        acted_by: g.acted_by.clone(),
    });
    plan.new_lots.push(NewLot {
        entry,
        user_id: user.clone(),
        category: g.category,
        priority: g.priority,
        amount,
        expires_at: g.expires_at,
        app_name: g.app_name.clone(),
        reference: g.reference.clone(),
        allowance_id: None,
    });
    Ok((
        Outcome::fresh(GrantReceipt {
            user_id: user.to_string(),
            credits_added: amount,
            new_balance,
            reference: g.reference.clone(),
            entry_id: 0,
            timestamp: snap.now,
            lot_id: 0,
            category: g.category,
            priority: g.priority,
            expires_at: g.expires_at,
        }),
        plan,
    ))
}

/// The answer a grant gets from the grant made before under its reference:
/// the first result again, or a conflict when it asks for another grant.
fn replay(first: &PastGrant, g: &Grant) -> Result<Outcome<GrantReceipt>, LedgerError> {
    if first.amount != g.amount.get()
        || first.category != g.category
        || first.priority != g.priority
        || first.expires_at != g.expires_at
    {
        return Err(LedgerError::IdempotencyConflict(format!(
            "reference {:?} was already used for a grant of {} {} credits to this user; use a new reference for a new grant",
            g.reference,
            first.amount,
            first.category.as_str()
        )));
    }
    Ok(Outcome::replay(GrantReceipt {
        user_id: g.user_id.to_string(),
        credits_added: first.amount,
        new_balance: first.balance_after,
        reference: g.reference.clone(),
        entry_id: first.entry_id,
        timestamp: first.at,
        lot_id: first.lot_id,
        category: first.category,
        priority: first.priority,
        expires_at: first.expires_at,
    }))
}

/// Fills in what the database chose for a new grant's `receipt` (its
/// entry's id and time, its lot's id) from what `apply` wrote of `plan`.
pub fn complete(receipt: &mut GrantReceipt, plan: &Plan, applied: &Applied) -> Result<(), DbError> {
    let (entry_id, timestamp) = plan
        .new_lots
        .first()
        .and_then(|l| applied.entries.get(l.entry).copied())
        .ok_or_else(|| DbError::Invariant("a grant wrote no ledger entry".into()))?;
    receipt.entry_id = entry_id;
    receipt.timestamp = timestamp;
    receipt.lot_id = applied
        .lots
        .first()
        .copied()
        .ok_or_else(|| DbError::Invariant("a grant made no lot".into()))?;
    Ok(())
}

/// Grants credits, once per user and `reference`.
pub async fn grant(
    client: &mut Client,
    g: &Grant,
    correlation_id: Option<&str>,
) -> Answer<GrantReceipt> {
    let tx = client.transaction().await?;
    let snap = load(&tx, g).await?;
    let (mut answer, plan) = decide(&snap, g, correlation_id)?;
    if answer.replayed {
        // Nothing to write (the account existed: its grant made it).
        tx.rollback().await?;
        return Ok(answer);
    }
    let applied = plan::apply(&tx, &plan, &snap).await?;
    complete(&mut answer.value, &plan, &applied)?;
    tx.commit().await?;
    count_moved("granted", g.app_name.as_str(), g.amount.get());
    Ok(answer)
}
