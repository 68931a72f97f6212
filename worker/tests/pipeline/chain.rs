//! The audit chain in the ledger (contract §6 as amended): tampering with a
//! ledger entry (edited, deleted, reordered) or with a checkpoint is found
//! by the next `ledger-audit` job (its alert metric set, the job parked) and
//! by `penora-ops audit verify`; a worker killed between the commits and
//! their jobs leaves nothing unchecked once another runs, and the chain of a
//! user whose movements ran in many batches verifies.

use std::time::Duration;

use crate::support::{Stack, stack, wait_for};

const KEY: &str = "chain-test-audit-key-0123456789abcdef";

/// `user`'s checkpoint seq (0 without one).
async fn checkpoint(s: &Stack, user: &str) -> i64 {
    s.scalar(
        "SELECT coalesce(max(seq), 0) FROM audit_checkpoints WHERE user_id = $1",
        user,
    )
    .await
}

async fn wait_checkpoint(s: &Stack, user: &str, seq: i64) {
    wait_for(
        &format!("{user}'s chain checked up to link {seq}"),
        Duration::from_secs(20),
        || async { checkpoint(s, user).await == seq },
    )
    .await;
}

/// Runs `sql` with the ledger's append-only guard off, as someone with the
/// database's owner rights could.
async fn tamper(s: &Stack, sql: &str) {
    let c = s.pool.get().await.expect("db");
    c.batch_execute(&format!(
        "ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_append_only; {sql}; \
         ALTER TABLE ledger_entries ENABLE TRIGGER ledger_entries_append_only;"
    ))
    .await
    .expect("tampered");
}

/// The next audit job finds the break: the alert metric is set and the job
/// parked in the dead-letter queue, the checkpoint stays where it was.
async fn the_next_job_finds_it(s: &Stack, user: &str, stays_at: i64) {
    wait_for(
        "the audit job raised the alert",
        Duration::from_secs(20),
        || async { s.worker_metric("penora_audit_chain_broken").await == 1.0 },
    )
    .await;
    assert!(s.worker_metric("penora_audit_chain_breaks_total").await >= 1.0);
    let dead = s.topology.dead_queue(penora_domain::messages::LEDGER_AUDIT);
    wait_for(
        "the job parked with its reason",
        Duration::from_secs(20),
        || async { s.depth(&dead).await >= 1 },
    )
    .await;
    assert_eq!(checkpoint(s, user).await, stays_at, "the checkpoint stays");
}

/// `penora-ops audit verify` (with the stack's `AUDIT_HMAC_KEY`, when it has
/// one) fails, naming `user` and `what`.
async fn verify_finds(s: &Stack, user: &str, what: &str) {
    let mut command = tokio::process::Command::new(crate::support::sibling_binary("penora-ops"));
    command.args(["audit", "verify"]).envs(s.env());
    if let Some(key) = &s.settings.audit.hmac_key {
        command.env("AUDIT_HMAC_KEY", key.expose());
    }
    let verify = command.output().await.expect("penora-ops runs");
    let out = String::from_utf8_lossy(&verify.stdout).to_string();
    assert_eq!(verify.status.code(), Some(1), "{out}");
    assert!(out.contains(user) && out.contains(what), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_edited_entry_is_found_by_the_next_audit_job_and_by_verify() {
    let mut s = stack(&[], &[]).await;
    s.start_worker().await;
    s.grant("u1", 100).await;
    s.deduct("u1", 5, "a1").await;
    wait_checkpoint(&s, "u1", 2).await;
    let clean = s.ops(&["audit", "verify"]).await;
    assert!(clean.status.success(), "{clean:?}");
    // The checkpoint's own entry, edited: the next commit's job re-reads it.
    tamper(
        &s,
        "UPDATE ledger_entries SET description = 'forged' WHERE user_id = 'u1' AND project_code = 'a1'",
    )
    .await;
    s.deduct("u1", 1, "a2").await;
    the_next_job_finds_it(&s, "u1", 2).await;
    verify_finds(&s, "u1", "altered").await;
    s.stop_worker().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_entry_is_found_by_the_next_audit_job_and_by_verify() {
    let mut s = stack(&[], &[]).await;
    s.start_worker().await;
    s.grant("u1", 100).await;
    wait_checkpoint(&s, "u1", 1).await;
    s.stop_worker().await;
    for code in ["d1", "d2", "d3"] {
        s.deduct("u1", 1, code).await;
    }
    tamper(
        &s,
        "DELETE FROM ledger_entries WHERE user_id = 'u1' AND project_code = 'd2' AND kind = 'deduct'",
    )
    .await;
    s.start_worker().await;
    wait_for(
        "the audit job raised the alert",
        Duration::from_secs(20),
        || async { s.worker_metric("penora_audit_chain_broken").await == 1.0 },
    )
    .await;
    // Link 2 (d1) may be checked before the job that meets the gap; never
    // past it.
    assert!(checkpoint(&s, "u1").await <= 2);
    verify_finds(&s, "u1", "where link 3 was expected").await;
    s.stop_worker().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reordered_entries_are_found_by_the_next_audit_job_and_by_verify() {
    let mut s = stack(&[], &[]).await;
    s.start_worker().await;
    s.grant("u1", 100).await;
    wait_checkpoint(&s, "u1", 1).await;
    s.stop_worker().await;
    s.deduct("u1", 1, "r1").await;
    s.deduct("u1", 2, "r2").await;
    // The two entries swap places (ids), each keeping its own content.
    tamper(
        &s,
        "ALTER TABLE ledger_entries ALTER COLUMN id SET GENERATED BY DEFAULT; \
         UPDATE ledger_entries SET id = -id WHERE user_id = 'u1' AND project_code IN ('r1', 'r2'); \
         UPDATE ledger_entries e SET id = o.id FROM \
           (SELECT -id AS id, project_code FROM ledger_entries WHERE user_id = 'u1' AND id < 0) o \
         WHERE e.user_id = 'u1' AND e.id < 0 AND e.project_code <> o.project_code",
    )
    .await;
    s.start_worker().await;
    the_next_job_finds_it(&s, "u1", 1).await;
    verify_finds(&s, "u1", "was expected").await;
    s.stop_worker().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_edited_checkpoint_is_found_by_its_mac_by_the_next_job_and_by_verify() {
    let mut s = stack(&[("AUDIT_HMAC_KEY", KEY)], &[]).await;
    s.start_worker().await;
    s.grant("u1", 100).await;
    s.deduct("u1", 5, "c1").await;
    wait_checkpoint(&s, "u1", 2).await;
    assert_eq!(
        s.scalar(
            "SELECT count(*) FROM audit_checkpoints WHERE user_id = $1 AND mac IS NOT NULL",
            "u1"
        )
        .await,
        1
    );
    // Wound back to link 1, consistently with the ledger: only the MAC,
    // made for link 2's hash, tells.
    let c = s.pool.get().await.expect("db");
    c.batch_execute(
        "UPDATE audit_checkpoints c SET seq = 1, entry_id = l.id, hash = l.hash \
         FROM ledger_entries l WHERE l.user_id = c.user_id AND l.chain_seq = 1 AND c.user_id = 'u1'",
    )
    .await
    .expect("checkpoint edited");
    s.deduct("u1", 1, "c2").await;
    the_next_job_finds_it(&s, "u1", 1).await;
    verify_finds(&s, "u1", "AUDIT_HMAC_KEY did not make").await;
    s.stop_worker().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_between_commits_and_their_jobs_leaves_nothing_unchecked() {
    let s = stack(&[], &[]).await;
    let users: Vec<String> = (0..8).map(|i| format!("k{i}")).collect();
    for u in &users {
        s.grant(u, 10_000).await;
    }
    let worker = s.spawn_worker_process().await;
    // Concurrent deductions: the API's group commit writes many users per
    // transaction, one audit job each; the worker is killed in the middle.
    let deduct_all = |round: usize| {
        let s = &s;
        let users = &users;
        async move {
            let mut tasks = futures_util::stream::FuturesUnordered::new();
            for i in 0..160 {
                let u = users[i % users.len()].clone();
                tasks.push(async move {
                    s.deduct(&u, 1, &format!("r{round}_{i}")).await;
                });
            }
            use futures_util::StreamExt;
            while tasks.next().await.is_some() {}
        }
    };
    let (_, _) = tokio::join!(deduct_all(0), async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        worker.kill().await;
    });
    deduct_all(1).await;
    let worker = s.spawn_worker_process().await;
    s.wait_idle().await;
    wait_for(
        "nothing left unchecked",
        Duration::from_secs(30),
        || async {
            s.scalar("SELECT count(*) FROM audit_pending WHERE $1 = $1", "")
                .await
                == 0
        },
    )
    .await;
    for u in &users {
        assert_eq!(
            checkpoint(&s, u).await,
            s.scalar("SELECT chain_seq FROM accounts WHERE user_id = $1", u)
                .await,
            "{u}: checked up to its head"
        );
        assert_eq!(
            s.scalar("SELECT chain_seq FROM accounts WHERE user_id = $1", u)
                .await,
            1 + 2 * 160 / users.len() as i64,
            "{u}: a grant and its deductions"
        );
    }
    let commits = s
        .scalar(
            "SELECT count(DISTINCT created_at) FROM ledger_entries WHERE kind = 'deduct' AND $1 = $1",
            "",
        )
        .await;
    eprintln!("320 deductions of 8 users in {commits} commits");
    let verify = s.ops(&["audit", "verify"]).await;
    assert!(verify.status.success(), "{verify:?}");
    worker.kill().await;
}
