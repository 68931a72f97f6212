//! The Penora Credits HTTP API.
//!
//! `build(settings)` migrates the database (or, with
//! `DB_MIGRATE_ON_START=false`, checks it is current), binds the listener and
//! assembles the router; `App::run_until_stopped` serves until the shutdown future
//! resolves, then drains in-flight requests within the deadline it is given.

pub mod auth;
pub mod coalesce;
pub mod console;
pub mod error;
pub mod extract;
pub mod routes;
pub mod serve;
pub mod state;
pub mod telemetry;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use penora_config::ApiSettings;
use penora_platform::tasks;
use penora_store as db;
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::state::AppState;

/// A built API, bound and ready to serve.
pub struct App {
    listener: TcpListener,
    router: axum::Router,
    limits: serve::Limits,
    /// The loops beside the requests (the outbox relay, the live keys, the
    /// audit lag), running from `build` on, and what tells them to stop.
    background: JoinSet<()>,
    stop_background: CancellationToken,
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
    penora_ledger::events_out::set_default_threshold(settings.ledger.low_balance_threshold);
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
    let stop_background = CancellationToken::new();
    let mut background = JoinSet::new();
    // Committed jobs are published right after their commit, off the
    // requests' path; while the broker is away they wait in the outbox.
    let publisher = Arc::new(publisher);
    background.spawn(tasks::supervised("relay", stop_background.clone(), {
        let (pool, wake, stop) = (
            pool.clone(),
            state.outbox_wake.clone(),
            stop_background.clone(),
        );
        move || {
            penora_platform::relay::publish_loop(
                pool.clone(),
                publisher.clone(),
                relay,
                wake.clone(),
                stop.clone(),
            )
        }
    }));
    // Every live key exempt from the per-address failure budget.
    background.spawn(tasks::supervised("live_keys", stop_background.clone(), {
        let (pool, guard, stop) = (
            pool.clone(),
            state.auth_guard.clone(),
            stop_background.clone(),
        );
        move || auth::keep_live_keys_known(pool.clone(), guard.clone(), stop.clone())
    }));
    // How far the audit runs behind, for the backpressure on deductions
    // (not read at all when AUDIT_LAG_LIMIT_MS is 0).
    if !state.settings.ledger.audit_lag_limit.is_zero() {
        background.spawn(tasks::supervised("audit_lag", stop_background.clone(), {
            let (pool, lag, stop) = (
                pool.clone(),
                state.audit_lag.clone(),
                stop_background.clone(),
            );
            move || penora_ledger::backpressure::watch_loop(pool.clone(), lag.clone(), stop.clone())
        }));
    }
    Ok(App {
        listener,
        router: routes::app(state),
        limits,
        background,
        stop_background,
        addr,
        pool,
    })
}

impl App {
    /// Serves until `shutdown` resolves, then stops within `deadline` (the
    /// process's one shutdown deadline, counted from `shutdown`): the
    /// requests in progress finish meanwhile, and the relay publishes what
    /// they commit; then the background loops are stopped, and whatever
    /// still runs at the deadline is abandoned (a job not yet published
    /// waits in the outbox for the next relay).
    pub async fn run_until_stopped(
        mut self,
        shutdown: impl Future<Output = ()> + Send + 'static,
        deadline: Duration,
    ) -> anyhow::Result<()> {
        let by = serve::serve(self.listener, self.router, self.limits, shutdown, deadline).await;
        self.stop_background.cancel();
        let left = tasks::join_until(&mut self.background, by).await;
        if left > 0 {
            tracing::warn!(
                left,
                "background loops still running at the shutdown deadline; stopped"
            );
        }
        Ok(())
    }
}
