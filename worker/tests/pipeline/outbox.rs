//! An outbox that cannot jam (CONTRACT §11): a row the broker keeps refusing
//! is set aside after `OUTBOX_MAX_ATTEMPTS` while every other row flows, and
//! `penora-ops outbox retry` puts it back once the cause is fixed.

use std::time::Duration;

use lapin::{
    options::{QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};
use penora_platform::broker;
use serde_json::{Value, json};

use crate::support::{Stack, amqp_url, stack, wait_for};

/// A routing key no queue is bound to: a job kind of a newer release, say,
/// rolled out before its queue exists (a removed binding would not do: every
/// process declares the topology again when it connects).
const NEWER_JOB: &str = "penora.rebuild-thumbnails";

/// Declares a queue for [`NEWER_JOB`] and binds it; returns its name.
async fn bind_newer_job(s: &Stack) -> String {
    let connection = broker::connect(&amqp_url(), "penora-tests")
        .await
        .expect("broker");
    let ch = connection.create_channel().await.expect("channel");
    let queue = s.topology.queue(NEWER_JOB);
    // Gone by itself a minute after the test stops using it.
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), AMQPValue::LongInt(60_000));
    ch.queue_declare(queue.clone().into(), QueueDeclareOptions::default(), args)
        .await
        .expect("declared");
    ch.queue_bind(
        queue.clone().into(),
        s.topology.exchange("penora.jobs").into(),
        NEWER_JOB.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bound");
    let _ = connection.close(200, "bye".into()).await;
    queue
}

async fn queue_depth(queue: &str) -> u32 {
    let connection = broker::connect(&amqp_url(), "penora-tests")
        .await
        .expect("broker");
    let ch = connection.create_channel().await.expect("channel");
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("queue exists");
    let _ = connection.close(200, "bye".into()).await;
    q.message_count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_row_is_set_aside_while_the_others_flow_and_retry_puts_it_back() {
    let mut s = stack(
        &[
            ("OUTBOX_MAX_ATTEMPTS", "3"),
            ("OUTBOX_RETRY_BASE_MS", "100"),
        ],
        &[],
    )
    .await;
    s.start_worker().await;
    s.grant("poison", 10).await;
    // A job the broker cannot route, committed like any other.
    {
        let c = s.pool.get().await.expect("db");
        c.execute(
            "INSERT INTO outbox (user_id, exchange, routing_key, message_id, payload) \
             VALUES ('poison', 'penora.jobs', $1, gen_random_uuid(), '{\"project\": 1}')",
            &[&NEWER_JOB],
        )
        .await
        .expect("row");
    }
    // 100 other users' movements meanwhile, each with its audit job.
    for i in 0..100 {
        let user = format!("flow_{i:03}");
        s.grant(&user, 5).await;
        s.deduct(&user, 2, &format!("img_{i}")).await;
    }
    wait_for("the row is set aside", Duration::from_secs(30), || async {
        s.scalar(
            "SELECT count(*) FROM outbox WHERE set_aside_at IS NOT NULL AND user_id = $1",
            "poison",
        )
        .await
            == 1
    })
    .await;
    s.wait_idle().await;
    let audited = s
        .scalar(
            "SELECT coalesce(sum(seq), 0)::int8 FROM audit_checkpoints WHERE $1 = $1",
            "",
        )
        .await;
    let entries = s
        .scalar("SELECT count(*) FROM ledger_entries WHERE $1 = $1", "")
        .await;
    assert_eq!(
        entries, 201,
        "a grant for each of 101 users, 100 deductions"
    );
    assert_eq!(
        audited, entries,
        "every other job flowed past the stuck one"
    );

    let listed = s.ops(&["outbox", "list", "--json"]).await;
    assert!(listed.status.success(), "{listed:?}");
    let rows: Vec<Value> = serde_json::from_slice(&listed.stdout).expect("json");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["routing_key"], json!(NEWER_JOB));
    assert_eq!(rows[0]["refusals"], json!(3));
    assert!(
        rows[0]["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("no queue is bound"),
        "{rows:?}"
    );
    let table = String::from_utf8_lossy(&s.ops(&["outbox", "list"]).await.stdout).into_owned();
    assert!(table.contains("1 set aside"), "{table}");
    wait_for("the gauge shows it", Duration::from_secs(10), || async {
        s.worker_metric("penora_outbox_set_aside_rows").await == 1.0
    })
    .await;
    // Fixed: the queue exists now, and the operator puts the row back.
    let missing = s.ops(&["outbox", "retry", "--id", "999999999"]).await;
    assert_eq!(missing.status.code(), Some(2), "{missing:?}");
    let queue = bind_newer_job(&s).await;
    let retried = s
        .ops(&["outbox", "retry", "--id", &rows[0]["id"].to_string()])
        .await;
    assert!(retried.status.success(), "{retried:?}");
    wait_for("the row is published", Duration::from_secs(15), || async {
        queue_depth(&queue).await == 1
    })
    .await;
    // The relay deletes the row in its own commit after the broker's
    // confirm, so the message can be in the queue a moment before.
    wait_for(
        "no row is left unpublished",
        Duration::from_secs(10),
        || async {
            s.scalar(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL AND $1 = $1",
                "",
            )
            .await
                == 0
        },
    )
    .await;
    s.stop_worker().await;
}
