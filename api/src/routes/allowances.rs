//! Recurring allowances (contract §16): `PUT /allowances` sets one (and
//! grants its current period when it has started), `GET /allowances` lists
//! a user's, `DELETE /allowances` removes one.
//!
//! Rules:
//! * `PUT` (scope `admin`): `user_id`, `allowance_id` (1–64 characters of
//!   `[A-Za-z0-9_.-]`), `amount` (1 to `MAX_DEDUCT_AMOUNT`), `period`
//!   (`day`, `week`, `month`), `category` (`promotional`, the default, or
//!   `paid`), `max_rollover` (0, the default, to `MAX_DEDUCT_AMOUNT`),
//!   `starts_at` (RFC 3339; default now), `app_name` (as `add-credits`:
//!   `penora` by default, a key bound to an app acts for that app only).
//!   Any fault is `400 invalid_request` naming the field, and nothing
//!   changes. The same values again change and grant nothing
//!   (`Idempotent-Replayed: true`); other values take effect at the next
//!   period; a started allowance keeps its `starts_at`;
//! * `GET` (scope `read`): `?user_id=`, each allowance with its
//!   `next_grant_at`;
//! * `DELETE` (scope `admin`): `?user_id=&allowance_id=`; future grants
//!   stop, granted lots stay; `404 not_found` when there is no such
//!   allowance.

use axum::{
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use penora_domain::{AppName, Credits, LotCategory, UserId, period::Period};
use penora_ledger::allowances::{self, AllowanceView, SetReceipt};
use penora_platform::keys::Scope;
use penora_store::accounts;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    auth::Auth,
    error::{ApiError, ErrorBody},
    extract::{ApiJson, ApiQuery, user_id},
    routes::{
        RequestCorrelation, Success,
        credits::{UserQuery, acting_app, with_replay_header},
        json_ok,
    },
    state::AppState,
};

/// The routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_allowances, put_allowance, delete_allowance))
}

/// Body of `PUT /allowances`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct AllowanceRequest {
    // The user (a plain comment: a doc comment would wrap the inlined
    // schema, and the document would lose its type and pattern).
    #[schema(value_type = UserId, inline)]
    pub user_id: Option<String>,
    /// The allowance's name, unique per user: 1–64 characters of
    /// `[A-Za-z0-9_.-]`.
    #[schema(value_type = String, min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_.-]{1,64}$", example = "pro-monthly")]
    pub allowance_id: Option<String>,
    // Credits granted each period, 1 to `MAX_DEDUCT_AMOUNT`.
    #[schema(value_type = Credits)]
    pub amount: Option<serde_json::Value>,
    /// `day`, `week` (from Monday) or `month` (from the 1st), UTC.
    #[schema(value_type = Period)]
    pub period: Option<String>,
    /// `promotional` (the default) or `paid`.
    #[schema(value_type = Option<LotCategory>)]
    pub category: Option<String>,
    /// At most this many unspent credits of a period's lot carry into the
    /// next period's (default 0).
    #[schema(value_type = Option<i64>, minimum = 0)]
    pub max_rollover: Option<serde_json::Value>,
    /// When the first period starts (RFC 3339; default now). The first
    /// period runs to the next calendar boundary.
    #[schema(value_type = Option<String>, example = "2025-09-01T00:00:00Z")]
    pub starts_at: Option<String>,
    /// The app the grants are written for (default `penora`; a key bound
    /// to an app acts for that app only).
    #[schema(value_type = Option<AppName>, inline, example = "penora")]
    pub app_name: Option<String>,
}

/// A user's allowances.
#[derive(Debug, Serialize, ToSchema)]
pub struct AllowanceList {
    /// The user.
    pub user_id: String,
    /// By `allowance_id`.
    pub allowances: Vec<AllowanceView>,
}

/// Query of `DELETE /allowances`: the allowance's key.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AllowanceKey {
    /// The user.
    #[param(value_type = UserId, inline)]
    pub user_id: Option<String>,
    /// The allowance (1–64 characters of `[A-Za-z0-9_.-]`).
    #[param(value_type = String)]
    pub allowance_id: Option<String>,
}

/// The answer of a delete.
#[derive(Debug, Serialize, ToSchema)]
pub struct AllowanceDeleted {
    /// Always `true`.
    pub deleted: bool,
    /// The allowance as it was (its lots stay as granted).
    pub allowance: AllowanceView,
}

/// A user's recurring allowances, with when each next grants.
#[utoipa::path(
    get, path = "/allowances", tag = "credits",
    params(UserQuery),
    responses(
        (status = 200, description = "The user's allowances", body = Success<AllowanceList>),
        (status = 400, description = "`user_id_required` or `invalid_request`", body = ErrorBody),
        (status = 401, description = "`invalid_api_key`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the key lacks the `read` scope", body = ErrorBody),
        (status = 404, description = "`user_not_found`", body = ErrorBody),
    ),
    security(("api_key_header" = []), ("api_key_query" = []))
)]
async fn get_allowances(
    State(state): State<AppState>,
    auth: Auth,
    ApiQuery(q): ApiQuery<UserQuery>,
) -> Result<Response, ApiError> {
    auth.require(Scope::Read)?;
    let user = user_id(q.user_id.as_deref())?;
    let client = state.pool.get().await?;
    if accounts::low_balance_threshold(&client, user.as_str())
        .await?
        .is_none()
    {
        return Err(ApiError::UserNotFound);
    }
    let list = allowances::list(&client, &user).await?;
    Ok(json_ok(AllowanceList {
        user_id: user.to_string(),
        allowances: list,
    })
    .into_response())
}

/// Set a recurring allowance: `amount` credits each calendar `period`
/// (UTC), in a lot expiring at the period's end, with up to
/// `max_rollover` unspent credits carried into the next period's lot.
///
/// The first period (from `starts_at`, default now, to the next calendar
/// boundary) is granted at once; later periods are granted by the worker
/// at each period start, once each (reference
/// `allowance:<allowance_id>:<period start>`). Setting an existing
/// allowance again with other values takes effect at the next period; with
/// the same values it changes and grants nothing (`Idempotent-Replayed:
/// true`).
#[utoipa::path(
    put, path = "/allowances", tag = "credits",
    request_body = AllowanceRequest,
    responses(
        (status = 200, description = "The allowance, and its current period's grant", body = Success<SetReceipt>),
        (status = 400, description = "`user_id_required` or `invalid_request` (naming the field)", body = ErrorBody),
        (status = 401, description = "`invalid_api_key`", body = ErrorBody),
        (status = 403, description = "`forbidden` (the key lacks the `admin` scope) or `app_mismatch`", body = ErrorBody),
        (status = 409, description = "`idempotency_conflict`: the period's reference was used for another grant", body = ErrorBody),
    ),
    security(("api_key_header" = []), ("api_key_query" = []))
)]
#[tracing::instrument(skip_all, fields(user_id))]
async fn put_allowance(
    State(state): State<AppState>,
    correlation: RequestCorrelation,
    auth: Auth,
    ApiJson(body): ApiJson<AllowanceRequest>,
) -> Result<Response, ApiError> {
    auth.require(Scope::Admin)?;
    let user = user_id(body.user_id.as_deref())?;
    let app_name = match (body.app_name.as_deref(), auth.bound_app()) {
        (None, None) => AppName::penora(),
        (raw, _) => acting_app(&auth, "app_name", raw)?,
    };
    let a = allowances::AllowanceRequest {
        user_id: &user,
        app_name: &app_name,
        allowance_id: body.allowance_id.as_deref(),
        amount: body.amount.as_ref(),
        period: body.period.as_deref(),
        category: body.category.as_deref(),
        max_rollover: body.max_rollover.as_ref(),
        starts_at: body.starts_at.as_deref(),
    }
    .validate(state.settings.ledger.max_deduct_amount)?;
    tracing::Span::current().record("user_id", user.as_str());
    let mut client = state.pool.get().await?;
    let receipt = allowances::set(
        &mut client,
        &a,
        None,
        auth.bound_app(),
        correlation.as_deref(),
    )
    .await?;
    let granted = receipt.current_grant.as_ref().is_some_and(|g| !g.replayed);
    if granted {
        state.jobs_committed();
    }
    let replayed = !receipt.created && !receipt.changed && !granted;
    Ok(with_replay_header(StatusCode::OK, replayed, receipt))
}

/// Delete a recurring allowance: no more periods are granted; the lots
/// already granted stay as they are (and expire at their period's end).
#[utoipa::path(
    delete, path = "/allowances", tag = "credits",
    params(AllowanceKey),
    responses(
        (status = 200, description = "Deleted", body = Success<AllowanceDeleted>),
        (status = 400, description = "`user_id_required` or `invalid_request`", body = ErrorBody),
        (status = 401, description = "`invalid_api_key`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the key lacks the `admin` scope", body = ErrorBody),
        (status = 404, description = "`not_found`: no such allowance", body = ErrorBody),
    ),
    security(("api_key_header" = []), ("api_key_query" = []))
)]
async fn delete_allowance(
    State(state): State<AppState>,
    auth: Auth,
    ApiQuery(q): ApiQuery<AllowanceKey>,
) -> Result<Response, ApiError> {
    auth.require(Scope::Admin)?;
    let user = user_id(q.user_id.as_deref())?;
    let id = allowances::allowance_id(q.allowance_id.as_deref())?;
    let mut client = state.pool.get().await?;
    match allowances::delete(&mut client, &user, &id, auth.bound_app()).await? {
        Some(allowance) => {
            tracing::info!(user_id = %user, allowance_id = %id, "allowance deleted");
            Ok(json_ok(AllowanceDeleted {
                deleted: true,
                allowance,
            })
            .into_response())
        }
        None => Err(ApiError::NotFound(format!(
            "No allowance `{id}` for this user"
        ))),
    }
}
