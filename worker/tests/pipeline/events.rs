//! Events out (contract §14) that the worker writes: `credits.expiring` from
//! the lots' timer (once per lot, `EXPIRY_NOTICE_SECS` ahead),
//! `credits.expired` with the timer's expiry entry, the refunds and
//! settlements of ImageGene's `generation.*` events, and `project.saved`,
//! `project.failed`, `project.deleted`. Each test binds a queue of its own
//! to this test's `penora.events` and reads what the relays published.

use std::time::Duration;

use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use penora_domain::events::{EXCHANGE, Envelope};
use penora_testing::travel;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{BOOT_KEY, PNG_1X1, Stack, amqp_url, stack};

/// A queue bound to the test's `penora.events` with `#`, and what it got.
struct Tap {
    channel: lapin::Channel,
    queue: String,
    got: Vec<(String, Envelope)>,
    _connection: lapin::Connection,
}

impl Tap {
    async fn bind(s: &Stack) -> Self {
        let connection = penora_platform::broker::connect(&amqp_url(), "penora-events-test")
            .await
            .expect("broker");
        let channel = connection.create_channel().await.expect("channel");
        let queue = channel
            .queue_declare(
                "".into(),
                // Server-named, gone with the test's connection.
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("queue")
            .name()
            .to_string();
        channel
            .queue_bind(
                queue.clone().into(),
                s.topology.exchange(EXCHANGE).into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bound");
        Self {
            channel,
            queue,
            got: Vec::new(),
            _connection: connection,
        }
    }

    /// Takes what the queue holds into `got`.
    async fn pull(&mut self) {
        while let Some(m) = self
            .channel
            .basic_get(self.queue.clone().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
        {
            let e: Envelope = serde_json::from_slice(&m.delivery.data).expect("an envelope");
            assert_eq!(
                e.kind,
                m.delivery.routing_key.as_str(),
                "routing key = type"
            );
            assert!(e.id.starts_with("evt_") && e.id.len() == 36, "{}", e.id);
            self.got.push((e.kind.clone(), e));
        }
    }

    /// Waits (polling, at most `limit`) until `n` events of `kind` arrived;
    /// returns their data.
    async fn wait(&mut self, kind: &str, n: usize, limit: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            self.pull().await;
            let found = self.of(kind);
            if found.len() >= n {
                return found;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "waited for {n} {kind}, got {:?}",
                self.got
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The data of the events of `kind` so far.
    fn of(&self, kind: &str) -> Vec<Value> {
        self.got
            .iter()
            .filter(|(k, _)| k == kind)
            .map(|(_, e)| e.data.clone())
            .collect()
    }
}

fn in_secs(secs: i64) -> String {
    penora_domain::timefmt::rfc3339_millis(
        time::OffsetDateTime::now_utc() + time::Duration::seconds(secs),
    )
}

async fn lot(s: &Stack, reference: &str, amount: i64, expires_in: Option<i64>) -> Value {
    let mut body = json!({"user_id": "u1", "amount": amount, "reason": "test",
                          "reference": reference, "category": "promotional"});
    if let Some(secs) = expires_in {
        body["expires_at"] = json!(in_secs(secs));
    }
    let r = s.post("/api/unified/add-credits", &body).await;
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credits_expiring_fires_once_per_lot_ahead_and_credits_expired_with_the_expiry_entry() {
    let mut s = stack(&[("EXPIRY_NOTICE_SECS", "120")], &[]).await;
    let mut tap = Tap::bind(&s).await;
    s.grant("u1", 50).await;
    let soon = lot(&s, "soon", 10, Some(60)).await; // inside the notice
    let later = lot(&s, "later", 7, Some(86_400)).await; // outside it
    lot(&s, "never", 3, None).await;
    s.start_worker().await;
    let expiring = tap
        .wait("credits.expiring", 1, Duration::from_secs(10))
        .await;
    assert_eq!(
        expiring[0],
        json!({"user_id": "u1", "app": "penora", "lot_id": soon["lot_id"], "amount": 10,
               "category": "promotional", "expires_at": soon["expires_at"]})
    );
    // The lot passes its expiry: the timer writes its expire entry, and
    // its credits.expired; several timer rounds later the lot was noticed
    // once, the others not at all.
    let mut client = s.pool.get().await.expect("db");
    travel(&mut client, Duration::from_secs_f64(60.001)).await;
    let expired = tap
        .wait("credits.expired", 1, Duration::from_secs(10))
        .await;
    assert_eq!(
        expired[0],
        json!({"user_id": "u1", "app": "penora", "amount": 10, "balance": 60,
               "lot_ids": [soon["lot_id"]]})
    );
    s.wait_idle().await;
    tap.pull().await;
    assert_eq!(tap.of("credits.expiring").len(), 1, "{:?}", tap.got);
    let noticed = s
        .scalar(
            "SELECT count(*) FROM credit_lots WHERE user_id = $1 AND expiry_noticed_at IS NOT NULL",
            "u1",
        )
        .await;
    assert_eq!(noticed, 1);
    // The later lot comes inside the notice: noticed once, too.
    travel(&mut client, Duration::from_secs(86_400 - 100)).await;
    let expiring = tap
        .wait("credits.expiring", 2, Duration::from_secs(10))
        .await;
    assert_eq!(expiring[1]["lot_id"], later["lot_id"]);
    assert_eq!(expiring[1]["amount"], 7);
    s.wait_idle().await;
    tap.pull().await;
    assert_eq!(tap.of("credits.expiring").len(), 2, "{:?}", tap.got);
    s.stop_worker().await;
}

fn generation(event_id: &str, code: &str) -> String {
    json!({"event_id": event_id, "user_id": "u1", "project_code": code,
           "reason": "GPU out of memory", "occurred_at": in_secs(0)})
    .to_string()
}

async fn save(s: &Stack, title: &str) -> String {
    let r = s
        .post(
            "/api/unified/save-project",
            &json!({"user_id": "u1", "app_source": "imagegene", "project_type": "ai_artwork",
                    "title": title, "content": PNG_1X1}),
        )
        .await;
    let status = r.status();
    let body: Value = r.json().await.expect("json");
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    body["project_id"].as_str().expect("id").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn generation_events_and_saves_report_refunds_settlements_and_projects() {
    let mut s = stack(&[], &[]).await;
    let mut tap = Tap::bind(&s).await;
    s.grant("u1", 100).await;
    s.deduct("u1", 5, "f1").await;
    s.deduct("u1", 3, "s1").await;
    let kept = save(&s, "kept").await;
    let broken = save(&s, "broken").await;
    // Content a newer check refuses: the worker fails the save.
    let client = s.pool.get().await.expect("db");
    client
        .execute(
            "UPDATE project_contents SET data = $2 WHERE project_id = $1::text::uuid",
            &[&broken, &b"not an image".to_vec()],
        )
        .await
        .expect("content replaced");
    s.start_worker().await;
    s.publish_event("failed", &generation("e1", "f1")).await;
    s.publish_event("succeeded", &generation("e2", "s1")).await;

    let refunded = tap
        .wait("credits.refunded", 1, Duration::from_secs(10))
        .await;
    assert_eq!(
        refunded[0],
        json!({"user_id": "u1", "app": "imagegene", "project_code": "f1", "amount": 5,
               "balance": 97, "reason": "GPU out of memory", "reference": null})
    );
    let settled = tap
        .wait("reservation.settled", 1, Duration::from_secs(10))
        .await;
    assert_eq!(
        settled[0],
        json!({"user_id": "u1", "app": "imagegene", "project_code": "s1", "amount": 3,
               "returned": 0, "settled_by": "final"})
    );
    let saved = tap.wait("project.saved", 1, Duration::from_secs(20)).await;
    assert_eq!(saved[0]["project_id"], kept.as_str());
    assert_eq!(saved[0]["app"], "imagegene");
    assert_eq!(saved[0]["title"], "kept");
    assert!(
        saved[0]["size"].as_i64().is_some_and(|n| n > 0),
        "{saved:?}"
    );
    assert!(saved[0].get("project_code").is_some());
    let failed = tap.wait("project.failed", 1, Duration::from_secs(20)).await;
    assert_eq!(failed[0]["project_id"], broken.as_str());
    assert!(
        failed[0]["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{failed:?}"
    );

    let r = s
        .http
        .delete(format!("{}/api/unified/projects/{kept}?user_id=u1", s.base))
        .header("X-API-Key", BOOT_KEY)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), StatusCode::OK);
    let deleted = tap
        .wait("project.deleted", 1, Duration::from_secs(10))
        .await;
    assert_eq!(
        deleted[0],
        json!({"user_id": "u1", "app": "imagegene", "project_id": kept, "reason": "deleted"})
    );
    s.wait_idle().await;
    tap.pull().await;
    // Nothing crossed the threshold; each fact was reported once.
    let mut kinds: Vec<&str> = tap.got.iter().map(|(k, _)| k.as_str()).collect();
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        [
            "credits.granted",
            "credits.refunded",
            "project.deleted",
            "project.failed",
            "project.saved",
            "reservation.settled"
        ]
    );
    s.stop_worker().await;
}
