//! A value probed at most once per interval, shared by every caller.
//!
//! Rule: a probe that costs a query or a connection (`/health`, `/ready`,
//! the outbox backlog behind `/metrics`) runs at most once per interval
//! however many requests ask for it; callers that arrive while it runs wait
//! for that one probe and take its answer, they never start their own. So a
//! flood of health checks costs the database one query a second, not one per
//! request.

use std::{
    future::Future,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

/// How often the services' health, readiness and backlog probes may run.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// The last answer of a probe and when it was taken; see the module doc.
#[derive(Debug)]
pub struct Refreshed<T> {
    every: Duration,
    /// The last answer and when it was made. A plain mutex: held only to
    /// copy the value, never across an await.
    latest: Mutex<Option<(Instant, T)>>,
    /// Held by the one caller running the probe; the others queue on it and
    /// then find the fresh answer.
    probing: tokio::sync::Mutex<()>,
}

impl<T: Clone> Refreshed<T> {
    /// A value probed at most once per `every`.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            latest: Mutex::new(None),
            probing: tokio::sync::Mutex::new(()),
        }
    }

    fn fresh(&self) -> Option<T> {
        let latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
        match &*latest {
            Some((at, value)) if at.elapsed() < self.every => Some(value.clone()),
            _ => None,
        }
    }

    /// The last answer if it is younger than the interval, else a new one
    /// from `probe` (run by one caller only; the others wait for it). A
    /// caller that goes away mid-probe releases the turn to the next one.
    pub async fn get<F, Fut>(&self, probe: F) -> T
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        if let Some(value) = self.fresh() {
            return value;
        }
        let _turn = self.probing.lock().await;
        // Whoever held the turn before us may just have refreshed it.
        if let Some(value) = self.fresh() {
            return value;
        }
        let value = probe().await;
        // Stamped when the probe ends: probes start at least `every` apart.
        *self.latest.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((Instant::now(), value.clone()));
        value
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use super::*;

    #[tokio::test]
    async fn concurrent_callers_share_one_probe() {
        let cached = Arc::new(Refreshed::new(Duration::from_secs(60)));
        let probes = Arc::new(AtomicUsize::new(0));
        let callers = (0..50).map(|_| {
            let cached = cached.clone();
            let probes = probes.clone();
            tokio::spawn(async move {
                cached
                    .get(|| async {
                        probes.fetch_add(1, Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        7
                    })
                    .await
            })
        });
        for answer in futures_util::future::join_all(callers).await {
            assert_eq!(answer.ok(), Some(7));
        }
        assert_eq!(probes.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_stale_answer_is_probed_again() {
        let cached = Refreshed::new(Duration::ZERO);
        assert_eq!(cached.get(|| async { 1 }).await, 1);
        assert_eq!(cached.get(|| async { 2 }).await, 2);
    }

    #[tokio::test]
    async fn a_caller_that_goes_away_mid_probe_lets_the_next_one_probe() {
        let cached = Refreshed::new(Duration::from_secs(60));
        let abandoned = cached.get(std::future::pending::<i32>);
        assert!(
            tokio::time::timeout(Duration::from_millis(10), abandoned)
                .await
                .is_err()
        );
        assert_eq!(cached.get(|| async { 3 }).await, 3);
    }
}
