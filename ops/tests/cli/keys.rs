//! `penora-ops keys`: a key created here works at once against the API,
//! is never listed, and stops working once revoked.

use reqwest::StatusCode;
use serde_json::Value;

use crate::support::{stack, stderr, stdout};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_created_listed_and_revoked_with_the_cli() {
    let s = stack().await;
    s.grant("u1", 5).await;
    let created = s
        .ops(&[
            "keys",
            "create",
            "--app",
            "imagegene",
            "--scopes",
            "read,spend",
            "--name",
            "ImageGene",
        ])
        .await;
    assert!(created.status.success(), "{created:?}");
    let out = stdout(&created);
    let key = out
        .lines()
        .find_map(|l| l.strip_prefix("key:"))
        .map(str::trim)
        .expect("the key is printed once")
        .to_owned();
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("id:"))
        .map(str::trim)
        .expect("the id is printed")
        .to_owned();
    assert_eq!(
        s.get_with_key("/api/unified/user-info?user_id=u1", &key)
            .await
            .status(),
        StatusCode::OK
    );

    let listed = s.ops(&["keys", "list"]).await;
    let list = stdout(&listed);
    assert!(
        list.contains(&id)
            && list.contains("imagegene")
            && list.contains("read,spend")
            && list.contains("active"),
        "{list}"
    );
    assert!(!list.contains(&key), "listing never shows a key");
    let json: Vec<Value> =
        serde_json::from_slice(&s.ops(&["keys", "list", "--json"]).await.stdout).expect("json");
    assert!(json.iter().any(|k| k.to_string().contains(&id)), "{json:?}");
    assert!(
        json.iter().all(|k| !k.to_string().contains(&key)),
        "nor as JSON"
    );

    let revoked = s.ops(&["keys", "revoke", &id]).await;
    assert!(revoked.status.success(), "{revoked:?}");
    let refused = s
        .get_with_key("/api/unified/user-info?user_id=u1", &key)
        .await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let body: Value = refused.json().await.expect("json");
    assert_eq!(body["success"], false, "{body}");
    assert_eq!(body["code"], "invalid_api_key", "{body}");
    let list = stdout(&s.ops(&["keys", "list"]).await);
    assert!(list.contains("revoked"), "{list}");
    let unknown = s
        .ops(&["keys", "revoke", "00000000-0000-7000-8000-000000000000"])
        .await;
    assert_eq!(unknown.status.code(), Some(2));
    assert!(stderr(&unknown).contains("no key with id"), "{unknown:?}");

    let bad = s
        .ops(&["keys", "create", "--app", "*", "--scopes", "read,fly"])
        .await;
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("unknown scope `fly`"), "{bad:?}");
}
