//! The support console over HTTP (contract §17): sign-in, the headers every
//! page carries, a user's page against what the API answers, the admin
//! actions with their confirmation and idempotency, a read key, forms from
//! elsewhere, and the acting key on the ledger entry inside its chain link.
//! The browser's view (CSP violations, screenshots, a dead letter replayed)
//! is tested in headless Chromium by `scripts/console.sh`.

use penora_platform::keys::Scope;
use reqwest::{StatusCode, header};
use serde_json::json;

use crate::support::{BOOT_KEY, TestApp, spawn_app};

/// A browser's side of the console: its cookie and its origin.
struct Browser<'a> {
    app: &'a TestApp,
    cookie: Option<String>,
}

impl<'a> Browser<'a> {
    fn new(app: &'a TestApp) -> Self {
        Self { app, cookie: None }
    }

    fn origin(&self) -> String {
        self.app.base.clone()
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        let mut r = self.app.http.get(format!("{}{path}", self.app.base));
        if let Some(c) = &self.cookie {
            r = r.header(header::COOKIE, c);
        }
        r.send().await.expect("sent")
    }

    async fn page(&self, path: &str) -> String {
        let r = self.get(path).await;
        assert_eq!(r.status(), StatusCode::OK, "GET {path}");
        r.text().await.expect("body")
    }

    async fn post_from(
        &self,
        origin: &str,
        path: &str,
        fields: &[(&str, &str)],
    ) -> reqwest::Response {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish();
        let mut r = self
            .app
            .http
            .post(format!("{}{path}", self.app.base))
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ORIGIN, origin)
            .body(body);
        if let Some(c) = &self.cookie {
            r = r.header(header::COOKIE, c);
        }
        r.send().await.expect("sent")
    }

    async fn post(&self, path: &str, fields: &[(&str, &str)]) -> reqwest::Response {
        self.post_from(&self.origin(), path, fields).await
    }

    /// Signs in with `key`; returns the Set-Cookie header.
    async fn sign_in(&mut self, key: &str) -> String {
        let r = self.post("/console/sign-in", &[("api_key", key)]).await;
        assert_eq!(r.status(), StatusCode::SEE_OTHER, "signed in");
        let set = r
            .headers()
            .get(header::SET_COOKIE)
            .expect("a session cookie")
            .to_str()
            .expect("ascii")
            .to_owned();
        self.cookie = Some(set.split(';').next().expect("pair").to_owned());
        set
    }
}

/// The value of `<input … name="{name}" value="…">` in `html`, the first.
fn field(html: &str, name: &str) -> String {
    let at = html
        .find(&format!("name=\"{name}\" value=\""))
        .unwrap_or_else(|| panic!("no field {name} in the page"));
    let rest = &html[at + name.len() + 15..];
    rest[..rest.find('"').expect("closed")].to_owned()
}

#[tokio::test]
async fn sign_in_keeps_the_key_out_of_cookies_and_urls_and_every_page_is_locked_down() {
    let app = spawn_app().await;
    let mut b = Browser::new(&app);
    // Not signed in: the pages send you to sign in.
    let r = b.get("/console/users").await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()[header::LOCATION], "/console/sign-in");
    let r = b.get("/console/sign-in").await;
    assert_eq!(r.status(), StatusCode::OK);
    let csp = r.headers()[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(!csp.contains("script-src"), "no script is allowed: {csp}");
    assert_eq!(r.headers()[header::CACHE_CONTROL], "no-store");
    assert_eq!(r.headers()[header::X_FRAME_OPTIONS], "DENY");
    let html = r.text().await.expect("body");
    assert!(!html.contains("<script"), "no script in the page");
    assert!(
        html.contains("method=\"post\""),
        "the key goes in a POST body"
    );
    assert!(html.contains("type=\"password\""));

    // A wrong key: refused with the API's code, no cookie.
    let r = b
        .post("/console/sign-in", &[("api_key", "not-a-key")])
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().get(header::SET_COOKIE).is_none());
    assert!(r.text().await.expect("body").contains("invalid_api_key"));
    // A spend-only key may not sign in.
    let spend = app.key("imagegene", &[Scope::Spend]).await;
    let r = b.post("/console/sign-in", &[("api_key", &spend)]).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    let admin = app.key("*", &[Scope::Admin, Scope::Read]).await;
    let set = b.sign_in(&admin).await;
    assert!(set.contains("HttpOnly"), "{set}");
    assert!(set.contains("SameSite=Strict"), "{set}");
    assert!(set.contains("Path=/console"), "{set}");
    assert!(!set.contains(&admin), "the key is not the cookie");
    let stored: i64 = app
        .pool
        .get()
        .await
        .expect("db")
        .query_one(
            "SELECT count(*) FROM console_sessions WHERE csrf = $1 OR key_digest = convert_to($1, 'UTF8')",
            &[&admin],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(stored, 0, "the key is stored nowhere");
    let users = b.page("/console/users").await;
    assert!(users.contains("Sign out"));
    assert!(!users.contains(&admin), "the key is not in the page");

    // Sign-out ends the session on the server: the old cookie is refused.
    let csrf = field(&users, "csrf");
    let r = b.post("/console/sign-out", &[("csrf", &csrf)]).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let r = b.get("/console/users").await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER, "the session is over");

    // A revoked key's session ends at once.
    let mut b2 = Browser::new(&app);
    let key = app.key("*", &[Scope::Read]).await;
    b2.sign_in(&key).await;
    b2.page("/console/users").await;
    app.pool
        .get()
        .await
        .expect("db")
        .execute("UPDATE api_keys SET revoked_at = now()", &[])
        .await
        .expect("revoked");
    let r = b2.get("/console/users").await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER, "revoked: signed out");
}

#[tokio::test]
async fn the_user_page_shows_what_the_api_answers() {
    let app = spawn_app().await;
    // A user shaped like production: lots of two categories, deductions,
    // a partial refund, a settled reservation; and thousands of others.
    let r = app
        .post(
            "/api/unified/add-credits",
            &json!({"user_id": "alice-01", "amount": 100, "reason": "purchase", "reference": "pay-1"}),
        )
        .await;
    assert!(r.status().is_success());
    let r = app
        .post(
            "/api/unified/add-credits",
            &json!({"user_id": "alice-01", "amount": 20, "reason": "welcome", "reference": "bonus-1",
                    "category": "promotional", "expires_at": "2099-01-01T00:00:00Z"}),
        )
        .await;
    assert!(r.status().is_success());
    for i in 0..30 {
        let (s, _) = app.deduct("alice-01", 3, &format!("img-{i:02}")).await;
        assert!(s.is_success());
    }
    let r = app
        .post(
            "/api/unified/refund-credits",
            &json!({"user_id": "alice-01", "project_code": "img-29", "amount": 1, "reference": "half", "reason": "blurry"}),
        )
        .await;
    assert!(r.status().is_success());
    {
        let c = app.pool.get().await.expect("db");
        c.batch_execute(
            "INSERT INTO accounts (user_id, balance) SELECT 'bob-' || lpad(i::text, 4, '0'), 0 FROM generate_series(1, 3000) i",
        )
        .await
        .expect("others");
    }
    let mut b = Browser::new(&app);
    b.sign_in(BOOT_KEY).await;

    // Prefix search.
    let found = b.page("/console/users?q=alice").await;
    assert!(found.contains("/console/users/alice-01"));
    assert!(!found.contains("bob-"));
    let found = b.page("/console/users?q=bob-00").await;
    assert_eq!(
        found.matches("/console/users/bob-00").count(),
        50,
        "the first 50"
    );
    let none = b.page("/console/users?q=%25").await;
    assert!(none.contains("No user"), "% is a character, not a wildcard");

    let info: serde_json::Value = app
        .get("/api/unified/user-info?user_id=alice-01")
        .await
        .json()
        .await
        .expect("json");
    let page = b.page("/console/users/alice-01").await;
    let credits = info["credits"].as_i64().expect("credits");
    assert_eq!(credits, 120 - 90 + 1);
    assert!(
        page.contains(&format!("data-field=\"spendable\"><div class=\"label\">Spendable</div><div class=\"value\"><span title=\"{credits} Ku\"")),
        "spendable {credits}"
    );
    assert!(
        page.contains("title=\"89 Ku\""),
        "reserved: 90 − 1 refunded"
    );
    let lots: serde_json::Value = app
        .get("/api/unified/credit-lots?user_id=alice-01")
        .await
        .json()
        .await
        .expect("json");
    for lot in lots["lots"].as_array().expect("lots") {
        let id = lot["lot_id"].as_i64().expect("id");
        assert!(
            page.contains(&format!("<td data-label=\"Lot\">{id}</td>")),
            "lot {id}"
        );
        let remaining = lot["remaining"].as_i64().expect("remaining");
        assert!(page.contains(&format!("title=\"{remaining} Ku\"")));
    }
    assert!(
        page.contains("2099-01-01T00:00:00.000Z"),
        "expiry, exact on hover"
    );
    assert!(page.contains("partially_refunded"));
    // The ledger, paged: 25 newest, then the rest; every entry's running
    // balance as the API gives it.
    let tx: serde_json::Value = app
        .get("/api/unified/transactions?user_id=alice-01&limit=200")
        .await
        .json()
        .await
        .expect("json");
    let all = tx["transactions"].as_array().expect("entries");
    assert_eq!(all.len(), 33);
    let newest = &all[0];
    assert!(page.contains(&format!(
        "<td class=\"num\" data-label=\"Balance after\"><span title=\"{0} Ku\"",
        newest["balance_after"]
    )));
    assert_eq!(page.matches("data-label=\"Entry\"").count(), 25);
    let older_id = all[24]["id"].as_i64().expect("id");
    assert!(page.contains(&format!("?before={older_id}#ledger")));
    let older = b
        .page(&format!("/console/users/alice-01?before={older_id}"))
        .await;
    assert_eq!(older.matches("data-label=\"Entry\"").count(), 8);
    for e in &all[25..] {
        assert!(older.contains(&format!("<td data-label=\"Entry\">{}</td>", e["id"])));
    }
    assert!(page.contains("data-field=\"audit\""));
    assert!(!page.contains("<script"));
    // An unknown user is a 404 page with the API's code.
    let r = b.get("/console/users/nobody").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(r.text().await.expect("body").contains("user_not_found"));
}

#[tokio::test]
async fn admin_actions_confirm_move_once_and_record_the_acting_key_in_the_chain() {
    let app = spawn_app().await;
    app.grant("carol", 40).await;
    let (s, _) = app.deduct("carol", 10, "art-1").await;
    assert!(s.is_success());
    let admin = app.key("*", &[Scope::Admin, Scope::Read]).await;
    let admin_id: String = app
        .pool
        .get()
        .await
        .expect("db")
        .query_one(
            "SELECT id::text FROM api_keys WHERE revoked_at IS NULL",
            &[],
        )
        .await
        .expect("id")
        .get(0);
    let mut b = Browser::new(&app);
    b.sign_in(&admin).await;
    let page = b.page("/console/users/carol").await;
    let csrf = field(&page, "csrf");
    let nonce = field(&page, "nonce");

    // Grant 5: the first post asks, moves nothing.
    let grant = [
        ("csrf", csrf.as_str()),
        ("nonce", nonce.as_str()),
        ("amount", "5"),
        ("category", "promotional"),
        ("expires_at", ""),
        ("reason", "goodwill: image never came"),
    ];
    let r = b.post("/console/users/carol/grant", &grant).await;
    assert_eq!(r.status(), StatusCode::OK);
    let confirm = r.text().await.expect("body");
    assert!(confirm.contains("Confirm"));
    assert!(confirm.contains("name=\"confirm\" value=\"yes\""));
    assert_eq!(app.balance("carol").await, 30, "asking moved nothing");
    // Confirmed twice (a double click, a resent form): once.
    let mut confirmed = grant.to_vec();
    confirmed.push(("confirm", "yes"));
    let first = b.post("/console/users/carol/grant", &confirmed).await;
    assert_eq!(first.status(), StatusCode::OK);
    let first = first.text().await.expect("body");
    assert!(first.contains("data-replayed=\"false\""), "{first}");
    assert!(first.contains(&admin_id), "the entry shows who acted");
    let again = b.post("/console/users/carol/grant", &confirmed).await;
    let again = again.text().await.expect("body");
    assert!(again.contains("data-replayed=\"true\""));
    assert_eq!(app.balance("carol").await, 35);
    let grants = app
        .scalar(
            "SELECT count(*) FROM ledger_entries WHERE user_id = $1 AND kind = 'grant' AND acted_by IS NOT NULL",
            "carol",
        )
        .await;
    assert_eq!(grants, 2, "the test's grant and the console's, once");
    let acted: String = app
        .pool
        .get()
        .await
        .expect("db")
        .query_one(
            "SELECT acted_by FROM ledger_entries WHERE user_id = 'carol' AND reference = $1",
            &[&format!("console-{nonce}")],
        )
        .await
        .expect("the console's grant")
        .get(0);
    assert_eq!(acted, admin_id);

    // Void the promotional lot.
    let lot: i64 = app
        .pool
        .get()
        .await
        .expect("db")
        .query_one(
            "SELECT lot_id FROM credit_lots WHERE user_id = 'carol' AND category = 'promotional'",
            &[],
        )
        .await
        .expect("lot")
        .get(0);
    let lot = lot.to_string();
    let void = [
        ("csrf", csrf.as_str()),
        ("lot_id", lot.as_str()),
        ("reason", "granted by mistake"),
        ("confirm", "yes"),
    ];
    let r = b.post("/console/users/carol/void", &void).await;
    assert_eq!(r.status(), StatusCode::OK);
    let done = r.text().await.expect("body");
    assert!(done.contains("data-label=\"Kind\">void<"), "{done}");
    let r = b.post("/console/users/carol/void", &void).await;
    assert!(
        r.text()
            .await
            .expect("body")
            .contains("data-replayed=\"true\"")
    );
    assert_eq!(app.balance("carol").await, 30);

    // Refund half of the reservation, twice with one form: once.
    let page = b.page("/console/users/carol").await;
    let nonce = field(&page, "nonce");
    let refund = [
        ("csrf", csrf.as_str()),
        ("nonce", nonce.as_str()),
        ("app_name", "imagegene"),
        ("project_code", "art-1"),
        ("amount", "5"),
        ("reason", "half the batch failed"),
        ("confirm", "yes"),
    ];
    for _ in 0..2 {
        let r = b.post("/console/users/carol/refund", &refund).await;
        assert_eq!(r.status(), StatusCode::OK);
    }
    assert_eq!(app.balance("carol").await, 35);
    let info: serde_json::Value = app
        .get("/api/unified/transactions?user_id=carol&limit=50")
        .await
        .json()
        .await
        .expect("json");
    let kinds: Vec<&str> = info["transactions"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["kind"].as_str().expect("kind"))
        .collect();
    assert_eq!(kinds, ["refund", "void", "grant", "deduct", "grant"]);
    app.assert_reconciled().await;

    // The acting key is in the chain: the links check, and an edited
    // acted_by breaks its link.
    let ids: Vec<i64> = app
        .pool
        .get()
        .await
        .expect("db")
        .query(
            "SELECT id FROM ledger_entries WHERE user_id = 'carol' ORDER BY chain_seq",
            &[],
        )
        .await
        .expect("ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let chain = penora_domain::messages::CommittedChain {
        user_id: "carol".into(),
        seq: ids.len() as i64,
        entry_ids: ids,
    };
    let checked =
        penora_ledger::checkpoint::check_commits(&app.pool, None, std::slice::from_ref(&chain))
            .await
            .expect("checked");
    assert!(
        matches!(
            checked.get("carol"),
            Some(penora_ledger::checkpoint::Checked::Checked { .. })
        ),
        "{checked:?}"
    );
    {
        let c = app.pool.get().await.expect("db");
        c.batch_execute(
            "DELETE FROM audit_checkpoints WHERE user_id = 'carol';
             ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_append_only;
             UPDATE ledger_entries SET acted_by = 'someone-else' WHERE user_id = 'carol' AND kind = 'void';
             ALTER TABLE ledger_entries ENABLE TRIGGER ledger_entries_append_only;",
        )
        .await
        .expect("forged");
    }
    let checked = penora_ledger::checkpoint::check_commits(&app.pool, None, &[chain])
        .await
        .expect("checked");
    assert!(
        matches!(
            checked.get("carol"),
            Some(penora_ledger::checkpoint::Checked::Broken(_))
        ),
        "{checked:?}"
    );
}

#[tokio::test]
async fn a_read_key_sees_no_action_and_forms_from_elsewhere_are_refused() {
    let app = spawn_app().await;
    app.grant("dave", 10).await;
    let read = app.key("*", &[Scope::Read]).await;
    let mut reader = Browser::new(&app);
    reader.sign_in(&read).await;
    let page = reader.page("/console/users/dave").await;
    assert!(!page.contains("/grant\""), "no grant form");
    assert!(!page.contains("Void lot"), "no void button");
    let csrf = field(&page, "csrf");
    let r = reader
        .post(
            "/console/users/dave/grant",
            &[
                ("csrf", &csrf),
                ("nonce", &uuid::Uuid::new_v4().to_string()),
                ("amount", "5"),
                ("reason", "x"),
                ("confirm", "yes"),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(r.text().await.expect("body").contains("forbidden"));
    assert_eq!(app.balance("dave").await, 10);

    let mut admin = Browser::new(&app);
    admin.sign_in(BOOT_KEY).await;
    let page = admin.page("/console/users/dave").await;
    let csrf = field(&page, "csrf");
    let nonce = field(&page, "nonce");
    let fields = [
        ("csrf", csrf.as_str()),
        ("nonce", nonce.as_str()),
        ("amount", "5"),
        ("reason", "x"),
        ("confirm", "yes"),
    ];
    // Another origin (another port of this host is the same site, which
    // SameSite lets through): refused.
    let other = app.base.replace("127.0.0.1:", "127.0.0.1:1");
    for origin in [other.as_str(), "https://evil.example", "null"] {
        let r = admin
            .post_from(origin, "/console/users/dave/grant", &fields)
            .await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{origin}");
    }
    // The console's origin without the session's CSRF token: refused.
    let r = admin
        .post(
            "/console/users/dave/grant",
            &[
                ("nonce", nonce.as_str()),
                ("amount", "5"),
                ("reason", "x"),
                ("confirm", "yes"),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // Sign-in from another origin (login CSRF): refused.
    let r = Browser::new(&app)
        .post_from(
            "https://evil.example",
            "/console/sign-in",
            &[("api_key", BOOT_KEY)],
        )
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(app.balance("dave").await, 10);
    // The same form from the console: done.
    let r = admin.post("/console/users/dave/grant", &fields).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(app.balance("dave").await, 15);
}

#[tokio::test]
async fn the_operations_page_retries_a_set_aside_row_and_shows_the_last_checks_with_the_broker_down()
 {
    // This API's broker is unreachable (the tests' default): the page says
    // so and shows the rest.
    let app = spawn_app().await;
    app.grant("erin", 10).await;
    let row: i64 = {
        let c = app.pool.get().await.expect("db");
        let id: i64 = c
            .query_one(
                "UPDATE outbox SET set_aside_at = now(), refusals = 5, last_error = 'NO_ROUTE' \
                 WHERE id = (SELECT min(id) FROM outbox WHERE user_id = 'erin') RETURNING id",
                &[],
            )
            .await
            .expect("set aside")
            .get(0);
        penora_store::ops_runs::record(
            &c,
            penora_store::ops_runs::RECONCILE,
            true,
            "reconcile OK: 1 users, 1 ledger entries, 0 reservations, no violation",
            &json!({"violations": []}),
            time::OffsetDateTime::now_utc(),
        )
        .await
        .expect("recorded");
        id
    };
    // An endpoint without an app (any app's events) failing its deliveries.
    {
        let c = app.pool.get().await.expect("db");
        c.batch_execute(
            "INSERT INTO webhook_endpoints (id, url, events, app, secret_nonce, secret_sealed) \
               VALUES ('we_0123456789abcdef0123456789abcdef', 'https://hooks.example/penora', \
                       ARRAY['credits.granted'], NULL, '\\x000000000000000000000000', '\\x00'); \
             INSERT INTO webhook_deliveries (event_id, endpoint_id, user_id, event_type, state, attempts, last_attempt_at) \
               VALUES ('evt_1', 'we_0123456789abcdef0123456789abcdef', 'erin', 'credits.granted', 'failing', 3, now()); \
             INSERT INTO webhook_attempts (event_id, endpoint_id, user_id, attempt, status_code, latency_ms) \
               VALUES ('evt_1', 'we_0123456789abcdef0123456789abcdef', 'erin', 3, 502, 40);",
        )
        .await
        .expect("a failing endpoint");
    }
    let read = app.key("*", &[Scope::Read]).await;
    let mut reader = Browser::new(&app);
    reader.sign_in(&read).await;
    // A read key sees the depths and the checks, not the rows or webhooks.
    let page = reader.page("/console/ops").await;
    assert!(
        page.contains("RabbitMQ did not answer"),
        "the broker is down"
    );
    assert!(page.contains("reconcile OK: 1 users"), "the last reconcile");
    assert!(page.contains("never run"), "no audit verify yet");
    assert!(!page.contains("data-label=\"Row\""), "no outbox rows");
    assert!(!page.contains("Webhook endpoints"));
    assert!(
        !page.contains("/console/ops/outbox/retry"),
        "a read key has no retry"
    );
    let csrf = field(&page, "csrf");
    let id = row.to_string();
    let r = reader
        .post("/console/ops/outbox/retry", &[("csrf", &csrf), ("id", &id)])
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    let mut admin = Browser::new(&app);
    admin.sign_in(BOOT_KEY).await;
    let page = admin.page("/console/ops").await;
    let csrf = field(&page, "csrf");
    assert!(
        page.contains(&format!("data-label=\"Row\">{row}<")),
        "the set-aside row"
    );
    // (its last error is the relay's latest: the broker is down)
    assert!(page.contains("penora-ops outbox retry"));
    assert!(page.contains("/console/ops/outbox/retry"));
    assert!(page.contains("Webhook endpoints"));
    assert!(page.contains("https://hooks.example/penora"));
    assert!(
        page.contains("data-label=\"Failing now\">1<"),
        "its failing delivery counted"
    );
    assert!(
        page.contains("data-label=\"Last answer\">502<"),
        "the last attempt's answer"
    );
    assert!(
        page.contains("data-label=\"App\">any<"),
        "an endpoint of no app"
    );
    // An admin key bound to an app sees and retries none of it.
    let bound = app.key("imagegene", &[Scope::Admin, Scope::Read]).await;
    let mut bound_browser = Browser::new(&app);
    bound_browser.sign_in(&bound).await;
    let bound_page = bound_browser.page("/console/ops").await;
    assert!(!bound_page.contains("data-label=\"Row\""));
    let bound_csrf = field(&bound_page, "csrf");
    let r = bound_browser
        .post(
            "/console/ops/outbox/retry",
            &[("csrf", bound_csrf.as_str()), ("id", id.as_str())],
        )
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = admin
        .post("/console/ops/outbox/retry", &[("csrf", &csrf), ("id", &id)])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let body = r.text().await.expect("body");
    assert!(body.contains(&format!("Outbox row {row} put back")));
    let still: i64 = app
        .pool
        .get()
        .await
        .expect("db")
        .query_one(
            "SELECT count(*) FROM outbox WHERE set_aside_at IS NOT NULL",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(still, 0, "put back to be published");
    // Again: nothing is set aside any more.
    let r = admin
        .post("/console/ops/outbox/retry", &[("csrf", &csrf), ("id", &id)])
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn an_admin_key_bound_to_an_app_acts_only_for_that_app_as_in_the_api() {
    let app = spawn_app().await;
    // A penora lot and an imagegene reservation.
    app.grant("fay", 30).await;
    let (s, _) = app.deduct("fay", 6, "gen-1").await;
    assert!(s.is_success());
    let bound = app.key("penora", &[Scope::Admin, Scope::Read]).await;
    let mut b = Browser::new(&app);
    b.sign_in(&bound).await;
    let page = b.page("/console/users/fay").await;
    let csrf = field(&page, "csrf");
    // Refunding ImageGene's reservation: refused with the API's code.
    let nonce = uuid::Uuid::new_v4().to_string();
    let r = b
        .post(
            "/console/users/fay/refund",
            &[
                ("csrf", csrf.as_str()),
                ("nonce", nonce.as_str()),
                ("app_name", "imagegene"),
                ("project_code", "gen-1"),
                ("reason", "x"),
                ("confirm", "yes"),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(r.text().await.expect("body").contains("app_mismatch"));
    // Its grant is penora's, its acting key recorded.
    let nonce = uuid::Uuid::new_v4().to_string();
    let r = b
        .post(
            "/console/users/fay/grant",
            &[
                ("csrf", csrf.as_str()),
                ("nonce", nonce.as_str()),
                ("amount", "4"),
                ("reason", "sorry"),
                ("confirm", "yes"),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let (app_name, acted): (String, Option<String>) = {
        let row = app
            .pool
            .get()
            .await
            .expect("db")
            .query_one(
                "SELECT app_name, acted_by FROM ledger_entries WHERE reference = $1",
                &[&format!("console-{nonce}")],
            )
            .await
            .expect("the grant");
        (row.get(0), row.get(1))
    };
    assert_eq!(app_name, "penora");
    assert!(acted.is_some_and(|k| k != "bootstrap"));
    assert_eq!(app.balance("fay").await, 28);
}
