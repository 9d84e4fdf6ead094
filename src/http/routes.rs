//! The hyper/axum side's routes: the router of each listener, what every request gets
//! (`Host`, bodies, CORS, preflight), and every configured stream through one
//! dispatching handler that looks the path up in the route table (swapped atomically
//! on reload, since an axum `Router` is fixed once built). The operator's routes are
//! in `ops`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use rand::Rng;

use super::access::{Access, End};
use super::conn::ConnInfo;
use super::limits::{self, PerIp};
use super::{admission, head, mux, ops, pages, scope, Listener};
use crate::auth::Auth;
use crate::config::ServerConfig;
use crate::route::SharedRoutes;
use crate::telemetry::{Metrics, Refusal};
use crate::wire::{self, resume, EndReason, Resume};

/// State shared by every handler.
pub struct AppState {
    pub routes: SharedRoutes,
    pub metrics: Arc<Metrics>,
    pub server: ArcSwap<ServerConfig>,
    pub config_path: PathBuf,
    /// Open streams per client address.
    pub per_ip: Arc<PerIp>,
    /// Access control; swapped when a reload changes `[auth]`.
    pub auth: ArcSwap<Auth>,
}

/// The routes of one listener. The operator's routes are on the public listener only
/// when there is no admin listener; the streams never are on the admin one.
pub(super) fn router(kind: Listener, state: Arc<AppState>) -> Router {
    let admin_elsewhere = state.server.load().admin_listen.is_some();
    let audience = match kind {
        Listener::Admin => ops::Audience::Operator,
        Listener::Public => ops::Audience::Public {
            full: !admin_elsewhere,
        },
    };
    let listing = move |State(state): State<Arc<AppState>>, headers: HeaderMap, uri: Uri| {
        ops::listing(state, headers, uri, audience)
    };
    // The pages' files on both listeners: the admin listener's index page needs them.
    let mut router = Router::new().route("/", get(listing)).merge(pages::files());
    if kind == Listener::Admin || !admin_elsewhere {
        router = router
            .route("/metrics", get(ops::metrics))
            .route("/livez", get(ops::live))
            .route("/healthz", get(ops::live))
            .route("/readyz", get(ops::ready));
    }
    let router = match kind {
        Listener::Public => router.route(mux::PATH, get(mux::serve)).fallback(stream),
        Listener::Admin => router,
    };
    router
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            conformance,
        ))
        .with_state(state)
}

/// What every request gets before and after its handler: HTTP/1.1 without `Host` is a
/// 400; a request with a body is a 413 (nothing here reads one, so it is never read);
/// `OPTIONS` is a CORS preflight; and every answer carries the CORS headers.
async fn conformance(
    State(state): State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let headers = request.headers();
    let mut response = if request.version() == axum::http::Version::HTTP_11
        && !headers.contains_key(header::HOST)
    {
        (StatusCode::BAD_REQUEST, "missing Host header\n").into_response()
    } else if headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
    {
        let mut r = (
            StatusCode::PAYLOAD_TOO_LARGE,
            "requests carry no body here\n",
        )
            .into_response();
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        r
    } else if request.method() == Method::OPTIONS {
        preflight(&state, request.uri().path())
    } else {
        let origin = headers.get(header::ORIGIN).cloned();
        let mut response = next.run(request).await;
        cors(
            &state.server.load(),
            origin.as_ref(),
            response.headers_mut(),
        );
        return response;
    };
    let origin = request.headers().get(header::ORIGIN);
    cors(&state.server.load(), origin, response.headers_mut());
    response
}

/// The answer to a CORS preflight: the methods and headers a stream request may use.
fn preflight(state: &AppState, path: &str) -> Response {
    let known = path == "/" || path == mux::PATH || state.routes.load().find(path).is_some();
    if !known {
        return (StatusCode::NOT_FOUND, "no such stream\n").into_response();
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    let h = response.headers_mut();
    h.insert(header::ALLOW, HeaderValue::from_static(ALLOWED_METHODS));
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(ALLOWED_METHODS),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("last-event-id, authorization, cache-control, accept"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    response
}

const ALLOWED_METHODS: &str = "GET, HEAD, OPTIONS";

async fn stream(
    State(state): State<Arc<AppState>>,
    Extension(conn): Extension<Arc<ConnInfo>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let Some(found) = state.routes.load().find(uri.path()) else {
        return (StatusCode::NOT_FOUND, "no such stream\n").into_response();
    };
    let route = Arc::clone(&found.route);
    if method != Method::GET && method != Method::HEAD {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, ALLOWED_METHODS)],
            "streams are read with GET\n",
        )
            .into_response();
    }
    // A browser navigating to the stream gets its live page (static; it holds no data).
    if let Some(page) = pages::for_stream(&headers) {
        return page;
    }
    let server = state.server.load_full();
    let client = limits::client_ip(
        conn.peer.ip(),
        headers.get("x-forwarded-for").map(HeaderValue::as_bytes),
        &server.trusted_proxies,
    );
    let target = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    let token = state.auth.load().token(
        |name| headers.get(name).map(HeaderValue::as_bytes),
        uri.query(),
    );
    let admitted = admission::admit(&state, &route, token.as_deref()).await;
    if method == Method::HEAD {
        // The stream's headers and no stream: not a connection to log.
        let auth = state.auth.load();
        return match admitted {
            Ok(credential) => match scope::check(&found, uri.query(), credential.as_deref(), &auth)
            {
                Ok(()) => stream_response(Body::empty()),
                Err(refused) => {
                    refused.note(&route, &state.metrics);
                    refused_scope(&server, &headers, refused, None)
                }
            },
            Err(denial) => refused(denial),
        };
    }
    let mut access = Access::new(
        Arc::clone(&route.path),
        target,
        client,
        &state.auth.load(),
        Arc::clone(&state.metrics),
    );
    access.watch(Arc::clone(&conn));
    let credential = match admitted {
        Ok(credential) => credential,
        Err(denial) => {
            access.set_status(denial.status());
            access.end(End::Denied);
            return refused(denial);
        }
    };
    access.identify(credential.as_deref());
    let hub = match scope::channel(
        &found,
        uri.query(),
        credential.as_deref(),
        &state.auth.load(),
    ) {
        Ok(hub) => hub,
        Err(refused) => {
            access.end(refused.note(&route, &state.metrics));
            return refused_scope(&server, &headers, refused, Some(access));
        }
    };
    let Some(slot) = state.per_ip.acquire(client, server.max_connections_per_ip) else {
        state.metrics.refused(Refusal::MaxConnectionsPerIp);
        access.end(End::Told(EndReason::Overloaded));
        return overloaded(&server, &headers, Some(access), EndReason::Overloaded);
    };
    access.hold(slot);
    let resume = resume_from(&headers, &uri);
    let mut subscription = hub.subscribe(resume);
    drop((hub, found));
    // The response ends at `max_lifetime` (the browser reconnects with its
    // Last-Event-ID and resumes) or, told so, at the token's expiry.
    let deadline = admission::deadline(&server, credential.as_deref());
    let events = async_stream::stream! {
        let mut frames = Vec::new();
        let expiry = admission::passed(deadline);
        tokio::pin!(expiry);
        let mut last = false;
        loop {
            tokio::select! {
                more = subscription.next(&mut frames) => if !more {
                    if let Some(reason) = subscription.end_reason() {
                        access.end(End::Told(reason));
                    }
                    if frames.is_empty() {
                        break;
                    }
                } else if subscription.take_recheck()
                    && !admission::still_admitted(&state, access.route(), credential.as_deref()).await
                {
                    frames.push(EndReason::Forbidden.frame());
                    access.end(End::Told(EndReason::Forbidden));
                    last = true;
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

/// The answer to a request access control refused: `401` (with its challenge) or
/// `403`, and a short JSON body that never echoes the token.
pub(super) fn refused(denial: crate::auth::Denial) -> Response {
    let mut response = (
        StatusCode::from_u16(denial.status()).unwrap_or(StatusCode::FORBIDDEN),
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        denial.body(),
    )
        .into_response();
    if let Some(challenge) = denial.challenge() {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
        );
    }
    response
}

/// A stream response: the wire contract's headers around `body`.
pub(super) fn stream_response(body: Body) -> Response {
    let mut response = Response::new(body);
    for (name, value) in wire::STREAM_HEADERS {
        response
            .headers_mut()
            .insert(name, HeaderValue::from_static(value));
    }
    response
}

/// The answer to a request a scoped stream refused: `400` or `403` with a short JSON
/// body, or the overload answer.
pub(super) fn refused_scope(
    server: &ServerConfig,
    headers: &HeaderMap,
    refused: scope::Refused,
    mut access: Option<Access>,
) -> Response {
    match refused.answer() {
        Ok(status) => {
            if let Some(access) = access.as_mut() {
                access.set_status(status);
            }
            (
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
                [
                    (header::CONTENT_TYPE, "application/json"),
                    (header::CACHE_CONTROL, "no-store"),
                ],
                refused.body(),
            )
                .into_response()
        }
        Err(reason) => overloaded(server, headers, access, reason),
    }
}

/// The overload answer: the event stream that sends the browser away for a while
/// (ending with `reason`), or `503` with `Retry-After` for anything else.
pub(super) fn overloaded(
    server: &ServerConfig,
    headers: &HeaderMap,
    mut access: Option<Access>,
    reason: EndReason,
) -> Response {
    let accept = headers.get(header::ACCEPT).map(HeaderValue::as_bytes);
    if head::wants_event_stream(accept) {
        let frames = limits::overload_events(server, reason);
        let body: Vec<u8> = frames.concat();
        if let Some(access) = access.as_mut() {
            access.queued(&frames);
            access.wrote(body.len());
        }
        return stream_response(Body::from(body));
    }
    if let Some(access) = access.as_mut() {
        access.set_status(503);
    }
    unavailable(server, reason)
}

/// `503` with `Retry-After`: the overload answer to anything but an event stream.
pub(super) fn unavailable(server: &ServerConfig, reason: EndReason) -> Response {
    let secs = limits::retry_delay(server).as_secs().max(1);
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, secs.to_string())],
        axum::Json(serde_json::json!({"error": reason.as_str()})),
    )
        .into_response()
}

/// The resume point: the `Last-Event-ID` header, else `?last_event_id=`.
pub(super) fn resume_from(headers: &HeaderMap, uri: &Uri) -> Resume {
    resume(
        headers.get("last-event-id").map(HeaderValue::as_bytes),
        uri.query(),
    )
}

fn cors(server: &ServerConfig, origin: Option<&HeaderValue>, response: &mut HeaderMap) {
    let origin = origin.and_then(|o| o.to_str().ok());
    if let Some(value) = allowed_origin(server, origin).and_then(|a| HeaderValue::from_str(&a).ok())
    {
        response.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
        // Validation refuses `cors_credentials` with "*", so this is a listed origin.
        if server.cors_credentials {
            response.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
    }
    if varies_by_origin(server) {
        response.append(header::VARY, HeaderValue::from_static("origin"));
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

/// Whether answers depend on the request's `Origin` (a list of allowed origins), so
/// caches must key on it, whether or not this request's origin was allowed.
pub(super) fn varies_by_origin(server: &ServerConfig) -> bool {
    !server.cors_origins.is_empty() && !server.cors_origins.iter().any(|o| o == "*")
}

/// The offer a client prefers by its `Accept` header: the index into `offers` with the
/// highest quality, the earliest on ties; `None` when it accepts none of them. A
/// missing header accepts anything, so the first offer wins.
pub(super) fn negotiate(accept: Option<&str>, offers: &[&str]) -> Option<usize> {
    let Some(accept) = accept else {
        return (!offers.is_empty()).then_some(0);
    };
    let quality = |offer: &str| -> f32 {
        let (kind, _) = offer.split_once('/').unwrap_or((offer, ""));
        // The most specific matching range decides (RFC 9110 §12.5.1).
        let mut best: Option<(u8, f32)> = None;
        for range in accept.split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0)
                .clamp(0.0, 1.0);
            let specificity = if media == offer {
                3
            } else if media.strip_suffix("/*") == Some(kind) {
                2
            } else if media == "*/*" {
                1
            } else {
                continue;
            };
            if best.is_none_or(|(s, _)| specificity > s) {
                best = Some((specificity, q));
            }
        }
        best.map_or(0.0, |(_, q)| q)
    };
    let mut chosen: Option<(usize, f32)> = None;
    for (i, offer) in offers.iter().enumerate() {
        let q = quality(offer);
        if q > 0.0 && chosen.is_none_or(|(_, best)| q > best) {
            chosen = Some((i, q));
        }
    }
    chosen.map(|(i, _)| i)
}

/// A connection's life under `max_lifetime`: 80–100% of it, so reconnects spread out.
pub(super) fn jittered(life: Duration) -> Duration {
    life.mul_f64(rand::rng().random_range(0.8..=1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_negotiation_follows_quality_and_specificity() {
        let offers = ["application/json", "text/html"];
        let pick = |a: Option<&str>| negotiate(a, &offers);
        assert_eq!(pick(None), Some(0));
        assert_eq!(pick(Some("*/*")), Some(0));
        assert_eq!(pick(Some("text/html")), Some(1));
        // A browser navigating.
        assert_eq!(
            pick(Some(
                "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
            )),
            Some(1)
        );
        assert_eq!(pick(Some("application/json, text/html;q=0")), Some(0));
        assert_eq!(pick(Some("text/*;q=0.5, application/json;q=0.4")), Some(1));
        assert_eq!(pick(Some("text/*, text/html;q=0")), None);
        assert_eq!(pick(Some("image/png")), None);
        assert_eq!(pick(Some("TEXT/HTML ; q=1")), Some(1));
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
