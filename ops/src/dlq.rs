//! `penora-ops dlq`: parked (dead-letter) messages are listed, shown,
//! replayed to where they were first published, and purged.
//!
//! Rules: looking never counts as a delivery. Reading takes every parked
//! message without acknowledging it; each one looked at is then published
//! again to the end of its dead queue as a fresh copy (confirmed by the
//! broker), and only then is the original acknowledged. A message returned
//! to a quorum queue unacknowledged would count as a delivery, and RabbitMQ 4
//! drops a message past its queue's delivery limit (20 by default), so twenty
//! looks would erase a dead letter. A replay publishes the copy to where the
//! message was first published, with confirms, and acknowledges the parked
//! original only then. Cut short anywhere, these leave the message parked
//! (at worst twice: the handlers are idempotent), never lost.

use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Subcommand;
use lapin::{
    BasicProperties, Channel,
    options::{BasicAckOptions, BasicGetOptions, QueuePurgeOptions},
    types::{AMQPValue, FieldTable},
};
use penora_common::{
    broker::{self, Outgoing, Publisher, Topology},
    config::Settings,
    messages::headers,
    timefmt::rfc3339_millis,
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
    /// Show parked messages in full (all, or the one with --id).
    Show {
        /// The work queue (or its `.dead` queue).
        queue: String,
        /// Only the message with this message id.
        #[arg(long)]
        id: Option<String>,
    },
    /// Send parked messages back to where they were first published.
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

pub async fn run(settings: &Settings, command: DlqCommand) -> anyhow::Result<ExitCode> {
    let topology = Topology::from_settings(settings);
    let connection = broker::connect(settings.amqp_url.expose(), "penora-ops").await?;
    topology.declare(&connection).await?;
    let ch = connection.create_channel().await?;
    // One publisher (its connection is opened on first use) for the copies
    // put back and the replays.
    let publisher = Publisher::new(settings.amqp_url.clone(), "penora-ops", topology.clone());
    let code = match command {
        DlqCommand::List {
            queue,
            limit,
            since,
            id,
            json,
        } => list(&publisher, &ch, &topology, &queue, limit, since, id, json).await?,
        DlqCommand::Show { queue, id } => {
            let dead = dead_queue_of(&topology, &queue)?;
            let parked = peek(&ch, &dead, usize::MAX).await?;
            let shown = select(&parked, id.as_deref(), &dead).map(|chosen| output::json(&chosen));
            put_back(&publisher, &ch, &dead, parked.iter()).await?;
            shown??;
            ExitCode::SUCCESS
        }
        DlqCommand::Replay { queue, id, dry_run } => {
            let dead = dead_queue_of(&topology, &queue)?;
            let parked = peek(&ch, &dead, usize::MAX).await?;
            let replayed = match select(&parked, id.as_deref(), &dead) {
                Ok(chosen) => replay(&publisher, &ch, &chosen, dry_run).await,
                Err(e) => Err(e),
            };
            // What was not replayed goes back, as fresh copies.
            let kept = parked.iter().filter(|m| {
                replayed
                    .as_ref()
                    .map_or(true, |done| !done.contains(&m.delivery_tag))
            });
            put_back(&publisher, &ch, &dead, kept).await?;
            replayed?;
            ExitCode::SUCCESS
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

#[allow(clippy::too_many_arguments)]
async fn list(
    publisher: &Publisher,
    ch: &Channel,
    topology: &Topology,
    queue: &str,
    limit: usize,
    since: Option<String>,
    id: Option<String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let dead = dead_queue_of(topology, queue)?;
    let since = since
        .map(|t| OffsetDateTime::parse(&t, &Rfc3339))
        .transpose()
        .context("--since must be an RFC 3339 time, e.g. 2026-11-24T06:00:00Z")?;
    let all = peek(ch, &dead, usize::MAX).await?;
    put_back(publisher, ch, &dead, all.iter()).await?;
    let parked: Vec<Peeked> = all
        .into_iter()
        .filter(|m| id.is_none() || m.message_id == id)
        .filter(|m| match (&since, &m.parked_at) {
            (None, _) => true,
            (Some(since), Some(at)) => {
                OffsetDateTime::parse(at, &Rfc3339).is_ok_and(|at| at >= *since)
            }
            (Some(_), None) => false,
        })
        .take(limit)
        .collect();
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
    Ok(ExitCode::SUCCESS)
}

/// Replays `chosen` (or says what it would do); returns the delivery tags of
/// the parked originals it replayed and acknowledged.
async fn replay(
    publisher: &Publisher,
    ch: &Channel,
    chosen: &[&Peeked],
    dry_run: bool,
) -> anyhow::Result<Vec<u64>> {
    let mut outgoing = Vec::new();
    for m in chosen {
        let Some(o) = replay_of(m) else {
            bail!(
                "message {} has no original exchange in its headers",
                m.position
            );
        };
        println!(
            "{} {} -> exchange `{}` routing key `{}`",
            if dry_run { "would replay" } else { "replaying" },
            m.message_id
                .clone()
                .unwrap_or_else(|| format!("#{}", m.position)),
            o.exchange,
            o.routing_key
        );
        outgoing.push(o);
    }
    if dry_run {
        return Ok(Vec::new());
    }
    publisher.publish_all(outgoing).await?;
    for m in chosen {
        ch.basic_ack(m.delivery_tag, BasicAckOptions::default())
            .await?;
    }
    println!("replayed {} message(s)", chosen.len());
    Ok(chosen.iter().map(|m| m.delivery_tag).collect())
}

/// Puts messages that were looked at back at the end of their dead queue as
/// fresh copies (published with confirms), then acknowledges the originals,
/// so that looking never counts as a delivery.
async fn put_back<'a>(
    publisher: &Publisher,
    ch: &Channel,
    dead: &str,
    messages: impl Iterator<Item = &'a Peeked>,
) -> anyhow::Result<()> {
    let messages: Vec<&Peeked> = messages.collect();
    if messages.is_empty() {
        return Ok(());
    }
    let copies = messages
        .iter()
        .map(|m| {
            // The same message, without the broker's delivery count.
            let headers = headers_where(m, |k| k != "x-delivery-count");
            copy_of(m, String::new(), dead.to_owned(), headers)
        })
        .collect();
    publisher
        .publish_all(copies)
        .await
        .context("putting the parked messages back (they stay parked: nothing was acknowledged)")?;
    for m in &messages {
        ch.basic_ack(m.delivery_tag, BasicAckOptions::default())
            .await?;
    }
    Ok(())
}

/// The headers of `m` whose name passes `keep`.
fn headers_where(m: &Peeked, keep: impl Fn(&str) -> bool) -> FieldTable {
    let mut table = FieldTable::default();
    let headers = m.properties.headers().clone().unwrap_or_default();
    for (k, v) in headers.inner().iter().filter(|(k, _)| keep(k.as_str())) {
        table.insert(k.clone(), v.clone());
    }
    table
}

/// `m` (its bytes and properties) to publish again to `exchange` with
/// `routing_key`, carrying `headers`.
fn copy_of(m: &Peeked, exchange: String, routing_key: String, headers: FieldTable) -> Outgoing {
    Outgoing {
        exchange,
        routing_key,
        payload: m.data.clone(),
        properties: m.properties.clone().with_headers(headers),
    }
}

/// The dead queue of `queue` (a work queue name, with or without `.dead`).
fn dead_queue_of(topology: &Topology, queue: &str) -> anyhow::Result<String> {
    let work = queue.strip_suffix(".dead").unwrap_or(queue);
    match broker::WORK_QUEUES.iter().find(|w| **w == work) {
        Some(w) => Ok(topology.dead_queue(w)),
        None => bail!(
            "unknown queue `{queue}` (expected one of {})",
            broker::WORK_QUEUES.join(", ")
        ),
    }
}

/// The parked messages to act on: all, or the one with message id `id`.
fn select<'a>(
    parked: &'a [Peeked],
    id: Option<&str>,
    dead: &str,
) -> anyhow::Result<Vec<&'a Peeked>> {
    let chosen: Vec<_> = parked
        .iter()
        .filter(|m| id.is_none() || m.message_id.as_deref() == id)
        .collect();
    if chosen.is_empty() {
        bail!(
            "no parked message{} in {dead}",
            id.map(|i| format!(" with id {i}")).unwrap_or_default()
        );
    }
    Ok(chosen)
}

/// A parked message, as read without removing it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Peeked {
    /// Position in the queue (1 = oldest).
    pub position: usize,
    /// The message id (the outbox's, or the publisher's).
    pub message_id: Option<String>,
    /// The correlation id (request id).
    pub correlation_id: Option<String>,
    /// Where it was first published.
    pub original_exchange: Option<String>,
    /// Its first routing key.
    pub original_routing_key: Option<String>,
    /// Why it was parked.
    pub error: Option<String>,
    /// Attempts made.
    pub attempts: Option<i64>,
    /// When it first failed.
    pub first_failure_at: Option<String>,
    /// When it was parked.
    pub parked_at: Option<String>,
    /// The body, as text.
    pub body: String,
    /// The body as it was published (copies and replays carry these bytes).
    #[serde(skip)]
    data: Vec<u8>,
    #[serde(skip)]
    delivery_tag: u64,
    #[serde(skip)]
    properties: BasicProperties,
}

/// Reads up to `limit` messages of `queue` on `ch` without acknowledging
/// them: they stay in the queue, and go back to it in order when `ch` closes
/// (unless a replay acknowledges them first).
async fn peek(ch: &Channel, queue: &str, limit: usize) -> Result<Vec<Peeked>, lapin::Error> {
    let mut out = Vec::new();
    while out.len() < limit {
        let Some(msg) = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        let d = msg.delivery;
        let p = &d.properties;
        out.push(Peeked {
            position: out.len() + 1,
            message_id: p.message_id().as_ref().map(|s| s.to_string()),
            correlation_id: p.correlation_id().as_ref().map(|s| s.to_string()),
            // Parked by the worker: its own headers. Dead-lettered by the
            // broker (a delivery limit reached): where it was first
            // published, from the broker's `x-death` record.
            original_exchange: headers::text(p, headers::ORIGINAL_EXCHANGE)
                .or_else(|| first_death(p).map(|(exchange, _)| exchange)),
            original_routing_key: headers::text(p, headers::ORIGINAL_ROUTING_KEY)
                .or_else(|| first_death(p).map(|(_, key)| key)),
            error: headers::text(p, headers::ERROR).or_else(|| {
                headers::text(p, "x-first-death-reason")
                    .map(|why| format!("dead-lettered by the broker: {why}"))
            }),
            attempts: headers::int(p, headers::ATTEMPT),
            first_failure_at: headers::text(p, headers::FIRST_FAILURE_AT),
            parked_at: headers::text(p, headers::PARKED_AT),
            body: String::from_utf8_lossy(&d.data).into_owned(),
            data: d.data.clone(),
            delivery_tag: d.delivery_tag,
            properties: d.properties.clone(),
        });
    }
    Ok(out)
}

/// Where a message the broker dead-lettered was first published: the
/// exchange and routing key of its first `x-death` record.
fn first_death(p: &lapin::BasicProperties) -> Option<(String, String)> {
    let headers = p.headers().as_ref()?.inner();
    let exchange = headers::text(p, "x-first-death-exchange")?;
    let AMQPValue::FieldArray(deaths) = headers.get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    let AMQPValue::FieldArray(keys) = first.inner().get("routing-keys")? else {
        return None;
    };
    let key = match keys.as_slice().first()? {
        AMQPValue::LongString(k) => k.to_string(),
        AMQPValue::ShortString(k) => k.to_string(),
        _ => return None,
    };
    Some((exchange, key))
}

/// The message to publish to send a parked message back to where it was
/// first published, with its retry history cleared.
fn replay_of(m: &Peeked) -> Option<Outgoing> {
    let exchange = m.original_exchange.clone()?;
    let routing_key = m.original_routing_key.clone()?;
    let mut table = headers_where(m, |k| {
        !k.starts_with("x-penora-")
            && k != "x-death"
            && !k.starts_with("x-first-death")
            && !k.starts_with("x-last-death")
    });
    table.insert(
        "x-penora-replayed-at".into(),
        AMQPValue::LongString(rfc3339_millis(OffsetDateTime::now_utc()).into()),
    );
    Some(copy_of(m, exchange, routing_key, table))
}
