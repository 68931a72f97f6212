//! The worker's `/health` and `/ready` read the database at most once a
//! second, however often they are called (issue 24, item 4).

use std::time::Instant;

use serde_json::{Value, json};

use crate::support::stack;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_health_checks_queries_the_database_once_a_second() {
    let mut s = stack(&[], &[]).await;
    s.start_worker().await;
    let base = s
        .worker_metrics
        .clone()
        .expect("worker")
        .replace("/metrics", "");
    let started = Instant::now();
    let mut calls = 0;
    for _ in 0..300 {
        for path in ["/health", "/ready"] {
            let r = s
                .http
                .get(format!("{base}{path}"))
                .send()
                .await
                .expect("sent");
            assert_eq!(r.status(), reqwest::StatusCode::OK, "{path}");
            let body: Value = r.json().await.expect("json");
            if path == "/health" {
                // The body is the same as before the cache.
                assert_eq!(body["database"], json!("ok"), "{body}");
                assert!(body["outbox_pending"].is_i64(), "{body}");
                assert_eq!(body["version"], json!(env!("CARGO_PKG_VERSION")));
            } else {
                assert_eq!(body["ready"], json!(true), "{body}");
            }
            calls += 1;
        }
    }
    let secs = started.elapsed().as_secs_f64().ceil() + 1.0;
    let health = s
        .worker_metric("penora_health_probes_total{probe=\"health\"}")
        .await;
    let ready = s
        .worker_metric("penora_health_probes_total{probe=\"ready\"}")
        .await;
    eprintln!("{calls} calls in {secs} s: {health} health probes, {ready} readiness probes");
    assert!(health >= 1.0 && health <= secs, "{health} in {secs} s");
    assert!(ready >= 1.0 && ready <= secs, "{ready} in {secs} s");
    s.stop_worker().await;
}
