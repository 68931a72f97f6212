//! Credits: balance, deduct (reserve), refund, grant and the ledger.

use axum::{
    extract::State,
    http::{HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use penora_domain::timefmt::rfc3339_millis;
use penora_domain::{AppName, Credits, Description, GrantReason, ProjectCode, Reference, UserId};
use penora_ledger as ledger;
use penora_ledger::grant_rules::LotTerms;
use penora_platform::keys::Scope;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    auth::Auth,
    error::{ApiError, ErrorBody},
    extract::{ApiJson, ApiQuery, IdempotencyKey, int_param, user_id},
    routes::{RequestCorrelation, Success, json_ok, next_cursor},
    state::AppState,
};

/// The routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(user_info))
        .routes(routes!(deduct_credits))
        .routes(routes!(refund_credits))
        .routes(routes!(add_credits))
        .routes(routes!(transactions))
}

/// Marks a replayed answer with `Idempotent-Replayed: true`.
pub fn with_replay_header(status: StatusCode, replayed: bool, body: impl Serialize) -> Response {
    let mut response = (status, json_ok(body)).into_response();
    if replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

/// Query of `GET /user-info`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UserQuery {
    /// The user (1–128 characters of `[A-Za-z0-9_.:@-]`).
    #[param(value_type = UserId, inline)]
    pub user_id: Option<String>,
}

/// Storage figures in MiB, as the guide shows them.
#[derive(Debug, Serialize, ToSchema)]
pub struct Storage {
    /// MiB used, 2 decimals.
    #[schema(example = 0.85)]
    pub used_mb: f64,
    /// MiB left, 2 decimals.
    #[schema(example = 0.15)]
    pub remaining_mb: f64,
    /// The quota in MiB, 2 decimals.
    #[schema(example = 1.0)]
    pub total_mb: f64,
    /// Percent of the quota used, whole number.
    #[schema(example = 85)]
    pub usage_percentage: i64,
    /// Projects in the workspace (queued, saved or failed; deleted ones are
    /// gone).
    #[schema(example = 4)]
    pub total_projects: i64,
    /// Bytes used.
    pub used_bytes: i64,
    /// The quota in bytes.
    pub total_bytes: i64,
}

/// Answer of `GET /user-info`.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserInfo {
    /// The user.
    #[schema(example = "101902121794505144784")]
    pub user_id: String,
    /// Spendable Ku coins.
    #[schema(example = 50)]
    pub credits: i64,
    /// Ku coins held by reservations that can still be refunded or settled.
    pub reserved_credits: i64,
    /// Spendable Ku coins by category (they sum to `credits`).
    pub credits_breakdown: CreditsBreakdown,
    /// The soonest expiry of spendable Ku coins, `null` when none expire.
    pub next_expiry: Option<NextExpiry>,
    /// Storage use.
    pub storage: Storage,
    /// The user's spend limits with their spending now (contract §16);
    /// empty when none is set.
    pub limits: Vec<penora_ledger::limits::LimitView>,
    /// When this answer was made.
    #[schema(example = "2025-08-28T06:00:00.000Z")]
    pub timestamp: String,
}

/// Spendable credits by category.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreditsBreakdown {
    /// Bought credits.
    pub paid: i64,
    /// Given credits (bonuses).
    pub promotional: i64,
}

/// The next credits to expire.
#[derive(Debug, Serialize, ToSchema)]
pub struct NextExpiry {
    /// How many expire then.
    pub amount: i64,
    /// When.
    #[schema(example = "2025-09-27T06:00:00.000Z")]
    pub expires_at: String,
}

fn mib(bytes: i64) -> f64 {
    (bytes as f64 / 1_048_576.0 * 100.0).round() / 100.0
}

impl Storage {
    /// The figures for `used` bytes of a `quota`, with `total_projects`.
    pub fn new(quota: i64, used: i64, total_projects: i64) -> Self {
        Self {
            used_mb: mib(used),
            remaining_mb: mib((quota - used).max(0)),
            total_mb: mib(quota),
            usage_percentage: ((used as f64 / quota as f64) * 100.0).round() as i64,
            total_projects,
            used_bytes: used,
            total_bytes: quota,
        }
    }
}

/// Balance and storage of a user.
#[utoipa::path(
    get, path = "/user-info", tag = "credits",
    params(UserQuery),
    responses(
        (status = 200, description = "Balance and storage", body = Success<UserInfo>),
        (status = 400, description = "`user_id_required` or `invalid_request`", body = ErrorBody),
        (status = 401, description = "`invalid_api_key`", body = ErrorBody),
        (status = 404, description = "`user_not_found`", body = ErrorBody),
    ),
    security(("api_key_header" = []), ("api_key_query" = []))
)]
#[tracing::instrument(skip_all, fields(user_id))]
async fn user_info(
    State(state): State<AppState>,
    auth: Auth,
    ApiQuery(q): ApiQuery<UserQuery>,
) -> Result<Response, ApiError> {
    auth.require(Scope::Read)?;
    let user = user_id(q.user_id.as_deref())?;
    tracing::Span::current().record("user_id", user.as_str());
    let summary = state
        .summaries
        .get(user.clone())
        .await?
        .ok_or(ApiError::UserNotFound)?;
    let limits = penora_ledger::limits::limits_of(&state.pool.get().await?, &user).await?;
    let quota = state.settings.workspace.storage_quota_bytes;
    let (credits, workspace) = (&summary.credits, &summary.workspace);
    let body = UserInfo {
        user_id: user.to_string(),
        credits: credits.balance,
        reserved_credits: credits.reserved_credits,
        credits_breakdown: CreditsBreakdown {
            paid: credits.paid,
            promotional: credits.promotional,
        },
        next_expiry: credits.next_expiry.map(|(amount, at)| NextExpiry {
            amount,
            expires_at: rfc3339_millis(at),
        }),
        storage: Storage::new(
            quota,
            workspace.storage_used_bytes,
            workspace.total_projects,
        ),
        limits,
        timestamp: rfc3339_millis(time::OffsetDateTime::now_utc()),
    };
    Ok(json_ok(body).into_response())
}

/// Body of `POST /deduct-credits`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct DeductRequest {
    // The user.
    #[schema(value_type = UserId, inline)]
    pub user_id: Option<String>,
    // Whole Ku coins, 1 to `MAX_DEDUCT_AMOUNT`.
    #[schema(value_type = Credits)]
    pub amount: Option<serde_json::Value>,
    /// The app spending the credits (defaults to the key's app).
    #[schema(value_type = Option<AppName>, inline, example = "imagegene")]
    pub app_name: Option<String>,
    /// What for (at most 500 characters).
    #[schema(value_type = Option<Description>, inline, example = "AI image generation - 1024x1024 artwork")]
    pub description: Option<String>,
    /// Idempotency key; the service makes one when absent.
    #[schema(value_type = Option<ProjectCode>, inline, example = "img_xyz123")]
    pub project_code: Option<String>,
}

/// Answer of `POST /deduct-credits`.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeductResponse {
    /// Ku coins taken.
    #[schema(example = 5)]
    pub credits_deducted: i64,
    /// The balance right after the deduction.
    #[schema(example = 45)]
    pub new_balance: i64,
    /// The app.
    #[schema(example = "imagegene")]
    pub app_name: String,
    /// When the deduction was made.
    #[schema(example = "2025-08-28T06:00:00.000Z")]
    pub timestamp: String,
    /// The reservation's key.
    #[schema(example = "img_xyz123")]
    pub project_code: String,
    /// `reserved`, `partially_refunded`, `settled` or `refunded`.
    #[schema(example = "reserved")]
    pub reservation_status: String,
    /// Until when it can be refunded.
    pub refundable_until: String,
    /// The user.
    pub user_id: String,
    /// The lots the credits came from, in the order drawn.
    pub allocations: Vec<ledger::Allocation>,
}

/// The app a request acts for: the body's, else the key's own.
pub(crate) fn acting_app(
    auth: &Auth,
    field: &'static str,
    raw: Option<&str>,
) -> Result<AppName, ApiError> {
    let app = match raw {
        Some(raw) => AppName::parse(field, raw)?,
        None => match auth.bound_app() {
            Some(own) => AppName::parse(field, own)?,
            None => return Err(ApiError::InvalidRequest(format!("{field}: is required"))),
        },
    };
    auth.require_app(field, app.as_str())?;
    Ok(app)
}

/// Reserve and deduct credits, synchronously.
///
/// Idempotent by `(user_id, app_name, project_code)`: the same key with the
/// same amount answers the first result again with `Idempotent-Replayed: true`
/// and moves nothing; with another amount it is a `409`. Keys are per user:
/// another user's request with the same code is that user's own reservation.
///
/// Header `Idempotency-Key` (1–255 visible ASCII characters) is the
/// `project_code` when the body has none; a body `project_code` that differs
/// from it is `400 invalid_request`.
#[utoipa::path(
    post, path = "/deduct-credits", tag = "credits",
    request_body = DeductRequest,
    responses(
        (status = 200, description = "Deducted (or replayed, with header Idempotent-Replayed: true)", body = Success<DeductResponse>),
        (status = 400, description = "`user_id_required` or `invalid_request`", body = ErrorBody),
        (status = 401, description = "`invalid_api_key`", body = ErrorBody),
        (status = 402, description = "`insufficient_credits`", body = ErrorBody),
        (status = 403, description = "`forbidden` or `app_mismatch`", body = ErrorBody),
        (status = 404, description = "`user_not_found`", body = ErrorBody),
        (status = 409, description = "`idempotency_conflict`", body = ErrorBody),
        (status = 429, description = "`rate_limited`", body = ErrorBody),
        (status = 503, description = "`unavailable`; or `busy` with `Retry-After` (the deduction queue is full, or the audit runs more than `AUDIT_LAG_LIMIT_MS` behind): nothing was moved", body = ErrorBody),
    ),
    security(("api_key_header" = []), ("api_key_query" = []))
)]
#[tracing::instrument(skip_all, fields(user_id, project_code))]
async fn deduct_credits(
    State(state): State<AppState>,
    correlation: RequestCorrelation,
    auth: Auth,
    key: IdempotencyKey,
    made: crate::routes::MadeCode,
    ApiJson(body): ApiJson<DeductRequest>,
) -> Result<Response, ApiError> {
    auth.require(Scope::Spend)?;
    let user = user_id(body.user_id.as_deref())?;
    let amount = Credits::from_json(
        "amount",
        body.amount.as_ref(),
        state.settings.ledger.max_deduct_amount,
    )?;
    let app_name = acting_app(&auth, "app_name", body.app_name.as_deref())?;
    let description = Description::parse("description", body.description.as_deref())?;
    let project_code = match key.or_body("project_code", body.project_code.as_deref(), |k| {
        ProjectCode::parse(k).is_ok()
    })? {
        Some(raw) => ProjectCode::parse(&raw)?,
        None => {
            let code = ProjectCode::generate();
            let _ = made.0.set(code.to_string());
            code
        }
    };
    let span = tracing::Span::current();
    span.record("user_id", user.as_str());
    span.record("project_code", project_code.as_str());
    let request = ledger::Deduct {
        user_id: user,
        amount,
        app_name,
        description,
        project_code,
        refund_window: state.settings.ledger.refund_window,
    };
    hold_back_for_audit(&state).await?;
    let outcome = state
        .deducts
        .deduct(request, correlation.as_deref().map(str::to_owned))
        .await?;
    if !outcome.replayed {
        state.jobs_committed();
    }
    let r = &outcome.value;
    let body = DeductResponse {
        credits_deducted: r.credits_deducted,
        new_balance: r.new_balance,
        app_name: r.app_name.clone(),
        timestamp: rfc3339_millis(r.timestamp),
        project_code: r.project_code.clone(),
        reservation_status: r.reservation_status.as_str().to_owned(),
        refundable_until: rfc3339_millis(r.refundable_until),
        user_id: r.user_id.clone(),
        allocations: r.allocations.clone(),
    };
    Ok(with_replay_header(StatusCode::OK, outcome.replayed, body))
}

/// Longest a deduction waits for the audit to catch up before it is refused.
const AUDIT_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// The backpressure on deductions: while the audit runs more than
/// `AUDIT_LAG_LIMIT_MS` behind the ledger, a new deduction waits up to
/// [`AUDIT_WAIT`] for it to catch up, then is answered `503 busy` with
/// `Retry-After`, having changed nothing. The lag then stays bounded however
/// hard clients push: what they cannot be given at once they are told to
/// bring back later, instead of a backlog that grows without end.
async fn hold_back_for_audit(state: &AppState) -> Result<(), ApiError> {
    let limit =
        u64::try_from(state.settings.ledger.audit_lag_limit.as_millis()).unwrap_or(u64::MAX);
    if limit == 0 || state.audit_lag.millis() <= limit {
        return Ok(());
    }
    let started = tokio::time::Instant::now();
    let deadline = started + AUDIT_WAIT;
    let waited = || {
        metrics::histogram!("penora_deduct_held_back_seconds")
            .record(started.elapsed().as_secs_f64());
    };
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        if state.audit_lag.millis() <= limit {
            waited();
            return Ok(());
        }
    }
    waited();
    metrics::counter!("penora_deductions_held_back_total").increment(1);
    Err(ApiError::Busy {
        what: "deductions while the audit catches up",
        retry_after_secs: 1,
    })
}

/// Body of `POST /refund-credits`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RefundRequest {
    // The user.
    #[schema(value_type = UserId, inline)]
    pub user_id: Option<String>,
    // The reservation's key.
    #[schema(value_type = ProjectCode, inline)]
    pub project_code: Option<String>,
    /// Why (at most 500 characters).
    #[schema(value_type = Option<Description>, inline)]
    pub reason: Option<String>,
    /// The reservation's app; needed only when the user has reservations of
    /// several apps with this code (defaults to the key's app).
    #[schema(value_type = Option<AppName>, inline)]
    pub app_name: Option<String>,
    /// Ku coins to give back, 1 up to what is still refundable; without
    /// it, all that is left.
    #[schema(value_type = Option<Credits>)]
    pub amount: Option<serde_json::Value>,
    /// What makes this refund idempotent: the same reference refunds once
    /// (header `Idempotency-Key` when absent). Required with `amount`.
    #[schema(value_type = Option<Reference>, inline)]
    pub reference: Option<String>,
}

/// Answer of `POST /refund-credits`.
#[derive(Debug, Serialize, ToSchema)]
pub struct RefundResponse {
    /// The user.
    pub user_id: String,
    /// Ku coins returned.
    pub credits_refunded: i64,
    /// The balance right after the refund.
    pub new_balance: i64,
    /// The reservation's app.
    pub app_name: String,
    /// The reservation's key.
    pub project_code: String,
    /// `refunded` once nothing is left, `partially_refunded` before.
    pub reservation_status: String,
    /// Ku coins given back by every refund of the reservation so far.
    pub refunded_total: i64,
    /// Ku coins of the reservation still held.
    pub remaining_reserved: i64,
    /// The refund's reference.
    pub reference: Option<String>,
    /// Why.
    pub reason: Option<String>,
    /// When the refund was made.
    pub timestamp: String,
}

/// Return a reservation's credits, all at once or in parts.
///
/// Without `amount` and `reference`, all that is left comes back, once;
/// asking again answers the first result (`Idempotent-Replayed: true`).
/// With `amount`, that many come back, once per `reference`; the refunds of
/// a reservation never sum past what it reserved (`400 invalid_request`
/// beyond). A settled reservation, or one past its refund window, is
/// `409 not_refundable`. Credits go back to the lots they came from; the
/// part whose lot has expired or been voided expires or is voided at once.
///
/// Header `Idempotency-Key` (1–255 visible ASCII characters) is the
/// refund's `reference` when the body has none.
#[utoipa::path(
    post, path = "/refund-credits", tag = "credits",
    request_body = RefundRequest,
    responses(
        (status = 200, description = "Refunded (or replayed)", body = Success<RefundResponse>),
        (status = 400, description = "`user_id_required` or `invalid_request`", body = ErrorBody),
        (status = 401, description = "`invalid_api_key`", body = ErrorBody),
        (status = 403, description = "`forbidden` or `app_mismatch`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`not_refundable`", body = ErrorBody),
    ),
    security(("api_key_header" = []), ("api_key_query" = []))
)]
#[tracing::instrument(skip_all, fields(user_id, project_code))]
async fn refund_credits(
    State(state): State<AppState>,
    correlation: RequestCorrelation,
    auth: Auth,
    key: IdempotencyKey,
    ApiJson(body): ApiJson<RefundRequest>,
) -> Result<Response, ApiError> {
    auth.require(Scope::Spend)?;
    let user = user_id(body.user_id.as_deref())?;
    let project_code = match body.project_code.as_deref() {
        Some(raw) => ProjectCode::parse(raw)?,
        None => return Err(ApiError::InvalidRequest("project_code: is required".into())),
    };
    let app_name = match (body.app_name.as_deref(), auth.bound_app()) {
        (None, None) => None,
        (raw, _) => Some(acting_app(&auth, "app_name", raw)?),
    };
    let reason = Description::parse("reason", body.reason.as_deref())?;
    let amount = match &body.amount {
        None | Some(serde_json::Value::Null) => None,
        Some(_) => Some(
            Credits::from_json(
                "amount",
                body.amount.as_ref(),
                state.settings.ledger.max_deduct_amount,
            )?
            .get(),
        ),
    };
    let reference = refund_reference(&key, body.reference.as_deref())?;
    if amount.is_some() && reference.is_none() {
        return Err(ApiError::InvalidRequest(
            "reference: is required with amount (or send an Idempotency-Key header), so that a retried partial refund refunds once".into(),
        ));
    }
    let span = tracing::Span::current();
    span.record("user_id", user.as_str());
    span.record("project_code", project_code.as_str());
    let request = ledger::Refund {
        user_id: user,
        project_code,
        app_name,
        reason,
        amount,
        reference,
        acted_by: Some(auth.0.label()),
    };
    let mut client = state.pool.get().await?;
    let outcome = ledger::refund(&mut client, &request, correlation.as_deref()).await?;
    if !outcome.replayed {
        state.jobs_committed();
    }
    let r = &outcome.value;
    let body = RefundResponse {
        user_id: r.user_id.clone(),
        credits_refunded: r.credits_refunded,
        new_balance: r.new_balance,
        app_name: r.app_name.clone(),
        project_code: r.project_code.clone(),
        reservation_status: r.reservation_status.as_str().to_owned(),
        refunded_total: r.refunded_total,
        remaining_reserved: r.remaining_reserved,
        reference: r.reference.clone(),
        reason: r.reason.clone(),
        timestamp: rfc3339_millis(r.timestamp),
    };
    Ok(with_replay_header(StatusCode::OK, outcome.replayed, body))
}

/// A refund's or settlement's own reference: the body's, else the
/// `Idempotency-Key` header's. References starting `event:` belong to
/// ImageGene's events and are refused.
pub fn refund_reference(
    key: &IdempotencyKey,
    body: Option<&str>,
) -> Result<Option<String>, ApiError> {
    let reference = key.or_body("reference", body, |k| {
        Reference::parse("reference", Some(k)).is_ok()
    })?;
    let Some(reference) = reference else {
        return Ok(None);
    };
    let reference = Reference::parse("reference", Some(&reference))?;
    if reference.starts_with(ledger::EVENT_REFERENCE_PREFIX) {
        return Err(ApiError::InvalidRequest(format!(
            "reference: must not start with {:?} (the references of generation events)",
            ledger::EVENT_REFERENCE_PREFIX
        )));
    }
    Ok(Some(reference))
}

/// Body of `POST /add-credits`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct AddCreditsRequest {
    // The user (the account is created if new).
    #[schema(value_type = UserId, inline)]
    pub user_id: Option<String>,
    // Whole Ku coins, 1 to `MAX_DEDUCT_AMOUNT`.
    #[schema(value_type = Credits)]
    pub amount: Option<serde_json::Value>,
    // Why, for people (at most 500 characters).
    #[schema(value_type = GrantReason, inline)]
    pub reason: Option<String>,
    // Idempotency reference, e.g. the payment id (1–128 characters).
    #[schema(value_type = Reference, inline)]
    pub reference: Option<String>,
    /// The app granting (defaults to the key's app, else `penora`).
    #[schema(value_type = Option<AppName>, inline)]
    pub app_name: Option<String>,
    /// `paid` (the default) or `promotional`.
    #[schema(value_type = Option<ledger::LotCategory>)]
    pub category: Option<String>,
    /// 0–100, lower spent first (default 10 for promotional, 50 for paid).
    #[schema(value_type = Option<i32>, minimum = 0, maximum = 100)]
    pub priority: Option<serde_json::Value>,
    /// When the credits expire (RFC 3339, in the future); never when absent.
    #[schema(value_type = Option<String>, example = "2025-09-27T06:00:00Z")]
    pub expires_at: Option<String>,
}

/// Answer of `POST /add-credits`.
#[derive(Debug, Serialize, ToSchema)]
pub struct AddCreditsResponse {
    /// The user.
    pub user_id: String,
    /// Ku coins granted.
    pub credits_added: i64,
    /// The balance right after the grant.
    pub new_balance: i64,
    /// The idempotency reference.
    pub reference: String,
    /// When the grant was made.
    pub timestamp: String,
    /// The lot the grant made.
    pub lot_id: i64,
    /// `paid` or `promotional`.
    pub category: ledger::LotCategory,
    /// Lower is spent first.
    pub priority: i32,
    /// When the lot expires (`null`: never).
    pub expires_at: Option<String>,
}

/// Grant credits (a purchase, a signup bonus); idempotent by
/// `(user_id, reference)`.
///
/// Header `Idempotency-Key` (1–255 visible ASCII characters) is the
/// `reference` when the body has none; a body `reference` that differs from
/// it is `400 invalid_request`.
#[utoipa::path(
    post, path = "/add-credits", tag = "credits",
    request_body = AddCreditsRequest,
    responses(
        (status = 200, description = "Granted (or replayed)", body = Success<AddCreditsResponse>),
        (status = 400, description = "`user_id_required` or `invalid_request`", body = ErrorBody),
        (status = 401, description = "`invalid_api_key`", body = ErrorBody),
        (status = 403, description = "`forbidden` or `app_mismatch`", body = ErrorBody),
        (status = 409, description = "`idempotency_conflict`", body = ErrorBody),
    ),
    security(("api_key_header" = []), ("api_key_query" = []))
)]
#[tracing::instrument(skip_all, fields(user_id))]
async fn add_credits(
    State(state): State<AppState>,
    correlation: RequestCorrelation,
    auth: Auth,
    key: IdempotencyKey,
    ApiJson(body): ApiJson<AddCreditsRequest>,
) -> Result<Response, ApiError> {
    auth.require(Scope::Admin)?;
    let user = user_id(body.user_id.as_deref())?;
    let amount = Credits::from_json(
        "amount",
        body.amount.as_ref(),
        state.settings.ledger.max_deduct_amount,
    )?;
    let app_name = match (body.app_name.as_deref(), auth.bound_app()) {
        (None, None) => AppName::penora(),
        (raw, _) => acting_app(&auth, "app_name", raw)?,
    };
    let reason = GrantReason::parse("reason", body.reason.as_deref())?;
    let reference = key.or_body("reference", body.reference.as_deref(), |k| {
        Reference::parse("reference", Some(k)).is_ok()
    })?;
    let reference = Reference::parse("reference", reference.as_deref())?;
    ledger::grant_rules::reserved_reference(&reference)?;
    let terms = LotTerms::parse(
        body.category.as_deref(),
        body.priority.as_ref(),
        body.expires_at.as_deref(),
        time::OffsetDateTime::now_utc(),
    )?;
    tracing::Span::current().record("user_id", user.as_str());
    let grant = ledger::Grant {
        user_id: user,
        amount,
        app_name,
        reason,
        reference,
        category: terms.category,
        priority: terms.priority,
        expires_at: terms.expires_at,
        acted_by: Some(auth.0.label()),
    };
    let mut client = state.pool.get().await?;
    let outcome = ledger::grant(&mut client, &grant, correlation.as_deref()).await?;
    if !outcome.replayed {
        state.jobs_committed();
    }
    let r = &outcome.value;
    let body = AddCreditsResponse {
        user_id: r.user_id.clone(),
        credits_added: r.credits_added,
        new_balance: r.new_balance,
        reference: r.reference.clone(),
        timestamp: rfc3339_millis(r.timestamp),
        lot_id: r.lot_id,
        category: r.category,
        priority: r.priority,
        expires_at: r.expires_at.map(rfc3339_millis),
    };
    Ok(with_replay_header(StatusCode::OK, outcome.replayed, body))
}

/// Parses an RFC 3339 instant for `field`, to the millisecond (what the
/// service shows).
pub fn instant(field: &'static str, raw: &str) -> Result<time::OffsetDateTime, ApiError> {
    Ok(penora_domain::timefmt::parse_field(field, raw)?)
}

/// Query of `GET /transactions`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TransactionsQuery {
    /// The user.
    #[param(value_type = UserId, inline)]
    pub user_id: Option<String>,
    /// Rows per page, 1–200 (default 50).
    #[param(value_type = Option<i64>)]
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// One ledger entry.
#[derive(Debug, Serialize, ToSchema)]
pub struct TransactionItem {
    /// The entry's id.
    pub id: i64,
    /// `grant`, `deduct`, `refund`, `settle`, `expire` or `void`.
    pub kind: String,
    /// Signed amount (negative for deducts).
    pub amount: i64,
    /// Balance right after.
    pub balance_after: i64,
    /// The app.
    pub app_name: String,
    /// What for.
    pub description: Option<String>,
    /// The reservation's key (deduct, refund, settle).
    pub project_code: Option<String>,
    /// When.
    pub created_at: String,
}

/// Answer of `GET /transactions`.
#[derive(Debug, Serialize, ToSchema)]
pub struct TransactionsResponse {
    /// The user.
    pub user_id: String,
    /// Newest first.
    pub transactions: Vec<TransactionItem>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// The user's ledger, newest first.
#[utoipa::path(
    get, path = "/transactions", tag = "credits",
    params(TransactionsQuery),
    responses(
        (status = 200, description = "A page of the ledger", body = Success<TransactionsResponse>),
        (status = 400, description = "`user_id_required` or `invalid_request`", body = ErrorBody),
        (status = 404, description = "`user_not_found`", body = ErrorBody),
    ),
    security(("api_key_header" = []), ("api_key_query" = []))
)]
async fn transactions(
    State(state): State<AppState>,
    auth: Auth,
    ApiQuery(q): ApiQuery<TransactionsQuery>,
) -> Result<Response, ApiError> {
    auth.require(Scope::Read)?;
    let user = user_id(q.user_id.as_deref())?;
    let limit = int_param("limit", q.limit.as_deref(), 1, 200)?.unwrap_or(50);
    let before = int_param("cursor", q.cursor.as_deref(), 1, i64::MAX)?;
    let client = state.pool.get().await?;
    if ledger::account_summary(&client, &user).await?.is_none() {
        return Err(ApiError::UserNotFound);
    }
    let rows = ledger::transactions(&client, &user, limit, before).await?;
    let next_cursor = next_cursor(&rows, limit, |r| r.id.to_string());
    let body = TransactionsResponse {
        user_id: user.to_string(),
        transactions: rows
            .into_iter()
            .map(|r| TransactionItem {
                id: r.id,
                kind: r.kind,
                amount: r.amount,
                balance_after: r.balance_after,
                app_name: r.app_name,
                description: r.description,
                project_code: r.project_code,
                created_at: rfc3339_millis(r.created_at),
            })
            .collect(),
        next_cursor,
    };
    Ok(json_ok(body).into_response())
}
