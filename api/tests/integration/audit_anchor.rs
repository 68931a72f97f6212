//! The audit chain's anchor outside the database (issue 24): with
//! `AUDIT_HMAC_KEY`, each checkpoint of the chain in the ledger (V18), and
//! each record of the old chain, carries an HMAC of its hash, and
//! `penora-ops audit verify` given the key finds a chain rewritten inside the
//! database, which the hashes alone cannot (whoever rewrites the records
//! recomputes them).

use std::process::Output;

use penora_config::Secret;
use penora_ledger::audit::{self, MacKey};

use crate::support::{TestApp, spawn_app};

const KEY: &str = "audit-anchor-test-key-0123456789abcdef";
const OLD_KEY: &str = "audit-anchor-retired-key-0123456789abcd";

/// `penora-ops args` on the app's database, with `env`.
async fn ops(app: &TestApp, args: &[&str], env: &[(&str, &str)]) -> Output {
    let binary =
        std::path::PathBuf::from(env!("CARGO_BIN_EXE_penora-api")).with_file_name("penora-ops");
    tokio::process::Command::new(binary)
        .args(args)
        .env("DATABASE_URL", &app.db.url)
        .env_remove("AUDIT_HMAC_KEY")
        .envs(env.iter().copied())
        .output()
        .await
        .expect("penora-ops runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `user`'s ledger entry ids, oldest first.
async fn entries(app: &TestApp, user: &str) -> Vec<i64> {
    let c = app.pool.get().await.expect("db");
    c.query(
        "SELECT id FROM ledger_entries WHERE user_id = $1 ORDER BY id",
        &[&user],
    )
    .await
    .expect("entries")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Records `user`'s entries `ids` as the worker does, with `key`'s MACs.
async fn record(app: &TestApp, key: Option<&str>, user: &str, ids: &[i64]) {
    let key = key.map(|k| MacKey::new(&Secret::new(k)).expect("key"));
    let mut c = app.pool.get().await.expect("db");
    let items: Vec<(String, i64)> = ids.iter().map(|id| (user.to_owned(), *id)).collect();
    let answers = audit::append_many(&mut c, key.as_ref(), &items)
        .await
        .expect("recorded");
    assert!(
        answers
            .iter()
            .all(|a| matches!(a, audit::Appended::Recorded(_))),
        "{answers:?}"
    );
}

/// Checks `user`'s chain up to its head as the worker's `ledger-audit` job
/// does, with `key`'s MAC on the checkpoint.
async fn check(app: &TestApp, key: Option<&str>, user: &str) {
    let key = key.map(|k| MacKey::new(&Secret::new(k)).expect("key"));
    let ids = entries(app, user).await;
    let chain = penora_domain::messages::CommittedChain {
        user_id: user.to_owned(),
        seq: ids.len() as i64,
        entry_ids: ids,
    };
    let checked = penora_ledger::checkpoint::check_commits(&app.pool, key.as_ref(), &[chain])
        .await
        .expect("checked");
    assert!(
        matches!(
            checked.get(user),
            Some(penora_ledger::checkpoint::Checked::Checked { .. })
        ),
        "{checked:?}"
    );
}

/// Rewrites `user`'s chain in the ledger as a superuser would: entry
/// `entry`'s description changed, then every link's hash, the head and the
/// checkpoint's hash recomputed, the guard switched off meanwhile. The
/// checkpoint's MAC stays: making a new one takes the key.
async fn rewrite_ledger_chain(app: &TestApp, entry: i64) {
    let mut c = app.pool.get().await.expect("db");
    let tx = c.transaction().await.expect("tx");
    tx.batch_execute(&format!(
        "ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_append_only;
         UPDATE ledger_entries SET description = 'forged' WHERE id = {entry};"
    ))
    .await
    .expect("edited");
    penora_testing::rechain(&tx).await;
    tx.batch_execute("ALTER TABLE ledger_entries ENABLE TRIGGER ledger_entries_append_only")
        .await
        .expect("guard on");
    tx.commit().await.expect("the chain rewritten");
}

#[tokio::test]
async fn a_chain_rewritten_inside_the_database_passes_without_the_key_and_fails_with_it() {
    let app = spawn_app().await;
    app.grant("alice", 20).await;
    app.deduct("alice", 3, "gen-1").await;
    app.deduct("alice", 4, "gen-2").await;
    let ids = entries(&app, "alice").await;
    check(&app, Some(KEY), "alice").await;
    let with_key = [("AUDIT_HMAC_KEY", KEY)];
    let clean = ops(&app, &["audit", "verify"], &with_key).await;
    assert!(clean.status.success(), "{clean:?}");
    assert!(
        stdout(&clean).contains("checkpoints: 1 (1 with a MAC, checked)"),
        "{}",
        stdout(&clean)
    );

    rewrite_ledger_chain(&app, ids[0]).await;
    // The hole the key closes: the database alone vouches for the rewrite.
    let blind = ops(&app, &["audit", "verify"], &[]).await;
    assert!(blind.status.success(), "{blind:?}");
    let out = stdout(&blind);
    assert!(
        out.contains("audit OK") && out.contains("1 with a MAC, NOT checked"),
        "{out}"
    );
    let checked = ops(&app, &["audit", "verify"], &with_key).await;
    assert_eq!(checked.status.code(), Some(1), "{checked:?}");
    let out = stdout(&checked);
    assert!(
        out.contains("the checkpoint (link 3) has a MAC that AUDIT_HMAC_KEY did not make")
            && out.contains("alice"),
        "{out}"
    );
    // Another key does not pass for this one.
    let wrong = ops(
        &app,
        &["audit", "verify"],
        &[("AUDIT_HMAC_KEY", "someone-elses-key-0123456789abcdef0123")],
    )
    .await;
    assert_eq!(wrong.status.code(), Some(1), "{wrong:?}");
}

/// The old chain (records, before V18) keeps its own anchor: the tests below
/// write records for entries as the old worker did.
#[tokio::test]
async fn records_from_before_the_key_are_counted_and_a_removed_mac_is_found() {
    let app = spawn_app().await;
    app.grant("bob", 20).await;
    for code in ["a", "b", "c"] {
        app.deduct("bob", 1, code).await;
    }
    let ids = entries(&app, "bob").await;
    // Two records before the key was set, two after.
    record(&app, None, "bob", &ids[..2]).await;
    record(&app, Some(KEY), "bob", &ids[2..]).await;
    let with_key = [("AUDIT_HMAC_KEY", KEY)];
    let ok = ops(&app, &["audit", "verify", "--json"], &with_key).await;
    assert!(ok.status.success(), "{ok:?}");
    let report: serde_json::Value = serde_json::from_slice(&ok.stdout).expect("json");
    assert_eq!(report["macs_checked"], serde_json::json!(true), "{report}");
    assert_eq!(report["records_with_mac"], serde_json::json!(2), "{report}");
    assert_eq!(
        report["records_without_mac"],
        serde_json::json!(2),
        "{report}"
    );
    assert!(
        stdout(&ops(&app, &["audit", "verify"], &with_key).await)
            .contains("2 records written before the key was set carry none")
    );
    // Where the key was set from the first record, a record without one fails.
    let required = ops(&app, &["audit", "verify", "--require-mac"], &with_key).await;
    assert_eq!(required.status.code(), Some(1), "{required:?}");
    assert!(
        stdout(&required).contains(&format!("record 1 (entry {}) has no MAC", ids[0])),
        "{}",
        stdout(&required)
    );

    // A MAC removed after the chain's first MAC: found, with the key or without.
    let c = app.pool.get().await.expect("db");
    c.batch_execute(
        "BEGIN;
         ALTER TABLE audit_records DISABLE TRIGGER audit_records_append_only;
         UPDATE audit_records SET mac = NULL WHERE user_id = 'bob' AND seq = 4;
         ALTER TABLE audit_records ENABLE TRIGGER audit_records_append_only;
         COMMIT;",
    )
    .await
    .expect("MAC removed");
    for env in [&with_key[..], &[]] {
        let found = ops(&app, &["audit", "verify"], env).await;
        assert_eq!(found.status.code(), Some(1), "{found:?}");
        let out = stdout(&found);
        assert!(
            out.contains(&format!(
                "record 4 (entry {}) has no MAC, but record 3 before it has one",
                ids[3]
            )),
            "{out}"
        );
    }
}

#[tokio::test]
async fn after_a_key_rotation_records_keep_the_old_keys_mac_and_verify_with_it() {
    let app = spawn_app().await;
    app.grant("carol", 20).await;
    app.deduct("carol", 2, "x").await;
    app.deduct("carol", 2, "y").await;
    let ids = entries(&app, "carol").await;
    record(&app, Some(OLD_KEY), "carol", &ids[..2]).await;
    record(&app, Some(KEY), "carol", &ids[2..]).await;
    let with_key = [("AUDIT_HMAC_KEY", KEY)];
    let only_new = ops(&app, &["audit", "verify"], &with_key).await;
    assert_eq!(only_new.status.code(), Some(1), "{only_new:?}");
    assert!(
        stdout(&only_new).contains("record 1 "),
        "{}",
        stdout(&only_new)
    );

    let dir = std::env::temp_dir().join(format!("penora-keys-{}", app.db.name));
    std::fs::write(&dir, format!("\n{OLD_KEY}\n")).expect("keys file");
    let path = dir.to_string_lossy().into_owned();
    let both = ops(
        &app,
        &["audit", "verify", "--previous-keys", &path],
        &with_key,
    )
    .await;
    assert!(both.status.success(), "{both:?}");
    assert!(
        stdout(&both).contains("MACs: 3 records checked"),
        "{}",
        stdout(&both)
    );
    // The retired keys only with the current one.
    let alone = ops(&app, &["audit", "verify", "--previous-keys", &path], &[]).await;
    let _ = std::fs::remove_file(&dir);
    assert_eq!(alone.status.code(), Some(2), "{alone:?}");
}

#[tokio::test]
async fn a_chain_whose_every_mac_was_stripped_is_found_against_the_count_kept_outside() {
    let app = spawn_app().await;
    app.grant("eve", 20).await;
    for code in ["a", "b", "c"] {
        app.deduct("eve", 1, code).await;
    }
    let ids = entries(&app, "eve").await;
    record(&app, None, "eve", &ids[..1]).await;
    record(&app, Some(KEY), "eve", &ids[1..]).await;
    let with_key = [("AUDIT_HMAC_KEY", KEY)];
    // The operator noted, when the key came, how many records had none: 1.
    let args = ["audit", "verify", "--max-records-without-mac", "1"];
    let ok = ops(&app, &args, &with_key).await;
    assert!(ok.status.success(), "{ok:?}");
    // A superuser strips every MAC of the chain: each record then looks as
    // if written before the key, and no link is broken.
    let c = app.pool.get().await.expect("db");
    c.batch_execute(
        "BEGIN;
         ALTER TABLE audit_records DISABLE TRIGGER audit_records_append_only;
         UPDATE audit_records SET mac = NULL WHERE user_id = 'eve';
         ALTER TABLE audit_records ENABLE TRIGGER audit_records_append_only;
         COMMIT;",
    )
    .await
    .expect("MACs removed");
    let plain = ops(&app, &["audit", "verify"], &with_key).await;
    assert!(
        plain.status.success(),
        "the hole this option closes: {plain:?}"
    );
    let found = ops(&app, &args, &with_key).await;
    assert_eq!(found.status.code(), Some(1), "{found:?}");
    assert!(
        stdout(&found).contains("MACs were removed"),
        "{}",
        stdout(&found)
    );
}
