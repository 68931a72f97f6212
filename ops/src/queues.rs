//! `penora-ops queues`: depth and consumers of every queue (from AMQP), and
//! unacknowledged counts and rates where the RabbitMQ management API answers.

use penora_config::Broker;
use penora_platform::broker::{self, QueueStat, Topology};

use crate::output::{self, Align};

/// One line of `penora-ops queues`.
#[derive(serde::Serialize)]
struct QueueRow {
    queue: String,
    ready: u32,
    unacked: Option<u64>,
    consumers: u32,
    in_per_sec: Option<f64>,
    out_per_sec: Option<f64>,
}

pub async fn run(broker_settings: &Broker, json: bool) -> anyhow::Result<()> {
    let topology = Topology::from_settings(broker_settings);
    let connection = broker::connect(broker_settings.url.expose(), "penora-ops").await?;
    topology.declare(&connection).await?;
    let ch = connection.create_channel().await?;
    let stats = broker::queue_stats(&ch, &topology).await?;
    let _ = connection.close(200, "bye".into()).await;
    let mgmt = management_rates(broker_settings, &stats).await;
    let rows: Vec<QueueRow> = stats
        .iter()
        .zip(mgmt.iter())
        .map(|(s, m)| QueueRow {
            queue: s.name.clone(),
            ready: s.messages,
            consumers: s.consumers,
            unacked: m.map(|m| m.unacked),
            in_per_sec: m.map(|m| m.in_per_sec),
            out_per_sec: m.map(|m| m.out_per_sec),
        })
        .collect();
    if json {
        return output::json(&rows);
    }
    let rate = |v: Option<f64>| output::cell(v.map(|v| format!("{v:.1}")));
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.queue.clone(),
                r.ready.to_string(),
                output::cell(r.unacked),
                r.consumers.to_string(),
                rate(r.in_per_sec),
                rate(r.out_per_sec),
            ]
        })
        .collect();
    let right = Align::Right;
    output::table(
        &[
            ("QUEUE", Align::Left),
            ("READY", right),
            ("UNACKED", right),
            ("CONSUMERS", right),
            ("IN/s", right),
            ("OUT/s", right),
        ],
        &cells,
    );
    if mgmt.iter().all(Option::is_none) {
        match broker::Management::from_settings(broker_settings) {
            Some(m) => eprintln!(
                "(the RabbitMQ management API at {} did not answer: rabbitmq-plugins enable rabbitmq_management)",
                m.url()
            ),
            None => eprintln!(
                "(unacknowledged counts and rates need the RabbitMQ management API: set RABBITMQ_MANAGEMENT_URL, e.g. https://rabbitmq.internal:15671)"
            ),
        }
    }
    Ok(())
}

/// What the management API says of one queue.
#[derive(Clone, Copy)]
pub struct Rates {
    /// Delivered, not yet acknowledged.
    pub unacked: u64,
    /// Published per second.
    pub in_per_sec: f64,
    /// Delivered per second.
    pub out_per_sec: f64,
}

/// The management API's figures per queue, `None` where they cannot be had
/// (none configured, or it does not answer).
pub async fn management_rates(broker_settings: &Broker, stats: &[QueueStat]) -> Vec<Option<Rates>> {
    let Some(management) = broker::Management::from_settings(broker_settings) else {
        return vec![None; stats.len()];
    };
    let mut out = Vec::with_capacity(stats.len());
    for s in stats {
        let got = management
            .get(&["queues", management.vhost.as_str(), s.name.as_str()])
            .await
            .map(|v| {
                let rate = |k: &str| v["message_stats"][k]["rate"].as_f64().unwrap_or(0.0);
                Rates {
                    unacked: v["messages_unacknowledged"].as_u64().unwrap_or(0),
                    in_per_sec: rate("publish_details"),
                    out_per_sec: rate("deliver_get_details"),
                }
            });
        out.push(got);
    }
    out
}
