//! `penora-chaos`: mixed traffic against Penora Credits while faults are
//! injected on a schedule, then every invariant checked against the database
//! and against the client's own record of what succeeded.
//!
//! Traffic (each client task, back to back): grants, balance reads, and
//! deductions, each deduction then left reserved, refunded over HTTP,
//! refunded by a `generation.failed` event, or settled by a save naming its
//! `project_code`. A request that fails in transport, times out or answers
//! 5xx/429 is sent again unchanged (same `project_code`, same `reference`,
//! same event id), as a real client does, until it gets an answer.
//!
//! Faults, in turn: SIGKILL and restart the API, the same for the worker,
//! close every broker connection of the run's vhost, take the database away
//! (connections refused and every session terminated) for a few seconds,
//! SIGSTOP/SIGCONT the API, then the worker.
//!
//! `scripts/chaos.sh` prepares the database, the vhost and the environment,
//! and calls this; it is not part of the test suite.

use std::{
    collections::{BTreeMap, HashMap},
    fs::OpenOptions,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;
use lapin::BasicProperties;
use penora_common::broker::{Outgoing, Publisher, Topology};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

mod shared;

#[derive(Parser, Debug)]
#[command(
    name = "penora-chaos",
    about = "Faults under load, then every invariant checked"
)]
struct Args {
    /// The penora-api binary.
    #[arg(long)]
    api_bin: String,
    /// The penora-worker binary.
    #[arg(long)]
    worker_bin: String,
    /// The penora-ops binary (wait-idle, reconcile, audit verify).
    #[arg(long)]
    ops_bin: String,
    /// The API's address (BIND_ADDR): fixed, so that it comes back where clients look.
    #[arg(long, env = "BIND_ADDR")]
    bind_addr: String,
    /// Seconds of traffic.
    #[arg(long, default_value_t = 180.0)]
    secs: f64,
    /// Seconds between faults.
    #[arg(long, default_value_t = 8.0)]
    fault_every: f64,
    /// Seconds a database outage or a pause lasts.
    #[arg(long, default_value_t = 3.0)]
    outage_secs: f64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Users the traffic spreads over.
    #[arg(long, default_value_t = 40)]
    users: usize,
    #[command(flatten)]
    services: shared::Services,
    /// The run's RabbitMQ vhost (its connections are the ones cut).
    #[arg(long)]
    vhost: String,
    /// Where the services' logs go.
    #[arg(long)]
    log_dir: String,
}

const PNG_1X1: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";
const SEED_CREDITS: i64 = 200;

/// A service process the controller kills, pauses and restarts.
struct Service {
    name: &'static str,
    bin: String,
    log: String,
    child: Option<Child>,
}

impl Service {
    fn start(&mut self) -> anyhow::Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.bin)
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} ({})", self.name, self.bin))?;
        self.child = Some(child);
        Ok(())
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill(); // SIGKILL
            let _ = child.wait().await;
        }
    }

    fn signal(&self, signal: &str) {
        if let Some(pid) = self.child.as_ref().and_then(Child::id) {
            let _ = std::process::Command::new("kill")
                .args([signal, &pid.to_string()])
                .status();
        }
    }
}

/// What the clients saw and did.
#[derive(Default, Clone)]
struct Record {
    /// Expected balance per user, from the answers the client got.
    expected: HashMap<String, i64>,
    /// project_code → (user, what the client did with the reservation).
    reservations: HashMap<String, (String, FollowUp)>,
    /// Deductions answered 402 (nothing may be reserved under them).
    refused: Vec<String>,
    /// Events published (and confirmed by the broker).
    events: Vec<String>,
    /// Client-visible errors by kind (each retried).
    errors: BTreeMap<String, u64>,
    /// Logical operations by kind.
    operations: BTreeMap<&'static str, u64>,
    /// Answers that break the contract (each is a violation).
    unexpected: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum FollowUp {
    Kept,
    RefundedByHttp,
    RefundedByEvent,
    Saved,
}

impl FollowUp {
    fn expected_state(self) -> &'static str {
        match self {
            Self::Kept => "reserved",
            Self::RefundedByHttp | Self::RefundedByEvent => "refunded",
            Self::Saved => "settled",
        }
    }
}

struct Ctx {
    args: Args,
    http: reqwest::Client,
    base: String,
    record: Mutex<Record>,
    attempts: AtomicU64,
    stop: AtomicBool,
    publisher: Publisher,
    topology: Topology,
    /// Clients give up on a request after this (a violation: its outcome is unknown).
    give_up_at: Instant,
}

impl Ctx {
    fn note_error(&self, kind: String) {
        if let Ok(mut r) = self.record.lock() {
            *r.errors.entry(kind).or_default() += 1;
        }
    }

    fn count(&self, op: &'static str) {
        if let Ok(mut r) = self.record.lock() {
            *r.operations.entry(op).or_default() += 1;
        }
    }

    fn unexpected(&self, what: String) {
        eprintln!("chaos: unexpected: {what}");
        if let Ok(mut r) = self.record.lock() {
            r.unexpected.push(what);
        }
    }

    /// Sends the request until it gets an answer that is not a transport
    /// error, a 5xx or a 429; `None` if it never does before the deadline.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Option<(u16, Value)> {
        let mut delay = Duration::from_millis(50);
        loop {
            self.attempts.fetch_add(1, Ordering::Relaxed);
            let mut request = self
                .http
                .request(method.clone(), format!("{}{path}", self.base))
                .header("X-API-Key", &self.args.services.key);
            if let Some(body) = body {
                request = request.json(body);
            }
            match request.send().await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let body: Value = response.json().await.unwrap_or(Value::Null);
                    if status < 500 && status != 429 {
                        return Some((status, body));
                    }
                    let code = body["code"].as_str().unwrap_or("no_json_code");
                    self.note_error(format!("HTTP {status} {code}"));
                }
                Err(e) => {
                    let kind = if e.is_timeout() {
                        "timeout"
                    } else if e.is_connect() {
                        "connection refused"
                    } else {
                        "connection lost"
                    };
                    self.note_error(kind.into());
                }
            }
            if Instant::now() > self.give_up_at {
                return None;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }

    /// `send`, for an answer among `expected`: any other answer (or none)
    /// breaks the contract and is recorded as such, under `what`.
    async fn expect(
        &self,
        what: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        expected: &[u16],
    ) -> Option<(u16, Value)> {
        match self.send(method, path, body).await {
            Some((status, answer)) if expected.contains(&status) => Some((status, answer)),
            Some((status, answer)) => {
                self.unexpected(format!("{what}: {status} {answer}"));
                None
            }
            None => {
                self.unexpected(format!("{what}: no answer"));
                None
            }
        }
    }

    async fn publish_refund_event(&self, user: &str, code: &str, event_id: &str) -> bool {
        let mut delay = Duration::from_millis(50);
        loop {
            let event = Outgoing {
                exchange: self.topology.exchange("imagegene.events"),
                routing_key: "generation.failed".into(),
                payload: json!({"event_id": event_id, "user_id": user, "project_code": code,
                                "reason": "chaos", "occurred_at": penora_common::timefmt::rfc3339_millis(time::OffsetDateTime::now_utc())})
                .to_string()
                .into_bytes(),
                properties: BasicProperties::default()
                    .with_message_id(event_id.to_owned().into())
                    .with_content_type("application/json".into()),
            };
            match self.publisher.publish_all(vec![event]).await {
                Ok(()) => return true,
                Err(_) => self.note_error("event publish failed".into()),
            }
            if Instant::now() > self.give_up_at {
                return false;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }
}

/// A small, seedable generator (no dependency for this).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

async fn client(ctx: Arc<Ctx>, id: usize) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((id as u64 + 1) * 0x1000_0001));
    let mut n = 0u64;
    while !ctx.stop.load(Ordering::Relaxed) {
        n += 1;
        let user = format!("chaos_{}", rng.below(ctx.args.users as u64));
        let pick = rng.below(100);
        if pick < 10 {
            let amount = 1 + rng.below(20) as i64;
            let reference = format!("g{id}_{n}");
            let body = json!({"user_id": user, "amount": amount, "reason": "chaos", "reference": reference});
            ctx.count("grant");
            let what = format!("grant {reference}");
            let path = "/api/unified/add-credits";
            if ctx
                .expect(&what, reqwest::Method::POST, path, Some(&body), &[200])
                .await
                .is_some()
                && let Ok(mut r) = ctx.record.lock()
            {
                *r.expected.entry(user).or_default() += amount;
            }
        } else if pick < 20 {
            ctx.count("balance read");
            let what = format!("user-info {user}");
            let path = format!("/api/unified/user-info?user_id={user}");
            if let Some((_, body)) = ctx
                .expect(&what, reqwest::Method::GET, &path, None, &[200])
                .await
                && body["credits"].as_i64().is_none_or(|c| c < 0)
            {
                ctx.unexpected(format!("{what}: {body}"));
            }
        } else {
            deduct_and_follow_up(&ctx, &mut rng, id, n, user).await;
        }
    }
}

async fn deduct_and_follow_up(ctx: &Ctx, rng: &mut Rng, id: usize, n: u64, user: String) {
    let amount = 1 + rng.below(5) as i64;
    let code = format!("c{id}_{n}");
    let body =
        json!({"user_id": user, "amount": amount, "app_name": "imagegene", "project_code": code});
    ctx.count("deduct");
    let what = format!("deduct {code}");
    let path = "/api/unified/deduct-credits";
    match ctx
        .expect(&what, reqwest::Method::POST, path, Some(&body), &[200, 402])
        .await
    {
        Some((200, answer)) => {
            if answer["credits_deducted"] != amount {
                ctx.unexpected(format!("deduct {code}: {answer}"));
            }
            if let Ok(mut r) = ctx.record.lock() {
                *r.expected.entry(user.clone()).or_default() -= amount;
            }
        }
        Some((402, _)) => {
            ctx.count("deduct answered 402 (not enough credits)");
            if let Ok(mut r) = ctx.record.lock() {
                r.refused.push(code);
            }
            return;
        }
        _ => return,
    }
    let follow_up = match rng.below(100) {
        0..25 => {
            ctx.count("refund by HTTP");
            let body = json!({"user_id": user, "project_code": code, "app_name": "imagegene", "reason": "chaos"});
            let what = format!("refund {code}");
            let path = "/api/unified/refund-credits";
            if ctx
                .expect(&what, reqwest::Method::POST, path, Some(&body), &[200])
                .await
                .is_none()
            {
                return;
            }
            FollowUp::RefundedByHttp
        }
        25..50 => {
            ctx.count("refund by event");
            let event_id = format!("ev_{code}");
            if !ctx.publish_refund_event(&user, &code, &event_id).await {
                ctx.unexpected(format!("event {event_id}: never confirmed by the broker"));
                return;
            }
            if let Ok(mut r) = ctx.record.lock() {
                r.events.push(event_id);
            }
            FollowUp::RefundedByEvent
        }
        50..70 => {
            ctx.count("save");
            let body = json!({"user_id": user, "app_source": "imagegene", "project_type": "ai_artwork",
                              "title": "chaos", "content": PNG_1X1, "project_code": code});
            let what = format!("save {code}");
            let path = "/api/unified/save-project";
            if ctx
                .expect(&what, reqwest::Method::POST, path, Some(&body), &[200, 202])
                .await
                .is_none()
            {
                return;
            }
            FollowUp::Saved
        }
        _ => FollowUp::Kept,
    };
    if let Ok(mut r) = ctx.record.lock() {
        if matches!(
            follow_up,
            FollowUp::RefundedByHttp | FollowUp::RefundedByEvent
        ) {
            *r.expected.entry(user.clone()).or_default() += amount;
        }
        r.reservations.insert(code, (user, follow_up));
    }
}

const FAULTS: [&str; 6] = [
    "SIGKILL API",
    "SIGKILL worker",
    "broker connections closed",
    "database away",
    "SIGSTOP API",
    "SIGSTOP worker",
];

async fn wait_for_api(ctx: &Ctx) {
    for _ in 0..300 {
        if ctx
            .http
            .get(format!("{}/health", ctx.base))
            .send()
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn database_away(ctx: &Ctx, secs: f64) -> anyhow::Result<()> {
    let (db_base, db) = ctx
        .args
        .services
        .database_url
        .rsplit_once('/')
        .context("DATABASE_URL has no database name")?;
    let (admin, connection) =
        tokio_postgres::connect(&format!("{db_base}/postgres"), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    admin
        .batch_execute(&format!("ALTER DATABASE \"{db}\" ALLOW_CONNECTIONS false"))
        .await?;
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&db],
        )
        .await?;
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    admin
        .batch_execute(&format!("ALTER DATABASE \"{db}\" ALLOW_CONNECTIONS true"))
        .await?;
    Ok(())
}

async fn controller(
    ctx: Arc<Ctx>,
    mut api: Service,
    mut worker: Service,
) -> anyhow::Result<(BTreeMap<&'static str, u64>, Service, Service)> {
    let mut injected: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut i = 0;
    loop {
        let wake = Instant::now() + Duration::from_secs_f64(ctx.args.fault_every);
        while Instant::now() < wake {
            if ctx.stop.load(Ordering::Relaxed) {
                return Ok((injected, api, worker));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let fault = FAULTS[i % FAULTS.len()];
        i += 1;
        eprintln!("chaos: {fault}");
        let pause = Duration::from_secs_f64(ctx.args.outage_secs);
        match fault {
            "SIGKILL API" => {
                api.kill().await;
                tokio::time::sleep(Duration::from_millis(500)).await;
                api.start()?;
                wait_for_api(&ctx).await;
            }
            "SIGKILL worker" => {
                worker.kill().await;
                tokio::time::sleep(Duration::from_millis(500)).await;
                worker.start()?;
            }
            "broker connections closed" => {
                let status = std::process::Command::new("rabbitmqctl")
                    .args([
                        "-q",
                        "close_all_connections",
                        "--vhost",
                        &ctx.args.vhost,
                        "penora-chaos",
                    ])
                    .stdout(std::process::Stdio::null())
                    .status()?;
                anyhow::ensure!(status.success(), "rabbitmqctl close_all_connections failed");
            }
            "database away" => database_away(&ctx, ctx.args.outage_secs).await?,
            "SIGSTOP API" => {
                api.signal("-STOP");
                tokio::time::sleep(pause).await;
                api.signal("-CONT");
            }
            _ => {
                worker.signal("-STOP");
                tokio::time::sleep(pause).await;
                worker.signal("-CONT");
            }
        }
        *injected.entry(fault).or_default() += 1;
    }
}

fn run_ops(ctx: &Ctx, args: &[&str]) -> bool {
    eprintln!("chaos: penora-ops {}", args.join(" "));
    std::process::Command::new(&ctx.args.ops_bin)
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

/// `sql`'s count, with `keys` as `$1`.
async fn count(db: &tokio_postgres::Client, sql: &str, keys: &[String]) -> anyhow::Result<i64> {
    Ok(db.query_one(sql, &[&keys]).await?.get(0))
}

/// Every check after the run; returns the violations.
async fn check(ctx: &Ctx) -> anyhow::Result<Vec<String>> {
    let mut violations = Vec::new();
    if !run_ops(ctx, &["wait-idle", "--timeout-secs", "120"]) {
        violations.push("the pipeline did not drain (wait-idle)".into());
    }
    if !run_ops(ctx, &["reconcile"]) {
        violations.push("penora-ops reconcile found a violation".into());
    }
    if !run_ops(ctx, &["audit", "verify"]) {
        violations.push("penora-ops audit verify found a violation".into());
    }
    let (db, connection) =
        tokio_postgres::connect(&ctx.args.services.database_url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    // A copy: the checks below await, and the record's lock is synchronous.
    let record = ctx
        .record
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    violations.extend(
        record
            .unexpected
            .iter()
            .map(|u| format!("unexpected answer: {u}")),
    );

    // Balances: the database's, the ledger's and the client's agree.
    for row in db
        .query(
            "SELECT a.user_id, a.balance, coalesce(sum(l.amount), 0)::bigint FROM accounts a \
             LEFT JOIN ledger_entries l ON l.user_id = a.user_id GROUP BY a.user_id, a.balance",
            &[],
        )
        .await?
    {
        let (user, balance, ledger): (String, i64, i64) = (row.get(0), row.get(1), row.get(2));
        let client = SEED_CREDITS + record.expected.get(&user).copied().unwrap_or(0);
        if balance != ledger || balance != client {
            violations.push(format!(
                "{user}: balance {balance}, ledger sum {ledger}, client's record {client}"
            ));
        }
    }
    // Every reservation ended as the client left it, charged once, refunded at most once.
    let codes: Vec<String> = record.reservations.keys().cloned().collect();
    let rows = db
        .query(
            "SELECT r.project_code, r.user_id, r.state, \
                    (SELECT count(*) FROM ledger_entries l WHERE l.user_id = r.user_id AND l.project_code = r.project_code AND l.kind = 'deduct'), \
                    (SELECT count(*) FROM ledger_entries l WHERE l.user_id = r.user_id AND l.project_code = r.project_code AND l.kind = 'refund') \
             FROM reservations r WHERE r.app_name = 'imagegene' AND r.project_code = ANY($1)",
            &[&codes],
        )
        .await?;
    if rows.len() != codes.len() {
        violations.push(format!(
            "{} reservations the client was charged for, {} found",
            codes.len(),
            rows.len()
        ));
    }
    for row in rows {
        let (code, user, state, deducts, refunds): (String, String, String, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        let Some((owner, follow_up)) = record.reservations.get(&code) else {
            continue;
        };
        if *owner != user || state != follow_up.expected_state() || deducts != 1 || refunds > 1 {
            violations.push(format!(
                "{code}: {state} (client: {follow_up:?}), {deducts} deductions, {refunds} refunds"
            ));
        }
    }
    let charged_anyway = count(
        &db,
        "SELECT count(*) FROM reservations WHERE app_name = 'imagegene' AND project_code = ANY($1)",
        &record.refused,
    )
    .await?;
    if charged_anyway != 0 {
        violations.push(format!(
            "{charged_anyway} deductions answered 402 left a reservation"
        ));
    }
    // Every event processed exactly once.
    let processed = count(
        &db,
        "SELECT count(*) FROM processed_events WHERE event_id = ANY($1)",
        &record.events,
    )
    .await?;
    if processed != record.events.len() as i64 {
        violations.push(format!(
            "{} events published, {processed} processed",
            record.events.len()
        ));
    }
    // Every accepted save stored.
    let saved_codes: Vec<String> = record
        .reservations
        .iter()
        .filter(|(_, (_, f))| *f == FollowUp::Saved)
        .map(|(c, _)| c.clone())
        .collect();
    let saved = count(
        &db,
        "SELECT count(*) FROM projects WHERE project_code = ANY($1) AND status = 'saved'",
        &saved_codes,
    )
    .await?;
    if saved != saved_codes.len() as i64 {
        violations.push(format!(
            "{} saves accepted, {saved} stored",
            saved_codes.len()
        ));
    }
    // No message lost: the work queues are empty (wait-idle) and nothing was dead-lettered.
    let connection =
        penora_common::broker::connect(&ctx.args.services.amqp_url, "penora-chaos").await?;
    let channel = connection.create_channel().await?;
    let dead: u32 = penora_common::broker::queue_stats(&channel, &ctx.topology)
        .await?
        .iter()
        .filter(|q| q.name.ends_with(".dead"))
        .map(|q| q.messages)
        .sum();
    let _ = connection.close(200, "bye".into()).await;
    if dead != 0 {
        violations.push(format!("{dead} messages dead-lettered"));
    }
    Ok(violations)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings = args.services.settings()?;
    let topology = Topology::from_settings(&settings);
    let mut api = Service {
        name: "penora-api",
        bin: args.api_bin.clone(),
        log: format!("{}/api.log", args.log_dir),
        child: None,
    };
    let mut worker = Service {
        name: "penora-worker",
        bin: args.worker_bin.clone(),
        log: format!("{}/worker.log", args.log_dir),
        child: None,
    };
    api.start()?;
    worker.start()?;
    let secs = args.secs;
    let ctx = Arc::new(Ctx {
        base: format!("http://{}", args.bind_addr),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?,
        record: Mutex::new(Record::default()),
        attempts: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        publisher: Publisher::new(settings.amqp_url.clone(), "penora-chaos", topology.clone()),
        topology,
        give_up_at: Instant::now() + Duration::from_secs_f64(secs + 180.0),
        args,
    });
    wait_for_api(&ctx).await;
    for u in 0..ctx.args.users {
        let body = json!({"user_id": format!("chaos_{u}"), "amount": SEED_CREDITS, "reason": "chaos seed", "reference": format!("seed_{u}")});
        match ctx
            .send(
                reqwest::Method::POST,
                "/api/unified/add-credits",
                Some(&body),
            )
            .await
        {
            Some((200, _)) => {}
            other => anyhow::bail!("seeding chaos_{u}: {other:?}"),
        }
    }
    let started = Instant::now();
    eprintln!(
        "chaos: {} clients, {} users, {secs} s of traffic, a fault every {} s",
        ctx.args.clients, ctx.args.users, ctx.args.fault_every
    );
    let clients: Vec<_> = (0..ctx.args.clients)
        .map(|id| tokio::spawn(client(ctx.clone(), id)))
        .collect();
    let control = tokio::spawn(controller(ctx.clone(), api, worker));
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    ctx.stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }
    let (injected, api, worker) = control.await??;
    let elapsed = started.elapsed().as_secs_f64();
    // Both services running, neither paused, for the checks.
    api.signal("-CONT");
    worker.signal("-CONT");
    let violations = check(&ctx).await?;

    let record = ctx.record.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    println!(
        "\n## Chaos run: {elapsed:.0} s of traffic, {} clients, {} users\n",
        ctx.args.clients, ctx.args.users
    );
    println!("| operations | count |\n|---|---:|");
    for (op, n) in &record.operations {
        println!("| {op} | {n} |");
    }
    println!(
        "| HTTP requests sent (retries included) | {} |",
        ctx.attempts.load(Ordering::Relaxed)
    );
    println!("\n| fault injected | count |\n|---|---:|");
    for (fault, n) in &injected {
        println!("| {fault} | {n} |");
    }
    println!("\n| client-visible error (each retried) | count |\n|---|---:|");
    for (kind, n) in &record.errors {
        println!("| {kind} | {n} |");
    }
    if record.errors.is_empty() {
        println!("| (none) | 0 |");
    }
    println!("\n**Violations: {}**", violations.len());
    for v in &violations {
        println!("- {v}");
    }
    drop(record);
    drop((api, worker));
    if !violations.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
