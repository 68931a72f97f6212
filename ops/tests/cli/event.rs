//! `penora-ops event`: an operator publishes a generation event as ImageGene
//! would (a repair), and the worker refunds the reservation.

use std::time::Duration;

use crate::support::{stack, stdout, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_published_with_penora_ops_refunds_the_reservation() {
    let mut s = stack().await;
    s.start_worker().await;
    s.grant("u1", 20).await;
    s.deduct("u1", 8, "img_ops").await;
    let out = s
        .ops(&[
            "event",
            "failed",
            "u1",
            "img_ops",
            "--event-id",
            "ev-ops",
            "--reason",
            "operator repair",
        ])
        .await;
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout(&out).contains("published generation.failed event ev-ops"),
        "{out:?}"
    );
    wait_for("the refund", Duration::from_secs(15), || async {
        s.balance("u1").await == 20
    })
    .await;
    assert_eq!(
        s.scalar(
            "SELECT count(*) FROM processed_events WHERE user_id = $1 AND event_id = 'ev-ops'",
            "u1"
        )
        .await,
        1
    );
    s.stop_worker().await;
}
