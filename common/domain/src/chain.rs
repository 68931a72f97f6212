//! The audit chain's link format (contract §6 as amended): what a ledger
//! entry's link hashes. Written by the ledger in the movement's
//! transaction, checked by the worker's `ledger-audit` job and by `penora-ops
//! audit verify` (`penora_ledger::chain`).

use serde::Serialize;
use sha2::{Digest, Sha256};

/// The hash before a chain's first link.
pub const GENESIS: [u8; 32] = [0; 32];

/// A ledger entry as its chain link hashes it (field order is the format):
/// hash = SHA-256(prev_hash ‖ this as JSON).
#[derive(Debug, Serialize)]
pub struct Content<'a> {
    /// The entry's id.
    pub entry_id: i64,
    /// Its place in its user's chain.
    pub seq: i64,
    /// Whose.
    pub user_id: &'a str,
    /// Its kind.
    pub kind: &'a str,
    /// Signed amount.
    pub amount: i64,
    /// The balance after it.
    pub balance_after: i64,
    /// Its app.
    pub app_name: &'a str,
    /// Its description.
    pub description: Option<&'a str>,
    /// Its reservation's code.
    pub project_code: Option<&'a str>,
    /// Its reference.
    pub reference: Option<&'a str>,
    /// When it was written, RFC 3339 to the millisecond (`timefmt::rfc3339_millis`).
    pub created_at: String,
    /// The id of the API key that acted (the console's and the admin
    /// routes' entries, V20); left out of the JSON when `None`, so every
    /// link written before it hashes as it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acted_by: Option<&'a str>,
}

impl Content<'_> {
    /// The link's hash after `prev`. A content that cannot be serialised is
    /// an error, never the hash of an empty string (strings and integers
    /// only: it cannot fail).
    pub fn hash_after(&self, prev: &[u8]) -> Result<[u8; 32], serde_json::Error> {
        Ok(link(prev, &serde_json::to_string(self)?))
    }
}

/// SHA-256(prev ‖ content).
pub fn link(prev: &[u8], content: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(content.as_bytes());
    h.finalize().into()
}
