//! `penora-ops limits`: set, list, delete and summarise spend limits, with
//! the ledger's rules (the account must exist; spending before the limit
//! counts; bad input exits 2 and changes nothing).

use crate::support::{ops_on, stderr, stdout};

#[tokio::test]
async fn limits_are_set_listed_summarised_and_deleted_as_the_api_does() {
    let db = penora_testing::TestDb::new().await;
    let grant = [
        "credits",
        "grant",
        "kid",
        "100",
        "--reason",
        "pocket money",
        "--reference",
        "g1",
    ];
    assert!(ops_on(&db.url, &grant).await.status.success());
    let nobody = ops_on(
        &db.url,
        &[
            "limits",
            "set",
            "nobody",
            "--period",
            "day",
            "--max-credits",
            "5",
        ],
    )
    .await;
    assert_eq!(nobody.status.code(), Some(2), "{}", stderr(&nobody));
    let bad = ops_on(
        &db.url,
        &[
            "limits",
            "set",
            "kid",
            "--period",
            "year",
            "--max-credits",
            "5",
        ],
    )
    .await;
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("period"), "{}", stderr(&bad));

    let set = ops_on(
        &db.url,
        &[
            "limits",
            "set",
            "kid",
            "--period",
            "day",
            "--max-credits",
            "20",
            "--app",
            "imagegene",
        ],
    )
    .await;
    assert!(set.status.success(), "{}", stderr(&set));
    let set = ops_on(
        &db.url,
        &[
            "limits",
            "set",
            "kid",
            "--period",
            "month",
            "--max-credits",
            "60",
        ],
    )
    .await;
    assert!(set.status.success(), "{}", stderr(&set));
    let listed = ops_on(&db.url, &["limits", "list", "kid", "--json"]).await;
    let views: serde_json::Value = serde_json::from_str(&stdout(&listed)).expect("JSON");
    assert_eq!(views.as_array().map(Vec::len), Some(2), "{views}");
    assert!(
        views
            .as_array()
            .into_iter()
            .flatten()
            .all(|v| v["spent"] == 0)
    );

    let summary = ops_on(&db.url, &["limits", "summary", "--json"]).await;
    let summary: serde_json::Value = serde_json::from_str(&stdout(&summary)).expect("JSON");
    assert_eq!(summary["users_with_limits"], 1, "{summary}");
    assert_eq!(
        summary["limits"].as_array().map(Vec::len),
        Some(2),
        "{summary}"
    );

    let deleted = ops_on(
        &db.url,
        &[
            "limits",
            "delete",
            "kid",
            "--period",
            "day",
            "--app",
            "imagegene",
        ],
    )
    .await;
    assert!(deleted.status.success(), "{}", stderr(&deleted));
    let again = ops_on(
        &db.url,
        &[
            "limits",
            "delete",
            "kid",
            "--period",
            "day",
            "--app",
            "imagegene",
        ],
    )
    .await;
    assert_eq!(again.status.code(), Some(2), "no such limit");
    let listed = ops_on(&db.url, &["limits", "list", "kid"]).await;
    assert!(stdout(&listed).contains("month"), "{}", stdout(&listed));
    assert!(
        !stdout(&listed).contains("imagegene"),
        "{}",
        stdout(&listed)
    );
}
