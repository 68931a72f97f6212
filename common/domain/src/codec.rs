//! What the text-column codec ([`crate::text_enum!`], [`crate::text_column!`])
//! needs of `postgres-types`, re-exported so that the macros work in any
//! crate.

pub use bytes::BytesMut;
pub use postgres_types::{FromSql, IsNull, ToSql, Type, to_sql_checked};
