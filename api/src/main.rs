//! `penora-api`: the HTTP service.

use anyhow::Context;
use penora_config::ApiSettings;
use penora_platform::telemetry;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = ApiSettings::from_env().context("Bad configuration")?;
    telemetry::init(&settings.log);
    penora_platform::limits::raise_open_files_logged();
    if settings.http.bootstrap_api_key.is_none() {
        tracing::warn!(
            "PENORA_API_KEY is not set: only keys created with `penora-ops keys create` work"
        );
    }
    tokio::spawn({
        let broker = settings.broker.clone();
        async move { penora_platform::broker::log_broker_version(&broker).await }
    });
    let app = penora_api::build(settings).await?;
    let url = format!("http://{}", app.addr);
    tracing::info!(%url, "penora-api listening");
    println!("penora-api listening on {url}");
    let stopping = std::sync::Arc::new(tokio::sync::Notify::new());
    let signal = {
        let stopping = stopping.clone();
        async move {
            penora_platform::shutdown::signal().await;
            tracing::info!("shutting down: finishing in-flight requests");
            stopping.notify_one();
        }
    };
    tokio::select! {
        result = app.run_until_stopped(signal) => result,
        () = async {
            stopping.notified().await;
            tokio::time::sleep(SHUTDOWN_DEADLINE).await;
        } => {
            tracing::warn!(deadline_secs = SHUTDOWN_DEADLINE.as_secs(), "requests still in flight at the shutdown deadline; exiting");
            Ok(())
        }
    }
}

/// How long in-flight requests may take to finish after SIGTERM.
const SHUTDOWN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(20);
