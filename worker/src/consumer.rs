//! Consuming one work queue.
//!
//! Rules: manual acknowledgements only, and a message is acknowledged only
//! after its effect is committed, or after its retry or parked copy is
//! confirmed by the broker; never `requeue=true`. A passing failure is
//! published to the delay queue of its attempt and comes back after the
//! delay; a permanent failure, or the last attempt, is published to `.dead`
//! with the error, attempt count and first-failure time in its headers. If a
//! copy cannot be published, the channel is abandoned: the broker returns
//! every unacknowledged message to the queue and the worker reconnects.

use std::{panic::AssertUnwindSafe, sync::Arc, time::Duration};

use futures_util::{FutureExt, StreamExt};
use lapin::{
    BasicProperties, Channel, Connection,
    message::Delivery,
    options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions},
    types::{AMQPValue, FieldTable, ShortString},
};
use penora_domain::messages::LEDGER_AUDIT;
use penora_domain::timefmt::rfc3339_millis;
use penora_platform::broker::Outgoing;
use penora_platform::broker::headers;
use tokio::{task::JoinSet, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    Context, handlers,
    message::{Message, trusted_headers, trusted_properties},
    retry::{JobError, random_unit},
};

/// Handles deliveries of one queue that arrived together: in one call where
/// the queue's handler has a batch form, otherwise (or when the batch as a
/// whole fails) one by one. Each delivery is then acknowledged, retried or
/// parked on its own result. Returns false when the channel must be
/// abandoned.
pub async fn handle(ctx: &Context, work: &'static str, deliveries: Vec<Delivery>) -> bool {
    let started = Instant::now();
    let messages: Vec<Message> = deliveries.iter().map(Message::of).collect();
    let Some(handler) = handlers::for_queue(work) else {
        let mut healthy = true;
        for (delivery, m) in deliveries.into_iter().zip(&messages) {
            let result = Err(JobError::Fatal(format!("no handler for queue {work}")));
            healthy &= finish(ctx, work, delivery, m, result).await;
        }
        return healthy;
    };
    // A panic in a handler is a bug, and must not leave its deliveries
    // neither acknowledged nor returned: a batch that panics goes on one by
    // one, and a message whose handler panics is parked with the reason
    // (crates.io's worker catches its jobs' panics the same way).
    let together = match handler.many {
        Some(many) if messages.len() > 1 => {
            match std::panic::AssertUnwindSafe(many(ctx, &messages))
                .catch_unwind()
                .await
            {
                Ok(results) => results,
                Err(_) => {
                    metrics::counter!("penora_worker_handler_panics_total", "queue" => work)
                        .increment(1);
                    tracing::error!(
                        queue = work,
                        count = messages.len(),
                        "a batch handler panicked; handling its messages one by one"
                    );
                    None
                }
            }
        }
        _ => None,
    };
    if together.is_some() {
        metrics::histogram!("penora_worker_batch_size", "queue" => work)
            .record(messages.len() as f64);
    }
    let mut results = together.map(Vec::into_iter);
    let mut healthy = true;
    for (delivery, m) in deliveries.into_iter().zip(&messages) {
        let result = match results.as_mut().and_then(Iterator::next) {
            Some(result) => result,
            None => match std::panic::AssertUnwindSafe((handler.one)(ctx, m))
                .catch_unwind()
                .await
            {
                Ok(result) => result,
                Err(_) => {
                    metrics::counter!("penora_worker_handler_panics_total", "queue" => work)
                        .increment(1);
                    Err(JobError::Fatal(
                        "the handler panicked on this message (a bug): parked".into(),
                    ))
                }
            },
        };
        healthy &= finish(ctx, work, delivery, m, result).await;
    }
    // One observation per batch (or lone message), acknowledged or not.
    metrics::histogram!("penora_worker_handle_duration_seconds", "queue" => work)
        .record(started.elapsed().as_secs_f64());
    healthy
}

/// Records a delivery's result, then acknowledges it, or publishes its retry
/// or parked copy first. Returns false when the channel must be abandoned.
async fn finish(
    ctx: &Context,
    work: &'static str,
    delivery: Delivery,
    m: &Message,
    result: Result<String, JobError>,
) -> bool {
    let attempt = m.attempt;
    if result.is_ok() && work != LEDGER_AUDIT {
        // Refunds and settlements committed ledger-audit jobs.
        ctx.jobs_committed();
    }
    // Delay queues to send a webhook delivery's retry or deferral through.
    let levels = ctx.topology.retry_levels();
    let outcome = match &result {
        Ok(_) => "ok",
        Err(JobError::Retryable(_)) if ctx.policy.may_retry(attempt) => "retried",
        Err(JobError::RetryAfter(..)) if levels > 0 => "retried",
        Err(JobError::Defer(_)) if levels > 0 => "deferred",
        Err(_) => "parked",
    };
    metrics::counter!("penora_worker_messages_total", "queue" => work, "outcome" => outcome)
        .increment(1);
    let message_id = m.message_id.as_deref().unwrap_or_default();
    let correlation_id = m.correlation_id.as_deref().unwrap_or_default();
    match &result {
        Ok(what) => {
            tracing::info!(queue = work, %message_id, %correlation_id, attempt, outcome = %what, "message handled");
        }
        Err(e @ JobError::Defer(_)) => {
            tracing::debug!(queue = work, %message_id, attempt, reason = %e, "message deferred");
        }
        Err(e) => {
            tracing::warn!(queue = work, %message_id, %correlation_id, attempt, error = %e, outcome, "message failed");
        }
    }
    let copy = match result {
        Ok(_) => None,
        Err(JobError::Retryable(e)) if ctx.policy.may_retry(attempt) => {
            Some(retry_copy(ctx, work, &delivery, attempt, &e))
        }
        Err(JobError::Retryable(e)) => Some(dead_copy(
            ctx,
            work,
            &delivery,
            attempt,
            &format!("gave up after {attempt} attempts: {e}"),
        )),
        Err(JobError::Fatal(e)) => Some(dead_copy(ctx, work, &delivery, attempt, &e)),
        // A webhook delivery: the handler chose the delay; delay queues
        // are picked by attempt as for any retry (the last one for every
        // attempt past it), so delays in one queue stay alike.
        Err(JobError::RetryAfter(e, delay)) if levels > 0 => Some(delayed_copy(
            ctx,
            work,
            &delivery,
            (attempt + 1, attempt.min(levels)),
            delay,
            &e,
        )),
        // Not an attempt: the same attempt number comes back, through the
        // first delay queue (deferrals are short, like first retries).
        Err(JobError::Defer(delay)) if levels > 0 => Some(delayed_copy(
            ctx,
            work,
            &delivery,
            (attempt, 1),
            delay,
            "deferred: the endpoint is busy or its circuit is open",
        )),
        Err(JobError::RetryAfter(e, _)) => Some(dead_copy(ctx, work, &delivery, attempt, &e)),
        Err(JobError::Defer(_)) => Some(dead_copy(
            ctx,
            work,
            &delivery,
            attempt,
            "deferred, but RETRY_MAX_ATTEMPTS=1 leaves no delay queue",
        )),
    };
    if let Some(copy) = copy
        && let Err(e) = ctx.publisher.publish_all(vec![copy]).await
    {
        tracing::error!(queue = work, error = %e, "cannot publish the retry or parked copy; returning the message");
        return false;
    }
    if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
        tracing::warn!(queue = work, error = %e, "ack failed; the broker will redeliver");
        return false;
    }
    true
}

fn copy_headers(d: &Delivery) -> FieldTable {
    trusted_headers(d)
}

fn base_copy(d: &Delivery, mut table: FieldTable, error: &str, attempt: u32) -> BasicProperties {
    let now = rfc3339_millis(time::OffsetDateTime::now_utc());
    let trusted = trusted_properties(d);
    if headers::text(&trusted, headers::FIRST_FAILURE_AT).is_none() {
        table.insert(
            headers::FIRST_FAILURE_AT.into(),
            AMQPValue::LongString(now.into()),
        );
    }
    if headers::text(&trusted, headers::ORIGINAL_EXCHANGE).is_none() {
        table.insert(
            headers::ORIGINAL_EXCHANGE.into(),
            AMQPValue::LongString(d.exchange.to_string().into()),
        );
        table.insert(
            headers::ORIGINAL_ROUTING_KEY.into(),
            AMQPValue::LongString(d.routing_key.to_string().into()),
        );
    }
    let error: String = error.chars().take(1000).collect();
    table.insert(headers::ERROR.into(), AMQPValue::LongString(error.into()));
    table.insert(headers::ATTEMPT.into(), AMQPValue::LongUInt(attempt));
    let mut props = BasicProperties::default().with_headers(table);
    if let Some(v) = d.properties.message_id() {
        props = props.with_message_id(v.clone());
    }
    if let Some(v) = d.properties.correlation_id() {
        props = props.with_correlation_id(v.clone());
    }
    if let Some(v) = d.properties.content_type() {
        props = props.with_content_type(v.clone());
    }
    if let Some(v) = d.properties.kind() {
        props = props.with_type(v.clone());
    }
    if let Some(v) = d.properties.timestamp() {
        props = props.with_timestamp(*v);
    }
    props
}

fn retry_copy(ctx: &Context, work: &str, d: &Delivery, attempt: u32, error: &str) -> Outgoing {
    let delay = ctx.policy.delay(attempt, random_unit());
    delayed_copy(ctx, work, d, (attempt + 1, attempt), delay, error)
}

/// A copy of `d` that comes back to `work` as attempt `next` after `delay`,
/// through delay queue `level`.
fn delayed_copy(
    ctx: &Context,
    work: &str,
    d: &Delivery,
    (next, level): (u32, u32),
    delay: Duration,
    error: &str,
) -> Outgoing {
    let props = base_copy(d, copy_headers(d), error, next)
        .with_expiration(ShortString::from(delay.as_millis().max(1).to_string()));
    Outgoing {
        exchange: String::new(),
        routing_key: ctx.topology.retry_queue(work, level),
        payload: d.data.clone(),
        properties: props,
    }
}

fn dead_copy(ctx: &Context, work: &str, d: &Delivery, attempt: u32, error: &str) -> Outgoing {
    let mut table = copy_headers(d);
    table.insert(
        headers::PARKED_AT.into(),
        AMQPValue::LongString(rfc3339_millis(time::OffsetDateTime::now_utc()).into()),
    );
    Outgoing {
        exchange: String::new(),
        routing_key: ctx.topology.dead_queue(work),
        payload: d.data.clone(),
        properties: base_copy(d, table, error, attempt),
    }
}

/// Consumes `work` on a channel of `connection` until `stop` fires or the
/// channel fails, then drains in-flight messages within `deadline`.
pub async fn consume(
    ctx: Arc<Context>,
    connection: &Connection,
    work: &'static str,
    stop: CancellationToken,
    broken: CancellationToken,
    deadline: Duration,
) -> Result<(), lapin::Error> {
    let channel: Channel = connection.create_channel().await?;
    // Webhook deliveries run one task each (no batch form): the channel's
    // prefetch is their global bound (`WEBHOOK_CONCURRENCY`).
    let prefetch = if work == penora_domain::events::WEBHOOKS {
        ctx.settings.webhooks.concurrency
    } else {
        ctx.settings.worker.prefetch
    };
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let tag = format!("penora-worker-{}-{}", work, uuid::Uuid::now_v7().simple());
    let mut consumer = channel
        .basic_consume(
            ctx.topology.queue(work).into(),
            tag.clone().into(),
            // no_ack false: every message is acknowledged by hand, after its effect.
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut inflight = JoinSet::new();
    let batching = handlers::for_queue(work).is_some_and(|h| h.many.is_some())
        && ctx.settings.worker.batch_max > 1;
    let mut failure = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = broken.cancelled() => break,
            // On batch queues, at most `WORKER_BATCHES_IN_FLIGHT` batches run
            // at once; what arrives meanwhile waits in the channel and makes
            // the next batch bigger instead of queueing on the same row locks.
            next = consumer.next(), if !batching || inflight.len() < ctx.settings.worker.batches_in_flight => match next {
                Some(Ok(delivery)) => {
                    // Whatever else has arrived goes with it (group commit),
                    // on the queues whose handlers have a batch form.
                    let mut batch = vec![delivery];
                    let most = if batching { ctx.settings.worker.batch_max } else { 1 };
                    while batch.len() < most {
                        match consumer.next().now_or_never() {
                            Some(Some(Ok(next))) => batch.push(next),
                            Some(Some(Err(e))) => { failure = Some(e); break; }
                            _ => break,
                        }
                    }
                    let ctx = ctx.clone();
                    let broken = broken.clone();
                    let span = tracing::info_span!("deliveries", queue = work, count = batch.len());
                    inflight.spawn(async move {
                        // `handle` contains its handlers' panics; a panic
                        // of its own (acknowledging, publishing a copy)
                        // would leave the batch unacknowledged and holding
                        // prefetch slots: the channel is abandoned instead,
                        // so the broker returns the batch (each return
                        // counts toward the queue's delivery limit).
                        let healthy = AssertUnwindSafe(handle(&ctx, work, batch))
                            .catch_unwind()
                            .await
                            .unwrap_or_else(|panic| {
                                metrics::counter!("penora_task_panics_total", "task" => "deliveries")
                                    .increment(1);
                                tracing::error!(
                                    queue = work,
                                    panic = penora_platform::tasks::panic_message(panic.as_ref()),
                                    "handling deliveries panicked outside their handler (a bug); returning them"
                                );
                                false
                            });
                        if !healthy {
                            broken.cancel();
                        }
                    }.instrument(span));
                    if failure.is_some() {
                        break;
                    }
                }
                Some(Err(e)) => { failure = Some(e); break; }
                None => break,
            },
            Some(_) = inflight.join_next(), if !inflight.is_empty() => {}
        }
    }
    // Stop taking messages; finish what we hold within the deadline. What is
    // not acknowledged by then goes back to the queue when the channel closes.
    let _ = channel
        .basic_cancel(tag.into(), BasicCancelOptions::default())
        .await;
    let left = penora_platform::tasks::join_until(&mut inflight, Instant::now() + deadline).await;
    if left > 0 {
        tracing::warn!(
            queue = work,
            left,
            "shutdown deadline: returning unfinished messages"
        );
    }
    let _ = channel.close(200, "bye".into()).await;
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
