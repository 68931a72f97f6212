//! `penora-ops`: the operator CLI. One module per command group, one output
//! module (tables for people, JSON for scripts).
//!
//! Settings come from the same environment as the services (`DATABASE_URL`,
//! `AMQP_URL`, `STORAGE_QUOTA_BYTES`, `MAX_DEDUCT_AMOUNT`, …), of the
//! sections the CLI uses only ([`penora_config::OpsSettings`]): an HTTP,
//! image or worker setting, whatever its value, never stops it. Only
//! `migrate` changes the schema; every other command refuses to run on a
//! schema older than this build (the services migrate at start unless
//! `DB_MIGRATE_ON_START=false`). Exit status: 0 on success, 1 when a
//! check finds a problem (`reconcile`, `audit verify`, `wait-idle`, `dlq
//! purge` without `--yes`), 2 on any error.

mod allowances;
mod audit;
mod credits;
mod dlq;
mod event;
mod keys;
mod limits;
mod outbox;
mod output;
mod projects;
mod queues;
mod reconcile;
mod wait_idle;
mod webhooks;

use std::{process::ExitCode, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use penora_config::OpsSettings;
use penora_store as db;

#[derive(Parser)]
#[command(name = "penora-ops", version, about = "Penora Credits operator CLI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply pending database migrations (safe while services run).
    Migrate,
    /// Create, list and revoke API keys.
    Keys {
        #[command(subcommand)]
        command: keys::KeysCommand,
    },
    /// Grant credits.
    Credits {
        #[command(subcommand)]
        command: credits::CreditsCommand,
    },
    /// Recurring allowances: list, set and delete a user's; a summary of all.
    Allowances {
        #[command(subcommand)]
        command: allowances::AllowancesCommand,
    },
    /// Delete projects of the shared workspace.
    Projects {
        #[command(subcommand)]
        command: projects::ProjectsCommand,
    },
    /// Check invariants 1, 2, 4 and 6 over every user; exit 1 naming the users on a violation.
    Reconcile {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Depth and consumers of every queue, retry and dead queues included.
    Queues {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Wait until the pipeline is idle: every job published, every queue but
    /// the dead letters empty, every ledger entry audited, no save still
    /// queued. Exit 1 naming what is left if it is not idle in time.
    WaitIdle {
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
    },
    /// Inspect, replay and purge parked (dead-letter) messages.
    Dlq {
        #[command(subcommand)]
        command: dlq::DlqCommand,
    },
    /// The audit log.
    Audit {
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
    /// Publish an ImageGene generation event, as ImageGene does (for tests and repairs).
    Event(event::Event),
    /// Outbox rows the broker kept refusing, set aside: list them, put them back.
    Outbox {
        #[command(subcommand)]
        command: outbox::OutboxCommand,
    },
    /// Webhook endpoints (never their secrets) and their deliveries' attempts.
    Webhooks {
        #[command(subcommand)]
        command: webhooks::WebhooksCommand,
    },
    /// Spend limits: list, set and delete a user's; a summary of all.
    Limits {
        #[command(subcommand)]
        command: limits::LimitsCommand,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("penora-ops: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let settings = OpsSettings::from_env().context("Bad configuration")?;
    penora_ledger::events_out::set_default_threshold(settings.ledger.low_balance_threshold);
    let url = settings.db.url.expose().to_owned();
    let pool = db::pool_for(&url, 2).context("Failed to create the database pool")?;
    if matches!(cli.command, Command::Migrate) {
        db::migrate(&url)
            .await
            .context(
                "Failed to apply migrations (is PostgreSQL running? see DATABASE_URL; migrations run as the schema's owner)",
            )?;
    } else if let Err(why) = db::readiness(&pool).await {
        anyhow::bail!(
            "{why}: run `penora-ops migrate` first (penora-api and penora-worker also migrate at start, unless DB_MIGRATE_ON_START=false)"
        );
    } else {
        db::learn_distribution(&pool)
            .await
            .context("Failed to connect to PostgreSQL")?;
    }
    let mut client = pool
        .get()
        .await
        .context("Failed to connect to PostgreSQL")?;
    let done = ExitCode::SUCCESS;
    Ok(match cli.command {
        Command::Migrate => {
            println!(
                "migrations applied (schema version {})",
                db::latest_migration_version()
            );
            done
        }
        Command::Keys { command } => keys::run(&client, command).await.map(|()| done)?,
        Command::Credits { command } => credits::run(&settings.ledger, &mut client, command)
            .await
            .map(|()| done)?,
        Command::Allowances { command } => allowances::run(&settings.ledger, &mut client, command)
            .await
            .map(|()| done)?,
        Command::Projects { command } => {
            projects::run(&mut client, command).await.map(|()| done)?
        }
        Command::Reconcile { json } => {
            reconcile::run(&settings.workspace, &mut client, json).await?
        }
        Command::Audit { command } => audit::run(&settings.audit, &mut client, command).await?,
        Command::Queues { json } => queues::run(&settings.broker, json).await.map(|()| done)?,
        Command::Dlq { command } => dlq::run(&settings.broker, command).await?,
        Command::WaitIdle { timeout_secs } => {
            wait_idle::run(&settings.broker, &client, Duration::from_secs(timeout_secs)).await?
        }
        Command::Event(e) => event::run(&settings.broker, e).await.map(|()| done)?,
        Command::Outbox { command } => outbox::run(&client, command).await.map(|()| done)?,
        Command::Webhooks { command } => webhooks::run(&client, command).await.map(|()| done)?,
        Command::Limits { command } => limits::run(&mut client, command).await.map(|()| done)?,
    })
}
