//! Property tests of the pure rules: validation, prices and reservation
//! states. Each property is checked on a few hundred generated inputs
//! (proptest shrinks a failure to its smallest case).

use penora_domain::Credits;
use penora_domain::ProjectCode;
use penora_domain::ReservationState;
use penora_domain::USER_ID_MAX_LEN;
use penora_domain::UserId;
use penora_domain::bounded_text;
use penora_domain::pricing::{PriceTable, Quality};
use proptest::prelude::*;

proptest! {
    #[test]
    fn user_ids_of_allowed_characters_and_length_parse_and_round_trip(
        raw in "[A-Za-z0-9_.:@-]{1,128}"
    ) {
        let id = UserId::parse(&raw).expect("valid");
        prop_assert_eq!(id.as_str(), raw.as_str());
    }

    #[test]
    fn any_other_user_id_is_refused(raw in "\\PC{0,200}") {
        let allowed = !raw.is_empty()
            && raw.chars().count() <= USER_ID_MAX_LEN
            && raw.chars().all(|c| c.is_ascii_alphanumeric() || "_.:@-".contains(c));
        prop_assert_eq!(UserId::parse(&raw).is_ok(), allowed);
    }

    #[test]
    fn project_codes_are_refused_or_kept_exactly(raw in "\\PC{0,200}") {
        if let Ok(code) = ProjectCode::parse(&raw) {
            prop_assert_eq!(code.as_str(), raw.as_str());
        }
    }

    #[test]
    fn credits_accept_exactly_1_to_max(n in any::<i64>(), max in 1i64..=i64::MAX) {
        let got = Credits::new("amount", n, max);
        prop_assert_eq!(got.is_ok(), (1..=max).contains(&n));
        if let Ok(c) = got {
            prop_assert_eq!(c.get(), n);
        }
    }

    #[test]
    fn json_amounts_are_whole_numbers_in_range_or_refused(
        n in any::<i64>(), f in any::<f64>(), s in "\\PC{0,20}", max in 1i64..=1_000_000
    ) {
        let int = serde_json::json!(n);
        prop_assert_eq!(
            Credits::from_json("amount", Some(&int), max).is_ok(),
            (1..=max).contains(&n)
        );
        let float = serde_json::json!(f);
        let accepted = Credits::from_json("amount", Some(&float), max);
        if f.fract() != 0.0 || !f.is_finite() {
            prop_assert!(accepted.is_err());
        } else {
            // A whole number written as a float (`5.0`) is that number.
            prop_assert_eq!(accepted.is_ok(), f >= 1.0 && f <= max as f64);
            if let Ok(c) = accepted {
                prop_assert_eq!(c.get() as f64, f);
            }
        }
        let text = serde_json::json!(s);
        prop_assert!(Credits::from_json("amount", Some(&text), max).is_err());
    }

    #[test]
    fn bounded_text_keeps_short_text_and_refuses_long(raw in "\\PC{0,80}", max in 0usize..60) {
        match bounded_text("title", &raw, max) {
            Ok(kept) => prop_assert!(kept.chars().count() <= max),
            Err(e) => prop_assert!(e.to_string().contains("title")),
        }
    }

    #[test]
    fn a_quote_never_gets_cheaper_with_more_pixels_quality_or_variations(
        w in 1u32..=4096, h in 1u32..=4096, dw in 0u32..=1024, dh in 0u32..=1024,
        v in 1u32..=10, dv in 0u32..=5, high in any::<bool>()
    ) {
        let t = PriceTable::default();
        let q = if high { Quality::High } else { Quality::Standard };
        let base = t.quote(w, h, q, v);
        prop_assert!(base.total >= t.small);
        prop_assert_eq!(base.total, base.base + base.extra);
        prop_assert!(t.quote(w + dw, h + dh, q, v).total >= base.total);
        prop_assert!(t.quote(w, h, q, v + dv).total >= base.total);
        prop_assert!(t.quote(w, h, Quality::High, v).total >= base.total);
    }

    #[test]
    fn reservation_states_round_trip_through_the_database_text(raw in "[a-z]{0,12}") {
        match ReservationState::from_db(&raw) {
            Some(state) => prop_assert_eq!(state.as_str(), raw.as_str()),
            None => prop_assert!(!["reserved", "settled", "refunded"].contains(&raw.as_str())),
        }
    }
}
