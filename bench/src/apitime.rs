//! Where a deduction's time goes inside penora-api, read from the API's own
//! histograms (`/metrics`) before and after a phase: the whole request in
//! the API, the wait for the audit to catch up (backpressure), the wait in
//! the coalescer's queue for a batch, the batch's wait for a pooled
//! connection, and the batch's transaction.

use std::collections::HashMap;

use crate::workloads::Ctx;

/// One Prometheus histogram: cumulative counts per upper bound, sum, count.
#[derive(Debug, Clone, Default)]
struct Histogram {
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

/// Every histogram of one scrape, by name and labels (without `le`).
#[derive(Debug, Clone, Default)]
pub struct Scrape(HashMap<String, Histogram>);

/// One part of a deduction's time in a phase.
#[derive(Debug, Clone)]
pub struct Part {
    /// What the part is.
    pub what: &'static str,
    /// The same in a word.
    pub short: &'static str,
    /// What one observation is (a request, a batch).
    pub per: &'static str,
    /// Observations in the phase.
    pub count: f64,
    /// Mean, ms.
    pub mean_ms: f64,
    /// 99th percentile, ms, interpolated within the histogram's buckets.
    pub p99_ms: f64,
}

/// The histograms read, with what they mean.
const PARTS: &[(&str, &str, &str, &str)] = &[
    (
        "penora_http_request_duration_seconds{route=\"/api/unified/deduct-credits\"}",
        "request",
        "the request in penora-api (headers read to answer written)",
        "request",
    ),
    (
        "penora_deduct_held_back_seconds",
        "held back",
        "held back while the audit catches up (only the requests that waited)",
        "request",
    ),
    (
        "penora_deduct_queue_seconds",
        "queue",
        "waiting in the coalescer's queue for a batch to take it",
        "request",
    ),
    (
        "penora_deduct_pool_wait_seconds",
        "pool wait",
        "a batch waiting for a pooled connection",
        "batch",
    ),
    (
        "penora_deduct_transaction_seconds",
        "transaction",
        "a batch's transaction (locks, reads, writes, commit)",
        "batch",
    ),
];

/// Reads the API's `/metrics`; an empty scrape when it cannot be read (the
/// parts then read n/a: the figures are a profile, not the measure).
pub async fn scrape(ctx: &Ctx) -> Scrape {
    let mut req = ctx.http.get(format!("{}/metrics", ctx.args.api));
    if let Ok(token) = std::env::var("METRICS_TOKEN") {
        req = req.bearer_auth(token);
    }
    let Ok(resp) = req.send().await else {
        return Scrape::default();
    };
    let Ok(text) = resp.text().await else {
        return Scrape::default();
    };
    parse(&text)
}

fn parse(text: &str) -> Scrape {
    let mut all: HashMap<String, Histogram> = HashMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        let mut le = None;
        let kept: Vec<&str> = labels
            .split(',')
            .filter(|l| !l.is_empty())
            .filter(|l| match l.strip_prefix("le=") {
                Some(v) => {
                    le = Some(v.trim_matches('"').to_owned());
                    false
                }
                None => true,
            })
            .collect();
        let key = |base: &str| {
            if kept.is_empty() {
                base.to_owned()
            } else {
                format!("{base}{{{}}}", kept.join(","))
            }
        };
        if let Some(base) = name.strip_suffix("_bucket") {
            let bound = match le.as_deref() {
                Some("+Inf") => f64::INFINITY,
                Some(v) => v.parse().unwrap_or(f64::INFINITY),
                None => continue,
            };
            all.entry(key(base))
                .or_default()
                .buckets
                .push((bound, value));
        } else if let Some(base) = name.strip_suffix("_sum") {
            all.entry(key(base)).or_default().sum = value;
        } else if let Some(base) = name.strip_suffix("_count") {
            all.entry(key(base)).or_default().count = value;
        }
    }
    for h in all.values_mut() {
        h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    Scrape(all)
}

/// The parts of a deduction's time between two scrapes of one phase.
pub fn between(before: &Scrape, after: &Scrape) -> Vec<Part> {
    PARTS
        .iter()
        .filter_map(|(name, short, what, per)| {
            let a = after.0.get(*name)?;
            let empty = Histogram::default();
            let b = before.0.get(*name).unwrap_or(&empty);
            let count = a.count - b.count;
            let buckets: Vec<(f64, f64)> = a
                .buckets
                .iter()
                .map(|(bound, n)| {
                    let earlier = b
                        .buckets
                        .iter()
                        .find(|(x, _)| x == bound)
                        .map_or(0.0, |(_, v)| *v);
                    (*bound, n - earlier)
                })
                .collect();
            Some(Part {
                what,
                short,
                per,
                count,
                mean_ms: if count > 0.0 {
                    (a.sum - b.sum) / count * 1000.0
                } else {
                    0.0
                },
                p99_ms: quantile(&buckets, count, 0.99) * 1000.0,
            })
        })
        .collect()
}

/// The `q` quantile of cumulative bucket counts, interpolated linearly
/// within its bucket (the last finite bound when it falls past them).
fn quantile(buckets: &[(f64, f64)], count: f64, q: f64) -> f64 {
    if count <= 0.0 {
        return 0.0;
    }
    let rank = q * count;
    let mut lower = (0.0, 0.0);
    for &(bound, n) in buckets {
        if n >= rank {
            if bound.is_infinite() {
                return lower.0;
            }
            let within = (rank - lower.1) / (n - lower.1).max(1e-9);
            return lower.0 + (bound - lower.0) * within;
        }
        lower = (bound, n);
    }
    lower.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_between_two_scrapes() {
        let before = parse(
            "penora_deduct_queue_seconds_bucket{le=\"0.001\"} 10\n\
             penora_deduct_queue_seconds_bucket{le=\"0.01\"} 10\n\
             penora_deduct_queue_seconds_bucket{le=\"+Inf\"} 10\n\
             penora_deduct_queue_seconds_sum 0.005\n\
             penora_deduct_queue_seconds_count 10\n",
        );
        let after = parse(
            "# TYPE penora_deduct_queue_seconds histogram\n\
             penora_deduct_queue_seconds_bucket{le=\"0.001\"} 10\n\
             penora_deduct_queue_seconds_bucket{le=\"0.01\"} 110\n\
             penora_deduct_queue_seconds_bucket{le=\"+Inf\"} 110\n\
             penora_deduct_queue_seconds_sum 0.505\n\
             penora_deduct_queue_seconds_count 110\n",
        );
        let parts = between(&before, &after);
        let queue = parts
            .iter()
            .find(|p| p.what.contains("coalescer"))
            .expect("the queue's part");
        assert_eq!(queue.count, 100.0);
        assert!((queue.mean_ms - 5.0).abs() < 1e-9);
        // 99 of the phase's 100 in (1 ms, 10 ms]: interpolated at 9.91 ms.
        assert!((queue.p99_ms - 9.91).abs() < 1e-6, "{}", queue.p99_ms);
    }
}
