//! `penora-ops allowances`: set (the first period granted at once, once),
//! list, summary and delete, as an operator runs them.

use crate::support::{ops_on, stdout};

#[tokio::test]
async fn an_operator_sets_lists_summarises_and_deletes_allowances() {
    let db = penora_testing::TestDb::new().await;
    let set = [
        "allowances",
        "set",
        "--user",
        "sub_1",
        "--id",
        "pro",
        "--amount",
        "500",
        "--period",
        "month",
        "--max-rollover",
        "100",
    ];
    let first = ops_on(&db.url, &set).await;
    assert!(first.status.success(), "{first:?}");
    assert!(stdout(&first).contains("made"), "{}", stdout(&first));
    assert!(stdout(&first).contains("granted now"), "{}", stdout(&first));
    let again = ops_on(&db.url, &set).await;
    assert!(stdout(&again).contains("unchanged"), "{}", stdout(&again));
    assert!(
        stdout(&again).contains("granted before"),
        "{}",
        stdout(&again)
    );
    let daily = [
        "allowances",
        "set",
        "--user",
        "sub_2",
        "--id",
        "daily",
        "--amount",
        "20",
        "--period",
        "day",
        "--category",
        "paid",
    ];
    assert!(ops_on(&db.url, &daily).await.status.success());
    let bad = ops_on(
        &db.url,
        &[
            "allowances",
            "set",
            "--user",
            "sub_3",
            "--id",
            "x",
            "--amount",
            "5",
            "--period",
            "year",
        ],
    )
    .await;
    assert_eq!(bad.status.code(), Some(2));

    let pool = penora_store::pool_for(&db.url, 1).expect("pool");
    let c = pool.get().await.expect("db");
    let balance: i64 = c
        .query_one("SELECT balance FROM accounts WHERE user_id = 'sub_1'", &[])
        .await
        .expect("balance")
        .get(0);
    assert_eq!(balance, 500, "granted once");

    let list = ops_on(&db.url, &["allowances", "list", "--user", "sub_1"]).await;
    assert!(stdout(&list).contains("pro"), "{}", stdout(&list));
    assert!(stdout(&list).contains("1 allowances"), "{}", stdout(&list));
    let summary = ops_on(&db.url, &["allowances", "summary", "--json"]).await;
    let rows: serde_json::Value = serde_json::from_str(&stdout(&summary)).expect("json");
    assert_eq!(
        rows,
        serde_json::json!([
            {"period": "day", "category": "paid", "users": 1, "allowances": 1},
            {"period": "month", "category": "promotional", "users": 1, "allowances": 1},
        ])
    );
    let del = ["allowances", "delete", "--user", "sub_1", "--id", "pro"];
    assert!(ops_on(&db.url, &del).await.status.success());
    assert_eq!(ops_on(&db.url, &del).await.status.code(), Some(2));
    let reconcile = ops_on(&db.url, &["reconcile"]).await;
    assert!(reconcile.status.success(), "{}", stdout(&reconcile));
}
