//! Shared state of the API: the pool, the settings, the rate limiter and the
//! metrics handle.

use std::sync::Arc;

use deadpool_postgres::Pool;
use governor::{DefaultKeyedRateLimiter, Quota};
use metrics_exporter_prometheus::PrometheusHandle;
use penora_common::config::Settings;

/// Everything a handler may need; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// PostgreSQL connections.
    pub pool: Pool,
    /// The settings the service started with.
    pub settings: Arc<Settings>,
    /// SHA-256 of the bootstrap key, if one is configured.
    pub bootstrap_digest: Option<[u8; 32]>,
    /// Token buckets, one per key id.
    pub limiter: Arc<DefaultKeyedRateLimiter<String>>,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
}

impl AppState {
    /// Builds the state from settings, a pool and the metrics handle.
    pub fn new(settings: Settings, pool: Pool, metrics: PrometheusHandle) -> Self {
        let per_sec = std::num::NonZeroU32::new(settings.rate_limit_per_sec)
            .unwrap_or(std::num::NonZeroU32::MIN);
        let burst = std::num::NonZeroU32::new(settings.rate_limit_burst)
            .unwrap_or(std::num::NonZeroU32::MIN);
        let quota = Quota::per_second(per_sec).allow_burst(burst);
        Self {
            bootstrap_digest: settings
                .bootstrap_api_key
                .as_ref()
                .map(|k| penora_common::keys::digest(k.expose())),
            pool,
            settings: Arc::new(settings),
            limiter: Arc::new(governor::RateLimiter::keyed(quota)),
            metrics,
        }
    }
}
