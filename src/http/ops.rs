//! The operator's routes: liveness, readiness, the stream listing (full, or public
//! when an admin listener has the full one) and the metrics.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::routes::{negotiate, AppState};
use crate::config::{ClientErrors, Source};
use crate::hub::{Hub, NotReady};
use crate::wire::Health;

/// `/livez` (and `/healthz`): the process is up.
pub(super) async fn live() -> &'static str {
    "ok\n"
}

/// `/readyz`: 200 once every stream has its first snapshot and a streaming upstream,
/// else 503 naming the streams that are not and why.
pub(super) async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let routes = state.routes.load();
    // Without an admin listener this answer is public: it says no more about an
    // upstream error than the streams' own `status` events do.
    let detail = state.server.load().admin_listen.is_some()
        || state.server.load().client_errors == ClientErrors::Full;
    let not_ready: Vec<serde_json::Value> = routes
        .iter()
        .filter_map(|(path, route)| match route.hub.readiness() {
            Ok(()) => None,
            Err(NotReady::NoSnapshot) => Some(json!({"stream": path, "reason": "no snapshot yet"})),
            Err(NotReady::Upstream(error)) => Some(json!({
                "stream": path,
                "reason": "upstream reconnecting",
                "error": if detail { error.as_str() } else { crate::wire::GENERIC_ERROR },
            })),
        })
        .collect();
    let status = if not_ready.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "ready": not_ready.is_empty(),
        "streams": routes.len(),
        "not_ready": not_ready,
    });
    (
        status,
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(body),
    )
        .into_response()
}

/// `/` on the public listener when an admin listener serves the full listing: the
/// streams a client may open, without the operator's details.
pub(super) async fn public_listing(State(state): State<Arc<AppState>>) -> Response {
    let routes = state.routes.load();
    let streams: Vec<serde_json::Value> = routes
        .values()
        .map(|r| {
            json!({
                "path": r.config.path.as_str(),
                "event": r.config.event,
                "key": r.config.key,
            })
        })
        .collect();
    (
        [(header::VARY, "accept")],
        axum::Json(json!({ "streams": streams })),
    )
        .into_response()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The stream listing: JSON, or a small page when the client asks for HTML.
pub(super) async fn listing(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
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
                "clients": r.hub.stats.clients.load(Ordering::Relaxed),
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
            "last_reload_successful": metrics.reload_successful.load(Ordering::Relaxed),
            "last_reload_error": metrics.last_reload_error(),
        },
    });
    let accept = headers.get(header::ACCEPT).and_then(|a| a.to_str().ok());
    let vary = [(header::VARY, "accept")];
    match negotiate(accept, &["application/json", "text/html"]) {
        Some(0) => return (vary, axum::Json(body)).into_response(),
        Some(_) => {}
        None => {
            return (
                StatusCode::NOT_ACCEPTABLE,
                vary,
                "the listing is application/json or text/html\n",
            )
                .into_response()
        }
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
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::VARY, "accept"),
        ],
        page,
    )
        .into_response()
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `/metrics`: the Prometheus text exposition.
pub(super) async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let routes = state.routes.load();
    let streams: Vec<(&str, &Hub)> = routes
        .iter()
        .map(|(path, route)| (path.as_str(), route.hub.as_ref()))
        .collect();
    let text = state.metrics.render(&streams);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
