//! `penora-ops audit verify`: every ledger entry has its record and every
//! hash chain is intact; a problem exits 1.
//!
//! With `AUDIT_HMAC_KEY` (the workers' key) every record's MAC is checked
//! too, so a chain rewritten inside the database (hashes recomputed) is
//! found; without it only what the database alone can prove is checked, and
//! the output says the MACs went unchecked.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::Subcommand;
use penora_config::{Audit, MIN_AUDIT_KEY_LEN, Secret};
use penora_ledger::audit::{self, MacCheck, MacKey};

use crate::output;

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Check every ledger entry has its audit record and every chain is
    /// intact; with AUDIT_HMAC_KEY set, every record's MAC too.
    Verify {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
        /// A file of keys AUDIT_HMAC_KEY replaced, one a line: records
        /// written under them keep their MACs (key rotation).
        #[arg(long, value_name = "FILE")]
        previous_keys: Option<PathBuf>,
        /// Every record must carry a MAC (the key was set before the first
        /// record was written): a record without one is a problem.
        #[arg(long)]
        require_mac: bool,
        /// How many records carried no MAC when the key was introduced
        /// (recorded outside the database): more is a problem. A superuser
        /// who strips every MAC of a chain makes its records look written
        /// before the key; this number does not move for them.
        #[arg(long, value_name = "N")]
        max_records_without_mac: Option<i64>,
    },
}

pub async fn run(
    audit_settings: &Audit,
    client: &mut deadpool_postgres::Client,
    command: AuditCommand,
) -> anyhow::Result<ExitCode> {
    let AuditCommand::Verify {
        json,
        previous_keys,
        require_mac,
        max_records_without_mac,
    } = command;
    let macs = mac_check(audit_settings, previous_keys.as_deref(), require_mac)?;
    let started = time::OffsetDateTime::now_utc();
    let mut v = audit::verify_with_progress(client, &macs, &output::progress_bar).await?;
    if let Some(max) = max_records_without_mac
        && v.records_without_mac > max
    {
        v.findings.push(audit::Finding {
            user_id: "(all)".into(),
            detail: format!(
                "{} records carry no MAC, more than the {max} written before the key: MACs were removed",
                v.records_without_mac
            ),
        });
    }
    let summary = if v.findings.is_empty() {
        format!(
            "audit OK: {} ledger entries, {} chain links in the ledger, {} older records, \
             every entry chained, every chain intact",
            v.entries_checked, v.links_checked, v.records_checked
        )
    } else {
        format!("audit FAILED: {} problems", v.findings.len())
    };
    output::record_run(
        &*client,
        penora_store::ops_runs::AUDIT_VERIFY,
        v.findings.is_empty(),
        &summary,
        &v,
        started,
    )
    .await;
    if json {
        output::json(&v)?;
    } else {
        for f in &v.findings {
            println!("user {:<24} {}", f.user_id, output::text(&f.detail));
        }
        if v.macs_checked {
            println!(
                "MACs: {} records checked with AUDIT_HMAC_KEY; {} records written before the key was set carry none",
                v.records_with_mac, v.records_without_mac
            );
        } else if v.records_with_mac > 0 {
            println!(
                "MACs: {} records carry one, NOT checked: set AUDIT_HMAC_KEY (without it a chain rewritten inside the database is not found)",
                v.records_with_mac
            );
        }
        if v.checkpoints_checked > 0 {
            println!(
                "checkpoints: {} ({} with a MAC{}); {} links await their ledger-audit job",
                v.checkpoints_checked,
                v.checkpoints_with_mac,
                if v.macs_checked {
                    ", checked"
                } else {
                    ", NOT checked"
                },
                v.links_awaiting_checkpoint
            );
        }
        println!("{summary}");
    }
    Ok(if v.findings.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The keys to check MACs with: `AUDIT_HMAC_KEY`, then those of
/// `previous_keys` (which needs the current key: without it nothing is
/// checked, and a partial check would pass records it never looked at).
fn mac_check(
    audit_settings: &Audit,
    previous_keys: Option<&std::path::Path>,
    require: bool,
) -> anyhow::Result<MacCheck> {
    let mut keys = Vec::new();
    if let Some(current) = MacKey::from_settings(audit_settings)? {
        keys.push(current);
    }
    if let Some(path) = previous_keys {
        anyhow::ensure!(
            !keys.is_empty(),
            "--previous-keys needs AUDIT_HMAC_KEY (the key the workers use now)"
        );
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("Failed to read {}", path.display()))?;
        for (n, line) in text.lines().enumerate() {
            let key = line.trim();
            if key.is_empty() {
                continue;
            }
            // Never the key itself in the message.
            anyhow::ensure!(
                key.chars().count() >= MIN_AUDIT_KEY_LEN,
                "{} line {}: a key has at least {MIN_AUDIT_KEY_LEN} characters",
                path.display(),
                n + 1
            );
            keys.push(MacKey::new(&Secret::new(key))?);
        }
    }
    Ok(MacCheck { keys, require })
}
