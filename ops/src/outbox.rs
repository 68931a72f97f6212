//! `penora-ops outbox`: the outbox rows the broker kept refusing, set aside
//! so that the others keep flowing (CONTRACT §11), and putting them back.

use clap::Subcommand;
use deadpool_postgres::Client;

use crate::output::{self, Align};

#[derive(Subcommand)]
pub enum OutboxCommand {
    /// List the set-aside rows (and how many rows wait to be published).
    List {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Put set-aside rows back to be published (all, or one with --id); the
    /// services' relays publish them within a second. Fix the cause first
    /// (a missing binding, say), or they are set aside again.
    Retry {
        /// Only this row.
        #[arg(long)]
        id: Option<i64>,
    },
}

pub async fn run(client: &Client, command: OutboxCommand) -> anyhow::Result<()> {
    match command {
        OutboxCommand::List { json } => list(client, json).await,
        OutboxCommand::Retry { id } => retry(client, id).await,
    }
}

async fn list(client: &Client, json: bool) -> anyhow::Result<()> {
    let rows = penora_store::outbox::set_aside(client).await?;
    if json {
        return output::json(&rows);
    }
    let backlog = penora_store::outbox::backlog(client).await?;
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.routing_key.clone(),
                r.user_id.clone(),
                r.refusals.to_string(),
                r.set_aside_at.clone(),
                r.last_error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    output::table(
        &[
            ("ID", Align::Right),
            ("ROUTING KEY", Align::Left),
            ("USER", Align::Left),
            ("REFUSALS", Align::Right),
            ("SET ASIDE AT", Align::Left),
            ("LAST ERROR", Align::Left),
        ],
        &cells,
    );
    println!(
        "{} set aside; {} waiting to be published (oldest {:.1} s)",
        rows.len(),
        backlog.waiting,
        backlog.oldest_secs
    );
    Ok(())
}

async fn retry(client: &Client, id: Option<i64>) -> anyhow::Result<()> {
    let n = penora_store::outbox::put_back(client, id).await?;
    if let (Some(id), 0) = (id, n) {
        anyhow::bail!("no set-aside outbox row with id {id}");
    }
    println!("{n} row(s) put back; the relays publish them within a second");
    Ok(())
}
