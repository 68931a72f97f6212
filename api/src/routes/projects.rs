//! The shared workspace: save a project, list projects, fetch content.

use std::collections::BTreeMap;

use axum::{
    extract::{Path, State},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use base64::Engine;
use penora_common::{
    domain::{self, AppName, ProjectCode},
    keys::Scope,
    projects::{self, Content, NewProject, StoredContent},
    timefmt::rfc3339_millis,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::{
    auth::Auth,
    error::{ApiError, ErrorBody},
    extract::{ApiJson, ApiQuery, int_param, user_id},
    routes::{RequestCorrelation, Success, credits::with_replay_header, json_ok},
    state::AppState,
};

/// The routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(save_project))
        .routes(routes!(list_projects))
        .routes(routes!(project_content))
}

/// Body of `POST /save-project`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct SaveProjectRequest {
    /// The user.
    #[schema(example = "101902121794505144784")]
    pub user_id: Option<String>,
    /// The app saving the project (defaults to the key's app).
    #[schema(example = "imagegene")]
    pub app_source: Option<String>,
    /// e.g. `ai_artwork` (at most 64 characters).
    #[schema(example = "ai_artwork")]
    pub project_type: Option<String>,
    /// At most 200 characters.
    #[schema(example = "Sunset Landscape AI Art")]
    pub title: Option<String>,
    /// Base64 image data, a `data:` URL, or an `http(s)` URL.
    pub content: Option<String>,
    /// Free-form JSON object.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
    /// The reservation this image was paid with; the save settles it and is
    /// idempotent by it.
    pub project_code: Option<String>,
}

/// Answer of `POST /save-project` (202: the worker finishes the save).
#[derive(Debug, Serialize, ToSchema)]
pub struct SaveProjectResponse {
    /// The project's id.
    pub project_id: Uuid,
    /// `queued` until the worker has checked and stored the content.
    #[schema(example = "queued")]
    pub status: String,
    /// Bytes counted against the quota.
    pub size_bytes: i64,
    /// Bytes left in the user's quota.
    pub storage_remaining_bytes: i64,
    /// Where the content will be served.
    pub content_url: String,
    /// When the project was recorded.
    pub created_at: String,
}

fn content_url(user_id: &str, project_id: Uuid) -> String {
    format!("/api/unified/projects/{project_id}/content?user_id={user_id}")
}

fn required_text(field: &'static str, raw: Option<String>, max: usize) -> Result<String, ApiError> {
    match raw {
        Some(t) if !t.trim().is_empty() => Ok(domain::bounded_text(field, &t, max)?),
        _ => Err(ApiError::InvalidRequest(format!("{field}: is required"))),
    }
}

/// Save a project into the user's shared workspace.
///
/// Checks and reserves its storage synchronously and answers `202` with
/// `status: "queued"`; the worker checks the content and marks it `saved` or
/// `failed`.
#[utoipa::path(
    post, path = "/save-project", tag = "projects",
    request_body = SaveProjectRequest,
    responses(
        (status = 202, description = "Recorded and queued", body = Success<SaveProjectResponse>),
        (status = 400, description = "`user_id_required` or `invalid_request`", body = ErrorBody),
        (status = 403, description = "`forbidden` or `app_mismatch`", body = ErrorBody),
        (status = 404, description = "`user_not_found`", body = ErrorBody),
        (status = 409, description = "`idempotency_conflict`", body = ErrorBody),
        (status = 413, description = "`storage_limit_exceeded` or `payload_too_large`", body = ErrorBody),
    ),
    security(("api_key_header" = []), ("api_key_query" = []))
)]
#[tracing::instrument(skip_all, fields(user_id, project_code))]
async fn save_project(
    State(state): State<AppState>,
    correlation: RequestCorrelation,
    auth: Auth,
    ApiJson(body): ApiJson<SaveProjectRequest>,
) -> Result<Response, ApiError> {
    auth.require(Scope::Write)?;
    let user = user_id(body.user_id.as_deref())?;
    let app_source = match (body.app_source.as_deref(), auth.bound_app()) {
        (Some(raw), _) => AppName::parse("app_source", raw)?,
        (None, Some(own)) => AppName::parse("app_source", own)?,
        (None, None) => return Err(ApiError::InvalidRequest("app_source: is required".into())),
    };
    auth.require_app("app_source", app_source.as_str())?;
    let project_type = required_text(
        "project_type",
        body.project_type,
        domain::PROJECT_TYPE_MAX_LEN,
    )?;
    let title = required_text("title", body.title, domain::TITLE_MAX_LEN)?;
    let content = Content::decode(body.content.as_deref().unwrap_or_default())?;
    let metadata = match body.metadata {
        None | Some(serde_json::Value::Null) => serde_json::json!({}),
        Some(m) => {
            projects::check_metadata(&m)?;
            m
        }
    };
    let project_code = body
        .project_code
        .as_deref()
        .map(ProjectCode::parse)
        .transpose()?;
    let span = tracing::Span::current();
    span.record("user_id", user.as_str());
    if let Some(code) = &project_code {
        span.record("project_code", code.as_str());
    }
    let project = NewProject {
        user_id: user,
        app_source,
        project_type,
        title,
        content,
        metadata,
        project_code,
    };
    let mut client = state.pool.get().await?;
    let outcome = projects::save(
        &mut client,
        &project,
        state.settings.storage_quota_bytes,
        correlation.as_deref(),
    )
    .await?;
    if !outcome.replayed {
        state.jobs_committed();
    }
    let r = &outcome.value;
    let body = SaveProjectResponse {
        project_id: r.project_id,
        status: r.status.clone(),
        size_bytes: r.size_bytes,
        storage_remaining_bytes: r.storage_remaining_bytes,
        content_url: content_url(project.user_id.as_str(), r.project_id),
        created_at: rfc3339_millis(r.created_at),
    };
    Ok(with_replay_header(StatusCode::ACCEPTED, outcome, body))
}

/// Query of `GET /projects`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ProjectsQuery {
    /// The user.
    pub user_id: Option<String>,
    /// The calling app. Projects of every app are listed (the workspace is
    /// shared); a key bound to an app must name its own.
    pub app: Option<String>,
    /// Projects per page, 1–200 (default 50).
    #[param(value_type = Option<i64>)]
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A project as listed.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProjectItem {
    /// Its id.
    pub id: Uuid,
    /// The app that saved it.
    pub app_source: String,
    /// e.g. `ai_artwork`.
    pub project_type: String,
    /// Its title.
    pub title: String,
    /// `queued`, `saved` or `failed`.
    pub status: String,
    /// Bytes it counts against the quota.
    pub size_bytes: i64,
    /// Its metadata, as stored.
    #[schema(value_type = Object)]
    pub metadata: Box<serde_json::value::RawValue>,
    /// The reservation it names, if any.
    pub project_code: Option<String>,
    /// Why it failed, if it did.
    pub failure_reason: Option<String>,
    /// Where to fetch its content.
    pub content_url: String,
    /// When it was saved.
    pub created_at: String,
}

/// Answer of `GET /projects`: every app's projects, and per-app lists and
/// counts (`<app>_projects`, `<app>_count`) for `penora`, `imagegene` and any
/// other app seen.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProjectsResponse {
    /// The user.
    pub user_id: String,
    /// This page of projects, newest first.
    pub all_projects: Vec<ProjectItem>,
    /// Penora's projects on this page.
    pub penora_projects: Vec<ProjectItem>,
    /// ImageGene's projects on this page.
    pub imagegene_projects: Vec<ProjectItem>,
    /// All the user's projects (every page).
    pub total_count: i64,
    /// All the user's Penora projects.
    pub penora_count: i64,
    /// All the user's ImageGene projects.
    pub imagegene_count: i64,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
    /// `<app>_projects` and `<app>_count` of other apps.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub other_apps: BTreeMap<String, serde_json::Value>,
}

fn encode_cursor(at: OffsetDateTime, id: Uuid) -> String {
    let raw = format!("{}:{}", at.unix_timestamp_nanos(), id.simple());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

fn decode_cursor(raw: &str) -> Result<(OffsetDateTime, Uuid), ApiError> {
    let bad = || ApiError::InvalidRequest("cursor: not a cursor given by this API".into());
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(raw)
        .map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (nanos, id) = text.split_once(':').ok_or_else(bad)?;
    let at = nanos
        .parse::<i128>()
        .ok()
        .and_then(|n| OffsetDateTime::from_unix_timestamp_nanos(n).ok())
        .ok_or_else(bad)?;
    Ok((at, Uuid::parse_str(id).map_err(|_| bad())?))
}

/// The user's projects from every app.
#[utoipa::path(
    get, path = "/projects", tag = "projects",
    params(ProjectsQuery),
    responses(
        (status = 200, description = "A page of projects", body = Success<ProjectsResponse>),
        (status = 400, description = "`user_id_required` or `invalid_request`", body = ErrorBody),
        (status = 403, description = "`app_mismatch`", body = ErrorBody),
        (status = 404, description = "`user_not_found`", body = ErrorBody),
    ),
    security(("api_key_header" = []), ("api_key_query" = []))
)]
async fn list_projects(
    State(state): State<AppState>,
    auth: Auth,
    ApiQuery(q): ApiQuery<ProjectsQuery>,
) -> Result<Response, ApiError> {
    auth.require(Scope::Read)?;
    let user = user_id(q.user_id.as_deref())?;
    if let Some(app) = q.app.as_deref().filter(|a| !a.is_empty()) {
        let app = AppName::parse("app", app)?;
        auth.require_app("app", app.as_str())?;
    }
    let limit = int_param("limit", q.limit.as_deref(), 1, 200)?.unwrap_or(50);
    let after = q
        .cursor
        .as_deref()
        .filter(|c| !c.is_empty())
        .map(decode_cursor)
        .transpose()?;
    let client = state.pool.get().await?;
    if penora_common::ledger::account_summary(&client, &user)
        .await?
        .is_none()
    {
        return Err(ApiError::UserNotFound);
    }
    let rows = projects::list(&client, &user, limit, after).await?;
    let counts = projects::counts(&client, &user).await?;
    let next_cursor = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| encode_cursor(r.created_at, r.id)))
        .flatten();
    let items: Vec<ProjectItem> = rows
        .into_iter()
        .map(|r| ProjectItem {
            content_url: content_url(user.as_str(), r.id),
            id: r.id,
            app_source: r.app_source,
            project_type: r.project_type,
            title: r.title,
            status: r.status,
            size_bytes: r.size_bytes,
            metadata: r.metadata,
            project_code: r.project_code,
            failure_reason: r.failure_reason,
            created_at: rfc3339_millis(r.created_at),
        })
        .collect();
    let of_app = |app: &str| -> Vec<ProjectItem> {
        items
            .iter()
            .filter(|p| p.app_source == app)
            .cloned()
            .collect()
    };
    let count_of = |app: &str| counts.iter().find(|(a, _)| a == app).map_or(0, |(_, n)| *n);
    let mut other_apps = BTreeMap::new();
    for (app, n) in counts
        .iter()
        .filter(|(a, _)| a != "penora" && a != "imagegene")
    {
        other_apps.insert(
            format!("{app}_projects"),
            serde_json::to_value(of_app(app)).unwrap_or_default(),
        );
        other_apps.insert(format!("{app}_count"), serde_json::Value::from(*n));
    }
    let body = ProjectsResponse {
        user_id: user.to_string(),
        penora_projects: of_app("penora"),
        imagegene_projects: of_app("imagegene"),
        all_projects: items,
        total_count: counts.iter().map(|(_, n)| n).sum(),
        penora_count: count_of("penora"),
        imagegene_count: count_of("imagegene"),
        next_cursor,
        other_apps,
    };
    Ok(json_ok(body).into_response())
}

/// Query of `GET /projects/{project_id}/content`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ContentQuery {
    /// The project's owner.
    pub user_id: Option<String>,
}

/// The stored content of a project: the image bytes with their media type, or
/// a redirect to the stored URL.
#[utoipa::path(
    get, path = "/projects/{project_id}/content", tag = "projects",
    params(("project_id" = Uuid, Path, description = "The project's id"), ContentQuery),
    responses(
        (status = 200, description = "The image", content_type = "image/*"),
        (status = 303, description = "Redirect to the stored URL"),
        (status = 400, description = "`user_id_required` or `invalid_request`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`content_not_available`: queued or failed", body = ErrorBody),
    ),
    security(("api_key_header" = []), ("api_key_query" = []))
)]
async fn project_content(
    State(state): State<AppState>,
    auth: Auth,
    Path(project_id): Path<String>,
    ApiQuery(q): ApiQuery<ContentQuery>,
) -> Result<Response, ApiError> {
    auth.require(Scope::Read)?;
    let user = user_id(q.user_id.as_deref())?;
    let project_id = Uuid::parse_str(&project_id)
        .map_err(|_| ApiError::InvalidRequest("project_id: must be a UUID".into()))?;
    let client = state.pool.get().await?;
    let content = projects::content(&client, &user, project_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no project {project_id} for this user")))?;
    Ok(match content {
        StoredContent::Image { media_type, data } => {
            let mut response = data.into_response();
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_str(&media_type)
                    .unwrap_or(HeaderValue::from_static("application/octet-stream")),
            );
            headers.insert(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            );
            headers.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("private, max-age=3600"),
            );
            response
        }
        // `Redirect::to` answers a bad location with a plain-text 500; a URL
        // saved before URLs were limited to visible ASCII gets a JSON 409.
        StoredContent::Url(url) => match HeaderValue::from_str(&url) {
            Ok(location) => (StatusCode::SEE_OTHER, [(header::LOCATION, location)]).into_response(),
            Err(_) => {
                return Err(ApiError::ContentNotAvailable(format!(
                    "project {project_id} refers to a URL that cannot be sent as a redirect"
                )));
            }
        },
        StoredContent::NotAvailable { status, reason } => {
            return Err(ApiError::ContentNotAvailable(match reason {
                Some(reason) => format!("project {project_id} is {status}: {reason}"),
                None => {
                    format!("project {project_id} is {status}; its content is not available yet")
                }
            }));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let at =
            OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_000).expect("valid");
        let id = Uuid::now_v7();
        assert_eq!(decode_cursor(&encode_cursor(at, id)).ok(), Some((at, id)));
        assert!(decode_cursor("garbage!").is_err());
        assert!(decode_cursor("Zm9v").is_err());
    }
}
