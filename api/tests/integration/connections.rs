//! Connection hygiene (CONTRACT §11), against the real `penora-api` process:
//! idle connections are closed, slow headers are cut, the connection cap
//! holds and the service recovers as soon as connections go.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::support::ApiProcess;

fn addr(api: &ApiProcess) -> String {
    api.base.trim_start_matches("http://").to_owned()
}

/// Descriptors the API process holds.
fn open_fds(api: &ApiProcess) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", api.pid()))
        .expect("fd dir")
        .count()
}

/// Whether the server has closed `stream` (EOF or reset within `wait`).
async fn closed_by_server(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(wait, stream.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

async fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let started = Instant::now();
    while !ok() {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_thousand_idle_connections_are_closed_after_the_idle_timeout() {
    penora_platform::limits::raise_open_files().expect("the test may open 2,000 sockets");
    let api = ApiProcess::start(&[("HTTP_IDLE_TIMEOUT_SECS", "2")]).await;
    let before = open_fds(&api);
    let target = addr(&api);
    let mut idle = Vec::with_capacity(2000);
    for i in 0..2000 {
        let mut s = TcpStream::connect(&target).await.expect("connect");
        if i % 2 == 0 {
            // Half made a request and keep the connection alive; half never
            // said anything.
            s.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .expect("request");
            let mut buf = [0u8; 512];
            let n = s.read(&mut buf).await.expect("answer");
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
        }
        idle.push(s);
    }
    let opened_at = Instant::now();
    wait_until(
        "the API to hold every connection",
        Duration::from_secs(10),
        || open_fds(&api) >= before + 1900,
    )
    .await;
    let peak = open_fds(&api);
    // An active connection (a request every 500 ms) is not idle.
    let mut active = TcpStream::connect(&target).await.expect("connect");
    for _ in 0..8 {
        active
            .write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("request");
        let mut buf = [0u8; 512];
        let n = active.read(&mut buf).await.expect("answer");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for (i, s) in idle.iter_mut().enumerate() {
        assert!(
            closed_by_server(s, Duration::from_secs(5)).await,
            "idle connection {i} still open {:?} after it was opened",
            opened_at.elapsed()
        );
    }
    wait_until(
        "the descriptors to fall back",
        Duration::from_secs(10),
        || open_fds(&api) <= before + 5,
    )
    .await;
    eprintln!(
        "descriptors of the API: {before} before, {peak} with 2,000 idle connections, {} after the idle timeout",
        open_fds(&api)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_sent_one_byte_a_second_is_cut_at_the_header_timeout() {
    let api = ApiProcess::start(&[("HTTP_HEADER_TIMEOUT_SECS", "2")]).await;
    let mut slow = TcpStream::connect(addr(&api)).await.expect("connect");
    let started = Instant::now();
    let mut cut = None;
    for byte in b"GET /health/live HTTP/1.1\r\nHost: slow\r\nX-Slow: yes\r\n\r\n" {
        if slow.write_all(&[*byte]).await.is_err() {
            cut = Some(started.elapsed());
            break;
        }
        if closed_by_server(&mut slow, Duration::from_secs(1)).await {
            cut = Some(started.elapsed());
            break;
        }
    }
    let cut = cut.expect("the slow request was never cut");
    assert!(
        cut >= Duration::from_millis(1500) && cut < Duration::from_secs(5),
        "cut after {cut:?} (header timeout 2 s)"
    );
    // Everyone else is served as before.
    let r = api
        .http
        .get(format!("{}/health/live", api.base))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_the_connection_cap_new_clients_wait_and_are_served_once_others_go() {
    let api = ApiProcess::start(&[("HTTP_MAX_CONNECTIONS", "50")]).await;
    let target = addr(&api);
    let mut held = Vec::new();
    for _ in 0..50 {
        held.push(TcpStream::connect(&target).await.expect("connect"));
    }
    // The 51st is not taken while the 50 stay.
    let waiting = {
        let http = reqwest::Client::new();
        let url = format!("{}/health/live", api.base);
        tokio::spawn(async move {
            let started = Instant::now();
            let r = http.get(url).send().await.expect("answered in the end");
            (r.status(), started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!waiting.is_finished(), "a 51st connection was served");
    drop(held);
    let (status, took) = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("served once the others went")
        .expect("task");
    assert_eq!(status, StatusCode::OK);
    assert!(took < Duration::from_secs(4), "{took:?}");
}
