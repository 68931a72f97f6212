//! Money at the edges (CONTRACT §11): one held account never holds up the
//! others, a client that goes away is not charged, and a full queue answers
//! at once instead of growing.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use reqwest::StatusCode;
use serde_json::json;
use tokio::sync::oneshot;

use crate::support::{BOOT_KEY, TestApp, expect_error, spawn_app_with};

/// Holds `sql` (a lock) in a transaction of its own connection until
/// `release` fires; returns once the lock is taken.
async fn hold(app: &TestApp, sql: &'static str, user: &str) -> oneshot::Sender<()> {
    let (release, released) = oneshot::channel::<()>();
    let (taken, is_taken) = oneshot::channel::<()>();
    let pool = app.pool.clone();
    let user = user.to_owned();
    tokio::spawn(async move {
        let mut c = pool.get().await.expect("db");
        let tx = c.transaction().await.expect("begin");
        if sql.contains("$1") {
            tx.execute(sql, &[&user]).await.expect("lock");
        } else {
            tx.batch_execute(sql).await.expect("lock");
        }
        let _ = taken.send(());
        let _ = released.await;
        tx.rollback().await.expect("rollback");
    });
    is_taken.await.expect("the lock was taken");
    release
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_locked_account_never_holds_up_the_other_users() {
    let app =
        Arc::new(spawn_app_with(&[("DB_POOL_SIZE", "16"), ("DB_LOCK_TIMEOUT_MS", "3000")]).await);
    let others: Vec<String> = (0..200).map(|i| format!("other_{i:03}")).collect();
    app.grant("held", 100).await;
    for user in &others {
        app.grant(user, 10).await;
    }
    let ledger_before = app.ledger_rows("held").await;

    // An operator's long transaction holds the account for 10 s.
    let release = hold(
        &app,
        "SELECT 1 FROM accounts WHERE user_id = $1 FOR UPDATE",
        "held",
    )
    .await;
    let locked_at = Instant::now();

    // Requests for the held account itself wait, at most the lock timeout.
    let mut held = Vec::new();
    for i in 0..5 {
        let app = app.clone();
        held.push(tokio::spawn(async move {
            let started = Instant::now();
            let r = app
                .post(
                    "/api/unified/deduct-credits",
                    &json!({"user_id": "held", "amount": 7, "app_name": "imagegene",
                            "project_code": format!("held_{i}")}),
                )
                .await;
            (r, started.elapsed())
        }));
    }
    // 200 deductions for other users, spread over the 10 s, 20 at a time.
    let mut latencies = Vec::new();
    for wave in others.chunks(20) {
        let mut tasks = Vec::new();
        for user in wave {
            let app = app.clone();
            let user = user.clone();
            tasks.push(tokio::spawn(async move {
                let started = Instant::now();
                let (status, body) = app.deduct(&user, 3, &format!("{user}_img")).await;
                assert_eq!(status, StatusCode::OK, "{user}: {body}");
                started.elapsed()
            }));
        }
        for t in tasks {
            latencies.push(t.await.expect("task"));
        }
        tokio::time::sleep(Duration::from_millis(900)).await;
    }
    assert!(
        locked_at.elapsed() < Duration::from_secs(12),
        "the waves themselves took {:?}",
        locked_at.elapsed()
    );
    latencies.sort();
    let p99 = percentile(&latencies, 0.99);
    eprintln!(
        "other users' deductions while one account is held: n={} p50={:?} p99={:?} max={:?}",
        latencies.len(),
        percentile(&latencies, 0.50),
        p99,
        latencies.last().copied().unwrap_or_default()
    );
    assert!(p99 < Duration::from_secs(1), "p99 {p99:?}");

    for t in held {
        let (r, waited) = t.await.expect("task");
        assert!(
            waited >= Duration::from_millis(2900) && waited < Duration::from_millis(6500),
            "a request for the held account waited {waited:?} (lock timeout 3 s)"
        );
        expect_error(r, StatusCode::SERVICE_UNAVAILABLE, "unavailable").await;
    }
    let _ = release.send(());
    // Nothing moved for the held account, and it works again at once.
    assert_eq!(app.balance("held").await, 100);
    assert_eq!(app.ledger_rows("held").await, ledger_before);
    assert_eq!(
        app.scalar(
            "SELECT count(*) FROM reservations WHERE user_id = $1",
            "held"
        )
        .await,
        0
    );
    let (status, body) = app.deduct("held", 7, "held_after").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["new_balance"], json!(93));
    for user in others.iter().step_by(37) {
        assert_eq!(app.balance(user).await, 7);
    }
    app.assert_reconciled().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_goes_away_while_its_request_waits_is_not_charged() {
    let app = Arc::new(spawn_app_with(&[("DB_LOCK_TIMEOUT_MS", "5000")]).await);
    app.grant("leaver", 100).await;
    let release = hold(
        &app,
        "SELECT 1 FROM accounts WHERE user_id = $1 FOR UPDATE",
        "leaver",
    )
    .await;
    // The first request waits for the account's lock.
    let first = {
        let app = app.clone();
        tokio::spawn(async move { app.deduct("leaver", 10, "stays").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The second waits behind it, and its client gives up after 300 ms.
    let gone = app
        .http
        .post(format!("{}/api/unified/deduct-credits", app.base))
        .header("X-API-Key", BOOT_KEY)
        .timeout(Duration::from_millis(300))
        .json(
            &json!({"user_id": "leaver", "amount": 20, "app_name": "imagegene",
                      "project_code": "goes-away"}),
        )
        .send()
        .await;
    assert!(
        gone.as_ref().is_err_and(|e| e.is_timeout()),
        "the impatient client should have timed out: {gone:?}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = release.send(());

    let (status, body) = first.await.expect("task");
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["new_balance"], json!(90));
    // Give the lane time to reach the abandoned request.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.balance("leaver").await, 90);
    assert_eq!(
        app.scalar(
            "SELECT count(*) FROM reservations WHERE user_id = $1 AND project_code = 'goes-away'",
            "leaver"
        )
        .await,
        0,
        "the request whose client went away was carried out"
    );
    // Its key is still free: the client's retry goes through once.
    let (status, body) = app.deduct("leaver", 20, "goes-away").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["new_balance"], json!(70));
    app.assert_reconciled().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_deduction_queue_answers_busy_at_once_and_moves_nothing() {
    let app = Arc::new(
        spawn_app_with(&[
            ("DEDUCT_QUEUE_MAX", "2"),
            ("DEDUCT_BATCHES_IN_FLIGHT", "1"),
            ("DEDUCT_BATCH_MAX", "1"),
            ("DB_LOCK_TIMEOUT_MS", "8000"),
        ])
        .await,
    );
    app.grant("crowd", 1000).await;
    // A table lock stops every batch (a row lock would be skipped).
    let release = hold(&app, "LOCK TABLE accounts IN SHARE MODE", "").await;
    let mut tasks = Vec::new();
    for i in 0..30 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let r = app
                .post(
                    "/api/unified/deduct-credits",
                    &json!({"user_id": "crowd", "amount": 1, "app_name": "imagegene",
                            "project_code": format!("crowd_{i}")}),
                )
                .await;
            (r, started.elapsed())
        }));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = release.send(());
    let (mut ok, mut busy) = (0, 0);
    for t in tasks {
        let (r, took) = t.await.expect("task");
        match r.status() {
            StatusCode::OK => ok += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                let retry_after = r.headers().get("retry-after").cloned();
                expect_error(r, StatusCode::SERVICE_UNAVAILABLE, "busy").await;
                assert_eq!(retry_after.as_ref().map(|v| v.as_bytes()), Some(&b"1"[..]));
                assert!(took < Duration::from_millis(400), "busy after {took:?}");
                busy += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    // One in its batch, two waiting; every other one was turned away.
    assert!(ok <= 3 + 1 && busy >= 26, "ok {ok}, busy {busy}");
    assert_eq!(app.balance("crowd").await, 1000 - ok);
    assert_eq!(
        app.scalar(
            "SELECT count(*) FROM reservations WHERE user_id = $1",
            "crowd"
        )
        .await,
        ok
    );
    app.assert_reconciled().await;
}

// ------------------------------------------------------- event time

mod event_time {
    use penora_domain::{AppName, ProjectCode, UserId};
    use penora_ledger as ledger;
    use penora_ledger::{LedgerError, QueuedRefund, Refund, SettledBy};
    use reqwest::StatusCode;
    use serde_json::json;
    use time::{Duration, OffsetDateTime};

    use crate::support::{TestApp, expect_error, spawn_app};

    /// A reservation of 10 made `age` ago with a window of one hour.
    async fn reservation(app: &TestApp, user: &str, code: &str, age: Duration) -> OffsetDateTime {
        let (status, body) = app.deduct(user, 10, code).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        // The clock the test controls: move the reservation back in time.
        let c = app.pool.get().await.expect("db");
        let row = c
            .query_one(
                "UPDATE reservations SET created_at = created_at - make_interval(secs => $2), \
                        refundable_until = refundable_until - make_interval(secs => $2) \
                 WHERE project_code = $1 RETURNING created_at",
                &[&code, &age.as_seconds_f64()],
            )
            .await
            .expect("moved back");
        row.get(0)
    }

    async fn settle(app: &TestApp, user: &str, code: &str, by: SettledBy) -> ledger::SettleResult {
        let mut c = app.pool.get().await.expect("db");
        ledger::settle(
            &mut c,
            &UserId::parse(user).expect("user"),
            &AppName::imagegene(),
            &ProjectCode::parse(code).expect("code"),
            (by, "test"),
            None,
            None,
        )
        .await
        .expect("settle")
    }

    async fn failed_event(
        app: &TestApp,
        user: &str,
        code: &str,
        event: &str,
        at: OffsetDateTime,
    ) -> ledger::Answer<ledger::RefundReceipt> {
        let mut c = app.pool.get().await.expect("db");
        ledger::refund_one(
            &mut c,
            QueuedRefund {
                refund: Refund {
                    user_id: UserId::parse(user).expect("user"),
                    project_code: ProjectCode::parse(code).expect("code"),
                    app_name: Some(AppName::imagegene()),
                    reason: Some("failed".into()),
                    amount: None,
                    reference: None,
                    acted_by: None,
                },
                event_id: Some(event.into()),
                correlation_id: None,
                event_time: Some(ledger::EventTime {
                    at,
                    clock_skew: std::time::Duration::from_secs(60),
                }),
            },
        )
        .await
    }

    fn refused(answer: ledger::Answer<ledger::RefundReceipt>, why: &str) {
        match answer {
            Err(LedgerError::NotRefundable(m)) => assert!(m.contains(why), "{m}"),
            other => panic!("expected not_refundable ({why}), got {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_time_of_the_event_decides_and_is_clamped() {
        let app = spawn_app().await;
        app.grant("u", 100).await;
        let hour = Duration::hours(1);
        let now = OffsetDateTime::now_utc();

        // Window passed, settled by the timer: an event from inside it refunds,
        // with its ledger entry and audit job.
        let made = reservation(&app, "u", "inside", Duration::minutes(90)).await;
        settle(&app, "u", "inside", SettledBy::Window).await;
        let jobs = app.job_rows("u").await;
        let got = failed_event(&app, "u", "inside", "e1", made + Duration::minutes(10))
            .await
            .expect("refunded");
        assert!(!got.replayed);
        assert_eq!(got.value.credits_refunded, 10);
        assert_eq!(app.balance("u").await, 100, "back to the grant");
        assert_eq!(app.job_rows("u").await, jobs + 1, "the refund's audit job");
        // Asked again (another event): the first refund's answer.
        let again = failed_event(&app, "u", "inside", "e1b", made)
            .await
            .expect("replay");
        assert!(again.replayed);
        assert_eq!(app.balance("u").await, 100);

        // An event from after the window: refused.
        let made = reservation(&app, "u", "outside", Duration::minutes(90)).await;
        settle(&app, "u", "outside", SettledBy::Window).await;
        refused(
            failed_event(
                &app,
                "u",
                "outside",
                "e2",
                made + hour + Duration::minutes(5),
            )
            .await,
            "closed",
        );
        // In the future: clamped to now, which is past the window.
        refused(
            failed_event(&app, "u", "outside", "e3", now + Duration::days(1)).await,
            "closed",
        );
        // Long before the reservation existed: not about it, refused (it
        // used to be clamped to the creation, inside the window: a way to
        // get credits back long after the window closed).
        let made = reservation(&app, "u", "early", Duration::minutes(90)).await;
        settle(&app, "u", "early", SettledBy::Window).await;
        refused(
            failed_event(&app, "u", "early", "e4", now - Duration::days(400)).await,
            "before reservation",
        );
        // Within the clock skew before it: counts as made with it, inside.
        failed_event(&app, "u", "early", "e4b", made - Duration::seconds(30))
            .await
            .expect("within the clock skew of the creation, inside the window");
        // Still reserved, in its window: an event from the future is clamped
        // to now, inside.
        reservation(&app, "u", "fresh", Duration::minutes(1)).await;
        failed_event(&app, "u", "fresh", "e5", now + Duration::days(1))
            .await
            .expect("clamped to now, inside the window");

        // A final settlement (a success event, a save naming it) stays final,
        // even when it comes after the timer's.
        let made = reservation(&app, "u", "won", Duration::minutes(90)).await;
        settle(&app, "u", "won", SettledBy::Window).await;
        assert_eq!(
            settle(&app, "u", "won", SettledBy::Final).await,
            ledger::SettleResult::AlreadySettled
        );
        refused(
            failed_event(&app, "u", "won", "e6", made).await,
            "already settled",
        );
        let made = reservation(&app, "u", "won2", Duration::minutes(5)).await;
        settle(&app, "u", "won2", SettledBy::Final).await;
        refused(
            failed_event(&app, "u", "won2", "e7", made).await,
            "already settled",
        );

        // An HTTP refund is judged by the time of the request.
        reservation(&app, "u", "by-http", Duration::minutes(90)).await;
        settle(&app, "u", "by-http", SettledBy::Window).await;
        let r = app
            .post(
                "/api/unified/refund-credits",
                &json!({"user_id": "u", "project_code": "by-http", "app_name": "imagegene"}),
            )
            .await;
        expect_error(r, StatusCode::CONFLICT, "not_refundable").await;

        // 100 - 7 reservations of 10 + refunds of inside, early, fresh.
        assert_eq!(app.balance("u").await, 100 - 70 + 30);
        assert_eq!(app.ledger_sum("u").await, app.balance("u").await);
        app.assert_reconciled().await;
        // The database itself refuses what the rules refuse.
        let c = app.pool.get().await.expect("db");
        for (code, sql) in [
            (
                "won",
                "UPDATE reservations SET state = 'refunded', refunded_at = now(), balance_after_refund = 0 WHERE project_code = $1",
            ),
            (
                "inside",
                "UPDATE reservations SET state = 'settled', refunded_at = NULL WHERE project_code = $1",
            ),
            (
                "outside",
                "UPDATE reservations SET state = 'reserved', settled_at = NULL, settled_by = NULL WHERE project_code = $1",
            ),
        ] {
            let e = c.execute(sql, &[&code]).await.expect_err(sql);
            let why = e
                .as_db_error()
                .map(|d| d.message().to_owned())
                .unwrap_or_default();
            assert!(why.contains("cannot change"), "{code}: {why}");
        }
    }
}

// ------------------------------------------------------- Idempotency-Key

mod idempotency_key {
    use reqwest::{Response, StatusCode};
    use serde_json::{Value, json};

    use crate::support::{BOOT_KEY, TestApp, expect_error, spawn_app};

    async fn post(app: &TestApp, path: &str, key: Option<&str>, body: Value) -> Response {
        let mut r = app
            .http
            .post(format!("{}/api/unified/{path}", app.base))
            .header("X-API-Key", BOOT_KEY)
            .json(&body);
        if let Some(key) = key {
            r = r.header("Idempotency-Key", key);
        }
        r.send().await.expect("sent")
    }

    /// Status, whether it was a replay, and the body.
    async fn seen(r: Response) -> (StatusCode, bool, Value) {
        let status = r.status();
        let replayed = r
            .headers()
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true");
        (status, replayed, r.json().await.expect("json"))
    }

    #[tokio::test]
    async fn a_deduct_without_project_code_is_keyed_by_the_header() {
        let app = spawn_app().await;
        app.grant("k", 100).await;
        let body = json!({"user_id": "k", "amount": 10, "app_name": "imagegene"});
        let (status, replayed, first) =
            seen(post(&app, "deduct-credits", Some("order-7781"), body.clone()).await).await;
        assert_eq!((status, replayed), (StatusCode::OK, false), "{first}");
        assert_eq!(first["project_code"], json!("order-7781"));
        let (status, replayed, again) =
            seen(post(&app, "deduct-credits", Some("order-7781"), body.clone()).await).await;
        assert_eq!((status, replayed), (StatusCode::OK, true));
        assert_eq!(again, first, "a replay answers the first result");
        assert_eq!(app.balance("k").await, 90);
        // The same key with another amount.
        let r = post(
            &app,
            "deduct-credits",
            Some("order-7781"),
            json!({"user_id": "k", "amount": 11, "app_name": "imagegene"}),
        )
        .await;
        expect_error(r, StatusCode::CONFLICT, "idempotency_conflict").await;
        // A header and a body value that differ; the same in both is fine.
        let mut both = body.clone();
        both["project_code"] = json!("order-9");
        let r = post(&app, "deduct-credits", Some("order-7781"), both.clone()).await;
        let why = expect_error(r, StatusCode::BAD_REQUEST, "invalid_request").await;
        assert!(why.contains("Idempotency-Key"), "{why}");
        let (status, _, _) = seen(post(&app, "deduct-credits", Some("order-9"), both).await).await;
        assert_eq!(status, StatusCode::OK);
        // A key that is no project_code (too long, a slash) still keys it.
        let long = format!("client/{}", "x".repeat(200));
        let (_, _, a) = seen(post(&app, "deduct-credits", Some(&long), body.clone()).await).await;
        let (_, replayed, b) =
            seen(post(&app, "deduct-credits", Some(&long), body.clone()).await).await;
        let code = a["project_code"].as_str().expect("code");
        assert!(code.starts_with("ik_") && code.len() == 43, "{code}");
        assert!(replayed);
        assert_eq!(a, b);
        // Bad keys.
        for bad in ["has space", &"k".repeat(256), "tab\there"] {
            let r = post(&app, "deduct-credits", Some(bad), body.clone()).await;
            expect_error(r, StatusCode::BAD_REQUEST, "invalid_request").await;
        }
        assert_eq!(app.balance("k").await, 70, "three deductions in all");
        app.assert_reconciled().await;
    }

    #[tokio::test]
    async fn grants_saves_and_refunds_take_the_header() {
        let app = spawn_app().await;
        let grant = json!({"user_id": "g", "amount": 50, "reason": "purchase"});
        let (status, replayed, first) =
            seen(post(&app, "add-credits", Some("pay_123"), grant.clone()).await).await;
        assert_eq!((status, replayed), (StatusCode::OK, false), "{first}");
        assert_eq!(first["reference"], json!("pay_123"));
        let (_, replayed, again) =
            seen(post(&app, "add-credits", Some("pay_123"), grant.clone()).await).await;
        assert!(replayed);
        assert_eq!(again, first);
        let r = post(
            &app,
            "add-credits",
            Some("pay_123"),
            json!({"user_id": "g", "amount": 60, "reason": "purchase"}),
        )
        .await;
        expect_error(r, StatusCode::CONFLICT, "idempotency_conflict").await;
        let r = post(
            &app,
            "add-credits",
            Some("pay_123"),
            json!({"user_id": "g", "amount": 50, "reason": "purchase", "reference": "pay_999"}),
        )
        .await;
        expect_error(r, StatusCode::BAD_REQUEST, "invalid_request").await;
        assert_eq!(app.balance("g").await, 50);

        // A save keyed by the header settles the reservation it names.
        let (status, body) = app.deduct("g", 5, "art-1").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let save = json!({"user_id": "g", "app_source": "imagegene", "project_type": "ai_artwork",
                          "title": "t", "content": "https://cdn.example/a.png"});
        let (status, replayed, first) =
            seen(post(&app, "save-project", Some("art-1"), save.clone()).await).await;
        assert_eq!((status.as_u16(), replayed), (202, false), "{first}");
        let (status, replayed, again) =
            seen(post(&app, "save-project", Some("art-1"), save.clone()).await).await;
        assert_eq!((status.as_u16(), replayed), (202, true), "{again}");
        assert_eq!(again["project_id"], first["project_id"]);
        assert_eq!(
            app.scalar(
                "SELECT count(*) FROM projects WHERE user_id = $1 AND project_code = 'art-1'",
                "g"
            )
            .await,
            1
        );
        let mut other = save.clone();
        other["project_code"] = json!("art-2");
        let r = post(&app, "save-project", Some("art-1"), other).await;
        expect_error(r, StatusCode::BAD_REQUEST, "invalid_request").await;

        // Refunds check the header; the refund is keyed by its reservation.
        app.deduct("g", 5, "art-3").await;
        let refund = json!({"user_id": "g", "project_code": "art-3", "app_name": "imagegene"});
        let r = post(&app, "refund-credits", Some("bad key"), refund.clone()).await;
        expect_error(r, StatusCode::BAD_REQUEST, "invalid_request").await;
        let (status, replayed, _) =
            seen(post(&app, "refund-credits", Some("rf-1"), refund.clone()).await).await;
        assert_eq!((status, replayed), (StatusCode::OK, false));
        let (status, replayed, _) =
            seen(post(&app, "refund-credits", Some("rf-1"), refund).await).await;
        assert_eq!((status, replayed), (StatusCode::OK, true));
        assert_eq!(app.balance("g").await, 45);
        app.assert_reconciled().await;
    }
}
