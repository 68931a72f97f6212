//! Parked (dead-letter) messages: read without counting as a delivery,
//! put back in order, and replayed to the work queue they were parked from
//! (`penora-ops dlq` and the support console's operations page).
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
//! are idempotent), never lost.

use anyhow::{Context, bail};
use lapin::{
    BasicProperties, Channel,
    options::{BasicAckOptions, BasicGetOptions},
    types::{AMQPValue, FieldTable},
};
use penora_domain::messages::GENERATION_EVENTS;
use penora_domain::timefmt::rfc3339_millis;
use time::OffsetDateTime;

use crate::broker::{self, Outgoing, Publisher, Topology, headers};

/// `raw` with control and bidirectional or invisible format characters
/// escaped (`\u{…}`), safe to print to a terminal or a page.
pub fn escaped(raw: &str) -> String {
    let unsafe_char = |c: char| c.is_control() || penora_domain::is_bidi_or_invisible_format(c);
    if !raw.chars().any(unsafe_char) {
        return raw.to_owned();
    }
    let mut out = String::with_capacity(raw.len() + 8);
    for c in raw.chars() {
        if unsafe_char(c) {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// A chunk of parked messages looked at: `parked` read in order (at most
/// `limit` kept), out of `total` parked.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Looked {
    /// The messages kept, in order.
    pub parked: Vec<Peeked>,
    /// How many were parked when the look began.
    pub total: usize,
}

/// The first `limit` messages parked in work queue `work`'s dead queue
/// (all of them read and put back in order; nothing counted as a delivery).
pub async fn look(
    publisher: &Publisher,
    ch: &Channel,
    topology: &Topology,
    work: &str,
    limit: usize,
) -> anyhow::Result<Looked> {
    let dead = dead_queue_of(topology, work)?;
    let mut parked = Vec::new();
    let total = scan(publisher, ch, &dead, |m| {
        if parked.len() < limit {
            parked.push(m.clone());
        }
        Ok(Fate::PutBack)
    })
    .await?;
    Ok(Looked { parked, total })
}

/// Replays the message parked in `work`'s dead queue whose message id is
/// `id` to `work`; how many were replayed (0: none with that id), or an
/// error when its routing key is not one `work` takes (it stays parked).
pub async fn replay_one(
    publisher: &Publisher,
    ch: &Channel,
    topology: &Topology,
    work: &str,
    id: &str,
) -> anyhow::Result<usize> {
    let (work, dead) = queues_of(topology, work)?;
    let target = topology.queue(work);
    let mut count = 0usize;
    let mut refused = false;
    scan(publisher, ch, &dead, |m| {
        if m.message_id.as_deref() != Some(id) {
            return Ok(Fate::PutBack);
        }
        match replay_of(m, work, &target) {
            Some(o) => {
                count += 1;
                Ok(Fate::Replay(Box::new(o)))
            }
            None => {
                refused = true;
                Ok(Fate::PutBack)
            }
        }
    })
    .await?;
    if refused {
        bail!(
            "message {} has no routing key that {work} takes (left parked)",
            escaped(id)
        );
    }
    Ok(count)
}

/// What a scan does with a message it read.
pub enum Fate {
    /// Publish a fresh copy to the end of the dead queue (looked at only).
    PutBack,
    /// Publish this instead (a replay to its work queue).
    Replay(Box<Outgoing>),
}

/// Messages read and settled at a time: memory holds one chunk.
pub const SCAN_CHUNK: usize = 256;

/// Reads every message parked in `dead` when the scan starts, once, in
/// order, a chunk at a time: hands each to `visit`, publishes what it says
/// (a fresh copy to the end of `dead`, or a replay) with confirms, and only
/// then acknowledges the chunk's originals. Returns how many it read.
pub async fn scan(
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
pub fn headers_where(m: &Peeked, keep: impl Fn(&str) -> bool) -> FieldTable {
    let mut table = FieldTable::default();
    let headers = m.properties.headers().clone().unwrap_or_default();
    for (k, v) in headers.inner().iter().filter(|(k, _)| keep(k.as_str())) {
        table.insert(k.clone(), v.clone());
    }
    table
}

/// `m` (its bytes and properties) to publish again to `exchange` with
/// `routing_key`, carrying `headers`.
pub fn copy_of(m: &Peeked, exchange: String, routing_key: String, headers: FieldTable) -> Outgoing {
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
pub fn queues_of(topology: &Topology, queue: &str) -> anyhow::Result<(&'static str, String)> {
    let work = queue.strip_suffix(".dead").unwrap_or(queue);
    match broker::WORK_QUEUES.iter().find(|w| **w == work) {
        Some(w) => Ok((w, topology.dead_queue(w))),
        None => bail!(
            "unknown queue `{}` (expected one of {})",
            escaped(queue),
            broker::WORK_QUEUES.join(", ")
        ),
    }
}

/// The dead queue of `queue` (a work queue name, with or without `.dead`).
pub fn dead_queue_of(topology: &Topology, queue: &str) -> anyhow::Result<String> {
    queues_of(topology, queue).map(|(_, dead)| dead)
}

/// What to say when no parked message matched.
pub fn nothing_parked(id: Option<&str>, dead: &str) -> String {
    format!(
        "no parked message{} in {dead}",
        id.map(|i| format!(" with id {}", escaped(i)))
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
pub async fn peek(
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
pub struct Death {
    queue: String,
    exchange: String,
    routing_key: Option<String>,
}

/// The `x-death` records of `p`, most recent first (as the broker keeps
/// them). The broker writes them; a publisher can add some, never take one
/// away.
pub fn deaths(p: &lapin::BasicProperties) -> Vec<Death> {
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
pub fn takes(work: &str, routing_key: &str) -> bool {
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
pub fn replay_of(m: &Peeked, work: &str, target: &str) -> Option<Outgoing> {
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
