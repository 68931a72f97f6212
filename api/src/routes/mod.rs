//! Every route, merged in one place, and the OpenAPI document generated from
//! the handlers' annotations.

pub mod alerts;
pub mod allowances;
pub mod credits;
mod doc;
pub mod limits;
pub mod lots;
pub mod projects;
pub mod quote;
pub mod system;
pub mod webhooks;

use std::time::Duration;

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, FromRequestParts, Request, State},
    http::{HeaderName, HeaderValue, Method, header, request::Parts},
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use tower_http::{
    catch_panic::CatchPanicLayer,
    cors::{AllowOrigin, CorsLayer},
};
use utoipa::{
    Modify, OpenApi, ToSchema,
    openapi::security::{ApiKey, ApiKeyValue, SecurityScheme},
};
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::{Config, SwaggerUi};

use crate::{error::ApiError, extract::BodyDeadline, state::AppState, telemetry};

/// A successful answer: `{"success": true, …fields of T}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Success<T> {
    /// Always `true`.
    pub success: bool,
    /// The answer's fields.
    #[serde(flatten)]
    pub body: T,
}

/// The `next_cursor` of a page of `rows` asked `limit` of: the last row's
/// cursor when the page is full (there may be more), else none.
pub fn next_cursor<T>(rows: &[T], limit: i64, cursor: impl Fn(&T) -> String) -> Option<String> {
    if rows.len() as i64 == limit {
        rows.last().map(cursor)
    } else {
        None
    }
}

/// Wraps `body` as `{"success": true, …}`, serialized straight to the
/// response: never through `serde_json::Value`, which would parse stored raw
/// JSON (project metadata) into numbers again.
pub fn json_ok<T: Serialize>(body: T) -> Json<Success<T>> {
    Json(Success {
        success: true,
        body,
    })
}

/// The request id, carried into the outbox as the jobs' correlation id.
pub struct RequestCorrelation(Option<String>);

impl RequestCorrelation {
    /// The id, if the request has one.
    pub fn as_deref(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for RequestCorrelation {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(
            parts
                .extensions
                .get::<telemetry::RequestId>()
                .map(|r| r.0.clone()),
        ))
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Penora Credits",
        description = "The one source of truth for users' Ku coins across Penora and ImageGene. \
            Every error is `{\"success\": false, \"error\": <sentence>, \"code\": <word>}`.",
    ),
    modifiers(&SecuritySchemes),
    tags(
        (name = "credits", description = "Balances, deductions, refunds, grants and the ledger"),
        (name = "projects", description = "The shared workspace"),
        (name = "pricing", description = "What an image costs"),
        (name = "webhooks", description = "Signed event deliveries to registered endpoints"),
        (name = "system", description = "Health and metrics"),
    ),
    components(schemas(crate::error::ErrorBody))
)]
struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key_header",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
        components.add_security_scheme(
            "api_key_query",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::new("api_key"))),
        );
    }
}

/// The OpenAPI document of every route; `max_amount` is `MAX_DEDUCT_AMOUNT`.
pub fn openapi(max_amount: i64) -> utoipa::openapi::OpenApi {
    let (_, api) = api_router().split_for_parts();
    doc::finish(api, max_amount)
}

fn api_router() -> OpenApiRouter<AppState> {
    let unified = OpenApiRouter::new()
        .merge(credits::router())
        .merge(alerts::router())
        .merge(limits::router())
        .merge(allowances::router())
        .merge(lots::router())
        .merge(projects::router())
        .merge(quote::router())
        .merge(webhooks::router());
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .nest("/api/unified", unified)
        .merge(system::router())
}

/// The whole application: routes, docs, fallbacks and middleware.
pub fn app(state: AppState) -> Router {
    // Save bodies are read by their handler, within MAX_BODY_BYTES and a
    // save slot; every other body is small.
    let max_body = state
        .settings
        .http
        .max_body_bytes
        .min(penora_config::SMALL_BODY_BYTES);
    let (router, api) = api_router().split_for_parts();
    let api = doc::finish(api, state.settings.ledger.max_deduct_amount);
    let docs = SwaggerUi::new("/api/unified/docs")
        .url("/api/unified/openapi.json", api)
        .config(
            Config::default()
                .validator_url("none")
                .try_it_out_enabled(true),
        );
    let cors = cors(&state.settings.http.cors_allowed_origins);
    let deadlines = Deadlines {
        body: state.settings.http.body_timeout,
        request: state.settings.http.request_timeout,
    };
    let console = crate::console::router().with_state(state.clone());
    let mut app = router
        .with_state(state)
        .merge(docs)
        .merge(console)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(CatchPanicLayer::custom(on_panic))
        .layer(middleware::from_fn_with_state(deadlines, deadline));
    if let Some(cors) = cors {
        app = app.layer(cors);
    }
    app.layer(middleware::from_fn(telemetry::observe))
}

/// `HTTP_BODY_TIMEOUT_SECS` and `HTTP_REQUEST_TIMEOUT_SECS`.
#[derive(Debug, Clone, Copy)]
struct Deadlines {
    body: Duration,
    request: Duration,
}

/// Gives each request its body's deadline ([`BodyDeadline`], counted from
/// here: its headers have just arrived) and cuts it off at the request's:
/// `503 timeout`, connection closed.
///
/// Cutting a request off drops its handler, as a client that goes away
/// does, and nothing is charged without an answer a retry cannot recover: a
/// deduction still waiting for its batch is left out of it by the coalescer
/// (`coalesce::drop_abandoned`: never carried out); one whose batch has
/// begun commits or not with that batch, and a retry with the same
/// idempotency key (`project_code` or `Idempotency-Key`) answers what it
/// did, replayed, or carries it out now if it did not. A save cut off after
/// its commit is answered the same way by a retry with its `project_code`;
/// before, its transaction rolls back. (A deduction or save sent without
/// a key has no retry that finds it, as with any answer lost on the way.)
async fn deadline(State(deadlines): State<Deadlines>, mut req: Request, next: Next) -> Response {
    req.extensions_mut()
        .insert(BodyDeadline::after(deadlines.body));
    let made = MadeCode::default();
    req.extensions_mut().insert(made.clone());
    match tokio::time::timeout(deadlines.request, next.run(req)).await {
        Ok(response) => response,
        Err(_) => {
            metrics::counter!("penora_http_request_timeouts_total").increment(1);
            ApiError::Timeout {
                secs: deadlines.request.as_secs(),
                project_code: made.0.get().cloned(),
            }
            .into_response()
        }
    }
}

/// Where a handler leaves the `project_code` it made for a deduction sent
/// without one, so that a `503 timeout` can give it to the client: without
/// it, a deduction cut off after its batch committed could not be found by a
/// retry, and a retry would charge again.
#[derive(Debug, Clone, Default)]
pub struct MadeCode(pub std::sync::Arc<std::sync::OnceLock<String>>);

impl<S: Send + Sync> FromRequestParts<S> for MadeCode {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts.extensions.get::<Self>().cloned().unwrap_or_default())
    }
}

/// CORS for the configured origins only; with none, no layer and no CORS
/// headers at all, so browsers keep cross-origin pages out.
fn cors(origins: &[String]) -> Option<CorsLayer> {
    let origins: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    if origins.is_empty() {
        return None;
    }
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers([
                header::CONTENT_TYPE,
                header::IF_NONE_MATCH,
                HeaderName::from_static("x-api-key"),
            ])
            .expose_headers([
                HeaderName::from_static("idempotent-replayed"),
                header::RETRY_AFTER,
                header::ETAG,
            ])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

async fn not_found(req: Request) -> ApiError {
    ApiError::NotFound(format!(
        "No route for {} {}",
        req.method(),
        req.uri().path()
    ))
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::MethodNotAllowed(format!(
        "Method {} is not allowed on {}",
        req.method(),
        req.uri().path()
    ))
}

fn on_panic(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    // The payload may hold request data: it is not logged, only counted.
    metrics::counter!("penora_http_panics_total").increment(1);
    ApiError::Internal("handler panicked".into()).into_response()
}
