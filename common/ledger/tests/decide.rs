//! The pure `decide` of every movement against the model, by property,
//! without a database: any history of grants (paid and promotional lots,
//! priorities, expiries), deductions (with repeated keys), refunds (whole or
//! in parts, with repeated references), settlements (for less), voids, the
//! timer's work and a clock moved forward gets, at every step, the answer
//! the model predicts; the plans written to the tables in memory keep the
//! invariants (each balance is its entries' sum and its lots' sum, no lot
//! below zero, no draw from a lot past its expiry, keys claimed once).
//!
//! Then batches: a batch of deductions or refunds of many users, decided
//! at once, answers what the same requests decided one at a time answer,
//! leaves the same tables, and implies the same events out (each user's
//! `balance.low`, `balance.depleted`, `credits.refunded`, `credits.expired`,
//! in order, with the same data).
//!
//! 10,000 generated histories per property (`PROPTEST_CASES` does not
//! lower it): the database-backed twin of the first is `state_machine.rs`.

mod memory;
mod model;

use memory::Memory;
use model::{Got, Op, Request, World, app, history, key, settle_of, user};
use penora_domain::{AppName, Credits, ProjectCode, ReservationState, SettledBy, UserId};
use penora_ledger::{
    Answer, Deduct, DeductReceipt, Grant, LotCategory, Queued, QueuedRefund, Refund, RefundReceipt,
    Void, steps,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use time::{OffsetDateTime, macros::datetime};

/// The instant the histories begin.
const BASE: OffsetDateTime = datetime!(2026-12-06 12:00 UTC);

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

/// Carries out `req` on `m` at `now` the way the ledger's transactions do:
/// read a snapshot, decide, write the plan (or nothing).
fn carry_out(m: &mut Memory, req: &Request, now: OffsetDateTime) -> Result<Got, TestCaseError> {
    let user = user();
    let app = app();
    Ok(match req {
        Request::Grant(g) => {
            // The account is made inside the grant's transaction.
            let mut next = m.clone();
            next.open(&g.user_id);
            let snap = next.snapshot(&[&g.user_id], now);
            match steps::decide_grant(&snap, g, None) {
                Ok((mut answer, plan)) if !answer.replayed => {
                    let applied = next.apply(&plan, now).map_err(fail)?;
                    steps::complete_grant(&mut answer.value, &plan, &applied).map_err(fail)?;
                    *m = next;
                    Got::Grant(Ok(answer))
                }
                other => Got::Grant(other.map(|(answer, _)| answer)),
            }
        }
        Request::Deduct(d) => Got::Deduct(deducts(m, std::slice::from_ref(d), now)?.remove(0)),
        Request::Refund(r) => Got::Refund(refunds(m, std::slice::from_ref(r), now)?.remove(0)),
        Request::Settle { code, charge } => {
            let code = key(*code);
            let s = settle_of(&user, &app, &code, SettledBy::Final, *charge);
            Got::Settle(settle(m, &s, now)?)
        }
        Request::Void(None) => Got::Nothing,
        Request::Void(Some(lot_id)) => {
            let v = Void {
                user_id: &user,
                lot_id: *lot_id,
                reason: "test",
                only_app: None,
                correlation_id: None,
                acted_by: None,
            };
            let snap = m.snapshot(&[&user], now);
            match steps::decide_void(&snap, &v) {
                Ok((answer, plan)) => {
                    write(m, &plan, now)?;
                    Got::Void(Ok(answer))
                }
                Err(e) => Got::Void(Err(e)),
            }
        }
        Request::Timer(due) => {
            let snap = m.snapshot(&[&user], now);
            let (_, plan) = steps::decide_expiry(&snap, &user).map_err(fail)?;
            write(m, &plan, now)?;
            let mut settled = Vec::new();
            for code in due {
                let code = key(*code);
                let s = settle_of(&user, &app, &code, SettledBy::Window, None);
                settled.push(settle(m, &s, now)?.map(|r| r.result));
            }
            Got::Timer(settled)
        }
        Request::Advance(_) => Got::Nothing,
    })
}

/// Writes `plan` as the movements do: nothing (a rollback) when it is
/// empty.
fn write(
    m: &mut Memory,
    plan: &penora_ledger::plan::Plan,
    now: OffsetDateTime,
) -> Result<(), TestCaseError> {
    if !plan.is_empty() {
        m.apply(plan, now).map_err(fail)?;
    }
    Ok(())
}

fn settle(
    m: &mut Memory,
    s: &penora_ledger::Settle<'_>,
    now: OffsetDateTime,
) -> Result<Result<penora_ledger::SettleReceipt, penora_ledger::LedgerError>, TestCaseError> {
    let key = (
        s.user_id.clone(),
        s.app_name.cloned().unwrap_or_else(app),
        s.project_code.clone(),
    );
    let snap = m.snapshot(&[s.user_id], now);
    Ok(match steps::decide_settle(&snap, &key, s) {
        Ok((receipt, plan)) => {
            write(m, &plan, now)?;
            Ok(receipt)
        }
        Err(e) => Err(e),
    })
}

/// Deductions `batch` as the ledger's group commit carries them out: each
/// transaction takes the requests up to the first repeated key.
fn deducts(
    m: &mut Memory,
    batch: &[Deduct],
    now: OffsetDateTime,
) -> Result<Vec<Answer<DeductReceipt>>, TestCaseError> {
    let queued: Vec<Queued> = batch
        .iter()
        .map(|d| Queued {
            deduct: d.clone(),
            correlation_id: None,
        })
        .collect();
    let mut answers = Vec::new();
    while answers.len() < queued.len() {
        let live = steps::live_deducts(&queued[answers.len()..]);
        let users: Vec<&UserId> = live.iter().map(|q| &q.deduct.user_id).collect();
        let snap = m.snapshot(&users, now);
        let (got, plan) = steps::decide_deducts(&snap, live).map_err(fail)?;
        prop_assert_eq!(got.len(), live.len());
        write(m, &plan, now)?;
        m.record_out(&plan, &snap);
        answers.extend(got);
    }
    Ok(answers)
}

/// Refunds `batch`, as [`deducts`] does deductions.
fn refunds(
    m: &mut Memory,
    batch: &[Refund],
    now: OffsetDateTime,
) -> Result<Vec<Answer<RefundReceipt>>, TestCaseError> {
    let queued: Vec<QueuedRefund> = batch
        .iter()
        .map(|r| QueuedRefund {
            refund: r.clone(),
            event_id: None,
            correlation_id: None,
            event_time: None,
        })
        .collect();
    let mut answers = Vec::new();
    while answers.len() < queued.len() {
        let live = steps::live_refunds(&queued[answers.len()..]);
        let users: Vec<&UserId> = live.iter().map(|q| &q.refund.user_id).collect();
        let snap = m.snapshot(&users, now);
        let (got, plan) = steps::decide_refunds(&snap, live).map_err(fail)?;
        prop_assert_eq!(got.len(), live.len());
        write(m, &plan, now)?;
        m.record_out(&plan, &snap);
        answers.extend(got);
    }
    Ok(answers)
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut w = World::default();
    let mut m = Memory::default();
    let user = user();
    // Each step runs a little later than the model's instant (a
    // millisecond more per step), as a database's steps do: the model's
    // boundaries are "at or just after" (a lot is past its expiry from its
    // instant on; a window is closed just after its instant). The exact
    // instants are the unit tests' of `window` and `snapshot`.
    let instant = |secs: i64, step: i64| {
        BASE + time::Duration::seconds(secs) + time::Duration::milliseconds(step)
    };
    for (step, op) in (1..).zip(history(ops)) {
        let now = instant(w.now, step);
        let req = w.request(&op, now);
        let got = carry_out(&mut m, &req, now)?;
        w.check(&op, &req, got)?;
        // After every step: what the user can spend is the model's.
        let now = instant(w.now, step);
        let spendable = m
            .snapshot(&[&user], now)
            .accounts
            .get(&user)
            .map(|a| a.spendable_at(now));
        prop_assert_eq!(spendable, Some(w.spendable()), "spendable at {}", w.now);
    }
    // The stored states are the model's.
    let stored: std::collections::HashMap<String, (ReservationState, i64)> = m
        .reservations
        .iter()
        .map(|(k, r)| (k.2.to_string(), (r.state, r.refunded)))
        .collect();
    prop_assert_eq!(stored, w.states());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10_000, ..ProptestConfig::default() })]

    #[test]
    fn every_decision_is_the_models_and_every_plan_keeps_the_invariants(
        ops in proptest::collection::vec(model::op(), 1..40)
    ) {
        run(ops)?;
    }
}

// ------------------------------------------------------------ batches

/// A request of a generated batch: user `user` (of 0..8; 7 has no account)
/// deducts `amount` under key `code`, or refunds it.
#[derive(Debug, Clone)]
enum Step {
    Deduct {
        user: u8,
        code: u8,
        amount: i64,
    },
    Refund {
        user: u8,
        code: u8,
        amount: Option<i64>,
        reference: Option<u8>,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0u8..8, 0u8..4, 1i64..12).prop_map(|(user, code, amount)| Step::Deduct { user, code, amount }),
        2 => (0u8..8, 0u8..4, proptest::option::of(1i64..6), proptest::option::of(0u8..2))
            .prop_map(|(user, code, amount, reference)| Step::Refund { user, code, amount, reference }),
    ]
}

fn user_n(n: u8) -> UserId {
    UserId::parse(&format!("u{n}")).expect("a valid user id")
}

fn code_n(n: u8) -> ProjectCode {
    ProjectCode::parse(&format!("c{n}")).expect("a valid code")
}

/// Users 0..7 with a paid lot and a promotional one expiring soon; users 0
/// to 2 have their own low-balance threshold (0, 15, 30), the others the
/// default (10).
fn seeded() -> Result<Memory, TestCaseError> {
    let mut m = Memory::default();
    for (n, threshold) in [(0u8, 0i64), (1, 15), (2, 30)] {
        m.thresholds.insert(user_n(n), threshold);
    }
    for n in 0..7u8 {
        for (i, (category, amount, expires)) in [
            (LotCategory::Paid, 20 + i64::from(n), None),
            (
                LotCategory::Promotional,
                5,
                Some(BASE + time::Duration::seconds(30)),
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let g = Grant {
                user_id: user_n(n),
                amount: Credits::new("amount", amount, i64::MAX).map_err(fail)?,
                app_name: AppName::penora(),
                reason: "seed".into(),
                reference: format!("seed-{i}"),
                category,
                priority: category.default_priority(),
                expires_at: expires,
                acted_by: None,
            };
            let got = carry_out(&mut m, &Request::Grant(g), BASE)?;
            prop_assert!(matches!(got, Got::Grant(Ok(_))), "{got:?}");
        }
    }
    Ok(m)
}

/// Runs `steps` in runs of one kind: each run as one batch on `batched`,
/// one request at a time on `alone`; every answer must match.
fn differential(steps: &[Step], now: OffsetDateTime) -> Result<(Memory, Memory), TestCaseError> {
    let mut batched = seeded()?;
    let mut alone = batched.clone();
    let mut i = 0;
    while i < steps.len() {
        let deducting = matches!(steps[i], Step::Deduct { .. });
        let run: Vec<&Step> = steps[i..]
            .iter()
            .take_while(|s| matches!(s, Step::Deduct { .. }) == deducting)
            .collect();
        i += run.len();
        if deducting {
            let batch: Vec<Deduct> = run
                .iter()
                .filter_map(|s| match **s {
                    Step::Deduct { user, code, amount } => Some(Deduct {
                        user_id: user_n(user),
                        amount: Credits::new("amount", amount, i64::MAX).ok()?,
                        app_name: app(),
                        description: None,
                        project_code: code_n(code),
                        refund_window: std::time::Duration::from_secs(60),
                    }),
                    Step::Refund { .. } => None,
                })
                .collect();
            let together = deducts(&mut batched, &batch, now)?;
            for (d, got) in batch.iter().zip(together) {
                let one = deducts(&mut alone, std::slice::from_ref(d), now)?.remove(0);
                prop_assert_eq!(format!("{got:?}"), format!("{one:?}"), "deduct {:?}", d);
            }
        } else {
            let batch: Vec<Refund> = run
                .iter()
                .filter_map(|s| match **s {
                    Step::Refund {
                        user,
                        code,
                        amount,
                        reference,
                    } => Some(Refund {
                        user_id: user_n(user),
                        project_code: code_n(code),
                        app_name: if code % 2 == 0 { Some(app()) } else { None },
                        reason: None,
                        amount,
                        reference: reference.map(|r| format!("r{r}")),
                        acted_by: None,
                    }),
                    Step::Deduct { .. } => None,
                })
                .collect();
            let together = refunds(&mut batched, &batch, now)?;
            for (r, got) in batch.iter().zip(together) {
                let one = refunds(&mut alone, std::slice::from_ref(r), now)?.remove(0);
                prop_assert_eq!(format!("{got:?}"), format!("{one:?}"), "refund {:?}", r);
            }
        }
    }
    Ok((batched, alone))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10_000, ..ProptestConfig::default() })]

    #[test]
    fn a_batch_answers_and_writes_what_its_requests_one_at_a_time_do(
        steps in proptest::collection::vec(step(), 1..24),
        late in any::<bool>(),
    ) {
        // Late: the promotional lots are past their expiry, and the first
        // movement of each user writes it.
        let now = BASE + time::Duration::seconds(if late { 40 } else { 1 });
        let (batched, alone) = differential(&steps, now)?;
        prop_assert_eq!(&batched.balances, &alone.balances);
        let rows = |m: &Memory| -> Vec<String> {
            let mut rows: Vec<String> = m
                .entries
                .iter()
                .map(|e| format!("{} {:?} {} {} {:?}", e.user, e.kind, e.amount, e.balance_after, e.code))
                .collect();
            // Ids differ (one transaction against several); each user's
            // entries, in order, may not.
            rows.sort_by_key(|r| r.split(' ').next().map(str::to_owned));
            rows
        };
        prop_assert_eq!(rows(&batched), rows(&alone));
        let states = |m: &Memory| -> std::collections::BTreeMap<String, (ReservationState, i64)> {
            m.reservations.iter().map(|(k, r)| (format!("{k:?}"), (r.state, r.refunded))).collect()
        };
        prop_assert_eq!(states(&batched), states(&alone));
        // The events out: each user's, in order, are the same (events of
        // different users may interleave differently).
        let out = |m: &Memory| -> std::collections::BTreeMap<String, Vec<String>> {
            let mut by_user: std::collections::BTreeMap<String, Vec<String>> = Default::default();
            for (u, kind, data) in &m.out {
                by_user.entry(u.to_string()).or_default().push(format!("{kind} {data}"));
            }
            by_user
        };
        prop_assert_eq!(out(&batched), out(&alone));
    }
}

/// The property above compares events only if batches make some: fixed
/// batches that cross users' thresholds, one of them twice, with a refund
/// between, early and late (the promotional lots past their expiry).
#[test]
fn a_batch_crossing_thresholds_emits_what_one_at_a_time_does() -> Result<(), TestCaseError> {
    let d = |user, code, amount| Step::Deduct { user, code, amount };
    let r = |user, code| Step::Refund {
        user,
        code,
        amount: None,
        reference: None,
    };
    // User 3 (23 paid + 5 promotional, threshold 10): 28 → 18 → 6 (low) →
    // refunded to 18 → 6 (low again) → 0 (depleted); late, the promotional
    // 5 expire first (23 → 13 → 1 …). User 1 (threshold 15): 26 → 14 (low).
    for late in [false, true] {
        let rest = if late { 1 } else { 6 };
        let steps = [
            d(3, 0, 10),
            d(3, 1, 12),
            d(1, 0, 12),
            r(3, 1),
            d(3, 2, 12),
            d(3, 3, rest),
        ];
        let now = BASE + time::Duration::seconds(if late { 40 } else { 1 });
        let (batched, alone) = differential(&steps, now)?;
        for u in ["u1", "u3"] {
            let of = |m: &Memory| -> Vec<(String, String)> {
                m.out
                    .iter()
                    .filter(|(who, _, _)| who.as_str() == u)
                    .map(|(_, k, data)| (k.clone(), data.clone()))
                    .collect()
            };
            prop_assert_eq!(of(&batched), of(&alone));
        }
        let kinds: Vec<(&str, &str)> = batched
            .out
            .iter()
            .map(|(u, k, _)| (u.as_str(), k.as_str()))
            .collect();
        let lows = kinds
            .iter()
            .filter(|k| **k == ("u3", "balance.low"))
            .count();
        prop_assert_eq!(lows, 2, "{:?}", kinds);
        prop_assert!(kinds.contains(&("u3", "balance.depleted")), "{:?}", kinds);
        prop_assert!(kinds.contains(&("u1", "balance.low")), "{:?}", kinds);
        prop_assert!(kinds.contains(&("u3", "credits.refunded")), "{:?}", kinds);
        prop_assert_eq!(
            kinds.contains(&("u3", "credits.expired")),
            late,
            "{:?}",
            kinds
        );
    }
    Ok(())
}
