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
    // The API's one shutdown deadline (`SHUTDOWN_DEADLINE_SECS`), read here
    // and passed to every part of its shutdown: the requests in progress,
    // then the background loops (the outbox relay).
    let deadline = settings.http.shutdown_deadline;
    let app = penora_api::build(settings).await?;
    let url = format!("http://{}", app.addr);
    tracing::info!(%url, "penora-api listening");
    println!("penora-api listening on {url}");
    let signal = async move {
        penora_platform::shutdown::signal().await;
        tracing::info!(
            deadline_secs = deadline.as_secs_f64(),
            "shutting down: finishing in-flight requests"
        );
    };
    app.run_until_stopped(signal, deadline).await
}
