//! Image bombs in stored content (issue 24): the worker's check and
//! thumbnail never inflate a colour profile. A photo kept exactly as sent
//! (`store_original`) with a profile under the metadata bound that inflates
//! to a gigabyte is saved with its thumbnail; content over the bound, stored
//! before the bound existed, fails its project cleanly and frees its bytes.

use std::time::Duration;

use base64::Engine;
use penora_workspace::imaging::samples;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{BOOT_KEY, Stack, stack, wait_for};

async fn save_original(s: &Stack, title: &str, png: &[u8]) -> String {
    let content = base64::engine::general_purpose::STANDARD.encode(png);
    let r = s
        .post(
            "/api/unified/save-project",
            &json!({"user_id": "u1", "app_source": "imagegene", "project_type": "ai_artwork",
                    "title": title, "content": content, "store_original": true}),
        )
        .await;
    let status = r.status();
    let body: Value = r.json().await.expect("json");
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["content_type"], json!("image/png"), "{body}");
    body["project_id"].as_str().expect("id").to_owned()
}

async fn status_of(s: &Stack, id: &str) -> (String, Option<String>) {
    let client = s.pool.get().await.expect("db");
    let row = client
        .query_one(
            "SELECT status, failure_reason FROM projects WHERE id = $1::text::uuid",
            &[&id],
        )
        .await
        .expect("project");
    (row.get("status"), row.get("failure_reason"))
}

/// This process's peak resident memory, kB: the API and the worker run in
/// it (and nextest gives each test a process of its own).
fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_worker_never_inflates_a_colour_profile_and_fails_content_over_the_bound() {
    // Room for two photos kept as sent.
    let mut s = stack(&[("STORAGE_QUOTA_BYTES", "16777216")], &[]).await;
    s.grant("u1", 10).await;
    let photo = samples::photo_like_png(512, 512, 41);
    // 1 MB less 64 KiB of deflate, a gigabyte of zeros: under the bound.
    let zlib = samples::zlib_zeros((1 << 20) - (64 << 10));
    assert!(samples::zlib_zeros_inflated(zlib.len()) > 1_000_000_000);
    let small_bomb = samples::with_png_chunk(&photo, b"iCCP", &samples::iccp(&zlib));
    let peak_before = peak_rss_kb();
    let kept = save_original(&s, "kept", &small_bomb).await;
    // A photo stored before the bound, its content since replaced by one
    // with 4 MB of profile (4 GB inflated): what a row written by an older
    // version may hold.
    let legacy = save_original(&s, "legacy", &photo).await;
    let big_bomb = samples::with_png_chunk(
        &photo,
        b"iCCP",
        &samples::iccp(&samples::zlib_zeros(4 << 20)),
    );
    let client = s.pool.get().await.expect("db");
    let updated = client
        .execute(
            "UPDATE project_contents SET data = $2 WHERE project_id = $1::text::uuid",
            &[&legacy, &big_bomb],
        )
        .await
        .expect("content replaced");
    assert_eq!(updated, 1);

    s.start_worker().await;
    wait_for(
        "both projects checked",
        Duration::from_secs(120),
        || async {
            status_of(&s, &kept).await.0 != "queued" && status_of(&s, &legacy).await.0 != "queued"
        },
    )
    .await;
    assert_eq!(status_of(&s, &kept).await, ("saved".to_owned(), None));
    let (status, reason) = status_of(&s, &legacy).await;
    assert_eq!(status, "failed");
    let reason = reason.unwrap_or_default();
    assert!(
        reason.contains("bytes of metadata") && reason.contains("iCCP"),
        "{reason}"
    );
    // What is left counted: the kept project (its content, title and
    // metadata) and the failed one's title and metadata (its content's
    // bytes were released).
    let meta = s
        .scalar(
            "SELECT coalesce(sum(meta_bytes), 0)::bigint FROM projects WHERE user_id = $1",
            "u1",
        )
        .await;
    assert_eq!(
        s.scalar(
            "SELECT storage_used_bytes FROM accounts WHERE user_id = $1",
            "u1"
        )
        .await,
        i64::try_from(small_bomb.len()).expect("small") + meta,
        "the failed project's content bytes were released"
    );
    let thumbnail = s
        .http
        .get(format!(
            "{}/api/unified/projects/{kept}/thumbnail?user_id=u1",
            s.base
        ))
        .header("X-API-Key", BOOT_KEY)
        .send()
        .await
        .expect("sent");
    assert_eq!(thumbnail.status(), StatusCode::OK);
    assert_eq!(thumbnail.headers()["content-type"], "image/webp");
    // The API and the worker each read the profile's chunk, and never
    // inflated it: a gigabyte (or the 320 MiB the decoders' limits would
    // have stopped at) would show here.
    let grown = peak_rss_kb().saturating_sub(peak_before);
    eprintln!("the test process's peak RSS grew by {grown} kB");
    assert!(grown < 128 * 1024, "the peak RSS grew by {grown} kB");
}
