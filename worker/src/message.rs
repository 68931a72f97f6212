//! The one message type handlers see: owned, with what a handler needs of a
//! delivery and nothing of the broker (acknowledging, retrying and parking
//! are the consumer's business).

use lapin::{BasicProperties, message::Delivery, types::FieldTable};
use penora_platform::broker::headers;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// Whether `d` came back through Penora's own path (a retry delay queue
/// dead-lettering it, or an operator's replay, both through the default
/// exchange, to which ImageGene may not publish), so that its `x-penora-*`
/// headers are the worker's own. A first delivery through an exchange
/// (ImageGene's `imagegene.events`, the outbox's `penora.jobs`) carries only
/// what its publisher chose.
fn came_back(d: &Delivery) -> bool {
    d.exchange.as_str().is_empty()
}

/// The headers of `d` that may be believed: on a first delivery, every
/// `x-penora-*` header is dropped (a publisher could otherwise claim an
/// attempt count, an arrival time, or an original exchange that a replay
/// would publish to).
pub fn trusted_headers(d: &Delivery) -> FieldTable {
    let all = d.properties.headers().clone().unwrap_or_default();
    if came_back(d) {
        return all;
    }
    let mut kept = FieldTable::default();
    for (k, v) in all.inner().iter() {
        if !k.as_str().starts_with(headers::PREFIX) {
            kept.insert(k.clone(), v.clone());
        }
    }
    kept
}

/// `d`'s properties with only its trusted headers.
pub fn trusted_properties(d: &Delivery) -> BasicProperties {
    d.properties.clone().with_headers(trusted_headers(d))
}

/// A message taken from a work queue.
#[derive(Debug, Clone)]
pub struct Message {
    /// The routing key it was first published with (its retry and parked
    /// copies carry it in a header).
    pub routing_key: String,
    /// The request id that caused it, if any.
    pub correlation_id: Option<String>,
    /// The message id (the outbox's, or the publisher's).
    pub message_id: Option<String>,
    /// Which attempt this delivery is (1 for a first delivery).
    pub attempt: u32,
    /// The body.
    pub body: Vec<u8>,
    /// When a worker first took it: its first failure's time, for a
    /// message that came back through a retry or a replay, else now.
    pub received_at: OffsetDateTime,
}

impl Message {
    /// The message a delivery carries.
    pub fn of(d: &Delivery) -> Self {
        let p = &trusted_properties(d);
        let received_at = headers::text(p, headers::FIRST_FAILURE_AT)
            .and_then(|t| OffsetDateTime::parse(&t, &Rfc3339).ok())
            .unwrap_or_else(OffsetDateTime::now_utc);
        Self {
            routing_key: headers::text(p, headers::ORIGINAL_ROUTING_KEY)
                .unwrap_or_else(|| d.routing_key.to_string()),
            correlation_id: p.correlation_id().as_ref().map(|c| c.to_string()),
            message_id: p.message_id().as_ref().map(|m| m.to_string()),
            attempt: headers::int(p, headers::ATTEMPT)
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(1)
                .max(1),
            body: d.data.clone(),
            received_at,
        }
    }

    /// The body as `T`, or a permanent failure (a malformed message will
    /// never parse).
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, crate::retry::JobError> {
        serde_json::from_slice(&self.body)
            .map_err(|e| crate::retry::JobError::Fatal(format!("malformed message: {e}")))
    }
}
