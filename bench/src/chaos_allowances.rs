//! Recurring allowances under faults (issue 27): a fifth of the chaos users
//! get two daily allowances before the traffic, one whose first period
//! starts at once (granted by its `PUT`) and one whose first period starts
//! [`START_DELAY`] later, so the worker's timer grants it while the faults
//! run (the worker killed, paused, the broker's connections closed, the
//! database away).
//!
//! Rules:
//! * the users are `chaos_<n>` with `n % 5 == 1` ([`has_allowance`]);
//! * after the run (after wait-idle), each allowance's first period is
//!   granted exactly once (one `grant` entry under the reference
//!   `allowance:<allowance_id>:<period start>`, of [`AMOUNT`] credits, its
//!   lot expiring at the next UTC midnight), the delayed one included;
//! * the balances check of `crate::invariants` counts these grants beside
//!   the client's own record (the client did not ask for them);
//! * a run across UTC midnight is not judged (a second period would be
//!   due): the report says so.

use penora_domain::period::Period;
use serde_json::json;
use time::OffsetDateTime;

use crate::chaos::Ctx;

/// Credits each period.
pub const AMOUNT: i64 = 25;

/// How long after the `PUT` the delayed allowance's first period starts.
pub const START_DELAY: time::Duration = time::Duration::seconds(15);

/// The allowance granted by its `PUT`, and the one the timer grants.
const IDS: [&str; 2] = ["chaos-now", "chaos-later"];

/// Whether `user` (`chaos_<n>`) has allowances.
pub fn has_allowance(user: &str) -> bool {
    user.strip_prefix("chaos_")
        .and_then(|n| n.parse::<u64>().ok())
        .is_some_and(|n| n % 5 == 1)
}

/// The allowances set before the traffic.
pub struct Allowances {
    users: Vec<String>,
    set_at: OffsetDateTime,
}

/// What the checks found: the violations, and the report's lines.
pub struct Checked {
    pub violations: Vec<String>,
    pub report: String,
}

/// Sets both allowances of every user [`has_allowance`] names, through the
/// API (before the faults: each must be set).
pub async fn set(ctx: &Ctx) -> anyhow::Result<Allowances> {
    let set_at = OffsetDateTime::now_utc();
    let later = penora_domain::timefmt::rfc3339_millis(set_at + START_DELAY);
    let users: Vec<String> = (0..ctx.args.users)
        .map(|u| format!("chaos_{u}"))
        .filter(|u| has_allowance(u))
        .collect();
    for user in &users {
        for body in [
            json!({"user_id": user, "allowance_id": IDS[0], "amount": AMOUNT, "period": "day", "max_rollover": 10}),
            json!({"user_id": user, "allowance_id": IDS[1], "amount": AMOUNT, "period": "day", "starts_at": later}),
        ] {
            match ctx
                .send(reqwest::Method::PUT, "/api/unified/allowances", Some(&body))
                .await
            {
                Some((200, _)) => {}
                other => anyhow::bail!("setting an allowance of {user} ({body}): {other:?}"),
            }
        }
    }
    eprintln!(
        "chaos: daily allowances of {AMOUNT} on {} of {} users (one granted at once, one whose first period starts {} s later, for the timer)",
        users.len(),
        ctx.args.users,
        START_DELAY.whole_seconds()
    );
    Ok(Allowances { users, set_at })
}

impl Allowances {
    /// The checks of the module's header, waiting up to a minute for the
    /// timer's grants (it runs every `SETTLE_INTERVAL_SECS`).
    pub async fn check(&self, db: &tokio_postgres::Client) -> anyhow::Result<Checked> {
        let now = OffsetDateTime::now_utc();
        if Period::Day.start_of(now) != Period::Day.start_of(self.set_at) {
            return Ok(Checked {
                violations: Vec::new(),
                report: "\nAllowances not judged: the run crossed UTC midnight (a second period was due).\n".into(),
            });
        }
        let midnight = Period::Day.next_start(now);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let mut violations = Vec::new();
            let mut granted = 0;
            for user in &self.users {
                for id in IDS {
                    let rows = db
                        .query(
                            "SELECT e.amount, l.expires_at FROM ledger_entries e \
                             LEFT JOIN credit_lots l ON l.user_id = e.user_id AND l.reference = e.reference \
                             WHERE e.user_id = $1 AND e.kind = 'grant' AND e.reference LIKE $2",
                            &[user, &format!("allowance:{id}:%")],
                        )
                        .await?;
                    if rows.len() != 1 {
                        violations.push(format!(
                            "{user}: allowance {id} granted {} times in its first period",
                            rows.len()
                        ));
                        continue;
                    }
                    let amount: i64 = rows[0].try_get(0)?;
                    let expires: Option<OffsetDateTime> = rows[0].try_get(1)?;
                    if amount != AMOUNT || expires != Some(midnight) {
                        violations.push(format!(
                            "{user}: allowance {id} granted {amount} credits expiring {expires:?} (expected {AMOUNT} expiring {midnight})"
                        ));
                        continue;
                    }
                    granted += 1;
                }
            }
            if violations.is_empty() || std::time::Instant::now() > deadline {
                let report = format!(
                    "\n| allowances | count |\n|---|---:|\n| users with two daily allowances | {} |\n| first periods granted once, as due (the delayed ones by the timer under faults) | {granted} |\n",
                    self.users.len()
                );
                return Ok(Checked { violations, report });
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }
}
