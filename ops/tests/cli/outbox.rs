//! `penora-ops outbox`: the rows the broker kept refusing are listed, and
//! put back for the relays to publish.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{stack, stdout, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_aside_row_is_listed_and_retry_puts_it_back_for_the_relay() {
    let s = stack().await;
    s.grant("u1", 5).await;
    let audit = s.topology.queue("penora.ledger-audit");
    wait_for(
        "the grant's job is published",
        Duration::from_secs(10),
        || async { s.depth(&audit).await == 1 },
    )
    .await;
    // A job the broker refused three times, set aside as the relay does.
    let id = s
        .scalar(
            "INSERT INTO outbox (user_id, exchange, routing_key, message_id, payload, attempts, refusals, \
                                 last_error, set_aside_at) \
             VALUES ($1, 'penora.jobs', 'penora.ledger-audit', gen_random_uuid(), '{\"entry_id\": 0}', 3, 3, \
                     'no queue is bound to this routing key', now()) \
             RETURNING id",
            "u1",
        )
        .await;

    let listed = s.ops(&["outbox", "list", "--json"]).await;
    assert!(listed.status.success(), "{listed:?}");
    let rows: Vec<Value> = serde_json::from_slice(&listed.stdout).expect("json");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["id"], json!(id));
    assert_eq!(rows[0]["routing_key"], json!("penora.ledger-audit"));
    assert_eq!(rows[0]["refusals"], json!(3));
    assert!(
        rows[0]["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("no queue is bound"),
        "{rows:?}"
    );
    let table = stdout(&s.ops(&["outbox", "list"]).await);
    assert!(table.contains("1 set aside"), "{table}");

    let missing = s.ops(&["outbox", "retry", "--id", "999999999"]).await;
    assert_eq!(missing.status.code(), Some(2), "{missing:?}");
    let retried = s.ops(&["outbox", "retry", "--id", &id.to_string()]).await;
    assert!(retried.status.success(), "{retried:?}");
    assert!(
        stdout(&retried).contains("1 row(s) put back"),
        "{retried:?}"
    );
    // The API's relay publishes it (and deletes the row once confirmed).
    wait_for("the row is published", Duration::from_secs(15), || async {
        s.depth(&audit).await == 2
    })
    .await;
    wait_for("the row is gone", Duration::from_secs(5), || async {
        s.scalar("SELECT count(*) FROM outbox WHERE user_id = $1", "u1")
            .await
            == 0
    })
    .await;
    let empty = stdout(&s.ops(&["outbox", "list"]).await);
    assert!(empty.contains("0 set aside"), "{empty}");
}
