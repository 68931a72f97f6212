//! What is done to lots themselves (contract §12): the timer's expiry,
//! voids, the listing and the balance at a past instant.
//!
//! Expiry and voids are movements like the others, in three steps (`load`
//! → pure `decide` → `plan::apply`).
//!
//! Rules: like every movement, expiry and voids lock the user's account
//! first; an expiry or a void writes its ledger entry, lot movements and
//! audit job in one transaction; a void is idempotent (a voided lot answers
//! the first void again); reads never lock.

use deadpool_postgres::{Client, GenericClient, Transaction};
use penora_domain::{EntryKind, LotStatus, UserId};
use penora_store::DbError;
use serde::Serialize;
use time::OffsetDateTime;
use utoipa::ToSchema;

use crate::{
    Answer, LedgerError, OnBusy, Outcome, count_moved,
    plan::{self, NewEntry, Plan},
    snapshot::Snapshot,
    tables::{self, lots::NOT_DUE_L},
};

/// Users with lots past their expiry whose `expire` entry is not written,
/// soonest first, at most `limit`.
pub async fn users_with_due_lots(
    client: &impl GenericClient,
    limit: i64,
) -> Result<Vec<String>, DbError> {
    tables::lots::users_with_due(client, limit).await
}

/// Decides the expiry of `user`'s lots past their expiry: how many credits
/// expire, and what it writes (nothing without an account or a due lot).
/// Pure.
pub fn decide_expiry(snap: &Snapshot, user: &UserId) -> Result<(i64, Plan), LedgerError> {
    let mut plan = Plan::default();
    let Some(account) = snap.accounts.get(user) else {
        return Ok((0, plan));
    };
    let mut balance = account.balance;
    let mut lots = account.lots.clone();
    let expired = plan.expire_due(user, &mut lots, &mut balance, snap.now, None)?;
    Ok((expired, plan))
}

/// Writes the `expire` entries of `user`'s lots past their expiry. Returns
/// how many credits expired (0 when another movement did it first).
pub async fn expire_lots(client: &mut Client, user: &str) -> Result<i64, LedgerError> {
    let user = UserId::parse(user).map_err(|e| DbError::Invariant(e.to_string()))?;
    let tx = client.transaction().await?;
    let snap = tables::locked_accounts(&tx, &[user.as_str()], OnBusy::Wait).await?;
    let (expired, plan) = decide_expiry(&snap, &user)?;
    if plan::commit(tx, &plan, &snap).await?.is_none() {
        return Ok(0);
    }
    count_entries(&plan, EntryKind::Expire, "expired");
    Ok(expired)
}

/// Counts the credits `plan`'s entries of `kind` took away, by app.
fn count_entries(plan: &Plan, kind: EntryKind, label: &'static str) {
    for e in plan.entries.iter().filter(|e| e.kind == kind) {
        count_moved(label, e.app_name.as_str(), e.amount);
    }
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

/// A void: lot `lot_id` of `user_id`, why, and (for a key bound to an app)
/// the only app whose lots it may void.
#[derive(Debug, Clone)]
pub struct Void<'a> {
    /// Whose lot.
    pub user_id: &'a UserId,
    /// The lot.
    pub lot_id: i64,
    /// Why, for people.
    pub reason: &'a str,
    /// A key bound to an app voids only the lots that app granted.
    pub only_app: Option<&'a str>,
    /// The request id, carried to the audit jobs.
    pub correlation_id: Option<&'a str>,
    /// The id of the API key that asked for it, recorded on the entry.
    pub acted_by: Option<&'a str>,
}

/// Locks the account, then the lot, and reads the account's lots and the
/// lot with what an earlier void of it took.
pub async fn load_void(tx: &Transaction<'_>, v: &Void<'_>) -> Result<Snapshot, LedgerError> {
    let mut snap = tables::locked_accounts(tx, &[v.user_id.as_str()], OnBusy::Wait).await?;
    if snap.accounts.contains_key(v.user_id)
        && let Some(lot) = tables::lots::one_for_change(tx, v.user_id, v.lot_id).await?
    {
        snap.lots.insert((v.user_id.clone(), v.lot_id), lot);
    }
    Ok(snap)
}

/// Decides void `v` against `snap`: its answer, and what it writes (the due
/// expiries of the account first, even when the lot has nothing to void).
/// Pure.
pub fn decide_void(
    snap: &Snapshot,
    v: &Void<'_>,
) -> Result<(Outcome<VoidReceipt>, Plan), LedgerError> {
    let user = v.user_id;
    let lot_id = v.lot_id;
    let account = snap.accounts.get(user).ok_or(LedgerError::UserNotFound)?;
    let record = snap
        .lots
        .get(&(user.clone(), lot_id))
        .ok_or_else(|| LedgerError::NotFound(format!("no lot {lot_id} for this user")))?;
    let lot_app = record.lot.app_name.as_str();
    if let Some(own) = v.only_app.filter(|own| *own != lot_app) {
        return Err(LedgerError::AppMismatch(format!(
            "This API key acts for app `{own}` only; lot {lot_id} was granted by app `{lot_app}`"
        )));
    }
    let mut plan = Plan::default();
    let mut balance = account.balance;
    let mut lots = account.lots.clone();
    plan.expire_due(user, &mut lots, &mut balance, snap.now, v.correlation_id)?;
    let receipt = |status: LotStatus, credits_voided, new_balance| VoidReceipt {
        user_id: user.to_string(),
        lot_id,
        status: status.as_str().to_owned(),
        credits_voided,
        new_balance,
    };
    match record.status {
        LotStatus::Voided => {
            return Ok((
                Outcome::replay(receipt(LotStatus::Voided, record.voided, balance)),
                plan,
            ));
        }
        // A lot past its expiry (with credits left or not) has nothing to void.
        LotStatus::Expired => {
            return Ok((
                Outcome::replay(receipt(LotStatus::Expired, 0, balance)),
                plan,
            ));
        }
        LotStatus::Active if record.lot.due_at(snap.now) => {
            return Ok((
                Outcome::replay(receipt(LotStatus::Expired, 0, balance)),
                plan,
            ));
        }
        LotStatus::Active => {}
    }
    let remaining = record.lot.remaining;
    if remaining > 0 {
        balance -= remaining;
        let at = plan.entry(NewEntry {
            user_id: user.clone(),
            kind: EntryKind::Void,
            amount: -remaining,
            balance_after: balance,
            app_name: record.lot.app_name.clone(),
            description: Some(v.reason.to_owned()),
            project_code: None,
            reference: None,
            correlation_id: v.correlation_id.map(str::to_owned),
            acted_by: v.acted_by.map(str::to_owned),
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
    plan.close(user, lot_id, LotStatus::Voided);
    Ok((
        Outcome::fresh(receipt(LotStatus::Voided, remaining, balance)),
        plan,
    ))
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
    void_lot_as(
        client,
        user,
        lot_id,
        (reason, only_app),
        correlation_id,
        None,
    )
    .await
}

/// [`void_lot`], recording `acted_by` (the acting API key's id) on the
/// entry.
pub async fn void_lot_as(
    client: &mut Client,
    user: &UserId,
    lot_id: i64,
    (reason, only_app): (&str, Option<&str>),
    correlation_id: Option<&str>,
    acted_by: Option<&str>,
) -> Answer<VoidReceipt> {
    let v = Void {
        user_id: user,
        lot_id,
        reason,
        only_app,
        correlation_id,
        acted_by,
    };
    let tx = client.transaction().await?;
    let snap = load_void(&tx, &v).await?;
    let (answer, plan) = decide_void(&snap, &v)?;
    if plan::commit(tx, &plan, &snap).await?.is_none() {
        return Ok(answer);
    }
    count_entries(&plan, EntryKind::Expire, "expired");
    count_entries(&plan, EntryKind::Void, "voided");
    Ok(answer)
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
        .prepare_cached(&format!(
            "SELECT * FROM ( \
               SELECT l.lot_id, l.category, l.priority, l.granted, l.expires_at, l.reference, l.created_at, \
                      CASE WHEN l.status = 'voided' THEN 'voided' \
                           WHEN l.status = 'expired' OR NOT {NOT_DUE_L} THEN 'expired' \
                           WHEN l.remaining = 0 THEN 'depleted' ELSE 'active' END AS shown, \
                      CASE WHEN l.status = 'active' AND {NOT_DUE_L} THEN l.remaining ELSE 0 END AS spendable \
               FROM credit_lots l WHERE l.user_id = $1 AND ($2::bigint IS NULL OR l.lot_id < $2)) l \
             WHERE $3::text IS NULL OR shown = $3 \
             ORDER BY lot_id DESC LIMIT $4"
        ))
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

/// Writes the `credits.expiring` event of each lot with credits left that
/// expires within `notice` (`EXPIRY_NOTICE_SECS`), once per lot, for up to
/// `limit` users: each user's in one transaction that locks the account
/// (the one lock), marks the lots noticed (`credit_lots.expiry_noticed_at`)
/// and writes their events. Returns how many lots were noticed.
pub async fn notice_expiring(
    client: &mut Client,
    notice: std::time::Duration,
    limit: i64,
) -> Result<usize, LedgerError> {
    let secs = notice.as_secs_f64();
    let users = tables::lots::users_to_notice(&*client, secs, limit).await?;
    let mut noticed = 0;
    for user in users {
        let user = UserId::parse(&user).map_err(|e| DbError::Invariant(e.to_string()))?;
        let tx = client.transaction().await?;
        if penora_store::accounts::lock_one(&tx, user.as_str())
            .await?
            .is_none()
        {
            tx.rollback().await?;
            continue;
        }
        let lots = tables::lots::mark_noticed(&tx, user.as_str(), secs).await?;
        let Some(now) = lots.first().map(|n| n.now) else {
            tx.rollback().await?;
            continue;
        };
        let events: Vec<crate::events_out::Derived> = lots
            .iter()
            .map(|n| crate::events_out::Derived {
                user_id: user.clone(),
                kind: penora_domain::events::EventType::CreditsExpiring,
                data: serde_json::json!({
                    "app": n.lot.app_name.as_str(),
                    "lot_id": n.lot.lot_id,
                    "amount": n.lot.remaining,
                    "category": n.lot.category.as_str(),
                    "expires_at": n.lot.expires_at.map(penora_domain::timefmt::rfc3339_millis),
                }),
                correlation_id: None,
            })
            .collect();
        crate::events_out::write(&tx, &events, now).await?;
        tx.commit().await?;
        noticed += lots.len();
    }
    Ok(noticed)
}
