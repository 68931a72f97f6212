//! Reading variables: one lookup (the environment, or a map in tests) where
//! a blank value counts as unset, and the parsers every section shares, each
//! error naming its variable.

use std::fmt;

use crate::ConfigError;

/// The variables a loader reads through.
pub(crate) struct Vars<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl<'a> Vars<'a> {
    /// Reads through `lookup`.
    pub(crate) fn new(lookup: &'a dyn Fn(&str) -> Option<String>) -> Self {
        Self { lookup }
    }

    /// The value of `name`; `None` when unset or blank.
    pub(crate) fn get(&self, name: &str) -> Option<String> {
        (self.lookup)(name).filter(|v| !v.trim().is_empty())
    }

    /// `variable` parsed, or `default` parsed when unset.
    pub(crate) fn parse<T: std::str::FromStr>(
        &self,
        variable: &'static str,
        default: &str,
    ) -> Result<T, ConfigError>
    where
        T::Err: fmt::Display,
    {
        let raw = self.get(variable).unwrap_or_else(|| default.to_owned());
        raw.trim().parse().map_err(|e: T::Err| ConfigError {
            variable,
            reason: format!("`{raw}`: {e}"),
        })
    }

    /// `variable` parsed and greater than zero, or `default` when unset.
    pub(crate) fn positive<T>(&self, variable: &'static str, default: T) -> Result<T, ConfigError>
    where
        T: std::str::FromStr + PartialOrd + Default + fmt::Display,
        T::Err: fmt::Display,
    {
        let value: T = self.parse(variable, &default.to_string())?;
        if value <= T::default() {
            return Err(ConfigError {
                variable,
                reason: format!("must be greater than zero, got {value}"),
            });
        }
        Ok(value)
    }

    /// A `true`/`false` setting (`1`/`0` too).
    pub(crate) fn flag(&self, variable: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.get(variable).as_deref().map(str::trim) {
            None => Ok(default),
            Some("true") | Some("1") => Ok(true),
            Some("false") | Some("0") => Ok(false),
            Some(other) => Err(ConfigError {
                variable,
                reason: format!("expected `true` or `false`, got `{other}`"),
            }),
        }
    }
}
