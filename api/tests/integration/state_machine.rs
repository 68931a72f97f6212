//! The credit state machine against the real database, by property: any
//! sequence of grants (paid and promotional lots, with priorities and
//! expiries), deducts (with repeated keys), refunds (whole or in parts, with
//! repeated references), settlements (for less), voids, the timer's work and
//! a clock moved forward keeps the invariants, and every answer is the one a
//! simple model predicts. At the end, the balance at every past step is
//! asked of the ledger and compared with the model's. Each generated case
//! runs on a fresh database.

use std::{collections::HashMap, time::Duration};

use penora_domain::{AppName, Credits, ProjectCode, ReservationState, UserId};
use penora_ledger as ledger;
use penora_ledger::reconcile;
use penora_ledger::{
    Deduct, Grant, LedgerError, LotCategory, Refund, Settle, SettleResult, SettledBy,
};
use penora_store as db;
use penora_testing::{TestDb, travel};
use proptest::prelude::*;
use time::OffsetDateTime;

/// Seconds of the model's clock; every step of it is a multiple of 5 s and
/// every expiry and window a multiple of 10 s, so that the few milliseconds
/// the test itself takes never decide a boundary.
type Secs = i64;

#[derive(Debug, Clone)]
enum Op {
    Grant {
        amount: i64,
        promotional: bool,
        priority: Option<i32>,
        expires_in: Option<Secs>,
    },
    /// Deduct `amount` under key `code`; `short` gives it a 30 s window.
    Deduct {
        code: u8,
        amount: i64,
        short: bool,
    },
    Refund {
        code: u8,
        amount: Option<i64>,
        reference: Option<u8>,
    },
    Settle {
        code: u8,
        charge: Option<i64>,
    },
    Void {
        lot: u8,
    },
    /// The worker's timer: lots past their expiry, windows passed.
    Timer,
    Advance {
        secs: Secs,
    },
}

fn op() -> impl Strategy<Value = Op> {
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

/// What the model knows of a lot.
#[derive(Debug, Clone)]
struct MLot {
    id: i64,
    promotional: bool,
    priority: i32,
    expires: Option<Secs>,
    /// The exact expiry the database holds (its clock at the grant + the
    /// seconds): two lots granted "60 s from now" at two instants expire
    /// apart, and the burn-down order sees it.
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
struct MRes {
    amount: i64,
    refunded: i64,
    state: ReservationState,
    window_only: bool,
    until: Secs,
    /// (lot index, drawn, given back), in the order drawn.
    drawn: Vec<(usize, i64, i64)>,
    /// Refunds by reference: amount.
    references: HashMap<u8, i64>,
    /// The last refund's amount (what a replayed whole refund answers).
    last_refund: Option<i64>,
}

struct World {
    now: Secs,
    lots: Vec<MLot>,
    res: HashMap<u8, MRes>,
}

/// Allocations as (lot id, amount).
fn pairs(allocations: &[ledger::Allocation]) -> Vec<(i64, i64)> {
    allocations.iter().map(|a| (a.lot_id, a.amount)).collect()
}

impl World {
    /// The model's allocations of a reservation, as (lot id, amount).
    fn allocations(&self, drawn: &[(usize, i64, i64)]) -> Vec<(i64, i64)> {
        drawn
            .iter()
            .map(|&(i, a, _)| (self.lots[i].id, a))
            .collect()
    }

    fn spendable(&self) -> i64 {
        self.lots.iter().map(|l| l.spendable(self.now)).sum()
    }

    /// Gives `amount` of `code` back, the last lot drawn first; returns what
    /// becomes spendable again.
    fn give_back(&mut self, code: u8, mut amount: i64) -> i64 {
        let now = self.now;
        let r = self.res.get_mut(&code).expect("reservation");
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
}

fn key(code: u8) -> ProjectCode {
    ProjectCode::parse(&format!("k{code}")).expect("code")
}

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let db = TestDb::new().await;
    let pool = db::pool_with(&db.url, 2, 5000).expect("pool");
    let mut c = pool.get().await.expect("client");
    let user = UserId::parse("sm").expect("user");
    let app = AppName::parse("app_name", "imagegene").expect("app");
    let mut w = World {
        now: 0,
        lots: Vec::new(),
        res: HashMap::new(),
    };
    // (the database's clock after each step, the model's spendable then)
    let mut history: Vec<(OffsetDateTime, i64)> = Vec::new();
    let mut grants = 0;
    let ops = std::iter::once(Op::Grant {
        amount: 30,
        promotional: false,
        priority: None,
        expires_in: None,
    })
    .chain(ops);
    for op in ops {
        match op {
            Op::Grant {
                amount,
                promotional,
                priority,
                expires_in,
            } => {
                grants += 1;
                let category = if promotional {
                    LotCategory::Promotional
                } else {
                    LotCategory::Paid
                };
                let priority = priority.unwrap_or(category.default_priority());
                let db_now: OffsetDateTime =
                    c.query_one("SELECT now()", &[]).await.expect("now").get(0);
                let g = Grant {
                    user_id: user.clone(),
                    amount: Credits::new("amount", amount, i64::MAX).expect("amount"),
                    app_name: AppName::parse("app_name", "penora").expect("app"),
                    reason: "grant".into(),
                    reference: format!("g{grants}"),
                    category,
                    priority,
                    expires_at: expires_in.map(|s| db_now + time::Duration::seconds(s)),
                };
                let expires_at = g.expires_at;
                let got = ledger::grant(&mut c, &g, None).await.expect("grant");
                w.lots.push(MLot {
                    id: got.value.lot_id,
                    promotional,
                    priority,
                    expires: expires_in.map(|s| w.now + s),
                    expires_at,
                    remaining: amount,
                    voided: false,
                });
                prop_assert_eq!(
                    got.value.new_balance,
                    w.spendable(),
                    "a grant's new balance"
                );
            }
            Op::Deduct {
                code,
                amount,
                short,
            } => {
                let d = Deduct {
                    user_id: user.clone(),
                    amount: Credits::new("amount", amount, i64::MAX).expect("amount"),
                    app_name: app.clone(),
                    description: None,
                    project_code: key(code),
                    refund_window: Duration::from_secs(if short { 30 } else { 3600 }),
                };
                let got = ledger::deduct(&mut c, &d, None).await;
                let spendable = w.spendable();
                match (w.res.get(&code).cloned(), got) {
                    (None, Ok(o)) => {
                        prop_assert!(amount <= spendable && !o.replayed);
                        // Draw in burn-down order.
                        let mut order: Vec<usize> = (0..w.lots.len())
                            .filter(|&i| w.lots[i].spendable(w.now) > 0)
                            .collect();
                        order.sort_by_key(|&i| w.lots[i].order());
                        let mut left = amount;
                        let mut drawn = Vec::new();
                        for i in order {
                            if left == 0 {
                                break;
                            }
                            let part = left.min(w.lots[i].remaining);
                            w.lots[i].remaining -= part;
                            left -= part;
                            drawn.push((i, part, 0));
                        }
                        prop_assert_eq!(
                            pairs(&o.value.allocations),
                            w.allocations(&drawn),
                            "allocations"
                        );
                        prop_assert_eq!(o.value.new_balance, spendable - amount);
                        w.res.insert(
                            code,
                            MRes {
                                amount,
                                refunded: 0,
                                state: ReservationState::Reserved,
                                window_only: false,
                                until: w.now + if short { 30 } else { 3600 },
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
                            w.allocations(&m.drawn),
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
            }
            Op::Refund {
                code,
                amount,
                reference,
            } => {
                let r = Refund {
                    user_id: user.clone(),
                    project_code: key(code),
                    app_name: Some(app.clone()),
                    reason: None,
                    amount,
                    reference: reference.map(|n| format!("r{n}")),
                };
                let got = ledger::refund(&mut c, &r, None).await;
                let before = w.spendable();
                let Some(m) = w.res.get(&code).cloned() else {
                    prop_assert!(matches!(got, Err(LedgerError::NotFound(_))), "{got:?}");
                    continue;
                };
                let seen = reference.and_then(|n| m.references.get(&n).copied());
                let left = m.amount - m.refunded;
                let open = matches!(
                    m.state,
                    ReservationState::Reserved | ReservationState::PartiallyRefunded
                );
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
                                || w.now >= m.until,
                            "{m:?} at {}",
                            w.now
                        );
                    }
                    Err(LedgerError::Invalid {
                        field: "amount", ..
                    }) => {
                        prop_assert!(open && amount.is_some_and(|a| a > left));
                    }
                    Ok(o) => {
                        prop_assert!(open && w.now < m.until && !o.replayed, "{m:?}");
                        let part = amount.unwrap_or(left);
                        prop_assert!(part <= left);
                        let back = w.give_back(code, part);
                        let r = w.res.get_mut(&code).expect("res");
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
            }
            Op::Settle { code, charge } => {
                let s = Settle {
                    user_id: &user,
                    app_name: Some(&app),
                    project_code: &key(code),
                    by: SettledBy::Final,
                    reason: "test",
                    charge,
                    reference: None,
                    correlation_id: None,
                    event_id: None,
                    event_time: None,
                };
                let got = ledger::settle_for(&mut c, &s).await;
                let before = w.spendable();
                let Some(m) = w.res.get(&code).cloned() else {
                    prop_assert!(matches!(got, Err(LedgerError::NotFound(_))), "{got:?}");
                    continue;
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
                        prop_assert!(w.now >= m.until, "{m:?}");
                    }
                    Ok(_) if charge.is_some_and(|c| c < left) && w.now >= m.until => {
                        prop_assert!(false, "settled {code} for less after its window: {m:?}");
                    }
                    Ok(o) => {
                        let charged = charge.unwrap_or(left);
                        let rest = left - charged;
                        let back = w.give_back(code, rest);
                        let r = w.res.get_mut(&code).expect("res");
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
            }
            Op::Void { lot } => {
                let Some(l) = w.lots.get(lot as usize).cloned() else {
                    continue;
                };
                let got = ledger::void_lot(&mut c, &user, l.id, ("test", None), None)
                    .await
                    .expect("void");
                if l.voided {
                    prop_assert!(got.replayed && got.value.status == "voided");
                } else if l.expired(w.now) {
                    prop_assert!(got.replayed && got.value.status == "expired");
                    prop_assert_eq!(got.value.credits_voided, 0);
                } else {
                    prop_assert!(!got.replayed && got.value.status == "voided");
                    prop_assert_eq!(got.value.credits_voided, l.remaining);
                    let m = &mut w.lots[lot as usize];
                    m.voided = true;
                    m.remaining = 0;
                }
                prop_assert_eq!(got.value.new_balance, w.spendable());
            }
            Op::Timer => {
                ledger::expire_lots(&mut c, user.as_str())
                    .await
                    .expect("expiry");
                let mut due: Vec<u8> = w
                    .res
                    .iter()
                    .filter(|(_, r)| {
                        matches!(
                            r.state,
                            ReservationState::Reserved | ReservationState::PartiallyRefunded
                        ) && w.now >= r.until
                    })
                    .map(|(k, _)| *k)
                    .collect();
                due.sort_unstable();
                for code in due {
                    let got = ledger::settle(
                        &mut c,
                        &user,
                        &app,
                        &key(code),
                        (SettledBy::Window, "window"),
                        None,
                        None,
                    )
                    .await
                    .expect("settled");
                    prop_assert_eq!(got, SettleResult::Settled);
                    let r = w.res.get_mut(&code).expect("res");
                    r.state = ReservationState::Settled;
                    r.window_only = true;
                }
            }
            Op::Advance { secs } => {
                travel(&mut c, Duration::from_secs(secs as u64)).await;
                w.now += secs;
                for (t, _) in history.iter_mut() {
                    *t -= time::Duration::seconds(secs);
                }
            }
        }
        // After every step: what the user can spend is the model's, the
        // balance is the ledger's sum, and the lots hold the balance.
        let summary = ledger::account_summary(&c, &user)
            .await
            .expect("summary")
            .expect("account");
        prop_assert_eq!(summary.balance, w.spendable(), "spendable at {}", w.now);
        let row = c
            .query_one(
                "SELECT (SELECT balance FROM accounts WHERE user_id = 'sm'), \
                        (SELECT sum(amount)::bigint FROM ledger_entries WHERE user_id = 'sm'), \
                        (SELECT sum(remaining)::bigint FROM credit_lots WHERE user_id = 'sm'), \
                        clock_timestamp()",
                &[],
            )
            .await
            .expect("sums");
        prop_assert_eq!(row.get::<_, i64>(0), row.get::<_, i64>(1));
        prop_assert_eq!(row.get::<_, i64>(0), row.get::<_, i64>(2));
        history.push((row.get(3), w.spendable()));
    }
    // The balance at every past step, from the ledger, is the model's.
    for (at, expected) in &history {
        let got = ledger::balance_at(&c, &user, *at)
            .await
            .expect("balance at")
            .expect("account");
        prop_assert_eq!(got, *expected, "balance at {}", at);
    }
    // The stored states are the model's, and every invariant holds.
    let stored: HashMap<String, (String, i64)> = c
        .query(
            "SELECT project_code, state, refunded_amount FROM reservations",
            &[],
        )
        .await
        .expect("states")
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    prop_assert_eq!(stored.len(), w.res.len());
    for (code, m) in &w.res {
        prop_assert_eq!(
            stored
                .get(&format!("k{code}"))
                .map(|(s, r)| (s.as_str(), *r)),
            Some((m.state.as_str(), m.refunded))
        );
    }
    let report = reconcile::run(&mut c, 1 << 40).await.expect("reconcile");
    prop_assert!(report.violations.is_empty(), "{:?}", report.violations);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn any_sequence_of_credit_events_keeps_the_invariants_and_matches_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(run(ops))?;
    }
}
