//! Events out (contract §14): the facts we push to applications, their
//! types, their envelope and the names of their topology.
//!
//! Rules:
//! * an event is written to the outbox in the transaction of the change it
//!   reports (`penora_store::outbox::enqueue_events`), never by polling;
//! * its id is `evt_` and the outbox row's message id (a UUID v7), stable
//!   across every publish and delivery of it;
//! * it is published, persistent, to the topic exchange [`EXCHANGE`] with
//!   its type as routing key; webhooks are fanned out from there.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// The topic exchange every event is published to (routing key: its type).
pub const EXCHANGE: &str = "penora.events";
/// The queue the worker fans webhooks out from (bound to [`EXCHANGE`] with
/// `#`, so every event is routable).
pub const WEBHOOK_FANOUT: &str = "penora.webhooks.fanout";
/// The queue of webhook deliveries, one job per (event, endpoint), on the
/// jobs exchange; its dead letters are `penora.webhooks.dead`.
pub const WEBHOOKS: &str = "penora.webhooks";

crate::text_enum! {
    /// An event's type, its routing key on [`EXCHANGE`].
    pub enum EventType {
        /// Credits were granted (a lot was made).
        CreditsGranted => "credits.granted",
        /// Credits of a reservation were given back.
        CreditsRefunded => "credits.refunded",
        /// A reservation was settled (by a save, an event, a request or its
        /// window).
        ReservationSettled => "reservation.settled",
        /// Spendable credits went from at or above the threshold to below it.
        BalanceLow => "balance.low",
        /// Spendable credits reached 0.
        BalanceDepleted => "balance.depleted",
        /// A lot with credits left expires within `EXPIRY_NOTICE_SECS`.
        CreditsExpiring => "credits.expiring",
        /// Credits expired (with the expiry entry).
        CreditsExpired => "credits.expired",
        /// A project was saved.
        ProjectSaved => "project.saved",
        /// A project's save failed.
        ProjectFailed => "project.failed",
        /// A project was deleted (by its user or by retention).
        ProjectDeleted => "project.deleted",
        /// Sent by `POST /webhooks/{id}/test` to one endpoint.
        WebhookTest => "webhook.test",
    }
}

/// The id of the event written under outbox message id `message_id`.
pub fn event_id(message_id: Uuid) -> String {
    format!("evt_{}", message_id.simple())
}

/// The message id an event id was made from; `None` for anything else.
pub fn message_id(event_id: &str) -> Option<Uuid> {
    Uuid::try_parse(event_id.strip_prefix("evt_")?).ok()
}

/// The `topup_reference` of the `balance.low` event written under outbox
/// message id `message_id`: derived from the event's id, so an automatic
/// top-up that uses it as its grant's reference is made once however often
/// the event is delivered.
pub fn topup_reference(message_id: Uuid) -> String {
    format!("topup_{}", message_id.simple())
}

/// The envelope every event travels in, on the exchange and in a webhook's
/// body: `{"id", "type", "created_at", "data"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// `evt_…`, the same on every delivery.
    pub id: String,
    /// Its type.
    #[serde(rename = "type")]
    pub kind: String,
    /// When the change it reports was made (RFC 3339).
    pub created_at: String,
    /// What it concerns: always `user_id`, and what the type names.
    pub data: serde_json::Value,
}

impl Envelope {
    /// The envelope of a new event.
    pub fn new(
        message_id: Uuid,
        kind: EventType,
        at: OffsetDateTime,
        data: serde_json::Value,
    ) -> Self {
        Self {
            id: event_id(message_id),
            kind: kind.as_str().to_owned(),
            created_at: crate::timefmt::rfc3339_millis(at),
            data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_id_is_its_message_id_and_back() {
        let m = Uuid::now_v7();
        let id = event_id(m);
        assert!(id.starts_with("evt_") && id.len() == 36, "{id}");
        assert_eq!(message_id(&id), Some(m));
        assert_eq!(message_id("evt_nope"), None);
        assert_eq!(message_id(&m.to_string()), None);
    }

    #[test]
    fn every_type_is_one_of_the_contracts_eleven() {
        assert_eq!(EventType::ALL.len(), 11);
        for t in EventType::ALL {
            assert_eq!(EventType::from_db(t.as_str()), Some(*t));
        }
    }

    #[test]
    fn the_envelope_has_the_contracts_fields() {
        let e = Envelope::new(
            Uuid::now_v7(),
            EventType::BalanceLow,
            OffsetDateTime::UNIX_EPOCH,
            serde_json::json!({"user_id": "u1", "balance": 5}),
        );
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "balance.low");
        assert_eq!(v["created_at"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["data"]["user_id"], "u1");
        assert!(v["id"].as_str().unwrap().starts_with("evt_"));
    }
}
