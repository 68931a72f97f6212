//! `penora-ops migrate`: the only command that changes the schema, safe to
//! run from several processes at once.

use std::process::Output;

use penora_testing::TestDb;

use crate::support::{bare_database, ops_on, stderr};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_started_at_once_by_several_processes_all_succeed() {
    let db = TestDb::new().await;
    // A fresh, empty database of its own.
    let (client, name, url) = bare_database(&db, "fresh").await;
    let runs: Vec<tokio::task::JoinHandle<Output>> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { ops_on(&url, &["migrate"]).await })
        })
        .collect();
    for run in runs {
        let out = run.await.expect("task");
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
    let refused = ops_on(&url, &["reconcile"]).await;
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    let why = stderr(&refused);
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
    let migrated = ops_on(&url, &["migrate"]).await;
    assert!(migrated.status.success(), "{migrated:?}");
    let after = ops_on(&url, &["reconcile"]).await;
    assert!(after.status.success(), "{after:?}");
    drop(bare);
    client
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await
        .expect("dropped");
}
