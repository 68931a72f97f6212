//! The audit chain, written in the movement's own transaction (contract §6
//! as amended; migration V18).
//!
//! Rules:
//! * every ledger entry a movement writes carries its place in its user's
//!   chain (`chain_seq`, from 1 with no gap), its predecessor's hash
//!   (`prev_hash`) and its own (`hash` = SHA-256(prev_hash ‖ content)); the
//!   content is the entry as canonical JSON ([`Content`]), its id, seq and
//!   time included, so an edited, deleted, inserted or reordered entry
//!   breaks a link;
//! * the chain's head (seq and hash of the last entry) is on the user's
//!   account row, which the movement has locked and updates anyway (its
//!   balance), in the same statement: the chain needs no lock or row of its
//!   own, and one user's entries are chained one at a time in the order the
//!   movements commit; a group-committed batch chains each user's entries in
//!   the plan's order, the order one-by-one processing would give;
//! * the ids and the time are known before the rows are written: the ids
//!   come from the ledger's identity sequence after the accounts are locked
//!   (so they grow along every chain), the time is the transaction's
//!   `now()`, which `created_at` would have been;
//! * the first entry of a chain links to the old chain's last record
//!   (`audit_records`, written before V18) or to 32 zero bytes.
//!
//! The `ledger-audit` job of the commit (one per transaction) re-reads the
//! entries from the user's last checkpoint, checks every link again, and
//! moves the checkpoint on (`crate::audit::check_commit`).

use time::OffsetDateTime;

use penora_domain::timefmt::rfc3339_millis;
use penora_store::DbError;

pub use penora_domain::chain::{Content, GENESIS, link};

/// The content of a row holding the ledger's columns (by name) and
/// `chain_seq`.
pub fn content_of_row(row: &tokio_postgres::Row) -> Result<Content<'_>, DbError> {
    let at: OffsetDateTime = row.try_get("created_at")?;
    Ok(Content {
        entry_id: row.try_get("id")?,
        seq: row.try_get("chain_seq")?,
        user_id: row.try_get("user_id")?,
        kind: row.try_get("kind")?,
        amount: row.try_get("amount")?,
        balance_after: row.try_get("balance_after")?,
        app_name: row.try_get("app_name")?,
        description: row.try_get("description")?,
        project_code: row.try_get("project_code")?,
        reference: row.try_get("reference")?,
        created_at: rfc3339_millis(at),
        acted_by: row.try_get("acted_by")?,
    })
}

/// The link's hash of `content` after `prev`.
pub fn hash_of(content: &Content<'_>, prev: &[u8]) -> Result<[u8; 32], DbError> {
    content.hash_after(prev).map_err(|e| {
        DbError::Other(format!(
            "the ledger entry cannot be serialised for its audit chain: {e}"
        ))
    })
}

/// `content` as canonical JSON (the old chain's records, `crate::audit`).
/// A content that cannot be serialised is an error, never an empty string:
/// a record hashed over nothing would verify as if it held its entry.
pub fn canonical(content: &impl serde::Serialize) -> Result<String, DbError> {
    serde_json::to_string(content).map_err(|e| {
        DbError::Other(format!(
            "the ledger entry cannot be serialised for its audit record: {e}"
        ))
    })
}

/// A chain's head: the seq and hash of its last link (`hash` `None`: no
/// link yet, [`GENESIS`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Head {
    /// Links in the new chain so far.
    pub seq: i64,
    /// The last link's hash.
    pub hash: Option<Vec<u8>>,
}

impl Head {
    /// The hash the next link chains to.
    pub fn prev(&self) -> &[u8] {
        self.hash.as_deref().unwrap_or(&GENESIS)
    }
}

/// One entry's link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Its place in the chain.
    pub seq: i64,
    /// Its predecessor's hash.
    pub prev: Vec<u8>,
    /// Its hash.
    pub hash: Vec<u8>,
}
