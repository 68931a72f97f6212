//! Spend limits (contract §16) against PostgreSQL.
//!
//! By property: random histories of deductions (alone and in group-commit
//! batches, in two apps), refunds (whole, partial, by HTTP and by event),
//! limit changes and a clock moved forward (hours to a month) get, at every
//! step, the answer of a model that counts spending as the contract says
//! (credits deducted in a period less what was refunded since from the
//! reservations made in it), and no accepted deduction ever takes a period's
//! spending past a limit in force. Then, by example: the UTC day boundary,
//! and a refund after a reset giving its room back to the period it was
//! made in.

use std::{collections::BTreeMap, time::Duration};

use penora_domain::{AppName, Credits, ProjectCode, UserId, period::Period};
use penora_ledger::{
    self as ledger, Deduct, EventTime, LedgerError, OnBusy, Queued, QueuedRefund, Refund,
    limits::{self, Limit, Scope},
    reconcile,
};
use penora_store as db;
use penora_testing::{TestDb, travel};
use proptest::prelude::*;
use time::OffsetDateTime;

const APPS: [&str; 2] = ["imagegene", "penora"];
/// How far a step moves the clock: within a day, to the next day, past a
/// week, past a month.
const ADVANCES: [Duration; 4] = [
    Duration::from_secs(7 * 3600),
    Duration::from_secs(24 * 3600),
    Duration::from_secs(8 * 24 * 3600),
    Duration::from_secs(32 * 24 * 3600),
];
/// Long enough that every reservation of a history stays refundable.
const WINDOW: Duration = Duration::from_secs(400 * 24 * 3600);

#[derive(Debug, Clone)]
enum Op {
    SetLimit {
        app: Option<usize>,
        period: usize,
        max: i64,
    },
    DeleteLimit {
        app: Option<usize>,
        period: usize,
    },
    Deduct(Vec<(usize, i64)>),
    Refund {
        pick: usize,
        amount: Option<i64>,
        by_event: bool,
    },
    Advance(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let app = proptest::option::of(0usize..2);
    prop_oneof![
        2 => (app.clone(), 0usize..3, 0i64..40).prop_map(|(app, period, max)| Op::SetLimit { app, period, max }),
        1 => (app, 0usize..3).prop_map(|(app, period)| Op::DeleteLimit { app, period }),
        5 => proptest::collection::vec((0usize..2, 1i64..12), 1..6).prop_map(Op::Deduct),
        3 => (any::<usize>(), proptest::option::of(1i64..8), any::<bool>())
            .prop_map(|(pick, amount, by_event)| Op::Refund { pick, amount, by_event }),
        1 => (0usize..4).prop_map(Op::Advance),
    ]
}

#[derive(Debug)]
struct MRes {
    code: String,
    app: usize,
    amount: i64,
    refunded: i64,
    made: OffsetDateTime,
}

#[derive(Debug, Default)]
struct Model {
    balance: i64,
    res: Vec<MRes>,
    limits: BTreeMap<(Option<usize>, usize), i64>,
}

impl Model {
    fn spent(&self, app: Option<usize>, period: Period, now: OffsetDateTime) -> i64 {
        let from = period.start_of(now);
        self.res
            .iter()
            .filter(|r| app.is_none_or(|a| a == r.app) && r.made >= from)
            .map(|r| r.amount - r.refunded)
            .sum()
    }

    /// Whether `amount` of app `app` may be deducted at `now`.
    fn allows(&self, app: usize, amount: i64, now: OffsetDateTime) -> bool {
        self.limits
            .iter()
            .filter(|((scope, _), _)| scope.is_none_or(|a| a == app))
            .all(|(&(scope, p), &max)| self.spent(scope, Period::ALL[p], now) + amount <= max)
    }
}

fn user() -> UserId {
    UserId::parse("lim").expect("user")
}

fn scope(app: Option<usize>) -> Scope {
    Scope::of(app.map(|a| AppName::parse("app_name", APPS[a]).expect("app")))
}

async fn now(c: &deadpool_postgres::Client) -> OffsetDateTime {
    c.query_one("SELECT now()", &[]).await.expect("now").get(0)
}

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let db = TestDb::new().await;
    let pool = db::pool_with(&db.url, 2, 5000).expect("pool");
    let mut c = pool.get().await.expect("client");
    let user = user();
    let grant = ledger::Grant {
        user_id: user.clone(),
        amount: Credits::new("amount", 200, i64::MAX).expect("amount"),
        reason: "test".into(),
        reference: "seed".into(),
        app_name: AppName::penora(),
        category: ledger::LotCategory::Paid,
        priority: 50,
        expires_at: None,
        acted_by: None,
    };
    ledger::grant(&mut c, &grant, None).await.expect("seed");
    let mut m = Model {
        balance: 200,
        ..Model::default()
    };
    let mut serial = 0u32;
    let started = now(&c).await;
    for op in ops {
        let at = now(&c).await;
        match op {
            Op::SetLimit { app, period, max } => {
                let limit = Limit {
                    scope: scope(app),
                    period: Period::ALL[period],
                    max_credits: max,
                };
                let views = limits::set_limit(&mut c, &user, &limit).await.expect("set");
                m.limits.insert((app, period), max);
                prop_assert_eq!(views.len(), m.limits.len());
                for v in &views {
                    let app = v
                        .app_name
                        .as_deref()
                        .map(|a| APPS.iter().position(|x| *x == a).expect("app"));
                    prop_assert_eq!(v.spent, m.spent(app, v.period, at), "spent of {:?}", v);
                }
            }
            Op::DeleteLimit { app, period } => {
                let got =
                    limits::delete_limit(&mut c, &user, &scope(app), Period::ALL[period]).await;
                match m.limits.remove(&(app, period)) {
                    Some(_) => prop_assert!(got.is_ok(), "{:?}", got),
                    None => prop_assert!(matches!(got, Err(LedgerError::NotFound(_))), "{:?}", got),
                }
            }
            Op::Deduct(batch) => {
                let queued: Vec<Queued> = batch
                    .iter()
                    .map(|&(app, amount)| {
                        serial += 1;
                        Queued {
                            deduct: Deduct {
                                user_id: user.clone(),
                                amount: Credits::new("amount", amount, i64::MAX).expect("amount"),
                                app_name: AppName::parse("app_name", APPS[app]).expect("app"),
                                description: None,
                                project_code: ProjectCode::parse(&format!("d{serial}"))
                                    .expect("code"),
                                refund_window: WINDOW,
                            },
                            correlation_id: None,
                        }
                    })
                    .collect();
                let answers = ledger::deduct_all(&mut c, &queued, OnBusy::Wait).await;
                for ((q, &(app, amount)), got) in queued.iter().zip(&batch).zip(answers) {
                    let expect_ok = m.balance >= amount && m.allows(app, amount, at);
                    match got {
                        Ok(done) if expect_ok => {
                            m.balance -= amount;
                            m.res.push(MRes {
                                code: q.deduct.project_code.to_string(),
                                app,
                                amount,
                                refunded: 0,
                                made: done.value.timestamp,
                            });
                        }
                        Err(LedgerError::InsufficientCredits { .. }) if m.balance < amount => {}
                        Err(LedgerError::SpendLimitExceeded { limit, spent, .. })
                            if !expect_ok && m.balance >= amount =>
                        {
                            prop_assert!(spent + amount > limit);
                        }
                        other => prop_assert!(
                            false,
                            "deduct {} of {}: {:?} (model: {})",
                            amount,
                            APPS[app],
                            other.map(|o| o.value.new_balance),
                            expect_ok
                        ),
                    }
                }
            }
            Op::Refund {
                pick,
                amount,
                by_event,
            } => {
                if m.res.is_empty() {
                    continue;
                }
                let i = pick % m.res.len();
                let r = &m.res[i];
                let left = r.amount - r.refunded;
                serial += 1;
                let by_event = by_event && r.app == 0;
                let reference = match (amount, by_event) {
                    (Some(_), true) => Some(format!("{}e{serial}", ledger::EVENT_REFERENCE_PREFIX)),
                    (Some(_), false) => Some(format!("r{serial}")),
                    (None, _) => None,
                };
                let q = QueuedRefund {
                    refund: Refund {
                        user_id: user.clone(),
                        project_code: ProjectCode::parse(&r.code).expect("code"),
                        app_name: Some(AppName::parse("app_name", APPS[r.app]).expect("app")),
                        reason: Some("failed".into()),
                        amount,
                        reference,
                        acted_by: None,
                    },
                    event_id: by_event.then(|| format!("e{serial}")),
                    correlation_id: None,
                    event_time: by_event.then(|| EventTime {
                        at,
                        clock_skew: Duration::from_secs(5),
                    }),
                };
                let got = ledger::refund_one(&mut c, q).await;
                let give = amount.unwrap_or(left);
                if left > 0 && give <= left {
                    let done = got.map_err(|e| {
                        TestCaseError::fail(format!("refund of {give} ({left} left): {e}"))
                    })?;
                    prop_assert_eq!(done.value.credits_refunded, give);
                    m.balance += give;
                    m.res[i].refunded += give;
                } else if amount.is_some() {
                    prop_assert!(
                        got.is_err(),
                        "refund of {} with {} left: {:?}",
                        give,
                        left,
                        got.map(|o| o.value.credits_refunded)
                    );
                }
                // (A whole refund of a reservation refunded in full answers
                // the refund that completed it, and moves nothing: the
                // balance check below sees it.)
            }
            Op::Advance(i) => {
                travel(&mut c, ADVANCES[i]).await;
                for r in &mut m.res {
                    r.made -= ADVANCES[i];
                }
            }
        }
        // No limit in force is passed by what the ledger counts, unless it
        // was set below what was already spent (a limit never claws back).
        let balance = ledger::account_summary(&c, &user)
            .await
            .expect("summary")
            .expect("account")
            .balance;
        prop_assert_eq!(balance, m.balance);
        let at = now(&c).await;
        for v in limits::limits_of(&c, &user).await.expect("limits") {
            let app = v
                .app_name
                .as_deref()
                .map(|a| APPS.iter().position(|x| *x == a).expect("app"));
            prop_assert_eq!(v.spent, m.spent(app, v.period, at), "spent of {:?}", v);
        }
    }
    // The day the history ran in ended during it: the model's "now" and the
    // ledger's may have straddled a boundary. Nothing to conclude.
    if Period::Day.start_of(now(&c).await) != Period::Day.start_of(started) {
        return Ok(());
    }
    let report = reconcile::run(&mut c, 1 << 40).await.expect("reconcile");
    prop_assert!(report.violations.is_empty(), "{:?}", report.violations);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn no_history_lets_spending_pass_a_limit_and_every_answer_is_the_models(ops in proptest::collection::vec(op(), 1..30)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(run(ops))?;
    }
}

async fn deduct(
    c: &mut deadpool_postgres::Client,
    app: &str,
    amount: i64,
    code: &str,
) -> ledger::Answer<ledger::DeductReceipt> {
    let d = Deduct {
        user_id: user(),
        amount: Credits::new("amount", amount, i64::MAX).expect("amount"),
        app_name: AppName::parse("app_name", app).expect("app"),
        description: None,
        project_code: ProjectCode::parse(code).expect("code"),
        refund_window: WINDOW,
    };
    ledger::deduct(c, &d, None).await
}

async fn seeded() -> (TestDb, deadpool_postgres::Pool) {
    let db = TestDb::new().await;
    let pool = db::pool_with(&db.url, 2, 5000).expect("pool");
    let mut c = pool.get().await.expect("client");
    let grant = ledger::Grant {
        user_id: user(),
        amount: Credits::new("amount", 1_000, i64::MAX).expect("amount"),
        reason: "test".into(),
        reference: "seed".into(),
        app_name: AppName::penora(),
        category: ledger::LotCategory::Paid,
        priority: 50,
        expires_at: None,
        acted_by: None,
    };
    ledger::grant(&mut c, &grant, None).await.expect("seed");
    (db, pool)
}

/// How far to travel for today's spending to become yesterday's: the time
/// since the last UTC midnight, and a second more. ([`travel`] moves what is
/// stored back, not the clock forward: a travel to the next midnight would
/// keep a morning's spending in today whenever the test runs after noon.)
async fn past_midnight(c: &deadpool_postgres::Client) -> Duration {
    let at = now(c).await;
    let since = at - Period::Day.start_of(at);
    Duration::try_from(since).expect("positive") + Duration::from_secs(1)
}

#[tokio::test]
async fn a_daily_limit_resets_at_the_utc_boundary_and_names_itself_when_refused() {
    let (_db, pool) = seeded().await;
    let mut c = pool.get().await.expect("client");
    let daily = Limit {
        scope: Scope::All,
        period: Period::Day,
        max_credits: 50,
    };
    limits::set_limit(&mut c, &user(), &daily)
        .await
        .expect("set");
    deduct(&mut c, "imagegene", 30, "a")
        .await
        .expect("30 of 50");
    deduct(&mut c, "penora", 20, "b").await.expect("50 of 50");
    let before = now(&c).await;
    let Err(LedgerError::SpendLimitExceeded {
        app_name,
        period,
        limit,
        spent,
        resets_at,
    }) = deduct(&mut c, "imagegene", 1, "c").await
    else {
        panic!("the 51st credit of the day is refused");
    };
    assert_eq!(
        (app_name, period, limit, spent),
        (None, Period::Day, 50, 50)
    );
    assert_eq!(resets_at, Period::Day.next_start(before));
    // Refused: nothing moved.
    assert_eq!(
        ledger::account_summary(&c, &user())
            .await
            .expect("s")
            .expect("a")
            .balance,
        950
    );
    // The clock passes midnight: a new day, nothing spent in it.
    let by = past_midnight(&c).await;
    travel(&mut c, by).await;
    let views = limits::limits_of(&c, &user()).await.expect("limits");
    assert_eq!((views[0].spent, views[0].remaining), (0, 50));
    deduct(&mut c, "imagegene", 50, "d")
        .await
        .expect("a new day's 50");
    assert!(matches!(
        deduct(&mut c, "imagegene", 1, "e").await,
        Err(LedgerError::SpendLimitExceeded { spent: 50, .. })
    ));
}

#[tokio::test]
async fn a_refund_after_a_reset_gives_room_to_the_period_its_reservation_was_made_in() {
    let (_db, pool) = seeded().await;
    let mut c = pool.get().await.expect("client");
    let daily = Limit {
        scope: Scope::App(AppName::imagegene()),
        period: Period::Day,
        max_credits: 40,
    };
    let monthly = Limit {
        scope: Scope::All,
        period: Period::Month,
        max_credits: 1_000,
    };
    limits::set_limit(&mut c, &user(), &daily)
        .await
        .expect("set");
    limits::set_limit(&mut c, &user(), &monthly)
        .await
        .expect("set");
    deduct(&mut c, "imagegene", 30, "yesterday")
        .await
        .expect("30");
    let by = past_midnight(&c).await;
    travel(&mut c, by).await;
    deduct(&mut c, "imagegene", 40, "today")
        .await
        .expect("40 of today's 40");
    // Yesterday's reservation refunded today: yesterday's room, not today's.
    let refund = Refund {
        user_id: user(),
        project_code: ProjectCode::parse("yesterday").expect("code"),
        app_name: Some(AppName::imagegene()),
        reason: Some("failed".into()),
        amount: Some(10),
        reference: Some("r1".into()),
        acted_by: None,
    };
    ledger::refund(&mut c, &refund, None).await.expect("refund");
    assert!(matches!(
        deduct(&mut c, "imagegene", 1, "more").await,
        Err(LedgerError::SpendLimitExceeded {
            spent: 40,
            limit: 40,
            ..
        })
    ));
    // Today's refunded: today's room comes back, once (a repeat gives
    // nothing twice).
    let today = Refund {
        project_code: ProjectCode::parse("today").expect("code"),
        amount: Some(15),
        reference: Some("r2".into()),
        ..refund
    };
    ledger::refund(&mut c, &today, None).await.expect("refund");
    ledger::refund(&mut c, &today, None)
        .await
        .expect("replayed");
    let views = limits::limits_of(&c, &user()).await.expect("limits");
    let day = views
        .iter()
        .find(|v| v.period == Period::Day)
        .expect("daily");
    assert_eq!((day.spent, day.remaining), (25, 15));
    deduct(&mut c, "imagegene", 15, "again")
        .await
        .expect("15 of the room back");
    assert!(deduct(&mut c, "imagegene", 1, "over").await.is_err());
    // A penora deduction is held by the all-apps limit only.
    deduct(&mut c, "penora", 100, "other_app")
        .await
        .expect("penora");
    let report = reconcile::run(&mut c, 1 << 40).await.expect("reconcile");
    assert!(report.violations.is_empty(), "{:?}", report.violations);
}

#[tokio::test]
async fn a_new_limit_counts_what_was_spent_before_it_in_its_period() {
    let (_db, pool) = seeded().await;
    let mut c = pool.get().await.expect("client");
    deduct(&mut c, "imagegene", 45, "before").await.expect("45");
    let limit = Limit {
        scope: Scope::All,
        period: Period::Week,
        max_credits: 50,
    };
    let views = limits::set_limit(&mut c, &user(), &limit)
        .await
        .expect("set");
    assert_eq!((views[0].spent, views[0].remaining), (45, 5));
    assert!(deduct(&mut c, "imagegene", 6, "over").await.is_err());
    deduct(&mut c, "imagegene", 5, "within").await.expect("5");
    // Removed, spending is free again; set again, it counts it all.
    limits::delete_limit(&mut c, &user(), &Scope::All, Period::Week)
        .await
        .expect("deleted");
    deduct(&mut c, "imagegene", 7, "free")
        .await
        .expect("no limit");
    let views = limits::set_limit(&mut c, &user(), &limit)
        .await
        .expect("set");
    assert_eq!(views[0].spent, 57);
    assert!(matches!(
        limits::delete_limit(&mut c, &user(), &Scope::All, Period::Day).await,
        Err(LedgerError::NotFound(_))
    ));
    // A settlement for less gives back what it does not charge, and its
    // room with it.
    let wider = Limit {
        max_credits: 100,
        ..limit
    };
    limits::set_limit(&mut c, &user(), &wider)
        .await
        .expect("set");
    deduct(&mut c, "imagegene", 10, "settled")
        .await
        .expect("10");
    let (u, app, code) = (
        user(),
        AppName::imagegene(),
        ProjectCode::parse("settled").expect("code"),
    );
    let settle = ledger::Settle {
        user_id: &u,
        app_name: Some(&app),
        project_code: &code,
        by: ledger::SettledBy::Final,
        reason: "done",
        charge: Some(4),
        reference: None,
        correlation_id: None,
        event_id: None,
        event_time: None,
    };
    ledger::settle_for(&mut c, &settle)
        .await
        .expect("settled for 4");
    let views = limits::limits_of(&c, &u).await.expect("limits");
    assert_eq!(views[0].spent, 61);
    let report = reconcile::run(&mut c, 1 << 40).await.expect("reconcile");
    assert!(report.violations.is_empty(), "{:?}", report.violations);
    // Reconcile sees spending counted wrong.
    c.execute("UPDATE spend_days SET spent = spent + 1", &[])
        .await
        .expect("corrupted");
    let report = reconcile::run(&mut c, 1 << 40).await.expect("reconcile");
    assert!(
        report
            .violations
            .iter()
            .any(|v| v.detail.contains("spending of imagegene")),
        "{:?}",
        report.violations
    );
}
