//! `GET /quote`: what an image costs, by the configured price table.

use axum::{
    extract::State,
    response::{IntoResponse, Response},
};
use penora_domain::pricing::Quality;
use penora_platform::keys::Scope;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    auth::Auth,
    error::{ApiError, ErrorBody},
    extract::{ApiQuery, int_param},
    routes::{Success, json_ok},
    state::AppState,
};

/// The routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(quote))
}

/// Query of `GET /quote`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct QuoteQuery {
    /// Image width in pixels, 1–8192.
    #[param(value_type = i64, example = 1024)]
    pub width: Option<String>,
    /// Image height in pixels, 1–8192.
    #[param(value_type = i64, example = 1024)]
    pub height: Option<String>,
    /// `standard` (default) or `high` (high quality or upscaled).
    pub quality: Option<String>,
    /// Number of images, 1–10 (default 1).
    #[param(value_type = Option<i64>)]
    pub variations: Option<String>,
}

/// How a quote was made up.
#[derive(Debug, Serialize, ToSchema)]
pub struct QuoteBreakdown {
    /// Price of the first image.
    pub base: i64,
    /// Price of the extra variations.
    pub extra_variations: i64,
}

/// Answer of `GET /quote`.
#[derive(Debug, Serialize, ToSchema)]
pub struct QuoteResponse {
    /// What the request costs, in Ku coins.
    #[schema(example = 5)]
    pub credits: i64,
    /// Width asked for.
    pub width: i64,
    /// Height asked for.
    pub height: i64,
    /// Quality asked for.
    pub quality: String,
    /// Images asked for.
    pub variations: i64,
    /// How the price was made up.
    pub breakdown: QuoteBreakdown,
}

/// The credit cost of an image generation (512²: 2, 1024²: 5, high
/// quality/upscaled: 8, +2 per extra variation; configurable).
#[utoipa::path(
    get, path = "/quote", tag = "pricing",
    params(QuoteQuery),
    responses(
        (status = 200, description = "The price", body = Success<QuoteResponse>),
        (status = 400, description = "`invalid_request`", body = ErrorBody),
    ),
    security(("api_key_header" = []), ("api_key_query" = []))
)]
async fn quote(
    State(state): State<AppState>,
    auth: Auth,
    ApiQuery(q): ApiQuery<QuoteQuery>,
) -> Result<Response, ApiError> {
    auth.require(Scope::Read)?;
    let required = |field: &'static str, raw: Option<&str>| -> Result<i64, ApiError> {
        int_param(field, raw, 1, 8192)?
            .ok_or_else(|| ApiError::InvalidRequest(format!("{field}: is required (1 to 8192)")))
    };
    let width = required("width", q.width.as_deref())?;
    let height = required("height", q.height.as_deref())?;
    let variations = int_param("variations", q.variations.as_deref(), 1, 10)?.unwrap_or(1);
    let quality = match q.quality.as_deref() {
        None | Some("standard") => Quality::Standard,
        Some("high") => Quality::High,
        Some(_) => {
            return Err(ApiError::InvalidRequest(
                "quality: must be `standard` or `high`".into(),
            ));
        }
    };
    // The ranges above make these conversions lossless.
    let price = state.settings.ledger.price_table.quote(
        width as u32,
        height as u32,
        quality,
        variations as u32,
    );
    let body = QuoteResponse {
        credits: price.total,
        width,
        height,
        quality: if quality == Quality::High {
            "high"
        } else {
            "standard"
        }
        .into(),
        variations,
        breakdown: QuoteBreakdown {
            base: price.base,
            extra_variations: price.extra,
        },
    };
    Ok(json_ok(body).into_response())
}
