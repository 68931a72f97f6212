//! Migrations that rewrite data, run on data an earlier version wrote.
//! (`penora-ops migrate` itself is tested with the CLI, in `ops/tests`.)

use penora_testing::TestDb;

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
        acted_by: None,
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
