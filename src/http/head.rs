//! Reading a request head off a raw socket, for the paths that answer without hyper
//! (the event-stream fast path and refusals): parsing with `httparse`, header lookup,
//! content negotiation, and the CORS headers of a raw answer.

use crate::config::ServerConfig;

use super::routes::{allowed_origin, negotiate, varies_by_origin};

/// Request heads larger than this are left to hyper, which answers them properly.
pub(super) const MAX_HEAD: usize = 8 * 1024;

/// Headers read on the raw paths; a head with more goes to hyper.
const MAX_HEADERS: usize = 32;

/// What parsing the bytes read so far gave.
pub(super) enum Parsed<R> {
    /// The head is not complete yet.
    Partial,
    /// Not parseable here (malformed, or more headers than [`MAX_HEADERS`]).
    Invalid,
    /// The head, seen through `f`; `usize` is the head's length in bytes.
    Complete(R),
}

/// Parses `buf` as a request head and hands a complete one to `f` with its length.
pub(super) fn parse<R>(
    buf: &[u8],
    f: impl FnOnce(&httparse::Request<'_, '_>, usize) -> R,
) -> Parsed<R> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Ok(httparse::Status::Complete(n)) => Parsed::Complete(f(&req, n)),
        Err(_) => Parsed::Invalid,
    }
}

/// The value of header `name` (case-insensitive), if present.
pub(super) fn header<'b>(req: &httparse::Request<'_, 'b>, name: &str) -> Option<&'b [u8]> {
    req.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// Whether a request with this `Accept` wants the event stream rather than a page.
pub(super) fn wants_event_stream(accept: Option<&[u8]>) -> bool {
    let accept = accept.and_then(|a| std::str::from_utf8(a).ok());
    negotiate(accept, &["text/event-stream", "text/html"]) == Some(0)
}

/// The CORS headers of a raw answer to a request from `origin`.
pub(super) fn cors(server: &ServerConfig, origin: Option<&[u8]>) -> Vec<(&'static str, String)> {
    let origin = origin.and_then(|o| std::str::from_utf8(o).ok());
    let mut out = Vec::new();
    if let Some(allowed) = allowed_origin(server, origin).filter(|o| !o.contains(['\r', '\n'])) {
        if server.cors_credentials {
            out.push(("access-control-allow-credentials", "true".to_string()));
        }
        out.push(("access-control-allow-origin", allowed));
    }
    if varies_by_origin(server) {
        out.push(("vary", "origin".to_string()));
    }
    out
}
