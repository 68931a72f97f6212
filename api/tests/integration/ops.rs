//! `penora-ops` end to end, as an operator runs it.

use std::process::Output;

use penora_testing::TestDb;
use reqwest::StatusCode;

use crate::support::{expect_error, spawn_app};

/// The `penora-ops` binary (of the `ops` crate), beside this crate's own.
fn ops_binary() -> std::path::PathBuf {
    let path =
        std::path::PathBuf::from(env!("CARGO_BIN_EXE_penora-api")).with_file_name("penora-ops");
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (`cargo build --workspace`)",
        path.display()
    );
    path
}

async fn ops(db_url: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(ops_binary())
        .args(args)
        .env("DATABASE_URL", db_url)
        .output()
        .await
        .expect("penora-ops runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test]
async fn keys_are_created_listed_and_revoked_with_the_cli() {
    let app = spawn_app().await;
    app.grant("u1", 5).await;
    let created = ops(
        &app.db.url,
        &[
            "keys",
            "create",
            "--app",
            "imagegene",
            "--scopes",
            "read,spend",
            "--name",
            "ImageGene",
        ],
    )
    .await;
    assert!(created.status.success(), "{created:?}");
    let out = stdout(&created);
    let key = out
        .lines()
        .find_map(|l| l.strip_prefix("key:"))
        .map(str::trim)
        .expect("the key is printed once")
        .to_owned();
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("id:"))
        .map(str::trim)
        .expect("the id is printed")
        .to_owned();
    assert_eq!(
        app.get_with_key("/api/unified/user-info?user_id=u1", &key)
            .await
            .status(),
        StatusCode::OK
    );

    let listed = ops(&app.db.url, &["keys", "list"]).await;
    let list = stdout(&listed);
    assert!(
        list.contains(&id)
            && list.contains("imagegene")
            && list.contains("read,spend")
            && list.contains("active"),
        "{list}"
    );
    assert!(!list.contains(&key), "listing never shows a key");

    let revoked = ops(&app.db.url, &["keys", "revoke", &id]).await;
    assert!(revoked.status.success(), "{revoked:?}");
    expect_error(
        app.get_with_key("/api/unified/user-info?user_id=u1", &key)
            .await,
        StatusCode::UNAUTHORIZED,
        "invalid_api_key",
    )
    .await;
    let list = stdout(&ops(&app.db.url, &["keys", "list"]).await);
    assert!(list.contains("revoked"), "{list}");

    let bad = ops(
        &app.db.url,
        &["keys", "create", "--app", "*", "--scopes", "read,fly"],
    )
    .await;
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown scope `fly`"));
}

#[tokio::test]
async fn credits_grant_is_idempotent_by_reference() {
    let app = spawn_app().await;
    for _ in 0..2 {
        let o = ops(
            &app.db.url,
            &[
                "credits",
                "grant",
                "buyer",
                "250",
                "--reason",
                "purchase",
                "--reference",
                "pay_9",
            ],
        )
        .await;
        assert!(o.status.success(), "{o:?}");
    }
    assert_eq!(app.balance("buyer").await, 250);
    let o = ops(
        &app.db.url,
        &[
            "credits",
            "grant",
            "buyer",
            "0",
            "--reason",
            "x",
            "--reference",
            "pay_10",
        ],
    )
    .await;
    assert_eq!(o.status.code(), Some(2));
}

#[tokio::test]
async fn reconcile_passes_on_clean_data_and_names_the_users_after_corruption() {
    let app = spawn_app().await;
    app.grant("alice", 50).await;
    app.grant("bob", 50).await;
    app.deduct("alice", 5, "a1").await;
    let clean = ops(&app.db.url, &["reconcile"]).await;
    assert!(clean.status.success(), "{clean:?}");
    assert!(
        stdout(&clean).contains("reconcile OK"),
        "{}",
        stdout(&clean)
    );

    let client = app.pool.get().await.expect("db");
    client
        .batch_execute(
            "UPDATE accounts SET balance = balance + 7 WHERE user_id = 'bob'; \
             UPDATE accounts SET storage_used_bytes = 2000000 WHERE user_id = 'alice'",
        )
        .await
        .expect("corrupted");
    let broken = ops(&app.db.url, &["reconcile"]).await;
    assert_eq!(broken.status.code(), Some(1), "{broken:?}");
    let out = stdout(&broken);
    assert!(out.contains("bob") && out.contains("invariant 2"), "{out}");
    assert!(
        out.contains("alice") && out.contains("invariant 6"),
        "{out}"
    );
    assert!(
        out.contains("reconcile FAILED") && out.contains("alice, bob"),
        "{out}"
    );
    let json = ops(&app.db.url, &["reconcile", "--json"]).await;
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json report");
    // Bob's balance disagrees with his ledger and with his lots (§12);
    // Alice's storage with her projects.
    assert_eq!(report["violations"].as_array().map(Vec::len), Some(3));
}

#[tokio::test]
async fn reconcile_finds_a_reservation_refunded_twice() {
    let app = spawn_app().await;
    app.grant("carol", 20).await;
    app.deduct("carol", 5, "c1").await;
    let client = app.pool.get().await.expect("db");
    // A second refund row written behind the service's back (the unique
    // index would refuse it, so drop that guard first).
    // One statement a call (Citus runs multi-statement strings only one by one).
    for sql in [
        "DROP INDEX ledger_one_refund_per_reservation",
        "INSERT INTO ledger_entries (user_id, kind, amount, balance_after, app_name, project_code) \
           VALUES ('carol', 'refund', 5, 20, 'imagegene', 'c1'), ('carol', 'refund', 5, 25, 'imagegene', 'c1')",
        "UPDATE accounts SET balance = 25 WHERE user_id = 'carol'",
    ] {
        client.batch_execute(sql).await.expect("corrupted");
    }
    let broken = ops(&app.db.url, &["reconcile"]).await;
    assert_eq!(broken.status.code(), Some(1));
    let out = stdout(&broken);
    assert!(
        out.contains("carol") && out.contains("invariant 4") && out.contains("2 refunds"),
        "{out}"
    );
}

#[tokio::test]
async fn migrations_started_at_once_by_several_processes_all_succeed() {
    let db = TestDb::new().await;
    // A fresh, empty database of its own.
    let (client, name, url) = bare_database(&db, "fresh").await;
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            async move { ops(&url, &["migrate"]).await }
        })
        .collect();
    for out in futures_join(runs).await {
        assert!(out.status.success(), "{out:?}");
    }
    let (fresh, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("fresh");
    tokio::spawn(conn);
    let applied: i64 = fresh
        .query_one("SELECT count(*) FROM refinery_schema_history", &[])
        .await
        .expect("history")
        .get(0);
    assert_eq!(applied, i64::from(penora_store::latest_migration_version()));
    drop(fresh);
    client
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await
        .expect("dropped");
}

#[tokio::test]
async fn only_migrate_changes_the_schema() {
    let db = TestDb::new().await;
    let (client, name, url) = bare_database(&db, "bare").await;
    let refused = ops(&url, &["reconcile"]).await;
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    let why = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(why.contains("penora-ops migrate"), "{why}");
    let (bare, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("bare");
    tokio::spawn(conn);
    let tables: i64 = bare
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
            &[],
        )
        .await
        .expect("tables")
        .get(0);
    assert_eq!(tables, 0, "reconcile created tables");
    assert!(ops(&url, &["migrate"]).await.status.success());
    let after = ops(&url, &["reconcile"]).await;
    assert!(after.status.success(), "{after:?}");
    drop(bare);
    client
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await
        .expect("dropped");
}

/// An empty database beside `db`'s (no schema): the admin connection, its
/// name and its URL. The caller drops it.
async fn bare_database(db: &TestDb, suffix: &str) -> (tokio_postgres::Client, String, String) {
    let admin = penora_testing::admin_url();
    let name = format!("{}_{suffix}", db.name);
    let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
        .await
        .expect("admin");
    tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("created");
    let url = format!(
        "{}/{name}",
        admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b)
    );
    (client, name, url)
}

async fn futures_join<F: std::future::Future<Output = Output> + Send + 'static>(
    futs: Vec<F>,
) -> Vec<Output> {
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

#[tokio::test]
async fn projects_delete_frees_the_bytes_and_logs_the_operator() {
    let app = spawn_app().await;
    app.grant("u1", 1).await;
    let id = app
        .saved_url_project("u1", "https://cdn.imagegene.example/u1/a.png")
        .await;
    let o = ops(&app.db.url, &["projects", "delete", "u1", &id]).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The URL's 38 bytes and the title's 1.
    assert!(stdout(&o).contains("39 bytes freed"), "{}", stdout(&o));
    assert_eq!(
        app.scalar(
            "SELECT storage_used_bytes FROM accounts WHERE user_id = $1",
            "u1"
        )
        .await,
        0
    );
    assert_eq!(
        app.scalar(
            "SELECT count(*) FROM project_log WHERE user_id = $1 AND cause = 'operator'",
            "u1"
        )
        .await,
        1
    );
    let again = ops(&app.db.url, &["projects", "delete", "u1", &id]).await;
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("no project"));
}

/// Peak resident memory (kB) of `penora-ops args`, sampled until it exits.
async fn ops_peak_rss_kb(db_url: &str, args: &[&str]) -> (Output, u64) {
    let child = tokio::process::Command::new(ops_binary())
        .args(args)
        .env("DATABASE_URL", db_url)
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
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
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

#[tokio::test]
async fn balances_from_before_lots_become_one_paid_lot_each() {
    let db = TestDb::new().await;
    let (_admin, _name, url) = bare_database(&db, "lots").await;
    penora_store::migrate_to(&url, Some(8))
        .await
        .expect("migrated to V8");
    let pool = penora_store::pool_for(&url, 2).expect("pool");
    let client = pool.get().await.expect("db");
    // What the service before lots wrote: alice got 20, reserved 5 (still
    // held), 3 (refunded) and 6 (settled); carol got 7; bob has an account
    // and nothing else.
    for sql in [
        "INSERT INTO accounts (user_id, balance) VALUES ('alice', 9), ('bob', 0), ('carol', 7)",
        "INSERT INTO ledger_entries (user_id, kind, amount, balance_after, app_name, description, project_code, reference) VALUES \
           ('alice', 'grant', 20, 20, 'penora', 'purchase', NULL, 'pay-1'), \
           ('alice', 'deduct', -5, 15, 'imagegene', NULL, 'p1', NULL), \
           ('alice', 'deduct', -3, 12, 'imagegene', NULL, 'p2', NULL), \
           ('alice', 'refund', 3, 15, 'imagegene', NULL, 'p2', NULL), \
           ('alice', 'deduct', -6, 9, 'imagegene', NULL, 'p3', NULL), \
           ('alice', 'settle', 0, 9, 'imagegene', 'generation succeeded', 'p3', NULL), \
           ('carol', 'grant', 7, 7, 'penora', 'purchase', NULL, 'pay-2')",
        "INSERT INTO reservations (app_name, project_code, user_id, amount, state, balance_after_deduct, refundable_until, \
                                   refunded_at, balance_after_refund, settled_at, settled_by) VALUES \
           ('imagegene', 'p1', 'alice', 5, 'reserved', 15, now() + interval '1 hour', NULL, NULL, NULL, NULL), \
           ('imagegene', 'p2', 'alice', 3, 'refunded', 12, now() + interval '1 hour', now(), 15, NULL, NULL), \
           ('imagegene', 'p3', 'alice', 6, 'settled', 9, now() + interval '1 hour', NULL, NULL, now(), 'final')",
    ] {
        client.batch_execute(sql).await.expect("V8 data");
    }
    drop(client);
    penora_store::migrate(&url).await.expect("migrated to V9");

    let mut client = pool.get().await.expect("db");
    let report = penora_ledger::reconcile::run(&mut client, 1_048_576)
        .await
        .expect("reconcile");
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
    let lots = client
        .query(
            "SELECT user_id, category, priority, granted, remaining, expires_at IS NULL AS never, reference \
             FROM credit_lots ORDER BY user_id",
            &[],
        )
        .await
        .expect("lots");
    type Lot = (String, String, i32, i64, i64, bool, Option<String>);
    let got: Vec<Lot> = lots
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get(6),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("alice".into(), "paid".into(), 50, 20, 9, true, None),
            ("carol".into(), "paid".into(), 50, 7, 7, true, None),
        ],
        "one paid lot without expiry per balance; bob has none"
    );
    assert_eq!(
        client
            .query_one(
                "SELECT refunded_amount FROM reservations WHERE project_code = 'p2'",
                &[]
            )
            .await
            .expect("p2")
            .get::<_, i64>(0),
        3
    );

    // The old reservation still refunds, into the lot it was drawn from.
    let refund = penora_ledger::Refund {
        user_id: penora_domain::UserId::parse("alice").expect("user"),
        project_code: penora_domain::ProjectCode::parse("p1").expect("code"),
        app_name: None,
        reason: None,
        amount: None,
        reference: None,
    };
    let back = penora_ledger::refund(&mut client, &refund, None)
        .await
        .expect("refunded");
    assert_eq!(back.value.new_balance, 14);
    let remaining: i64 = client
        .query_one(
            "SELECT remaining FROM credit_lots WHERE user_id = 'alice'",
            &[],
        )
        .await
        .expect("lot")
        .get(0);
    assert_eq!(remaining, 14);
    let report = penora_ledger::reconcile::run(&mut client, 1_048_576)
        .await
        .expect("reconcile");
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
}

/// Each binary reads only the sections of settings it uses (issue 25): a bad
/// image or HTTP setting, which only the API reads, stops the API naming the
/// variable but leaves the operator CLI working.
#[tokio::test]
async fn a_bad_image_or_http_setting_stops_the_api_but_not_penora_ops() {
    let db = TestDb::new().await;
    let bad = [
        ("IMAGE_QUALITY", "0"),
        ("HTTP_IDLE_TIMEOUT_SECS", "nonsense"),
    ];
    for args in [&["reconcile"][..], &["keys", "list"]] {
        let out = tokio::process::Command::new(ops_binary())
            .args(args)
            .env("DATABASE_URL", &db.url)
            .envs(bad)
            .output()
            .await
            .expect("penora-ops runs");
        assert!(
            out.status.success(),
            "penora-ops {args:?} with a bad image and HTTP setting: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for (variable, value) in bad {
        let api = tokio::process::Command::new(env!("CARGO_BIN_EXE_penora-api"))
            .env("DATABASE_URL", &db.url)
            .env("BIND_ADDR", "127.0.0.1:0")
            .env(variable, value)
            .kill_on_drop(true)
            .output();
        // A started API would serve until killed: the deadline turns that
        // into a failure instead of a hung test.
        let out = tokio::time::timeout(std::time::Duration::from_secs(30), api)
            .await
            .unwrap_or_else(|_| panic!("penora-api started with {variable}={value}"))
            .expect("penora-api runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "penora-api started with {variable}={value}"
        );
        assert!(stderr.contains(variable), "{variable}: {stderr}");
    }
}
