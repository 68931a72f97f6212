//! `Workspace`: the limits of the shared workspace (the rules of
//! `penora-workspace`). The API enforces them; `penora-ops reconcile`
//! checks the stored usage against the same quota.

use crate::{ConfigError, read::Vars};

/// Per-user limits of the workspace.
#[derive(Debug, Clone)]
pub struct Workspace {
    /// `STORAGE_QUOTA_BYTES`: per-user storage quota.
    pub storage_quota_bytes: i64,
    /// `MAX_PROJECTS_PER_USER`: most projects (not deleted) a user may have.
    pub max_projects_per_user: i64,
}

impl Workspace {
    /// Reads this section through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        Self::read(&Vars::new(&lookup))
    }

    pub(crate) fn read(vars: &Vars<'_>) -> Result<Self, ConfigError> {
        Ok(Self {
            storage_quota_bytes: vars.positive("STORAGE_QUOTA_BYTES", 1_048_576)?,
            max_projects_per_user: vars.positive("MAX_PROJECTS_PER_USER", 10_000)?,
        })
    }
}
