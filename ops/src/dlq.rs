//! `penora-ops dlq`: parked (dead-letter) messages are listed, shown,
//! replayed to the queue they were parked from, and purged.
//!
//! Rules: looking never counts as a delivery. Reading takes the parked
//! messages without acknowledging them, a chunk at a time; each one looked
//! at is then published again to the end of its dead queue as a fresh copy
//! (confirmed by the broker), and only then is the original acknowledged. A
//! message returned to a quorum queue unacknowledged would count as a
//! delivery, and RabbitMQ 4 drops a message past its queue's delivery limit
//! (20 by default), so twenty looks would erase a dead letter. One look
//! reads each message parked when it starts exactly once, in order, and
//! leaves them in that order; memory holds one chunk and the page shown,
//! however many are parked. A replay publishes the copy to the work queue it
//! was parked from (never to an exchange its headers name: a publisher could
//! have written them), only when its routing key is one that queue takes,
//! with confirms, and acknowledges the parked original only then. Cut short
//! anywhere, these leave the message parked (at worst twice: the handlers
//! are idempotent), never lost. Text from messages is printed escaped
//! (`output`).

use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Subcommand;
use lapin::{
    BasicProperties, Channel,
    options::{BasicAckOptions, BasicGetOptions, QueuePurgeOptions},
    types::{AMQPValue, FieldTable},
};
use penora_config::Broker;
use penora_domain::messages::GENERATION_EVENTS;
use penora_domain::timefmt::rfc3339_millis;
use penora_platform::broker::headers;
use penora_platform::broker::{self, Outgoing, Publisher, Topology};
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

/// What a scan does with a message it read.
enum Fate {
    /// Publish a fresh copy to the end of the dead queue (looked at only).
    PutBack,
    /// Publish this instead (a replay to its work queue).
    Replay(Box<Outgoing>),
}

/// Messages read and settled at a time: memory holds one chunk.
const SCAN_CHUNK: usize = 256;

/// Reads every message parked in `dead` when the scan starts, once, in
/// order, a chunk at a time: hands each to `visit`, publishes what it says
/// (a fresh copy to the end of `dead`, or a replay) with confirms, and only
/// then acknowledges the chunk's originals. Returns how many it read.
async fn scan(
    publisher: &Publisher,
    ch: &Channel,
    dead: &str,
    mut visit: impl FnMut(&Peeked) -> anyhow::Result<Fate>,
) -> anyhow::Result<usize> {
    // Only what is parked now: the copies put back go behind it.
    let parked = ch
        .queue_declare(
            dead.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?
        .message_count() as usize;
    let mut read = 0;
    while read < parked {
        let chunk = peek(ch, dead, (parked - read).min(SCAN_CHUNK), read).await?;
        if chunk.is_empty() {
            break;
        }
        read += chunk.len();
        let mut outgoing = Vec::with_capacity(chunk.len());
        for m in &chunk {
            outgoing.push(match visit(m)? {
                Fate::Replay(o) => *o,
                Fate::PutBack => {
                    // The same message, without the broker's delivery count.
                    let headers = headers_where(m, |k| k != "x-delivery-count");
                    copy_of(m, String::new(), dead.to_owned(), headers)
                }
            });
        }
        publisher.publish_all(outgoing).await.context(
            "publishing the copies (the messages stay parked: nothing was acknowledged)",
        )?;
        for m in &chunk {
            ch.basic_ack(m.delivery_tag, BasicAckOptions::default())
                .await?;
        }
    }
    Ok(read)
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
    // Not the publisher's time to live (the copy would expire again) nor its
    // user id (the broker refuses a copy whose user id is not the one
    // publishing it).
    let mut properties = BasicProperties::default().with_headers(headers);
    let p = &m.properties;
    if let Some(v) = p.content_type() {
        properties = properties.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        properties = properties.with_content_encoding(v.clone());
    }
    if let Some(v) = p.message_id() {
        properties = properties.with_message_id(v.clone());
    }
    if let Some(v) = p.correlation_id() {
        properties = properties.with_correlation_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        properties = properties.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        properties = properties.with_type(v.clone());
    }
    Outgoing {
        exchange,
        routing_key,
        payload: m.data.clone(),
        properties,
    }
}

/// The work queue `queue` names (with or without `.dead`), unprefixed, and
/// its dead queue.
fn queues_of(topology: &Topology, queue: &str) -> anyhow::Result<(&'static str, String)> {
    let work = queue.strip_suffix(".dead").unwrap_or(queue);
    match broker::WORK_QUEUES.iter().find(|w| **w == work) {
        Some(w) => Ok((w, topology.dead_queue(w))),
        None => bail!(
            "unknown queue `{}` (expected one of {})",
            output::text(queue),
            broker::WORK_QUEUES.join(", ")
        ),
    }
}

/// The dead queue of `queue` (a work queue name, with or without `.dead`).
fn dead_queue_of(topology: &Topology, queue: &str) -> anyhow::Result<String> {
    queues_of(topology, queue).map(|(_, dead)| dead)
}

/// What to say when no parked message matched.
fn nothing_parked(id: Option<&str>, dead: &str) -> String {
    format!(
        "no parked message{} in {dead}",
        id.map(|i| format!(" with id {}", output::text(i)))
            .unwrap_or_default()
    )
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
async fn peek(
    ch: &Channel,
    queue: &str,
    limit: usize,
    before: usize,
) -> Result<Vec<Peeked>, lapin::Error> {
    // The work queue this dead queue belongs to (the same prefix).
    let work = queue.strip_suffix(".dead").unwrap_or(queue);
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
        // Parked by the worker: its own headers (a first delivery's were
        // dropped before it read them). Dead-lettered by the broker (a
        // delivery limit reached): the headers are the ones the message was
        // published with, which a publisher could have written, so none of
        // the worker's is believed; where it was published comes from the
        // broker's `x-death` record, and its arrival is unknown.
        let deaths = deaths(p);
        // Dead-lettered by the broker from the work queue itself (a
        // delivery limit, a per-message TTL the publisher set, …), the
        // message carries the headers it was published with.
        let from_work = deaths.iter().find(|d| d.queue == work);
        let by_broker = from_work.is_some();
        let published = from_work.or_else(|| deaths.last());
        let own = |name: &str| {
            if by_broker {
                None
            } else {
                headers::text(p, name)
            }
        };
        out.push(Peeked {
            position: before + out.len() + 1,
            message_id: p.message_id().as_ref().map(|s| s.to_string()),
            correlation_id: p.correlation_id().as_ref().map(|s| s.to_string()),
            original_exchange: own(headers::ORIGINAL_EXCHANGE)
                .or_else(|| published.map(|d| d.exchange.clone())),
            original_routing_key: own(headers::ORIGINAL_ROUTING_KEY)
                .or_else(|| published.and_then(|d| d.routing_key.clone())),
            error: own(headers::ERROR).or_else(|| {
                headers::text(p, "x-first-death-reason")
                    .map(|why| format!("dead-lettered by the broker: {why}"))
            }),
            attempts: if by_broker {
                None
            } else {
                headers::int(p, headers::ATTEMPT)
            },
            first_failure_at: own(headers::FIRST_FAILURE_AT),
            parked_at: own(headers::PARKED_AT),
            body: String::from_utf8_lossy(&d.data).into_owned(),
            data: d.data.clone(),
            delivery_tag: d.delivery_tag,
            properties: d.properties.clone(),
        });
    }
    Ok(out)
}

/// One of the broker's `x-death` records of a message: where it died, why,
/// and where it had been published.
#[derive(Debug, Clone)]
struct Death {
    queue: String,
    exchange: String,
    routing_key: Option<String>,
}

/// The `x-death` records of `p`, most recent first (as the broker keeps
/// them). The broker writes them; a publisher can add some, never take one
/// away.
fn deaths(p: &lapin::BasicProperties) -> Vec<Death> {
    let text = |v: Option<&AMQPValue>| match v {
        Some(AMQPValue::LongString(s)) => Some(s.to_string()),
        Some(AMQPValue::ShortString(s)) => Some(s.to_string()),
        _ => None,
    };
    let Some(AMQPValue::FieldArray(records)) =
        p.headers().as_ref().and_then(|h| h.inner().get("x-death"))
    else {
        return Vec::new();
    };
    records
        .as_slice()
        .iter()
        .filter_map(|r| {
            let AMQPValue::FieldTable(t) = r else {
                return None;
            };
            let t = t.inner();
            let routing_key = match t.get("routing-keys") {
                Some(AMQPValue::FieldArray(keys)) => text(keys.as_slice().first()),
                _ => None,
            };
            Some(Death {
                queue: text(t.get("queue"))?,
                exchange: text(t.get("exchange")).unwrap_or_default(),
                routing_key,
            })
        })
        .collect()
}

/// Whether work queue `work` takes messages published with `routing_key`
/// (its binding: `generation.*` for ImageGene's events, any event type
/// for the webhook fan-out, the queue's own name for a job).
fn takes(work: &str, routing_key: &str) -> bool {
    if work == penora_domain::events::WEBHOOK_FANOUT {
        // Bound with `#`: every event's type.
        !routing_key.is_empty()
    } else if work == GENERATION_EVENTS {
        routing_key
            .strip_prefix("generation.")
            .is_some_and(|rest| !rest.is_empty() && !rest.contains('.'))
    } else {
        routing_key == work
    }
}

/// The message to publish to send a parked message back to the work queue
/// it was parked from (`target`, through the default exchange, so that no
/// header can send it anywhere else), with its retry history cleared: a
/// fresh first attempt that keeps when it first arrived and its first
/// routing key. `None` when its routing key is not one `work` takes.
fn replay_of(m: &Peeked, work: &str, target: &str) -> Option<Outgoing> {
    let routing_key = m.original_routing_key.clone()?;
    if !takes(work, &routing_key) {
        return None;
    }
    let mut table = headers_where(m, |k| {
        !k.starts_with(headers::PREFIX)
            && k != "x-death"
            && k != "x-delivery-count"
            && !k.starts_with("x-first-death")
            && !k.starts_with("x-last-death")
    });
    let text = |v: &str| AMQPValue::LongString(v.to_owned().into());
    table.insert(headers::ORIGINAL_ROUTING_KEY.into(), text(&routing_key));
    if let Some(exchange) = &m.original_exchange {
        table.insert(headers::ORIGINAL_EXCHANGE.into(), text(exchange));
    }
    // When it first arrived: an event's time is believed relative to it.
    if let Some(at) = &m.first_failure_at {
        table.insert(headers::FIRST_FAILURE_AT.into(), text(at));
    }
    table.insert(
        "x-penora-replayed-at".into(),
        text(&rfc3339_millis(OffsetDateTime::now_utc())),
    );
    Some(copy_of(m, String::new(), target.to_owned(), table))
}
