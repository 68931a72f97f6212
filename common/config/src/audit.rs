//! `Audit`: the key of the audit records' MACs. A section of its own because
//! two binaries use it and nothing else of theirs in common: the worker
//! writes the MACs, `penora-ops audit verify` checks them (the API writes no
//! audit record and never reads it).

use crate::{ConfigError, Secret, read::Vars};

/// Shortest `AUDIT_HMAC_KEY` accepted.
pub const MIN_AUDIT_KEY_LEN: usize = 32;

/// The audit chain's key.
#[derive(Debug, Clone)]
pub struct Audit {
    /// `AUDIT_HMAC_KEY`: a key the database never holds; when set, each
    /// audit record carries an HMAC of its hash under it, so a chain
    /// rewritten inside the database is found by `penora-ops audit verify`.
    pub hmac_key: Option<Secret>,
}

impl Audit {
    /// Reads this section through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        Self::read(&Vars::new(&lookup))
    }

    pub(crate) fn read(vars: &Vars<'_>) -> Result<Self, ConfigError> {
        let Some(key) = vars.get("AUDIT_HMAC_KEY") else {
            return Ok(Self { hmac_key: None });
        };
        if key.chars().count() < MIN_AUDIT_KEY_LEN {
            return Err(ConfigError {
                variable: "AUDIT_HMAC_KEY",
                reason: format!(
                    "use at least {MIN_AUDIT_KEY_LEN} random characters (e.g. `openssl rand -hex 32`)"
                ),
            });
        }
        Ok(Self {
            hmac_key: Some(Secret::new(key)),
        })
    }
}
