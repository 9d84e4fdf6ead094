//! The access log: one line per finished stream connection, on both response paths,
//! with the configured and requested path, status, client address, duration, bytes,
//! events and why it ended; and the per-reason counts in the metrics. Query-string
//! values that may be secrets are redacted wherever a URL is logged.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::conn::ConnInfo;
use super::limits::IpSlot;
use crate::auth::{Auth, Credential};
use crate::telemetry::Metrics;
pub use crate::telemetry::StreamEnd as End;

/// Query parameters whose values are never logged: tokens and the like.
const SECRET_PARAMS: [&str; 8] = [
    "access_token",
    "token",
    "jwt",
    "auth",
    "authorization",
    "password",
    "secret",
    "api_key",
];

/// `target` (a request's path and query) with the values of secret-looking query
/// parameters, and of the parameters `[auth]` reads tokens from, replaced by
/// `REDACTED`.
pub fn redact<'t>(target: &'t str, auth: &Auth) -> Cow<'t, str> {
    let Some((path, query)) = target.split_once('?') else {
        return Cow::Borrowed(target);
    };
    let secret = |name: &str| {
        let lower = name.to_ascii_lowercase();
        SECRET_PARAMS.contains(&lower.as_str()) || auth.query_params().any(|p| p == name)
    };
    if !query
        .split('&')
        .any(|pair| secret(pair.split_once('=').map_or(pair, |(k, _)| k)))
    {
        return Cow::Borrowed(target);
    }
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) if secret(k) => format!("{k}=REDACTED"),
            _ => pair.to_string(),
        })
        .collect();
    Cow::Owned(format!("{path}?{}", query.join("&")))
}

/// One stream connection's record, logged when it is dropped.
pub struct Access {
    started: Instant,
    /// The configured path the request matched.
    route: Arc<str>,
    /// The path and query as requested, redacted.
    requested: Box<str>,
    client: IpAddr,
    status: u16,
    bytes: u64,
    events: u64,
    /// Until known otherwise, a stream ends because its client left.
    end: End,
    metrics: Arc<Metrics>,
    /// The client address's slot, held as long as the stream.
    slot: Option<IpSlot>,
    /// On hyper's path, the connection, to tell a watchdog cut from a client leaving.
    conn: Option<Arc<ConnInfo>>,
    /// The token's `sub`, when the client has a token.
    sub: Option<Box<str>>,
}

impl Access {
    pub fn new(
        route: Arc<str>,
        requested: &str,
        client: IpAddr,
        auth: &Auth,
        metrics: Arc<Metrics>,
    ) -> Self {
        Access {
            started: Instant::now(),
            route,
            requested: redact(requested, auth).into(),
            client,
            status: 200,
            bytes: 0,
            events: 0,
            end: End::ClientGone,
            metrics,
            slot: None,
            conn: None,
            sub: None,
        }
    }

    /// Watches `conn`, so a connection the watchdog cut ends as `send-timeout`.
    pub fn watch(&mut self, conn: Arc<ConnInfo>) {
        self.conn = Some(conn);
    }

    /// The configured path of the stream.
    pub fn route(&self) -> &str {
        &self.route
    }

    /// Records who the client is, from its token's `sub`.
    pub fn identify(&mut self, credential: Option<&Credential>) {
        self.sub = credential.and_then(|c| c.subject.clone()).map(Into::into);
    }

    /// Keeps the client address's slot until the stream is over.
    pub fn hold(&mut self, slot: IpSlot) {
        self.slot = Some(slot);
    }

    pub fn set_status(&mut self, status: u16) {
        self.status = status;
    }

    pub fn end(&mut self, end: End) {
        self.end = end;
    }

    /// Counts the events among frames handed to the client.
    pub fn queued(&mut self, frames: &[Bytes]) {
        self.events += frames.iter().filter(|f| f.starts_with(b"event:")).count() as u64;
    }

    /// Counts bytes written to the client.
    pub fn wrote(&mut self, bytes: usize) {
        self.bytes += bytes as u64;
    }
}

impl Drop for Access {
    fn drop(&mut self) {
        if self.end == End::ClientGone && self.conn.as_ref().is_some_and(|c| c.timed_out()) {
            self.end = End::SendTimeout;
        }
        self.metrics.stream_ends[self.end.index()].fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            target: "tailgate::access",
            stream = %self.route,
            path = %self.requested,
            status = self.status,
            client = %self.client,
            duration_ms = self.started.elapsed().as_millis() as u64,
            bytes = self.bytes,
            events = self.events,
            end = self.end.as_str(),
            sub = self.sub.as_deref(),
            "Stream closed."
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_in_query_strings_are_redacted() {
        let none = Auth::none();
        let redact = |t| redact(t, &none).into_owned();
        assert_eq!(redact("/a"), "/a");
        assert_eq!(redact("/a?status=open"), "/a?status=open");
        assert_eq!(
            redact("/a?status=open&access_token=eyJhbGc.x.y&last_event_id=5"),
            "/a?status=open&access_token=REDACTED&last_event_id=5"
        );
        assert_eq!(redact("/a?TOKEN=abc"), "/a?TOKEN=REDACTED");
        assert_eq!(redact("/a?token"), "/a?token");
    }
}
