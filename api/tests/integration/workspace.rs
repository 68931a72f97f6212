//! Workspace storage for real images (contract §10): optimised storage, the
//! quota counting stored bytes, bounded memory, delete. Images are made here,
//! photo-like (colour fields, a horizon, foliage-like detail and film grain),
//! at the sizes ImageGene really sends.

use std::{sync::Arc, time::Duration};

use base64::Engine;
use penora_platform::keys::Scope;
use penora_workspace::imaging::{self, StoragePolicy, StoredAs, samples};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{ApiProcess, TestApp, expect_error, spawn_app, spawn_app_with};

const QUOTA: i64 = 1_048_576;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn save_body(user: &str, app: &str, content: &str) -> Value {
    json!({"user_id": user, "app_source": app, "project_type": "ai_artwork",
           "title": "Sunset", "content": content})
}

/// What the title `Sunset` of [`save_body`] counts in the quota besides the
/// content.
const TITLE: i64 = 6;

fn default_policy() -> StoragePolicy {
    StoragePolicy {
        reencode: true,
        quality: 85.0,
        max_pixels: 16_777_216,
    }
}

async fn stored(app: &TestApp, project_id: &str) -> (Vec<u8>, String) {
    let client = app.pool.get().await.expect("db");
    let row = client
        .query_one(
            "SELECT data, media_type FROM project_contents WHERE project_id = $1::text::uuid",
            &[&project_id],
        )
        .await
        .expect("content row");
    (row.get(0), row.get(1))
}

/// Saves `bytes` for `user` as ImageGene and returns the answer.
async fn save_bytes(app: &TestApp, user: &str, bytes: &[u8]) -> Value {
    app.post(
        "/api/unified/save-project",
        &save_body(user, "imagegene", &b64(bytes)),
    )
    .await
    .json()
    .await
    .expect("json")
}

async fn used(app: &TestApp, user: &str) -> i64 {
    app.scalar(
        "SELECT storage_used_bytes FROM accounts WHERE user_id = $1",
        user,
    )
    .await
}

#[tokio::test]
async fn realistic_1024_artworks_store_as_webp_under_300_kb_until_the_quota_refuses_one_exactly() {
    let app = spawn_app().await;
    app.grant("u1", 1).await;
    let mut total = 0;
    let mut accepted = 0;
    for seed in 1..=12 {
        let png = samples::photo_like_png(1024, 1024, seed);
        assert!(
            (1_800_000..2_300_000).contains(&png.len()),
            "a realistic 1024² PNG is about 1.9 MB, got {}",
            png.len()
        );
        let r = app
            .post(
                "/api/unified/save-project",
                &save_body("u1", "imagegene", &b64(&png)),
            )
            .await;
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            // What the refused image would have needed, computed as the API
            // does: its stored bytes and its title's.
            let needed = imaging::prepare(png, &default_policy())
                .expect("prepared")
                .data
                .len() as i64
                + TITLE;
            let msg =
                expect_error(r, StatusCode::PAYLOAD_TOO_LARGE, "storage_limit_exceeded").await;
            assert!(
                msg.contains(&format!("needs {needed} bytes"))
                    && msg.contains(&format!("{} bytes remain", QUOTA - total)),
                "{msg}"
            );
            break;
        }
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        let r: Value = r.json().await.expect("json");
        let size = r["size_bytes"].as_i64().expect("size");
        assert!(size < 300_000, "stored {size} bytes");
        assert_eq!(r["original_size_bytes"], json!(png.len()));
        assert_eq!(r["content_type"], json!("image/webp"));
        assert_eq!(
            (r["width"].clone(), r["height"].clone()),
            (json!(1024), json!(1024))
        );
        let (data, media_type) = stored(&app, r["project_id"].as_str().expect("id")).await;
        assert_eq!(media_type, "image/webp");
        assert_eq!(data.len() as i64, size);
        let decoded = image::load_from_memory(&data).expect("the stored WebP decodes");
        assert_eq!((decoded.width(), decoded.height()), (1024, 1024));
        total += size + TITLE;
        accepted += 1;
    }
    eprintln!(
        "{accepted} realistic 1024² artworks stored in {total} bytes before the quota refused one"
    );
    assert!(accepted >= 4, "only {accepted} artworks fit in 1 MiB");
    assert!(accepted < 12, "the quota never refused");
    assert_eq!(used(&app, "u1").await, total);
    app.assert_reconciled().await;
}

#[tokio::test]
async fn store_original_keeps_the_exact_bytes_and_so_does_image_storage_format_original() {
    let png = samples::photo_like_png(256, 256, 7);
    for (overrides, store_original) in [
        (vec![], true),
        (vec![("IMAGE_STORAGE_FORMAT", "original")], false),
    ] {
        let app = spawn_app_with(&overrides).await;
        app.grant("u1", 1).await;
        let mut body = save_body("u1", "imagegene", &b64(&png));
        body["store_original"] = json!(store_original);
        let r: Value = app
            .post("/api/unified/save-project", &body)
            .await
            .json()
            .await
            .expect("json");
        assert_eq!(r["size_bytes"], json!(png.len()), "{r}");
        assert_eq!(r["content_type"], json!("image/png"));
        let (data, _) = stored(&app, r["project_id"].as_str().expect("id")).await;
        assert!(data == png, "the stored bytes are the bytes sent");
    }
}

#[tokio::test]
async fn an_animated_gif_is_kept_as_sent() {
    use image::{Delay, Frame, RgbaImage, codecs::gif::GifEncoder};
    let mut gif = Vec::new();
    {
        let mut encoder = GifEncoder::new(&mut gif);
        for shade in [0u8, 128, 255] {
            let frame = RgbaImage::from_fn(64, 64, |x, y| {
                image::Rgba([shade, x as u8 * 4, y as u8 * 4, 255])
            });
            encoder
                .encode_frame(Frame::from_parts(
                    frame,
                    0,
                    0,
                    Delay::from_numer_denom_ms(100, 1),
                ))
                .expect("frame");
        }
    }
    let app = spawn_app().await;
    app.grant("u1", 1).await;
    let r = save_bytes(&app, "u1", &gif).await;
    assert_eq!(r["content_type"], json!("image/gif"), "{r}");
    let (data, _) = stored(&app, r["project_id"].as_str().expect("id")).await;
    assert!(data == gif, "the animation is stored as sent");
}

/// A JPEG photo with an EXIF block holding a GPS position (N 48° 51' 30").
fn jpeg_with_gps() -> Vec<u8> {
    let jpeg = samples::encode(&samples::photo_like(640, 480, 3), image::ImageFormat::Jpeg);
    // TIFF, little-endian: IFD0 with one entry (GPSInfo → the GPS IFD at 26),
    // the GPS IFD with GPSLatitudeRef "N" and GPSLatitude (3 rationals at 56).
    let mut tiff = b"II*\0\x08\0\0\0".to_vec();
    tiff.extend([1, 0, 0x25, 0x88, 4, 0, 1, 0, 0, 0, 26, 0, 0, 0, 0, 0, 0, 0]);
    tiff.extend([2, 0]);
    tiff.extend([1, 0, 2, 0, 2, 0, 0, 0, b'N', 0, 0, 0]);
    tiff.extend([2, 0, 5, 0, 3, 0, 0, 0, 56, 0, 0, 0]);
    tiff.extend([0, 0, 0, 0]);
    for (n, d) in [(48u32, 1u32), (51, 1), (30, 1)] {
        tiff.extend(n.to_le_bytes());
        tiff.extend(d.to_le_bytes());
    }
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend(&tiff);
    let mut out = jpeg[..2].to_vec();
    out.extend([0xff, 0xe1]);
    out.extend(u16::try_from(app1.len() + 2).expect("short").to_be_bytes());
    out.extend(&app1);
    out.extend(&jpeg[2..]);
    out
}

#[tokio::test]
async fn exif_with_a_gps_position_never_reaches_the_workspace() {
    let jpeg = jpeg_with_gps();
    assert!(jpeg.windows(4).any(|w| w == b"Exif"));
    let app = spawn_app().await;
    app.grant("u1", 1).await;
    let r = save_bytes(&app, "u1", &jpeg).await;
    let (data, media_type) = stored(&app, r["project_id"].as_str().expect("id")).await;
    assert_eq!(media_type, "image/webp");
    assert!(!data.windows(4).any(|w| w == b"Exif"), "EXIF stored");
    assert!(
        !data.windows(4).any(|w| w == b"II*\0"),
        "a TIFF block stored"
    );
    // Kept in its own format, the same photo loses its EXIF too.
    let stripped = imaging::strip_metadata(&jpeg, "image/jpeg").expect("stripped");
    assert!(!stripped.windows(4).any(|w| w == b"Exif"));
    assert_eq!(
        imaging::decode(&stripped, 1 << 24).map(|i| i.width()),
        Ok(640)
    );
    let kept = imaging::prepare(
        jpeg,
        &StoragePolicy {
            quality: 100.0,
            ..default_policy()
        },
    )
    .expect("prepared");
    if kept.stored_as == StoredAs::Stripped {
        assert!(!kept.data.windows(4).any(|w| w == b"Exif"));
    }
}

/// A 100 KB PNG whose header declares 30,000 × 30,000 pixels.
fn decompression_bomb() -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        png.extend(u32::try_from(data.len()).expect("small").to_be_bytes());
        let mut body = kind.to_vec();
        body.extend(data);
        png.extend(&body);
        png.extend(crc32(&body).to_be_bytes());
    };
    let mut ihdr = 30_000u32.to_be_bytes().to_vec();
    ihdr.extend(30_000u32.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &vec![0u8; 100_000]);
    chunk(b"IEND", &[]);
    png
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[tokio::test]
async fn a_decompression_bomb_is_refused_at_once_without_costing_memory() {
    let api = ApiProcess::start(&[]).await;
    api.app.grant("u1", 1).await;
    let bomb = b64(&decompression_bomb());
    let before = api.rss_kb();
    let started = std::time::Instant::now();
    let r = api
        .http
        .post(format!("{}/api/unified/save-project", api.base))
        .header("X-API-Key", crate::support::BOOT_KEY)
        .json(&save_body("u1", "imagegene", &bomb))
        .send()
        .await
        .expect("sent");
    let elapsed = started.elapsed();
    let msg = expect_error(r, StatusCode::BAD_REQUEST, "invalid_request").await;
    assert!(
        msg.starts_with("content:") && msg.contains("30000x30000"),
        "{msg}"
    );
    assert!(elapsed < Duration::from_millis(900), "took {elapsed:?}");
    let grown = api.rss_kb().saturating_sub(before);
    eprintln!("bomb refused in {elapsed:?}; the API's RSS grew by {grown} kB");
    assert!(grown < 8 * 1024, "the API's RSS grew by {grown} kB");
    assert_eq!(used(&api.app, "u1").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_concurrent_10_mb_saves_keep_memory_bounded_and_deductions_flowing() {
    let api = Arc::new(ApiProcess::start(&[("DB_POOL_SIZE", "16")]).await);
    let users: Vec<String> = (0..20).map(|i| format!("artist{i}")).collect();
    for u in &users {
        api.app.grant(u, 1_000).await;
    }
    // A 2048² upscale: about 7.7 MB of PNG, 10 MB as base64.
    let png = samples::photo_like_png(2048, 2048, 11);
    let content = b64(&png);
    assert!(
        content.len() > 10_000_000,
        "{} bytes of base64",
        content.len()
    );
    let bodies: Vec<axum::body::Bytes> = users
        .iter()
        .map(|u| {
            serde_json::to_vec(&save_body(u, "imagegene", &content))
                .expect("json")
                .into()
        })
        .collect();
    drop(content);
    let mut saves = Vec::new();
    for i in 0..100 {
        let (api, body) = (api.clone(), bodies[i % bodies.len()].clone());
        saves.push(tokio::spawn(async move {
            let r = api
                .http
                .post(format!("{}/api/unified/save-project", api.base))
                .header("X-API-Key", crate::support::BOOT_KEY)
                .header("Content-Type", "application/json")
                .body(body)
                .timeout(Duration::from_secs(120))
                .send()
                .await
                .expect("every save gets an answer");
            let retry_after = r.headers().get("retry-after").is_some();
            (r.status(), retry_after)
        }));
    }
    // Deductions sent while the saves run still succeed.
    let deducts = {
        let api = api.clone();
        tokio::spawn(async move {
            let mut ok = 0;
            for n in 0..20 {
                let r = api
                    .http
                    .post(format!("{}/api/unified/deduct-credits", api.base))
                    .header("X-API-Key", crate::support::BOOT_KEY)
                    .json(&json!({"user_id": format!("artist{}", n % 20), "amount": 1, "app_name": "imagegene"}))
                    .send()
                    .await
                    .expect("deduct answered");
                assert_eq!(r.status(), StatusCode::OK);
                ok += 1;
            }
            ok
        })
    };
    let mut by_status = std::collections::BTreeMap::new();
    for s in saves {
        let (status, retry_after) = s.await.expect("task");
        assert!(
            matches!(status.as_u16(), 202 | 413 | 503),
            "a save answered {status}"
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            assert!(retry_after, "a 503 without Retry-After");
        }
        *by_status.entry(status.as_u16()).or_insert(0) += 1;
    }
    assert_eq!(deducts.await.expect("deducts"), 20);
    let peak_mb = api.peak_rss_kb() / 1024;
    eprintln!("saves by status: {by_status:?}; the API's peak RSS: {peak_mb} MB");
    assert!(peak_mb < 400, "the API's peak RSS was {peak_mb} MB");
    assert!(
        by_status.get(&202).copied().unwrap_or(0) > 0,
        "{by_status:?}"
    );
    api.app.assert_reconciled().await;
}

#[tokio::test]
async fn deleting_frees_exactly_the_projects_bytes_and_a_second_delete_is_404() {
    let app = spawn_app().await;
    app.grant("u1", 1).await;
    let png = samples::photo_like_png(512, 512, 5);
    let mut ids = Vec::new();
    for title in ["a", "b"] {
        let mut body = save_body("u1", "imagegene", &b64(&png));
        body["title"] = json!(title);
        let r: Value = app
            .post("/api/unified/save-project", &body)
            .await
            .json()
            .await
            .expect("json");
        ids.push((
            r["project_id"].as_str().expect("id").to_owned(),
            r["size_bytes"].as_i64().expect("size"),
        ));
    }
    let before = used(&app, "u1").await;
    let (id, size) = &ids[0];
    let r = app
        .delete(&format!("/api/unified/projects/{id}?user_id=u1"))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r: Value = r.json().await.expect("json");
    assert_eq!(r["success"], json!(true));
    // Its stored bytes and its title's (`a`).
    let freed = size + 1;
    assert_eq!(r["freed_bytes"], json!(freed));
    assert_eq!(r["storage"]["used_bytes"], json!(before - freed));
    assert_eq!(r["storage"]["total_projects"], json!(1));
    assert_eq!(used(&app, "u1").await, before - freed);
    assert_eq!(
        app.scalar(
            "SELECT count(*) FROM project_contents WHERE user_id = $1",
            "u1"
        )
        .await,
        1,
        "its content is gone"
    );
    assert_eq!(
        app.scalar(
            "SELECT count(*) FROM project_log WHERE user_id = $1 AND kind = 'project.deleted' AND cause = 'request'",
            "u1"
        )
        .await,
        1
    );
    let again = app
        .delete(&format!("/api/unified/projects/{id}?user_id=u1"))
        .await;
    expect_error(again, StatusCode::NOT_FOUND, "not_found").await;
    let content = app
        .get(&format!("/api/unified/projects/{id}/content?user_id=u1"))
        .await;
    expect_error(content, StatusCode::NOT_FOUND, "not_found").await;
    let list: Value = app
        .get("/api/unified/projects?user_id=u1")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(list["total_count"], json!(1));
    assert_eq!(list["all_projects"][0]["id"], json!(ids[1].0));
    let unknown = app
        .delete(&format!(
            "/api/unified/projects/{}?user_id=u1",
            uuid::Uuid::now_v7()
        ))
        .await;
    expect_error(unknown, StatusCode::NOT_FOUND, "not_found").await;
    app.assert_reconciled().await;
}

#[tokio::test]
async fn a_key_bound_to_penora_cannot_delete_an_imagegene_project() {
    let app = spawn_app().await;
    app.grant("u1", 1).await;
    let r = save_bytes(&app, "u1", &samples::photo_like_png(64, 64, 1)).await;
    let id = r["project_id"].as_str().expect("id");
    let before = used(&app, "u1").await;
    let penora = app.key("penora", &[Scope::Write, Scope::Read]).await;
    let r = app
        .delete_with_key(&format!("/api/unified/projects/{id}?user_id=u1"), &penora)
        .await;
    expect_error(r, StatusCode::FORBIDDEN, "app_mismatch").await;
    let reader = app.key("imagegene", &[Scope::Read]).await;
    let r = app
        .delete_with_key(&format!("/api/unified/projects/{id}?user_id=u1"), &reader)
        .await;
    expect_error(r, StatusCode::FORBIDDEN, "forbidden").await;
    assert_eq!(used(&app, "u1").await, before, "nothing changed");
    let imagegene = app.key("imagegene", &[Scope::Write]).await;
    let r = app
        .delete_with_key(
            &format!("/api/unified/projects/{id}?user_id=u1"),
            &imagegene,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(used(&app, "u1").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_deletes_and_saves_never_exceed_the_quota_nor_count_a_byte_twice() {
    let app = Arc::new(
        spawn_app_with(&[("DB_POOL_SIZE", "16"), ("STORAGE_QUOTA_BYTES", "200000")]).await,
    );
    app.grant("u1", 1).await;
    // Not an image: stored as sent, 30,000 bytes each.
    let content = Arc::new(crate::support::base64_of(30_000));
    let mut saved = Vec::new();
    for _ in 0..6 {
        let r: Value = app
            .post(
                "/api/unified/save-project",
                &save_body("u1", "imagegene", &content),
            )
            .await
            .json()
            .await
            .expect("json");
        saved.push(r["project_id"].as_str().expect("id").to_owned());
    }
    let mut tasks = Vec::new();
    for round in 0..24 {
        let (app, content) = (app.clone(), content.clone());
        let victim = saved.get(round % 6).cloned().expect("id");
        tasks.push(tokio::spawn(async move {
            if round % 2 == 0 {
                app.delete(&format!("/api/unified/projects/{victim}?user_id=u1"))
                    .await
                    .status()
            } else {
                app.post(
                    "/api/unified/save-project",
                    &save_body("u1", "imagegene", &content),
                )
                .await
                .status()
            }
        }));
    }
    for t in tasks {
        let status = t.await.expect("task");
        assert!(
            matches!(status.as_u16(), 200 | 202 | 404 | 413),
            "unexpected {status}"
        );
    }
    let live = app
        .scalar(
            "SELECT coalesce(sum(size_bytes + meta_bytes), 0)::bigint FROM projects WHERE user_id = $1 AND status <> 'deleted'",
            "u1",
        )
        .await;
    assert_eq!(used(&app, "u1").await, live);
    assert!(live <= 200_000);
    assert_eq!(
        app.scalar("SELECT count(*) FROM project_log WHERE user_id = $1", "u1")
            .await,
        app.scalar(
            "SELECT count(*) FROM projects WHERE user_id = $1 AND status = 'deleted'",
            "u1"
        )
        .await,
        "one log row per deletion"
    );
    let mut client = app.pool.get().await.expect("db");
    let report = penora_ledger::reconcile::run(&mut client, 200_000)
        .await
        .expect("reconcile");
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
}
