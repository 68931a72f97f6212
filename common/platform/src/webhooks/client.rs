//! The one HTTP client that calls webhook endpoints.
//!
//! Rules: the host is resolved by a [`Resolve`] (the system's, or a map a
//! test controls), every address it gives is checked ([`super::target`]),
//! and the connection is made to a checked address itself, so a name that
//! resolves differently a moment later (DNS rebinding) is never connected
//! to unchecked; one request per connection, so there is no pool of
//! connections made under an older answer; redirects are never followed (a
//! 3xx is an answer like any other non-2xx); the whole call, from resolving
//! to the last byte read, takes at most the timeout; at most
//! [`MAX_ANSWER_BYTES`] of the answer are read.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
    time::Duration,
};

use futures_util::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use hyper::{Request, body::Bytes};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use url::{Host, Url};

use super::target::{TargetError, check_address, check_url};

/// Most bytes of an answer read (the rest is dropped with the connection).
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Resolves a host name to addresses.
pub trait Resolve: Send + Sync {
    /// The addresses of `host`.
    fn resolve<'a>(&'a self, host: &'a str) -> BoxFuture<'a, std::io::Result<Vec<IpAddr>>>;
}

/// The system's resolver.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(&'a self, host: &'a str) -> BoxFuture<'a, std::io::Result<Vec<IpAddr>>> {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host, 0))
                .await?
                .map(|a| a.ip())
                .collect())
        })
    }
}

/// Names a test decides (changeable at any time, to simulate DNS
/// rebinding); other names are not found.
#[derive(Debug, Default)]
pub struct MapResolver(RwLock<HashMap<String, IpAddr>>);

impl MapResolver {
    /// Makes `host` resolve to `ip` from now on.
    pub fn set(&self, host: &str, ip: IpAddr) {
        if let Ok(mut map) = self.0.write() {
            map.insert(host.to_ascii_lowercase(), ip);
        }
    }
}

impl Resolve for MapResolver {
    fn resolve<'a>(&'a self, host: &'a str) -> BoxFuture<'a, std::io::Result<Vec<IpAddr>>> {
        let found = self
            .0
            .read()
            .ok()
            .and_then(|m| m.get(&host.to_ascii_lowercase()).copied());
        Box::pin(async move {
            found
                .map(|ip| vec![ip])
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such host"))
        })
    }
}

/// The checked addresses of `url`'s host: its literal (only when private
/// targets are allowed: [`check_url`] refuses literals otherwise), or what
/// `resolver` gives, every one of which must pass.
pub async fn checked_addresses(
    resolver: &dyn Resolve,
    url: &Url,
    allow_private: bool,
) -> Result<Vec<IpAddr>, TargetError> {
    let addresses = match url.host() {
        Some(Host::Ipv4(ip)) => vec![IpAddr::V4(ip)],
        Some(Host::Ipv6(ip)) => vec![IpAddr::V6(ip)],
        Some(Host::Domain(name)) => resolver
            .resolve(name)
            .await
            .map_err(|e| TargetError::Unresolved(e.to_string()))?,
        None => return Err(TargetError::BadUrl("has no host".into())),
    };
    if addresses.is_empty() {
        return Err(TargetError::Unresolved("no address".into()));
    }
    // One address refused refuses the name: an attacker's resolver could
    // otherwise mix a public address with the one it wants reached.
    for ip in &addresses {
        check_address(*ip, allow_private)?;
    }
    Ok(addresses)
}

/// What one call came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The HTTP status, when one came.
    pub status: Option<u16>,
    /// Why there was no (2xx) answer, when there was none.
    pub error: Option<String>,
}

impl Answer {
    /// Whether the endpoint took it (2xx).
    pub fn delivered(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }

    fn failed(error: impl Into<String>) -> Self {
        Self {
            status: None,
            error: Some(error.into()),
        }
    }
}

/// Calls endpoints: `POST`s of signed envelopes.
pub struct Client {
    resolver: Arc<dyn Resolve>,
    allow_private: bool,
    timeout: Duration,
    tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("allow_private", &self.allow_private)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client resolving through `resolver`.
    pub fn new(
        resolver: Arc<dyn Resolve>,
        allow_private: bool,
        timeout: Duration,
    ) -> Result<Self, String> {
        Ok(Self {
            resolver,
            allow_private,
            timeout,
            tls: crate::http_client::tls_config().map_err(|e| e.to_string())?,
        })
    }

    /// Its resolver (registration checks with the same one).
    pub fn resolver(&self) -> &dyn Resolve {
        self.resolver.as_ref()
    }

    /// `POST body` to `url` with `headers`, within the timeout.
    pub async fn post(&self, url: &str, headers: &[(&str, String)], body: Bytes) -> Answer {
        match tokio::time::timeout(self.timeout, self.post_now(url, headers, body)).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => Answer::failed(e),
            Err(_) => Answer::failed(format!("no answer within {} ms", self.timeout.as_millis())),
        }
    }

    async fn post_now(
        &self,
        raw: &str,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<Answer, String> {
        let url = check_url(raw, self.allow_private).map_err(|e| e.to_string())?;
        let port = url.port_or_known_default().ok_or("url: no port")?;
        let addresses = checked_addresses(self.resolver.as_ref(), &url, self.allow_private)
            .await
            .map_err(|e| e.to_string())?;
        let mut tcp = None;
        let mut last = String::new();
        for ip in addresses {
            match TcpStream::connect(SocketAddr::new(ip, port)).await {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = format!("connect: {e}"),
            }
        }
        let tcp = tcp.ok_or(last)?;
        let _ = tcp.set_nodelay(true);
        let host = url.host_str().ok_or("url: no host")?;
        let authority = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_owned(),
        };
        let mut path = url.path().to_owned();
        if let Some(q) = url.query() {
            path.push('?');
            path.push_str(q);
        }
        let mut request = Request::post(path)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(
                hyper::header::USER_AGENT,
                concat!("penora-webhooks/", env!("CARGO_PKG_VERSION")),
            );
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let request = request.body(Full::new(body)).map_err(|e| e.to_string())?;
        if url.scheme() == "https" {
            let bare = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let name = rustls::pki_types::ServerName::try_from(bare)
                .map_err(|_| "url: not a TLS server name")?;
            let stream = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("tls: {e}"))?;
            send(TokioIo::new(stream), request).await
        } else {
            send(TokioIo::new(tcp), request).await
        }
    }
}

async fn send<T>(io: T, request: Request<Full<Bytes>>) -> Result<Answer, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("http: {e}"))?;
    let driver = tokio::spawn(connection);
    let result = async {
        let answer = sender
            .send_request(request)
            .await
            .map_err(|e| format!("http: {e}"))?;
        let status = answer.status().as_u16();
        // Read at most MAX_ANSWER_BYTES; an endpoint that talks on is cut off.
        let mut body = answer.into_body();
        let mut read = 0usize;
        while read < MAX_ANSWER_BYTES {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        read += data.len();
                    }
                }
                Some(Err(_)) | None => break,
            }
        }
        Ok(Answer {
            status: Some(status),
            error: (!(200..300).contains(&status)).then(|| format!("answered {status}")),
        })
    }
    .await;
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_name_that_rebinds_to_loopback_is_refused_on_the_next_call() {
        let map = Arc::new(MapResolver::default());
        let url = Url::parse("https://hooks.example.test/x").expect("url");
        map.set("hooks.example.test", "93.184.216.34".parse().expect("ip"));
        assert!(checked_addresses(map.as_ref(), &url, false).await.is_ok());
        map.set("hooks.example.test", "127.0.0.1".parse().expect("ip"));
        assert_eq!(
            checked_addresses(map.as_ref(), &url, false).await,
            Err(TargetError::Forbidden("127.0.0.1".parse().expect("ip")))
        );
        map.set(
            "hooks.example.test",
            "::ffff:127.0.0.1".parse().expect("ip"),
        );
        assert!(checked_addresses(map.as_ref(), &url, false).await.is_err());
        let client = Client::new(map.clone(), false, Duration::from_secs(1)).expect("client");
        let answer = client.post(url.as_str(), &[], Bytes::new()).await;
        assert!(!answer.delivered());
        assert!(answer.error.unwrap_or_default().contains("non-public"));
    }
}
