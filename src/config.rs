//! `streams.toml`: the raw serde mirror of the file and its validation into [`Config`].
//!
//! Loading is two steps. The text is parsed into a span-carrying TOML tree, each section
//! and each `[[streams]]` entry is deserialized on its own (with `deny_unknown_fields`),
//! and then [`RawConfig::validate`] turns the raw values into typed ones. Every problem
//! found along the way is collected, so one run reports them all, each with the file,
//! line and column. Validation does no I/O; reading secrets happens later, when the
//! upstream connects.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// Names a stream cannot use as its event name: the wire contract reserves them.
const RESERVED_EVENTS: [&str; 3] = ["snapshot", "status", "end"];
/// Paths the gateway serves itself.
const RESERVED_PATHS: [&str; 3] = ["/", "/metrics", "/healthz"];

/// A whole, validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it came from; relative paths inside it resolve against its directory.
    pub source: PathBuf,
    /// Hash of the text it was parsed from, so reload can skip saves that change nothing.
    pub digest: u64,
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub embedded: EmbeddedConfig,
    pub streams: Vec<Arc<StreamConfig>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Interval of `: keepalive` comments, so proxies do not cut idle streams.
    pub heartbeat: Duration,
    /// A client whose socket accepts nothing for this long is disconnected.
    pub send_timeout: Duration,
    /// How long shutdown waits for clients to receive `end` before exiting.
    pub shutdown_grace: Duration,
    /// Connections beyond this are refused with 503 instead of exhausting descriptors.
    pub max_connections: usize,
    /// Optional cap on a connection's life; the actual cap is jittered down to 80%
    /// of it so reconnects spread out.
    pub max_lifetime: Option<Duration>,
    /// `Access-Control-Allow-Origin` values; `*` allows any origin.
    pub cors_origins: Vec<String>,
    /// How long a client may take to send a request head, from its first byte (or
    /// from the connection's accept, for the first request).
    pub head_timeout: Duration,
    /// How long a connection may sit idle between requests before it is closed.
    pub keepalive_timeout: Duration,
    /// What `status` events tell clients about upstream errors.
    pub client_errors: ClientErrors,
}

/// How much of an upstream error clients see in `status` events. Logs and `GET /`
/// always keep the details.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientErrors {
    /// The error text as the upstream gave it (SQLSTATE, object names).
    Full,
    /// A fixed text, for deployments where the errors are sensitive.
    Generic,
}

#[derive(Debug, Clone, PartialEq)]
pub enum UpstreamTarget {
    /// Start the development engine in-process on a loopback port.
    Embedded,
    /// A `postgres://` URL of a Materialize (or compatible) server.
    Url(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum PasswordSource {
    Env(String),
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub target: UpstreamTarget,
    pub password: Option<PasswordSource>,
    pub connect_timeout: Duration,
    /// No row (not even a progress row) for this long means the link is dead.
    pub progress_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Extra root certificates (PEM) for TLS, on top of the built-in web roots.
    pub ca_file: Option<PathBuf>,
    /// A row larger than this degrades its stream instead of being served.
    pub max_row_bytes: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddedConfig {
    pub init: Option<PathBuf>,
    pub legacy: bool,
    pub retain: Duration,
    pub tick: Duration,
    pub schedule: Vec<ScheduledWrite>,
}

/// A statement the gateway runs against the embedded engine on a timer, so the demo is alive.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduledWrite {
    pub every: Duration,
    pub sql: String,
}

/// A validated URL path such as `/sensors`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamPath(String);

impl StreamPath {
    /// The name scheduled writes use as their session's application name.
    pub fn schedule() -> StreamPath {
        StreamPath("(schedule)".into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StreamPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a stream subscribes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    View(String),
    Query(String),
}

impl Source {
    /// The relation as it appears after `SUBSCRIBE TO`.
    pub fn relation(&self) -> String {
        match self {
            Source::View(v) => v.clone(),
            // The newline keeps a trailing `--` comment from swallowing the parenthesis.
            Source::Query(q) if q.contains("--") => format!("({q}\n)"),
            Source::Query(q) => format!("({q})"),
        }
    }

    /// A plain query over the relation, used to learn its column types.
    pub fn select(&self) -> String {
        match self {
            Source::View(v) => format!("SELECT * FROM {v}"),
            Source::Query(q) => q.clone(),
        }
    }
}

/// Whether `sql` holds a `;` outside string literals, quoted identifiers and comments,
/// i.e. more than one statement.
fn separates_statements(sql: &str) -> bool {
    let b = sql.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80;
    // Whether `b[i]` continues an identifier (or a number) rather than starting a token.
    let inside_word = |i: usize| i > 0 && ident(b[i - 1]);
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b';' => return true,
            quote @ (b'\'' | b'"') => {
                // `E'...'` strings escape with a backslash; elsewhere a doubled quote is
                // an escaped quote, which scanning on covers.
                let escapes = quote == b'\''
                    && i > 0
                    && matches!(b[i - 1], b'e' | b'E')
                    && !inside_word(i - 1);
                i += 1;
                while i < b.len() && b[i] != quote {
                    if escapes && b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            // PostgreSQL ends a `--` comment at a carriage return as well as a newline.
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && !matches!(b[i], b'\n' | b'\r') {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                    i += 1;
                }
                i += 1;
            }
            // A dollar quote: `$tag$ ... $tag$`, with an empty tag or one that starts
            // like an identifier; not `$1` (a parameter) nor a `$` inside a name.
            b'$' if !inside_word(i) && !b.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                let tag_len = b[i + 1..]
                    .iter()
                    .position(|c| !(c.is_ascii_alphanumeric() || *c == b'_'))
                    .unwrap_or(b.len() - i - 1);
                if b.get(i + 1 + tag_len) == Some(&b'$') {
                    let tag = &sql[i..i + tag_len + 2];
                    match sql[i + tag.len()..].find(tag) {
                        Some(end) => i += tag.len() + end + tag.len() - 1,
                        None => return false,
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    false
}

/// One `[[streams]]` entry with defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamConfig {
    pub path: StreamPath,
    pub source: Source,
    /// SSE event name of update events.
    pub event: String,
    /// Coalescing window; zero sends each closed timestamp at once.
    pub delay: Duration,
    /// SSE `retry` hint sent to browsers.
    pub retry: Duration,
    /// Upsert key columns (`ENVELOPE UPSERT (KEY (...))`).
    pub key: Option<Vec<String>>,
    /// Materialize cluster for this stream's session.
    pub cluster: Option<String>,
    /// Retained batches for resume, by count and by encoded bytes.
    pub history: usize,
    pub history_bytes: usize,
    /// How many events a client may fall behind before it is resynchronised.
    pub client_queue: usize,
}

impl StreamConfig {
    /// True when a change of `other` needs a new upstream subscription.
    pub fn upstream_differs(&self, other: &StreamConfig) -> bool {
        self.source != other.source || self.key != other.key || self.cluster != other.cluster
    }
}

/// One problem found in the file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Everything wrong with a config file.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },
    #[error("{}", render_problems(.path, .problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid { problems, .. } => problems,
        }
    }
}

fn render_problems(path: &Path, problems: &[Problem]) -> String {
    let mut out = format!("{} problem(s) in {}", problems.len(), path.display());
    for p in problems {
        out.push_str(&format!(
            "\n  {}:{}:{}: {}",
            path.display(),
            p.line,
            p.column,
            p.message
        ));
    }
    out
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.to_path_buf(),
        source: Arc::new(e),
    })?;
    parse(path, &text)
}

/// The content hash used to recognise unchanged files.
pub fn digest(text: &[u8]) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// Validates config text that came from `path`.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let mut problems = Problems::new(text);
    let raw = RawConfig::from_text(text, &mut problems);
    let config = raw.and_then(|raw| raw.validate(path, &mut problems));
    let config = config.map(|c| Config {
        digest: digest(text.as_bytes()),
        ..c
    });
    match config {
        Some(c) if problems.list.is_empty() => Ok(c),
        _ => {
            // In file order, whichever pass found them.
            let mut problems = problems.list;
            problems.sort_by_key(|p| (p.line, p.column));
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            })
        }
    }
}

/// Collects problems and turns byte offsets into line and column.
struct Problems<'t> {
    text: &'t str,
    list: Vec<Problem>,
}

impl<'t> Problems<'t> {
    fn new(text: &'t str) -> Self {
        Problems {
            text,
            list: Vec::new(),
        }
    }

    fn at(&mut self, offset: usize, message: impl Into<String>) {
        let before = &self.text[..floor_char_boundary(self.text, offset)];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        self.list.push(Problem {
            line,
            column,
            message: message.into(),
        });
    }

    fn toml(&mut self, e: &toml::de::Error) {
        let offset = e.span().map_or(0, |s| s.start);
        self.at(offset, e.message().trim().to_string());
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<Spanned<String>>,
    heartbeat: Option<Spanned<String>>,
    send_timeout: Option<Spanned<String>>,
    shutdown_grace: Option<Spanned<String>>,
    max_connections: Option<Spanned<i64>>,
    max_lifetime: Option<Spanned<String>>,
    cors_origins: Option<Vec<String>>,
    head_timeout: Option<Spanned<String>>,
    keepalive_timeout: Option<Spanned<String>>,
    client_errors: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    url: Option<Spanned<String>>,
    password_env: Option<Spanned<String>>,
    password_file: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    progress_timeout: Option<Spanned<String>>,
    backoff_initial: Option<Spanned<String>>,
    backoff_max: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
    max_row_bytes: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEmbedded {
    init: Option<Spanned<String>>,
    legacy: Option<bool>,
    retain: Option<Spanned<String>>,
    tick: Option<Spanned<String>>,
    #[serde(default)]
    schedule: Vec<Spanned<RawSchedule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    every: Spanned<String>,
    sql: Spanned<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    delay: Option<Spanned<String>>,
    retry: Option<Spanned<String>>,
    event: Option<Spanned<String>>,
    history: Option<Spanned<i64>>,
    history_bytes: Option<Spanned<i64>>,
    client_queue: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStream {
    path: Spanned<String>,
    view: Option<Spanned<String>>,
    query: Option<Spanned<String>>,
    event: Option<Spanned<String>>,
    delay: Option<Spanned<String>>,
    retry: Option<Spanned<String>>,
    key: Option<Spanned<Vec<Spanned<String>>>>,
    cluster: Option<Spanned<String>>,
    history: Option<Spanned<i64>>,
    history_bytes: Option<Spanned<i64>>,
    client_queue: Option<Spanned<i64>>,
}

/// The file as written, section by section. A section that failed to deserialize is
/// `None`, and its problem is already recorded.
struct RawConfig {
    server: Option<RawServer>,
    upstream: Option<RawUpstream>,
    embedded: Option<RawEmbedded>,
    defaults: Option<RawDefaults>,
    /// `None` for an entry that failed to deserialize.
    streams: Vec<Option<RawStream>>,
}

impl RawConfig {
    fn from_text(text: &str, problems: &mut Problems<'_>) -> Option<RawConfig> {
        use toml::de::{DeTable, DeValue, ValueDeserializer};
        if text.trim().is_empty() {
            problems.at(0, "the file is empty");
            return None;
        }
        let root = match DeTable::parse(text) {
            Ok(root) => root,
            Err(e) => {
                problems.toml(&e);
                return None;
            }
        };
        let mut raw = RawConfig {
            server: Some(RawServer::default()),
            upstream: Some(RawUpstream::default()),
            embedded: Some(RawEmbedded::default()),
            defaults: Some(RawDefaults::default()),
            streams: Vec::new(),
        };
        /// Reads a table, reporting every unknown or mistyped key, not only the first.
        /// Unknown keys are dropped and the rest is read on, so the entry's other
        /// problems are reported too; a mistyped key makes the entry unreadable (its
        /// value cannot stand in for the key, and leaving it out would invent problems
        /// such as a missing `path`).
        fn section<T: for<'de> Deserialize<'de>>(
            value: Spanned<DeValue<'_>>,
            problems: &mut Problems<'_>,
        ) -> Option<T> {
            let span = value.span();
            let DeValue::Table(table) = value.get_ref() else {
                return T::deserialize(ValueDeserializer::from(value))
                    .map_err(|e| problems.toml(&e))
                    .ok();
            };
            let mut good = table.clone();
            let mut mistyped = false;
            for (key, item) in table.iter() {
                let mut alone = toml::de::DeTable::new();
                alone.insert(key.clone(), item.clone());
                let alone = Spanned::new(span.clone(), DeValue::Table(alone));
                // Alone, a key also lacks the required ones; the whole table says that.
                match T::deserialize(ValueDeserializer::from(alone)) {
                    Err(e) if !e.message().starts_with("missing field") => {
                        let message = e.message().trim();
                        let name = key.get_ref().as_ref();
                        let offset = e.span().unwrap_or_else(|| item.span()).start;
                        if message.starts_with("unknown field") {
                            problems.at(offset, message.to_string());
                            good.remove(key.get_ref().as_ref());
                        } else {
                            problems.at(offset, format!("`{name}`: {message}"));
                            mistyped = true;
                        }
                    }
                    _ => {}
                }
            }
            if mistyped {
                return None;
            }
            T::deserialize(ValueDeserializer::from(Spanned::new(
                span,
                DeValue::Table(good),
            )))
            .map_err(|e| problems.toml(&e))
            .ok()
        }
        for (key, value) in root.into_inner() {
            let name = key.get_ref().as_ref();
            match name {
                "server" => raw.server = section(value, problems),
                "upstream" => raw.upstream = section(value, problems),
                "embedded" => raw.embedded = section(value, problems),
                "defaults" => raw.defaults = section(value, problems),
                "streams" => {
                    let start = value.span().start;
                    match value.into_inner() {
                        DeValue::Array(entries) => {
                            for entry in entries {
                                raw.streams.push(section(entry, problems));
                            }
                        }
                        _ => problems.at(start, "`streams` must be an array of tables: [[streams]]"),
                    }
                }
                other => problems.at(
                    key.span().start,
                    format!(
                        "unknown section `{other}`, expected one of `server`, `upstream`, `embedded`, `defaults`, `streams`"
                    ),
                ),
            }
        }
        Some(raw)
    }

    fn validate(self, path: &Path, p: &mut Problems<'_>) -> Option<Config> {
        let base = path.parent().unwrap_or(Path::new("")).to_path_buf();
        let resolve = |s: &str| -> PathBuf {
            let candidate = PathBuf::from(s);
            if candidate.is_absolute() {
                candidate
            } else {
                base.join(candidate)
            }
        };

        let s = self.server.unwrap_or_default();
        let default_listen = SocketAddr::from(([127, 0, 0, 1], 8000));
        let listen = match &s.listen {
            None => default_listen,
            Some(l) => l.get_ref().parse::<SocketAddr>().unwrap_or_else(|_| {
                p.at(
                    l.span().start,
                    format!(
                        "`listen` must be an address like 127.0.0.1:8000, got {:?}",
                        l.get_ref()
                    ),
                );
                default_listen
            }),
        };
        let max_lifetime = duration(p, &s.max_lifetime, Duration::ZERO);
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
            client_errors: match &s.client_errors {
                None => ClientErrors::Full,
                Some(v) => {
                    match v.get_ref().as_str() {
                        "full" => ClientErrors::Full,
                        "generic" => ClientErrors::Generic,
                        other => {
                            p.at(
                            v.span().start,
                            format!("`client_errors` must be \"full\" or \"generic\", got {other:?}"),
                        );
                            ClientErrors::Full
                        }
                    }
                }
            },
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
        let defaults = StreamDefaults {
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
            if let Some(stream) = validate_stream(p, s, &defaults, &mut seen) {
                streams.push(Arc::new(stream));
            }
        }

        Some(Config {
            source: path.to_path_buf(),
            digest: 0,
            server,
            upstream,
            embedded,
            streams,
        })
    }
}

struct StreamDefaults {
    delay: Duration,
    retry: Duration,
    event: String,
    history: usize,
    history_bytes: usize,
    client_queue: usize,
}

fn validate_stream(
    p: &mut Problems<'_>,
    s: RawStream,
    d: &StreamDefaults,
    seen: &mut HashSet<String>,
) -> Option<StreamConfig> {
    let before = p.list.len();
    let path_at = s.path.span().start;
    let path = s.path.get_ref().clone();
    if !path.starts_with('/') {
        p.at(path_at, format!("path {path:?} must start with `/`"));
    } else if RESERVED_PATHS.contains(&path.as_str()) {
        p.at(path_at, format!("path {path:?} is reserved by the gateway"));
    } else if path.len() > 1 && path.ends_with('/') {
        p.at(path_at, format!("path {path:?} must not end with `/`"));
    } else if !path
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/-_.~".contains(&b))
    {
        p.at(
            path_at,
            format!("path {path:?} may only hold letters, digits and `/-_.~`"),
        );
    } else if path.contains("//") {
        p.at(path_at, format!("path {path:?} has an empty segment"));
    }
    if !seen.insert(path.clone()) {
        p.at(path_at, format!("duplicate path {path:?}"));
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
            }
            Some(Source::View(v.get_ref().clone()))
        }
        (None, Some(q)) => {
            let text = q.get_ref().trim().trim_end_matches(';').trim();
            if text.is_empty() {
                p.at(q.span().start, "`query` is empty");
            } else if separates_statements(text) {
                p.at(
                    q.span().start,
                    "`query` must be a single statement (no `;`)",
                );
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
        let mut names = Vec::new();
        for col in k.get_ref() {
            if !is_identifier(col.get_ref()) {
                p.at(
                    col.span().start,
                    format!("key column {:?} is not a plain column name", col.get_ref()),
                );
            }
            if names.contains(col.get_ref()) {
                p.at(
                    col.span().start,
                    format!("key column {:?} is listed twice", col.get_ref()),
                );
            }
            names.push(col.get_ref().clone());
        }
        names
    });
    let cluster = s.cluster.as_ref().map(|c| {
        if !is_identifier(c.get_ref()) {
            p.at(
                c.span().start,
                format!("cluster {:?} is not a plain identifier", c.get_ref()),
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
    let stream = StreamConfig {
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
    (p.list.len() == before).then_some(stream)
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
}

fn is_relation_name(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() <= 3 && parts.iter().all(|p| is_identifier(p))
}

/// Parses a duration such as `250ms`, `15s`, `2m`; `0` means zero.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(t).map_err(|e| format!("{e}"))
}

fn duration(p: &mut Problems<'_>, v: &Option<Spanned<String>>, default: Duration) -> Duration {
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

fn positive(
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

fn count(p: &mut Problems<'_>, v: &Option<Spanned<i64>>, default: usize, name: &str) -> usize {
    match v {
        None => default,
        Some(n) if *n.get_ref() >= 1 => usize::try_from(*n.get_ref()).unwrap_or(usize::MAX),
        Some(n) => {
            p.at(n.span().start, format!("`{name}` must be at least 1"));
            default
        }
    }
}

fn event_name(p: &mut Problems<'_>, v: &Option<Spanned<String>>, default: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<Config, Vec<Problem>> {
        parse(Path::new("/etc/tailgate/streams.toml"), text).map_err(|e| e.problems().to_vec())
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = check("[[streams]]\npath = \"/a\"\nview = \"v\"\n").expect("valid");
        assert_eq!(c.upstream.target, UpstreamTarget::Embedded);
        assert_eq!(c.server.listen.port(), 8000);
        let s = &c.streams[0];
        assert_eq!(s.event, "update");
        assert_eq!(s.retry, Duration::from_secs(15));
        assert_eq!(s.delay, Duration::ZERO);
        assert_eq!(s.source, Source::View("v".into()));
    }

    #[test]
    fn defaults_apply_and_streams_override() {
        let c = check(
            "[defaults]\ndelay = \"1s\"\nevent = \"msg\"\n\
             [[streams]]\npath = \"/a\"\nquery = \"SELECT 1;\"\n\
             [[streams]]\npath = \"/b\"\nview = \"s.v\"\ndelay = \"250ms\"\nevent = \"x\"\nkey = [\"id\"]\n",
        )
        .expect("valid");
        assert_eq!(c.streams[0].delay, Duration::from_secs(1));
        assert_eq!(c.streams[0].event, "msg");
        assert_eq!(c.streams[0].source, Source::Query("SELECT 1".into()));
        assert_eq!(c.streams[1].delay, Duration::from_millis(250));
        assert_eq!(c.streams[1].key, Some(vec!["id".to_string()]));
    }

    #[test]
    fn all_problems_are_reported_together_with_positions() {
        let text = "[server]\nlisten = \"127.0.0.1:8000\"\n\
                    [[streams]]\npath = \"/a\"\nview = \"v\"\ncolour = \"red\"\n\
                    [[streams]]\npath = \"/b\"\nview = \"v\"\nquery = \"SELECT 1\"\n\
                    [[streams]]\npath = \"/b\"\nview = \"w\"\n\
                    [[streams]]\npath = \"/c\"\nview = \"w\"\ndelay = \"soon\"\n\
                    [[streams]]\npath = \"/d\"\n";
        let problems = check(text).expect_err("invalid");
        let messages: Vec<String> = problems
            .iter()
            .map(|p| format!("{}:{} {}", p.line, p.column, p.message))
            .collect();
        assert_eq!(problems.len(), 5, "{messages:#?}");
        assert!(messages[0].starts_with("6:1 ") && messages[0].contains("colour"));
        assert!(messages[1].starts_with("9:8 ") && messages[1].contains("both"));
        assert!(messages[2].starts_with("12:8 ") && messages[2].contains("duplicate"));
        assert!(messages[3].starts_with("17:9 ") && messages[3].contains("bad duration"));
        assert!(messages[4].starts_with("19:8 ") && messages[4].contains("neither"));
    }

    #[test]
    fn every_problem_of_one_entry_is_reported() {
        let text = "[[streams]]\npath = \"/a\"\nview = \"v\"\n\
                    [[streams]]\npath = \"/a\"\nview = \"v\"\nquery = \"SELECT 1\"\n\
                    colour = \"red\"\ndelay = \"soon\"\n\
                    [[streams]]\npath = 5\nview = \"v\"\nretry = 5\n\
                    [server]\nheartbeat = \"often\"\nshade = 1\n";
        let problems = check(text).expect_err("invalid");
        let messages: Vec<String> = problems
            .iter()
            .map(|p| format!("{}:{} {}", p.line, p.column, p.message))
            .collect();
        for (needle, line) in [
            ("duplicate", 5),
            ("both", 6),
            ("colour", 8),
            ("bad duration", 9),
            ("`path`: invalid type", 11),
            ("`retry`: invalid type", 13),
            ("\"often\"", 15),
            ("shade", 16),
        ] {
            assert!(
                messages
                    .iter()
                    .any(|m| m.contains(needle) && m.starts_with(&format!("{line}:"))),
                "{needle} on line {line}: {messages:#?}"
            );
        }
        // Each once; nothing invented for the unreadable entry (no missing `path`).
        assert_eq!(messages.len(), 8, "{messages:#?}");
    }

    #[test]
    fn only_a_real_semicolon_separates_statements() {
        for sql in [
            "SELECT * FROM t WHERE note <> 'a;b'",
            "SELECT 'it''s; fine' AS \"a;b\" FROM t",
            "SELECT 1 -- one; two\n",
            "SELECT /* ; */ 1",
            "SELECT $$;$$, $x$ a;b $x$, $1",
            "SELECT 1 -- trailing comment",
            "SELECT E'it\\'s; ok' FROM t",
            "SELECT 'a\\', 'b' FROM t",
        ] {
            assert!(!separates_statements(sql), "{sql}");
        }
        for sql in [
            "SELECT 1; DROP TABLE t",
            "SELECT 'a'; SELECT 2",
            "SELECT 1 /* c */; SELECT 2",
            "SELECT $$x$$; SELECT 2",
            "SELECT a$b$ FROM t; DROP TABLE t",
            "SELECT $1$; DROP TABLE t",
            "SELECT E'\\''; DROP TABLE t; SELECT ''",
            "SELECT 'x'; SELECT é$$",
            "SELECT 1 --c\r; DROP TABLE t",
        ] {
            assert!(separates_statements(sql), "{sql}");
        }
    }

    #[test]
    fn syntax_errors_have_a_position() {
        let problems = check("[[streams]]\npath = \"/a\nview = \"v\"\n").expect_err("invalid");
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].line, 2);
    }

    #[test]
    fn empty_and_unknown_sections_are_rejected() {
        assert!(check("   \n").is_err());
        let p = check("[serverr]\n[[streams]]\npath = \"/a\"\nview = \"v\"\n").expect_err("bad");
        assert!(p[0].message.contains("serverr"));
    }

    #[test]
    fn secrets_never_sit_in_the_url() {
        let p = check(
            "[upstream]\nurl = \"postgres://u:hunter2@127.0.0.1:6875/materialize\"\n\
             [[streams]]\npath = \"/a\"\nview = \"v\"\n",
        )
        .expect_err("bad");
        assert!(p[0].message.contains("password"));
        for url in [
            "postgres://u@db.example:6875/materialize",
            "postgres://u@db.example:6875/materialize?sslmode=prefer",
        ] {
            let p = check(&format!(
                "[upstream]\nurl = \"{url}\"\n[[streams]]\npath = \"/a\"\nview = \"v\"\n"
            ))
            .expect_err("prefer");
            assert!(p[0].message.contains("sslmode=require"), "{url}");
        }
        let c = check(
            "[upstream]\nurl = \"postgres://u@127.0.0.1:6875/materialize?sslmode=require\"\n\
             password_env = \"MZ_PASSWORD\"\n[[streams]]\npath = \"/a\"\nview = \"v\"\n",
        )
        .expect("valid");
        assert_eq!(
            c.upstream.password,
            Some(PasswordSource::Env("MZ_PASSWORD".into()))
        );
    }

    #[test]
    fn reserved_and_malformed_names_are_rejected() {
        for (line, needle) in [
            ("path = \"/\"\nview = \"v\"", "reserved"),
            ("path = \"x\"\nview = \"v\"", "start with"),
            ("path = \"/a\"\nview = \"v; DROP TABLE t\"", "relation name"),
            (
                "path = \"/a\"\nview = \"v\"\nevent = \"snapshot\"",
                "reserved",
            ),
            (
                "path = \"/a\"\nview = \"v\"\nevent = \"a\\nb\"",
                "event name",
            ),
            ("path = \"/a\"\nview = \"v\"\nkey = []", "at least one"),
            (
                "path = \"/a\"\nquery = \"SELECT 1; SELECT 2\"",
                "single statement",
            ),
            ("path = \"/a\"\nview = \"v\"\nhistory = 0", "at least 1"),
        ] {
            let p = check(&format!("[[streams]]\n{line}\n")).expect_err(line);
            assert!(
                p.iter().any(|p| p.message.contains(needle)),
                "{line}: {p:?}"
            );
        }
    }

    #[test]
    fn upstream_change_detection() {
        let c = check("[[streams]]\npath = \"/a\"\nview = \"v\"\n").expect("valid");
        let a = (*c.streams[0]).clone();
        let mut b = a.clone();
        b.delay = Duration::from_secs(3);
        b.event = "other".into();
        assert!(!a.upstream_differs(&b));
        b.cluster = Some("serving".into());
        assert!(a.upstream_differs(&b));
    }
}
