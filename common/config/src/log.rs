//! `Log`: what a service logs and how it writes its log lines.

use crate::{ConfigError, read::Vars};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line (production).
    Json,
    /// Human-readable lines (development).
    Pretty,
}

/// The logging of a service.
#[derive(Debug, Clone)]
pub struct Log {
    /// `LOG_FORMAT`: `json` or `pretty`.
    pub format: LogFormat,
    /// `RUST_LOG`: which events are logged, in `tracing`'s filter syntax
    /// (`info`, `penora_api=debug,warn`); unset, or one that does not
    /// parse: `info` (the subscriber parses it, and never refuses to start
    /// over it).
    pub filter: Option<String>,
}

impl Log {
    /// Reads this section through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        Self::read(&Vars::new(&lookup))
    }

    pub(crate) fn read(vars: &Vars<'_>) -> Result<Self, ConfigError> {
        let format = match vars.get("LOG_FORMAT").as_deref() {
            None | Some("json") => LogFormat::Json,
            Some("pretty") => LogFormat::Pretty,
            Some(other) => {
                return Err(ConfigError {
                    variable: "LOG_FORMAT",
                    reason: format!("expected `json` or `pretty`, got `{other}`"),
                });
            }
        };
        Ok(Self {
            format,
            filter: vars.get("RUST_LOG"),
        })
    }
}
