//! `spend_limits` and `spend_days` (migration V16): a user's limits, and
//! what they spent per app and UTC day. Every query of both tables is here.

use std::collections::{BTreeMap, HashMap};

use deadpool_postgres::GenericClient;
use penora_domain::{AppName, UserId, period::Period};
use penora_store::DbError;
use time::{Date, OffsetDateTime};

use super::column;
use crate::limits::{Limit, Scope, SpendDelta, Spending};

/// The first day whose spending any limit at `now` may count: the earlier of
/// the week's and the month's first day (a week can start in the month
/// before).
pub fn window_start(now: OffsetDateTime) -> Date {
    Period::Week
        .start_of(now)
        .date()
        .min(Period::Month.start_of(now).date())
}

fn limit_of(r: &tokio_postgres::Row) -> Result<(UserId, Limit), DbError> {
    let user: String = column(r, "user_id")?;
    let scope: String = column(r, "scope")?;
    let period: Period = column(r, "period")?;
    let user = UserId::parse(&user)
        .map_err(|e| DbError::Invariant(format!("spend_limits.user_id: {e}")))?;
    let scope = Scope::from_db(&scope)
        .map_err(|e| DbError::Invariant(format!("spend_limits.scope: {e}")))?;
    Ok((
        user,
        Limit {
            scope,
            period,
            max_credits: column(r, "max_credits")?,
        },
    ))
}

/// The limits of `users`, and for those that have any, what they spent
/// from [`window_start`] on: one query, and a second only when a user has
/// a limit. Users without a limit are absent.
pub async fn spending(
    tx: &impl GenericClient,
    users: &[&str],
    now: OffsetDateTime,
) -> Result<HashMap<UserId, Spending>, DbError> {
    let mut out: HashMap<UserId, Spending> = HashMap::new();
    if users.is_empty() {
        return Ok(out);
    }
    let limits = tx
        .prepare_cached(
            "SELECT user_id, scope, period, max_credits FROM spend_limits \
             WHERE user_id = ANY($1) \
             ORDER BY user_id, array_position(ARRAY['day', 'week', 'month'], period), scope",
        )
        .await?;
    for r in tx.query(&limits, &[&users]).await? {
        let (user, limit) = limit_of(&r)?;
        out.entry(user).or_default().limits.push(limit);
    }
    if out.is_empty() {
        return Ok(out);
    }
    let limited: Vec<&str> = out.keys().map(UserId::as_str).collect();
    let days = tx
        .prepare_cached(
            "SELECT user_id, app_name, day, spent FROM spend_days \
             WHERE user_id = ANY($1) AND day >= $2",
        )
        .await?;
    for r in tx.query(&days, &[&limited, &window_start(now)]).await? {
        let user: String = column(&r, "user_id")?;
        let app: String = column(&r, "app_name")?;
        let (Ok(user), Ok(app)) = (UserId::parse(&user), AppName::parse("app_name", &app)) else {
            return Err(DbError::Invariant(format!(
                "spend_days: a row of {user:?} for app {app:?} names no valid user or app"
            )));
        };
        if let Some(s) = out.get_mut(&user) {
            s.days
                .insert((app, column(&r, "day")?), column(&r, "spent")?);
        }
    }
    Ok(out)
}

/// Adds each delta to its user's spending of its app and day, in one
/// statement.
pub async fn record(tx: &impl GenericClient, deltas: &[SpendDelta]) -> Result<(), DbError> {
    let mut sum: BTreeMap<(&str, &str, Date), i64> = BTreeMap::new();
    for d in deltas {
        *sum.entry((d.user_id.as_str(), d.app_name.as_str(), d.day))
            .or_default() += d.delta;
    }
    sum.retain(|_, v| *v != 0);
    if sum.is_empty() {
        return Ok(());
    }
    let users: Vec<&str> = sum.keys().map(|k| k.0).collect();
    let apps: Vec<&str> = sum.keys().map(|k| k.1).collect();
    let days: Vec<Date> = sum.keys().map(|k| k.2).collect();
    let amounts: Vec<i64> = sum.values().copied().collect();
    let upsert = tx
        .prepare_cached(
            "INSERT INTO spend_days (user_id, app_name, day, spent) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::date[], $4::int8[]) \
             ON CONFLICT (user_id, day, app_name) \
             DO UPDATE SET spent = spend_days.spent + excluded.spent",
        )
        .await?;
    tx.execute(&upsert, &[&users, &apps, &days, &amounts])
        .await?;
    Ok(())
}

/// Sets `user`'s limit (one per scope and period) and rebuilds the user's
/// spending from the reservations made from [`window_start`] on (amount
/// less what was refunded of each), so the limit counts what was spent
/// before it. The caller holds the account's lock.
pub async fn set(
    tx: &impl GenericClient,
    user: &UserId,
    limit: &Limit,
    now: OffsetDateTime,
) -> Result<(), DbError> {
    tx.execute(
        "INSERT INTO spend_limits (user_id, scope, period, max_credits) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (user_id, scope, period) \
         DO UPDATE SET max_credits = excluded.max_credits, updated_at = now()",
        &[
            &user.as_str(),
            &limit.scope.as_db(),
            &limit.period,
            &limit.max_credits,
        ],
    )
    .await?;
    tx.execute(
        "DELETE FROM spend_days WHERE user_id = $1",
        &[&user.as_str()],
    )
    .await?;
    tx.execute(
        "INSERT INTO spend_days (user_id, app_name, day, spent) \
         SELECT user_id, app_name, (created_at AT TIME ZONE 'UTC')::date, sum(amount - refunded_amount) \
         FROM reservations WHERE user_id = $1 AND created_at >= $2 \
         GROUP BY 1, 2, 3",
        &[
            &user.as_str(),
            &window_start(now).with_time(time::Time::MIDNIGHT).assume_utc(),
        ],
    )
    .await?;
    Ok(())
}

/// Removes `user`'s limit of `scope` and `period`; whether there was one.
/// The last limit gone, the user's spending rows go too (a limit set later
/// rebuilds them). The caller holds the account's lock.
pub async fn delete(
    tx: &impl GenericClient,
    user: &UserId,
    scope: &Scope,
    period: Period,
) -> Result<bool, DbError> {
    let n = tx
        .execute(
            "DELETE FROM spend_limits WHERE user_id = $1 AND scope = $2 AND period = $3",
            &[&user.as_str(), &scope.as_db(), &period],
        )
        .await?;
    tx.execute(
        "DELETE FROM spend_days WHERE user_id = $1 \
         AND NOT EXISTS (SELECT 1 FROM spend_limits WHERE user_id = $1)",
        &[&user.as_str()],
    )
    .await?;
    Ok(n > 0)
}

/// Forgets spending older than any limit can count (before the day
/// before the earliest window of `now`). Returns how many rows went.
pub async fn prune(client: &impl GenericClient, now: OffsetDateTime) -> Result<u64, DbError> {
    let before = window_start(now) - time::Duration::days(1);
    Ok(client
        .execute("DELETE FROM spend_days WHERE day < $1", &[&before])
        .await?)
}

/// How many limits there are, by period and scope kind (`app` or `all`),
/// and how many users have one.
pub async fn summary(
    client: &impl GenericClient,
) -> Result<(Vec<(String, String, i64)>, i64), DbError> {
    let rows = client
        .query(
            "SELECT period, CASE WHEN scope = '*' THEN 'all apps' ELSE 'one app' END AS kind, count(*) AS n \
             FROM spend_limits GROUP BY 1, 2 ORDER BY 1, 2",
            &[],
        )
        .await?;
    let mut out = Vec::new();
    for r in &rows {
        out.push((column(r, "period")?, column(r, "kind")?, column(r, "n")?));
    }
    let users: i64 = column(
        &client
            .query_one("SELECT count(DISTINCT user_id) AS n FROM spend_limits", &[])
            .await?,
        "n",
    )?;
    Ok((out, users))
}
