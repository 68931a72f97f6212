//! Spend limits (contract §16): `PUT /limits` sets one, `GET /limits` lists
//! a user's with their spending, `DELETE /limits` removes one.
//!
//! Rules:
//! * a limit is keyed by `(user_id, app_name or all apps, period)`; a PUT of
//!   an existing key replaces its `max_credits`;
//! * `max_credits` is a whole number from 0 to 2^53 − 1 (0 stops all
//!   spending the limit holds); `period` is `day`, `week` or `month` (UTC
//!   calendar periods); a bad field is refused naming it, and nothing
//!   changes;
//! * setting and removing take the account's lock (the user must exist),
//!   so they are ordered with the deductions they judge; the spending a new
//!   limit counts includes what was spent in its period before it;
//! * `DELETE` takes the key from its query (`?user_id=&app_name=&period=`)
//!   or, when it has one (not `null`), from a JSON body with the same
//!   fields.

use axum::{
    body::Bytes,
    extract::State,
    response::{IntoResponse, Response},
};
use penora_domain::{AppName, UserId, period::Period};
use penora_ledger::limits::{self, Limit, LimitView, MAX_LIMIT, Scope as LimitScope};
use penora_platform::keys::Scope;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
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
    OpenApiRouter::new().routes(routes!(get_limits, put_limit, delete_limit))
}

/// Body of `PUT /limits`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct LimitRequest {
    // The user (a plain comment: a doc comment would wrap the inlined
    // schema, and the document would lose its type and pattern).
    #[schema(value_type = UserId, inline)]
    pub user_id: Option<String>,
    /// The app whose spending the limit holds; absent or `null`: every app.
    #[schema(value_type = Option<AppName>, nullable = true)]
    pub app_name: Option<String>,
    /// `day`, `week` (from Monday) or `month` (from the 1st), in UTC.
    #[schema(value_type = Period)]
    pub period: Option<String>,
    /// Most credits spendable in a period (a whole number, 0 or more).
    #[schema(value_type = i64, minimum = 0, maximum = 9_007_199_254_740_991_i64)]
    pub max_credits: Option<serde_json::Value>,
}

/// The key of a limit, for `DELETE /limits` (query or JSON body).
#[derive(Debug, Deserialize, ToSchema, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LimitKey {
    /// The user (1–128 characters of `[A-Za-z0-9_.:@-]`).
    #[param(value_type = UserId, inline)]
    #[schema(value_type = UserId, inline)]
    pub user_id: Option<String>,
    /// The app of the limit; absent: the all-apps limit.
    #[param(value_type = Option<AppName>)]
    #[schema(value_type = Option<AppName>, nullable = true)]
    pub app_name: Option<String>,
    /// `day`, `week` or `month`.
    #[param(value_type = Period)]
    #[schema(value_type = Period)]
    pub period: Option<String>,
}

/// A user's limits.
#[derive(Debug, Serialize, ToSchema)]
pub struct LimitsResponse {
    /// The user.
    pub user_id: String,
    /// Every limit of the user, with its spending now.
    pub limits: Vec<LimitView>,
}

fn scope(app: Option<&str>) -> Result<LimitScope, ApiError> {
    Ok(LimitScope::of(
        app.map(|a| AppName::parse("app_name", a)).transpose()?,
    ))
}

fn period(raw: Option<&str>) -> Result<Period, ApiError> {
    let raw = raw.ok_or_else(|| {
        ApiError::InvalidRequest("period: is required (`day`, `week` or `month`)".into())
    })?;
    Ok(Period::parse(raw)?)
}

fn max_credits(raw: Option<&serde_json::Value>) -> Result<i64, ApiError> {
    let range = || format!("a whole number from 0 to {MAX_LIMIT}");
    let raw = raw.ok_or_else(|| {
        ApiError::InvalidRequest(format!("max_credits: is required ({})", range()))
    })?;
    match penora_domain::whole_number("max_credits", raw, &range) {
        Ok(n) if (0..=MAX_LIMIT).contains(&n) => Ok(n),
        Ok(_) => Err(ApiError::InvalidRequest(format!(
            "max_credits: must be {}",
            range()
        ))),
        Err(e) => Err(e.into()),
    }
}

fn answer(user: &UserId, limits: Vec<LimitView>) -> Response {
    json_ok(LimitsResponse {
        user_id: user.to_string(),
        limits,
    })
    .into_response()
}

/// The user's spend limits, each with what was spent in its current period,
/// what is left and when it resets.
#[utoipa::path(
    get, path = "/limits", tag = "credits",
    params(UserQuery),
    responses(
        (status = 200, description = "The user's limits (none: an empty list)", body = Success<LimitsResponse>),
        (status = 400, description = "`user_id_required` or `invalid_request`", body = ErrorBody),
        (status = 401, description = "`invalid_api_key`", body = ErrorBody),
    ),
    security(("api_key_header" = []), ("api_key_query" = []))
)]
async fn get_limits(
    State(state): State<AppState>,
    auth: Auth,
    ApiQuery(q): ApiQuery<UserQuery>,
) -> Result<Response, ApiError> {
    auth.require(Scope::Read)?;
    let user = user_id(q.user_id.as_deref())?;
    let client = state.pool.get().await?;
    Ok(answer(&user, limits::limits_of(&client, &user).await?))
}

/// Set a spend limit: at most `max_credits` spent per `period` in
/// `app_name` (or in all apps). A deduction that would pass it answers
/// `403 spend_limit_exceeded` and moves nothing.
#[utoipa::path(
    put, path = "/limits", tag = "credits",
    request_body = LimitRequest,
    responses(
        (status = 200, description = "Every limit of the user now", body = Success<LimitsResponse>),
        (status = 400, description = "`user_id_required` or `invalid_request` (naming the field)", body = ErrorBody),
        (status = 401, description = "`invalid_api_key`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the key lacks the `admin` scope", body = ErrorBody),
        (status = 404, description = "`user_not_found`", body = ErrorBody),
    ),
    security(("api_key_header" = []), ("api_key_query" = []))
)]
async fn put_limit(
    State(state): State<AppState>,
    auth: Auth,
    ApiJson(body): ApiJson<LimitRequest>,
) -> Result<Response, ApiError> {
    auth.require(Scope::Admin)?;
    let user = user_id(body.user_id.as_deref())?;
    let limit = Limit {
        scope: scope(body.app_name.as_deref())?,
        period: period(body.period.as_deref())?,
        max_credits: max_credits(body.max_credits.as_ref())?,
    };
    let mut client = state.pool.get().await?;
    let views = limits::set_limit(&mut client, &user, &limit).await?;
    tracing::info!(user_id = %user, period = %limit.period, scope = limit.scope.as_db(), max_credits = limit.max_credits, "spend limit set");
    Ok(answer(&user, views))
}

/// Remove a spend limit, named by `user_id`, `app_name` (absent: the
/// all-apps one) and `period`, in the query or a JSON body.
#[utoipa::path(
    delete, path = "/limits", tag = "credits",
    params(LimitKey),
    request_body(content = Option<LimitKey>, description = "The key, when not in the query"),
    responses(
        (status = 200, description = "The limits left", body = Success<LimitsResponse>),
        (status = 400, description = "`user_id_required` or `invalid_request`", body = ErrorBody),
        (status = 401, description = "`invalid_api_key`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the key lacks the `admin` scope", body = ErrorBody),
        (status = 404, description = "`user_not_found`, or `not_found`: no such limit", body = ErrorBody),
    ),
    security(("api_key_header" = []), ("api_key_query" = []))
)]
async fn delete_limit(
    State(state): State<AppState>,
    auth: Auth,
    ApiQuery(q): ApiQuery<LimitKey>,
    body: Bytes,
) -> Result<Response, ApiError> {
    auth.require(Scope::Admin)?;
    // No body, or `null`: the key is in the query.
    let given: serde_json::Value = if body.iter().all(u8::is_ascii_whitespace) {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::InvalidRequest(format!("the body is not JSON: {e}")))?
    };
    let key = if given.is_null() {
        q
    } else {
        serde_json::from_value::<LimitKey>(given)
            .map_err(|e| ApiError::InvalidRequest(format!("the body is not a limit's key: {e}")))?
    };
    let user = user_id(key.user_id.as_deref())?;
    let scope = scope(key.app_name.as_deref())?;
    let period = period(key.period.as_deref())?;
    let mut client = state.pool.get().await?;
    let views = limits::delete_limit(&mut client, &user, &scope, period).await?;
    tracing::info!(user_id = %user, %period, scope = scope.as_db(), "spend limit removed");
    Ok(answer(&user, views))
}
