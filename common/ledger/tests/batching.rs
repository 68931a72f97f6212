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
use penora_ledger::audit::{self, Appended};
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
        // Every ledger row has exactly one audit job naming it, with its figures.
        "SELECT e.user_id || ' ' || e.kind || ' ' || (o.payload->>'amount') || ' ' || (o.payload->>'balance_after') \
         FROM ledger_entries e JOIN outbox o ON o.user_id = e.user_id AND (o.payload->>'entry_id')::bigint = e.id \
         WHERE o.routing_key = 'ledger-audit' ORDER BY e.user_id, e.id",
        "SELECT count(*)::text FROM outbox",
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
async fn batched_audit_records_chain_in_ledger_order_once_each_and_verify() {
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
    let entries: Vec<(String, i64)> = c
        .query("SELECT user_id, id FROM ledger_entries ORDER BY id", &[])
        .await
        .expect("entries")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(entries.len(), 8);
    // The first record alone, the rest in one batch given out of order, with a
    // repeat, an entry named under the wrong user and one that does not exist.
    assert_eq!(
        audit::append(&mut c, None, &entries[0].0, entries[0].1)
            .await
            .expect("append"),
        Appended::Recorded(1)
    );
    let mut items: Vec<(String, i64)> = entries.iter().rev().cloned().collect();
    items.push(entries[3].clone());
    items.push(("alice".into(), entries[1].1)); // bob's entry
    items.push(("alice".into(), 999_999));
    let answers = audit::append_many(&mut c, None, &items)
        .await
        .expect("batch");
    let recorded = answers
        .iter()
        .filter(|a| matches!(a, Appended::Recorded(_)))
        .count();
    assert_eq!(recorded, 7, "{answers:?}");
    assert_eq!(
        answers[7],
        Appended::AlreadyRecorded,
        "entry 0 was recorded alone"
    );
    assert_eq!(answers[8], Appended::AlreadyRecorded, "the repeat");
    assert_eq!(answers[9], Appended::NoSuchEntry);
    assert_eq!(answers[10], Appended::NoSuchEntry);
    // Within each chain, records follow the ledger's order.
    let out_of_order: i64 = c
        .query_one(
            "SELECT count(*) FROM audit_records a JOIN audit_records b \
               ON a.user_id = b.user_id AND a.seq < b.seq AND a.entry_id > b.entry_id",
            &[],
        )
        .await
        .expect("order")
        .get(0);
    assert_eq!(out_of_order, 0);
    // A single append afterwards extends the same chains.
    ledger::deduct(&mut c, &deduct("bob", 1, "imagegene", "late"), None)
        .await
        .expect("deduct");
    let late: i64 = c
        .query_one("SELECT max(id) FROM ledger_entries", &[])
        .await
        .expect("late")
        .get(0);
    assert_eq!(
        audit::append(&mut c, None, "bob", late)
            .await
            .expect("append"),
        Appended::Recorded(5)
    );
    let verification = audit::verify(&mut c, &audit::MacCheck::default())
        .await
        .expect("verify");
    assert!(
        verification.findings.is_empty(),
        "{:?}",
        verification.findings
    );
    assert_eq!(verification.records_checked, 9);
}
