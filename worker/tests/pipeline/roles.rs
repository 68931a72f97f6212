//! The whole pipeline as the application role (migration V12, issue 24):
//! the API and the worker connected as `penora_app`, not migrating, do every
//! kind of work (movements, saves, events, the relay, the timers, the audit
//! with its MACs), and a worker that does not migrate refuses a schema
//! behind it.

use std::time::Duration;

use penora_config::Secret;
use penora_testing::TestDb;
use serde_json::{Value, json};

use crate::support::{PNG_1X1, sibling_binary, stack, wait_for};

const KEY: &str = "pipeline-audit-key-0123456789abcdef0123";

fn in_secs(secs: i64) -> String {
    penora_domain::timefmt::rfc3339_millis(
        time::OffsetDateTime::now_utc() + time::Duration::seconds(secs),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_api_and_the_worker_run_as_the_application_role_and_every_record_carries_its_mac() {
    let mut s = stack(&[("REFUND_WINDOW_SECS", "3")], &[]).await;
    let url = s.db.app_role_url().await;
    let mut settings = s.settings.clone();
    settings.db.url = Secret::new(url.clone());
    settings.db.migrate_on_start = false;
    // An API of its own as penora_app, in place of the stack's.
    let api = penora_api::build(settings.api())
        .await
        .expect("the API builds as penora_app");
    s.base = format!("http://{}", api.addr);
    tokio::spawn(api.run_until_stopped(std::future::pending(), std::time::Duration::from_secs(5)));
    settings.audit.hmac_key = Some(Secret::new(KEY));
    s.settings = settings;
    s.start_worker().await;

    let u = "pipe-u1";
    s.grant(u, 30).await;
    let r = s
        .post(
            "/api/unified/add-credits",
            &json!({"user_id": u, "amount": 5, "reason": "trial", "reference": "trial",
                    "category": "promotional", "priority": 90, "expires_at": in_secs(2)}),
        )
        .await;
    assert!(r.status().is_success(), "{:?}", r.text().await);
    // Saved by the worker, settling its reservation.
    s.deduct(u, 5, "img_1").await;
    let saved: Value = s
        .post(
            "/api/unified/save-project",
            &json!({"user_id": u, "app_source": "imagegene", "project_type": "ai_artwork",
                    "title": "art", "content": PNG_1X1, "project_code": "img_1"}),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(saved["status"], json!("queued"), "{saved}");
    // Refunded and settled by ImageGene's events.
    s.deduct(u, 3, "img_2").await;
    s.deduct(u, 2, "img_3").await;
    s.publish_event(
        "failed",
        &json!({"event_id": "ev-f", "user_id": u, "project_code": "img_2",
                "reason": "GPU out of memory", "occurred_at": in_secs(0)})
        .to_string(),
    )
    .await;
    s.publish_event(
        "succeeded",
        &json!({"event_id": "ev-s", "user_id": u, "project_code": "img_3",
                "occurred_at": in_secs(0)})
        .to_string(),
    )
    .await;
    // Settled by the timer when its window passes.
    s.deduct(u, 1, "img_4").await;

    let state = |code: &'static str, state: &'static str| {
        let s = &s;
        async move {
            s.scalar(
                &format!(
                    "SELECT count(*) FROM reservations WHERE user_id = $1 \
                     AND project_code = '{code}' AND state = '{state}'"
                ),
                u,
            )
            .await
                == 1
        }
    };
    wait_for("the save", Duration::from_secs(15), || async {
        s.scalar(
            "SELECT count(*) FROM projects WHERE user_id = $1 AND status = 'saved'",
            u,
        )
        .await
            == 1
    })
    .await;
    wait_for("the refund", Duration::from_secs(15), || {
        state("img_2", "refunded")
    })
    .await;
    wait_for("the success", Duration::from_secs(15), || {
        state("img_3", "settled")
    })
    .await;
    wait_for("the window", Duration::from_secs(15), || {
        state("img_4", "settled")
    })
    .await;
    wait_for("the expiry", Duration::from_secs(15), || async {
        s.scalar(
            "SELECT count(*) FROM ledger_entries WHERE user_id = $1 AND kind = 'expire'",
            u,
        )
        .await
            == 1
    })
    .await;
    assert_eq!(
        s.scalar("SELECT count(*) FROM reservations WHERE user_id = $1 AND project_code = 'img_1' AND state = 'settled'", u)
            .await,
        1,
        "the save settled its reservation"
    );
    s.wait_idle().await;
    wait_for("every entry audited", Duration::from_secs(15), || async {
        s.scalar("SELECT count(*) FROM audit_pending WHERE user_id = $1", u)
            .await
            == 0
    })
    .await;
    assert_eq!(
        s.scalar(
            "SELECT count(*) FROM audit_checkpoints WHERE user_id = $1 AND mac IS NULL",
            u
        )
        .await,
        0,
        "every checkpoint carries its MAC"
    );
    assert_eq!(
        s.scalar("SELECT count(*) FROM outbox WHERE $1 = $1", "")
            .await,
        0,
        "the relay deleted every confirmed row"
    );
    s.stop_worker().await;

    // The operator checks, as penora_app, with the key.
    let mut verify = tokio::process::Command::new(sibling_binary("penora-ops"));
    verify
        .args(["audit", "verify"])
        .envs(s.env())
        .env("DATABASE_URL", &url)
        .env("AUDIT_HMAC_KEY", KEY);
    let out = verify.output().await.expect("penora-ops runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("audit OK") && text.contains("0 records written before the key"),
        "{text}"
    );
    let reconcile = s.ops(&["reconcile"]).await;
    assert!(reconcile.status.success(), "{reconcile:?}");
}

#[tokio::test]
async fn a_worker_that_does_not_migrate_refuses_a_schema_behind_it() {
    let db = TestDb::new().await;
    let admin = penora_testing::admin_client().await;
    let bare = format!("{}_bare", db.name);
    admin
        .batch_execute(&format!("CREATE DATABASE {bare}"))
        .await
        .expect("bare database");
    let bare_url = format!(
        "{}/{bare}",
        db.url.rsplit_once('/').map_or(db.url.as_str(), |(b, _)| b)
    );
    let settings = db.settings(&[
        ("DATABASE_URL", &bare_url),
        ("DB_MIGRATE_ON_START", "false"),
        ("WORKER_METRICS_ADDR", "127.0.0.1:0"),
    ]);
    let why = match penora_worker::build(settings.worker()).await {
        Ok(_) => panic!("the worker started on an empty database"),
        Err(e) => format!("{e:#}"),
    };
    assert!(why.contains("penora-ops migrate"), "{why}");
    let (c, conn) = tokio_postgres::connect(&bare_url, tokio_postgres::NoTls)
        .await
        .expect("bare");
    tokio::spawn(conn);
    let tables: i64 = c
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
            &[],
        )
        .await
        .expect("tables")
        .get(0);
    assert_eq!(tables, 0, "a worker that does not migrate created tables");
    drop(c);
    admin
        .batch_execute(&format!("DROP DATABASE {bare} WITH (FORCE)"))
        .await
        .expect("dropped");
}
