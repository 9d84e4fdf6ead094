//! The operator's routes: liveness, readiness, the stream listing (full, or public
//! when an admin listener has the full one) and the metrics.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::pages;
use super::routes::{negotiate, AppState};
use crate::config::{AuthMode, ClientErrors, Source};
use crate::feed::Target;
use crate::hub::NotReady;
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
        .filter_map(|(path, route)| match route.target.readiness() {
            Ok(()) => None,
            Err(NotReady::NoSnapshot(error)) => Some(json!({
                "stream": path,
                "reason": "no snapshot yet",
                "error": error.map(|e| if detail { e } else { crate::wire::GENERIC_ERROR.to_string() }),
            })),
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

/// Whom a listing is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Audience {
    /// The admin listener: everything.
    Operator,
    /// The public listener: with access control on, only the streams the caller may
    /// open, and not the config's state; `full` without an admin listener, else only
    /// what a client needs (path, event name, key).
    Public { full: bool },
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The stream listing: JSON, or for a browser the index page, which renders this JSON.
pub(super) async fn listing(
    state: Arc<AppState>,
    headers: HeaderMap,
    uri: Uri,
    audience: Audience,
) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|a| a.to_str().ok());
    let vary = [(header::VARY, "accept")];
    match negotiate(accept, &["application/json", "text/html"]) {
        Some(0) => {}
        Some(_) => return pages::index(&headers),
        None => {
            return (
                StatusCode::NOT_ACCEPTABLE,
                vary,
                "the listing is application/json or text/html\n",
            )
                .into_response()
        }
    }
    let routes = state.routes.load();
    let auth = state.auth.load_full();
    let guarded = audience != Audience::Operator && auth.mode() == AuthMode::Jwt;
    let credential = if guarded {
        let token = auth.token(|name| headers.get(name).map(|v| v.as_bytes()), uri.query());
        match token {
            Some(token) => auth.verify(&token).await.ok(),
            None => None,
        }
    } else {
        None
    };
    let streams: Vec<serde_json::Value> = routes
        .values()
        .filter(|r| !guarded || auth.allows(&r.config, credential.as_ref()))
        .map(|r| {
            let c = &r.config;
            if audience == (Audience::Public { full: false }) {
                return json!({
                    "path": c.path.as_str(),
                    "event": c.event,
                    "key": c.key,
                    "params": c.params,
                    "filters": c.filters,
                    "columns": c.columns,
                });
            }
            let figures = r.target.figures();
            let (view, query) = match &c.source {
                Source::View(v) => (Some(v.as_str()), None),
                Source::Query(q) => (None, Some(q.as_str())),
            };
            let (upstream, error) = match r.target.health() {
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
                "public": c.public,
                "params": c.params,
                "filters": c.filters,
                "columns": c.columns,
                "scope": c.scope.as_ref().map(|s| json!({"column": s.column, "claim": s.claim})),
                "max_partitions": c.is_scoped().then_some(c.max_partitions),
                "channels": figures.channels,
                "clients": figures.clients,
                "ready": r.target.state_ts().is_some(),
                "ts": r.target.state_ts().map(|t| t.to_string()),
                "upstream": upstream,
                "error": error,
            })
        })
        .collect();
    let metrics = &state.metrics;
    let mut body = json!({ "streams": streams });
    if !guarded && audience != (Audience::Public { full: false }) {
        body["config"] = json!({
            "path": state.config_path.display().to_string(),
            "last_reload_successful": metrics.reload_successful.load(Ordering::Relaxed),
            "last_reload_error": metrics.last_reload_error(),
        });
    }
    (vary, axum::Json(body)).into_response()
}

/// `/metrics`: the Prometheus text exposition.
pub(super) async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let routes = state.routes.load();
    let streams: Vec<(&str, &Target)> = routes
        .iter()
        .map(|(path, route)| (path.as_str(), &route.target))
        .collect();
    let text = state.metrics.render(&streams);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
