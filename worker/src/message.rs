//! The one message type handlers see: owned, with what a handler needs of a
//! delivery and nothing of the broker (acknowledging, retrying and parking
//! are the consumer's business).

use lapin::message::Delivery;
use penora_common::messages::headers;

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
}

impl Message {
    /// The message a delivery carries.
    pub fn of(d: &Delivery) -> Self {
        let p = &d.properties;
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
        }
    }

    /// The body as `T`, or a permanent failure (a malformed message will
    /// never parse).
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, crate::retry::JobError> {
        serde_json::from_slice(&self.body)
            .map_err(|e| crate::retry::JobError::Fatal(format!("malformed message: {e}")))
    }
}
