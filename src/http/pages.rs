//! The gateway's own pages and the files they load, compiled into the binary: the
//! live page a browser gets when it navigates to a stream's path, the index at `/`,
//! the demo pages of `examples/web/`, and the browser client (`clients/js/`) under
//! `/_tailgate/`.
//!
//! Every page is static HTML that holds no data: the same bytes for every stream and
//! every caller. Its script opens the stream (or fetches the listing) as any other
//! client does, with the browser's cookies, so access control applies to that request
//! and a page may be served without a token. Each page's Content-Security-Policy
//! allows scripts and connections to its own origin and, for styles, exactly the
//! inline CSS it uses (by hash): no inline script, no other origin, nothing else.
//! Every answer has a strong `ETag` and `Cache-Control: no-cache`, so browsers
//! revalidate and get `304` until the binary changes.
//!
//! Nothing here spawns a task; the catalogue is built once, on first use.

use std::sync::LazyLock;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine as _;
use sha2::{Digest, Sha256};

use super::routes::negotiate;
use crate::wire::OWN_PREFIX;

const JS: &str = "text/javascript; charset=utf-8";
const TS: &str = "application/typescript; charset=utf-8";
const HTML: &str = "text/html; charset=utf-8";

const LIVE_JS: &str = include_str!("../../clients/js/live.js");

/// The browser client, its types, and the scripts of the gateway's own pages.
const FILES: [(&str, &str, &str); 6] = [
    (
        "tailgate.js",
        JS,
        include_str!("../../clients/js/tailgate.js"),
    ),
    ("live.js", JS, LIVE_JS),
    (
        "tailgate.d.ts",
        TS,
        include_str!("../../clients/js/tailgate.d.ts"),
    ),
    ("live.d.ts", TS, include_str!("../../clients/js/live.d.ts")),
    ("stream-page.js", JS, include_str!("pages/stream-page.js")),
    ("index-page.js", JS, include_str!("pages/index-page.js")),
];

/// The demo pages, each served at `/_tailgate/examples/<name>`. A unit test checks
/// that every page in `examples/web/` is here.
const EXAMPLES: [(&str, &str); 1] = [("sensors", include_str!("../../examples/web/sensors.html"))];

/// One answer the gateway serves from the binary.
struct Served {
    content_type: &'static str,
    body: &'static str,
    /// A strong validator: a digest of the body (and of the policy, for a page).
    etag: HeaderValue,
    /// A page's Content-Security-Policy; `None` for scripts and types.
    csp: Option<HeaderValue>,
}

impl Served {
    fn new(content_type: &'static str, body: &'static str, csp: Option<String>) -> Served {
        let mut digest = Sha256::new();
        digest.update(body);
        if let Some(csp) = &csp {
            digest.update(csp);
        }
        let digest = digest.finalize();
        let tag = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest[..18]);
        Served {
            content_type,
            body,
            etag: HeaderValue::from_str(&format!("\"{tag}\"")).expect("base64 is a header value"),
            csp: csp.map(|c| HeaderValue::from_str(&c).expect("a policy is a header value")),
        }
    }

    /// The answer to a GET with these headers: the body, or `304` when the client's
    /// copy is current.
    fn answer(&self, request: &HeaderMap) -> Response {
        let fresh = request
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .any(|v| matches_etag(v.as_bytes(), self.etag.as_bytes()));
        let mut response = if fresh {
            StatusCode::NOT_MODIFIED.into_response()
        } else {
            let mut r = self.body.into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(self.content_type),
            );
            r
        };
        let h = response.headers_mut();
        h.insert(header::ETAG, self.etag.clone());
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        if let Some(csp) = &self.csp {
            h.insert(header::CONTENT_SECURITY_POLICY, csp.clone());
            h.insert(
                header::REFERRER_POLICY,
                HeaderValue::from_static("same-origin"),
            );
        }
        response
    }
}

/// Whether an `If-None-Match` value names `etag` (weak comparison, as RFC 9110
/// §13.1.2 says for this header), or is `*`.
fn matches_etag(if_none_match: &[u8], etag: &[u8]) -> bool {
    let Ok(list) = std::str::from_utf8(if_none_match) else {
        return false;
    };
    list.split(',').map(str::trim).any(|candidate| {
        candidate == "*" || candidate.strip_prefix("W/").unwrap_or(candidate).as_bytes() == etag
    })
}

/// Everything served from here, built once.
struct Catalog {
    /// Served at `/_tailgate/<name>`.
    files: Vec<(String, Served)>,
    /// The live page, at every stream's path.
    stream: Served,
    /// The index page, at `/`.
    index: Served,
}

static CATALOG: LazyLock<Catalog> = LazyLock::new(|| {
    let live_css = live_css();
    let style = live_css.map_or_else(
        // live.js changed shape (a unit test catches that): its style still applies.
        || "'unsafe-inline'".to_string(),
        |css| format!("'sha256-{}'", sha256_b64(css)),
    );
    let page_policy = policy("", &style);
    let mut files: Vec<(String, Served)> = FILES
        .iter()
        .map(|&(name, kind, body)| {
            (
                format!("{OWN_PREFIX}/{name}"),
                Served::new(kind, body, None),
            )
        })
        .collect();
    for (name, page) in EXAMPLES {
        let hashes = |tag| {
            inline_elements(page, tag)
                .map(|content| format!(" 'sha256-{}'", sha256_b64(content)))
                .collect::<String>()
        };
        let csp = policy(&hashes("script"), hashes("style").trim_start());
        files.push((
            format!("{OWN_PREFIX}/examples/{name}"),
            Served::new(HTML, page, Some(csp)),
        ));
    }
    Catalog {
        files,
        stream: Served::new(
            HTML,
            include_str!("pages/stream.html"),
            Some(page_policy.clone()),
        ),
        index: Served::new(HTML, include_str!("pages/index.html"), Some(page_policy)),
    }
});

/// A page's policy: its origin's scripts (plus `scripts`, hash sources of its inline
/// ones), the styles `styles` allows, connections to its origin, and nothing else.
fn policy(scripts: &str, styles: &str) -> String {
    let styles = if styles.is_empty() { "'none'" } else { styles };
    format!(
        "default-src 'none'; script-src 'self'{scripts}; style-src {styles}; \
         connect-src 'self'; base-uri 'none'; form-action 'none'"
    )
}

fn sha256_b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(text))
}

/// The CSS that `live.js` puts into its one `<style>` element: the template literal
/// `const CSS = `...``, which holds no substitution or escape, so its text is the
/// value.
fn live_css() -> Option<&'static str> {
    let source = LIVE_JS;
    let start = source.find("const CSS = `")? + "const CSS = `".len();
    let len = source[start..].find('`')?;
    let css = &source[start..start + len];
    (!css.contains("${") && !css.contains('\\')).then_some(css)
}

/// The contents of the inline `<tag>` elements of our own HTML (those without `src`),
/// as the browser hashes them.
fn inline_elements<'a>(html: &'a str, tag: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    let open = format!("<{tag}");
    let close = format!("</{tag}>");
    let mut rest = html;
    std::iter::from_fn(move || loop {
        let at = rest.find(&open)?;
        let after = &rest[at + open.len()..];
        let head_end = after.find('>')?;
        let attributes = &after[..head_end];
        let body = &after[head_end + 1..];
        let end = body.find(&close)?;
        rest = &body[end + close.len()..];
        if !attributes.contains("src=") {
            return Some(&body[..end]);
        }
    })
}

/// The routes of the compiled-in files, under `/_tailgate/`.
pub(super) fn files<S: Clone + Send + Sync + 'static>() -> Router<S> {
    CATALOG
        .files
        .iter()
        .fold(Router::new(), |router, (path, served)| {
            router.route(
                path,
                get(move |headers: HeaderMap| async move { served.answer(&headers) }),
            )
        })
}

/// Whether a request with these headers is a browser navigating (it prefers HTML to
/// the event stream), which gets the page rather than the stream.
fn navigating(headers: &HeaderMap) -> bool {
    let accept = headers.get(header::ACCEPT).and_then(|a| a.to_str().ok());
    negotiate(accept, &["text/event-stream", "text/html"]) == Some(1)
}

/// The live page, for a request of a stream's path that prefers HTML; `None` leaves
/// the request to the stream. The page is the same for every stream.
pub(super) fn for_stream(headers: &HeaderMap) -> Option<Response> {
    navigating(headers).then(|| with_vary(CATALOG.stream.answer(headers)))
}

/// The index page at `/`.
pub(super) fn index(headers: &HeaderMap) -> Response {
    with_vary(CATALOG.index.answer(headers))
}

/// Pages share their URL with the stream or the JSON listing: caches key on `Accept`.
fn with_vary(mut response: Response) -> Response {
    response
        .headers_mut()
        .append(header::VARY, HeaderValue::from_static("accept"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_js_style_is_found_and_hashed() {
        let css = live_css().expect("live.js keeps its CSS in `const CSS = `...``");
        assert!(css.contains(".tg-table"), "{css}");
        let policy = CATALOG.stream.csp.as_ref().expect("a policy");
        let policy = policy.to_str().expect("ascii");
        assert!(policy.contains(&format!("style-src 'sha256-{}'", sha256_b64(css))));
        assert!(policy.starts_with("default-src 'none'; script-src 'self';"));
        assert!(!policy.contains("unsafe"), "{policy}");
    }

    #[test]
    fn every_demo_page_is_served_with_hashes_of_its_inline_code() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/web");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .expect("examples/web")
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                name.strip_suffix(".html").map(str::to_string)
            })
            .collect();
        on_disk.sort();
        let mut served: Vec<&str> = EXAMPLES.iter().map(|(name, _)| *name).collect();
        served.sort();
        assert_eq!(served, on_disk, "add the page to EXAMPLES");

        let (_, page) = EXAMPLES[0];
        assert!(!page.contains('\r'), "hashes are of LF-only text");
        let scripts: Vec<&str> = inline_elements(page, "script").collect();
        let styles: Vec<&str> = inline_elements(page, "style").collect();
        assert_eq!((scripts.len(), styles.len()), (1, 1));
        assert!(scripts[0].contains("subscribe(\"/sensors\""));
        let (_, served) = CATALOG
            .files
            .iter()
            .find(|(path, _)| path == "/_tailgate/examples/sensors")
            .expect("served");
        let policy = served
            .csp
            .as_ref()
            .expect("policy")
            .to_str()
            .expect("ascii");
        assert!(policy.contains(&format!(
            "script-src 'self' 'sha256-{}';",
            sha256_b64(scripts[0])
        )));
        assert!(policy.contains(&format!("style-src 'sha256-{}';", sha256_b64(styles[0]))));
    }

    #[test]
    fn inline_elements_skip_external_scripts() {
        let html =
            "<script src=\"/a.js\"></script><script type=module>x()</script><style>a{}</style>";
        assert_eq!(inline_elements(html, "script").collect::<Vec<_>>(), ["x()"]);
        assert_eq!(inline_elements(html, "style").collect::<Vec<_>>(), ["a{}"]);
    }

    #[test]
    fn if_none_match_is_compared_weakly_and_in_lists() {
        let tag = b"\"abc\"";
        assert!(matches_etag(b"\"abc\"", tag));
        assert!(matches_etag(b"W/\"abc\"", tag));
        assert!(matches_etag(b"\"x\", \"abc\"", tag));
        assert!(matches_etag(b"*", tag));
        assert!(!matches_etag(b"\"abcd\"", tag));
        assert!(!matches_etag(b"abc", tag));
    }

    #[test]
    fn only_a_browser_navigating_gets_the_page() {
        let with = |accept: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                header::ACCEPT,
                HeaderValue::from_str(accept).expect("value"),
            );
            navigating(&h)
        };
        assert!(with(
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
        ));
        assert!(with("text/html"));
        assert!(!with("text/event-stream"));
        assert!(!with("*/*"));
        assert!(!with("application/json"));
        assert!(!with("text/*"), "a tie goes to the stream");
        assert!(!navigating(&HeaderMap::new()));
    }
}
