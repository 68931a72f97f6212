//! The shared workspace: save a project, list projects, fetch content.

use std::collections::BTreeMap;

use std::{borrow::Cow, time::Instant};

use axum::{
    body::{Body, Bytes},
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use base64::Engine;
use futures_util::StreamExt;
use penora_domain as domain;
use penora_domain::timefmt::rfc3339_millis;
use penora_domain::{AppName, ProjectCode, ProjectType, Title, UserId};
use penora_platform::keys::Scope;
use penora_workspace::imaging::{self, PrepareError, StoragePolicy};
use penora_workspace::projects::{
    self, Cause, Content, NewProject, OnFull, Rendition, StoredContent,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::{
    auth::Auth,
    error::{ApiError, ErrorBody},
    extract::{
        ApiQuery, BodyDeadline, IdempotencyKey, int_param, parse_json, require_json, user_id,
    },
    routes::{
        RequestCorrelation, Success,
        credits::{Storage, with_replay_header},
        json_ok, next_cursor,
    },
    state::AppState,
};

/// The routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(save_project))
        .routes(routes!(list_projects))
        .routes(routes!(delete_project))
        .routes(routes!(project_content))
        .routes(routes!(project_thumbnail))
}

/// Body of `POST /save-project`. `content` borrows from the request body:
/// base64 has nothing to unescape, so a 12 MiB body is not copied again.
#[derive(Debug, Deserialize, ToSchema)]
pub struct SaveProjectRequest<'a> {
    // The user.
    #[schema(value_type = UserId, inline)]
    pub user_id: Option<String>,
    /// The app saving the project (defaults to the key's app).
    #[schema(value_type = Option<AppName>, inline, example = "imagegene")]
    pub app_source: Option<String>,
    // e.g. `ai_artwork` (at most 64 characters).
    #[schema(value_type = ProjectType, inline)]
    pub project_type: Option<String>,
    // At most 200 characters.
    #[schema(value_type = Title, inline)]
    pub title: Option<String>,
    /// Base64 image data, a `data:` URL, or an `http(s)` URL.
    #[serde(borrow)]
    #[schema(value_type = Option<String>)]
    pub content: Option<Cow<'a, str>>,
    /// Free-form JSON object, at most 16 KiB as compact JSON (and 64 KiB as
    /// sent); its bytes and the title's count in the storage quota. Kept raw
    /// here: measured before it is parsed.
    #[serde(borrow)]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<&'a serde_json::value::RawValue>,
    /// The reservation this image was paid with; the save settles it and is
    /// idempotent by it.
    #[schema(value_type = Option<ProjectCode>, inline)]
    pub project_code: Option<String>,
    /// `true` keeps the image exactly as sent (no WebP re-encoding, metadata
    /// kept).
    pub store_original: Option<bool>,
    /// `evict_oldest`: when the save does not fit, delete the user's oldest
    /// saved projects of the same app, just enough, in the same transaction.
    /// Absent or `refuse`: answer `413`.
    #[schema(example = "evict_oldest")]
    pub on_full: Option<String>,
}

/// Answer of `POST /save-project` (202: the worker finishes the save).
#[derive(Debug, Serialize, ToSchema)]
pub struct SaveProjectResponse {
    /// The project's id.
    pub project_id: Uuid,
    /// `queued` until the worker has checked and stored the content.
    #[schema(example = "queued")]
    pub status: String,
    /// Bytes counted against the quota: the stored form (WebP when
    /// re-encoded).
    pub size_bytes: i64,
    /// Bytes sent.
    pub original_size_bytes: i64,
    /// The stored media type (`null` for a URL or content that is not an
    /// image).
    #[schema(example = "image/webp")]
    pub content_type: Option<String>,
    /// Width of the stored image.
    pub width: Option<i32>,
    /// Height of the stored image.
    pub height: Option<i32>,
    /// Bytes left in the user's quota.
    pub storage_remaining_bytes: i64,
    /// Projects deleted to make room (`on_full: evict_oldest`), oldest first.
    pub evicted_project_ids: Vec<Uuid>,
    /// Where the content will be served.
    pub content_url: String,
    /// Where the thumbnail will be served once the worker has made it
    /// (`null` for a URL).
    pub thumbnail_url: Option<String>,
    /// When the project was recorded.
    pub created_at: String,
}

fn content_url(user_id: &str, project_id: Uuid) -> String {
    format!("/api/unified/projects/{project_id}/content?user_id={user_id}")
}

fn thumbnail_url(user_id: &str, project_id: Uuid) -> String {
    format!("/api/unified/projects/{project_id}/thumbnail?user_id={user_id}")
}

/// Save a project into the user's shared workspace.
///
/// The image is stored optimised (a still PNG, JPEG or WebP as WebP at
/// `IMAGE_QUALITY` when smaller, metadata dropped) unless `store_original`;
/// the quota counts the stored bytes, decided before answering: `202` with
/// `status: "queued"` when it fits (the worker then checks the content and
/// makes its thumbnail), `413 storage_limit_exceeded` when it cannot. With
/// `on_full: "evict_oldest"` the oldest saved projects of the same app make
/// room. The quota counts the title's and metadata's bytes besides the
/// content's (`size_bytes` is the content's alone). A user has at most
/// `MAX_PROJECTS_PER_USER` projects that are not deleted (queued, saved or
/// failed): one more is `403 project_limit_reached`, decided in the save's
/// transaction. At most `MAX_CONCURRENT_SAVES` saves are processed at once,
/// each from its body's first byte (a client that sends nothing holds no
/// slot); others wait up to `SAVE_QUEUE_WAIT_MS`, then get `503 busy` with
/// `Retry-After`. The body must arrive in full within
/// `HTTP_BODY_TIMEOUT_SECS` of the headers, else `408 request_timeout`.
///
/// Header `Idempotency-Key` (1–255 visible ASCII characters) is the
/// `project_code` when the body has none; a body `project_code` that differs
/// from it is `400 invalid_request`.
#[utoipa::path(
    post, path = "/save-project", tag = "projects",
    request_body = SaveProjectRequest,
    responses(
        (status = 202, description = "Recorded and queued", body = Success<SaveProjectResponse>),
        (status = 400, description = "`user_id_required` or `invalid_request` (including an image over `MAX_IMAGE_PIXELS`)", body = ErrorBody),
        (status = 403, description = "`forbidden`, `app_mismatch`, or `project_limit_reached` (the user has `MAX_PROJECTS_PER_USER` projects that are not deleted; delete some: a retry alone will not pass)", body = ErrorBody),
        (status = 404, description = "`user_not_found`", body = ErrorBody),
        (status = 408, description = "`request_timeout`: the body did not arrive in full within `HTTP_BODY_TIMEOUT_SECS`; the connection is closed", body = ErrorBody),
        (status = 409, description = "`idempotency_conflict`", body = ErrorBody),
        (status = 413, description = "`storage_limit_exceeded` (content, title and metadata count) or `payload_too_large`", body = ErrorBody),
        (status = 503, description = "`busy` (every save slot taken; see `Retry-After`), `unavailable`, or `timeout` (not finished within `HTTP_REQUEST_TIMEOUT_SECS`; retry with the same `project_code`)", body = ErrorBody),
    ),
    security(("api_key_header" = []), ("api_key_query" = []))
)]
#[tracing::instrument(skip_all, fields(user_id, project_code))]
async fn save_project(
    State(state): State<AppState>,
    correlation: RequestCorrelation,
    auth: Auth,
    deadline: BodyDeadline,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    auth.require(Scope::Write)?;
    require_json(&headers)?;
    let key = IdempotencyKey::from_headers(&headers)?;
    let max_body = state.settings.http.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > max_body) {
        return Err(too_large());
    }
    // The body's first bytes before a save slot: a client that sends nothing
    // never holds one. All of it must arrive by the deadline, or the slot
    // goes back with a `408`.
    let mut body = body.into_data_stream();
    let first = tokio::time::timeout_at(deadline.at, first_bytes(&mut body))
        .await
        .map_err(|_| deadline.passed())??;
    // A slot before more than the first bytes are held: memory stays bounded
    // whatever clients send at once.
    let wait = state.settings.images.save_queue_wait;
    let Ok(Ok(slot)) = tokio::time::timeout(wait, state.save_slots.clone().acquire_owned()).await
    else {
        metrics::counter!("penora_saves_busy_total").increment(1);
        // Read the body to its end (keeping none of it) so the client is
        // reading when the answer comes, instead of having its upload reset;
        // no longer than its deadline.
        let _ = tokio::time::timeout_at(deadline.at, drain(body, max_body)).await;
        return Err(ApiError::Busy {
            what: "saves in progress",
            retry_after_secs: wait.as_secs().max(1),
        });
    };
    // The slot is held by the work, not only by this handler: a request cut
    // off at its deadline leaves the CPU jobs it queued holding it until
    // they end, so MAX_CONCURRENT_SAVES bounds the bodies in memory however
    // requests end.
    let slot = std::sync::Arc::new(SaveSlot::taken(slot));
    let started = Instant::now();
    let raw = tokio::time::timeout_at(deadline.at, read_body(first, body, max_body, declared))
        .await
        .map_err(|_| deadline.passed())??;
    // Everything CPU-bound (JSON, base64, the image) runs off the runtime's
    // threads: a small save (a few milliseconds of work) on the blocking
    // pool, a big one on the image threads at the lowest priority.
    let cpu = Cpu {
        images: state.images.clone(),
        small: raw.len() <= SMALL_SAVE_BYTES,
    };
    let policy_of = {
        let settings = state.settings.clone();
        move |store_original| StoragePolicy::from_settings(&settings.images, store_original)
    };
    let caller = Auth(auth.0.clone());
    let held = slot.clone();
    let (mut project, policy) = cpu
        .run(move || -> Result<_, ApiError> {
            let _held = held;
            let (project, store_original) = parse_save(&raw, &caller, &key)?;
            let policy = policy_of(store_original);
            // The container and the header alone say how much metadata the
            // image carries and how big it is: a decompression bomb (in its
            // pixels or in its metadata) is refused here, before it reaches
            // a decoder.
            if let Content::Bytes(sent) = &project.content {
                imaging::screen(sent, policy.max_pixels).map_err(refuse_image)?;
            }
            Ok((project, policy))
        })
        .await
        .map_err(|e| ApiError::Internal(format!("reading the save: {e}")))??;
    let span = tracing::Span::current();
    span.record("user_id", project.user_id.as_str());
    if let Some(code) = &project.project_code {
        span.record("project_code", code.as_str());
    }
    let quota = state.settings.workspace.storage_quota_bytes;
    // A retry of a save that was recorded answers at once, without the
    // image work.
    if project.project_code.is_some() {
        let client = state.pool.get().await?;
        if let Some(first) = projects::replay_of(&client, &project, quota).await? {
            return answer(first?, &project);
        }
    }
    if let Content::Bytes(sent) = &mut project.content {
        let sent = std::mem::take(sent);
        let held = slot.clone();
        let prepared = cpu
            .run(move || {
                let _held = held;
                imaging::prepare(sent, &policy)
            })
            .await
            .map_err(|e| ApiError::Internal(format!("preparing the image: {e}")))?
            .map_err(refuse_image)?;
        metrics::counter!("penora_images_prepared_total", "stored_as" => stored_as_label(prepared.stored_as))
            .increment(1);
        project.original_size = i64::try_from(prepared.original_size).unwrap_or(i64::MAX);
        project.image = prepared.info;
        project.content = Content::Bytes(prepared.data);
    }
    metrics::histogram!("penora_save_prepare_seconds").record(started.elapsed().as_secs_f64());
    let mut client = state.pool.get().await?;
    let saved = projects::save(
        &mut client,
        &project,
        quota,
        state.settings.workspace.max_projects_per_user,
        correlation.as_deref(),
    )
    .await?;
    if !saved.replayed {
        state.jobs_committed();
    }
    answer(saved, &project)
}

/// Bodies up to this size are prepared on the runtime's blocking pool at
/// normal priority (a 256 KiB image decodes and encodes in a few
/// milliseconds); bigger ones on the image threads.
const SMALL_SAVE_BYTES: usize = 256 * 1024;

/// Where a save's CPU work runs.
struct Cpu {
    images: penora_workspace::cpu_pool::CpuPool,
    small: bool,
}

impl Cpu {
    async fn run<T, F>(&self, f: F) -> Result<T, penora_workspace::cpu_pool::PoolError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        use penora_workspace::cpu_pool::PoolError;
        if self.small {
            tokio::task::spawn_blocking(f).await.map_err(|e| {
                if e.is_panic() {
                    metrics::counter!("penora_image_job_panics_total").increment(1);
                    PoolError::Panicked
                } else {
                    PoolError::Stopped
                }
            })
        } else {
            self.images.run(f).await
        }
    }
}

fn stored_as_label(how: imaging::StoredAs) -> &'static str {
    match how {
        imaging::StoredAs::Webp => "webp",
        imaging::StoredAs::Stripped => "as_sent_stripped",
        imaging::StoredAs::Original => "original",
        imaging::StoredAs::Unrecognised => "unrecognised",
    }
}

fn too_large() -> ApiError {
    ApiError::PayloadTooLarge("The request body is larger than the service accepts".into())
}

/// An image refused outright (too many pixels, too much metadata) is `400
/// invalid_request` naming `content`.
fn refuse_image(e: PrepareError) -> ApiError {
    ApiError::InvalidRequest(format!("content: {e}"))
}

/// A save body being read.
type BodyStream = axum::body::BodyDataStream;

/// Waits for the first bytes of a body (none when it is empty).
async fn first_bytes(body: &mut BodyStream) -> Result<Option<Bytes>, ApiError> {
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(unreadable)?;
        if !chunk.is_empty() {
            return Ok(Some(chunk));
        }
    }
    Ok(None)
}

fn unreadable(e: axum::Error) -> ApiError {
    ApiError::InvalidRequest(format!("Could not read the request body: {e}"))
}

/// A save slot held, counted in `penora_save_slots_in_use` until dropped.
struct SaveSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl SaveSlot {
    fn taken(permit: tokio::sync::OwnedSemaphorePermit) -> Self {
        metrics::gauge!("penora_save_slots_in_use").increment(1.0);
        Self { _permit: permit }
    }
}

impl Drop for SaveSlot {
    fn drop(&mut self) {
        metrics::gauge!("penora_save_slots_in_use").decrement(1.0);
    }
}

/// The least rate at which a save holding a slot must send its body (after
/// [`MIN_BODY_RATE_GRACE`]): 16 KiB a second, a 2.7 MB base64 artwork in
/// under three minutes, and eight slots held for a minute cost a client
/// 7.5 MB sent.
const MIN_BODY_BYTES_PER_SEC: usize = 16 * 1024;
/// How long a save holding a slot may send slower than the least rate.
const MIN_BODY_RATE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// How long `bytes` take at [`MIN_BODY_BYTES_PER_SEC`].
fn rate_time(bytes: usize) -> std::time::Duration {
    std::time::Duration::from_secs_f64(bytes as f64 / MIN_BODY_BYTES_PER_SEC as f64)
}

/// Reads the rest of a body, after its `first` bytes, into one buffer of at
/// most `max` bytes, sized from `Content-Length` up front so it is never
/// copied while growing.
async fn read_body(
    first: Option<Bytes>,
    mut body: BodyStream,
    max: usize,
    declared: Option<usize>,
) -> Result<Vec<u8>, ApiError> {
    let Some(first) = first else {
        return Ok(Vec::new());
    };
    if first.len() > max {
        return Err(too_large());
    }
    let mut out = Vec::with_capacity(declared.unwrap_or(0).min(max).max(first.len()));
    out.extend_from_slice(&first);
    let since = tokio::time::Instant::now();
    loop {
        // Holding a slot, the body must keep up the least rate (after a
        // grace): a client that sends a byte and then trickles cannot keep
        // a slot for the whole body deadline.
        let due = since + MIN_BODY_RATE_GRACE.max(rate_time(out.len() + 1));
        let chunk = match tokio::time::timeout_at(due, body.next()).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(_) => {
                metrics::counter!("penora_http_body_timeouts_total").increment(1);
                return Err(ApiError::BodyTooSlow {
                    bytes_per_sec: MIN_BODY_BYTES_PER_SEC,
                });
            }
        };
        let chunk = chunk.map_err(unreadable)?;
        if out.len() + chunk.len() > max {
            return Err(too_large());
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Reads and discards up to `max` bytes of a body.
async fn drain(mut body: BodyStream, max: usize) {
    let mut seen = 0;
    while let Some(Ok(chunk)) = body.next().await {
        seen += chunk.len();
        if seen > max {
            return;
        }
    }
}

/// Checks a save's fields; the content is decoded but not yet prepared.
fn parse_save(
    raw: &[u8],
    auth: &Auth,
    key: &IdempotencyKey,
) -> Result<(NewProject, bool), ApiError> {
    let body: SaveProjectRequest<'_> = parse_json(raw)?;
    let user = user_id(body.user_id.as_deref())?;
    let app_source = match (body.app_source.as_deref(), auth.bound_app()) {
        (Some(raw), _) => AppName::parse("app_source", raw)?,
        (None, Some(own)) => AppName::parse("app_source", own)?,
        (None, None) => return Err(ApiError::InvalidRequest("app_source: is required".into())),
    };
    auth.require_app("app_source", app_source.as_str())?;
    let project_type = ProjectType::parse("project_type", body.project_type.as_deref())?;
    let title = Title::parse("title", body.title.as_deref())?;
    let content = Content::decode(body.content.as_deref().unwrap_or_default())?;
    let metadata = match body.metadata {
        None => serde_json::json!({}),
        Some(raw) => projects::parse_metadata(raw.get())?,
    };
    let project_code = key
        .or_body("project_code", body.project_code.as_deref(), |k| {
            ProjectCode::parse(k).is_ok()
        })?
        .as_deref()
        .map(ProjectCode::parse)
        .transpose()?;
    let on_full = match body.on_full.as_deref() {
        None | Some("refuse") => OnFull::Refuse,
        Some("evict_oldest") => OnFull::EvictOldest,
        Some(other) => {
            return Err(ApiError::InvalidRequest(format!(
                "on_full: must be `refuse` or `evict_oldest`, got {other:?}"
            )));
        }
    };
    let original_size = content.size();
    Ok((
        NewProject {
            user_id: user,
            app_source,
            project_type,
            title,
            content,
            image: None,
            original_size,
            metadata,
            project_code,
            on_full,
        },
        body.store_original.unwrap_or(false),
    ))
}

fn answer(saved: projects::Saved, project: &NewProject) -> Result<Response, ApiError> {
    let r = &saved.receipt;
    let user = project.user_id.as_str();
    let is_url = matches!(project.content, Content::Url(_));
    let body = SaveProjectResponse {
        project_id: r.project_id,
        status: r.status.clone(),
        size_bytes: r.size_bytes,
        original_size_bytes: r.original_size_bytes,
        content_type: r.content_type.clone(),
        width: r.width,
        height: r.height,
        storage_remaining_bytes: r.storage_remaining_bytes,
        evicted_project_ids: r.evicted_project_ids.clone(),
        content_url: content_url(user, r.project_id),
        thumbnail_url: (!is_url).then(|| thumbnail_url(user, r.project_id)),
        created_at: rfc3339_millis(r.created_at),
    };
    Ok(with_replay_header(
        StatusCode::ACCEPTED,
        saved.replayed,
        body,
    ))
}

/// Query of `GET /projects`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ProjectsQuery {
    /// The user.
    #[param(value_type = UserId, inline)]
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
    /// Bytes it counts against the quota: the stored form.
    pub size_bytes: i64,
    /// Bytes sent.
    pub original_size_bytes: i64,
    /// The stored media type (`null` for a URL, or content not recognised).
    pub content_type: Option<String>,
    /// Width of the stored image.
    pub width: Option<i32>,
    /// Height of the stored image.
    pub height: Option<i32>,
    /// Its metadata, as stored.
    #[schema(value_type = Object)]
    pub metadata: Box<serde_json::value::RawValue>,
    /// The reservation it names, if any.
    pub project_code: Option<String>,
    /// Why it failed, if it did.
    pub failure_reason: Option<String>,
    /// Where to fetch its content.
    pub content_url: String,
    /// Where to fetch its thumbnail (WebP, long side at most 256 px; made by
    /// the worker, so `409 content_not_available` while queued); `null` for
    /// a URL.
    pub thumbnail_url: Option<String>,
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
    if projects::usage(&client, &user).await?.is_none() {
        return Err(ApiError::UserNotFound);
    }
    let rows = projects::list(&client, &user, limit, after).await?;
    let counts = projects::counts(&client, &user).await?;
    let next_cursor = next_cursor(&rows, limit, |r| encode_cursor(r.created_at, r.id));
    let items: Vec<ProjectItem> = rows
        .into_iter()
        .map(|r| ProjectItem {
            content_url: content_url(user.as_str(), r.id),
            thumbnail_url: (!r.is_url).then(|| thumbnail_url(user.as_str(), r.id)),
            original_size_bytes: r.original_size_bytes,
            content_type: r.content_type,
            width: r.width,
            height: r.height,
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
        .filter(|(a, _)| a != domain::PENORA && a != domain::IMAGEGENE)
    {
        other_apps.insert(
            format!("{app}_projects"),
            serde_json::to_value(of_app(app)).unwrap_or_default(),
        );
        other_apps.insert(format!("{app}_count"), serde_json::Value::from(*n));
    }
    let body = ProjectsResponse {
        user_id: user.to_string(),
        penora_projects: of_app(domain::PENORA),
        imagegene_projects: of_app(domain::IMAGEGENE),
        all_projects: items,
        total_count: counts.iter().map(|(_, n)| n).sum(),
        penora_count: count_of(domain::PENORA),
        imagegene_count: count_of(domain::IMAGEGENE),
        next_cursor,
        other_apps,
    };
    Ok(json_ok(body).into_response())
}

/// Query of the content, thumbnail and delete routes.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ContentQuery {
    /// The project's owner.
    #[param(value_type = UserId, inline)]
    pub user_id: Option<String>,
}

fn project_id_param(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::InvalidRequest("project_id: must be a UUID".into()))
}

/// The `ETag`s an `If-None-Match` header names (`*` matches any).
fn if_none_match(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/").to_owned())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Serves a project's content or thumbnail: the bytes with their media type
/// and `ETag`, `304` when the caller's `If-None-Match` names that `ETag`, or
/// a redirect to the stored URL.
async fn serve(
    state: &AppState,
    auth: &Auth,
    raw_id: &str,
    q: &ContentQuery,
    headers: &HeaderMap,
    rendition: Rendition,
) -> Result<Response, ApiError> {
    auth.require(Scope::Read)?;
    let user = user_id(q.user_id.as_deref())?;
    let project_id = project_id_param(raw_id)?;
    let cached = if_none_match(headers);
    let client = state.pool.get().await?;
    let content = projects::content(
        &client,
        &user,
        project_id,
        rendition,
        cached.first().map(String::as_str),
    )
    .await?
    .ok_or_else(|| ApiError::NotFound(format!("no project {project_id} for this user")))?;
    Ok(match content {
        StoredContent::Image {
            media_type,
            etag,
            data,
        } => {
            let not_modified = cached.iter().any(|t| t == "*" || *t == etag);
            let mut response = match data {
                Some(data) if !not_modified => {
                    let mut response = data.into_response();
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_str(&media_type)
                            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
                    );
                    response
                }
                _ => StatusCode::NOT_MODIFIED.into_response(),
            };
            let headers = response.headers_mut();
            if let Ok(etag) = HeaderValue::from_str(&etag) {
                headers.insert(header::ETAG, etag);
            }
            headers.insert(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            );
            // The bytes of a project never change (a new save is a new
            // project), but they are the user's own: no shared cache.
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

/// The stored content of a project: the image bytes with their media type, or
/// a redirect to the stored URL.
#[utoipa::path(
    get, path = "/projects/{project_id}/content", tag = "projects",
    params(
        ("project_id" = Uuid, Path, description = "The project's id"),
        ContentQuery,
        ("If-None-Match" = Option<String>, Header, description = "An `ETag` from an earlier answer"),
    ),
    responses(
        (status = 200, description = "The image, with `ETag` and `Cache-Control: private`", content_type = "image/*"),
        (status = 303, description = "Redirect to the stored URL"),
        (status = 304, description = "Not modified: `If-None-Match` names the current `ETag`"),
        (status = 400, description = "`user_id_required` or `invalid_request`", body = ErrorBody),
        (status = 404, description = "`not_found` (unknown or deleted)", body = ErrorBody),
        (status = 409, description = "`content_not_available`: queued or failed", body = ErrorBody),
    ),
    security(("api_key_header" = []), ("api_key_query" = []))
)]
async fn project_content(
    State(state): State<AppState>,
    auth: Auth,
    Path(project_id): Path<String>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<ContentQuery>,
) -> Result<Response, ApiError> {
    serve(&state, &auth, &project_id, &q, &headers, Rendition::Content).await
}

/// A project's thumbnail: WebP, long side at most 256 px, made by the worker
/// once the save is checked (not counted in the quota).
#[utoipa::path(
    get, path = "/projects/{project_id}/thumbnail", tag = "projects",
    params(
        ("project_id" = Uuid, Path, description = "The project's id"),
        ContentQuery,
        ("If-None-Match" = Option<String>, Header, description = "An `ETag` from an earlier answer"),
    ),
    responses(
        (status = 200, description = "The thumbnail (`image/webp`), with `ETag` and `Cache-Control: private`", content_type = "image/webp"),
        (status = 304, description = "Not modified: `If-None-Match` names the current `ETag`"),
        (status = 400, description = "`user_id_required` or `invalid_request`", body = ErrorBody),
        (status = 404, description = "`not_found` (unknown or deleted)", body = ErrorBody),
        (status = 409, description = "`content_not_available`: queued, failed, or a URL (no thumbnail)", body = ErrorBody),
    ),
    security(("api_key_header" = []), ("api_key_query" = []))
)]
async fn project_thumbnail(
    State(state): State<AppState>,
    auth: Auth,
    Path(project_id): Path<String>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<ContentQuery>,
) -> Result<Response, ApiError> {
    serve(
        &state,
        &auth,
        &project_id,
        &q,
        &headers,
        Rendition::Thumbnail,
    )
    .await
}

/// Answer of `DELETE /projects/{project_id}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeleteProjectResponse {
    /// The deleted project.
    pub project_id: Uuid,
    /// Bytes given back to the quota (0 for a failed project, which had
    /// already released them).
    pub freed_bytes: i64,
    /// The user's storage afterwards, as `user-info` shows it.
    pub storage: Storage,
}

/// Delete a project: its content goes and its bytes are freed, in one
/// transaction. A key bound to an app deletes only that app's projects. A
/// project still `queued` can be deleted; its save job then does nothing.
#[utoipa::path(
    delete, path = "/projects/{project_id}", tag = "projects",
    params(("project_id" = Uuid, Path, description = "The project's id"), ContentQuery),
    responses(
        (status = 200, description = "Deleted", body = Success<DeleteProjectResponse>),
        (status = 400, description = "`user_id_required` or `invalid_request`", body = ErrorBody),
        (status = 403, description = "`forbidden` or `app_mismatch` (another app's project)", body = ErrorBody),
        (status = 404, description = "`not_found`: unknown or already deleted", body = ErrorBody),
    ),
    security(("api_key_header" = []), ("api_key_query" = []))
)]
#[tracing::instrument(skip_all, fields(user_id, project_id))]
async fn delete_project(
    State(state): State<AppState>,
    auth: Auth,
    Path(project_id): Path<String>,
    ApiQuery(q): ApiQuery<ContentQuery>,
) -> Result<Response, ApiError> {
    auth.require(Scope::Write)?;
    let user = user_id(q.user_id.as_deref())?;
    let project_id = project_id_param(&project_id)?;
    let span = tracing::Span::current();
    span.record("user_id", user.as_str());
    span.record("project_id", tracing::field::display(project_id));
    let actor = auth
        .0
        .key_id
        .map_or_else(|| "bootstrap key".to_owned(), |id| format!("key {id}"));
    let mut client = state.pool.get().await?;
    let deleted = projects::delete(
        &mut client,
        user.as_str(),
        project_id,
        auth.bound_app(),
        Cause::Request,
        Some(&actor),
    )
    .await?;
    let total_projects = projects::usage(&client, &user)
        .await?
        .map_or(0, |u| u.total_projects);
    let body = DeleteProjectResponse {
        project_id,
        freed_bytes: deleted.freed_bytes,
        storage: Storage::new(
            state.settings.workspace.storage_quota_bytes,
            deleted.storage_used_bytes,
            total_projects,
        ),
    };
    Ok(json_ok(body).into_response())
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
