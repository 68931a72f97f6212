//! `penora-ops audit verify`: passes on the chains the movements write and
//! the worker checks, names the user whose ledger entry was edited, and
//! reads a million records of the old chain in flat memory.

use std::{process::Output, time::Duration};

use penora_testing::TestDb;

use crate::support::{ops_binary, stack, stdout, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ledger_entry_edited_in_the_database_fails_audit_verify() {
    let mut s = stack().await;
    s.start_worker().await;
    s.grant("u1", 100).await;
    s.deduct("u1", 7, "a1").await;
    wait_for("audited", Duration::from_secs(10), || async {
        s.scalar(
            "SELECT coalesce(max(seq), 0) FROM audit_checkpoints WHERE user_id = $1",
            "u1",
        )
        .await
            == 2
    })
    .await;
    s.stop_worker().await;
    let clean = s.ops(&["audit", "verify"]).await;
    assert!(clean.status.success(), "{clean:?}");
    assert!(stdout(&clean).contains("audit OK"), "{}", stdout(&clean));
    let client = s.pool.get().await.expect("db");
    client
        .batch_execute(
            "ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_append_only; \
             UPDATE ledger_entries SET amount = -1 WHERE user_id = 'u1' AND amount = -7; \
             ALTER TABLE ledger_entries ENABLE TRIGGER ledger_entries_append_only",
        )
        .await
        .expect("edited");
    assert_eq!(
        s.scalar(
            "SELECT count(*) FROM ledger_entries WHERE user_id = $1 AND amount = -1",
            "u1"
        )
        .await,
        1,
        "the deduct's entry was edited"
    );
    let verify = s.ops(&["audit", "verify"]).await;
    assert_eq!(verify.status.code(), Some(1));
    let out = stdout(&verify);
    assert!(out.contains("u1") && out.contains("altered"), "{out}");
    let json = s.ops(&["audit", "verify", "--json"]).await;
    assert_eq!(json.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json");
    assert!(
        report["findings"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f["user_id"] == "u1")),
        "{report}"
    );
}

/// Peak resident memory (kB) of `penora-ops args`, sampled until it exits.
async fn ops_peak_rss_kb(db_url: &str, args: &[&str]) -> (Output, u64) {
    let child = tokio::process::Command::new(ops_binary())
        .args(args)
        .env("DATABASE_URL", db_url)
        .env_remove("AUDIT_HMAC_KEY")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("penora-ops runs");
    let pid = child.id().expect("pid");
    let sampler = tokio::spawn(async move {
        let mut peak = 0;
        while let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            if let Some(kb) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                peak = peak.max(kb);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        peak
    });
    let out = child.wait_with_output().await.expect("penora-ops ran");
    (out, sampler.await.expect("sampler"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_streams_a_million_records_in_flat_memory() {
    let db = TestDb::new().await;
    let (c, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .expect("db");
    tokio::spawn(conn);
    // A million users with one grant each, and each grant's audit record,
    // made as the audit writer makes them: content is the canonical JSON of
    // the entry, hash = SHA-256(32 zero bytes || content).
    c.batch_execute(
        r#"SET statement_timeout = 0;
        INSERT INTO accounts (user_id, balance) SELECT 'm' || g, 1 FROM generate_series(1, 1000000) g;
        INSERT INTO ledger_entries (user_id, kind, amount, balance_after, app_name, reference)
          SELECT 'm' || g, 'grant', 1, 1, 'penora', 'r' || g FROM generate_series(1, 1000000) g;
        INSERT INTO audit_records (user_id, seq, entry_id, prev_hash, hash, content)
          SELECT l.user_id, 1, l.id, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea,
                 sha256('\x0000000000000000000000000000000000000000000000000000000000000000'::bytea
                        || convert_to(x.content, 'UTF8')),
                 x.content
          FROM ledger_entries l, LATERAL (SELECT
            '{"entry_id":' || l.id || ',"user_id":"' || l.user_id
            || '","kind":"grant","amount":1,"balance_after":1,"app_name":"penora","description":null,"project_code":null,"reference":"'
            || l.reference || '","created_at":"'
            || to_char(l.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') || '"}' AS content) x;
        INSERT INTO audit_heads (user_id, seq, hash) SELECT user_id, seq, hash FROM audit_records;
        ANALYZE;"#,
    )
    .await
    .expect("a million audit records");
    let (out, peak_kb) = ops_peak_rss_kb(&db.url, &["audit", "verify", "--json"]).await;
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        report["records_checked"],
        serde_json::json!(1_000_000),
        "{report}"
    );
    assert_eq!(report["findings"], serde_json::json!([]), "{report}");
    eprintln!("penora-ops audit verify over 1,000,000 records: peak RSS {peak_kb} kB");
    assert!(peak_kb < 200 * 1024, "peak RSS {peak_kb} kB");
}
