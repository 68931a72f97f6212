//! Uploads that stall, requests that take too long, and what a save may
//! store besides its content (issue 24, items 3 and 7): a save slot is never
//! held by a client that sends nothing, a body has a deadline, a request has
//! a deadline, connections carry TCP keepalive, metadata is measured before
//! it is parsed, metadata and title count in the quota, and a user's
//! projects are capped.

use std::time::{Duration, Instant};

use base64::Engine;
use penora_workspace::imaging::samples;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::support::{BOOT_KEY, PNG_1X1, TestApp, expect_error, spawn_app, spawn_app_with};

fn addr(app: &TestApp) -> String {
    app.base.trim_start_matches("http://").to_owned()
}

/// A save's request line and headers, declaring `length` body bytes.
fn save_head(length: usize, expect_continue: bool) -> String {
    let expect = if expect_continue {
        "Expect: 100-continue\r\n"
    } else {
        ""
    };
    format!(
        "POST /api/unified/save-project HTTP/1.1\r\nHost: x\r\nX-API-Key: {BOOT_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {length}\r\n{expect}\r\n"
    )
}

/// Reads one response head (up to the blank line) from `stream`: its status
/// and everything read (the head, and whatever of the body came with it).
async fn read_head(stream: &mut TcpStream) -> Option<(u16, String)> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        seen.extend_from_slice(&buf[..n]);
        if seen.windows(4).any(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&seen).into_owned();
            let status = text.get(9..12)?.parse().ok()?;
            return Some((status, text));
        }
    }
}

/// Reads what is left of an answer until the server closes the connection.
async fn read_to_close(stream: &mut TcpStream, mut seen: String, wait: Duration) -> String {
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(wait, stream.read_to_end(&mut rest)).await;
    seen.push_str(&String::from_utf8_lossy(&rest));
    seen
}

/// A save of a realistic 1024×1024 photo-like PNG (about 1.9 MB, 2.6 MB as
/// base64): status and how long it took.
async fn real_save(app: &TestApp, user: &str, seed: u64) -> (StatusCode, Value, Duration) {
    let png = samples::photo_like_png(1024, 1024, seed);
    let body = json!({"user_id": user, "app_source": "imagegene", "project_type": "ai_artwork",
                      "title": "Sunset", "content": base64::engine::general_purpose::STANDARD.encode(&png)});
    let started = Instant::now();
    let r = app.post("/api/unified/save-project", &body).await;
    let status = r.status();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    (status, body, started.elapsed())
}

/// One value of a metric from `/metrics` (0 when absent).
async fn metric(app: &TestApp, series: &str) -> f64 {
    let text = app
        .http
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_stalled_uploads_do_not_block_a_ninth_real_save() {
    const DEADLINE: Duration = Duration::from_secs(6);
    let app = spawn_app_with(&[
        ("MAX_CONCURRENT_SAVES", "8"),
        ("SAVE_QUEUE_WAIT_MS", "1000"),
        ("HTTP_BODY_TIMEOUT_SECS", "6"),
    ])
    .await;
    app.grant("u1", 1).await;
    let target = addr(&app);

    // Eight uploads that declare 2 MB and send nothing. Each asks
    // `Expect: 100-continue`, so its `100 Continue` tells the test the
    // handler is reading its body (on the old code: with a save slot taken).
    let silent_since = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..8 {
        let mut s = TcpStream::connect(&target).await.expect("connect");
        s.write_all(save_head(2_000_000, true).as_bytes())
            .await
            .expect("headers");
        silent.push(s);
    }
    for s in &mut silent {
        let head = tokio::time::timeout(Duration::from_secs(10), read_head(s)).await;
        assert!(
            matches!(head, Ok(Some((100, _)))),
            "the handler reads the body: {head:?}"
        );
    }

    // A ninth, real save goes through at once, while the eight still wait.
    let (status, body, took) = real_save(&app, "u1", 1).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert!(
        silent_since.elapsed() < DEADLINE,
        "answered before the stalled uploads' deadline (took {took:?})"
    );
    for s in &mut silent {
        let mut byte = [0u8; 1];
        assert!(
            tokio::time::timeout(Duration::from_millis(1), s.read(&mut byte))
                .await
                .is_err(),
            "a stalled upload is still waiting"
        );
    }
    println!("ninth save with eight silent uploads open: 202 in {took:?}");

    // At their deadline the silent uploads are answered 408 and closed.
    for s in &mut silent {
        let head = tokio::time::timeout(DEADLINE * 2, read_head(s)).await;
        let Ok(Some((status, seen))) = head else {
            panic!("no answer to a silent upload: {head:?}");
        };
        assert_eq!(status, 408, "{seen}");
        let all = read_to_close(s, seen, Duration::from_secs(5)).await;
        assert!(all.contains("\"code\":\"request_timeout\""), "{all}");
        assert!(
            all.to_ascii_lowercase().contains("connection: close"),
            "{all}"
        );
    }
    let silent_took = silent_since.elapsed();
    assert!(
        silent_took >= DEADLINE && silent_took < DEADLINE + Duration::from_secs(4),
        "cut off at the deadline, not before or long after: {silent_took:?}"
    );

    // Eight uploads that send part of their body, then stall: they do take
    // the slots (the body has begun) ...
    let partial_since = Instant::now();
    let mut partial = Vec::new();
    for _ in 0..8 {
        let mut s = TcpStream::connect(&target).await.expect("connect");
        s.write_all(save_head(2_000_000, false).as_bytes())
            .await
            .expect("headers");
        s.write_all(br#"{"user_id": "u1", "app_source": "imagegene", "content": "AAAA"#)
            .await
            .expect("part of the body");
        partial.push(s);
    }
    let waited = Instant::now();
    while metric(&app, "penora_save_slots_in_use").await < 8.0 {
        assert!(
            waited.elapsed() < Duration::from_secs(5),
            "the partial uploads take the slots"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ... so a save meanwhile is turned away, as before ...
    let (status, body, _) = real_save(&app, "u1", 2).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["code"], json!("busy"), "{body}");
    // ... until the least body rate a slot is held for (16 KiB/s after a
    // 5 s grace), or their deadline, cuts them off and gives the slots back.
    for s in &mut partial {
        let head = tokio::time::timeout(DEADLINE * 2, read_head(s)).await;
        let Ok(Some((status, seen))) = head else {
            panic!("no answer to a stalled upload: {head:?}");
        };
        assert_eq!(status, 408, "{seen}");
    }
    let partial_took = partial_since.elapsed();
    assert!(
        partial_took >= Duration::from_secs(5) && partial_took < DEADLINE + Duration::from_secs(4),
        "{partial_took:?}"
    );
    assert_eq!(metric(&app, "penora_save_slots_in_use").await, 0.0);
    let (status, body, _) = real_save(&app, "u1", 3).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    app.assert_reconciled().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_save_that_trickles_its_body_gives_its_slot_back_long_before_its_deadline() {
    // A minute of body deadline; eight uploads that send a byte every second
    // would have held every slot for all of it.
    let app = spawn_app_with(&[
        ("MAX_CONCURRENT_SAVES", "8"),
        ("SAVE_QUEUE_WAIT_MS", "1000"),
        ("HTTP_BODY_TIMEOUT_SECS", "60"),
    ])
    .await;
    app.grant("u1", 1).await;
    let target = addr(&app);
    let since = Instant::now();
    let mut trickling = Vec::new();
    for _ in 0..8 {
        let mut s = TcpStream::connect(&target).await.expect("connect");
        s.write_all(save_head(2_000_000, false).as_bytes())
            .await
            .expect("headers");
        s.write_all(b"{").await.expect("a byte");
        trickling.push(s);
    }
    let feeding = tokio::spawn(async move {
        let mut answers = Vec::new();
        for _ in 0..12 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            for s in &mut trickling {
                let _ = s.write_all(b" ").await;
            }
        }
        for s in &mut trickling {
            answers.push(
                tokio::time::timeout(Duration::from_secs(5), read_head(s))
                    .await
                    .ok()
                    .flatten()
                    .map(|(status, _)| status),
            );
        }
        answers
    });
    // Within the grace they hold the slots; after it, a real save goes in.
    let mut answered = None;
    while since.elapsed() < Duration::from_secs(20) {
        let (status, body, _) = real_save(&app, "u1", 1).await;
        if status == StatusCode::ACCEPTED {
            answered = Some(since.elapsed());
            break;
        }
        assert_eq!(body["code"], json!("busy"), "{body}");
    }
    let answered = answered.expect("a real save went in while the uploads trickled on");
    println!("a real save went in {answered:?} after eight trickling uploads began");
    assert!(answered < Duration::from_secs(12), "{answered:?}");
    let answers = feeding.await.expect("fed");
    assert!(
        answers.iter().all(|a| *a == Some(408)),
        "each trickling upload got 408: {answers:?}"
    );
    app.assert_reconciled().await;
}

#[tokio::test]
async fn a_small_json_body_that_stalls_is_cut_off_at_the_same_deadline() {
    let app = spawn_app_with(&[("HTTP_BODY_TIMEOUT_SECS", "1")]).await;
    app.grant("u1", 10).await;
    let mut s = TcpStream::connect(addr(&app)).await.expect("connect");
    let started = Instant::now();
    s.write_all(
        format!(
            "POST /api/unified/deduct-credits HTTP/1.1\r\nHost: x\r\nX-API-Key: {BOOT_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"user_id\": \"u1\""
        )
        .as_bytes(),
    )
    .await
    .expect("part of a request");
    let head = tokio::time::timeout(Duration::from_secs(10), read_head(&mut s)).await;
    let Ok(Some((status, seen))) = head else {
        panic!("no answer: {head:?}");
    };
    let took = started.elapsed();
    assert_eq!(status, 408, "{seen}");
    let all = read_to_close(&mut s, seen, Duration::from_secs(5)).await;
    assert!(all.contains("\"code\":\"request_timeout\""), "{all}");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(app.balance("u1").await, 10, "nothing moved");
}

/// A deduction for `user` with `code`: status, body, and whether it was a
/// replay.
async fn deduct(app: &TestApp, user: &str, amount: i64, code: &str) -> (StatusCode, Value, bool) {
    let r = app
        .post(
            "/api/unified/deduct-credits",
            &json!({"user_id": user, "amount": amount, "app_name": "imagegene", "project_code": code}),
        )
        .await;
    let status = r.status();
    let replayed = r.headers().contains_key("idempotent-replayed");
    (status, r.json().await.unwrap_or(Value::Null), replayed)
}

/// Sessions of the test database waiting for a row lock.
async fn lock_waits(app: &TestApp) -> i64 {
    let client = app.pool.get().await.expect("db");
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
            &[],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_past_its_deadline_answers_503_timeout_and_a_retry_with_its_key_finds_what_it_did()
 {
    let app = std::sync::Arc::new(
        spawn_app_with(&[
            ("HTTP_REQUEST_TIMEOUT_SECS", "2"),
            ("DB_LOCK_TIMEOUT_MS", "8000"),
        ])
        .await,
    );
    app.grant("u1", 100).await;
    // The test holds the account's row, as a long operator transaction
    // would: deductions for u1 wait for it (up to DB_LOCK_TIMEOUT_MS, longer
    // than the request deadline).
    let mut holder = app.pool.get().await.expect("db");
    let lock = holder.transaction().await.expect("begin");
    lock.execute(
        "SELECT 1 FROM accounts WHERE user_id = 'u1' FOR UPDATE",
        &[],
    )
    .await
    .expect("row lock");

    let started = Instant::now();
    let first = tokio::spawn({
        let app = app.clone();
        async move { deduct(&app, "u1", 10, "slow-1").await }
    });
    // Its batch has begun: it waits for the row.
    while lock_waits(&app).await < 1 {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the batch waits"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A second one waits behind it, for a batch that has not begun.
    let second = tokio::spawn({
        let app = app.clone();
        async move { deduct(&app, "u1", 7, "slow-2").await }
    });
    for (name, task) in [("first", first), ("second", second)] {
        let (status, body, _) = task.await.expect("task");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{name}: {body}");
        assert_eq!(body["code"], json!("timeout"), "{name}: {body}");
        assert_eq!(body["success"], json!(false));
        assert!(
            body["error"]
                .as_str()
                .unwrap_or_default()
                .contains("Idempotency-Key"),
            "{body}"
        );
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(5),
        "answered at the deadline: {took:?}"
    );
    // Other users are not held up meanwhile.
    app.grant("u2", 5).await;
    assert_eq!(deduct(&app, "u2", 1, "quick").await.0, StatusCode::OK);

    lock.rollback().await.expect("rollback");
    // The first deduction's batch had begun: it went through once the row
    // was free, and a retry with its key answers it, replayed. The second
    // was left out of its batch (its caller had gone): a retry carries it
    // out now, once.
    let (status, body, replayed) = deduct(&app, "u1", 10, "slow-1").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        replayed,
        "the first was carried out before the retry: {body}"
    );
    let (status, body, replayed) = deduct(&app, "u1", 7, "slow-2").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(!replayed, "the second was never carried out: {body}");
    assert_eq!(app.balance("u1").await, 100 - 10 - 7);
    assert_eq!(app.ledger_rows("u1").await, 3, "a grant and two deductions");
    app.assert_reconciled().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deduction_sent_without_a_key_and_cut_off_gets_the_key_it_was_given() {
    let app = spawn_app_with(&[
        ("HTTP_REQUEST_TIMEOUT_SECS", "2"),
        ("DB_LOCK_TIMEOUT_MS", "8000"),
    ])
    .await;
    app.grant("u1", 100).await;
    let mut holder = app.pool.get().await.expect("db");
    let lock = holder.transaction().await.expect("begin");
    lock.execute(
        "SELECT 1 FROM accounts WHERE user_id = 'u1' FOR UPDATE",
        &[],
    )
    .await
    .expect("row lock");
    // No project_code, no Idempotency-Key: the service makes one. Its batch
    // begins and waits for the row past the request's deadline.
    let r = app
        .post(
            "/api/unified/deduct-credits",
            &json!({"user_id": "u1", "amount": 10, "app_name": "imagegene"}),
        )
        .await;
    let status = r.status();
    let body: Value = r.json().await.expect("json");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["code"], json!("timeout"), "{body}");
    let code = body["project_code"]
        .as_str()
        .unwrap_or_else(|| panic!("the 503 names the code it was given: {body}"))
        .to_owned();
    lock.rollback().await.expect("rollback");
    // The batch committed once the row was free; the retry with the code
    // it was given finds it and charges nothing more.
    let (status, body, replayed) = deduct(&app, "u1", 10, &code).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(replayed, "{body}");
    assert_eq!(app.balance("u1").await, 90);
    app.assert_reconciled().await;
}

/// The server's end of `client` in `/proc/net/tcp`: its timer (`tr`: 2 is
/// the keepalive timer) and when it fires, in seconds.
fn server_side_timer(client: &TcpStream) -> Option<(u8, f64)> {
    let (local, server) = (
        client.local_addr().ok()?.port(),
        client.peer_addr().ok()?.port(),
    );
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let port = |addr: &str| {
        addr.split(':')
            .nth(1)
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if port(fields.get(1)?)? != server || port(fields.get(2)?)? != local {
            return None;
        }
        let (tr, when) = fields.get(5)?.split_once(':')?;
        // `tm->when` is in clock ticks (USER_HZ, 100 a second on Linux).
        Some((
            u8::from_str_radix(tr, 16).ok()?,
            u64::from_str_radix(when, 16).ok()? as f64 / 100.0,
        ))
    })
}

#[tokio::test]
async fn accepted_connections_carry_tcp_keepalive() {
    let app = spawn_app_with(&[("HTTP_TCP_KEEPALIVE_SECS", "37")]).await;
    let mut s = TcpStream::connect(addr(&app)).await.expect("connect");
    s.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("request");
    let head = read_head(&mut s).await;
    assert!(matches!(head, Some((200, _))), "{head:?}");
    // Right after the answer a retransmission timer may still run until the
    // client's ACK; then the keepalive timer is the one armed.
    let started = Instant::now();
    let timer = loop {
        let timer = server_side_timer(&s);
        if matches!(timer, Some((2, _))) || started.elapsed() > Duration::from_secs(2) {
            break timer;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let Some((2, secs)) = timer else {
        panic!("the server's socket has no keepalive timer: {timer:?}");
    };
    assert!(
        (30.0..=37.0).contains(&secs),
        "the first probe after HTTP_TCP_KEEPALIVE_SECS of silence: {secs} s"
    );
}

fn save_body(user: &str, title: &str, content: &str, metadata: Option<Value>) -> Value {
    let mut body = json!({"user_id": user, "app_source": "imagegene", "project_type": "ai_artwork",
                          "title": title, "content": content});
    if let Some(metadata) = metadata {
        body["metadata"] = metadata;
    }
    body
}

#[tokio::test]
async fn metadata_of_megabytes_is_refused_unparsed_naming_metadata() {
    let app = spawn_app().await;
    app.grant("u1", 1).await;
    // Five million zeros: as a parsed tree, hundreds of megabytes.
    let zeros = vec!["0"; 5_000_000].join(",");
    let body = format!(
        r#"{{"user_id": "u1", "app_source": "imagegene", "project_type": "ai_artwork", "title": "t", "content": "{PNG_1X1}", "metadata": {{"junk": [{zeros}]}}}}"#
    );
    assert!(body.len() > 9_000_000);
    let started = Instant::now();
    let r = app
        .http
        .post(format!("{}/api/unified/save-project", app.base))
        .header("X-API-Key", BOOT_KEY)
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .expect("sent");
    let msg = expect_error(r, StatusCode::BAD_REQUEST, "invalid_request").await;
    let took = started.elapsed();
    assert!(
        msg.starts_with("metadata:") && msg.contains("as sent"),
        "{msg}"
    );
    println!("10 MB of metadata refused in {took:?}: {msg}");
    assert_eq!(
        app.scalar("SELECT count(*) FROM projects WHERE user_id = $1", "u1")
            .await,
        0
    );

    // The 16 KiB rule is still about compact JSON: pretty-printed metadata
    // whose whitespace takes it past 16 KiB as sent is taken.
    let prompt = "a".repeat(15_000);
    let pretty = format!(
        "{{\n{pad}\"prompt\"{pad}:{pad}\"{prompt}\"\n}}",
        pad = " ".repeat(3000)
    );
    assert!(pretty.len() > 16 * 1024);
    let body = format!(
        r#"{{"user_id": "u1", "app_source": "imagegene", "project_type": "ai_artwork", "title": "t", "content": "{PNG_1X1}", "metadata": {pretty}}}"#
    );
    let r = app
        .http
        .post(format!("{}/api/unified/save-project", app.base))
        .header("X-API-Key", BOOT_KEY)
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    // Too big as compact JSON is refused as before.
    let r = app
        .post(
            "/api/unified/save-project",
            &save_body(
                "u1",
                "t",
                PNG_1X1,
                Some(json!({"prompt": "a".repeat(17_000)})),
            ),
        )
        .await;
    let msg = expect_error(r, StatusCode::BAD_REQUEST, "invalid_request").await;
    assert!(
        msg.starts_with("metadata: must be at most 16384 bytes"),
        "{msg}"
    );
}

/// `user-info`'s storage bytes.
async fn used_bytes(app: &TestApp, user: &str) -> i64 {
    let info: Value = app
        .get(&format!("/api/unified/user-info?user_id={user}"))
        .await
        .json()
        .await
        .expect("json");
    info["storage"]["used_bytes"].as_i64().expect("used_bytes")
}

#[tokio::test]
async fn title_and_metadata_bytes_count_in_the_quota_until_the_project_is_deleted() {
    let app = spawn_app().await;
    app.grant("u1", 1).await;
    let title = "Sunset at sea";
    let metadata = json!({"prompt": "a".repeat(1000), "seed": 42});
    let meta = (title.len() + serde_json::to_vec(&metadata).expect("json").len()) as i64;
    let r = app
        .post(
            "/api/unified/save-project",
            &save_body("u1", title, PNG_1X1, Some(metadata)),
        )
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let saved: Value = r.json().await.expect("json");
    // size_bytes is still the stored content alone (contract §10) ...
    assert_eq!(saved["size_bytes"], json!(70));
    // ... and the quota counts the title and metadata besides.
    assert_eq!(
        saved["storage_remaining_bytes"],
        json!(1_048_576 - 70 - meta)
    );
    assert_eq!(used_bytes(&app, "u1").await, 70 + meta);
    app.assert_reconciled().await;

    // A project the worker fails gives back its content's bytes; its title
    // and metadata are still stored, listed and counted.
    let id = saved["project_id"].as_str().expect("id");
    let mut client = app.pool.get().await.expect("db");
    let finished = penora_workspace::projects::finish_save(
        &mut client,
        "u1",
        id.parse().expect("uuid"),
        Err("not an image".into()),
    )
    .await
    .expect("failed");
    assert!(matches!(
        finished,
        penora_workspace::projects::Finished::Failed(_)
    ));
    assert_eq!(used_bytes(&app, "u1").await, meta);
    app.assert_reconciled().await;
    let r = app
        .delete(&format!("/api/unified/projects/{id}?user_id=u1"))
        .await;
    let deleted: Value = r.json().await.expect("json");
    assert_eq!(deleted["freed_bytes"], json!(meta), "{deleted}");
    assert_eq!(used_bytes(&app, "u1").await, 0);
    app.assert_reconciled().await;

    // A save whose content alone would fit, but not with its metadata, is
    // refused with the exact bytes it needs.
    let content = 1_048_576 - 100;
    let metadata = json!({"note": "b".repeat(200)});
    let needed = content as i64 + 1 + serde_json::to_vec(&metadata).expect("json").len() as i64;
    let r = app
        .post(
            "/api/unified/save-project",
            &save_body(
                "u1",
                "t",
                &crate::support::base64_of(content),
                Some(metadata),
            ),
        )
        .await;
    let msg = expect_error(r, StatusCode::PAYLOAD_TOO_LARGE, "storage_limit_exceeded").await;
    assert_eq!(
        msg,
        format!(
            "storage limit exceeded: the project needs {needed} bytes and 1048576 bytes remain"
        )
    );
    let r = app
        .post(
            "/api/unified/save-project",
            &save_body("u1", "t", &crate::support::base64_of(content), None),
        )
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(used_bytes(&app, "u1").await, content as i64 + 1);
    app.assert_reconciled().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forty_concurrent_saves_under_a_cap_of_twenty_projects_accept_exactly_twenty() {
    let app = std::sync::Arc::new(
        spawn_app_with(&[
            ("MAX_PROJECTS_PER_USER", "20"),
            // Every save gets a slot: only the cap decides.
            ("MAX_CONCURRENT_SAVES", "40"),
            ("SAVE_QUEUE_WAIT_MS", "60000"),
        ])
        .await,
    );
    app.grant("u1", 1).await;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            let mut body = save_body("u1", "t", PNG_1X1, None);
            body["project_code"] = json!(format!("p{i}"));
            let r = app.post("/api/unified/save-project", &body).await;
            (
                i,
                r.status(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }));
    }
    let mut accepted = Vec::new();
    for t in tasks {
        let (i, status, body) = t.await.expect("task");
        match status {
            StatusCode::ACCEPTED => accepted.push((i, body)),
            StatusCode::FORBIDDEN => {
                assert_eq!(body["code"], json!("project_limit_reached"), "{body}");
                assert!(
                    body["error"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("at most 20 projects"),
                    "{body}"
                );
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(accepted.len(), 20);
    let live = "SELECT count(*) FROM projects WHERE user_id = $1 AND status <> 'deleted'";
    assert_eq!(app.scalar(live, "u1").await, 20);

    // At the cap, a retry of an accepted save answers it, replayed.
    let (i, first) = &accepted[0];
    let mut body = save_body("u1", "t", PNG_1X1, None);
    body["project_code"] = json!(format!("p{i}"));
    let r = app.post("/api/unified/save-project", &body).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert!(r.headers().contains_key("idempotent-replayed"));
    let again: Value = r.json().await.expect("json");
    assert_eq!(again["project_id"], first["project_id"]);

    // A failed project still counts: its row, title and metadata are kept.
    let failed = accepted[1].1["project_id"].as_str().expect("id").to_owned();
    let mut client = app.pool.get().await.expect("db");
    penora_workspace::projects::finish_save(
        &mut client,
        "u1",
        failed.parse().expect("uuid"),
        Err("not an image".into()),
    )
    .await
    .expect("failed");
    let r = app
        .post(
            "/api/unified/save-project",
            &save_body("u1", "t", PNG_1X1, None),
        )
        .await;
    expect_error(r, StatusCode::FORBIDDEN, "project_limit_reached").await;
    // A deleted one does not.
    let r = app
        .delete(&format!("/api/unified/projects/{failed}?user_id=u1"))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = app
        .post(
            "/api/unified/save-project",
            &save_body("u1", "t", PNG_1X1, None),
        )
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(app.scalar(live, "u1").await, 20);
    app.assert_reconciled().await;
}
