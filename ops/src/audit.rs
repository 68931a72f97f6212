//! `penora-ops audit verify`: every ledger entry has its record and every
//! hash chain is intact; a problem exits 1.

use std::process::ExitCode;

use clap::Subcommand;
use penora_common::audit;

use crate::output;

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Check every ledger entry has its audit record and every chain is intact.
    Verify {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(
    client: &mut deadpool_postgres::Client,
    command: AuditCommand,
) -> anyhow::Result<ExitCode> {
    let AuditCommand::Verify { json } = command;
    let v = audit::verify_with_progress(client, &output::progress_bar).await?;
    if json {
        output::json(&v)?;
    } else {
        for f in &v.findings {
            println!("user {:<24} {}", f.user_id, f.detail);
        }
        if v.findings.is_empty() {
            println!(
                "audit OK: {} records, {} ledger entries, every entry recorded, every chain intact",
                v.records_checked, v.entries_checked
            );
        } else {
            println!("audit FAILED: {} problems", v.findings.len());
        }
    }
    Ok(if v.findings.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
