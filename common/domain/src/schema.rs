//! The OpenAPI schemas of the domain types, written beside their parsers and
//! from the same constants, so that the document the API serves and the
//! validators it runs cannot drift: a request field documented as a
//! [`UserId`](super::UserId) is parsed by `UserId::parse`, and a free-text
//! field documented as a [`Title`] is checked by `Title::parse`.

use utoipa::{
    PartialSchema, ToSchema,
    openapi::{
        KnownFormat, ObjectBuilder, RefOr, SchemaFormat, Type,
        schema::{Schema, SchemaType},
    },
};

use super::{
    APP_NAME_MAX_LEN, AppName, Credits, DESCRIPTION_MAX_LEN, PROJECT_CODE_MAX_LEN,
    PROJECT_TYPE_MAX_LEN, ProjectCode, REFERENCE_MAX_LEN, TITLE_MAX_LEN, USER_ID_MAX_LEN, UserId,
    ValidationError, bounded_text,
};

/// User ids and project codes: letters, digits and `_ . : @ -`
/// (`is_identifier_char`).
pub const IDENTIFIER_PATTERN: &str = "^[A-Za-z0-9_.:@-]+$";
/// App names: lowercase letters, digits, `_` and `-`.
pub const APP_NAME_PATTERN: &str = "^[a-z0-9_-]+$";
/// The characters of `domain::is_bidi_or_invisible_format`, for a regex
/// character class.
macro_rules! format_class {
    () => {
        "\\u00AD\\u061C\\u180E\\u200B\\u200E\\u200F\\u202A-\\u202E\\u2060-\\u2064\\u2066-\\u2069\\uFEFF\\uFFF9-\\uFFFB"
    };
}
/// Free text: no control characters but newline and tab, no bidirectional
/// controls or invisible format characters (`bounded_text`).
pub const TEXT_PATTERN: &str = concat!(
    "^[^\\u0000-\\u0008\\u000B-\\u001F\\u007F-\\u009F",
    format_class!(),
    "]*$"
);
/// Required free text: as [`TEXT_PATTERN`], with at least one character that
/// is not a space (blank text is refused as missing).
pub const NON_BLANK_TEXT_PATTERN: &str = concat!(
    "^[^\\u0000-\\u0008\\u000B-\\u001F\\u007F-\\u009F",
    format_class!(),
    "]*[^\\s\\u0000-\\u001F\\u007F-\\u009F",
    format_class!(),
    "][^\\u0000-\\u0008\\u000B-\\u001F\\u007F-\\u009F",
    format_class!(),
    "]*$"
);

fn string(pattern: &str, min: usize, max: usize, description: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(SchemaType::Type(Type::String))
        .pattern(Some(pattern))
        .min_length(Some(min))
        .max_length(Some(max))
        .description(Some(description))
        .into()
}

impl PartialSchema for UserId {
    fn schema() -> RefOr<Schema> {
        string(
            IDENTIFIER_PATTERN,
            1,
            USER_ID_MAX_LEN,
            "A user id: letters, digits and _ . : @ -",
        )
    }
}
impl ToSchema for UserId {}

impl PartialSchema for ProjectCode {
    fn schema() -> RefOr<Schema> {
        string(
            IDENTIFIER_PATTERN,
            1,
            PROJECT_CODE_MAX_LEN,
            "A reservation's key (the idempotency key of a deduction): letters, digits and _ . : @ -",
        )
    }
}
impl ToSchema for ProjectCode {}

impl PartialSchema for AppName {
    fn schema() -> RefOr<Schema> {
        string(
            APP_NAME_PATTERN,
            1,
            APP_NAME_MAX_LEN,
            "An app: lowercase letters, digits, _ and -",
        )
    }
}
impl ToSchema for AppName {}

impl PartialSchema for Credits {
    /// The maximum is the service's `MAX_DEDUCT_AMOUNT`, set where the
    /// document is served.
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(SchemaType::Type(Type::Integer))
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
            .minimum(Some(1))
            .description(Some("Whole Ku coins, from 1 to MAX_DEDUCT_AMOUNT"))
            .into()
    }
}
impl ToSchema for Credits {}

/// Declares a free-text field type: its rule (longest length; required and
/// not blank, or optional), its parser and its schema.
macro_rules! text_field {
    ($(#[$doc:meta])* $name:ident, $max:expr, required) => {
        $(#[$doc])*
        pub struct $name;

        impl $name {
            /// Longest accepted text, in characters.
            pub const MAX: usize = $max;

            /// Checks `raw` for `field`: present, not blank, at most
            /// [`Self::MAX`] characters, no control characters but newline
            /// and tab.
            pub fn parse(field: &'static str, raw: Option<&str>) -> Result<String, ValidationError> {
                match raw {
                    Some(t) if !t.trim().is_empty() => bounded_text(field, t, Self::MAX),
                    _ => Err(ValidationError::new(field, "is required")),
                }
            }
        }

        impl PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                string(NON_BLANK_TEXT_PATTERN, 1, $max, stringify!($name))
            }
        }
        impl ToSchema for $name {}
    };
    ($(#[$doc:meta])* $name:ident, $max:expr, optional) => {
        $(#[$doc])*
        pub struct $name;

        impl $name {
            /// Longest accepted text, in characters.
            pub const MAX: usize = $max;

            /// Checks `raw` for `field` when present: at most [`Self::MAX`]
            /// characters, no control characters but newline and tab.
            pub fn parse(field: &'static str, raw: Option<&str>) -> Result<Option<String>, ValidationError> {
                raw.map(|t| bounded_text(field, t, Self::MAX)).transpose()
            }
        }

        impl PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                string(TEXT_PATTERN, 0, $max, stringify!($name))
            }
        }
        impl ToSchema for $name {}
    };
}

text_field!(
    /// What a movement is for, or why a refund is asked: optional.
    Description,
    DESCRIPTION_MAX_LEN,
    optional
);
text_field!(
    /// Why credits are granted (a purchase, a bonus): required.
    GrantReason,
    DESCRIPTION_MAX_LEN,
    required
);
text_field!(
    /// A grant's idempotency reference (e.g. the payment id): required.
    Reference,
    REFERENCE_MAX_LEN,
    required
);
text_field!(
    /// A project's title: required.
    Title,
    TITLE_MAX_LEN,
    required
);
text_field!(
    /// A project's type (`ai_artwork`, `document`, …): required.
    ProjectType,
    PROJECT_TYPE_MAX_LEN,
    required
);

#[cfg(test)]
mod tests {
    use super::*;

    /// The patterns say what the parsers do, on the characters that matter.
    #[test]
    fn patterns_agree_with_the_parsers() {
        let identifier = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.:@-".contains(c))
        };
        for raw in ["u1", "a.b:c@d-e_f", "a b", "é", "a/b", "", "A"] {
            assert_eq!(UserId::parse(raw).is_ok(), identifier(raw), "{raw:?}");
            assert_eq!(ProjectCode::parse(raw).is_ok(), identifier(raw), "{raw:?}");
        }
        for raw in ["imagegene", "my_app-2", "Image", "a.b", ""] {
            let expected = !raw.is_empty()
                && raw
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-".contains(c));
            assert_eq!(AppName::parse("app_name", raw).is_ok(), expected, "{raw:?}");
        }
        assert!(Title::parse("title", Some("  ")).is_err());
        assert!(Title::parse("title", None).is_err());
        assert_eq!(Title::parse("title", Some("t")), Ok("t".to_owned()));
        assert_eq!(Description::parse("description", None), Ok(None));
        assert!(Description::parse("description", Some("a\u{1}b")).is_err());
        assert!(Reference::parse("reference", Some(&"r".repeat(REFERENCE_MAX_LEN + 1))).is_err());
    }
}
