//! The API's one error type.
//!
//! Rules: every failure is JSON `{"success": false, "error": <sentence>,
//! "code": <snake_case word>}` with a fitting status; the integration guide's
//! sentences are kept word for word; a 500 says nothing about its cause (the
//! cause goes to the log, with the request id); the error's `code` is put in
//! the response extensions so the request log and the rejection metric can
//! count it.

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use penora_domain::ValidationError;
use penora_ledger::LedgerError;
use penora_store::DbError;
use penora_workspace::projects::{DeleteError, SaveError};
use serde::Serialize;

/// The guide's sentence for a missing or unknown key.
pub const INVALID_API_KEY: &str =
    "Invalid or missing API key. Include X-API-Key header or api_key parameter.";
/// The guide's sentence for a missing user id.
pub const USER_ID_REQUIRED: &str = "User ID required";
/// The guide's sentence for a failed deduction.
pub const INSUFFICIENT_CREDITS: &str = "Insufficient credits or deduction failed";
/// The contract's sentence for an unknown user.
pub const USER_NOT_FOUND: &str = "User not found";
/// The contract's sentence when the database is unreachable.
pub const UNAVAILABLE: &str = "Credit system temporarily unavailable";

/// Every way a request can fail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 401 `invalid_api_key`: no key, or an unknown or revoked one.
    #[error("{INVALID_API_KEY}")]
    InvalidApiKey,
    /// 400 `user_id_required`: `user_id` missing or empty.
    #[error("{USER_ID_REQUIRED}")]
    UserIdRequired,
    /// 402 `insufficient_credits`.
    #[error("{INSUFFICIENT_CREDITS}")]
    InsufficientCredits,
    /// 404 `user_not_found`.
    #[error("{USER_NOT_FOUND}")]
    UserNotFound,
    /// 400 `invalid_request`: the message names the field and why.
    #[error("{0}")]
    InvalidRequest(String),
    /// 409 `idempotency_conflict`: the key was used with other parameters.
    #[error("{0}")]
    IdempotencyConflict(String),
    /// 403 `spend_limit_exceeded`: the deduction would pass a spend limit
    /// (contract §16); the body adds `limit`, `spent` and `resets_at`.
    #[error(
        "Spend limit exceeded: the {period} limit of {limit} credits for {} has {spent} spent; it resets at {}",
        app_name.as_deref().unwrap_or("all apps"),
        penora_domain::timefmt::rfc3339_millis(*resets_at)
    )]
    SpendLimitExceeded {
        /// The app the limit holds; `None`: every app.
        app_name: Option<String>,
        /// The limit's period.
        period: penora_domain::period::Period,
        /// Its `max_credits`.
        limit: i64,
        /// Spent in the current period.
        spent: i64,
        /// When the next period starts.
        resets_at: time::OffsetDateTime,
    },
    /// 413 `storage_limit_exceeded`: says bytes needed and remaining.
    #[error("{0}")]
    StorageLimitExceeded(String),
    /// 413 `payload_too_large`: the request body is over the limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 415 `unsupported_media_type`: the body is not declared as JSON.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 403 `forbidden`: the key lacks the scope.
    #[error("{0}")]
    Forbidden(String),
    /// 403 `app_mismatch`: the key is bound to another app.
    #[error("{0}")]
    AppMismatch(String),
    /// 404 `not_found`: unknown reservation, project or route.
    #[error("{0}")]
    NotFound(String),
    /// 405 `method_not_allowed`.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 409 `not_refundable`: settled, or the refund window has passed.
    #[error("{0}")]
    NotRefundable(String),
    /// 409 `content_not_available`: the project is queued or failed.
    #[error("{0}")]
    ContentNotAvailable(String),
    /// 429 `rate_limited`, with `Retry-After` in seconds.
    #[error("Too many requests for this API key; retry after {retry_after_secs} s")]
    RateLimited {
        /// Seconds until a request will be accepted again.
        retry_after_secs: u64,
    },
    /// 503 `busy`, with `Retry-After`: every save slot stayed taken
    /// (`MAX_CONCURRENT_SAVES`) for `SAVE_QUEUE_WAIT_MS`, or the deduction
    /// queue is full (`DEDUCT_QUEUE_MAX`).
    #[error("Too many {what}; retry after {retry_after_secs} s")]
    Busy {
        /// What there are too many of.
        what: &'static str,
        /// Seconds to wait before retrying.
        retry_after_secs: u64,
    },
    /// 403 `project_limit_reached`: the save would give the user more live
    /// projects than `MAX_PROJECTS_PER_USER`.
    #[error("{0}")]
    ProjectLimitReached(String),
    /// 408 `request_timeout`: the request body did not arrive in full within
    /// `HTTP_BODY_TIMEOUT_SECS` of its headers; the connection is closed.
    #[error("The request body did not arrive in full within {secs} s")]
    RequestTimeout {
        /// `HTTP_BODY_TIMEOUT_SECS`.
        secs: u64,
    },
    /// 408 `request_timeout`: a save holding a slot sent its body slower
    /// than the least rate a slot is held for; the connection is closed.
    #[error(
        "The request body arrived slower than {bytes_per_sec} bytes a second; send it faster or retry later"
    )]
    BodyTooSlow {
        /// The least rate.
        bytes_per_sec: usize,
    },
    /// 503 `timeout`: the request did not finish within
    /// `HTTP_REQUEST_TIMEOUT_SECS`; the connection is closed.
    #[error(
        "The request did not finish within {secs} s; retry it with the same Idempotency-Key \
         (or project_code) to learn whether it was carried out"
    )]
    Timeout {
        /// `HTTP_REQUEST_TIMEOUT_SECS`.
        secs: u64,
        /// The `project_code` the service made for a deduction that came
        /// without one: the only key a retry can find it by.
        project_code: Option<String>,
    },
    /// 503 `unavailable`: the database cannot be reached.
    #[error("{UNAVAILABLE}")]
    Unavailable(String),
    /// 500 `internal`: a bug; the detail is logged, never sent.
    #[error("Internal error")]
    Internal(String),
    /// 429 `rate_limited`, with `Retry-After`: this client address failed
    /// authentication too often (`AUTH_FAILURES_PER_SEC`); no key was looked up.
    #[error("Too many failed authentications from this address; retry after {retry_after_secs} s")]
    AuthFailuresLimited {
        /// Seconds until the address may try again.
        retry_after_secs: u64,
    },
    /// 503 `webhooks_not_configured`: `WEBHOOK_SECRET_KEY` is not set, so
    /// no secret can be stored.
    #[error("Webhooks are not configured on this service (WEBHOOK_SECRET_KEY is not set)")]
    WebhooksNotConfigured,
    /// 401 `invalid_metrics_token`: `/metrics` needs `Authorization: Bearer
    /// <METRICS_TOKEN>`.
    #[error("Missing or wrong metrics token. Send Authorization: Bearer <METRICS_TOKEN>.")]
    InvalidMetricsToken,
}

/// The JSON body of every error.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Always `false`.
    pub success: bool,
    /// What went wrong, for people.
    #[schema(example = "Insufficient credits or deduction failed")]
    pub error: String,
    /// What went wrong, for programs (stable snake_case).
    #[schema(example = "insufficient_credits")]
    pub code: String,
    /// With `timeout` on a deduction sent without a `project_code`: the one
    /// the service made for it; retry with it to learn whether it was
    /// carried out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project_code: Option<String>,
    /// With `spend_limit_exceeded`: the limit's `max_credits`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
    /// With `spend_limit_exceeded`: what the limit counted in its current
    /// period.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spent: Option<i64>,
    /// With `spend_limit_exceeded`: when the limit's next period starts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<String>,
    /// With `spend_limit_exceeded`: the limit's period.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub period: Option<String>,
}

/// The error code of a response, left in its extensions for the request log.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

impl ApiError {
    /// The HTTP status and the stable code.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::InvalidApiKey => (StatusCode::UNAUTHORIZED, "invalid_api_key"),
            Self::UserIdRequired => (StatusCode::BAD_REQUEST, "user_id_required"),
            Self::InsufficientCredits => (StatusCode::PAYMENT_REQUIRED, "insufficient_credits"),
            Self::UserNotFound => (StatusCode::NOT_FOUND, "user_not_found"),
            Self::InvalidRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            Self::IdempotencyConflict(_) => (StatusCode::CONFLICT, "idempotency_conflict"),
            Self::SpendLimitExceeded { .. } => (StatusCode::FORBIDDEN, "spend_limit_exceeded"),
            Self::StorageLimitExceeded(_) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "storage_limit_exceeded")
            }
            Self::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Self::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Self::AppMismatch(_) => (StatusCode::FORBIDDEN, "app_mismatch"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Self::NotRefundable(_) => (StatusCode::CONFLICT, "not_refundable"),
            Self::ContentNotAvailable(_) => (StatusCode::CONFLICT, "content_not_available"),
            Self::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            Self::ProjectLimitReached(_) => (StatusCode::FORBIDDEN, "project_limit_reached"),
            Self::RequestTimeout { .. } | Self::BodyTooSlow { .. } => {
                (StatusCode::REQUEST_TIMEOUT, "request_timeout")
            }
            Self::Timeout { .. } => (StatusCode::SERVICE_UNAVAILABLE, "timeout"),
            Self::Busy { .. } => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            Self::AuthFailuresLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            Self::InvalidMetricsToken => (StatusCode::UNAUTHORIZED, "invalid_metrics_token"),
            Self::WebhooksNotConfigured => {
                (StatusCode::SERVICE_UNAVAILABLE, "webhooks_not_configured")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        match &self {
            Self::Internal(detail) => tracing::error!(code, detail = %detail, "request failed"),
            Self::Unavailable(detail) => {
                tracing::warn!(code, detail = %detail, "database unavailable")
            }
            _ => {}
        }
        let body = ErrorBody {
            success: false,
            error: self.to_string(),
            code: code.to_owned(),
            project_code: match &self {
                Self::Timeout { project_code, .. } => project_code.clone(),
                _ => None,
            },
            limit: None,
            spent: None,
            resets_at: None,
            period: None,
        };
        let body = match &self {
            Self::SpendLimitExceeded {
                period,
                limit,
                spent,
                resets_at,
                ..
            } => ErrorBody {
                limit: Some(*limit),
                spent: Some(*spent),
                resets_at: Some(penora_domain::timefmt::rfc3339_millis(*resets_at)),
                period: Some(period.to_string()),
                ..body
            },
            _ => body,
        };
        let mut response = (status, Json(body)).into_response();
        if let Self::RateLimited { retry_after_secs }
        | Self::AuthFailuresLimited { retry_after_secs }
        | Self::Busy {
            retry_after_secs, ..
        } = self
        {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        // Cut off mid-request, the body may be partly unread: the connection
        // cannot carry another request.
        if matches!(
            self,
            Self::RequestTimeout { .. } | Self::BodyTooSlow { .. } | Self::Timeout { .. }
        ) {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response.extensions_mut().insert(ErrorCode(code));
        response
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        Self::InvalidRequest(e.to_string())
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Unavailable(d) | DbError::Conflict(d) | DbError::LockTimeout(d) => {
                Self::Unavailable(d)
            }
            DbError::Other(d) => Self::Internal(d),
            DbError::Invariant(d) => {
                metrics::counter!("penora_invariant_breaches_total").increment(1);
                Self::Internal(format!("invariant broken: {d}"))
            }
        }
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        DbError::from(e).into()
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        DbError::from(e).into()
    }
}

impl From<LedgerError> for ApiError {
    fn from(e: LedgerError) -> Self {
        match e {
            LedgerError::UserNotFound => Self::UserNotFound,
            LedgerError::InsufficientCredits { .. } => Self::InsufficientCredits,
            LedgerError::SpendLimitExceeded {
                app_name,
                period,
                limit,
                spent,
                resets_at,
            } => Self::SpendLimitExceeded {
                app_name,
                period,
                limit,
                spent,
                resets_at,
            },
            LedgerError::IdempotencyConflict(m) => Self::IdempotencyConflict(m),
            LedgerError::NotFound(m) => Self::NotFound(m),
            LedgerError::NotRefundable(m) => Self::NotRefundable(m),
            LedgerError::AppMismatch(m) => Self::AppMismatch(m),
            // Only events name an event id; no HTTP request meets this.
            e @ LedgerError::EventSeen { .. } => Self::IdempotencyConflict(e.to_string()),
            LedgerError::Invalid { field, reason } => {
                Self::InvalidRequest(format!("{field}: {reason}"))
            }
            LedgerError::Db(e) => e.into(),
            busy @ LedgerError::AccountBusy => Self::Unavailable(busy.to_string()),
        }
    }
}

impl From<SaveError> for ApiError {
    fn from(e: SaveError) -> Self {
        match e {
            e @ SaveError::StorageLimitExceeded { .. } => Self::StorageLimitExceeded(e.to_string()),
            e @ SaveError::ProjectLimitReached { .. } => Self::ProjectLimitReached(e.to_string()),
            SaveError::UserNotFound => Self::UserNotFound,
            SaveError::IdempotencyConflict(m) => Self::IdempotencyConflict(m),
            SaveError::Db(e) => e.into(),
        }
    }
}

impl From<DeleteError> for ApiError {
    fn from(e: DeleteError) -> Self {
        match e {
            e @ DeleteError::NotFound(_) => Self::NotFound(e.to_string()),
            DeleteError::OtherApp { project_id, app } => Self::AppMismatch(format!(
                "This API key may not delete project {project_id}: it belongs to app `{app}`"
            )),
            DeleteError::Db(e) => e.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guide_sentences_are_kept_word_for_word() {
        assert_eq!(
            ApiError::InvalidApiKey.to_string(),
            "Invalid or missing API key. Include X-API-Key header or api_key parameter."
        );
        assert_eq!(ApiError::UserIdRequired.to_string(), "User ID required");
        assert_eq!(
            ApiError::InsufficientCredits.to_string(),
            "Insufficient credits or deduction failed"
        );
    }

    #[test]
    fn a_save_is_refused_as_a_movement_of_credits_would_be() {
        let answer = |e: ApiError| (e.status_and_code(), e.to_string());
        assert_eq!(
            answer(SaveError::UserNotFound.into()),
            answer(LedgerError::UserNotFound.into())
        );
        let conflict = "project_code \"p\" was already saved with another title or content";
        assert_eq!(
            answer(SaveError::IdempotencyConflict(conflict.into()).into()),
            answer(LedgerError::IdempotencyConflict(conflict.into()).into())
        );
        let down = || DbError::Unavailable("connection refused".into());
        assert_eq!(
            answer(SaveError::Db(down()).into()),
            answer(LedgerError::Db(down()).into())
        );
        assert_eq!(
            answer(SaveError::UserNotFound.into()),
            (
                (StatusCode::NOT_FOUND, "user_not_found"),
                USER_NOT_FOUND.to_owned()
            )
        );
    }

    #[test]
    fn internal_errors_hide_their_detail() {
        let e = ApiError::Internal("relation \"secret_table\" does not exist".into());
        assert_eq!(e.to_string(), "Internal error");
        let e = ApiError::Unavailable("connection refused to 10.0.0.1".into());
        assert_eq!(e.to_string(), UNAVAILABLE);
    }
}
