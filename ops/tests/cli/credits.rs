//! `penora-ops credits`: grants once per reference, a user's lots, and
//! voiding one.

use time::{Duration, OffsetDateTime};

use crate::support::{ops_on, stack, stderr, stdout};

#[tokio::test]
async fn credits_grant_is_idempotent_by_reference() {
    let db = penora_testing::TestDb::new().await;
    let grant = [
        "credits",
        "grant",
        "buyer",
        "250",
        "--reason",
        "purchase",
        "--reference",
        "pay_9",
    ];
    let first = ops_on(&db.url, &grant).await;
    assert!(first.status.success(), "{first:?}");
    let again = ops_on(&db.url, &grant).await;
    assert!(again.status.success(), "{again:?}");
    assert!(
        stdout(&again).contains("already granted: nothing moved"),
        "{}",
        stdout(&again)
    );
    let pool = penora_store::pool_for(&db.url, 1).expect("pool");
    let balance: i64 = pool
        .get()
        .await
        .expect("db")
        .query_one("SELECT balance FROM accounts WHERE user_id = 'buyer'", &[])
        .await
        .expect("balance")
        .get(0);
    assert_eq!(balance, 250);
    let zero = ops_on(
        &db.url,
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
    assert_eq!(zero.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_lots_are_listed_and_a_voided_lot_takes_its_credits_once() {
    let s = stack().await;
    let paid = s
        .ops(&[
            "credits",
            "grant",
            "u1",
            "30",
            "--reason",
            "purchase",
            "--reference",
            "pay-1",
        ])
        .await;
    assert!(paid.status.success(), "{paid:?}");
    assert!(
        stdout(&paid).contains("granted 30 paid credits to u1"),
        "{}",
        stdout(&paid)
    );
    let in_a_week = OffsetDateTime::now_utc() + Duration::days(7);
    let expires = penora_domain::timefmt::rfc3339_millis(in_a_week);
    let promo = s
        .ops(&[
            "credits",
            "grant",
            "u1",
            "10",
            "--reason",
            "welcome",
            "--reference",
            "promo-1",
            "--category",
            "promotional",
            "--expires-at",
            &expires,
        ])
        .await;
    assert!(promo.status.success(), "{promo:?}");
    assert!(
        stdout(&promo).contains(&format!("expires {expires}")),
        "{}",
        stdout(&promo)
    );
    assert_eq!(s.balance("u1").await, 40);

    let lots = stdout(&s.ops(&["credits", "lots", "u1"]).await);
    assert!(
        lots.contains("promotional") && lots.contains("paid") && lots.contains("2 lots"),
        "{lots}"
    );
    let active = stdout(
        &s.ops(&["credits", "lots", "u1", "--status", "active"])
            .await,
    );
    assert!(active.contains("2 lots"), "{active}");

    let lot = s
        .scalar(
            "SELECT lot_id FROM credit_lots WHERE user_id = $1 AND category = 'promotional'",
            "u1",
        )
        .await
        .to_string();
    let voided = s
        .ops(&["credits", "void", "u1", &lot, "--reason", "abuse"])
        .await;
    assert!(voided.status.success(), "{voided:?}");
    assert!(
        stdout(&voided).contains("10 credits voided; spendable balance 30"),
        "{}",
        stdout(&voided)
    );
    assert_eq!(s.balance("u1").await, 30);
    let listed = stdout(
        &s.ops(&["credits", "lots", "u1", "--status", "voided"])
            .await,
    );
    assert!(
        listed.contains("1 lots") && listed.contains("promotional"),
        "{listed}"
    );
    let again = s
        .ops(&["credits", "void", "u1", &lot, "--reason", "abuse"])
        .await;
    assert!(again.status.success(), "{again:?}");
    assert!(
        stdout(&again).contains("nothing moved"),
        "{}",
        stdout(&again)
    );
    assert_eq!(s.balance("u1").await, 30, "voided once");

    let bad_status = s.ops(&["credits", "lots", "u1", "--status", "gone"]).await;
    assert_eq!(bad_status.status.code(), Some(2));
    assert!(
        stderr(&bad_status).contains("--status must be"),
        "{bad_status:?}"
    );
    let past = s
        .ops(&[
            "credits",
            "grant",
            "u1",
            "5",
            "--reason",
            "late",
            "--reference",
            "promo-2",
            "--expires-at",
            "2000-01-01T00:00:00Z",
        ])
        .await;
    assert_eq!(past.status.code(), Some(2));
    assert!(stderr(&past).contains("in the future"), "{past:?}");
    let clean = s.ops(&["reconcile"]).await;
    assert!(clean.status.success(), "{}", stdout(&clean));
}

/// A grant's fields have one set of rules (`penora_ledger::grant_rules`):
/// `penora-ops credits grant` refuses what `add-credits` refuses, in its
/// words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_grant_refuses_what_add_credits_refuses_in_the_same_words() {
    let s = stack().await;
    for (flags, fields, words) in [
        (
            &["--priority", "101"][..],
            serde_json::json!({"priority": 101}),
            "priority: must be a whole number from 0 to 100",
        ),
        (
            &["--category", "gift"][..],
            serde_json::json!({"category": "gift"}),
            "category: must be \"paid\" or \"promotional\"",
        ),
        (
            &["--expires-at", "2020-01-01T00:00:00Z"][..],
            serde_json::json!({"expires_at": "2020-01-01T00:00:00Z"}),
            "expires_at: must be in the future",
        ),
        (
            &["--expires-at", "soon"][..],
            serde_json::json!({"expires_at": "soon"}),
            "expires_at: must be an RFC 3339 time such as 2025-09-27T06:00:00Z",
        ),
    ] {
        let mut args = vec![
            "credits",
            "grant",
            "buyer",
            "5",
            "--reason",
            "purchase",
            "--reference",
            "pay_1",
        ];
        args.extend_from_slice(flags);
        let o = s.ops(&args).await;
        assert_eq!(o.status.code(), Some(2), "{flags:?}: {o:?}");
        assert!(stderr(&o).contains(words), "{flags:?}: {}", stderr(&o));

        let mut body = serde_json::json!({"user_id": "buyer", "amount": 5,
                                          "reason": "purchase", "reference": "pay_1"});
        if let (Some(body), Some(fields)) = (body.as_object_mut(), fields.as_object()) {
            body.extend(fields.clone());
        }
        let r = s.post("/api/unified/add-credits", &body).await;
        assert_eq!(r.status(), reqwest::StatusCode::BAD_REQUEST, "{fields}");
        let answer: serde_json::Value = r.json().await.expect("json");
        assert_eq!(answer["code"], "invalid_request", "{answer}");
        assert_eq!(answer["error"], words, "{answer}");
    }
    assert_eq!(
        s.scalar("SELECT count(*) FROM accounts WHERE user_id = $1", "buyer")
            .await,
        0,
        "nothing was granted"
    );
}
