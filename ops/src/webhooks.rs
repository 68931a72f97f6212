//! `penora-ops webhooks`: the registered endpoints (never their secrets),
//! and one endpoint's deliveries with every attempt (status, latency,
//! error). Text from the database is printed escaped (`output`).

use clap::Subcommand;
use deadpool_postgres::Client;
use penora_domain::timefmt::rfc3339_millis;
use penora_store::webhooks;

use crate::output::{self, Align};

#[derive(Subcommand)]
pub enum WebhooksCommand {
    /// List the endpoints (with --deleted, the deleted ones too).
    List {
        /// Include deleted endpoints.
        #[arg(long)]
        deleted: bool,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// One endpoint's latest deliveries, each with its attempts.
    Deliveries {
        /// The endpoint (`we_…`).
        endpoint_id: String,
        /// Deliveries shown, newest first.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(client: &Client, command: WebhooksCommand) -> anyhow::Result<()> {
    match command {
        WebhooksCommand::List { deleted, json } => {
            let endpoints = webhooks::list_endpoints(client, deleted).await?;
            if json {
                return output::json(&endpoints);
            }
            let cells: Vec<Vec<String>> = endpoints
                .iter()
                .map(|e| {
                    vec![
                        e.id.clone(),
                        output::text(&e.url),
                        output::text(&e.events.join(",")),
                        output::text(e.app.as_deref().unwrap_or("*")),
                        rfc3339_millis(e.created_at),
                        e.deleted_at.map(rfc3339_millis).unwrap_or_default(),
                        output::text(e.description.as_deref().unwrap_or_default()),
                    ]
                })
                .collect();
            output::table(
                &[
                    ("ID", Align::Left),
                    ("URL", Align::Left),
                    ("EVENTS", Align::Left),
                    ("APP", Align::Left),
                    ("CREATED AT", Align::Left),
                    ("DELETED AT", Align::Left),
                    ("DESCRIPTION", Align::Left),
                ],
                &cells,
            );
            println!("{} endpoint(s)", endpoints.len());
            Ok(())
        }
        WebhooksCommand::Deliveries {
            endpoint_id,
            limit,
            json,
        } => {
            let limit = limit.clamp(1, 1000);
            let deliveries = webhooks::deliveries(client, &endpoint_id, limit).await?;
            if json {
                return output::json(&deliveries);
            }
            let mut cells = Vec::new();
            for d in &deliveries {
                cells.push(vec![
                    output::text(&d.event_id),
                    output::text(&d.event_type),
                    output::text(&d.state),
                    String::new(),
                    rfc3339_millis(d.created_at),
                    String::new(),
                    String::new(),
                    String::new(),
                ]);
                for t in &d.tries {
                    cells.push(vec![
                        String::new(),
                        String::new(),
                        String::new(),
                        t.attempt.to_string(),
                        rfc3339_millis(t.at),
                        output::cell(t.status_code),
                        format!("{} ms", t.latency_ms),
                        output::text(t.error.as_deref().unwrap_or_default()),
                    ]);
                }
            }
            output::table(
                &[
                    ("EVENT", Align::Left),
                    ("TYPE", Align::Left),
                    ("STATE", Align::Left),
                    ("ATTEMPT", Align::Right),
                    ("AT", Align::Left),
                    ("STATUS", Align::Right),
                    ("LATENCY", Align::Right),
                    ("ERROR", Align::Left),
                ],
                &cells,
            );
            println!(
                "{} deliver{} to {}",
                deliveries.len(),
                if deliveries.len() == 1 { "y" } else { "ies" },
                output::text(&endpoint_id)
            );
            Ok(())
        }
    }
}
