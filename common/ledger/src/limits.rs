//! Spend limits (contract §16): a cap on what a user spends per UTC day,
//! week or month, in one app or across all.
//!
//! Rules, each written once here:
//! * **spending in a period** = credits deducted in it − credits given back
//!   since (refunds of every kind, the returned part of a settle-for-less)
//!   from the reservations made in it: a refund gives its room back to the
//!   period its reservation was made in, never to the one it happens in, so
//!   nothing counts twice across a reset ([`Spending::spent`]);
//! * a limit of scope `app` counts that app's spending; `*` counts every
//!   app's;
//! * a deduction of `n` is refused when, for any limit that applies,
//!   spending + `n` > `max_credits` (the first such limit, days before
//!   weeks before months, is the one named), and moves nothing; checked after the
//!   balance, so a deduction the balance cannot cover answers
//!   `insufficient_credits` as before;
//! * decided in the deduction's transaction, under the account's lock, in
//!   arrival order within a batch ([`crate::deduct::decide`] adds each
//!   accepted deduction before judging the next), so a batch decides exactly
//!   what one-by-one processing would;
//! * the per-day spending rows are written by the movement's `apply`, for
//!   users with a limit only ([`crate::tables::limits`]).

use std::collections::BTreeMap;

use deadpool_postgres::Client;
use penora_domain::{AppName, UserId, ValidationError, period::Period};
use serde::Serialize;
use time::{Date, OffsetDateTime};

use crate::{LedgerError, tables};

/// What a limit holds: one app's spending, or every app's.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Every app (stored `*`).
    All,
    /// One app.
    App(AppName),
}

impl Scope {
    /// From an optional `app_name` of a request: none is every app.
    pub fn of(app: Option<AppName>) -> Self {
        app.map_or(Scope::All, Scope::App)
    }

    /// From the stored text.
    pub fn from_db(raw: &str) -> Result<Self, ValidationError> {
        if raw == "*" {
            Ok(Scope::All)
        } else {
            AppName::parse("app_name", raw).map(Scope::App)
        }
    }

    /// As stored.
    pub fn as_db(&self) -> &str {
        match self {
            Scope::All => "*",
            Scope::App(a) => a.as_str(),
        }
    }

    /// Whether spending of `app` counts against it.
    pub fn holds(&self, app: &AppName) -> bool {
        match self {
            Scope::All => true,
            Scope::App(a) => a == app,
        }
    }

    /// The app it names, for answers (`None`: all apps).
    pub fn app(&self) -> Option<&str> {
        match self {
            Scope::All => None,
            Scope::App(a) => Some(a.as_str()),
        }
    }
}

/// One spend limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// Whose spending it counts.
    pub scope: Scope,
    /// Its period.
    pub period: Period,
    /// Most credits spendable in a period.
    pub max_credits: i64,
}

/// A user's limits and what the user spent, per app and UTC day, from the
/// first day any of them counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Spending {
    /// The limits: days, weeks, months, each by scope.
    pub limits: Vec<Limit>,
    /// Credits spent, by app and day.
    pub days: BTreeMap<(AppName, Date), i64>,
}

/// A change of a user's spending of one app on one day, written by `apply`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendDelta {
    /// Whose.
    pub user_id: UserId,
    /// Which app.
    pub app_name: AppName,
    /// The UTC day the reservation was made on.
    pub day: Date,
    /// Credits: positive for a deduction, negative for what is given back.
    pub delta: i64,
}

/// The UTC day of `at`.
pub fn day_of(at: OffsetDateTime) -> Date {
    Period::Day.start_of(at).date()
}

impl Spending {
    /// What `limit` has counted in its period at `now`.
    pub fn spent(&self, limit: &Limit, now: OffsetDateTime) -> i64 {
        let from = limit.period.start_of(now).date();
        self.days
            .iter()
            .filter(|((app, day), _)| *day >= from && limit.scope.holds(app))
            .map(|(_, n)| n)
            .sum()
    }

    /// Whether `amount` more of `app` at `now` stays within every limit;
    /// the first limit it would pass, refused, otherwise.
    pub fn check(
        &self,
        app: &AppName,
        amount: i64,
        now: OffsetDateTime,
    ) -> Result<(), LedgerError> {
        for limit in self.limits.iter().filter(|l| l.scope.holds(app)) {
            let spent = self.spent(limit, now);
            if spent.saturating_add(amount) > limit.max_credits {
                return Err(LedgerError::SpendLimitExceeded {
                    app_name: limit.scope.app().map(str::to_owned),
                    period: limit.period,
                    limit: limit.max_credits,
                    spent,
                    resets_at: limit.period.next_start(now),
                });
            }
        }
        Ok(())
    }

    /// Counts `amount` of `app` spent on `day`.
    pub fn add(&mut self, app: &AppName, day: Date, amount: i64) {
        *self.days.entry((app.clone(), day)).or_default() += amount;
    }

    /// Each limit as answers show it, at `now`.
    pub fn views(&self, now: OffsetDateTime) -> Vec<LimitView> {
        self.limits
            .iter()
            .map(|l| {
                let spent = self.spent(l, now);
                LimitView {
                    app_name: l.scope.app().map(str::to_owned),
                    period: l.period,
                    max_credits: l.max_credits,
                    spent,
                    remaining: (l.max_credits - spent).max(0),
                    resets_at: l.period.next_start(now),
                }
            })
            .collect()
    }
}

/// A limit with its spending, as the API and `user-info` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct LimitView {
    /// The app it holds; `null`: every app.
    pub app_name: Option<String>,
    /// `day`, `week` or `month` (UTC calendar periods).
    #[schema(value_type = String)]
    pub period: Period,
    /// Most credits spendable in a period.
    pub max_credits: i64,
    /// Spent in the current period: deducted in it, less what was refunded
    /// since from the reservations made in it.
    pub spent: i64,
    /// What can still be spent in the current period.
    pub remaining: i64,
    /// When the next period starts.
    #[serde(serialize_with = "penora_domain::timefmt::serde_millis::serialize")]
    #[schema(value_type = String, format = DateTime)]
    pub resets_at: OffsetDateTime,
}

/// The most a limit may be: JavaScript's largest safe integer.
pub const MAX_LIMIT: i64 = 9_007_199_254_740_991;

/// Sets `user`'s limit of `limit.scope` and `limit.period` (replacing one of
/// the same scope and period), under the account's lock; answers every
/// limit of the user with its spending. The account must exist.
pub async fn set_limit(
    client: &mut Client,
    user: &UserId,
    limit: &Limit,
) -> Result<Vec<LimitView>, LedgerError> {
    if !(0..=MAX_LIMIT).contains(&limit.max_credits) {
        return Err(LedgerError::Invalid {
            field: "max_credits",
            reason: format!("must be a whole number from 0 to {MAX_LIMIT}"),
        });
    }
    let tx = client.transaction().await?;
    let locked = tables::locked_accounts(&tx, &[user.as_str()], crate::OnBusy::Wait).await?;
    if !locked.accounts.contains_key(user) {
        return Err(LedgerError::UserNotFound);
    }
    tables::limits::set(&tx, user, limit, locked.now).await?;
    let views = read(&tx, user, locked.now).await?;
    tx.commit().await?;
    Ok(views)
}

/// Removes `user`'s limit of `scope` and `period`; answers the limits left,
/// or `not_found` when there was none.
pub async fn delete_limit(
    client: &mut Client,
    user: &UserId,
    scope: &Scope,
    period: Period,
) -> Result<Vec<LimitView>, LedgerError> {
    let tx = client.transaction().await?;
    let locked = tables::locked_accounts(&tx, &[user.as_str()], crate::OnBusy::Wait).await?;
    if !locked.accounts.contains_key(user) {
        return Err(LedgerError::UserNotFound);
    }
    if !tables::limits::delete(&tx, user, scope, period).await? {
        return Err(LedgerError::NotFound(format!(
            "{user} has no {period} limit for {}",
            scope.app().unwrap_or("all apps")
        )));
    }
    let views = read(&tx, user, locked.now).await?;
    tx.commit().await?;
    Ok(views)
}

/// `user`'s limits with their spending now (no lock: a read, on
/// `user-info`'s path). Judged at this host's clock, as `user-info`'s
/// `timestamp` is: a user without a limit costs one query, not a second
/// round trip for the database's `now()`.
pub async fn limits_of(
    client: &impl deadpool_postgres::GenericClient,
    user: &UserId,
) -> Result<Vec<LimitView>, LedgerError> {
    read(client, user, OffsetDateTime::now_utc()).await
}

async fn read(
    client: &impl deadpool_postgres::GenericClient,
    user: &UserId,
    now: OffsetDateTime,
) -> Result<Vec<LimitView>, LedgerError> {
    Ok(tables::limits::spending(client, &[user.as_str()], now)
        .await?
        .remove(user)
        .map(|s| s.views(now))
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn app(name: &str) -> AppName {
        AppName::parse("app_name", name).expect("an app name")
    }

    fn spending(limits: Vec<Limit>) -> Spending {
        Spending {
            limits,
            days: BTreeMap::new(),
        }
    }

    #[test]
    fn an_app_limit_holds_its_app_and_an_all_apps_limit_holds_both() {
        let now = datetime!(2026-12-09 15:00 UTC); // a Wednesday
        let mut s = spending(vec![
            Limit {
                scope: Scope::App(app("imagegene")),
                period: Period::Day,
                max_credits: 10,
            },
            Limit {
                scope: Scope::All,
                period: Period::Week,
                max_credits: 25,
            },
        ]);
        s.add(&app("imagegene"), day_of(now), 8);
        assert!(s.check(&app("imagegene"), 2, now).is_ok());
        assert!(matches!(
            s.check(&app("imagegene"), 3, now),
            Err(LedgerError::SpendLimitExceeded {
                limit: 10,
                spent: 8,
                ..
            })
        ));
        // Penora is held by the weekly all-apps limit only.
        assert!(s.check(&app("penora"), 17, now).is_ok());
        // Monday's spending counts in the week, not in today's day.
        s.add(&app("penora"), datetime!(2026-12-07 00:00 UTC).date(), 15);
        assert!(s.check(&app("imagegene"), 2, now).is_ok());
        let Err(LedgerError::SpendLimitExceeded {
            period,
            spent,
            resets_at,
            ..
        }) = s.check(&app("penora"), 3, now)
        else {
            panic!("the weekly limit holds");
        };
        assert_eq!((period, spent), (Period::Week, 23));
        assert_eq!(resets_at, datetime!(2026-12-14 00:00 UTC));
        // Last week's spending counts for nothing.
        s.add(
            &app("penora"),
            datetime!(2026-12-06 00:00 UTC).date(),
            1_000,
        );
        assert_eq!(s.spent(&s.limits[1], now), 23);
    }

    #[test]
    fn a_limit_of_zero_refuses_every_deduction_and_views_show_what_is_left() {
        let now = datetime!(2026-12-31 23:59:59 UTC);
        let s = spending(vec![Limit {
            scope: Scope::All,
            period: Period::Month,
            max_credits: 0,
        }]);
        assert!(s.check(&app("penora"), 1, now).is_err());
        let views = s.views(now);
        assert_eq!(views[0].remaining, 0);
        assert_eq!(views[0].resets_at, datetime!(2027-01-01 00:00 UTC));
    }
}
