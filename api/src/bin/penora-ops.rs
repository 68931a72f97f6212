//! `penora-ops`: the operator CLI (migrations, keys, grants, reconcile).
//!
//! Settings come from the same environment as the services (`DATABASE_URL`,
//! `STORAGE_QUOTA_BYTES`, `MAX_DEDUCT_AMOUNT`, …). Exit status: 0 on success,
//! 1 when `reconcile` finds a violation, 2 on any error.

use std::{collections::BTreeSet, process::ExitCode};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use penora_common::{
    config::Settings,
    db,
    domain::{self, AppName, Credits, UserId},
    keys::{self, KeyApp, Scope},
    ledger, reconcile,
};

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
        command: KeysCommand,
    },
    /// Grant credits.
    Credits {
        #[command(subcommand)]
        command: CreditsCommand,
    },
    /// Check invariants 1, 2, 4 and 6 over every user; exit 1 naming the users on a violation.
    Reconcile {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key; it is printed once and never stored in clear.
    Create {
        /// The app the key acts for (`penora`, `imagegene`, … or `*` for any).
        #[arg(long)]
        app: String,
        /// Comma-separated scopes: read, spend, write, admin.
        #[arg(long, value_delimiter = ',', required = true)]
        scopes: Vec<String>,
        /// A name for people (who holds the key).
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List keys (never the keys themselves).
    List {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key; it stops working on the next request.
    Revoke {
        /// The key's id (from `keys list`).
        id: uuid::Uuid,
    },
}

#[derive(Subcommand)]
enum CreditsCommand {
    /// Grant AMOUNT credits to USER, once per REFERENCE.
    Grant {
        /// The user.
        user: String,
        /// Whole credits.
        amount: i64,
        /// Why (a purchase, a bonus).
        #[arg(long)]
        reason: String,
        /// Idempotency reference (e.g. the payment id).
        #[arg(long)]
        reference: String,
        /// The app granting.
        #[arg(long, default_value = "penora")]
        app: String,
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
    let settings = Settings::from_env().context("Bad configuration")?;
    let url = settings.database_url.expose().to_owned();
    db::migrate(&url)
        .await
        .context("Failed to apply migrations (is PostgreSQL running? see DATABASE_URL)")?;
    let pool = db::pool_for(&url, 2).context("Failed to create the database pool")?;
    let mut client = pool
        .get()
        .await
        .context("Failed to connect to PostgreSQL")?;
    match cli.command {
        Command::Migrate => {
            println!(
                "migrations applied (schema version {})",
                db::latest_migration_version()
            );
        }
        Command::Keys { command } => match command {
            KeysCommand::Create { app, scopes, name } => {
                let app = KeyApp::parse(&app).map_err(anyhow::Error::msg)?;
                let scopes: BTreeSet<Scope> = scopes
                    .iter()
                    .map(|s| s.parse::<Scope>())
                    .collect::<Result<_, _>>()
                    .map_err(anyhow::Error::msg)?;
                let name = domain::bounded_text("name", &name, 200)?;
                let key = keys::create(&client, &name, &app, &scopes).await?;
                let scopes: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
                println!("key:    {}", key.secret.expose());
                println!("id:     {}", key.id);
                println!("app:    {}", app.as_str());
                println!("scopes: {}", scopes.join(","));
                eprintln!("Store the key now: it is shown only once.");
            }
            KeysCommand::List { json } => {
                let keys = keys::list(&client).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&keys)?);
                } else {
                    print_keys(&keys);
                }
            }
            KeysCommand::Revoke { id } => {
                if !keys::revoke(&client, id).await? {
                    bail!("no key with id {id}");
                }
                println!("revoked {id}");
            }
        },
        Command::Credits {
            command:
                CreditsCommand::Grant {
                    user,
                    amount,
                    reason,
                    reference,
                    app,
                },
        } => {
            let grant = ledger::Grant {
                user_id: UserId::parse(&user)?,
                amount: Credits::new("amount", amount, settings.max_deduct_amount)?,
                app_name: AppName::parse("app", &app)?,
                reason: domain::bounded_text("reason", &reason, domain::DESCRIPTION_MAX_LEN)?,
                reference: domain::bounded_text(
                    "reference",
                    &reference,
                    domain::REFERENCE_MAX_LEN,
                )?,
            };
            let outcome = ledger::grant(&mut client, &grant, None).await?;
            let r = outcome.value;
            let replay = if outcome.replayed {
                " (already granted: nothing moved)"
            } else {
                ""
            };
            println!(
                "granted {} credits to {} (reference {}); balance {}{replay}",
                r.credits_added, r.user_id, r.reference, r.new_balance
            );
        }
        Command::Reconcile { json } => {
            let report = reconcile::run(&mut client, settings.storage_quota_bytes).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for v in &report.violations {
                    println!(
                        "user {:<24} invariant {}  {}",
                        v.user_id, v.invariant, v.detail
                    );
                }
                let users = report.users();
                if users.is_empty() {
                    println!(
                        "reconcile OK: {} users, {} ledger entries, {} reservations, no violation",
                        report.users_checked, report.entries_checked, report.reservations_checked
                    );
                } else {
                    println!(
                        "reconcile FAILED: {} violations for {} users: {}",
                        report.violations.len(),
                        users.len(),
                        users.join(", ")
                    );
                }
            }
            if !report.violations.is_empty() {
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_keys(keys: &[keys::KeyRecord]) {
    let rows: Vec<[String; 6]> = keys
        .iter()
        .map(|k| {
            [
                k.id.to_string(),
                format!("{}…", k.prefix),
                k.app.clone(),
                k.scopes.join(","),
                penora_common::timefmt::rfc3339_millis(k.created_at),
                k.revoked_at.map_or_else(
                    || "active".to_owned(),
                    |t| format!("revoked {}", penora_common::timefmt::rfc3339_millis(t)),
                ),
            ]
        })
        .collect();
    let header = ["ID", "PREFIX", "APP", "SCOPES", "CREATED", "STATE"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    println!("{}", line(header.to_vec()));
    for row in &rows {
        println!("{}", line(row.iter().map(String::as_str).collect()));
    }
    if rows.is_empty() {
        println!("(no keys)");
    }
}
