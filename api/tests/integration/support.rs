//! Test support: an API on port 0 over a database of its own.

use std::collections::BTreeSet;

use deadpool_postgres::Pool;
use penora_platform::keys::{self, KeyApp, Scope};
use penora_testing::TestDb;
use reqwest::{Response, StatusCode};
use serde_json::{Value, json};

/// The bootstrap key every test app accepts.
pub const BOOT_KEY: &str = "test-bootstrap-key-0123456789abcdef-0123";

/// A 1×1 PNG, base64.
pub const PNG_1X1: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";

/// Base64 of `n` bytes.
pub fn base64_of(n: usize) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(vec![0x42u8; n])
}

/// A running API and its database.
pub struct TestApp {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// Pool on the test database, for checks behind the API's back.
    pub pool: Pool,
    /// HTTP client.
    pub http: reqwest::Client,
    /// Keeps the database alive; dropped last.
    pub db: TestDb,
}

/// Starts an API with default test settings.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// Starts an API with `overrides` (environment variable names as keys).
pub async fn spawn_app_with(overrides: &[(&str, &str)]) -> TestApp {
    let (app, built) = build_app(overrides).await;
    tokio::spawn(
        built.run_until_stopped(std::future::pending(), std::time::Duration::from_secs(5)),
    );
    app
}

/// An API that stops when told: its shutdown is the returned sender, and
/// the returned handle ends when `run_until_stopped` returns, with how long
/// it took from the stop (the stop is sent by [`Stoppable::stop`]).
pub struct Stoppable {
    /// The API and its database.
    pub app: TestApp,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    stopped_at: std::sync::Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    run: tokio::task::JoinHandle<std::time::Duration>,
}

impl Stoppable {
    /// Starts an API with `overrides` and a shutdown `deadline`.
    pub async fn start(overrides: &[(&str, &str)], deadline: std::time::Duration) -> Self {
        let (app, built) = build_app(overrides).await;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let stopped_at = std::sync::Arc::new(std::sync::Mutex::new(None));
        let seen = stopped_at.clone();
        let run = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            built
                .run_until_stopped(shutdown, deadline)
                .await
                .expect("the API ran");
            let at = seen.lock().ok().and_then(|at| *at);
            at.map_or_else(std::time::Duration::default, |at: std::time::Instant| {
                at.elapsed()
            })
        });
        Self {
            app,
            stop: Some(stop),
            stopped_at,
            run,
        }
    }

    /// Tells the API to stop (as SIGTERM does).
    pub fn stop(&mut self) {
        if let Ok(mut at) = self.stopped_at.lock() {
            *at = Some(std::time::Instant::now());
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Waits (at most `limit`) for `run_until_stopped` to return; how long
    /// it took from [`Stoppable::stop`].
    pub async fn stopped(&mut self, limit: std::time::Duration) -> std::time::Duration {
        tokio::time::timeout(limit, &mut self.run)
            .await
            .expect("run_until_stopped returned")
            .expect("the run task")
    }
}

/// A test database and an API built on it (not yet running).
async fn build_app(overrides: &[(&str, &str)]) -> (TestApp, penora_api::App) {
    let db = TestDb::new().await;
    let mut vars = vec![
        ("PENORA_API_KEY", BOOT_KEY),
        ("RATE_LIMIT_PER_SEC", "100000"),
        ("RATE_LIMIT_BURST", "100000"),
    ];
    vars.extend_from_slice(overrides);
    let settings = db.settings(&vars);
    let built = penora_api::build(settings.api())
        .await
        .expect("the API builds");
    let base = format!("http://{}", built.addr);
    let pool = penora_store::pool_for(&db.url, 4).expect("test pool");
    let app = TestApp {
        base,
        pool,
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("http client"),
        db,
    };
    (app, built)
}

impl TestApp {
    /// `GET path` with the bootstrap key.
    pub async fn get(&self, path: &str) -> Response {
        self.get_with_key(path, BOOT_KEY).await
    }

    /// `GET path` with `key` in `X-API-Key`.
    pub async fn get_with_key(&self, path: &str, key: &str) -> Response {
        self.http
            .get(format!("{}{path}", self.base))
            .header("X-API-Key", key)
            .send()
            .await
            .expect("request sent")
    }

    /// `POST path` with a JSON body and the bootstrap key.
    pub async fn post(&self, path: &str, body: &Value) -> Response {
        self.post_with_key(path, body, BOOT_KEY).await
    }

    /// `POST path` with a JSON body and `key`.
    pub async fn post_with_key(&self, path: &str, body: &Value, key: &str) -> Response {
        self.http
            .post(format!("{}{path}", self.base))
            .header("X-API-Key", key)
            .json(body)
            .send()
            .await
            .expect("request sent")
    }

    /// Grants `amount` credits to `user` through the API.
    pub async fn grant(&self, user: &str, amount: i64) {
        let reference = format!("grant-{}", uuid::Uuid::new_v4());
        let r = self
            .post(
                "/api/unified/add-credits",
                &json!({"user_id": user, "amount": amount, "reason": "test", "reference": reference}),
            )
            .await;
        assert_eq!(
            r.status(),
            StatusCode::OK,
            "grant failed: {}",
            r.text().await.unwrap_or_default()
        );
    }

    /// Deducts through the API; returns status and body.
    pub async fn deduct(&self, user: &str, amount: i64, project_code: &str) -> (StatusCode, Value) {
        let r = self
            .post(
                "/api/unified/deduct-credits",
                &json!({"user_id": user, "amount": amount, "app_name": "imagegene", "project_code": project_code}),
            )
            .await;
        let status = r.status();
        (status, r.json().await.expect("JSON body"))
    }

    /// Saves a project whose content is `url` and marks it `saved`, as the
    /// worker would; returns its id.
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
        let client = self.pool.get().await.expect("db");
        client
            .execute(
                "UPDATE projects SET status = 'saved' WHERE id = $1::text::uuid",
                &[&id],
            )
            .await
            .expect("saved");
        id
    }

    /// Creates a key bound to `app` with `scopes` directly in the database.
    pub async fn key(&self, app: &str, scopes: &[Scope]) -> String {
        let client = self.pool.get().await.expect("db");
        let scopes: BTreeSet<Scope> = scopes.iter().copied().collect();
        let key = keys::create(&client, "test", &KeyApp::parse(app).expect("app"), &scopes)
            .await
            .expect("key created");
        key.secret.expose().to_owned()
    }

    /// One number from SQL.
    pub async fn scalar(&self, sql: &str, user: &str) -> i64 {
        let client = self.pool.get().await.expect("db");
        client
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

    /// Sum of the user's ledger.
    pub async fn ledger_sum(&self, user: &str) -> i64 {
        self.scalar(
            "SELECT coalesce(sum(amount), 0)::bigint FROM ledger_entries WHERE user_id = $1",
            user,
        )
        .await
    }

    /// Number of the user's ledger rows.
    pub async fn ledger_rows(&self, user: &str) -> i64 {
        self.scalar(
            "SELECT count(*) FROM ledger_entries WHERE user_id = $1",
            user,
        )
        .await
    }

    /// The user's outbox rows on the jobs exchange (events out left aside).
    pub async fn job_rows(&self, user: &str) -> i64 {
        self.scalar(
            "SELECT count(*) FROM outbox WHERE user_id = $1 AND exchange = 'penora.jobs'",
            user,
        )
        .await
    }

    /// Outbox rows (jobs and events out) written for `user`.
    pub async fn outbox_rows(&self, user: &str) -> i64 {
        self.scalar("SELECT count(*) FROM outbox WHERE user_id = $1", user)
            .await
    }

    /// Runs `penora-ops reconcile`'s checks and asserts there is no violation.
    pub async fn assert_reconciled(&self) {
        let mut client = self.pool.get().await.expect("db");
        let report = penora_ledger::reconcile::run(&mut client, 1_048_576)
            .await
            .expect("reconcile runs");
        assert!(
            report.violations.is_empty(),
            "invariants broken: {:#?}",
            report.violations
        );
    }
}

/// Asserts an error answer: status, `success:false`, `code`, and returns `error`.
pub async fn expect_error(r: Response, status: StatusCode, code: &str) -> String {
    let got = r.status();
    let body: Value = r.json().await.expect("error body is JSON");
    assert_eq!(got, status, "unexpected status; body {body}");
    assert_eq!(body["success"], json!(false), "{body}");
    assert_eq!(body["code"], json!(code), "{body}");
    body["error"]
        .as_str()
        .expect("error is a string")
        .to_owned()
}

impl TestApp {
    /// `DELETE path` with the bootstrap key.
    pub async fn delete(&self, path: &str) -> Response {
        self.delete_with_key(path, BOOT_KEY).await
    }

    /// `DELETE path` with `key`.
    pub async fn delete_with_key(&self, path: &str, key: &str) -> Response {
        self.http
            .delete(format!("{}{path}", self.base))
            .header("X-API-Key", key)
            .send()
            .await
            .expect("request sent")
    }
}

/// The real `penora-api` binary over a test database, for what only a
/// process of its own can show (its memory).
pub struct ApiProcess {
    /// The database (and an in-process API on it, for helpers like `grant`).
    pub app: TestApp,
    /// The process's base URL.
    pub base: String,
    /// HTTP client.
    pub http: reqwest::Client,
    child: tokio::process::Child,
}

impl ApiProcess {
    /// Starts `penora-api` with the test settings and `env`.
    pub async fn start(env: &[(&str, &str)]) -> Self {
        use tokio::io::AsyncBufReadExt;
        let app = spawn_app().await;
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_penora-api"));
        command
            .env("DATABASE_URL", &app.db.url)
            .env("PENORA_API_KEY", BOOT_KEY)
            .env("BIND_ADDR", "127.0.0.1:0")
            .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")
            .env("RATE_LIMIT_PER_SEC", "100000")
            .env("RATE_LIMIT_BURST", "100000")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("penora-api starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let base = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(url) = line.strip_prefix("penora-api listening on ") {
                    return url.trim().to_owned();
                }
            }
            panic!("penora-api exited before listening")
        })
        .await
        .expect("penora-api prints its URL");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            app,
            base,
            http: reqwest::Client::new(),
            child,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// Sends SIGTERM (what Docker, Kubernetes and systemd send) and waits
    /// at most `limit` for the process to exit: its status, and how long it
    /// took from the signal.
    pub async fn terminate(
        &mut self,
        limit: std::time::Duration,
    ) -> (std::process::ExitStatus, std::time::Duration) {
        // kill(1): a signal without a dependency (nix's `signal` feature in
        // the tests would build every crate above penora-platform twice).
        let sent = std::time::Instant::now();
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(killed.success(), "SIGTERM sent");
        let status = tokio::time::timeout(limit, self.child.wait())
            .await
            .expect("penora-api exits after SIGTERM")
            .expect("exit status");
        (status, sent.elapsed())
    }

    fn status_kb(&self, field: &str) -> u64 {
        let pid = self.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("field present")
    }

    /// Resident memory now, kB.
    pub fn rss_kb(&self) -> u64 {
        self.status_kb("VmRSS:")
    }

    /// Peak resident memory since start, kB.
    pub fn peak_rss_kb(&self) -> u64 {
        self.status_kb("VmHWM:")
    }
}
