//! RabbitMQ: the topology (declared here and only here), connections, and a
//! publisher with confirms.
//!
//! Topology, for each work queue `Q` (`penora.save-project`,
//! `penora.ledger-audit`, `penora.generation-events`,
//! `penora.webhooks.fanout`, `penora.webhooks`):
//! * `Q` — the work queue, bound to its exchange;
//! * `Q.retry.N` (N = 1 … max attempts − 1) — delay queues without consumers:
//!   a failed message is published there with a per-message expiration, and
//!   when it expires RabbitMQ dead-letters it back to `Q` through the default
//!   exchange. One queue per attempt keeps the delays in one queue alike, so a
//!   long delay never holds a short one behind it;
//! * `Q.dead` — parked messages, with the error in their headers.
//!
//! Every name gets the `AMQP_PREFIX` (empty in production). Exchanges are
//! durable, queues durable (quorum where configured), messages persistent.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
    options::{
        BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
        QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable, ShortString},
};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use penora_config::{Broker, QueueType, Secret};
use penora_domain::events;
use penora_domain::messages::{
    EVENTS_EXCHANGE, GENERATION_EVENTS, JOBS_EXCHANGE, LEDGER_AUDIT, SAVE_PROJECT,
};

/// A broker failure: connecting, declaring or publishing.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The connection or channel failed.
    #[error("broker: {0}")]
    Amqp(#[from] lapin::Error),
    /// The broker refused (nack) or could not route a message.
    #[error("broker refused the message: {0}")]
    Refused(String),
    /// Connecting took too long.
    #[error("broker: connection timed out")]
    Timeout,
    /// The publisher confirm did not arrive within `AMQP_CONFIRM_TIMEOUT_MS`.
    #[error("broker: no publisher confirm within {} ms", .0.as_millis())]
    Unconfirmed(std::time::Duration),
}

/// The queues this service consumes.
pub const WORK_QUEUES: [&str; 5] = [
    SAVE_PROJECT,
    LEDGER_AUDIT,
    GENERATION_EVENTS,
    events::WEBHOOK_FANOUT,
    events::WEBHOOKS,
];

/// Names and shape of the topology.
#[derive(Debug, Clone)]
pub struct Topology {
    prefix: String,
    queue_type: QueueType,
    retry_levels: u32,
    /// Most messages ImageGene's events queue holds (`EVENTS_QUEUE_MAX_LENGTH`).
    events_max_length: u32,
}

impl Topology {
    /// The topology the broker settings describe.
    pub fn from_settings(broker: &Broker) -> Self {
        Self {
            prefix: broker.prefix.clone(),
            queue_type: broker.queue_type,
            retry_levels: broker.retry_max_attempts.saturating_sub(1),
            events_max_length: broker.events_queue_max_length,
        }
    }

    /// The prefixed name of an exchange (the default exchange `""` stays `""`).
    pub fn exchange(&self, name: &str) -> String {
        if name.is_empty() {
            String::new()
        } else {
            format!("{}{name}", self.prefix)
        }
    }

    /// The prefixed name of a work queue.
    pub fn queue(&self, work_queue: &str) -> String {
        format!("{}{work_queue}", self.prefix)
    }

    /// The delay queue a message waits in before attempt `attempt + 1`.
    pub fn retry_queue(&self, work_queue: &str, level: u32) -> String {
        format!("{}{work_queue}.retry.{level}", self.prefix)
    }

    /// Where messages of `work_queue` are parked.
    pub fn dead_queue(&self, work_queue: &str) -> String {
        format!("{}{work_queue}.dead", self.prefix)
    }

    /// Delay queues per work queue (max attempts − 1).
    pub fn retry_levels(&self) -> u32 {
        self.retry_levels
    }

    /// Every queue: work, retry and dead queues, in display order.
    pub fn all_queues(&self) -> Vec<String> {
        let mut all = Vec::new();
        for q in WORK_QUEUES {
            all.push(self.queue(q));
            for level in 1..=self.retry_levels {
                all.push(self.retry_queue(q, level));
            }
            all.push(self.dead_queue(q));
        }
        all
    }

    /// Every exchange.
    pub fn all_exchanges(&self) -> Vec<String> {
        vec![
            self.exchange(JOBS_EXCHANGE),
            self.exchange(EVENTS_EXCHANGE),
            self.exchange(events::EXCHANGE),
        ]
    }

    fn queue_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        if self.queue_type == QueueType::Quorum {
            // Replicated on a cluster, durable by nature.
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        args
    }

    /// Arguments that make the broker dead-letter, never drop: a quorum
    /// queue's redeliveries are limited (RabbitMQ 4 sets 20 when nothing is
    /// said, and drops past it when the queue has no dead-letter target), so
    /// each queue states its limit and, where one is reached, where the
    /// message goes (`dead`). Classic queues have no delivery limit.
    fn delivery_args(&self, limit: i32, dead: Option<&str>) -> FieldTable {
        let mut args = self.queue_args();
        if self.queue_type == QueueType::Quorum {
            args.insert("x-delivery-limit".into(), AMQPValue::LongInt(limit));
            if let Some(dead) = dead {
                self.dead_letter_to(&mut args, dead);
            }
        }
        args
    }

    /// Sends what the queue dead-letters to queue `target`, through the
    /// default exchange (whose routing key is a queue's name), at least once.
    fn dead_letter_to(&self, args: &mut FieldTable, target: &str) {
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(target.into()),
        );
        if self.queue_type == QueueType::Quorum {
            // Quorum queues dead-letter at most once unless told otherwise;
            // at-least-once needs reject-publish overflow.
            args.insert(
                "x-dead-letter-strategy".into(),
                AMQPValue::LongString("at-least-once".into()),
            );
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString("reject-publish".into()),
            );
        }
    }

    /// Declares everything; idempotent, run by every process at connect, on
    /// a channel of its own. A queue that exists with other arguments (made
    /// by an older release: queue arguments cannot change) is used as it is,
    /// with a warning; `docs/operations.md` gives the policy that brings its
    /// delivery limit and dead-letter target.
    pub async fn declare(&self, connection: &Connection) -> Result<(), lapin::Error> {
        let mut ch = connection.create_channel().await?;
        // durable: survives a broker restart.
        let durable_exchange = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        // Penora's own jobs: one routing key per job kind.
        ch.exchange_declare(
            self.exchange(JOBS_EXCHANGE).into(),
            ExchangeKind::Direct,
            durable_exchange,
            FieldTable::default(),
        )
        .await?;
        // ImageGene publishes `generation.<outcome>` here.
        ch.exchange_declare(
            self.exchange(EVENTS_EXCHANGE).into(),
            ExchangeKind::Topic,
            durable_exchange,
            FieldTable::default(),
        )
        .await?;
        // Our own events (contract §14), their type as routing key.
        ch.exchange_declare(
            self.exchange(events::EXCHANGE).into(),
            ExchangeKind::Topic,
            durable_exchange,
            FieldTable::default(),
        )
        .await?;
        for work in WORK_QUEUES {
            let name = self.queue(work);
            let dead = self.dead_queue(work);
            // A message that keeps failing its consumer (a crash before the
            // acknowledgement, again and again) is parked, not dropped.
            let mut args = self.delivery_args(WORK_DELIVERY_LIMIT, Some(&dead));
            if work == GENERATION_EVENTS {
                // What another system publishes is bounded: past the limit
                // the broker refuses new events (the publisher's confirm is
                // a nack, so ImageGene knows to retry) rather than filling
                // its memory and disk, and never drops one it accepted.
                args.insert(
                    "x-max-length".into(),
                    AMQPValue::LongLongInt(i64::from(self.events_max_length)),
                );
                args.insert(
                    "x-overflow".into(),
                    AMQPValue::LongString("reject-publish".into()),
                );
            }
            ch = declare_queue(connection, ch, &name, args).await?;
            let (exchange, key) = if work == GENERATION_EVENTS {
                (EVENTS_EXCHANGE, "generation.*")
            } else if work == events::WEBHOOK_FANOUT {
                // Every event of ours, whatever its type: the relay
                // publishes mandatory, so each one must have a queue.
                (events::EXCHANGE, "#")
            } else {
                (JOBS_EXCHANGE, work)
            };
            ch.queue_bind(
                name.clone().into(),
                self.exchange(exchange).into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
            for level in 1..=self.retry_levels {
                // An expired message goes back to the work queue.
                let mut args = self.delivery_args(WORK_DELIVERY_LIMIT, None);
                self.dead_letter_to(&mut args, &name);
                ch = declare_queue(connection, ch, &self.retry_queue(work, level), args).await?;
            }
            // Dead letters are read by copying and acknowledging (never a
            // redelivery), and their limit is as high as every broker allows
            // (RabbitMQ 3.x refuses 4.x's -1 for "none").
            let args = self.delivery_args(DEAD_DELIVERY_LIMIT, None);
            ch = declare_queue(connection, ch, &dead, args).await?;
        }
        let _ = ch.close(200, "declared".into()).await;
        Ok(())
    }
}

/// Deliveries of one message a work or retry queue allows before the broker
/// parks it in the dead queue.
pub const WORK_DELIVERY_LIMIT: i32 = 50;
/// Deliveries a dead queue allows: in effect no limit.
pub const DEAD_DELIVERY_LIMIT: i32 = i32::MAX;

/// Declares a durable queue with `args`; when it exists with other
/// arguments, uses it as it is (on a fresh channel: the refusal closes the
/// one it came on) and says so. Returns the channel to go on with.
async fn declare_queue(
    connection: &Connection,
    ch: Channel,
    name: &str,
    args: FieldTable,
) -> Result<Channel, lapin::Error> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    match ch.queue_declare(name.into(), durable, args).await {
        Ok(_) => Ok(ch),
        Err(e) if matches!(e.kind(), lapin::ErrorKind::ProtocolError(a) if a.get_id() == 406) => {
            tracing::warn!(
                queue = name,
                "the queue exists with other arguments (made by an older release); using it as it \
                 is: apply the delivery-limit policy of docs/operations.md so the broker never drops its messages"
            );
            let ch = connection.create_channel().await?;
            ch.queue_declare(
                name.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
            Ok(ch)
        }
        Err(e) => Err(e),
    }
}

/// The nodes `AMQP_URL` names: one URL, or the URLs of a cluster's nodes
/// separated by commas (`amqp://u:p@h1:5672/%2f,amqp://u:p@h2:5672/%2f`).
pub fn nodes(url: &str) -> Vec<&str> {
    let nodes: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .collect();
    if nodes.is_empty() { vec![url] } else { nodes }
}

/// The node a process's next connection tries first: each connection starts
/// one node further, so a process whose node went away moves on to the next
/// at once, and the processes' connections spread over the cluster.
static NEXT_NODE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Connects to one of `url`'s nodes ([`nodes`]), within 5 seconds each:
/// the first that answers, starting one node further than the previous call.
/// The error is the last node's when none answers.
pub async fn connect(url: &str, name: &str) -> Result<Connection, BrokerError> {
    let nodes = nodes(url);
    let start = NEXT_NODE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut failure = BrokerError::Timeout;
    for i in 0..nodes.len() {
        let index = (start + i) % nodes.len();
        let node = nodes[index];
        let props = ConnectionProperties::default().with_connection_name(name.into());
        failure =
            match tokio::time::timeout(Duration::from_secs(5), Connection::connect(node, props))
                .await
            {
                Ok(Ok(conn)) => return Ok(conn),
                Ok(Err(e)) => BrokerError::Amqp(e),
                Err(_) => BrokerError::Timeout,
            };
        if nodes.len() > 1 {
            tracing::warn!(node = index, error = %failure, "RabbitMQ node of AMQP_URL unreachable; trying the next");
        }
    }
    Err(failure)
}

/// The reconnect policy: exponential from 200 ms to 10 s, with jitter, forever.
pub fn reconnect_policy() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
}

/// Connects, retrying with [`reconnect_policy`] until it succeeds or `cancel`
/// fires (then `None`).
pub async fn connect_until(
    url: &str,
    name: &str,
    cancel: &CancellationToken,
) -> Option<Connection> {
    let attempt = || connect(url, name);
    let retrying = attempt.retry(reconnect_policy()).notify(|e, wait| {
        metrics::counter!("penora_broker_connect_failures_total").increment(1);
        tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "cannot reach RabbitMQ");
    });
    tokio::select! {
        conn = retrying => conn.ok(),
        () = cancel.cancelled() => None,
    }
}

/// A message ready to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Exchange, already prefixed (`""` for the default exchange).
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// Body.
    pub payload: Vec<u8>,
    /// Properties (persistence is set by the publisher).
    pub properties: BasicProperties,
}

struct Link {
    _connection: Connection,
    channel: Channel,
}

/// Publishes with confirms over one lazily (re)opened connection. A failed
/// publish drops the connection; the next one reconnects.
pub struct Publisher {
    url: Secret,
    name: String,
    topology: Topology,
    link: Mutex<Option<Link>>,
    confirm_timeout: std::time::Duration,
}

/// How long a publish waits for its confirms unless told otherwise
/// (`AMQP_CONFIRM_TIMEOUT_MS`).
pub const DEFAULT_CONFIRM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Publisher {
    /// A publisher for `url`; connects on first use.
    pub fn new(url: Secret, name: &str, topology: Topology) -> Self {
        Self {
            url,
            name: name.to_owned(),
            topology,
            link: Mutex::new(None),
            confirm_timeout: DEFAULT_CONFIRM_TIMEOUT,
        }
    }

    /// The same publisher, waiting at most `timeout` for the confirms of one
    /// publish (then the messages not confirmed count as failed).
    #[must_use]
    pub fn with_confirm_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    /// The topology this publisher declares.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Whether the publisher holds a live connection.
    pub async fn is_connected(&self) -> bool {
        self.link
            .lock()
            .await
            .as_ref()
            .is_some_and(|l| l.channel.status().connected())
    }

    async fn channel(&self) -> Result<Channel, BrokerError> {
        let mut link = self.link.lock().await;
        if let Some(l) = link.as_ref()
            && l.channel.status().connected()
        {
            return Ok(l.channel.clone());
        }
        *link = None;
        let connection = connect(self.url.expose(), &self.name).await?;
        self.topology.declare(&connection).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        metrics::counter!("penora_broker_connections_total", "client" => self.name.clone())
            .increment(1);
        tracing::info!(client = %self.name, "connected to RabbitMQ");
        *link = Some(Link {
            _connection: connection,
            channel: channel.clone(),
        });
        Ok(channel)
    }

    /// Forgets the connection (after an error), so the next call reconnects.
    pub async fn reset(&self) {
        *self.link.lock().await = None;
    }

    /// Publishes every message and waits for every confirm. Messages are
    /// persistent and mandatory: an unroutable one is an error, not a loss.
    pub async fn publish_all(&self, messages: Vec<Outgoing>) -> Result<(), BrokerError> {
        self.publish_each(messages)
            .await?
            .into_iter()
            .find_map(Result::err)
            .map_or(Ok(()), Err)
    }

    /// Publishes every message (persistent and mandatory) and waits for its
    /// confirm, at most the confirm timeout for them all. The answer says, in
    /// order, what became of each: taken, or refused (unroutable, nacked,
    /// not confirmed in time). An `Err` means the connection failed, and
    /// nothing is known of any of them. A failure that may have left the
    /// channel stuck drops the connection; the next call reconnects.
    pub async fn publish_each(
        &self,
        messages: Vec<Outgoing>,
    ) -> Result<Vec<Result<(), BrokerError>>, BrokerError> {
        let result = self.try_publish_each(messages).await;
        let broken = result.as_ref().map_or(true, |each| {
            each.iter()
                .any(|r| matches!(r, Err(BrokerError::Unconfirmed(_))))
        });
        if broken {
            self.reset().await;
        }
        result
    }

    async fn try_publish_each(
        &self,
        messages: Vec<Outgoing>,
    ) -> Result<Vec<Result<(), BrokerError>>, BrokerError> {
        let channel = self.channel().await?;
        let mut confirms = Vec::with_capacity(messages.len());
        for m in messages {
            // mandatory: an unroutable message comes back instead of
            // vanishing. Events (contract §14) are always routable: the
            // webhook fan-out queue takes every one (`#`), so an event that
            // comes back means that queue is gone, and it waits in the outbox.
            let mandatory = true;
            let confirm = channel
                .basic_publish(
                    ShortString::from(m.exchange),
                    ShortString::from(m.routing_key.clone()),
                    BasicPublishOptions {
                        mandatory,
                        ..Default::default()
                    },
                    &m.payload,
                    // delivery mode 2: written to disk by the broker.
                    m.properties.with_delivery_mode(2),
                )
                .await?;
            confirms.push((m.routing_key, confirm));
        }
        let deadline = tokio::time::Instant::now() + self.confirm_timeout;
        let mut each = Vec::with_capacity(confirms.len());
        for (key, confirm) in confirms {
            each.push(match tokio::time::timeout_at(deadline, confirm).await {
                Err(_) => Err(BrokerError::Unconfirmed(self.confirm_timeout)),
                Ok(confirmation) => match confirmation? {
                    Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
                    Confirmation::Ack(Some(_)) => Err(BrokerError::Refused(format!(
                        "no queue is bound for routing key {key}"
                    ))),
                    Confirmation::Nack(_) => Err(BrokerError::Refused(format!(
                        "broker nacked a message for {key}"
                    ))),
                },
            });
        }
        Ok(each)
    }
}

/// Depth and consumers of one queue.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QueueStat {
    /// The queue.
    pub name: String,
    /// Messages ready in it.
    pub messages: u32,
    /// Consumers attached.
    pub consumers: u32,
}

/// Depth and consumers of every queue of the topology (passive declares).
pub async fn queue_stats(
    ch: &Channel,
    topology: &Topology,
) -> Result<Vec<QueueStat>, lapin::Error> {
    let mut out = Vec::new();
    for name in topology.all_queues() {
        let q = ch
            .queue_declare(
                name.clone().into(),
                // passive: only look, never create.
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        out.push(QueueStat {
            name,
            messages: q.message_count(),
            consumers: q.consumer_count(),
        });
    }
    Ok(out)
}

/// The RabbitMQ management API (`RABBITMQ_MANAGEMENT_URL`), when one is
/// configured.
///
/// Rules: it is contacted only when configured, never at an address derived
/// from `AMQP_URL` (the AMQP user and password travel to it as HTTP Basic,
/// and a guessed `http://<amqp host>:15672` would send them in clear even
/// when AMQP itself runs over TLS); `https` is verified
/// ([`crate::http_client`]).
#[derive(Debug, Clone)]
pub struct Management {
    base: url::Url,
    user: String,
    password: penora_config::Secret,
    /// The vhost of `AMQP_URL` (queues are named within it).
    pub vhost: String,
}

impl Management {
    /// The management API of the broker settings, or `None` when none is
    /// configured.
    pub fn from_settings(broker: &Broker) -> Option<Self> {
        let base = broker.management_url.as_ref()?;
        let base = url::Url::parse(base.expose()).ok()?;
        let uri: lapin::uri::AMQPUri = nodes(broker.url.expose())[0].parse().ok()?;
        Some(Self {
            base,
            user: uri.authority.userinfo.username,
            password: penora_config::Secret::new(uri.authority.userinfo.password),
            vhost: uri.vhost,
        })
    }

    /// Where it is (without credentials), for messages.
    pub fn url(&self) -> String {
        let mut shown = self.base.clone();
        let _ = shown.set_password(None);
        let _ = shown.set_username("");
        shown.to_string()
    }

    /// `GET` of the API path made of `segments` (each one encoded as a path
    /// segment: the default vhost `/` travels as `%2F`), as JSON; `None` when
    /// it does not answer 200 with JSON within 2 s.
    pub async fn get(&self, segments: &[&str]) -> Option<serde_json::Value> {
        let mut url = self.base.clone();
        {
            let mut path = url.path_segments_mut().ok()?;
            path.pop_if_empty();
            path.push("api");
            path.extend(segments);
        }
        let answer = crate::http_client::get(
            &url,
            Some((self.user.as_str(), self.password.expose())),
            Duration::from_secs(2),
        )
        .await
        .ok()?;
        if answer.status != 200 {
            return None;
        }
        serde_json::from_slice(&answer.body).ok()
    }

    /// The broker's version, from `/api/overview` (AMQP does not carry it
    /// to this client).
    pub async fn broker_version(&self) -> Option<String> {
        let overview = self.get(&["overview"]).await?;
        overview["rabbitmq_version"].as_str().map(str::to_owned)
    }
}

/// Logs the broker's version when the management API is configured and
/// answers; says why not otherwise. The services work the same on RabbitMQ
/// 3.10 to 4.x: the version is only logged.
pub async fn log_broker_version(broker: &Broker) {
    let Some(management) = Management::from_settings(broker) else {
        tracing::info!(
            "RabbitMQ version not read: RABBITMQ_MANAGEMENT_URL is not set (queues are declared the same on 3.10 to 4.x)"
        );
        return;
    };
    match management.broker_version().await {
        Some(version) => tracing::info!(rabbitmq_version = %version, "RabbitMQ version"),
        None => tracing::info!(
            management_api = %management.url(),
            "RabbitMQ version unknown: the management API did not answer (queues are declared the same on 3.10 to 4.x)"
        ),
    }
}

/// The worker's headers: their names, and how a message's are read.
pub mod headers {
    pub use penora_domain::messages::headers::*;

    use lapin::{BasicProperties, types::AMQPValue};

    /// Header `name` of a message as text (long or short string).
    pub fn text(props: &BasicProperties, name: &str) -> Option<String> {
        match props.headers().as_ref()?.inner().get(name)? {
            AMQPValue::LongString(s) => Some(s.to_string()),
            AMQPValue::ShortString(s) => Some(s.to_string()),
            _ => None,
        }
    }

    /// Header `name` of a message as an integer, whatever width the
    /// publisher chose.
    pub fn int(props: &BasicProperties, name: &str) -> Option<i64> {
        match *props.headers().as_ref()?.inner().get(name)? {
            AMQPValue::LongUInt(n) => Some(i64::from(n)),
            AMQPValue::LongInt(n) => Some(i64::from(n)),
            AMQPValue::LongLongInt(n) => Some(n),
            AMQPValue::ShortUInt(n) => Some(i64::from(n)),
            AMQPValue::ShortInt(n) => Some(i64::from(n)),
            AMQPValue::ShortShortUInt(n) => Some(i64::from(n)),
            AMQPValue::ShortShortInt(n) => Some(i64::from(n)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract_and_take_the_prefix() {
        let t = Topology {
            prefix: String::new(),
            queue_type: QueueType::Quorum,
            retry_levels: 2,
            events_max_length: 1000,
        };
        assert_eq!(t.exchange("penora.jobs"), "penora.jobs");
        assert_eq!(t.dead_queue(SAVE_PROJECT), "penora.save-project.dead");
        assert_eq!(
            t.retry_queue(LEDGER_AUDIT, 2),
            "penora.ledger-audit.retry.2"
        );
        assert_eq!(t.all_queues().len(), 5 * 4);
        let p = Topology {
            prefix: "t1_".into(),
            ..t
        };
        assert_eq!(p.queue(GENERATION_EVENTS), "t1_penora.generation-events");
        assert_eq!(p.exchange(""), "");
    }
}
