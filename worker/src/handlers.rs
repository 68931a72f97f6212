//! What each queue's messages do. Every handler is idempotent: running it
//! again for a message already handled changes nothing, so at-least-once
//! delivery gives exactly-once effects.

use deadpool_postgres::Pool;
use penora_common::{
    audit::{self, Appended},
    cpu_pool::PoolError,
    domain::{AppName, ProjectCode, UserId},
    imaging,
    ledger::{self, Answer, LedgerError, QueuedRefund, Refund, RefundReceipt, SettleResult},
    messages::{GENERATION_EVENTS, GenerationEvent, LEDGER_AUDIT, LedgerAuditJob, SaveProjectJob},
    projects::{self, Finished, Pending},
};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::{
    consumer::{correlation_of, routing_key_of},
    retry::JobError,
};

fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, JobError> {
    serde_json::from_slice(body).map_err(|e| JobError::Fatal(format!("malformed message: {e}")))
}

/// `penora.ledger-audit`: append the entry's record to the user's chain.
pub async fn ledger_audit(pool: &Pool, body: &[u8]) -> Result<String, JobError> {
    let job: LedgerAuditJob = decode(body)?;
    let mut client = pool.get().await.map_err(penora_common::db::DbError::from)?;
    match audit::append(&mut client, &job.user_id, job.entry_id).await? {
        Appended::Recorded(seq) => Ok(format!("recorded as record {seq}")),
        Appended::AlreadyRecorded => Ok("already recorded".into()),
        Appended::NoSuchEntry => Err(JobError::Fatal(format!(
            "no ledger entry {} for user {}",
            job.entry_id, job.user_id
        ))),
    }
}

/// Whether `work`'s handler has a batch form ([`batch`]).
pub fn batchable(work: &str) -> bool {
    matches!(work, LEDGER_AUDIT | GENERATION_EVENTS)
}

/// Handles deliveries of `work` that arrived together, in one transaction,
/// when the queue's handler has a batch form: one result per delivery, in
/// order. `None` when it has none or the batch as a whole failed (a passing
/// database error, say): the caller then handles them one by one, so each
/// gets its own retry decision.
pub async fn batch(
    pool: &Pool,
    work: &str,
    deliveries: &[lapin::message::Delivery],
) -> Option<Vec<Result<String, JobError>>> {
    match work {
        LEDGER_AUDIT => ledger_audit_batch(pool, deliveries).await,
        GENERATION_EVENTS => generation_events_batch(pool, deliveries).await,
        _ => None,
    }
}

/// `penora.ledger-audit` for many jobs: one transaction for all their records.
async fn ledger_audit_batch(
    pool: &Pool,
    deliveries: &[lapin::message::Delivery],
) -> Option<Vec<Result<String, JobError>>> {
    let jobs: Vec<Result<LedgerAuditJob, JobError>> =
        deliveries.iter().map(|d| decode(&d.data)).collect();
    let items: Vec<(String, i64)> = jobs
        .iter()
        .flatten()
        .map(|j| (j.user_id.clone(), j.entry_id))
        .collect();
    let mut client = pool.get().await.ok()?;
    let mut appended = match audit::append_many(&mut client, &items).await {
        Ok(a) => a.into_iter(),
        Err(e) => {
            tracing::debug!(error = %e, "audit batch failed; one by one");
            return None;
        }
    };
    Some(
        jobs.into_iter()
            .map(|job| {
                let job = job?;
                match appended.next() {
                    Some(Appended::Recorded(seq)) => Ok(format!("recorded as record {seq}")),
                    Some(Appended::AlreadyRecorded) => Ok("already recorded".into()),
                    Some(Appended::NoSuchEntry) | None => Err(JobError::Fatal(format!(
                        "no ledger entry {} for user {}",
                        job.entry_id, job.user_id
                    ))),
                }
            })
            .collect(),
    )
}

/// `penora.generation-events` for many deliveries: the `generation.failed`
/// events are carried out together by the ledger's refund batch (refunds and
/// their `processed_events` rows, in as few transactions as their keys
/// allow); every other delivery (success events, malformed ones, events that
/// name a reservation an earlier event of the batch named) is then handled
/// alone by [`generation_event`], in arrival order.
async fn generation_events_batch(
    pool: &Pool,
    deliveries: &[lapin::message::Delivery],
) -> Option<Vec<Result<String, JobError>>> {
    let mut queued = Vec::new();
    let mut slot_of = Vec::with_capacity(deliveries.len());
    // A reservation named earlier in the batch (by any event) keeps its later
    // events out of the batch, so they are decided in arrival order.
    let mut named = std::collections::HashSet::new();
    for d in deliveries {
        let key = routing_key_of(d);
        let refund = parse_event(&d.data)
            .ok()
            .filter(|(_, user, code, _)| named.insert((user.to_string(), code.to_string())))
            .filter(|_| key == "generation.failed")
            .map(|(event, user, code, occurred)| {
                (
                    failed_refund(event, user, code, correlation_of(d)),
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
        let mut client = pool.get().await.ok()?;
        ledger::refund_all(&mut client, &queued)
            .await
            .into_iter()
            .map(Some)
            .collect()
    };
    let mut results = Vec::with_capacity(deliveries.len());
    for (d, slot) in deliveries.iter().zip(slot_of) {
        let answered = slot.and_then(|(k, occurred)| Some((done.get_mut(k)?.take()?, occurred)));
        results.push(match answered {
            Some((answer, occurred)) => refund_result(answer, occurred),
            None => {
                generation_event(
                    pool,
                    &routing_key_of(d),
                    &d.data,
                    correlation_of(d).as_deref(),
                )
                .await
            }
        });
    }
    Some(results)
}

/// The refund a `generation.failed` event asks for.
fn failed_refund(
    event: GenerationEvent,
    user: UserId,
    code: ProjectCode,
    correlation_id: Option<String>,
) -> QueuedRefund {
    QueuedRefund {
        refund: Refund {
            user_id: user,
            project_code: code,
            app_name: Some(AppName::imagegene()),
            reason: Some(event.reason.unwrap_or_else(|| "generation failed".into())),
        },
        event_id: Some(event.event_id),
        correlation_id,
    }
}

/// What a `generation.failed` event's refund did, as the delivery's result.
fn refund_result(
    answer: Answer<RefundReceipt>,
    occurred: OffsetDateTime,
) -> Result<String, JobError> {
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

/// `penora.save-project`: check the stored content (a full decode, on the
/// image threads) and make its thumbnail, mark the project `saved` (or
/// `failed`, releasing its bytes), then settle the reservation it names. A
/// project deleted before its job ran is left deleted.
pub async fn save_project(
    ctx: &crate::Context,
    body: &[u8],
    correlation: Option<&str>,
) -> Result<String, JobError> {
    let job: SaveProjectJob = decode(body)?;
    let mut client = ctx
        .pool
        .get()
        .await
        .map_err(penora_common::db::DbError::from)?;
    let verdict = match projects::pending(&client, &job.user_id, job.project_id).await? {
        Pending::NotFound => {
            return Err(JobError::Fatal(format!(
                "no project {} for user {}",
                job.project_id, job.user_id
            )));
        }
        // Done before or deleted: finish_save below says which.
        Pending::Done | Pending::Queued(None) => Ok(None),
        Pending::Empty => Err("the project has no content".to_owned()),
        Pending::Queued(Some(bytes)) => {
            let max_pixels = ctx.settings.max_image_pixels;
            match ctx
                .images
                .run(move || imaging::thumbnail(&bytes, max_pixels))
                .await
            {
                Ok(checked) => checked.map(Some),
                // A decoder that panics on these bytes would panic again:
                // the project fails for good and frees its bytes.
                Err(PoolError::Panicked) => Err("the image could not be processed".to_owned()),
                Err(e @ PoolError::Stopped) => return Err(JobError::Retryable(e.to_string())),
            }
        }
    };
    let finished =
        projects::finish_save(&mut client, &job.user_id, job.project_id, verdict).await?;
    let (outcome, settle) = match finished {
        Finished::NotFound => {
            return Err(JobError::Fatal(format!(
                "no project {} for user {}",
                job.project_id, job.user_id
            )));
        }
        Finished::Failed(reason) => return Ok(format!("failed: {reason}")),
        Finished::Saved {
            app_source,
            project_code,
        } => ("saved".to_owned(), project_code.map(|c| (app_source, c))),
        Finished::AlreadyDone {
            status,
            app_source,
            project_code,
        } => {
            let settle = (status == "saved")
                .then_some(project_code.map(|c| (app_source, c)))
                .flatten();
            (format!("already {status}"), settle)
        }
    };
    if let Some((app, code)) = settle {
        let (Ok(user), Ok(app), Ok(code)) = (
            UserId::parse(&job.user_id),
            AppName::parse("app_source", &app),
            ProjectCode::parse(&code),
        ) else {
            return Ok(outcome);
        };
        match ledger::settle(
            &mut client,
            &user,
            &app,
            &code,
            "project saved",
            correlation,
        )
        .await
        {
            Ok(_) | Err(LedgerError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(outcome)
}

/// A generation event, checked: the event, its user, its reservation key and
/// when it happened.
fn parse_event(
    body: &[u8],
) -> Result<(GenerationEvent, UserId, ProjectCode, OffsetDateTime), JobError> {
    let event: GenerationEvent = decode(body)?;
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
    Ok((event, user, code, occurred))
}

/// `penora.generation-events`: `generation.failed` refunds the reservation,
/// `generation.succeeded` settles it.
pub async fn generation_event(
    pool: &Pool,
    routing_key: &str,
    body: &[u8],
    correlation: Option<&str>,
) -> Result<String, JobError> {
    let (event, user, code, occurred) = parse_event(body)?;
    let app = AppName::imagegene();
    let kind = match routing_key {
        "generation.failed" => "failed",
        "generation.succeeded" => "succeeded",
        other => return Err(JobError::Fatal(format!("unknown event kind `{other}`"))),
    };
    let mut client = pool.get().await.map_err(penora_common::db::DbError::from)?;
    let seen = client
        .query_opt(
            "SELECT outcome FROM processed_events WHERE user_id = $1 AND event_id = $2",
            &[&user.as_str(), &event.event_id],
        )
        .await
        .map_err(penora_common::db::DbError::from)?;
    if let Some(row) = seen {
        return Ok(format!(
            "duplicate event (first outcome: {})",
            row.get::<_, String>(0)
        ));
    }
    if kind == "failed" {
        // The refund records the event in its own commit.
        let refund = failed_refund(event, user, code, correlation.map(str::to_owned));
        return refund_result(ledger::refund_one(&mut client, refund).await, occurred);
    }
    let outcome = match ledger::settle(
        &mut client,
        &user,
        &app,
        &code,
        "generation succeeded",
        correlation,
    )
    .await?
    {
        SettleResult::Settled => "settled",
        SettleResult::AlreadySettled => "already settled",
        SettleResult::AlreadyRefunded => {
            return Err(JobError::Fatal(format!(
                "reservation {} was refunded before this success event",
                event.project_code
            )));
        }
    };
    client
        .execute(
            "INSERT INTO processed_events (user_id, event_id, kind, outcome) VALUES ($1, $2, $3, $4) \
             ON CONFLICT DO NOTHING",
            &[&user.as_str(), &event.event_id, &kind, &outcome],
        )
        .await
        .map_err(penora_common::db::DbError::from)?;
    Ok(outcome.to_owned())
}
