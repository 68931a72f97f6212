//! A user's low-balance threshold (contract §14): `PUT /alerts` sets it (or
//! sends it back to the default), `GET /alerts` reads it.
//!
//! Rules:
//! * the threshold is an integer of 0 or more, or `null` for the service's
//!   default (`LOW_BALANCE_THRESHOLD`); the field must be given: a body
//!   without it is refused, as is any other value, and nothing changes;
//! * it is stored on the account row (`accounts.low_balance_threshold`), in
//!   one `UPDATE` that takes the account's lock: each movement decides its
//!   crossing with the threshold it read under that lock;
//! * the answer says the threshold in force and whether it is the default.

use axum::{
    extract::State,
    response::{IntoResponse, Response},
};
use penora_domain::UserId;
use penora_platform::keys::Scope;
use penora_store::accounts;
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    auth::Auth,
    error::{ApiError, ErrorBody},
    extract::{ApiJson, ApiQuery, user_id},
    routes::{Success, credits::UserQuery, json_ok},
    state::AppState,
};

/// The routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_alerts, put_alerts))
}

/// Body of `PUT /alerts`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct AlertsRequest {
    // The user (a plain comment: a doc comment would wrap the inlined
    // schema, and the document would lose its type and pattern).
    #[schema(value_type = UserId, inline)]
    pub user_id: Option<String>,
    /// Below this many spendable credits a movement emits `balance.low`
    /// (an integer of 0 or more); `null` goes back to the default
    /// (`LOW_BALANCE_THRESHOLD`). Required.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>, minimum = 0, maximum = 9_007_199_254_740_991_i64, nullable = true, required = true)]
    pub low_balance_threshold: Option<serde_json::Value>,
}

/// Tells a field given as `null` (`Some(Null)`) from one not given (`None`).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

/// A user's low-balance threshold.
#[derive(Debug, Serialize, ToSchema)]
pub struct AlertsResponse {
    /// The user.
    pub user_id: String,
    /// The threshold in force (the default's value when the user has none
    /// of their own).
    pub low_balance_threshold: i64,
    /// Whether it is the service's default (`LOW_BALANCE_THRESHOLD`).
    pub default: bool,
}

/// The answer for a user whose own threshold is `own`.
fn answer(state: &AppState, user: &UserId, own: Option<i64>) -> Response {
    json_ok(AlertsResponse {
        user_id: user.to_string(),
        low_balance_threshold: own.unwrap_or(state.settings.ledger.low_balance_threshold),
        default: own.is_none(),
    })
    .into_response()
}

/// The largest threshold accepted (JavaScript's largest safe integer).
pub const MAX_THRESHOLD: i64 = 9_007_199_254_740_991;

/// The threshold asked for: `Some(n)`, or `None` for the default.
fn threshold(raw: Option<&serde_json::Value>) -> Result<Option<i64>, ApiError> {
    let invalid = |why: &str| ApiError::InvalidRequest(format!("low_balance_threshold: {why}"));
    match raw {
        None => Err(invalid("is required (an integer of 0 or more, or null)")),
        Some(serde_json::Value::Null) => Ok(None),
        // A whole number as every amount is read (`5` or `5.0`, as JSON
        // Schema's integer and JavaScript agree), up to JavaScript's largest
        // safe integer.
        Some(v) => {
            let range = || format!("an integer from 0 to {MAX_THRESHOLD}, or null");
            match penora_domain::whole_number("low_balance_threshold", v, &range) {
                Ok(n) if (0..=MAX_THRESHOLD).contains(&n) => Ok(Some(n)),
                Ok(_) => Err(invalid(&format!("must be {}", range()))),
                Err(e) => Err(ApiError::InvalidRequest(e.to_string())),
            }
        }
    }
}

/// The user's low-balance threshold.
#[utoipa::path(
    get, path = "/alerts", tag = "credits",
    params(UserQuery),
    responses(
        (status = 200, description = "The threshold in force", body = Success<AlertsResponse>),
        (status = 400, description = "`user_id_required` or `invalid_request`", body = ErrorBody),
        (status = 401, description = "`invalid_api_key`", body = ErrorBody),
        (status = 404, description = "`user_not_found`", body = ErrorBody),
    ),
    security(("api_key_header" = []), ("api_key_query" = []))
)]
async fn get_alerts(
    State(state): State<AppState>,
    auth: Auth,
    ApiQuery(q): ApiQuery<UserQuery>,
) -> Result<Response, ApiError> {
    auth.require(Scope::Read)?;
    let user = user_id(q.user_id.as_deref())?;
    let client = state.pool.get().await?;
    let own = accounts::low_balance_threshold(&client, user.as_str())
        .await?
        .ok_or(ApiError::UserNotFound)?;
    Ok(answer(&state, &user, own))
}

/// Set the user's low-balance threshold, or send it back to the default
/// (`null`). `balance.low` fires when spendable credits go from at or
/// above it to below it, and again only after they have risen back to it.
#[utoipa::path(
    put, path = "/alerts", tag = "credits",
    request_body = AlertsRequest,
    responses(
        (status = 200, description = "The threshold in force now", body = Success<AlertsResponse>),
        (status = 400, description = "`user_id_required` or `invalid_request` (naming `low_balance_threshold`)", body = ErrorBody),
        (status = 401, description = "`invalid_api_key`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the key lacks the `admin` scope", body = ErrorBody),
        (status = 404, description = "`user_not_found`", body = ErrorBody),
    ),
    security(("api_key_header" = []), ("api_key_query" = []))
)]
async fn put_alerts(
    State(state): State<AppState>,
    auth: Auth,
    ApiJson(body): ApiJson<AlertsRequest>,
) -> Result<Response, ApiError> {
    auth.require(Scope::Admin)?;
    let user = user_id(body.user_id.as_deref())?;
    let own = threshold(body.low_balance_threshold.as_ref())?;
    let client = state.pool.get().await?;
    if !accounts::set_low_balance_threshold(&client, user.as_str(), own).await? {
        return Err(ApiError::UserNotFound);
    }
    Ok(answer(&state, &user, own))
}
