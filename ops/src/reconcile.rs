//! `penora-ops reconcile`: checks the contract's invariants 1, 2, 4 and 6
//! over every user; a violation names the users and exits 1.

use std::process::ExitCode;

use penora_config::Workspace;
use penora_ledger::reconcile;

use crate::output;

pub async fn run(
    workspace: &Workspace,
    client: &mut deadpool_postgres::Client,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let started = time::OffsetDateTime::now_utc();
    let report =
        reconcile::run_with_progress(client, workspace.storage_quota_bytes, &output::progress_bar)
            .await?;
    let users = report.users();
    let summary = if users.is_empty() {
        format!(
            "reconcile OK: {} users, {} ledger entries, {} reservations, no violation",
            report.users_checked, report.entries_checked, report.reservations_checked
        )
    } else {
        format!(
            "reconcile FAILED: {} violations for {} users: {}",
            report.violations.len(),
            users.len(),
            users.join(", ")
        )
    };
    if json {
        output::json(&report)?;
    } else {
        for v in &report.violations {
            println!(
                "user {:<24} invariant {}  {}",
                v.user_id, v.invariant, v.detail
            );
        }
        println!("{summary}");
    }
    output::record_run(
        &*client,
        penora_store::ops_runs::RECONCILE,
        report.violations.is_empty(),
        &summary,
        &report,
        started,
    )
    .await;
    Ok(if report.violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
