//! `penora-ops reconcile`: checks invariants 1, 2, 4 and 6 of the contract
//! over every user, straight from the tables.
//!
//! 1. no balance is negative;
//! 2. every balance equals the sum of the user's ledger, and every ledger row's
//!    `balance_after` equals the running sum up to it; with lots (§12): the
//!    balance equals the sum of the user's lots' remaining (a lot past its
//!    expiry keeps its remaining until its `expire` entry), every lot's
//!    remaining is the sum of its movements and 0 ≤ remaining ≤ granted, and
//!    every entry's lot movements sum to its amount (so each reservation's
//!    allocations sum to what it reserved);
//! 4. a reservation has exactly one deduct of its amount; its refunds sum to
//!    its `refunded_amount`, never more than it reserved (§13), and it is
//!    `refunded` exactly when they sum to all of it; a user with a spend
//!    limit (§16) has, for each app and day a limit can count now, the
//!    spending its reservations of that day still hold;
//! 6. no user's stored bytes exceed the quota, and the counter equals what the
//!    user's projects count: content (`size_bytes`) of the queued and saved
//!    ones, title and metadata (`meta_bytes`) of every one not deleted (a
//!    failed project keeps its title and metadata).

use deadpool_postgres::GenericClient;
use serde::Serialize;

use penora_store::DbError;

/// One broken invariant for one user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// The user whose data breaks it.
    pub user_id: String,
    /// The invariant's number in the contract (§7).
    pub invariant: u8,
    /// What is wrong.
    pub detail: String,
}

/// What a reconcile run found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Accounts checked.
    pub users_checked: i64,
    /// Ledger entries checked.
    pub entries_checked: i64,
    /// Reservations checked.
    pub reservations_checked: i64,
    /// Every violation, by user.
    pub violations: Vec<Violation>,
}

impl Report {
    /// The users with at least one violation, sorted, once each.
    pub fn users(&self) -> Vec<&str> {
        let mut users: Vec<&str> = self.violations.iter().map(|v| v.user_id.as_str()).collect();
        users.sort_unstable();
        users.dedup();
        users
    }
}

/// Runs every check. Read-only; runs in one repeatable-read snapshot so that
/// concurrent traffic cannot produce false alarms.
pub async fn run(client: &mut deadpool_postgres::Client, quota: i64) -> Result<Report, DbError> {
    run_with_progress(client, quota, &|_, _, _| {}).await
}

/// [`run`], calling `progress(stage, done, total)` as each check finishes.
pub async fn run_with_progress(
    client: &mut deadpool_postgres::Client,
    quota: i64,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
) -> Result<Report, DbError> {
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    // An operator's check over every row: no statement timeout. The
    // database aggregates; only violations come back.
    tx.batch_execute("SET LOCAL statement_timeout = 0").await?;
    let mut violations = Vec::new();
    let mut push = |user_id: String, invariant: u8, detail: String| {
        violations.push(Violation {
            user_id,
            invariant,
            detail,
        });
    };

    progress("negative balances", 0, 6);
    for r in tx
        .query(
            "SELECT user_id, balance FROM accounts WHERE balance < 0",
            &[],
        )
        .await?
    {
        push(
            r.get("user_id"),
            1,
            format!("balance is negative: {}", r.get::<_, i64>("balance")),
        );
    }

    progress("balances against ledger sums", 1, 6);
    for r in tx
        .query(
            "SELECT a.user_id, a.balance, coalesce(l.total, 0)::bigint AS ledger_sum \
             FROM accounts a LEFT JOIN \
               (SELECT user_id, sum(amount) AS total FROM ledger_entries GROUP BY user_id) l USING (user_id) \
             WHERE a.balance <> coalesce(l.total, 0)",
            &[],
        )
        .await?
    {
        push(
            r.get("user_id"),
            2,
            format!(
                "balance {} differs from the ledger sum {}",
                r.get::<_, i64>("balance"),
                r.get::<_, i64>("ledger_sum")
            ),
        );
    }
    progress("running balances", 2, 6);
    for r in tx
        .query(
            "SELECT user_id, min(id) AS first, count(*) AS wrong FROM ( \
               SELECT user_id, id, balance_after, \
                      sum(amount) OVER (PARTITION BY user_id ORDER BY id) AS running \
               FROM ledger_entries) x \
             WHERE balance_after <> running GROUP BY user_id",
            &[],
        )
        .await?
    {
        push(
            r.get("user_id"),
            2,
            format!(
                "{} ledger entries have a balance_after that is not the running sum (first: entry {})",
                r.get::<_, i64>("wrong"),
                r.get::<_, i64>("first")
            ),
        );
    }

    progress("lots", 3, 6);
    for (sql, what) in [
        (
            "SELECT a.user_id, format('balance %s differs from the lots'' remaining %s', a.balance, \
                    coalesce(l.total, 0)) AS detail \
             FROM accounts a LEFT JOIN \
               (SELECT user_id, sum(remaining) AS total FROM credit_lots GROUP BY user_id) l USING (user_id) \
             WHERE a.balance <> coalesce(l.total, 0)",
            "balances against lots",
        ),
        (
            "SELECT l.user_id, format('lot %s: remaining %s of %s granted, its movements sum to %s', \
                    l.lot_id, l.remaining, l.granted, coalesce(m.total, 0)) AS detail \
             FROM credit_lots l LEFT JOIN \
               (SELECT user_id, lot_id, sum(amount) AS total FROM lot_movements GROUP BY user_id, lot_id) m \
               ON m.user_id = l.user_id AND m.lot_id = l.lot_id \
             WHERE l.remaining <> coalesce(m.total, 0) OR l.remaining < 0 OR l.remaining > l.granted",
            "lots against movements",
        ),
        (
            "SELECT e.user_id, format('%s entry %s of %s: its lot movements sum to %s', \
                    e.kind, e.id, e.amount, m.total) AS detail \
             FROM ledger_entries e JOIN \
               (SELECT user_id, entry_id, sum(amount) AS total FROM lot_movements \
                 WHERE entry_id IS NOT NULL GROUP BY user_id, entry_id) m \
               ON m.user_id = e.user_id AND m.entry_id = e.id \
             WHERE m.total <> e.amount",
            "movements against entries",
        ),
        (
            "SELECT e.user_id, format('%s entry %s of %s has no lot movements', e.kind, e.id, e.amount) AS detail \
             FROM ledger_entries e \
             WHERE e.kind IN ('deduct', 'expire', 'void') AND NOT EXISTS ( \
               SELECT 1 FROM lot_movements m WHERE m.user_id = e.user_id AND m.entry_id = e.id)",
            "entries without movements",
        ),
    ] {
        tracing::debug!(check = what, "reconcile");
        for r in tx.query(sql, &[]).await? {
            push(r.get("user_id"), 2, r.get("detail"));
        }
    }

    progress("reservations", 3, 6);
    for r in tx
        .query(
            "SELECT r.user_id, r.app_name, r.project_code, r.amount, r.state, r.refunded_amount, \
                    count(*) FILTER (WHERE l.kind = 'deduct') AS deducts, \
                    coalesce(sum(-l.amount) FILTER (WHERE l.kind = 'deduct'), 0)::bigint AS deducted, \
                    count(*) FILTER (WHERE l.kind = 'refund') AS refunds, \
                    coalesce(sum(l.amount) FILTER (WHERE l.kind = 'refund'), 0)::bigint AS refunded \
             FROM reservations r \
             LEFT JOIN ledger_entries l \
               ON l.user_id = r.user_id AND l.app_name = r.app_name AND l.project_code = r.project_code \
             GROUP BY r.user_id, r.app_name, r.project_code, r.amount, r.state, r.refunded_amount \
             HAVING count(*) FILTER (WHERE l.kind = 'deduct') <> 1 \
                 OR coalesce(sum(-l.amount) FILTER (WHERE l.kind = 'deduct'), 0) <> r.amount \
                 OR coalesce(sum(l.amount) FILTER (WHERE l.kind = 'refund'), 0) <> r.refunded_amount \
                 OR r.refunded_amount > r.amount \
                 OR (r.state = 'refunded') <> (r.refunded_amount = r.amount)",
            &[],
        )
        .await?
    {
        push(
            r.get("user_id"),
            4,
            format!(
                "reservation ({}, {}) of {} credits in state {} (refunded_amount {}): {} deducts of {} in all, {} refunds of {} in all",
                r.get::<_, String>("app_name"),
                r.get::<_, String>("project_code"),
                r.get::<_, i64>("amount"),
                r.get::<_, String>("state"),
                r.get::<_, i64>("refunded_amount"),
                r.get::<_, i64>("deducts"),
                r.get::<_, i64>("deducted"),
                r.get::<_, i64>("refunds"),
                r.get::<_, i64>("refunded"),
            ),
        );
    }
    progress("orphan entries", 4, 6);
    for r in tx
        .query(
            "SELECT l.user_id, l.kind, l.app_name, l.project_code FROM ledger_entries l \
             WHERE l.kind <> 'grant' AND l.project_code IS NOT NULL AND NOT EXISTS ( \
               SELECT 1 FROM reservations r WHERE r.user_id = l.user_id \
                 AND r.app_name = l.app_name AND r.project_code = l.project_code)",
            &[],
        )
        .await?
    {
        push(
            r.get("user_id"),
            4,
            format!(
                "{} entry for ({}, {}) has no reservation of this user",
                r.get::<_, String>("kind"),
                r.get::<_, String>("app_name"),
                r.get::<_, Option<String>>("project_code")
                    .unwrap_or_default()
            ),
        );
    }

    progress("spending", 5, 6);
    // Spend limits (§16): a limited user's spending per app and day, over
    // the days a limit can count now, is what the reservations made that
    // day still hold.
    for r in tx
        .query(
            "WITH since AS (SELECT least(date_trunc('week', now() AT TIME ZONE 'UTC'), \
                                         date_trunc('month', now() AT TIME ZONE 'UTC'))::date AS d), \
             held AS (SELECT user_id, app_name, (created_at AT TIME ZONE 'UTC')::date AS day, \
                             sum(amount - refunded_amount)::bigint AS held \
                        FROM reservations \
                       WHERE user_id IN (SELECT user_id FROM spend_limits) \
                         AND created_at >= (SELECT d FROM since) AT TIME ZONE 'UTC' \
                       GROUP BY 1, 2, 3), \
             counted AS (SELECT user_id, app_name, day, spent FROM spend_days \
                          WHERE user_id IN (SELECT user_id FROM spend_limits) \
                            AND day >= (SELECT d FROM since)) \
             SELECT user_id, app_name, day::text AS day, \
                    coalesce(c.spent, 0) AS spent, coalesce(h.held, 0) AS held \
               FROM held h FULL JOIN counted c USING (user_id, app_name, day) \
              WHERE coalesce(c.spent, 0) <> coalesce(h.held, 0)",
            &[],
        )
        .await?
    {
        push(
            r.get("user_id"),
            4,
            format!(
                "spending of {} on {} is counted {}, its reservations hold {}",
                r.get::<_, String>("app_name"),
                r.get::<_, String>("day"),
                r.get::<_, i64>("spent"),
                r.get::<_, i64>("held")
            ),
        );
    }

    progress("storage", 5, 6);
    for r in tx
        .query(
            "SELECT a.user_id, a.storage_used_bytes, coalesce(p.total, 0)::bigint AS projects_bytes \
             FROM accounts a LEFT JOIN \
               (SELECT user_id, \
                       sum(CASE WHEN status IN ('queued', 'saved') THEN size_bytes ELSE 0 END + meta_bytes) AS total \
                  FROM projects WHERE status <> 'deleted' GROUP BY user_id) p USING (user_id) \
             WHERE a.storage_used_bytes > $1 OR a.storage_used_bytes <> coalesce(p.total, 0)",
            &[&quota],
        )
        .await?
    {
        let (used, total): (i64, i64) = (r.get("storage_used_bytes"), r.get("projects_bytes"));
        let detail = if used > quota {
            format!("stores {used} bytes, over the quota of {quota}")
        } else {
            format!("storage counter {used} differs from the projects' {total} bytes")
        };
        push(r.get("user_id"), 6, detail);
    }

    progress("done", 6, 6);
    let counts = tx
        .query_one(
            "SELECT (SELECT count(*) FROM accounts) AS users, \
                    (SELECT count(*) FROM ledger_entries) AS entries, \
                    (SELECT count(*) FROM reservations) AS reservations",
            &[],
        )
        .await?;
    tx.commit().await?;
    violations.sort_by(|a, b| (&a.user_id, a.invariant).cmp(&(&b.user_id, b.invariant)));
    Ok(Report {
        users_checked: counts.get("users"),
        entries_checked: counts.get("entries"),
        reservations_checked: counts.get("reservations"),
        violations,
    })
}
