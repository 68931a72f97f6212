//! Request logging and HTTP metrics.
//!
//! Rules: one JSON line per request with its request id, method, path, route,
//! status, latency, error code and key id; the query string is logged only
//! after every `api_key` value has been replaced by `[redacted]`; metric
//! labels are the matched route (never the raw path, which may hold ids), the
//! status, and the method among the known ones (else `other`).

use std::time::Instant;

use axum::{
    extract::{MatchedPath, Request},
    http::{HeaderName, HeaderValue},
    middleware::Next,
    response::Response,
};
use tracing::Instrument;

use crate::{auth::KeyIdSlot, error::ErrorCode};

/// Header carrying the request id (taken from the client when it sends a sane one).
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request id of the request being handled.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Replaces the value of every `api_key` parameter with `[redacted]` (names
/// are compared decoded, so `api%5Fkey` is caught too); the rest stays as sent.
pub fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| {
            let name = pair.split('=').next().unwrap_or_default();
            let decoded = form_urlencoded::parse(name.as_bytes()).next();
            if decoded.is_some_and(|(n, _)| n.eq_ignore_ascii_case("api_key")) {
                format!("{name}=[redacted]")
            } else {
                pair.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn sane_request_id(v: &HeaderValue) -> Option<String> {
    let s = v.to_str().ok()?;
    (!s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    .then(|| s.to_owned())
}

/// Middleware: request id, one log line per request, HTTP metrics.
pub async fn observe(mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let request_id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(sane_request_id)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(redact_query);
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let slot = KeyIdSlot::default();
    req.extensions_mut().insert(slot.clone());
    req.extensions_mut().insert(RequestId(request_id.clone()));

    let span =
        tracing::info_span!("request", request_id = %request_id, method = %method, route = %route);
    let mut response = next.run(req).instrument(span).await;

    let status = response.status().as_u16();
    let latency = start.elapsed();
    let code = response.extensions().get::<ErrorCode>().map(|c| c.0);
    tracing::info!(
        request_id = %request_id,
        method = %method,
        path = %path,
        query = query.as_deref().unwrap_or(""),
        route = %route,
        status,
        latency_ms = latency.as_secs_f64() * 1000.0,
        code = code.unwrap_or(""),
        key_id = slot.0.get().map(String::as_str).unwrap_or(""),
        "request"
    );
    let status_label = status.to_string();
    let method_label = penora_domain::labels::method_label(method.as_str());
    metrics::counter!("penora_http_requests_total", "route" => route.clone(), "method" => method_label, "status" => status_label)
        .increment(1);
    metrics::histogram!("penora_http_request_duration_seconds", "route" => route)
        .record(latency.as_secs_f64());
    if let Some(code) = code {
        metrics::counter!("penora_http_rejections_total", "code" => code).increment(1);
    }
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID.clone(), v);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_in_query_strings_are_redacted() {
        assert_eq!(
            redact_query("user_id=u1&api_key=secret"),
            "user_id=u1&api_key=[redacted]"
        );
        assert_eq!(
            redact_query("api%5Fkey=secret&x=1"),
            "api%5Fkey=[redacted]&x=1"
        );
        assert_eq!(redact_query("API_KEY=secret"), "API_KEY=[redacted]");
        assert_eq!(redact_query("api_key"), "api_key=[redacted]");
        assert_eq!(redact_query("a=1&b=2"), "a=1&b=2");
        assert_eq!(redact_query("%"), "%");
        assert_eq!(redact_query("%4"), "%4");
    }
}
