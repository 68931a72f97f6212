//! PostgreSQL: the connection pool, migrations, and how database errors are
//! classified.
//!
//! Migrations are applied under a session advisory lock, so any number of API,
//! worker and operator processes may start at once: one applies, the others
//! wait and then find nothing left to do.
//!
//! Where the services connect as the application role (`penora_app`, migration
//! V12: it may read and write rows, not change the schema, and not update or
//! delete the append-only tables), `DB_MIGRATE_ON_START=false`: they do not
//! migrate, and start only on a current schema ([`prepare_schema`]);
//! `penora-ops migrate` runs as the schema's owner.

pub mod accounts;
pub mod ops_runs;
pub mod outbox;
pub mod webhooks;

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Timeouts};
use tokio_postgres::{NoTls, error::SqlState};

use penora_config::Db;

refinery::embed_migrations!("../../migrations");

/// Advisory lock key held while migrating ("penora" in ASCII).
const MIGRATION_LOCK_KEY: i64 = 0x70_65_6e_6f_72_61;

/// What went wrong talking to PostgreSQL, classified for callers.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DbError {
    /// The database cannot be reached or the pool timed out: try again later.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The transaction lost a race (serialization failure, deadlock): retry it.
    #[error("transaction conflict: {0}")]
    Conflict(String),
    /// A row lock stayed taken for `DB_LOCK_TIMEOUT_MS` (a long transaction
    /// holds it): the rows are busy; trying again at once would wait again.
    #[error("row lock wait timed out: {0}")]
    LockTimeout(String),
    /// What the rows hold breaks a rule the code relies on (lots holding
    /// more or less than the balance, a change that did not apply to the
    /// rows it was decided on): the transaction must not commit; a bug, or
    /// rows changed behind the service's back.
    #[error("invariant broken: {0}")]
    Invariant(String),
    /// Anything else: a bug or a broken schema.
    #[error("database error: {0}")]
    Other(String),
}

impl DbError {
    /// Whether trying the same work again later can succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Unavailable(_) | Self::Conflict(_) | Self::LockTimeout(_)
        )
    }
}

impl From<tokio_postgres::Error> for DbError {
    fn from(err: tokio_postgres::Error) -> Self {
        let text = error_chain(&err);
        match err.code() {
            Some(code)
                if *code == SqlState::T_R_SERIALIZATION_FAILURE
                    || *code == SqlState::T_R_DEADLOCK_DETECTED =>
            {
                Self::Conflict(text)
            }
            Some(code) if *code == SqlState::LOCK_NOT_AVAILABLE => Self::LockTimeout(text),
            Some(code)
                if *code == SqlState::ADMIN_SHUTDOWN
                    || *code == SqlState::CRASH_SHUTDOWN
                    || *code == SqlState::CANNOT_CONNECT_NOW
                    || *code == SqlState::TOO_MANY_CONNECTIONS
                    || *code == SqlState::QUERY_CANCELED
                    // A server that is (now) a standby: a failover is under way.
                    || *code == SqlState::READ_ONLY_SQL_TRANSACTION
                    || code.code().starts_with("08") =>
            {
                Self::Unavailable(text)
            }
            Some(_) => Self::Other(text),
            // No SQLSTATE: the connection itself failed or closed.
            None => Self::Unavailable(text),
        }
    }
}

impl From<deadpool_postgres::PoolError> for DbError {
    /// A pool error happens before any work: while opening a connection
    /// (`Backend`: the server refused it) or waiting for one. Whatever the
    /// server's reason (`database … is not currently accepting connections`
    /// is SQLSTATE 55000, not an `08` code), the work itself is sound and can
    /// be tried again: found by scripts/chaos.sh, where a database outage
    /// parked worker jobs as poison and answered API requests 500.
    fn from(err: deadpool_postgres::PoolError) -> Self {
        match err {
            deadpool_postgres::PoolError::Backend(e) => Self::Unavailable(error_chain(&e)),
            other => Self::Unavailable(other.to_string()),
        }
    }
}

/// The error and its causes on one line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Whether `err` is a unique violation of the named constraint or index.
pub fn is_unique_violation(err: &tokio_postgres::Error, constraint: &str) -> bool {
    err.as_db_error().is_some_and(|db| {
        *db.code() == SqlState::UNIQUE_VIOLATION && db.constraint() == Some(constraint)
    })
}

/// Whether `err` is a check violation of the named constraint.
pub fn is_check_violation(err: &tokio_postgres::Error, constraint: &str) -> bool {
    err.as_db_error().is_some_and(|db| {
        *db.code() == SqlState::CHECK_VIOLATION && db.constraint() == Some(constraint)
    })
}

/// Builds the connection pool. Connections are made lazily; a database that is
/// down makes requests fail fast with [`DbError::Unavailable`] instead of
/// hanging.
///
/// `DATABASE_URL` may name several hosts
/// (`postgres://h1:5432,h2:5433/penora?target_session_attrs=read-write`):
/// each new connection tries them in turn and keeps the one that accepts
/// writes, the primary. After a failover the connections to the old primary
/// are closed (it stopped), the pool drops them as they come back (a closed
/// connection is never handed out again) and opens new ones, which find the
/// new primary; the requests caught in the switch answer `503`.
pub fn pool(db: &Db) -> Result<Pool, DbError> {
    pool_with(
        db.url.expose(),
        db.pool_size,
        db.lock_timeout.as_millis() as u64,
    )
}

/// Builds a pool for `url` with `size` connections and the default lock timeout.
pub fn pool_for(url: &str, size: usize) -> Result<Pool, DbError> {
    pool_with(url, size, 5000)
}

/// Builds a pool for `url` with `size` connections; a statement waits at most
/// `lock_timeout_ms` for a row lock (then fails as a retryable conflict).
pub fn pool_with(url: &str, size: usize, lock_timeout_ms: u64) -> Result<Pool, DbError> {
    let mut pg: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| DbError::Other(e.to_string()))?;
    pg.connect_timeout(Duration::from_secs(5));
    pg.application_name("penora-credits");
    // A statement (lock waits included) that takes this long is stuck: fail it
    // (503, retryable) rather than hold the request; an idle open transaction
    // is ended so it cannot keep row locks.
    pg.options(format!(
        "-c statement_timeout=10000 -c lock_timeout={lock_timeout_ms} -c idle_in_transaction_session_timeout=30000"
    ));
    let manager = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .timeouts(Timeouts {
            wait: Some(Duration::from_secs(5)),
            create: Some(Duration::from_secs(5)),
            recycle: Some(Duration::from_secs(5)),
        })
        .build()
        .map_err(|e| DbError::Other(e.to_string()))
}

/// Whether the database is distributed by `user_id` (Citus): then every
/// transaction of a batch must stay within one shard ([`shard_groups`]).
/// Learnt once per process, when it migrates ([`migrate`]) or, for operator
/// commands that do not, with [`learn_distribution`]; a process talks to one
/// database.
static DISTRIBUTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the database is distributed (Citus), as last learnt.
pub fn distributed() -> bool {
    DISTRIBUTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Learns whether the database behind `pool` is distributed (Citus).
pub async fn learn_distribution(pool: &Pool) -> Result<(), DbError> {
    learn_distribution_on(&**pool.get().await?).await
}

/// Learns whether the database is distributed (the citus extension).
async fn learn_distribution_on(client: &impl tokio_postgres::GenericClient) -> Result<(), DbError> {
    let citus: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')",
            &[],
        )
        .await?
        .get(0);
    if citus && !distributed() {
        tracing::info!(
            "the database is distributed by user_id (Citus): batches are grouped per shard"
        );
    }
    DISTRIBUTED.store(citus, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// The groups of `users` (indexes into it, in order) whose rows share one
/// shard: one group of all of them on a plain PostgreSQL (no query), and on
/// Citus one per shard, so that a batch's transaction never takes locks on
/// two shards (contract §15: group commit never waits on another shard).
pub async fn shard_groups(
    client: &impl deadpool_postgres::GenericClient,
    users: &[&str],
) -> Result<Vec<Vec<usize>>, DbError> {
    if !distributed() || users.len() < 2 {
        return Ok(vec![(0..users.len()).collect()]);
    }
    let rows = client
        .query(
            "SELECT get_shard_id_for_distribution_column('accounts', u) \
             FROM unnest($1::text[]) WITH ORDINALITY AS v(u, n) ORDER BY n",
            &[&users],
        )
        .await?;
    let mut groups: Vec<(i64, Vec<usize>)> = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let shard: i64 = row.get(0);
        match groups.iter_mut().find(|(s, _)| *s == shard) {
            Some((_, members)) => members.push(i),
            None => groups.push((shard, vec![i])),
        }
    }
    Ok(groups.into_iter().map(|(_, members)| members).collect())
}

/// `items` split per shard ([`shard_groups`]): the groups (indexes into
/// `items`) and each group's items, in order. One part of all of them on a
/// plain PostgreSQL (no query).
pub async fn shard_parts<Q: Clone>(
    client: &impl deadpool_postgres::GenericClient,
    items: &[Q],
    user_of: impl Fn(&Q) -> &str,
) -> Result<(Vec<Vec<usize>>, Vec<Vec<Q>>), DbError> {
    let users: Vec<&str> = items.iter().map(user_of).collect();
    let groups = shard_groups(client, &users).await?;
    let parts = groups
        .iter()
        .map(|group| group.iter().map(|&i| items[i].clone()).collect())
        .collect();
    Ok((groups, parts))
}

/// The answers of each group of [`shard_groups`] (in its members' order), put
/// back in the places its members came from; a place no group answered gets
/// `missing()`.
pub fn in_places<T>(
    len: usize,
    groups: &[Vec<usize>],
    answers: impl IntoIterator<Item = Vec<T>>,
    missing: impl Fn() -> T,
) -> Vec<T> {
    let mut placed: Vec<Option<T>> = (0..len).map(|_| None).collect();
    for (group, got) in groups.iter().zip(answers) {
        for (&i, answer) in group.iter().zip(got) {
            placed[i] = Some(answer);
        }
    }
    placed
        .into_iter()
        .map(|a| a.unwrap_or_else(&missing))
        .collect()
}

/// Applies pending migrations under the migration advisory lock.
pub async fn migrate(database_url: &str) -> Result<(), DbError> {
    migrate_to(database_url, None).await
}

/// [`migrate`], stopping at migration `version` when given (to test a
/// migration against data written by the versions before it).
pub async fn migrate_to(database_url: &str, version: Option<u32>) -> Result<(), DbError> {
    let (mut client, connection) = tokio_postgres::connect(database_url, NoTls).await?;
    let driver = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "migration connection closed");
        }
    });
    learn_distribution_on(&client).await?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await?;
    let target = version.map_or(refinery::Target::Latest, |v| {
        refinery::Target::Version(v as _)
    });
    let report = migrations::runner()
        .set_abort_divergent(true)
        .set_target(target)
        .run_async(&mut client)
        .await;
    // Unlock before looking at the result, so a failed migration frees the lock.
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    drop(client);
    driver.abort();
    let report = report.map_err(|e| DbError::Other(format!("migration failed: {e}")))?;
    unlocked?;
    for m in report.applied_migrations() {
        tracing::info!(version = m.version(), name = m.name(), "migration applied");
    }
    Ok(())
}

/// Readies the database for a service starting: with `DB_MIGRATE_ON_START`
/// (the default) applies pending migrations; without, changes nothing and
/// fails, naming `penora-ops migrate`, unless the schema has every migration
/// this build knows. Either way learns whether the database is distributed.
pub async fn prepare_schema(db: &Db, pool: &Pool) -> Result<(), DbError> {
    if db.migrate_on_start {
        let why = match migrate(db.url.expose()).await {
            Ok(()) => return Ok(()),
            // A migration that failed (not a database that is away).
            Err(DbError::Other(why)) => why,
            Err(other) => return Err(other),
        };
        // Refinery's error says only "error asserting migrations table":
        // name the setting that fits a role that may not change the schema.
        let may_create = match pool.get().await {
            Ok(client) => client
                .query_one(
                    "SELECT has_schema_privilege(current_user, 'public', 'CREATE')",
                    &[],
                )
                .await
                .map_or(true, |row| row.get(0)),
            Err(_) => true,
        };
        return Err(DbError::Other(if may_create {
            why
        } else {
            format!(
                "{why}: DATABASE_URL's role may not change the schema (an application role): \
                 set DB_MIGRATE_ON_START=false and run `penora-ops migrate` as the schema's owner"
            )
        }));
    }
    let client = pool.get().await?;
    let version = match client
        .query_one(
            "SELECT coalesce(max(version), 0)::int FROM refinery_schema_history",
            &[],
        )
        .await
    {
        Ok(row) => row.get::<_, i32>(0),
        // A database never migrated.
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => 0,
        Err(e) => return Err(e.into()),
    };
    let wanted = latest_migration_version();
    if version < wanted {
        return Err(DbError::Other(format!(
            "the schema is at version {version} and this build needs {wanted}: run `penora-ops migrate` \
             as the schema's owner first (DB_MIGRATE_ON_START=false: this service does not migrate)"
        )));
    }
    learn_distribution_on(&**client).await?;
    // The point of an application role is that it cannot drop the
    // append-only triggers: say so when this one could.
    let privileged: bool = client
        .query_one(
            "SELECT r.rolsuper OR pg_has_role(current_user, c.relowner, 'USAGE') \
             FROM pg_roles r, pg_class c \
             WHERE r.rolname = current_user AND c.oid = 'ledger_entries'::regclass",
            &[],
        )
        .await?
        .get(0);
    if privileged {
        tracing::warn!(
            "DATABASE_URL's role is a superuser or owns the schema: it could drop the append-only \
             triggers; connect the services as the application role (penora_app)"
        );
    }
    Ok(())
}

/// The version of the newest migration this build knows.
pub fn latest_migration_version() -> i32 {
    migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| m.version())
        .max()
        .unwrap_or(0)
}

/// Whether the database answers and has every migration this build knows
/// (what `/ready` reports). Returns the schema version on success.
pub async fn readiness(pool: &Pool) -> Result<i32, String> {
    let client = pool
        .get()
        .await
        .map_err(|e| format!("database unreachable: {e}"))?;
    let row = client
        .query_one(
            "SELECT coalesce(max(version), 0)::int FROM refinery_schema_history",
            &[],
        )
        .await
        .map_err(|e| format!("schema history unreadable: {e}"))?;
    let version: i32 = row.get(0);
    let wanted = latest_migration_version();
    if version < wanted {
        return Err(format!(
            "migrations pending: schema {version}, this build needs {wanted}"
        ));
    }
    Ok(version)
}
