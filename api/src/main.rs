//! `penora-api`: the HTTP service.

use anyhow::Context;
use penora_common::{config::Settings, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::from_env().context("Bad configuration")?;
    telemetry::init(settings.log_format);
    if settings.bootstrap_api_key.is_none() {
        tracing::warn!(
            "PENORA_API_KEY is not set: only keys created with `penora-ops keys create` work"
        );
    }
    let app = penora_api::build(settings).await?;
    let url = format!("http://{}", app.addr);
    tracing::info!(%url, "penora-api listening");
    println!("penora-api listening on {url}");
    app.run_until_stopped(shutdown_signal()).await
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}
