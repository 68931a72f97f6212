//! The reservation state machine against the real database, by property:
//! any sequence of deducts (with repeated keys), refunds, settlements and
//! expiries keeps the invariants, and every answer is the one a simple model
//! predicts. Each generated case runs on a fresh database.

use std::{collections::HashMap, time::Duration};

use penora_common::{
    db,
    domain::{AppName, Credits, ProjectCode, ReservationState, UserId},
    ledger::{self, Deduct, Grant, LedgerError, LotCategory, Refund, SettleResult},
    reconcile,
    testing::TestDb,
};
use proptest::prelude::*;

const START: i64 = 50;

#[derive(Debug, Clone)]
enum Op {
    /// Deduct `amount` under key `code`; `expired` gives it a zero refund window.
    Deduct {
        code: u8,
        amount: i64,
        expired: bool,
    },
    Refund {
        code: u8,
    },
    Settle {
        code: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..6, 1i64..30, proptest::bool::weighted(0.2))
            .prop_map(|(code, amount, expired)| Op::Deduct { code, amount, expired }),
        2 => (0u8..6).prop_map(|code| Op::Refund { code }),
        1 => (0u8..6).prop_map(|code| Op::Settle { code }),
    ]
}

/// What the model knows of a reservation.
#[derive(Debug, Clone, Copy)]
struct Model {
    amount: i64,
    state: ReservationState,
    expired: bool,
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
    ledger::grant(
        &mut c,
        &Grant {
            user_id: user.clone(),
            amount: Credits::new("amount", START, i64::MAX).expect("amount"),
            app_name: AppName::parse("app_name", "penora").expect("app"),
            reason: "start".into(),
            reference: "start".into(),
            category: LotCategory::Paid,
            priority: 50,
            expires_at: None,
        },
        None,
    )
    .await
    .expect("grant");
    let mut balance = START;
    let mut model: HashMap<u8, Model> = HashMap::new();
    for op in ops {
        match op {
            Op::Deduct {
                code,
                amount,
                expired,
            } => {
                let d = Deduct {
                    user_id: user.clone(),
                    amount: Credits::new("amount", amount, i64::MAX).expect("amount"),
                    app_name: app.clone(),
                    description: None,
                    project_code: key(code),
                    refund_window: if expired {
                        Duration::ZERO
                    } else {
                        Duration::from_secs(3600)
                    },
                };
                let got = ledger::deduct(&mut c, &d, None).await;
                match (model.get(&code).copied(), got) {
                    (None, Ok(o)) => {
                        prop_assert!(amount <= balance && !o.replayed);
                        balance -= amount;
                        prop_assert_eq!(o.value.new_balance, balance);
                        model.insert(
                            code,
                            Model {
                                amount,
                                state: ReservationState::Reserved,
                                expired,
                            },
                        );
                    }
                    (None, Err(LedgerError::InsufficientCredits { balance: b, .. })) => {
                        prop_assert!(amount > balance);
                        prop_assert_eq!(b, balance);
                    }
                    (Some(m), Ok(o)) => {
                        prop_assert!(o.replayed, "a used key must replay");
                        prop_assert_eq!(m.amount, amount);
                        prop_assert_eq!(o.value.reservation_status, m.state);
                    }
                    (Some(m), Err(LedgerError::IdempotencyConflict(_))) => {
                        prop_assert_ne!(m.amount, amount);
                    }
                    (m, other) => {
                        prop_assert!(false, "deduct {code} {amount} with {m:?}: {other:?}")
                    }
                }
            }
            Op::Refund { code } => {
                let r = Refund {
                    user_id: user.clone(),
                    project_code: key(code),
                    app_name: Some(app.clone()),
                    reason: None,
                    amount: None,
                    reference: None,
                };
                let got = ledger::refund(&mut c, &r, None).await;
                match (model.get(&code).copied(), got) {
                    (None, Err(LedgerError::NotFound(_))) => {}
                    (Some(m), Ok(o)) if m.state == ReservationState::Reserved && !m.expired => {
                        prop_assert!(!o.replayed);
                        balance += m.amount;
                        prop_assert_eq!(o.value.new_balance, balance);
                        model.insert(
                            code,
                            Model {
                                state: ReservationState::Refunded,
                                ..m
                            },
                        );
                    }
                    (Some(m), Ok(o)) if m.state == ReservationState::Refunded => {
                        prop_assert!(o.replayed, "a second refund replays");
                    }
                    (Some(m), Err(LedgerError::NotRefundable(_)))
                        if m.state == ReservationState::Settled || m.expired => {}
                    (m, other) => prop_assert!(false, "refund {code} with {m:?}: {other:?}"),
                }
            }
            Op::Settle { code } => {
                let got = ledger::settle(
                    &mut c,
                    &user,
                    &app,
                    &key(code),
                    (ledger::SettledBy::Final, "test"),
                    None,
                    None,
                )
                .await;
                match (model.get(&code).copied(), got) {
                    (None, Err(LedgerError::NotFound(_))) => {}
                    (Some(m), Ok(SettleResult::Settled))
                        if m.state == ReservationState::Reserved =>
                    {
                        model.insert(
                            code,
                            Model {
                                state: ReservationState::Settled,
                                ..m
                            },
                        );
                    }
                    (Some(m), Ok(SettleResult::AlreadySettled))
                        if m.state == ReservationState::Settled => {}
                    (Some(m), Ok(SettleResult::AlreadyRefunded))
                        if m.state == ReservationState::Refunded => {}
                    (m, other) => prop_assert!(false, "settle {code} with {m:?}: {other:?}"),
                }
            }
        }
        // After every step: the balance is the model's and the ledger's sum.
        let row = c
            .query_one(
                "SELECT (SELECT balance FROM accounts WHERE user_id = 'sm'), \
                        (SELECT sum(amount)::bigint FROM ledger_entries WHERE user_id = 'sm')",
                &[],
            )
            .await
            .expect("sums");
        prop_assert_eq!(row.get::<_, i64>(0), balance);
        prop_assert_eq!(row.get::<_, i64>(1), balance);
    }
    // The stored states are the model's, and every invariant holds.
    let stored: HashMap<String, String> = c
        .query("SELECT project_code, state FROM reservations", &[])
        .await
        .expect("states")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    prop_assert_eq!(stored.len(), model.len());
    for (code, m) in &model {
        prop_assert_eq!(
            stored.get(&format!("k{code}")).map(String::as_str),
            Some(m.state.as_str())
        );
    }
    let report = reconcile::run(&mut c, 1 << 40).await.expect("reconcile");
    prop_assert!(report.violations.is_empty(), "{:?}", report.violations);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn any_sequence_of_reservation_events_keeps_the_invariants(ops in proptest::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(run(ops))?;
    }
}
