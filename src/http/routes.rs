//! Request handlers: the stream listing at `/`, `/metrics`, `/healthz`, and every
//! configured stream through one dispatching handler that looks the path up in the
//! route table (swapped atomically on reload, since an axum `Router` is fixed once built).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::StreamExt;
use rand::Rng;
use serde_json::json;

use super::SharedRoutes;
use crate::config::{ServerConfig, Source};
use crate::hub::{Health, Resume};
use crate::telemetry::Metrics;

/// Longest `Last-Event-ID` accepted as a candidate id; longer ones are hostile.
const MAX_ID_LEN: usize = 20;

/// State shared by every handler.
pub struct AppState {
    pub routes: SharedRoutes,
    pub metrics: Arc<Metrics>,
    pub server: ArcSwap<ServerConfig>,
    pub config_path: PathBuf,
}

pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(stream)
        .with_state(state)
}

async fn stream(
    State(state): State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let Some(route) = state.routes.load().get(uri.path()).cloned() else {
        return (StatusCode::NOT_FOUND, "no such stream\n").into_response();
    };
    if method != Method::GET {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "GET")],
            "streams are read with GET\n",
        )
            .into_response();
    }
    let resume = resume_from(&headers, &uri);
    let server = state.server.load();
    let events = route.hub.subscribe(resume).into_stream();
    let body = match server.max_lifetime {
        // Ending the response (not the socket) lets the browser reconnect with its
        // Last-Event-ID and resume without a snapshot.
        Some(life) => Body::from_stream(events.take_until(tokio::time::sleep(jittered(life)))),
        None => Body::from_stream(events),
    };
    let mut response = Response::new(body);
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    cors(&server, &headers, h);
    response
}

/// The resume point: the `Last-Event-ID` header, else `?last_event_id=`.
fn resume_from(headers: &HeaderMap, uri: &Uri) -> Resume {
    resume(
        headers.get("last-event-id").map(HeaderValue::as_bytes),
        uri.query(),
    )
}

/// The resume point from the raw `Last-Event-ID` value and the query string.
pub(super) fn resume(header: Option<&[u8]>, query: Option<&str>) -> Resume {
    let from_query = || {
        query.and_then(|q| {
            q.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (k == "last_event_id").then(|| percent_decode(v))
            })
        })
    };
    match header.map(<[u8]>::to_vec).or_else(from_query) {
        None => Resume::Fresh,
        Some(id) if id.is_empty() => Resume::Fresh,
        Some(id) => parse_id(&id),
    }
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

fn percent_decode(s: &str) -> Vec<u8> {
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
                out.push(if b[i] == b'+' { b' ' } else { b[i] });
                i += 1;
            }
        }
    }
    out
}

fn cors(server: &ServerConfig, request: &HeaderMap, response: &mut HeaderMap) {
    let origin = request.get(header::ORIGIN).and_then(|o| o.to_str().ok());
    if let Some(value) = allowed_origin(server, origin).and_then(|a| HeaderValue::from_str(&a).ok())
    {
        response.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
        response.insert(header::VARY, HeaderValue::from_static("origin"));
    }
}

/// The `Access-Control-Allow-Origin` value for a request from `origin`, if any.
pub(super) fn allowed_origin(server: &ServerConfig, origin: Option<&str>) -> Option<String> {
    if server.cors_origins.iter().any(|o| o == "*") {
        return Some("*".to_string());
    }
    origin
        .filter(|o| server.cors_origins.iter().any(|c| c == o))
        .map(str::to_string)
}

/// A connection's life under `max_lifetime`: 80–100% of it, so reconnects spread out.
pub(super) fn jittered(life: Duration) -> Duration {
    life.mul_f64(rand::rng().random_range(0.8..=1.0))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The stream listing: JSON, or a small page when the client asks for HTML.
async fn index(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let routes = state.routes.load();
    let streams: Vec<serde_json::Value> = routes
        .values()
        .map(|r| {
            let c = &r.config;
            let (view, query) = match &c.source {
                Source::View(v) => (Some(v.as_str()), None),
                Source::Query(q) => (None, Some(q.as_str())),
            };
            let (upstream, error) = match r.hub.health() {
                Health::Streaming => ("streaming", None),
                Health::Reconnecting { error } => ("reconnecting", Some(error)),
            };
            json!({
                "path": c.path.as_str(),
                "view": view,
                "query": query,
                "event": c.event,
                "delay_ms": millis(c.delay),
                "retry_ms": millis(c.retry),
                "key": c.key,
                "cluster": c.cluster,
                "clients": r.hub.stats.clients.load(std::sync::atomic::Ordering::Relaxed),
                "ready": r.hub.is_ready(),
                "ts": r.hub.state_ts().map(|t| t.to_string()),
                "upstream": upstream,
                "error": error,
            })
        })
        .collect();
    let metrics = &state.metrics;
    let body = json!({
        "streams": streams,
        "config": {
            "path": state.config_path.display().to_string(),
            "last_reload_successful": metrics.reload_successful.load(std::sync::atomic::Ordering::Relaxed),
            "last_reload_error": metrics.last_reload_error(),
        },
    });
    let wants_html = headers
        .get(header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    if !wants_html {
        return axum::Json(body).into_response();
    }
    let mut page = String::from(
        "<!doctype html><meta charset=utf-8><title>tailgate</title>\
         <style>body{font:14px system-ui;margin:2em}td,th{padding:.3em .8em;text-align:left}</style>\
         <h1>tailgate streams</h1><table><tr><th>path</th><th>source</th><th>event</th><th>clients</th><th>upstream</th></tr>",
    );
    for s in &streams {
        let path = html_escape(s["path"].as_str().unwrap_or_default());
        let source = html_escape(
            s["view"]
                .as_str()
                .or_else(|| s["query"].as_str())
                .unwrap_or_default(),
        );
        page.push_str(&format!(
            "<tr><td><a href=\"{path}\">{path}</a></td><td><code>{source}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
            html_escape(s["event"].as_str().unwrap_or_default()),
            s["clients"],
            html_escape(s["upstream"].as_str().unwrap_or_default()),
        ));
    }
    page.push_str("</table>");
    if let Some(err) = metrics.last_reload_error() {
        page.push_str(&format!(
            "<h2>Last reload failed</h2><pre>{}</pre>",
            html_escape(&err)
        ));
    }
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], page).into_response()
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let text = state.metrics.render(&state.routes.load());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn header_wins_over_query() {
        let uri: Uri = "/s?last_event_id=5".parse().expect("uri");
        assert_eq!(resume_from(&HeaderMap::new(), &uri), Resume::After(5));
        let mut h = HeaderMap::new();
        h.insert("last-event-id", HeaderValue::from_static("7"));
        assert_eq!(resume_from(&h, &uri), Resume::After(7));
        let uri: Uri = "/s?last_event_id=%00".parse().expect("uri");
        assert_eq!(resume_from(&HeaderMap::new(), &uri), Resume::Invalid);
        let uri: Uri = "/s".parse().expect("uri");
        assert_eq!(resume_from(&HeaderMap::new(), &uri), Resume::Fresh);
    }
}
