//! `penora-worker`: the queue half of Penora Credits.
//!
//! One process runs four loops until it is told to stop:
//! * the consumers of `penora.save-project`, `penora.ledger-audit` and
//!   `penora.generation-events` (see [`consumer`]), reconnecting with the
//!   `backon` policy when RabbitMQ goes away;
//! * the outbox relay: woken in-process after the worker's own commits that
//!   wrote jobs (refunds, settlements), and every second a sweep that
//!   publishes whatever the API could not (broker down, API killed between
//!   commit and confirm);
//! * the timers: reservations past their refund window are settled, old
//!   outbox rows an earlier version kept after publishing pruned;
//! * `/metrics` and `/health` on `WORKER_METRICS_ADDR`.
//!
//! A loop that panics (a bug) is counted in `penora_task_panics_total{task}`
//! and started again (`penora_platform::tasks`); a handler's panic parks its
//! message ([`consumer::handle`]). On stop, every loop ends within the one
//! shutdown deadline [`Worker::run`] is given.

pub mod consumer;
pub mod handlers;
pub mod message;
pub mod retry;
pub mod webhooks;

use std::{panic::AssertUnwindSafe, sync::Arc, time::Duration};

use anyhow::Context as _;
use axum::{
    Extension, Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get,
};
use deadpool_postgres::Pool;
use futures_util::FutureExt;
use metrics_exporter_prometheus::PrometheusHandle;
use penora_config::WorkerSettings;
use penora_domain::{AppName, ProjectCode, UserId};
use penora_ledger as ledger;
use penora_platform::broker::{self, Publisher, Topology, WORK_QUEUES};
use penora_platform::{relay, tasks};
use penora_store as db;
use penora_store::outbox;
use tokio::{net::TcpListener, task::JoinSet, time::Instant};
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;

use crate::retry::RetryPolicy;

/// What every handler and loop shares.
pub struct Context {
    /// The settings the worker started with.
    pub settings: WorkerSettings,
    /// PostgreSQL.
    pub pool: Pool,
    /// Queue names.
    pub topology: Topology,
    /// Publishes retry and parked copies, and outbox rows.
    pub publisher: Arc<Publisher>,
    /// When to try again.
    pub policy: RetryPolicy,
    /// Whether the consumers hold a live broker connection.
    pub consuming: std::sync::atomic::AtomicBool,
    /// Wakes the outbox relay after a commit that wrote jobs.
    pub outbox_wake: Arc<tokio::sync::Notify>,
    /// Threads checking saved images and making their thumbnails, at the
    /// lowest CPU priority.
    pub images: penora_workspace::cpu_pool::CpuPool,
    /// The key of the audit records' MACs (`AUDIT_HMAC_KEY`), when set.
    pub audit_mac: Option<penora_ledger::audit::MacKey>,
    /// Webhook delivery: the client, the secrets' key, the endpoints' gates.
    pub webhooks: webhooks::Runtime,
}

impl Context {
    /// Tells the relay that new jobs were committed.
    pub fn jobs_committed(&self) {
        self.outbox_wake.notify_one();
    }
}

/// A built worker, ready to run.
pub struct Worker {
    ctx: Arc<Context>,
    listener: TcpListener,
    metrics: PrometheusHandle,
    /// Where `/metrics` and `/health` are served.
    pub metrics_addr: std::net::SocketAddr,
}

/// The process-wide Prometheus recorder.
pub fn metrics_handle() -> PrometheusHandle {
    penora_platform::telemetry::metrics_handle()
}

/// Migrates (see [`db::prepare_schema`]), connects the pool and binds the
/// metrics address.
pub async fn build(settings: WorkerSettings) -> anyhow::Result<Worker> {
    build_with_resolver(
        settings,
        Arc::new(penora_platform::webhooks::client::SystemResolver),
    )
    .await
}

/// [`build`], resolving webhook endpoints' names through `resolver` (tests
/// decide what a name resolves to, and change it).
pub async fn build_with_resolver(
    settings: WorkerSettings,
    resolver: Arc<dyn penora_platform::webhooks::client::Resolve>,
) -> anyhow::Result<Worker> {
    let webhooks = webhooks::Runtime::new(&settings.webhooks, resolver)
        .map_err(|e| anyhow::anyhow!(e))
        .context("Failed to set up webhook delivery")?;
    penora_ledger::events_out::set_default_threshold(settings.worker.low_balance_threshold);
    let pool = db::pool(&settings.db).context("Failed to create the database pool")?;
    db::prepare_schema(&settings.db, &pool).await.context(
        "Failed to prepare the database schema (is PostgreSQL running? see DATABASE_URL, DB_MIGRATE_ON_START)",
    )?;
    let audit_mac = penora_ledger::audit::MacKey::from_settings(&settings.audit)
        .context("Bad AUDIT_HMAC_KEY")?;
    let listener = TcpListener::bind(settings.worker.metrics_addr)
        .await
        .with_context(|| {
            format!(
                "Failed to bind WORKER_METRICS_ADDR {}",
                settings.worker.metrics_addr
            )
        })?;
    let metrics_addr = listener.local_addr()?;
    let topology = Topology::from_settings(&settings.broker);
    let policy = RetryPolicy {
        max_attempts: settings.broker.retry_max_attempts,
        initial: settings.worker.retry_base,
        max: settings.worker.retry_max,
    };
    let publisher = Arc::new(
        Publisher::new(
            settings.broker.url.clone(),
            "penora-worker",
            topology.clone(),
        )
        .with_confirm_timeout(settings.broker.confirm_timeout),
    );
    let images = penora_workspace::cpu_pool::CpuPool::start(
        "penora-images",
        settings.images.threads,
        settings.images.cpu_cgroup.as_deref(),
    )
    .context("Failed to start the image threads")?;
    Ok(Worker {
        ctx: Arc::new(Context {
            webhooks,
            images,
            audit_mac,
            settings,
            pool,
            topology,
            publisher,
            policy,
            consuming: std::sync::atomic::AtomicBool::new(false),
            outbox_wake: Arc::new(tokio::sync::Notify::new()),
        }),
        listener,
        metrics: metrics_handle(),
        metrics_addr,
    })
}

impl Worker {
    /// Runs until `stop` fires, then finishes in-flight work within
    /// `deadline` (the process's one shutdown deadline, counted from `stop`:
    /// the consumers' drain, the relay, the timers and `/metrics` all end by
    /// then) and returns.
    pub async fn run(self, stop: CancellationToken, deadline: Duration) -> anyhow::Result<()> {
        let ctx = self.ctx;
        let mut loops = JoinSet::new();
        // The metrics server is not restarted: axum serves each connection
        // in a task of its own, so a panicking handler ends its connection
        // only, and `CatchPanicLayer` answers it with a 500 and counts it.
        loops.spawn(serve_http(
            self.listener,
            ctx.clone(),
            self.metrics,
            stop.clone(),
        ));
        loops.spawn(tasks::supervised("relay", stop.clone(), {
            let (ctx, stop) = (ctx.clone(), stop.clone());
            move || relay_loop(ctx.clone(), stop.clone())
        }));
        loops.spawn(tasks::supervised("timers", stop.clone(), {
            let (ctx, stop) = (ctx.clone(), stop.clone());
            move || timer_loop(ctx.clone(), stop.clone())
        }));
        loops.spawn(tasks::supervised("webhook_gauges", stop.clone(), {
            let (ctx, stop) = (ctx.clone(), stop.clone());
            move || webhook_gauges(ctx.clone(), stop.clone())
        }));
        loops.spawn(tasks::supervised("queue_gauges", stop.clone(), {
            let (ctx, stop) = (ctx.clone(), stop.clone());
            move || queue_gauges(ctx.clone(), stop.clone())
        }));
        let reporter = format!(
            "{}:{}:{}",
            ctx.settings.worker.host_name,
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        loops.spawn(tasks::supervised("audit_lag", stop.clone(), {
            let (pool, stop) = (ctx.pool.clone(), stop.clone());
            move || {
                penora_ledger::backpressure::report_loop(
                    pool.clone(),
                    reporter.clone(),
                    stop.clone(),
                )
            }
        }));
        let consumers = tasks::supervised("consumers", stop.clone(), {
            let (ctx, stop) = (ctx.clone(), stop.clone());
            move || consume_loop(ctx.clone(), stop.clone(), deadline)
        });
        // The deadline runs from the stop: the consumers drain within it
        // (each from the moment it sees the stop), and the other loops,
        // stopping meanwhile, are waited for until it passes.
        let ((), by) = tokio::join!(consumers, async {
            stop.cancelled().await;
            Instant::now() + deadline
        });
        let left = tasks::join_until(&mut loops, by).await;
        if left > 0 {
            tracing::warn!(
                left,
                deadline_secs = deadline.as_secs_f64(),
                "loops still running at the shutdown deadline; stopped"
            );
        }
        tracing::info!("penora-worker stopped");
        Ok(())
    }
}

/// Connects, declares the topology, consumes every queue; reconnects when the
/// connection fails; returns when `stop` fires, each consumer having drained
/// its in-flight messages within `deadline`.
async fn consume_loop(ctx: Arc<Context>, stop: CancellationToken, deadline: Duration) {
    while !stop.is_cancelled() {
        let Some(connection) =
            broker::connect_until(ctx.settings.broker.url.expose(), "penora-worker", &stop).await
        else {
            break;
        };
        let declared = async {
            ctx.topology.declare(&connection).await?;
            let ch = connection.create_channel().await?;
            ch.close(200, "declared".into()).await
        }
        .await;
        if let Err(e) = declared {
            tracing::warn!(error = %e, "declaring the topology failed; reconnecting");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        tracing::info!("consuming");
        ctx.consuming
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let broken = CancellationToken::new();
        let mut consumers = Vec::new();
        for work in WORK_QUEUES {
            let (ctx, stop, broken) = (ctx.clone(), stop.clone(), broken.clone());
            let conn = &connection;
            consumers.push(async move {
                let consuming = consumer::consume(ctx, conn, work, stop, broken.clone(), deadline);
                // A consumer that panicked (a bug outside any handler, which
                // `consumer::handle` contains) leaves its deliveries
                // unacknowledged: the connection is closed below, so the
                // broker returns them, and everything starts again.
                let result = match AssertUnwindSafe(consuming).catch_unwind().await {
                    Ok(result) => result,
                    Err(panic) => {
                        metrics::counter!("penora_task_panics_total", "task" => "consumer")
                            .increment(1);
                        tracing::error!(
                            queue = work,
                            panic = tasks::panic_message(panic.as_ref()),
                            "a consumer panicked (a bug); reconnecting"
                        );
                        Ok(())
                    }
                };
                if let Err(e) = &result {
                    tracing::warn!(queue = work, error = %e, "consumer stopped");
                }
                // One consumer down means the connection is suspect: restart all.
                broken.cancel();
                result
            });
        }
        futures_util::future::join_all(consumers).await;
        ctx.consuming
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let _ = connection.close(200, "bye".into()).await;
        if !stop.is_cancelled() {
            metrics::counter!("penora_worker_reconnects_total").increment(1);
            tracing::warn!("connection to RabbitMQ lost; reconnecting");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Publishes outbox rows when woken by the worker's own commits, and every
/// second (rows the API could not publish). There is no `NOTIFY` on the
/// outbox: a notifying commit takes a database-wide lock (see migration V3).
async fn relay_loop(ctx: Arc<Context>, stop: CancellationToken) {
    relay::publish_loop(
        ctx.pool.clone(),
        ctx.publisher.clone(),
        relay::RelayPolicy::from_settings(&ctx.settings.broker),
        ctx.outbox_wake.clone(),
        stop,
    )
    .await;
}

/// Grants the periods of recurring allowances started by `now`; settles
/// reservations past their refund window; writes the `expire`
/// entries of lots past their expiry and the `credits.expiring` events of
/// lots expiring within `EXPIRY_NOTICE_SECS`; deletes projects past
/// `PROJECT_RETENTION_DAYS`; prunes the outbox and the spending no spend
/// limit counts any more.
async fn timer_loop(ctx: Arc<Context>, stop: CancellationToken) {
    loop {
        // Before the expiry: a period's grant expires its ending lot itself,
        // in the same transaction, and carries its rollover from it. The
        // periods are judged by the database's clock, which stamps the rows
        // (and every other time rule), not by this host's.
        match grant_allowances(&ctx, database_now(&ctx).await, 500).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(grants = n, "granted the periods of recurring allowances"),
            Err(e) => tracing::warn!(error = %e, "granting recurring allowances failed"),
        }
        match expire_lots(&ctx, 500).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(credits = n, "expired credits of lots past their expiry"),
            Err(e) => tracing::warn!(error = %e, "expiring lots failed"),
        }
        match notice_expiring(&ctx, 500).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(lots = n, "wrote credits.expiring for lots expiring soon"),
            Err(e) => tracing::warn!(error = %e, "noticing lots expiring soon failed"),
        }
        match settle_expired(&ctx, 500).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(settled = n, "settled reservations past their refund window"),
            Err(e) => tracing::warn!(error = %e, "settling expired reservations failed"),
        }
        match delete_retired(&ctx, time::OffsetDateTime::now_utc(), 500).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "deleted projects past the retention period"),
            Err(e) => tracing::warn!(error = %e, "deleting projects past retention failed"),
        }
        if let Ok(client) = ctx.pool.get().await {
            let _ = outbox::prune(&client, 7).await;
            // Spending older than any limit's period counts for nothing.
            let _ = ledger::tables::limits::prune(&client, time::OffsetDateTime::now_utc()).await;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(ctx.settings.worker.settle_interval) => {},
        }
    }
}

/// Deletes up to `limit` projects older than `PROJECT_RETENTION_DAYS` before
/// `now` (nothing when it is unset), freeing their bytes.
pub async fn delete_retired(
    ctx: &Context,
    now: time::OffsetDateTime,
    limit: i64,
) -> Result<usize, anyhow::Error> {
    let Some(retention) = ctx.settings.worker.project_retention else {
        return Ok(0);
    };
    let cutoff = now - retention;
    let mut client = ctx.pool.get().await?;
    Ok(penora_workspace::projects::delete_older_than(&mut client, cutoff, limit).await?)
}

/// The database's `now()`, or this host's clock when it cannot be read.
async fn database_now(ctx: &Context) -> time::OffsetDateTime {
    let read = async {
        let client = ctx.pool.get().await.ok()?;
        client
            .query_one("SELECT now()", &[])
            .await
            .ok()?
            .try_get(0)
            .ok()
    };
    read.await.unwrap_or_else(time::OffsetDateTime::now_utc)
}

/// Grants the periods of up to `limit` recurring allowances that have
/// started by `now` (contract §16; each once, by its reference; a period
/// that ended while the worker was down is not granted). Returns how many
/// periods were granted.
pub async fn grant_allowances(
    ctx: &Context,
    now: time::OffsetDateTime,
    limit: i64,
) -> Result<usize, anyhow::Error> {
    let mut client = ctx.pool.get().await?;
    let grants = ledger::allowances::grant_due(&mut client, now, limit).await?;
    let made = grants.iter().filter(|g| !g.replayed).count();
    if made > 0 {
        ctx.jobs_committed();
    }
    Ok(made)
}

/// Writes the `expire` entries of the lots past their expiry of up to
/// `limit` users (a user's next movement may have done it first). Returns
/// the credits expired.
pub async fn expire_lots(ctx: &Context, limit: i64) -> Result<i64, anyhow::Error> {
    let mut client = ctx.pool.get().await?;
    let users = ledger::users_with_due_lots(&client, limit).await?;
    let mut expired = 0;
    for user in users {
        let n = ledger::expire_lots(&mut client, &user).await?;
        if n > 0 {
            expired += n;
            ctx.jobs_committed();
        }
    }
    Ok(expired)
}

/// Writes `credits.expiring` for the lots with credits left that expire
/// within `EXPIRY_NOTICE_SECS`, once per lot, for up to `limit` users.
/// Returns how many lots were noticed.
pub async fn notice_expiring(ctx: &Context, limit: i64) -> Result<usize, anyhow::Error> {
    let mut client = ctx.pool.get().await?;
    let n = ledger::notice_expiring(&mut client, ctx.settings.worker.expiry_notice, limit).await?;
    if n > 0 {
        ctx.jobs_committed();
    }
    Ok(n)
}

/// Settles up to `limit` reservations whose refund window has passed.
pub async fn settle_expired(ctx: &Context, limit: i64) -> Result<usize, anyhow::Error> {
    let mut client = ctx.pool.get().await?;
    let due = client
        .query(
            "SELECT user_id, app_name, project_code FROM reservations \
             WHERE state IN ('reserved', 'partially_refunded') AND refundable_until < now() \
             ORDER BY refundable_until LIMIT $1",
            &[&limit],
        )
        .await?;
    let mut settled = 0;
    for row in due {
        let (Ok(user), Ok(app), Ok(code)) = (
            UserId::parse(row.get("user_id")),
            AppName::parse("app_name", row.get("app_name")),
            ProjectCode::parse(row.get("project_code")),
        ) else {
            continue;
        };
        if ledger::settle(
            &mut client,
            &user,
            &app,
            &code,
            (ledger::SettledBy::Window, "refund window passed"),
            None,
            None,
        )
        .await?
            == ledger::SettleResult::Settled
        {
            settled += 1;
            ctx.jobs_committed();
        }
    }
    Ok(settled)
}

#[derive(serde::Serialize)]
struct Health {
    status: &'static str,
    database: &'static str,
    broker: &'static str,
    outbox_pending: Option<i64>,
    version: &'static str,
}

/// What `/health` and `/ready` read from the database, probed at most once a
/// second and shared by every caller: a flood of health checks costs one
/// query a second.
struct Probes {
    pending: penora_platform::refreshed::Refreshed<Option<i64>>,
    ready: penora_platform::refreshed::Refreshed<Result<i32, String>>,
}

impl Default for Probes {
    fn default() -> Self {
        use penora_platform::refreshed::{PROBE_INTERVAL, Refreshed};
        Self {
            pending: Refreshed::new(PROBE_INTERVAL),
            ready: Refreshed::new(PROBE_INTERVAL),
        }
    }
}

async fn health(
    State(ctx): State<Arc<Context>>,
    Extension(probes): Extension<Arc<Probes>>,
) -> impl IntoResponse {
    let pending = probes
        .pending
        .get(|| async {
            metrics::counter!("penora_health_probes_total", "probe" => "health").increment(1);
            let pending = async {
                let client = ctx.pool.get().await.ok()?;
                outbox::pending(&client).await.ok()
            };
            tokio::time::timeout(Duration::from_secs(3), pending)
                .await
                .ok()
                .flatten()
        })
        .await;
    // The consumers' own state: no probe needed, always current.
    let broker_ok = ctx.consuming.load(std::sync::atomic::Ordering::Relaxed);
    let body = Health {
        status: match (pending.is_some(), broker_ok) {
            (false, _) => "unavailable",
            (true, false) => "degraded",
            (true, true) => "ok",
        },
        database: if pending.is_some() {
            "ok"
        } else {
            "unavailable"
        },
        broker: if broker_ok { "ok" } else { "unavailable" },
        outbox_pending: pending,
        version: penora_platform::VERSION,
    };
    let status = if pending.is_some() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

async fn ready(
    State(ctx): State<Arc<Context>>,
    Extension(probes): Extension<Arc<Probes>>,
) -> impl IntoResponse {
    let answer = probes
        .ready
        .get(|| async {
            metrics::counter!("penora_health_probes_total", "probe" => "ready").increment(1);
            db::readiness(&ctx.pool).await
        })
        .await;
    match answer {
        Ok(version) => (
            StatusCode::OK,
            Json(serde_json::json!({"ready": true, "schema_version": version})),
        ),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"ready": false, "reason": reason})),
        ),
    }
}

/// Every `SETTLE_INTERVAL_SECS`, counts the endpoints with a delivery
/// failing for over an hour (the alert's gauge) and the open circuits.
async fn webhook_gauges(ctx: Arc<Context>, stop: CancellationToken) {
    loop {
        if let Ok(client) = ctx.pool.get().await {
            match db::webhooks::endpoints_failing_since(&client, 3600.0).await {
                Ok(n) => metrics::gauge!("penora_webhook_endpoints_failing").set(n as f64),
                Err(e) => tracing::warn!(error = %e, "counting failing webhook endpoints failed"),
            }
        }
        metrics::gauge!("penora_webhook_circuits_open")
            .set(ctx.webhooks.gates.open_circuits() as f64);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(ctx.settings.worker.settle_interval) => {},
        }
    }
}

/// Every 5 seconds, reads the depth and consumer count of every work, retry
/// and dead queue from the broker into gauges.
async fn queue_gauges(ctx: Arc<Context>, stop: CancellationToken) {
    let mut link: Option<(lapin::Connection, lapin::Channel)> = None;
    while !stop.is_cancelled() {
        if link.as_ref().is_none_or(|(_, ch)| !ch.status().connected()) {
            link = None;
            if let Ok(conn) =
                broker::connect(ctx.settings.broker.url.expose(), "penora-worker-gauges").await
                && let Ok(ch) = conn.create_channel().await
            {
                link = Some((conn, ch));
            }
        }
        if let Some((_, ch)) = &link {
            match broker::queue_stats(ch, &ctx.topology).await {
                Ok(stats) => {
                    for s in stats {
                        metrics::gauge!("penora_queue_messages", "queue" => s.name.clone())
                            .set(f64::from(s.messages));
                        metrics::gauge!("penora_queue_consumers", "queue" => s.name)
                            .set(f64::from(s.consumers));
                    }
                }
                Err(_) => link = None,
            }
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(Duration::from_secs(5)) => {},
        }
    }
}

async fn serve_http(
    listener: TcpListener,
    ctx: Arc<Context>,
    metrics: PrometheusHandle,
    stop: CancellationToken,
) {
    let app = Router::new()
        .route("/health", get(health))
        // Liveness: the process runs (a database outage must not restart it).
        .route(
            "/health/live",
            get(|| async { axum::Json(serde_json::json!({"status": "alive"})) }),
        )
        .route("/ready", get(ready))
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        m.render(),
                    )
                }
            }),
        )
        .layer(Extension(Arc::new(Probes::default())))
        .layer(CatchPanicLayer::custom(|_| {
            metrics::counter!("penora_task_panics_total", "task" => "metrics_server").increment(1);
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }))
        .with_state(ctx);
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
}
