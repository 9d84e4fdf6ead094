//! The wire contract browsers see, in one place: event names, snapshot and end
//! reasons, the `status` and `end` data, the data of snapshot and update events, the
//! stream response headers, `Last-Event-ID` parsing, and the names the gateway
//! reserves. Both responders (the fast path and the hyper/axum path) and the config
//! validation use it, so they cannot drift apart.

use std::fmt::Write as _;

use bytes::Bytes;

use crate::sse;

/// The event that replaces a client's state.
pub const SNAPSHOT: &str = "snapshot";
/// The event that reports the upstream's health.
pub const STATUS: &str = "status";
/// The event sent just before the gateway closes a stream on purpose.
pub const END: &str = "end";
/// The default name of update events.
pub const DEFAULT_EVENT: &str = "update";
/// Names a stream cannot use for its update events.
pub const RESERVED_EVENTS: [&str; 3] = [SNAPSHOT, STATUS, END];
/// Paths the gateway serves itself.
pub const RESERVED_PATHS: [&str; 5] = ["/", "/metrics", "/healthz", "/livez", "/readyz"];
/// The gateway's own routes (its scripts, pages and the like) live under this prefix.
pub const OWN_PREFIX: &str = "/_tailgate";

/// Whether `path` is the gateway's: one of [`RESERVED_PATHS`], [`OWN_PREFIX`] or under it.
pub fn is_reserved_path(path: &str) -> bool {
    RESERVED_PATHS.contains(&path)
        || path
            .strip_prefix(OWN_PREFIX)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The headers of every stream response, on both response paths.
pub const STREAM_HEADERS: [(&str, &str); 3] = [
    ("content-type", "text/event-stream"),
    ("cache-control", "no-cache"),
    ("x-accel-buffering", "no"),
];

/// How much of an upstream error clients see in `status` events. Logs and `GET /`
/// always keep the details.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientErrors {
    /// The error text as the upstream gave it (SQLSTATE, object names).
    Full,
    /// A fixed text, for deployments where the errors are sensitive.
    Generic,
}

/// The error text clients see under [`ClientErrors::Generic`].
pub const GENERIC_ERROR: &str = "the upstream is unavailable";

/// Longest `Last-Event-ID` accepted as a candidate id; longer ones are hostile.
const MAX_ID_LEN: usize = 20;

/// Why a client is told to replace its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Initial,
    ResumeGap,
    Lagged,
    UpstreamReset,
    ConfigChanged,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Initial => "initial",
            Reason::ResumeGap => "resume-gap",
            Reason::Lagged => "lagged",
            Reason::UpstreamReset => "upstream-reset",
            Reason::ConfigChanged => "config-changed",
        }
    }
}

/// Why a stream ends on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The stream left the config.
    Removed,
    /// The gateway is stopping.
    Shutdown,
    /// The gateway is at a connection limit: come back after the `retry` delay.
    Overloaded,
    /// The client's token expired: reconnect with a fresh one.
    TokenExpired,
    /// The rules no longer allow this client the stream.
    Forbidden,
    /// A scoped stream's shape changed on reload (its template's columns, filters,
    /// columns or scope): reconnect, resuming, to the new one.
    Reconfigured,
    /// A scoped stream cannot take clients yet (its relation is not described, or
    /// lacks a column it needs): come back after the `retry` delay.
    Unavailable,
}

impl EndReason {
    pub const ALL: [EndReason; 7] = [
        EndReason::Removed,
        EndReason::Shutdown,
        EndReason::Overloaded,
        EndReason::TokenExpired,
        EndReason::Forbidden,
        EndReason::Reconfigured,
        EndReason::Unavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Removed => "removed",
            EndReason::Shutdown => "shutdown",
            EndReason::Overloaded => "overloaded",
            EndReason::TokenExpired => "token-expired",
            EndReason::Forbidden => "forbidden",
            EndReason::Reconfigured => "reconfigured",
            EndReason::Unavailable => "unavailable",
        }
    }

    /// The `end` event for this reason.
    pub fn frame(self) -> Bytes {
        sse::event(END, None, &format!("{{\"reason\":\"{}\"}}", self.as_str()))
    }
}

/// Where a new client wants to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// No `Last-Event-ID`: start with a snapshot.
    Fresh,
    /// A well-formed id: replay after it if the history still covers it.
    After(u64),
    /// An id that cannot be ours: snapshot with `resume-gap`.
    Invalid,
}

/// Upstream health as clients see it in `status` events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Streaming,
    Reconnecting { error: String },
}

impl Health {
    /// A new stream's health, before its first connection.
    pub fn connecting() -> Health {
        Health::Reconnecting {
            error: "connecting".into(),
        }
    }
}

/// The `status` event for `health`, with the error text `errors` allows.
pub fn status_frame(health: &Health, errors: ClientErrors) -> Bytes {
    let data = match health {
        Health::Streaming => "{\"upstream\":\"streaming\",\"error\":null}".to_string(),
        Health::Reconnecting { error } => serde_json::json!({
            "upstream": "reconnecting",
            "error": match errors {
                ClientErrors::Full => error.as_str(),
                ClientErrors::Generic => GENERIC_ERROR,
            },
        })
        .to_string(),
    };
    sse::event(STATUS, None, &data)
}

/// A `status` event for a problem that does not stop the stream: the upstream is
/// still `streaming`.
pub fn warning_frame(error: &str, errors: ClientErrors) -> Bytes {
    let error = match errors {
        ClientErrors::Full => error,
        ClientErrors::Generic => "the upstream sent data the gateway could not serve",
    };
    sse::event(
        STATUS,
        None,
        &serde_json::json!({"upstream": "streaming", "error": error}).to_string(),
    )
}

/// The data of `snapshot` and update events:
/// `{"ts":"<ts>","reason":"<reason>","changes":[...]}`, `reason` only in snapshots.
/// Rows and keys are already JSON, so they are copied in as they are.
pub struct ChangesJson {
    out: String,
    empty: bool,
}

impl ChangesJson {
    pub fn new(ts: u64, reason: Option<Reason>, changes: usize) -> Self {
        let mut out = String::with_capacity(64 + changes * 48);
        let _ = write!(out, "{{\"ts\":\"{ts}\",");
        if let Some(reason) = reason {
            out.push_str("\"reason\":\"");
            out.push_str(reason.as_str());
            out.push_str("\",");
        }
        out.push_str("\"changes\":[");
        ChangesJson { out, empty: true }
    }

    /// The buffer, with a separator if a change came before.
    fn next(&mut self) -> &mut String {
        if !std::mem::take(&mut self.empty) {
            self.out.push(',');
        }
        &mut self.out
    }

    pub fn diff(&mut self, row: &str, diff: i64) {
        let out = self.next();
        let _ = write!(out, "{{\"diff\":{diff},\"row\":");
        out.push_str(row);
        out.push('}');
    }

    pub fn upsert(&mut self, key: &str, row: Option<&str>) {
        let out = self.next();
        out.push_str("{\"key\":");
        out.push_str(key);
        out.push_str(",\"row\":");
        out.push_str(row.unwrap_or("null"));
        out.push('}');
    }

    pub fn finish(mut self) -> String {
        self.out.push_str("]}");
        self.out
    }
}

/// The resume point from the raw `Last-Event-ID` value and the query string.
pub fn resume(header: Option<&[u8]>, query: Option<&str>) -> Resume {
    let from_query = || query.and_then(|q| query_bytes(q, "last_event_id"));
    match header.map(<[u8]>::to_vec).or_else(from_query) {
        None => Resume::Fresh,
        Some(id) if id.is_empty() => Resume::Fresh,
        Some(id) => parse_id(&id),
    }
}

/// The first value of query parameter `name`, percent-decoded, as bytes.
fn query_bytes(query: &str, name: &str) -> Option<Vec<u8>> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v, true))
    })
}

/// The first value of query parameter `name`, percent-decoded; `None` when it is
/// absent, empty or not UTF-8.
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<std::borrow::Cow<'a, str>> {
    let bytes = query_bytes(query, name)?;
    String::from_utf8(bytes)
        .ok()
        .filter(|v| !v.is_empty())
        .map(std::borrow::Cow::Owned)
}

fn parse_id(id: &[u8]) -> Resume {
    if id.len() > MAX_ID_LEN || !id.iter().all(u8::is_ascii_digit) {
        return Resume::Invalid;
    }
    std::str::from_utf8(id)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map_or(Resume::Invalid, Resume::After)
}

/// `%XX` escapes decoded (a malformed one is kept as it is), and in a query
/// (`plus_is_space`) `+` read as a space.
pub fn percent_decode(s: &str, plus_is_space: bool) -> Vec<u8> {
    let hex = |c: u8| (c as char).to_digit(16);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let decoded = match (b[i], b.get(i + 1), b.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) => hex(h).zip(hex(l)).map(|(h, l)| (h * 16 + l) as u8),
            _ => None,
        };
        match decoded {
            Some(v) => {
                out.push(v);
                i += 3;
            }
            None => {
                out.push(if plus_is_space && b[i] == b'+' {
                    b' '
                } else {
                    b[i]
                });
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateways_own_paths_are_reserved() {
        for path in [
            "/",
            "/metrics",
            "/livez",
            "/_tailgate",
            "/_tailgate/x",
            "/_tailgate/a/b",
        ] {
            assert!(is_reserved_path(path), "{path}");
        }
        for path in ["/_tailgates", "/a/_tailgate", "/sensors", "/_tailgate_x"] {
            assert!(!is_reserved_path(path), "{path}");
        }
    }

    #[test]
    fn ids_are_parsed_strictly() {
        assert_eq!(parse_id(b"1700000000000"), Resume::After(1_700_000_000_000));
        assert_eq!(parse_id(b"18446744073709551615"), Resume::After(u64::MAX));
        for bad in [
            &b"18446744073709551616"[..],
            b"12a",
            b"-1",
            b"1\x00",
            b" 1",
            b"999999999999999999999999",
        ] {
            assert_eq!(parse_id(bad), Resume::Invalid, "{bad:?}");
        }
    }
}
