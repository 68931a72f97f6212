//! `penora-ops dlq`: parked (dead-letter) messages are listed, shown,
//! replayed to the queue they were parked from, and purged. How they are
//! read without counting as deliveries and replayed without loss is
//! `penora_platform::dead_letters`. Text from messages is printed escaped
//! (`output`).

use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Subcommand;
use lapin::{Channel, options::QueuePurgeOptions};
use penora_config::Broker;
use penora_platform::broker::{self, Publisher, Topology};
use penora_platform::dead_letters::{
    Fate, Peeked, dead_queue_of, nothing_parked, queues_of, replay_of, scan,
};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::output::{self, Align};

#[derive(Subcommand)]
pub enum DlqCommand {
    /// List parked messages of QUEUE (e.g. penora.generation-events).
    List {
        /// The work queue (or its `.dead` queue).
        queue: String,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Start at this position (1 = the oldest parked message).
        #[arg(long, default_value_t = 1)]
        from: usize,
        /// Only messages parked at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Only the message with this message id.
        #[arg(long)]
        id: Option<String>,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show parked messages in full (all, or the one with --id; at most --limit).
    Show {
        /// The work queue (or its `.dead` queue).
        queue: String,
        /// Only the message with this message id.
        #[arg(long)]
        id: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Send parked messages back to the queue they were parked from.
    Replay {
        /// The work queue (or its `.dead` queue).
        queue: String,
        /// Only the message with this message id.
        #[arg(long)]
        id: Option<String>,
        /// Say what would be replayed, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete every parked message of QUEUE.
    Purge {
        /// The work queue (or its `.dead` queue).
        queue: String,
        /// Really delete (required).
        #[arg(long)]
        yes: bool,
    },
}

pub async fn run(broker_settings: &Broker, command: DlqCommand) -> anyhow::Result<ExitCode> {
    let topology = Topology::from_settings(broker_settings);
    let connection = broker::connect(broker_settings.url.expose(), "penora-ops").await?;
    topology.declare(&connection).await?;
    let ch = connection.create_channel().await?;
    // One publisher (its connection is opened on first use) for the copies
    // put back and the replays.
    let publisher = Publisher::new(broker_settings.url.clone(), "penora-ops", topology.clone());
    let code = match command {
        DlqCommand::List {
            queue,
            limit,
            from,
            since,
            id,
            json,
        } => {
            let page = Page { from, limit };
            list(&publisher, &ch, &topology, &queue, page, since, id, json).await?
        }
        DlqCommand::Show { queue, id, limit } => {
            let dead = dead_queue_of(&topology, &queue)?;
            let mut shown = Vec::new();
            scan(&publisher, &ch, &dead, |m| {
                if (id.is_none() || m.message_id == id) && shown.len() < limit {
                    shown.push(m.clone());
                }
                Ok(Fate::PutBack)
            })
            .await?;
            if shown.is_empty() {
                bail!("{}", nothing_parked(id.as_deref(), &dead));
            }
            output::json(&shown)?;
            ExitCode::SUCCESS
        }
        DlqCommand::Replay { queue, id, dry_run } => {
            let (work, dead) = queues_of(&topology, &queue)?;
            let target = topology.queue(work);
            let mut refused = Vec::new();
            let mut count = 0usize;
            scan(&publisher, &ch, &dead, |m| {
                if id.is_some() && m.message_id != id {
                    return Ok(Fate::PutBack);
                }
                let label = output::text(
                    &m.message_id
                        .clone()
                        .unwrap_or_else(|| format!("#{}", m.position)),
                );
                let Some(o) = replay_of(m, work, &target) else {
                    refused.push(label);
                    return Ok(Fate::PutBack);
                };
                count += 1;
                println!(
                    "{} {label} -> queue `{}` (routing key `{}`)",
                    if dry_run { "would replay" } else { "replaying" },
                    o.routing_key,
                    output::text(m.original_routing_key.as_deref().unwrap_or_default()),
                );
                Ok(if dry_run {
                    Fate::PutBack
                } else {
                    Fate::Replay(Box::new(o))
                })
            })
            .await?;
            for label in &refused {
                eprintln!(
                    "not replayed: {label} has no routing key that {work} takes (left parked)"
                );
            }
            if count == 0 && refused.is_empty() {
                bail!("{}", nothing_parked(id.as_deref(), &dead));
            }
            if !dry_run {
                println!("replayed {count} message(s)");
            }
            if refused.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        DlqCommand::Purge { queue, yes } => {
            let dead = dead_queue_of(&topology, &queue)?;
            if yes {
                let n = ch
                    .queue_purge(dead.clone().into(), QueuePurgeOptions::default())
                    .await?;
                println!("purged {n} message(s) from {dead}");
                ExitCode::SUCCESS
            } else {
                let n = broker::queue_stats(&ch, &topology)
                    .await?
                    .into_iter()
                    .find(|s| s.name == dead)
                    .map_or(0, |s| s.messages);
                println!(
                    "would delete {n} message(s) from {dead}; run again with --yes to delete them"
                );
                ExitCode::from(1)
            }
        }
    };
    let _ = ch.close(200, "bye".into()).await;
    let _ = connection.close(200, "bye".into()).await;
    Ok(code)
}

/// Which parked messages a listing shows.
#[derive(Clone, Copy)]
struct Page {
    /// The first position shown (1 = oldest).
    from: usize,
    /// At most this many.
    limit: usize,
}

#[allow(clippy::too_many_arguments)]
async fn list(
    publisher: &Publisher,
    ch: &Channel,
    topology: &Topology,
    queue: &str,
    page: Page,
    since: Option<String>,
    id: Option<String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let dead = dead_queue_of(topology, queue)?;
    let since = since
        .map(|t| OffsetDateTime::parse(&t, &Rfc3339))
        .transpose()
        .context("--since must be an RFC 3339 time, e.g. 2026-11-24T06:00:00Z")?;
    let mut parked: Vec<Peeked> = Vec::new();
    let mut matching = 0usize;
    let total = scan(publisher, ch, &dead, |m| {
        let wanted = (id.is_none() || m.message_id == id)
            && match (&since, &m.parked_at) {
                (None, _) => true,
                (Some(since), Some(at)) => {
                    OffsetDateTime::parse(at, &Rfc3339).is_ok_and(|at| at >= *since)
                }
                (Some(_), None) => false,
            };
        if wanted && m.position >= page.from {
            matching += 1;
            if parked.len() < page.limit {
                parked.push(m.clone());
            }
        }
        Ok(Fate::PutBack)
    })
    .await?;
    if json {
        output::json(&parked)?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = parked
        .iter()
        .map(|m| {
            vec![
                m.position.to_string(),
                output::cell(m.message_id.as_ref()),
                output::cell(m.attempts),
                output::cell(m.parked_at.as_ref()),
                m.error
                    .clone()
                    .unwrap_or_default()
                    .chars()
                    .take(80)
                    .collect(),
            ]
        })
        .collect();
    output::table(
        &[
            ("#", Align::Right),
            ("MESSAGE ID", Align::Left),
            ("ATTEMPTS", Align::Right),
            ("PARKED AT", Align::Left),
            ("ERROR", Align::Left),
        ],
        &rows,
    );
    println!("{} parked in {dead}", parked.len());
    if matching > parked.len() {
        let next = parked.last().map_or(page.from, |m| m.position + 1);
        println!(
            "({} of {matching} shown, of {total} parked; the next page: --from {next})",
            parked.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}
