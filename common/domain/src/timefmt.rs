//! Timestamps as the contract shows them: RFC 3339, UTC, milliseconds.

use time::{OffsetDateTime, UtcOffset, format_description::FormatItem, macros::format_description};

const FORMAT: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

/// Formats `t` as `2025-08-28T06:00:00.000Z`.
pub fn rfc3339_millis(t: OffsetDateTime) -> String {
    t.to_offset(UtcOffset::UTC)
        .format(FORMAT)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// Parses an RFC 3339 time, truncated to the millisecond (what the service
/// shows and keeps, so that a retried request compares equal).
pub fn parse_millis(raw: &str) -> Option<OffsetDateTime> {
    let at = OffsetDateTime::parse(raw, &time::format_description::well_known::Rfc3339).ok()?;
    OffsetDateTime::from_unix_timestamp_nanos(at.unix_timestamp_nanos() / 1_000_000 * 1_000_000)
        .ok()
}

/// [`parse_millis`] for the input `field`: refused naming the field, with an
/// example of the form.
pub fn parse_field(
    field: &'static str,
    raw: &str,
) -> Result<OffsetDateTime, crate::ValidationError> {
    parse_millis(raw).ok_or_else(|| {
        crate::ValidationError::new(
            field,
            "must be an RFC 3339 time such as 2025-09-27T06:00:00Z",
        )
    })
}

/// Serde helper: serialize an `OffsetDateTime` with [`rfc3339_millis`].
pub mod serde_millis {
    use time::OffsetDateTime;

    /// Serializes as `2025-08-28T06:00:00.000Z`.
    pub fn serialize<S: serde::Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::rfc3339_millis(*t))
    }

    /// The same for an optional timestamp.
    pub mod option {
        use time::OffsetDateTime;

        /// Serializes `Some` as a timestamp and `None` as null.
        pub fn serialize<S: serde::Serializer>(
            t: &Option<OffsetDateTime>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => s.serialize_str(&super::super::rfc3339_millis(*t)),
                None => s.serialize_none(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn timestamps_are_utc_with_milliseconds() {
        assert_eq!(
            rfc3339_millis(datetime!(2025-08-28 08:00:00.123456 +02:00)),
            "2025-08-28T06:00:00.123Z"
        );
        assert_eq!(
            rfc3339_millis(datetime!(2025-08-28 06:00:00 UTC)),
            "2025-08-28T06:00:00.000Z"
        );
    }
}
