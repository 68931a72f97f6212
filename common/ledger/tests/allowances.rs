//! Recurring allowances (contract §16) with a clock the test controls: the
//! timer's step (`allowances::grant_due`) is run at chosen instants across
//! period boundaries; every grant and expiry must be an ordinary ledger
//! movement that reconciles and audits clean.

use std::time::Duration;

use deadpool_postgres::{Client, Pool};
use penora_domain::{AppName, Credits, LotCategory, ProjectCode, UserId, period::Period};
use penora_ledger as ledger;
use penora_ledger::allowances::{self, Allowance, PeriodGrant, SetReceipt};
use penora_ledger::{Deduct, Grant, audit, reconcile};
use penora_store as db;
use penora_testing::TestDb;
use time::{OffsetDateTime, macros::datetime};

async fn database() -> (TestDb, Pool) {
    let t = TestDb::new().await;
    let pool = db::pool_with(&t.url, 4, 5000).expect("pool");
    (t, pool)
}

fn user(u: &str) -> UserId {
    UserId::parse(u).expect("user")
}

fn allowance(u: &str, id: &str, amount: i64, period: Period, max_rollover: i64) -> Allowance {
    Allowance {
        user_id: user(u),
        allowance_id: id.into(),
        amount: Credits::new("amount", amount, i64::MAX).expect("amount"),
        period,
        category: LotCategory::Promotional,
        max_rollover,
        app_name: AppName::penora(),
        starts_at: None,
    }
}

async fn set(c: &mut Client, a: &Allowance, now: OffsetDateTime) -> SetReceipt {
    allowances::set(c, a, Some(now), None, None)
        .await
        .expect("set")
}

/// The timer's step at `now`.
async fn tick(c: &mut Client, now: OffsetDateTime) -> Vec<PeriodGrant> {
    allowances::grant_due(c, now, 100).await.expect("grant_due")
}

/// A purchase: paid credits that never expire.
async fn buy(c: &mut Client, u: &str, amount: i64, reference: &str) {
    ledger::grant(
        c,
        &Grant {
            user_id: user(u),
            amount: Credits::new("amount", amount, i64::MAX).expect("amount"),
            app_name: AppName::penora(),
            reason: "credit pack".into(),
            reference: reference.into(),
            category: LotCategory::Paid,
            priority: 50,
            expires_at: None,
            acted_by: None,
        },
        None,
    )
    .await
    .expect("grant");
}

async fn deduct(c: &mut Client, u: &str, amount: i64, code: &str) -> Vec<(i64, i64)> {
    let d = Deduct {
        user_id: user(u),
        amount: Credits::new("amount", amount, i64::MAX).expect("amount"),
        app_name: AppName::imagegene(),
        description: Some("image generation".into()),
        project_code: ProjectCode::parse(code).expect("code"),
        refund_window: Duration::from_secs(3600),
    };
    let r = ledger::deduct(c, &d, None).await.expect("deduct");
    r.value
        .allocations
        .iter()
        .map(|a| (a.lot_id, a.amount))
        .collect()
}

async fn balance(c: &Client, u: &str) -> i64 {
    c.query_one("SELECT balance FROM accounts WHERE user_id = $1", &[&u])
        .await
        .expect("balance")
        .get(0)
}

/// `(reference, granted, remaining, status, expires_at)` of the user's lots, oldest first.
async fn lots(c: &Client, u: &str) -> Vec<(String, i64, i64, String, Option<OffsetDateTime>)> {
    c.query(
        "SELECT reference, granted, remaining, status, expires_at FROM credit_lots \
         WHERE user_id = $1 ORDER BY lot_id",
        &[&u],
    )
    .await
    .expect("lots")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
    .collect()
}

/// `(kind, amount, balance_after)` of the user's entries, in order.
async fn entries(c: &Client, u: &str) -> Vec<(String, i64, i64)> {
    c.query(
        "SELECT kind, amount, balance_after FROM ledger_entries WHERE user_id = $1 ORDER BY id",
        &[&u],
    )
    .await
    .expect("entries")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// Reconcile clean, and the audit chain (every commit's job checked, as the
/// worker's audit consumer does) verifies.
async fn reconciled_and_audited(pool: &Pool) {
    let mut c = pool.get().await.expect("client");
    let report = reconcile::run(&mut c, 1 << 40).await.expect("reconcile");
    assert!(report.violations.is_empty(), "{:?}", report.violations);
    let chains: Vec<penora_domain::messages::CommittedChain> = c
        .query(
            "SELECT payload FROM outbox WHERE routing_key = 'penora.ledger-audit'",
            &[],
        )
        .await
        .expect("jobs")
        .iter()
        .flat_map(|r| {
            serde_json::from_value::<penora_domain::messages::LedgerAuditCommit>(r.get(0))
                .expect("a commit's job")
                .chains
        })
        .collect();
    let checked = penora_ledger::checkpoint::check_commits(pool, None, &chains)
        .await
        .expect("checked");
    assert!(
        checked
            .values()
            .all(|c| matches!(c, penora_ledger::checkpoint::Checked::Checked { .. })),
        "{checked:?}"
    );
    let entries: i64 = c
        .query_one("SELECT count(*) FROM ledger_entries", &[])
        .await
        .expect("entries")
        .get(0);
    let v = audit::verify(&mut c, &audit::MacCheck::default())
        .await
        .expect("verify");
    assert!(v.findings.is_empty(), "{:?}", v.findings);
    assert_eq!(v.links_checked, entries);
    assert_eq!(v.links_awaiting_checkpoint, 0);
}

#[tokio::test]
async fn a_monthly_allowance_is_granted_once_per_period_rolls_over_at_most_max_rollover_and_never_touches_bought_credits()
 {
    let (_t, pool) = database().await;
    let mut c = pool.get().await.expect("client");
    buy(&mut c, "ana", 100, "order-1").await;
    // Subscribed on 31 January at 15:30: the first period runs to 1 February.
    let mut pro = allowance("ana", "pro", 500, Period::Month, 200);
    pro.starts_at = Some(datetime!(2028-01-31 15:30 UTC));
    let r = set(&mut c, &pro, datetime!(2028-01-31 15:30 UTC)).await;
    assert!(r.created && !r.changed);
    let first = r
        .current_grant
        .expect("the first period is granted at once");
    assert_eq!(
        (first.credits_added, first.carried, first.replayed),
        (500, 0, false)
    );
    assert_eq!(first.reference, "allowance:pro:2028-01-31T15:30:00.000Z");
    assert_eq!(first.period_end, datetime!(2028-02-01 00:00 UTC));
    assert_eq!(r.allowance.next_grant_at, datetime!(2028-02-01 00:00 UTC));
    assert_eq!(balance(&c, "ana").await, 600);

    // §12: the allowance lot (promotional, expiring) is spent before the paid credits.
    let drawn = deduct(&mut c, "ana", 120, "img-1").await;
    assert_eq!(drawn, vec![(first.lot_id, 120)]);
    assert_eq!(balance(&c, "ana").await, 480);

    // Not yet: one minute before the boundary.
    assert!(
        tick(&mut c, datetime!(2028-01-31 23:59 UTC))
            .await
            .is_empty()
    );
    // At the boundary: the old lot (380 left) expires first, 200 of it carries.
    let feb = tick(&mut c, datetime!(2028-02-01 00:00 UTC)).await;
    assert_eq!(feb.len(), 1);
    assert_eq!(
        (feb[0].credits_added, feb[0].carried),
        (700, 200),
        "500 + at most max_rollover"
    );
    assert_eq!(feb[0].reference, "allowance:pro:2028-02-01T00:00:00.000Z");
    assert_eq!(feb[0].period_end, datetime!(2028-03-01 00:00 UTC));
    // Twice at the same instant: granted once.
    assert!(
        tick(&mut c, datetime!(2028-02-01 00:00 UTC))
            .await
            .is_empty()
    );
    assert!(
        tick(&mut c, datetime!(2028-02-15 12:00 UTC))
            .await
            .is_empty()
    );
    assert_eq!(balance(&c, "ana").await, 100 + 700);
    assert_eq!(
        entries(&c, "ana").await,
        vec![
            ("grant".into(), 100, 100),
            ("grant".into(), 500, 600),
            ("deduct".into(), -120, 480),
            ("expire".into(), -380, 100),
            ("grant".into(), 700, 800),
        ],
        "the whole remainder expires, then amount + carried is granted"
    );

    // A leap February: 29 days, the next period starts on 1 March.
    assert!(
        tick(&mut c, datetime!(2028-02-29 23:59:59.999 UTC))
            .await
            .is_empty()
    );
    let mar = tick(&mut c, datetime!(2028-03-01 00:00 UTC)).await;
    assert_eq!((mar[0].credits_added, mar[0].carried), (700, 200));
    assert_eq!(mar[0].period_end, datetime!(2028-04-01 00:00 UTC));

    let l = lots(&c, "ana").await;
    assert_eq!(
        l,
        vec![
            ("order-1".into(), 100, 100, "active".into(), None),
            (
                "allowance:pro:2028-01-31T15:30:00.000Z".into(),
                500,
                0,
                "expired".into(),
                Some(datetime!(2028-02-01 00:00 UTC))
            ),
            (
                "allowance:pro:2028-02-01T00:00:00.000Z".into(),
                700,
                0,
                "expired".into(),
                Some(datetime!(2028-03-01 00:00 UTC))
            ),
            (
                "allowance:pro:2028-03-01T00:00:00.000Z".into(),
                700,
                700,
                "active".into(),
                Some(datetime!(2028-04-01 00:00 UTC))
            ),
        ],
        "the bought credits are untouched by every reset"
    );
    assert_eq!(balance(&c, "ana").await, 800);
    // Each period's credits.granted names the allowance; credits.expired reports the remainders.
    let granted: Vec<(Option<String>, i64)> = c
        .query(
            "SELECT payload->'data'->>'allowance_id', (payload->'data'->>'amount')::int8 FROM outbox \
             WHERE user_id = 'ana' AND routing_key = 'credits.granted' ORDER BY id",
            &[],
        )
        .await
        .expect("events")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        granted,
        vec![
            (None, 100),
            (Some("pro".into()), 500),
            (Some("pro".into()), 700),
            (Some("pro".into()), 700)
        ]
    );
    let expired: Vec<i64> = c
        .query(
            "SELECT (payload->'data'->>'amount')::int8 FROM outbox \
             WHERE user_id = 'ana' AND routing_key = 'credits.expired' ORDER BY id",
            &[],
        )
        .await
        .expect("events")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(expired, vec![380, 700]);
    drop(c);
    reconciled_and_audited(&pool).await;
}

#[tokio::test]
async fn a_worker_down_across_two_boundaries_grants_the_current_period_once_and_not_the_missed_one()
{
    let (_t, pool) = database().await;
    let mut c = pool.get().await.expect("client");
    buy(&mut c, "bo", 40, "order-7").await;
    let daily = allowance("bo", "daily", 50, Period::Day, 10);
    set(&mut c, &daily, datetime!(2028-02-27 08:00 UTC)).await;
    deduct(&mut c, "bo", 5, "img-1").await;
    // Down from 27 February to 1 March 09:00: 28 and 29 February are missed.
    let back = tick(&mut c, datetime!(2028-03-01 09:00 UTC)).await;
    assert_eq!(back.len(), 1);
    assert_eq!(
        back[0].reference,
        "allowance:daily:2028-03-01T00:00:00.000Z"
    );
    assert_eq!(
        (back[0].credits_added, back[0].carried),
        (50, 0),
        "nothing carries over a missed period"
    );
    assert!(
        tick(&mut c, datetime!(2028-03-01 09:00 UTC))
            .await
            .is_empty()
    );
    assert!(
        tick(&mut c, datetime!(2028-03-01 23:00 UTC))
            .await
            .is_empty()
    );
    let refs: Vec<String> = lots(&c, "bo").await.into_iter().map(|l| l.0).collect();
    assert_eq!(
        refs,
        vec![
            "order-7",
            "allowance:daily:2028-02-27T08:00:00.000Z",
            "allowance:daily:2028-03-01T00:00:00.000Z"
        ]
    );
    assert_eq!(
        entries(&c, "bo").await,
        vec![
            ("grant".into(), 40, 40),
            ("grant".into(), 50, 90),
            ("deduct".into(), -5, 85),
            ("expire".into(), -45, 40),
            ("grant".into(), 50, 90),
        ]
    );
    // The next day rolls over again (10 of the 50 unspent).
    let next = tick(&mut c, datetime!(2028-03-02 00:00:01 UTC)).await;
    assert_eq!((next[0].credits_added, next[0].carried), (60, 10));
    assert_eq!(balance(&c, "bo").await, 40 + 60);
    drop(c);
    reconciled_and_audited(&pool).await;
}

#[tokio::test]
async fn a_change_takes_effect_at_the_next_period_and_a_delete_stops_grants_and_leaves_the_lot() {
    let (_t, pool) = database().await;
    let mut c = pool.get().await.expect("client");
    let weekly = allowance("cy", "team", 100, Period::Week, 0);
    // Wednesday 1 March 2028: the first week runs to Monday 6 March.
    let r = set(&mut c, &weekly, datetime!(2028-03-01 12:00 UTC)).await;
    let first = r.current_grant.expect("granted");
    assert_eq!(first.period_end, datetime!(2028-03-06 00:00 UTC));
    // The same PUT again: nothing changes, nothing is granted again.
    let again = set(&mut c, &weekly, datetime!(2028-03-01 12:05 UTC)).await;
    assert!(!again.created && !again.changed);
    assert_eq!(
        again.allowance.updated_at, r.allowance.updated_at,
        "nothing written"
    );
    let replay = again.current_grant.expect("the current period's grant");
    assert!(replay.replayed);
    assert_eq!(replay.lot_id, first.lot_id);
    assert_eq!(entries(&c, "cy").await.len(), 1);
    // More credits from the next period on; this week's lot stays at 100.
    let mut bigger = weekly.clone();
    bigger.amount = Credits::new("amount", 150, i64::MAX).expect("amount");
    let changed = set(&mut c, &bigger, datetime!(2028-03-02 09:00 UTC)).await;
    assert!(changed.changed);
    assert!(changed.current_grant.expect("current").replayed);
    assert_eq!(balance(&c, "cy").await, 100);
    // A started allowance cannot move its start.
    let mut moved = bigger.clone();
    moved.starts_at = Some(datetime!(2028-03-03 00:00 UTC));
    let refused = allowances::set(
        &mut c,
        &moved,
        Some(datetime!(2028-03-02 10:00 UTC)),
        None,
        None,
    )
    .await;
    assert!(
        matches!(
            refused,
            Err(ledger::LedgerError::Invalid {
                field: "starts_at",
                ..
            })
        ),
        "{refused:?}"
    );
    let week2 = tick(&mut c, datetime!(2028-03-06 00:00 UTC)).await;
    assert_eq!((week2[0].credits_added, week2[0].carried), (150, 0));
    assert_eq!(balance(&c, "cy").await, 150);
    // Delete: no more grants; the granted lot stays as it is.
    let gone = allowances::delete(&mut c, &user("cy"), "team", None)
        .await
        .expect("delete");
    assert_eq!(gone.map(|a| a.amount), Some(150));
    assert!(
        tick(&mut c, datetime!(2028-03-13 00:00 UTC))
            .await
            .is_empty()
    );
    assert!(
        tick(&mut c, datetime!(2028-03-20 00:00 UTC))
            .await
            .is_empty()
    );
    let last = lots(&c, "cy").await.pop().expect("a lot");
    assert_eq!(
        (last.1, last.2, last.3.as_str()),
        (150, 150, "active"),
        "the lot granted is left alone"
    );
    assert!(
        allowances::list(&c, &user("cy"))
            .await
            .expect("list")
            .is_empty()
    );
    assert!(
        allowances::delete(&mut c, &user("cy"), "team", None)
            .await
            .expect("delete")
            .is_none()
    );
    drop(c);
    reconciled_and_audited(&pool).await;
}

#[tokio::test]
async fn an_allowance_deleted_and_set_again_within_a_granted_period_is_not_granted_twice() {
    let (_t, pool) = database().await;
    let mut c = pool.get().await.expect("client");
    let monthly = allowance("dz", "pro", 500, Period::Month, 0);
    let first = set(&mut c, &monthly, datetime!(2028-03-10 08:00 UTC)).await;
    let lot = first.current_grant.expect("granted").lot_id;
    allowances::delete(&mut c, &user("dz"), "pro", None)
        .await
        .expect("delete")
        .expect("it was there");
    // Set again the same month: March is granted already.
    let again = set(&mut c, &monthly, datetime!(2028-03-10 09:30 UTC)).await;
    assert!(again.created);
    let current = again.current_grant.expect("March's grant");
    assert!(current.replayed);
    assert_eq!(current.lot_id, lot);
    assert_eq!(
        again.allowance.next_grant_at,
        datetime!(2028-04-01 00:00 UTC)
    );
    assert_eq!(balance(&c, "dz").await, 500);
    assert_eq!(entries(&c, "dz").await.len(), 1, "one grant in March");
    // April is granted at its start, once.
    let april = tick(&mut c, datetime!(2028-04-01 00:00 UTC)).await;
    assert_eq!(april.len(), 1);
    assert!(
        tick(&mut c, datetime!(2028-04-01 00:00 UTC))
            .await
            .is_empty()
    );
    // Set again after its period ended: a new first period is granted.
    allowances::delete(&mut c, &user("dz"), "pro", None)
        .await
        .expect("delete");
    let may = set(&mut c, &monthly, datetime!(2028-05-02 10:00 UTC)).await;
    assert!(!may.current_grant.expect("granted").replayed);
    drop(c);
    reconciled_and_audited(&pool).await;
}

#[tokio::test]
async fn a_lot_the_expiry_timer_expired_first_carries_what_its_expire_entry_took() {
    // Instants in the past of the database's clock: the allowance's lot is
    // past its expiry for the expiry timer (`expire_lots`, which judges by
    // the database's now()) before the allowance's next period is granted.
    let (_t, pool) = database().await;
    let mut c = pool.get().await.expect("client");
    let daily = allowance("dee", "daily", 30, Period::Day, 20);
    let r = set(&mut c, &daily, datetime!(2020-02-28 10:00 UTC)).await;
    assert_eq!(
        r.current_grant.expect("granted").period_end,
        datetime!(2020-02-29 00:00 UTC)
    );
    assert_eq!(
        ledger::expire_lots(&mut c, "dee").await.expect("expire"),
        30
    );
    let next = tick(&mut c, datetime!(2020-02-29 00:00 UTC)).await;
    assert_eq!((next[0].credits_added, next[0].carried), (50, 20));
    assert_eq!(next[0].period_end, datetime!(2020-03-01 00:00 UTC));
    assert_eq!(
        ledger::expire_lots(&mut c, "dee").await.expect("expire"),
        50
    );
    assert_eq!(
        entries(&c, "dee").await,
        vec![
            ("grant".into(), 30, 30),
            ("expire".into(), -30, 0),
            ("grant".into(), 50, 50),
            ("expire".into(), -50, 0),
        ]
    );
    drop(c);
    reconciled_and_audited(&pool).await;
}
