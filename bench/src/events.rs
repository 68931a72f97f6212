//! ImageGene's `generation.failed` events, as ImageGene publishes them.

use lapin::BasicProperties;
use penora_domain::messages::EVENTS_EXCHANGE;
use penora_platform::broker::{Outgoing, Topology};
use serde_json::json;

/// The `generation.failed` event `event_id` for `user`'s reservation `code`.
pub fn failed(
    topology: &Topology,
    event_id: &str,
    user: &str,
    code: &str,
    reason: &str,
    occurred_at: &str,
    amount: Option<i64>,
) -> Outgoing {
    let mut body = json!({"event_id": event_id, "user_id": user, "project_code": code,
                          "reason": reason, "occurred_at": occurred_at});
    if let Some(amount) = amount {
        body["amount"] = json!(amount);
    }
    Outgoing {
        exchange: topology.exchange(EVENTS_EXCHANGE),
        routing_key: "generation.failed".into(),
        payload: body.to_string().into_bytes(),
        properties: BasicProperties::default()
            .with_message_id(event_id.to_owned().into())
            .with_content_type("application/json".into()),
    }
}
