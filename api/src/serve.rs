//! The HTTP server: hyper's HTTP/1.1 connections under the service's own
//! connection rules (CONTRACT §11), so that clients that leak connections,
//! or hold them open on purpose, never take the service down.
//!
//! * At most `HTTP_MAX_CONNECTIONS` connections are open at once: at the cap
//!   the server stops accepting (new connections wait in the kernel's
//!   backlog) and takes them again as soon as others close.
//! * A connection with no request in progress and no byte read or written
//!   for `HTTP_IDLE_TIMEOUT_SECS` is closed.
//! * A request whose headers have not all arrived `HTTP_HEADER_TIMEOUT_SECS`
//!   after its first byte is dropped with its connection (slowloris).
//! * Every connection has TCP keepalive (`HTTP_TCP_KEEPALIVE_SECS`), so one
//!   whose peer vanished (a crashed client, a dropped NAT mapping) while a
//!   request of it was in progress, which no idle timer closes, is found and
//!   dropped by the kernel. The body and request deadlines are the routes'
//!   (`routes::app`).
//!
//! Both timeouts live in [`Guarded`], a wrapper of the socket: it sees every
//! byte, and the service tells it when a request's headers are complete
//! (hyper calls the service only then) and when its answer is done. hyper's
//! own header timeout would also close idle keep-alive connections at the
//! header timeout, since it starts when hyper waits for the next request.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{Router, extract::Request};
use hyper_util::{rt::TokioIo, server::graceful::GracefulShutdown};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    time::{Instant, Sleep},
};
use tower::ServiceExt;

/// The connection rules.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `HTTP_IDLE_TIMEOUT_SECS`.
    pub idle: Duration,
    /// `HTTP_HEADER_TIMEOUT_SECS`.
    pub header: Duration,
    /// `HTTP_MAX_CONNECTIONS`.
    pub max_connections: usize,
    /// `HTTP_TCP_KEEPALIVE_SECS`.
    pub keepalive: Duration,
}

/// Time between keepalive probes once the first went unanswered: with
/// Linux's 9 probes, a vanished peer is dropped about 90 s after
/// `HTTP_TCP_KEEPALIVE_SECS` of silence (the system default, 75 s apart,
/// would take over 11 minutes).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// Turns TCP keepalive on for `stream`: the first probe after `idle` without
/// a byte either way, then one every [`KEEPALIVE_INTERVAL`] (at most
/// `idle`).
pub fn set_keepalive(stream: &TcpStream, idle: Duration) -> io::Result<()> {
    let params = socket2::TcpKeepalive::new().with_time(idle);
    #[cfg(any(target_os = "linux", target_os = "macos", target_os = "freebsd"))]
    let params = params.with_interval(KEEPALIVE_INTERVAL.min(idle));
    socket2::SockRef::from(stream).set_tcp_keepalive(&params)
}

/// The address a request's connection came from (the peer of the TCP
/// connection; a proxy in front is that proxy), in each request's
/// extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub std::net::SocketAddr);

/// Serves `router` on `listener` until `shutdown` resolves, then lets the
/// requests in progress finish within `deadline` (the process's one
/// shutdown deadline). Returns the instant the deadline ends at, for the
/// rest of the shutdown to end by.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
    deadline: Duration,
) -> Instant {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => slot,
        };
        let Ok(slot) = slot else { break };
        if slots.available_permits() == 0 {
            metrics::counter!("penora_http_connection_cap_reached_total").increment(1);
        }
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, say: wait a little rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        if let Err(e) = set_keepalive(&stream, limits.keepalive) {
            // The connection still works; only a vanished peer goes unseen.
            tracing::debug!(error = %e, "setting TCP keepalive failed");
        }
        metrics::gauge!("penora_http_connections_open").increment(1.0);
        let state = Arc::new(Requests::default());
        let io = TokioIo::new(Guarded::new(stream, limits, state.clone()));
        let router = router.clone();
        let service =
            hyper::service::service_fn(move |mut request: Request<hyper::body::Incoming>| {
                let in_progress = InProgress::begin(&state);
                request.extensions_mut().insert(ClientAddr(peer));
                let answer = router.clone().oneshot(request.map(axum::body::Body::new));
                async move {
                    let response = answer.await;
                    drop(in_progress);
                    response
                }
            });
        let connection = hyper::server::conn::http1::Builder::new()
            // Headers are timed by `Guarded` (from their first byte).
            .header_read_timeout(None)
            .serve_connection(io, service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // Errors here are the client's (reset, timed out, malformed).
            let _ = connection.await;
            metrics::gauge!("penora_http_connections_open").decrement(1.0);
            drop(slot);
        });
    }
    let by = Instant::now() + deadline;
    drop(listener);
    if tokio::time::timeout_at(by, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            deadline_secs = deadline.as_secs_f64(),
            "requests still in progress at the shutdown deadline; stopping anyway"
        );
    }
    by
}

/// Requests of one connection in progress (headers complete, answer not yet
/// done), counted by the service.
#[derive(Default)]
struct Requests(AtomicU32);

impl Requests {
    fn in_progress(&self) -> bool {
        self.0.load(Ordering::Acquire) > 0
    }
}

/// One request in progress, until dropped (answered, or abandoned).
struct InProgress(Arc<Requests>);

impl InProgress {
    fn begin(requests: &Arc<Requests>) -> Self {
        requests.0.fetch_add(1, Ordering::AcqRel);
        Self(requests.clone())
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A socket that closes itself when idle too long or when a request's
/// headers take too long (see the module docs).
struct Guarded {
    stream: TcpStream,
    limits: Limits,
    requests: Arc<Requests>,
    /// Fires at the next deadline: idle, or the headers'.
    timer: Pin<Box<Sleep>>,
    /// When the headers of the request being read must be complete; `None`
    /// while no request is being read.
    headers_by: Option<Instant>,
}

impl Guarded {
    fn new(stream: TcpStream, limits: Limits, requests: Arc<Requests>) -> Self {
        Self {
            stream,
            limits,
            requests,
            timer: Box::pin(tokio::time::sleep(limits.idle)),
            headers_by: None,
        }
    }

    /// Bytes moved: the connection is not idle.
    fn active(&mut self) {
        let deadline = self
            .headers_by
            .unwrap_or_else(|| Instant::now() + self.limits.idle);
        self.timer.as_mut().reset(deadline);
    }

    /// After a write: bytes of an answer went out, so the request's headers
    /// were read, and the connection is not idle.
    fn wrote(&mut self, written: &Poll<io::Result<usize>>) {
        if matches!(written, Poll::Ready(Ok(n)) if *n > 0) {
            self.headers_by = None;
            self.active();
        }
    }

    /// Whether the connection must close now.
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        if self.timer.as_mut().poll(cx).is_pending() {
            return None;
        }
        if self.requests.in_progress() {
            // The service is working on a request: neither idle nor reading
            // headers. Look again later.
            self.headers_by = None;
            let next = Instant::now() + self.limits.idle;
            self.timer.as_mut().reset(next);
            let _ = self.timer.as_mut().poll(cx);
            return None;
        }
        let why = if self.headers_by.is_some() {
            metrics::counter!("penora_http_connections_closed_total", "reason" => "header_timeout")
                .increment(1);
            "request headers took too long"
        } else {
            metrics::counter!("penora_http_connections_closed_total", "reason" => "idle")
                .increment(1);
            "connection idle"
        };
        Some(io::Error::new(io::ErrorKind::TimedOut, why))
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    if this.requests.in_progress() {
                        this.headers_by = None;
                    } else if this.headers_by.is_none() {
                        // The first byte of a request: its headers are due.
                        this.headers_by = Some(Instant::now() + this.limits.header);
                    }
                    this.active();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.expired(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.stream).poll_write(cx, data);
        this.wrote(&written);
        written
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.wrote(&written);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keepalive_is_turned_on_for_an_accepted_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        let socket = socket2::SockRef::from(&accepted);
        assert!(!socket.keepalive().expect("SO_KEEPALIVE"), "off by default");
        set_keepalive(&accepted, Duration::from_secs(42)).expect("set");
        assert!(socket.keepalive().expect("SO_KEEPALIVE"));
    }
}
