//! `penora-chaos`: mixed traffic against Penora Credits while faults are
//! injected on a schedule, then every invariant checked against the database
//! and against the client's own record of what succeeded.
//!
//! Traffic (each client task, back to back): grants (half of them
//! promotional lots that expire during the run), balance reads, and
//! deductions, each deduction then left reserved, refunded over HTTP (all of
//! it, or a part with a reference), refunded by a `generation.failed` event
//! (all of it, or a part with `amount`), or settled by a save naming its
//! `project_code`. A request that fails in transport, times out or answers
//! 5xx/429 is sent again unchanged (same `project_code`, same `reference`,
//! same event id), as a real client does, until it gets an answer. A
//! quarter of the users have spend limits the traffic hits
//! ([`crate::chaos_limits`]): `403 spend_limit_exceeded` is a final answer,
//! like `402`.
//!
//! Faults, in turn: SIGKILL and restart the API, the same for the worker,
//! close every broker connection of the run's vhost, take the database away
//! (connections refused and every session terminated) for a few seconds,
//! SIGSTOP/SIGCONT the API, then the worker.
//!
//! With `--cluster-script` (`scripts/cluster.sh chaos`) the services run on
//! a cluster that the script started: requests go to each API in turn (a
//! retry to the next), and the faults are the script's: a RabbitMQ node
//! killed and brought back, an API and a worker killed and restarted, a
//! PostgreSQL failover with the old primary rebuilt as the new standby.
//!
//! `scripts/chaos.sh` prepares the database, the vhost and the environment,
//! and calls this; it is not part of the test suite.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Parser;
use penora_platform::broker::{Publisher, Topology};
use serde_json::{Value, json};

use crate::{
    events,
    faults::{Faults, Recovery, Service, cluster_controller, controller, wait_for_api},
    invariants::check,
    services,
};

#[derive(Parser, Debug)]
#[command(
    name = "penora-chaos",
    about = "Faults under load, then every invariant checked"
)]
pub struct Args {
    /// The penora-api binary (this tool starts and kills it; not with `--cluster-script`).
    #[arg(long, required_unless_present = "cluster_script")]
    pub api_bin: Option<String>,
    /// The penora-worker binary (likewise).
    #[arg(long, required_unless_present = "cluster_script")]
    pub worker_bin: Option<String>,
    /// The services run on a cluster that this script started; the faults
    /// are `SCRIPT fault KIND N` (scripts/cluster.sh).
    #[arg(long)]
    pub cluster_script: Option<String>,
    /// The penora-ops binary (wait-idle, reconcile, audit verify).
    #[arg(long)]
    pub ops_bin: String,
    /// The API's address (BIND_ADDR): fixed, so that it comes back where
    /// clients look. Several, separated by commas, on a cluster: requests go
    /// to each in turn.
    #[arg(long, env = "BIND_ADDR")]
    pub bind_addr: String,
    /// Seconds of traffic.
    #[arg(long, default_value_t = 180.0)]
    pub secs: f64,
    /// Seconds between faults.
    #[arg(long, default_value_t = 8.0)]
    pub fault_every: f64,
    /// Seconds a database outage or a pause lasts.
    #[arg(long, default_value_t = 3.0)]
    pub outage_secs: f64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Users the traffic spreads over.
    #[arg(long, default_value_t = 40)]
    pub users: usize,
    #[command(flatten)]
    pub services: services::Services,
    /// The run's RabbitMQ vhost (its connections are the ones cut; not with `--cluster-script`).
    #[arg(long, required_unless_present = "cluster_script")]
    pub vhost: Option<String>,
    /// Where the services' logs go.
    #[arg(long)]
    pub log_dir: String,
}

pub const PNG_1X1: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";

pub const SEED_CREDITS: i64 = 200;

/// What the clients saw and did.
#[derive(Default, Clone)]
pub struct Record {
    /// Expected balance per user, from the answers the client got.
    pub expected: HashMap<String, i64>,
    /// project_code → (user, what the client did with the reservation, its amount).
    pub reservations: HashMap<String, (String, FollowUp, i64)>,
    /// References of promotional grants answered "expires_at must be in the
    /// future" (a retry that came after the expiry; nothing may be granted
    /// under them).
    pub late_grants: Vec<String>,
    /// Deductions answered 402 or 403 `spend_limit_exceeded` (nothing may
    /// be reserved under them).
    pub refused: Vec<String>,
    /// Deductions answered 403 `spend_limit_exceeded`, by user.
    pub limit_refusals: BTreeMap<String, u64>,
    /// Events published (and confirmed by the broker).
    pub events: Vec<String>,
    /// Client-visible errors by kind (each retried).
    pub errors: BTreeMap<String, u64>,
    /// When each client-visible error happened (for the recovery times).
    pub error_times: Vec<Instant>,
    /// Logical operations by kind.
    pub operations: BTreeMap<&'static str, u64>,
    /// Answers that break the contract (each is a violation).
    pub unexpected: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FollowUp {
    Kept,
    RefundedByHttp,
    RefundedByEvent,
    /// Part of it (the credits given) refunded over HTTP, with a reference.
    PartByHttp(i64),
    /// Part of it refunded by a `generation.failed` event with `amount`.
    PartByEvent(i64),
    Saved,
}

impl FollowUp {
    pub fn expected_state(self) -> &'static str {
        match self {
            Self::Kept => "reserved",
            Self::RefundedByHttp | Self::RefundedByEvent => "refunded",
            Self::PartByHttp(_) | Self::PartByEvent(_) => "partially_refunded",
            Self::Saved => "settled",
        }
    }

    /// Credits refunded, of a reservation of `amount`.
    pub fn refunded(self, amount: i64) -> i64 {
        match self {
            Self::RefundedByHttp | Self::RefundedByEvent => amount,
            Self::PartByHttp(k) | Self::PartByEvent(k) => k,
            Self::Kept | Self::Saved => 0,
        }
    }
}

pub struct Ctx {
    pub args: Args,
    pub http: reqwest::Client,
    /// The APIs' base URLs; each request goes to the next.
    pub bases: Vec<String>,
    pub next_base: std::sync::atomic::AtomicUsize,
    pub record: Mutex<Record>,
    pub attempts: AtomicU64,
    pub stop: AtomicBool,
    pub publisher: Publisher,
    pub topology: Topology,
    /// Clients give up on a request after this (a violation: its outcome is unknown).
    pub give_up_at: Instant,
}

impl Ctx {
    pub fn note_error(&self, kind: String) {
        if let Ok(mut r) = self.record.lock() {
            *r.errors.entry(kind).or_default() += 1;
            r.error_times.push(Instant::now());
        }
    }

    /// The base URL the next request goes to (each API in turn).
    pub fn base(&self) -> &str {
        let i = self.next_base.fetch_add(1, Ordering::Relaxed);
        &self.bases[i % self.bases.len()]
    }

    pub fn count(&self, op: &'static str) {
        if let Ok(mut r) = self.record.lock() {
            *r.operations.entry(op).or_default() += 1;
        }
    }

    pub fn unexpected(&self, what: String) {
        eprintln!("chaos: unexpected: {what}");
        if let Ok(mut r) = self.record.lock() {
            r.unexpected.push(what);
        }
    }

    /// Sends the request until it gets an answer that is not a transport
    /// error, a 5xx or a 429; `None` if it never does before the deadline.
    pub async fn send(
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
                .request(method.clone(), format!("{}{path}", self.base()))
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
    pub async fn expect(
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

    pub async fn publish_refund_event(
        &self,
        user: &str,
        code: &str,
        event_id: &str,
        amount: Option<i64>,
    ) -> bool {
        let mut delay = Duration::from_millis(50);
        loop {
            let now = penora_domain::timefmt::rfc3339_millis(time::OffsetDateTime::now_utc());
            let event = events::failed(&self.topology, event_id, user, code, "chaos", &now, amount);
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
pub struct Rng(u64);

impl Rng {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

pub async fn client(ctx: Arc<Ctx>, id: usize) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((id as u64 + 1) * 0x1000_0001));
    let mut n = 0u64;
    while !ctx.stop.load(Ordering::Relaxed) {
        n += 1;
        let user = format!("chaos_{}", rng.below(ctx.args.users as u64));
        let pick = rng.below(100);
        if pick < 10 {
            let amount = 1 + rng.below(20) as i64;
            let reference = format!("g{id}_{n}");
            let mut body = json!({"user_id": user, "amount": amount, "reason": "chaos", "reference": reference});
            // Half the grants are promotional lots that expire during the run.
            let promotional = rng.below(2) == 0;
            if promotional {
                let at = time::OffsetDateTime::now_utc()
                    + time::Duration::seconds(10 + rng.below(16) as i64);
                body["category"] = json!("promotional");
                body["expires_at"] = json!(penora_domain::timefmt::rfc3339_millis(at));
                // Spent first (deductions and refunds meet it around its
                // expiry) or last (it expires holding credits).
                body["priority"] = json!(if rng.below(2) == 0 { 5 } else { 90 });
            }
            ctx.count(if promotional {
                "grant (promotional, expiring)"
            } else {
                "grant"
            });
            let what = format!("grant {reference}");
            let path = "/api/unified/add-credits";
            match ctx
                .expect(&what, reqwest::Method::POST, path, Some(&body), &[200, 400])
                .await
            {
                Some((200, _)) => {
                    if let Ok(mut r) = ctx.record.lock() {
                        *r.expected.entry(user).or_default() += amount;
                    }
                }
                // A retry that came after the lot's expiry, its first
                // attempt never committed: refused, nothing granted.
                Some((400, answer))
                    if promotional
                        && answer["error"]
                            .as_str()
                            .is_some_and(|e| e.contains("expires_at: must be in the future")) =>
                {
                    ctx.count("grant refused: retried after its expiry");
                    if let Ok(mut r) = ctx.record.lock() {
                        r.late_grants.push(reference);
                    }
                }
                Some((_, answer)) => ctx.unexpected(format!("{what}: {answer}")),
                None => {}
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

pub async fn deduct_and_follow_up(ctx: &Ctx, rng: &mut Rng, id: usize, n: u64, user: String) {
    let amount = 1 + rng.below(5) as i64;
    let code = format!("c{id}_{n}");
    let body =
        json!({"user_id": user, "amount": amount, "app_name": "imagegene", "project_code": code});
    ctx.count("deduct");
    let what = format!("deduct {code}");
    let path = "/api/unified/deduct-credits";
    match ctx
        .expect(
            &what,
            reqwest::Method::POST,
            path,
            Some(&body),
            &[200, 402, 403],
        )
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
        // Refused by a spend limit: final, nothing charged.
        Some((403, answer)) => {
            if let Err(wrong) = crate::chaos_limits::judge_refusal(&user, amount, &answer) {
                ctx.unexpected(format!("deduct {code}: 403 ({wrong}): {answer}"));
                return;
            }
            ctx.count("deduct answered 403 (spend limit)");
            if let Ok(mut r) = ctx.record.lock() {
                r.refused.push(code);
                *r.limit_refusals.entry(user).or_default() += 1;
            }
            return;
        }
        _ => return,
    }
    // A part to refund: 1 up to all but one credit (a reservation of 1
    // credit is refunded whole).
    let part = (amount > 1).then(|| 1 + rng.below(amount as u64 - 1) as i64);
    let follow_up = match rng.below(100) {
        0..25 => {
            let mut body = json!({"user_id": user, "project_code": code, "app_name": "imagegene", "reason": "chaos"});
            let follow_up = match part.filter(|_| rng.below(2) == 0) {
                Some(k) => {
                    ctx.count("partial refund by HTTP");
                    body["amount"] = json!(k);
                    body["reference"] = json!(format!("part_{code}"));
                    FollowUp::PartByHttp(k)
                }
                None => {
                    ctx.count("refund by HTTP");
                    FollowUp::RefundedByHttp
                }
            };
            let what = format!("refund {code}");
            let path = "/api/unified/refund-credits";
            match ctx
                .expect(&what, reqwest::Method::POST, path, Some(&body), &[200])
                .await
            {
                Some((_, answer)) if answer["credits_refunded"] != follow_up.refunded(amount) => {
                    ctx.unexpected(format!("{what}: {answer}"));
                    return;
                }
                Some(_) => follow_up,
                None => return,
            }
        }
        25..50 => {
            let event_id = format!("ev_{code}");
            let (follow_up, event_amount) = match part.filter(|_| rng.below(2) == 0) {
                Some(k) => {
                    ctx.count("partial refund by event");
                    (FollowUp::PartByEvent(k), Some(k))
                }
                None => {
                    ctx.count("refund by event");
                    (FollowUp::RefundedByEvent, None)
                }
            };
            if !ctx
                .publish_refund_event(&user, &code, &event_id, event_amount)
                .await
            {
                ctx.unexpected(format!("event {event_id}: never confirmed by the broker"));
                return;
            }
            if let Ok(mut r) = ctx.record.lock() {
                r.events.push(event_id);
            }
            follow_up
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
        *r.expected.entry(user.clone()).or_default() += follow_up.refunded(amount);
        r.reservations.insert(code, (user, follow_up, amount));
    }
}

/// Runs the tool with `args`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let settings = args.services.settings()?;
    let topology = Topology::from_settings(&settings.broker);
    let mut services = match (&args.cluster_script, &args.api_bin, &args.worker_bin) {
        (None, Some(api_bin), Some(worker_bin)) => {
            let mut api = Service {
                name: "penora-api",
                bin: api_bin.clone(),
                log: format!("{}/api.log", args.log_dir),
                child: None,
            };
            let mut worker = Service {
                name: "penora-worker",
                bin: worker_bin.clone(),
                log: format!("{}/worker.log", args.log_dir),
                child: None,
            };
            api.start()?;
            worker.start()?;
            Some((api, worker))
        }
        (None, _, _) => {
            anyhow::bail!("--api-bin and --worker-bin are needed without --cluster-script")
        }
        (Some(_), _, _) => None,
    };
    let secs = args.secs;
    let ctx = Arc::new(Ctx {
        bases: args
            .bind_addr
            .split(',')
            .map(|a| format!("http://{}", a.trim()))
            .collect(),
        next_base: std::sync::atomic::AtomicUsize::new(0),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?,
        record: Mutex::new(Record::default()),
        attempts: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        publisher: Publisher::new(
            settings.broker.url.clone(),
            "penora-chaos",
            topology.clone(),
        ),
        topology,
        give_up_at: Instant::now() + Duration::from_secs_f64(secs + 180.0),
        args,
    });
    wait_for_api(&ctx).await;
    // Subscribed before the first grant: every movement's event is owed to it.
    let receiver = crate::chaos_events::Receiver::subscribe(&ctx).await?;
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
    let limits = crate::chaos_limits::set(&ctx).await?;
    let allowances = crate::chaos_allowances::set(&ctx).await?;
    let started = Instant::now();
    eprintln!(
        "chaos: {} clients, {} users, {} API(s), {secs} s of traffic, a fault every {} s",
        ctx.args.clients,
        ctx.args.users,
        ctx.bases.len(),
        ctx.args.fault_every
    );
    let clients: Vec<_> = (0..ctx.args.clients)
        .map(|id| tokio::spawn(client(ctx.clone(), id)))
        .collect();
    let control = match (services.take(), ctx.args.cluster_script.clone()) {
        (Some((api, worker)), _) => tokio::spawn(controller(ctx.clone(), api, worker)),
        (None, Some(script)) => tokio::spawn(cluster_controller(ctx.clone(), script)),
        (None, None) => anyhow::bail!("no services to inject faults into"),
    };
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    ctx.stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }
    let Faults {
        injected,
        recoveries,
        services,
    } = control.await??;
    let elapsed = started.elapsed().as_secs_f64();
    // Both services running, neither paused, for the checks.
    if let Some((api, worker)) = &services {
        api.signal("-CONT");
        worker.signal("-CONT");
    }
    let mut violations = check(&ctx).await?;
    let (db, connection) =
        tokio_postgres::connect(&ctx.args.services.database_url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    violations.extend(receiver.check(&db).await?);
    let limit_refusals = ctx
        .record
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .limit_refusals
        .clone();
    let limits_checked = limits.check(&ctx, &db, &limit_refusals).await?;
    violations.extend(limits_checked.violations);
    let allowances_checked = allowances.check(&db).await?;
    violations.extend(allowances_checked.violations);

    let record = ctx.record.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    println!(
        "\n## Chaos run: {elapsed:.0} s of traffic, {} clients, {} users, {} API(s)\n",
        ctx.args.clients,
        ctx.args.users,
        ctx.bases.len()
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
    if !recoveries.is_empty() {
        println!(
            "\n| fault (in order) | part back in service after (s) | clients served again after (s) | client-visible errors |\n|---|---:|---:|---:|"
        );
        for r in recovery_rows(&recoveries, &record.error_times) {
            println!("| {} | {:.2} | {:.2} | {} |", r.0, r.1, r.2, r.3);
        }
    }
    print!("{}", limits_checked.report);
    print!("{}", allowances_checked.report);
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
    drop(services);
    if !violations.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

/// Per fault: its name, how long until the faulted part was back, how long
/// until clients saw no more errors (the last client-visible error before
/// the next fault, from the fault's start; 0 when they saw none), and how
/// many errors clients saw meanwhile.
fn recovery_rows(recoveries: &[Recovery], errors: &[Instant]) -> Vec<(String, f64, f64, usize)> {
    recoveries
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let until = recoveries.get(i + 1).map(|n| n.started);
            let seen: Vec<&Instant> = errors
                .iter()
                .filter(|&&t| t >= r.started && until.is_none_or(|u| t < u))
                .collect();
            let served = seen
                .iter()
                .map(|t| t.duration_since(r.started).as_secs_f64())
                .fold(0.0, f64::max);
            (r.fault.clone(), r.back.as_secs_f64(), served, seen.len())
        })
        .collect()
}
