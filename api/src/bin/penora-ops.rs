//! `penora-ops`: the operator CLI (migrations, keys, grants, reconcile).
//!
//! Settings come from the same environment as the services (`DATABASE_URL`,
//! `STORAGE_QUOTA_BYTES`, `MAX_DEDUCT_AMOUNT`, …). Exit status: 0 on success,
//! 1 when `reconcile` finds a violation, 2 on any error.

use std::{collections::BTreeSet, process::ExitCode, time::Duration};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use penora_common::{
    broker::{self, Publisher, Topology},
    config::Settings,
    db,
    domain::{self, AppName, Credits, UserId},
    keys::{self, KeyApp, Scope},
    ledger, reconcile,
};

#[derive(Parser)]
#[command(name = "penora-ops", version, about = "Penora Credits operator CLI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply pending database migrations (safe while services run).
    Migrate,
    /// Create, list and revoke API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Grant credits.
    Credits {
        #[command(subcommand)]
        command: CreditsCommand,
    },
    /// Delete projects of the shared workspace.
    Projects {
        #[command(subcommand)]
        command: ProjectsCommand,
    },
    /// Check invariants 1, 2, 4 and 6 over every user; exit 1 naming the users on a violation.
    Reconcile {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Depth and consumers of every queue, retry and dead queues included.
    Queues {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Wait until the pipeline is idle: every job published, every queue but
    /// the dead letters empty, every ledger entry audited, no save still
    /// queued. Exit 1 naming what is left if it is not idle in time.
    WaitIdle {
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
    },
    /// Inspect, replay and purge parked (dead-letter) messages.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// The audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Publish an ImageGene generation event, as ImageGene does (for tests and repairs).
    Event {
        /// `failed` (refund) or `succeeded` (settle).
        kind: String,
        /// The user.
        user: String,
        /// The reservation's project_code.
        project_code: String,
        /// Why the generation failed.
        #[arg(long)]
        reason: Option<String>,
        /// The event id (default: a new UUID).
        #[arg(long)]
        event_id: Option<String>,
        /// Publish this body instead (e.g. to test how bad events are parked).
        #[arg(long)]
        raw: Option<String>,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
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

#[derive(Subcommand)]
enum AuditCommand {
    /// Check every ledger entry has its audit record and every chain is intact.
    Verify {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key; it is printed once and never stored in clear.
    Create {
        /// The app the key acts for (`penora`, `imagegene`, … or `*` for any).
        #[arg(long)]
        app: String,
        /// Comma-separated scopes: read, spend, write, admin.
        #[arg(long, value_delimiter = ',', required = true)]
        scopes: Vec<String>,
        /// A name for people (who holds the key).
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List keys (never the keys themselves).
    List {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key; it stops working on the next request.
    Revoke {
        /// The key's id (from `keys list`).
        id: uuid::Uuid,
    },
}

#[derive(Subcommand)]
enum ProjectsCommand {
    /// Delete USER's project PROJECT_ID: its content goes and its bytes are
    /// freed in one transaction (logged in project_log as `operator`).
    Delete {
        /// The user.
        user: String,
        /// The project's id.
        project_id: uuid::Uuid,
    },
}

#[derive(Subcommand)]
enum CreditsCommand {
    /// Grant AMOUNT credits to USER, once per REFERENCE.
    Grant {
        /// The user.
        user: String,
        /// Whole credits.
        amount: i64,
        /// Why (a purchase, a bonus).
        #[arg(long)]
        reason: String,
        /// Idempotency reference (e.g. the payment id).
        #[arg(long)]
        reference: String,
        /// The app granting.
        #[arg(long, default_value = "penora")]
        app: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("penora-ops: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let settings = Settings::from_env().context("Bad configuration")?;
    let url = settings.database_url.expose().to_owned();
    db::migrate(&url)
        .await
        .context("Failed to apply migrations (is PostgreSQL running? see DATABASE_URL)")?;
    let pool = db::pool_for(&url, 2).context("Failed to create the database pool")?;
    let mut client = pool
        .get()
        .await
        .context("Failed to connect to PostgreSQL")?;
    match cli.command {
        Command::Migrate => {
            println!(
                "migrations applied (schema version {})",
                db::latest_migration_version()
            );
        }
        Command::Keys { command } => match command {
            KeysCommand::Create { app, scopes, name } => {
                let app = KeyApp::parse(&app).map_err(anyhow::Error::msg)?;
                let scopes: BTreeSet<Scope> = scopes
                    .iter()
                    .map(|s| s.parse::<Scope>())
                    .collect::<Result<_, _>>()
                    .map_err(anyhow::Error::msg)?;
                let name = domain::bounded_text("name", &name, 200)?;
                let key = keys::create(&client, &name, &app, &scopes).await?;
                let scopes: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
                println!("key:    {}", key.secret.expose());
                println!("id:     {}", key.id);
                println!("app:    {}", app.as_str());
                println!("scopes: {}", scopes.join(","));
                eprintln!("Store the key now: it is shown only once.");
            }
            KeysCommand::List { json } => {
                let keys = keys::list(&client).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&keys)?);
                } else {
                    print_keys(&keys);
                }
            }
            KeysCommand::Revoke { id } => {
                if !keys::revoke(&client, id).await? {
                    bail!("no key with id {id}");
                }
                println!("revoked {id}");
            }
        },
        Command::Credits {
            command:
                CreditsCommand::Grant {
                    user,
                    amount,
                    reason,
                    reference,
                    app,
                },
        } => {
            let grant = ledger::Grant {
                user_id: UserId::parse(&user)?,
                amount: Credits::new("amount", amount, settings.max_deduct_amount)?,
                app_name: AppName::parse("app", &app)?,
                reason: domain::bounded_text("reason", &reason, domain::DESCRIPTION_MAX_LEN)?,
                reference: domain::bounded_text(
                    "reference",
                    &reference,
                    domain::REFERENCE_MAX_LEN,
                )?,
            };
            let outcome = ledger::grant(&mut client, &grant, None).await?;
            let r = outcome.value;
            let replay = if outcome.replayed {
                " (already granted: nothing moved)"
            } else {
                ""
            };
            println!(
                "granted {} credits to {} (reference {}); balance {}{replay}",
                r.credits_added, r.user_id, r.reference, r.new_balance
            );
        }
        Command::Projects {
            command: ProjectsCommand::Delete { user, project_id },
        } => {
            let user = UserId::parse(&user)?;
            let deleted = penora_common::projects::delete(
                &mut client,
                user.as_str(),
                project_id,
                None,
                penora_common::projects::Cause::Operator,
                Some("penora-ops"),
            )
            .await?;
            println!(
                "deleted project {project_id} of {user}: {} bytes freed; {} bytes in use",
                deleted.freed_bytes, deleted.storage_used_bytes
            );
        }
        Command::Reconcile { json } => {
            let report = reconcile::run_with_progress(
                &mut client,
                settings.storage_quota_bytes,
                &progress_bar,
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for v in &report.violations {
                    println!(
                        "user {:<24} invariant {}  {}",
                        v.user_id, v.invariant, v.detail
                    );
                }
                let users = report.users();
                if users.is_empty() {
                    println!(
                        "reconcile OK: {} users, {} ledger entries, {} reservations, no violation",
                        report.users_checked, report.entries_checked, report.reservations_checked
                    );
                } else {
                    println!(
                        "reconcile FAILED: {} violations for {} users: {}",
                        report.violations.len(),
                        users.len(),
                        users.join(", ")
                    );
                }
            }
            if !report.violations.is_empty() {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Audit {
            command: AuditCommand::Verify { json },
        } => {
            let v = penora_common::audit::verify_with_progress(&mut client, &progress_bar).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for f in &v.findings {
                    println!("user {:<24} {}", f.user_id, f.detail);
                }
                if v.findings.is_empty() {
                    println!(
                        "audit OK: {} records, {} ledger entries, every entry recorded, every chain intact",
                        v.records_checked, v.entries_checked
                    );
                } else {
                    println!("audit FAILED: {} problems", v.findings.len());
                }
            }
            if !v.findings.is_empty() {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Queues { json } => {
            let topology = Topology::from_settings(&settings);
            let connection = broker::connect(settings.amqp_url.expose(), "penora-ops").await?;
            let ch = connection.create_channel().await?;
            topology.declare(&ch).await?;
            let stats = broker::queue_stats(&ch, &topology).await?;
            let _ = connection.close(200, "bye".into()).await;
            let mgmt = management_rates(&settings, &stats).await;
            let rows: Vec<QueueRow> = stats
                .iter()
                .zip(mgmt.iter())
                .map(|(s, m)| QueueRow {
                    queue: s.name.clone(),
                    ready: s.messages,
                    consumers: s.consumers,
                    unacked: m.as_ref().map(|m| m.0),
                    in_per_sec: m.as_ref().map(|m| m.1),
                    out_per_sec: m.as_ref().map(|m| m.2),
                })
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                let width = rows.iter().map(|r| r.queue.len()).max().unwrap_or(5).max(5);
                println!(
                    "{:<width$}  {:>7}  {:>7}  {:>9}  {:>8}  {:>8}",
                    "QUEUE", "READY", "UNACKED", "CONSUMERS", "IN/s", "OUT/s"
                );
                let opt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
                for r in &rows {
                    println!(
                        "{:<width$}  {:>7}  {:>7}  {:>9}  {:>8}  {:>8}",
                        r.queue,
                        r.ready,
                        r.unacked.map_or_else(|| "-".to_owned(), |v| v.to_string()),
                        r.consumers,
                        opt(r.in_per_sec),
                        opt(r.out_per_sec)
                    );
                }
                if mgmt.iter().all(Option::is_none) {
                    eprintln!(
                        "(rates need the RabbitMQ management API at {}: rabbitmq-plugins enable rabbitmq_management)",
                        management_url(&settings)
                    );
                }
            }
        }
        Command::Dlq { command } => return dlq(&settings, command).await,
        Command::WaitIdle { timeout_secs } => {
            return wait_idle(&settings, &client, Duration::from_secs(timeout_secs)).await;
        }
        Command::Event {
            kind,
            user,
            project_code,
            reason,
            event_id,
            raw,
        } => {
            let event_id = event_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            let body = match raw {
                Some(raw) => raw,
                None => serde_json::to_string(&penora_common::messages::GenerationEvent {
                    event_id: event_id.clone(),
                    user_id: user,
                    project_code,
                    reason,
                    occurred_at: penora_common::timefmt::rfc3339_millis(
                        time::OffsetDateTime::now_utc(),
                    ),
                })?,
            };
            let topology = Topology::from_settings(&settings);
            let publisher =
                Publisher::new(settings.amqp_url.clone(), "penora-ops", topology.clone());
            publisher
                .publish_all(vec![broker::Outgoing {
                    exchange: topology.exchange(penora_common::messages::EVENTS_EXCHANGE),
                    routing_key: format!("generation.{kind}"),
                    payload: body.into_bytes(),
                    properties: lapin::BasicProperties::default()
                        .with_message_id(event_id.clone().into())
                        .with_content_type("application/json".into()),
                }])
                .await?;
            println!("published generation.{kind} event {event_id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What is still in flight: `None` when idle, else a description.
async fn in_flight(
    settings: &Settings,
    client: &tokio_postgres::Client,
    topology: &Topology,
    ch: &lapin::Channel,
) -> anyhow::Result<Option<String>> {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM outbox WHERE published_at IS NULL) AS unpublished, \
                    (SELECT count(*) FROM ledger_entries l WHERE NOT EXISTS \
                        (SELECT 1 FROM audit_records a WHERE a.user_id = l.user_id AND a.entry_id = l.id)) AS unaudited, \
                    (SELECT count(*) FROM projects WHERE status = 'queued') AS queued",
            &[],
        )
        .await?;
    let (unpublished, unaudited, queued): (i64, i64, i64) = (
        row.get("unpublished"),
        row.get("unaudited"),
        row.get("queued"),
    );
    let stats = broker::queue_stats(ch, topology).await?;
    let unacked = management_rates(settings, &stats).await;
    let busy: Vec<String> = stats
        .iter()
        .zip(unacked)
        .filter(|(s, _)| !s.name.ends_with(".dead"))
        .filter_map(|(s, m)| {
            let unacked = m.map_or(0, |m| m.0);
            (s.messages > 0 || unacked > 0)
                .then(|| format!("{} ({} ready, {unacked} unacked)", s.name, s.messages))
        })
        .collect();
    if unpublished == 0 && unaudited == 0 && queued == 0 && busy.is_empty() {
        return Ok(None);
    }
    Ok(Some(format!(
        "{unpublished} jobs unpublished, {unaudited} ledger entries unaudited, {queued} saves queued, busy queues: [{}]",
        busy.join(", ")
    )))
}

async fn wait_idle(
    settings: &Settings,
    client: &tokio_postgres::Client,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let topology = Topology::from_settings(settings);
    let connection = broker::connect(settings.amqp_url.expose(), "penora-ops").await?;
    let ch = connection.create_channel().await?;
    topology.declare(&ch).await?;
    let started = std::time::Instant::now();
    let mut idle_looks = 0;
    let mut last = String::new();
    // Two idle looks in a row, half a second apart: a job between its
    // handler's commit and its publish shows in neither place for an instant.
    while idle_looks < 2 {
        match in_flight(settings, client, &topology, &ch).await? {
            None => idle_looks += 1,
            Some(what) => {
                idle_looks = 0;
                last = what;
            }
        }
        if idle_looks < 2 {
            if started.elapsed() > timeout {
                let _ = connection.close(200, "bye".into()).await;
                eprintln!("not idle after {} s: {last}", timeout.as_secs());
                return Ok(ExitCode::from(1));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let _ = connection.close(200, "bye".into()).await;
    println!("idle after {:.1} s", started.elapsed().as_secs_f64());
    Ok(ExitCode::SUCCESS)
}

/// One line of `penora-ops queues`.
#[derive(serde::Serialize)]
struct QueueRow {
    queue: String,
    ready: u32,
    unacked: Option<u64>,
    consumers: u32,
    in_per_sec: Option<f64>,
    out_per_sec: Option<f64>,
}

/// The RabbitMQ management API (`RABBITMQ_MANAGEMENT_URL`, default port 15672
/// on the AMQP host).
fn management_url(settings: &Settings) -> String {
    std::env::var("RABBITMQ_MANAGEMENT_URL").unwrap_or_else(|_| {
        let host = amqp_uri(settings).map_or_else(|| "127.0.0.1".to_owned(), |u| u.authority.host);
        format!("http://{host}:15672")
    })
}

/// `AMQP_URL` parsed by lapin's own URI type (user, password, host, port and
/// the vhost, percent-decoded).
fn amqp_uri(settings: &Settings) -> Option<lapin::uri::AMQPUri> {
    settings.amqp_url.expose().parse().ok()
}

/// (unacked, in/s, out/s) per queue from the management API, `None` where it
/// cannot be had.
async fn management_rates(
    settings: &Settings,
    stats: &[broker::QueueStat],
) -> Vec<Option<(u64, f64, f64)>> {
    let Some(uri) = amqp_uri(settings) else {
        return vec![None; stats.len()];
    };
    let (user, pass) = (
        uri.authority.userinfo.username,
        uri.authority.userinfo.password,
    );
    let base = management_url(settings);
    let Ok(http) = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(2))
        .build()
    else {
        return vec![None; stats.len()];
    };
    let mut out = Vec::with_capacity(stats.len());
    for s in stats {
        // The vhost and queue are path segments: `/` (the default vhost)
        // must travel as %2F.
        let Ok(mut url) = url::Url::parse(&base) else {
            out.push(None);
            continue;
        };
        if let Ok(mut path) = url.path_segments_mut() {
            path.extend(["api", "queues", uri.vhost.as_str(), s.name.as_str()]);
        }
        let got = async {
            let v: serde_json::Value = http
                .get(url.as_str())
                .basic_auth(&user, Some(&pass))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let rate = |k: &str| v["message_stats"][k]["rate"].as_f64().unwrap_or(0.0);
            Some((
                v["messages_unacknowledged"].as_u64().unwrap_or(0),
                rate("publish_details"),
                rate("deliver_get_details"),
            ))
        }
        .await;
        out.push(got);
    }
    out
}

/// Draws `stage done/total` on stderr when it is a terminal.
fn progress_bar(stage: &str, done: u64, total: u64) {
    use std::io::{IsTerminal, Write};
    let mut err = std::io::stderr();
    if !err.is_terminal() {
        return;
    }
    let width = 30u64;
    let filled = (done.min(total) * width)
        .checked_div(total)
        .unwrap_or(width);
    let _ = write!(
        err,
        "\r[{}{}] {done}/{total} {stage:<30}",
        "#".repeat(filled as usize),
        " ".repeat((width - filled) as usize)
    );
    if done >= total {
        let _ = writeln!(err);
    }
    let _ = err.flush();
}

/// The parked messages to act on: all, or the one with message id `id`.
fn select_parked<'a>(
    parked: &'a [broker::Peeked],
    id: Option<&str>,
    dead: &str,
) -> anyhow::Result<Vec<&'a broker::Peeked>> {
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

async fn dlq(settings: &Settings, command: DlqCommand) -> anyhow::Result<ExitCode> {
    let topology = Topology::from_settings(settings);
    let connection = broker::connect(settings.amqp_url.expose(), "penora-ops").await?;
    let ch = connection.create_channel().await?;
    topology.declare(&ch).await?;
    match command {
        DlqCommand::List {
            queue,
            limit,
            since,
            id,
            json,
        } => {
            let dead = dead_queue_of(&topology, &queue)?;
            let since = since
                .map(|t| {
                    time::OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339)
                })
                .transpose()
                .context("--since must be an RFC 3339 time, e.g. 2026-11-24T06:00:00Z")?;
            let parked: Vec<_> = broker::peek(&ch, &dead, usize::MAX)
                .await?
                .into_iter()
                .filter(|m| id.is_none() || m.message_id == id)
                .filter(|m| match (&since, &m.parked_at) {
                    (None, _) => true,
                    (Some(since), Some(at)) => time::OffsetDateTime::parse(
                        at,
                        &time::format_description::well_known::Rfc3339,
                    )
                    .is_ok_and(|at| at >= *since),
                    (Some(_), None) => false,
                })
                .take(limit)
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&parked)?);
            } else {
                println!(
                    "{:>3}  {:<36}  {:>8}  {:<24}  ERROR",
                    "#", "MESSAGE ID", "ATTEMPTS", "PARKED AT"
                );
                for m in &parked {
                    let error: String = m
                        .error
                        .clone()
                        .unwrap_or_default()
                        .chars()
                        .take(80)
                        .collect();
                    println!(
                        "{:>3}  {:<36}  {:>8}  {:<24}  {}",
                        m.position,
                        m.message_id.clone().unwrap_or_else(|| "-".into()),
                        m.attempts.map_or_else(|| "-".into(), |a| a.to_string()),
                        m.parked_at.clone().unwrap_or_else(|| "-".into()),
                        error
                    );
                }
                println!("{} parked in {dead}", parked.len());
            }
        }
        DlqCommand::Show { queue, id } => {
            let dead = dead_queue_of(&topology, &queue)?;
            let parked = broker::peek(&ch, &dead, usize::MAX).await?;
            let chosen = select_parked(&parked, id.as_deref(), &dead)?;
            println!("{}", serde_json::to_string_pretty(&chosen)?);
        }
        DlqCommand::Replay { queue, id, dry_run } => {
            let dead = dead_queue_of(&topology, &queue)?;
            let parked = broker::peek(&ch, &dead, usize::MAX).await?;
            let chosen = select_parked(&parked, id.as_deref(), &dead)?;
            let mut outgoing = Vec::new();
            for m in &chosen {
                let Some(o) = broker::replay_of(m) else {
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
            if !dry_run {
                let publisher =
                    Publisher::new(settings.amqp_url.clone(), "penora-ops", topology.clone());
                publisher.publish_all(outgoing).await?;
                broker::ack_peeked(&ch, &chosen).await?;
                println!("replayed {} message(s)", chosen.len());
            }
        }
        DlqCommand::Purge { queue, yes } => {
            let dead = dead_queue_of(&topology, &queue)?;
            if !yes {
                let n = broker::queue_stats(&ch, &topology)
                    .await?
                    .into_iter()
                    .find(|s| s.name == dead)
                    .map_or(0, |s| s.messages);
                println!(
                    "would delete {n} message(s) from {dead}; run again with --yes to delete them"
                );
                return Ok(ExitCode::from(1));
            }
            let n = ch
                .queue_purge(
                    dead.clone().into(),
                    lapin::options::QueuePurgeOptions::default(),
                )
                .await?;
            println!("purged {n} message(s) from {dead}");
        }
    }
    let _ = ch.close(200, "bye".into()).await;
    let _ = connection.close(200, "bye".into()).await;
    Ok(ExitCode::SUCCESS)
}

fn print_keys(keys: &[keys::KeyRecord]) {
    let rows: Vec<[String; 6]> = keys
        .iter()
        .map(|k| {
            [
                k.id.to_string(),
                format!("{}…", k.prefix),
                k.app.clone(),
                k.scopes.join(","),
                penora_common::timefmt::rfc3339_millis(k.created_at),
                k.revoked_at.map_or_else(
                    || "active".to_owned(),
                    |t| format!("revoked {}", penora_common::timefmt::rfc3339_millis(t)),
                ),
            ]
        })
        .collect();
    let header = ["ID", "PREFIX", "APP", "SCOPES", "CREATED", "STATE"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    println!("{}", line(header.to_vec()));
    for row in &rows {
        println!("{}", line(row.iter().map(String::as_str).collect()));
    }
    if rows.is_empty() {
        println!("(no keys)");
    }
}
