//! Group commit changes how many commits the work takes, never an answer.
//!
//! The ledger has one implementation of each movement, written for a batch.
//! These tests run the same requests through it in batches on one database
//! and one at a time (batches of one) on a twin database; every answer,
//! balance, ledger row and audit job must match, and both databases must
//! reconcile. The batches are generated (a fixed-seed
//! generator, so a failure replays) to mix fresh keys, keys repeated inside
//! the batch, keys used before with the same or other parameters, users
//! without an account and balances that run out half-way.

use std::time::Duration;

use deadpool_postgres::Pool;
use penora_domain::{AppName, Credits, ProjectCode, UserId};
use penora_ledger as ledger;
use penora_ledger::audit;
use penora_ledger::reconcile;
use penora_ledger::{Deduct, Grant, LedgerError, LotCategory, Queued, QueuedRefund, Refund};
use penora_store as db;
use penora_testing::TestDb;

/// xorshift64*: enough to vary batches, and the same on every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

async fn twin() -> (TestDb, Pool, TestDb, Pool) {
    let a = TestDb::new().await;
    let b = TestDb::new().await;
    let pa = db::pool_with(&a.url, 4, 5000).expect("pool");
    let pb = db::pool_with(&b.url, 4, 5000).expect("pool");
    (a, pa, b, pb)
}

async fn grant(pool: &Pool, user: &str, amount: i64) {
    let mut c = pool.get().await.expect("client");
    ledger::grant(
        &mut c,
        &Grant {
            user_id: UserId::parse(user).expect("user"),
            amount: Credits::new("amount", amount, i64::MAX).expect("amount"),
            app_name: AppName::parse("app_name", "penora").expect("app"),
            reason: "test".into(),
            reference: format!("seed-{user}"),
            category: LotCategory::Paid,
            priority: 50,
            expires_at: None,
            acted_by: None,
        },
        None,
    )
    .await
    .expect("grant");
}

fn deduct(user: &str, amount: i64, app: &str, code: &str) -> Deduct {
    Deduct {
        user_id: UserId::parse(user).expect("user"),
        amount: Credits::new("amount", amount, i64::MAX).expect("amount"),
        app_name: AppName::parse("app_name", app).expect("app"),
        description: Some(format!("{amount} for {code}")),
        project_code: ProjectCode::parse(code).expect("code"),
        refund_window: Duration::from_secs(3600),
    }
}

/// What a client sees of a deduct answer (times and ids differ between twins).
fn seen(answer: &Result<ledger::Outcome<ledger::DeductReceipt>, LedgerError>) -> String {
    match answer {
        Ok(o) => format!(
            "ok user={} deducted={} balance={} app={} code={} status={:?} replayed={}",
            o.value.user_id,
            o.value.credits_deducted,
            o.value.new_balance,
            o.value.app_name,
            o.value.project_code,
            o.value.reservation_status,
            o.replayed
        ),
        Err(e) => format!("err {e}"),
    }
}

/// The durable state a client or an auditor could look at, minus ids and times.
async fn state(pool: &Pool) -> Vec<String> {
    let c = pool.get().await.expect("client");
    let mut out = Vec::new();
    for sql in [
        "SELECT user_id || ' ' || balance FROM accounts ORDER BY user_id",
        "SELECT user_id || ' ' || kind || ' ' || amount || ' ' || balance_after || ' ' || app_name || ' ' \
           || coalesce(project_code, '-') || ' ' || coalesce(description, '-') \
         FROM ledger_entries ORDER BY user_id, id",
        "SELECT app_name || ' ' || project_code || ' ' || user_id || ' ' || amount || ' ' || state || ' ' \
           || balance_after_deduct || ' ' || coalesce(balance_after_refund::text, '-') || ' ' \
           || coalesce(refund_reason, '-') FROM reservations ORDER BY app_name, project_code, user_id",
        // Every ledger row is named by exactly one commit's audit job, and
        // has its place in its user's chain.
        "SELECT e.user_id || ' ' || e.kind || ' ' || e.chain_seq FROM ledger_entries e \
         JOIN (SELECT c->>'user_id' AS user_id, jsonb_array_elements_text(c->'entry_ids')::bigint AS id \
               FROM outbox o, jsonb_array_elements(o.payload->'chains') c \
               WHERE o.routing_key = 'penora.ledger-audit') j ON j.user_id = e.user_id AND j.id = e.id \
         ORDER BY e.user_id, e.id",
        "SELECT count(*)::text FROM outbox WHERE routing_key <> 'penora.ledger-audit'",
        "SELECT user_id || ' ' || event_id || ' ' || outcome FROM processed_events ORDER BY 1",
    ] {
        for row in c.query(sql, &[]).await.expect(sql) {
            out.push(row.get::<_, String>(0));
        }
        out.push("--".into());
    }
    out
}

async fn assert_reconciled(pool: &Pool) {
    let mut c = pool.get().await.expect("client");
    let report = reconcile::run(&mut c, 1 << 40).await.expect("reconcile");
    assert!(report.violations.is_empty(), "{:?}", report.violations);
}

/// Runs `requests` as the API does under load: in batches, each ending at a
/// repeated key.
async fn through_batch(pool: &Pool, requests: &[Deduct]) -> Vec<String> {
    let queued: Vec<Queued> = requests
        .iter()
        .map(|d| Queued {
            deduct: d.clone(),
            correlation_id: Some("req".into()),
        })
        .collect();
    let mut c = pool.get().await.expect("client");
    let answers = ledger::deduct_all(&mut c, &queued, ledger::OnBusy::Wait).await;
    assert_eq!(answers.len(), requests.len(), "one answer per request");
    answers.iter().map(seen).collect()
}

async fn one_by_one(pool: &Pool, requests: &[Deduct]) -> Vec<String> {
    let mut c = pool.get().await.expect("client");
    let mut out = Vec::new();
    for d in requests {
        out.push(seen(&ledger::deduct(&mut c, d, Some("req")).await));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_deductions_answers_and_writes_exactly_what_one_by_one_would() {
    let (_a, batched, _b, single) = twin().await;
    for pool in [&batched, &single] {
        grant(pool, "alice", 100).await;
        grant(pool, "bob", 7).await;
        // Keys used before the batch: one to replay, one of another user
        // (keys are per user, §15: alice's use of it is her own).
        let mut c = pool.get().await.expect("client");
        ledger::deduct(&mut c, &deduct("alice", 5, "imagegene", "old"), None)
            .await
            .expect("seed deduct");
        ledger::deduct(&mut c, &deduct("bob", 1, "imagegene", "bobs"), None)
            .await
            .expect("seed deduct");
    }
    let requests = vec![
        deduct("alice", 30, "imagegene", "k1"),
        deduct("alice", 30, "imagegene", "k2"),
        deduct("alice", 30, "imagegene", "k3"),
        deduct("alice", 30, "imagegene", "k4"), // 5 left: insufficient
        deduct("alice", 5, "imagegene", "old"), // replay of the earlier deduct
        deduct("alice", 6, "imagegene", "old"), // same key, other amount: conflict
        deduct("alice", 1, "imagegene", "bobs"), // another user's key: alice's own
        deduct("carol", 1, "imagegene", "k5"),  // no account
        deduct("bob", 6, "imagegene", "k6"),    // bob to 0
        deduct("bob", 1, "imagegene", "k7"),    // insufficient
        deduct("alice", 30, "imagegene", "k1"), // repeat inside the batch: replay
        deduct("alice", 4, "penora", "k1"),     // same code, other app: its own key
        deduct("alice", 1, "imagegene", "k8"),  // insufficient: 0 left
    ];
    let got = through_batch(&batched, &requests).await;
    let want = one_by_one(&single, &requests).await;
    assert_eq!(got, want);
    // Spot-check the story itself, not only the agreement.
    assert!(
        got[3].contains("insufficient credits: balance 5"),
        "{}",
        got[3]
    );
    assert!(got[4].contains("replayed=true"), "{}", got[4]);
    assert!(got[5].starts_with("err project_code"), "{}", got[5]);
    assert!(got[6].contains("balance=4"), "{}", got[6]);
    assert_eq!(got[7], "err user not found");
    assert!(got[10].contains("balance=65") && got[10].contains("replayed=true"));
    assert_eq!(state(&batched).await, state(&single).await);
    assert_reconciled(&batched).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_deduction_batches_agree_with_one_by_one_on_every_answer_and_row() {
    let (_a, batched, _b, single) = twin().await;
    let users = ["u1", "u2", "u3", "ghost"];
    for pool in [&batched, &single] {
        for (n, user) in users[..3].iter().enumerate() {
            grant(pool, user, 40 * (n as i64 + 1)).await;
        }
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..25 {
        let size = 1 + rng.below(40) as usize;
        let requests: Vec<Deduct> = (0..size)
            .map(|_| {
                let user = users[rng.below(4) as usize];
                let amount = 1 + rng.below(12) as i64;
                // A small key space: repeats within and across batches are common.
                let code = format!("c{}", rng.below(60));
                let app = if rng.below(8) == 0 {
                    "penora"
                } else {
                    "imagegene"
                };
                deduct(user, amount, app, &code)
            })
            .collect();
        let got = through_batch(&batched, &requests).await;
        let want = one_by_one(&single, &requests).await;
        assert_eq!(got, want, "round {round}");
    }
    assert_eq!(state(&batched).await, state(&single).await);
    assert_reconciled(&batched).await;
    assert_reconciled(&single).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_refunds_matches_one_by_one_and_records_its_events() {
    let (_a, batched, _b, single) = twin().await;
    for pool in [&batched, &single] {
        grant(pool, "alice", 100).await;
        grant(pool, "bob", 100).await;
        let mut c = pool.get().await.expect("client");
        for (user, code) in [
            ("alice", "r1"),
            ("alice", "r2"),
            ("alice", "r3"),
            ("bob", "r4"),
            ("bob", "r5"),
        ] {
            ledger::deduct(&mut c, &deduct(user, 10, "imagegene", code), None)
                .await
                .expect("seed");
        }
        // r3 is settled, r5 refunded already.
        ledger::settle(
            &mut c,
            &UserId::parse("alice").expect("user"),
            &AppName::parse("app_name", "imagegene").expect("app"),
            &ProjectCode::parse("r3").expect("code"),
            (ledger::SettledBy::Final, "done"),
            None,
            None,
        )
        .await
        .expect("settle");
        ledger::refund(&mut c, &refund("bob", "r5"), None)
            .await
            .expect("refund");
    }
    let events = [
        ("alice", "r1", "e1"),
        ("alice", "r2", "e2"),
        ("alice", "r1", "e1"), // the same event again
        ("alice", "r2", "e9"), // another event for a refunded reservation
        ("alice", "r3", "e3"), // settled
        ("bob", "r4", "e4"),
        ("bob", "r5", "e5"),   // refunded before
        ("alice", "r4", "e6"), // bob's reservation
        ("alice", "nope", "e7"),
    ];
    let queued: Vec<QueuedRefund> = events
        .iter()
        .map(|(user, code, event)| QueuedRefund {
            refund: refund(user, code),
            event_id: Some((*event).into()),
            correlation_id: None,
            event_time: None,
        })
        .collect();
    let mut c = batched.get().await.expect("client");
    let got: Vec<String> = ledger::refund_all(&mut c, &queued, ledger::OnBusy::Wait)
        .await
        .into_iter()
        .map(refund_seen)
        .collect();
    let mut s = single.get().await.expect("client");
    let mut want = Vec::new();
    for q in &queued {
        want.push(refund_seen(ledger::refund_one(&mut s, q.clone()).await));
    }
    assert_eq!(got, want);
    // Spot-check the story itself, not only the agreement.
    assert_eq!(got[0], "ok 10 80 r1");
    assert_eq!(got[2], "err duplicate event (first outcome: refunded)");
    assert_eq!(got[3], "replay 10 r2");
    assert!(got[4].contains("already settled"), "{}", got[4]);
    assert_eq!(got[5], "ok 10 100 r4");
    assert_eq!(got[6], "replay 10 r5");
    assert!(got[7].starts_with("err no reservation"), "{}", got[7]);
    // Every event that refunded or replayed is recorded with what it did.
    assert_eq!(state(&batched).await, state(&single).await);
    let recorded: Vec<String> = c
        .query(
            "SELECT event_id || ' ' || outcome FROM processed_events ORDER BY event_id",
            &[],
        )
        .await
        .expect("events")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        recorded,
        [
            "e1 refunded",
            "e2 refunded",
            "e4 refunded",
            "e5 already refunded",
            "e9 already refunded"
        ]
    );
    assert_reconciled(&batched).await;
}

fn refund(user: &str, code: &str) -> Refund {
    Refund {
        user_id: UserId::parse(user).expect("user"),
        project_code: ProjectCode::parse(code).expect("code"),
        app_name: Some(AppName::parse("app_name", "imagegene").expect("app")),
        reason: Some("generation failed".into()),
        amount: None,
        reference: None,
        acted_by: None,
    }
}

fn refund_seen(answer: Result<ledger::Outcome<ledger::RefundReceipt>, LedgerError>) -> String {
    match answer {
        Ok(o) if !o.replayed => format!(
            "ok {} {} {}",
            o.value.credits_refunded, o.value.new_balance, o.value.project_code
        ),
        Ok(o) => format!(
            "replay {} {}",
            o.value.credits_refunded, o.value.project_code
        ),
        Err(e) => format!("err {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_links_follow_each_users_order_and_commit_jobs_checkpoint_them_once() {
    let db = TestDb::new().await;
    let pool = db::pool_with(&db.url, 4, 5000).expect("pool");
    grant(&pool, "alice", 100).await;
    grant(&pool, "bob", 100).await;
    let mut c = pool.get().await.expect("client");
    for i in 0..6 {
        let user = if i % 2 == 0 { "alice" } else { "bob" };
        ledger::deduct(
            &mut c,
            &deduct(user, 1, "imagegene", &format!("a{i}")),
            None,
        )
        .await
        .expect("deduct");
    }
    // And a batch of both users at once: one commit, one job.
    let batch: Vec<Queued> = (0..4)
        .map(|i| Queued {
            deduct: deduct(
                if i % 2 == 0 { "alice" } else { "bob" },
                1,
                "imagegene",
                &format!("b{i}"),
            ),
            correlation_id: None,
        })
        .collect();
    let answers = ledger::deduct_all(&mut c, &batch, ledger::OnBusy::Wait).await;
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    // Each chain: links 1..n in id order, each linked to the one before.
    let links = c
        .query(
            "SELECT user_id, chain_seq, prev_hash, hash FROM ledger_entries ORDER BY user_id, id",
            &[],
        )
        .await
        .expect("links");
    assert_eq!(links.len(), 12);
    let mut last: std::collections::HashMap<String, (i64, Vec<u8>)> = Default::default();
    for r in &links {
        let user: String = r.get(0);
        let (seq, prev): (i64, Vec<u8>) = last
            .get(&user)
            .cloned()
            .unwrap_or((0, penora_ledger::chain::GENESIS.to_vec()));
        assert_eq!(r.get::<_, i64>(1), seq + 1, "{user}");
        assert_eq!(r.get::<_, Vec<u8>>(2), prev, "{user}");
        last.insert(user, (seq + 1, r.get(3)));
    }
    let jobs: Vec<penora_domain::messages::LedgerAuditCommit> = c
        .query(
            "SELECT payload FROM outbox WHERE routing_key = 'penora.ledger-audit' ORDER BY id",
            &[],
        )
        .await
        .expect("jobs")
        .iter()
        .map(|r| serde_json::from_value(r.get(0)).expect("a commit's job"))
        .collect();
    assert_eq!(jobs.len(), 2 + 6 + 1, "one job per commit");
    // The jobs out of order, one twice: each chain checked once, up to its head.
    let mut chains: Vec<_> = jobs.iter().rev().flat_map(|j| j.chains.clone()).collect();
    chains.push(jobs[3].chains[0].clone());
    let checked = penora_ledger::checkpoint::check_commits(&pool, None, &chains)
        .await
        .expect("check");
    assert_eq!(
        checked.get("alice"),
        Some(&penora_ledger::checkpoint::Checked::Checked { seq: 6, new: 6 })
    );
    assert_eq!(
        checked.get("bob"),
        Some(&penora_ledger::checkpoint::Checked::Checked { seq: 6, new: 6 })
    );
    // Again: nothing new.
    let again = penora_ledger::checkpoint::check_commits(&pool, None, &jobs[4].chains)
        .await
        .expect("check");
    assert!(
        matches!(
            again.values().next(),
            Some(penora_ledger::checkpoint::Checked::Checked { new: 0, .. })
        ),
        "{again:?}"
    );
    // A job naming links the ledger does not have is a broken chain.
    let forged = penora_domain::messages::CommittedChain {
        user_id: "alice".into(),
        entry_ids: vec![999_999],
        seq: 99,
    };
    let broken = penora_ledger::checkpoint::check_commits(&pool, None, &[forged])
        .await
        .expect("check");
    assert!(
        matches!(broken.get("alice"), Some(penora_ledger::checkpoint::Checked::Broken(why)) if why.contains("deleted")),
        "{broken:?}"
    );
    let verification = audit::verify(&mut c, &audit::MacCheck::default())
        .await
        .expect("verify");
    assert!(
        verification.findings.is_empty(),
        "{:?}",
        verification.findings
    );
    assert_eq!(verification.links_checked, 12);
    assert_eq!(verification.checkpoints_checked, 2);
    assert_eq!(verification.links_awaiting_checkpoint, 0);
}

/// A new deployment has no statistics, and the services keep a prepared
/// statement's generic plan for as long as their connection lives: the
/// audit job's statements must be planned on the primary keys from the
/// first second, or they scan whole tables that grow under them (a
/// sequential scan of `audit_checkpoints` cost 45 ms a call after 15 s of
/// deductions on a fresh database).
#[tokio::test]
async fn the_audit_jobs_statements_use_the_primary_keys_on_a_database_without_statistics() {
    let t = TestDb::new().await;
    let pool = db::pool_with(&t.url, 1, 5000).expect("pool");
    let c = pool.get().await.expect("client");
    let never_analyzed: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_class \
             WHERE relname IN ('audit_checkpoints', 'ledger_entries') AND reltuples < 0",
            &[],
        )
        .await
        .expect("statistics")
        .get(0);
    assert_eq!(
        never_analyzed, 2,
        "a test database starts without statistics, as a new deployment does"
    );
    c.batch_execute("SET plan_cache_mode = force_generic_plan")
        .await
        .expect("generic plans");
    for (name, sql, params) in ledger::checkpoint::statements() {
        c.batch_execute(&format!("PREPARE s AS {sql}"))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let plan = plan_of(&c, &format!("EXPLAIN EXECUTE s({})", nulls(params)))
            .await
            .join("\n");
        for table in ["audit_checkpoints", "ledger_entries"] {
            assert!(
                !plan.contains(&format!("Seq Scan on {table}")),
                "{name} scans {table} whole on a database without statistics:\n{plan}"
            );
        }
        c.batch_execute("DEALLOCATE s").await.expect("deallocate");
    }
}

/// The lines of an `EXPLAIN`.
async fn plan_of(c: &deadpool_postgres::Client, explain: &str) -> Vec<String> {
    c.query(explain, &[])
        .await
        .unwrap_or_else(|e| panic!("{explain}: {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// `n` NULL arguments, for a prepared statement's `EXECUTE`.
fn nulls(n: usize) -> String {
    vec!["NULL"; n].join(", ")
}

/// Blocks the statement touched (`shared hit` + `read`), from its top plan
/// node's `Buffers:` line.
fn blocks_of(plan: &[String]) -> u64 {
    let line = plan
        .iter()
        .find(|l| l.trim_start().starts_with("Buffers:"))
        .unwrap_or_else(|| panic!("no Buffers line in:\n{}", plan.join("\n")));
    line.split_whitespace()
        .filter_map(|w| {
            let (what, n) = w.split_once('=')?;
            matches!(what, "hit" | "read").then(|| n.parse::<u64>().ok())?
        })
        .sum()
}

/// The audit job reads a chain from its checkpoint on: what that costs is
/// the new links', not the user's history's. A hot account's history is
/// long: a read that started at the user's first entry (a B-tree scan
/// positioned by `user_id =` alone) cost 17 ms a call in the benchmark's
/// 60 s `hot` run, and more every second.
#[tokio::test]
async fn the_audit_jobs_read_costs_the_new_links_not_the_users_history() {
    let t = TestDb::new().await;
    let pool = db::pool_with(&t.url, 1, 5000).expect("pool");
    let c = pool.get().await.expect("client");
    // Two chains: 30,000 links and 30, both checked up to their tenth link
    // from the end (the hashes are not checked here: only the read is).
    c.batch_execute(
        "INSERT INTO accounts (user_id) VALUES ('long-history'), ('short-history');
         INSERT INTO ledger_entries (user_id, kind, amount, balance_after, app_name, reference, \
                                     chain_seq, prev_hash, hash)
         SELECT h.u, 'grant', 1, s, 'penora', 'g' || s, s, \
                decode(repeat('00', 32), 'hex'), decode(repeat('11', 32), 'hex')
         FROM (VALUES ('long-history', 30000), ('short-history', 30)) AS h(u, n), \
              generate_series(1, h.n) AS s
         ORDER BY s, h.u;
         INSERT INTO audit_checkpoints (user_id, seq, entry_id, hash)
         SELECT l.user_id, l.chain_seq, l.id, l.hash FROM ledger_entries l
         WHERE (l.user_id, l.chain_seq) IN (('long-history', 29990), ('short-history', 20));",
    )
    .await
    .expect("two chains");
    c.batch_execute("SET plan_cache_mode = force_generic_plan")
        .await
        .expect("generic plans");
    let (_, read, _) = ledger::checkpoint::statements()
        .into_iter()
        .find(|s| s.0 == "read")
        .expect("the read");
    for statistics in ["none (a new deployment)", "after ANALYZE"] {
        if statistics.starts_with("after") {
            c.batch_execute("ANALYZE ledger_entries; ANALYZE audit_checkpoints")
                .await
                .expect("analyze");
        }
        c.batch_execute(&format!("PREPARE s AS {read}"))
            .await
            .expect("prepare");
        let mut blocks = Vec::new();
        for user in ["long-history", "short-history"] {
            let last: i64 = c
                .query_one(
                    "SELECT max(id) FROM ledger_entries WHERE user_id = $1",
                    &[&user],
                )
                .await
                .expect("last")
                .get(0);
            let plan = plan_of(
                &c,
                &format!(
                    "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) EXECUTE s('{{{user}}}', '{{{last}}}')"
                ),
            )
            .await;
            let links: i64 = c
                .query(&format!("EXECUTE s('{{{user}}}', '{{{last}}}')"), &[])
                .await
                .expect("read")
                .len() as i64;
            assert_eq!(
                links, 11,
                "{user}: the checkpoint's link and the 10 after it"
            );
            blocks.push((blocks_of(&plan), plan.join("\n")));
        }
        let (long, short) = (&blocks[0], &blocks[1]);
        assert!(
            long.0 <= short.0 + 8,
            "statistics {statistics}: the read of 11 links touched {} blocks for a user with \
             30,000 entries and {} for one with 30:\n{}",
            long.0,
            short.0,
            long.1
        );
        c.batch_execute("DEALLOCATE s").await.expect("deallocate");
    }
}

/// A connection plans a prepared statement once and keeps the plan. On a
/// new deployment, or in the first minute after V18 on an old one,
/// `audit_checkpoints` is empty or tiny when the audit job first runs; a
/// plan made then scanned the table whole, and kept doing so while it grew
/// to a row per user (13 ms a call, up to 2.5 s for a batch of 760 chains,
/// in a benchmark without warm-up). Planned as the job plans them
/// (`checkpoint::BY_INDEX`), the statements keep to the primary keys however
/// small the table was; planned plainly, the same statement keeps its scan
/// (the trap this test sets is real).
#[tokio::test]
async fn the_audit_jobs_plans_made_on_a_tiny_table_keep_to_the_primary_keys_once_it_grew() {
    let t = TestDb::new().await;
    let pool = db::pool_with(&t.url, 1, 5000).expect("pool");
    let c = pool.get().await.expect("client");
    // 30,020 users, 20 checkpoints, analyzed: the first seconds' statistics.
    c.batch_execute(
        "ALTER TABLE audit_checkpoints SET (autovacuum_enabled = off);
         INSERT INTO accounts (user_id) SELECT 'u' || g FROM generate_series(1, 30020) g;
         INSERT INTO audit_checkpoints (user_id, seq, entry_id, hash)
         SELECT 'u' || g, 1, g, decode(repeat('11', 32), 'hex') FROM generate_series(1, 20) g;
         ANALYZE audit_checkpoints;
         SET plan_cache_mode = force_generic_plan;",
    )
    .await
    .expect("a tiny table");
    let (on, off) = ledger::checkpoint::BY_INDEX;
    let mut planned = Vec::new();
    for (i, (name, sql, params)) in ledger::checkpoint::statements().into_iter().enumerate() {
        for (as_job, setting) in [(true, on), (false, off)] {
            let handle = format!("s{i}_{}", if as_job { "job" } else { "plain" });
            // Prepared and run once on the tiny table: the plan is made and kept.
            c.batch_execute(&format!(
                "{setting}; PREPARE {handle} AS {sql}; EXECUTE {handle}({}); {off}",
                nulls(params)
            ))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            planned.push((name, as_job, setting, handle, params));
        }
    }
    // The table grows to a row per user, as the first minute's audit jobs make it.
    c.batch_execute(
        "INSERT INTO audit_checkpoints (user_id, seq, entry_id, hash)
         SELECT 'u' || g, 1, g, decode(repeat('11', 32), 'hex') FROM generate_series(21, 30020) g;",
    )
    .await
    .expect("a grown table");
    for (name, as_job, setting, handle, params) in planned {
        c.batch_execute(setting).await.expect("setting");
        let plan = plan_of(&c, &format!("EXPLAIN EXECUTE {handle}({})", nulls(params)))
            .await
            .join("\n");
        c.batch_execute(off).await.expect("reset");
        let scans = ["audit_checkpoints", "ledger_entries"]
            .iter()
            .any(|t| plan.contains(&format!("Seq Scan on {t}")));
        if as_job {
            assert!(
                !scans,
                "{name}, planned as the job plans it, kept a scan made on a tiny table:\n{plan}"
            );
        } else if name.starts_with("advance, skipping") {
            assert!(
                scans,
                "{name}, planned plainly on a tiny table, was expected to keep a sequential scan (the trap this test sets):\n{plan}"
            );
        }
    }
}

/// The setting, the statement and the reset go in one round trip, in that
/// order, and the reset runs even when the statement fails.
#[tokio::test]
async fn a_statement_run_by_index_sees_sequential_scans_off_and_leaves_them_on() {
    let t = TestDb::new().await;
    let pool = db::pool_with(&t.url, 1, 5000).expect("pool");
    let c = pool.get().await.expect("client");
    let show = c.prepare("SHOW enable_seqscan").await.expect("prepare");
    let setting = |rows: Vec<tokio_postgres::Row>| -> String { rows[0].get(0) };
    let during = ledger::checkpoint::by_index(&c, &show, &[])
        .await
        .expect("show");
    assert_eq!(setting(during), "off");
    let after = c.query(&show, &[]).await.expect("show");
    assert_eq!(setting(after), "on");
    let divide = c.prepare("SELECT 1 / $1::int4").await.expect("prepare");
    let failed = ledger::checkpoint::by_index(&c, &divide, &[&0_i32]).await;
    assert!(failed.is_err(), "the statement's error is the answer");
    let after = c.query(&show, &[]).await.expect("show");
    assert_eq!(setting(after), "on", "reset after a failed statement");
}
