//! The events out (contract §14) that credit movements report:
//! `credits.granted`, `credits.refunded`, `reservation.settled`,
//! `credits.expired`, `balance.low` and `balance.depleted`, derived from a
//! decided [`Plan`] by one pure function ([`derive`]) and written by
//! `plan::apply` in the movement's transaction, so every movement (a
//! deduction, a refund of any kind, a settlement, a grant, a void, an
//! expiry, a group-committed batch) gets them from one place.
//!
//! Rules:
//! * an entry of kind `grant`, `refund` or `expire` is reported by its
//!   event (`credits.granted`, `credits.refunded`, `credits.expired`); a
//!   `settle` entry (a reservation becoming settled) by
//!   `reservation.settled`; deductions and voids only by a crossing;
//! * the balance is judged by **steps**: each entry of a user is a step of
//!   its own, except the entries a plan marks joined ([`Plan::joined`]: the
//!   `expire`/`void` that takes back at once what a refund gave to a closed
//!   lot), which belong to the step before; a step goes from the balance
//!   before its first entry to the balance after its last;
//! * `balance.low` fires on a step from at or above the threshold to below
//!   it; it re-arms only when a later step brings the balance back to the
//!   threshold or above (which is what "from at or above" asks of the next
//!   crossing); `balance.depleted` fires on a step from above 0 to 0;
//! * the threshold is the account's own (`accounts.low_balance_threshold`,
//!   read with the account's lock into the snapshot) or the service's
//!   default ([`default_threshold`], `LOW_BALANCE_THRESHOLD`);
//! * a batch's plan holds each user's entries in arrival order, with the
//!   balances one-by-one processing would give them: the events of a
//!   batch are those of its requests alone (`tests/decide.rs` checks it);
//! * a plan without such entries writes no event, and no statement.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};

use deadpool_postgres::GenericClient;
use penora_domain::{EntryKind, UserId, events::EventType, timefmt};
use penora_store::{DbError, outbox};
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::plan::{NewEntry, Plan};
use crate::snapshot::{Snapshot, res_key};

/// `LOW_BALANCE_THRESHOLD`'s default.
pub const DEFAULT_LOW_BALANCE_THRESHOLD: i64 = 10;

/// The threshold of accounts without their own, for this process.
static DEFAULT_THRESHOLD: AtomicI64 = AtomicI64::new(DEFAULT_LOW_BALANCE_THRESHOLD);

/// Sets the threshold of accounts without their own (`LOW_BALANCE_THRESHOLD`),
/// once at start-up by each binary that moves credits. A process serves one
/// setting, as it talks to one database (`penora_store::distributed`).
pub fn set_default_threshold(threshold: i64) {
    DEFAULT_THRESHOLD.store(threshold.max(0), Ordering::Relaxed);
}

/// The threshold of accounts without their own.
pub fn default_threshold() -> i64 {
    DEFAULT_THRESHOLD.load(Ordering::Relaxed)
}

/// An event a plan implies, before it is written.
#[derive(Debug, Clone, PartialEq)]
pub struct Derived {
    /// Whose.
    pub user_id: UserId,
    /// Its type.
    pub kind: EventType,
    /// What it concerns (`user_id` is added when it is written).
    pub data: Value,
    /// The request id of the movement that implies it.
    pub correlation_id: Option<String>,
}

/// The events `plan` (decided against `snap`) implies, in the order of its
/// entries. `lot_ids` are the ids of `plan.new_lots` as written (empty
/// before: `lot_id` is then `null`); `default` is the threshold of accounts
/// without their own. Pure.
pub fn derive(plan: &Plan, snap: &Snapshot, lot_ids: &[i64], default: i64) -> Vec<Derived> {
    // Steps: each a run of one user's entries (by index), in order.
    let mut steps: Vec<Vec<usize>> = Vec::new();
    let mut last_of: BTreeMap<&UserId, usize> = BTreeMap::new();
    for (i, e) in plan.entries.iter().enumerate() {
        match last_of.get(&e.user_id) {
            Some(&s) if plan.joined.contains(&i) => steps[s].push(i),
            _ => {
                last_of.insert(&e.user_id, steps.len());
                steps.push(vec![i]);
            }
        }
    }
    let mut out = Vec::new();
    for step in &steps {
        let first = &plan.entries[step[0]];
        let last = &plan.entries[step[step.len() - 1]];
        let before = first.balance_after - first.amount;
        let after = last.balance_after;
        let event = |kind, data| Derived {
            user_id: first.user_id.clone(),
            kind,
            data,
            correlation_id: first.correlation_id.clone(),
        };
        for &i in step {
            if let Some((kind, data)) = fact(plan, snap, lot_ids, i, after) {
                out.push(event(kind, data));
            }
        }
        let threshold = snap
            .accounts
            .get(&first.user_id)
            .and_then(|a| a.threshold)
            .unwrap_or(default);
        if before >= threshold && after < threshold {
            out.push(event(
                EventType::BalanceLow,
                json!({"app": last.app_name.as_str(), "balance": after, "threshold": threshold}),
            ));
        }
        if before > 0 && after == 0 {
            out.push(event(
                EventType::BalanceDepleted,
                json!({"app": last.app_name.as_str(), "balance": 0}),
            ));
        }
    }
    out
}

/// The event reporting entry `i` itself, if its kind has one; `balance` is
/// the balance after its step.
fn fact(
    plan: &Plan,
    snap: &Snapshot,
    lot_ids: &[i64],
    i: usize,
    balance: i64,
) -> Option<(EventType, Value)> {
    let e: &NewEntry = &plan.entries[i];
    let app = e.app_name.as_str();
    let code = e.project_code.as_ref().map(|c| c.as_str());
    match e.kind {
        EntryKind::Grant => {
            let (k, lot) = plan
                .new_lots
                .iter()
                .enumerate()
                .find(|(_, l)| l.entry == i)?;
            let mut data = json!({
                "app": app,
                "amount": e.amount,
                "balance": balance,
                "lot_id": lot_ids.get(k),
                "category": lot.category.as_str(),
                "expires_at": lot.expires_at.map(timefmt::rfc3339_millis),
                "reference": e.reference,
            });
            // A recurring allowance's grant names it (contract §16).
            if let (Some(id), Some(map)) = (&lot.allowance_id, data.as_object_mut()) {
                map.insert("allowance_id".into(), json!(id));
            }
            Some((EventType::CreditsGranted, data))
        }
        EntryKind::Refund => Some((
            EventType::CreditsRefunded,
            json!({
                "app": app,
                "project_code": code,
                "amount": e.amount,
                "balance": balance,
                "reason": e.description,
                "reference": e.reference,
            }),
        )),
        EntryKind::Expire => {
            let lots: Vec<i64> = plan
                .moves
                .iter()
                .filter(|m| m.entry == i)
                .map(|m| m.lot_id)
                .collect();
            Some((
                EventType::CreditsExpired,
                json!({"app": app, "amount": -e.amount, "balance": balance, "lot_ids": lots}),
            ))
        }
        EntryKind::Settle => {
            let code_ref = e.project_code.as_ref()?;
            let key = res_key(&e.user_id, &e.app_name, code_ref);
            let change = plan
                .changes
                .iter()
                .find(|c| c.user_id == key.0 && c.app_name == key.1 && c.project_code == key.2)?;
            let kept = snap
                .reservations
                .get(&key)
                .map(|r| r.amount - change.refunded);
            let returned: i64 = plan
                .entries
                .iter()
                .filter(|r| {
                    r.kind == EntryKind::Refund
                        && r.user_id == e.user_id
                        && r.app_name == e.app_name
                        && r.project_code.as_ref() == Some(code_ref)
                })
                .map(|r| r.amount)
                .sum();
            Some((
                EventType::ReservationSettled,
                json!({
                    "app": app,
                    "project_code": code,
                    "amount": kept,
                    "returned": returned,
                    "settled_by": change.settled_by.map(|b| b.as_str()),
                }),
            ))
        }
        EntryKind::Deduct | EntryKind::Void => None,
    }
}

/// Writes `events` to the outbox in the caller's transaction (nothing, and
/// no statement, when there are none), stamped `at`.
pub async fn write(
    tx: &impl GenericClient,
    events: &[Derived],
    at: OffsetDateTime,
) -> Result<(), DbError> {
    if events.is_empty() {
        return Ok(());
    }
    let rows: Vec<outbox::Event<'_>> = events
        .iter()
        .map(|d| outbox::Event {
            user_id: d.user_id.as_str(),
            kind: d.kind,
            data: d.data.clone(),
            correlation_id: d.correlation_id.as_deref(),
        })
        .collect();
    outbox::enqueue_events(tx, &rows, at).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{NewEntry, Returned};
    use crate::snapshot::{Account, Drawn, LotFate};
    use penora_domain::{AppName, ProjectCode};

    fn user() -> UserId {
        UserId::parse("u1").expect("a valid user id")
    }

    fn snap(threshold: Option<i64>) -> Snapshot {
        let mut s = Snapshot::at(OffsetDateTime::UNIX_EPOCH);
        s.accounts.insert(
            user(),
            Account {
                balance: 0,
                lots: Vec::new(),
                threshold,
                spending: None,
                chain: Default::default(),
            },
        );
        s
    }

    /// A plan of one entry per amount, from `start`.
    fn moves(start: i64, amounts: &[i64]) -> Plan {
        let mut plan = Plan::default();
        let mut balance = start;
        for &amount in amounts {
            balance += amount;
            plan.entry(NewEntry {
                user_id: user(),
                kind: if amount > 0 {
                    EntryKind::Grant
                } else {
                    EntryKind::Deduct
                },
                amount,
                balance_after: balance,
                app_name: AppName::penora(),
                description: None,
                project_code: None,
                reference: None,
                correlation_id: None,
                acted_by: None,
            });
        }
        plan
    }

    fn kinds(events: &[Derived]) -> Vec<(&'static str, i64)> {
        events
            .iter()
            .filter(|e| e.kind != EventType::CreditsGranted)
            .map(|e| (e.kind.as_str(), e.data["balance"].as_i64().unwrap_or(-1)))
            .collect()
    }

    #[test]
    fn low_fires_once_per_crossing_and_re_arms_at_the_threshold() {
        // 15 → 12 → 8 → 5 → 3, then a grant to 20 and a fall to 9, then 0.
        let plan = moves(15, &[-3, -4, -3, -2, 17, -11, -9]);
        let got = derive(&plan, &snap(None), &[], 10);
        assert_eq!(
            kinds(&got),
            vec![
                ("balance.low", 8),
                ("balance.low", 9),
                ("balance.depleted", 0)
            ]
        );
    }

    #[test]
    fn the_accounts_own_threshold_wins_over_the_default() {
        let plan = moves(15, &[-3, -4]);
        assert_eq!(
            kinds(&derive(&plan, &snap(Some(13)), &[], 10)),
            vec![("balance.low", 12)]
        );
        assert!(derive(&plan, &snap(Some(0)), &[], 10).is_empty());
    }

    #[test]
    fn a_refund_taken_back_at_once_is_one_step_not_a_rise_and_a_fall() {
        // Balance 8 (below 10): a refund of 6 to a voided lot goes up to
        // 14 and straight back to 8; no balance.low may follow.
        let u = user();
        let app = AppName::imagegene();
        let code = ProjectCode::parse("p1").expect("a valid code");
        let mut drawn = vec![Drawn {
            lot_id: 2,
            drawn: 6,
            returned: 0,
            fate: LotFate::Voided,
        }];
        let mut balance = 8;
        let mut plan = Plan::default();
        plan.give_back(
            Returned {
                user: &u,
                app: &app,
                code: &code,
                amount: 6,
                reason: Some("failed"),
                reference: None,
                correlation_id: None,
                acted_by: None,
                made_at: OffsetDateTime::UNIX_EPOCH,
            },
            &mut drawn,
            &mut balance,
        )
        .expect("the lot took the refund");
        assert_eq!(plan.entries.len(), 2);
        let got = derive(&plan, &snap(None), &[], 10);
        assert_eq!(
            got.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
            ["credits.refunded"]
        );
        assert_eq!(got[0].data["balance"], 8, "the balance after the step");
    }

    #[test]
    fn a_deduction_that_crosses_nothing_implies_no_event() {
        let plan = moves(50, &[-5, -5]);
        assert!(derive(&plan, &snap(None), &[], 10).is_empty());
    }

    #[test]
    fn a_fall_from_above_to_zero_is_low_then_depleted() {
        let plan = moves(15, &[-15]);
        assert_eq!(
            kinds(&derive(&plan, &snap(None), &[], 10)),
            vec![("balance.low", 0), ("balance.depleted", 0)]
        );
    }
}
