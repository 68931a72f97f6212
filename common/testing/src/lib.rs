//! Test helpers: a fresh PostgreSQL database per test.
//!
//! The migrations are applied once into a template database whose name carries
//! a hash of the migrations (so a changed migration makes a new template); each
//! test then gets `CREATE DATABASE … TEMPLATE …`, which takes milliseconds, and
//! drops it when done. Tests therefore run in parallel and leave nothing
//! behind. A PostgreSQL that cannot be reached fails the test with a message
//! saying how to start it.

use std::collections::HashMap;

use sha2::{Digest, Sha256};
use tokio_postgres::NoTls;

use penora_config::{
    ApiSettings, Audit, Broker, ConfigError, Db, Http, Images, Ledger, Log, Webhooks, Worker,
    WorkerSettings, Workspace,
};

/// Where the test harness connects to create databases.
pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn with_database(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').unwrap_or((url, ""));
    format!("{base}/{db}")
}

/// Key of the advisory lock held while a test database is made or dropped
/// on Citus.
const CITUS_LOCK_KEY: i64 = 0x70_63_69_74_75_73;

/// Key of the advisory lock held while building the template.
const TEMPLATE_LOCK_KEY: i64 = 0x70_65_6e_74_65_73_74;

/// A connection to the admin database (panics, naming the fix, if PostgreSQL is down).
pub async fn admin_client() -> tokio_postgres::Client {
    let url = admin_url();
    match tokio_postgres::connect(&url, NoTls).await {
        Ok((client, conn)) => {
            tokio::spawn(async move {
                let _ = conn.await;
            });
            client
        }
        Err(e) => panic!(
            "PostgreSQL is not reachable at {url} ({e}). Start it with `scripts/services.sh` \
             (or set TEST_DATABASE_URL to a server where user postgres may create databases)."
        ),
    }
}

fn template_name() -> String {
    let mut hasher = Sha256::new();
    for m in penora_store::migrations::runner().get_migrations() {
        hasher.update(m.version().to_le_bytes());
        hasher.update(m.checksum().to_le_bytes());
    }
    format!("penora_tpl_{}", &hex::encode(hasher.finalize())[..16])
}

/// A database of its own for one test; dropped (with `FORCE`) when this value
/// is dropped.
pub struct TestDb {
    /// The database's name.
    pub name: String,
    /// Its connection string.
    pub url: String,
}

/// The Citus workers (`host:port`, comma-separated in
/// `TEST_CITUS_WORKERS`) when `TEST_DATABASE_URL` is a Citus coordinator
/// (`scripts/cluster.sh citus`): each test's database is then created on
/// every node and distributed by the migrations. Empty otherwise.
fn citus_workers() -> Vec<String> {
    std::env::var("TEST_CITUS_WORKERS")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A statement on database `db` of the server at `url` (its admin URL).
async fn run_on(url: &str, db: &str, sql: &str) {
    let target = with_database(url, db);
    let (client, conn) = tokio_postgres::connect(&target, NoTls)
        .await
        .unwrap_or_else(|e| panic!("Citus node {target} is not reachable ({e}): start it with `scripts/cluster.sh citus up`"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql} on {target}: {}", penora_store::error_chain(&e)));
}

/// The admin URL of Citus worker `host:port` (same user as the coordinator's).
fn worker_admin_url(worker: &str) -> String {
    let admin = admin_url();
    let (scheme_user, rest) = admin
        .split_once('@')
        .unwrap_or(("postgres://postgres", &admin));
    let db = rest.rsplit_once('/').map_or("postgres", |(_, d)| d);
    format!("{scheme_user}@{worker}/{db}")
}

impl TestDb {
    /// Creates a fresh, migrated database.
    pub async fn new() -> Self {
        let workers = citus_workers();
        if !workers.is_empty() {
            return Self::new_on_citus(&workers).await;
        }
        let admin = admin_client().await;
        let template = template_name();
        ensure_template(&admin, &template).await;
        let name = format!("penora_test_{}", uuid::Uuid::new_v4().simple());
        admin
            .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "creating test database {name}: {}",
                    penora_store::error_chain(&e)
                )
            });
        Self {
            url: with_database(&admin_url(), &name),
            name,
        }
    }

    /// A database on the Citus coordinator and on every worker, joined into
    /// one cluster, migrated (so distributed by user_id).
    async fn new_on_citus(workers: &[String]) -> Self {
        let admin = admin_client().await;
        // One database made or dropped at a time: Citus joins each node to
        // the others, and a node's database dropped meanwhile fails the join.
        admin
            .execute("SELECT pg_advisory_lock($1)", &[&CITUS_LOCK_KEY])
            .await
            .unwrap_or_else(|e| panic!("locking the Citus nodes: {e}"));
        let name = format!("penora_test_{}", uuid::Uuid::new_v4().simple());
        let create = format!("CREATE DATABASE {name}");
        admin
            .batch_execute(&create)
            .await
            .unwrap_or_else(|e| panic!("{create}: {}", penora_store::error_chain(&e)));
        // 8 shards a table (Citus makes 32 by default): every test still
        // spreads its users over both workers, and its database is made in
        // a quarter of the time.
        let shards = format!("ALTER DATABASE {name} SET citus.shard_count = 8");
        admin
            .batch_execute(&shards)
            .await
            .unwrap_or_else(|e| panic!("{shards}: {}", penora_store::error_chain(&e)));
        for w in workers {
            run_on(&worker_admin_url(w), "postgres", &create).await;
            run_on(&worker_admin_url(w), &name, "CREATE EXTENSION citus").await;
        }
        let url = with_database(&admin_url(), &name);
        let coordinator = url
            .split_once('@')
            .and_then(|(_, rest)| rest.split_once('/'))
            .map_or("127.0.0.1:5432", |(hostport, _)| hostport)
            .to_owned();
        let (host, port) = coordinator
            .split_once(':')
            .unwrap_or((&coordinator, "5432"));
        let mut join =
            format!("CREATE EXTENSION citus; SELECT citus_set_coordinator_host('{host}', {port});");
        for w in workers {
            let (h, p) = w.split_once(':').unwrap_or((w, "5432"));
            join.push_str(&format!("SELECT citus_add_node('{h}', {p});"));
        }
        run_on(&admin_url(), &name, &join).await;
        let _ = admin
            .execute("SELECT pg_advisory_unlock($1)", &[&CITUS_LOCK_KEY])
            .await;
        if let Err(e) = penora_store::migrate(&url).await {
            panic!("migrating {name} on Citus: {e}");
        }
        Self { url, name }
    }

    /// Settings pointing at this database, with `overrides` applied
    /// (environment variable names as keys): every section, from which
    /// [`TestSettings::api`] and [`TestSettings::worker`] make each
    /// binary's.
    pub fn settings(&self, overrides: &[(&str, &str)]) -> TestSettings {
        let mut vars: HashMap<String, String> = HashMap::new();
        vars.insert("DATABASE_URL".into(), self.url.clone());
        vars.insert("BIND_ADDR".into(), "127.0.0.1:0".into());
        vars.insert("DB_POOL_SIZE".into(), "8".into());
        // No broker unless a test asks for one (with a queue prefix of its own):
        // jobs then wait in the outbox, where the API tests look for them.
        vars.insert(
            "AMQP_URL".into(),
            "amqp://guest:guest@127.0.0.1:1/%2f".into(),
        );
        // Every test database gets a webhook secrets key of its own (a
        // process-wide one: the API and worker of one test must agree).
        vars.insert("WEBHOOK_SECRET_KEY".into(), test_webhook_key().to_owned());
        for (k, v) in overrides {
            vars.insert((*k).into(), (*v).into());
        }
        match TestSettings::from_lookup(|k| vars.get(k).cloned()) {
            Ok(s) => s,
            Err(e) => panic!("test settings: {e}"),
        }
    }
}

/// Every section of the settings, for tests (no binary loads them all): a
/// test sets any variable, or changes a field (the database URL of a role)
/// once for the API and the worker it builds from the same value.
#[derive(Debug, Clone)]
pub struct TestSettings {
    /// `LOG_FORMAT`.
    pub log: Log,
    /// PostgreSQL.
    pub db: Db,
    /// The API's HTTP side.
    pub http: Http,
    /// RabbitMQ.
    pub broker: Broker,
    /// The worker's own.
    pub worker: Worker,
    /// Images and saves.
    pub images: Images,
    /// Money rules and the batching of deductions.
    pub ledger: Ledger,
    /// Storage quota and projects cap.
    pub workspace: Workspace,
    /// The audit MAC key.
    pub audit: Audit,
    /// Webhook registration and delivery.
    pub webhooks: Webhooks,
}

impl TestSettings {
    /// Reads every section through `lookup`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        Ok(Self {
            log: Log::from_lookup(&lookup)?,
            db: Db::from_lookup(&lookup)?,
            http: Http::from_lookup(&lookup)?,
            broker: Broker::from_lookup(&lookup)?,
            worker: Worker::from_lookup(&lookup)?,
            images: Images::from_lookup(&lookup)?,
            ledger: Ledger::from_lookup(&lookup)?,
            workspace: Workspace::from_lookup(&lookup)?,
            audit: Audit::from_lookup(&lookup)?,
            webhooks: Webhooks::from_lookup(&lookup)?,
        })
    }

    /// The API's settings.
    pub fn api(&self) -> ApiSettings {
        ApiSettings {
            log: self.log.clone(),
            db: self.db.clone(),
            http: self.http.clone(),
            broker: self.broker.clone(),
            images: self.images.clone(),
            ledger: self.ledger.clone(),
            workspace: self.workspace.clone(),
            webhooks: self.webhooks.clone(),
        }
    }

    /// The worker's settings.
    pub fn worker(&self) -> WorkerSettings {
        WorkerSettings {
            log: self.log.clone(),
            db: self.db.clone(),
            broker: self.broker.clone(),
            worker: self.worker.clone(),
            images: self.images.clone(),
            audit: self.audit.clone(),
            webhooks: self.webhooks.clone(),
        }
    }
}

async fn ensure_template(admin: &tokio_postgres::Client, template: &str) {
    let fail = |what: &str, e: tokio_postgres::Error| -> ! {
        panic!("{what}: {}", penora_store::error_chain(&e))
    };
    admin
        .execute("SELECT pg_advisory_lock($1)", &[&TEMPLATE_LOCK_KEY])
        .await
        .unwrap_or_else(|e| fail("locking the template", e));
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&template])
        .await
        .unwrap_or_else(|e| fail("looking for the template", e))
        .is_some();
    if !exists {
        let building = format!("{template}_building");
        // One statement per call: DROP/CREATE DATABASE refuse to run in the
        // implicit transaction of a multi-statement query.
        for sql in [
            format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)"),
            format!("CREATE DATABASE {building}"),
        ] {
            admin
                .batch_execute(&sql)
                .await
                .unwrap_or_else(|e| fail("creating the template", e));
        }
        if let Err(e) = penora_store::migrate(&with_database(&admin_url(), &building)).await {
            panic!("migrating the template: {e}");
        }
        // The migration connection may still be closing: end it before renaming.
        for sql in [
            format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{building}' AND pid <> pg_backend_pid()"
            ),
            format!("ALTER DATABASE {building} RENAME TO {template}"),
        ] {
            admin
                .batch_execute(&sql)
                .await
                .unwrap_or_else(|e| fail("finishing the template", e));
        }
        // Templates of older migrations are no longer needed (unless
        // checkouts with other migrations test side by side on this server:
        // PENORA_TEST_KEEP_TEMPLATES=1).
        let keep = std::env::var_os("PENORA_TEST_KEEP_TEMPLATES").is_some();
        let old = if keep {
            Vec::new()
        } else {
            admin
            .query(
                "SELECT datname FROM pg_database WHERE datname LIKE 'penora\\_tpl\\_%' AND datname <> $1 \
                 AND datname NOT LIKE '%\\_building'",
                &[&template],
            )
            .await
            .unwrap_or_else(|e| fail("listing old templates", e))
        };
        for row in old {
            let name: String = row.get(0);
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
        }
    }
    admin
        .execute("SELECT pg_advisory_unlock($1)", &[&TEMPLATE_LOCK_KEY])
        .await
        .unwrap_or_else(|e| fail("unlocking the template", e));
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside the test's runtime: do the async work on a thread of its own.
        let handle = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let citus = !citus_workers().is_empty();
                // Held until the workers' copies are dropped too (the lock
                // goes with this connection).
                let admin = tokio_postgres::connect(&admin_url(), NoTls).await.ok();
                if let Some((client, conn)) = admin {
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    if citus {
                        let _ = client
                            .execute("SELECT pg_advisory_lock($1)", &[&CITUS_LOCK_KEY])
                            .await;
                    }
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                    drop_on_workers(&name).await;
                }
            });
        });
        let _ = handle.join();
    }
}

/// Drops database `name` on every Citus worker (none without Citus).
async fn drop_on_workers(name: &str) {
    for w in citus_workers() {
        if let Ok((client, conn)) = tokio_postgres::connect(&worker_admin_url(&w), NoTls).await {
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let _ = client
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
        }
    }
}

/// A clock the tests control: moves every time the ledger, the lots and the
/// reservations of the test's database hold back by `by`, which is the same
/// as moving the database's clock `by` forward (a lot that expires in 60 s
/// expires 1 ms ago after `travel(60.001 s)`; a reservation's window
/// passes; the spending of a spend limit moves to the days its
/// reservations moved to). The guard triggers that refuse such edits are switched off for
/// the one transaction that makes them; only a test's own database may be
/// moved. The audit chain in the ledger is hashed again ([`rechain`]); the
/// old chain's records (before V18) of entries written before a travel no
/// longer match them.
pub async fn travel(client: &mut deadpool_postgres::Client, by: std::time::Duration) {
    let secs = by.as_secs_f64();
    let tx = client.transaction().await.expect("travel: transaction");
    // (On Citus, triggers of distributed tables may be switched only so.)
    tx.batch_execute("SET LOCAL citus.enable_unsafe_triggers = on")
        .await
        .expect("travel: citus setting");
    let tables = [
        "ledger_entries",
        "lot_movements",
        "credit_lots",
        "reservations",
    ];
    for t in tables {
        tx.batch_execute(&format!("ALTER TABLE {t} DISABLE TRIGGER USER"))
            .await
            .expect("travel: triggers off");
    }
    // `timestamptz - interval` is STABLE, which Citus refuses beside column
    // references in an UPDATE; the same in UTC timestamps is IMMUTABLE.
    let back = |column: &str| {
        format!(
            "{column} = ({column} AT TIME ZONE 'UTC' - make_interval(secs => $1)) AT TIME ZONE 'UTC'"
        )
    };
    for (table, columns) in [
        ("ledger_entries", &["created_at"][..]),
        ("lot_movements", &["created_at"][..]),
        (
            "credit_lots",
            &["created_at", "expires_at", "closed_at"][..],
        ),
        (
            "reservations",
            &[
                "created_at",
                "refundable_until",
                "settled_at",
                "refunded_at",
            ][..],
        ),
    ] {
        let sets: Vec<String> = columns.iter().map(|c| back(c)).collect();
        let sql = format!("UPDATE {table} SET {}", sets.join(", "));
        tx.execute(&sql, &[&secs])
            .await
            .expect("travel: times moved");
    }
    // Spending per day is what the reservations made that day hold (V16):
    // their days moved with them, so it is counted again from them.
    tx.batch_execute(
        "DELETE FROM spend_days; \
         INSERT INTO spend_days (user_id, app_name, day, spent) \
         SELECT r.user_id, r.app_name, (r.created_at AT TIME ZONE 'UTC')::date, sum(r.amount - r.refunded_amount) \
         FROM reservations r WHERE r.user_id IN (SELECT user_id FROM spend_limits) GROUP BY 1, 2, 3",
    )
    .await
    .expect("travel: spending counted again");
    rechain(&tx).await;
    for t in tables {
        tx.batch_execute(&format!("ALTER TABLE {t} ENABLE TRIGGER USER"))
            .await
            .expect("travel: triggers on");
    }
    tx.commit().await.expect("travel: committed");
}

/// The audit chain in the ledger hashed again after a travel moved its
/// entries' times (each link's hash covers its time): every link, the heads
/// on the accounts and the checkpoints' hashes, as if the history had
/// happened that much earlier. (A checkpoint's MAC is left as it was: a test
/// that travels with `AUDIT_HMAC_KEY` set finds it stale.) What a superuser
/// who rewrites history would do; the tests of the MAC anchor do it too.
pub async fn rechain(tx: &deadpool_postgres::Transaction<'_>) {
    use penora_domain::chain::Content;
    let rows = tx
        .query(
            "SELECT id, user_id, kind, amount, balance_after, app_name, description, project_code, \
                    reference, created_at, chain_seq, prev_hash, acted_by FROM ledger_entries \
             WHERE hash IS NOT NULL ORDER BY user_id, id",
            &[],
        )
        .await
        .expect("travel: the chain read");
    let (mut ids, mut prevs, mut hashes): (Vec<i64>, Vec<Vec<u8>>, Vec<Vec<u8>>) =
        (vec![], vec![], vec![]);
    let mut heads: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
    for r in &rows {
        let user: String = r.get("user_id");
        let prev = match heads.get(&user) {
            Some(h) => h.clone(),
            None => r.get("prev_hash"),
        };
        let content = Content {
            entry_id: r.get("id"),
            seq: r.get("chain_seq"),
            user_id: r.get("user_id"),
            kind: r.get("kind"),
            amount: r.get("amount"),
            balance_after: r.get("balance_after"),
            app_name: r.get("app_name"),
            description: r.get("description"),
            project_code: r.get("project_code"),
            reference: r.get("reference"),
            created_at: penora_domain::timefmt::rfc3339_millis(r.get("created_at")),
            acted_by: r.get("acted_by"),
        };
        let hash = content
            .hash_after(&prev)
            .expect("travel: a link hashed")
            .to_vec();
        ids.push(content.entry_id);
        prevs.push(prev);
        hashes.push(hash.clone());
        heads.insert(user, hash);
    }
    tx.execute(
        "UPDATE ledger_entries l SET prev_hash = v.prev, hash = v.hash \
         FROM unnest($1::int8[], $2::bytea[], $3::bytea[]) AS v(id, prev, hash) WHERE l.id = v.id",
        &[&ids, &prevs, &hashes],
    )
    .await
    .expect("travel: links hashed again");
    tx.batch_execute(
        "UPDATE accounts a SET chain_hash = l.hash FROM ledger_entries l \
           WHERE l.user_id = a.user_id AND l.chain_seq = a.chain_seq AND a.chain_seq > 0; \
         UPDATE audit_checkpoints c SET hash = l.hash FROM ledger_entries l \
           WHERE l.user_id = c.user_id AND l.id = c.entry_id",
    )
    .await
    .expect("travel: heads and checkpoints hashed again");
}

/// Key of the advisory lock held while the test harness lets the
/// application role log in (concurrent `ALTER ROLE`s of one role fail).
const APP_ROLE_LOCK_KEY: i64 = 0x70_61_70_70_72_6f_6c;

impl TestDb {
    /// This database's URL as the application role `penora_app` (migration
    /// V12), which the harness lets log in first: `LOGIN` with the password
    /// `penora_app`, on this test server only (the role is cluster-wide, and
    /// V12 makes it `NOLOGIN`).
    pub async fn app_role_url(&self) -> String {
        let admin = admin_client().await;
        let fail = |what: &str, e: tokio_postgres::Error| -> ! {
            panic!("{what}: {}", penora_store::error_chain(&e))
        };
        admin
            .execute("SELECT pg_advisory_lock($1)", &[&APP_ROLE_LOCK_KEY])
            .await
            .unwrap_or_else(|e| fail("locking the application role", e));
        let can_login: bool = admin
            .query_one(
                "SELECT rolcanlogin FROM pg_roles WHERE rolname = 'penora_app'",
                &[],
            )
            .await
            .unwrap_or_else(|e| fail("reading the application role (migrated?)", e))
            .get(0);
        if !can_login {
            admin
                .batch_execute("ALTER ROLE penora_app LOGIN PASSWORD 'penora_app'")
                .await
                .unwrap_or_else(|e| fail("letting the application role log in", e));
        }
        admin
            .execute("SELECT pg_advisory_unlock($1)", &[&APP_ROLE_LOCK_KEY])
            .await
            .unwrap_or_else(|e| fail("unlocking the application role", e));
        let (scheme, rest) = self
            .url
            .split_once("://")
            .unwrap_or(("postgres", &self.url));
        let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        format!("{scheme}://penora_app:penora_app@{host}")
    }
}

/// A random `WEBHOOK_SECRET_KEY` made once per test process.
pub fn test_webhook_key() -> &'static str {
    static KEY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        // Two v4 UUIDs: 64 hex characters, 244 random bits (tests only).
        format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        )
    })
}
