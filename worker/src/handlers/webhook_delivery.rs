//! `penora.webhooks`: one delivery job per (event, endpoint), `POST`ed
//! signed per Standard Webhooks.
//!
//! Rules: `webhook-id` is the event id on every attempt; `webhook-timestamp`
//! and `webhook-signature` are made at each attempt. A 2xx within
//! `WEBHOOK_TIMEOUT_MS` is delivered; anything else (another status, a 3xx
//! never followed, a timeout, a refused address) is an attempt that failed,
//! recorded with its status, latency and error, and retried with jittered
//! exponential backoff (`WEBHOOK_RETRY_BASE_MS` doubling up to
//! `WEBHOOK_RETRY_MAX_MS`) until the retry window (`WEBHOOK_RETRY_HOURS`)
//! has passed since the first attempt; then it is parked. A replayed parked
//! delivery starts a fresh window. A job whose delivery is done (delivered,
//! or its endpoint deleted) does nothing.

use std::time::Duration;

use hyper::body::Bytes;
use penora_platform::webhooks::{secret::Sealed, sign};
use penora_store::DbError;
use penora_store::webhooks::{self, AttemptRecord, DeliveryJob};
use tokio::time::Instant;

use crate::{
    Context,
    handlers::JobResult,
    message::Message,
    retry::{JobError, RetryPolicy, random_unit},
};

/// Delivers one job.
pub async fn handle(ctx: &Context, m: &Message) -> JobResult {
    let job: DeliveryJob = m.decode()?;
    let hooks = &ctx.webhooks;
    // The endpoint's slot first: a delivery deferred costs no query, so a
    // hanging endpoint's waiting deliveries do not load the database.
    let mut pass = match hooks.gates.admit(&job.endpoint_id) {
        Ok(pass) => pass,
        Err(wait) => {
            metrics::counter!("penora_webhook_deliveries_total", "outcome" => "deferred")
                .increment(1);
            return Err(JobError::Defer(wait));
        }
    };
    let client = ctx.pool.get().await.map_err(DbError::from)?;
    let Some(state) = webhooks::delivery_state(&client, &job).await? else {
        return Err(JobError::Fatal(
            "a delivery job without its delivery row".into(),
        ));
    };
    match state.state.as_str() {
        "delivered" => return Ok("already delivered".into()),
        "dropped" => return Ok("its endpoint was deleted".into()),
        // Parked, and here again: an operator replayed it. A fresh window.
        "parked" => {
            webhooks::set_state(&client, &job, "pending", true).await?;
        }
        _ => {}
    }
    let Some(target) = webhooks::target(&client, &job.endpoint_id).await? else {
        return Err(JobError::Fatal("unknown endpoint".into()));
    };
    if target.deleted {
        webhooks::set_state(&client, &job, "dropped", false).await?;
        metrics::counter!("penora_webhook_deliveries_total", "outcome" => "dropped").increment(1);
        return Ok("its endpoint was deleted: dropped".into());
    }
    let Some(secrets) = &hooks.secrets else {
        return Err(JobError::Retryable(
            "WEBHOOK_SECRET_KEY is not set: deliveries cannot be signed".into(),
        ));
    };
    let sealed = Sealed {
        nonce: target.secret_nonce,
        sealed: target.secret_sealed,
    };
    let Some(secret) = secrets.open(&sealed, &job.endpoint_id) else {
        return Err(JobError::Retryable(
            "the endpoint's secret does not open with WEBHOOK_SECRET_KEY (was the key changed?)"
                .into(),
        ));
    };
    // The connection goes back to the pool while the endpoint answers.
    drop(client);
    let timestamp = time::OffsetDateTime::now_utc().unix_timestamp();
    let signature = sign::signature(&secret, &job.event_id, timestamp, job.body.as_bytes());
    let headers = [
        ("webhook-id", job.event_id.clone()),
        ("webhook-timestamp", timestamp.to_string()),
        ("webhook-signature", signature),
    ];
    let started = Instant::now();
    let answer = hooks
        .client
        .post(&target.url, &headers, Bytes::from(job.body.clone()))
        .await;
    let latency = started.elapsed();
    let delivered = answer.delivered();
    pass.record(delivered);
    drop(pass);
    metrics::histogram!("penora_webhook_delivery_duration_seconds").record(latency.as_secs_f64());
    let mut client = ctx.pool.get().await.map_err(DbError::from)?;
    let (first, attempts) = webhooks::record_attempt(
        &mut client,
        &AttemptRecord {
            job: &job,
            status_code: answer.status,
            latency_ms: i32::try_from(latency.as_millis()).unwrap_or(i32::MAX),
            error: answer.error.as_deref(),
            delivered,
        },
    )
    .await?;
    if delivered {
        metrics::counter!("penora_webhook_deliveries_total", "outcome" => "delivered").increment(1);
        return Ok(format!("delivered on attempt {attempts}"));
    }
    let error = answer.error.unwrap_or_else(|| "failed".into());
    let tried_for = time::OffsetDateTime::now_utc() - first;
    if tried_for >= hooks.settings.retry_window {
        webhooks::set_state(&client, &job, "parked", false).await?;
        metrics::counter!("penora_webhook_deliveries_total", "outcome" => "parked").increment(1);
        return Err(JobError::Fatal(format!(
            "gave up after {attempts} attempts over {} s: {error}",
            tried_for.whole_seconds()
        )));
    }
    metrics::counter!("penora_webhook_deliveries_total", "outcome" => "failed").increment(1);
    let policy = RetryPolicy {
        max_attempts: u32::MAX,
        initial: hooks.settings.retry_base,
        max: hooks.settings.retry_max,
    };
    let delay = policy.delay(u32::try_from(attempts).unwrap_or(1), random_unit());
    // Never wait past the window's end by more than a moment: the last
    // attempt comes when it closes.
    let left = (hooks.settings.retry_window - tried_for)
        .try_into()
        .unwrap_or(Duration::ZERO);
    Err(JobError::RetryAfter(
        format!("attempt {attempts}: {error}"),
        delay.min(left.max(Duration::from_millis(100))),
    ))
}
