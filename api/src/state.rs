//! Shared state of the API: the pool, the settings, the rate limiter and the
//! metrics handle.

use std::sync::Arc;

use deadpool_postgres::Pool;
use governor::{DefaultKeyedRateLimiter, Quota};
use metrics_exporter_prometheus::PrometheusHandle;
use penora_config::ApiSettings;
use penora_workspace::cpu_pool::CpuPool;

use crate::coalesce::{Coalescer, Summaries};

/// Most `user-info` reads answered by one statement.
const READ_BATCH_MAX: usize = 256;
/// `user-info` statements running at once.
const READS_IN_FLIGHT: usize = 2;
/// Most `user-info` reads waiting for a statement (then `503 busy`).
const READ_QUEUE_MAX: usize = 10_000;

/// Everything a handler may need; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// PostgreSQL connections.
    pub pool: Pool,
    /// The settings the service started with.
    pub settings: Arc<ApiSettings>,
    /// SHA-256 of the bootstrap key, if one is configured.
    pub bootstrap_digest: Option<[u8; 32]>,
    /// Token buckets, one per key id.
    pub limiter: Arc<DefaultKeyedRateLimiter<String>>,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// Wakes the outbox publisher after a commit that wrote jobs.
    pub outbox_wake: Arc<tokio::sync::Notify>,
    /// Deductions, carried out together when they arrive together.
    pub deducts: Coalescer,
    /// `user-info` reads, answered together when they arrive together.
    pub summaries: Summaries,
    /// One permit per save body held and processed at once
    /// (`MAX_CONCURRENT_SAVES`).
    pub save_slots: Arc<tokio::sync::Semaphore>,
    /// Threads decoding and encoding images, at the lowest CPU priority.
    pub images: CpuPool,
    /// How far the audit runs behind the ledger (the backpressure on
    /// deductions, `AUDIT_LAG_LIMIT_MS`).
    pub audit_lag: penora_ledger::backpressure::AuditLag,
    /// Failures per client address and the digest caches, in front of key
    /// lookups.
    pub auth_guard: Arc<crate::auth::guard::AuthGuard>,
    /// `/health`, `/ready` and the backlog behind `/metrics`, probed at most
    /// once a second.
    pub probes: Arc<crate::routes::system::Probes>,
    /// Webhook registration: the secrets' key and the resolver targets are
    /// checked with.
    pub webhooks: Arc<Webhooks>,
}

/// What registering webhooks needs.
pub struct Webhooks {
    /// Seals secrets; `None` without `WEBHOOK_SECRET_KEY`.
    pub secrets: Option<penora_platform::webhooks::secret::SecretBox>,
    /// Resolves a target's name to check its addresses.
    pub resolver: Arc<dyn penora_platform::webhooks::client::Resolve>,
}

impl AppState {
    /// Tells the outbox publisher that new jobs were committed.
    pub fn jobs_committed(&self) {
        self.outbox_wake.notify_one();
    }

    /// Builds the state from settings, a pool and the metrics handle.
    pub fn new(
        settings: ApiSettings,
        pool: Pool,
        metrics: PrometheusHandle,
        images: CpuPool,
    ) -> Self {
        let per_sec = std::num::NonZeroU32::new(settings.http.rate_limit_per_sec)
            .unwrap_or(std::num::NonZeroU32::MIN);
        let burst = std::num::NonZeroU32::new(settings.http.rate_limit_burst)
            .unwrap_or(std::num::NonZeroU32::MIN);
        let quota = Quota::per_second(per_sec).allow_burst(burst);
        Self {
            auth_guard: Arc::new(crate::auth::guard::AuthGuard::new(
                settings.http.auth_failures_per_sec,
                settings.http.auth_failure_burst,
                settings.http.auth_negative_cache,
            )),
            probes: Arc::default(),
            webhooks: Arc::new(Webhooks {
                // The settings checked the key's form; a key that still
                // does not load leaves registration refused (503).
                secrets: penora_platform::webhooks::secret::SecretBox::from_settings(
                    &settings.webhooks,
                )
                .unwrap_or_else(|e| {
                    tracing::error!(error = %e, "WEBHOOK_SECRET_KEY unusable: webhooks cannot be registered");
                    None
                }),
                resolver: Arc::new(penora_platform::webhooks::client::SystemResolver),
            }),
            bootstrap_digest: settings
                .http
                .bootstrap_api_key
                .as_ref()
                .map(|k| penora_platform::keys::digest(k.expose())),
            summaries: Summaries::start(
                pool.clone(),
                READ_QUEUE_MAX,
                READ_BATCH_MAX,
                READS_IN_FLIGHT,
            ),
            deducts: Coalescer::start(
                pool.clone(),
                settings.ledger.deduct_queue_max,
                settings.ledger.deduct_batch_max,
                settings.ledger.deduct_batches_in_flight,
            ),
            pool,
            save_slots: Arc::new(tokio::sync::Semaphore::new(
                settings.images.max_concurrent_saves,
            )),
            images,
            settings: Arc::new(settings),
            limiter: Arc::new(governor::RateLimiter::keyed(quota)),
            metrics,
            outbox_wake: Arc::new(tokio::sync::Notify::new()),
            audit_lag: penora_ledger::backpressure::AuditLag::default(),
        }
    }
}
