//! `penora-ops projects delete`: an operator deletes a project; its bytes
//! are freed and the deletion is logged as the operator's.

use crate::support::{stack, stderr, stdout};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projects_delete_frees_the_bytes_and_logs_the_operator() {
    let s = stack().await;
    s.grant("u1", 1).await;
    let id = s
        .saved_url_project("u1", "https://cdn.imagegene.example/u1/a.png")
        .await;
    let o = s.ops(&["projects", "delete", "u1", &id]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    // The URL's 38 bytes and the title's 1.
    assert!(stdout(&o).contains("39 bytes freed"), "{}", stdout(&o));
    assert_eq!(
        s.scalar(
            "SELECT storage_used_bytes FROM accounts WHERE user_id = $1",
            "u1"
        )
        .await,
        0
    );
    assert_eq!(
        s.scalar(
            "SELECT count(*) FROM project_log WHERE user_id = $1 AND cause = 'operator'",
            "u1"
        )
        .await,
        1
    );
    let again = s.ops(&["projects", "delete", "u1", &id]).await;
    assert!(!again.status.success());
    assert!(stderr(&again).contains("no project"), "{again:?}");
}
