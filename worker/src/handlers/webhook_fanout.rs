//! `penora.webhooks.fanout`: every event published to `penora.events` (bound
//! with `#`) becomes one delivery per subscribed endpoint.
//!
//! Rules: the endpoints subscribed are those not deleted, listing the type
//! or `*`, and bound to no app or to the event's `data.app`; their delivery
//! rows (`ON CONFLICT DO NOTHING`: an event fanned out again adds nothing)
//! and delivery jobs are written in one transaction, and the message is
//! acknowledged after its commit. The envelope's bytes are kept exactly as
//! published: they are what is signed and sent. `webhook.test` is delivered
//! by its route to its one endpoint, never fanned out.

use penora_domain::events::{Envelope, EventType};
use penora_store::DbError;
use penora_store::webhooks::{self, DeliveryJob};

use crate::{Context, handlers::JobResult, message::Message, retry::JobError};

/// Fans one event out.
pub async fn handle(ctx: &Context, m: &Message) -> JobResult {
    let body = std::str::from_utf8(&m.body)
        .map_err(|_| JobError::Fatal("an event that is not UTF-8".into()))?;
    let envelope: Envelope = m.decode()?;
    let Some(kind) = EventType::from_db(&envelope.kind) else {
        return Err(JobError::Fatal(format!(
            "unknown event type `{}`",
            envelope.kind.chars().take(64).collect::<String>()
        )));
    };
    if kind == EventType::WebhookTest {
        return Ok("webhook.test is sent by its route only".into());
    }
    let Some(user_id) = envelope.data.get("user_id").and_then(|u| u.as_str()) else {
        return Err(JobError::Fatal("an event without data.user_id".into()));
    };
    let app = envelope.data.get("app").and_then(|a| a.as_str());
    let mut client = ctx.pool.get().await.map_err(DbError::from)?;
    let tx = client.transaction().await.map_err(DbError::from)?;
    let endpoints = webhooks::subscribed(&tx, kind.as_str(), app).await?;
    let job = DeliveryJob {
        event_id: envelope.id.clone(),
        endpoint_id: String::new(),
        user_id: user_id.to_owned(),
        event_type: kind.as_str().to_owned(),
        body: body.to_owned(),
    };
    let fresh =
        webhooks::enqueue_deliveries(&tx, &job, &endpoints, m.correlation_id.as_deref()).await?;
    tx.commit().await.map_err(DbError::from)?;
    Ok(format!(
        "{} fanned out to {} endpoint(s) ({} subscribed)",
        envelope.id,
        fresh.len(),
        endpoints.len()
    ))
}
