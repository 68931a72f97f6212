//! Extractors that reject with [`ApiError`], so axum's own rejections
//! (malformed JSON, wrong content type, body too large, bad query) use the
//! contract's error shape and name the field at fault. Every body is read
//! within its request's [`BodyDeadline`] (`408 request_timeout`).

use std::time::Duration;

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Request},
    http::{HeaderMap, StatusCode, header, request::Parts},
};
use serde::{Deserialize, de::DeserializeOwned};

use crate::error::ApiError;

/// When a request's body must have arrived in full: `HTTP_BODY_TIMEOUT_SECS`
/// after its headers. Put in each request's extensions by the deadline
/// layer ([`crate::routes::app`]).
#[derive(Debug, Clone, Copy)]
pub struct BodyDeadline {
    /// The instant.
    pub at: tokio::time::Instant,
    /// `HTTP_BODY_TIMEOUT_SECS`, for the message.
    pub limit: Duration,
}

/// The deadline of a request that came without one (a router used without
/// the deadline layer): the setting's default.
const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(60);

impl BodyDeadline {
    /// `limit` from now.
    pub fn after(limit: Duration) -> Self {
        Self {
            at: tokio::time::Instant::now() + limit,
            limit,
        }
    }

    /// The request's deadline, from its extensions.
    pub fn of(extensions: &axum::http::Extensions) -> Self {
        extensions
            .get::<Self>()
            .copied()
            .unwrap_or_else(|| Self::after(DEFAULT_BODY_TIMEOUT))
    }

    /// The answer when it has passed.
    pub fn passed(&self) -> ApiError {
        metrics::counter!("penora_http_body_timeouts_total").increment(1);
        ApiError::RequestTimeout {
            secs: self.limit.as_secs(),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for BodyDeadline {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Self::of(&parts.extensions))
    }
}

/// A JSON body; errors name the field (`amount: invalid type: …`).
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        require_json(req.headers())?;
        let deadline = BodyDeadline::of(req.extensions());
        let read = tokio::time::timeout_at(deadline.at, Bytes::from_request(req, state));
        let bytes = read
            .await
            .map_err(|_| deadline.passed())?
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge(
                        "The request body is larger than the service accepts".into(),
                    )
                } else {
                    ApiError::InvalidRequest(format!(
                        "Could not read the request body: {}",
                        rejection.body_text()
                    ))
                }
            })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Refuses a body not declared as JSON (`application/json` or
/// `application/*+json`) with `415 unsupported_media_type`.
pub fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|mime| {
            let mime = mime.trim().to_ascii_lowercase();
            mime == "application/json"
                || (mime.starts_with("application/") && mime.ends_with("+json"))
        })
        .unwrap_or(false);
    if is_json {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType(
            "Expected a JSON body with header Content-Type: application/json".into(),
        ))
    }
}

/// Parses a JSON body into `T` (which may borrow from it), naming the
/// field of the first error.
pub fn parse_json<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let what = if inner.is_syntax() || inner.is_eof() {
            format!("Malformed JSON body: {inner}")
        } else if path == "." {
            format!("Invalid JSON body: {inner}")
        } else {
            format!("{path}: {inner}")
        };
        ApiError::InvalidRequest(what)
    })?;
    de.end()
        .map_err(|e| ApiError::InvalidRequest(format!("Malformed JSON body: {e}")))?;
    Ok(value)
}

/// Query parameters as strings (each handler parses and names its fields).
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        serde_urlencoded::from_str(query)
            .map(ApiQuery)
            .map_err(|e| ApiError::InvalidRequest(format!("Invalid query string: {e}")))
    }
}

/// Parses an optional whole-number query parameter within `min..=max`.
/// Absent is `None`; present but empty (`?limit=`) is not a number and is
/// refused, as the OpenAPI document says (found by schemathesis).
pub fn int_param(
    field: &'static str,
    raw: Option<&str>,
    min: i64,
    max: i64,
) -> Result<Option<i64>, ApiError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let n: i64 = raw.parse().map_err(|_| {
        ApiError::InvalidRequest(format!(
            "{field}: must be a whole number from {min} to {max}"
        ))
    })?;
    if !(min..=max).contains(&n) {
        return Err(ApiError::InvalidRequest(format!(
            "{field}: must be from {min} to {max} (got {n})"
        )));
    }
    Ok(Some(n))
}

/// The `user_id` of a request: missing or empty is `user_id_required`, a bad
/// one is `invalid_request`.
pub fn user_id(raw: Option<&str>) -> Result<penora_domain::UserId, ApiError> {
    match raw {
        None | Some("") => Err(ApiError::UserIdRequired),
        Some(raw) => Ok(penora_domain::UserId::parse(raw)?),
    }
}

/// The `Idempotency-Key` header (CONTRACT §11): 1–255 visible ASCII
/// characters, the convention clients already know. It stands for the body
/// field a route is idempotent by (`project_code`, `reference`) when the
/// body has none; a header and a body value that differ are refused.
#[derive(Debug, Clone, Default)]
pub struct IdempotencyKey(Option<String>);

/// Name of the header.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Longest `Idempotency-Key`.
pub const IDEMPOTENCY_KEY_MAX_LEN: usize = 255;

impl IdempotencyKey {
    /// Reads and checks the header.
    pub fn from_headers(headers: &HeaderMap) -> Result<Self, ApiError> {
        let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
        let Some(value) = values.next() else {
            return Ok(Self(None));
        };
        let bad = || {
            ApiError::InvalidRequest(format!(
                "Idempotency-Key: must be one header of 1 to {IDEMPOTENCY_KEY_MAX_LEN} visible ASCII characters"
            ))
        };
        if values.next().is_some() {
            return Err(bad());
        }
        let raw = value.as_bytes();
        if raw.is_empty()
            || raw.len() > IDEMPOTENCY_KEY_MAX_LEN
            || !raw.iter().all(|b| (0x21..=0x7e).contains(b))
        {
            return Err(bad());
        }
        Ok(Self(Some(String::from_utf8_lossy(raw).into_owned())))
    }

    /// The header's value, if it was sent.
    pub fn value(&self) -> Option<&str> {
        self.0.as_deref()
    }

    /// The value of the body field `field`: the body's, else the header's
    /// made to fit the field (`fits`: as it is when it does, else `ik_` and
    /// 40 hex digits of its SHA-256, the same for every retry). A header and
    /// a body value that differ: `400 invalid_request`.
    pub fn or_body(
        &self,
        field: &'static str,
        body: Option<&str>,
        fits: impl Fn(&str) -> bool,
    ) -> Result<Option<String>, ApiError> {
        match (body, self.0.as_deref()) {
            (Some(body), Some(key)) if body != key => Err(ApiError::InvalidRequest(format!(
                "{field}: differs from the Idempotency-Key header; send one, or the same value in both"
            ))),
            (Some(body), _) => Ok(Some(body.to_owned())),
            (None, Some(key)) if fits(key) => Ok(Some(key.to_owned())),
            (None, Some(key)) => {
                let digest = penora_platform::keys::digest(key);
                Ok(Some(format!("ik_{}", &hex::encode(digest)[..40])))
            }
            (None, None) => Ok(None),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Self::from_headers(&parts.headers)
    }
}
