//! The services as the application role (migration V12, issue 24): the API
//! connected as `penora_app`, not migrating, does its whole job, and so does
//! `penora-ops` but for `migrate`; `penora_app` cannot take the append-only
//! guards away, change the schema or rewrite history; a service that does
//! not migrate refuses a schema behind it and changes nothing.

use std::process::Output;

use penora_testing::TestDb;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_postgres::error::SqlState;

use crate::support::{BOOT_KEY, PNG_1X1, TestApp};

/// An API over `db`, connected as `url`'s role, with `DB_MIGRATE_ON_START=false`.
async fn spawn_app_as(db: TestDb, url: &str) -> TestApp {
    let settings = db.settings(&[
        ("DATABASE_URL", url),
        ("DB_MIGRATE_ON_START", "false"),
        ("PENORA_API_KEY", BOOT_KEY),
        ("RATE_LIMIT_PER_SEC", "100000"),
        ("RATE_LIMIT_BURST", "100000"),
    ]);
    let app = penora_api::build(settings.api())
        .await
        .expect("the API builds as the application role");
    let base = format!("http://{}", app.addr);
    tokio::spawn(app.run_until_stopped(std::future::pending(), std::time::Duration::from_secs(5)));
    TestApp {
        base,
        // Checks behind the API's back, as the superuser.
        pool: penora_store::pool_for(&db.url, 4).expect("test pool"),
        http: reqwest::Client::new(),
        db,
    }
}

/// `penora-ops args` with `DATABASE_URL` = `url` and `env`.
async fn ops_as(url: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let binary =
        std::path::PathBuf::from(env!("CARGO_BIN_EXE_penora-api")).with_file_name("penora-ops");
    tokio::process::Command::new(binary)
        .args(args)
        .env("DATABASE_URL", url)
        .env_remove("AUDIT_HMAC_KEY")
        .envs(env.iter().copied())
        .output()
        .await
        .expect("penora-ops runs")
}

async fn post(app: &TestApp, path: &str, body: Value) -> (StatusCode, Value) {
    let r = app.post(path, &body).await;
    let status = r.status();
    (status, r.json().await.expect("JSON body"))
}

async fn get(app: &TestApp, path: &str) -> (StatusCode, Value) {
    let r = app.get(path).await;
    let status = r.status();
    (status, r.json().await.expect("JSON body"))
}

#[tokio::test]
async fn the_api_and_the_cli_do_their_work_as_the_application_role() {
    let db = TestDb::new().await;
    let url = db.app_role_url().await;
    let app = spawn_app_as(db, &url).await;
    let u = "roles-u1";

    assert_eq!(app.get("/ready").await.status(), StatusCode::OK);
    let (s, b) = post(
        &app,
        "/api/unified/add-credits",
        json!({"user_id": u, "amount": 50, "reason": "purchase", "reference": "pay-1"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, promo) = post(
        &app,
        "/api/unified/add-credits",
        json!({"user_id": u, "amount": 5, "reason": "bonus", "reference": "promo-1",
               "category": "promotional", "priority": 90}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{promo}");
    let (s, b) = app.deduct(u, 8, "gen-1").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = post(
        &app,
        "/api/unified/refund-credits",
        json!({"user_id": u, "project_code": "gen-1", "amount": 3, "reference": "v4"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = post(
        &app,
        "/api/unified/settle-credits",
        json!({"user_id": u, "project_code": "gen-1", "app_name": "imagegene", "amount": 4}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = app.deduct(u, 2, "gen-2").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = post(
        &app,
        "/api/unified/refund-credits",
        json!({"user_id": u, "project_code": "gen-2"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let lot = promo["lot_id"].as_i64().expect("lot id");
    let (s, b) = post(
        &app,
        &format!("/api/unified/credit-lots/{lot}/void"),
        json!({"user_id": u, "reason": "chargeback"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");

    let r = app
        .post(
            "/api/unified/save-project",
            &json!({"user_id": u, "app_source": "imagegene", "project_type": "ai_artwork",
                    "title": "kept", "content": PNG_1X1}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let gone = app
        .saved_url_project(u, "https://cdn.example.com/a.png")
        .await;
    let r = app
        .delete(&format!("/api/unified/projects/{gone}?user_id={u}"))
        .await;
    assert_eq!(r.status(), StatusCode::OK, "{:?}", r.text().await);

    let (s, listed) = get(&app, &format!("/api/unified/projects?user_id={u}")).await;
    assert_eq!(s, StatusCode::OK, "{listed}");
    assert_eq!(listed["total_count"], json!(1), "{listed}");
    let (s, ledger) = get(&app, &format!("/api/unified/transactions?user_id={u}")).await;
    assert_eq!(s, StatusCode::OK, "{ledger}");
    for path in [
        format!("/api/unified/user-info?user_id={u}"),
        format!("/api/unified/credit-lots?user_id={u}"),
        format!("/api/unified/balance?user_id={u}"),
    ] {
        let (s, b) = get(&app, &path).await;
        assert_eq!(s, StatusCode::OK, "{path}: {b}");
    }
    let (_, info) = get(&app, &format!("/api/unified/user-info?user_id={u}")).await;
    assert_eq!(
        info["credits"],
        json!(46),
        "50 - 8 + 3 + 1 (settled for 4 of 5 left)"
    );
    assert!(app.outbox_rows(u).await > 0, "the jobs wait in the outbox");

    // The operator's commands too, but for `migrate`.
    let created = ops_as(
        &url,
        &["keys", "create", "--app", "imagegene", "--scopes", "read"],
        &[],
    )
    .await;
    assert!(created.status.success(), "{created:?}");
    let id = String::from_utf8_lossy(&created.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("id:").map(|v| v.trim().to_owned()))
        .expect("the id is printed");
    for args in [
        vec!["keys", "list"],
        vec!["keys", "revoke", &id],
        vec![
            "credits",
            "grant",
            u,
            "7",
            "--reason",
            "support",
            "--reference",
            "ops-1",
        ],
        vec!["reconcile"],
        vec!["audit", "verify"],
        vec!["outbox", "list"],
    ] {
        let out = ops_as(&url, &args, &[]).await;
        // `audit verify` finds the entries not audited yet (no worker here):
        // it ran, and said so.
        let ran = out.status.success()
            || (args[0] == "audit"
                && String::from_utf8_lossy(&out.stdout).contains("no audit record"));
        assert!(ran, "penora-ops {args:?} as penora_app: {out:?}");
    }
    app.assert_reconciled().await;
}

#[tokio::test]
async fn the_application_role_cannot_take_the_append_only_guards_away() {
    let db = TestDb::new().await;
    let url = db.app_role_url().await;
    let app = spawn_app_as(db, &url).await;
    app.grant("victim", 10).await;
    let (s, b) = app.deduct("victim", 4, "gen").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    // A record and a project log row to aim at.
    let su = app.pool.get().await.expect("db");
    su.batch_execute(
        "INSERT INTO audit_records (user_id, seq, entry_id, prev_hash, hash, content) \
         SELECT user_id, 1, id, '\\x00'::bytea || repeat('0', 31)::bytea, sha256('x'), '{}' \
         FROM ledger_entries WHERE user_id = 'victim' ORDER BY id LIMIT 1",
    )
    .await
    .expect("a record");

    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("penora_app logs in");
    tokio::spawn(conn);
    let who: String = c
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("who")
        .get(0);
    assert_eq!(who, "penora_app");
    for sql in [
        "ALTER TABLE ledger_entries DISABLE TRIGGER ALL",
        "ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_append_only",
        "DROP TRIGGER ledger_entries_append_only ON ledger_entries",
        "ALTER TABLE audit_records DISABLE TRIGGER audit_records_append_only",
        "CREATE OR REPLACE FUNCTION refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$",
        "CREATE TRIGGER sneak BEFORE INSERT ON ledger_entries FOR EACH ROW EXECUTE FUNCTION refuse_change()",
        "UPDATE ledger_entries SET amount = amount",
        "DELETE FROM ledger_entries",
        "TRUNCATE ledger_entries",
        "UPDATE audit_records SET content = content",
        "DELETE FROM audit_records",
        "TRUNCATE audit_records",
        "UPDATE lot_movements SET amount = amount",
        "DELETE FROM lot_movements",
        "DELETE FROM project_log",
        "DELETE FROM reservations",
        "DELETE FROM credit_lots",
        "TRUNCATE accounts CASCADE",
        "DROP TABLE ledger_entries",
        "ALTER TABLE ledger_entries OWNER TO penora_app",
        "CREATE TABLE shadow_ledger (id int)",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "INSERT INTO refinery_schema_history (version, name, applied_on, checksum) VALUES (99, 'x', 'x', 'x')",
        "DELETE FROM refinery_schema_history",
        "SET ROLE postgres",
        "ALTER ROLE penora_app SUPERUSER",
        "CREATE ROLE accomplice",
    ] {
        let err = c
            .batch_execute(sql)
            .await
            .expect_err(&format!("penora_app ran: {sql}"));
        assert_eq!(
            err.code(),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {}",
            penora_store::error_chain(&err)
        );
    }
    // Everything is as it was: the guards, the rows, the schema.
    let triggers: i64 = su
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgname IN \
             ('ledger_entries_append_only', 'ledger_entries_no_truncate', \
              'audit_records_append_only', 'audit_records_no_truncate') AND tgenabled = 'O'",
            &[],
        )
        .await
        .expect("triggers")
        .get(0);
    assert_eq!(triggers, 4);
    assert_eq!(app.ledger_rows("victim").await, 2);
    assert_eq!(app.balance("victim").await, 6);
    let records: i64 = su
        .query_one("SELECT count(*) FROM audit_records", &[])
        .await
        .expect("records")
        .get(0);
    assert_eq!(records, 1);
    // What the old deployment's role (the superuser) could do, for contrast.
    su.batch_execute("BEGIN; ALTER TABLE ledger_entries DISABLE TRIGGER ALL; ROLLBACK")
        .await
        .expect("the superuser can switch the guards off");
}

#[tokio::test]
async fn a_service_that_does_not_migrate_refuses_a_schema_behind_it_and_changes_nothing() {
    let db = TestDb::new().await;
    let admin = penora_testing::admin_client().await;
    let bare = format!("{}_bare", db.name);
    admin
        .batch_execute(&format!("CREATE DATABASE {bare}"))
        .await
        .expect("bare database");
    let bare_url = format!(
        "{}/{bare}",
        db.url.rsplit_once('/').map_or(db.url.as_str(), |(b, _)| b)
    );
    let settings = |url: &str| {
        db.settings(&[
            ("DATABASE_URL", url),
            ("DB_MIGRATE_ON_START", "false"),
            ("PENORA_API_KEY", BOOT_KEY),
        ])
    };
    let refused = |result: anyhow::Result<penora_api::App>| match result {
        Ok(_) => panic!("the API started on a schema behind it"),
        Err(e) => format!("{e:#}"),
    };
    let why = refused(penora_api::build(settings(&bare_url).api()).await);
    assert!(
        why.contains("penora-ops migrate") && why.contains("version 0"),
        "{why}"
    );
    let (c, conn) = tokio_postgres::connect(&bare_url, tokio_postgres::NoTls)
        .await
        .expect("bare");
    tokio::spawn(conn);
    let count_tables =
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'";
    let n: i64 = c.query_one(count_tables, &[]).await.expect("n").get(0);
    assert_eq!(n, 0, "a service that does not migrate created tables");

    // One migration behind.
    penora_store::migrate_to(&bare_url, Some(11))
        .await
        .expect("migrated to V11");
    let why = refused(penora_api::build(settings(&bare_url).api()).await);
    assert!(
        why.contains("version 11") && why.contains("penora-ops migrate"),
        "{why}"
    );
    let latest: i32 = c
        .query_one("SELECT max(version)::int FROM refinery_schema_history", &[])
        .await
        .expect("version")
        .get(0);
    assert_eq!(latest, 11, "a service that does not migrate migrated");

    // Migrated by the owner, it starts.
    penora_store::migrate(&bare_url).await.expect("migrated");
    let app = penora_api::build(settings(&bare_url).api())
        .await
        .expect("the API starts on a current schema");
    drop(app);
    drop(c);
    admin
        .batch_execute(&format!("DROP DATABASE {bare} WITH (FORCE)"))
        .await
        .expect("dropped");
}

#[tokio::test]
async fn a_service_connected_as_the_application_role_that_would_migrate_says_what_to_set() {
    let db = TestDb::new().await;
    let url = db.app_role_url().await;
    // DB_MIGRATE_ON_START left at its default (true): even on a current
    // schema, migrating starts with a CREATE TABLE IF NOT EXISTS that the
    // role may not run.
    let settings = db.settings(&[("DATABASE_URL", &url), ("PENORA_API_KEY", BOOT_KEY)]);
    let why = match penora_api::build(settings.api()).await {
        Ok(_) => panic!("penora_app migrated"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        why.contains("DB_MIGRATE_ON_START=false") && why.contains("penora-ops migrate"),
        "{why}"
    );
}
