//! Authentication, authorisation and rate limiting.
//!
//! Rules: the key comes from `X-API-Key` or the `api_key` query parameter; it
//! is hashed at once and only its digest is compared (in constant time) or
//! looked up; it never reaches a log line, a metric label or an error message.
//! Each key has its own token bucket; an exhausted bucket answers 429 with
//! `Retry-After`. Before a key is looked up, [`guard`] keeps failing clients
//! away from the database: a bucket of failures per client address (429
//! `rate_limited` when empty) and a short memory of unknown digests.

pub mod guard;

use std::{
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::Instant,
};

use axum::{extract::FromRequestParts, http::request::Parts};
use governor::clock::Clock;
use penora_platform::keys::{self, Principal, Scope};

use crate::{error::ApiError, serve::ClientAddr, state::AppState};

/// Where the auth extractor leaves the key's id (never the key) for the
/// request log.
#[derive(Clone, Default)]
pub struct KeyIdSlot(pub Arc<OnceLock<String>>);

/// The authenticated caller.
pub struct Auth(pub Principal);

impl Auth {
    /// Refuses unless the key has `scope`.
    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.0.scopes.contains(&scope) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "This API key lacks the `{scope}` scope needed for this route"
            )))
        }
    }

    /// Refuses unless the key may act for `app`.
    pub fn require_app(&self, field: &str, app: &str) -> Result<(), ApiError> {
        if self.0.app.allows(app) {
            Ok(())
        } else {
            Err(ApiError::AppMismatch(format!(
                "This API key acts for app `{}` only; {field} `{app}` is not allowed",
                self.0.app.as_str()
            )))
        }
    }

    /// The app the key is bound to, if it is bound to one.
    pub fn bound_app(&self) -> Option<&str> {
        match &self.0.app {
            keys::KeyApp::Any => None,
            keys::KeyApp::Only(app) => Some(app),
        }
    }
}

/// The presented key, from the header or else the query string.
fn presented_key(parts: &Parts) -> Option<String> {
    if let Some(v) = parts.headers.get("x-api-key") {
        return v
            .to_str()
            .ok()
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(str::to_owned);
    }
    let query = parts.uri.query()?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| name == "api_key")
        .map(|(_, key)| key.into_owned())
        .filter(|k| !k.is_empty())
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let addr = parts.extensions.get::<ClientAddr>().map(|a| a.0);
        // The key is hashed at once and dropped: only its digest goes on.
        let digest = presented_key(parts).map(|k| keys::digest(&k));
        let principal = match (digest, state.bootstrap_digest) {
            (Some(d), Some(boot)) if keys::digests_equal(&d, &boot) => Principal::bootstrap(),
            (digest, _) => authenticate(state, addr, digest).await?,
        };
        let label = principal.label();
        if let Some(slot) = parts.extensions.get::<KeyIdSlot>() {
            let _ = slot.0.set(label.clone());
        }
        if let Err(not_until) = state.limiter.check_key(&label) {
            let wait = not_until.wait_time_from(state.limiter.clock().now());
            metrics::counter!("penora_http_rate_limited_total").increment(1);
            return Err(ApiError::RateLimited {
                retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
            });
        }
        Ok(Self(principal))
    }
}

/// How often the digests of every live key are read into the known-good
/// set: a key created meanwhile pays its address's failure token until
/// then (or until its first success).
pub const LIVE_KEYS_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Keeps every live key exempt from the per-address failure budget, not only
/// those this process has seen succeed: after a restart, or behind a proxy
/// shared with a client that fails a lot, a good key is never held back.
/// One query a minute; each request still looks its key up.
pub async fn keep_live_keys_known(
    pool: deadpool_postgres::Pool,
    guard: Arc<guard::AuthGuard>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        if let Ok(client) = pool.get().await
            && let Ok(digests) = keys::live_digests(&client).await
        {
            let now = Instant::now();
            for d in digests.into_iter().take(guard::KNOWN_GOOD_MAX) {
                guard.known_good.insert(d, now);
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(LIVE_KEYS_EVERY) => {}
        }
    }
}

/// Counts a refused authentication by why (`penora_auth_refused_total`).
fn refused(reason: &'static str) {
    metrics::counter!("penora_auth_refused_total", "reason" => reason).increment(1);
}

/// Authenticates a key stored in the database (or none), keeping failing
/// clients away from it (see [`guard`]).
pub(crate) async fn authenticate(
    state: &AppState,
    addr: Option<SocketAddr>,
    digest: Option<[u8; 32]>,
) -> Result<Principal, ApiError> {
    let guard = &state.auth_guard;
    let known_good = digest.is_some_and(|d| guard.known_good.contains(&d, Instant::now()));
    // The failure is paid for up front: requests that arrive together cannot
    // all pass on the bucket's last token. A good key gets it back.
    if !known_good && let Err(wait) = guard.addresses.take(addr, Instant::now()) {
        refused("address_limited");
        return Err(ApiError::AuthFailuresLimited {
            retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
        });
    }
    let give_back = || {
        if !known_good {
            guard.addresses.give_back(addr, Instant::now());
        }
    };
    let Some(digest) = digest else {
        refused("missing_key");
        return Err(ApiError::InvalidApiKey);
    };
    if guard.unknown.contains(&digest, Instant::now()) {
        refused("negative_cache");
        return Err(ApiError::InvalidApiKey);
    }
    let found = match state.pool.get().await {
        Ok(client) => keys::authenticate_digest(&client, &digest).await,
        Err(e) => Err(e.into()),
    };
    let lookup = |result: &'static str| {
        metrics::counter!("penora_auth_lookups_total", "result" => result).increment(1);
    };
    match found {
        Ok(Some(principal)) => {
            lookup("found");
            give_back();
            guard.known_good.insert(digest, Instant::now());
            Ok(principal)
        }
        Ok(None) => {
            lookup("unknown");
            refused("unknown_key");
            // Unknown or revoked: refused from memory for a while, and no
            // longer exempt from its address's bucket (a key revoked while
            // exempt pays for this failure now).
            if known_good {
                let _ = guard.addresses.take(addr, Instant::now());
            }
            guard.known_good.remove(&digest);
            guard.unknown.insert(digest, Instant::now());
            Err(ApiError::InvalidApiKey)
        }
        Err(e) => {
            // The database failed, not the client: its token comes back.
            lookup("error");
            give_back();
            Err(e.into())
        }
    }
}
