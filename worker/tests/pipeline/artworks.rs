//! Real artworks through the whole pipeline (contract §10): the API stores
//! them optimised, the worker checks them and makes their thumbnails, the
//! content and thumbnail routes serve them with `ETag`s; `evict_oldest`
//! makes room within one app; retention deletes what is past its time; a
//! project deleted while queued stays deleted.

use std::time::Duration;

use base64::Engine;
use penora_workspace::imaging::{self, samples};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{BOOT_KEY, Stack, stack, wait_for};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn save(s: &Stack, user: &str, app: &str, title: &str, png: &[u8], extra: Value) -> Value {
    let mut body = json!({"user_id": user, "app_source": app, "project_type": "ai_artwork",
                          "title": title, "content": b64(png)});
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    let r = s.post("/api/unified/save-project", &body).await;
    let status = r.status();
    let body: Value = r.json().await.expect("json");
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    body
}

async fn get(s: &Stack, path: &str, etag: Option<&str>) -> reqwest::Response {
    let mut request = s
        .http
        .get(format!("{}{path}", s.base))
        .header("X-API-Key", BOOT_KEY);
    if let Some(etag) = etag {
        request = request.header("If-None-Match", etag);
    }
    request.send().await.expect("sent")
}

async fn status_of(s: &Stack, id: &str) -> String {
    let client = s.pool.get().await.expect("db");
    client
        .query_one(
            "SELECT status FROM projects WHERE id = $1::text::uuid",
            &[&id],
        )
        .await
        .expect("project")
        .get(0)
}

async fn used(s: &Stack, user: &str) -> i64 {
    s.scalar(
        "SELECT storage_used_bytes FROM accounts WHERE user_id = $1",
        user,
    )
    .await
}

async fn wait_saved(s: &Stack, id: &str) {
    wait_for(
        "the project to be saved",
        Duration::from_secs(60),
        || async { status_of(s, id).await == "saved" },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_1024_artwork_is_served_as_webp_with_a_thumbnail_and_etags() {
    let mut s = stack(&[], &[]).await;
    s.start_worker().await;
    s.grant("u1", 10).await;
    s.deduct("u1", 5, "img_art").await;
    let png = samples::photo_like_png(1024, 1024, 21);
    let saved = save(
        &s,
        "u1",
        "imagegene",
        "Sunset",
        &png,
        json!({"project_code": "img_art"}),
    )
    .await;
    let id = saved["project_id"].as_str().expect("id").to_owned();
    wait_saved(&s, &id).await;

    let list: Value = get(&s, "/api/unified/projects?user_id=u1", None)
        .await
        .json()
        .await
        .expect("json");
    let item = &list["all_projects"][0];
    assert_eq!(item["id"], json!(id));
    assert_eq!(item["content_type"], json!("image/webp"));
    assert_eq!(
        (item["width"].clone(), item["height"].clone()),
        (json!(1024), json!(1024))
    );
    assert_eq!(item["original_size_bytes"], json!(png.len()));
    let size = item["size_bytes"].as_i64().expect("size");
    assert!(size < 300_000, "{size}");

    let content_url = item["content_url"].as_str().expect("url");
    let r = get(&s, content_url, None).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "image/webp");
    assert!(
        r.headers()["cache-control"]
            .to_str()
            .expect("ascii")
            .starts_with("private")
    );
    let etag = r.headers()["etag"].to_str().expect("ascii").to_owned();
    let body = r.bytes().await.expect("bytes");
    assert_eq!(body.len() as i64, size);
    let image = imaging::decode(&body, 1 << 24).expect("decodes");
    assert_eq!((image.width(), image.height()), (1024, 1024));
    let r = get(&s, content_url, Some(&etag)).await;
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(r.headers()["etag"], etag.as_str());
    assert!(r.bytes().await.expect("bytes").is_empty());
    let r = get(&s, content_url, Some("\"something-else\"")).await;
    assert_eq!(r.status(), StatusCode::OK);

    let thumb_url = item["thumbnail_url"].as_str().expect("thumbnail url");
    let r = get(&s, thumb_url, None).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "image/webp");
    let thumb_etag = r.headers()["etag"].to_str().expect("ascii").to_owned();
    assert_ne!(thumb_etag, etag);
    let thumb = r.bytes().await.expect("bytes");
    let info = imaging::probe(&thumb).expect("a thumbnail image");
    assert_eq!(
        (info.media_type, info.width.max(info.height)),
        ("image/webp", 256)
    );
    assert_eq!(
        get(&s, thumb_url, Some(&thumb_etag)).await.status(),
        StatusCode::NOT_MODIFIED
    );
    // The thumbnail does not count: the quota holds the content and its
    // title (`Sunset`).
    assert_eq!(
        s.scalar(
            "SELECT storage_used_bytes FROM accounts WHERE user_id = $1",
            "u1"
        )
        .await,
        size + 6
    );
    // And the save settled the reservation it named.
    assert_eq!(
        s.scalar(
            "SELECT count(*) FROM reservations WHERE user_id = $1 AND state = 'settled'",
            "u1"
        )
        .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn evict_oldest_deletes_just_the_oldest_projects_of_the_same_app_or_nothing() {
    let mut s = stack(&[("STORAGE_QUOTA_BYTES", "400000")], &[]).await;
    s.start_worker().await;
    s.grant("u1", 1).await;
    // Penora's project first (the oldest of all), then three of ImageGene's.
    let mut ids = Vec::new();
    let penora = save(
        &s,
        "u1",
        "penora",
        "chapter art",
        &samples::photo_like_png(512, 512, 1),
        json!({}),
    )
    .await;
    let penora_id = penora["project_id"].as_str().expect("id").to_owned();
    for seed in 2..=4 {
        let r = save(
            &s,
            "u1",
            "imagegene",
            &format!("art {seed}"),
            &samples::photo_like_png(512, 512, seed),
            json!({}),
        )
        .await;
        // What each counts: its stored bytes and its title's (`art N`).
        ids.push((
            r["project_id"].as_str().expect("id").to_owned(),
            r["size_bytes"].as_i64().expect("size") + 5,
        ));
    }
    for (id, _) in &ids {
        wait_saved(&s, id).await;
    }
    wait_saved(&s, &penora_id).await;
    let before = used(&s, "u1").await;
    let big = samples::photo_like_png(1024, 1024, 9);
    let needed = imaging::prepare(
        big.clone(),
        &imaging::StoragePolicy {
            reencode: true,
            quality: 85.0,
            max_pixels: 1 << 24,
        },
    )
    .expect("prepared")
    .data
    .len() as i64
        + 3; // its title, `big`
    // Without evict_oldest: refused.
    let r = s
        .post(
            "/api/unified/save-project",
            &json!({"user_id": "u1", "app_source": "imagegene", "project_type": "ai_artwork",
                    "title": "big", "content": b64(&big)}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // With it: exactly the oldest ImageGene projects that make room.
    let r = save(
        &s,
        "u1",
        "imagegene",
        "big",
        &big,
        json!({"on_full": "evict_oldest"}),
    )
    .await;
    let must_free = before + needed - 400_000;
    let mut expected = Vec::new();
    let mut freed = 0;
    for (id, size) in &ids {
        if freed >= must_free {
            break;
        }
        freed += size;
        expected.push(json!(id));
    }
    assert!(
        !expected.is_empty() && expected.len() < ids.len(),
        "{expected:?}"
    );
    assert_eq!(r["evicted_project_ids"], json!(expected));
    assert_eq!(used(&s, "u1").await, before - freed + needed);
    assert_eq!(
        status_of(&s, &penora_id).await,
        "saved",
        "another app's project is never evicted"
    );
    assert_eq!(
        s.scalar(
            "SELECT count(*) FROM project_log WHERE user_id = $1 AND cause = 'evicted'",
            "u1"
        )
        .await,
        expected.len() as i64
    );
    // When even every ImageGene project cannot free enough (Penora's would
    // have to go too): nothing is deleted. Bytes that are not an image are
    // stored as sent, so this one needs exactly what it says.
    wait_saved(&s, r["project_id"].as_str().expect("id")).await;
    let penora_size = s
        .scalar(
            "SELECT size_bytes FROM projects WHERE app_source = 'penora' AND user_id = $1",
            "u1",
        )
        .await;
    let blob = vec![7u8; usize::try_from(400_000 - penora_size + 1).expect("size")];
    let before = used(&s, "u1").await;
    let r = s
        .post(
            "/api/unified/save-project",
            &json!({"user_id": "u1", "app_source": "imagegene", "project_type": "ai_artwork",
                    "title": "huge", "content": b64(&blob), "on_full": "evict_oldest"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["code"], json!("storage_limit_exceeded"));
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("none was deleted"),
        "{body}"
    );
    assert_eq!(used(&s, "u1").await, before);
    assert_eq!(
        s.scalar(
            "SELECT count(*) FROM project_log WHERE user_id = $1 AND cause = 'evicted'",
            "u1"
        )
        .await,
        expected.len() as i64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_deletes_only_the_projects_past_the_limit() {
    let mut s = stack(&[("PROJECT_RETENTION_DAYS", "30")], &[]).await;
    s.grant("u1", 1).await;
    let png = samples::photo_like_png(128, 128, 4);
    let mut ids = Vec::new();
    for title in ["old", "almost", "new"] {
        let r = save(&s, "u1", "imagegene", title, &png, json!({})).await;
        ids.push(r["project_id"].as_str().expect("id").to_owned());
    }
    // The clock we control: the projects' own creation times.
    let client = s.pool.get().await.expect("db");
    for (id, age) in [(&ids[0], "31 days"), (&ids[1], "29 days 23 hours")] {
        client
            .execute(
                "UPDATE projects SET created_at = now() - $2::text::interval WHERE id = $1::text::uuid",
                &[id, &age],
            )
            .await
            .expect("aged");
    }
    s.start_worker().await;
    wait_for(
        "the old project to be deleted",
        Duration::from_secs(30),
        || async { status_of(&s, &ids[0]).await == "deleted" },
    )
    .await;
    wait_saved(&s, &ids[1]).await;
    wait_saved(&s, &ids[2]).await;
    assert_eq!(
        s.scalar(
            "SELECT count(*) FROM project_log WHERE user_id = $1 AND cause = 'retention'",
            "u1"
        )
        .await,
        1
    );
    let live = s
        .scalar(
            "SELECT coalesce(sum(size_bytes + meta_bytes), 0)::bigint FROM projects WHERE user_id = $1 AND status <> 'deleted'",
            "u1",
        )
        .await;
    assert_eq!(
        s.scalar(
            "SELECT storage_used_bytes FROM accounts WHERE user_id = $1",
            "u1"
        )
        .await,
        live
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_project_deleted_while_queued_stays_deleted_and_its_job_does_nothing() {
    let mut s = stack(&[], &[]).await;
    s.grant("u1", 1).await;
    let r = save(
        &s,
        "u1",
        "imagegene",
        "gone",
        &samples::photo_like_png(256, 256, 8),
        json!({}),
    )
    .await;
    let id = r["project_id"].as_str().expect("id").to_owned();
    let deleted = s
        .http
        .delete(format!("{}/api/unified/projects/{id}?user_id=u1", s.base))
        .header("X-API-Key", BOOT_KEY)
        .send()
        .await
        .expect("sent");
    assert_eq!(deleted.status(), StatusCode::OK);
    s.start_worker().await;
    s.wait_idle().await;
    assert_eq!(status_of(&s, &id).await, "deleted");
    assert_eq!(
        s.scalar(
            "SELECT storage_used_bytes FROM accounts WHERE user_id = $1",
            "u1"
        )
        .await,
        0
    );
    assert_eq!(
        s.depth(&s.topology.dead_queue(penora_domain::messages::SAVE_PROJECT))
            .await,
        0
    );
}
