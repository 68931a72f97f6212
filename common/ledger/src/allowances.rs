//! Recurring allowances (contract §16): a lot of `amount` credits each
//! calendar period (UTC day, week or month), expiring at the period's end,
//! with up to `max_rollover` unspent credits of the ending period's lot
//! carried into the next.
//!
//! Rules:
//! * a period's grant is an ordinary grant ([`crate::steps::decide_grant`]),
//!   with its entry, lot, audit job and events (`credits.granted` names the
//!   `allowance_id`), idempotent by the reference
//!   `allowance:<allowance_id>:<period start>`; the lots due at the grant's
//!   instant (the ending period's lot among them) are expired first, in the
//!   same transaction, so the ending lot is expired before the new one is
//!   granted;
//! * the period granted at `now` is the one containing `now`: it starts at
//!   `max(period.start_of(now), next_grant_at)` (a new allowance's first
//!   period starts at `starts_at`; after a change of period kind, the first
//!   period of the new kind starts where the last granted one ended) and
//!   ends at `period.next_start(now)`; nothing is granted before
//!   `next_grant_at`; periods wholly before `now` (a worker down across two
//!   boundaries) are skipped, never granted late;
//! * rollover: only the lot of the period that ends exactly where the new
//!   one starts carries over: `min(max_rollover, what it held when it
//!   expired)`: its `remaining` when this transaction expires it, or, when
//!   a movement or the expiry timer expired it first, what its `expire`
//!   movement took. After a missed period nothing carries (its lot expired
//!   a period ago). A voided lot carries nothing. The old lot's whole
//!   remainder is written as `expire`; the new lot is `amount + carried`.
//!   Lots of any other origin are never read for a rollover;
//! * a change takes effect at the next period (the current period's lot is
//!   left as granted); a delete stops future grants and leaves granted lots
//!   alone;
//! * the instant (`now`) is the caller's (the timer's clock, a test's); the
//!   rows' own times are the transaction's.

use deadpool_postgres::{Client, GenericClient, Transaction};
use penora_domain::{
    AppName, Credits, LotCategory, LotStatus, UserId, ValidationError, period::Period,
};
use penora_store::{DbError, accounts};
use serde::Serialize;
use time::OffsetDateTime;
use utoipa::ToSchema;

use crate::{
    Grant, LedgerError, count_moved, grant, plan,
    tables::allowances::{self as table, AllowanceRow, GrantedLot},
};

/// The prefix of allowance grants' references; other grants may not use it.
pub const ALLOWANCE_REFERENCE_PREFIX: &str = "allowance:";

/// The longest `allowance_id`.
pub const MAX_ALLOWANCE_ID_LEN: usize = 64;

/// The period start a grant reference of allowance `id` names.
fn period_start_of(reference: &str, id: &str) -> Option<OffsetDateTime> {
    let at = reference
        .strip_prefix(ALLOWANCE_REFERENCE_PREFIX)?
        .strip_prefix(id)?
        .strip_prefix(':')?;
    OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).ok()
}

/// The reference of allowance `id`'s grant for the period starting at `start`.
pub fn reference(id: &str, start: OffsetDateTime) -> String {
    format!(
        "{ALLOWANCE_REFERENCE_PREFIX}{id}:{}",
        penora_domain::timefmt::rfc3339_millis(start)
    )
}

/// Checks an `allowance_id`: 1–64 characters of `[A-Za-z0-9_.-]`.
pub fn allowance_id(raw: Option<&str>) -> Result<String, ValidationError> {
    let rule = "must be 1 to 64 characters of A-Z, a-z, 0-9, `_`, `.`, `-`";
    match raw {
        Some(id)
            if !id.is_empty()
                && id.len() <= MAX_ALLOWANCE_ID_LEN
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) =>
        {
            Ok(id.to_owned())
        }
        _ => Err(ValidationError::new("allowance_id", rule)),
    }
}

/// An allowance as set (`PUT /allowances`, `penora-ops allowances set`).
#[derive(Debug, Clone)]
pub struct Allowance {
    /// Whose (the account is made if new).
    pub user_id: UserId,
    /// Its name, unique per user ([`allowance_id`]).
    pub allowance_id: String,
    /// Credits each period.
    pub amount: Credits,
    /// Day, week or month.
    pub period: Period,
    /// The lots' category (promotional by default).
    pub category: LotCategory,
    /// At most this many unspent credits carry into the next period.
    pub max_rollover: i64,
    /// The app the grants are written for.
    pub app_name: AppName,
    /// When the first period starts (`None`: now). Only for a new
    /// allowance, or one whose first period has not started.
    pub starts_at: Option<OffsetDateTime>,
}

/// An allowance as asked for (`PUT /allowances`, `penora-ops allowances
/// set`): the fields as sent (numbers as JSON values, as the API receives
/// them), but whom and for which app, checked. [`AllowanceRequest::validate`]
/// is the one spelling of the fields' rules.
#[derive(Debug, Clone, Copy)]
pub struct AllowanceRequest<'a> {
    /// Whose.
    pub user_id: &'a UserId,
    /// The app the grants are written for.
    pub app_name: &'a AppName,
    /// 1–64 characters of `[A-Za-z0-9_.-]`.
    pub allowance_id: Option<&'a str>,
    /// 1 to `MAX_DEDUCT_AMOUNT`.
    pub amount: Option<&'a serde_json::Value>,
    /// `day`, `week` or `month`.
    pub period: Option<&'a str>,
    /// `promotional` (the default) or `paid`.
    pub category: Option<&'a str>,
    /// 0 (the default) to `MAX_DEDUCT_AMOUNT`.
    pub max_rollover: Option<&'a serde_json::Value>,
    /// RFC 3339 (default: now).
    pub starts_at: Option<&'a str>,
}

impl AllowanceRequest<'_> {
    /// The allowance, every field checked, in the order of the struct;
    /// `max_amount` is `MAX_DEDUCT_AMOUNT`.
    pub fn validate(&self, max_amount: i64) -> Result<Allowance, ValidationError> {
        let allowance_id = allowance_id(self.allowance_id)?;
        let amount = Credits::from_json("amount", self.amount, max_amount)?;
        let period = match self.period {
            Some(raw) => Period::parse(raw)?,
            None => {
                return Err(ValidationError::new(
                    "period",
                    "is required (`day`, `week` or `month`)",
                ));
            }
        };
        let category = match self.category {
            None => LotCategory::Promotional,
            Some(raw) => LotCategory::from_db(raw).ok_or_else(|| {
                ValidationError::new("category", "must be `promotional` or `paid`")
            })?,
        };
        let range = || format!("must be a whole number from 0 to {max_amount}");
        let max_rollover = match self.max_rollover {
            None | Some(serde_json::Value::Null) => 0,
            Some(v) => match penora_domain::whole_number("max_rollover", v, &range)? {
                n if (0..=max_amount).contains(&n) => n,
                _ => return Err(ValidationError::new("max_rollover", range())),
            },
        };
        let starts_at = self
            .starts_at
            .map(|raw| penora_domain::timefmt::parse_field("starts_at", raw))
            .transpose()?;
        Ok(Allowance {
            user_id: self.user_id.clone(),
            allowance_id,
            amount,
            period,
            category,
            max_rollover,
            app_name: self.app_name.clone(),
            starts_at,
        })
    }
}

/// An allowance as shown.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AllowanceView {
    /// Whose.
    pub user_id: String,
    /// Its name.
    pub allowance_id: String,
    /// Credits each period.
    pub amount: i64,
    /// `day`, `week` or `month` (UTC calendar).
    pub period: Period,
    /// The lots' category.
    pub category: LotCategory,
    /// At most this many unspent credits carry into the next period.
    pub max_rollover: i64,
    /// The app its grants are written for.
    pub app_name: String,
    /// When its first period started (or starts).
    #[serde(serialize_with = "penora_domain::timefmt::serde_millis::serialize")]
    #[schema(value_type = String)]
    pub starts_at: OffsetDateTime,
    /// The start of the period last granted (`null`: none yet).
    #[serde(serialize_with = "penora_domain::timefmt::serde_millis::option::serialize")]
    #[schema(value_type = Option<String>)]
    pub period_start: Option<OffsetDateTime>,
    /// When the next period starts and is granted.
    #[serde(serialize_with = "penora_domain::timefmt::serde_millis::serialize")]
    #[schema(value_type = String)]
    pub next_grant_at: OffsetDateTime,
    /// When it was made.
    #[serde(serialize_with = "penora_domain::timefmt::serde_millis::serialize")]
    #[schema(value_type = String)]
    pub created_at: OffsetDateTime,
    /// When its terms last changed.
    #[serde(serialize_with = "penora_domain::timefmt::serde_millis::serialize")]
    #[schema(value_type = String)]
    pub updated_at: OffsetDateTime,
}

impl From<&AllowanceRow> for AllowanceView {
    fn from(r: &AllowanceRow) -> Self {
        Self {
            user_id: r.user_id.to_string(),
            allowance_id: r.allowance_id.clone(),
            amount: r.amount,
            period: r.period,
            category: r.category,
            max_rollover: r.max_rollover,
            app_name: r.app_name.to_string(),
            starts_at: r.starts_at,
            period_start: r.period_start,
            next_grant_at: r.next_grant_at,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// One period's grant of an allowance.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PeriodGrant {
    /// Whose.
    pub user_id: String,
    /// The allowance.
    pub allowance_id: String,
    /// The period's start.
    #[serde(serialize_with = "penora_domain::timefmt::serde_millis::serialize")]
    #[schema(value_type = String)]
    pub period_start: OffsetDateTime,
    /// The period's end: when the lot expires.
    #[serde(serialize_with = "penora_domain::timefmt::serde_millis::serialize")]
    #[schema(value_type = String)]
    pub period_end: OffsetDateTime,
    /// The grant's reference (`allowance:<allowance_id>:<period start>`).
    pub reference: String,
    /// The lot granted.
    pub lot_id: i64,
    /// Credits granted: the allowance's amount plus what was carried.
    pub credits_added: i64,
    /// Credits carried from the ending period's lot.
    pub carried: i64,
    /// Whether this answer is of a grant made before (nothing moved now).
    pub replayed: bool,
}

/// The answer of [`set`].
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SetReceipt {
    /// The allowance as it is now.
    pub allowance: AllowanceView,
    /// Whether the allowance was made by this request.
    pub created: bool,
    /// Whether its terms changed (a change takes effect at the next period).
    pub changed: bool,
    /// The current period's grant (`replayed` when made before), `null`
    /// when the first period has not started.
    pub current_grant: Option<PeriodGrant>,
}

/// The period of an allowance of kind `period`, next due at `next_grant_at`,
/// granted at `now`: `(start, end)`, or `None` before `next_grant_at`. Pure.
pub fn period_at(
    period: Period,
    next_grant_at: OffsetDateTime,
    now: OffsetDateTime,
) -> Option<(OffsetDateTime, OffsetDateTime)> {
    if now < next_grant_at {
        return None;
    }
    Some((
        period.start_of(now).max(next_grant_at),
        period.next_start(now),
    ))
}

/// Credits that carry into the period starting at `start` from `ending`
/// (the lot of the period last granted, which started at `last_start` and
/// ended at `last_end`). Pure.
pub fn carry(
    max_rollover: i64,
    last_end: OffsetDateTime,
    start: OffsetDateTime,
    ending: Option<&GrantedLot>,
) -> i64 {
    if last_end != start || max_rollover == 0 {
        return 0; // a period was missed: its lot expired a period ago
    }
    let held = match ending {
        Some(l) if l.expires_at == Some(last_end) => match l.status {
            LotStatus::Active => l.remaining,
            LotStatus::Expired => l.expired,
            LotStatus::Voided => 0,
        },
        _ => 0,
    };
    held.clamp(0, max_rollover)
}

/// The milliseconds of `t` (what the service shows and keeps in references).
fn millis(t: OffsetDateTime) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(t.unix_timestamp_nanos() / 1_000_000 * 1_000_000)
        .unwrap_or(t)
}

/// The transaction's `now()`, or the caller's instant.
async fn instant(
    tx: &Transaction<'_>,
    now: Option<OffsetDateTime>,
) -> Result<OffsetDateTime, DbError> {
    Ok(match now {
        Some(t) => t,
        None => tx
            .query_one("SELECT now() AS now", &[])
            .await?
            .try_get("now")?,
    })
}

/// Grants `row`'s period at `now`, if one has started that is not granted,
/// in `tx` (which holds the account's and the allowance's locks), and
/// records it on the row. `None`: nothing due.
async fn grant_due_period(
    tx: &Transaction<'_>,
    row: &mut AllowanceRow,
    now: OffsetDateTime,
    correlation_id: Option<&str>,
) -> Result<Option<PeriodGrant>, LedgerError> {
    let Some((start, end)) = period_at(row.period, row.next_grant_at, now) else {
        return Ok(None);
    };
    let user = row.user_id.clone();
    let carried = match row.period_start {
        Some(last_start) if row.next_grant_at == start && row.max_rollover > 0 => {
            let ending =
                table::lot_by_reference(tx, &user, &reference(&row.allowance_id, last_start))
                    .await?;
            carry(row.max_rollover, row.next_grant_at, start, ending.as_ref())
        }
        _ => 0,
    };
    let amount = row
        .amount
        .checked_add(carried)
        .ok_or(LedgerError::Invalid {
            field: "amount",
            reason: "the amount and the rollover overflow".into(),
        })?;
    let g = Grant {
        user_id: user.clone(),
        amount: Credits::new("amount", amount, i64::MAX).map_err(|e| LedgerError::Invalid {
            field: "amount",
            reason: e.to_string(),
        })?,
        app_name: row.app_name.clone(),
        reason: format!(
            "allowance {}: {} from {}",
            row.allowance_id,
            row.period.as_str(),
            penora_domain::timefmt::rfc3339_millis(start)
        ),
        reference: reference(&row.allowance_id, start),
        category: row.category,
        priority: row.category.default_priority(),
        expires_at: Some(end),
        acted_by: None,
    };
    let mut snap = grant::load(tx, &g).await?;
    // The rules are judged at the caller's instant (the timer's clock).
    snap.now = now;
    let (mut answer, mut plan) = grant::decide(&snap, &g, correlation_id)?;
    for lot in &mut plan.new_lots {
        lot.allowance_id = Some(row.allowance_id.clone());
    }
    if !answer.replayed {
        let applied = plan::apply(tx, &plan, &snap).await?;
        grant::complete(&mut answer.value, &plan, &applied)?;
    }
    table::advance(tx, &user, &row.allowance_id, start, end).await?;
    row.period_start = Some(start);
    row.next_grant_at = end;
    if !answer.replayed {
        for e in plan
            .entries
            .iter()
            .filter(|e| e.kind == penora_domain::EntryKind::Expire)
        {
            count_moved("expired", e.app_name.as_str(), e.amount);
        }
        count_moved("granted", g.app_name.as_str(), amount);
    }
    Ok(Some(PeriodGrant {
        user_id: user.to_string(),
        allowance_id: row.allowance_id.clone(),
        period_start: start,
        period_end: end,
        reference: g.reference,
        lot_id: answer.value.lot_id,
        credits_added: answer.value.credits_added,
        carried: if answer.replayed { 0 } else { carried },
        replayed: answer.replayed,
    }))
}

/// The grant made before for `row`'s current period, as a replayed answer.
async fn current_grant(
    client: &impl GenericClient,
    row: &AllowanceRow,
) -> Result<Option<PeriodGrant>, DbError> {
    let Some(start) = row.period_start else {
        return Ok(None);
    };
    let reference = reference(&row.allowance_id, start);
    let Some(lot) = table::lot_by_reference(client, &row.user_id, &reference).await? else {
        return Ok(None);
    };
    Ok(Some(PeriodGrant {
        user_id: row.user_id.to_string(),
        allowance_id: row.allowance_id.clone(),
        period_start: start,
        period_end: row.next_grant_at,
        reference,
        lot_id: lot.lot_id,
        credits_added: lot.granted,
        carried: (lot.granted - row.amount).max(0),
        replayed: true,
    }))
}

/// Sets allowance `a` (makes it, or changes its terms from the next
/// period) and grants its current period when it has started and is not
/// granted yet, in one transaction. `now` judges the periods (`None`: the
/// transaction's time). Setting the same values again changes and grants
/// nothing.
///
/// With `only_app` (a key bound to an app), an allowance another app set is
/// refused ([`LedgerError::AppMismatch`]).
pub async fn set(
    client: &mut Client,
    a: &Allowance,
    now: Option<OffsetDateTime>,
    only_app: Option<&str>,
    correlation_id: Option<&str>,
) -> Result<SetReceipt, LedgerError> {
    let tx = client.transaction().await?;
    let now = instant(&tx, now).await?;
    accounts::create_and_lock(&tx, a.user_id.as_str()).await?;
    let existing = table::one_for_update(&tx, &a.user_id, &a.allowance_id).await?;
    if let Some(row) = &existing {
        same_app(row, only_app)?;
    }
    let created = existing.is_none();
    let mut moved = false;
    let mut granted_before = None;
    let mut row = match existing {
        None => {
            let starts_at = millis(a.starts_at.unwrap_or(now));
            // An allowance of this name deleted and set again within a
            // period its lot still covers: that period is granted already,
            // and is not granted twice.
            if let Some((_, end)) = period_at(a.period, starts_at, now) {
                granted_before = table::granted_until(&tx, &a.user_id, &a.allowance_id, end)
                    .await?
                    .and_then(|r| period_start_of(&r, &a.allowance_id))
                    .map(|start| (start, end));
            }
            AllowanceRow {
                user_id: a.user_id.clone(),
                allowance_id: a.allowance_id.clone(),
                amount: a.amount.get(),
                period: a.period,
                category: a.category,
                max_rollover: a.max_rollover,
                app_name: a.app_name.clone(),
                starts_at,
                period_start: granted_before.map(|(start, _)| start),
                next_grant_at: granted_before.map_or(starts_at, |(_, end)| end),
                created_at: now,
                updated_at: now,
            }
        }
        Some(mut row) => {
            if let Some(s) = a.starts_at.map(millis).filter(|s| *s != row.starts_at) {
                moved = true;
                if row.period_start.is_some() {
                    return Err(LedgerError::Invalid {
                        field: "starts_at",
                        reason:
                            "the allowance has started; delete it and set it again to start it anew"
                                .into(),
                    });
                }
                row.starts_at = s;
                row.next_grant_at = s;
            }
            row
        }
    };
    let terms = (
        a.amount.get(),
        a.period,
        a.category,
        a.max_rollover,
        &a.app_name,
    );
    let before = (
        row.amount,
        row.period,
        row.category,
        row.max_rollover,
        &row.app_name,
    );
    let changed = !created && terms != before;
    row.amount = a.amount.get();
    row.period = a.period;
    row.category = a.category;
    row.max_rollover = a.max_rollover;
    row.app_name = a.app_name.clone();
    // The same values again write nothing (not even `updated_at`).
    if created || changed || moved {
        table::upsert(&tx, &row).await?;
    }
    let granted = grant_due_period(&tx, &mut row, now, correlation_id).await?;
    let current = match granted {
        Some(g) => Some(g),
        None => current_grant(&tx, &row).await?,
    };
    // Read back for the times the database set.
    let row = table::one_for_update(&tx, &a.user_id, &a.allowance_id)
        .await?
        .ok_or_else(|| DbError::Invariant("an allowance set is missing".into()))?;
    tx.commit().await?;
    Ok(SetReceipt {
        allowance: AllowanceView::from(&row),
        created,
        changed: changed || moved,
        current_grant: current,
    })
}

/// `user`'s allowances (an unknown user has none).
pub async fn list(
    client: &impl GenericClient,
    user: &UserId,
) -> Result<Vec<AllowanceView>, DbError> {
    Ok(table::of_user(client, user)
        .await?
        .iter()
        .map(AllowanceView::from)
        .collect())
}

/// Deletes `user`'s allowance `id`: no more grants; its lots stay. Returns
/// the allowance deleted, `None` when there was none.
/// With `only_app` (a key bound to an app), an allowance another app set is
/// refused ([`LedgerError::AppMismatch`]).
pub async fn delete(
    client: &mut Client,
    user: &UserId,
    id: &str,
    only_app: Option<&str>,
) -> Result<Option<AllowanceView>, LedgerError> {
    let tx = client.transaction().await?;
    let locked =
        accounts::lock(&tx, &[user.as_str()], penora_store::accounts::OnBusy::Wait).await?;
    if !locked.balances.contains_key(user) {
        return Ok(None);
    }
    let Some(row) = table::one_for_update(&tx, user, id).await? else {
        return Ok(None);
    };
    same_app(&row, only_app)?;
    table::delete(&tx, user, id).await?;
    tx.commit().await?;
    Ok(Some(AllowanceView::from(&row)))
}

/// Refuses a key bound to app `only_app` acting on `row` of another app.
fn same_app(row: &AllowanceRow, only_app: Option<&str>) -> Result<(), LedgerError> {
    match only_app {
        Some(own) if own != row.app_name.as_str() => Err(LedgerError::AppMismatch(format!(
            "This API key acts for app `{own}` only; allowance {:?} was set by app `{}`",
            row.allowance_id,
            row.app_name.as_str()
        ))),
        _ => Ok(()),
    }
}

/// Grants the periods started at `now` of up to `limit` allowances (the
/// timer's step, before the expiry of due lots): each in its own
/// transaction, under the account's lock. Returns the grants made.
pub async fn grant_due(
    client: &mut Client,
    now: OffsetDateTime,
    limit: i64,
) -> Result<Vec<PeriodGrant>, LedgerError> {
    let due = table::due(&*client, now, limit).await?;
    let mut out = Vec::new();
    for (user, id) in due {
        match grant_one(client, &user, &id, now).await {
            Ok(Some(g)) => out.push(g),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(user_id = %user, allowance_id = %id, error = %e, "an allowance's grant failed");
                metrics::counter!("penora_allowance_grant_failures_total").increment(1);
            }
        }
    }
    Ok(out)
}

/// Grants allowance `id` of `user` at `now` if its next period has started.
pub async fn grant_one(
    client: &mut Client,
    user: &UserId,
    id: &str,
    now: OffsetDateTime,
) -> Result<Option<PeriodGrant>, LedgerError> {
    let tx = client.transaction().await?;
    let locked =
        accounts::lock(&tx, &[user.as_str()], penora_store::accounts::OnBusy::Wait).await?;
    if !locked.balances.contains_key(user) {
        return Ok(None);
    }
    let Some(mut row) = table::one_for_update(&tx, user, id).await? else {
        return Ok(None); // deleted meanwhile
    };
    let granted = grant_due_period(&tx, &mut row, now, None).await?;
    tx.commit().await?;
    Ok(granted)
}

/// How many users and allowances there are of one period and category.
#[derive(Debug, Clone, Serialize)]
pub struct SummaryRow {
    /// The period.
    pub period: Period,
    /// The category.
    pub category: LotCategory,
    /// Users with at least one such allowance.
    pub users: i64,
    /// Such allowances.
    pub allowances: i64,
}

/// How many users and allowances there are of each period and category.
pub async fn summary(client: &impl GenericClient) -> Result<Vec<SummaryRow>, DbError> {
    Ok(table::summary(client)
        .await?
        .into_iter()
        .map(|(period, category, users, allowances)| SummaryRow {
            period,
            category,
            users,
            allowances,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn lot(
        status: LotStatus,
        remaining: i64,
        expired: i64,
        expires_at: OffsetDateTime,
    ) -> GrantedLot {
        GrantedLot {
            lot_id: 1,
            granted: 100,
            status,
            remaining,
            expires_at: Some(expires_at),
            expired,
        }
    }

    #[test]
    fn the_period_granted_is_the_one_containing_now_and_never_before_its_start() {
        let next = datetime!(2028-02-01 00:00 UTC);
        assert_eq!(
            period_at(Period::Month, next, datetime!(2028-01-31 23:59 UTC)),
            None
        );
        assert_eq!(
            period_at(Period::Month, next, next),
            Some((next, datetime!(2028-03-01 00:00 UTC)))
        );
        // Down across two boundaries: only the current period.
        assert_eq!(
            period_at(Period::Month, next, datetime!(2028-03-02 10:00 UTC)),
            Some((
                datetime!(2028-03-01 00:00 UTC),
                datetime!(2028-04-01 00:00 UTC)
            ))
        );
        // A first period from starts_at on the 31st runs to the 1st.
        let start = datetime!(2028-01-31 15:30 UTC);
        assert_eq!(
            period_at(Period::Month, start, start),
            Some((start, datetime!(2028-02-01 00:00 UTC)))
        );
        // Month to week: the first week starts where the month ended.
        assert_eq!(
            period_at(Period::Week, next, datetime!(2028-02-02 09:00 UTC)),
            Some((next, datetime!(2028-02-07 00:00 UTC)))
        );
    }

    #[test]
    fn rollover_carries_at_most_max_rollover_of_the_lot_ending_at_the_boundary_only() {
        let end = datetime!(2028-03-01 00:00 UTC);
        let active = lot(LotStatus::Active, 30, 0, end);
        assert_eq!(carry(20, end, end, Some(&active)), 20);
        assert_eq!(carry(50, end, end, Some(&active)), 30);
        assert_eq!(carry(0, end, end, Some(&active)), 0);
        // Expired by the timer first: what its expiry took.
        assert_eq!(
            carry(50, end, end, Some(&lot(LotStatus::Expired, 0, 12, end))),
            12
        );
        assert_eq!(
            carry(50, end, end, Some(&lot(LotStatus::Voided, 0, 0, end))),
            0
        );
        // A missed period: nothing carries.
        let later = datetime!(2028-04-01 00:00 UTC);
        assert_eq!(carry(50, end, later, Some(&active)), 0);
        assert_eq!(carry(50, end, end, None), 0);
    }

    #[test]
    fn allowance_ids_are_short_plain_names() {
        assert_eq!(
            allowance_id(Some("pro-monthly_v2.1")).as_deref().ok(),
            Some("pro-monthly_v2.1")
        );
        for bad in [
            None,
            Some(""),
            Some("a:b"),
            Some("a b"),
            Some(&*"x".repeat(65)),
        ] {
            assert!(allowance_id(bad).is_err(), "{bad:?}");
        }
    }
}
