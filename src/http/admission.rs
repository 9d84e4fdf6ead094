//! Access control as both responders apply it: admitting a request to a stream (and
//! counting refusals), when an admitted connection must end (its token's expiry, or
//! `max_lifetime`), the answer to a refused request, and checking an open connection
//! again when the rules change.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::routes::{jittered, AppState};
use crate::auth::{Credential, Denial};
use crate::config::ServerConfig;
use crate::route::Route;
use crate::telemetry::StreamEnd;
use crate::wire::EndReason;

/// Whether a request with `token` may open `route`; a refusal is counted on the
/// stream.
pub(super) async fn admit(
    state: &AppState,
    route: &Route,
    token: Option<&str>,
) -> Result<Option<Arc<Credential>>, Denial> {
    let auth = state.auth.load_full();
    let admitted = auth.admit(&route.config, token).await;
    if let Err(denial) = &admitted {
        route.target.denied(denial.reason());
    }
    admitted
}

/// When an admitted connection ends on its own, and why: `max_lifetime` (jittered),
/// or its token's expiry, whichever comes first.
pub(super) fn deadline(
    server: &ServerConfig,
    credential: Option<&Credential>,
) -> Option<(Duration, StreamEnd)> {
    let lifetime = server
        .max_lifetime
        .map(|l| (jittered(l), StreamEnd::Lifetime));
    let expiry = credential.map(|c| (c.remaining(), StreamEnd::Told(EndReason::TokenExpired)));
    match (lifetime, expiry) {
        (Some(l), Some(e)) => Some(if e.0 <= l.0 { e } else { l }),
        (l, e) => l.or(e),
    }
}

/// Waits until a connection's [`deadline`] passes; forever without one.
pub(super) async fn passed(deadline: Option<(Duration, StreamEnd)>) {
    match deadline {
        Some((after, _)) => tokio::time::sleep(after).await,
        None => std::future::pending().await,
    }
}

/// Records why a connection's deadline ended it, and returns the `end` frame to send
/// last, or `None` when the connection just closes (`max_lifetime`: the browser
/// reconnects and resumes).
pub(super) fn reached(
    deadline: Option<(Duration, StreamEnd)>,
    access: &mut super::access::Access,
) -> Option<Bytes> {
    let end = deadline.map_or(StreamEnd::Lifetime, |(_, end)| end);
    access.end(end);
    match end {
        StreamEnd::Told(reason) => Some(reason.frame()),
        _ => None,
    }
}

/// Whether an open connection to the stream at `path` is still admitted under the
/// current rules and keys. A stream no longer routed ends by itself (`removed`).
pub(super) async fn still_admitted(
    state: &AppState,
    path: &str,
    credential: Option<&Credential>,
) -> bool {
    let Some(route) = state.routes.load().get(path).cloned() else {
        return true;
    };
    let auth = state.auth.load_full();
    match auth.recheck(&route.config, credential).await {
        Ok(()) => true,
        Err(denial) => {
            route.target.denied(denial.reason());
            false
        }
    }
}

/// A refused request's whole answer for a raw socket: the status, the challenge of a
/// `401`, a short JSON body, and the CORS headers.
pub(super) fn refusal(denial: Denial, cors: &[(&str, String)]) -> Bytes {
    raw_json(denial.status(), denial.body(), denial.challenge(), cors)
}

/// A short JSON answer for a raw socket, closing the connection after it.
pub(super) fn raw_json(
    status: u16,
    body: &str,
    challenge: Option<&str>,
    cors: &[(&str, String)],
) -> Bytes {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncache-control: no-store\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    if let Some(challenge) = challenge {
        out.push_str("www-authenticate: ");
        out.push_str(challenge);
        out.push_str("\r\n");
    }
    for (name, value) in cors {
        out.push_str(name);
        out.push_str(": ");
        out.push_str(value);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.push_str(body);
    Bytes::from(out)
}
