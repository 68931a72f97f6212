//! `penora-ops` beside the API: each binary reads only its own settings.
//! (The CLI's own tests are in `ops/tests/cli/`.)

use penora_testing::TestDb;

/// The `penora-ops` binary (of the `ops` crate), beside this crate's own.
fn ops_binary() -> std::path::PathBuf {
    let path =
        std::path::PathBuf::from(env!("CARGO_BIN_EXE_penora-api")).with_file_name("penora-ops");
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (`cargo build --workspace`)",
        path.display()
    );
    path
}

/// Each binary reads only the sections of settings it uses (issue 25): a bad
/// image or HTTP setting, which only the API reads, stops the API naming the
/// variable but leaves the operator CLI working.
#[tokio::test]
async fn a_bad_image_or_http_setting_stops_the_api_but_not_penora_ops() {
    let db = TestDb::new().await;
    let bad = [
        ("IMAGE_QUALITY", "0"),
        ("HTTP_IDLE_TIMEOUT_SECS", "nonsense"),
    ];
    for args in [&["reconcile"][..], &["keys", "list"]] {
        let out = tokio::process::Command::new(ops_binary())
            .args(args)
            .env("DATABASE_URL", &db.url)
            .envs(bad)
            .output()
            .await
            .expect("penora-ops runs");
        assert!(
            out.status.success(),
            "penora-ops {args:?} with a bad image and HTTP setting: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for (variable, value) in bad {
        let api = tokio::process::Command::new(env!("CARGO_BIN_EXE_penora-api"))
            .env("DATABASE_URL", &db.url)
            .env("BIND_ADDR", "127.0.0.1:0")
            .env(variable, value)
            .kill_on_drop(true)
            .output();
        // A started API would serve until killed: the deadline turns that
        // into a failure instead of a hung test.
        let out = tokio::time::timeout(std::time::Duration::from_secs(30), api)
            .await
            .unwrap_or_else(|_| panic!("penora-api started with {variable}={value}"))
            .expect("penora-api runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "penora-api started with {variable}={value}"
        );
        assert!(stderr.contains(variable), "{variable}: {stderr}");
    }
}
