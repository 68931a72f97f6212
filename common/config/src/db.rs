//! `Db`: the PostgreSQL connection of a process.

use std::time::Duration;

use crate::{ConfigError, Secret, read::Vars};

/// Where and how a process connects to PostgreSQL.
#[derive(Debug, Clone)]
pub struct Db {
    /// `DATABASE_URL`: PostgreSQL connection string.
    pub url: Secret,
    /// `DB_POOL_SIZE`: connections in the pool.
    pub pool_size: usize,
    /// `DB_LOCK_TIMEOUT_MS`: longest wait for a row lock before a statement
    /// fails (503 in the API, a retry in the worker).
    pub lock_timeout: Duration,
    /// `DB_MIGRATE_ON_START`: whether the services apply pending migrations
    /// at start (`false` where they connect as an application role that may
    /// not change the schema; `penora-ops migrate` runs as the owner).
    pub migrate_on_start: bool,
}

impl Db {
    /// Reads this section through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        Self::read(&Vars::new(&lookup))
    }

    pub(crate) fn read(vars: &Vars<'_>) -> Result<Self, ConfigError> {
        let url = vars
            .get("DATABASE_URL")
            .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/penora".into());
        if url.parse::<tokio_postgres::Config>().is_err() {
            return Err(ConfigError {
                variable: "DATABASE_URL",
                reason: "not a PostgreSQL connection string".into(),
            });
        }
        Ok(Self {
            url: Secret::new(url),
            pool_size: vars.positive("DB_POOL_SIZE", 16)?,
            lock_timeout: Duration::from_millis(vars.positive("DB_LOCK_TIMEOUT_MS", 5000)?),
            migrate_on_start: vars.flag("DB_MIGRATE_ON_START", true)?,
        })
    }
}
