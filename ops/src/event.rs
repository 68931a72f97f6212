//! `penora-ops event`: publishes an ImageGene generation event as ImageGene
//! does (for tests and repairs), or any raw body (to see how bad events are
//! parked).

use penora_config::Broker;
use penora_domain::messages::{EVENTS_EXCHANGE, GenerationEvent};
use penora_domain::timefmt::rfc3339_millis;
use penora_platform::broker::{Outgoing, Publisher, Topology};

/// What to publish.
#[derive(clap::Args)]
pub struct Event {
    /// `failed` (refund) or `succeeded` (settle).
    kind: String,
    /// The user.
    user: String,
    /// The reservation's project_code.
    project_code: String,
    /// Why the generation failed.
    #[arg(long)]
    reason: Option<String>,
    /// Credits to refund (`failed`: a partial refund) or to charge
    /// (`succeeded`: the rest is refunded); all of them when absent.
    #[arg(long)]
    amount: Option<i64>,
    /// The event id (default: a new UUID).
    #[arg(long)]
    event_id: Option<String>,
    /// Publish this body instead (e.g. to test how bad events are parked).
    #[arg(long)]
    raw: Option<String>,
}

pub async fn run(broker_settings: &Broker, e: Event) -> anyhow::Result<()> {
    let event_id = e
        .event_id
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let body = match e.raw {
        Some(raw) => raw,
        None => serde_json::to_string(&GenerationEvent {
            event_id: event_id.clone(),
            user_id: e.user,
            project_code: e.project_code,
            reason: e.reason,
            occurred_at: rfc3339_millis(time::OffsetDateTime::now_utc()),
            amount: e.amount,
        })?,
    };
    let topology = Topology::from_settings(broker_settings);
    let publisher = Publisher::new(broker_settings.url.clone(), "penora-ops", topology.clone());
    publisher
        .publish_all(vec![Outgoing {
            exchange: topology.exchange(EVENTS_EXCHANGE),
            routing_key: format!("generation.{}", e.kind),
            payload: body.into_bytes(),
            properties: lapin::BasicProperties::default()
                .with_message_id(event_id.clone().into())
                .with_content_type("application/json".into()),
        }])
        .await?;
    println!("published generation.{} event {event_id}", e.kind);
    Ok(())
}
