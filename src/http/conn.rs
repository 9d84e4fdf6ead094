//! One client connection: reading the first request head (the fast path takes event
//! stream GETs), then hyper for everything else, with a deadline for every phase of
//! the connection and a watchdog on writes; and the answer to a connection over the
//! global limit. [`drive`] and the socket and service wrappers serve TLS connections
//! too (`tls`), HTTP/2 ones included.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::access::{Access, End};
use super::{h2, head, limits, stream, AppState, Listener};
use crate::telemetry::{Metrics, Refusal};
use crate::wire::EndReason;

/// Refusals in progress beyond which an over-limit connection is closed at once: a
/// refusal reads the request head first, and a flood must not turn that into
/// unbounded work.
pub(super) const MAX_REFUSING: usize = 1024;

/// Answers a connection over `max_connections` once its request head is in (an HTTP
/// client reads no answer it has not asked for), within `head_timeout`, then closes
/// it: an event-stream request gets the overload stream, anything else `503`.
pub(super) async fn refuse(mut socket: TcpStream, peer: SocketAddr, state: Arc<AppState>) {
    let metrics = Arc::clone(&state.metrics);
    if metrics.refusing.fetch_add(1, Ordering::Relaxed) >= MAX_REFUSING {
        metrics.refusing.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    let server = state.server.load_full();
    let mut buf = BytesMut::with_capacity(1024);
    let read_head = async {
        while buf.len() < head::MAX_HEAD {
            match socket.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            let parsed = head::parse(&buf, |req, _| {
                let target = req.path.unwrap_or("/").to_string();
                let client = limits::client_ip(
                    peer.ip(),
                    head::header(req, "x-forwarded-for"),
                    &server.trusted_proxies,
                );
                let sse = head::wants_event_stream(head::header(req, "accept"));
                (
                    target,
                    client,
                    sse,
                    head::cors(&server, head::header(req, "origin")),
                )
            });
            match parsed {
                head::Parsed::Partial => continue,
                head::Parsed::Invalid => return None,
                head::Parsed::Complete(request) => return Some(request),
            }
        }
        None
    };
    if let Ok(Some((target, client, wants_events, cors))) =
        tokio::time::timeout(server.head_timeout, read_head).await
    {
        metrics.refused(Refusal::MaxConnections);
        let path = target.split('?').next().unwrap_or("/");
        let route = state
            .routes
            .load()
            .find(path)
            .map(|f| Arc::clone(&f.route.path));
        // A stream request that takes the event stream is told to come back later.
        let sse = route.is_some() && wants_events;
        let answer = if sse {
            limits::overload_response(&server, &cors, EndReason::Overloaded)
        } else {
            limits::unavailable_response(&server, &cors, EndReason::Overloaded)
        };
        if let Some(route) = route {
            let auth = state.auth.load();
            let mut access = Access::new(route, &target, client, &auth, Arc::clone(&metrics));
            access.set_status(if sse { 200 } else { 503 });
            access.end(End::Told(EndReason::Overloaded));
            access.wrote(answer.len());
        }
        let _ = socket.write_all(&answer).await;
        let _ = socket.shutdown().await;
    }
    metrics.refusing.fetch_sub(1, Ordering::Relaxed);
}

/// Reads the first request head; on the public listener a stream GET that wants the
/// event stream takes the fast path, anything else goes to hyper along with the bytes
/// already read. The head must arrive within `head_timeout` of the accept, on either
/// path.
pub(super) async fn handle(
    mut socket: TcpStream,
    peer: SocketAddr,
    kind: Listener,
    router: axum::Router,
    shutdown: CancellationToken,
    state: &AppState,
) {
    let accepted = Instant::now();
    let head_timeout = state.server.load().head_timeout;
    let mut buf = BytesMut::with_capacity(1024);
    let read_head = async {
        loop {
            match socket.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) if kind == Listener::Admin => return Some(None),
                Ok(_) => match stream::classify(&buf, peer, state) {
                    head::Parsed::Complete(request) => return Some(request),
                    head::Parsed::Partial if buf.len() < head::MAX_HEAD => continue,
                    _ => return Some(None),
                },
            }
        }
    };
    let request = tokio::select! {
        r = Box::pin(tokio::time::timeout(head_timeout, read_head)) => match r {
            Ok(Some(request)) => request,
            Ok(None) | Err(_) => return,
        },
        _ = shutdown.cancelled() => return,
    };
    match request {
        Some(request) => {
            // Not held across the stream's life: every byte here is per connection.
            drop((buf, router, shutdown));
            stream::serve(socket, request, state).await;
        }
        None => {
            let limits = {
                let server = state.server.load();
                Limits {
                    head_timeout: server.head_timeout,
                    keepalive_timeout: server.keepalive_timeout,
                    send_timeout: server.send_timeout,
                }
            };
            // Boxed: hyper's connection state is large, and inline it would size every
            // connection task, including the many stream ones.
            Box::pin(connection(
                socket,
                peer,
                buf.freeze(),
                router,
                shutdown,
                limits,
                accepted,
                &state.metrics,
            ))
            .await;
        }
    }
}

/// The deadlines of one hyper connection, fixed when it is accepted.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub head_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub send_timeout: Duration,
}

/// How long an HTTP/2 connection closed at a deadline waits for its GOAWAY to go out.
const GOAWAY_GRACE: Duration = Duration::from_secs(1);

#[allow(clippy::too_many_arguments)]
async fn connection(
    socket: TcpStream,
    peer: SocketAddr,
    prefix: Bytes,
    router: axum::Router,
    shutdown: CancellationToken,
    limits: Limits,
    accepted: Instant,
    metrics: &Metrics,
) {
    let watch = Arc::new(ConnWatch::new(accepted));
    let io = WatchedIo {
        prefix,
        inner: socket,
        watch: Arc::clone(&watch),
    };
    let service = Tracked::new(router, peer, Arc::clone(&watch));
    serve_http1(io, service, &watch, &shutdown, &limits, metrics).await;
}

/// Serves HTTP/1.1 (keep-alive) on `io` until the connection ends, under its
/// deadlines and shutdown.
pub(super) async fn serve_http1<I>(
    io: I,
    service: Tracked,
    watch: &ConnWatch,
    shutdown: &CancellationToken,
    limits: &Limits,
    metrics: &Metrics,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    drive(
        conn.as_mut(),
        |c| c.graceful_shutdown(),
        watch,
        shutdown,
        limits,
        metrics,
    )
    .await;
}

/// Drives a hyper connection to its end under its deadlines: `head_timeout` and
/// `keepalive_timeout` by phase, `send_timeout` for a socket that accepts nothing, and
/// a graceful finish (`graceful`) at shutdown: HTTP/1.1 closes after the response in
/// progress, HTTP/2 sends GOAWAY; streams end because their hubs send `end` first.
pub(super) async fn drive<C: Future>(
    mut conn: Pin<&mut C>,
    mut graceful: impl FnMut(Pin<&mut C>),
    watch: &ConnWatch,
    shutdown: &CancellationToken,
    limits: &Limits,
    metrics: &Metrics,
) {
    let mut draining = false;
    loop {
        let deadline = watch.deadline(limits);
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = shutdown.cancelled(), if !draining => {
                draining = true;
                graceful(conn.as_mut());
            }
            // The request phase moved on: recompute the deadline.
            _ = watch.changed.notified() => {}
            _ = sleep_until(deadline) => {
                if watch.deadline(limits).is_some_and(|d| d <= Instant::now()) {
                    debug!(phase = ?watch.phase(), "Connection deadline passed; closing.");
                    if watch.multiplexed() && !draining {
                        // HTTP/2: GOAWAY tells the client not to start a stream here.
                        graceful(conn.as_mut());
                        let _ = tokio::time::timeout(GOAWAY_GRACE, conn.as_mut()).await;
                    }
                    return;
                }
            }
            _ = watch.stalled.notified() => {
                // A write is blocked. Give it `send_timeout` to make any progress.
                let seen = watch.progress.load(Ordering::Relaxed);
                tokio::select! {
                    _ = conn.as_mut() => return,
                    _ = tokio::time::sleep(limits.send_timeout) => {
                        if watch.blocked.load(Ordering::Relaxed)
                            && watch.progress.load(Ordering::Relaxed) == seen
                        {
                            metrics.stall_disconnects.fetch_add(1, Ordering::Relaxed);
                            watch.timed_out.store(true, Ordering::Relaxed);
                            debug!("Client accepted nothing for the send timeout; disconnecting.");
                            return;
                        }
                    }
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Where a hyper connection is between requests; each phase but `Busy` has a deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A request head is arriving (from the accept, or from the first byte after an
    /// idle spell): `head_timeout`.
    Head,
    /// A request is being answered; a response stream may last as long as it likes,
    /// guarded by `send_timeout` while the client reads nothing.
    Busy,
    /// Between requests: `keepalive_timeout`.
    Idle,
}

/// What a hyper connection is doing, shared by its socket wrapper, its service and the
/// task that enforces its deadlines. Over HTTP/1.1 everything here is touched from
/// that one task; over HTTP/2 responses finish in their streams' tasks, so a request
/// count that is not zero overrides the phase (see [`ConnWatch::deadline`]). Relaxed
/// atomics suffice: each value is read for itself.
pub(super) struct ConnWatch {
    origin: Instant,
    phase: AtomicU8,
    /// When the current phase began, in milliseconds since `origin`.
    since_ms: AtomicU64,
    /// Requests whose responses are not finished yet.
    in_flight: AtomicUsize,
    /// Bytes read while busy: request bodies and pipelined heads.
    busy_bytes: AtomicUsize,
    changed: Notify,
    // Write progress, for the send-timeout watchdog.
    blocked: AtomicBool,
    /// Set when the watchdog drops the connection.
    timed_out: AtomicBool,
    progress: AtomicU64,
    stalled: Notify,
    /// HTTP/2: many requests at once, and the client sends frames (window updates,
    /// pings, new requests) at any time, so reads say nothing about the phase.
    multiplexed: AtomicBool,
}

/// Bytes a client may send while a request is being answered (a pipelined request or
/// two); beyond it the connection is closed. Stream requests have no body, and bodies
/// are refused with 413 before they are read. hyper reads at most once while it
/// answers, so a client that sends little more is not read at all until the response
/// ends: it costs nothing but its slot.
const BUSY_READ_CAP: usize = 4 * 1024;

impl ConnWatch {
    pub(super) fn new(origin: Instant) -> Self {
        ConnWatch {
            origin,
            phase: AtomicU8::new(Phase::Head as u8),
            since_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            busy_bytes: AtomicUsize::new(0),
            changed: Notify::new(),
            blocked: AtomicBool::new(false),
            timed_out: AtomicBool::new(false),
            progress: AtomicU64::new(0),
            stalled: Notify::new(),
            multiplexed: AtomicBool::new(false),
        }
    }

    /// Marks the connection as HTTP/2.
    pub(super) fn set_multiplexed(&self) {
        self.multiplexed.store(true, Ordering::Relaxed);
    }

    fn multiplexed(&self) -> bool {
        self.multiplexed.load(Ordering::Relaxed)
    }

    fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            0 => Phase::Head,
            1 => Phase::Busy,
            _ => Phase::Idle,
        }
    }

    fn enter(&self, phase: Phase) {
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.since_ms.store(now, Ordering::Relaxed);
        self.phase.store(phase as u8, Ordering::Relaxed);
        self.changed.notify_one();
    }

    fn deadline(&self, limits: &Limits) -> Option<Instant> {
        // A request in flight: busy, whatever phase a racing finish wrote last.
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let since = self.origin + Duration::from_millis(self.since_ms.load(Ordering::Relaxed));
        match self.phase() {
            Phase::Head => Some(since + limits.head_timeout),
            Phase::Busy => None,
            Phase::Idle => Some(since + limits.keepalive_timeout),
        }
    }

    /// A request head was parsed and handed to the service.
    fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.busy_bytes.store(0, Ordering::Relaxed);
        if self.phase() != Phase::Busy {
            self.enter(Phase::Busy);
        }
    }

    /// A response finished (or was abandoned).
    fn request_finished(&self) {
        if self.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.enter(Phase::Idle);
        }
    }

    /// Accounts for bytes read from the client; `Err` once a busy connection has been
    /// sent more than [`BUSY_READ_CAP`].
    fn read(&self, n: usize) -> io::Result<()> {
        if self.multiplexed() {
            return Ok(());
        }
        match self.phase() {
            Phase::Idle if n > 0 => self.enter(Phase::Head),
            Phase::Busy => {
                let total = self.busy_bytes.fetch_add(n, Ordering::Relaxed) + n;
                if total > BUSY_READ_CAP {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "client sent too much while its request was being answered",
                    ));
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// What a handler may know of its connection: the peer, and whether the watchdog
/// gave up on it or, over HTTP/2, on its stream (so a stream's access line says
/// `send-timeout`, not `client-gone`).
pub(super) struct ConnInfo {
    pub peer: SocketAddr,
    watch: Arc<ConnWatch>,
    /// HTTP/2: the request's own stream.
    stream: Option<Arc<h2::StreamWatch>>,
}

impl ConnInfo {
    pub fn timed_out(&self) -> bool {
        self.watch.timed_out.load(Ordering::Relaxed)
            || self.stream.as_ref().is_some_and(|s| s.timed_out())
    }
}

/// The router as a hyper service that reports each request's start and end to the
/// connection's [`ConnWatch`], so idle and head deadlines apply between requests, and
/// hands handlers the [`ConnInfo`].
#[derive(Clone)]
pub(super) struct Tracked {
    router: axum::Router,
    info: Arc<ConnInfo>,
}

impl Tracked {
    pub(super) fn new(router: axum::Router, peer: SocketAddr, watch: Arc<ConnWatch>) -> Self {
        Tracked {
            router,
            info: Arc::new(ConnInfo {
                peer,
                watch,
                stream: None,
            }),
        }
    }
}

impl hyper::service::Service<hyper::Request<hyper::body::Incoming>> for Tracked {
    type Response = hyper::Response<axum::body::Body>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn call(&self, mut request: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        use tower::ServiceExt;
        let watch = &self.info.watch;
        watch.request_started();
        // Dropped with the response body, or with the future if no response is made.
        let guard = RequestGuard(Arc::clone(watch));
        let info = Arc::clone(&self.info);
        let router = self.router.clone();
        Box::pin(async move {
            // Over HTTP/2 this runs in the stream's own task, which watches the stream.
            let stream = h2::current_stream();
            let info = match &stream {
                Some(s) => Arc::new(ConnInfo {
                    peer: info.peer,
                    watch: Arc::clone(&info.watch),
                    stream: Some(Arc::clone(s)),
                }),
                None => info,
            };
            request.extensions_mut().insert(info);
            let response = router.oneshot(request.map(axum::body::Body::new)).await?;
            Ok(response.map(|body| {
                axum::body::Body::new(GuardedBody {
                    body,
                    _guard: guard,
                    stream,
                })
            }))
        })
    }
}

struct RequestGuard(Arc<ConnWatch>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

/// A response body that ends its request's busy phase when it is dropped, and tells an
/// HTTP/2 stream's watch when it handed hyper a frame.
struct GuardedBody {
    body: axum::body::Body,
    _guard: RequestGuard,
    stream: Option<Arc<h2::StreamWatch>>,
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let poll = Pin::new(&mut self.body).poll_frame(cx);
        if let Some(stream) = &self.stream {
            stream.polled(matches!(poll, Poll::Ready(Some(Ok(_)))));
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A socket that reports when writes block, so a stuck client can be detected without
/// a timer per connection while all is well, and reports reads to the connection's
/// phase tracking. Reads first return `prefix`, the bytes read before the connection
/// was handed to hyper. Under TLS it wraps the TCP socket, so it sees the bytes on the
/// wire.
pub(super) struct WatchedIo<S = TcpStream> {
    prefix: Bytes,
    inner: S,
    watch: Arc<ConnWatch>,
}

impl<S> WatchedIo<S> {
    /// `inner`, with nothing read ahead.
    pub(super) fn new(inner: S, watch: Arc<ConnWatch>) -> Self {
        WatchedIo {
            prefix: Bytes::new(),
            inner,
            watch,
        }
    }

    fn note<T>(&self, poll: &Poll<io::Result<T>>) {
        match poll {
            Poll::Pending => {
                if !self.watch.blocked.swap(true, Ordering::Relaxed) {
                    self.watch.stalled.notify_one();
                }
            }
            Poll::Ready(_) => {
                self.watch.blocked.store(false, Ordering::Relaxed);
                self.watch.progress.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WatchedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            self.watch.read(buf.filled().len() - before)?;
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WatchedIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(&poll);
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note(&poll);
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::Route;
    use arc_swap::ArcSwap;
    use tokio::net::TcpListener;

    /// Every client holds one connection task, so its size is per-connection memory.
    #[tokio::test]
    async fn connection_tasks_stay_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let config = crate::config::parse(
            std::path::Path::new("t.toml"),
            "[[streams]]\npath = \"/a\"\nview = \"v\"\n",
        )
        .expect("config");
        let state = Arc::new(AppState {
            routes: Arc::new(ArcSwap::from_pointee(Default::default())),
            metrics: Arc::new(Metrics::default()),
            server: ArcSwap::from_pointee(config.server.clone()),
            config_path: "t.toml".into(),
            per_ip: Arc::default(),
            auth: ArcSwap::new(crate::auth::Auth::none()),
        });
        let router = super::super::routes::router(Listener::Public, Arc::clone(&state));
        let stream = &config.streams[0];
        let route = Arc::new(Route {
            path: stream.path.as_str().into(),
            config: Arc::clone(stream),
            target: crate::feed::Target::Plain(crate::hub::Hub::new(crate::hub::Settings::new(
                stream,
                crate::config::ClientErrors::Full,
            ))),
        });
        let serve = stream::serve_size(
            TcpStream::connect(addr).await.expect("connect"),
            Box::new(stream::StreamRequest {
                found: crate::route::Found {
                    route,
                    params: Vec::new(),
                },
                target: "/a".into(),
                last_event_id: None,
                origin: None,
                token: None,
                client: addr.ip(),
                trailing: 0,
            }),
            &state,
        );
        let task = handle(
            TcpStream::connect(addr).await.expect("connect"),
            addr,
            Listener::Public,
            router,
            CancellationToken::new(),
            &state,
        );
        let size = std::mem::size_of_val(&task);
        eprintln!("connection task: {size} bytes, of which serving a stream {serve}");
        assert!(size <= 1216, "connection task is {size} bytes");
    }
}
