//! `penora-worker`: queues, events, outbox relay and timers.

use anyhow::Context;
use penora_common::{config::Settings, telemetry};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::from_env().context("Bad configuration")?;
    telemetry::init(settings.log_format);
    let worker = penora_worker::build(settings).await?;
    tracing::info!(metrics = %worker.metrics_addr, "penora-worker started");
    println!("penora-worker metrics on http://{}", worker.metrics_addr);
    let stop = CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("stopping: no new messages; finishing in-flight work");
        on_signal.cancel();
    });
    worker.run(stop).await
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
