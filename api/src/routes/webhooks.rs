//! Webhook endpoints (contract §14): `POST /webhooks` (the secret is in this
//! answer and nowhere else, ever), `GET /webhooks`, `DELETE
//! /webhooks/{id}`, `POST /webhooks/{id}/test`. Scope `admin`.
//!
//! Rules: the URL is checked as the worker checks it on every connection
//! (`https`, a host name, every address it resolves to public, unless
//! `WEBHOOK_ALLOW_PRIVATE=true`); a name that does not resolve yet is
//! accepted, since delivery checks it again. Unknown event types are
//! refused. The secret is sealed under `WEBHOOK_SECRET_KEY` before it is
//! stored; without that key no endpoint is registered (`503
//! webhooks_not_configured`). A key bound to an app registers endpoints
//! bound to that app only.

use axum::{
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use penora_domain::events::{Envelope, EventType};
use penora_domain::{AppName, Description};
use penora_platform::keys::{self, Scope};
use penora_platform::webhooks::{
    client::checked_addresses,
    secret::{Sealed, SecretBox, SigningSecret},
    target,
};
use penora_store::DbError;
use penora_store::webhooks::{self, ALL_EVENTS, DeliveryJob, Endpoint, NewEndpoint, Registration};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    auth::Auth,
    error::{ApiError, ErrorBody},
    extract::{ApiJson, IdempotencyKey},
    routes::{RequestCorrelation, Success, credits::with_replay_header, json_ok},
    state::AppState,
};

/// The routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(register, list))
        .routes(routes!(delete))
        .routes(routes!(send_test))
}

/// Body of `POST /webhooks`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct WebhookRequest {
    /// Where events are `POST`ed: an `https` URL whose host is a public name.
    pub url: Option<String>,
    /// Event types (`balance.low`, …), or `["*"]` for all.
    pub events: Option<Vec<String>>,
    /// Only this app's users' events.
    #[schema(value_type = Option<AppName>, inline, example = "imagegene")]
    pub app: Option<String>,
    /// Free text (at most 500 characters).
    #[schema(value_type = Option<Description>, inline)]
    pub description: Option<String>,
}

/// An endpoint as listed (never its secret).
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookView {
    /// `we_…`.
    pub id: String,
    /// Where events are sent.
    pub url: String,
    /// Event types, or `["*"]`.
    pub events: Vec<String>,
    /// The app it is bound to, if any.
    pub app: Option<String>,
    /// Free text.
    pub description: Option<String>,
    /// When it was registered.
    pub created_at: String,
}

impl From<Endpoint> for WebhookView {
    fn from(e: Endpoint) -> Self {
        Self {
            id: e.id,
            url: e.url,
            events: e.events,
            app: e.app,
            description: e.description,
            created_at: penora_domain::timefmt::rfc3339_millis(e.created_at),
        }
    }
}

/// Answer of `POST /webhooks`: the endpoint and its signing secret, shown
/// this once.
#[derive(Debug, Serialize, ToSchema)]
pub struct Registered {
    /// The endpoint.
    #[serde(flatten)]
    pub endpoint: WebhookView,
    /// `whsec_…`: verify signatures with it (Standard Webhooks). Never
    /// shown again.
    pub secret: String,
}

/// Answer of `GET /webhooks`.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookList {
    /// Every endpoint not deleted, oldest first.
    pub webhooks: Vec<WebhookView>,
}

/// Answer of `DELETE /webhooks/{id}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Deleted {
    /// The endpoint.
    pub id: String,
    /// Always true.
    pub deleted: bool,
}

/// Answer of `POST /webhooks/{id}/test`.
#[derive(Debug, Serialize, ToSchema)]
pub struct TestSent {
    /// The endpoint.
    pub id: String,
    /// The `webhook.test` event queued for it (its `webhook-id`).
    pub event_id: String,
}

/// The event types of `raw`: known types, or `*` alone.
fn event_types(raw: Option<Vec<String>>) -> Result<Vec<String>, ApiError> {
    let raw = raw.ok_or_else(|| ApiError::InvalidRequest("events: is required".into()))?;
    if raw.is_empty() || raw.len() > EventType::ALL.len() + 1 {
        return Err(ApiError::InvalidRequest(format!(
            "events: list 1 to {} event types, or [\"*\"]",
            EventType::ALL.len()
        )));
    }
    if raw.iter().any(|t| t == ALL_EVENTS) {
        return Ok(vec![ALL_EVENTS.to_owned()]);
    }
    let mut types = Vec::with_capacity(raw.len());
    for t in raw {
        match EventType::from_db(&t) {
            Some(kind) => types.push(kind.as_str().to_owned()),
            None => {
                return Err(ApiError::InvalidRequest(format!(
                    "events: unknown event type `{}` (known: {}, or \"*\")",
                    t.chars().take(64).collect::<String>(),
                    EventType::ALL
                        .iter()
                        .map(|k| k.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
    }
    types.sort();
    types.dedup();
    Ok(types)
}

/// Register an endpoint. The answer holds its signing secret, which is
/// never listed: keep it.
///
/// Header `Idempotency-Key` (1–255 visible ASCII characters) makes it
/// idempotent: the same key from the same API key with the same parameters
/// answers the endpoint it registered, secret included, with
/// `Idempotent-Replayed: true` (while that endpoint is not deleted); with
/// other parameters, or once it is deleted, it is `409
/// idempotency_conflict`.
#[utoipa::path(
    post, path = "/webhooks", tag = "webhooks",
    request_body = WebhookRequest,
    responses(
        (status = 201, description = "Registered (or replayed, with header Idempotent-Replayed: true); keep the secret", body = Success<Registered>),
        (status = 400, description = "`invalid_request`: the field named is missing or wrong (a URL that is not https or resolves to a non-public address, an unknown event type)", body = ErrorBody),
        (status = 409, description = "`idempotency_conflict`: the Idempotency-Key registered another endpoint, or one deleted since", body = ErrorBody),
        (status = 401, description = "`invalid_api_key`", body = ErrorBody),
        (status = 403, description = "`forbidden` (not an admin key) or `app_mismatch`", body = ErrorBody),
        (status = 503, description = "`webhooks_not_configured`: WEBHOOK_SECRET_KEY is not set", body = ErrorBody),
    ),
    security(("api_key_header" = []), ("api_key_query" = []))
)]
async fn register(
    State(state): State<AppState>,
    auth: Auth,
    key: IdempotencyKey,
    ApiJson(body): ApiJson<WebhookRequest>,
) -> Result<Response, ApiError> {
    auth.require(Scope::Admin)?;
    let hooks = &state.webhooks;
    let raw_url = body
        .url
        .as_deref()
        .ok_or_else(|| ApiError::InvalidRequest("url: is required".into()))?;
    let allow_private = state.settings.webhooks.allow_private;
    let url = target::check_url(raw_url, allow_private)
        .map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
    let events = event_types(body.events)?;
    let app = match body.app.as_deref() {
        None => auth.bound_app().map(str::to_owned),
        Some(a) => {
            let app = AppName::parse("app", a)?;
            auth.require_app("app", app.as_str())?;
            Some(app.as_str().to_owned())
        }
    };
    let description = Description::parse("description", body.description.as_deref())?;
    match checked_addresses(hooks.resolver.as_ref(), &url, allow_private).await {
        Ok(_) | Err(target::TargetError::Unresolved(_)) => {}
        Err(e) => return Err(ApiError::InvalidRequest(e.to_string())),
    }
    let Some(secrets) = &hooks.secrets else {
        return Err(ApiError::WebhooksNotConfigured);
    };
    // The registration's key: the caller's and the header's, so that one
    // caller's Idempotency-Key never finds another caller's endpoint; and
    // its parameters', so that the same key with others is a conflict.
    let registration = key.value().map(|k| {
        let caller = auth
            .0
            .key_id
            .map_or_else(|| "bootstrap".to_owned(), |id| id.to_string());
        let parameters = serde_json::json!([url.as_str(), &events, &app, &description]);
        (
            keys::digest(&format!("webhook registration\n{caller}\n{k}")),
            keys::digest(&parameters.to_string()),
        )
    });
    let client = state.pool.get().await?;
    if let Some((k, parameters)) = &registration
        && let Some(found) = webhooks::registered(&client, k).await?
    {
        return replay(secrets, found, parameters);
    }
    let id = format!("we_{}", uuid::Uuid::new_v4().simple());
    let secret = SigningSecret::generate().map_err(ApiError::Internal)?;
    let sealed = secrets.seal(&secret, &id).map_err(ApiError::Internal)?;
    let inserted = webhooks::insert_endpoint(
        &client,
        &NewEndpoint {
            id: &id,
            url: url.as_str(),
            events: &events,
            app: app.as_deref(),
            description: description.as_deref(),
            secret_nonce: &sealed.nonce,
            secret_sealed: &sealed.sealed,
            registration: registration
                .as_ref()
                .map(|(k, p)| Registration { key: k, request: p }),
        },
    )
    .await?;
    let Some(endpoint) = inserted else {
        // A registration with the same key committed in between.
        let Some((k, parameters)) = &registration else {
            return Err(ApiError::Internal(
                "an endpoint without a registration key was not inserted".into(),
            ));
        };
        let found = webhooks::registered(&client, k).await?.ok_or_else(|| {
            ApiError::Internal("the registration key's endpoint was not found".into())
        })?;
        return replay(secrets, found, parameters);
    };
    tracing::info!(endpoint_id = %endpoint.id, events = ?endpoint.events, "webhook endpoint registered");
    Ok(with_replay_header(
        StatusCode::CREATED,
        false,
        Registered {
            endpoint: endpoint.into(),
            secret: secret.reveal(),
        },
    ))
}

/// The answer of a registration made before with the same key: the endpoint
/// and its secret again, unless the parameters differ or it was deleted.
fn replay(
    secrets: &SecretBox,
    found: webhooks::Registered,
    parameters: &[u8],
) -> Result<Response, ApiError> {
    if !keys::digests_equal(&found.request_digest, parameters) {
        return Err(ApiError::IdempotencyConflict(
            "Idempotency-Key: was used to register an endpoint with other parameters (url, events, app or description)"
                .into(),
        ));
    }
    if found.endpoint.deleted_at.is_some() {
        return Err(ApiError::IdempotencyConflict(format!(
            "Idempotency-Key: registered endpoint {}, which was deleted since",
            found.endpoint.id
        )));
    }
    let sealed = Sealed {
        nonce: found.secret_nonce,
        sealed: found.secret_sealed,
    };
    let secret = secrets.open(&sealed, &found.endpoint.id).ok_or_else(|| {
        ApiError::Internal("the endpoint's secret does not open with WEBHOOK_SECRET_KEY".into())
    })?;
    Ok(with_replay_header(
        StatusCode::CREATED,
        true,
        Registered {
            endpoint: found.endpoint.into(),
            secret: secret.reveal(),
        },
    ))
}

/// The endpoints (never their secrets).
#[utoipa::path(
    get, path = "/webhooks", tag = "webhooks",
    responses(
        (status = 200, description = "Every endpoint not deleted", body = Success<WebhookList>),
        (status = 401, description = "`invalid_api_key`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
    ),
    security(("api_key_header" = []), ("api_key_query" = []))
)]
async fn list(State(state): State<AppState>, auth: Auth) -> Result<Response, ApiError> {
    auth.require(Scope::Admin)?;
    let client = state.pool.get().await?;
    let endpoints = webhooks::list_endpoints(&client, false).await?;
    let bound = auth.bound_app();
    Ok(json_ok(WebhookList {
        webhooks: endpoints
            .into_iter()
            .filter(|e| bound.is_none() || e.app.as_deref() == bound)
            .map(WebhookView::from)
            .collect(),
    })
    .into_response())
}

/// The endpoint `id`, not deleted, that this key may act on.
async fn endpoint_of(
    client: &impl deadpool_postgres::GenericClient,
    auth: &Auth,
    id: &str,
) -> Result<Endpoint, ApiError> {
    let found = webhooks::endpoint(client, id).await?;
    match found {
        Some(e) if auth.bound_app().is_none() || e.app.as_deref() == auth.bound_app() => Ok(e),
        _ => Err(ApiError::NotFound(format!(
            "No webhook endpoint `{}`",
            id.chars().take(64).collect::<String>()
        ))),
    }
}

/// Delete an endpoint: it gets nothing more (deliveries queued for it are
/// dropped); its delivery history stays.
#[utoipa::path(
    delete, path = "/webhooks/{id}", tag = "webhooks",
    params(("id" = String, Path, description = "The endpoint (`we_…`)")),
    responses(
        (status = 200, description = "Deleted", body = Success<Deleted>),
        (status = 401, description = "`invalid_api_key`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such endpoint (or already deleted)", body = ErrorBody),
    ),
    security(("api_key_header" = []), ("api_key_query" = []))
)]
async fn delete(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    auth.require(Scope::Admin)?;
    let client = state.pool.get().await?;
    let endpoint = endpoint_of(&client, &auth, &id).await?;
    if !webhooks::delete_endpoint(&client, &endpoint.id).await? {
        return Err(ApiError::NotFound(format!(
            "No webhook endpoint `{}`",
            endpoint.id
        )));
    }
    tracing::info!(endpoint_id = %endpoint.id, "webhook endpoint deleted");
    Ok(json_ok(Deleted {
        id: endpoint.id,
        deleted: true,
    })
    .into_response())
}

/// Send a `webhook.test` event to this endpoint only (its delivery and its
/// delivery job are written in one transaction; the worker delivers it).
#[utoipa::path(
    post, path = "/webhooks/{id}/test", tag = "webhooks",
    params(("id" = String, Path, description = "The endpoint (`we_…`)")),
    responses(
        (status = 202, description = "Queued", body = Success<TestSent>),
        (status = 401, description = "`invalid_api_key`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such endpoint", body = ErrorBody),
    ),
    security(("api_key_header" = []), ("api_key_query" = []))
)]
async fn send_test(
    State(state): State<AppState>,
    correlation: RequestCorrelation,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    auth.require(Scope::Admin)?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await.map_err(DbError::from)?;
    let endpoint = endpoint_of(&tx, &auth, &id).await?;
    // A test concerns no user: `data.user_id` names the test itself, so the
    // envelope keeps §14's shape.
    let user_id = "webhook_test";
    let envelope = Envelope::new(
        uuid::Uuid::now_v7(),
        EventType::WebhookTest,
        time::OffsetDateTime::now_utc(),
        serde_json::json!({"user_id": user_id, "endpoint_id": endpoint.id}),
    );
    let body = serde_json::to_string(&envelope)
        .map_err(|e| ApiError::Internal(format!("test event encoding: {e}")))?;
    let job = DeliveryJob {
        event_id: envelope.id.clone(),
        endpoint_id: String::new(),
        user_id: user_id.to_owned(),
        event_type: envelope.kind.clone(),
        body,
    };
    webhooks::enqueue_deliveries(
        &tx,
        &job,
        std::slice::from_ref(&endpoint.id),
        correlation.as_deref(),
    )
    .await?;
    tx.commit().await.map_err(DbError::from)?;
    state.jobs_committed();
    Ok((
        StatusCode::ACCEPTED,
        json_ok(TestSent {
            id: endpoint.id,
            event_id: envelope.id,
        }),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types_are_known_ones_or_the_wildcard() {
        assert_eq!(
            event_types(Some(vec!["balance.low".into(), "balance.low".into()])).ok(),
            Some(vec!["balance.low".to_owned()])
        );
        assert_eq!(
            event_types(Some(vec!["balance.low".into(), "*".into()])).ok(),
            Some(vec!["*".to_owned()])
        );
        for bad in [None, Some(vec![]), Some(vec!["balance.lo".into()])] {
            let e = event_types(bad).expect_err("refused");
            assert!(e.to_string().starts_with("events:"), "{e}");
        }
    }
}
