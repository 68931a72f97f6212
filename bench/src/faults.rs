//! The faults `penora-chaos` injects, in turn, while traffic runs: SIGKILL
//! and restart the API, then the worker; close every broker connection of
//! the run's vhost; take the database away (connections refused, sessions
//! terminated) for a few seconds; SIGSTOP/SIGCONT the API, then the worker.
//! On a cluster ([`cluster_controller`]) the cluster script's faults: a
//! RabbitMQ node killed, an API and a worker killed, a PostgreSQL failover.

use std::{
    collections::BTreeMap,
    fs::OpenOptions,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::Context;
use tokio::process::{Child, Command};

use crate::chaos::Ctx;

/// A service process the controller kills, pauses and restarts.
pub struct Service {
    pub name: &'static str,
    pub bin: String,
    pub log: String,
    pub child: Option<Child>,
}

impl Service {
    pub fn start(&mut self) -> anyhow::Result<()> {
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

    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill(); // SIGKILL
            let _ = child.wait().await;
        }
    }

    pub fn signal(&self, signal: &str) {
        if let Some(pid) = self.child.as_ref().and_then(Child::id) {
            let _ = std::process::Command::new("kill")
                .args([signal, &pid.to_string()])
                .status();
        }
    }
}

pub const FAULTS: [&str; 6] = [
    "SIGKILL API",
    "SIGKILL worker",
    "broker connections closed",
    "database away",
    "SIGSTOP API",
    "SIGSTOP worker",
];

/// Waits (at most 30 s) until every API answers `/health`.
pub async fn wait_for_api(ctx: &Ctx) {
    for base in &ctx.bases {
        for _ in 0..300 {
            if ctx.http.get(format!("{base}/health")).send().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// What the controller did: the faults by kind, each fault's timing (on a
/// cluster), and the services it ran (without a cluster).
pub struct Faults {
    pub injected: BTreeMap<&'static str, u64>,
    pub recoveries: Vec<Recovery>,
    pub services: Option<(Service, Service)>,
}

/// One fault on a cluster: when it started and how long until the faulted
/// part was back in service.
pub struct Recovery {
    pub fault: String,
    pub started: Instant,
    pub back: Duration,
}

/// The cluster script's faults, in turn: (name, `fault` argument).
pub const CLUSTER_FAULTS: [(&str, &str); 4] = [
    ("RabbitMQ node killed", "rabbit-node"),
    ("API killed", "api"),
    ("worker killed", "worker"),
    ("PostgreSQL failover", "failover"),
];

/// Runs `script fault ARGS…`; its output (what it did) goes to stderr.
async fn run_fault(script: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(script)
        .arg("fault")
        .args(args)
        .output()
        .await
        .with_context(|| format!("running {script}"))?;
    eprintln!(
        "chaos: {}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    anyhow::ensure!(
        out.status.success(),
        "{script} fault {} failed",
        args.join(" ")
    );
    Ok(())
}

/// Waits `fault_every` seconds; `true` when the run stopped meanwhile.
async fn stopped_before_next_fault(ctx: &Ctx) -> bool {
    let wake = Instant::now() + Duration::from_secs_f64(ctx.args.fault_every);
    while Instant::now() < wake {
        if ctx.stop.load(Ordering::Relaxed) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Injects the cluster script's faults in turn, each `fault_every` seconds
/// after the previous one is over; after a failover, rebuilds the old
/// primary as the new standby (timed as a fault of its own).
pub async fn cluster_controller(ctx: Arc<Ctx>, script: String) -> anyhow::Result<Faults> {
    let mut injected: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut recoveries = Vec::new();
    let mut i = 0;
    loop {
        if stopped_before_next_fault(&ctx).await {
            return Ok(Faults {
                injected,
                recoveries,
                services: None,
            });
        }
        let (fault, kind) = CLUSTER_FAULTS[i % CLUSTER_FAULTS.len()];
        let round = (i / CLUSTER_FAULTS.len() + 1).to_string();
        i += 1;
        let started = Instant::now();
        run_fault(&script, &[kind, &round]).await?;
        recoveries.push(Recovery {
            fault: format!("{fault} ({round})"),
            started,
            back: started.elapsed(),
        });
        *injected.entry(fault).or_default() += 1;
        if kind == "failover" {
            let started = Instant::now();
            run_fault(&script, &["rebuild-standby"]).await?;
            recoveries.push(Recovery {
                fault: "old primary rebuilt as the standby".into(),
                started,
                back: started.elapsed(),
            });
        }
    }
}

pub async fn database_away(ctx: &Ctx, secs: f64) -> anyhow::Result<()> {
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

pub async fn controller(
    ctx: Arc<Ctx>,
    mut api: Service,
    mut worker: Service,
) -> anyhow::Result<Faults> {
    let mut injected: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut i = 0;
    loop {
        if stopped_before_next_fault(&ctx).await {
            return Ok(Faults {
                injected,
                recoveries: Vec::new(),
                services: Some((api, worker)),
            });
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
                        ctx.args.vhost.as_deref().unwrap_or("/"),
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
