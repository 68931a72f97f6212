//! The broker's user and password reach a RabbitMQ management API only at
//! the URL an operator configured (issue 24, item 5): never at a port
//! guessed from `AMQP_URL` (the services used to send them, as HTTP Basic in
//! clear, to `http://<amqp host>:15672` at every start, even under `amqps`),
//! and over `https` only after TLS.

use std::time::Duration;

use base64::Engine;
use penora_platform::broker::Management;
use penora_testing::TestDb;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

const AMQPS: &str = "amqps://probeuser:probepass@127.0.0.1:5671/%2f";

/// A fake management API on a free port: takes one connection, keeps what
/// it was sent, and answers an HTTP request with a version.
async fn fake_management() -> (u16, tokio::task::JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let served = tokio::spawn(async move {
        let Ok(Ok((mut socket, _))) =
            tokio::time::timeout(Duration::from_secs(5), listener.accept()).await
        else {
            return Vec::new();
        };
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(500), socket.read(&mut buf)).await
        {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if got.windows(4).any(|w| w == b"\r\n\r\n") {
                let body = br#"{"rabbitmq_version":"9.9.9"}"#;
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.write_all(body).await;
                break;
            }
        }
        got
    });
    (port, served)
}

#[tokio::test]
async fn nothing_is_derived_from_an_amqp_url() {
    let db = TestDb::new().await;
    for amqp in [AMQPS, "amqp://probeuser:probepass@127.0.0.1:5672/%2f"] {
        let settings = db.settings(&[("AMQP_URL", amqp)]);
        assert!(
            Management::from_settings(&settings.broker).is_none(),
            "{amqp}: a management API was made up"
        );
    }
}

#[tokio::test]
async fn the_configured_url_alone_gets_the_request_and_its_credentials() {
    let db = TestDb::new().await;
    let (port, served) = fake_management().await;
    let url = format!("http://127.0.0.1:{port}/");
    let settings = db.settings(&[("AMQP_URL", AMQPS), ("RABBITMQ_MANAGEMENT_URL", &url)]);
    let management = Management::from_settings(&settings.broker).expect("configured");
    assert_eq!(management.broker_version().await.as_deref(), Some("9.9.9"));
    let got = String::from_utf8(served.await.expect("served")).expect("text");
    assert!(got.starts_with("GET /api/overview HTTP/1.1\r\n"), "{got}");
    let basic = base64::engine::general_purpose::STANDARD.encode("probeuser:probepass");
    assert!(
        got.contains(&format!("authorization: Basic {basic}"))
            || got.contains(&format!("Authorization: Basic {basic}")),
        "{got}"
    );
    // Where it is said in logs and messages: without the credentials.
    assert!(!management.url().contains("probepass"));
}

#[tokio::test]
async fn an_https_url_gets_nothing_but_a_tls_handshake_from_a_server_it_cannot_verify() {
    let db = TestDb::new().await;
    let (port, served) = fake_management().await;
    let url = format!("https://127.0.0.1:{port}");
    let settings = db.settings(&[("AMQP_URL", AMQPS), ("RABBITMQ_MANAGEMENT_URL", &url)]);
    let management = Management::from_settings(&settings.broker).expect("configured");
    assert_eq!(management.broker_version().await, None);
    let got = served.await.expect("served");
    assert_eq!(got.first(), Some(&0x16), "a TLS handshake record first");
    let basic = base64::engine::general_purpose::STANDARD.encode("probeuser:probepass");
    let text = String::from_utf8_lossy(&got);
    assert!(
        !text.contains(&basic) && !text.contains("probepass") && !text.contains("Authorization"),
        "credentials went out before TLS: {text}"
    );
}
