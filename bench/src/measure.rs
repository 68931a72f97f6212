//! Driving load and measuring it: back-to-back operations from a number of
//! tasks for a fixed time, latencies in an HDR histogram, and the figures
//! of one run (throughput, p50/p99/p99.9, errors).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;

/// Throughput and latency of one run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    pub ops: u64,
    pub errors: u64,
    pub per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
}

/// Latencies in microseconds, 1 µs to 120 s, 3 significant figures.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid histogram bounds")
}

pub fn stats(h: &Histogram<u64>, ops: u64, errors: u64, elapsed: Duration) -> Stats {
    Stats {
        ops,
        errors,
        per_sec: ops as f64 / elapsed.as_secs_f64(),
        p50_ms: h.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
        p999_ms: h.value_at_quantile(0.999) as f64 / 1000.0,
    }
}

/// Runs `op` back to back from `concurrency` tasks for `secs`; `op(task, i)`
/// returns whether it succeeded.
pub async fn drive<F, Fut>(concurrency: usize, secs: f64, op: F) -> Stats
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let (op, stop) = (op.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            let (mut ok, mut err) = (0u64, 0u64);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let good = op(t, i).await;
                let _ = h.record(t0.elapsed().as_micros() as u64);
                if good {
                    ok += 1;
                } else {
                    err += 1;
                }
                i += 1;
            }
            (h, ok, err)
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = histogram();
    let (mut ok, mut err) = (0, 0);
    for t in tasks {
        if let Ok((h, o, e)) = t.await {
            let _ = all.add(&h);
            ok += o;
            err += e;
        }
    }
    stats(&all, ok, err, started.elapsed())
}

pub static RUN: AtomicU64 = AtomicU64::new(0);

/// A unique tag per run, so project codes never repeat.
pub fn run_tag() -> String {
    let n = RUN.fetch_add(1, Ordering::Relaxed);
    format!("{}{n}", &uuid::Uuid::new_v4().simple().to_string()[..6])
}

pub fn user_of(task: usize, i: u64, users: i64) -> String {
    // A cheap spread over all users (multiplicative hashing).
    let x =
        (task as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    format!("bench_{}", (x % users.max(1) as u64))
}
