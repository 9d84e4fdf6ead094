//! The HTTP side: a listener with a deep backlog, one task per connection, the
//! event-stream fast path (`stream`), and hyper with the axum routers (`routes`) for
//! everything else, including the pages a browser gets (`pages`). Both serve a
//! stream the same way: access control (`admission`), then the hub a client reads
//! (`scope`: a scoped stream's channel).
//!
//! The accept loop is ours rather than `axum::serve` for four reasons: the listen
//! backlog (tokio's default is 128); a connection cap whose answer keeps browsers
//! coming back (see `limits`) instead of running out of descriptors; a deadline for
//! every phase of a connection (the request head, keep-alive idle, and bytes sent
//! while a request is answered), so no client can hold a slot for free; and a
//! per-connection write watchdog that drops a client whose socket accepts nothing for
//! `send_timeout` (hyper never polls a stream body while the socket is full, so the
//! body cannot notice by itself).
//!
//! The public listener serves the streams; with `admin_listen` set, the operator's
//! routes (`/metrics`, `/livez`, `/readyz`, the full listing) move to a second
//! listener. With `[server] tls`, the public listener speaks HTTPS only, HTTP/2 or
//! HTTP/1.1 by ALPN, through hyper (`tls`, `h2`); the admin listener stays plain
//! HTTP, for probes and scrapes on a private address. Connection tasks live in their
//! server's task tracker. When shutdown
//! starts, the loops stop accepting and ask every connection to finish its response
//! and close; event streams end because every hub sends `end` first.

mod access;
mod admission;
mod conn;
mod h2;
mod head;
mod limits;
mod mux;
mod ops;
mod pages;
mod routes;
mod scope;
mod stream;
mod tls;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

pub use limits::PerIp;
pub use routes::AppState;

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

/// Which routes a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// The streams, and the operator's routes too unless an admin listener has them.
    Public,
    /// The operator's routes only.
    Admin,
}

/// Serves `listener` until `shutdown` fires, then waits up to `grace` for connections to
/// finish. With `tls`, every connection is HTTPS.
pub async fn serve(
    listener: TcpListener,
    kind: Listener,
    state: Arc<AppState>,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let tls = tls.map(TlsAcceptor::from);
    let router = routes::router(kind, Arc::clone(&state));
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
            match &tls {
                Some(acceptor) => tokio::spawn(tls::refuse(
                    socket,
                    peer,
                    Arc::clone(&state),
                    acceptor.clone(),
                )),
                None => tokio::spawn(conn::refuse(socket, peer, Arc::clone(&state))),
            };
            continue;
        }
        let _ = socket.set_nodelay(true);
        metrics.connections.fetch_add(1, Ordering::Relaxed);
        if kind == Listener::Public {
            metrics.connections_accepted.fetch_add(1, Ordering::Relaxed);
        }
        let router = router.clone();
        let shutdown = shutdown.clone();
        let state = Arc::clone(&state);
        if let Some(acceptor) = &tls {
            let (acceptor, streams) = (acceptor.clone(), tracker.clone());
            tracker.spawn(async move {
                tls::handle(socket, peer, router, shutdown, state, acceptor, streams).await;
                metrics.connections.fetch_sub(1, Ordering::Relaxed);
                debug!(%peer, "Connection closed.");
            });
            continue;
        }
        tracker.spawn(async move {
            conn::handle(socket, peer, kind, router, shutdown, &state).await;
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
