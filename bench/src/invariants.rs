//! The checks after a chaos run: the pipeline drains, `penora-ops
//! reconcile` and `audit verify` pass, and the database agrees with the
//! clients' own record (balances, every reservation's end state, charged
//! once, refunded exactly what the client asked, nothing charged for a 402
//! or a 403 `spend_limit_exceeded`,
//! every event processed once, every accepted save stored, nothing
//! dead-lettered), and the lots kept their rules (nothing drawn from a lot
//! at or after its expiry, every lot past its expiry emptied by its `expire`
//! entry, no grant made for a request refused as too late).

use crate::chaos::{Ctx, FollowUp, SEED_CREDITS};

pub fn run_ops(ctx: &Ctx, args: &[&str]) -> bool {
    eprintln!("chaos: penora-ops {}", args.join(" "));
    std::process::Command::new(&ctx.args.ops_bin)
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

/// `sql`'s count, with `keys` as `$1`.
pub async fn count(db: &tokio_postgres::Client, sql: &str, keys: &[String]) -> anyhow::Result<i64> {
    Ok(db.query_one(sql, &[&keys]).await?.get(0))
}

/// Every check after the run; returns the violations.
pub async fn check(ctx: &Ctx) -> anyhow::Result<Vec<String>> {
    let mut violations = Vec::new();
    if !run_ops(ctx, &["wait-idle", "--timeout-secs", "120"]) {
        violations.push("the pipeline did not drain (wait-idle)".into());
    }
    if !run_ops(ctx, &["reconcile"]) {
        violations.push("penora-ops reconcile found a violation".into());
    }
    if !run_ops(ctx, &["audit", "verify"]) {
        violations.push("penora-ops audit verify found a violation".into());
    }
    let (db, connection) =
        tokio_postgres::connect(&ctx.args.services.database_url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    // A copy: the checks below await, and the record's lock is synchronous.
    let record = ctx
        .record
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    violations.extend(
        record
            .unexpected
            .iter()
            .map(|u| format!("unexpected answer: {u}")),
    );

    // Lots past their expiry: the timer empties them within its interval.
    let settle_interval = ctx.args.services.settings()?.worker.settle_interval;
    let deadline =
        std::time::Instant::now() + settle_interval * 2 + std::time::Duration::from_secs(10);
    let still_due = loop {
        let due: i64 = db
            .query_one(
                "SELECT count(*) FROM credit_lots WHERE status = 'active' AND remaining > 0 AND expires_at <= now()",
                &[],
            )
            .await?
            .get(0);
        if due == 0 || std::time::Instant::now() > deadline {
            break due;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    if still_due != 0 {
        violations.push(format!(
            "{still_due} lots past their expiry still hold credits after {} s",
            (settle_interval * 2).as_secs() + 10
        ));
    }
    let drawn_late: i64 = db
        .query_one(
            "SELECT count(*) FROM lot_movements m JOIN credit_lots l ON l.user_id = m.user_id AND l.lot_id = m.lot_id \
             WHERE m.kind = 'deduct' AND l.expires_at IS NOT NULL AND m.created_at >= l.expires_at",
            &[],
        )
        .await?
        .get(0);
    if drawn_late != 0 {
        violations.push(format!(
            "{drawn_late} deductions drew from a lot at or after its expiry"
        ));
    }
    let expiry = db
        .query_one(
            "SELECT (SELECT count(*) FROM credit_lots WHERE expires_at <= now()) AS lots, \
                    (SELECT count(*) FROM credit_lots WHERE status = 'expired') AS emptied, \
                    (SELECT coalesce(-sum(amount), 0)::bigint FROM ledger_entries \
                      WHERE kind = 'expire' AND project_code IS NULL) AS expired, \
                    (SELECT coalesce(-sum(amount), 0)::bigint FROM ledger_entries \
                      WHERE kind = 'expire' AND project_code IS NOT NULL) AS refunded_expired",
            &[],
        )
        .await?;
    eprintln!(
        "chaos: {} lots past their expiry ({} emptied by an expire entry): {} credits expired, \
         and {} credits refunded into expired lots expired at once",
        expiry.get::<_, i64>("lots"),
        expiry.get::<_, i64>("emptied"),
        expiry.get::<_, i64>("expired"),
        expiry.get::<_, i64>("refunded_expired")
    );
    let late_granted = count(
        &db,
        "SELECT count(*) FROM ledger_entries WHERE kind = 'grant' AND reference = ANY($1)",
        &record.late_grants,
    )
    .await?;
    if late_granted != 0 {
        violations.push(format!(
            "{late_granted} grants refused as too late were made anyway"
        ));
    }

    // Balances: the database's, the ledger's and the client's agree (the
    // client cannot know what expired: the ledger's expire and void entries
    // say, and the lots checks above and reconcile check those).
    for row in db
        .query(
            "SELECT a.user_id, a.balance, coalesce(sum(l.amount), 0)::bigint AS ledger_sum, \
                    coalesce(sum(l.amount) FILTER (WHERE l.kind IN ('expire', 'void')), 0)::bigint AS expired, \
                    coalesce(sum(l.amount) FILTER (WHERE l.kind = 'grant' AND l.reference LIKE 'allowance:%'), 0)::bigint AS allowances \
             FROM accounts a \
             LEFT JOIN ledger_entries l ON l.user_id = a.user_id \
             WHERE a.user_id LIKE 'chaos\\_%' GROUP BY a.user_id, a.balance",
            &[],
        )
        .await?
    {
        let (user, balance, ledger, expired, allowances): (String, i64, i64, i64, i64) = (
            row.get("user_id"),
            row.get("balance"),
            row.get("ledger_sum"),
            row.get("expired"),
            row.get("allowances"),
        );
        // What allowances granted the client did not ask for
        // (`crate::chaos_allowances` checks each grant).
        let client = SEED_CREDITS + record.expected.get(&user).copied().unwrap_or(0);
        if balance != ledger || balance != client + expired + allowances {
            violations.push(format!(
                "{user}: balance {balance}, ledger sum {ledger}, client's record {client}, expired {expired}, granted by allowances {allowances}"
            ));
        }
    }
    // Every reservation ended as the client left it, charged once, refunded
    // at most once (this client sends one refund, whole or part, per
    // reservation; the service takes several parts).
    let codes: Vec<String> = record.reservations.keys().cloned().collect();
    let rows = db
        .query(
            "SELECT r.project_code, r.user_id, r.state, r.refunded_amount, \
                    (SELECT count(*) FROM ledger_entries l WHERE l.user_id = r.user_id AND l.project_code = r.project_code AND l.kind = 'deduct') AS deducts, \
                    (SELECT count(*) FROM ledger_entries l WHERE l.user_id = r.user_id AND l.project_code = r.project_code AND l.kind = 'refund') AS refunds \
             FROM reservations r WHERE r.app_name = 'imagegene' AND r.project_code = ANY($1)",
            &[&codes],
        )
        .await?;
    if rows.len() != codes.len() {
        violations.push(format!(
            "{} reservations the client was charged for, {} found",
            codes.len(),
            rows.len()
        ));
    }
    for row in rows {
        let (code, user, state, refunded, deducts, refunds): (
            String,
            String,
            String,
            i64,
            i64,
            i64,
        ) = (
            row.get("project_code"),
            row.get("user_id"),
            row.get("state"),
            row.get("refunded_amount"),
            row.get("deducts"),
            row.get("refunds"),
        );
        let Some((owner, follow_up, amount)) = record.reservations.get(&code) else {
            continue;
        };
        if *owner != user
            || state != follow_up.expected_state()
            || refunded != follow_up.refunded(*amount)
            || deducts != 1
            || refunds > 1
        {
            violations.push(format!(
                "{code}: {state}, {refunded} refunded (client: {follow_up:?} of {amount}), {deducts} deductions, {refunds} refunds"
            ));
        }
    }
    let charged_anyway = count(
        &db,
        "SELECT count(*) FROM reservations WHERE app_name = 'imagegene' AND project_code = ANY($1)",
        &record.refused,
    )
    .await?;
    if charged_anyway != 0 {
        violations.push(format!(
            "{charged_anyway} deductions answered 402 or 403 left a reservation"
        ));
    }
    // Every event processed exactly once.
    let processed = count(
        &db,
        "SELECT count(*) FROM processed_events WHERE event_id = ANY($1)",
        &record.events,
    )
    .await?;
    if processed != record.events.len() as i64 {
        violations.push(format!(
            "{} events published, {processed} processed",
            record.events.len()
        ));
    }
    // Every accepted save stored.
    let saved_codes: Vec<String> = record
        .reservations
        .iter()
        .filter(|(_, (_, f, _))| *f == FollowUp::Saved)
        .map(|(c, _)| c.clone())
        .collect();
    let saved = count(
        &db,
        "SELECT count(*) FROM projects WHERE project_code = ANY($1) AND status = 'saved'",
        &saved_codes,
    )
    .await?;
    if saved != saved_codes.len() as i64 {
        violations.push(format!(
            "{} saves accepted, {saved} stored",
            saved_codes.len()
        ));
    }
    // No message lost: the work queues are empty (wait-idle) and nothing was dead-lettered.
    let connection =
        penora_platform::broker::connect(&ctx.args.services.amqp_url, "penora-chaos").await?;
    let channel = connection.create_channel().await?;
    let dead: u32 = penora_platform::broker::queue_stats(&channel, &ctx.topology)
        .await?
        .iter()
        .filter(|q| q.name.ends_with(".dead"))
        .map(|q| q.messages)
        .sum();
    let _ = connection.close(200, "bye".into()).await;
    if dead != 0 {
        violations.push(format!("{dead} messages dead-lettered"));
    }
    Ok(violations)
}
