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
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;

use super::access::{Access, End};
use super::{admission, head, limits, scope, AppState};
use crate::route::Found;
use crate::telemetry::Refusal;
use crate::wire::{self, resume, EndReason};

/// Bytes a stream client may send after its request before the connection is closed.
const MAX_TRAILING: usize = 1024;

/// What the fast path needs from a parsed request head.
pub(super) struct StreamRequest {
    /// The stream, and a template's values.
    pub found: Found,
    /// The path and query as requested.
    pub target: Box<str>,
    pub last_event_id: Option<Box<[u8]>>,
    pub origin: Option<Box<[u8]>>,
    /// The token from the first configured source that has one.
    pub token: Option<Box<str>>,
    pub client: IpAddr,
    /// Bytes that came after the head.
    pub trailing: usize,
}

/// Parses the bytes read so far; a complete head is `Some` when it is a stream GET
/// that wants the event stream, and `None` when it belongs to hyper (any other
/// request, a page, a missing `Host`, a body).
/// The request is boxed: it is dropped once the stream starts, and inline it would
/// size every connection task for the stream's whole life.
pub(super) fn classify(
    buf: &[u8],
    peer: SocketAddr,
    state: &AppState,
) -> head::Parsed<Option<Box<StreamRequest>>> {
    head::parse(buf, |req, n| {
        if req.method != Some("GET") {
            return None;
        }
        let target = req.path?;
        let path = target.split('?').next().unwrap_or(target);
        let found = state.routes.load().find(path)?;
        let header = |name: &str| head::header(req, name);
        // hyper's side answers what the fast path does not serve: a missing Host (400),
        // a request with a body (413), and a browser navigating (the page).
        if (req.version == Some(1) && header("host").is_none())
            || header("transfer-encoding").is_some()
            || header("content-length").is_some_and(|v| v != b"0")
            || !head::wants_event_stream(header("accept"))
        {
            return None;
        }
        let server = state.server.load();
        let token = state
            .auth
            .load()
            .token(header, target.split_once('?').map(|(_, q)| q))
            .map(|t| t.into());
        Some(Box::new(StreamRequest {
            token,
            found,
            target: target.into(),
            last_event_id: header("last-event-id").map(Into::into),
            origin: header("origin").map(Into::into),
            client: limits::client_ip(
                peer.ip(),
                header("x-forwarded-for"),
                &server.trusted_proxies,
            ),
            // Bytes after the head: a stream request has no body, so they count
            // against the stream's cap on what a client may send (pipelined requests
            // behind an endless stream could never be answered anyway).
            trailing: buf.len() - n,
        }))
    })
}

/// Serves one event stream until it ends, then logs it.
pub(super) async fn serve(socket: TcpStream, request: Box<StreamRequest>, state: &AppState) {
    // Boxed: the record lives as long as the connection but is touched once per write,
    // and inline it would grow every connection task.
    let mut access = Box::new(Access::new(
        Arc::clone(&request.found.route.path),
        &request.target,
        request.client,
        &state.auth.load(),
        Arc::clone(&state.metrics),
    ));
    // Boxed: verification's state is large and lives only while it runs.
    let admitted = Box::pin(admission::admit(
        state,
        &request.found.route,
        request.token.as_deref(),
    ))
    .await;
    let server = state.server.load_full();
    let cors = head::cors(&server, request.origin.as_deref());
    let credential = match admitted {
        Ok(credential) => credential,
        Err(denial) => {
            access.set_status(denial.status());
            access.end(End::Denied);
            let answer = admission::refusal(denial, &cors);
            access.wrote(answer.len());
            drop((request, server, cors));
            Box::pin(answer_and_close(socket, answer)).await;
            return;
        }
    };
    access.identify(credential.as_deref());
    let query = request.target.split_once('?').map(|(_, q)| q);
    let hub = match scope::channel(
        &request.found,
        query,
        credential.as_deref(),
        &state.auth.load(),
    ) {
        Ok(hub) => hub,
        Err(refused) => {
            access.end(refused.note(&request.found.route, &state.metrics));
            let answer = match refused.answer() {
                Ok(status) => {
                    access.set_status(status);
                    admission::raw_json(status, &refused.body(), None, &cors)
                }
                Err(reason) => limits::overload_response(&server, &cors, reason),
            };
            access.wrote(answer.len());
            drop((request, server, cors, refused));
            Box::pin(answer_and_close(socket, answer)).await;
            return;
        }
    };
    let Some(slot) = state
        .per_ip
        .acquire(request.client, server.max_connections_per_ip)
    else {
        state.metrics.refused(Refusal::MaxConnectionsPerIp);
        access.end(End::Told(EndReason::Overloaded));
        let answer = limits::overload_response(&server, &cors, EndReason::Overloaded);
        access.wrote(answer.len());
        drop((request, server, cors));
        // Boxed: a rare path, kept out of every connection task's size.
        Box::pin(answer_and_close(socket, answer)).await;
        return;
    };
    access.hold(slot);
    // Bytes received after the request head.
    let mut trailing = request.trailing;
    if trailing > MAX_TRAILING {
        access.end(End::SentData);
        return;
    }
    let resume = resume(
        request.last_event_id.as_deref(),
        request.target.split_once('?').map(|(_, q)| q),
    );
    let mut head = String::from("HTTP/1.1 200 OK\r\nconnection: close\r\n");
    for (name, value) in wire::STREAM_HEADERS
        .iter()
        .copied()
        .chain(cors.iter().map(|(n, v)| (*n, v.as_str())))
    {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    drop(cors);
    let mut subscription = hub.subscribe(resume);
    drop((request, hub));
    // Boxed, and only when there is one: a timer is large next to the rest of the task.
    let (mut deadline, at_deadline) = match admission::deadline(&server, credential.as_deref()) {
        Some((after, end)) => (Some(Box::pin(tokio::time::sleep(after))), end),
        None => (None, End::Lifetime),
    };
    let send_timeout = server.send_timeout;
    drop(server);
    // Set once the last frames (an `end`) are queued: close after writing them.
    let mut last = false;

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
                if let Some(reason) = subscription.end_reason() {
                    access.end(End::Told(reason));
                }
                if frames.is_empty() {
                    break;
                }
            } else if subscription.take_recheck()
                && !Box::pin(admission::still_admitted(state, access.route(), credential.as_deref())).await
            {
                frames.push(EndReason::Forbidden.frame());
                access.end(End::Told(EndReason::Forbidden));
                last = true;
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
                            access.end(End::SentData);
                            return;
                        }
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(_) => break,
                }
            }
            _ = async {
                match deadline.as_mut() {
                    Some(sleep) => sleep.await,
                    None => std::future::pending().await,
                }
            } => {
                access.end(at_deadline);
                match at_deadline {
                    // The client is told; it reconnects with a fresh token.
                    End::Told(reason) => {
                        frames.push(reason.frame());
                        last = true;
                    }
                    // `max_lifetime`: the response just ends, and the browser resumes.
                    _ => break,
                }
            }
        }
        access.queued(&frames);
        if let Err(e) = write_frames(&socket, &mut frames, send_timeout, &mut access).await {
            if e.kind() == io::ErrorKind::TimedOut {
                state
                    .metrics
                    .stall_disconnects
                    .fetch_add(1, Ordering::Relaxed);
                access.end(End::SendTimeout);
                tracing::debug!("Client accepted nothing for the send timeout; disconnecting.");
            }
            return;
        }
        if last {
            break;
        }
    }
    // Let the final frames (such as `end`) drain before the socket closes.
    let _ = tokio::time::timeout(Duration::from_secs(1), shutdown(&socket)).await;
}

/// Writes a whole answer and closes the connection after it.
async fn answer_and_close(mut socket: TcpStream, answer: Bytes) {
    let _ = socket.write_all(&answer).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), shutdown(&socket)).await;
}

/// Writes every frame (vectored, several per system call), arming `send_timeout` only
/// while the socket is full. Leaves `frames` empty.
async fn write_frames(
    socket: &TcpStream,
    frames: &mut Vec<Bytes>,
    send_timeout: Duration,
    access: &mut Access,
) -> io::Result<()> {
    let mut done = 0;
    while done < frames.len() {
        match try_write_frames(socket, &mut frames[done..]) {
            Ok((whole, bytes)) => {
                done += whole;
                access.wrote(bytes);
            }
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

/// One vectored write; returns how many frames were written whole and how many bytes,
/// and trims a frame written in part. Kept out of the async function so its slice array is not part of
/// every connection task's state.
fn try_write_frames(socket: &TcpStream, frames: &mut [Bytes]) -> io::Result<(usize, usize)> {
    const BATCH: usize = 32;
    let mut slices = [IoSlice::new(&[]); BATCH];
    let count = frames.len().min(BATCH);
    for (slice, frame) in slices.iter_mut().zip(frames.iter()) {
        *slice = IoSlice::new(frame);
    }
    // `send`/`sendmsg` rather than `write`/`writev`: the socket calls skip the VFS
    // layer, which showed as ~10% of the gateway's CPU at fan-out.
    let sock = socket2::SockRef::from(socket);
    let written = socket.try_io(Interest::WRITABLE, || match count {
        1 => sock.send(&frames[0]),
        _ => sock.send_vectored(&slices[..count]),
    })?;
    if written == 0 {
        return Err(io::ErrorKind::WriteZero.into());
    }
    let mut n = written;
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
    Ok((whole, written))
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
pub(super) fn serve_size(
    socket: TcpStream,
    request: Box<StreamRequest>,
    state: &AppState,
) -> usize {
    std::mem::size_of_val(&serve(socket, request, state))
}
