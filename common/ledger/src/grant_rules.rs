//! What a grant may ask for: the rules of its fields, spelled once for
//! `POST /add-credits` and `penora-ops credits grant`.
//!
//! Rules, checked in this order (a grant with several faults is told of the
//! first), each refusal a [`ValidationError`] naming its field:
//! * `amount`: whole credits from 1 to `MAX_DEDUCT_AMOUNT` ([`Credits`]);
//! * `reason`: required, not blank, at most 500 characters ([`GrantReason`]);
//! * `reference`: required, at most 128 characters ([`Reference`]), not
//!   starting with `allowance:` (reserved for recurring allowances); it is
//!   the grant's idempotency key;
//! * `category`: `paid` (the default) or `promotional`;
//! * `priority`: a whole number from 0 to 100, lower spent first; by default
//!   the category's (50 for paid, 10 for promotional);
//! * `expires_at`: an RFC 3339 time (kept to the millisecond) after now;
//!   absent, the credits never expire.
//!
//! The whom and on whose behalf (`user_id`, `app_name`) come checked: each
//! front end has its own rules for them (the API's key may be bound to an
//! app, and a missing user is `user_id_required`).

use penora_domain::timefmt;
use penora_domain::{
    AppName, Credits, GrantReason, LotCategory, Reference, UserId, ValidationError, whole_number,
};
use time::OffsetDateTime;

use crate::Grant;

/// What a priority may be.
const PRIORITY_RANGE: &str = "must be a whole number from 0 to 100";

/// A grant as asked for: the fields as sent (a number as a JSON value, as
/// the API receives it), but whom and for which app, checked.
#[derive(Debug, Clone, Copy)]
pub struct GrantRequest<'a> {
    /// Who receives the credits.
    pub user_id: &'a UserId,
    /// On whose behalf.
    pub app_name: &'a AppName,
    /// How many credits.
    pub amount: Option<&'a serde_json::Value>,
    /// Why, for people.
    pub reason: Option<&'a str>,
    /// The idempotency reference.
    pub reference: Option<&'a str>,
    /// `paid` or `promotional`.
    pub category: Option<&'a str>,
    /// 0–100.
    pub priority: Option<&'a serde_json::Value>,
    /// When the credits expire.
    pub expires_at: Option<&'a str>,
}

impl GrantRequest<'_> {
    /// The grant, every field checked by the rules of this module, in their
    /// order; `now` judges the expiry, `max_amount` is `MAX_DEDUCT_AMOUNT`.
    pub fn validate(&self, max_amount: i64, now: OffsetDateTime) -> Result<Grant, ValidationError> {
        let amount = Credits::from_json("amount", self.amount, max_amount)?;
        let reason = GrantReason::parse("reason", self.reason)?;
        let reference = Reference::parse("reference", self.reference)?;
        reserved_reference(&reference)?;
        let terms = LotTerms::parse(self.category, self.priority, self.expires_at, now)?;
        Ok(Grant {
            user_id: self.user_id.clone(),
            amount,
            app_name: self.app_name.clone(),
            reason,
            reference,
            category: terms.category,
            priority: terms.priority,
            expires_at: terms.expires_at,
            acted_by: None,
        })
    }
}

/// Refuses a grant reference that only recurring allowances may use
/// (`allowance:…`): a grant under it would stand in for a period's grant.
pub fn reserved_reference(reference: &str) -> Result<(), ValidationError> {
    if reference.starts_with(crate::allowances::ALLOWANCE_REFERENCE_PREFIX) {
        return Err(ValidationError::new(
            "reference",
            "must not start with `allowance:` (the references of recurring allowances' grants)",
        ));
    }
    Ok(())
}

/// The terms of the lot a grant makes: the last three rules of this module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LotTerms {
    /// `paid` or `promotional`.
    pub category: LotCategory,
    /// 0–100, lower spent first.
    pub priority: i32,
    /// When the lot's credits expire (`None`: never).
    pub expires_at: Option<OffsetDateTime>,
}

impl LotTerms {
    /// Checks `category`, `priority` and `expires_at` as sent (absent, or a
    /// JSON `null` priority, take the defaults); `now` judges the expiry.
    pub fn parse(
        category: Option<&str>,
        priority: Option<&serde_json::Value>,
        expires_at: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<Self, ValidationError> {
        let category = match category {
            None => LotCategory::Paid,
            Some(raw) => LotCategory::from_db(raw).ok_or_else(|| {
                ValidationError::new("category", "must be \"paid\" or \"promotional\"")
            })?,
        };
        let priority = match priority {
            None | Some(serde_json::Value::Null) => category.default_priority(),
            Some(v) => {
                let p = whole_number("priority", v, &|| PRIORITY_RANGE.to_owned())?;
                i32::try_from(p)
                    .ok()
                    .filter(|p| (0..=100).contains(p))
                    .ok_or_else(|| ValidationError::new("priority", PRIORITY_RANGE))?
            }
        };
        let expires_at = match expires_at {
            None => None,
            Some(raw) => {
                let at = timefmt::parse_field("expires_at", raw)?;
                if at <= now {
                    return Err(ValidationError::new("expires_at", "must be in the future"));
                }
                Some(at)
            }
        };
        Ok(Self {
            category,
            priority,
            expires_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> OffsetDateTime {
        timefmt::parse_millis("2026-01-01T00:00:00Z").expect("a time")
    }

    fn refusal(
        category: Option<&str>,
        priority: Option<serde_json::Value>,
        expires_at: Option<&str>,
    ) -> String {
        match LotTerms::parse(category, priority.as_ref(), expires_at, now()) {
            Ok(terms) => panic!("accepted: {terms:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_category_sets_the_default_priority_and_paid_is_the_default() {
        let terms = |c, p: Option<serde_json::Value>| {
            LotTerms::parse(c, p.as_ref(), None, now()).expect("valid")
        };
        assert_eq!(terms(None, None).category, LotCategory::Paid);
        assert_eq!(terms(None, None).priority, 50);
        assert_eq!(terms(Some("promotional"), None).priority, 10);
        assert_eq!(terms(Some("promotional"), Some(json!(null))).priority, 10);
        assert_eq!(terms(Some("paid"), Some(json!(0))).priority, 0);
        assert_eq!(terms(Some("paid"), Some(json!(100.0))).priority, 100);
        assert_eq!(terms(None, None).expires_at, None);
    }

    #[test]
    fn refusals_name_the_field_as_the_api_always_said() {
        assert_eq!(
            refusal(Some("gift"), None, None),
            "category: must be \"paid\" or \"promotional\""
        );
        for bad in [json!(101), json!(-1), json!(1e12), json!(i64::MAX)] {
            assert_eq!(
                refusal(None, Some(bad.clone()), None),
                "priority: must be a whole number from 0 to 100",
                "{bad}"
            );
        }
        assert_eq!(
            refusal(None, Some(json!("5")), None),
            "priority: is a string; must be a whole number from 0 to 100"
        );
        assert_eq!(
            refusal(None, Some(json!(1.5)), None),
            "priority: is not a whole number; must be a whole number from 0 to 100"
        );
        assert_eq!(
            refusal(None, None, Some("tomorrow")),
            "expires_at: must be an RFC 3339 time such as 2025-09-27T06:00:00Z"
        );
        for past in ["2026-01-01T00:00:00Z", "2025-12-31T23:59:59.999Z"] {
            assert_eq!(
                refusal(None, None, Some(past)),
                "expires_at: must be in the future",
                "{past}"
            );
        }
        // The first fault is the one told.
        assert!(refusal(Some("gift"), Some(json!(101)), Some("x")).starts_with("category:"));
    }

    #[test]
    fn a_request_is_checked_field_by_field_in_order() {
        let (user, app) = (
            UserId::parse("u1").expect("user"),
            AppName::parse("app_name", "penora").expect("app"),
        );
        let amount = json!(250);
        let request = GrantRequest {
            user_id: &user,
            app_name: &app,
            amount: Some(&amount),
            reason: Some("purchase"),
            reference: Some("pay_9"),
            category: Some("promotional"),
            priority: None,
            expires_at: Some("2026-02-01T00:00:00.1234Z"),
        };
        let grant = request.validate(1000, now()).expect("valid");
        assert_eq!(grant.amount.get(), 250);
        assert_eq!(grant.priority, 10);
        assert_eq!(
            grant.expires_at.map(timefmt::rfc3339_millis).as_deref(),
            Some("2026-02-01T00:00:00.123Z")
        );
        let refused = |r: GrantRequest<'_>| r.validate(1000, now()).map(|_| ()).unwrap_err();
        let zero = json!(0);
        assert_eq!(
            refused(GrantRequest {
                amount: Some(&zero),
                reason: Some(" "),
                ..request
            })
            .field,
            "amount"
        );
        assert_eq!(
            refused(GrantRequest {
                reason: Some(" "),
                reference: None,
                ..request
            })
            .field,
            "reason"
        );
        assert_eq!(
            refused(GrantRequest {
                reference: None,
                category: Some("gift"),
                ..request
            })
            .field,
            "reference"
        );
        assert_eq!(
            refused(GrantRequest {
                expires_at: Some("2025-01-01T00:00:00Z"),
                ..request
            })
            .to_string(),
            "expires_at: must be in the future"
        );
    }
}
