//! `penora.ledger-audit`, two kinds of job:
//! * a commit's job (one per committed transaction): the chain links the
//!   movement wrote are checked again and each chain's checkpoint moves on
//!   (`penora_ledger::checkpoint`); the deliveries that arrive together are
//!   checked together, each user's chain once;
//! * an entry's job (written before V18, for an entry without a link): its
//!   record is appended to the user's old hash chain, once
//!   (`penora_ledger::audit`); such deliveries that arrive together are
//!   recorded in one transaction, a chain another transaction holds is
//!   skipped by it, and its entries are then appended alone.

use std::collections::HashMap;

use penora_domain::messages::{LedgerAuditCommit, LedgerAuditJob};
use penora_ledger::audit::{self, Appended};
use penora_ledger::checkpoint::{self, Checked};
use penora_store::DbError;
use serde::Deserialize;

use super::JobResult;
use crate::{Context, message::Message, retry::JobError};

/// A `ledger-audit` job of either kind.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum AuditJob {
    Commit(LedgerAuditCommit),
    Entry(LedgerAuditJob),
}

/// Handles one job.
pub async fn handle(ctx: &Context, m: &Message) -> JobResult {
    match m.decode::<AuditJob>()? {
        AuditJob::Commit(commit) => {
            let checked =
                checkpoint::check_commits(&ctx.pool, ctx.audit_mac.as_ref(), &commit.chains)
                    .await?;
            commit_result(&commit, &checked)
        }
        AuditJob::Entry(job) => append_one(ctx, &job).await,
    }
}

/// What checking a commit's chains found, as the job's result: a broken
/// chain fails the job for good (it is parked with the reason).
fn commit_result(commit: &LedgerAuditCommit, checked: &HashMap<String, Checked>) -> JobResult {
    let mut new = 0;
    for c in &commit.chains {
        match checked.get(&c.user_id) {
            Some(Checked::Checked { new: n, .. }) => new += n,
            Some(Checked::Busy) => {
                return Err(JobError::Retryable(format!(
                    "the audit checkpoint of user {} stayed locked by another transaction past the lock timeout",
                    c.user_id
                )));
            }
            Some(Checked::Broken(why)) => {
                return Err(JobError::Fatal(format!(
                    "the audit chain of user {} is broken: {why}",
                    c.user_id
                )));
            }
            None if c.entry_ids.is_empty() => {}
            None => {
                return Err(JobError::Retryable(format!(
                    "the chain of user {} went unchecked",
                    c.user_id
                )));
            }
        }
    }
    Ok(format!(
        "{} chains checked, {new} links newly checked",
        commit.chains.len()
    ))
}

/// Handles many jobs: the commits' chains checked together; the entries'
/// jobs appended together. `None` (one by one) when a batch as a whole
/// fails.
pub async fn handle_many(ctx: &Context, ms: &[Message]) -> Option<Vec<JobResult>> {
    let jobs: Vec<Result<AuditJob, JobError>> = ms.iter().map(Message::decode).collect();
    let chains: Vec<_> = jobs
        .iter()
        .filter_map(|j| match j {
            Ok(AuditJob::Commit(c)) => Some(c.chains.iter().cloned()),
            _ => None,
        })
        .flatten()
        .collect();
    let checked = if chains.is_empty() {
        HashMap::new()
    } else {
        match checkpoint::check_commits(&ctx.pool, ctx.audit_mac.as_ref(), &chains).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "audit check batch failed; one by one");
                return None;
            }
        }
    };
    let entry_messages: Vec<Message> = ms
        .iter()
        .zip(&jobs)
        .filter(|(_, j)| matches!(j, Ok(AuditJob::Entry(_))))
        .map(|(m, _)| m.clone())
        .collect();
    let mut entry_results = if entry_messages.is_empty() {
        Vec::new()
    } else {
        handle_entries(ctx, &entry_messages).await?
    }
    .into_iter();
    Some(
        jobs.into_iter()
            .map(|j| match j {
                Err(e) => Err(e),
                Ok(AuditJob::Commit(c)) => commit_result(&c, &checked),
                Ok(AuditJob::Entry(_)) => entry_results
                    .next()
                    .unwrap_or_else(|| Err(JobError::Retryable("no answer for this entry".into()))),
            })
            .collect(),
    )
}

/// Appends one entry's record.
async fn append_one(ctx: &Context, job: &LedgerAuditJob) -> JobResult {
    let mut client = ctx.pool.get().await.map_err(DbError::from)?;
    let appended = audit::append(
        &mut client,
        ctx.audit_mac.as_ref(),
        &job.user_id,
        job.entry_id,
    )
    .await?;
    result(job, Some(appended))
}

/// Appends the records of many entries' jobs in one transaction; `None`
/// (one by one) when the transaction as a whole fails.
async fn handle_entries(ctx: &Context, ms: &[Message]) -> Option<Vec<JobResult>> {
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
