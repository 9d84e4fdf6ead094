//! `GET /_tailgate/mux?s=<path>&s=<path>...`: several streams on one connection, at
//! one timestamp (see [`crate::mux`]).
//!
//! Each `s` is a stream's path as a client would open it alone (a template's values
//! and its filters included: `s=/orders/42?status=open`, percent-encoded), and each is
//! admitted as if opened alone: an unknown one is `404`, and the first refusal
//! (`400`, `401`, `403`, the overload answer) is the whole request's answer.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use super::access::{Access, End};
use super::conn::ConnInfo;
use super::routes::{overloaded, refused, refused_scope, resume_from, stream_response, AppState};
use super::{admission, limits, scope};
use crate::mux::{Mux, Part};
use crate::telemetry::Refusal;
use crate::wire::{self, EndReason, Resume};

/// The mux's path.
pub(super) const PATH: &str = "/_tailgate/mux";

/// A query parameter at fault: answered `400` with its name.
#[derive(Debug, PartialEq, Eq)]
struct Bad {
    parameter: String,
    error: String,
}

fn bad(parameter: &str, error: &str) -> Bad {
    Bad {
        parameter: parameter.to_string(),
        error: error.to_string(),
    }
}

impl IntoResponse for Bad {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": format!("parameter {:?} {}", self.parameter, self.error),
            "parameter": self.parameter,
        });
        (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
    }
}

/// The streams a mux request names, in order.
fn streams(query: &str, token_params: &[&str], max: usize) -> Result<Vec<String>, Bad> {
    let mut out: Vec<String> = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let name = String::from_utf8(wire::percent_decode(k, true))
            .map_err(|_| bad("?", "is not UTF-8"))?;
        if name == "last_event_id" || token_params.contains(&name.as_str()) {
            continue;
        }
        if name != "s" {
            let shown: String = name.chars().take(64).collect();
            return Err(bad(&shown, "is not a parameter of the mux (only `s`)"));
        }
        let value = String::from_utf8(wire::percent_decode(v, true))
            .map_err(|_| bad("s", "is not UTF-8"))?;
        if value.is_empty() {
            return Err(bad("s", "is empty"));
        }
        if out.contains(&value) {
            return Err(bad("s", "names one stream twice"));
        }
        out.push(value);
        if out.len() > max {
            return Err(bad("s", &format!("names more than {max} streams")));
        }
    }
    if out.is_empty() {
        return Err(bad("s", "names no stream"));
    }
    Ok(out)
}

pub(super) async fn serve(
    State(state): State<Arc<AppState>>,
    Extension(conn): Extension<Arc<ConnInfo>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let server = state.server.load_full();
    let auth = state.auth.load_full();
    let token_params: Vec<&str> = auth.query_params().collect();
    let labels = match streams(
        uri.query().unwrap_or(""),
        &token_params,
        server.mux_max_streams,
    ) {
        Ok(labels) => labels,
        Err(bad) => return bad.into_response(),
    };
    let client = limits::client_ip(
        conn.peer.ip(),
        headers.get("x-forwarded-for").map(HeaderValue::as_bytes),
        &server.trusted_proxies,
    );
    let target = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    let mut access = Access::new(
        Arc::from(PATH),
        target,
        client,
        &auth,
        Arc::clone(&state.metrics),
    );
    access.watch(Arc::clone(&conn));
    let token = auth.token(
        |name| headers.get(name).map(HeaderValue::as_bytes),
        uri.query(),
    );
    let resume = resume_from(&headers, &uri);
    let resumed_at = match resume {
        Resume::After(id) => Some(id),
        _ => None,
    };
    let routes = state.routes.load_full();
    let mut credential = None;
    let mut opened = Vec::with_capacity(labels.len());
    for label in labels {
        let (path, query) = match label.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (label.as_str(), None),
        };
        let Some(found) = routes.find(path) else {
            access.set_status(404);
            access.end(End::BadRequest);
            let body = serde_json::json!({ "error": "no such stream", "stream": label });
            return (StatusCode::NOT_FOUND, axum::Json(body)).into_response();
        };
        let admitted = match admission::admit(&state, &found.route, token.as_deref()).await {
            Ok(admitted) => admitted,
            Err(denial) => {
                access.set_status(denial.status());
                access.end(End::Denied);
                return refused(denial);
            }
        };
        let checked = if method == Method::HEAD {
            scope::check(&found, query, admitted.as_deref(), &auth).map(|()| None)
        } else {
            scope::channel(&found, query, admitted.as_deref(), &auth).map(Some)
        };
        let hub = match checked {
            Ok(hub) => hub,
            Err(refusal) => {
                access.end(refusal.note(&found.route, &state.metrics));
                let access = (method != Method::HEAD).then_some(access);
                return refused_scope(&server, &headers, refusal, access);
            }
        };
        credential = credential.or(admitted);
        opened.push((Arc::<str>::from(label.as_str()), found.route, hub));
    }
    if method == Method::HEAD {
        return stream_response(Body::empty());
    }
    access.identify(credential.as_deref());
    let Some(slot) = state.per_ip.acquire(client, server.max_connections_per_ip) else {
        state.metrics.refused(Refusal::MaxConnectionsPerIp);
        access.end(End::Told(EndReason::Overloaded));
        return overloaded(&server, &headers, Some(access), EndReason::Overloaded);
    };
    access.hold(slot);
    // Configured paths, to check a part again when the rules change.
    let configured: Vec<(Arc<str>, Arc<str>)> = opened
        .iter()
        .map(|(label, route, _)| (Arc::clone(label), Arc::clone(&route.path)))
        .collect();
    let parts = opened
        .into_iter()
        .filter_map(|(label, route, hub)| {
            let hub = hub?;
            let sub = hub.subscribe(resume);
            Some(Part::new(
                label,
                sub,
                route.config.client_queue,
                resumed_at.is_some(),
            ))
        })
        .collect();
    let mut mux = Mux::new(parts, resumed_at);
    drop(routes);
    let deadline = admission::deadline(&server, credential.as_deref());
    let events = async_stream::stream! {
        let mut frames = Vec::new();
        let expiry = admission::passed(deadline);
        tokio::pin!(expiry);
        let mut last = false;
        loop {
            tokio::select! {
                more = mux.next(&mut frames) => {
                    for label in mux.take_rechecks() {
                        let path = configured.iter().find(|(l, _)| *l == label).map(|(_, p)| Arc::clone(p));
                        let admitted = match path {
                            Some(path) => admission::still_admitted(&state, &path, credential.as_deref()).await,
                            None => true,
                        };
                        if !admitted {
                            mux.end_part(&label, EndReason::Forbidden, &mut frames);
                        }
                    }
                    if !more {
                        if let Some(reason) = mux.ended_with() {
                            access.end(End::Told(reason));
                        }
                        last = true;
                    }
                },
                _ = &mut expiry => match admission::reached(deadline, &mut access) {
                    Some(end) => {
                        frames.push(end);
                        last = true;
                    }
                    None => break,
                },
            }
            access.queued(&frames);
            for frame in frames.drain(..) {
                access.wrote(frame.len());
                yield Ok::<Bytes, std::convert::Infallible>(frame);
            }
            if last {
                break;
            }
        }
    };
    stream_response(Body::from_stream(events))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_names_streams_once_each() {
        let ok = |q: &str| streams(q, &["access_token"], 3).map_err(|b| b.into_response().status());
        assert_eq!(
            ok("s=/a&s=%2Forders%2F42%3Fstatus%3Dopen&last_event_id=5&access_token=x"),
            Ok(vec!["/a".to_string(), "/orders/42?status=open".to_string()])
        );
        // A raw `?` and `=` inside a value are fine; only `&` must be encoded.
        assert_eq!(
            ok("s=/orders/42?status=open"),
            Ok(vec!["/orders/42?status=open".to_string()])
        );
        for bad in [
            "",
            "s=",
            "s=/a&s=/a",
            "s=/a&x=1",
            "s=/a&s=/b&s=/c&s=/d",
            "s=%FF",
        ] {
            assert_eq!(ok(bad), Err(StatusCode::BAD_REQUEST), "{bad}");
        }
    }
}
