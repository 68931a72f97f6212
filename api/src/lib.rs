//! The Penora Credits HTTP API.
//!
//! `build(settings)` migrates the database, binds the listener and assembles
//! the router; `App::run_until_stopped` serves until the shutdown future
//! resolves, then drains in-flight requests.

pub mod auth;
pub mod error;
pub mod extract;
pub mod routes;
pub mod state;
pub mod telemetry;

use std::{future::Future, net::SocketAddr};

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use penora_common::{config::Settings, db};
use tokio::net::TcpListener;

use crate::state::AppState;

/// A built API, bound and ready to serve.
pub struct App {
    listener: TcpListener,
    router: axum::Router,
    /// The address it listens on (the real port when `BIND_ADDR` said 0).
    pub addr: SocketAddr,
    /// The database pool it uses.
    pub pool: deadpool_postgres::Pool,
}

/// The process-wide Prometheus recorder.
pub fn metrics_handle() -> PrometheusHandle {
    penora_common::telemetry::metrics_handle()
}

/// Migrates the database, binds `BIND_ADDR` and builds the router.
pub async fn build(settings: Settings) -> anyhow::Result<App> {
    db::migrate(settings.database_url.expose())
        .await
        .context("Failed to apply database migrations (is PostgreSQL running? see DATABASE_URL)")?;
    let pool = db::pool(&settings).context("Failed to create the database pool")?;
    let listener = TcpListener::bind(settings.bind_addr)
        .await
        .with_context(|| format!("Failed to bind BIND_ADDR {}", settings.bind_addr))?;
    let addr = listener
        .local_addr()
        .context("Failed to read the bound address")?;
    let publisher = penora_common::broker::Publisher::new(
        settings.amqp_url.clone(),
        "penora-api",
        penora_common::broker::Topology::from_settings(&settings),
    );
    let state = AppState::new(settings, pool.clone(), metrics_handle());
    tokio::spawn(publish_outbox(
        pool.clone(),
        publisher,
        state.outbox_wake.clone(),
    ));
    Ok(App {
        listener,
        router: routes::app(state),
        addr,
        pool,
    })
}

/// Publishes committed jobs to RabbitMQ as soon as a handler says there are
/// some (and every second), off the requests' path. When the broker is down
/// the rows wait in the outbox and the API keeps answering; the worker's relay
/// sweeps them too.
async fn publish_outbox(
    pool: deadpool_postgres::Pool,
    publisher: penora_common::broker::Publisher,
    wake: std::sync::Arc<tokio::sync::Notify>,
) {
    let mut failures: u32 = 0;
    loop {
        match penora_common::outbox::relay_all(&pool, &publisher).await {
            Ok(_) => failures = 0,
            Err(e) => {
                failures = failures.saturating_add(1);
                if failures == 1 || failures % 60 == 0 {
                    tracing::warn!(error = %e, "cannot publish the outbox; jobs wait in PostgreSQL");
                }
            }
        }
        if failures == 0 {
            tokio::select! {
                () = wake.notified() => {},
                () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {},
            }
        } else {
            // Back off while the broker is away; the rows are safe meanwhile.
            tokio::time::sleep(std::time::Duration::from_secs(u64::from(failures.min(10)))).await;
        }
    }
}

impl App {
    /// Serves until `shutdown` resolves, then finishes in-flight requests.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await
            .context("HTTP server failed")
    }
}
