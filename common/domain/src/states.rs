//! The states and kinds the database stores as text, as Rust enums, through
//! one codec: each is written as its name (`as_str`) and read back with
//! [`from_db`](EntryKind::from_db); a stored name this build does not know
//! is an error, never a default. With feature `sql`, each is also a
//! `ToSql`/`FromSql` type of a `text` column.

/// Declares an enum stored as text: its variants and their stored names,
/// with `as_str`, `from_db`, `ALL` and `Display` (and, with feature `sql`,
/// `ToSql`/`FromSql`).
#[macro_export]
macro_rules! text_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $text:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The name as stored and shown.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }

            /// The value a stored name stands for; `None` for a name this
            /// build does not know.
            pub fn from_db(raw: &str) -> Option<Self> {
                match raw {
                    $($text => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        $crate::text_column!($name, |v: &$name| v.as_str(), |raw: &str| $name::from_db(raw));
    };
}

/// Makes a type a `text` column (feature `sql`): written with `$to`, read
/// with `$from`, which refuses what the type does not accept.
#[cfg(feature = "sql")]
#[macro_export]
macro_rules! text_column {
    ($name:ty, $to:expr, $from:expr) => {
        impl $crate::codec::ToSql for $name {
            fn to_sql(
                &self,
                ty: &$crate::codec::Type,
                out: &mut $crate::codec::BytesMut,
            ) -> Result<$crate::codec::IsNull, Box<dyn ::std::error::Error + Sync + Send>> {
                let to: fn(&$name) -> &str = $to;
                <&str as $crate::codec::ToSql>::to_sql(&to(self), ty, out)
            }

            fn accepts(ty: &$crate::codec::Type) -> bool {
                <&str as $crate::codec::ToSql>::accepts(ty)
            }

            $crate::codec::to_sql_checked!();
        }

        impl<'a> $crate::codec::FromSql<'a> for $name {
            fn from_sql(
                ty: &$crate::codec::Type,
                raw: &'a [u8],
            ) -> Result<Self, Box<dyn ::std::error::Error + Sync + Send>> {
                let text = <&str as $crate::codec::FromSql>::from_sql(ty, raw)?;
                let from: fn(&str) -> Option<$name> = $from;
                from(text).ok_or_else(|| {
                    format!(
                        "{text:?} is not a {} this build knows",
                        ::std::stringify!($name)
                    )
                    .into()
                })
            }

            fn accepts(ty: &$crate::codec::Type) -> bool {
                <&str as $crate::codec::FromSql>::accepts(ty)
            }
        }
    };
}

/// Without feature `sql`: nothing.
#[cfg(not(feature = "sql"))]
#[macro_export]
macro_rules! text_column {
    ($name:ty, $to:expr, $from:expr) => {};
}

crate::text_enum! {
    /// What a ledger entry records.
    #[derive(serde::Serialize)]
    #[serde(rename_all = "snake_case")]
    pub enum EntryKind {
        /// Credits granted (purchase, bonus).
        Grant => "grant",
        /// Credits reserved and taken out of the balance.
        Deduct => "deduct",
        /// A reservation's credits returned.
        Refund => "refund",
        /// A reservation made final (moves nothing).
        Settle => "settle",
        /// A lot's credits that passed their expiry (or the part of a refund
        /// given back to an expired lot).
        Expire => "expire",
        /// A voided lot's credits (or the part of a refund given back to it).
        Void => "void",
    }
}

crate::text_enum! {
    /// The state of a reservation: `reserved` until it is settled or refunded.
    #[derive(serde::Serialize)]
    #[serde(rename_all = "snake_case")]
    pub enum ReservationState {
        /// Credits held; can still be refunded inside the window.
        Reserved => "reserved",
        /// Part of the credits went back; the rest is held, and can still be
        /// refunded inside the window.
        PartiallyRefunded => "partially_refunded",
        /// Final: the credits are spent.
        Settled => "settled",
        /// Final: the credits went back to the balance.
        Refunded => "refunded",
    }
}

impl ReservationState {
    /// Whether credits are still held (refundable inside the window).
    pub fn holds(self) -> bool {
        matches!(self, Self::Reserved | Self::PartiallyRefunded)
    }
}

crate::text_enum! {
    /// Why a reservation is settled (`reservations.settled_by`).
    pub enum SettledBy {
        /// Its refund window passed (the timer): a failure event from inside
        /// the window may still refund it (CONTRACT §11).
        Window => "window",
        /// A success event, a save naming it, an explicit settlement: final.
        Final => "final",
    }
}

crate::text_enum! {
    /// A lot's category (contract §12).
    #[derive(serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
    #[serde(rename_all = "snake_case")]
    pub enum LotCategory {
        /// Bought: spent after promotional credits of the same priority and expiry.
        Paid => "paid",
        /// Given (a signup bonus, a goodwill gesture).
        Promotional => "promotional",
    }
}

impl LotCategory {
    /// The priority a lot of this category gets when the grant names none:
    /// promotional credits are spent first.
    pub fn default_priority(self) -> i32 {
        match self {
            Self::Paid => 50,
            Self::Promotional => 10,
        }
    }
}

crate::text_enum! {
    /// A lot's stored status (`credit_lots.status`). A lot past its
    /// `expires_at` whose `expire` entry is not written yet is still
    /// `active` here; [`LotStatus`] is what is stored, not what is shown.
    pub enum LotStatus {
        /// Credits may be left in it.
        Active => "active",
        /// Its expiry passed and its `expire` entry is written.
        Expired => "expired",
        /// Voided by an operator.
        Voided => "voided",
    }
}

crate::text_enum! {
    /// A project's status (`projects.status`).
    pub enum ProjectStatus {
        /// Recorded, waiting for the worker.
        Queued => "queued",
        /// Checked and stored.
        Saved => "saved",
        /// Its content is not an image; its bytes are released.
        Failed => "failed",
        /// Deleted: a tombstone (not listed, not counted).
        Deleted => "deleted",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_reads_back_from_its_stored_name_and_unknown_names_do_not() {
        for k in EntryKind::ALL {
            assert_eq!(EntryKind::from_db(k.as_str()), Some(*k));
        }
        for s in ReservationState::ALL {
            assert_eq!(ReservationState::from_db(s.as_str()), Some(*s));
        }
        for s in LotStatus::ALL {
            assert_eq!(LotStatus::from_db(&s.to_string()), Some(*s));
        }
        assert_eq!(SettledBy::from_db("window"), Some(SettledBy::Window));
        assert_eq!(
            ProjectStatus::from_db("deleted"),
            Some(ProjectStatus::Deleted)
        );
        assert_eq!(
            LotCategory::from_db("promotional"),
            Some(LotCategory::Promotional)
        );
        assert_eq!(ReservationState::from_db("Reserved"), None);
        assert_eq!(EntryKind::from_db(""), None);
    }
}
