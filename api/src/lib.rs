//! The Penora Credits HTTP API.
//!
//! `build(settings)` migrates the database (or, with
//! `DB_MIGRATE_ON_START=false`, checks it is current), binds the listener and
//! assembles the router; `App::run_until_stopped` serves until the shutdown future
//! resolves, then drains in-flight requests.

pub mod auth;
pub mod coalesce;
pub mod error;
pub mod extract;
pub mod routes;
pub mod serve;
pub mod state;
pub mod telemetry;

use std::{future::Future, net::SocketAddr};

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use penora_config::ApiSettings;
use penora_store as db;
use tokio::net::TcpListener;

use crate::state::AppState;

/// A built API, bound and ready to serve.
pub struct App {
    listener: TcpListener,
    router: axum::Router,
    limits: serve::Limits,
    /// The address it listens on (the real port when `BIND_ADDR` said 0).
    pub addr: SocketAddr,
    /// The database pool it uses.
    pub pool: deadpool_postgres::Pool,
}

/// The process-wide Prometheus recorder.
pub fn metrics_handle() -> PrometheusHandle {
    penora_platform::telemetry::metrics_handle()
}

/// Migrates the database (see [`db::prepare_schema`]), binds `BIND_ADDR`
/// and builds the router.
pub async fn build(settings: ApiSettings) -> anyhow::Result<App> {
    let pool = db::pool(&settings.db).context("Failed to create the database pool")?;
    db::prepare_schema(&settings.db, &pool).await.context(
        "Failed to prepare the database schema (is PostgreSQL running? see DATABASE_URL, DB_MIGRATE_ON_START)",
    )?;
    let listener = TcpListener::bind(settings.http.bind_addr)
        .await
        .with_context(|| format!("Failed to bind BIND_ADDR {}", settings.http.bind_addr))?;
    let addr = listener
        .local_addr()
        .context("Failed to read the bound address")?;
    let publisher = penora_platform::broker::Publisher::new(
        settings.broker.url.clone(),
        "penora-api",
        penora_platform::broker::Topology::from_settings(&settings.broker),
    )
    .with_confirm_timeout(settings.broker.confirm_timeout);
    let relay = penora_platform::relay::RelayPolicy::from_settings(&settings.broker);
    let images = penora_workspace::cpu_pool::CpuPool::start(
        "penora-images",
        settings.images.threads,
        settings.images.cpu_cgroup.as_deref(),
    )
    .context("Failed to start the image threads")?;
    let limits = serve::Limits {
        idle: settings.http.idle_timeout,
        header: settings.http.header_timeout,
        max_connections: settings.http.max_connections,
        keepalive: settings.http.tcp_keepalive,
    };
    let state = AppState::new(settings, pool.clone(), metrics_handle(), images);
    // Committed jobs are published right after their commit, off the
    // requests' path; while the broker is away they wait in the outbox.
    tokio::spawn(penora_platform::relay::publish_loop(
        pool.clone(),
        std::sync::Arc::new(publisher),
        relay,
        state.outbox_wake.clone(),
        tokio_util::sync::CancellationToken::new(),
    ));
    // Every live key exempt from the per-address failure budget.
    tokio::spawn(auth::keep_live_keys_known(
        pool.clone(),
        state.auth_guard.clone(),
        tokio_util::sync::CancellationToken::new(),
    ));
    // How far the audit runs behind, for the backpressure on deductions
    // (not read at all when AUDIT_LAG_LIMIT_MS is 0).
    if !state.settings.ledger.audit_lag_limit.is_zero() {
        tokio::spawn(penora_ledger::backpressure::watch_loop(
            pool.clone(),
            state.audit_lag.clone(),
            tokio_util::sync::CancellationToken::new(),
        ));
    }
    Ok(App {
        listener,
        router: routes::app(state),
        limits,
        addr,
        pool,
    })
}

impl App {
    /// Serves until `shutdown` resolves, then finishes in-flight requests.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        serve::serve(self.listener, self.router, self.limits, shutdown).await;
        Ok(())
    }
}
