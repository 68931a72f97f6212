//! The worker's loops outlive their bugs, and the worker stops on time.
//!
//! A loop that panics (the relay, the timers) is counted in
//! `penora_task_panics_total{task}` and started again, so the work it
//! carries resumes once the cause is gone, without a restart of the
//! process. The panics here are real ones, provoked by data the code does
//! not expect (a column that is never NULL, made NULL in the test's own
//! database), not by a test hook in the worker. On SIGTERM the worker
//! finishes in-flight messages within its one shutdown deadline and returns
//! the rest to the broker.

use std::time::{Duration, Instant};

use crate::support::{stack, wait_for};

/// An address where no broker answers: an API given it leaves every job in
/// the outbox, for the worker's relay alone to publish.
const NO_BROKER: &str = "amqp://guest:guest@127.0.0.1:1/%2f";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_that_panics_is_counted_and_started_again_and_publishes_once_the_bad_row_is_gone() {
    let mut s = stack(&[], &[("AMQP_URL", NO_BROKER)]).await;
    s.start_worker().await;
    s.grant("poison", 1).await;
    // A row the relay reads as never NULL (`exchange`), NULL.
    {
        let c = s.pool.get().await.expect("db");
        c.batch_execute(
            "ALTER TABLE outbox ALTER COLUMN exchange DROP NOT NULL; \
             INSERT INTO outbox (user_id, exchange, routing_key, message_id, payload) \
               VALUES ('poison', NULL, 'penora.ledger-audit', gen_random_uuid(), '{}')",
        )
        .await
        .expect("a NULL exchange");
    }
    let panics = r#"penora_task_panics_total{task="relay"}"#;
    wait_for(
        "the relay panicked, was started again, and panicked again",
        Duration::from_secs(30),
        || async { s.worker_metric(panics).await >= 2.0 },
    )
    .await;
    s.scalar(
        "WITH gone AS (DELETE FROM outbox WHERE exchange IS NULL AND user_id = $1 RETURNING 1) \
         SELECT count(*) FROM gone",
        "poison",
    )
    .await;
    // The API cannot publish: the worker's relay, started again, does.
    s.grant("after", 3).await;
    wait_for(
        "the jobs committed before and after are audited",
        Duration::from_secs(40),
        || async {
            s.scalar(
                "SELECT coalesce(sum(seq), 0)::int8 FROM audit_checkpoints WHERE user_id IN ($1, 'poison')",
                "after",
            )
            .await
                == 2
        },
    )
    .await;
    s.stop_worker().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn timers_that_panic_are_counted_and_started_again_and_settle_once_the_cause_is_gone() {
    let mut s = stack(&[], &[]).await;
    s.grant("u1", 10).await;
    s.deduct("u1", 4, "due").await;
    // The timers read the reservations past their window; here, one whose
    // `user_id` (a key column, never NULL) is NULL, behind a view.
    {
        let c = s.pool.get().await.expect("db");
        c.batch_execute(
            "BEGIN; \
             ALTER TABLE reservations RENAME TO reservations_hidden; \
             CREATE VIEW reservations AS SELECT NULL::text AS user_id, 'imagegene'::text AS app_name, \
               'due'::text AS project_code, 'reserved'::text AS state, \
               now() - interval '1 hour' AS refundable_until; \
             COMMIT",
        )
        .await
        .expect("the view");
    }
    s.start_worker().await;
    let panics = r#"penora_task_panics_total{task="timers"}"#;
    wait_for(
        "the timers panicked, were started again, and panicked again",
        Duration::from_secs(30),
        || async { s.worker_metric(panics).await >= 2.0 },
    )
    .await;
    {
        let mut c = s.pool.get().await.expect("db");
        c.batch_execute(
            "BEGIN; DROP VIEW reservations; \
             ALTER TABLE reservations_hidden RENAME TO reservations; COMMIT",
        )
        .await
        .expect("the table back");
        // The reservation's window passes (an hour by default).
        penora_testing::travel(&mut c, Duration::from_secs(3601)).await;
    }
    wait_for(
        "the timers, started again, settle the reservation",
        Duration::from_secs(40),
        || async {
            s.scalar(
                "SELECT count(*) FROM reservations WHERE user_id = $1 AND project_code = 'due' \
                 AND state = 'settled' AND settled_by = 'window'",
                "u1",
            )
            .await
                == 1
        },
    )
    .await;
    s.stop_worker().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_told_to_stop_with_a_message_in_flight_stops_at_its_deadline_and_returns_it() {
    let mut s = stack(
        &[
            ("SHUTDOWN_DEADLINE_SECS", "2"),
            ("DB_LOCK_TIMEOUT_MS", "9000"),
        ],
        &[],
    )
    .await;
    s.start_worker().await;
    s.grant("u1", 10).await;
    // The deduction's audit job waits for the user's chain, held here.
    let holder = s.hold_audit_chain("u1").await;
    s.deduct("u1", 2, "r1").await;
    wait_for(
        "the audit job waits for the chain",
        Duration::from_secs(10),
        || async {
            s.scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock' AND $1 = $1",
                "",
            )
            .await
                >= 1
        },
    )
    .await;
    let stopping = Instant::now();
    s.stop_worker().await;
    let took = stopping.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
        "stopped at SHUTDOWN_DEADLINE_SECS=2: {took:?}"
    );
    // Unacknowledged, the job went back to its queue.
    let audit = s.topology.queue("penora.ledger-audit");
    wait_for(
        "the job is back in its queue",
        Duration::from_secs(10),
        || async { s.depth(&audit).await == 1 },
    )
    .await;
    holder.batch_execute("ROLLBACK").await.expect("released");
    s.start_worker().await;
    wait_for(
        "a new worker audits it",
        Duration::from_secs(15),
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
    s.stop_worker().await;
}
