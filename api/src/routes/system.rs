//! `/health`, `/health/live`, `/ready` and `/metrics` (at the root, no API
//! key needed).
//!
//! Rules: what these answer from the database or the broker is probed at
//! most once a second ([`Probes`]), shared by every caller, so a flood of
//! health checks or scrapes costs one query a second; `/health/live` touches
//! nothing. When `METRICS_TOKEN` is set, `/metrics` answers only
//! `Authorization: Bearer <token>` (compared by digest, in constant time).

use std::time::Duration;

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use penora_platform::refreshed::{PROBE_INTERVAL, Refreshed};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{error::ApiError, state::AppState};

/// The last answers of the probes behind `/health`, `/ready` and `/metrics`,
/// each refreshed at most once a second.
#[derive(Debug)]
pub struct Probes {
    /// Outbox rows pending (`None`: the database did not answer) and whether
    /// the broker accepts connections.
    health: Refreshed<(Option<i64>, bool)>,
    /// The schema version, or why not ready.
    ready: Refreshed<Result<i32, String>>,
    /// The outbox backlog gauges (recorded by the probe itself).
    backlog: Refreshed<()>,
}

impl Default for Probes {
    fn default() -> Self {
        Self {
            health: Refreshed::new(PROBE_INTERVAL),
            ready: Refreshed::new(PROBE_INTERVAL),
            backlog: Refreshed::new(PROBE_INTERVAL),
        }
    }
}

/// Counts a probe that reached the database or the broker.
fn probed(what: &'static str) {
    metrics::counter!("penora_health_probes_total", "probe" => what).increment(1);
}

/// The routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(live))
        .routes(routes!(ready))
        .routes(routes!(metrics_text))
}

/// Answer of `GET /health/live`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Live {
    /// Always `alive`.
    #[schema(example = "alive")]
    pub status: &'static str,
}

/// Liveness: 200 while the process serves requests, whatever the database
/// and the broker do (a liveness probe that restarts the service when the
/// database is down would only add restarts to the outage; `/ready` is the
/// readiness probe).
#[utoipa::path(
    get, path = "/health/live", tag = "system",
    responses((status = 200, description = "The process runs", body = Live)),
)]
async fn live() -> Json<Live> {
    Json(Live { status: "alive" })
}

/// Answer of `GET /health`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`, `degraded` (broker unreachable) or `unavailable` (database down).
    #[schema(example = "ok")]
    pub status: String,
    /// `ok` or `unavailable`.
    pub database: String,
    /// `ok` or `unavailable` (whether the broker accepts connections).
    pub broker: String,
    /// Outbox rows not yet published (null when the database is down).
    pub outbox_pending: Option<i64>,
    /// The service's version.
    pub version: String,
}

/// Whether any node of `AMQP_URL` accepts TCP connections (within 1 s).
async fn broker_reachable(amqp_url: &str) -> bool {
    let probes = penora_platform::broker::nodes(amqp_url)
        .into_iter()
        .map(|node| async move {
            // lapin's own URI type: host and port (5672 or 5671 by scheme when absent).
            let Ok(uri) = node.parse::<lapin::uri::AMQPUri>() else {
                return false;
            };
            let target = (uri.authority.host, uri.authority.port);
            matches!(
                tokio::time::timeout(
                    Duration::from_secs(1),
                    tokio::net::TcpStream::connect(target)
                )
                .await,
                Ok(Ok(_))
            )
        });
    futures_util::future::join_all(probes)
        .await
        .into_iter()
        .any(|up| up)
}

/// Liveness and what is degraded: 200 while the database answers, 503 when
/// it does not.
#[utoipa::path(
    get, path = "/health", tag = "system",
    responses(
        (status = 200, description = "Database reachable (status `ok` or `degraded`)", body = Health),
        (status = 503, description = "Database unreachable", body = Health),
    )
)]
async fn health(State(state): State<AppState>) -> Response {
    let (pending, broker_ok) = state
        .probes
        .health
        .get(|| async {
            probed("health");
            let pending = async {
                let client = state.pool.get().await.ok()?;
                penora_store::outbox::pending(&client).await.ok()
            };
            let (pending, broker_ok) = tokio::join!(
                tokio::time::timeout(Duration::from_secs(3), pending),
                broker_reachable(state.settings.broker.url.expose())
            );
            (pending.ok().flatten(), broker_ok)
        })
        .await;
    let database_ok = pending.is_some();
    let status = match (database_ok, broker_ok) {
        (false, _) => "unavailable",
        (true, false) => "degraded",
        (true, true) => "ok",
    };
    let body = Health {
        status: status.into(),
        database: if database_ok { "ok" } else { "unavailable" }.into(),
        broker: if broker_ok { "ok" } else { "unavailable" }.into(),
        outbox_pending: pending,
        version: penora_platform::VERSION.into(),
    };
    let code = if database_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

/// Answer of `GET /ready`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Ready {
    /// Whether the service accepts traffic.
    pub ready: bool,
    /// The schema version, when ready.
    pub schema_version: Option<i32>,
    /// Why not, when not ready.
    pub reason: Option<String>,
}

/// Readiness: 200 when the database answers and every migration is applied,
/// 503 otherwise.
#[utoipa::path(
    get, path = "/ready", tag = "system",
    responses(
        (status = 200, description = "Accepting traffic", body = Ready),
        (status = 503, description = "Not ready", body = Ready),
    )
)]
async fn ready(State(state): State<AppState>) -> Response {
    let answer = state
        .probes
        .ready
        .get(|| async {
            probed("ready");
            tokio::time::timeout(Duration::from_secs(3), penora_store::readiness(&state.pool))
                .await
                .unwrap_or_else(|_| Err("database did not answer within 3 s".into()))
        })
        .await;
    match answer {
        Ok(version) => Json(Ready {
            ready: true,
            schema_version: Some(version),
            reason: None,
        })
        .into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Ready {
                ready: false,
                schema_version: None,
                reason: Some(reason),
            }),
        )
            .into_response(),
    }
}

/// Whether `headers` carry `Authorization: Bearer <token>` (the scheme in
/// any case). Digests are compared, in constant time: neither the token's
/// characters nor its length show in the time taken.
fn bearer_matches(headers: &HeaderMap, token: &str) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, presented)) = value.trim().split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer")
        && penora_platform::keys::digests_equal(
            &penora_platform::keys::digest(presented.trim()),
            &penora_platform::keys::digest(token),
        )
}

/// Prometheus text format; with `METRICS_TOKEN` set, only for
/// `Authorization: Bearer <token>`.
#[utoipa::path(
    get, path = "/metrics", tag = "system",
    responses(
        (status = 200, description = "Metrics in Prometheus text format", content_type = "text/plain"),
        (status = 401, description = "`invalid_metrics_token`: `METRICS_TOKEN` is set and the request lacks `Authorization: Bearer <token>`", body = crate::error::ErrorBody),
    )
)]
async fn metrics_text(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(token) = &state.settings.http.metrics_token
        && !bearer_matches(&headers, token.expose())
    {
        let mut refused = ApiError::InvalidMetricsToken.into_response();
        // RFC 9110: a 401 names the scheme it wants.
        refused
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return refused;
    }
    let status = state.pool.status();
    metrics::gauge!("penora_db_pool_connections", "state" => "in_use")
        .set((status.size.saturating_sub(status.available)) as f64);
    metrics::gauge!("penora_db_pool_connections", "state" => "idle").set(status.available as f64);
    metrics::gauge!("penora_db_pool_waiting").set(status.waiting as f64);
    state
        .probes
        .backlog
        .get(|| async {
            probed("backlog");
            let backlog = async {
                let client = state.pool.get().await.ok()?;
                penora_store::outbox::backlog(&client).await.ok()
            };
            if let Ok(Some(b)) = tokio::time::timeout(Duration::from_secs(2), backlog).await {
                penora_store::outbox::record_backlog(b);
            }
        })
        .await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_authorization(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(header::AUTHORIZATION, v);
        }
        headers
    }

    #[test]
    fn only_the_bearer_token_itself_opens_the_metrics() {
        let token = "s3cret-token";
        assert!(bearer_matches(
            &with_authorization("Bearer s3cret-token"),
            token
        ));
        assert!(bearer_matches(
            &with_authorization("bearer  s3cret-token "),
            token
        ));
        for wrong in [
            "",
            "Bearer",
            "Bearer ",
            "Bearer s3cret-tokeN",
            "Bearer s3cret-token2",
            "Basic s3cret-token",
            "s3cret-token",
        ] {
            assert!(
                !bearer_matches(&with_authorization(wrong), token),
                "{wrong:?}"
            );
        }
        assert!(!bearer_matches(&HeaderMap::new(), token));
    }
}
