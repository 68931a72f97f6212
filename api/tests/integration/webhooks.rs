//! Webhook registration (contract §14) through the API against the real
//! PostgreSQL: what is refused and why, the secret shown once and never
//! again (not even to the database in plaintext), deletion, and the test
//! event's delivery row and job written together. Delivery itself is in
//! `worker/tests/pipeline/webhooks.rs`.

use penora_platform::keys::Scope;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{expect_error, spawn_app, spawn_app_with};

const PATH: &str = "/api/unified/webhooks";

#[tokio::test]
async fn registration_refuses_bad_targets_and_types_naming_the_field() {
    let app = spawn_app().await;
    let cases = [
        (json!({"events": ["*"]}), "url:"),
        (json!({"url": "https://hooks.example.com/x"}), "events:"),
        (
            json!({"url": "https://hooks.example.com/x", "events": []}),
            "events:",
        ),
        (
            json!({"url": "https://hooks.example.com/x", "events": ["balance.lower"]}),
            "events:",
        ),
        (
            json!({"url": "http://hooks.example.com/x", "events": ["*"]}),
            "url:",
        ),
        (
            json!({"url": "ftp://hooks.example.com/x", "events": ["*"]}),
            "url:",
        ),
        (
            json!({"url": "https://u:p@hooks.example.com/x", "events": ["*"]}),
            "url:",
        ),
        (
            json!({"url": "https://127.0.0.1/x", "events": ["*"]}),
            "url:",
        ),
        (
            json!({"url": "https://2130706433/x", "events": ["*"]}),
            "url:",
        ),
        (json!({"url": "https://0x7f.1/x", "events": ["*"]}), "url:"),
        (json!({"url": "https://[::1]/x", "events": ["*"]}), "url:"),
        (
            json!({"url": "https://[::ffff:169.254.169.254]/x", "events": ["*"]}),
            "url:",
        ),
        (
            json!({"url": "https://localhost/x", "events": ["*"]}),
            "url:",
        ),
        (json!({"url": "not a url", "events": ["*"]}), "url:"),
        (
            json!({"url": "https://hooks.example.com/x", "events": ["*"], "app": "Not An App"}),
            "app:",
        ),
    ];
    for (body, field) in cases {
        let error = expect_error(
            app.post(PATH, &body).await,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        )
        .await;
        assert!(error.starts_with(field), "{body}: {error}");
    }
    let client = app.pool.get().await.expect("db");
    let n: i64 = client
        .query_one("SELECT count(*) FROM webhook_endpoints", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 0, "nothing refused was stored");
}

#[tokio::test]
async fn the_secret_is_shown_once_never_listed_and_not_stored_in_plaintext() {
    let app = spawn_app().await;
    // A name that does not resolve now is taken: delivery checks it again
    // on every connection.
    let r = app
        .post(
            PATH,
            &json!({"url": "https://hooks.penora.invalid/in", "events": ["balance.low", "credits.granted", "balance.low"],
                    "app": "imagegene", "description": "ImageGene top-ups"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let created: Value = r.json().await.expect("json");
    let id = created["id"].as_str().expect("id").to_owned();
    let secret = created["secret"].as_str().expect("secret").to_owned();
    assert!(id.starts_with("we_"), "{id}");
    assert!(secret.starts_with("whsec_"), "{secret}");
    assert_eq!(created["events"], json!(["balance.low", "credits.granted"]));
    assert_eq!(created["app"], "imagegene");
    let key_bytes = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(&secret[6..])
            .expect("base64")
    };
    assert!(key_bytes.len() >= 24, "24 random bytes or more");

    let listed = app.get(PATH).await;
    assert_eq!(listed.status(), StatusCode::OK);
    let text = listed.text().await.expect("text");
    assert!(text.contains(&id), "{text}");
    assert!(
        !text.contains("secret") && !text.contains(&secret[6..]),
        "{text}"
    );

    let client = app.pool.get().await.expect("db");
    let row = client
        .query_one(
            "SELECT row_to_json(e)::text AS all_columns, secret_sealed, \
                    position($2::bytea IN secret_sealed) AS at \
             FROM webhook_endpoints e WHERE id = $1",
            &[&id, &key_bytes],
        )
        .await
        .expect("row");
    let all: String = row.get("all_columns");
    let sealed: Vec<u8> = row.get("secret_sealed");
    let at: i32 = row.get("at");
    assert!(
        !all.contains(&secret[6..]) && !all.contains("whsec_"),
        "{all}"
    );
    assert_eq!(at, 0, "the secret's bytes are not in the sealed column");
    assert_eq!(sealed.len(), key_bytes.len() + 16, "ciphertext and tag");
}

#[tokio::test]
async fn deleting_and_testing_unknown_endpoints_answer_404_and_a_test_writes_its_delivery_and_job()
{
    let app = spawn_app().await;
    expect_error(
        app.delete(&format!("{PATH}/we_nope")).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    expect_error(
        app.post(&format!("{PATH}/we_nope/test"), &json!({})).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let created: Value = app
        .post(
            PATH,
            &json!({"url": "https://hooks.penora.invalid/in", "events": ["*"]}),
        )
        .await
        .json()
        .await
        .expect("json");
    let id = created["id"].as_str().expect("id").to_owned();
    let r = app.post(&format!("{PATH}/{id}/test"), &json!({})).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let sent: Value = r.json().await.expect("json");
    let event = sent["event_id"].as_str().expect("event id").to_owned();
    assert!(event.starts_with("evt_"), "{event}");
    let client = app.pool.get().await.expect("db");
    let row = client
        .query_one(
            "SELECT d.state, d.event_type, \
               (SELECT count(*) FROM outbox o WHERE o.routing_key = 'penora.webhooks' \
                  AND o.payload->>'event_id' = d.event_id AND o.payload->>'endpoint_id' = d.endpoint_id) AS jobs, \
               (SELECT o.payload->>'body' FROM outbox o WHERE o.routing_key = 'penora.webhooks' LIMIT 1) AS body \
             FROM webhook_deliveries d WHERE d.event_id = $1 AND d.endpoint_id = $2",
            &[&event, &id],
        )
        .await
        .expect("delivery row");
    assert_eq!(row.get::<_, String>("state"), "pending");
    assert_eq!(row.get::<_, String>("event_type"), "webhook.test");
    assert_eq!(row.get::<_, i64>("jobs"), 1, "its job written with it");
    let body: Value = serde_json::from_str(&row.get::<_, String>("body")).expect("envelope");
    assert_eq!(body["id"], json!(event));
    assert_eq!(body["type"], "webhook.test");
    assert_eq!(body["data"]["endpoint_id"], json!(id));

    let r = app.delete(&format!("{PATH}/{id}")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let listed: Value = app.get(PATH).await.json().await.expect("json");
    assert_eq!(listed["webhooks"], json!([]));
    expect_error(
        app.delete(&format!("{PATH}/{id}")).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    expect_error(
        app.post(&format!("{PATH}/{id}/test"), &json!({})).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
}

#[tokio::test]
async fn only_admin_keys_manage_webhooks_and_a_bound_key_only_its_apps() {
    let app = spawn_app().await;
    let reader = app
        .key("*", &[Scope::Read, Scope::Spend, Scope::Write])
        .await;
    expect_error(
        app.post_with_key(
            PATH,
            &json!({"url": "https://hooks.penora.invalid/", "events": ["*"]}),
            &reader,
        )
        .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    expect_error(
        app.get_with_key(PATH, &reader).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    let bound = app.key("imagegene", &[Scope::Admin]).await;
    expect_error(
        app.post_with_key(
            PATH,
            &json!({"url": "https://hooks.penora.invalid/", "events": ["*"], "app": "penora"}),
            &bound,
        )
        .await,
        StatusCode::FORBIDDEN,
        "app_mismatch",
    )
    .await;
    let r = app
        .post_with_key(
            PATH,
            &json!({"url": "https://hooks.penora.invalid/", "events": ["*"]}),
            &bound,
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let created: Value = r.json().await.expect("json");
    assert_eq!(
        created["app"], "imagegene",
        "a bound key's endpoint is bound to its app"
    );
}

#[tokio::test]
async fn without_a_secrets_key_no_endpoint_is_registered() {
    let app = spawn_app_with(&[("WEBHOOK_SECRET_KEY", "")]).await;
    expect_error(
        app.post(
            PATH,
            &json!({"url": "https://hooks.penora.invalid/", "events": ["*"]}),
        )
        .await,
        StatusCode::SERVICE_UNAVAILABLE,
        "webhooks_not_configured",
    )
    .await;
}

/// How many endpoints are stored, deleted ones included.
async fn endpoints(client: &deadpool_postgres::Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM webhook_endpoints", &[])
        .await
        .expect("count")
        .get(0)
}

/// `POST /webhooks` with `Idempotency-Key: idem` and `key` in `X-API-Key`.
async fn register_with(
    app: &crate::support::TestApp,
    body: &Value,
    key: &str,
    idem: &str,
) -> (StatusCode, bool, Value) {
    let r = app
        .http
        .post(format!("{}{PATH}", app.base))
        .header("X-API-Key", key)
        .header("Idempotency-Key", idem)
        .json(body)
        .send()
        .await
        .expect("request sent");
    let status = r.status();
    let replayed = r.headers().get("idempotent-replayed").is_some();
    (status, replayed, r.json().await.expect("json"))
}

#[tokio::test]
async fn a_registration_sent_again_with_its_idempotency_key_makes_one_endpoint_and_answers_its_secret()
 {
    use crate::support::BOOT_KEY;
    let app = spawn_app().await;
    let body = json!({"url": "https://hooks.penora.invalid/in", "events": ["balance.low"],
                      "description": "sent by a client that retries"});
    // Eight at once with one key (a client retrying while the first is in
    // flight): one endpoint, one secret, every answer the same.
    let answers = futures_util::future::join_all(
        (0..8).map(|_| register_with(&app, &body, BOOT_KEY, "register-7f3c")),
    )
    .await;
    let first = &answers[0].2;
    let (id, secret) = (first["id"].clone(), first["secret"].clone());
    assert!(secret.as_str().is_some_and(|s| s.starts_with("whsec_")));
    for (status, _, answer) in &answers {
        assert_eq!(*status, StatusCode::CREATED, "{answer}");
        assert_eq!((&answer["id"], &answer["secret"]), (&id, &secret));
    }
    assert_eq!(
        answers.iter().filter(|(_, replayed, _)| !replayed).count(),
        1,
        "one made it, the others are replays"
    );
    let client = app.pool.get().await.expect("db");
    assert_eq!(endpoints(&client).await, 1);

    // The same key with other parameters: a conflict, nothing made.
    let other = json!({"url": "https://hooks.penora.invalid/other", "events": ["balance.low"],
                       "description": "sent by a client that retries"});
    let (status, _, answer) = register_with(&app, &other, BOOT_KEY, "register-7f3c").await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert_eq!(answer["code"], "idempotency_conflict");
    // Another caller's same header is that caller's own registration.
    let admin = app.key("*", &[Scope::Admin]).await;
    let (status, replayed, theirs) = register_with(&app, &body, &admin, "register-7f3c").await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false));
    assert_ne!(theirs["id"], id);
    assert_ne!(theirs["secret"], secret);
    assert_eq!(endpoints(&client).await, 2);

    // Once deleted, the key answers a conflict, not a deleted endpoint.
    let id = id.as_str().expect("id");
    let r = app
        .http
        .delete(format!("{}{PATH}/{id}", app.base))
        .header("X-API-Key", BOOT_KEY)
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), StatusCode::OK);
    let (status, _, answer) = register_with(&app, &body, BOOT_KEY, "register-7f3c").await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert!(
        answer["error"].as_str().is_some_and(|e| e.contains(id)),
        "{answer}"
    );
    // Without the header, each registration is a new endpoint, as before.
    for _ in 0..2 {
        assert_eq!(app.post(PATH, &body).await.status(), StatusCode::CREATED);
    }
    assert_eq!(endpoints(&client).await, 4);
}
