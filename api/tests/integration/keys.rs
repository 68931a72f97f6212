//! Keys: scopes, app binding, revocation, rate limit, and never a key in a log.

use std::{process::Stdio, time::Duration};

use penora_platform::keys::Scope;
use reqwest::StatusCode;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::{BOOT_KEY, PNG_1X1, expect_error, spawn_app, spawn_app_with};

#[tokio::test]
async fn a_key_may_only_do_what_its_scopes_allow() {
    let app = spawn_app().await;
    app.grant("u1", 10).await;
    let reader = app.key("*", &[Scope::Read]).await;
    assert_eq!(
        app.get_with_key("/api/unified/user-info?user_id=u1", &reader)
            .await
            .status(),
        StatusCode::OK
    );
    let deduct = json!({"user_id": "u1", "amount": 1, "app_name": "imagegene"});
    let msg = expect_error(
        app.post_with_key("/api/unified/deduct-credits", &deduct, &reader)
            .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    assert!(msg.contains("spend"), "{msg}");
    let spender = app.key("*", &[Scope::Spend]).await;
    assert_eq!(
        app.post_with_key("/api/unified/deduct-credits", &deduct, &spender)
            .await
            .status(),
        StatusCode::OK
    );
    expect_error(
        app.get_with_key("/api/unified/user-info?user_id=u1", &spender)
            .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    let grant = json!({"user_id": "u1", "amount": 5, "reason": "r", "reference": "x"});
    let msg = expect_error(
        app.post_with_key("/api/unified/add-credits", &grant, &spender)
            .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    assert!(msg.contains("admin"), "{msg}");
    let save = json!({"user_id": "u1", "app_source": "imagegene", "project_type": "a", "title": "t", "content": PNG_1X1});
    expect_error(
        app.post_with_key("/api/unified/save-project", &save, &spender)
            .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    assert_eq!(app.balance("u1").await, 9);
}

#[tokio::test]
async fn a_key_bound_to_an_app_may_only_act_for_that_app() {
    let app = spawn_app().await;
    app.grant("u1", 10).await;
    let imagegene = app
        .key("imagegene", &[Scope::Read, Scope::Spend, Scope::Write])
        .await;
    let as_penora = json!({"user_id": "u1", "amount": 1, "app_name": "penora"});
    let msg = expect_error(
        app.post_with_key("/api/unified/deduct-credits", &as_penora, &imagegene)
            .await,
        StatusCode::FORBIDDEN,
        "app_mismatch",
    )
    .await;
    assert!(msg.contains("imagegene") && msg.contains("penora"), "{msg}");
    let save = json!({"user_id": "u1", "app_source": "penora", "project_type": "a", "title": "t", "content": PNG_1X1});
    expect_error(
        app.post_with_key("/api/unified/save-project", &save, &imagegene)
            .await,
        StatusCode::FORBIDDEN,
        "app_mismatch",
    )
    .await;
    expect_error(
        app.get_with_key("/api/unified/projects?user_id=u1&app=penora", &imagegene)
            .await,
        StatusCode::FORBIDDEN,
        "app_mismatch",
    )
    .await;
    // Its own app works, and app_name defaults to it.
    let own = json!({"user_id": "u1", "amount": 1, "project_code": "mine"});
    let r = app
        .post_with_key("/api/unified/deduct-credits", &own, &imagegene)
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["app_name"], json!("imagegene"));
    assert_eq!(
        app.get_with_key("/api/unified/projects?user_id=u1&app=imagegene", &imagegene)
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(app.balance("u1").await, 9);
}

#[tokio::test]
async fn a_revoked_key_stops_working_on_the_next_request() {
    let app = spawn_app().await;
    app.grant("u1", 10).await;
    let key = app.key("*", &[Scope::Read]).await;
    assert_eq!(
        app.get_with_key("/api/unified/user-info?user_id=u1", &key)
            .await
            .status(),
        StatusCode::OK
    );
    let client = app.pool.get().await.expect("db");
    let id: uuid::Uuid = client
        .query_one("SELECT id FROM api_keys", &[])
        .await
        .expect("one key")
        .get(0);
    assert!(
        penora_platform::keys::revoke(&client, id)
            .await
            .expect("revoked")
    );
    expect_error(
        app.get_with_key("/api/unified/user-info?user_id=u1", &key)
            .await,
        StatusCode::UNAUTHORIZED,
        "invalid_api_key",
    )
    .await;
}

#[tokio::test]
async fn keys_are_stored_only_as_sha256_digests() {
    let app = spawn_app().await;
    let key = app.key("imagegene", &[Scope::Read]).await;
    let client = app.pool.get().await.expect("db");
    let row = client
        .query_one(
            "SELECT digest, prefix, row_to_json(k)::text FROM api_keys k",
            &[],
        )
        .await
        .expect("one key");
    let digest: Vec<u8> = row.get(0);
    let prefix: String = row.get(1);
    let whole_row: String = row.get(2);
    assert_eq!(digest, penora_platform::keys::digest(&key).to_vec());
    assert!(key.starts_with(&prefix) && prefix.len() < 16);
    assert!(
        !whole_row.contains(&key),
        "the key itself is nowhere in the row"
    );
    assert!(
        !whole_row.contains(&key[prefix.len()..]),
        "nor its secret part"
    );
}

#[tokio::test]
async fn each_key_is_rate_limited_with_retry_after() {
    let app = spawn_app_with(&[("RATE_LIMIT_PER_SEC", "1"), ("RATE_LIMIT_BURST", "3")]).await;
    app.grant("u1", 1).await; // one token of the bootstrap key's burst
    let other = app.key("*", &[Scope::Read]).await;
    let path = "/api/unified/user-info?user_id=u1";
    // Burst 3, one of which the grant used: within a second the bucket runs dry.
    let mut limited = None;
    for i in 0..6 {
        let r = app.get(path).await;
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            limited = Some((i, r));
            break;
        }
        assert_eq!(r.status(), StatusCode::OK);
    }
    let (served, limited) = limited.expect("the bucket ran dry");
    assert!(served >= 2, "the burst was honoured ({served} served)");
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    expect_error(limited, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    // Another key has its own bucket.
    assert_eq!(
        app.get_with_key(path, &other).await.status(),
        StatusCode::OK
    );
}

/// Runs the real `penora-api` binary at trace level, sends keys every way a
/// client can (header, query, wrong, revoked, bound to another app), and checks
/// that no key appears anywhere in what the process wrote.
#[tokio::test]
async fn keys_never_appear_in_the_logs() {
    let app = spawn_app().await; // for the database and a stored key
    app.grant("u1", 10).await;
    let stored = app.key("imagegene", &[Scope::Read, Scope::Spend]).await;
    let wrong = "pnr_0000000000000000000000000000000000000000000000000000000000000000";
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_penora-api"))
        .env("DATABASE_URL", &app.db.url)
        .env("PENORA_API_KEY", BOOT_KEY)
        .env("BIND_ADDR", "127.0.0.1:0")
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "trace")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("penora-api starts");
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let collect = |pipe| {
        tokio::spawn(async move {
            let mut lines = BufReader::new(pipe).lines();
            let mut all = Vec::new();
            while let Ok(Some(line)) = lines.next_line().await {
                all.push(line);
            }
            all
        })
    };
    let (url_tx, url_rx) = tokio::sync::oneshot::channel::<String>();
    let out_task = tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        let mut all = Vec::new();
        let mut url_tx = Some(url_tx);
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.strip_prefix("penora-api listening on ")
                && let Some(tx) = url_tx.take()
            {
                let _ = tx.send(rest.trim().to_owned());
            }
            all.push(line);
        }
        all
    });
    let err_task = collect(stderr);
    let base = tokio::time::timeout(Duration::from_secs(30), url_rx)
        .await
        .expect("the API prints its URL")
        .expect("url");
    let http = reqwest::Client::new();
    let deduct = json!({"user_id": "u1", "amount": 1, "app_name": "imagegene"});
    for key in [BOOT_KEY, stored.as_str(), wrong] {
        http.get(format!("{base}/api/unified/user-info?user_id=u1"))
            .header("X-API-Key", key)
            .send()
            .await
            .expect("sent");
        http.get(format!(
            "{base}/api/unified/user-info?user_id=u1&api_key={key}"
        ))
        .send()
        .await
        .expect("sent");
        http.get(format!(
            "{base}/api/unified/transactions?api_key={key}&user_id=u1&limit=bad"
        ))
        .send()
        .await
        .expect("sent");
        http.post(format!("{base}/api/unified/deduct-credits?api_key={key}"))
            .json(&deduct)
            .send()
            .await
            .expect("sent");
        http.post(format!("{base}/api/unified/deduct-credits"))
            .header("X-API-Key", key)
            .json(&json!({"user_id": "u1", "amount": 1, "app_name": "penora"}))
            .send()
            .await
            .expect("sent");
        http.get(format!("{base}/no-such-route?api_key={key}"))
            .send()
            .await
            .expect("sent");
    }
    child.start_kill().expect("killed");
    let _ = child.wait().await;
    let mut lines = out_task.await.expect("stdout task");
    lines.extend(err_task.await.expect("stderr task"));
    let all = lines.join("\n");
    let request_lines = lines
        .iter()
        .filter(|l| l.contains("\"message\":\"request\""))
        .count();
    assert!(
        request_lines >= 18,
        "one log line per request was written ({request_lines})"
    );
    assert!(
        all.contains("api_key=[redacted]"),
        "query keys are logged redacted"
    );
    for key in [BOOT_KEY, stored.as_str(), wrong] {
        assert!(!all.contains(key), "a key appears in the logs");
        assert!(
            !all.contains(&key[8..40]),
            "part of a key appears in the logs"
        );
    }
}
