//! `penora-ops keys`: API keys are created here (printed once, stored as a
//! digest), listed without their secrets, and revoked.

use std::collections::BTreeSet;

use anyhow::bail;
use clap::Subcommand;
use penora_domain as domain;
use penora_domain::timefmt::rfc3339_millis;
use penora_platform::keys::{self, KeyApp, KeyRecord, Scope};

use crate::output::{self, Align};

#[derive(Subcommand)]
pub enum KeysCommand {
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

pub async fn run(client: &deadpool_postgres::Client, command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Create { app, scopes, name } => {
            let app = KeyApp::parse(&app).map_err(anyhow::Error::msg)?;
            let scopes: BTreeSet<Scope> = scopes
                .iter()
                .map(|s| s.parse::<Scope>())
                .collect::<Result<_, _>>()
                .map_err(anyhow::Error::msg)?;
            let name = domain::bounded_text("name", &name, 200)?;
            let key = keys::create(client, &name, &app, &scopes).await?;
            let scopes: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
            println!("key:    {}", key.secret.expose());
            println!("id:     {}", key.id);
            println!("app:    {}", app.as_str());
            println!("scopes: {}", scopes.join(","));
            eprintln!("Store the key now: it is shown only once.");
        }
        KeysCommand::List { json } => {
            let keys = keys::list(client).await?;
            if json {
                output::json(&keys)?;
            } else {
                print_keys(&keys);
            }
        }
        KeysCommand::Revoke { id } => {
            if !keys::revoke(client, id).await? {
                bail!("no key with id {id}");
            }
            println!("revoked {id}");
        }
    }
    Ok(())
}

fn print_keys(keys: &[KeyRecord]) {
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            vec![
                k.id.to_string(),
                format!("{}…", k.prefix),
                k.app.clone(),
                k.scopes.join(","),
                rfc3339_millis(k.created_at),
                k.revoked_at.map_or_else(
                    || "active".to_owned(),
                    |t| format!("revoked {}", rfc3339_millis(t)),
                ),
            ]
        })
        .collect();
    let left = Align::Left;
    output::table(
        &[
            ("ID", left),
            ("PREFIX", left),
            ("APP", left),
            ("SCOPES", left),
            ("CREATED", left),
            ("STATE", left),
        ],
        &rows,
    );
    if rows.is_empty() {
        println!("(no keys)");
    }
}
