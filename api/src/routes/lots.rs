//! Credit lots (contract §12) and settling for less (§13): `GET
//! /credit-lots`, `POST /credit-lots/{lot_id}/void`, `GET /balance`, and
//! `POST /settle-credits`.

use axum::{
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use penora_domain::timefmt::rfc3339_millis;
use penora_domain::{AppName, Description, ProjectCode, Reference, UserId, whole_number};
use penora_ledger as ledger;
use penora_ledger::{LotView, SettleReceipt, VoidReceipt};
use penora_platform::keys::Scope;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    auth::Auth,
    error::{ApiError, ErrorBody},
    extract::{ApiJson, ApiQuery, IdempotencyKey, int_param, user_id},
    routes::{
        RequestCorrelation, Success,
        credits::{acting_app, instant, refund_reference, with_replay_header},
        json_ok, next_cursor,
    },
    state::AppState,
};

/// The routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(credit_lots))
        .routes(routes!(void_lot))
        .routes(routes!(balance))
        .routes(routes!(settle_credits))
}

/// Query of `GET /credit-lots`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LotsQuery {
    /// The user.
    #[param(value_type = UserId, inline)]
    pub user_id: Option<String>,
    /// Only lots in this status: `active`, `depleted`, `expired` or `voided`.
    pub status: Option<String>,
    /// Lots per page, 1–200 (default 50).
    #[param(value_type = Option<i64>)]
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// Answer of `GET /credit-lots`.
#[derive(Debug, Serialize, ToSchema)]
pub struct LotsResponse {
    /// The user.
    pub user_id: String,
    /// Newest first.
    pub lots: Vec<LotView>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// The user's credit lots, newest first.
#[utoipa::path(
    get, path = "/credit-lots", tag = "credits",
    params(LotsQuery),
    responses(
        (status = 200, description = "A page of lots", body = Success<LotsResponse>),
        (status = 400, description = "`user_id_required` or `invalid_request`", body = ErrorBody),
        (status = 401, description = "`invalid_api_key`", body = ErrorBody),
        (status = 404, description = "`user_not_found`", body = ErrorBody),
    ),
    security(("api_key_header" = []), ("api_key_query" = []))
)]
async fn credit_lots(
    State(state): State<AppState>,
    auth: Auth,
    ApiQuery(q): ApiQuery<LotsQuery>,
) -> Result<Response, ApiError> {
    auth.require(Scope::Read)?;
    let user = user_id(q.user_id.as_deref())?;
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s) if ledger::LOT_STATUSES.contains(&s) => Some(s),
        Some(_) => {
            return Err(ApiError::InvalidRequest(
                "status: must be active, depleted, expired or voided".into(),
            ));
        }
    };
    let limit = int_param("limit", q.limit.as_deref(), 1, 200)?.unwrap_or(50);
    let before = int_param("cursor", q.cursor.as_deref(), 1, i64::MAX)?;
    let client = state.pool.get().await?;
    if ledger::account_summary(&client, &user).await?.is_none() {
        return Err(ApiError::UserNotFound);
    }
    let lots = ledger::lots(&client, &user, status, limit, before).await?;
    let next_cursor = next_cursor(&lots, limit, |l| l.lot_id.to_string());
    Ok(json_ok(LotsResponse {
        user_id: user.to_string(),
        lots,
        next_cursor,
    })
    .into_response())
}

/// Body of `POST /credit-lots/{lot_id}/void`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct VoidRequest {
    // The lot's owner.
    #[schema(value_type = UserId, inline)]
    pub user_id: Option<String>,
    /// Why (at most 500 characters).
    #[schema(value_type = Option<Description>, inline)]
    pub reason: Option<String>,
}

/// Void a lot: its remaining credits are removed with a `void` entry, and
/// credits refunded into it later are voided at once. Idempotent: voiding
/// a voided lot answers the first void (`Idempotent-Replayed: true`); an
/// expired lot has nothing left to void and answers `status: "expired"`.
#[utoipa::path(
    post, path = "/credit-lots/{lot_id}/void", tag = "credits",
    params(("lot_id" = i64, Path, description = "The lot's id")),
    request_body = VoidRequest,
    responses(
        (status = 200, description = "Voided (or replayed)", body = Success<VoidReceipt>),
        (status = 400, description = "`user_id_required` or `invalid_request`", body = ErrorBody),
        (status = 401, description = "`invalid_api_key`", body = ErrorBody),
        (status = 403, description = "`forbidden`, or `app_mismatch`: a key bound to an app voids only that app's lots", body = ErrorBody),
        (status = 404, description = "`user_not_found` or `not_found`", body = ErrorBody),
    ),
    security(("api_key_header" = []), ("api_key_query" = []))
)]
async fn void_lot(
    State(state): State<AppState>,
    correlation: RequestCorrelation,
    auth: Auth,
    _key: IdempotencyKey,
    Path(lot_id): Path<String>,
    ApiJson(body): ApiJson<VoidRequest>,
) -> Result<Response, ApiError> {
    auth.require(Scope::Admin)?;
    let lot_id = int_param("lot_id", Some(&lot_id), 1, i64::MAX)?
        .ok_or_else(|| ApiError::InvalidRequest("lot_id: is required".into()))?;
    let user = user_id(body.user_id.as_deref())?;
    let reason = Description::parse("reason", body.reason.as_deref())?
        .unwrap_or_else(|| "lot voided".into());
    let mut client = state.pool.get().await?;
    let acted_by = auth.0.label();
    let outcome = ledger::void_lot_as(
        &mut client,
        &user,
        lot_id,
        (&reason, auth.bound_app()),
        correlation.as_deref(),
        Some(&acted_by),
    )
    .await?;
    if !outcome.replayed {
        state.jobs_committed();
    }
    Ok(with_replay_header(
        StatusCode::OK,
        outcome.replayed,
        outcome.value,
    ))
}

/// Query of `GET /balance`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct BalanceQuery {
    /// The user.
    #[param(value_type = UserId, inline)]
    pub user_id: Option<String>,
    /// A past instant (RFC 3339); now when absent.
    pub at: Option<String>,
}

/// Answer of `GET /balance`.
#[derive(Debug, Serialize, ToSchema)]
pub struct BalanceResponse {
    /// The user.
    pub user_id: String,
    /// The instant.
    pub at: String,
    /// What the user could spend then.
    pub credits: i64,
}

/// The spendable balance at an instant, from the ledger.
#[utoipa::path(
    get, path = "/balance", tag = "credits",
    params(BalanceQuery),
    responses(
        (status = 200, description = "The balance then", body = Success<BalanceResponse>),
        (status = 400, description = "`user_id_required` or `invalid_request`", body = ErrorBody),
        (status = 401, description = "`invalid_api_key`", body = ErrorBody),
        (status = 404, description = "`user_not_found`", body = ErrorBody),
    ),
    security(("api_key_header" = []), ("api_key_query" = []))
)]
async fn balance(
    State(state): State<AppState>,
    auth: Auth,
    ApiQuery(q): ApiQuery<BalanceQuery>,
) -> Result<Response, ApiError> {
    auth.require(Scope::Read)?;
    let user = user_id(q.user_id.as_deref())?;
    let now = time::OffsetDateTime::now_utc();
    let at = match q.at.as_deref() {
        None | Some("") => now,
        Some(raw) => {
            let at = instant("at", raw)?;
            if at > now {
                return Err(ApiError::InvalidRequest(
                    "at: must not be in the future".into(),
                ));
            }
            at
        }
    };
    let client = state.pool.get().await?;
    let credits = ledger::balance_at(&client, &user, at)
        .await?
        .ok_or(ApiError::UserNotFound)?;
    Ok(json_ok(BalanceResponse {
        user_id: user.to_string(),
        at: rfc3339_millis(at),
        credits,
    })
    .into_response())
}

/// Body of `POST /settle-credits`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct SettleRequest {
    // The user.
    #[schema(value_type = UserId, inline)]
    pub user_id: Option<String>,
    // The reservation's key.
    #[schema(value_type = ProjectCode, inline)]
    pub project_code: Option<String>,
    /// Ku coins to charge, 0 up to what the reservation still holds; the
    /// rest is refunded in the same transaction. All of it when absent.
    #[schema(value_type = Option<i64>)]
    pub amount: Option<serde_json::Value>,
    /// The reservation's app (defaults to the key's app; with a key bound
    /// to no app, the user's only reservation with this code).
    #[schema(value_type = Option<AppName>, inline)]
    pub app_name: Option<String>,
    /// The settlement's reference (header `Idempotency-Key` when absent).
    #[schema(value_type = Option<Reference>, inline)]
    pub reference: Option<String>,
    /// Why (at most 500 characters).
    #[schema(value_type = Option<Description>, inline)]
    pub reason: Option<String>,
}

/// End a reservation now, charging what was used.
///
/// With `amount` below what the reservation still holds, the rest goes back
/// to the lots it came from, in the same transaction. Idempotent: settling
/// a settled reservation for the same amount answers it again
/// (`Idempotent-Replayed: true`); for another amount, `409
/// idempotency_conflict`. A reservation refunded before stays refunded: the
/// answer says `reservation_status: "refunded"` and `credits_charged: 0`.
/// `amount: 0` refunds all that is left. What is not charged is a refund,
/// so it is given back only inside the refund window: after it, a
/// reservation can only be settled in full (`409 not_refundable`). Without
/// `app_name` (and with a key bound to no app), the user's only reservation
/// with this `project_code` is settled, as `refund-credits` finds it.
#[utoipa::path(
    post, path = "/settle-credits", tag = "credits",
    request_body = SettleRequest,
    responses(
        (status = 200, description = "Settled (or replayed)", body = Success<SettleReceipt>),
        (status = 400, description = "`user_id_required` or `invalid_request`", body = ErrorBody),
        (status = 401, description = "`invalid_api_key`", body = ErrorBody),
        (status = 403, description = "`forbidden` or `app_mismatch`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`idempotency_conflict`, or `not_refundable`: settling for less after the refund window", body = ErrorBody),
    ),
    security(("api_key_header" = []), ("api_key_query" = []))
)]
async fn settle_credits(
    State(state): State<AppState>,
    correlation: RequestCorrelation,
    auth: Auth,
    key: IdempotencyKey,
    ApiJson(body): ApiJson<SettleRequest>,
) -> Result<Response, ApiError> {
    auth.require(Scope::Spend)?;
    let user = user_id(body.user_id.as_deref())?;
    let project_code = match body.project_code.as_deref() {
        Some(raw) => ProjectCode::parse(raw)?,
        None => return Err(ApiError::InvalidRequest("project_code: is required".into())),
    };
    // Like a refund: without `app_name` (and with a key bound to no app),
    // the user's only reservation with this code.
    let app_name = match (body.app_name.as_deref(), auth.bound_app()) {
        (None, None) => None,
        (raw, _) => Some(acting_app(&auth, "app_name", raw)?),
    };
    let max = state.settings.ledger.max_deduct_amount;
    let charge = match &body.amount {
        None | Some(serde_json::Value::Null) => None,
        // 0 charges nothing: all that is held is refunded.
        Some(v) => {
            let range = || format!("must be a whole number of credits from 0 to {max}");
            let n = whole_number("amount", v, &range)?;
            if !(0..=max).contains(&n) {
                return Err(ApiError::InvalidRequest(format!("amount: {}", range())));
            }
            Some(n)
        }
    };
    let reference = refund_reference(&key, body.reference.as_deref())?;
    let reason = Description::parse("reason", body.reason.as_deref())?
        .unwrap_or_else(|| "settled by the client".into());
    let request = ledger::Settle {
        user_id: &user,
        app_name: app_name.as_ref(),
        project_code: &project_code,
        by: ledger::SettledBy::Final,
        reason: &reason,
        charge,
        reference: reference.as_deref(),
        correlation_id: correlation.as_deref(),
        event_id: None,
        event_time: None,
    };
    let mut client = state.pool.get().await?;
    let receipt = ledger::settle_for(&mut client, &request).await?;
    let replayed = receipt.result != ledger::SettleResult::Settled;
    if !replayed {
        state.jobs_committed();
    }
    Ok(with_replay_header(StatusCode::OK, replayed, receipt))
}
