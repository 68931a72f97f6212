//! The results of `penora-ops reconcile` and `penora-ops audit verify`,
//! kept so that the support console shows the last of each (`ops_runs`).

use deadpool_postgres::GenericClient;
use time::OffsetDateTime;

use crate::DbError;

/// `penora-ops reconcile`.
pub const RECONCILE: &str = "reconcile";
/// `penora-ops audit verify`.
pub const AUDIT_VERIFY: &str = "audit_verify";

/// One run.
#[derive(Debug, Clone)]
pub struct OpsRun {
    /// [`RECONCILE`] or [`AUDIT_VERIFY`].
    pub kind: String,
    /// No violation, no finding.
    pub ok: bool,
    /// The line the command printed last.
    pub summary: String,
    /// When it began.
    pub started_at: OffsetDateTime,
    /// When it ended.
    pub finished_at: OffsetDateTime,
}

/// Records a run.
pub async fn record(
    client: &impl GenericClient,
    kind: &str,
    ok: bool,
    summary: &str,
    report: &serde_json::Value,
    started_at: OffsetDateTime,
) -> Result<(), DbError> {
    client
        .execute(
            "INSERT INTO ops_runs (kind, ok, summary, report, started_at) VALUES ($1, $2, $3, $4, $5)",
            &[&kind, &ok, &summary, report, &started_at],
        )
        .await?;
    Ok(())
}

/// The last run of `kind`, if any.
pub async fn last(client: &impl GenericClient, kind: &str) -> Result<Option<OpsRun>, DbError> {
    Ok(client
        .query_opt(
            "SELECT kind, ok, summary, started_at, finished_at FROM ops_runs \
             WHERE kind = $1 ORDER BY id DESC LIMIT 1",
            &[&kind],
        )
        .await?
        .map(|r| OpsRun {
            kind: r.get(0),
            ok: r.get(1),
            summary: r.get(2),
            started_at: r.get(3),
            finished_at: r.get(4),
        }))
}
