//! `penora.ledger-audit`: a ledger entry's record is appended to its user's
//! hash chain, once (see `penora_ledger::audit` for the chain's rules).
//! Deliveries that arrive together are recorded in one transaction; a chain
//! another transaction holds is skipped by it, and its entries are then
//! appended alone.

use penora_domain::messages::LedgerAuditJob;
use penora_ledger::audit::{self, Appended};
use penora_store::DbError;

use super::JobResult;
use crate::{Context, message::Message, retry::JobError};

/// Appends one entry's record.
pub async fn handle(ctx: &Context, m: &Message) -> JobResult {
    let job: LedgerAuditJob = m.decode()?;
    let mut client = ctx.pool.get().await.map_err(DbError::from)?;
    let appended = audit::append(
        &mut client,
        ctx.audit_mac.as_ref(),
        &job.user_id,
        job.entry_id,
    )
    .await?;
    result(&job, Some(appended))
}

/// Appends the records of many entries in one transaction; `None` (one by
/// one) when the transaction as a whole fails.
pub async fn handle_many(ctx: &Context, ms: &[Message]) -> Option<Vec<JobResult>> {
    let jobs: Vec<Result<LedgerAuditJob, JobError>> = ms.iter().map(Message::decode).collect();
    let items: Vec<(String, i64)> = jobs
        .iter()
        .flatten()
        .map(|j| (j.user_id.clone(), j.entry_id))
        .collect();
    let mut client = ctx.pool.get().await.ok()?;
    let mut appended = match audit::append_many(&mut client, ctx.audit_mac.as_ref(), &items).await {
        Ok(a) => a.into_iter(),
        Err(e) => {
            tracing::debug!(error = %e, "audit batch failed; one by one");
            return None;
        }
    };
    let mut results: Vec<Option<JobResult>> = Vec::with_capacity(ms.len());
    // Entries whose chain another transaction held: the rest of the batch is
    // committed; these wait for their chains together, in one more
    // transaction (or one by one, should that fail).
    let mut held = Vec::new();
    for (m, job) in ms.iter().zip(jobs) {
        results.push(match job {
            Err(e) => Some(Err(e)),
            Ok(job) => match appended.next() {
                Some(Appended::Busy) => {
                    held.push((results.len(), m, job));
                    None
                }
                got => Some(result(&job, got)),
            },
        });
    }
    if held.is_empty() {
        return Some(results.into_iter().flatten().collect());
    }
    let items: Vec<(String, i64)> = held
        .iter()
        .map(|(_, _, j)| (j.user_id.clone(), j.entry_id))
        .collect();
    match audit::append_many_waiting(&mut client, ctx.audit_mac.as_ref(), &items).await {
        Ok(answers) => {
            for ((slot, _, job), got) in held.iter().zip(answers) {
                results[*slot] = Some(result(job, Some(got)));
            }
        }
        // A chain still held after DB_LOCK_TIMEOUT_MS would hold each entry
        // alone as long: they are all tried again later.
        Err(e @ DbError::LockTimeout(_)) => {
            for (slot, _, _) in &held {
                results[*slot] = Some(Err(JobError::Retryable(e.to_string())));
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "held chains' batch failed; one by one");
            for (slot, m, _) in &held {
                results[*slot] = Some(handle(ctx, m).await);
            }
        }
    }
    Some(
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(JobError::Retryable("no answer for this entry".into())))
            })
            .collect(),
    )
}

fn result(job: &LedgerAuditJob, appended: Option<Appended>) -> JobResult {
    match appended {
        Some(Appended::Recorded(seq)) => Ok(format!("recorded as record {seq}")),
        Some(Appended::AlreadyRecorded) => Ok("already recorded".into()),
        // `append` alone waits for the chain, and never answers `Busy`.
        Some(Appended::NoSuchEntry | Appended::Busy) | None => Err(JobError::Fatal(format!(
            "no ledger entry {} for user {}",
            job.entry_id, job.user_id
        ))),
    }
}
