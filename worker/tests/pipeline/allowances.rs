//! The worker's timer grants a recurring allowance's period when it starts
//! (contract §16), with its audit and events, in real time. (Boundaries with
//! a controlled clock are in `penora-ledger`'s `tests/allowances.rs`.)

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{BOOT_KEY, stack, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_timer_grants_an_allowance_whose_first_period_starts_later_once() {
    let mut s = stack(&[], &[]).await;
    s.grant("lena", 10).await;
    s.start_worker().await;
    let starts_at = penora_domain::timefmt::rfc3339_millis(
        time::OffsetDateTime::now_utc() + time::Duration::milliseconds(1500),
    );
    let r: Value = s
        .http
        .put(format!("{}/api/unified/allowances", s.base))
        .header("X-API-Key", BOOT_KEY)
        .json(
            &json!({"user_id": "lena", "allowance_id": "soon", "amount": 25,
                      "period": "day", "starts_at": starts_at}),
        )
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(r["success"], json!(true), "{r}");
    assert_eq!(r["current_grant"], Value::Null, "not started yet: {r}");
    assert_eq!(r["allowance"]["next_grant_at"], json!(starts_at));
    // SETTLE_INTERVAL_SECS is 1: granted within a few intervals of its start.
    wait_for("the allowance's grant", Duration::from_secs(6), || async {
        s.scalar(
            "SELECT count(*) FROM credit_lots WHERE user_id = $1 AND reference LIKE 'allowance:soon:%'",
            "lena",
        )
        .await
            == 1
    })
    .await;
    assert_eq!(
        s.scalar("SELECT balance FROM accounts WHERE user_id = $1", "lena")
            .await,
        35
    );
    s.wait_idle().await;
    // One grant of the allowance (the timer run twice at one instant grants
    // once: the ledger's tests).
    assert_eq!(
        s.scalar(
            "SELECT count(*) FROM ledger_entries WHERE user_id = $1 AND kind = 'grant'",
            "lena"
        )
        .await,
        2
    );
    let verify = s.ops(&["audit", "verify"]).await;
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let reconcile = s.ops(&["reconcile"]).await;
    assert!(
        reconcile.status.success(),
        "{}",
        String::from_utf8_lossy(&reconcile.stdout)
    );
    s.stop_worker().await;
}
