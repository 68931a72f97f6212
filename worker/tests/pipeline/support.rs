//! A whole stack per test: its own database, its own queue and exchange
//! prefix on the real RabbitMQ, the API on port 0, and the worker in-process
//! (or as a real process). The worker is driven to a state, not slept on:
//! `wait_for` polls a condition until it holds, with a deadline.

use std::{future::Future, path::PathBuf, time::Duration};

use deadpool_postgres::Pool;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use penora_platform::broker::{self, Outgoing, Publisher, Topology};
use penora_testing::TestDb;
use penora_testing::TestSettings;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// The bootstrap key of every test API.
pub const BOOT_KEY: &str = "pipeline-bootstrap-key-0123456789abcdef";
/// A 1×1 PNG, base64.
pub const PNG_1X1: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";

/// Where the tests find RabbitMQ.
pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The management API of the test broker (`TEST_RABBITMQ_MANAGEMENT_URL`,
/// default `http://127.0.0.1:15672`, which `scripts/services.sh` enables).
pub fn management_url() -> String {
    std::env::var("TEST_RABBITMQ_MANAGEMENT_URL")
        .unwrap_or_else(|_| "http://127.0.0.1:15672".into())
}

/// A test stack.
pub struct Stack {
    /// The API's base URL.
    pub base: String,
    /// Pool on the test database.
    pub pool: Pool,
    /// HTTP client.
    pub http: reqwest::Client,
    /// The settings the worker runs with.
    pub settings: TestSettings,
    /// Queue names of this test.
    pub topology: Topology,
    worker_stop: Option<CancellationToken>,
    worker_done: Option<tokio::task::JoinHandle<()>>,
    /// Where the in-process worker serves `/metrics`.
    pub worker_metrics: Option<String>,
    /// Keeps the database (dropped last).
    pub db: TestDb,
}

/// Starts a database, declares this test's topology and starts the API
/// (with `api_overrides` on top of the shared settings). The worker is not
/// started: call [`Stack::start_worker`].
pub async fn stack(overrides: &[(&str, &str)], api_overrides: &[(&str, &str)]) -> Stack {
    let db = TestDb::new().await;
    let prefix = format!("t{}_", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let amqp = amqp_url();
    let mut vars: Vec<(&str, &str)> = vec![
        ("PENORA_API_KEY", BOOT_KEY),
        ("AMQP_URL", &amqp),
        ("AMQP_PREFIX", &prefix),
        ("WORKER_METRICS_ADDR", "127.0.0.1:0"),
        ("RETRY_BASE_MS", "100"),
        ("RETRY_MAX_MS", "400"),
        ("RETRY_MAX_ATTEMPTS", "4"),
        ("SHUTDOWN_DEADLINE_SECS", "5"),
        ("SETTLE_INTERVAL_SECS", "1"),
        ("RATE_LIMIT_PER_SEC", "100000"),
        ("RATE_LIMIT_BURST", "100000"),
        ("LOG_FORMAT", "pretty"),
        // The audit backpressure off: tests that queue movements while the
        // worker is away would otherwise be refused `busy` once a loaded
        // machine makes them take longer than the lag limit (seen in CI).
        // backpressure.rs turns it on to test it.
        ("AUDIT_LAG_LIMIT_MS", "0"),
    ];
    vars.extend_from_slice(overrides);
    let settings = db.settings(&vars);
    let topology = Topology::from_settings(&settings.broker);
    let connection = broker::connect(&amqp, "penora-tests").await.unwrap_or_else(|e| {
        panic!("RabbitMQ is not reachable at {amqp} ({e}). Start it with `scripts/services.sh` (or set TEST_AMQP_URL).")
    });
    topology
        .declare(&connection)
        .await
        .expect("topology declared");
    let _ = connection.close(200, "bye".into()).await;

    let mut api_vars = vars.clone();
    api_vars.extend_from_slice(api_overrides);
    let app = penora_api::build(db.settings(&api_vars).api())
        .await
        .expect("API builds");
    let base = format!("http://{}", app.addr);
    tokio::spawn(app.run_until_stopped(std::future::pending(), std::time::Duration::from_secs(5)));
    Stack {
        base,
        pool: penora_store::pool_for(&db.url, 4).expect("pool"),
        http: reqwest::Client::new(),
        settings,
        topology,
        worker_stop: None,
        worker_done: None,
        worker_metrics: None,
        db,
    }
}

impl Stack {
    /// Starts the worker in this process.
    pub async fn start_worker(&mut self) {
        self.start_worker_resolving(std::sync::Arc::new(
            penora_platform::webhooks::client::SystemResolver,
        ))
        .await;
    }

    /// Starts the worker in this process, resolving webhook endpoints' names
    /// through `resolver`.
    pub async fn start_worker_resolving(
        &mut self,
        resolver: std::sync::Arc<dyn penora_platform::webhooks::client::Resolve>,
    ) {
        let worker = penora_worker::build_with_resolver(self.settings.worker(), resolver)
            .await
            .expect("worker builds");
        self.worker_metrics = Some(format!("http://{}/metrics", worker.metrics_addr));
        let stop = CancellationToken::new();
        let run = worker.run(stop.clone(), self.settings.worker.shutdown_deadline);
        self.worker_done = Some(tokio::spawn(async move {
            run.await.expect("worker ran");
        }));
        self.worker_stop = Some(stop);
    }

    /// Stops the in-process worker and waits for it.
    pub async fn stop_worker(&mut self) {
        if let Some(stop) = self.worker_stop.take() {
            stop.cancel();
        }
        if let Some(done) = self.worker_done.take() {
            tokio::time::timeout(Duration::from_secs(30), done)
                .await
                .expect("the worker stops within its deadline")
                .expect("worker task");
        }
    }

    /// The environment to run `penora-worker` or `penora-ops` as a process.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("DATABASE_URL".into(), self.db.url.clone()),
            ("AMQP_URL".into(), amqp_url()),
            ("AMQP_PREFIX".into(), self.settings.broker.prefix.clone()),
            ("WORKER_METRICS_ADDR".into(), "127.0.0.1:0".into()),
            ("RETRY_BASE_MS".into(), "100".into()),
            ("RETRY_MAX_MS".into(), "400".into()),
            ("RETRY_MAX_ATTEMPTS".into(), "4".into()),
            ("LOG_FORMAT".into(), "json".into()),
            // wait-idle sees unacknowledged messages through it.
            ("RABBITMQ_MANAGEMENT_URL".into(), management_url()),
            // The API's key, so a worker process opens the secrets it sealed.
            (
                "WEBHOOK_SECRET_KEY".into(),
                self.settings
                    .webhooks
                    .secret_key
                    .as_ref()
                    .map(|k| k.expose().to_owned())
                    .unwrap_or_default(),
            ),
            (
                "WEBHOOK_ALLOW_PRIVATE".into(),
                self.settings.webhooks.allow_private.to_string(),
            ),
        ]
    }

    /// Runs `penora-ops` with this stack's environment.
    pub async fn ops(&self, args: &[&str]) -> std::process::Output {
        tokio::process::Command::new(sibling_binary("penora-ops"))
            .args(args)
            .envs(self.env())
            .output()
            .await
            .expect("penora-ops runs")
    }

    /// `POST path` with the bootstrap key.
    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .header("X-API-Key", BOOT_KEY)
            .json(body)
            .send()
            .await
            .expect("request sent")
    }

    /// Grants credits through the API.
    pub async fn grant(&self, user: &str, amount: i64) {
        let r = self
            .post(
                "/api/unified/add-credits",
                &json!({"user_id": user, "amount": amount, "reason": "test", "reference": uuid::Uuid::new_v4().to_string()}),
            )
            .await;
        assert!(
            r.status().is_success(),
            "grant: {}",
            r.text().await.unwrap_or_default()
        );
    }

    /// Deducts through the API; asserts it succeeded.
    pub async fn deduct(&self, user: &str, amount: i64, code: &str) -> Value {
        let r = self
            .post(
                "/api/unified/deduct-credits",
                &json!({"user_id": user, "amount": amount, "app_name": "imagegene", "project_code": code}),
            )
            .await;
        let status = r.status();
        let body = r.text().await.unwrap_or_default();
        assert!(status.is_success(), "deduct: {status} {body}");
        serde_json::from_str(&body).expect("json")
    }

    /// Publishes a generation event as ImageGene does.
    pub async fn publish_event(&self, kind: &str, body: &str) {
        let publisher = Publisher::new(
            penora_config::Secret::new(amqp_url()),
            "imagegene-test",
            self.topology.clone(),
        );
        publisher
            .publish_all(vec![Outgoing {
                exchange: self.topology.exchange("imagegene.events"),
                routing_key: format!("generation.{kind}"),
                payload: body.as_bytes().to_vec(),
                properties: lapin::BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_message_id(uuid::Uuid::new_v4().to_string().into()),
            }])
            .await
            .expect("event published");
    }

    /// One number from SQL with `$1 = user`.
    pub async fn scalar(&self, sql: &str, user: &str) -> i64 {
        let client = self.pool.get().await.expect("db");
        client
            .query_one(sql, &[&user])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }

    /// Depth and consumers of every queue of this test.
    pub async fn queue_stats(&self) -> Vec<broker::QueueStat> {
        let connection = broker::connect(&amqp_url(), "penora-tests")
            .await
            .expect("broker");
        let ch = connection.create_channel().await.expect("channel");
        let stats = broker::queue_stats(&ch, &self.topology)
            .await
            .expect("stats");
        let _ = connection.close(200, "bye".into()).await;
        stats
    }

    /// Depth of a queue (ready messages).
    pub async fn depth(&self, queue: &str) -> u32 {
        self.queue_stats()
            .await
            .into_iter()
            .find(|s| s.name == queue)
            .map_or(0, |s| s.messages)
    }

    /// Waits until the outbox is empty (but for rows set aside) and no work
    /// or retry queue holds a message.
    pub async fn wait_idle(&self) {
        // Idle on two looks 200 ms apart: one look reads the outbox and the
        // queues one after the other, and a handler can commit a new job
        // between the two reads and acknowledge its message before the second.
        let idle_since = std::cell::Cell::new(None::<tokio::time::Instant>);
        let idle_since = &idle_since;
        wait_for(
            "outbox and queues drained",
            Duration::from_secs(30),
            || async move {
                let pending = self
                    .scalar(
                        "SELECT count(*) FROM outbox \
                         WHERE published_at IS NULL AND set_aside_at IS NULL AND $1 = $1",
                        "",
                    )
                    .await;
                let idle = pending == 0
                    && self
                        .queue_stats()
                        .await
                        .iter()
                        .filter(|s| !s.name.ends_with(".dead"))
                        .all(|s| s.messages == 0);
                if !idle {
                    idle_since.set(None);
                    return false;
                }
                let since = idle_since.get().unwrap_or_else(tokio::time::Instant::now);
                idle_since.set(Some(since));
                since.elapsed() >= Duration::from_millis(200)
            },
        )
        .await;
    }

    /// Waits until `user`'s first ledger entry is audited, then holds the
    /// lock on the user's audit checkpoint in an open transaction on the
    /// returned connection: audit jobs for that user fail with a lock timeout
    /// (a real passing error) until `ROLLBACK` is sent on it.
    pub async fn hold_audit_chain(&self, user: &str) -> deadpool_postgres::Object {
        wait_for("first entry audited", Duration::from_secs(10), || async {
            self.scalar(
                "SELECT coalesce(max(seq), 0) FROM audit_checkpoints WHERE user_id = $1",
                user,
            )
            .await
                == 1
        })
        .await;
        let holder = self.pool.get().await.expect("db");
        holder.batch_execute("BEGIN").await.expect("begin");
        holder
            .execute(
                "SELECT 1 FROM audit_checkpoints WHERE user_id = $1 FOR UPDATE",
                &[&user],
            )
            .await
            .expect("locked");
        holder
    }

    /// The worker's metric `name{labels}` (0 when absent).
    pub async fn worker_metric(&self, series: &str) -> f64 {
        let url = self.worker_metrics.clone().expect("worker started");
        self.metric(&url, series).await
    }

    /// The API's metric `name{labels}` (0 when absent).
    pub async fn api_metric(&self, series: &str) -> f64 {
        self.metric(&format!("{}/metrics", self.base), series).await
    }

    /// The metric `name{labels}` served at `url` (0 when absent).
    async fn metric(&self, url: &str, series: &str) -> f64 {
        let text = self
            .http
            .get(url)
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }
}

/// Polls `condition` every 20 ms until it holds; panics naming `what` after `limit`.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if condition().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A binary of the workspace next to `penora-worker` (built by `cargo build --workspace`).
pub fn sibling_binary(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_penora-worker")).with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (`cargo build --workspace`)",
        path.display()
    );
    path
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(stop) = &self.worker_stop {
            stop.cancel();
        }
        let topology = self.topology.clone();
        // Delete this test's queues and exchanges (on a thread: Drop runs inside the runtime).
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(connection) = broker::connect(&amqp_url(), "penora-tests-cleanup").await
                else {
                    return;
                };
                if let Ok(ch) = connection.create_channel().await {
                    for q in topology.all_queues() {
                        let _ = ch
                            .queue_delete(q.into(), QueueDeleteOptions::default())
                            .await;
                    }
                    for x in topology.all_exchanges() {
                        let _ = ch
                            .exchange_delete(x.into(), ExchangeDeleteOptions::default())
                            .await;
                    }
                }
                let _ = connection.close(200, "bye".into()).await;
            });
        })
        .join();
    }
}

/// A TCP proxy in front of RabbitMQ that a test can cut (every connection
/// through it is dropped and new ones are refused) and restore: the broker
/// "goes away" for one client without touching the shared broker.
pub struct Proxy {
    /// The AMQP URL through the proxy.
    pub url: String,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cuts: tokio::sync::watch::Sender<u64>,
}

impl Proxy {
    /// Starts a proxy to the test broker (`TEST_AMQP_URL`'s port on
    /// 127.0.0.1, 5672 by default).
    pub async fn start() -> Self {
        let broker_port = amqp_url()
            .parse::<lapin::uri::AMQPUri>()
            .map_or(5672, |u| u.authority.port);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy binds");
        let port = listener.local_addr().expect("addr").port();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (cuts, _) = tokio::sync::watch::channel(0u64);
        let (open2, cuts2) = (open.clone(), cuts.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !open2.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: connection refused in effect
                }
                let mut cut = cuts2.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", broker_port)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {},
                        _ = cut.changed() => {},
                    }
                });
            }
        });
        Self {
            url: format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
            open,
            cuts,
        }
    }

    /// Drops every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A `penora-worker` process with its log lines captured.
pub struct WorkerProcess {
    child: tokio::process::Child,
    /// Its `/metrics` URL.
    pub metrics_url: String,
    /// Every line it wrote to stdout so far.
    pub lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Stack {
    /// Starts `penora-worker` as a process (JSON logs at info level).
    pub async fn spawn_worker_process(&self) -> WorkerProcess {
        let mut child = tokio::process::Command::new(sibling_binary("penora-worker"))
            .envs(self.env())
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("penora-worker starts");
        let stdout = child.stdout.take().expect("stdout");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sink = lines.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut reader = tokio::io::BufReader::new(stdout).lines();
            let mut tx = Some(tx);
            while let Ok(Some(line)) = reader.next_line().await {
                if let Some(rest) = line.strip_prefix("penora-worker metrics on ")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(format!("{}/metrics", rest.trim()));
                }
                if let Ok(mut all) = sink.lock() {
                    all.push(line);
                }
            }
        });
        let metrics_url = tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .expect("the worker prints its metrics address")
            .expect("address");
        WorkerProcess {
            child,
            metrics_url,
            lines,
        }
    }
}

impl WorkerProcess {
    /// Stops it with SIGTERM-free kill (tests only).
    pub async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// Whether a log line contains every one of `needles`.
    pub fn logged(&self, needles: &[&str]) -> bool {
        self.lines
            .lock()
            .map(|all| all.iter().any(|l| needles.iter().all(|n| l.contains(n))))
            .unwrap_or(false)
    }
}

/// Prometheus text, parsed: `name{labels}` → value. Panics on a line that is
/// not valid exposition format.
pub fn parse_prometheus(text: &str) -> std::collections::HashMap<String, f64> {
    let mut samples = std::collections::HashMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment line: {line}");
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                && !name.starts_with(|c: char| c.is_ascii_digit()),
            "bad metric name in: {line}"
        );
        if name_end < series.len() {
            let labels = &series[name_end..];
            assert!(labels.ends_with('}'), "unclosed labels: {line}");
            for pair in labels[1..labels.len() - 1]
                .split("\",")
                .filter(|p| !p.is_empty())
            {
                let (k, v) = pair
                    .split_once('=')
                    .unwrap_or_else(|| panic!("bad label in: {line}"));
                assert!(
                    k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "bad label name in: {line}"
                );
                assert!(v.starts_with('"'), "unquoted label value in: {line}");
            }
        }
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in: {line}")),
        };
        samples.insert(series.to_owned(), value);
    }
    samples
}
