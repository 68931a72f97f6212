//! Settings, loaded once at start-up from the environment.
//!
//! Every variable has a documented default (README, "Configuration"); a value
//! that does not parse stops start-up with an error naming the variable.

use std::{fmt, net::SocketAddr, time::Duration};

use penora_domain::pricing::PriceTable;

/// A secret that never prints (Debug and Display show `[redacted]`).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; call only where it is used, never to log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line (production).
    Json,
    /// Human-readable lines (development).
    Pretty,
}

/// A setting that could not be read; names the variable.
#[derive(Debug, thiserror::Error)]
#[error("invalid value for {variable}: {reason}")]
pub struct ConfigError {
    /// The environment variable at fault.
    pub variable: &'static str,
    /// Why its value was refused.
    pub reason: String,
}

/// All settings of the API and the worker.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `DATABASE_URL`: PostgreSQL connection string.
    pub database_url: Secret,
    /// `AMQP_URL`: RabbitMQ connection string (vhost included).
    pub amqp_url: Secret,
    /// `PENORA_API_KEY`: bootstrap key with app `*` and every scope.
    pub bootstrap_api_key: Option<Secret>,
    /// `BIND_ADDR`: API listen address.
    pub bind_addr: SocketAddr,
    /// `WORKER_METRICS_ADDR`: worker's `/metrics` and `/health`.
    pub worker_metrics_addr: SocketAddr,
    /// `STORAGE_QUOTA_BYTES`: per-user storage quota.
    pub storage_quota_bytes: i64,
    /// `REFUND_WINDOW_SECS`: how long a reservation can be refunded.
    pub refund_window: Duration,
    /// `MAX_DEDUCT_AMOUNT`: largest single deduction (and grant).
    pub max_deduct_amount: i64,
    /// `RATE_LIMIT_PER_SEC`: tokens added per second to each key's bucket.
    pub rate_limit_per_sec: u32,
    /// `RATE_LIMIT_BURST`: size of each key's bucket.
    pub rate_limit_burst: u32,
    /// `LOG_FORMAT`: `json` or `pretty`.
    pub log_format: LogFormat,
    /// `DB_POOL_SIZE`: connections in the pool.
    pub db_pool_size: usize,
    /// `DB_LOCK_TIMEOUT_MS`: longest wait for a row lock before a statement
    /// fails (503 in the API, a retry in the worker).
    pub db_lock_timeout: Duration,
    /// `MAX_BODY_BYTES`: largest accepted `save-project` body (other routes
    /// take at most [`SMALL_BODY_BYTES`] or this, whichever is less).
    pub max_body_bytes: usize,
    /// `MAX_CONCURRENT_SAVES`: save bodies held and processed at once.
    pub max_concurrent_saves: usize,
    /// `SAVE_QUEUE_WAIT_MS`: how long a save waits for a free slot before
    /// `503` with `Retry-After`.
    pub save_queue_wait: Duration,
    /// `MAX_IMAGE_PIXELS`: largest image accepted (width × height), read
    /// from its header before decoding.
    pub max_image_pixels: u64,
    /// `IMAGE_QUALITY`: WebP quality (1–100) of stored images.
    pub image_quality: u8,
    /// `IMAGE_STORAGE_FORMAT`: `webp` (re-encode still images when smaller)
    /// or `original` (store every image exactly as sent).
    pub image_storage_format: ImageStorageFormat,
    /// `IMAGE_THREADS`: threads (at the lowest CPU priority) decoding and
    /// encoding images.
    pub image_threads: usize,
    /// `PROJECT_RETENTION_DAYS`: projects older than this are deleted by the
    /// worker; unset keeps them forever.
    pub project_retention: Option<Duration>,
    /// `IMAGE_CPU_CGROUP`: a cgroup the image threads join (e.g. one with
    /// `cpu.idle = 1`, so image work never takes CPU from the database on a
    /// shared machine); unset: they stay where the process is.
    pub image_cpu_cgroup: Option<std::path::PathBuf>,
    /// `CORS_ALLOWED_ORIGINS`: comma-separated origins (`https://app.example`)
    /// whose browser pages may call the API. Empty (the default): no CORS
    /// headers, so browsers refuse every cross-origin call.
    pub cors_allowed_origins: Vec<String>,
    /// `HTTP_IDLE_TIMEOUT_SECS`: a connection with no request in progress
    /// and no byte moved for this long is closed.
    pub http_idle_timeout: Duration,
    /// `HTTP_HEADER_TIMEOUT_SECS`: a request whose headers have not all
    /// arrived this long after its first byte is dropped (slowloris).
    pub http_header_timeout: Duration,
    /// `HTTP_MAX_CONNECTIONS`: most connections open at once; past it new
    /// ones wait in the kernel's backlog until others close.
    pub http_max_connections: usize,
    /// `DEDUCT_BATCH_MAX`: most deductions the API carries out in one
    /// transaction (1 turns group commit off).
    pub deduct_batch_max: usize,
    /// `DEDUCT_BATCHES_IN_FLIGHT`: deduction transactions the API runs at once;
    /// requests arriving meanwhile wait and go together in the next one.
    pub deduct_batches_in_flight: usize,
    /// `DEDUCT_QUEUE_MAX`: most deductions waiting for a batch; past it a
    /// deduction is answered `503 busy` with `Retry-After` at once.
    pub deduct_queue_max: usize,
    /// `AUDIT_LAG_LIMIT_MS`: while the audit runs further behind the ledger
    /// than this (the workers' commit-to-audit lag), new deductions wait up
    /// to half a second, then are answered `503 busy` with `Retry-After`;
    /// 0 turns the backpressure off.
    pub audit_lag_limit: Duration,
    /// `WORKER_BATCH_MAX`: most deliveries of one queue the worker handles in
    /// one transaction (1 turns group commit off).
    pub worker_batch_max: usize,
    /// `WORKER_BATCHES_IN_FLIGHT`: batches of one queue a worker runs at once.
    pub worker_batches_in_flight: usize,
    /// `PRICE_TABLE`: credit prices used by `/quote`.
    pub price_table: PriceTable,
    /// `AMQP_PREFIX`: prepended to every exchange and queue name (empty in
    /// production; lets several environments or tests share one vhost).
    pub amqp_prefix: String,
    /// `AMQP_QUEUE_TYPE`: `quorum` (default) or `classic`.
    pub queue_type: QueueType,
    /// `RETRY_MAX_ATTEMPTS`: attempts of a job or event before it is parked.
    pub retry_max_attempts: u32,
    /// `AMQP_CONFIRM_TIMEOUT_MS`: longest wait for the publisher confirms of
    /// one publish; a message not confirmed by then counts as refused.
    pub amqp_confirm_timeout: Duration,
    /// `OUTBOX_MAX_ATTEMPTS`: refusals by the broker after which an outbox
    /// row is set aside (`penora-ops outbox list`, `outbox retry`).
    pub outbox_max_attempts: u32,
    /// `OUTBOX_RETRY_BASE_MS`: wait before a refused outbox row is tried
    /// again, doubling with each refusal up to 5 minutes.
    pub outbox_retry_base: Duration,
    /// `RETRY_BASE_MS`: delay before the second attempt (doubles each time).
    pub retry_base: Duration,
    /// `RETRY_MAX_MS`: longest delay between attempts.
    pub retry_max: Duration,
    /// `WORKER_PREFETCH`: unacknowledged messages a worker holds per queue.
    pub worker_prefetch: u16,
    /// `SETTLE_INTERVAL_SECS`: how often expired reservations are settled.
    pub settle_interval: Duration,
    /// `SHUTDOWN_DEADLINE_SECS`: how long in-flight work may take after SIGTERM.
    pub shutdown_deadline: Duration,
    /// `MAX_EVENT_LATENESS_SECS`: how far before its arrival an event's
    /// `occurred_at` is believed (default: the refund window); an older one
    /// is judged at its arrival.
    pub max_event_lateness: Duration,
    /// `EVENT_CLOCK_SKEW_SECS`: how far an event's `occurred_at` may lie
    /// before its reservation was made (the two clocks differ a little); an
    /// event from before that refunds nothing.
    pub event_clock_skew: Duration,
    /// `HTTP_BODY_TIMEOUT_SECS`: longest a request body may take to arrive
    /// in full, from its headers (`408`, connection closed).
    pub http_body_timeout: Duration,
    /// `HTTP_REQUEST_TIMEOUT_SECS`: longest a request may take from its
    /// headers to its answer (`503 timeout`).
    pub http_request_timeout: Duration,
    /// `HTTP_TCP_KEEPALIVE_SECS`: idle time before TCP keepalive probes on
    /// the API's connections (a peer that vanished is found and dropped).
    pub http_tcp_keepalive: Duration,
    /// `AUTH_FAILURES_PER_SEC`: failed authentications an address may make
    /// per second (its bucket refills at this rate), checked before any key
    /// is looked up.
    pub auth_failures_per_sec: u32,
    /// `AUTH_FAILURE_BURST`: size of each address's bucket of failures.
    pub auth_failure_burst: u32,
    /// `AUTH_NEGATIVE_CACHE_SECS`: how long a key found unknown is answered
    /// `401` from memory, by its digest, without a query.
    pub auth_negative_cache: Duration,
    /// `METRICS_TOKEN`: when set, the API's `/metrics` answers only a
    /// request with `Authorization: Bearer <token>`.
    pub metrics_token: Option<Secret>,
    /// `RABBITMQ_MANAGEMENT_URL`: the management API (`http` or `https`);
    /// unset, it is never contacted.
    pub rabbitmq_management_url: Option<Secret>,
    /// `DB_MIGRATE_ON_START`: whether the services apply pending migrations
    /// at start (`false` where they connect as an application role that may
    /// not change the schema; `penora-ops migrate` runs as the owner).
    pub db_migrate_on_start: bool,
    /// `AUDIT_HMAC_KEY`: a key the database never holds; when set, each
    /// audit record carries an HMAC of its hash under it, so a chain
    /// rewritten inside the database is found by `penora-ops audit verify`.
    pub audit_hmac_key: Option<Secret>,
    /// `MAX_PROJECTS_PER_USER`: most projects (not deleted) a user may have.
    pub max_projects_per_user: i64,
    /// `EVENTS_QUEUE_MAX_LENGTH`: most messages waiting in ImageGene's
    /// events queue; past it the broker refuses new ones (`reject-publish`,
    /// the publisher's confirm is a nack) instead of filling its disk.
    pub events_queue_max_length: u32,
}

/// Largest body of a route other than `save-project`: their JSON is a few
/// hundred bytes, and 100 concurrent 12 MiB deducts must not cost 1.2 GB.
pub const SMALL_BODY_BYTES: usize = 64 * 1024;

/// How images are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageStorageFormat {
    /// Still PNG/JPEG/WebP re-encoded as lossy WebP when smaller (default).
    Webp,
    /// Every image kept exactly as sent.
    Original,
}

/// The kind of RabbitMQ queue to declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    /// Replicated, durable queues (RabbitMQ 3.10+): the default.
    Quorum,
    /// Classic durable queues, for brokers without quorum support.
    Classic,
}

impl Settings {
    /// Reads the settings from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the settings through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let log_format = match get("LOG_FORMAT").as_deref() {
            None | Some("json") => LogFormat::Json,
            Some("pretty") => LogFormat::Pretty,
            Some(other) => {
                return Err(ConfigError {
                    variable: "LOG_FORMAT",
                    reason: format!("expected `json` or `pretty`, got `{other}`"),
                });
            }
        };
        let settings = Self {
            database_url: Secret::new(
                get("DATABASE_URL")
                    .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/penora".into()),
            ),
            amqp_url: Secret::new(
                get("AMQP_URL").unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
            ),
            bootstrap_api_key: bootstrap_key(&get)?,
            bind_addr: parse(&get, "BIND_ADDR", "127.0.0.1:5000")?,
            worker_metrics_addr: parse(&get, "WORKER_METRICS_ADDR", "127.0.0.1:9091")?,
            storage_quota_bytes: positive(&get, "STORAGE_QUOTA_BYTES", 1_048_576)?,
            refund_window: Duration::from_secs(parse(&get, "REFUND_WINDOW_SECS", "3600")?),
            max_deduct_amount: positive(&get, "MAX_DEDUCT_AMOUNT", 1_000_000)?,
            rate_limit_per_sec: positive(&get, "RATE_LIMIT_PER_SEC", 100)?,
            rate_limit_burst: positive(&get, "RATE_LIMIT_BURST", 200)?,
            log_format,
            db_pool_size: positive(&get, "DB_POOL_SIZE", 16)?,
            db_lock_timeout: Duration::from_millis(positive(&get, "DB_LOCK_TIMEOUT_MS", 5000)?),
            max_body_bytes: positive(&get, "MAX_BODY_BYTES", 12 * 1024 * 1024)?,
            max_concurrent_saves: positive(&get, "MAX_CONCURRENT_SAVES", 8)?,
            save_queue_wait: Duration::from_millis(parse(&get, "SAVE_QUEUE_WAIT_MS", "1000")?),
            max_image_pixels: positive(&get, "MAX_IMAGE_PIXELS", 16_777_216)?,
            image_quality: match parse::<u8>(&get, "IMAGE_QUALITY", "85")? {
                q @ 1..=100 => q,
                q => {
                    return Err(ConfigError {
                        variable: "IMAGE_QUALITY",
                        reason: format!("must be from 1 to 100, got {q}"),
                    });
                }
            },
            image_storage_format: match get("IMAGE_STORAGE_FORMAT").as_deref() {
                None | Some("webp") => ImageStorageFormat::Webp,
                Some("original") => ImageStorageFormat::Original,
                Some(other) => {
                    return Err(ConfigError {
                        variable: "IMAGE_STORAGE_FORMAT",
                        reason: format!("expected `webp` or `original`, got `{other}`"),
                    });
                }
            },
            image_threads: positive(
                &get,
                "IMAGE_THREADS",
                std::thread::available_parallelism().map_or(2, |n| n.get().min(4)),
            )?,
            project_retention: get("PROJECT_RETENTION_DAYS")
                .map(|_| positive::<u64>(&get, "PROJECT_RETENTION_DAYS", 1))
                .transpose()?
                .map(|days| Duration::from_secs(days.saturating_mul(86_400))),
            image_cpu_cgroup: get("IMAGE_CPU_CGROUP").map(std::path::PathBuf::from),
            cors_allowed_origins: cors_origins(&get)?,
            http_idle_timeout: Duration::from_secs(positive(&get, "HTTP_IDLE_TIMEOUT_SECS", 60)?),
            http_header_timeout: Duration::from_secs(positive(
                &get,
                "HTTP_HEADER_TIMEOUT_SECS",
                10,
            )?),
            http_max_connections: positive(&get, "HTTP_MAX_CONNECTIONS", 10_000)?,
            deduct_batch_max: positive(&get, "DEDUCT_BATCH_MAX", 128)?,
            deduct_batches_in_flight: positive(&get, "DEDUCT_BATCHES_IN_FLIGHT", 2)?,
            deduct_queue_max: positive(&get, "DEDUCT_QUEUE_MAX", 10_000)?,
            audit_lag_limit: Duration::from_millis(parse(&get, "AUDIT_LAG_LIMIT_MS", "2000")?),
            worker_batch_max: positive(&get, "WORKER_BATCH_MAX", 64)?,
            worker_batches_in_flight: positive(&get, "WORKER_BATCHES_IN_FLIGHT", 2)?,
            price_table: match get("PRICE_TABLE") {
                None => PriceTable::default(),
                Some(raw) => raw.parse().map_err(|reason| ConfigError {
                    variable: "PRICE_TABLE",
                    reason,
                })?,
            },
            amqp_prefix: get("AMQP_PREFIX").unwrap_or_default(),
            queue_type: match get("AMQP_QUEUE_TYPE").as_deref() {
                None | Some("quorum") => QueueType::Quorum,
                Some("classic") => QueueType::Classic,
                Some(other) => {
                    return Err(ConfigError {
                        variable: "AMQP_QUEUE_TYPE",
                        reason: format!("expected `quorum` or `classic`, got `{other}`"),
                    });
                }
            },
            retry_max_attempts: positive(&get, "RETRY_MAX_ATTEMPTS", 8)?,
            amqp_confirm_timeout: Duration::from_millis(positive(
                &get,
                "AMQP_CONFIRM_TIMEOUT_MS",
                10_000,
            )?),
            outbox_max_attempts: positive(&get, "OUTBOX_MAX_ATTEMPTS", 10)?,
            outbox_retry_base: Duration::from_millis(positive(&get, "OUTBOX_RETRY_BASE_MS", 1000)?),
            retry_base: Duration::from_millis(positive(&get, "RETRY_BASE_MS", 1000)?),
            retry_max: Duration::from_millis(positive(&get, "RETRY_MAX_MS", 60_000)?),
            worker_prefetch: positive(&get, "WORKER_PREFETCH", 256)?,
            settle_interval: Duration::from_secs(positive(&get, "SETTLE_INTERVAL_SECS", 30)?),
            shutdown_deadline: Duration::from_secs(positive(&get, "SHUTDOWN_DEADLINE_SECS", 20)?),
            max_event_lateness: Duration::ZERO,
            event_clock_skew: Duration::from_secs(parse(&get, "EVENT_CLOCK_SKEW_SECS", "60")?),
            http_body_timeout: Duration::from_secs(positive(&get, "HTTP_BODY_TIMEOUT_SECS", 60)?),
            http_request_timeout: Duration::from_secs(positive(
                &get,
                "HTTP_REQUEST_TIMEOUT_SECS",
                120,
            )?),
            http_tcp_keepalive: Duration::from_secs(positive(&get, "HTTP_TCP_KEEPALIVE_SECS", 60)?),
            auth_failures_per_sec: positive(&get, "AUTH_FAILURES_PER_SEC", 10)?,
            auth_failure_burst: positive(&get, "AUTH_FAILURE_BURST", 50)?,
            auth_negative_cache: Duration::from_secs(parse(
                &get,
                "AUTH_NEGATIVE_CACHE_SECS",
                "10",
            )?),
            metrics_token: get("METRICS_TOKEN").map(Secret::new),
            rabbitmq_management_url: management_url(&get)?,
            db_migrate_on_start: flag(&get, "DB_MIGRATE_ON_START", true)?,
            audit_hmac_key: audit_key(&get)?,
            max_projects_per_user: positive(&get, "MAX_PROJECTS_PER_USER", 10_000)?,
            events_queue_max_length: positive(&get, "EVENTS_QUEUE_MAX_LENGTH", 1_000_000)?,
        };
        let mut settings = settings;
        settings.max_event_lateness = match get("MAX_EVENT_LATENESS_SECS") {
            None => settings.refund_window,
            Some(_) => Duration::from_secs(parse(&get, "MAX_EVENT_LATENESS_SECS", "0")?),
        };
        if settings.retry_base > settings.retry_max {
            return Err(ConfigError {
                variable: "RETRY_BASE_MS",
                reason: "must not be larger than RETRY_MAX_MS".into(),
            });
        }
        if !settings
            .amqp_prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            return Err(ConfigError {
                variable: "AMQP_PREFIX",
                reason: "may only contain letters, digits, _ - and .".into(),
            });
        }
        if let Some(dir) = &settings.image_cpu_cgroup
            && !dir.is_dir()
        {
            return Err(ConfigError {
                variable: "IMAGE_CPU_CGROUP",
                reason: format!("{} is not a directory (a cgroup)", dir.display()),
            });
        }
        if settings
            .database_url
            .expose()
            .parse::<tokio_postgres::Config>()
            .is_err()
        {
            return Err(ConfigError {
                variable: "DATABASE_URL",
                reason: "not a PostgreSQL connection string".into(),
            });
        }
        Ok(settings)
    }
}

fn parse<T: std::str::FromStr>(
    get: &impl Fn(&str) -> Option<String>,
    variable: &'static str,
    default: &str,
) -> Result<T, ConfigError>
where
    T::Err: fmt::Display,
{
    let raw = get(variable).unwrap_or_else(|| default.to_owned());
    raw.trim().parse().map_err(|e: T::Err| ConfigError {
        variable,
        reason: format!("`{raw}`: {e}"),
    })
}

/// `CORS_ALLOWED_ORIGINS`: exact origins only (`scheme://host[:port]`, no
/// path, no wildcard: a key-bearing API must not answer every site).
fn cors_origins(get: &impl Fn(&str) -> Option<String>) -> Result<Vec<String>, ConfigError> {
    let raw = get("CORS_ALLOWED_ORIGINS").unwrap_or_default();
    let mut origins = Vec::new();
    for origin in raw.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        let rest = origin
            .strip_prefix("https://")
            .or_else(|| origin.strip_prefix("http://"));
        let valid = rest.is_some_and(|host| {
            !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
        });
        if !valid {
            return Err(ConfigError {
                variable: "CORS_ALLOWED_ORIGINS",
                reason: format!(
                    "`{origin}` is not an origin: use scheme://host[:port], comma-separated, no path and no `*`"
                ),
            });
        }
        origins.push(origin.to_owned());
    }
    Ok(origins)
}

/// Shortest bootstrap key accepted without `ALLOW_WEAK_API_KEY=true`.
pub const MIN_BOOTSTRAP_KEY_LEN: usize = 32;

/// `PENORA_API_KEY`, refused when shorter than 32 characters unless
/// `ALLOW_WEAK_API_KEY=true` (a throwaway local setup): the key has every
/// scope for every app, so a guessable one gives the whole ledger away.
fn bootstrap_key(get: &impl Fn(&str) -> Option<String>) -> Result<Option<Secret>, ConfigError> {
    let allow_weak = match get("ALLOW_WEAK_API_KEY").as_deref() {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(other) => {
            return Err(ConfigError {
                variable: "ALLOW_WEAK_API_KEY",
                reason: format!("expected `true` or `false`, got `{other}`"),
            });
        }
    };
    let Some(key) = get("PENORA_API_KEY") else {
        return Ok(None);
    };
    let len = key.chars().count();
    if len < MIN_BOOTSTRAP_KEY_LEN && !allow_weak {
        return Err(ConfigError {
            variable: "PENORA_API_KEY",
            reason: format!(
                "is {len} characters; use at least {MIN_BOOTSTRAP_KEY_LEN} random characters \
                 (e.g. `openssl rand -hex 32`), or set ALLOW_WEAK_API_KEY=true for a throwaway local setup"
            ),
        });
    }
    Ok(Some(Secret::new(key)))
}

/// A `true`/`false` setting (`1`/`0` too).
fn flag(
    get: &impl Fn(&str) -> Option<String>,
    variable: &'static str,
    default: bool,
) -> Result<bool, ConfigError> {
    match get(variable).as_deref().map(str::trim) {
        None => Ok(default),
        Some("true") | Some("1") => Ok(true),
        Some("false") | Some("0") => Ok(false),
        Some(other) => Err(ConfigError {
            variable,
            reason: format!("expected `true` or `false`, got `{other}`"),
        }),
    }
}

/// `RABBITMQ_MANAGEMENT_URL`: an `http` or `https` URL, or unset (the
/// management API is then never contacted; nothing is derived from
/// `AMQP_URL`, whose credentials must not travel in clear to a guessed
/// port).
fn management_url(get: &impl Fn(&str) -> Option<String>) -> Result<Option<Secret>, ConfigError> {
    let Some(raw) = get("RABBITMQ_MANAGEMENT_URL") else {
        return Ok(None);
    };
    match url::Url::parse(raw.trim()) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
            Ok(Some(Secret::new(raw.trim())))
        }
        _ => Err(ConfigError {
            variable: "RABBITMQ_MANAGEMENT_URL",
            reason: "expected an http:// or https:// URL".into(),
        }),
    }
}

/// Shortest `AUDIT_HMAC_KEY` accepted.
pub const MIN_AUDIT_KEY_LEN: usize = 32;

/// `AUDIT_HMAC_KEY`: at least 32 characters when set.
fn audit_key(get: &impl Fn(&str) -> Option<String>) -> Result<Option<Secret>, ConfigError> {
    let Some(key) = get("AUDIT_HMAC_KEY") else {
        return Ok(None);
    };
    if key.chars().count() < MIN_AUDIT_KEY_LEN {
        return Err(ConfigError {
            variable: "AUDIT_HMAC_KEY",
            reason: format!(
                "use at least {MIN_AUDIT_KEY_LEN} random characters (e.g. `openssl rand -hex 32`)"
            ),
        });
    }
    Ok(Some(Secret::new(key)))
}

fn positive<T>(
    get: &impl Fn(&str) -> Option<String>,
    variable: &'static str,
    default: T,
) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + Default + fmt::Display,
    T::Err: fmt::Display,
{
    let value: T = parse(get, variable, &default.to_string())?;
    if value <= T::default() {
        return Err(ConfigError {
            variable,
            reason: format!("must be greater than zero, got {value}"),
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn cors_origins_must_be_exact_origins() {
        let ok = load(&[(
            "CORS_ALLOWED_ORIGINS",
            " https://a.example ,http://localhost:3000,",
        )])
        .expect("valid");
        assert_eq!(
            ok.cors_allowed_origins,
            ["https://a.example", "http://localhost:3000"]
        );
        for bad in ["*", "https://a.example/path", "a.example", "https://"] {
            let err = load(&[("CORS_ALLOWED_ORIGINS", bad)])
                .expect_err(bad)
                .to_string();
            assert!(err.contains("CORS_ALLOWED_ORIGINS"), "{bad}: {err}");
        }
        assert!(load(&[]).expect("default").cors_allowed_origins.is_empty());
    }

    #[test]
    fn defaults_match_the_contract() {
        let s = load(&[]).expect("defaults load");
        assert_eq!(s.bind_addr.to_string(), "127.0.0.1:5000");
        assert_eq!(s.storage_quota_bytes, 1_048_576);
        assert_eq!(s.refund_window, Duration::from_secs(3600));
        assert_eq!(s.max_deduct_amount, 1_000_000);
        assert_eq!((s.rate_limit_per_sec, s.rate_limit_burst), (100, 200));
        assert_eq!(s.log_format, LogFormat::Json);
        assert!(s.bootstrap_api_key.is_none());
        assert_eq!(s.max_body_bytes, 12 * 1024 * 1024);
        assert_eq!(s.max_concurrent_saves, 8);
        assert_eq!(s.max_image_pixels, 4096 * 4096);
        assert_eq!(s.image_quality, 85);
        assert_eq!(s.image_storage_format, ImageStorageFormat::Webp);
        assert_eq!(s.project_retention, None);
        assert_eq!(s.max_event_lateness, s.refund_window);
        assert!(s.rabbitmq_management_url.is_none());
        assert!(s.db_migrate_on_start);
        let s = load(&[("REFUND_WINDOW_SECS", "600")]).expect("loads");
        assert_eq!(s.max_event_lateness, Duration::from_secs(600));
        let s = load(&[("MAX_EVENT_LATENESS_SECS", "0")]).expect("loads");
        assert_eq!(s.max_event_lateness, Duration::ZERO);
        let s = load(&[("PROJECT_RETENTION_DAYS", "30")]).expect("loads");
        assert_eq!(s.project_retention, Some(Duration::from_secs(30 * 86_400)));
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        for (var, val) in [
            ("BIND_ADDR", "nowhere"),
            ("STORAGE_QUOTA_BYTES", "-1"),
            ("REFUND_WINDOW_SECS", "soon"),
            ("RATE_LIMIT_BURST", "0"),
            ("LOG_FORMAT", "xml"),
            ("PRICE_TABLE", "small=x"),
            ("DATABASE_URL", "postgres://[::1"),
            ("AMQP_QUEUE_TYPE", "fast"),
            ("RETRY_BASE_MS", "120000"),
            ("AMQP_PREFIX", "a b"),
            ("IMAGE_QUALITY", "0"),
            ("IMAGE_QUALITY", "101"),
            ("IMAGE_STORAGE_FORMAT", "avif"),
            ("MAX_CONCURRENT_SAVES", "0"),
            ("PROJECT_RETENTION_DAYS", "0"),
            ("MAX_IMAGE_PIXELS", "lots"),
            ("IMAGE_CPU_CGROUP", "/nonexistent/penora-images"),
            ("MAX_EVENT_LATENESS_SECS", "-5"),
            ("HTTP_BODY_TIMEOUT_SECS", "0"),
            ("RABBITMQ_MANAGEMENT_URL", "amqps://broker:5671"),
            ("RABBITMQ_MANAGEMENT_URL", "broker:15672"),
            ("DB_MIGRATE_ON_START", "maybe"),
            ("AUDIT_HMAC_KEY", "short"),
            ("MAX_PROJECTS_PER_USER", "0"),
        ] {
            let err = load(&[(var, val)]).unwrap_err();
            assert_eq!(err.variable, var);
            assert!(err.to_string().contains(var));
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let s =
            load(&[("PENORA_API_KEY", "super-secret-key-value-0123456789abcdef")]).expect("loads");
        assert!(!format!("{s:?}").contains("super-secret"));
    }

    #[test]
    fn a_weak_bootstrap_key_is_refused_unless_allowed() {
        let err = load(&[("PENORA_API_KEY", "short-key")]).unwrap_err();
        assert_eq!(err.variable, "PENORA_API_KEY");
        assert!(err.to_string().contains("at least 32"), "{err}");
        assert!(
            !err.to_string().contains("short-key"),
            "the key is not echoed"
        );
        let s = load(&[
            ("PENORA_API_KEY", "short-key"),
            ("ALLOW_WEAK_API_KEY", "true"),
        ])
        .expect("allowed");
        assert!(s.bootstrap_api_key.is_some());
        assert!(load(&[("PENORA_API_KEY", &"k".repeat(32))]).is_ok());
        let err = load(&[("ALLOW_WEAK_API_KEY", "yes")]).unwrap_err();
        assert_eq!(err.variable, "ALLOW_WEAK_API_KEY");
    }
}
