//! Image bombs in metadata (issue 24): a real photo carrying a colour profile
//! (`iCCP`) or a compressed text chunk (`zTXt`) whose megabytes of deflate
//! inflate to gigabytes, and a real JPEG padded with megabytes of APP
//! segments. Each is refused at once with `400 invalid_request` naming
//! `content`, before any decoder touches it: the API's memory barely moves,
//! nothing is stored, and deductions still go through. The API runs as a
//! process of its own, so its memory is its own.

use std::time::{Duration, Instant};

use base64::Engine;
use image::ImageFormat;
use penora_workspace::imaging::samples;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{ApiProcess, BOOT_KEY, expect_error, spawn_app};

/// `MAX_BODY_BYTES` by default: each bomb fills one whole save.
const MAX_BODY: usize = 12 * 1024 * 1024;

/// The metadata bound (`imaging::MAX_METADATA_BYTES`), spelled out so that
/// these tests also build against the code before it.
const METADATA_BOUND: usize = 1024 * 1024;

/// glibc's malloc raises its mmap threshold once a big block is freed, and
/// then keeps later blocks of that size in the heap of whichever thread
/// freed them: after a few 12 MiB bodies, tens of MB stay resident whatever
/// the request was. A fixed threshold gives every big block back when it is
/// freed, so what the API's RSS keeps is what a request kept.
const FIXED_MMAP_THRESHOLD: (&str, &str) = ("MALLOC_MMAP_THRESHOLD_", "131072");

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// How many bytes of metadata fit in one save beside an image of
/// `image_len` bytes: base64 makes 4 bytes of every 3, and the JSON around
/// the content and the chunk's own header take a few hundred more.
fn room_beside(image_len: usize) -> usize {
    (MAX_BODY - 1024) / 4 * 3 - image_len - 256
}

fn save_body(content: &str, extra: &Value) -> Vec<u8> {
    let mut body = json!({"user_id": "u1", "app_source": "imagegene", "project_type": "ai_artwork",
                          "title": "Sunset", "content": content});
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    serde_json::to_vec(&body).expect("json")
}

async fn post_save(api: &ApiProcess, body: Vec<u8>) -> (reqwest::Response, Duration) {
    let started = Instant::now();
    let r = api
        .http
        .post(format!("{}/api/unified/save-project", api.base))
        .header("X-API-Key", BOOT_KEY)
        .header("Content-Type", "application/json")
        .body(body)
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .expect("the API answers (it is still running)");
    (r, started.elapsed())
}

/// A 1024x1024 photo-like PNG (about 1.9 MB, what ImageGene sends).
fn photo_png(seed: u64) -> Vec<u8> {
    let png = samples::photo_like_png(1024, 1024, seed);
    assert!(png.len() > 1_800_000, "{}", png.len());
    png
}

/// A PNG of `len` bytes that the API refuses at the same point as a bomb,
/// for another reason: its header declares 30000x30000 pixels, and a
/// private chunk (not metadata; decoders skip it) pads it. What it costs to
/// read, parse and refuse a body that size is the yardstick.
fn same_size_refused_for_its_pixels(len: usize) -> Vec<u8> {
    let mut ihdr = 30_000u32.to_be_bytes().to_vec();
    ihdr.extend(30_000u32.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    // Each chunk goes in right after IHDR: so, IHDR, prVt, IDAT, IEND.
    let png = samples::with_png_chunk(b"\x89PNG\r\n\x1a\n", b"IHDR", &ihdr);
    let png = samples::with_png_chunk(&png, b"IEND", &[]);
    let png = samples::with_png_chunk(&png, b"IDAT", &samples::zlib_stored(&[0; 1024]));
    let padding = vec![0x5a; len - png.len() - 12];
    let png = samples::with_png_chunk(&png, b"prVt", &padding);
    assert_eq!(png.len(), len);
    png
}

/// Sends a save as big as `bomb` refused for its pixels (the yardstick),
/// then `bomb` twice (as it is, then asking `store_original`), and checks
/// that the bomb is refused naming `what` about as fast as the yardstick,
/// that the API's memory did not move beyond what the yardstick took, that
/// nothing was stored and that a deduction still goes through.
async fn refused_at_once_without_costing_memory(bomb: &[u8], what: &str) {
    let api = ApiProcess::start(&[FIXED_MMAP_THRESHOLD]).await;
    api.app.grant("u1", 10).await;
    let (rss_start, peak_start) = (api.rss_kb(), api.peak_rss_kb());
    let yardstick = save_body(
        &b64(&same_size_refused_for_its_pixels(bomb.len())),
        &json!({}),
    );
    let (r, yardstick_took) = post_save(&api, yardstick).await;
    let msg = expect_error(r, StatusCode::BAD_REQUEST, "invalid_request").await;
    assert!(msg.contains("30000x30000"), "{msg}");
    let (rss_before, peak_before) = (api.rss_kb(), api.peak_rss_kb());
    eprintln!(
        "the same size refused for its pixels in {yardstick_took:?}: the API's RSS +{} kB, its peak +{} kB",
        rss_before.saturating_sub(rss_start),
        peak_before.saturating_sub(peak_start)
    );
    let content = b64(bomb);
    for extra in [json!({}), json!({"store_original": true})] {
        let body = save_body(&content, &extra);
        assert!(body.len() <= MAX_BODY, "{} bytes", body.len());
        let (r, took) = post_save(&api, body).await;
        let status = r.status();
        let msg = expect_error(r, StatusCode::BAD_REQUEST, "invalid_request").await;
        eprintln!("{extra}: {status} in {took:?}: {msg}");
        assert!(msg.starts_with("content:") && msg.contains(what), "{msg}");
        // The same work as the yardstick (a walk over the chunks is
        // microseconds); the slack is for a machine busy with other work.
        assert!(
            took < yardstick_took * 3 + Duration::from_secs(1),
            "took {took:?}, against {yardstick_took:?} for the yardstick"
        );
    }
    let grown = api.rss_kb().saturating_sub(rss_before);
    let peak_grown = api.peak_rss_kb().saturating_sub(peak_before);
    eprintln!(
        "{what} bomb ({} bytes): the API's RSS grew by {grown} kB, its peak by {peak_grown} kB",
        bomb.len()
    );
    // Beyond what reading a body this size takes (the yardstick's), a few
    // MB at most; a bomb that went off would take gigabytes.
    assert!(grown < 4 * 1024, "the API's RSS grew by {grown} kB");
    assert!(
        peak_grown < 8 * 1024,
        "the API's peak RSS grew by {peak_grown} kB"
    );
    let used = api
        .app
        .scalar(
            "SELECT storage_used_bytes FROM accounts WHERE user_id = $1",
            "u1",
        )
        .await;
    let projects = api
        .app
        .scalar("SELECT count(*) FROM projects WHERE user_id = $1", "u1")
        .await;
    assert_eq!((used, projects), (0, 0), "nothing is stored");
    let r = api
        .http
        .post(format!("{}/api/unified/deduct-credits", api.base))
        .header("X-API-Key", BOOT_KEY)
        .json(&json!({"user_id": "u1", "amount": 1, "app_name": "imagegene"}))
        .send()
        .await
        .expect("deduct answered");
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_iccp_bomb_in_a_real_photo_is_refused_at_once_with_the_apis_rss_barely_moving() {
    let photo = photo_png(31);
    let zlib = samples::zlib_zeros(room_beside(photo.len()));
    let inflated = samples::zlib_zeros_inflated(zlib.len());
    assert!(inflated > 7 << 30, "inflates to {inflated} bytes");
    let bomb = samples::with_png_chunk(&photo, b"iCCP", &samples::iccp(&zlib));
    eprintln!(
        "a {} byte PNG whose {} byte colour profile inflates to {inflated} bytes",
        bomb.len(),
        zlib.len()
    );
    refused_at_once_without_costing_memory(&bomb, "iCCP").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ztxt_bomb_in_a_real_photo_is_refused_at_once() {
    let photo = photo_png(32);
    let zlib = samples::zlib_zeros(room_beside(photo.len()));
    let bomb = samples::with_png_chunk(&photo, b"zTXt", &samples::ztxt(&zlib));
    refused_at_once_without_costing_memory(&bomb, "zTXt").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jpeg_padded_with_megabytes_of_app_segments_is_refused_at_once() {
    let photo = samples::encode(&samples::photo_like(1024, 1024, 33), ImageFormat::Jpeg);
    // A colour profile of about 8 MB in APP2 pieces, as big as a save allows.
    let segments = samples::icc_app2_segments(room_beside(photo.len()) - 4096);
    let bomb = samples::with_jpeg_segments(&photo, &segments);
    refused_at_once_without_costing_memory(&bomb, "APP2").await;
}

/// A real colour profile is a few kilobytes: a photo carrying one is
/// still taken, and stored as WebP (without its profile).
#[tokio::test]
async fn a_photo_with_a_small_colour_profile_is_still_stored_as_webp() {
    let app = spawn_app().await;
    app.grant("u1", 1).await;
    let profile: Vec<u8> = (0..3_144u32).map(|i| (i * 7 % 256) as u8).collect();
    let photo = samples::with_png_chunk(
        &photo_png(34),
        b"iCCP",
        &samples::iccp(&samples::zlib_stored(&profile)),
    );
    let r = app
        .post(
            "/api/unified/save-project",
            &json!({"user_id": "u1", "app_source": "imagegene", "project_type": "ai_artwork",
                    "title": "Sunset", "content": b64(&photo)}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let body: Value = r.json().await.expect("json");
    let size = body["size_bytes"].as_i64().expect("size");
    assert!(size < 300_000, "{body}");
    let client = app.pool.get().await.expect("db");
    let row = client
        .query_one(
            "SELECT data, media_type FROM project_contents WHERE project_id = $1::text::uuid",
            &[&body["project_id"].as_str().expect("id")],
        )
        .await
        .expect("content row");
    let (data, media_type): (Vec<u8>, String) = (row.get("data"), row.get("media_type"));
    assert_eq!(media_type, "image/webp");
    assert!(!data.windows(4).any(|w| w == b"ICCP"), "no profile stored");
}

/// Under the bound, a profile that inflates to a gigabyte is taken (its
/// compressed size is what the client sent) but never inflated: stored as
/// WebP, or kept exactly as sent when asked, with the API's peak memory
/// well under the gigabyte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_bomb_is_stored_without_ever_being_inflated() {
    // Room for the photo kept as sent, beside its WebP.
    let api = ApiProcess::start(&[("STORAGE_QUOTA_BYTES", "16777216"), FIXED_MMAP_THRESHOLD]).await;
    api.app.grant("u1", 10).await;
    let zlib = samples::zlib_zeros(METADATA_BOUND - 64 * 1024);
    let inflated = samples::zlib_zeros_inflated(zlib.len());
    assert!(inflated > 1_000_000_000, "{inflated}");
    let bomb = samples::with_png_chunk(&photo_png(35), b"iCCP", &samples::iccp(&zlib));
    let content = b64(&bomb);
    let peak_before = api.peak_rss_kb();
    let mut stored_as = Vec::new();
    for extra in [json!({}), json!({"store_original": true})] {
        let (r, elapsed) = post_save(&api, save_body(&content, &extra)).await;
        let status = r.status();
        let body: Value = r.json().await.expect("json");
        eprintln!("{extra}: {status} in {elapsed:?}: {body}");
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        stored_as.push(body["size_bytes"].as_i64().expect("size"));
    }
    let peak_grown = api.peak_rss_kb().saturating_sub(peak_before);
    eprintln!("the API's peak RSS grew by {peak_grown} kB");
    assert!(stored_as[0] < 300_000, "stored as WebP: {stored_as:?}");
    assert_eq!(stored_as[1], i64::try_from(bomb.len()).expect("small"));
    assert!(
        peak_grown < 160 * 1024,
        "the API's peak RSS grew by {peak_grown} kB"
    );
}
