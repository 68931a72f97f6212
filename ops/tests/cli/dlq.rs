//! `penora-ops queues` and `dlq`: parked messages on this test's prefixed
//! topology are listed, shown, replayed after a dry run and purged, and
//! looking at them never counts as a delivery.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{amqp_url, stack, wait_for};

fn event(id: &str, user: &str, code: &str) -> String {
    json!({"event_id": id, "user_id": user, "project_code": code, "occurred_at": "2026-11-24T06:00:00.000Z"}).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_parked_message_is_listed_shown_replayed_after_a_dry_run_and_purged() {
    let mut s = stack().await;
    s.start_worker().await;
    s.grant("u1", 50).await;
    s.publish_event("failed", &event("ev-p1", "u1", "later"))
        .await;
    s.publish_event("failed", "{broken").await;
    let dead = s.topology.dead_queue("penora.generation-events");
    wait_for("two parked", Duration::from_secs(10), || async {
        s.depth(&dead).await == 2
    })
    .await;

    let queues = s.ops(&["queues", "--json"]).await;
    assert!(queues.status.success(), "{queues:?}");
    let rows: Vec<Value> = serde_json::from_slice(&queues.stdout).expect("json");
    assert_eq!(
        rows.len(),
        s.topology.all_queues().len(),
        "every queue is listed"
    );
    let dead_row = rows
        .iter()
        .find(|r| r["queue"] == json!(dead))
        .expect("the dead queue is listed");
    assert_eq!(dead_row["ready"], json!(2));
    let table = String::from_utf8_lossy(&s.ops(&["queues"]).await.stdout).into_owned();
    assert!(
        table.starts_with("QUEUE") && table.contains(&dead),
        "{table}"
    );

    let listed: Vec<Value> = serde_json::from_slice(
        &s.ops(&["dlq", "list", "penora.generation-events", "--json"])
            .await
            .stdout,
    )
    .expect("json");
    assert_eq!(listed.len(), 2);
    let target = listed
        .iter()
        .find(|m| m["error"].as_str().unwrap_or_default().contains("later"))
        .expect("parked for its unknown reservation");
    let id = target["message_id"].as_str().expect("id").to_owned();
    let recent = s
        .ops(&[
            "dlq",
            "list",
            "penora.generation-events",
            "--since",
            "2000-01-01T00:00:00Z",
            "--id",
            &id,
        ])
        .await;
    assert!(String::from_utf8_lossy(&recent.stdout).contains(&id));
    let future = s
        .ops(&[
            "dlq",
            "list",
            "penora.generation-events",
            "--since",
            "2999-01-01T00:00:00Z",
        ])
        .await;
    assert!(String::from_utf8_lossy(&future.stdout).contains("0 parked"));

    let shown = s
        .ops(&["dlq", "show", "penora.generation-events", "--id", &id])
        .await;
    let shown: Vec<Value> = serde_json::from_slice(&shown.stdout).expect("json");
    assert_eq!(shown.len(), 1);
    assert!(
        shown[0]["body"]
            .as_str()
            .unwrap_or_default()
            .contains("\"event_id\":\"ev-p1\"")
    );

    s.deduct("u1", 7, "later").await;
    let dry = s
        .ops(&[
            "dlq",
            "replay",
            "penora.generation-events",
            "--id",
            &id,
            "--dry-run",
        ])
        .await;
    assert!(String::from_utf8_lossy(&dry.stdout).contains("would replay"));
    assert_eq!(s.depth(&dead).await, 2, "a dry run changes nothing");
    let real = s
        .ops(&["dlq", "replay", "penora.generation-events", "--id", &id])
        .await;
    assert!(real.status.success(), "{real:?}");
    wait_for("the replay refunds", Duration::from_secs(10), || async {
        s.balance("u1").await == 50
    })
    .await;
    assert_eq!(s.depth(&dead).await, 1);

    let refused = s.ops(&["dlq", "purge", "penora.generation-events"]).await;
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stdout).contains("would delete 1"));
    assert_eq!(s.depth(&dead).await, 1, "nothing deleted without --yes");
    let purged = s
        .ops(&["dlq", "purge", "penora.generation-events", "--yes"])
        .await;
    assert!(purged.status.success());
    assert_eq!(s.depth(&dead).await, 0);
    s.stop_worker().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn looking_at_dead_letters_never_counts_as_a_delivery() {
    let mut s = stack().await;
    // The dead queue as RabbitMQ 4 makes a quorum queue by default: a
    // delivery limit of 20 and no dead-letter target, so that a message
    // delivered a 21st time is dropped. (The services find it declared with
    // other arguments than theirs, use it as it is, and warn.)
    let dead = s.topology.dead_queue("penora.generation-events");
    {
        use lapin::{
            options::QueueDeclareOptions,
            types::{AMQPValue, FieldTable},
        };
        let connection = penora_platform::broker::connect(&amqp_url(), "penora-tests")
            .await
            .expect("broker");
        let ch = connection.create_channel().await.expect("channel");
        ch.queue_delete(dead.clone().into(), Default::default())
            .await
            .expect("deleted");
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        args.insert("x-delivery-limit".into(), AMQPValue::LongInt(20));
        ch.queue_declare(
            dead.clone().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .expect("declared with a limit of 20");
        let _ = connection.close(200, "bye".into()).await;
    }
    s.start_worker().await;
    s.publish_event("failed", "{broken").await;
    wait_for("parked", Duration::from_secs(10), || async {
        s.depth(&dead).await == 1
    })
    .await;
    // Look as an operator would, 50 times with each command: 150 looks, far
    // past the limit of 20.
    for _ in 0..50 {
        for args in [
            &["dlq", "list", "penora.generation-events"][..],
            &["dlq", "show", "penora.generation-events"],
            &["dlq", "replay", "penora.generation-events", "--dry-run"],
        ] {
            let out = s.ops(args).await;
            assert!(out.status.success(), "{args:?}: {out:?}");
        }
    }
    assert_eq!(s.depth(&dead).await, 1, "still parked, once");
    // A quorum queue counts every unacknowledged return as a delivery and
    // says so in `x-delivery-count`; the looks above returned nothing.
    let connection = penora_platform::broker::connect(&amqp_url(), "penora-tests")
        .await
        .expect("broker");
    let ch = connection.create_channel().await.expect("channel");
    let got = ch
        .basic_get(
            dead.clone().into(),
            lapin::options::BasicGetOptions { no_ack: false },
        )
        .await
        .expect("get")
        .expect("the parked message");
    let count = penora_platform::broker::headers::int(&got.delivery.properties, "x-delivery-count");
    assert!(count.unwrap_or(0) == 0, "delivery count {count:?}");
    assert_eq!(got.delivery.data, b"{broken", "the body is the one parked");
    let _ = connection.close(200, "bye".into()).await;
    s.stop_worker().await;
}
