//! Domain types that make invalid values unrepresentable.
//!
//! Every value that crosses the service boundary (a user id, an amount of
//! credits, an app name, a project code, a bounded text) is parsed into one of
//! these types first; the error says which field is wrong and why, and the rest
//! of the code never sees an unchecked value.

#[cfg(feature = "sql")]
pub mod chain;
pub mod codec;
pub mod events;
pub mod labels;
pub mod messages;
pub mod period;
pub mod pricing;
mod states;
pub mod timefmt;

pub use states::{EntryKind, LotCategory, LotStatus, ProjectStatus, ReservationState, SettledBy};

mod schema;

use std::fmt;

use serde::Serialize;

pub use schema::{
    APP_NAME_PATTERN, Description, GrantReason, IDENTIFIER_PATTERN, NON_BLANK_TEXT_PATTERN,
    ProjectType, Reference, TEXT_PATTERN, Title,
};

/// Why an input value was refused; `field` names the offending input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ValidationError {
    /// The request field (or query parameter) that is wrong.
    pub field: &'static str,
    /// What is wrong with it, for people.
    pub reason: String,
}

impl ValidationError {
    /// A validation error for `field`.
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

/// Longest accepted user id.
pub const USER_ID_MAX_LEN: usize = 128;

/// A user id: 1–128 characters of `[A-Za-z0-9_.:@-]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct UserId(String);

impl std::borrow::Borrow<str> for UserId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl UserId {
    /// Parses a user id; the empty string is refused (callers that must map it
    /// to `user_id_required` check for emptiness first).
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        if raw.is_empty() {
            return Err(ValidationError::new("user_id", "must not be empty"));
        }
        if raw.chars().count() > USER_ID_MAX_LEN {
            return Err(ValidationError::new(
                "user_id",
                format!("must be at most {USER_ID_MAX_LEN} characters"),
            ));
        }
        if !raw.chars().all(is_identifier_char) {
            return Err(ValidationError::new(
                "user_id",
                "may only contain letters, digits and _ . : @ -",
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn is_identifier_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '@' | '-')
}

/// A whole number given as a JSON value (`5`, or `5.0`: JSON Schema's
/// `integer` and JavaScript agree); `range` says what the field allows, for
/// the messages. Values beyond `i64` saturate, for the caller's range check
/// to refuse.
pub fn whole_number(
    field: &'static str,
    value: &serde_json::Value,
    range: &dyn Fn() -> String,
) -> Result<i64, ValidationError> {
    match value {
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Ok(i)
            } else if n.as_u64().is_some() {
                Err(ValidationError::new(
                    field,
                    format!("is too large; {}", range()),
                ))
            } else if let Some(f) = n.as_f64().filter(|f| f.fract() == 0.0) {
                Ok(f as i64)
            } else {
                Err(ValidationError::new(
                    field,
                    format!("is not a whole number; {}", range()),
                ))
            }
        }
        serde_json::Value::String(_) => Err(ValidationError::new(
            field,
            format!("is a string; {}", range()),
        )),
        _ => Err(ValidationError::new(
            field,
            format!("has the wrong type; {}", range()),
        )),
    }
}

/// A positive whole number of Ku coins, never above the configured maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Credits(i64);

impl Credits {
    /// Checks an amount given as a JSON value: a whole number (`5` or `5.0`)
    /// from 1 to `max`.
    pub fn from_json(
        field: &'static str,
        value: Option<&serde_json::Value>,
        max: i64,
    ) -> Result<Self, ValidationError> {
        let range = || format!("must be a whole number of credits from 1 to {max}");
        let value = match value {
            None | Some(serde_json::Value::Null) => {
                return Err(ValidationError::new(
                    field,
                    format!("is required; {}", range()),
                ));
            }
            Some(v) => v,
        };
        let n = whole_number(field, value, &range)?;
        Self::new(field, n, max)
    }

    /// Checks an integer amount: from 1 to `max`.
    pub fn new(field: &'static str, n: i64, max: i64) -> Result<Self, ValidationError> {
        if n < 1 {
            return Err(ValidationError::new(
                field,
                format!("must be at least 1 (got {n})"),
            ));
        }
        if n > max {
            return Err(ValidationError::new(
                field,
                format!("must be at most {max} (got {n})"),
            ));
        }
        Ok(Self(n))
    }

    /// The amount as a signed 64-bit integer, as stored.
    pub fn get(self) -> i64 {
        self.0
    }
}

/// Longest app name.
pub const APP_NAME_MAX_LEN: usize = 32;

/// The name of a client app (`penora`, `imagegene`, …): lowercase letters,
/// digits, `_` and `-`, 1–32 characters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct AppName(String);

impl std::borrow::Borrow<str> for AppName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// The writing app.
pub const PENORA: &str = "penora";
/// The image generator; its events name its reservations.
pub const IMAGEGENE: &str = "imagegene";

impl AppName {
    /// The writing app, [`PENORA`].
    pub fn penora() -> Self {
        Self(PENORA.to_owned())
    }

    /// The image generator, [`IMAGEGENE`].
    pub fn imagegene() -> Self {
        Self(IMAGEGENE.to_owned())
    }

    /// Parses an app name for `field`.
    pub fn parse(field: &'static str, raw: &str) -> Result<Self, ValidationError> {
        if raw.is_empty() || raw.len() > APP_NAME_MAX_LEN {
            return Err(ValidationError::new(
                field,
                format!("must be 1 to {APP_NAME_MAX_LEN} characters"),
            ));
        }
        if !raw
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        {
            return Err(ValidationError::new(
                field,
                "may only contain lowercase letters, digits, _ and -",
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AppName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Longest project code.
pub const PROJECT_CODE_MAX_LEN: usize = 128;

/// A client's idempotency key for a deduction: 1–128 characters of
/// `[A-Za-z0-9_.:@-]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct ProjectCode(String);

impl std::borrow::Borrow<str> for ProjectCode {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl ProjectCode {
    /// Parses a project code.
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        if raw.is_empty() || raw.chars().count() > PROJECT_CODE_MAX_LEN {
            return Err(ValidationError::new(
                "project_code",
                format!("must be 1 to {PROJECT_CODE_MAX_LEN} characters"),
            ));
        }
        if !raw.chars().all(is_identifier_char) {
            return Err(ValidationError::new(
                "project_code",
                "may only contain letters, digits and _ . : @ -",
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// A fresh server-made code, for deductions that did not name one.
    pub fn generate() -> Self {
        Self(format!("pc_{}", uuid::Uuid::now_v7().simple()))
    }

    /// The code as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProjectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `c` is a Unicode bidirectional control or an invisible format
/// character: text holding one can read differently from what it stores
/// (a reversed amount or name in a console, a log or an e-mail; "Trojan
/// Source", CVE-2021-42574). The joiners (U+200C, U+200D), variation
/// selectors and tag characters stay allowed: emoji sequences and several
/// scripts need them.
pub fn is_bidi_or_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{00AD}'                  // soft hyphen
        | '\u{061C}'                // Arabic letter mark
        | '\u{180E}'                // Mongolian vowel separator
        | '\u{200B}'                // zero-width space
        | '\u{200E}' | '\u{200F}'  // left-to-right / right-to-left marks
        | '\u{202A}'..='\u{202E}' // embeddings and overrides
        | '\u{2060}'..='\u{2064}' // word joiner, invisible operators
        | '\u{2066}'..='\u{2069}' // isolates
        | '\u{FEFF}'                // zero-width no-break space (BOM)
        | '\u{FFF9}'..='\u{FFFB}' // interlinear annotations
    )
}

/// Checks a free text field: at most `max` characters, no control
/// characters other than newline and tab, and no bidirectional controls or
/// invisible format characters ([`is_bidi_or_invisible_format`]).
pub fn bounded_text(field: &'static str, raw: &str, max: usize) -> Result<String, ValidationError> {
    if raw.chars().count() > max {
        return Err(ValidationError::new(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    if raw
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(ValidationError::new(
            field,
            "must not contain control characters",
        ));
    }
    if let Some(c) = raw.chars().find(|&c| is_bidi_or_invisible_format(c)) {
        return Err(ValidationError::new(
            field,
            format!(
                "must not contain bidirectional or invisible format characters (found U+{:04X})",
                u32::from(c)
            ),
        ));
    }
    Ok(raw.to_owned())
}

/// `raw` made fit to store as free text from a source that cannot be
/// answered with a `400` (an event on the queue): control characters but
/// newline and tab, and bidirectional or invisible format characters, are
/// dropped, and the rest cut to `max` characters.
pub fn clean_text(raw: &str, max: usize) -> String {
    raw.chars()
        .filter(|&c| {
            !((c.is_control() && c != '\n' && c != '\t') || is_bidi_or_invisible_format(c))
        })
        .take(max)
        .collect()
}

/// Longest project title.
pub const TITLE_MAX_LEN: usize = 200;
/// Longest description or reason.
pub const DESCRIPTION_MAX_LEN: usize = 500;
/// Longest grant reference.
pub const REFERENCE_MAX_LEN: usize = 128;
/// Longest project type.
pub const PROJECT_TYPE_MAX_LEN: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn user_ids_of_allowed_characters_parse() {
        assert!(UserId::parse("101902121794505144784").is_ok());
        assert!(UserId::parse("a.b:c@d-e_f").is_ok());
        assert!(UserId::parse(&"x".repeat(128)).is_ok());
    }

    #[test]
    fn bad_user_ids_are_refused_naming_the_field() {
        for bad in ["", "a b", "ü", "a/b", "a;drop", &"x".repeat(129)] {
            let err = UserId::parse(bad).unwrap_err();
            assert_eq!(err.field, "user_id", "{bad:?}");
        }
    }

    #[test]
    fn amounts_must_be_whole_numbers_in_range() {
        let max = 1_000_000;
        assert_eq!(
            Credits::from_json("amount", Some(&json!(5)), max).map(Credits::get),
            Ok(5)
        );
        assert_eq!(
            Credits::from_json("amount", Some(&json!(1_000_000)), max).map(Credits::get),
            Ok(1_000_000)
        );
        for bad in [
            json!(0),
            json!(-5),
            json!(5.5),
            json!("5"),
            json!(1e30),
            json!(18446744073709551615u64),
            json!(1_000_001),
            json!(true),
            json!([5]),
            serde_json::Value::Null,
        ] {
            let err = Credits::from_json("amount", Some(&bad), max).unwrap_err();
            assert_eq!(err.field, "amount", "{bad}");
        }
        assert!(Credits::from_json("amount", None, max).is_err());
    }

    #[test]
    fn app_names_are_lowercase_words() {
        assert!(AppName::parse("app_name", "imagegene").is_ok());
        assert!(AppName::parse("app_name", "ImageGene").is_err());
        assert!(AppName::parse("app_name", "").is_err());
        assert!(AppName::parse("app_name", &"a".repeat(33)).is_err());
    }

    #[test]
    fn generated_project_codes_are_valid_and_unique() {
        let a = ProjectCode::generate();
        let b = ProjectCode::generate();
        assert_ne!(a, b);
        assert!(ProjectCode::parse(a.as_str()).is_ok());
    }

    #[test]
    fn text_is_bounded_in_characters_not_bytes() {
        assert!(bounded_text("title", &"é".repeat(200), 200).is_ok());
        assert!(bounded_text("title", &"é".repeat(201), 200).is_err());
        assert!(bounded_text("title", "a\u{0}b", 200).is_err());
        // "Trojan Source": an override that shows `credit 001` as `100`.
        let err = bounded_text("reason", "refund \u{202E}100\u{202C}", 500).unwrap_err();
        assert!(err.to_string().contains("U+202E"), "{err}");
        for c in ['\u{200B}', '\u{200F}', '\u{2066}', '\u{FEFF}', '\u{061C}'] {
            assert!(
                bounded_text("title", &format!("a{c}b"), 200).is_err(),
                "{c:?}"
            );
        }
        assert_eq!(
            clean_text("GPU\u{202E} out\u{0} of memory", 500),
            "GPU out of memory"
        );
        assert_eq!(clean_text(&"é".repeat(600), 500).chars().count(), 500);
        // Emoji sequences and scripts that need joiners stay allowed.
        for ok in [
            "👨\u{200D}👩\u{200D}👧",
            "می\u{200C}خواهم",
            "✌\u{FE0F}",
            "Ünïcödé 漢字",
        ] {
            assert!(bounded_text("title", ok, 200).is_ok(), "{ok}");
        }
    }
}

text_column!(UserId, |v: &UserId| v.as_str(), |raw: &str| UserId::parse(
    raw
)
.ok());
text_column!(AppName, |v: &AppName| v.as_str(), |raw: &str| {
    AppName::parse("app_name", raw).ok()
});
text_column!(ProjectCode, |v: &ProjectCode| v.as_str(), |raw: &str| {
    ProjectCode::parse(raw).ok()
});
