//! Group commit seen over HTTP: the answers a client gets are the same
//! with it on or off, and concurrent batched reads each get their own
//! user's figures. (The ledger's own batch-against-one-by-one tests are in
//! `common/ledger/tests/batching.rs` and `decide.rs`.)

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_user_info_reads_each_get_their_own_users_figures() {
    let app = std::sync::Arc::new(crate::support::spawn_app().await);
    for n in 1..=10 {
        app.grant(&format!("reader{n}"), n * 10).await;
        // A reservation, so reserved_credits differs per user too.
        let (status, body) = app.deduct(&format!("reader{n}"), n, &format!("r{n}")).await;
        assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    }
    let mut tasks = Vec::new();
    for i in 0..300 {
        let app = app.clone();
        // Users 1..=10 exist; 11 and 12 do not.
        let n = i % 12 + 1;
        tasks.push(tokio::spawn(async move {
            let r = app
                .get(&format!("/api/unified/user-info?user_id=reader{n}"))
                .await;
            let status = r.status();
            let body: serde_json::Value = r.json().await.expect("json");
            (n, status, body)
        }));
    }
    for t in tasks {
        let (n, status, body) = t.await.expect("task");
        if n > 10 {
            assert_eq!(status, reqwest::StatusCode::NOT_FOUND, "{body}");
            assert_eq!(body["code"], "user_not_found");
            continue;
        }
        assert_eq!(status, reqwest::StatusCode::OK, "{body}");
        assert_eq!(body["user_id"], format!("reader{n}"));
        assert_eq!(body["credits"], n * 10 - n, "{body}");
        assert_eq!(body["reserved_credits"], n, "{body}");
    }
}

/// `user-info`'s batched read puts each user's two parts together, the
/// ledger's (credits) and the workspace's (storage and projects), each read
/// with one statement for the whole batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_of_user_info_reads_answers_each_users_credits_storage_and_projects() {
    use futures_util::FutureExt;

    let app = crate::support::spawn_app().await;
    for n in 1..=4i64 {
        let user = format!("reader{n}");
        app.grant(&user, n * 10).await;
        for p in 0..n {
            app.saved_url_project(&user, &format!("https://cdn.example.com/{user}/{p}.png"))
                .await;
        }
    }
    // A deleted project is not counted (its bytes are freed).
    let gone = app
        .saved_url_project("reader4", "https://cdn.example.com/gone.png")
        .await;
    let r = app
        .delete(&format!("/api/unified/projects/{gone}?user_id=reader4"))
        .await;
    assert_eq!(r.status(), reqwest::StatusCode::OK);

    // One connection, held by the test, and one batch at a time: the first
    // read waits for the connection while every other one queues behind it,
    // so they are read as one batch once it is free.
    let pool = penora_store::pool_for(&app.db.url, 1).expect("pool");
    let held = pool.get().await.expect("the only connection");
    let summaries = penora_api::coalesce::Summaries::start(pool.clone(), 1024, 256, 1);
    let users: Vec<String> = (0..3)
        .flat_map(|_| (1..=5).map(|n| format!("reader{n}")))
        .collect();
    let mut reads =
        Box::pin(futures_util::future::join_all(users.iter().map(|u| {
            summaries.get(penora_domain::UserId::parse(u).expect("user id"))
        })));
    assert!(
        (&mut reads).now_or_never().is_none(),
        "waiting for the connection"
    );
    drop(held);
    let answers = reads.await;
    for (user, answer) in users.iter().zip(answers) {
        let n: i64 = user["reader".len()..].parse().expect("n");
        let found = answer.expect("read");
        if n == 5 {
            assert!(found.is_none(), "reader5 has no account");
            continue;
        }
        let found = found.expect("an account");
        assert_eq!(found.credits.balance, n * 10, "{user}");
        assert_eq!(found.workspace.total_projects, n, "{user}");
        let stored: i64 = (0..n)
            .map(|p| format!("https://cdn.example.com/{user}/{p}.png").len() as i64 + 1)
            .sum();
        assert_eq!(found.workspace.storage_used_bytes, stored, "{user}");
    }
    // The HTTP route shows the same figures.
    let r: serde_json::Value = app
        .get("/api/unified/user-info?user_id=reader4")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(r["storage"]["total_projects"], 4, "{r}");
    assert_eq!(r["credits"], 40, "{r}");
}

/// With group commit off (`DEDUCT_BATCH_MAX=1`) every deduction is a batch of
/// one; over HTTP, the answers a client sees are those of group commit on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_group_commit_off_http_answers_are_the_same() {
    let mut seen_by = Vec::new();
    for batch_max in ["1", "128"] {
        let app = crate::support::spawn_app_with(&[("DEDUCT_BATCH_MAX", batch_max)]).await;
        app.grant("alice", 100).await;
        app.grant("bob", 7).await;
        let mut seen = Vec::new();
        for (user, amount, code) in [
            ("alice", 30, "k1"),
            ("alice", 30, "k2"),
            ("alice", 30, "k3"),
            ("alice", 30, "k4"), // 10 left: insufficient
            ("alice", 30, "k1"), // replay
            ("alice", 6, "k1"),  // same key, other amount: conflict
            ("bob", 1, "k2"),    // another user's key: bob's own
            ("carol", 1, "k5"),  // no account
            ("bob", 6, "k6"),    // bob to 0
        ] {
            let (status, body) = app.deduct(user, amount, code).await;
            seen.push(format!(
                "{} {} {} {}",
                status.as_u16(),
                body["code"],
                body["new_balance"],
                body["reservation_status"]
            ));
        }
        let r = app
            .post(
                "/api/unified/refund-credits",
                &serde_json::json!({"user_id": "alice", "project_code": "k2", "app_name": "imagegene"}),
            )
            .await;
        seen.push(format!("refund {}", r.status().as_u16()));
        assert_eq!(app.balance("alice").await, 40, "group commit {batch_max}");
        app.assert_reconciled().await;
        seen_by.push(seen);
    }
    assert_eq!(seen_by[0], seen_by[1]);
    let codes: Vec<&str> = seen_by[0]
        .iter()
        .map(|s| s.split(' ').take(2).last().unwrap_or(""))
        .collect();
    assert_eq!(
        codes,
        [
            "null",
            "null",
            "null",
            "\"insufficient_credits\"",
            "null",
            "\"idempotency_conflict\"",
            "null",
            "\"user_not_found\"",
            "null",
            "200"
        ]
    );
}
