//! HTTPS on the public listener: the TLS handshake, within `head_timeout` of the
//! accept, then hyper with the protocol ALPN chose: HTTP/2 (`h2`: a page's streams
//! share the connection; see `h2`) or HTTP/1.1. Both use the same router, deadlines
//! and write watchdog as plaintext hyper connections (`conn`); the watchdog sits under
//! TLS, on the TCP socket. The event-stream fast path (`stream`) is plaintext only.
//!
//! A connection over `max_connections` gets the same answers as over plaintext once
//! its handshake and first request are in: the overload event stream for a stream
//! request that takes one, `503` for anything else; then it is closed (HTTP/2: GOAWAY
//! after the first request).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::access::{Access, End};
use super::conn::{drive, serve_http1, ConnWatch, Limits, Tracked, WatchedIo, MAX_REFUSING};
use super::{h2, head, limits, routes, AppState};
use crate::telemetry::Refusal;
use crate::wire::EndReason;

/// Counts an open HTTP/2 connection in `http2_connections` while it lives.
struct OpenConnection<'m>(&'m crate::telemetry::Metrics);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.http2_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one TLS connection until it ends.
pub(super) async fn handle(
    socket: TcpStream,
    peer: SocketAddr,
    router: axum::Router,
    shutdown: CancellationToken,
    state: Arc<AppState>,
    acceptor: TlsAcceptor,
    tracker: TaskTracker,
) {
    let accepted = Instant::now();
    let (limits, max_streams) = {
        let server = state.server.load();
        let limits = Limits {
            head_timeout: server.head_timeout,
            keepalive_timeout: server.keepalive_timeout,
            send_timeout: server.send_timeout,
        };
        (limits, server.http2_max_streams)
    };
    let metrics = &state.metrics;
    let watch = Arc::new(ConnWatch::new(accepted));
    let io = WatchedIo::new(socket, Arc::clone(&watch));
    let handshake = tokio::time::timeout_at(accepted + limits.head_timeout, acceptor.accept(io));
    let tls = tokio::select! {
        r = handshake => match r {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                metrics.tls_handshake_failures.fetch_add(1, Ordering::Relaxed);
                debug!(%peer, error = %e, "TLS handshake failed.");
                return;
            }
            Err(_) => {
                metrics.tls_handshake_failures.fetch_add(1, Ordering::Relaxed);
                debug!(%peer, "No TLS handshake within the head timeout; closing.");
                return;
            }
        },
        _ = shutdown.cancelled() => return,
    };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let service = Tracked::new(router, peer, Arc::clone(&watch));
    if h2 {
        watch.set_multiplexed();
        metrics.http2_connections.fetch_add(1, Ordering::Relaxed);
        let _open = OpenConnection(metrics);
        let streams = h2::Streams {
            tracker,
            send_timeout: limits.send_timeout,
            metrics: Arc::clone(metrics),
        };
        let builder = h2::builder(streams, max_streams);
        let conn = builder.serve_connection(TokioIo::new(tls), service);
        tokio::pin!(conn);
        drive(
            conn.as_mut(),
            |c| c.graceful_shutdown(),
            &watch,
            &shutdown,
            &limits,
            metrics,
        )
        .await;
    } else {
        serve_http1(tls, service, &watch, &shutdown, &limits, metrics).await;
    }
}

/// How long a refused connection may take, after its head timeout, to take its answer.
const ANSWER_WAIT: Duration = Duration::from_secs(1);

/// Answers a TLS connection over `max_connections` (see the module doc), within
/// `head_timeout` for the handshake and the request and [`ANSWER_WAIT`] more for the
/// answer.
pub(super) async fn refuse(
    socket: TcpStream,
    peer: SocketAddr,
    state: Arc<AppState>,
    acceptor: TlsAcceptor,
) {
    let metrics = Arc::clone(&state.metrics);
    if metrics.refusing.fetch_add(1, Ordering::Relaxed) >= MAX_REFUSING {
        metrics.refusing.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    let head_timeout = state.server.load().head_timeout;
    let accepted = Instant::now();
    let answered = Arc::new(Notify::new());
    let work = async {
        let tls =
            match tokio::time::timeout_at(accepted + head_timeout, acceptor.accept(socket)).await {
                Ok(Ok(tls)) => tls,
                _ => {
                    metrics
                        .tls_handshake_failures
                        .fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let service = {
            let answered = Arc::clone(&answered);
            let state = Arc::clone(&state);
            hyper::service::service_fn(move |request: Request<Incoming>| {
                answered.notify_one();
                let response = overload_answer(&state, peer, &request);
                async move { Ok::<_, std::convert::Infallible>(response) }
            })
        };
        let io = TokioIo::new(tls);
        // The request head must be in within the head timeout; the answer is short.
        let head_deadline = accepted + head_timeout;
        if h2 {
            let mut builder = hyper::server::conn::http2::Builder::new(SpawnExecutor);
            builder.max_concurrent_streams(1);
            let conn = builder.serve_connection(io, service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = answered.notified() => conn.as_mut().graceful_shutdown(),
                _ = tokio::time::sleep_until(head_deadline) => return,
            }
            let _ = tokio::time::timeout(ANSWER_WAIT, conn).await;
        } else {
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(io, service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = answered.notified() => {}
                _ = tokio::time::sleep_until(head_deadline) => return,
            }
            let _ = tokio::time::timeout(ANSWER_WAIT, conn).await;
        }
    };
    work.await;
    metrics.refusing.fetch_sub(1, Ordering::Relaxed);
}

/// The answer to a request on a connection over `max_connections`, logged as a stream
/// connection when it is a stream's path.
fn overload_answer(
    state: &AppState,
    peer: SocketAddr,
    request: &Request<Incoming>,
) -> Response<Body> {
    let server = state.server.load_full();
    state.metrics.refused(Refusal::MaxConnections);
    let headers = request.headers();
    let path = request.uri().path();
    let target = request.uri().path_and_query().map_or(path, |p| p.as_str());
    let route = state
        .routes
        .load()
        .find(path)
        .map(|f| Arc::clone(&f.route.path));
    let client = limits::client_ip(
        peer.ip(),
        headers.get("x-forwarded-for").map(HeaderValue::as_bytes),
        &server.trusted_proxies,
    );
    let cors = head::cors(&server, headers.get("origin").map(HeaderValue::as_bytes));
    let mut response = match route {
        Some(route) => {
            let mut access = Access::new(
                route,
                target,
                client,
                &state.auth.load(),
                Arc::clone(&state.metrics),
            );
            access.end(End::Told(EndReason::Overloaded));
            routes::overloaded(&server, headers, Some(access), EndReason::Overloaded)
        }
        // Not a stream: `503`, whatever it accepts.
        None => routes::unavailable(&server, EndReason::Overloaded),
    };
    for (name, value) in cors {
        if let Ok(value) = HeaderValue::from_str(&value) {
            response.headers_mut().append(name, value);
        }
    }
    response
}

/// Runs the refusal's single HTTP/2 stream task.
#[derive(Clone, Copy)]
struct SpawnExecutor;

impl<F> hyper::rt::Executor<F> for SpawnExecutor
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}
