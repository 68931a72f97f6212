//! Projects of the shared workspace and their storage quota.
//!
//! Rules:
//! - a project's content counts the bytes it is stored as (`size_bytes`: the
//!   WebP the API made, or the bytes as sent; a URL counts its length),
//!   decided before the save is answered;
//! - its title and metadata count too (`meta_bytes`: the title's UTF-8 bytes
//!   and the metadata's compact JSON, an empty object nothing), so a flood of
//!   tiny saves with big metadata cannot store data outside the quota; the
//!   quota counts `size_bytes + meta_bytes` ([`NewProject::quota_bytes`]);
//! - the bytes are reserved against the user's quota in the transaction that
//!   records the project, through a guarded `UPDATE` (`storage_used_bytes +
//!   bytes <= quota`), so concurrent saves never exceed it (invariant 6);
//! - a user has at most `MAX_PROJECTS_PER_USER` projects that are not
//!   deleted (queued, saved and failed alike: a failed project's row, title
//!   and metadata are still stored and listed), counted in the save's
//!   transaction after the account row is locked, so concurrent saves cannot
//!   pass the cap together;
//! - `evict_oldest` deletes the user's oldest saved projects of the same app,
//!   just enough, in that same transaction, or nothing at all;
//! - a deletion (by request, eviction, retention or an operator) frees the
//!   bytes the project counted, removes its content, keeps its row as a
//!   `deleted` tombstone (a replayed save answers it instead of saving again)
//!   and writes a `project.deleted` row to `project_log`, all in one
//!   transaction;
//! - a project the worker fails for good releases its content's bytes (its
//!   title and metadata stay, and stay counted, until it is deleted);
//! - each status change writes its event out (contract §14) in its own
//!   transaction: `project.saved` and `project.failed` when the worker
//!   finishes a save ([`finish_save`]), `project.deleted` for every deletion
//!   (`reason`: `deleted`, `evicted`, `retention` or `operator`).
//!
//! Every writer locks the account row first, then the projects: the account
//! with `penora_store::accounts`' one lock (the lock the movements of
//! credits take, so a user's saves and movements queue on one row), or with
//! the quota's `UPDATE` of that row, which takes the same lock.

use base64::Engine;
use deadpool_postgres::{Client, GenericClient, Transaction};
use serde::Serialize;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::images::{ImageInfo, Thumbnail};
use penora_domain::events::EventType;
use penora_domain::messages::{SAVE_PROJECT, SaveProjectJob};
use penora_domain::{AppName, ProjectCode, UserId, ValidationError};
use penora_store::DbError;
use penora_store::{accounts, outbox};

/// SQL reserving a save's bytes against the quota (also driven raw by the benchmark).
pub const RESERVE_STORAGE_SQL: &str = "UPDATE accounts SET storage_used_bytes = storage_used_bytes + $2, updated_at = now() \
     WHERE user_id = $1 AND storage_used_bytes + $2 <= $3 RETURNING storage_used_bytes";
/// SQL recording a project.
pub const INSERT_PROJECT_SQL: &str = "INSERT INTO projects (user_id, id, app_source, project_type, title, size_bytes, metadata, project_code, original_size_bytes, meta_bytes) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
     ON CONFLICT (user_id, app_source, project_code) WHERE project_code IS NOT NULL DO NOTHING \
     RETURNING created_at";
/// SQL storing a project's content.
pub const INSERT_CONTENT_SQL: &str = "INSERT INTO project_contents (user_id, project_id, data, url, media_type, width, height, etag) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

/// Content as submitted, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// Image bytes (from base64 or a `data:` URL).
    Bytes(Vec<u8>),
    /// A reference to an image stored elsewhere.
    Url(String),
}

impl Content {
    /// Decodes `content`: an `http(s)://` URL, a `data:…;base64,` URL or plain
    /// base64 (standard or URL-safe alphabet, padding optional, whitespace
    /// ignored).
    pub fn decode(raw: &str) -> Result<Self, ValidationError> {
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(ValidationError::new("content", "is required"));
        }
        if trimmed.starts_with("https://") || trimmed.starts_with("http://") {
            // Served back as a `Location` header: visible ASCII only (found
            // by schemathesis: a control character made the redirect a 500).
            if trimmed.len() > 2048 || !trimmed.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ValidationError::new(
                    "content",
                    "a URL must be at most 2048 visible ASCII characters (percent-encode spaces and the rest)",
                ));
            }
            // And a well-formed absolute URL with a host (found by
            // schemathesis: `https://[x` was stored and redirected to).
            let parsed = url::Url::parse(trimmed).ok();
            if !parsed.is_some_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            {
                return Err(ValidationError::new(
                    "content",
                    "a URL must be a well-formed http(s) URL with a host",
                ));
            }
            return Ok(Self::Url(trimmed.to_owned()));
        }
        let payload = if let Some(rest) = trimmed.strip_prefix("data:") {
            let (header, data) = rest.split_once(',').ok_or_else(|| {
                ValidationError::new("content", "a data: URL needs a comma before its data")
            })?;
            if !header.ends_with(";base64") {
                return Err(ValidationError::new(
                    "content",
                    "a data: URL must be base64-encoded (data:<type>;base64,<data>)",
                ));
            }
            data
        } else {
            trimmed
        };
        // Line breaks (MIME-style base64) are allowed; most content has none
        // and is decoded without a copy.
        let compact: std::borrow::Cow<'_, str> = if payload.bytes().any(|b| b.is_ascii_whitespace())
        {
            payload
                .chars()
                .filter(|c| !c.is_ascii_whitespace())
                .collect::<String>()
                .into()
        } else {
            payload.into()
        };
        let unpadded = compact.trim_end_matches('=');
        let engine = if unpadded.contains(['-', '_']) {
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
        } else {
            &base64::engine::general_purpose::STANDARD_NO_PAD
        };
        let bytes = engine.decode(unpadded).map_err(|e| {
            ValidationError::new(
                "content",
                format!("must be base64 image data, a data: URL or an http(s) URL ({e})"),
            )
        })?;
        if bytes.is_empty() {
            return Err(ValidationError::new("content", "decodes to no data"));
        }
        Ok(Self::Bytes(bytes))
    }

    /// The bytes this content counts against the quota.
    pub fn size(&self) -> i64 {
        match self {
            Self::Bytes(b) => i64::try_from(b.len()).unwrap_or(i64::MAX),
            Self::Url(u) => i64::try_from(u.len()).unwrap_or(i64::MAX),
        }
    }
}

/// Largest metadata object, as compact JSON.
pub const METADATA_MAX_BYTES: usize = 16 * 1024;

/// Largest metadata as sent, whitespace included: room for pretty-printed
/// JSON of [`METADATA_MAX_BYTES`] compact bytes. Anything longer is refused
/// before it is parsed, so a body's worth of metadata never becomes a tree of
/// millions of values in memory.
pub const METADATA_MAX_SENT_BYTES: usize = 4 * METADATA_MAX_BYTES;

/// Parses metadata sent as raw JSON text, measuring it first: longer than
/// [`METADATA_MAX_SENT_BYTES`] is refused unparsed; then the rules of
/// [`check_metadata`]. `null` is an empty object.
pub fn parse_metadata(raw: &str) -> Result<serde_json::Value, ValidationError> {
    if raw.len() > METADATA_MAX_SENT_BYTES {
        return Err(ValidationError::new(
            "metadata",
            format!(
                "must be at most {METADATA_MAX_BYTES} bytes of JSON (got {} bytes as sent)",
                raw.len()
            ),
        ));
    }
    let metadata: serde_json::Value = serde_json::from_str(raw)
        .map_err(|e| ValidationError::new("metadata", format!("is not valid JSON ({e})")))?;
    if metadata.is_null() {
        return Ok(serde_json::Value::Object(serde_json::Map::new()));
    }
    check_metadata(&metadata)?;
    Ok(metadata)
}

/// Checks a project's metadata: a JSON object of at most
/// [`METADATA_MAX_BYTES`], with no NUL character in any key or string
/// (PostgreSQL's `jsonb` cannot hold one; found by schemathesis as a 500).
pub fn check_metadata(metadata: &serde_json::Value) -> Result<(), ValidationError> {
    fn has_nul(value: &serde_json::Value) -> bool {
        match value {
            serde_json::Value::String(s) => s.contains('\0'),
            serde_json::Value::Array(items) => items.iter().any(has_nul),
            serde_json::Value::Object(fields) => {
                fields.iter().any(|(k, v)| k.contains('\0') || has_nul(v))
            }
            _ => false,
        }
    }
    if !metadata.is_object() {
        return Err(ValidationError::new("metadata", "must be a JSON object"));
    }
    let size = compact_len(metadata);
    if size > METADATA_MAX_BYTES {
        return Err(ValidationError::new(
            "metadata",
            format!("must be at most {METADATA_MAX_BYTES} bytes of JSON (got {size})"),
        ));
    }
    if has_nul(metadata) {
        return Err(ValidationError::new(
            "metadata",
            "must not contain the NUL character (\\u0000)",
        ));
    }
    Ok(())
}

/// Bytes of `value` as compact JSON.
fn compact_len(value: &serde_json::Value) -> usize {
    serde_json::to_vec(value).map_or(usize::MAX, |b| b.len())
}

/// The bytes a project's title and metadata count against the quota: the
/// title's UTF-8 bytes and the metadata's compact JSON (an empty object, what
/// a save without metadata stores, counts nothing).
pub fn meta_bytes(title: &str, metadata: &serde_json::Value) -> i64 {
    let metadata = match metadata {
        serde_json::Value::Object(fields) if fields.is_empty() => 0,
        serde_json::Value::Null => 0,
        other => compact_len(other),
    };
    i64::try_from(title.len().saturating_add(metadata)).unwrap_or(i64::MAX)
}

/// What to do when a save does not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnFull {
    /// Refuse it with `413 storage_limit_exceeded` (the default).
    #[default]
    Refuse,
    /// Delete the user's oldest saved projects of the same app, just enough.
    EvictOldest,
}

/// A project to save, in the form it will be stored.
#[derive(Debug, Clone)]
pub struct NewProject {
    /// Whose workspace.
    pub user_id: UserId,
    /// The app saving it.
    pub app_source: AppName,
    /// e.g. `ai_artwork`.
    pub project_type: String,
    /// Title, at most 200 characters.
    pub title: String,
    /// The content as stored (re-encoded bytes, bytes as sent, or a URL).
    pub content: Content,
    /// The image the bytes hold, when they are one.
    pub image: Option<ImageInfo>,
    /// Bytes the client sent (the URL's length for a URL).
    pub original_size: i64,
    /// Free-form metadata (a JSON object).
    pub metadata: serde_json::Value,
    /// The reservation this save settles, if any; also makes the save idempotent.
    pub project_code: Option<ProjectCode>,
    /// What to do when it does not fit.
    pub on_full: OnFull,
}

impl NewProject {
    /// Bytes its title and metadata count against the quota ([`meta_bytes`]).
    pub fn meta_bytes(&self) -> i64 {
        meta_bytes(&self.title, &self.metadata)
    }

    /// Bytes it counts against the quota: the stored content, title and
    /// metadata.
    pub fn quota_bytes(&self) -> i64 {
        self.content.size().saturating_add(self.meta_bytes())
    }
}

/// The answer to a save.
#[derive(Debug, Clone, Serialize)]
pub struct SaveReceipt {
    /// The new project's id.
    pub project_id: Uuid,
    /// `queued` until the worker has checked and stored it.
    pub status: String,
    /// Bytes counted against the quota (as stored).
    pub size_bytes: i64,
    /// Bytes the client sent.
    pub original_size_bytes: i64,
    /// The stored media type, when the content is an image.
    pub content_type: Option<String>,
    /// Width of the stored image.
    pub width: Option<i32>,
    /// Height of the stored image.
    pub height: Option<i32>,
    /// Bytes the user has left after this save.
    pub storage_remaining_bytes: i64,
    /// Projects deleted to make room (`on_full: evict_oldest`), oldest first.
    pub evicted_project_ids: Vec<Uuid>,
    /// When the project was recorded.
    #[serde(serialize_with = "penora_domain::timefmt::serde_millis::serialize")]
    pub created_at: OffsetDateTime,
}

/// Storage refusal details.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// The save would cross the quota.
    #[error(
        "storage limit exceeded: the project needs {needed} bytes and {remaining} bytes remain{}",
        match evictable {
            Some((app, n)) => format!(
                "; deleting every saved {app} project would free only {n} bytes, so none was deleted"
            ),
            None => String::new(),
        }
    )]
    StorageLimitExceeded {
        /// The project's size.
        needed: i64,
        /// Bytes left in the quota.
        remaining: i64,
        /// With `evict_oldest`: the app and what its saved projects hold.
        evictable: Option<(String, i64)>,
    },
    /// The save would give the user more projects than allowed.
    #[error(
        "project limit reached: a user may have at most {limit} projects (queued, saved or \
         failed) and this one has that many; delete some to save more"
    )]
    ProjectLimitReached {
        /// `MAX_PROJECTS_PER_USER`.
        limit: i64,
    },
    /// The user has no account.
    #[error("user not found")]
    UserNotFound,
    /// The project code was saved before with another title or content.
    #[error("{0}")]
    IdempotencyConflict(String),
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<tokio_postgres::Error> for SaveError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Db(e.into())
    }
}

/// A save's answer, and whether it is the answer of an earlier save with the
/// same project code (a replay: nothing was saved again).
#[derive(Debug, Clone)]
pub struct Saved {
    /// The answer (the first one, for a replay).
    pub receipt: SaveReceipt,
    /// True when the project code had been saved before.
    pub replayed: bool,
}

/// The `ETag` of stored bytes: a strong validator from their SHA-256.
pub fn etag_of(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("\"{}\"", hex::encode(&Sha256::digest(data)[..16]))
}

/// The earlier save with this project code, if any (a replay, or a
/// conflict when its title or content differ). Cheap: the API asks before
/// spending CPU on the image.
pub async fn replay_of(
    client: &impl GenericClient,
    p: &NewProject,
    quota: i64,
) -> Result<Option<Result<Saved, SaveError>>, SaveError> {
    let Some(code) = &p.project_code else {
        return Ok(None);
    };
    let row = client
        .query_opt(
            "SELECT p.id, p.status, p.size_bytes, p.original_size_bytes, p.created_at, p.title, \
                    a.storage_used_bytes, c.media_type, c.width, c.height \
             FROM projects p JOIN accounts a USING (user_id) \
             LEFT JOIN project_contents c ON c.user_id = p.user_id AND c.project_id = p.id \
             WHERE p.user_id = $1 AND p.app_source = $2 AND p.project_code = $3",
            &[&p.user_id.as_str(), &p.app_source.as_str(), &code.as_str()],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let original: i64 = row.get("original_size_bytes");
    let title: String = row.get("title");
    if original != p.original_size || title != p.title {
        return Ok(Some(Err(SaveError::IdempotencyConflict(format!(
            "project_code {:?} was already saved with another title or content",
            code.as_str()
        )))));
    }
    Ok(Some(Ok(Saved {
        receipt: SaveReceipt {
            project_id: row.get("id"),
            status: row.get("status"),
            size_bytes: row.get("size_bytes"),
            original_size_bytes: original,
            content_type: row.get("media_type"),
            width: row.get("width"),
            height: row.get("height"),
            storage_remaining_bytes: (quota - row.get::<_, i64>("storage_used_bytes")).max(0),
            evicted_project_ids: Vec::new(),
            created_at: row.get("created_at"),
        },
        replayed: true,
    })))
}

/// Records a project as `queued`, reserves the bytes it counts (making room
/// first when asked to) and writes its job, in one transaction; refuses it
/// when the user already has `max_projects` projects (not deleted).
pub async fn save(
    client: &mut Client,
    p: &NewProject,
    quota: i64,
    max_projects: i64,
    correlation_id: Option<&str>,
) -> Result<Saved, SaveError> {
    let user = p.user_id.as_str();
    let size = p.content.size();
    let meta = p.meta_bytes();
    let counted = p.quota_bytes();
    let id = Uuid::now_v7();
    let tx = client.transaction().await?;
    let reserve = tx.prepare_cached(RESERVE_STORAGE_SQL).await?;
    let mut evicted = Vec::new();
    let used: i64 = match tx.query_opt(&reserve, &[&user, &counted, &quota]).await? {
        Some(row) => {
            if let Some(answer) = at_project_limit(&tx, p, quota, max_projects).await? {
                tx.rollback().await?;
                return answer;
            }
            row.get(0)
        }
        None => {
            if let Some(first) = replay_of(&tx, p, quota).await? {
                tx.rollback().await?;
                return first;
            }
            let Some(used) = accounts::lock_storage(&tx, user).await? else {
                return Err(SaveError::UserNotFound);
            };
            // The cap first: evicting makes room in bytes, not in projects.
            if let Some(answer) = at_project_limit(&tx, p, quota, max_projects).await? {
                tx.rollback().await?;
                return answer;
            }
            let refused = |evictable| SaveError::StorageLimitExceeded {
                needed: counted,
                remaining: (quota - used).max(0),
                evictable,
            };
            if p.on_full == OnFull::Refuse || counted > quota {
                return Err(refused(None));
            }
            let app = p.app_source.as_str();
            let must_free = used + counted - quota;
            let (victims, held) = oldest_saved(&tx, user, app, must_free).await?;
            if held < must_free {
                return Err(refused(Some((app.to_owned(), held))));
            }
            remove(&tx, user, &victims, Cause::Evicted, Some(&id.to_string())).await?;
            evicted = victims.iter().map(|v| v.id).collect();
            match tx.query_opt(&reserve, &[&user, &counted, &quota]).await? {
                Some(row) => row.get(0),
                None => return Err(refused(Some((app.to_owned(), held)))),
            }
        }
    };
    let code = p.project_code.as_ref().map(ProjectCode::as_str);
    let insert = tx.prepare_cached(INSERT_PROJECT_SQL).await?;
    let Some(inserted) = tx
        .query_opt(
            &insert,
            &[
                &user,
                &id,
                &p.app_source.as_str(),
                &p.project_type,
                &p.title,
                &size,
                &p.metadata,
                &code,
                &p.original_size,
                &meta,
            ],
        )
        .await?
    else {
        // The same project_code committed meanwhile: its answer stands, and
        // the evictions above roll back with this transaction.
        tx.rollback().await?;
        return replay_of(&*client, p, quota).await?.unwrap_or_else(|| {
            Err(DbError::Other("project code claimed but not found".into()).into())
        });
    };
    let (data, url, etag) = match &p.content {
        Content::Bytes(b) => (Some(b.as_slice()), None, Some(etag_of(b))),
        Content::Url(u) => (None, Some(u.as_str()), None),
    };
    let media_type = p.image.map(|i| i.media_type);
    let width = p.image.map(|i| i32::try_from(i.width).unwrap_or(i32::MAX));
    let height = p.image.map(|i| i32::try_from(i.height).unwrap_or(i32::MAX));
    let content = tx.prepare_cached(INSERT_CONTENT_SQL).await?;
    tx.execute(
        &content,
        &[&user, &id, &data, &url, &media_type, &width, &height, &etag],
    )
    .await?;
    let job = SaveProjectJob {
        user_id: user.to_owned(),
        project_id: id,
        app_source: p.app_source.to_string(),
        project_code: code.map(str::to_owned),
    };
    outbox::enqueue_job(&tx, user, SAVE_PROJECT, &job, correlation_id).await?;
    tx.commit().await?;
    metrics::counter!("penora_storage_reserved_bytes_total").increment(counted.unsigned_abs());
    metrics::counter!("penora_projects_evicted_total").increment(evicted.len() as u64);
    Ok(Saved {
        receipt: SaveReceipt {
            project_id: id,
            status: "queued".into(),
            size_bytes: size,
            original_size_bytes: p.original_size,
            content_type: media_type.map(str::to_owned),
            width,
            height,
            storage_remaining_bytes: quota - used,
            evicted_project_ids: evicted,
            created_at: inserted.get(0),
        },
        replayed: false,
    })
}

/// Rows read to tell whether a user is at the project cap: at most the cap,
/// so a user far past a lowered cap costs no more than one at it.
const LIVE_PROJECTS_SQL: &str = "SELECT count(*) FROM (SELECT 1 FROM projects \
     WHERE user_id = $1 AND status <> 'deleted' LIMIT $2) live";

/// With the account row locked (every writer of projects locks it first, so
/// the count cannot change before this transaction ends): `None` when one
/// more project fits under `max_projects`; else the first answer of a
/// replayed save (its project is already counted), or the refusal.
async fn at_project_limit(
    tx: &Transaction<'_>,
    p: &NewProject,
    quota: i64,
    max_projects: i64,
) -> Result<Option<Result<Saved, SaveError>>, SaveError> {
    let stmt = tx.prepare_cached(LIVE_PROJECTS_SQL).await?;
    let live: i64 = tx
        .query_one(&stmt, &[&p.user_id.as_str(), &max_projects])
        .await?
        .get(0);
    if live < max_projects {
        return Ok(None);
    }
    if let Some(first) = replay_of(tx, p, quota).await? {
        return Ok(Some(first));
    }
    metrics::counter!("penora_project_limit_refusals_total").increment(1);
    Ok(Some(Err(SaveError::ProjectLimitReached {
        limit: max_projects,
    })))
}

/// A project about to be deleted: its id, its app and the bytes it counts.
#[derive(Debug, Clone)]
struct Victim {
    id: Uuid,
    freed: i64,
    app_source: String,
}

/// The user's oldest saved projects of `app`, oldest first, locked, just
/// enough to free `must_free` bytes, and what they hold in all (less than
/// `must_free` when even all of them are not enough).
async fn oldest_saved(
    tx: &Transaction<'_>,
    user: &str,
    app: &str,
    must_free: i64,
) -> Result<(Vec<Victim>, i64), DbError> {
    let rows = tx
        .query(
            "SELECT id, size_bytes + meta_bytes AS counted FROM projects \
             WHERE user_id = $1 AND app_source = $2 AND status = 'saved' \
             ORDER BY created_at, id FOR UPDATE",
            &[&user, &app],
        )
        .await?;
    let mut victims = Vec::new();
    let mut held = 0;
    for row in rows {
        if held >= must_free {
            break;
        }
        let freed: i64 = row.get("counted");
        held += freed;
        victims.push(Victim {
            id: row.get("id"),
            freed,
            app_source: app.to_owned(),
        });
    }
    Ok((victims, held))
}

/// Why a project was deleted (`project_log.cause`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// `DELETE /projects/{id}`.
    Request,
    /// Made room for a newer save of the same app.
    Evicted,
    /// Older than `PROJECT_RETENTION_DAYS`.
    Retention,
    /// `penora-ops projects delete`.
    Operator,
}

impl Cause {
    /// The `reason` of its `project.deleted` event: `deleted` (asked by
    /// the user), `evicted`, `retention` or `operator`.
    fn event_reason(self) -> &'static str {
        match self {
            Self::Request => "deleted",
            other => other.as_str(),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Request => "request",
            Self::Evicted => "evicted",
            Self::Retention => "retention",
            Self::Operator => "operator",
        }
    }
}

/// Deletes `victims` (already locked, after the account row): tombstones,
/// content gone, bytes freed, one `project.deleted` row each.
async fn remove(
    tx: &Transaction<'_>,
    user: &str,
    victims: &[Victim],
    cause: Cause,
    actor: Option<&str>,
) -> Result<i64, DbError> {
    if victims.is_empty() {
        return Ok(0);
    }
    let ids: Vec<Uuid> = victims.iter().map(|v| v.id).collect();
    let freed: Vec<i64> = victims.iter().map(|v| v.freed).collect();
    let apps: Vec<&str> = victims.iter().map(|v| v.app_source.as_str()).collect();
    let total: i64 = freed.iter().sum();
    // (The transaction's now() rides on the update, for the events' time.)
    let gone = tx
        .query(
            "UPDATE projects SET status = 'deleted', deleted_at = now(), updated_at = now() \
             WHERE user_id = $1 AND id = ANY($2) RETURNING now() AS now",
            &[&user, &ids],
        )
        .await?;
    let now: OffsetDateTime = match gone.first() {
        Some(row) => row.try_get("now")?,
        None => return Err(DbError::Invariant("no project to delete was found".into())),
    };
    // project.deleted for each, in the deletion's transaction (contract §14).
    let data: Vec<serde_json::Value> = victims
        .iter()
        .map(|v| {
            serde_json::json!({
                "app": v.app_source,
                "project_id": v.id,
                "reason": cause.event_reason(),
            })
        })
        .collect();
    let events: Vec<outbox::Event<'_>> = data
        .into_iter()
        .map(|data| outbox::Event {
            user_id: user,
            kind: EventType::ProjectDeleted,
            data,
            correlation_id: None,
        })
        .collect();
    outbox::enqueue_events(tx, &events, now).await?;
    tx.execute(
        "DELETE FROM project_contents WHERE user_id = $1 AND project_id = ANY($2)",
        &[&user, &ids],
    )
    .await?;
    tx.execute(
        "INSERT INTO project_log (user_id, project_id, kind, app_source, cause, freed_bytes, actor) \
         SELECT $1, id, 'project.deleted', app, $4, freed, $5 \
         FROM unnest($2::uuid[], $3::text[], $6::bigint[]) AS v(id, app, freed)",
        &[&user, &ids, &apps, &cause.as_str(), &actor, &freed],
    )
    .await?;
    tx.execute(
        "UPDATE accounts SET storage_used_bytes = storage_used_bytes - $2, updated_at = now() \
         WHERE user_id = $1",
        &[&user, &total],
    )
    .await?;
    metrics::counter!("penora_projects_deleted_total", "cause" => cause.as_str())
        .increment(victims.len() as u64);
    metrics::counter!("penora_storage_freed_bytes_total").increment(total.unsigned_abs());
    Ok(total)
}

/// A deletion carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    /// Bytes given back to the quota: content, title and metadata (a failed
    /// project's title and metadata only: its content's went when it failed).
    pub freed_bytes: i64,
    /// The user's storage in use afterwards.
    pub storage_used_bytes: i64,
}

/// Why a deletion was refused.
#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    /// No such project, or already deleted.
    #[error("no project {0} for this user")]
    NotFound(Uuid),
    /// The project belongs to another app than the one allowed.
    #[error("project {project_id} belongs to {app}")]
    OtherApp {
        /// The project.
        project_id: Uuid,
        /// Its app.
        app: String,
    },
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<tokio_postgres::Error> for DeleteError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Db(e.into())
    }
}

/// Deletes one project and frees its bytes, in one transaction. `only_app`
/// limits it to that app's projects (a key bound to an app).
pub async fn delete(
    client: &mut Client,
    user_id: &str,
    project_id: Uuid,
    only_app: Option<&str>,
    cause: Cause,
    actor: Option<&str>,
) -> Result<Deleted, DeleteError> {
    let tx = client.transaction().await?;
    let Some(used) = accounts::lock_storage(&tx, user_id).await? else {
        return Err(DeleteError::NotFound(project_id));
    };
    let Some(row) = tx
        .query_opt(
            "SELECT status, size_bytes, meta_bytes, app_source FROM projects \
             WHERE user_id = $1 AND id = $2 AND status <> 'deleted' FOR UPDATE",
            &[&user_id, &project_id],
        )
        .await?
    else {
        return Err(DeleteError::NotFound(project_id));
    };
    let app: String = row.get("app_source");
    if only_app.is_some_and(|only| only != app) {
        return Err(DeleteError::OtherApp { project_id, app });
    }
    let status: String = row.get("status");
    // A failed project released its content's bytes when it failed; its
    // title and metadata were counted until now.
    let meta: i64 = row.get("meta_bytes");
    let freed = if status == "failed" {
        meta
    } else {
        row.get::<_, i64>("size_bytes") + meta
    };
    let victim = Victim {
        id: project_id,
        freed,
        app_source: app,
    };
    remove(&tx, user_id, &[victim], cause, actor).await?;
    tx.commit().await?;
    Ok(Deleted {
        freed_bytes: freed,
        storage_used_bytes: used - freed,
    })
}

/// Deletes up to `limit` projects (any status but deleted) created before
/// `cutoff`, oldest first, each in its own transaction; returns how many.
pub async fn delete_older_than(
    client: &mut Client,
    cutoff: OffsetDateTime,
    limit: i64,
) -> Result<usize, DbError> {
    let due = client
        .query(
            "SELECT user_id, id FROM projects WHERE status <> 'deleted' AND created_at < $1 \
             ORDER BY created_at LIMIT $2",
            &[&cutoff, &limit],
        )
        .await?;
    let mut deleted = 0;
    for row in due {
        let (user, id): (String, Uuid) = (row.get("user_id"), row.get("id"));
        match delete(client, &user, id, None, Cause::Retention, Some("retention")).await {
            Ok(_) => deleted += 1,
            // Deleted meanwhile by its owner: nothing to do.
            Err(DeleteError::NotFound(_) | DeleteError::OtherApp { .. }) => {}
            Err(DeleteError::Db(e)) => return Err(e),
        }
    }
    Ok(deleted)
}

/// A project as listed.
#[derive(Debug, Clone, Serialize)]
pub struct ProjectRow {
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
    /// Bytes its content is stored as (its title and metadata count in the
    /// quota besides).
    pub size_bytes: i64,
    /// Bytes the client sent.
    pub original_size_bytes: i64,
    /// The stored media type (`None` for a URL, or content not recognised).
    pub content_type: Option<String>,
    /// Width of the stored image.
    pub width: Option<i32>,
    /// Height of the stored image.
    pub height: Option<i32>,
    /// Whether the worker has made its thumbnail.
    pub has_thumbnail: bool,
    /// Whether the content is a URL reference.
    pub is_url: bool,
    /// The metadata it was saved with, as PostgreSQL renders it. Kept as
    /// raw JSON: parsing it into numbers again can fail (`jsonb` renders
    /// 1.7976931348623157e308 as 309 digits, out of f64's range: found by
    /// schemathesis as a panic) or change them.
    pub metadata: Box<serde_json::value::RawValue>,
    /// The reservation it names, if any.
    pub project_code: Option<String>,
    /// Why it failed, if it did.
    pub failure_reason: Option<String>,
    /// When it was saved.
    #[serde(serialize_with = "penora_domain::timefmt::serde_millis::serialize")]
    pub created_at: OffsetDateTime,
}

/// A page of the user's projects (deleted ones left out), newest first,
/// after the cursor `(created_at, id)`.
pub async fn list(
    client: &impl GenericClient,
    user_id: &UserId,
    limit: i64,
    after: Option<(OffsetDateTime, Uuid)>,
) -> Result<Vec<ProjectRow>, DbError> {
    let (at, id) = after.unzip();
    let stmt = client
        .prepare_cached(
            "SELECT p.id, p.app_source, p.project_type, p.title, p.status, p.size_bytes, \
                    p.original_size_bytes, c.media_type, c.width, c.height, \
                    c.thumbnail IS NOT NULL AS has_thumbnail, c.url IS NOT NULL AS is_url, \
                    p.metadata::text AS metadata, p.project_code, p.failure_reason, p.created_at \
             FROM projects p \
             LEFT JOIN project_contents c ON c.user_id = p.user_id AND c.project_id = p.id \
             WHERE p.user_id = $1 AND p.status <> 'deleted' \
               AND ($2::timestamptz IS NULL OR (p.created_at, p.id) < ($2, $3)) \
             ORDER BY p.created_at DESC, p.id DESC LIMIT $4",
        )
        .await?;
    let rows = client
        .query(&stmt, &[&user_id.as_str(), &at, &id, &limit])
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| ProjectRow {
            id: r.get("id"),
            app_source: r.get("app_source"),
            project_type: r.get("project_type"),
            title: r.get("title"),
            status: r.get("status"),
            size_bytes: r.get("size_bytes"),
            original_size_bytes: r.get("original_size_bytes"),
            content_type: r.get("media_type"),
            width: r.get("width"),
            height: r.get("height"),
            has_thumbnail: r.get("has_thumbnail"),
            is_url: r.get("is_url"),
            metadata: raw_json(r.get("metadata")),
            project_code: r.get("project_code"),
            failure_reason: r.get("failure_reason"),
            created_at: r.get("created_at"),
        })
        .collect())
}

/// `text` (PostgreSQL's rendering of a `jsonb`) as raw JSON; `{}` should it
/// ever not be JSON.
fn raw_json(text: String) -> Box<serde_json::value::RawValue> {
    use serde_json::value::{RawValue, to_raw_value};
    RawValue::from_string(text)
        .or_else(|_| to_raw_value(&serde_json::Map::new()))
        .unwrap_or_else(|_| RawValue::NULL.to_owned())
}

/// Columns of a user's workspace usage, over `accounts a`: the bytes the
/// quota counts and the projects that are not deleted.
const USAGE_COLUMNS: &str = "a.user_id, a.storage_used_bytes, \
       (SELECT count(*) FROM projects p WHERE p.user_id = a.user_id AND p.status <> 'deleted') AS total_projects \
     FROM accounts a";

/// SQL of one user's workspace usage (`user-info`'s storage).
pub static USAGE_SQL: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("SELECT {USAGE_COLUMNS} WHERE a.user_id = $1"));

/// SQL of many users' workspace usage at once (the API's batched `user-info`).
pub static USAGES_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!("SELECT {USAGE_COLUMNS} WHERE a.user_id = ANY($1::text[])")
});

/// What a user's workspace holds, as `user-info` shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes counted against the quota (queued, saved and failed projects'
    /// titles and metadata, and the content of the first two).
    pub storage_used_bytes: i64,
    /// Projects that are not deleted (queued, saved or failed).
    pub total_projects: i64,
}

impl TryFrom<&tokio_postgres::Row> for Usage {
    type Error = tokio_postgres::Error;

    fn try_from(r: &tokio_postgres::Row) -> Result<Self, Self::Error> {
        Ok(Self {
            storage_used_bytes: r.try_get("storage_used_bytes")?,
            total_projects: r.try_get("total_projects")?,
        })
    }
}

/// The user's workspace usage; `None` when the user has no account. Reads
/// without locks.
pub async fn usage(
    client: &impl GenericClient,
    user_id: &UserId,
) -> Result<Option<Usage>, DbError> {
    let stmt = client.prepare_cached(&USAGE_SQL).await?;
    match client.query_opt(&stmt, &[&user_id.as_str()]).await? {
        Some(row) => Ok(Some(Usage::try_from(&row)?)),
        None => Ok(None),
    }
}

/// The workspace usage of `users` who have an account, by user id, in one
/// statement. Reads without locks.
pub async fn usages(
    client: &impl GenericClient,
    users: &[&str],
) -> Result<std::collections::HashMap<String, Usage>, DbError> {
    let stmt = client.prepare_cached(&USAGES_SQL).await?;
    let mut found = std::collections::HashMap::new();
    for row in client.query(&stmt, &[&users]).await? {
        found.insert(row.try_get("user_id")?, Usage::try_from(&row)?);
    }
    Ok(found)
}

/// How many projects (deleted ones left out) the user has, per app.
pub async fn counts(
    client: &impl GenericClient,
    user_id: &UserId,
) -> Result<Vec<(String, i64)>, DbError> {
    let stmt = client
        .prepare_cached(
            "SELECT app_source, count(*) AS projects FROM projects WHERE user_id = $1 AND status <> 'deleted' \
             GROUP BY app_source ORDER BY app_source",
        )
        .await?;
    Ok(client
        .query(&stmt, &[&user_id.as_str()])
        .await?
        .into_iter()
        .map(|r| (r.get("app_source"), r.get("projects")))
        .collect())
}

/// Which stored bytes of a project to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rendition {
    /// The content as stored.
    Content,
    /// The worker's WebP thumbnail.
    Thumbnail,
}

/// What the content and thumbnail routes serve.
#[derive(Debug, Clone)]
pub enum StoredContent {
    /// The image bytes, their media type and `ETag`; `data` is `None` when
    /// the caller's `If-None-Match` already names this `ETag` (not loaded).
    Image {
        /// e.g. `image/webp`.
        media_type: String,
        /// The strong `ETag`.
        etag: String,
        /// The bytes, unless the caller has them.
        data: Option<Vec<u8>>,
    },
    /// Where the image lives.
    Url(String),
    /// The project is not `saved` (yet, or ever), or has no such rendition:
    /// its status and why.
    NotAvailable {
        /// `queued`, `failed` or `saved`.
        status: String,
        /// Why, if known.
        reason: Option<String>,
    },
}

/// A project's content or thumbnail; `None` when the user has no such
/// project (or it was deleted). `if_none_match` is the caller's cached
/// `ETag`: when it matches, the bytes are not even read.
pub async fn content(
    client: &impl GenericClient,
    user_id: &UserId,
    project_id: Uuid,
    rendition: Rendition,
    if_none_match: Option<&str>,
) -> Result<Option<StoredContent>, DbError> {
    let (data, etag) = match rendition {
        Rendition::Content => ("c.data", "c.etag"),
        Rendition::Thumbnail => ("c.thumbnail", "c.thumbnail_etag"),
    };
    // One statement per rendition, prepared once per connection.
    let stmt = client
        .prepare_cached(&format!(
            "SELECT p.status, p.failure_reason, c.url, c.media_type, \
                    {data} IS NOT NULL AS present, {etag} AS etag, \
                    CASE WHEN {etag} IS NOT DISTINCT FROM $3 THEN NULL ELSE {data} END AS data \
             FROM projects p \
             LEFT JOIN project_contents c ON c.user_id = p.user_id AND c.project_id = p.id \
             WHERE p.user_id = $1 AND p.id = $2 AND p.status <> 'deleted'"
        ))
        .await?;
    let row = client
        .query_opt(&stmt, &[&user_id.as_str(), &project_id, &if_none_match])
        .await?;
    let Some(row) = row else { return Ok(None) };
    let status: String = row.get("status");
    if status != "saved" {
        return Ok(Some(StoredContent::NotAvailable {
            status,
            reason: row.get("failure_reason"),
        }));
    }
    let url: Option<String> = row.get("url");
    let present: Option<bool> = row.get("present");
    let etag: Option<String> = row.get("etag");
    let data: Option<Vec<u8>> = row.get("data");
    Ok(Some(match (rendition, url, present, etag) {
        (Rendition::Content, Some(url), _, _) => StoredContent::Url(url),
        (_, _, Some(true), Some(etag)) => StoredContent::Image {
            media_type: match rendition {
                Rendition::Content => row
                    .get::<_, Option<String>>("media_type")
                    .unwrap_or_else(|| "application/octet-stream".into()),
                Rendition::Thumbnail => "image/webp".into(),
            },
            etag,
            data,
        },
        (Rendition::Thumbnail, url, _, _) => StoredContent::NotAvailable {
            status,
            reason: Some(if url.is_some() {
                "its content is a URL, which has no thumbnail".into()
            } else {
                "it has no thumbnail".into()
            }),
        },
        (Rendition::Content, None, _, _) => StoredContent::NotAvailable {
            status: "failed".into(),
            reason: Some("content missing".into()),
        },
    }))
}

/// How finishing a save ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finished {
    /// Checked and stored.
    Saved {
        /// The app that saved it (the reservation's app).
        app_source: String,
        /// The reservation to settle, if the save named one.
        project_code: Option<String>,
    },
    /// The content is not an image: the project failed and released its
    /// content's bytes.
    Failed(String),
    /// Done before (a redelivered job), or deleted meanwhile: nothing changed.
    AlreadyDone {
        /// `saved`, `failed` or `deleted`.
        status: String,
        /// The app that saved it.
        app_source: String,
        /// The reservation it names.
        project_code: Option<String>,
    },
    /// No such project for this user.
    NotFound,
}

/// What the worker checks of a queued project.
#[derive(Debug, Clone)]
pub enum Pending {
    /// Still queued, with its stored bytes to check (`None` for a URL).
    Queued(Option<Vec<u8>>),
    /// Queued, but its content row is missing (it fails).
    Empty,
    /// No longer queued (see [`finish_save`]).
    Done,
    /// No such project.
    NotFound,
}

/// The worker's first look at a save: is it still queued, and what bytes
/// must be checked. Read without locks: the CPU work that follows must not
/// hold the account row.
pub async fn pending(
    client: &impl GenericClient,
    user_id: &str,
    project_id: Uuid,
) -> Result<Pending, DbError> {
    let row = client
        .query_opt(
            "SELECT p.status, c.data, c.url IS NOT NULL AS is_url FROM projects p \
             LEFT JOIN project_contents c ON c.user_id = p.user_id AND c.project_id = p.id \
             WHERE p.user_id = $1 AND p.id = $2",
            &[&user_id, &project_id],
        )
        .await?;
    Ok(match row {
        None => Pending::NotFound,
        Some(r) if r.get::<_, String>("status") != "queued" => Pending::Done,
        Some(r) => match (
            r.get::<_, Option<Vec<u8>>>("data"),
            r.get::<_, bool>("is_url"),
        ) {
            (Some(data), _) => Pending::Queued(Some(data)),
            (None, true) => Pending::Queued(None),
            (None, false) => Pending::Empty,
        },
    })
}

/// The worker's verdict on a queued project's bytes.
pub type Verdict = Result<Option<(ImageInfo, Thumbnail)>, String>;

/// The worker's half of a save: marks the project `saved` with its
/// thumbnail, or `failed` with the reason (releasing its content's bytes; its
/// title and metadata stay stored and counted).
/// Idempotent: a project that is no longer `queued` (done before, or deleted
/// meanwhile) is left as it is.
pub async fn finish_save(
    client: &mut Client,
    user_id: &str,
    project_id: Uuid,
    verdict: Verdict,
) -> Result<Finished, DbError> {
    let tx = client.transaction().await?;
    // Account row first, as every other writer does.
    accounts::lock_one(&tx, user_id).await?;
    let row = tx
        .query_opt(
            "SELECT status, size_bytes, app_source, project_code, title, now() AS now FROM projects \
             WHERE user_id = $1 AND id = $2 FOR UPDATE",
            &[&user_id, &project_id],
        )
        .await?;
    let Some(row) = row else {
        return Ok(Finished::NotFound);
    };
    let status: String = row.get("status");
    let size: i64 = row.get("size_bytes");
    let app_source: String = row.get("app_source");
    let project_code: Option<String> = row.get("project_code");
    let title: Option<String> = row.try_get("title")?;
    let now: OffsetDateTime = row.try_get("now")?;
    if status != "queued" {
        return Ok(Finished::AlreadyDone {
            status,
            app_source,
            project_code,
        });
    }
    let finished = match verdict {
        Ok(checked) => {
            if let Some((info, thumb)) = checked {
                // Media type and size were set by the API; rows saved before
                // it did get them here.
                tx.execute(
                    "UPDATE project_contents SET media_type = coalesce(media_type, $3), \
                        width = coalesce(width, $4), height = coalesce(height, $5), \
                        etag = coalesce(etag, '\"' || left(encode(sha256(data), 'hex'), 32) || '\"'), \
                        thumbnail = $6, thumbnail_etag = $7 \
                     WHERE user_id = $1 AND project_id = $2",
                    &[
                        &user_id,
                        &project_id,
                        &info.media_type,
                        &i32::try_from(info.width).unwrap_or(i32::MAX),
                        &i32::try_from(info.height).unwrap_or(i32::MAX),
                        &thumb.data,
                        &etag_of(&thumb.data),
                    ],
                )
                .await?;
            }
            tx.execute(
                "UPDATE projects SET status = 'saved', updated_at = now() WHERE user_id = $1 AND id = $2",
                &[&user_id, &project_id],
            )
            .await?;
            let event = outbox::Event {
                user_id,
                kind: EventType::ProjectSaved,
                data: serde_json::json!({
                    "app": app_source,
                    "project_id": project_id,
                    "project_code": project_code,
                    "title": title,
                    "size": size,
                }),
                correlation_id: None,
            };
            outbox::enqueue_events(&tx, &[event], now).await?;
            Finished::Saved {
                app_source,
                project_code,
            }
        }
        Err(reason) => {
            tx.execute(
                "UPDATE projects SET status = 'failed', failure_reason = $3, updated_at = now() \
                 WHERE user_id = $1 AND id = $2",
                &[&user_id, &project_id, &reason],
            )
            .await?;
            tx.execute(
                "DELETE FROM project_contents WHERE user_id = $1 AND project_id = $2",
                &[&user_id, &project_id],
            )
            .await?;
            tx.execute(
                "UPDATE accounts SET storage_used_bytes = storage_used_bytes - $2, updated_at = now() \
                 WHERE user_id = $1",
                &[&user_id, &size],
            )
            .await?;
            let event = outbox::Event {
                user_id,
                kind: EventType::ProjectFailed,
                data: serde_json::json!({
                    "app": app_source,
                    "project_id": project_id,
                    "project_code": project_code,
                    "reason": reason,
                }),
                correlation_id: None,
            };
            outbox::enqueue_events(&tx, &[event], now).await?;
            Finished::Failed(reason)
        }
    };
    tx.commit().await?;
    Ok(finished)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_content_is_measured_decoded() {
        let c = Content::decode("aGVsbG8=").expect("valid");
        assert_eq!(c, Content::Bytes(b"hello".to_vec()));
        assert_eq!(c.size(), 5);
        assert_eq!(Content::decode("aGVsbG8").map(|c| c.size()), Ok(5));
        assert_eq!(Content::decode("aGVs\nbG8=").map(|c| c.size()), Ok(5));
    }

    #[test]
    fn data_urls_and_urls_are_understood() {
        assert_eq!(
            Content::decode("data:image/png;base64,aGVsbG8=").map(|c| c.size()),
            Ok(5)
        );
        let url = "https://cdn.example.com/a.png";
        assert_eq!(Content::decode(url), Ok(Content::Url(url.into())));
        assert_eq!(Content::decode(url).map(|c| c.size()), Ok(url.len() as i64));
    }

    #[test]
    fn metadata_is_measured_as_sent_before_it_is_parsed_and_as_compact_json_after() {
        let huge = format!("[{}]", vec!["0"; 100_000].join(","));
        let err = parse_metadata(&huge).unwrap_err();
        assert_eq!(err.field, "metadata");
        assert!(err.to_string().contains("as sent"), "{err}");
        // Whitespace is room, not size: the 16 KiB rule is about compact JSON.
        let pretty = format!(
            "{{ {} \"prompt\": \"{}\" }}",
            " ".repeat(10_000),
            "a".repeat(10_000)
        );
        assert!(pretty.len() > METADATA_MAX_BYTES);
        assert!(parse_metadata(&pretty).is_ok());
        assert_eq!(parse_metadata("null"), Ok(serde_json::json!({})));
        for bad in ["[1]", "\"text\"", "{\"a\": \"\\u0000\"}", "{"] {
            assert_eq!(parse_metadata(bad).unwrap_err().field, "metadata", "{bad}");
        }
    }

    #[test]
    fn title_and_metadata_count_their_bytes_and_an_empty_object_nothing() {
        assert_eq!(meta_bytes("Sunset", &serde_json::json!({})), 6);
        assert_eq!(meta_bytes("é", &serde_json::json!({"a": 1})), 2 + 7);
        assert_eq!(meta_bytes("", &serde_json::json!({"k": "v"})), 9);
    }

    #[test]
    fn garbage_content_is_refused_naming_the_field() {
        for bad in [
            "",
            "   ",
            "not base64 at all!",
            "data:image/png,raw",
            "data:nocomma",
            "====",
            "a",
        ] {
            let err = Content::decode(bad).unwrap_err();
            assert_eq!(err.field, "content", "{bad:?}");
        }
    }
}
