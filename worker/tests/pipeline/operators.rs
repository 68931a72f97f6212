//! What operators rely on: metrics of both services after a real flow, every
//! queue's delivery limit and dead-letter target (a message past its limit
//! parked by the broker, and replayed), and one id following a credit
//! movement from the HTTP request to the worker's log. `penora-ops`'s own
//! commands are tested in `ops/tests`.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{BOOT_KEY, PNG_1X1, parse_prometheus, stack, wait_for};

fn event(id: &str, user: &str, code: &str) -> String {
    json!({"event_id": id, "user_id": user, "project_code": code, "occurred_at": "2026-11-24T06:00:00.000Z"}).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_services_export_prometheus_metrics_with_the_right_counts() {
    let s = stack(&[], &[]).await;
    let worker = s.spawn_worker_process().await;
    let scrape = |url: String| {
        let http = s.http.clone();
        async move {
            parse_prometheus(
                &http
                    .get(url)
                    .send()
                    .await
                    .expect("scrape")
                    .text()
                    .await
                    .expect("text"),
            )
        }
    };
    // Counters are compared as increases over these, whatever the process
    // counted before (the recorder is process-wide).
    let api_before = scrape(format!("{}/metrics", s.base)).await;
    let w_before = scrape(worker.metrics_url.clone()).await;
    s.grant("u1", 100).await;
    s.deduct("u1", 5, "m_a").await;
    s.deduct("u1", 5, "m_b").await;
    let r = s
        .post(
            "/api/unified/save-project",
            &json!({"user_id": "u1", "app_source": "imagegene", "project_type": "ai_artwork", "title": "t", "content": PNG_1X1}),
        )
        .await;
    assert_eq!(r.status(), reqwest::StatusCode::ACCEPTED);
    s.publish_event("failed", &event("ev-m", "u1", "m_a")).await;
    s.publish_event("failed", "{broken").await;
    let dead = s.topology.dead_queue("penora.generation-events");
    let dead_series = format!("penora_queue_messages{{queue=\"{dead}\"}}");
    wait_for(
        "the worker's gauges see the parked message",
        Duration::from_secs(30),
        || async { scrape(worker.metrics_url.clone()).await.get(&dead_series) == Some(&1.0) },
    )
    .await;
    s.wait_idle().await;

    let api = scrape(format!("{}/metrics", s.base)).await;
    let get = |m: &std::collections::HashMap<String, f64>, k: &str| {
        *m.get(k).unwrap_or_else(|| panic!("missing {k}"))
    };
    let increase =
        |after: &std::collections::HashMap<String, f64>,
         before: &std::collections::HashMap<String, f64>,
         k: &str| { get(after, k) - before.get(k).copied().unwrap_or(0.0) };
    assert_eq!(
        increase(
            &api,
            &api_before,
            r#"penora_http_requests_total{route="/api/unified/deduct-credits",method="POST",status="200"}"#
        ),
        2.0
    );
    assert_eq!(
        increase(
            &api,
            &api_before,
            r#"penora_http_requests_total{route="/api/unified/save-project",method="POST",status="202"}"#
        ),
        1.0
    );
    assert_eq!(
        increase(
            &api,
            &api_before,
            r#"penora_http_request_duration_seconds_count{route="/api/unified/deduct-credits"}"#
        ),
        2.0
    );
    assert_eq!(
        increase(
            &api,
            &api_before,
            r#"penora_credits_moved_total{kind="reserved",app="imagegene"}"#
        ),
        10.0
    );
    assert_eq!(
        increase(
            &api,
            &api_before,
            r#"penora_credits_moved_total{kind="granted",app="penora"}"#
        ),
        100.0
    );
    assert!(
        api.contains_key("penora_outbox_pending_rows")
            && api.contains_key("penora_outbox_oldest_age_seconds")
    );
    assert!(
        api.contains_key(r#"penora_db_pool_connections{state="in_use"}"#)
            && api.contains_key("penora_db_pool_waiting")
    );

    let w = scrape(worker.metrics_url.clone()).await;
    assert_eq!(
        increase(
            &w,
            &w_before,
            r#"penora_worker_messages_total{queue="penora.generation-events",outcome="ok"}"#
        ),
        1.0
    );
    assert_eq!(
        increase(
            &w,
            &w_before,
            r#"penora_worker_messages_total{queue="penora.generation-events",outcome="parked"}"#
        ),
        1.0
    );
    assert_eq!(
        increase(
            &w,
            &w_before,
            r#"penora_worker_messages_total{queue="penora.save-project",outcome="ok"}"#
        ),
        1.0
    );
    // grant, two deducts, one refund: four ledger entries, four audit jobs.
    assert_eq!(
        increase(
            &w,
            &w_before,
            r#"penora_worker_messages_total{queue="penora.ledger-audit",outcome="ok"}"#
        ),
        4.0
    );
    assert_eq!(
        increase(
            &w,
            &w_before,
            r#"penora_credits_moved_total{kind="refunded",app="imagegene"}"#
        ),
        5.0
    );
    assert_eq!(
        increase(&w, &w_before, "penora_event_to_refund_seconds_count"),
        1.0
    );
    assert!(w.contains_key(
        r#"penora_worker_handle_duration_seconds_count{queue="penora.ledger-audit"}"#
    ));
    let work_queue = format!(
        "penora_queue_consumers{{queue=\"{}\"}}",
        s.topology.queue("penora.save-project")
    );
    assert_eq!(get(&w, &work_queue), 1.0);
    assert!(
        w.keys()
            .any(|k| k.starts_with("penora_outbox_relay_lag_seconds"))
    );
    for text in [api.keys(), w.keys()].into_iter().flatten() {
        assert!(
            !text.contains("u1") && !text.contains(BOOT_KEY),
            "no user id or key as a label: {text}"
        );
    }
    worker.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_id_sent_with_a_deduct_appears_in_the_audit_jobs_log_line() {
    let s = stack(&[], &[]).await;
    let worker = s.spawn_worker_process().await;
    s.grant("u1", 10).await;
    let r = s
        .http
        .post(format!("{}/api/unified/deduct-credits", s.base))
        .header("X-API-Key", BOOT_KEY)
        .header("X-Request-Id", "corr-7f3c2a-deduct")
        .json(&json!({"user_id": "u1", "amount": 2, "app_name": "imagegene", "project_code": "c1"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.headers()["x-request-id"], "corr-7f3c2a-deduct");
    wait_for(
        "the audit job's log line carries the id",
        Duration::from_secs(15),
        || async {
            worker.logged(&[
                "corr-7f3c2a-deduct",
                "message handled",
                "penora.ledger-audit",
            ])
        },
    )
    .await;
    worker.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_queue_states_its_delivery_limit_and_dead_letter_target() {
    use lapin::{
        options::QueueDeclareOptions,
        types::{AMQPValue, FieldTable},
    };
    let s = stack(&[], &[]).await;
    let connection = penora_platform::broker::connect(&crate::support::amqp_url(), "penora-tests")
        .await
        .expect("broker");
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    // A declare with the very same arguments passes; one that differs is
    // refused (406): that is how the broker says which arguments a queue has.
    let same = |limit: i32, dead: Option<String>| {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        args.insert("x-delivery-limit".into(), AMQPValue::LongInt(limit));
        if let Some(dead) = dead {
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString("".into()),
            );
            args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(dead.into()),
            );
            args.insert(
                "x-dead-letter-strategy".into(),
                AMQPValue::LongString("at-least-once".into()),
            );
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString("reject-publish".into()),
            );
        }
        args
    };
    for work in penora_platform::broker::WORK_QUEUES {
        let (name, dead) = (s.topology.queue(work), s.topology.dead_queue(work));
        let mut work_args = same(
            penora_platform::broker::WORK_DELIVERY_LIMIT,
            Some(dead.clone()),
        );
        if work == penora_domain::messages::GENERATION_EVENTS {
            // What ImageGene publishes is bounded (EVENTS_QUEUE_MAX_LENGTH,
            // new events refused past it).
            work_args.insert("x-max-length".into(), AMQPValue::LongLongInt(1_000_000));
        }
        for (queue, args) in [
            (name.clone(), work_args),
            (
                dead.clone(),
                same(penora_platform::broker::DEAD_DELIVERY_LIMIT, None),
            ),
        ] {
            let ch = connection.create_channel().await.expect("channel");
            ch.queue_declare(queue.clone().into(), durable, args)
                .await
                .unwrap_or_else(|e| panic!("{queue} has other arguments: {e}"));
            let ch = connection.create_channel().await.expect("channel");
            let other = ch
                .queue_declare(queue.clone().into(), durable, same(20, None))
                .await;
            assert!(
                other.is_err(),
                "{queue} accepted a limit of 20: it states none"
            );
        }
    }
    // A queue made by an older release, without these arguments, is used as
    // it is: declaring the topology again still succeeds.
    let legacy = s.topology.queue("penora.ledger-audit");
    let ch = connection.create_channel().await.expect("channel");
    ch.queue_delete(legacy.clone().into(), Default::default())
        .await
        .expect("deleted");
    let mut plain = FieldTable::default();
    plain.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(legacy.clone().into(), durable, plain)
        .await
        .expect("legacy queue");
    s.topology
        .declare(&connection)
        .await
        .expect("the topology declares over a legacy queue");
    let _ = connection.close(200, "bye".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_past_its_delivery_limit_is_parked_and_replays() {
    use lapin::options::{BasicGetOptions, BasicNackOptions};
    let mut s = stack(&[], &[]).await;
    s.grant("crashy", 50).await;
    s.deduct("crashy", 10, "loop").await;
    s.publish_event("failed", &event("ev-crash", "crashy", "loop"))
        .await;
    // A consumer that dies before acknowledging, again and again: each
    // return counts as a delivery.
    let (work, dead) = (
        s.topology.queue("penora.generation-events"),
        s.topology.dead_queue("penora.generation-events"),
    );
    let connection = penora_platform::broker::connect(&crate::support::amqp_url(), "penora-tests")
        .await
        .expect("broker");
    let ch = connection.create_channel().await.expect("channel");
    let mut returns = 0;
    while let Some(got) = ch
        .basic_get(work.clone().into(), BasicGetOptions { no_ack: false })
        .await
        .expect("get")
    {
        got.delivery
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
            .expect("returned");
        returns += 1;
        assert!(returns <= 60, "the broker never applied the delivery limit");
    }
    let _ = connection.close(200, "bye".into()).await;
    assert!(
        returns > penora_platform::broker::WORK_DELIVERY_LIMIT as usize,
        "{returns} returns"
    );
    wait_for("parked by the broker", Duration::from_secs(10), || async {
        s.depth(&dead).await == 1
    })
    .await;
    let listed: Vec<Value> = serde_json::from_slice(
        &s.ops(&["dlq", "list", "penora.generation-events", "--json"])
            .await
            .stdout,
    )
    .expect("json");
    assert_eq!(listed.len(), 1);
    assert!(
        listed[0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("delivery_limit"),
        "{listed:?}"
    );
    s.start_worker().await;
    let replay = s.ops(&["dlq", "replay", "penora.generation-events"]).await;
    assert!(replay.status.success(), "{replay:?}");
    wait_for("the replay refunds", Duration::from_secs(15), || async {
        s.scalar("SELECT balance FROM accounts WHERE user_id = $1", "crashy")
            .await
            == 50
    })
    .await;
    assert_eq!(s.depth(&dead).await, 0);
    s.stop_worker().await;
}

#[tokio::test]
async fn the_broker_version_is_read_for_the_start_up_log() {
    let db = penora_testing::TestDb::new().await;
    let amqp = crate::support::amqp_url();
    let management = crate::support::management_url();
    let settings = db.settings(&[
        ("AMQP_URL", amqp.as_str()),
        ("RABBITMQ_MANAGEMENT_URL", management.as_str()),
    ]);
    let version = penora_platform::broker::Management::from_settings(&settings.broker)
        .expect("configured")
        .broker_version()
        .await
        .unwrap_or_else(|| {
            panic!(
                "the RabbitMQ management API at {management} did not answer: `scripts/services.sh` enables the plugin"
            )
        });
    assert!(
        version.starts_with("3.") || version.starts_with("4."),
        "{version}"
    );
}
