//! The credit state machine against the real database, by property: the
//! model's histories (`model/mod.rs`: grants, deductions, refunds,
//! settlements, voids, the timer's work, a clock moved forward) carried out
//! by the ledger's movements on PostgreSQL get, at every step, the model's
//! answer; after every step the balance is the ledger's sum and the lots'
//! sum; at the end, the balance at every past step is asked of the ledger
//! and compared with the model's, the stored states are the model's, and
//! `reconcile` finds nothing. Each generated case runs on a fresh database.
//!
//! `decide.rs` checks the same model against the pure decisions, without a
//! database, over many more cases.

mod model;

use std::collections::HashMap;

use model::{Got, Op, Request, World, app, history, key, settle_of, user};
use penora_domain::SettledBy;
use penora_ledger as ledger;
use penora_ledger::reconcile;
use penora_store as db;
use penora_testing::{TestDb, travel};
use proptest::prelude::*;
use time::OffsetDateTime;

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let db = TestDb::new().await;
    let pool = db::pool_with(&db.url, 2, 5000).expect("pool");
    let mut c = pool.get().await.expect("client");
    let user = user();
    let app = app();
    let mut w = World::default();
    // (the database's clock after each step, the model's spendable then)
    let mut history_at: Vec<(OffsetDateTime, i64)> = Vec::new();
    for op in history(ops) {
        let db_now: OffsetDateTime = c.query_one("SELECT now()", &[]).await.expect("now").get(0);
        let req = w.request(&op, db_now);
        let got = match &req {
            Request::Grant(g) => Got::Grant(ledger::grant(&mut c, g, None).await),
            Request::Deduct(d) => Got::Deduct(ledger::deduct(&mut c, d, None).await),
            Request::Refund(r) => Got::Refund(ledger::refund(&mut c, r, None).await),
            Request::Settle { code, charge } => {
                let code = key(*code);
                let s = settle_of(&user, &app, &code, SettledBy::Final, *charge);
                Got::Settle(ledger::settle_for(&mut c, &s).await)
            }
            Request::Void(None) => Got::Nothing,
            Request::Void(Some(lot_id)) => {
                Got::Void(ledger::void_lot(&mut c, &user, *lot_id, ("test", None), None).await)
            }
            Request::Timer(due) => {
                ledger::expire_lots(&mut c, user.as_str())
                    .await
                    .expect("expiry");
                let mut settled = Vec::new();
                for code in due {
                    settled.push(
                        ledger::settle(
                            &mut c,
                            &user,
                            &app,
                            &key(*code),
                            (SettledBy::Window, "window"),
                            None,
                            None,
                        )
                        .await,
                    );
                }
                Got::Timer(settled)
            }
            Request::Advance(by) => {
                travel(&mut c, *by).await;
                for (t, _) in history_at.iter_mut() {
                    *t -= *by;
                }
                w.travelled(by.as_secs() as i64);
                Got::Nothing
            }
        };
        w.check(&op, &req, got)?;
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
        history_at.push((row.get(3), w.spendable()));
    }
    // The balance at every past step, from the ledger, is the model's.
    for (at, expected) in &history_at {
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
    let expected: HashMap<String, (String, i64)> = w
        .states()
        .into_iter()
        .map(|(code, (state, refunded))| (code, (state.as_str().to_owned(), refunded)))
        .collect();
    prop_assert_eq!(stored, expected);
    let report = reconcile::run(&mut c, 1 << 40).await.expect("reconcile");
    prop_assert!(report.violations.is_empty(), "{:?}", report.violations);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn any_sequence_of_credit_events_keeps_the_invariants_and_matches_the_model(ops in proptest::collection::vec(model::op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(run(ops))?;
    }
}
