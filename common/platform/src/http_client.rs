//! A small HTTP client for the services' own outbound calls (the RabbitMQ
//! management API): one `GET` over `http` or `https`, with a deadline.
//!
//! Rules: `https` is verified against Mozilla's roots (compiled in, so a
//! container needs no system store) on rustls with ring; credentials travel
//! only to the URL the operator configured, never to a derived one; answers
//! are bounded in size.

use std::{sync::Arc, time::Duration};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Request, body::Bytes};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Largest answer body read.
const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The URL is not `http(s)://host[:port]/…`.
    #[error("not an http(s) URL")]
    BadUrl,
    /// No answer within the deadline.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Connecting, TLS or HTTP failed.
    #[error("{0}")]
    Io(String),
}

fn io(e: impl std::fmt::Display) -> HttpError {
    HttpError::Io(e.to_string())
}

/// An answer: its status and body.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The HTTP status code.
    pub status: u16,
    /// The body (at most 4 MiB).
    pub body: Bytes,
}

/// Verifies servers against Mozilla's roots, on ring. (rustls 0.23.48
/// marks ring's provider deprecated for its lack of post-quantum key
/// exchange; aws-lc-rs has it, but needs cmake and minutes of C build on
/// every machine, for a call to an operator's own management API.)
#[allow(deprecated)]
pub(crate) fn tls_config() -> Result<Arc<rustls::ClientConfig>, HttpError> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(io)?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// `GET url` with HTTP Basic `credentials` when given, within `deadline`.
pub async fn get(
    url: &url::Url,
    credentials: Option<(&str, &str)>,
    deadline: Duration,
) -> Result<Answer, HttpError> {
    tokio::time::timeout(deadline, get_now(url, credentials))
        .await
        .map_err(|_| HttpError::Timeout(deadline))?
}

async fn get_now(url: &url::Url, credentials: Option<(&str, &str)>) -> Result<Answer, HttpError> {
    let tls = match url.scheme() {
        "http" => false,
        "https" => true,
        _ => return Err(HttpError::BadUrl),
    };
    let host = url.host_str().ok_or(HttpError::BadUrl)?.to_owned();
    let port = url.port_or_known_default().ok_or(HttpError::BadUrl)?;
    // IPv6 literals come bracketed in URLs; the socket wants them bare.
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let tcp = TcpStream::connect((bare.as_str(), port))
        .await
        .map_err(io)?;
    let _ = tcp.set_nodelay(true);
    let authority = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.clone(),
    };
    let mut path = url.path().to_owned();
    if let Some(q) = url.query() {
        path.push('?');
        path.push_str(q);
    }
    let mut request = Request::get(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::ACCEPT, "application/json");
    if let Some((user, pass)) = credentials {
        use base64::Engine;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        request = request.header(hyper::header::AUTHORIZATION, format!("Basic {token}"));
    }
    let request = request.body(Empty::<Bytes>::new()).map_err(io)?;
    if tls {
        let name = rustls::pki_types::ServerName::try_from(bare).map_err(|_| HttpError::BadUrl)?;
        let stream = tokio_rustls::TlsConnector::from(tls_config()?)
            .connect(name, tcp)
            .await
            .map_err(io)?;
        send(TokioIo::new(stream), request).await
    } else {
        send(TokioIo::new(tcp), request).await
    }
}

async fn send<T>(io_: T, request: Request<Empty<Bytes>>) -> Result<Answer, HttpError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io_)
        .await
        .map_err(io)?;
    let driver = tokio::spawn(connection);
    let answer = sender.send_request(request).await.map_err(io)?;
    let status = answer.status().as_u16();
    let body = Limited::new(answer.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(io)?
        .to_bytes();
    driver.abort();
    Ok(Answer { status, body })
}
