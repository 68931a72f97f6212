//! Authentication, authorisation and rate limiting.
//!
//! Rules: the key comes from `X-API-Key` or the `api_key` query parameter; it
//! is hashed at once and only its digest is compared (in constant time) or
//! looked up; it never reaches a log line, a metric label or an error message.
//! Each key has its own token bucket; an exhausted bucket answers 429 with
//! `Retry-After`.

use std::sync::{Arc, OnceLock};

use axum::{extract::FromRequestParts, http::request::Parts};
use governor::clock::Clock;
use penora_common::keys::{self, Principal, Scope};

use crate::{error::ApiError, state::AppState};

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
        let presented = presented_key(parts).ok_or(ApiError::InvalidApiKey)?;
        let principal = match state.bootstrap_digest {
            Some(boot) if keys::digests_equal(&keys::digest(&presented), &boot) => {
                Principal::bootstrap()
            }
            _ => {
                let client = state.pool.get().await?;
                keys::authenticate(&client, &presented)
                    .await?
                    .ok_or(ApiError::InvalidApiKey)?
            }
        };
        drop(presented);
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
