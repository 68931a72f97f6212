//! The integration guide, request by request: every route, field and error
//! string ImageGene codes against.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{BOOT_KEY, PNG_1X1, base64_of, expect_error, spawn_app};

fn is_millis_timestamp(v: &Value) -> bool {
    let Some(s) = v.as_str() else { return false };
    // 2025-08-28T06:00:00.000Z
    s.len() == 24
        && s.ends_with('Z')
        && s.as_bytes()[10] == b'T'
        && s.as_bytes()[19] == b'.'
        && time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).is_ok()
}

#[tokio::test]
async fn user_info_answers_the_guides_shape() {
    let app = spawn_app().await;
    app.grant("101902121794505144784", 50).await;
    let r = app
        .get("/api/unified/user-info?user_id=101902121794505144784")
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["success"], json!(true));
    assert_eq!(body["user_id"], json!("101902121794505144784"));
    assert_eq!(body["credits"], json!(50));
    let storage = &body["storage"];
    assert_eq!(storage["used_mb"], json!(0.0));
    assert_eq!(storage["remaining_mb"], json!(1.0));
    assert_eq!(storage["total_mb"], json!(1.0));
    assert_eq!(storage["usage_percentage"], json!(0));
    assert_eq!(storage["total_projects"], json!(0));
    assert!(is_millis_timestamp(&body["timestamp"]), "{body}");
}

#[tokio::test]
async fn storage_figures_are_mib_with_two_decimals() {
    let app = spawn_app().await;
    app.grant("u1", 1).await;
    // 891,290 bytes = 0.85 MiB of the 1 MiB quota.
    let content = base64_of(891_290);
    let r = app
        .post(
            "/api/unified/save-project",
            &json!({"user_id": "u1", "app_source": "imagegene", "project_type": "ai_artwork", "title": "t", "content": content}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let body: Value = app
        .get("/api/unified/user-info?user_id=u1")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(body["storage"]["used_mb"], json!(0.85));
    assert_eq!(body["storage"]["remaining_mb"], json!(0.15));
    assert_eq!(body["storage"]["usage_percentage"], json!(85));
    assert_eq!(body["storage"]["total_projects"], json!(1));
}

#[tokio::test]
async fn deduct_answers_the_guides_fields_and_the_contracts() {
    let app = spawn_app().await;
    app.grant("101902121794505144784", 50).await;
    let r = app
        .post(
            "/api/unified/deduct-credits",
            &json!({
              "user_id": "101902121794505144784",
              "amount": 5,
              "app_name": "imagegene",
              "description": "AI image generation - 1024x1024 artwork",
              "project_code": "img_xyz123"
            }),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().get("idempotent-replayed").is_none());
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["success"], json!(true));
    assert_eq!(body["credits_deducted"], json!(5));
    assert_eq!(body["new_balance"], json!(45));
    assert_eq!(body["app_name"], json!("imagegene"));
    assert_eq!(body["project_code"], json!("img_xyz123"));
    assert_eq!(body["reservation_status"], json!("reserved"));
    assert!(is_millis_timestamp(&body["timestamp"]), "{body}");
    assert!(is_millis_timestamp(&body["refundable_until"]), "{body}");
    assert_eq!(app.balance("101902121794505144784").await, 45);
}

#[tokio::test]
async fn the_guides_curl_examples_work_and_a_missing_project_code_is_made() {
    let app = spawn_app().await;
    app.grant("TEST_USER_ID", 10).await;
    let r = app
        .http
        .get(format!(
            "{}/api/unified/user-info?user_id=TEST_USER_ID",
            app.base
        ))
        .header("X-API-Key", BOOT_KEY)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), StatusCode::OK);
    let r = app
        .http
        .post(format!("{}/api/unified/deduct-credits", app.base))
        .header("X-API-Key", BOOT_KEY)
        .header("Content-Type", "application/json")
        .body(r#"{"user_id":"TEST_USER_ID","amount":2,"app_name":"imagegene","description":"Test deduction"}"#)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["new_balance"], json!(8));
    let code = body["project_code"]
        .as_str()
        .expect("a project_code is made");
    assert!(code.starts_with("pc_"), "{code}");
}

#[tokio::test]
async fn the_api_key_query_parameter_works_like_the_header() {
    let app = spawn_app().await;
    app.grant("u1", 3).await;
    let r = app
        .http
        .get(format!(
            "{}/api/unified/user-info?user_id=u1&api_key={BOOT_KEY}",
            app.base
        ))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), StatusCode::OK);
    let r = app
        .http
        .post(format!(
            "{}/api/unified/deduct-credits?api_key={BOOT_KEY}",
            app.base
        ))
        .json(&json!({"user_id": "u1", "amount": 1, "app_name": "imagegene"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn the_guides_error_strings_are_kept_word_for_word() {
    let app = spawn_app().await;
    app.grant("u1", 1).await;
    let no_key = app
        .http
        .get(format!("{}/api/unified/user-info?user_id=u1", app.base))
        .send()
        .await
        .expect("sent");
    assert_eq!(
        expect_error(no_key, StatusCode::UNAUTHORIZED, "invalid_api_key").await,
        "Invalid or missing API key. Include X-API-Key header or api_key parameter."
    );
    let bad_key = app
        .get_with_key("/api/unified/user-info?user_id=u1", "nope")
        .await;
    assert_eq!(
        expect_error(bad_key, StatusCode::UNAUTHORIZED, "invalid_api_key").await,
        "Invalid or missing API key. Include X-API-Key header or api_key parameter."
    );
    let poor = app
        .post(
            "/api/unified/deduct-credits",
            &json!({"user_id": "u1", "amount": 5, "app_name": "imagegene"}),
        )
        .await;
    assert_eq!(
        expect_error(poor, StatusCode::PAYMENT_REQUIRED, "insufficient_credits").await,
        "Insufficient credits or deduction failed"
    );
    let no_user = app
        .post(
            "/api/unified/deduct-credits",
            &json!({"amount": 5, "app_name": "imagegene"}),
        )
        .await;
    assert_eq!(
        expect_error(no_user, StatusCode::BAD_REQUEST, "user_id_required").await,
        "User ID required"
    );
    let no_user = app.get("/api/unified/user-info").await;
    assert_eq!(
        expect_error(no_user, StatusCode::BAD_REQUEST, "user_id_required").await,
        "User ID required"
    );
    let unknown = app.get("/api/unified/user-info?user_id=nobody").await;
    assert_eq!(
        expect_error(unknown, StatusCode::NOT_FOUND, "user_not_found").await,
        "User not found"
    );
    assert_eq!(app.balance("u1").await, 1, "no error moved credits");
}

#[tokio::test]
async fn save_project_takes_the_guides_body_and_projects_lists_both_apps() {
    let app = spawn_app().await;
    app.grant("101902121794505144784", 10).await;
    let save = |app_source: &'static str, title: &'static str| {
        json!({
          "user_id": "101902121794505144784",
          "app_source": app_source,
          "project_type": "ai_artwork",
          "title": title,
          "content": PNG_1X1,
          "metadata": {
            "style": "realistic",
            "dimensions": "1024x1024",
            "model": "stable_diffusion_xl",
            "prompt": "Beautiful sunset over mountains"
          }
        })
    };
    for (source, title) in [
        ("imagegene", "Sunset Landscape AI Art"),
        ("penora", "Chapter 1"),
        ("imagegene", "Two"),
    ] {
        let r = app
            .post("/api/unified/save-project", &save(source, title))
            .await;
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        let body: Value = r.json().await.expect("json");
        assert_eq!(body["success"], json!(true));
        assert_eq!(body["status"], json!("queued"));
        assert_eq!(body["size_bytes"], json!(70));
        assert!(body["project_id"].as_str().is_some());
    }
    let r = app
        .get("/api/unified/projects?user_id=101902121794505144784&app=imagegene")
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["success"], json!(true));
    assert_eq!(body["total_count"], json!(3));
    assert_eq!(body["penora_count"], json!(1));
    assert_eq!(body["imagegene_count"], json!(2));
    assert_eq!(body["all_projects"].as_array().map(Vec::len), Some(3));
    assert_eq!(body["penora_projects"].as_array().map(Vec::len), Some(1));
    assert_eq!(body["imagegene_projects"].as_array().map(Vec::len), Some(2));
    let newest = &body["all_projects"][0];
    assert_eq!(newest["title"], json!("Two"), "newest first");
    for field in [
        "id",
        "app_source",
        "project_type",
        "title",
        "status",
        "size_bytes",
        "metadata",
        "created_at",
        "content_url",
    ] {
        assert!(
            newest.get(field).is_some(),
            "project lacks {field}: {newest}"
        );
    }
    assert!(newest.get("content").is_none(), "content is not inlined");
    assert_eq!(
        body["penora_projects"][0]["metadata"]["prompt"],
        json!("Beautiful sunset over mountains")
    );
}

#[tokio::test]
async fn projects_of_other_apps_get_their_own_lists_and_counts() {
    let app = spawn_app().await;
    app.grant("u1", 1).await;
    let r = app
        .post(
            "/api/unified/save-project",
            &json!({"user_id": "u1", "app_source": "storyboard", "project_type": "doc", "title": "x", "content": PNG_1X1}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let body: Value = app
        .get("/api/unified/projects?user_id=u1")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(body["storyboard_count"], json!(1));
    assert_eq!(
        body["storyboard_projects"].as_array().map(Vec::len),
        Some(1)
    );
    assert_eq!(body["penora_count"], json!(0));
    assert_eq!(body["total_count"], json!(1));
}

#[tokio::test]
async fn the_guides_javascript_runs_unchanged_against_the_live_api() {
    let app = spawn_app().await;
    app.grant("js_user", 50).await;
    app.grant("js_poor", 3).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/js/guide.mjs");
    let output = tokio::process::Command::new("node")
        .arg(script)
        .env("PENORA_BASE_URL", &app.base)
        .env("PENORA_API_KEY", BOOT_KEY)
        .env("TEST_USER_ID", "js_user")
        .env("POOR_USER_ID", "js_poor")
        .env("TEST_IMAGE_BASE64", PNG_1X1)
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!("node is needed for this test ({e}); install it with `apt-get install nodejs` (scripts/services.sh does)")
        });
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "node failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let out: Value = serde_json::from_str(stdout.trim()).expect("the script prints JSON");
    assert_eq!(out["example_credits"], json!(50));
    assert_eq!(out["flow"]["success"], json!(true));
    assert_eq!(out["flow"]["creditsRemaining"], json!(45));
    let code = out["flow"]["projectCode"].as_str().expect("project code");
    assert!(code.starts_with("img_"));
    assert_eq!(out["poor"], json!("Insufficient credits"));
    assert_eq!(out["bad_key"], json!("Failed to check credits"));
    let events = out["events"].as_array().expect("events");
    assert!(
        events.contains(&json!({"success": "Image generated! 45 credits remaining."})),
        "{out}"
    );
    assert!(
        events.contains(&json!({"error": "Not enough Ku coins. Please purchase more credits."})),
        "{out}"
    );

    // What the flow did, seen from the database.
    assert_eq!(app.balance("js_user").await, 45);
    assert_eq!(app.balance("js_poor").await, 3);
    let body: Value = app
        .get("/api/unified/projects?user_id=js_user")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(body["imagegene_count"], json!(1));
    let project = &body["imagegene_projects"][0];
    assert_eq!(
        project["title"],
        json!("AI Art: Beautiful sunset over mountains...")
    );
    assert_eq!(project["status"], json!("queued"));
    assert_eq!(project["metadata"]["dimensions"], json!("1024x1024"));
    let txs: Value = app
        .get("/api/unified/transactions?user_id=js_user")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(txs["transactions"][0]["kind"], json!("deduct"));
    assert_eq!(txs["transactions"][0]["project_code"], json!(code));
    assert_eq!(
        txs["transactions"][0]["description"],
        json!("Image generation - 1024x1024 artwork")
    );
    app.assert_reconciled().await;
}
