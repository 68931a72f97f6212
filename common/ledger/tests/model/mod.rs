//! The reference model of the credit rules: what a user of the ledger
//! expects, written as simply as it can be (one user, lots in a vector,
//! reservations by a small code), with no code shared with the ledger.
//!
//! Two drivers check the ledger against it, step by step: `decide.rs` runs
//! the pure `decide` of each movement on an in-memory copy of the tables
//! (thousands of cases, no database), `state_machine.rs` runs the movements
//! against PostgreSQL. Both generate the same [`Op`]s, build the same
//! requests ([`World::request`]) and hand every answer to [`World::check`],
//! which asserts it is the model's and moves the model on.

#![allow(dead_code)]

use std::{collections::HashMap, time::Duration};

use penora_domain::{AppName, Credits, ProjectCode, ReservationState, UserId};
use penora_ledger::{
    Allocation, Answer, Deduct, DeductReceipt, Grant, GrantReceipt, LedgerError, LotCategory,
    Refund, RefundReceipt, SettleReceipt, SettleResult, SettledBy, VoidReceipt,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use time::OffsetDateTime;

/// Seconds of the model's clock; every step of it is a multiple of 5 s and
/// every expiry and window a multiple of 10 s, so that the few milliseconds
/// a database test takes never decide a boundary.
pub type Secs = i64;

/// One step of a generated history.
#[derive(Debug, Clone)]
pub enum Op {
    /// A grant (paid or promotional, with a priority and an expiry).
    Grant {
        amount: i64,
        promotional: bool,
        priority: Option<i32>,
        expires_in: Option<Secs>,
    },
    /// Deduct `amount` under key `code`; `short` gives it a 30 s window.
    Deduct { code: u8, amount: i64, short: bool },
    /// A refund, whole or in part, with or without a reference.
    Refund {
        code: u8,
        amount: Option<i64>,
        reference: Option<u8>,
    },
    /// A final settlement, in full or for less.
    Settle { code: u8, charge: Option<i64> },
    /// A void of the `lot`-th lot granted.
    Void { lot: u8 },
    /// The worker's timer: lots past their expiry, windows passed.
    Timer,
    /// The clock moves on.
    Advance { secs: Secs },
}

/// Any step.
pub fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (1i64..20, any::<bool>(), proptest::option::of(prop_oneof![Just(10), Just(50)]),
              proptest::option::of(prop_oneof![Just(10), Just(20), Just(60)]))
            .prop_map(|(amount, promotional, priority, expires_in)| Op::Grant { amount, promotional, priority, expires_in }),
        4 => (0u8..6, 1i64..15, proptest::bool::weighted(0.3))
            .prop_map(|(code, amount, short)| Op::Deduct { code, amount, short }),
        3 => (0u8..6, proptest::option::of(1i64..8), proptest::option::of(0u8..3))
            .prop_map(|(code, amount, reference)| Op::Refund { code, amount, reference }),
        1 => (0u8..6, proptest::option::of(0i64..8)).prop_map(|(code, charge)| Op::Settle { code, charge }),
        1 => (0u8..6).prop_map(|lot| Op::Void { lot }),
        1 => Just(Op::Timer),
        2 => prop_oneof![Just(5), Just(15), Just(40)].prop_map(|secs| Op::Advance { secs }),
    ]
}

/// A history: a first paid grant of 30, then `ops`.
pub fn history(ops: Vec<Op>) -> impl Iterator<Item = Op> {
    std::iter::once(Op::Grant {
        amount: 30,
        promotional: false,
        priority: None,
        expires_in: None,
    })
    .chain(ops)
}

/// The one user of a history.
pub fn user() -> UserId {
    UserId::parse("sm").expect("a valid user id")
}

/// The app whose reservations a history makes.
pub fn app() -> AppName {
    AppName::imagegene()
}

/// Reservation key `code`.
pub fn key(code: u8) -> ProjectCode {
    ProjectCode::parse(&format!("k{code}")).expect("a valid code")
}

/// What the model knows of a lot.
#[derive(Debug, Clone)]
pub struct MLot {
    /// The ledger's id for it.
    pub id: i64,
    promotional: bool,
    priority: i32,
    expires: Option<Secs>,
    /// The exact expiry the ledger holds: two lots granted "60 s from now"
    /// at two instants expire apart, and the burn-down order sees it.
    expires_at: Option<OffsetDateTime>,
    remaining: i64,
    voided: bool,
}

impl MLot {
    fn expired(&self, now: Secs) -> bool {
        self.expires.is_some_and(|e| now >= e)
    }

    fn spendable(&self, now: Secs) -> i64 {
        if self.voided || self.expired(now) {
            0
        } else {
            self.remaining
        }
    }

    /// The burn-down order's key (lots are created in id order).
    fn order(&self) -> (i32, i128, bool, i64) {
        (
            self.priority,
            self.expires_at
                .map_or(i128::MAX, OffsetDateTime::unix_timestamp_nanos),
            !self.promotional,
            self.id,
        )
    }
}

/// What the model knows of a reservation.
#[derive(Debug, Clone)]
pub struct MRes {
    amount: i64,
    refunded: i64,
    /// Its state.
    pub state: ReservationState,
    window_only: bool,
    until: Secs,
    /// (lot index, drawn, given back), in the order drawn.
    drawn: Vec<(usize, i64, i64)>,
    /// Refunds by reference: amount.
    references: HashMap<u8, i64>,
    /// The last refund's amount (what a replayed whole refund answers).
    last_refund: Option<i64>,
}

impl MRes {
    /// Credits given back so far.
    pub fn refunded(&self) -> i64 {
        self.refunded
    }
}

/// The model's world: its clock, the lots in grant order, the reservations
/// by code.
#[derive(Debug, Default)]
pub struct World {
    /// Seconds since the history began.
    pub now: Secs,
    /// The lots, in grant order.
    pub lots: Vec<MLot>,
    /// The reservations, by code.
    pub res: HashMap<u8, MRes>,
    grants: usize,
}

/// A request a step makes of the ledger.
#[derive(Debug, Clone)]
pub enum Request {
    /// A grant.
    Grant(Grant),
    /// A deduction.
    Deduct(Deduct),
    /// A refund.
    Refund(Refund),
    /// A final settlement of `code`, for `charge` when given.
    Settle { code: u8, charge: Option<i64> },
    /// A void of lot `lot_id` (`None`: the history names a lot not granted;
    /// nothing is asked).
    Void(Option<i64>),
    /// The timer: expire, then settle each of these codes by its window.
    Timer(Vec<u8>),
    /// Move the clock.
    Advance(Duration),
}

/// What the ledger answered to a step.
#[derive(Debug)]
pub enum Got {
    /// A grant's answer.
    Grant(Answer<GrantReceipt>),
    /// A deduction's.
    Deduct(Answer<DeductReceipt>),
    /// A refund's.
    Refund(Answer<RefundReceipt>),
    /// A settlement's.
    Settle(Result<SettleReceipt, LedgerError>),
    /// A void's.
    Void(Answer<VoidReceipt>),
    /// The timer's window settlements, in the order asked.
    Timer(Vec<Result<SettleResult, LedgerError>>),
    /// Nothing (the clock moved, or the void named no lot).
    Nothing,
}

/// Allocations as (lot id, amount).
fn pairs(allocations: &[Allocation]) -> Vec<(i64, i64)> {
    allocations.iter().map(|a| (a.lot_id, a.amount)).collect()
}

impl World {
    /// What the user can spend now.
    pub fn spendable(&self) -> i64 {
        self.lots.iter().map(|l| l.spendable(self.now)).sum()
    }

    /// The model's allocations of a reservation, as (lot id, amount).
    fn allocations(&self, drawn: &[(usize, i64, i64)]) -> Vec<(i64, i64)> {
        drawn
            .iter()
            .map(|&(i, a, _)| (self.lots[i].id, a))
            .collect()
    }

    /// Gives `amount` of `code` back, the last lot drawn first; returns what
    /// becomes spendable again.
    fn give_back(&mut self, code: u8, mut amount: i64) -> i64 {
        let now = self.now;
        let r = self.res.get_mut(&code).expect("the reservation");
        let mut spendable = 0;
        for (lot, drawn, back) in r.drawn.iter_mut().rev() {
            let part = amount.min(*drawn - *back);
            if part == 0 {
                continue;
            }
            *back += part;
            amount -= part;
            let l = &mut self.lots[*lot];
            if !l.voided && !l.expired(now) {
                l.remaining += part;
                spendable += part;
            }
        }
        assert_eq!(amount, 0, "the model's lots took less than the refund");
        spendable
    }

    /// The request `op` makes, at the ledger's instant `at` (expiries are
    /// given as instants).
    pub fn request(&mut self, op: &Op, at: OffsetDateTime) -> Request {
        match *op {
            Op::Grant {
                amount,
                promotional,
                priority,
                expires_in,
            } => {
                self.grants += 1;
                let category = if promotional {
                    LotCategory::Promotional
                } else {
                    LotCategory::Paid
                };
                Request::Grant(Grant {
                    user_id: user(),
                    amount: Credits::new("amount", amount, i64::MAX).expect("an amount"),
                    app_name: AppName::penora(),
                    reason: "grant".into(),
                    reference: format!("g{}", self.grants),
                    category,
                    priority: priority.unwrap_or(category.default_priority()),
                    expires_at: expires_in.map(|s| at + time::Duration::seconds(s)),
                    acted_by: None,
                })
            }
            Op::Deduct {
                code,
                amount,
                short,
            } => Request::Deduct(Deduct {
                user_id: user(),
                amount: Credits::new("amount", amount, i64::MAX).expect("an amount"),
                app_name: app(),
                description: None,
                project_code: key(code),
                refund_window: Duration::from_secs(if short { 30 } else { 3600 }),
            }),
            Op::Refund {
                code,
                amount,
                reference,
            } => Request::Refund(Refund {
                user_id: user(),
                project_code: key(code),
                app_name: Some(app()),
                reason: None,
                amount,
                reference: reference.map(|n| format!("r{n}")),
                acted_by: None,
            }),
            Op::Settle { code, charge } => Request::Settle { code, charge },
            Op::Void { lot } => Request::Void(self.lots.get(lot as usize).map(|l| l.id)),
            Op::Timer => {
                let mut due: Vec<u8> = self
                    .res
                    .iter()
                    .filter(|(_, r)| r.state.holds() && self.now >= r.until)
                    .map(|(k, _)| *k)
                    .collect();
                due.sort_unstable();
                Request::Timer(due)
            }
            Op::Advance { secs } => Request::Advance(Duration::from_secs(secs as u64)),
        }
    }

    /// The database's history was moved back `secs` (`travel`, which the
    /// tests against PostgreSQL advance the clock with): every stored expiry
    /// moved back as far, so a lot granted after it compares with them
    /// moved. (The tests without a database move `now` instead.)
    pub fn travelled(&mut self, secs: Secs) {
        for l in &mut self.lots {
            l.expires_at = l.expires_at.map(|t| t - time::Duration::seconds(secs));
        }
    }

    /// Checks the ledger's answer `got` to `op` (whose request was `req`)
    /// against the model, and moves the model on.
    pub fn check(&mut self, op: &Op, req: &Request, got: Got) -> Result<(), TestCaseError> {
        match (op, req, got) {
            (
                &Op::Grant {
                    amount,
                    promotional,
                    expires_in,
                    ..
                },
                Request::Grant(g),
                Got::Grant(got),
            ) => {
                let got = got.map_err(|e| TestCaseError::fail(format!("grant: {e}")))?;
                prop_assert!(!got.replayed, "a new reference replayed");
                prop_assert_eq!(got.value.credits_added, amount);
                self.lots.push(MLot {
                    id: got.value.lot_id,
                    promotional,
                    priority: g.priority,
                    expires: expires_in.map(|s| self.now + s),
                    expires_at: g.expires_at,
                    remaining: amount,
                    voided: false,
                });
                prop_assert_eq!(
                    got.value.new_balance,
                    self.spendable(),
                    "a grant's new balance"
                );
            }
            (
                &Op::Deduct {
                    code,
                    amount,
                    short,
                },
                _,
                Got::Deduct(got),
            ) => self.check_deduct(code, amount, short, got)?,
            (
                &Op::Refund {
                    code,
                    amount,
                    reference,
                },
                _,
                Got::Refund(got),
            ) => self.check_refund(code, amount, reference, got)?,
            (&Op::Settle { code, charge }, _, Got::Settle(got)) => {
                self.check_settle(code, charge, got)?
            }
            (&Op::Void { lot }, Request::Void(Some(_)), Got::Void(got)) => {
                let l = self.lots[lot as usize].clone();
                let got = got.map_err(|e| TestCaseError::fail(format!("void: {e}")))?;
                if l.voided {
                    prop_assert!(got.replayed && got.value.status == "voided");
                } else if l.expired(self.now) {
                    prop_assert!(got.replayed && got.value.status == "expired");
                    prop_assert_eq!(got.value.credits_voided, 0);
                } else {
                    prop_assert!(!got.replayed && got.value.status == "voided");
                    prop_assert_eq!(got.value.credits_voided, l.remaining);
                    let m = &mut self.lots[lot as usize];
                    m.voided = true;
                    m.remaining = 0;
                }
                prop_assert_eq!(got.value.new_balance, self.spendable());
            }
            (Op::Void { .. }, Request::Void(None), Got::Nothing) => {}
            (Op::Timer, Request::Timer(due), Got::Timer(got)) => {
                prop_assert_eq!(due.len(), got.len());
                for (code, got) in due.iter().zip(got) {
                    prop_assert_eq!(got.ok(), Some(SettleResult::Settled), "window {}", code);
                    let r = self.res.get_mut(code).expect("the reservation");
                    r.state = ReservationState::Settled;
                    r.window_only = true;
                }
            }
            (&Op::Advance { secs }, _, Got::Nothing) => self.now += secs,
            (op, req, got) => {
                prop_assert!(false, "{op:?} asked {req:?} and got {got:?}")
            }
        }
        Ok(())
    }

    fn check_deduct(
        &mut self,
        code: u8,
        amount: i64,
        short: bool,
        got: Answer<DeductReceipt>,
    ) -> Result<(), TestCaseError> {
        let spendable = self.spendable();
        match (self.res.get(&code).cloned(), got) {
            (None, Ok(o)) => {
                prop_assert!(amount <= spendable && !o.replayed);
                // Draw in burn-down order.
                let mut order: Vec<usize> = (0..self.lots.len())
                    .filter(|&i| self.lots[i].spendable(self.now) > 0)
                    .collect();
                order.sort_by_key(|&i| self.lots[i].order());
                let mut left = amount;
                let mut drawn = Vec::new();
                for i in order {
                    if left == 0 {
                        break;
                    }
                    let part = left.min(self.lots[i].remaining);
                    self.lots[i].remaining -= part;
                    left -= part;
                    drawn.push((i, part, 0));
                }
                prop_assert_eq!(
                    pairs(&o.value.allocations),
                    self.allocations(&drawn),
                    "allocations"
                );
                prop_assert_eq!(o.value.new_balance, spendable - amount);
                self.res.insert(
                    code,
                    MRes {
                        amount,
                        refunded: 0,
                        state: ReservationState::Reserved,
                        window_only: false,
                        until: self.now + if short { 30 } else { 3600 },
                        drawn,
                        references: HashMap::new(),
                        last_refund: None,
                    },
                );
            }
            (None, Err(LedgerError::InsufficientCredits { balance, .. })) => {
                prop_assert!(amount > spendable);
                prop_assert_eq!(balance, spendable);
            }
            (Some(m), Ok(o)) => {
                prop_assert!(o.replayed, "a used key must replay");
                prop_assert_eq!(m.amount, amount);
                prop_assert_eq!(o.value.reservation_status, m.state);
                prop_assert_eq!(
                    pairs(&o.value.allocations),
                    self.allocations(&m.drawn),
                    "replayed allocations"
                );
            }
            (Some(m), Err(LedgerError::IdempotencyConflict(_))) => {
                prop_assert_ne!(m.amount, amount);
            }
            (m, other) => {
                prop_assert!(false, "deduct {code} {amount} with {m:?}: {other:?}")
            }
        }
        Ok(())
    }

    fn check_refund(
        &mut self,
        code: u8,
        amount: Option<i64>,
        reference: Option<u8>,
        got: Answer<RefundReceipt>,
    ) -> Result<(), TestCaseError> {
        let before = self.spendable();
        let Some(m) = self.res.get(&code).cloned() else {
            prop_assert!(matches!(got, Err(LedgerError::NotFound(_))), "{got:?}");
            return Ok(());
        };
        let seen = reference.and_then(|n| m.references.get(&n).copied());
        let left = m.amount - m.refunded;
        let open = m.state.holds();
        match got {
            Ok(o) if seen.is_some() => {
                prop_assert!(o.replayed);
                prop_assert_eq!(Some(o.value.credits_refunded), seen);
                prop_assert!(amount.is_none_or(|a| Some(a) == seen));
            }
            Err(LedgerError::IdempotencyConflict(_)) => {
                prop_assert!(seen.is_some() && amount.is_some() && amount != seen);
            }
            Ok(o) if m.state == ReservationState::Refunded => {
                prop_assert!(o.replayed && amount.is_none() && reference.is_none());
                prop_assert_eq!(o.value.credits_refunded, m.last_refund.unwrap_or(0));
            }
            Err(LedgerError::Invalid {
                field: "reference", ..
            }) => {
                prop_assert!(amount.is_some() && reference.is_none());
            }
            Err(LedgerError::NotRefundable(_)) => {
                prop_assert!(
                    m.state == ReservationState::Refunded
                        || m.state == ReservationState::Settled
                        || self.now >= m.until,
                    "{m:?} at {}",
                    self.now
                );
            }
            Err(LedgerError::Invalid {
                field: "amount", ..
            }) => {
                prop_assert!(open && amount.is_some_and(|a| a > left));
            }
            Ok(o) => {
                prop_assert!(open && self.now < m.until && !o.replayed, "{m:?}");
                let part = amount.unwrap_or(left);
                prop_assert!(part <= left);
                let back = self.give_back(code, part);
                let r = self.res.get_mut(&code).expect("the reservation");
                r.refunded += part;
                r.state = if r.refunded == r.amount {
                    ReservationState::Refunded
                } else {
                    ReservationState::PartiallyRefunded
                };
                if let Some(n) = reference {
                    r.references.insert(n, part);
                }
                r.last_refund = Some(part);
                prop_assert_eq!(o.value.credits_refunded, part);
                prop_assert_eq!(o.value.reservation_status, r.state);
                prop_assert_eq!(o.value.refunded_total, r.refunded);
                prop_assert_eq!(o.value.new_balance, before + back);
            }
            other => prop_assert!(
                false,
                "refund {code} {amount:?} {reference:?} with {m:?}: {other:?}"
            ),
        }
        Ok(())
    }

    fn check_settle(
        &mut self,
        code: u8,
        charge: Option<i64>,
        got: Result<SettleReceipt, LedgerError>,
    ) -> Result<(), TestCaseError> {
        let before = self.spendable();
        let Some(m) = self.res.get(&code).cloned() else {
            prop_assert!(matches!(got, Err(LedgerError::NotFound(_))), "{got:?}");
            return Ok(());
        };
        let left = m.amount - m.refunded;
        match got {
            Ok(o) if m.state == ReservationState::Refunded => {
                prop_assert_eq!(o.result, SettleResult::AlreadyRefunded);
            }
            Err(LedgerError::Invalid {
                field: "amount", ..
            }) => {
                prop_assert!(charge.is_some_and(|c| c > left));
            }
            Ok(o) if m.state == ReservationState::Settled && !m.window_only => {
                prop_assert_eq!(o.result, SettleResult::AlreadySettled);
                prop_assert!(charge.is_none_or(|c| c == left));
            }
            Err(LedgerError::IdempotencyConflict(_)) => {
                prop_assert!(m.state == ReservationState::Settled && !m.window_only);
                prop_assert!(charge.is_some_and(|c| c != left));
            }
            // What is not charged is a refund: only inside the window.
            Err(LedgerError::NotRefundable(_)) => {
                prop_assert!(charge.is_some_and(|c| c < left), "{m:?}");
                prop_assert!(self.now >= m.until, "{m:?}");
            }
            Ok(_) if charge.is_some_and(|c| c < left) && self.now >= m.until => {
                prop_assert!(false, "settled {code} for less after its window: {m:?}");
            }
            Ok(o) => {
                let charged = charge.unwrap_or(left);
                let rest = left - charged;
                let back = self.give_back(code, rest);
                let r = self.res.get_mut(&code).expect("the reservation");
                r.refunded += rest;
                if rest > 0 {
                    r.last_refund = Some(rest);
                }
                r.state = if r.refunded == r.amount {
                    ReservationState::Refunded
                } else {
                    ReservationState::Settled
                };
                r.window_only = false;
                prop_assert_eq!(o.reservation_status, r.state);
                prop_assert_eq!(o.credits_refunded, rest);
                prop_assert_eq!(o.new_balance, before + back);
            }
            other => prop_assert!(false, "settle {code} {charge:?} with {m:?}: {other:?}"),
        }
        Ok(())
    }

    /// The stored states the model expects: code → (state, refunded).
    pub fn states(&self) -> HashMap<String, (ReservationState, i64)> {
        self.res
            .iter()
            .map(|(code, r)| (format!("k{code}"), (r.state, r.refunded)))
            .collect()
    }
}

/// The settlement a step asks for, by its window or finally.
pub fn settle_of<'a>(
    user: &'a UserId,
    app: &'a AppName,
    code: &'a ProjectCode,
    by: SettledBy,
    charge: Option<i64>,
) -> penora_ledger::Settle<'a> {
    penora_ledger::Settle {
        user_id: user,
        app_name: Some(app),
        project_code: code,
        by,
        reason: if by == SettledBy::Window {
            "window"
        } else {
            "test"
        },
        charge,
        reference: None,
        correlation_id: None,
        event_id: None,
        event_time: None,
    }
}
