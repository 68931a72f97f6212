//! `penora-worker`: queues, events, outbox relay and timers.

use anyhow::Context;
use penora_config::WorkerSettings;
use penora_platform::telemetry;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = WorkerSettings::from_env().context("Bad configuration")?;
    telemetry::init(&settings.log);
    penora_platform::limits::raise_open_files_logged();
    tokio::spawn({
        let broker = settings.broker.clone();
        async move { penora_platform::broker::log_broker_version(&broker).await }
    });
    // The worker's one shutdown deadline (`SHUTDOWN_DEADLINE_SECS`), read
    // here and passed to every part of its shutdown.
    let deadline = settings.worker.shutdown_deadline;
    let worker = penora_worker::build(settings).await?;
    tracing::info!(metrics = %worker.metrics_addr, "penora-worker started");
    println!("penora-worker metrics on http://{}", worker.metrics_addr);
    let stop = CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        penora_platform::shutdown::signal().await;
        tracing::info!("stopping: no new messages; finishing in-flight work");
        on_signal.cancel();
    });
    worker.run(stop, deadline).await
}
