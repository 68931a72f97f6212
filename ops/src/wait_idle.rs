//! `penora-ops wait-idle`: waits until the pipeline is idle (every job
//! published, every queue but the dead letters empty, every ledger entry
//! audited, no save still queued); exits 1 naming what is left if it is not
//! idle in time.

use std::{process::ExitCode, time::Duration};

use penora_config::Broker;
use penora_platform::broker::{self, Topology};

use crate::queues::management_rates;

pub async fn run(
    broker_settings: &Broker,
    client: &tokio_postgres::Client,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let topology = Topology::from_settings(broker_settings);
    let connection = broker::connect(broker_settings.url.expose(), "penora-ops").await?;
    topology.declare(&connection).await?;
    let ch = connection.create_channel().await?;
    if broker::Management::from_settings(broker_settings).is_none() {
        eprintln!(
            "note: RABBITMQ_MANAGEMENT_URL is not set, so messages a worker holds unacknowledged are not seen; only queued ones are"
        );
    }
    let started = std::time::Instant::now();
    let mut idle_looks = 0;
    let mut last = String::new();
    // Two idle looks in a row, half a second apart: a job between its
    // handler's commit and its publish shows in neither place for an instant.
    while idle_looks < 2 {
        match in_flight(broker_settings, client, &topology, &ch).await? {
            None => idle_looks += 1,
            Some(what) => {
                idle_looks = 0;
                last = what;
            }
        }
        if idle_looks < 2 {
            if started.elapsed() > timeout {
                let _ = connection.close(200, "bye".into()).await;
                eprintln!("not idle after {} s: {last}", timeout.as_secs());
                return Ok(ExitCode::from(1));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let _ = connection.close(200, "bye".into()).await;
    println!("idle after {:.1} s", started.elapsed().as_secs_f64());
    Ok(ExitCode::SUCCESS)
}

/// What is still in flight: `None` when idle, else a description.
async fn in_flight(
    broker_settings: &Broker,
    client: &tokio_postgres::Client,
    topology: &Topology,
    ch: &lapin::Channel,
) -> anyhow::Result<Option<String>> {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM outbox WHERE published_at IS NULL AND set_aside_at IS NULL) AS unpublished, \
                    (SELECT count(*) FROM audit_pending) AS unaudited, \
                    (SELECT count(*) FROM projects WHERE status = 'queued') AS queued",
            &[],
        )
        .await?;
    let (unpublished, unaudited, queued): (i64, i64, i64) = (
        row.get("unpublished"),
        row.get("unaudited"),
        row.get("queued"),
    );
    let stats = broker::queue_stats(ch, topology).await?;
    let rates = management_rates(broker_settings, &stats).await;
    let busy: Vec<String> = stats
        .iter()
        .zip(rates)
        .filter(|(s, _)| !s.name.ends_with(".dead"))
        .filter_map(|(s, m)| {
            let unacked = m.map_or(0, |m| m.unacked);
            (s.messages > 0 || unacked > 0)
                .then(|| format!("{} ({} ready, {unacked} unacked)", s.name, s.messages))
        })
        .collect();
    if unpublished == 0 && unaudited == 0 && queued == 0 && busy.is_empty() {
        return Ok(None);
    }
    Ok(Some(format!(
        "{unpublished} jobs unpublished, {unaudited} ledger entries unaudited, {queued} saves queued, busy queues: [{}]",
        busy.join(", ")
    )))
}
