//! The event-stream fast path: a connection whose first request is a `GET` of a
//! configured stream is served here, straight from the hub onto the socket, instead
//! of through hyper.
//!
//! Per connection this keeps only the socket, the client's ring cursor and a few
//! bytes; there is no HTTP read buffer, no chunked framing and no timer while writes
//! go through. A write that blocks arms `send_timeout`; a client still blocked when
//! it fires is dropped. The response is delimited by the connection's close (HTTP/1.1
//! allows that for responses), which is what `EventSource` expects of a stream.
//!
//! Any other first request goes to hyper with the bytes already read (see
//! [`super::WatchedIo`]). The task ends when the hub ends the stream (`end`), the
//! client goes away, a write times out, or the connection's lifetime is over.

use std::io::{self, IoSlice};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::routes::{allowed_origin, jittered, varies_by_origin};
use super::AppState;
use crate::route::Route;
use crate::wire::{self, resume};

/// Request heads larger than this are left to hyper, which answers them properly.
pub(super) const MAX_HEAD: usize = 8 * 1024;
/// Bytes a stream client may send after its request before the connection is closed.
const MAX_TRAILING: usize = 1024;

/// What the fast path needs from a parsed request head.
pub(super) struct StreamRequest {
    pub route: Arc<Route>,
    pub last_event_id: Option<Vec<u8>>,
    pub query: Option<String>,
    pub origin: Option<String>,
    /// Bytes that came after the head.
    pub trailing: usize,
}

/// Parses `head`; `Ok(None)` means more bytes are needed, `Err(())` that the request
/// is not a stream GET (or not parseable here) and belongs to hyper.
pub(super) fn classify(head: &[u8], state: &AppState) -> Result<Option<StreamRequest>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let trailing = match req.parse(head) {
        Ok(httparse::Status::Partial) => return Ok(None),
        // Bytes after the head: a stream request has no body, so they count against
        // the stream's cap on what a client may send (pipelined requests behind an
        // endless stream could never be answered anyway).
        Ok(httparse::Status::Complete(n)) => head.len() - n,
        Err(_) => return Err(()),
    };
    if req.method != Some("GET") {
        return Err(());
    }
    let target = req.path.ok_or(())?;
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (target, None),
    };
    let route = state.routes.load().get(path).cloned().ok_or(())?;
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    // hyper's side answers what the fast path does not serve: a missing Host (400) and
    // a request with a body (413).
    if (req.version == Some(1) && header("host").is_none())
        || header("transfer-encoding").is_some()
        || header("content-length").is_some_and(|v| v != b"0")
    {
        return Err(());
    }
    Ok(Some(StreamRequest {
        route,
        last_event_id: header("last-event-id").map(<[u8]>::to_vec),
        query,
        origin: header("origin").and_then(|o| std::str::from_utf8(o).ok().map(str::to_string)),
        trailing,
    }))
}

/// Serves one event stream until it ends.
pub(super) async fn serve(socket: TcpStream, request: StreamRequest, state: &AppState) {
    let server = state.server.load_full();
    let resume = resume(request.last_event_id.as_deref(), request.query.as_deref());
    let mut head = String::from("HTTP/1.1 200 OK\r\nconnection: close\r\n");
    for (name, value) in wire::STREAM_HEADERS {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    if let Some(origin) = allowed_origin(&server, request.origin.as_deref()) {
        if !origin.contains(['\r', '\n']) {
            head.push_str("access-control-allow-origin: ");
            head.push_str(&origin);
            head.push_str("\r\n");
        }
    }
    if varies_by_origin(&server) {
        head.push_str("vary: origin\r\n");
    }
    head.push_str("\r\n");
    // Bytes received after the request head.
    let mut trailing = request.trailing;
    if trailing > MAX_TRAILING {
        return;
    }
    let mut subscription = request.route.hub.subscribe(resume);
    drop(request);
    // Boxed, and only when configured: a timer is large next to the rest of the task.
    let mut lifetime = server
        .max_lifetime
        .map(|life| Box::pin(tokio::time::sleep(jittered(life))));
    let send_timeout = server.send_timeout;

    // Reused for every wake-up, so a client allocates nothing per event.
    let mut frames = vec![Bytes::from(head)];
    let mut probe = [0u8; 16];
    loop {
        // `readable()` does not count against tokio's cooperative budget, so a client
        // that keeps sending could otherwise hold this worker; this yields when the
        // task has had its share.
        tokio::task::coop::consume_budget().await;
        tokio::select! {
            more = subscription.next(&mut frames) => if !more {
                break;
            },
            // The client sends nothing after its request; readable means it closed
            // or sent something, which is discarded up to a small cap.
            r = socket.readable() => {
                if r.is_err() {
                    break;
                }
                match socket.try_read(&mut probe) {
                    Ok(0) => break,
                    Ok(n) => {
                        trailing += n;
                        if trailing > MAX_TRAILING {
                            tracing::debug!("Client kept sending after its stream request; closing.");
                            return;
                        }
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(_) => break,
                }
            }
            _ = async {
                match lifetime.as_mut() {
                    Some(sleep) => sleep.await,
                    None => std::future::pending().await,
                }
            } => break,
        }
        if let Err(e) = write_frames(&socket, &mut frames, send_timeout).await {
            if e.kind() == io::ErrorKind::TimedOut {
                state
                    .metrics
                    .stall_disconnects
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!("Client accepted nothing for the send timeout; disconnecting.");
            }
            return;
        }
    }
    // Let the final frames (such as `end`) drain before the socket closes.
    let _ = tokio::time::timeout(Duration::from_secs(1), shutdown(&socket)).await;
}

/// Writes every frame (vectored, several per system call), arming `send_timeout` only
/// while the socket is full. Leaves `frames` empty.
async fn write_frames(
    socket: &TcpStream,
    frames: &mut Vec<Bytes>,
    send_timeout: Duration,
) -> io::Result<()> {
    let mut done = 0;
    while done < frames.len() {
        match try_write_frames(socket, &mut frames[done..]) {
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Boxed: the timer exists only while blocked, not in every task's state.
                match Box::pin(tokio::time::timeout(send_timeout, socket.writable())).await {
                    Ok(r) => r?,
                    Err(_) => return Err(io::ErrorKind::TimedOut.into()),
                }
            }
            Err(e) => return Err(e),
        }
    }
    frames.clear();
    Ok(())
}

/// One vectored write; returns how many frames were written whole and trims a frame
/// written in part. Kept out of the async function so its slice array is not part of
/// every connection task's state.
fn try_write_frames(socket: &TcpStream, frames: &mut [Bytes]) -> io::Result<usize> {
    const BATCH: usize = 32;
    let mut slices = [IoSlice::new(&[]); BATCH];
    let count = frames.len().min(BATCH);
    for (slice, frame) in slices.iter_mut().zip(frames.iter()) {
        *slice = IoSlice::new(frame);
    }
    // `send`/`sendmsg` rather than `write`/`writev`: the socket calls skip the VFS
    // layer, which showed as ~10% of the gateway's CPU at fan-out.
    let sock = socket2::SockRef::from(socket);
    let mut n = socket.try_io(Interest::WRITABLE, || match count {
        1 => sock.send(&frames[0]),
        _ => sock.send_vectored(&slices[..count]),
    })?;
    if n == 0 {
        return Err(io::ErrorKind::WriteZero.into());
    }
    let mut whole = 0;
    for frame in frames.iter_mut() {
        if n >= frame.len() {
            n -= frame.len();
            whole += 1;
        } else {
            frame.advance(n);
            break;
        }
    }
    Ok(whole)
}

async fn shutdown(socket: &TcpStream) {
    // Half-close: the client sees the end of the response after the last byte.
    let _ = socket2::SockRef::from(socket).shutdown(std::net::Shutdown::Write);
    let mut sink = [0u8; 256];
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        match socket.try_read(&mut sink) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}
#[cfg(test)]
pub(super) fn serve_size(socket: TcpStream, request: StreamRequest, state: &AppState) -> usize {
    std::mem::size_of_val(&serve(socket, request, state))
}
