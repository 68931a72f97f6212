//! `penora-ops reconcile`: passes on the data the services write and names
//! the users whose data was edited behind their back.

use crate::support::{stack, stdout};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_passes_on_clean_data_and_names_the_users_after_corruption() {
    let s = stack().await;
    s.grant("alice", 50).await;
    s.grant("bob", 50).await;
    s.deduct("alice", 5, "a1").await;
    let clean = s.ops(&["reconcile"]).await;
    assert!(clean.status.success(), "{clean:?}");
    assert!(
        stdout(&clean).contains("reconcile OK"),
        "{}",
        stdout(&clean)
    );

    let client = s.pool.get().await.expect("db");
    client
        .batch_execute(
            "UPDATE accounts SET balance = balance + 7 WHERE user_id = 'bob'; \
             UPDATE accounts SET storage_used_bytes = 2000000 WHERE user_id = 'alice'",
        )
        .await
        .expect("corrupted");
    let broken = s.ops(&["reconcile"]).await;
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
    let json = s.ops(&["reconcile", "--json"]).await;
    assert_eq!(json.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json report");
    // Bob's balance disagrees with his ledger and with his lots (§12);
    // Alice's storage with her projects.
    assert_eq!(report["violations"].as_array().map(Vec::len), Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_finds_a_reservation_refunded_beyond_what_it_reserved() {
    let s = stack().await;
    s.grant("carol", 20).await;
    s.deduct("carol", 5, "c1").await;
    let client = s.pool.get().await.expect("db");
    // Two whole refunds of the reservation written behind the service's
    // back. (A reservation may be refunded in several parts, each with a
    // reference of its own; refunds without a reference are one per
    // reservation, and the unique index that says so is dropped first.)
    // One statement a call (Citus runs multi-statement strings only one by one).
    for sql in [
        "DROP INDEX ledger_one_refund_per_reservation",
        "INSERT INTO ledger_entries (user_id, kind, amount, balance_after, app_name, project_code) \
           VALUES ('carol', 'refund', 5, 20, 'imagegene', 'c1'), ('carol', 'refund', 5, 25, 'imagegene', 'c1')",
        "UPDATE accounts SET balance = 25 WHERE user_id = 'carol'",
    ] {
        client.batch_execute(sql).await.expect("corrupted");
    }
    let broken = s.ops(&["reconcile"]).await;
    assert_eq!(broken.status.code(), Some(1));
    let out = stdout(&broken);
    assert!(
        out.contains("carol") && out.contains("invariant 4") && out.contains("2 refunds"),
        "{out}"
    );
}
