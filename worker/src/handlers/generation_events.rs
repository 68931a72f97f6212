//! `penora.generation-events`: ImageGene's `generation.failed` refunds the
//! reservation it names, `generation.succeeded` settles it.
//!
//! Rules: an event is handled once per `(user_id, event_id)`; its time is
//! believed only within `MAX_EVENT_LATENESS_SECS` of its arrival, and what
//! it gives back is judged against the refund window at that time
//! (`ledger::EventTime`); its `reason` is cleaned and cut to 500 characters
//! like an HTTP one (an event cannot be answered with a `400`); a failure
//! event's refund records the event in its own commit (the ledger's refund
//! batch), and so does a success event's settlement; the events that
//! arrive together are refunded together, except that an event naming a
//! reservation that an earlier event of the batch named waits for it, so
//! each reservation sees its events in arrival order.

use std::collections::HashSet;

use penora_domain as domain;
use penora_domain::messages::GenerationEvent;
use penora_domain::{AppName, ProjectCode, UserId};
use penora_ledger as ledger;
use penora_ledger::{
    Answer, EventTime, LedgerError, OnBusy, QueuedRefund, Refund, RefundReceipt, SettleResult,
    SettledBy,
};
use penora_store::DbError;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::JobResult;
use crate::{Context, message::Message, retry::JobError};

const FAILED: &str = "generation.failed";
const SUCCEEDED: &str = "generation.succeeded";

/// A generation event, checked.
struct Checked {
    event: GenerationEvent,
    user: UserId,
    code: ProjectCode,
    occurred: OffsetDateTime,
    /// The time it is judged at.
    time: EventTime,
}

/// Handles one event.
pub async fn handle(ctx: &Context, m: &Message) -> JobResult {
    // Parse.
    let Checked {
        event,
        user,
        code,
        occurred,
        time,
    } = parse(ctx, m)?;
    let kind = match m.routing_key.as_str() {
        FAILED => "failed",
        SUCCEEDED => "succeeded",
        other => return Err(JobError::Fatal(format!("unknown event kind `{other}`"))),
    };
    let mut client = ctx.pool.get().await.map_err(DbError::from)?;
    if kind == "failed" {
        // The refund checks the event against `processed_events` and
        // records it, in its own commit.
        let refund = failed_refund(event, user, code, time, m.correlation_id.clone());
        return refund_result(ledger::refund_one(&mut client, refund).await, occurred);
    }
    // The settlement (with the refund of what is not charged) checks the
    // event against `processed_events` and records it, in its own commit.
    let imagegene = AppName::imagegene();
    let settle = ledger::Settle {
        user_id: &user,
        app_name: Some(&imagegene),
        project_code: &code,
        by: SettledBy::Final,
        reason: "generation succeeded",
        charge: event.amount,
        reference: None,
        correlation_id: m.correlation_id.as_deref(),
        event_id: Some(&event.event_id),
        event_time: Some(time),
    };
    let settled = match ledger::settle_for(&mut client, &settle).await {
        Err(seen @ LedgerError::EventSeen { .. }) => return Ok(seen.to_string()),
        other => other?,
    };
    let outcome = match settled.result {
        SettleResult::Settled => "settled",
        SettleResult::AlreadySettled => "already settled",
        SettleResult::AlreadyRefunded => {
            return Err(JobError::Fatal(format!(
                "reservation {} was refunded before this success event",
                event.project_code
            )));
        }
    };
    Ok(outcome.to_owned())
}

/// Handles events that arrived together: the failure events go to the
/// ledger's refund batch; every other message (success events, malformed
/// ones, events naming a reservation an earlier event of the batch named,
/// events whose account another transaction held) is then handled alone by
/// [`handle`], in arrival order.
pub async fn handle_many(ctx: &Context, ms: &[Message]) -> Option<Vec<JobResult>> {
    let mut queued = Vec::new();
    let mut slot_of = Vec::with_capacity(ms.len());
    let mut named = HashSet::new();
    for m in ms {
        let refund = parse(ctx, m)
            .ok()
            .filter(|c| named.insert((c.user.to_string(), c.code.to_string())))
            .filter(|_| m.routing_key == FAILED)
            .map(|c| {
                let occurred = c.occurred;
                (
                    failed_refund(c.event, c.user, c.code, c.time, m.correlation_id.clone()),
                    occurred,
                )
            });
        slot_of.push(refund.map(|(r, occurred)| {
            queued.push(r);
            (queued.len() - 1, occurred)
        }));
    }
    let mut done: Vec<Option<Answer<RefundReceipt>>> = if queued.is_empty() {
        Vec::new()
    } else {
        let mut client = ctx.pool.get().await.ok()?;
        // An account another transaction holds is skipped, so that the rest
        // of the batch commits without waiting for it; its events are then
        // handled alone, waiting for the lock (at most `DB_LOCK_TIMEOUT_MS`,
        // then retried later through the delay queues).
        ledger::refund_all(&mut client, &queued, OnBusy::Skip)
            .await
            .into_iter()
            .map(Some)
            .collect()
    };
    let mut results = Vec::with_capacity(ms.len());
    for (m, slot) in ms.iter().zip(slot_of) {
        let answered = slot.and_then(|(k, occurred)| Some((done.get_mut(k)?.take()?, occurred)));
        results.push(match answered {
            Some((Err(LedgerError::AccountBusy), _)) | None => handle(ctx, m).await,
            Some((answer, occurred)) => refund_result(answer, occurred),
        });
    }
    Some(results)
}

fn parse(ctx: &Context, m: &Message) -> Result<Checked, JobError> {
    let event: GenerationEvent = m.decode()?;
    let bad = |e: &dyn std::fmt::Display| JobError::Fatal(format!("malformed event: {e}"));
    if event.event_id.is_empty() || event.event_id.len() > 128 {
        return Err(JobError::Fatal(
            "malformed event: event_id must be 1 to 128 characters".into(),
        ));
    }
    let user = UserId::parse(&event.user_id).map_err(|e| bad(&e))?;
    let code = ProjectCode::parse(&event.project_code).map_err(|e| bad(&e))?;
    let occurred = OffsetDateTime::parse(&event.occurred_at, &Rfc3339)
        .map_err(|e| bad(&format!("occurred_at: {e}")))?;
    let least = if m.routing_key == FAILED { 1 } else { 0 };
    if event.amount.is_some_and(|a| a < least) {
        return Err(bad(&format!("amount must be at least {least}")));
    }
    let time = EventTime::believed(
        occurred,
        m.received_at,
        ctx.settings.worker.max_event_lateness,
        ctx.settings.worker.event_clock_skew,
    );
    Ok(Checked {
        event,
        user,
        code,
        occurred,
        time,
    })
}

/// The refund a `generation.failed` event asks for.
fn failed_refund(
    event: GenerationEvent,
    user: UserId,
    code: ProjectCode,
    time: EventTime,
    correlation_id: Option<String>,
) -> QueuedRefund {
    // A partial refund is idempotent by its event: its reference.
    let reference = event
        .amount
        .map(|_| format!("{}{}", ledger::EVENT_REFERENCE_PREFIX, event.event_id));
    QueuedRefund {
        refund: Refund {
            user_id: user,
            project_code: code,
            app_name: Some(AppName::imagegene()),
            reason: Some(
                event
                    .reason
                    .map(|r| domain::clean_text(&r, domain::DESCRIPTION_MAX_LEN))
                    .filter(|r| !r.trim().is_empty())
                    .unwrap_or_else(|| "generation failed".into()),
            ),
            amount: event.amount,
            reference,
            acted_by: None,
        },
        event_id: Some(event.event_id),
        correlation_id,
        event_time: Some(time),
    }
}

/// What a `generation.failed` event's refund did, as the message's result.
fn refund_result(answer: Answer<RefundReceipt>, occurred: OffsetDateTime) -> JobResult {
    match answer {
        Ok(done) => {
            let latency = (OffsetDateTime::now_utc() - occurred)
                .as_seconds_f64()
                .max(0.0);
            metrics::histogram!("penora_event_to_refund_seconds").record(latency);
            Ok(if done.replayed {
                "already refunded"
            } else {
                "refunded"
            }
            .to_owned())
        }
        Err(seen @ LedgerError::EventSeen { .. }) => Ok(seen.to_string()),
        Err(e) => Err(e.into()),
    }
}
