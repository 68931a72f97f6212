//! `Http`: what the API's HTTP side needs: where it listens, its
//! connection limits and deadlines, body sizes, per-key rate limits, the
//! guard in front of key lookups, CORS, the `/metrics` token and the
//! bootstrap key. Only `penora-api` reads it.

use std::{net::SocketAddr, time::Duration};

use crate::{ConfigError, Secret, read::Vars};

/// Largest body of a route other than `save-project`: their JSON is a few
/// hundred bytes, and 100 concurrent 12 MiB deducts must not cost 1.2 GB.
pub const SMALL_BODY_BYTES: usize = 64 * 1024;

/// Shortest bootstrap key accepted without `ALLOW_WEAK_API_KEY=true`.
pub const MIN_BOOTSTRAP_KEY_LEN: usize = 32;

/// The API's HTTP settings.
#[derive(Debug, Clone)]
pub struct Http {
    /// `BIND_ADDR`: API listen address.
    pub bind_addr: SocketAddr,
    /// `PENORA_API_KEY`: bootstrap key with app `*` and every scope.
    pub bootstrap_api_key: Option<Secret>,
    /// `RATE_LIMIT_PER_SEC`: tokens added per second to each key's bucket.
    pub rate_limit_per_sec: u32,
    /// `RATE_LIMIT_BURST`: size of each key's bucket.
    pub rate_limit_burst: u32,
    /// `MAX_BODY_BYTES`: largest accepted `save-project` body (other routes
    /// take at most [`SMALL_BODY_BYTES`] or this, whichever is less).
    pub max_body_bytes: usize,
    /// `CORS_ALLOWED_ORIGINS`: comma-separated origins (`https://app.example`)
    /// whose browser pages may call the API. Empty (the default): no CORS
    /// headers, so browsers refuse every cross-origin call.
    pub cors_allowed_origins: Vec<String>,
    /// `HTTP_IDLE_TIMEOUT_SECS`: a connection with no request in progress
    /// and no byte moved for this long is closed.
    pub idle_timeout: Duration,
    /// `HTTP_HEADER_TIMEOUT_SECS`: a request whose headers have not all
    /// arrived this long after its first byte is dropped (slowloris).
    pub header_timeout: Duration,
    /// `HTTP_MAX_CONNECTIONS`: most connections open at once; past it new
    /// ones wait in the kernel's backlog until others close.
    pub max_connections: usize,
    /// `HTTP_BODY_TIMEOUT_SECS`: longest a request body may take to arrive
    /// in full, from its headers (`408`, connection closed).
    pub body_timeout: Duration,
    /// `HTTP_REQUEST_TIMEOUT_SECS`: longest a request may take from its
    /// headers to its answer (`503 timeout`).
    pub request_timeout: Duration,
    /// `SHUTDOWN_DEADLINE_SECS`: how long requests in flight (and the
    /// background loops) may take after SIGTERM (the worker reads the same
    /// variable into its own section).
    pub shutdown_deadline: Duration,
    /// `HTTP_TCP_KEEPALIVE_SECS`: idle time before TCP keepalive probes on
    /// the API's connections (a peer that vanished is found and dropped).
    pub tcp_keepalive: Duration,
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
}

impl Http {
    /// Reads this section through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        Self::read(&Vars::new(&lookup))
    }

    pub(crate) fn read(vars: &Vars<'_>) -> Result<Self, ConfigError> {
        Ok(Self {
            bind_addr: vars.parse("BIND_ADDR", "127.0.0.1:5000")?,
            bootstrap_api_key: bootstrap_key(vars)?,
            rate_limit_per_sec: vars.positive("RATE_LIMIT_PER_SEC", 100)?,
            rate_limit_burst: vars.positive("RATE_LIMIT_BURST", 200)?,
            max_body_bytes: vars.positive("MAX_BODY_BYTES", 12 * 1024 * 1024)?,
            cors_allowed_origins: cors_origins(vars)?,
            idle_timeout: Duration::from_secs(vars.positive("HTTP_IDLE_TIMEOUT_SECS", 60)?),
            header_timeout: Duration::from_secs(vars.positive("HTTP_HEADER_TIMEOUT_SECS", 10)?),
            max_connections: vars.positive("HTTP_MAX_CONNECTIONS", 10_000)?,
            body_timeout: Duration::from_secs(vars.positive("HTTP_BODY_TIMEOUT_SECS", 60)?),
            request_timeout: Duration::from_secs(vars.positive("HTTP_REQUEST_TIMEOUT_SECS", 120)?),
            shutdown_deadline: Duration::from_secs(vars.positive("SHUTDOWN_DEADLINE_SECS", 20)?),
            tcp_keepalive: Duration::from_secs(vars.positive("HTTP_TCP_KEEPALIVE_SECS", 60)?),
            auth_failures_per_sec: vars.positive("AUTH_FAILURES_PER_SEC", 10)?,
            auth_failure_burst: vars.positive("AUTH_FAILURE_BURST", 50)?,
            auth_negative_cache: Duration::from_secs(vars.parse("AUTH_NEGATIVE_CACHE_SECS", "10")?),
            metrics_token: vars.get("METRICS_TOKEN").map(Secret::new),
        })
    }
}

/// `CORS_ALLOWED_ORIGINS`: exact origins only (`scheme://host[:port]`, no
/// path, no wildcard: a key-bearing API must not answer every site).
fn cors_origins(vars: &Vars<'_>) -> Result<Vec<String>, ConfigError> {
    let raw = vars.get("CORS_ALLOWED_ORIGINS").unwrap_or_default();
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

/// `PENORA_API_KEY`, refused when shorter than 32 characters unless
/// `ALLOW_WEAK_API_KEY=true` (a throwaway local setup): the key has every
/// scope for every app, so a guessable one gives the whole ledger away.
fn bootstrap_key(vars: &Vars<'_>) -> Result<Option<Secret>, ConfigError> {
    let allow_weak = match vars.get("ALLOW_WEAK_API_KEY").as_deref() {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(other) => {
            return Err(ConfigError {
                variable: "ALLOW_WEAK_API_KEY",
                reason: format!("expected `true` or `false`, got `{other}`"),
            });
        }
    };
    let Some(key) = vars.get("PENORA_API_KEY") else {
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
