//! Projects of the shared workspace and their storage quota.
//!
//! Rules: a project's size is the decoded size of its base64 content (plain or
//! `data:` URL) or the length of its URL; the bytes are reserved against the
//! user's quota in the same transaction that records the project, through a
//! guarded `UPDATE` (`storage_used_bytes + size <= quota`), so concurrent saves
//! can never exceed it. A project the worker fails for good releases its bytes.

use base64::Engine;
use deadpool_postgres::{Client, GenericClient};
use serde::Serialize;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{
    db::DbError,
    domain::{AppName, ProjectCode, UserId, ValidationError},
    ledger::{LedgerError, Outcome},
    messages::{SAVE_PROJECT, SaveProjectJob},
    outbox,
};

/// SQL reserving a save's bytes against the quota (also driven raw by the benchmark).
pub const RESERVE_STORAGE_SQL: &str = "UPDATE accounts SET storage_used_bytes = storage_used_bytes + $2, updated_at = now() \
     WHERE user_id = $1 AND storage_used_bytes + $2 <= $3 RETURNING storage_used_bytes";
/// SQL recording a project.
pub const INSERT_PROJECT_SQL: &str = "INSERT INTO projects (user_id, id, app_source, project_type, title, size_bytes, metadata, project_code) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
     ON CONFLICT (user_id, app_source, project_code) WHERE project_code IS NOT NULL DO NOTHING \
     RETURNING created_at";
/// SQL storing a project's content.
pub const INSERT_CONTENT_SQL: &str =
    "INSERT INTO project_contents (user_id, project_id, data, url) VALUES ($1, $2, $3, $4)";

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
        let compact: String = payload
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
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
    let size = serde_json::to_vec(metadata).map_or(usize::MAX, |b| b.len());
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

/// A project to save.
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
    /// The decoded content.
    pub content: Content,
    /// Free-form metadata (a JSON object).
    pub metadata: serde_json::Value,
    /// The reservation this save settles, if any; also makes the save idempotent.
    pub project_code: Option<ProjectCode>,
}

/// The answer to a save.
#[derive(Debug, Clone, Serialize)]
pub struct SaveReceipt {
    /// The new project's id.
    pub project_id: Uuid,
    /// `queued` until the worker has checked and stored it.
    pub status: String,
    /// Bytes counted against the quota.
    pub size_bytes: i64,
    /// Bytes the user has left after this save.
    pub storage_remaining_bytes: i64,
    /// When the project was recorded.
    #[serde(serialize_with = "crate::timefmt::serde_millis::serialize")]
    pub created_at: OffsetDateTime,
}

/// Storage refusal details.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// The save would cross the quota.
    #[error(
        "storage limit exceeded: the project needs {needed} bytes and {remaining} bytes remain"
    )]
    StorageLimitExceeded {
        /// The project's size.
        needed: i64,
        /// Bytes left in the quota.
        remaining: i64,
    },
    /// A credit-style refusal (unknown user, idempotency conflict, database).
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

impl From<tokio_postgres::Error> for SaveError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Ledger(e.into())
    }
}

impl From<DbError> for SaveError {
    fn from(e: DbError) -> Self {
        Self::Ledger(e.into())
    }
}

/// Records a project as `queued`, reserves its bytes and writes its job.
pub async fn save(
    client: &mut Client,
    p: &NewProject,
    quota: i64,
    correlation_id: Option<&str>,
) -> Result<Outcome<SaveReceipt>, SaveError> {
    let user = p.user_id.as_str();
    let size = p.content.size();
    let tx = client.transaction().await?;
    let reserve = tx.prepare_cached(RESERVE_STORAGE_SQL).await?;
    let Some(row) = tx.query_opt(&reserve, &[&user, &size, &quota]).await? else {
        tx.rollback().await?;
        if let Some(first) = find_by_code(client, p, quota).await? {
            return first;
        }
        let used = client
            .query_opt(
                "SELECT storage_used_bytes FROM accounts WHERE user_id = $1",
                &[&user],
            )
            .await?;
        return Err(match used {
            None => LedgerError::UserNotFound.into(),
            Some(r) => SaveError::StorageLimitExceeded {
                needed: size,
                remaining: (quota - r.get::<_, i64>(0)).max(0),
            },
        });
    };
    let used: i64 = row.get(0);
    let id = Uuid::now_v7();
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
            ],
        )
        .await?
    else {
        tx.rollback().await?;
        return find_by_code(client, p, quota).await?.unwrap_or_else(|| {
            Err(DbError::Other("project code claimed but not found".into()).into())
        });
    };
    let (data, url) = match &p.content {
        Content::Bytes(b) => (Some(b.as_slice()), None),
        Content::Url(u) => (None, Some(u.as_str())),
    };
    let content = tx.prepare_cached(INSERT_CONTENT_SQL).await?;
    tx.execute(&content, &[&user, &id, &data, &url]).await?;
    let job = SaveProjectJob {
        user_id: user.to_owned(),
        project_id: id,
        app_source: p.app_source.to_string(),
        project_code: code.map(str::to_owned),
    };
    outbox::enqueue_job(&tx, user, SAVE_PROJECT, &job, correlation_id).await?;
    tx.commit().await?;
    metrics::counter!("penora_storage_reserved_bytes_total").increment(size.unsigned_abs());
    Ok(Outcome {
        value: SaveReceipt {
            project_id: id,
            status: "queued".into(),
            size_bytes: size,
            storage_remaining_bytes: quota - used,
            created_at: inserted.get(0),
        },
        replayed: false,
    })
}

/// The earlier save with this project code, or a conflict if it differs.
async fn find_by_code(
    client: &Client,
    p: &NewProject,
    quota: i64,
) -> Result<Option<Result<Outcome<SaveReceipt>, SaveError>>, SaveError> {
    let Some(code) = &p.project_code else {
        return Ok(None);
    };
    let row = client
        .query_opt(
            "SELECT p.id, p.status, p.size_bytes, p.created_at, p.title, a.storage_used_bytes \
             FROM projects p JOIN accounts a USING (user_id) \
             WHERE p.user_id = $1 AND p.app_source = $2 AND p.project_code = $3",
            &[&p.user_id.as_str(), &p.app_source.as_str(), &code.as_str()],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let size: i64 = row.get(2);
    let title: String = row.get(4);
    if size != p.content.size() || title != p.title {
        return Ok(Some(Err(LedgerError::IdempotencyConflict(format!(
            "project_code {:?} was already saved with another title or content",
            code.as_str()
        ))
        .into())));
    }
    Ok(Some(Ok(Outcome {
        value: SaveReceipt {
            project_id: row.get(0),
            status: row.get(1),
            size_bytes: size,
            storage_remaining_bytes: quota - row.get::<_, i64>(5),
            created_at: row.get(3),
        },
        replayed: true,
    })))
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
    /// Bytes it counts (0 once failed).
    pub size_bytes: i64,
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
    #[serde(serialize_with = "crate::timefmt::serde_millis::serialize")]
    pub created_at: OffsetDateTime,
}

/// A page of the user's projects, newest first, after the cursor
/// `(created_at, id)`.
pub async fn list(
    client: &impl GenericClient,
    user_id: &UserId,
    limit: i64,
    after: Option<(OffsetDateTime, Uuid)>,
) -> Result<Vec<ProjectRow>, DbError> {
    let (at, id) = after.unzip();
    let stmt = client
        .prepare_cached(
            "SELECT id, app_source, project_type, title, status, size_bytes, metadata::text, project_code, \
                    failure_reason, created_at \
             FROM projects WHERE user_id = $1 \
               AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3)) \
             ORDER BY created_at DESC, id DESC LIMIT $4",
        )
        .await?;
    let rows = client
        .query(&stmt, &[&user_id.as_str(), &at, &id, &limit])
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| ProjectRow {
            id: r.get(0),
            app_source: r.get(1),
            project_type: r.get(2),
            title: r.get(3),
            status: r.get(4),
            size_bytes: r.get(5),
            metadata: raw_json(r.get(6)),
            project_code: r.get(7),
            failure_reason: r.get(8),
            created_at: r.get(9),
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

/// How many projects the user has, per app.
pub async fn counts(
    client: &impl GenericClient,
    user_id: &UserId,
) -> Result<Vec<(String, i64)>, DbError> {
    let stmt = client
        .prepare_cached(
            "SELECT app_source, count(*) FROM projects WHERE user_id = $1 GROUP BY app_source ORDER BY app_source",
        )
        .await?;
    Ok(client
        .query(&stmt, &[&user_id.as_str()])
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// What `GET /projects/{id}/content` serves.
#[derive(Debug, Clone)]
pub enum StoredContent {
    /// The checked image bytes and their media type.
    Image {
        /// e.g. `image/png`.
        media_type: String,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Where the image lives.
    Url(String),
    /// The project is not `saved` (yet, or ever): its status and reason.
    NotAvailable {
        /// `queued` or `failed`.
        status: String,
        /// Why it failed, if it did.
        reason: Option<String>,
    },
}

/// A project's content; `None` when the user has no such project.
pub async fn content(
    client: &impl GenericClient,
    user_id: &UserId,
    project_id: Uuid,
) -> Result<Option<StoredContent>, DbError> {
    let row = client
        .query_opt(
            "SELECT p.status, p.failure_reason, c.data, c.url, c.media_type \
             FROM projects p LEFT JOIN project_contents c ON c.user_id = p.user_id AND c.project_id = p.id \
             WHERE p.user_id = $1 AND p.id = $2",
            &[&user_id.as_str(), &project_id],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let status: String = row.get(0);
    if status != "saved" {
        return Ok(Some(StoredContent::NotAvailable {
            status,
            reason: row.get(1),
        }));
    }
    let data: Option<Vec<u8>> = row.get(2);
    let url: Option<String> = row.get(3);
    let media_type: Option<String> = row.get(4);
    Ok(Some(match (data, url) {
        (Some(data), _) => StoredContent::Image {
            media_type: media_type.unwrap_or_else(|| "application/octet-stream".into()),
            data,
        },
        (None, Some(url)) => StoredContent::Url(url),
        (None, None) => StoredContent::NotAvailable {
            status: "failed".into(),
            reason: Some("content missing".into()),
        },
    }))
}

/// How finishing a save ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finished {
    /// Checked and stored; `media_type` is `None` for a URL reference.
    Saved {
        /// The app that saved it (the reservation's app).
        app_source: String,
        /// The reservation to settle, if the save named one.
        project_code: Option<String>,
    },
    /// The content is not an image: the project failed and released its bytes.
    Failed(String),
    /// Done before (a redelivered job): nothing changed.
    AlreadyDone {
        /// `saved` or `failed`.
        status: String,
        /// The app that saved it.
        app_source: String,
        /// The reservation it names.
        project_code: Option<String>,
    },
    /// No such project for this user.
    NotFound,
}

/// The worker's half of a save: checks the stored bytes really are an image
/// (by magic bytes) and marks the project `saved` with its media type and
/// dimensions, or `failed` with the reason, releasing its storage bytes.
/// Idempotent: a project that is no longer `queued` is left as it is.
pub async fn finish_save(
    client: &mut Client,
    user_id: &str,
    project_id: Uuid,
) -> Result<Finished, DbError> {
    let tx = client.transaction().await?;
    // Account row first, as every other writer does.
    tx.execute(
        "SELECT 1 FROM accounts WHERE user_id = $1 FOR UPDATE",
        &[&user_id],
    )
    .await?;
    let row = tx
        .query_opt(
            "SELECT p.status, p.size_bytes, p.app_source, p.project_code, c.data, c.url \
             FROM projects p LEFT JOIN project_contents c ON c.user_id = p.user_id AND c.project_id = p.id \
             WHERE p.user_id = $1 AND p.id = $2 FOR UPDATE OF p",
            &[&user_id, &project_id],
        )
        .await?;
    let Some(row) = row else {
        return Ok(Finished::NotFound);
    };
    let status: String = row.get(0);
    let size: i64 = row.get(1);
    let app_source: String = row.get(2);
    let project_code: Option<String> = row.get(3);
    if status != "queued" {
        return Ok(Finished::AlreadyDone {
            status,
            app_source,
            project_code,
        });
    }
    let data: Option<Vec<u8>> = row.get(4);
    let verdict = match &data {
        Some(bytes) => crate::image::sniff(bytes).map(Some),
        None if row.get::<_, Option<String>>(5).is_some() => Ok(None),
        None => Err("the project has no content".to_owned()),
    };
    let finished = match verdict {
        Ok(info) => {
            if let Some(info) = info {
                tx.execute(
                    "UPDATE project_contents SET media_type = $3, width = $4, height = $5 \
                     WHERE user_id = $1 AND project_id = $2",
                    &[
                        &user_id,
                        &project_id,
                        &info.media_type,
                        &i32::try_from(info.width).unwrap_or(i32::MAX),
                        &i32::try_from(info.height).unwrap_or(i32::MAX),
                    ],
                )
                .await?;
            }
            tx.execute(
                "UPDATE projects SET status = 'saved', updated_at = now() WHERE user_id = $1 AND id = $2",
                &[&user_id, &project_id],
            )
            .await?;
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
