//! The queue pipeline against the real PostgreSQL and RabbitMQ: each test has
//! its own database and its own queue prefix.

mod allowances;
mod artworks;
mod backpressure;
mod chain;
mod event_time;
mod events;
mod health;
mod hostile_events;
mod image_bombs;
mod lots;
mod operators;
mod outbox;
mod permissions;
mod roles;
mod supervision;
mod support;
mod webhooks;

use std::{process::Stdio, time::Duration};

use serde_json::{Value, json};

use crate::support::{PNG_1X1, Proxy, amqp_url, sibling_binary, stack, wait_for};

fn event(event_id: &str, user: &str, code: &str) -> String {
    json!({"event_id": event_id, "user_id": user, "project_code": code,
           "reason": "GPU out of memory", "occurred_at": "2026-11-24T06:00:00.000Z"})
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_save_becomes_saved_and_corrupt_content_fails_and_frees_its_bytes() {
    let mut s = stack(&[], &[]).await;
    s.start_worker().await;
    s.grant("u1", 20).await;
    s.deduct("u1", 5, "img_1").await;
    let good: Value = s
        .post(
            "/api/unified/save-project",
            &json!({"user_id": "u1", "app_source": "imagegene", "project_type": "ai_artwork",
                    "title": "good", "content": PNG_1X1, "project_code": "img_1"}),
        )
        .await
        .json()
        .await
        .expect("json");
    let bad: Value = s
        .post(
            "/api/unified/save-project",
            &json!({"user_id": "u1", "app_source": "imagegene", "project_type": "ai_artwork",
                    "title": "bad", "content": "aGVsbG8gd29ybGQ="}),
        )
        .await
        .json()
        .await
        .expect("json");
    s.wait_idle().await;
    let client = s.pool.get().await.expect("db");
    let status = |id: &Value| {
        let id = id.as_str().expect("id").to_owned();
        let client = &client;
        async move {
            client
                .query_one(
                    "SELECT status, failure_reason FROM projects WHERE id = $1::text::uuid",
                    &[&id],
                )
                .await
                .map(|r| (r.get::<_, String>(0), r.get::<_, Option<String>>(1)))
                .expect("project")
        }
    };
    assert_eq!(status(&good["project_id"]).await, ("saved".into(), None));
    let (st, reason) = status(&bad["project_id"]).await;
    assert_eq!(st, "failed");
    assert!(reason.unwrap_or_default().contains("not an image"));
    assert_eq!(
        s.scalar(
            "SELECT storage_used_bytes FROM accounts WHERE user_id = $1",
            "u1"
        )
        .await,
        70 + 4 + 3,
        "the failed project's content bytes were released; the titles (`good`, `bad`) still count"
    );
    assert_eq!(
        s.scalar(
            "SELECT count(*) FROM reservations WHERE user_id = $1 AND state = 'settled'",
            "u1"
        )
        .await,
        1,
        "the save settled the reservation it named"
    );
    let content = s
        .http
        .get(format!(
            "{}{}",
            s.base,
            good["content_url"].as_str().expect("url")
        ))
        .header("X-API-Key", support::BOOT_KEY)
        .send()
        .await
        .expect("sent");
    assert_eq!(content.headers()["content-type"], "image/png");
    // Every ledger entry has its audit record, exactly once.
    assert_eq!(
        s.scalar(
            "SELECT coalesce(max(seq), 0) FROM audit_checkpoints WHERE user_id = $1",
            "u1"
        )
        .await,
        s.scalar(
            "SELECT count(*) FROM ledger_entries WHERE user_id = $1",
            "u1"
        )
        .await
    );
    s.stop_worker().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failure_event_refunds_once_however_often_it_arrives() {
    let mut s = stack(&[], &[]).await;
    s.start_worker().await;
    s.grant("u1", 20).await;
    s.deduct("u1", 8, "img_f").await;
    let body = event("ev-1", "u1", "img_f");
    for _ in 0..3 {
        s.publish_event("failed", &body).await;
    }
    s.publish_event("failed", &event("ev-2", "u1", "img_f"))
        .await;
    s.wait_idle().await;
    wait_for(
        "the events are recorded",
        Duration::from_secs(10),
        || async {
            s.scalar(
                "SELECT count(*) FROM processed_events WHERE user_id = $1",
                "u1",
            )
            .await
                == 2
        },
    )
    .await;
    assert_eq!(
        s.scalar("SELECT balance FROM accounts WHERE user_id = $1", "u1")
            .await,
        20
    );
    assert_eq!(
        s.scalar(
            "SELECT count(*) FROM ledger_entries WHERE user_id = $1 AND kind = 'refund'",
            "u1"
        )
        .await,
        1
    );
    assert_eq!(
        s.depth(&s.topology.dead_queue("penora.generation-events"))
            .await,
        0
    );
    s.stop_worker().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_success_event_settles_and_a_later_refund_is_409() {
    let mut s = stack(&[], &[]).await;
    s.start_worker().await;
    s.grant("u1", 20).await;
    s.deduct("u1", 8, "img_s").await;
    s.publish_event("succeeded", &event("ev-s", "u1", "img_s"))
        .await;
    wait_for(
        "the reservation is settled",
        Duration::from_secs(10),
        || async {
            s.scalar(
                "SELECT count(*) FROM reservations WHERE user_id = $1 AND state = 'settled'",
                "u1",
            )
            .await
                == 1
        },
    )
    .await;
    let r = s
        .post(
            "/api/unified/refund-credits",
            &json!({"user_id": "u1", "project_code": "img_s"}),
        )
        .await;
    assert_eq!(r.status(), reqwest::StatusCode::CONFLICT);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["code"], json!("not_refundable"));
    assert_eq!(
        s.scalar("SELECT balance FROM accounts WHERE user_id = $1", "u1")
            .await,
        12
    );
    s.stop_worker().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_events_are_parked_the_worker_goes_on_and_a_replay_succeeds_once_it_can() {
    let mut s = stack(&[], &[]).await;
    s.start_worker().await;
    s.grant("u1", 20).await;
    s.publish_event("failed", "{not json").await;
    s.publish_event("failed", r#"{"user_id": "u1"}"#).await;
    s.publish_event("failed", &event("ev-unknown", "u1", "img_later"))
        .await;
    let dead = s.topology.dead_queue("penora.generation-events");
    wait_for("three parked events", Duration::from_secs(10), || async {
        s.depth(&dead).await == 3
    })
    .await;
    // The worker goes on.
    s.deduct("u1", 4, "img_ok").await;
    s.publish_event("failed", &event("ev-ok", "u1", "img_ok"))
        .await;
    wait_for(
        "a good event is handled",
        Duration::from_secs(10),
        || async {
            s.scalar("SELECT balance FROM accounts WHERE user_id = $1", "u1")
                .await
                == 20
        },
    )
    .await;

    let listed = s
        .ops(&["dlq", "list", "penora.generation-events", "--json"])
        .await;
    assert!(listed.status.success(), "{listed:?}");
    let parked: Vec<Value> = serde_json::from_slice(&listed.stdout).expect("json");
    assert_eq!(parked.len(), 3);
    assert!(parked.iter().any(|m| {
        m["error"]
            .as_str()
            .unwrap_or_default()
            .starts_with("malformed message")
    }));
    let unknown = parked
        .iter()
        .find(|m| {
            m["error"]
                .as_str()
                .unwrap_or_default()
                .contains("img_later")
        })
        .expect("the unknown reservation is parked with its reason");
    assert_eq!(unknown["attempts"], json!(1));
    assert!(unknown["first_failure_at"].is_string() && unknown["parked_at"].is_string());

    // Now the reservation exists: replaying the parked event refunds it.
    s.deduct("u1", 6, "img_later").await;
    let id = unknown["message_id"].as_str().map(str::to_owned);
    let replay_args = |dry: bool| {
        let mut a = vec![
            "dlq".to_owned(),
            "replay".into(),
            "penora.generation-events".into(),
        ];
        if let Some(id) = &id {
            a.extend(["--id".into(), id.clone()]);
        }
        if dry {
            a.push("--dry-run".into());
        }
        a
    };
    let dry = s
        .ops(
            &replay_args(true)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )
        .await;
    assert!(dry.status.success(), "{dry:?}");
    assert_eq!(s.depth(&dead).await, 3, "a dry run changes nothing");
    let real = s
        .ops(
            &replay_args(false)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )
        .await;
    assert!(real.status.success(), "{real:?}");
    wait_for("the replayed event refunds", Duration::from_secs(10), || async {
        s.scalar("SELECT count(*) FROM reservations WHERE user_id = $1 AND project_code = 'img_later' AND state = 'refunded'", "u1")
            .await
            == 1
    })
    .await;
    assert_eq!(
        s.scalar("SELECT balance FROM accounts WHERE user_id = $1", "u1")
            .await,
        20
    );
    s.stop_worker().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_in_the_middle_of_120_events_refunds_each_reservation_exactly_once() {
    let s = stack(&[], &[]).await;
    const N: usize = 120;
    s.grant("u1", 10_000).await;
    for i in 0..N {
        s.deduct("u1", 5, &format!("k{i}")).await;
    }
    for i in 0..N {
        s.publish_event("failed", &event(&format!("ev-{i}"), "u1", &format!("k{i}")))
            .await;
    }
    let spawn = || {
        tokio::process::Command::new(sibling_binary("penora-worker"))
            .envs(s.env())
            // Small batches (of up to 4 events, one transaction each), so
            // the kill lands between commits rather than after the last.
            .env("WORKER_BATCH_MAX", "4")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("penora-worker starts")
    };
    let refunded = || {
        s.scalar(
            "SELECT count(*) FROM ledger_entries WHERE user_id = $1 AND kind = 'refund'",
            "u1",
        )
    };
    let mut first = spawn();
    wait_for("some refunds", Duration::from_secs(30), || async {
        refunded().await >= 10
    })
    .await;
    first.start_kill().expect("SIGKILL");
    let _ = first.wait().await;
    let at_kill = refunded().await;
    assert!(
        at_kill < N as i64,
        "the kill came in the middle ({at_kill} of {N} done)"
    );
    let mut second = spawn();
    wait_for("every refund", Duration::from_secs(60), || async {
        refunded().await == N as i64
    })
    .await;
    s.wait_idle().await;
    second.start_kill().expect("stopped");
    let _ = second.wait().await;
    assert_eq!(refunded().await, N as i64);
    assert_eq!(
        s.scalar(
            "SELECT count(*) FROM reservations WHERE user_id = $1 AND state = 'refunded'",
            "u1"
        )
        .await,
        N as i64
    );
    assert_eq!(
        s.scalar("SELECT balance FROM accounts WHERE user_id = $1", "u1")
            .await,
        10_000
    );
    let reconcile = s.ops(&["reconcile"]).await;
    assert!(
        reconcile.status.success(),
        "{}",
        String::from_utf8_lossy(&reconcile.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_broker_unreachable_deducts_succeed_and_every_entry_is_audited_once_it_returns() {
    // The API's broker address leads nowhere; the worker is not running yet.
    let mut s = stack(&[], &[("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")]).await;
    s.grant("u1", 1000).await;
    for i in 0..30 {
        let r = s.deduct("u1", 3, &format!("o{i}")).await;
        assert_eq!(r["success"], json!(true));
    }
    let health: Value = s
        .http
        .get(format!("{}/health", s.base))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(health["status"], json!("degraded"));
    assert_eq!(health["broker"], json!("unavailable"));
    assert_eq!(
        health["outbox_pending"],
        json!(32),
        "every movement's job waits in the outbox, and the grant's credits.granted"
    );
    wait_for("the failed publish is recorded on the rows", Duration::from_secs(10), || async {
        s.scalar("SELECT count(*) FROM outbox WHERE last_error IS NOT NULL AND attempts > 0 AND $1 = $1", "").await > 0
    })
    .await;
    // The broker "returns": a worker that reaches it relays the outbox.
    s.start_worker().await;
    wait_for("every entry audited", Duration::from_secs(30), || async {
        s.scalar(
            "SELECT coalesce(max(seq), 0) FROM audit_checkpoints WHERE user_id = $1",
            "u1",
        )
        .await
            == 31
    })
    .await;
    s.wait_idle().await;
    let verify = s.ops(&["audit", "verify"]).await;
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    assert!(String::from_utf8_lossy(&verify.stdout).contains("audit OK"));
    s.stop_worker().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_that_fails_twice_with_a_passing_error_succeeds_on_the_third_attempt() {
    let mut s = stack(&[("DB_LOCK_TIMEOUT_MS", "100")], &[]).await;
    s.grant("u1", 10).await; // its audit job runs now, before the lock
    s.start_worker().await;
    let retried = "penora_worker_messages_total{queue=\"penora.ledger-audit\",outcome=\"retried\"}";
    // Counted as an increase: the recorder is process-wide.
    let before = s.worker_metric(retried).await;
    // Hold the user's audit chain: the next audit job cannot take its lock.
    let holder = s.hold_audit_chain("u1").await;
    s.deduct("u1", 2, "r1").await;
    wait_for("two failed attempts", Duration::from_secs(20), || async {
        s.worker_metric(retried).await - before >= 2.0
    })
    .await;
    holder.batch_execute("ROLLBACK").await.expect("released");
    wait_for(
        "the third attempt succeeds",
        Duration::from_secs(20),
        || async {
            s.scalar(
                "SELECT coalesce(max(seq), 0) FROM audit_checkpoints WHERE user_id = $1",
                "u1",
            )
            .await
                == 2
        },
    )
    .await;
    assert_eq!(
        s.worker_metric(retried).await - before,
        2.0,
        "exactly two retries"
    );
    assert_eq!(
        s.depth(&s.topology.dead_queue("penora.ledger-audit")).await,
        0
    );
    s.stop_worker().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_that_always_fails_is_parked_with_its_history_in_the_headers() {
    let mut s = stack(&[("DB_LOCK_TIMEOUT_MS", "100")], &[]).await;
    s.grant("u1", 10).await;
    s.start_worker().await;
    // Hold the user's audit chain: the next audit job cannot take its lock.
    let holder = s.hold_audit_chain("u1").await;
    s.deduct("u1", 2, "r1").await;
    let dead = s.topology.dead_queue("penora.ledger-audit");
    wait_for("the job is parked", Duration::from_secs(30), || async {
        s.depth(&dead).await == 1
    })
    .await;
    holder.batch_execute("ROLLBACK").await.expect("released");
    // As an operator looks: `penora-ops dlq show` reads without taking.
    let shown = s.ops(&["dlq", "show", "penora.ledger-audit"]).await;
    assert!(shown.status.success(), "{shown:?}");
    let parked: Vec<Value> = serde_json::from_slice(&shown.stdout).expect("json");
    assert_eq!(parked.len(), 1);
    let m = &parked[0];
    assert_eq!(
        m["attempts"],
        json!(4),
        "RETRY_MAX_ATTEMPTS attempts were made"
    );
    let error = m["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("gave up after 4 attempts") && error.contains("lock"),
        "{error}"
    );
    assert!(m["first_failure_at"].is_string() && m["parked_at"].is_string());
    assert!(
        m["correlation_id"].is_string(),
        "the request id travels with the job"
    );
    // Looking put the message back.
    assert_eq!(s.depth(&dead).await, 1);
    s.stop_worker().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reservations_past_their_window_are_settled_by_the_timer() {
    let mut s = stack(
        &[("REFUND_WINDOW_SECS", "0")],
        &[("REFUND_WINDOW_SECS", "0")],
    )
    .await;
    s.grant("u1", 10).await;
    s.deduct("u1", 3, "late").await;
    s.start_worker().await;
    wait_for("the timer settles", Duration::from_secs(10), || async {
        s.scalar(
            "SELECT count(*) FROM reservations WHERE user_id = $1 AND state = 'settled'",
            "u1",
        )
        .await
            == 1
    })
    .await;
    wait_for(
        "its settle entry is audited",
        Duration::from_secs(10),
        || async {
            s.scalar(
                "SELECT coalesce(max(seq), 0) FROM audit_checkpoints WHERE user_id = $1",
                "u1",
            )
            .await
                == 3
        },
    )
    .await;
    s.stop_worker().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_worker_reconnects_by_itself_when_the_broker_goes_away_and_comes_back() {
    let proxy = Proxy::start().await;
    let real = amqp_url();
    // The worker reaches RabbitMQ through the proxy; the API and ImageGene directly.
    let mut s = stack(&[("AMQP_URL", &proxy.url)], &[("AMQP_URL", &real)]).await;
    s.start_worker().await;
    s.grant("u1", 100).await;
    s.deduct("u1", 5, "before").await;
    s.publish_event("failed", &event("ev-before", "u1", "before"))
        .await;
    let refunds = || {
        s.scalar(
            "SELECT count(*) FROM ledger_entries WHERE user_id = $1 AND kind = 'refund'",
            "u1",
        )
    };
    wait_for("the first refund", Duration::from_secs(10), || async {
        refunds().await == 1
    })
    .await;

    proxy.cut();
    let health_url = s
        .worker_metrics
        .clone()
        .expect("worker")
        .replace("/metrics", "/health");
    wait_for(
        "the worker sees the broker gone",
        Duration::from_secs(10),
        || async {
            let h: Value = s
                .http
                .get(&health_url)
                .send()
                .await
                .expect("health")
                .json()
                .await
                .expect("json");
            h["broker"] == json!("unavailable")
        },
    )
    .await;
    // Work arrives while the worker is cut off; it waits in the queue.
    s.deduct("u1", 5, "during").await;
    s.publish_event("failed", &event("ev-during", "u1", "during"))
        .await;
    assert_eq!(refunds().await, 1);

    proxy.restore();
    wait_for(
        "the refund after the broker came back",
        Duration::from_secs(30),
        || async { refunds().await == 2 },
    )
    .await;
    s.wait_idle().await;
    assert!(s.worker_metric("penora_worker_reconnects_total").await >= 1.0);
    assert_eq!(
        s.scalar("SELECT balance FROM accounts WHERE user_id = $1", "u1")
            .await,
        100
    );
    s.stop_worker().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_held_audit_chain_never_holds_up_the_other_users_audits() {
    // A long lock timeout: while u1's chain is held, its audit waits that
    // long; the other users' audits must not.
    let mut s = stack(&[("DB_LOCK_TIMEOUT_MS", "8000")], &[]).await;
    s.grant("u1", 100).await;
    let others: Vec<String> = (0..60).map(|i| format!("o{i:02}")).collect();
    for u in &others {
        s.grant(u, 10).await;
    }
    s.start_worker().await;
    s.wait_idle().await;
    let holder = s.hold_audit_chain("u1").await;
    // Deductions for the held user and the others, queued while the worker
    // is away, so that their audit jobs arrive together and share batches.
    s.stop_worker().await;
    for (i, u) in others.iter().enumerate() {
        if i == others.len() / 2 {
            s.deduct("u1", 2, "held").await;
        }
        s.deduct(u, 1, &format!("c{i}")).await;
    }
    let started = std::time::Instant::now();
    s.start_worker().await;
    wait_for(
        "every other user's deduction audited",
        Duration::from_secs(6),
        || async {
            s.scalar(
                "SELECT count(*) FROM ledger_entries l WHERE l.kind = 'deduct' AND l.user_id <> $1 \
                 AND NOT EXISTS (SELECT 1 FROM audit_pending p WHERE p.user_id = l.user_id AND p.id = l.id)",
                "u1",
            )
            .await
                == others.len() as i64
        },
    )
    .await;
    eprintln!(
        "other users audited {:?} after the worker started, u1's chain held",
        started.elapsed()
    );
    assert_eq!(
        s.scalar(
            "SELECT coalesce(max(seq), 0) FROM audit_checkpoints WHERE user_id = $1",
            "u1"
        )
        .await,
        1,
        "u1's deduction waits for its chain"
    );
    holder.batch_execute("ROLLBACK").await.expect("released");
    s.wait_idle().await;
    assert_eq!(
        s.scalar(
            "SELECT coalesce(max(seq), 0) FROM audit_checkpoints WHERE user_id = $1",
            "u1"
        )
        .await,
        2
    );
    s.stop_worker().await;
}
