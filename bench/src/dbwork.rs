//! Database work per movement: commits, WAL and statement time, read from
//! PostgreSQL's own statistics (`pg_stat_database`, `pg_stat_wal`,
//! `pg_stat_statements`) before and after a phase.
//!
//! Unlike throughput, these figures hardly move with the machine's noise:
//! they count what the database was asked to do, not how fast a shared CPU
//! got through it. PostgreSQL 15 publishes a backend's commits and WAL
//! counters when it goes idle, at most once a second, so a snapshot waits
//! [`SETTLE`] first. `pg_stat_wal` is the instance's: on a shared instance,
//! other databases' writes count too (`scripts/bench.sh` starts a private
//! instance for that reason). The benchmark's own monitoring statements carry
//! the comment [`MARK`] and are left out of the statement figures.

use std::{collections::HashMap, time::Duration};

use deadpool_postgres::Pool;

/// In the text of the benchmark's own statements, so they are not counted.
pub const MARK: &str = "/* penora-bench */";

/// How long PostgreSQL 15 may keep a backend's counters before publishing
/// them (PGSTAT_MIN_INTERVAL is 1 s), with a margin.
pub const SETTLE: Duration = Duration::from_millis(1300);

/// Statements listed per phase.
pub const TOP: usize = 10;

#[derive(Debug, Clone)]
struct Statement {
    query: String,
    /// Run by a client, not inside a trigger or function (a foreign-key
    /// check, say, whose time is also in its caller's).
    toplevel: bool,
    calls: i64,
    total_ms: f64,
    wal_bytes: f64,
}

/// The counters at one instant.
#[derive(Debug, Clone)]
pub struct Snapshot {
    commits: i64,
    wal_bytes: f64,
    wal_records: i64,
    /// None when pg_stat_statements is not loaded.
    statements: Option<HashMap<(i64, bool), Statement>>,
}

/// One statement's share of a phase.
#[derive(Debug, Clone)]
pub struct Top {
    pub query: String,
    /// False for a statement run inside another (its time is in both).
    pub toplevel: bool,
    pub calls: i64,
    pub total_ms: f64,
    pub wal_bytes: f64,
}

/// The database's work during a phase, per acknowledged operation.
#[derive(Debug, Clone, Default)]
pub struct Work {
    pub ops: u64,
    pub commits: f64,
    pub wal_bytes: f64,
    pub wal_records: f64,
    /// Statement time in µs per operation (None without pg_stat_statements).
    pub statement_us: Option<f64>,
    /// The most expensive statements of the phase, by total time.
    pub top: Vec<Top>,
}

/// Reads the counters, after waiting [`SETTLE`] for idle backends to
/// publish theirs.
pub async fn snapshot(pool: &Pool) -> anyhow::Result<Snapshot> {
    tokio::time::sleep(SETTLE).await;
    let client = pool.get().await?;
    let row = client
        .query_one(
            &format!(
                "{MARK} SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()) AS commits, \
                        (SELECT wal_bytes::float8 FROM pg_stat_wal) AS wal_bytes, \
                        (SELECT wal_records FROM pg_stat_wal) AS wal_records"
            ),
            &[],
        )
        .await?;
    let statements = match client
        .query(
            &format!(
                "{MARK} SELECT queryid, toplevel, query, calls, total_exec_time, wal_bytes::float8 AS wal_bytes FROM pg_stat_statements \
                 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                   AND queryid IS NOT NULL AND query NOT LIKE '%penora-bench%'"
            ),
            &[],
        )
        .await
    {
        Ok(rows) => Some(
            rows.into_iter()
                .map(|r| {
                    (
                        (r.get::<_, i64>("queryid"), r.get::<_, bool>("toplevel")),
                        Statement {
                            query: r.get("query"),
                            toplevel: r.get("toplevel"),
                            calls: r.get("calls"),
                            total_ms: r.get("total_exec_time"),
                            wal_bytes: r.get("wal_bytes"),
                        },
                    )
                })
                .collect(),
        ),
        // Not installed in this database, or not loaded by the server.
        Err(_) => None,
    };
    Ok(Snapshot {
        commits: row.get("commits"),
        wal_bytes: row.get("wal_bytes"),
        wal_records: row.get("wal_records"),
        statements,
    })
}

/// The work done between two snapshots, per `ops` acknowledged operations.
pub fn between(before: &Snapshot, after: &Snapshot, ops: u64) -> Work {
    let per = |v: f64| v / ops.max(1) as f64;
    let (statement_us, top) = match (&before.statements, &after.statements) {
        (Some(b), Some(a)) => {
            let mut top: Vec<Top> = a
                .iter()
                .filter_map(|(id, s)| {
                    let (calls, ms, wal) = b
                        .get(id)
                        .map_or((0, 0.0, 0.0), |p| (p.calls, p.total_ms, p.wal_bytes));
                    (s.calls > calls).then(|| Top {
                        query: s.query.clone(),
                        toplevel: s.toplevel,
                        calls: s.calls - calls,
                        total_ms: s.total_ms - ms,
                        wal_bytes: s.wal_bytes - wal,
                    })
                })
                .collect();
            // A nested statement's time is also in its caller's.
            let total: f64 = top.iter().filter(|t| t.toplevel).map(|t| t.total_ms).sum();
            top.sort_by(|x, y| y.total_ms.total_cmp(&x.total_ms));
            top.truncate(TOP);
            (Some(per(total * 1000.0)), top)
        }
        _ => (None, Vec::new()),
    };
    Work {
        ops,
        commits: per((after.commits - before.commits) as f64),
        wal_bytes: per(after.wal_bytes - before.wal_bytes),
        wal_records: per((after.wal_records - before.wal_records) as f64),
        statement_us,
        top,
    }
}

/// A statement's text on one line, short enough for a table cell.
pub fn one_line(query: &str, max: usize) -> String {
    let flat = query.split_whitespace().collect::<Vec<_>>().join(" ");
    let flat = flat.replace('|', "\\|");
    if flat.chars().count() <= max {
        flat
    } else {
        format!("{}…", flat.chars().take(max).collect::<String>())
    }
}

/// CPU time of the processes sharing the machine, by program, read from
/// `/proc` (Linux; empty elsewhere): what a phase cost each of them.
#[derive(Debug, Clone, Default)]
pub struct Cpu(std::collections::BTreeMap<String, f64>);

/// The programs whose CPU time is reported, by their process name.
const PROGRAMS: [(&str, &str); 5] = [
    ("postgres", "PostgreSQL"),
    ("beam.smp", "RabbitMQ"),
    ("penora-api", "penora-api"),
    ("penora-worker", "penora-worker"),
    ("penora-bench", "load generator (penora-bench)"),
];

impl Cpu {
    /// The CPU seconds used so far by every process of [`PROGRAMS`].
    pub fn now() -> Self {
        let tick = 100.0; // USER_HZ on Linux
        let mut by = std::collections::BTreeMap::new();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Self(by);
        };
        for entry in dir.flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // pid (comm) state ... utime stime: fields 14 and 15.
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let comm = &stat[open + 1..close];
            let Some((_, name)) = PROGRAMS.iter().find(|(c, _)| *c == comm) else {
                continue;
            };
            let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
            let ticks: f64 = fields
                .get(11..13)
                .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum())
                .unwrap_or(0.0);
            *by.entry((*name).to_owned()).or_insert(0.0) += ticks / tick;
        }
        Self(by)
    }

    /// CPU µs per operation of each program between `self` and `later`.
    pub fn per_op(&self, later: &Cpu, ops: u64) -> Vec<(String, f64)> {
        later
            .0
            .iter()
            .map(|(name, s)| {
                let before = self.0.get(name).copied().unwrap_or(0.0);
                (
                    name.clone(),
                    (s - before).max(0.0) * 1e6 / ops.max(1) as f64,
                )
            })
            .collect()
    }
}
