//! A stack per test for the operator CLI: a database of its own (cloned from
//! the migrated template), a queue and exchange prefix of its own on the
//! real RabbitMQ, the API in-process on port 0, the worker in-process when a
//! test starts it, and the real `penora-ops` binary run against them with
//! the environment an operator would give it. State is reached by polling
//! (`wait_for`), never by sleeping.

use std::{future::Future, path::Path, process::Output, time::Duration};

use deadpool_postgres::Pool;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use penora_platform::broker::{self, Outgoing, Publisher, Topology};
use penora_testing::TestDb;
use penora_testing::TestSettings;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// The bootstrap key of every test API.
pub const BOOT_KEY: &str = "ops-bootstrap-key-0123456789abcdef-0123";

/// The `penora-ops` binary this crate builds.
pub fn ops_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_penora-ops"))
}

/// Where the tests find RabbitMQ (`TEST_AMQP_URL`).
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

/// `penora-ops args` with only `DATABASE_URL` set (and no broker): for the
/// commands that need the database alone.
pub async fn ops_on(db_url: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(ops_binary())
        .args(args)
        .env("DATABASE_URL", db_url)
        .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")
        .env_remove("AUDIT_HMAC_KEY")
        .env_remove("AMQP_PREFIX")
        .output()
        .await
        .expect("penora-ops runs")
}

/// What a command printed on stdout.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// What a command printed on stderr.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A test stack.
pub struct Stack {
    /// The API's base URL.
    pub base: String,
    /// Pool on the test database, for checks behind the services' backs.
    pub pool: Pool,
    /// HTTP client.
    pub http: reqwest::Client,
    /// The settings the services run with.
    pub settings: TestSettings,
    /// Queue names of this test.
    pub topology: Topology,
    /// The services' environment, which `penora-ops` is given too.
    vars: Vec<(String, String)>,
    worker_stop: Option<CancellationToken>,
    worker_done: Option<tokio::task::JoinHandle<()>>,
    /// Keeps the database (dropped last).
    pub db: TestDb,
}

/// Starts a database, declares this test's topology and starts the API on
/// it. The worker is not started: call [`Stack::start_worker`].
pub async fn stack() -> Stack {
    let db = TestDb::new().await;
    let prefix = format!("t{}_", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let amqp = amqp_url();
    let vars: Vec<(&str, &str)> = vec![
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
    ];
    let settings = db.settings(&vars);
    let topology = Topology::from_settings(&settings.broker);
    let connection = broker::connect(&amqp, "penora-ops-tests").await.unwrap_or_else(|e| {
        panic!("RabbitMQ is not reachable at {amqp} ({e}). Start it with `scripts/services.sh` (or set TEST_AMQP_URL).")
    });
    topology
        .declare(&connection)
        .await
        .expect("topology declared");
    let _ = connection.close(200, "bye".into()).await;
    let api = penora_api::build(settings.api()).await.expect("API builds");
    let base = format!("http://{}", api.addr);
    tokio::spawn(api.run_until_stopped(std::future::pending(), settings.http.shutdown_deadline));
    Stack {
        base,
        pool: penora_store::pool_for(&db.url, 4).expect("pool"),
        http: reqwest::Client::new(),
        settings,
        topology,
        vars: vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        worker_stop: None,
        worker_done: None,
        db,
    }
}

impl Stack {
    /// Starts the worker in this process.
    pub async fn start_worker(&mut self) {
        let worker = penora_worker::build(self.settings.worker())
            .await
            .expect("worker builds");
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

    /// The environment an operator gives `penora-ops` for this stack: the
    /// services' own (the retry queues it lists depend on
    /// `RETRY_MAX_ATTEMPTS`, say), and the management API.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = self.vars.clone();
        env.push(("DATABASE_URL".into(), self.db.url.clone()));
        // wait-idle and queues see unacknowledged messages through it.
        env.push(("RABBITMQ_MANAGEMENT_URL".into(), management_url()));
        env
    }

    /// Runs `penora-ops args` with this stack's environment.
    pub async fn ops(&self, args: &[&str]) -> Output {
        tokio::process::Command::new(ops_binary())
            .args(args)
            .env_remove("AUDIT_HMAC_KEY")
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

    /// `GET path` with `key` in `X-API-Key`.
    pub async fn get_with_key(&self, path: &str, key: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .header("X-API-Key", key)
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
        assert!(r.status().is_success(), "deduct: {}", r.status());
        r.json().await.expect("json")
    }

    /// Saves a project whose content is `url` and marks it saved (as the
    /// worker would); returns its id.
    pub async fn saved_url_project(&self, user: &str, url: &str) -> String {
        let r: Value = self
            .post(
                "/api/unified/save-project",
                &json!({"user_id": user, "app_source": "imagegene", "project_type": "ai_artwork",
                        "title": "t", "content": url}),
            )
            .await
            .json()
            .await
            .expect("json");
        let id = r["project_id"].as_str().expect("id").to_owned();
        self.pool
            .get()
            .await
            .expect("db")
            .execute(
                "UPDATE projects SET status = 'saved' WHERE id = $1::text::uuid",
                &[&id],
            )
            .await
            .expect("saved");
        id
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
        self.pool
            .get()
            .await
            .expect("db")
            .query_one(sql, &[&user])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }

    /// The user's balance straight from the database.
    pub async fn balance(&self, user: &str) -> i64 {
        self.scalar("SELECT balance FROM accounts WHERE user_id = $1", user)
            .await
    }

    /// Ready messages in `queue` (a full name, prefix included).
    pub async fn depth(&self, queue: &str) -> u32 {
        let connection = broker::connect(&amqp_url(), "penora-ops-tests")
            .await
            .expect("broker");
        let ch = connection.create_channel().await.expect("channel");
        let stats = broker::queue_stats(&ch, &self.topology)
            .await
            .expect("stats");
        let _ = connection.close(200, "bye".into()).await;
        stats
            .into_iter()
            .find(|s| s.name == queue)
            .map_or(0, |s| s.messages)
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

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(stop) = &self.worker_stop {
            stop.cancel();
        }
        let topology = self.topology.clone();
        // Delete this test's queues and exchanges (on a thread: Drop runs
        // inside the runtime).
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(connection) = broker::connect(&amqp_url(), "penora-ops-tests-cleanup").await
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

/// An empty database beside `db`'s (no schema): the admin connection, its
/// name and its URL. The caller drops it.
pub async fn bare_database(db: &TestDb, suffix: &str) -> (tokio_postgres::Client, String, String) {
    let admin = penora_testing::admin_url();
    let name = format!("{}_{suffix}", db.name);
    let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
        .await
        .expect("admin");
    tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("created");
    let url = format!(
        "{}/{name}",
        admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b)
    );
    (client, name, url)
}
