//! Spend limits under faults (issue 27): a quarter of the chaos users get two
//! limits before the traffic, small enough that it hits them, and the limit
//! invariant is checked against the database after the run.
//!
//! Rules:
//! * the limited users are `chaos_<n>` with `n % 4 == 0` ([`is_limited`]);
//!   each gets an all-apps daily limit and an `imagegene` limit, one of the
//!   two tight ([`TIGHT`] credits) and the other loose, in turn, so both
//!   kinds refuse deductions;
//! * a deduction answered `403 spend_limit_exceeded` is a final answer (the
//!   client neither retries it nor counts it charged); one for a user
//!   without a limit, or whose `spent + amount` does not pass its `limit`,
//!   breaks the contract;
//! * after the run (after wait-idle), for each limited user and limit:
//!   spending in the current period, from `reservations` (amount −
//!   refunded_amount of those made since the period's start, of the limit's
//!   app or of all apps), is at most `max_credits`, and `GET /limits` shows
//!   that same `spent`; and the user's `spend_days` rows from the week's or
//!   month's first day on equal, per app and UTC day, the reservations made
//!   that day. Any difference is a violation;
//! * a period that started between the first limit set and the end of the
//!   checks (a run across UTC midnight, say) is not checked: a limit's
//!   current period would not be the same at both ends (the report says so).

use std::collections::BTreeMap;

use penora_domain::period::Period;
use serde_json::{Value, json};
use time::{Date, OffsetDateTime};

use crate::chaos::Ctx;

/// The app the chaos traffic deducts in.
const APP: &str = "imagegene";

/// The tight limit of each limited user (credits per period).
pub const TIGHT: i64 = 40;

/// The loose one: the traffic may reach it, but seldom.
pub const LOOSE: i64 = 400;

/// Whether `user` (`chaos_<n>`) has limits.
pub fn is_limited(user: &str) -> bool {
    user.strip_prefix("chaos_")
        .and_then(|n| n.parse::<u64>().ok())
        .is_some_and(|n| n.is_multiple_of(4))
}

/// One limit as set: its app (`None`: all apps), period and maximum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetLimit {
    pub app: Option<String>,
    pub period: Period,
    pub max_credits: i64,
}

/// The limits set before the traffic, by user, and when the first was set.
pub struct Limits {
    pub by_user: BTreeMap<String, Vec<SetLimit>>,
    pub set_at: OffsetDateTime,
}

/// The limits of the `k`-th limited user: an all-apps daily limit and an
/// `imagegene` one (weekly or monthly), the tight one alternating.
fn limits_of(k: usize) -> Vec<SetLimit> {
    let (day, app_period, app_max) = if k.is_multiple_of(2) {
        (TIGHT, Period::Month, LOOSE)
    } else {
        (LOOSE, Period::Week, TIGHT)
    };
    vec![
        SetLimit {
            app: None,
            period: Period::Day,
            max_credits: day,
        },
        SetLimit {
            app: Some(APP.to_owned()),
            period: app_period,
            max_credits: app_max,
        },
    ]
}

/// Sets the limits of every limited user through the API (before the
/// faults start: each must be set).
pub async fn set(ctx: &Ctx) -> anyhow::Result<Limits> {
    let set_at = OffsetDateTime::now_utc();
    let mut by_user = BTreeMap::new();
    let limited = (0..ctx.args.users)
        .map(|u| format!("chaos_{u}"))
        .filter(|u| is_limited(u));
    for (k, user) in limited.enumerate() {
        let limits = limits_of(k);
        for l in &limits {
            let body = json!({"user_id": user, "app_name": l.app, "period": l.period.as_str(),
                              "max_credits": l.max_credits});
            match ctx
                .send(reqwest::Method::PUT, "/api/unified/limits", Some(&body))
                .await
            {
                Some((200, _)) => {}
                other => anyhow::bail!("setting a limit of {user} ({body}): {other:?}"),
            }
        }
        by_user.insert(user, limits);
    }
    eprintln!(
        "chaos: spend limits on {} of {} users (an all-apps daily one and an {APP} one each, {TIGHT} or {LOOSE} credits)",
        by_user.len(),
        ctx.args.users
    );
    Ok(Limits { by_user, set_at })
}

/// Whether a `403` answer to a deduction of `amount` by `user` is a
/// legitimate refusal; what is wrong with it otherwise.
pub fn judge_refusal(user: &str, amount: i64, answer: &Value) -> Result<(), String> {
    if answer["code"] != "spend_limit_exceeded" {
        return Err(format!("403 with code {}", answer["code"]));
    }
    if !is_limited(user) {
        return Err(format!("{user} has no limit"));
    }
    let (Some(limit), Some(spent)) = (answer["limit"].as_i64(), answer["spent"].as_i64()) else {
        return Err("no `limit` or `spent`".into());
    };
    if answer["period"]
        .as_str()
        .and_then(Period::from_db)
        .is_none()
        || answer["resets_at"].as_str().is_none()
    {
        return Err("no `period` or `resets_at`".into());
    }
    if spent + amount <= limit {
        return Err(format!(
            "{spent} spent + {amount} is within the limit of {limit}"
        ));
    }
    Ok(())
}

/// What the checks found: the violations, and the report's table.
pub struct Checked {
    pub violations: Vec<String>,
    pub report: String,
}

/// Spending by (app, day) of `user`'s reservations made from `from` on.
async fn reservation_days(
    db: &tokio_postgres::Client,
    user: &str,
    from: Date,
) -> anyhow::Result<BTreeMap<(String, Date), i64>> {
    let rows = db
        .query(
            "SELECT app_name, (created_at AT TIME ZONE 'UTC')::date AS day, \
                    sum(amount - refunded_amount)::bigint AS spent \
             FROM reservations WHERE user_id = $1 AND created_at >= $2 GROUP BY 1, 2",
            &[&user, &from.with_time(time::Time::MIDNIGHT).assume_utc()],
        )
        .await?;
    let mut out = BTreeMap::new();
    for r in rows {
        let spent: i64 = r.try_get("spent")?;
        if spent != 0 {
            out.insert((r.try_get("app_name")?, r.try_get("day")?), spent);
        }
    }
    Ok(out)
}

/// `user`'s `spend_days` rows from `from` on (rows of 0 left out).
async fn spend_days(
    db: &tokio_postgres::Client,
    user: &str,
    from: Date,
) -> anyhow::Result<BTreeMap<(String, Date), i64>> {
    let rows = db
        .query(
            "SELECT app_name, day, spent FROM spend_days WHERE user_id = $1 AND day >= $2",
            &[&user, &from],
        )
        .await?;
    let mut out = BTreeMap::new();
    for r in rows {
        let spent: i64 = r.try_get("spent")?;
        if spent != 0 {
            out.insert((r.try_get("app_name")?, r.try_get("day")?), spent);
        }
    }
    Ok(out)
}

/// The limits `GET /limits` shows for `user`: (app, period) → spent.
async fn shown(ctx: &Ctx, user: &str) -> Result<BTreeMap<(Option<String>, String), i64>, String> {
    let path = format!("/api/unified/limits?user_id={user}");
    let Some((200, body)) = ctx.send(reqwest::Method::GET, &path, None).await else {
        return Err(format!("GET /limits of {user} answered no 200"));
    };
    let Some(limits) = body["limits"].as_array() else {
        return Err(format!("GET /limits of {user}: no `limits` in {body}"));
    };
    let mut out = BTreeMap::new();
    for l in limits {
        let (Some(period), Some(spent)) = (l["period"].as_str(), l["spent"].as_i64()) else {
            return Err(format!(
                "GET /limits of {user}: a limit without period or spent: {l}"
            ));
        };
        out.insert(
            (l["app_name"].as_str().map(str::to_owned), period.to_owned()),
            spent,
        );
    }
    Ok(out)
}

impl Limits {
    /// The checks of the module's header; `refused` counts the deductions
    /// answered `403` per user.
    pub async fn check(
        &self,
        ctx: &Ctx,
        db: &tokio_postgres::Client,
        refused: &BTreeMap<String, u64>,
    ) -> anyhow::Result<Checked> {
        let mut violations = Vec::new();
        // Per period, what breaks its limits (kept unless the period
        // changed during the run or the checks).
        let mut breaches: Vec<(Period, String)> = Vec::new();
        let mut report = String::from(
            "\n| limited user | deductions refused 403 | limit | max | spent (reservations) | spent (GET /limits) |\n\
             |---|---:|---|---:|---:|---:|\n",
        );
        let now = OffsetDateTime::now_utc();
        // The earlier of the week's and the month's first day: what any
        // limit counts (the ledger keeps spend_days from there).
        let window = Period::Week
            .start_of(now)
            .date()
            .min(Period::Month.start_of(now).date());
        for (user, limits) in &self.by_user {
            let days = reservation_days(db, user, window).await?;
            let rows = spend_days(db, user, window).await?;
            if days != rows {
                violations.push(format!(
                    "{user}: spend_days {rows:?} differ from the reservations per app and day {days:?}"
                ));
            }
            let shown = match shown(ctx, user).await {
                Ok(s) => s,
                Err(e) => {
                    violations.push(e);
                    BTreeMap::new()
                }
            };
            if shown.len() != limits.len() {
                violations.push(format!(
                    "{user}: GET /limits shows {} limits, {} were set",
                    shown.len(),
                    limits.len()
                ));
            }
            for (i, l) in limits.iter().enumerate() {
                let from = l.period.start_of(now).date();
                let name = format!(
                    "{} per {}",
                    l.app.as_deref().unwrap_or("all apps"),
                    l.period.as_str()
                );
                let spent: i64 = days
                    .iter()
                    .filter(|((app, day), _)| {
                        *day >= from && l.app.as_ref().is_none_or(|a| a == app)
                    })
                    .map(|(_, n)| n)
                    .sum();
                let via_api = shown
                    .get(&(l.app.clone(), l.period.as_str().to_owned()))
                    .copied();
                let refusals = if i == 0 {
                    refused.get(user).copied().unwrap_or(0).to_string()
                } else {
                    String::new()
                };
                report.push_str(&format!(
                    "| {user} | {refusals} | {name} | {} | {spent} | {} |\n",
                    l.max_credits,
                    via_api.map_or("missing".into(), |v| v.to_string()),
                ));
                if spent > l.max_credits {
                    breaches.push((
                        l.period,
                        format!(
                            "{user}: {spent} spent in the current period past its {name} limit of {}",
                            l.max_credits
                        ),
                    ));
                }
                if via_api != Some(spent) {
                    breaches.push((
                        l.period,
                        format!(
                            "{user}: GET /limits shows {via_api:?} spent against {name}, the reservations {spent}"
                        ),
                    ));
                }
            }
        }
        // A period that started after the limits were set, or during the
        // checks, is not the same at both ends: its limits are not judged.
        let after = OffsetDateTime::now_utc();
        for period in [Period::Day, Period::Week, Period::Month] {
            let start = period.start_of(now);
            if period.start_of(self.set_at) != start || period.start_of(after) != start {
                report.push_str(&format!(
                    "\nThe run crossed the start of a {period} (UTC): the {period} limits are not checked.\n",
                    period = period.as_str()
                ));
                breaches.retain(|(p, _)| *p != period);
            }
        }
        violations.extend(breaches.into_iter().map(|(_, v)| v));
        Ok(Checked { violations, report })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quarter_of_the_chaos_users_are_limited() {
        let limited: Vec<bool> = (0..8).map(|n| is_limited(&format!("chaos_{n}"))).collect();
        assert_eq!(
            limited,
            [true, false, false, false, true, false, false, false]
        );
        assert!(!is_limited("bench_0"));
        assert!(!is_limited("chaos_x"));
    }

    #[test]
    fn a_refusal_is_legitimate_only_for_a_limited_user_past_the_limit() {
        let answer = |spent: i64| {
            json!({"code": "spend_limit_exceeded", "limit": 40, "spent": spent,
                   "period": "day", "resets_at": "2026-12-08T00:00:00.000Z"})
        };
        assert!(judge_refusal("chaos_0", 3, &answer(38)).is_ok());
        assert!(judge_refusal("chaos_0", 2, &answer(38)).is_err());
        assert!(judge_refusal("chaos_1", 3, &answer(38)).is_err());
        let other = json!({"code": "forbidden"});
        assert!(judge_refusal("chaos_0", 3, &other).is_err());
    }
}
