//! The webhook tables (migration V15): endpoints, deliveries, attempts.
//!
//! Rules: a secret is read only sealed, by the worker that signs with it
//! ([`Target`]); listings never select it. A delivery row and its delivery
//! job are written in one transaction (the fan-out's, or a test's), and the
//! row's key (event, endpoint) makes a second fan-out of one event a no-op.
//! Rows are read by name with `try_get`.

use deadpool_postgres::GenericClient;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio_postgres::Row;

use crate::{DbError, outbox};

/// The wildcard subscription: every event type.
pub const ALL_EVENTS: &str = "*";

/// An endpoint as listed (never its secret).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Endpoint {
    /// `we_…`.
    pub id: String,
    /// Where events are `POST`ed.
    pub url: String,
    /// Event types, or `["*"]`.
    pub events: Vec<String>,
    /// The app whose users' events only it gets; `None`: every app's.
    pub app: Option<String>,
    /// Free text.
    pub description: Option<String>,
    /// When registered.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When deleted, if it was.
    #[serde(with = "time::serde::rfc3339::option")]
    pub deleted_at: Option<OffsetDateTime>,
}

impl Endpoint {
    fn of(r: &Row) -> Result<Self, DbError> {
        Ok(Self {
            id: r.try_get("id")?,
            url: r.try_get("url")?,
            events: r.try_get("events")?,
            app: r.try_get("app")?,
            description: r.try_get("description")?,
            created_at: r.try_get("created_at")?,
            deleted_at: r.try_get("deleted_at")?,
        })
    }
}

const ENDPOINT_COLUMNS: &str = "id, url, events, app, description, created_at, deleted_at";

/// A new endpoint, its secret already sealed.
#[derive(Debug, Clone)]
pub struct NewEndpoint<'a> {
    /// `we_…`.
    pub id: &'a str,
    /// Its checked URL.
    pub url: &'a str,
    /// Its checked event types, or `["*"]`.
    pub events: &'a [String],
    /// Its app, if bound to one.
    pub app: Option<&'a str>,
    /// Its description.
    pub description: Option<&'a str>,
    /// The sealed secret's nonce.
    pub secret_nonce: &'a [u8],
    /// The sealed secret.
    pub secret_sealed: &'a [u8],
    /// What makes the registration idempotent, when it came with an
    /// `Idempotency-Key` (V19).
    pub registration: Option<Registration<'a>>,
}

/// A registration's idempotency (V19): the digest of the caller's key id
/// and `Idempotency-Key`, and the digest of its parameters.
#[derive(Debug, Clone, Copy)]
pub struct Registration<'a> {
    /// SHA-256 of the caller and the header (32 bytes).
    pub key: &'a [u8],
    /// SHA-256 of the parameters (32 bytes).
    pub request: &'a [u8],
}

/// Registers an endpoint; `None` when its registration key is already taken
/// (a concurrent or earlier registration with it: [`registered`] finds it).
pub async fn insert_endpoint(
    client: &impl GenericClient,
    new: &NewEndpoint<'_>,
) -> Result<Option<Endpoint>, DbError> {
    let row = client
        .query_opt(
            &format!(
                "INSERT INTO webhook_endpoints \
                   (id, url, events, app, description, secret_nonce, secret_sealed, idempotency_key, request_digest) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING \
                 RETURNING {ENDPOINT_COLUMNS}"
            ),
            &[
                &new.id,
                &new.url,
                &new.events,
                &new.app,
                &new.description,
                &new.secret_nonce,
                &new.secret_sealed,
                &new.registration.map(|r| r.key),
                &new.registration.map(|r| r.request),
            ],
        )
        .await?;
    row.as_ref().map(Endpoint::of).transpose()
}

/// An endpoint found by its registration key, with what a replay of its
/// registration needs.
#[derive(Debug, Clone)]
pub struct Registered {
    /// The endpoint (deleted or not).
    pub endpoint: Endpoint,
    /// The digest of the parameters it was registered with.
    pub request_digest: Vec<u8>,
    /// Its secret, sealed: nonce and ciphertext.
    pub secret_nonce: Vec<u8>,
    /// See `secret_nonce`.
    pub secret_sealed: Vec<u8>,
}

/// The endpoint registered with registration key `key`, if any.
pub async fn registered(
    client: &impl GenericClient,
    key: &[u8],
) -> Result<Option<Registered>, DbError> {
    let Some(r) = client
        .query_opt(
            &format!(
                "SELECT {ENDPOINT_COLUMNS}, request_digest, secret_nonce, secret_sealed \
                 FROM webhook_endpoints WHERE idempotency_key = $1"
            ),
            &[&key],
        )
        .await?
    else {
        return Ok(None);
    };
    Ok(Some(Registered {
        endpoint: Endpoint::of(&r)?,
        request_digest: r.try_get("request_digest")?,
        secret_nonce: r.try_get("secret_nonce")?,
        secret_sealed: r.try_get("secret_sealed")?,
    }))
}

/// The endpoints not deleted (with `deleted` also the deleted ones), oldest
/// first.
pub async fn list_endpoints(
    client: &impl GenericClient,
    deleted: bool,
) -> Result<Vec<Endpoint>, DbError> {
    let rows = client
        .query(
            &format!(
                "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints \
                 WHERE deleted_at IS NULL OR $1 ORDER BY created_at, id"
            ),
            &[&deleted],
        )
        .await?;
    rows.iter().map(Endpoint::of).collect()
}

/// One endpoint not deleted.
pub async fn endpoint(client: &impl GenericClient, id: &str) -> Result<Option<Endpoint>, DbError> {
    let row = client
        .query_opt(
            &format!(
                "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE id = $1 AND deleted_at IS NULL"
            ),
            &[&id],
        )
        .await?;
    row.as_ref().map(Endpoint::of).transpose()
}

/// Deletes an endpoint (it gets nothing more; its history stays). Whether
/// there was one not deleted.
pub async fn delete_endpoint(client: &impl GenericClient, id: &str) -> Result<bool, DbError> {
    let n = client
        .execute(
            "UPDATE webhook_endpoints SET deleted_at = now() WHERE id = $1 AND deleted_at IS NULL",
            &[&id],
        )
        .await?;
    Ok(n == 1)
}

/// What the worker needs to call an endpoint: its URL and sealed secret.
#[derive(Debug, Clone)]
pub struct Target {
    /// Where.
    pub url: String,
    /// The sealed secret's nonce.
    pub secret_nonce: Vec<u8>,
    /// The sealed secret.
    pub secret_sealed: Vec<u8>,
    /// Whether it was deleted.
    pub deleted: bool,
}

/// The target of endpoint `id` (deleted or not); `None` when unknown.
pub async fn target(client: &impl GenericClient, id: &str) -> Result<Option<Target>, DbError> {
    let Some(r) = client
        .query_opt(
            "SELECT url, secret_nonce, secret_sealed, deleted_at IS NOT NULL AS deleted \
             FROM webhook_endpoints WHERE id = $1",
            &[&id],
        )
        .await?
    else {
        return Ok(None);
    };
    Ok(Some(Target {
        url: r.try_get("url")?,
        secret_nonce: r.try_get("secret_nonce")?,
        secret_sealed: r.try_get("secret_sealed")?,
        deleted: r.try_get("deleted")?,
    }))
}

/// The endpoints that get an event of `event_type` about a user of `app`
/// (`None`: an event of no app): not deleted, subscribed to the type or to
/// `*`, and bound to no app or to that one.
pub async fn subscribed(
    client: &impl GenericClient,
    event_type: &str,
    app: Option<&str>,
) -> Result<Vec<String>, DbError> {
    let rows = client
        .query(
            "SELECT id FROM webhook_endpoints \
             WHERE deleted_at IS NULL AND ($1 = ANY(events) OR '*' = ANY(events)) \
               AND (app IS NULL OR app = $2) ORDER BY id",
            &[&event_type, &app],
        )
        .await?;
    rows.iter()
        .map(|r| r.try_get("id").map_err(DbError::from))
        .collect()
}

/// One delivery job: the event's exact bytes, for one endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryJob {
    /// `evt_…`, the `webhook-id`.
    pub event_id: String,
    /// `we_…`.
    pub endpoint_id: String,
    /// The event's user (`data.user_id`).
    pub user_id: String,
    /// The event's type.
    pub event_type: String,
    /// The envelope exactly as published: the body signed and sent.
    pub body: String,
}

/// Writes a delivery row for each of `endpoints` that has none for the
/// event yet, and a delivery job for each row written, in the caller's
/// transaction. Returns the endpoints that got one.
pub async fn enqueue_deliveries(
    tx: &impl GenericClient,
    event: &DeliveryJob,
    endpoints: &[String],
    correlation_id: Option<&str>,
) -> Result<Vec<String>, DbError> {
    if endpoints.is_empty() {
        return Ok(Vec::new());
    }
    let rows = tx
        .query(
            "INSERT INTO webhook_deliveries (event_id, endpoint_id, user_id, event_type) \
             SELECT $1, e, $3, $4 FROM unnest($2::text[]) AS e \
             ON CONFLICT DO NOTHING RETURNING endpoint_id",
            &[
                &event.event_id,
                &endpoints,
                &event.user_id,
                &event.event_type,
            ],
        )
        .await?;
    let mut fresh = Vec::with_capacity(rows.len());
    for r in &rows {
        fresh.push(r.try_get::<_, String>("endpoint_id")?);
    }
    fresh.sort();
    let mut jobs = Vec::with_capacity(fresh.len());
    for endpoint_id in &fresh {
        let job = DeliveryJob {
            endpoint_id: endpoint_id.clone(),
            ..event.clone()
        };
        jobs.push(outbox::Job {
            user_id: &event.user_id,
            routing_key: penora_domain::events::WEBHOOKS,
            payload: serde_json::to_value(&job)
                .map_err(|e| DbError::Other(format!("delivery job encoding: {e}")))?,
            correlation_id,
        });
    }
    outbox::enqueue_jobs(tx, &jobs).await?;
    Ok(fresh)
}

/// Where a delivery stands.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryState {
    /// `pending`, `failing`, `delivered`, `parked` or `dropped`.
    pub state: String,
    /// Attempts made.
    pub attempts: i32,
    /// When the first attempt was made (the retry window runs from it).
    pub first_attempt_at: Option<OffsetDateTime>,
}

/// The state of `job`'s delivery. (Every statement on a delivery names its
/// user too: on Citus that routes it to one shard.)
pub async fn delivery_state(
    client: &impl GenericClient,
    job: &DeliveryJob,
) -> Result<Option<DeliveryState>, DbError> {
    let Some(r) = client
        .query_opt(
            "SELECT state, attempts, first_attempt_at FROM webhook_deliveries \
             WHERE event_id = $1 AND endpoint_id = $2 AND user_id = $3",
            &[&job.event_id, &job.endpoint_id, &job.user_id],
        )
        .await?
    else {
        return Ok(None);
    };
    Ok(Some(DeliveryState {
        state: r.try_get("state")?,
        attempts: r.try_get("attempts")?,
        first_attempt_at: r.try_get("first_attempt_at")?,
    }))
}

/// Sets a delivery's state (`parked`, `dropped`), or, with `restart`, makes
/// a parked one pending again with a fresh retry window (a replay).
pub async fn set_state(
    client: &impl GenericClient,
    job: &DeliveryJob,
    state: &str,
    restart: bool,
) -> Result<(), DbError> {
    client
        .execute(
            "UPDATE webhook_deliveries SET state = $3, \
               first_attempt_at = CASE WHEN $4 THEN NULL ELSE first_attempt_at END \
             WHERE event_id = $1 AND endpoint_id = $2 AND user_id = $5",
            &[
                &job.event_id,
                &job.endpoint_id,
                &state,
                &restart,
                &job.user_id,
            ],
        )
        .await?;
    Ok(())
}

/// One attempt's result.
#[derive(Debug, Clone)]
pub struct AttemptRecord<'a> {
    /// The delivery.
    pub job: &'a DeliveryJob,
    /// The HTTP status, when one came.
    pub status_code: Option<u16>,
    /// How long it took.
    pub latency_ms: i32,
    /// Why it failed, when it did.
    pub error: Option<&'a str>,
    /// Whether it was delivered.
    pub delivered: bool,
}

/// Records an attempt and updates its delivery, in one transaction. Returns
/// the delivery's first attempt time and attempt count after it.
pub async fn record_attempt(
    client: &mut deadpool_postgres::Client,
    a: &AttemptRecord<'_>,
) -> Result<(OffsetDateTime, i32), DbError> {
    let tx = client.transaction().await?;
    let row = tx
        .query_one(
            "UPDATE webhook_deliveries SET attempts = attempts + 1, \
               first_attempt_at = coalesce(first_attempt_at, now()), last_attempt_at = now(), \
               state = CASE WHEN $3 THEN 'delivered' ELSE 'failing' END, \
               delivered_at = CASE WHEN $3 THEN now() ELSE delivered_at END \
             WHERE event_id = $1 AND endpoint_id = $2 AND user_id = $4 \
             RETURNING first_attempt_at, attempts",
            &[
                &a.job.event_id,
                &a.job.endpoint_id,
                &a.delivered,
                &a.job.user_id,
            ],
        )
        .await?;
    let first: OffsetDateTime = row.try_get("first_attempt_at")?;
    let attempts: i32 = row.try_get("attempts")?;
    let status = a.status_code.map(i32::from);
    let error: Option<String> = a.error.map(|e| e.chars().take(1000).collect());
    tx.execute(
        "INSERT INTO webhook_attempts (event_id, endpoint_id, user_id, attempt, status_code, latency_ms, error) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            &a.job.event_id,
            &a.job.endpoint_id,
            &a.job.user_id,
            &attempts,
            &status,
            &a.latency_ms,
            &error,
        ],
    )
    .await?;
    tx.commit().await?;
    Ok((first, attempts))
}

/// A delivery with its attempts, newest first (`penora-ops webhooks
/// deliveries`).
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryView {
    /// `evt_…`.
    pub event_id: String,
    /// Its type.
    pub event_type: String,
    /// Where it stands.
    pub state: String,
    /// Attempts made.
    pub attempts: i32,
    /// When it was fanned out.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When delivered.
    #[serde(with = "time::serde::rfc3339::option")]
    pub delivered_at: Option<OffsetDateTime>,
    /// Each attempt, oldest first.
    pub tries: Vec<AttemptView>,
}

/// One attempt as shown.
#[derive(Debug, Clone, Serialize)]
pub struct AttemptView {
    /// 1, 2, …
    pub attempt: i32,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The HTTP status, when one came.
    pub status_code: Option<i32>,
    /// How long it took.
    pub latency_ms: i32,
    /// Why it failed.
    pub error: Option<String>,
}

/// The `limit` latest deliveries to `endpoint_id`, with their attempts.
pub async fn deliveries(
    client: &impl GenericClient,
    endpoint_id: &str,
    limit: i64,
) -> Result<Vec<DeliveryView>, DbError> {
    let rows = client
        .query(
            "SELECT event_id, event_type, state, attempts, created_at, delivered_at \
             FROM webhook_deliveries WHERE endpoint_id = $1 ORDER BY created_at DESC, event_id DESC LIMIT $2",
            &[&endpoint_id, &limit],
        )
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        out.push(DeliveryView {
            event_id: r.try_get("event_id")?,
            event_type: r.try_get("event_type")?,
            state: r.try_get("state")?,
            attempts: r.try_get("attempts")?,
            created_at: r.try_get("created_at")?,
            delivered_at: r.try_get("delivered_at")?,
            tries: Vec::new(),
        });
    }
    let ids: Vec<&str> = out.iter().map(|d| d.event_id.as_str()).collect();
    let tries = client
        .query(
            "SELECT event_id, attempt, at, status_code, latency_ms, error FROM webhook_attempts \
             WHERE endpoint_id = $1 AND event_id = ANY($2) ORDER BY id",
            &[&endpoint_id, &ids],
        )
        .await?;
    for t in &tries {
        let event_id: String = t.try_get("event_id")?;
        if let Some(d) = out.iter_mut().find(|d| d.event_id == event_id) {
            d.tries.push(AttemptView {
                attempt: t.try_get("attempt")?,
                at: t.try_get("at")?,
                status_code: t.try_get("status_code")?,
                latency_ms: t.try_get("latency_ms")?,
                error: t.try_get("error")?,
            });
        }
    }
    Ok(out)
}

/// Endpoints (not deleted) with a delivery failing since more than
/// `older_than_secs` ago: the alert "an endpoint failing for over an hour".
pub async fn endpoints_failing_since(
    client: &impl GenericClient,
    older_than_secs: f64,
) -> Result<i64, DbError> {
    let row = client
        .query_one(
            "SELECT count(DISTINCT d.endpoint_id) AS n FROM webhook_deliveries d \
             JOIN webhook_endpoints e ON e.id = d.endpoint_id AND e.deleted_at IS NULL \
             WHERE d.state = 'failing' \
               AND d.first_attempt_at < now() - make_interval(secs => $1)",
            &[&older_than_secs],
        )
        .await?;
    Ok(row.try_get("n")?)
}
