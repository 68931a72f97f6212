//! `penora-ops wait-idle`: exits 1 naming what is still in flight, and 0
//! once the worker has done everything.

use crate::support::{stack, stderr, stdout};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wait_idle_names_the_work_left_and_returns_once_the_worker_did_it() {
    let mut s = stack().await;
    s.grant("u1", 10).await;
    s.deduct("u1", 4, "w1").await;
    // No worker yet: two ledger entries wait for their audit records.
    let busy = s.ops(&["wait-idle", "--timeout-secs", "1"]).await;
    assert_eq!(busy.status.code(), Some(1), "{busy:?}");
    let why = stderr(&busy);
    assert!(
        why.contains("not idle after 1 s") && why.contains("2 ledger entries unaudited"),
        "{why}"
    );
    s.start_worker().await;
    let idle = s.ops(&["wait-idle", "--timeout-secs", "60"]).await;
    assert!(idle.status.success(), "{idle:?}");
    assert!(stdout(&idle).contains("idle after"), "{}", stdout(&idle));
    assert_eq!(
        s.scalar(
            "SELECT coalesce(max(seq), 0) FROM audit_checkpoints WHERE user_id = $1",
            "u1"
        )
        .await,
        2,
        "idle means audited"
    );
    s.stop_worker().await;
}
