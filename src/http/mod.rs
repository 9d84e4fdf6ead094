//! The HTTP side: a listener with a deep backlog, one hyper HTTP/1.1 connection task per
//! client, and the axum router of [`routes`].
//!
//! The accept loop is ours rather than `axum::serve` for three reasons: the listen
//! backlog (tokio's default is 128), a connection cap that answers 503 instead of
//! running out of descriptors, and a per-connection write watchdog that drops a client
//! whose socket accepts nothing for `send_timeout` (hyper never polls a stream body
//! while the socket is full, so the body cannot notice by itself).
//!
//! Connection tasks live in the server's task tracker. When shutdown starts, the loop
//! stops accepting and asks every connection to finish its response and close; SSE
//! bodies end because every hub sends `end` first.

mod routes;
mod stream;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

pub use routes::{app, AppState};

use crate::supervisor::Routes;
use crate::telemetry::Metrics;

/// The listen backlog: a connect storm of thousands must not see refused connections.
pub const BACKLOG: u32 = 4096;

/// Binds `addr` with [`BACKLOG`].
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Serves `listener` until `shutdown` fires, then waits up to `grace` for connections to
/// finish.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let router = app(Arc::clone(&state));
    let tracker = TaskTracker::new();
    loop {
        let (socket, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    warn!(error = %e, "Accept failed.");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let metrics = Arc::clone(&state.metrics);
        let open = metrics.connections.load(Ordering::Relaxed);
        if open >= state.server.load().max_connections {
            metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(refuse(socket));
            continue;
        }
        let _ = socket.set_nodelay(true);
        metrics.connections.fetch_add(1, Ordering::Relaxed);
        let router = router.clone();
        let shutdown = shutdown.clone();
        let state = Arc::clone(&state);
        tracker.spawn(async move {
            handle(socket, router, shutdown, &state).await;
            metrics.connections.fetch_sub(1, Ordering::Relaxed);
            debug!(%peer, "Connection closed.");
        });
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!(
            remaining = tracker.len(),
            "Shutdown grace period over; closing the remaining connections."
        );
    }
}

async fn refuse(mut socket: TcpStream) {
    let _ = socket
        .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\nretry-after: 5\r\n\r\n")
        .await;
    let _ = socket.shutdown().await;
}

/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the first request head; a stream GET takes the fast path, anything else goes
/// to hyper along with the bytes already read.
async fn handle(
    mut socket: TcpStream,
    router: axum::Router,
    shutdown: CancellationToken,
    state: &AppState,
) {
    let mut head = BytesMut::with_capacity(1024);
    let read_head = async {
        loop {
            match socket.read_buf(&mut head).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => match stream::classify(&head, state) {
                    Ok(Some(request)) => return Some(Some(request)),
                    Ok(None) if head.len() < stream::MAX_HEAD => continue,
                    _ => return Some(None),
                },
            }
        }
    };
    let request = tokio::select! {
        r = Box::pin(tokio::time::timeout(HEAD_TIMEOUT, read_head)) => match r {
            Ok(Some(request)) => request,
            Ok(None) | Err(_) => return,
        },
        _ = shutdown.cancelled() => return,
    };
    match request {
        Some(request) => {
            drop(head);
            stream::serve(socket, request, state).await;
        }
        None => {
            let send_timeout = state.server.load().send_timeout;
            let service = TowerToHyperService::new(router);
            // Boxed: hyper's connection state is large, and inline it would size every
            // connection task, including the many stream ones.
            Box::pin(connection(
                socket,
                head.freeze(),
                service,
                shutdown,
                send_timeout,
                &state.metrics,
            ))
            .await;
        }
    }
}

async fn connection(
    socket: TcpStream,
    prefix: Bytes,
    service: TowerToHyperService<axum::Router>,
    shutdown: CancellationToken,
    send_timeout: Duration,
    metrics: &Metrics,
) {
    let watch = Arc::new(WriteWatch::default());
    let io = WatchedIo {
        prefix,
        inner: socket,
        watch: Arc::clone(&watch),
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = shutdown.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = watch.stalled.notified() => {
                // A write is blocked. Give it `send_timeout` to make any progress.
                let seen = watch.progress.load(Ordering::Relaxed);
                tokio::select! {
                    _ = conn.as_mut() => return,
                    _ = tokio::time::sleep(send_timeout) => {
                        if watch.blocked.load(Ordering::Relaxed)
                            && watch.progress.load(Ordering::Relaxed) == seen
                        {
                            metrics.stall_disconnects.fetch_add(1, Ordering::Relaxed);
                            debug!("Client accepted nothing for the send timeout; disconnecting.");
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// Write progress of one connection, shared with its watchdog.
#[derive(Default)]
struct WriteWatch {
    blocked: AtomicBool,
    progress: AtomicU64,
    stalled: Notify,
}

/// A socket that reports when writes block, so a stuck client can be detected without
/// a timer per connection while all is well. Reads first return `prefix`, the bytes
/// read before the connection was handed to hyper.
struct WatchedIo {
    prefix: Bytes,
    inner: TcpStream,
    watch: Arc<WriteWatch>,
}

impl WatchedIo {
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

impl AsyncRead for WatchedIo {
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
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for WatchedIo {
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

/// The route table type the HTTP layer reads; re-exported for the gateway's wiring.
pub type SharedRoutes = Arc<ArcSwap<Routes>>;

#[cfg(test)]
mod tests {
    use super::*;

    /// Every client holds one connection task, so its size is per-connection memory.
    #[tokio::test]
    async fn connection_tasks_stay_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let state = AppState {
            routes: Arc::new(ArcSwap::from_pointee(Routes::new())),
            metrics: Arc::new(Metrics::default()),
            server: ArcSwap::from_pointee(
                crate::config::parse(std::path::Path::new("t.toml"), "[server]\n")
                    .expect("config")
                    .server,
            ),
            config_path: "t.toml".into(),
        };
        let router = app(Arc::new(AppState {
            routes: Arc::clone(&state.routes),
            metrics: Arc::clone(&state.metrics),
            server: ArcSwap::from_pointee(state.server.load().as_ref().clone()),
            config_path: "t.toml".into(),
        }));
        let hub = crate::hub::Hub::new(crate::hub::Settings {
            event: "u".into(),
            retry: Duration::from_secs(1),
            history: 1,
            history_bytes: 1,
            client_queue: 1,
        });
        let cfg = crate::config::parse(
            std::path::Path::new("t.toml"),
            "[[streams]]\npath = \"/a\"\nview = \"v\"\n",
        )
        .expect("config");
        let route = Arc::new(crate::supervisor::Route {
            config: Arc::clone(&cfg.streams[0]),
            hub,
        });
        let c2 = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let serve = stream::serve_size(
            c2,
            stream::StreamRequest {
                route,
                last_event_id: None,
                query: None,
                origin: None,
            },
            &state,
        );
        let task = handle(client, router, CancellationToken::new(), &state);
        let size = std::mem::size_of_val(&task);
        eprintln!("connection task: {size} bytes, of which serving a stream {serve}");
        assert!(size < 1280, "connection task is {size} bytes");
    }
}
