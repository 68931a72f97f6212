//! A service's long-running loops (the outbox relay, the timers, the
//! consumers' connection, the gauges): kept running, and stopped by the
//! process's one shutdown deadline.
//!
//! Rules: a loop that panics is a bug, but must not leave the work it
//! carries undone until the next restart of the process (a relay that died
//! leaves every job in the outbox; a timer that died settles nothing): the
//! panic is counted in `penora_task_panics_total{task}`, logged, and the
//! loop is started again after a pause ([`FIRST_PAUSE`], doubling while it
//! keeps panicking, at most [`MOST_PAUSE`]) until the process stops, as crates.io's
//! worker contains a job's panic. On shutdown every loop is told to stop by
//! one token and waited for until the process's deadline ([`join_until`]);
//! what still runs then is aborted.

use std::{any::Any, future::Future, panic::AssertUnwindSafe, time::Duration};

use futures_util::FutureExt;
use tokio::{task::JoinSet, time::Instant};
use tokio_util::sync::CancellationToken;

/// First pause before a loop that panicked is started again.
pub const FIRST_PAUSE: Duration = Duration::from_secs(1);

/// Longest pause before a loop that keeps panicking is started again.
pub const MOST_PAUSE: Duration = Duration::from_secs(30);

/// What a panic said, for the log.
pub fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a panic without a message)")
}

/// Runs the loop `start` makes until it returns (it should return once
/// `stop` fires); when it panics, counts and logs the panic and starts a new
/// one after a pause, unless `stop` fired meanwhile.
pub async fn supervised<F, Fut>(task: &'static str, stop: CancellationToken, start: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    supervised_with(task, stop, (FIRST_PAUSE, MOST_PAUSE), start).await;
}

/// [`supervised`] with its pauses: `first` after a panic, doubling up to
/// `most` while the loop keeps panicking within `most` of its start.
async fn supervised_with<F, Fut>(
    task: &'static str,
    stop: CancellationToken,
    (first, most): (Duration, Duration),
    mut start: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut pause = first;
    loop {
        let started = Instant::now();
        // Unwind safety: a loop keeps no state across a restart but what it
        // reads anew (the pool, the settings); what it held is dropped.
        let Err(panic) = AssertUnwindSafe(start()).catch_unwind().await else {
            return;
        };
        metrics::counter!("penora_task_panics_total", "task" => task).increment(1);
        // A loop that ran a while before panicking starts with the short
        // pause again; one that panics at once waits longer each time.
        if started.elapsed() >= most {
            pause = first;
        }
        tracing::error!(
            task,
            panic = panic_message(panic.as_ref()),
            restart_in_ms = pause.as_millis() as u64,
            "a service loop panicked (a bug); starting it again"
        );
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(most);
    }
}

/// Waits for every task of `set` until `by`, then aborts the ones still
/// running. Returns how many were aborted.
pub async fn join_until(set: &mut JoinSet<()>, by: Instant) -> usize {
    while let Ok(Some(joined)) = tokio::time::timeout_at(by, set.join_next()).await {
        if let Err(e) = joined
            && e.is_panic()
        {
            // Supervised loops catch their own panics; this is one that was
            // not supervised.
            metrics::counter!("penora_task_panics_total", "task" => "unsupervised").increment(1);
            tracing::error!(
                panic = panic_message(e.into_panic().as_ref()),
                "a task panicked"
            );
        }
    }
    let left = set.len();
    set.abort_all();
    left
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    };

    use super::*;

    /// Pauses short enough for a test.
    const QUICK: (Duration, Duration) = (Duration::from_millis(1), Duration::from_millis(8));

    #[tokio::test]
    async fn a_loop_that_panics_is_started_again_until_it_returns() {
        let runs = Arc::new(AtomicU32::new(0));
        let stop = CancellationToken::new();
        let counted = runs.clone();
        supervised_with("test", stop, QUICK, move || {
            let counted = counted.clone();
            async move {
                if counted.fetch_add(1, Ordering::SeqCst) < 3 {
                    panic!("a bug");
                }
            }
        })
        .await;
        assert_eq!(runs.load(Ordering::SeqCst), 4, "three panics, then a run");
    }

    #[tokio::test]
    async fn a_loop_that_panics_is_not_started_again_once_stop_fired() {
        let runs = Arc::new(AtomicU32::new(0));
        let stop = CancellationToken::new();
        let counted = runs.clone();
        let (first_run, ran) = tokio::sync::oneshot::channel();
        let first_run = std::sync::Mutex::new(Some(first_run));
        let supervisor = tokio::spawn(supervised_with(
            "test",
            stop.clone(),
            (Duration::from_secs(3600), Duration::from_secs(3600)),
            move || {
                counted.fetch_add(1, Ordering::SeqCst);
                if let Some(tx) = first_run.lock().ok().and_then(|mut t| t.take()) {
                    let _ = tx.send(());
                }
                async move { panic!("always") }
            },
        ));
        ran.await.expect("the loop ran");
        stop.cancel();
        supervisor
            .await
            .expect("the supervisor itself never panics");
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn tasks_still_running_at_the_deadline_are_aborted() {
        let mut set = JoinSet::new();
        set.spawn(async {});
        set.spawn(std::future::pending());
        let by = Instant::now() + Duration::from_millis(50);
        assert_eq!(join_until(&mut set, by).await, 1);
        assert!(Instant::now() >= by);
    }

    #[test]
    fn a_panic_message_is_read_from_either_string_type() {
        let s: Box<dyn Any + Send> = Box::new("static");
        let owned: Box<dyn Any + Send> = Box::new(String::from("owned"));
        let other: Box<dyn Any + Send> = Box::new(7_u8);
        assert_eq!(panic_message(s.as_ref()), "static");
        assert_eq!(panic_message(owned.as_ref()), "owned");
        assert_eq!(panic_message(other.as_ref()), "(a panic without a message)");
    }
}
