//! Raw values into typed ones: defaults, durations, counts, names and sources, with
//! every problem recorded where it is.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use toml::Spanned;

use super::auth;
use super::problems::Problems;
use super::raw::{RawConfig, RawStream, RawTls};
use super::sql::{is_identifier, is_relation_name, is_reserved_word, read_only_query};
use super::*;
use crate::wire::{is_reserved_path, RESERVED_EVENTS};

impl RawConfig {
    pub(super) fn validate(self, path: &Path, p: &mut Problems<'_>) -> Option<Config> {
        let base = path.parent().unwrap_or(Path::new("")).to_path_buf();
        let resolve = auth::resolver(&base);

        let s = self.server.unwrap_or_default();
        let default_listen = SocketAddr::from(([127, 0, 0, 1], 8000));
        let listen = s
            .listen
            .as_ref()
            .and_then(|l| address(p, l, "listen"))
            .unwrap_or(default_listen);
        let max_lifetime = duration(p, &s.max_lifetime, Duration::ZERO);
        let cors_credentials = match &s.cors_credentials {
            Some(c) if *c.get_ref() => {
                if s.cors_origins.iter().flatten().any(|o| o == "*") {
                    p.at(
                        c.span().start,
                        "`cors_credentials` needs `cors_origins` to list origins: with \"*\", any site could read what a user's cookie opens",
                    );
                }
                true
            }
            _ => false,
        };
        let server = ServerConfig {
            listen,
            heartbeat: positive(p, &s.heartbeat, Duration::from_secs(15), "heartbeat"),
            send_timeout: positive(p, &s.send_timeout, Duration::from_secs(30), "send_timeout"),
            shutdown_grace: duration(p, &s.shutdown_grace, Duration::from_secs(5)),
            max_connections: count(p, &s.max_connections, 19_000, "max_connections"),
            max_lifetime: (!max_lifetime.is_zero()).then_some(max_lifetime),
            cors_origins: s.cors_origins.unwrap_or_default(),
            head_timeout: positive(p, &s.head_timeout, Duration::from_secs(10), "head_timeout"),
            keepalive_timeout: positive(
                p,
                &s.keepalive_timeout,
                Duration::from_secs(30),
                "keepalive_timeout",
            ),
            client_errors: choice(
                p,
                &s.client_errors,
                "client_errors",
                &[
                    ("full", ClientErrors::Full),
                    ("generic", ClientErrors::Generic),
                ],
            ),
            admin_listen: s
                .admin_listen
                .as_ref()
                .and_then(|a| address(p, a, "admin_listen")),
            log_format: choice(
                p,
                &s.log_format,
                "log_format",
                &[("text", LogFormat::Text), ("json", LogFormat::Json)],
            ),
            max_connections_per_ip: match &s.max_connections_per_ip {
                None => 0,
                Some(n) => usize::try_from(*n.get_ref()).unwrap_or_else(|_| {
                    p.at(
                        n.span().start,
                        "`max_connections_per_ip` must be 0 (no limit) or more",
                    );
                    0
                }),
            },
            trusted_proxies: s
                .trusted_proxies
                .iter()
                .flatten()
                .filter_map(|t| network(p, t))
                .collect(),
            overload_retry: positive(
                p,
                &s.overload_retry,
                Duration::from_secs(5),
                "overload_retry",
            ),
            cors_credentials,
            mux_max_streams: match count(p, &s.mux_max_streams, 16, "mux_max_streams") {
                n if n > MAX_MUX_STREAMS => {
                    if let Some(v) = &s.mux_max_streams {
                        p.at(
                            v.span().start,
                            format!("`mux_max_streams` must be at most {MAX_MUX_STREAMS}"),
                        );
                    }
                    16
                }
                n => n,
            },
            tls: s.tls.as_ref().and_then(|t| tls_pair(p, t, &resolve)),
            http2_max_streams: http2_max_streams(p, &s.http2_max_streams),
        };

        let u = self.upstream.unwrap_or_default();
        let target = match &u.url {
            None => UpstreamTarget::Embedded,
            Some(url) if url.get_ref() == "embedded" => UpstreamTarget::Embedded,
            Some(url) => match url.get_ref().parse::<tokio_postgres::Config>() {
                Ok(c) if c.get_password().is_some() => {
                    p.at(
                        url.span().start,
                        "the upstream url must not hold a password; use `password_env` or `password_file`",
                    );
                    UpstreamTarget::Embedded
                }
                // tokio-postgres' default, `prefer`, falls back to plaintext without a
                // word when the server declines TLS: plaintext must be asked for.
                Ok(c) if matches!(c.get_ssl_mode(), tokio_postgres::config::SslMode::Prefer) => {
                    p.at(
                        url.span().start,
                        "the upstream url needs `sslmode=require` (verified TLS) or `sslmode=disable` (plain TCP); `prefer`, the default, silently falls back to plain TCP",
                    );
                    UpstreamTarget::Embedded
                }
                Ok(_) => UpstreamTarget::Url(url.get_ref().clone()),
                Err(e) => {
                    p.at(
                        url.span().start,
                        format!("`url` is neither \"embedded\" nor a valid postgres URL: {e}"),
                    );
                    UpstreamTarget::Embedded
                }
            },
        };
        let password = match (&u.password_env, &u.password_file) {
            (Some(e), Some(_)) => {
                p.at(
                    e.span().start,
                    "set only one of `password_env` and `password_file`",
                );
                None
            }
            (Some(e), None) => Some(PasswordSource::Env(e.get_ref().clone())),
            (None, Some(f)) => Some(PasswordSource::File(resolve(f.get_ref()))),
            (None, None) => None,
        };
        let backoff_initial = positive(
            p,
            &u.backoff_initial,
            Duration::from_millis(100),
            "backoff_initial",
        );
        let backoff_max = positive(p, &u.backoff_max, Duration::from_secs(10), "backoff_max");
        if backoff_max < backoff_initial {
            if let Some(b) = &u.backoff_max {
                p.at(b.span().start, "`backoff_max` is below `backoff_initial`");
            }
        }
        let upstream = UpstreamConfig {
            target,
            password,
            connect_timeout: positive(
                p,
                &u.connect_timeout,
                Duration::from_secs(10),
                "connect_timeout",
            ),
            progress_timeout: positive(
                p,
                &u.progress_timeout,
                Duration::from_secs(10),
                "progress_timeout",
            ),
            backoff_initial,
            backoff_max,
            ca_file: u.ca_file.as_ref().map(|f| resolve(f.get_ref())),
            max_row_bytes: count(p, &u.max_row_bytes, 16 << 20, "max_row_bytes"),
        };

        let e = self.embedded.unwrap_or_default();
        let mut schedule = Vec::new();
        for entry in &e.schedule {
            let entry = entry.get_ref();
            let every = positive(p, &Some(entry.every.clone()), Duration::ZERO, "every");
            if entry.sql.get_ref().trim().is_empty() {
                p.at(entry.sql.span().start, "`sql` is empty");
            }
            schedule.push(ScheduledWrite {
                every,
                sql: entry.sql.get_ref().clone(),
            });
        }
        let embedded = EmbeddedConfig {
            init: e.init.as_ref().map(|f| resolve(f.get_ref())),
            legacy: e.legacy.unwrap_or(false),
            retain: positive(p, &e.retain, Duration::from_secs(600), "retain"),
            tick: positive(p, &e.tick, Duration::from_secs(1), "tick"),
            schedule,
        };

        let d = self.defaults.unwrap_or_default();
        let auth = auth::validate_auth(p, self.auth.unwrap_or_default(), &resolve);
        let default_authorize = d.authorize.as_ref().and_then(|a| {
            if auth.mode == AuthMode::None {
                p.at(a.span().start, "`authorize` needs `[auth] mode = \"jwt\"`");
            }
            auth::authorize(p, a)
        });
        let defaults = StreamDefaults {
            authorize: default_authorize,
            max_partitions: count(p, &d.max_partitions, 10_000, "max_partitions"),
            delay: duration(p, &d.delay, Duration::ZERO),
            retry: duration(p, &d.retry, Duration::from_secs(15)),
            event: event_name(p, &d.event, "update"),
            history: count(p, &d.history, 1024, "history"),
            history_bytes: count(p, &d.history_bytes, 8 << 20, "history_bytes"),
            client_queue: count(p, &d.client_queue, 1024, "client_queue"),
        };

        let mut seen = HashSet::new();
        let mut streams = Vec::new();
        for s in self.streams.into_iter().flatten() {
            if let Some(stream) = validate_stream(p, s, &defaults, auth.mode, &mut seen) {
                streams.push(Arc::new(stream));
            }
        }

        Some(Config {
            source: path.to_path_buf(),
            digest: 0,
            server,
            upstream,
            embedded,
            auth,
            streams,
        })
    }
}

pub(super) struct StreamDefaults {
    authorize: Option<Authorize>,
    max_partitions: usize,
    delay: Duration,
    retry: Duration,
    event: String,
    history: usize,
    history_bytes: usize,
    client_queue: usize,
}

pub(super) fn validate_stream(
    p: &mut Problems<'_>,
    s: RawStream,
    d: &StreamDefaults,
    mode: AuthMode,
    seen: &mut HashSet<String>,
) -> Option<StreamConfig> {
    let before = p.len();
    let path_at = s.path.span().start;
    let path = s.path.get_ref().clone();
    if !path.starts_with('/') {
        p.at(path_at, format!("path {path:?} must start with `/`"));
    } else if is_reserved_path(&path) {
        p.at(path_at, format!("path {path:?} is reserved by the gateway"));
    } else if path.len() > 1 && path.ends_with('/') {
        p.at(path_at, format!("path {path:?} must not end with `/`"));
    } else if path.contains("//") {
        p.at(path_at, format!("path {path:?} has an empty segment"));
    }
    // Each segment is literal (`/-_.~`, letters, digits) or a whole `{name}`.
    let mut params: Vec<String> = Vec::new();
    let mut offset = 0;
    for segment in path.split('/') {
        let at = path_at + 1 + offset;
        offset += segment.len() + 1;
        if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            if !is_identifier(name) || is_reserved_word(name) {
                p.at(
                    at,
                    format!("path parameter {{{name}}} must be a plain column name"),
                );
            } else if params.iter().any(|n| n == name) {
                p.at(at, format!("path parameter {{{name}}} appears twice"));
            } else {
                params.push(name.to_string());
            }
        } else if !segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b))
        {
            p.at(
                at,
                format!(
                    "path {path:?} may only hold letters, digits, `/-_.~` and whole `{{name}}` segments"
                ),
            );
        }
    }
    // Templates that differ only in their parameters' names would match the same
    // requests.
    let shape = path
        .split('/')
        .map(|seg| if seg.starts_with('{') { "{}" } else { seg })
        .collect::<Vec<_>>()
        .join("/");
    if !seen.insert(shape) {
        if params.is_empty() {
            p.at(path_at, format!("duplicate path {path:?}"));
        } else {
            p.at(
                path_at,
                format!("duplicate path {path:?}: another template matches the same requests"),
            );
        }
    }

    let source = match (&s.view, &s.query) {
        (Some(v), None) => {
            if !is_relation_name(v.get_ref()) {
                p.at(
                    v.span().start,
                    format!(
                        "view {:?} is not a relation name (name, schema.name or database.schema.name)",
                        v.get_ref()
                    ),
                );
            } else {
                // Every part: the development engine drops the schema, so `public.order`
                // reaches it as `order`.
                let mut inner = 0;
                for part in v.get_ref().split('.') {
                    if is_reserved_word(part) {
                        p.inside(
                            v,
                            inner,
                            format!(
                                "view {:?}: `{part}` is a reserved SQL word and cannot be an unquoted name",
                                v.get_ref()
                            ),
                        );
                    }
                    inner += part.len() + 1;
                }
            }
            Some(Source::View(v.get_ref().clone()))
        }
        (None, Some(q)) => {
            let value = q.get_ref();
            let text = value.trim().trim_end_matches(';').trim();
            if text.is_empty() {
                p.at(q.span().start, "`query` is empty");
            } else if let Err(e) = read_only_query(text) {
                let lead = value.len() - value.trim_start().len();
                p.inside(q, lead + e.at, e.message);
            }
            Some(Source::Query(text.to_string()))
        }
        (Some(v), Some(_)) => {
            p.at(
                v.span().start,
                format!("stream {path:?} sets both `view` and `query`; set exactly one"),
            );
            None
        }
        (None, None) => {
            p.at(
                path_at,
                format!("stream {path:?} sets neither `view` nor `query`; set exactly one"),
            );
            None
        }
    };

    let key = s.key.as_ref().map(|k| {
        if k.get_ref().is_empty() {
            p.at(k.span().start, "`key` must name at least one column");
        }
        let mut listed = HashSet::new();
        for col in k.get_ref() {
            if !is_identifier(col.get_ref()) {
                p.at(
                    col.span().start,
                    format!("key column {:?} is not a plain column name", col.get_ref()),
                );
            } else if is_reserved_word(col.get_ref()) {
                p.at(
                    col.span().start,
                    format!(
                        "key column {:?} is a reserved SQL word and cannot be an unquoted name",
                        col.get_ref()
                    ),
                );
            }
            if !listed.insert(col.get_ref()) {
                p.at(
                    col.span().start,
                    format!("key column {:?} is listed twice", col.get_ref()),
                );
            }
        }
        k.get_ref().iter().map(|c| c.get_ref().clone()).collect()
    });
    let cluster = s.cluster.as_ref().map(|c| {
        if !is_identifier(c.get_ref()) {
            p.at(
                c.span().start,
                format!("cluster {:?} is not a plain identifier", c.get_ref()),
            );
        } else if is_reserved_word(c.get_ref()) {
            p.at(
                c.span().start,
                format!(
                    "cluster {:?} is a reserved SQL word and cannot be an unquoted name",
                    c.get_ref()
                ),
            );
        }
        c.get_ref().clone()
    });

    // Every field is checked even when the source is wrong, so all problems show.
    let event = event_name(p, &s.event, &d.event);
    let delay = duration(p, &s.delay, d.delay);
    let retry = duration(p, &s.retry, d.retry);
    let history = count(p, &s.history, d.history, "history");
    let history_bytes = count(p, &s.history_bytes, d.history_bytes, "history_bytes");
    let client_queue = count(p, &s.client_queue, d.client_queue, "client_queue");
    let public = s.public.as_ref().is_some_and(|p| *p.get_ref());
    let authorize = match &s.authorize {
        Some(a) => {
            if public {
                p.at(
                    a.span().start,
                    "a stream is either `public` or has `authorize`, not both",
                );
            }
            if mode == AuthMode::None {
                p.at(a.span().start, "`authorize` needs `[auth] mode = \"jwt\"`");
            }
            auth::authorize(p, a)
        }
        // A public stream admits anyone, whatever `[defaults]` says.
        None if public => None,
        None => d.authorize.clone(),
    };
    let names = |p: &mut Problems<'_>,
                 list: &Option<Spanned<Vec<Spanned<String>>>>,
                 what: &str|
     -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for name in list.iter().flat_map(|l| l.get_ref()) {
            let n = name.get_ref();
            if !is_identifier(n) || is_reserved_word(n) {
                p.at(
                    name.span().start,
                    format!("{what} {n:?} is not a plain column name"),
                );
            } else if out.contains(n) {
                p.at(name.span().start, format!("{what} {n:?} is listed twice"));
            } else {
                out.push(n.clone());
            }
        }
        out
    };
    let filters = names(p, &s.filters, "filter column");
    for (f, name) in filters
        .iter()
        .zip(s.filters.iter().flat_map(|l| l.get_ref()))
    {
        if params.contains(f) {
            p.at(
                name.span().start,
                format!("filter column {f:?} is already a path parameter"),
            );
        }
    }
    let columns = s.columns.as_ref().map(|list| {
        if list.get_ref().is_empty() {
            p.at(list.span().start, "`columns` must name at least one column");
        }
        let cols = names(p, &s.columns, "column");
        for k in key.iter().flatten() {
            if !cols.contains(k) {
                p.at(
                    list.span().start,
                    format!("`columns` must include the key column {k:?}"),
                );
            }
        }
        cols
    });
    let scope = s.scope.as_ref().map(|sc| {
        let raw = sc.get_ref();
        let column = raw.column.get_ref();
        if !is_identifier(column) || is_reserved_word(column) {
            p.at(
                raw.column.span().start,
                format!("scope column {column:?} is not a plain column name"),
            );
        } else if params.contains(column) {
            p.at(
                raw.column.span().start,
                format!("scope column {column:?} is already a path parameter"),
            );
        }
        let claim = raw.claim.get_ref();
        if !(claim.is_empty() || claim.starts_with('/')) {
            p.at(
                raw.claim.span().start,
                format!("scope claim {claim:?} must be a JSON Pointer such as \"/tenant\""),
            );
        }
        if mode == AuthMode::None {
            p.at(sc.span().start, "`scope` needs `[auth] mode = \"jwt\"`");
        } else if public {
            p.at(
                sc.span().start,
                "a scoped stream cannot be `public`: its scope comes from a token",
            );
        }
        Scope {
            column: column.clone(),
            claim: claim.clone(),
        }
    });
    let max_partitions = count(p, &s.max_partitions, d.max_partitions, "max_partitions");
    let stream = StreamConfig {
        params,
        filters,
        columns,
        scope,
        max_partitions,
        public,
        authorize,
        path: StreamPath(path),
        source: source?,
        event,
        delay,
        retry,
        key,
        cluster,
        history,
        history_bytes,
        client_queue,
    };
    (p.len() == before).then_some(stream)
}

pub(super) fn duration(
    p: &mut Problems<'_>,
    v: &Option<Spanned<String>>,
    default: Duration,
) -> Duration {
    match v {
        None => default,
        Some(s) => match parse_duration(s.get_ref()) {
            Ok(d) => d,
            Err(e) => {
                p.at(
                    s.span().start,
                    format!(
                        "bad duration {:?} ({e}); write e.g. \"500ms\", \"15s\", \"2m\"",
                        s.get_ref()
                    ),
                );
                default
            }
        },
    }
}

pub(super) fn positive(
    p: &mut Problems<'_>,
    v: &Option<Spanned<String>>,
    default: Duration,
    name: &str,
) -> Duration {
    let d = duration(p, v, default);
    if let (Some(s), true) = (v, d.is_zero()) {
        p.at(
            s.span().start,
            format!("`{name}` must be greater than zero"),
        );
    }
    d
}

/// The most streams a mux may be allowed: each is a subscription, a held-event queue
/// and a re-encoding per connection.
const MAX_MUX_STREAMS: usize = 256;

pub(super) fn count(
    p: &mut Problems<'_>,
    v: &Option<Spanned<i64>>,
    default: usize,
    name: &str,
) -> usize {
    match v {
        None => default,
        Some(n) if *n.get_ref() >= 1 => usize::try_from(*n.get_ref()).unwrap_or(usize::MAX),
        Some(n) => {
            p.at(n.span().start, format!("`{name}` must be at least 1"));
            default
        }
    }
}

pub(super) fn event_name(
    p: &mut Problems<'_>,
    v: &Option<Spanned<String>>,
    default: &str,
) -> String {
    let Some(s) = v else {
        return default.to_string();
    };
    let name = s.get_ref();
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
    {
        p.at(
            s.span().start,
            format!("event name {name:?} must be 1-64 letters, digits or `-_.:`"),
        );
    } else if RESERVED_EVENTS.contains(&name.as_str()) {
        p.at(
            s.span().start,
            format!("event name {name:?} is reserved by the wire contract"),
        );
    }
    name.clone()
}

/// The most streams `http2_max_streams` may allow one connection: each stream is a
/// client of its hub, and one connection should not hold more than a crowd of
/// browsers would.
pub(super) const MAX_HTTP2_STREAMS: i64 = 10_000;

fn http2_max_streams(p: &mut Problems<'_>, v: &Option<Spanned<i64>>) -> u32 {
    const DEFAULT: u32 = 256;
    let Some(n) = v else { return DEFAULT };
    match u32::try_from(*n.get_ref()) {
        Ok(streams) if (1..=MAX_HTTP2_STREAMS).contains(n.get_ref()) => streams,
        _ => {
            p.at(
                n.span().start,
                format!(
                    "`http2_max_streams` must be between 1 and {MAX_HTTP2_STREAMS}, got {}",
                    n.get_ref()
                ),
            );
            DEFAULT
        }
    }
}

/// `tls`: both files resolved, then read and checked as a pair (the one read
/// validation does). A problem points at the key naming the file at fault; a key that
/// does not match its certificate points at `key_file`.
fn tls_pair(
    p: &mut Problems<'_>,
    t: &Spanned<RawTls>,
    resolve: &dyn Fn(&str) -> std::path::PathBuf,
) -> Option<PairFiles> {
    let raw = t.get_ref();
    let mut named = true;
    for (name, v) in [("cert_file", &raw.cert_file), ("key_file", &raw.key_file)] {
        if v.get_ref().trim().is_empty() {
            p.at(v.span().start, format!("`{name}` is empty"));
            named = false;
        }
    }
    if !named {
        return None;
    }
    let files = PairFiles {
        cert: resolve(raw.cert_file.get_ref()),
        key: resolve(raw.key_file.get_ref()),
    };
    match crate::tls::load_pair(&files) {
        Ok(_) => Some(files),
        Err(e) => {
            let at = match e.which() {
                crate::tls::Which::Cert => &raw.cert_file,
                crate::tls::Which::Key => &raw.key_file,
            };
            p.at(at.span().start, format!("`tls`: {e}"));
            None
        }
    }
}

/// A socket address such as `127.0.0.1:8000`.
fn address(p: &mut Problems<'_>, v: &Spanned<String>, name: &str) -> Option<SocketAddr> {
    let parsed = v.get_ref().parse::<SocketAddr>();
    if parsed.is_err() {
        p.at(
            v.span().start,
            format!(
                "`{name}` must be an address like 127.0.0.1:8000, got {:?}",
                v.get_ref()
            ),
        );
    }
    parsed.ok()
}

/// A network such as `10.0.0.0/8`, or one address (a network of one).
fn network(p: &mut Problems<'_>, v: &Spanned<String>) -> Option<ipnet::IpNet> {
    let text = v.get_ref();
    let parsed = text.parse::<ipnet::IpNet>().ok().or_else(|| {
        text.parse::<std::net::IpAddr>()
            .ok()
            .map(ipnet::IpNet::from)
    });
    if parsed.is_none() {
        p.at(
            v.span().start,
            format!("{text:?} is not a network like \"10.0.0.0/8\" or an address"),
        );
    }
    parsed
}

/// One of a fixed set of words.
pub(super) fn choice<T: Copy>(
    p: &mut Problems<'_>,
    v: &Option<Spanned<String>>,
    name: &str,
    options: &[(&str, T)],
) -> T {
    let default = options[0].1;
    let Some(v) = v else { return default };
    match options.iter().find(|(word, _)| *word == v.get_ref()) {
        Some((_, value)) => *value,
        None => {
            let words: Vec<String> = options.iter().map(|(w, _)| format!("{w:?}")).collect();
            p.at(
                v.span().start,
                format!(
                    "`{name}` must be one of {}, got {:?}",
                    words.join(", "),
                    v.get_ref()
                ),
            );
            default
        }
    }
}
