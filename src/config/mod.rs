//! `streams.toml`: the raw serde mirror of the file and its validation into [`Config`].
//!
//! Loading is two steps. The text is parsed into a span-carrying TOML tree, each section
//! and each `[[streams]]` entry is deserialized on its own (with `deny_unknown_fields`),
//! and then validation (`validate`) turns the raw values into typed ones. Every problem
//! found along the way is collected, so one run reports them all, each with the file,
//! line and column (past [`MAX_LISTED`], the first are listed and the rest counted).
//! Validation does no I/O but one: with `[server] tls`, the certificate and key files
//! are read and checked as a pair (parse, the key is the certificate's), so a start,
//! `tailgate check` and a reload refuse a pair the listener could not serve. Its time
//! is linear in the size of the file and the number of problems; reading secrets
//! happens later, when the upstream connects.
//!
//! - `raw`: the serde mirror of the file and reading it section by section.
//! - `validate`: raw values into typed ones.
//! - `sql`: the lexical checks on SQL text from the file (one read-only query, names).
//! - `problems`: collecting problems and placing them by line and column.

mod auth;
mod problems;
mod raw;
mod sql;
#[cfg(test)]
mod tests;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use crate::tls::PairFiles;
pub use crate::wire::ClientErrors;
use problems::Problems;
pub use problems::{ConfigError, Problem, MAX_LISTED};
use raw::RawConfig;

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
    pub auth: AuthConfig,
    pub streams: Vec<Arc<StreamConfig>>,
}

/// Who may open which stream: `[auth]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// Where a request's token is looked for, in order.
    pub token_sources: Vec<TokenSource>,
    /// Clock skew allowed for `exp` and `nbf`.
    pub leeway: Duration,
    pub issuers: Vec<IssuerConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Every stream is public.
    None,
    /// Streams need a valid JWT unless they are `public`.
    Jwt,
}

/// Where a token may come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer <token>`.
    Header,
    /// A cookie of this name.
    Cookie(String),
    /// A query parameter of this name (opt-in: URLs end up in logs and histories).
    Query(String),
}

/// One trusted token issuer.
#[derive(Debug, Clone, PartialEq)]
pub struct IssuerConfig {
    /// Matched exactly against the token's `iss`.
    pub iss: String,
    /// The token's `aud` must hold one of these.
    pub audience: Vec<String>,
    /// The algorithms this issuer signs with; a token's own `alg` must be one of
    /// them and fit the key.
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    pub keys: KeySource,
}

/// Where an issuer's verification keys come from.
#[derive(Debug, Clone, PartialEq)]
pub enum KeySource {
    /// A JWKS document on disk, re-read when it changes.
    JwksFile(PathBuf),
    /// A JWKS document fetched at start, every `refresh`, and (at most every 30 s) when
    /// a token names a key it does not hold.
    JwksUrl { url: String, refresh: Duration },
    /// One public key (RSA, EC or Ed25519), PEM.
    PublicKeyFile(PathBuf),
    /// An HMAC secret from an environment variable.
    SecretEnv(String),
    /// An HMAC secret from a file (trailing newline ignored).
    SecretFile(PathBuf),
}

/// Which tokens a stream admits: the claim at `claim` (a JSON Pointer) equals one of
/// `any_of`, or is an array holding one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorize {
    pub claim: String,
    pub any_of: Vec<String>,
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
    /// Where the operator's routes (`/metrics`, `/livez`, `/readyz`, the full `/`
    /// listing) are served; unset serves them on `listen`.
    pub admin_listen: Option<SocketAddr>,
    /// Log lines as text or as one JSON object per line.
    pub log_format: LogFormat,
    /// Open streams one client address may hold; 0 is no limit.
    pub max_connections_per_ip: usize,
    /// Peers whose `X-Forwarded-For` names the client; anyone else is the client.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The `retry:` an overloaded event-stream request is told (jittered), so the
    /// browser comes back later instead of giving up.
    pub overload_retry: Duration,
    /// Send `Access-Control-Allow-Credentials: true` to the listed origins, so pages
    /// on them can authenticate with a cookie.
    pub cors_credentials: bool,
    /// Streams one `/_tailgate/mux` request may carry.
    pub mux_max_streams: usize,
    /// Serve HTTPS (HTTP/2 and HTTP/1.1 by ALPN) on `listen` with this certificate and
    /// key; the files are re-read when they change.
    pub tls: Option<PairFiles>,
    /// Concurrent streams one HTTP/2 connection may open.
    pub http2_max_streams: u32,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    /// One JSON object per line: time, level, target, message and the fields.
    Json,
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

impl From<&str> for StreamPath {
    /// A path as written: validation is what makes a configured one.
    fn from(path: &str) -> StreamPath {
        StreamPath(path.to_string())
    }
}

impl StreamPath {
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
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    View(String),
    Query(String),
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
    /// Open to anyone, even with `[auth] mode = "jwt"`.
    pub public: bool,
    /// What a token must hold to open the stream (with `[auth] mode = "jwt"`).
    pub authorize: Option<Authorize>,
    /// The path's `{name}` parameters, in order: columns a client picks its
    /// partition by.
    pub params: Vec<String>,
    /// Columns a client may filter on with its query string.
    pub filters: Vec<String>,
    /// The only columns ever sent; all of them when unset.
    pub columns: Option<Vec<String>>,
    /// The column a token's claim always restricts.
    pub scope: Option<Scope>,
    /// Channels (distinct partition and filter sets with clients) a scoped stream
    /// may hold at once.
    pub max_partitions: usize,
}

/// `scope = { column, claim }`: the rows a client sees are those whose `column`
/// equals its token's claim at the JSON Pointer `claim` (one of them, for an array).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub column: String,
    pub claim: String,
}

impl StreamConfig {
    /// True when a change of `other` needs a new upstream subscription.
    pub fn upstream_differs(&self, other: &StreamConfig) -> bool {
        self.source != other.source || self.key != other.key || self.cluster != other.cluster
    }

    /// True when `other` splits or shapes rows differently, so clients' channels
    /// cannot carry over.
    pub fn shape_differs(&self, other: &StreamConfig) -> bool {
        self.params != other.params
            || self.filters != other.filters
            || self.columns != other.columns
            || self.scope != other.scope
    }

    /// Whether clients see a part of the view: a template, query filters or a scope.
    pub fn is_scoped(&self) -> bool {
        !self.params.is_empty() || !self.filters.is_empty() || self.scope.is_some()
    }

    /// The columns rows are partitioned by: the template's parameters, then the
    /// scope's column.
    pub fn partition_columns(&self) -> Vec<String> {
        let mut cols = self.params.clone();
        cols.extend(self.scope.as_ref().map(|s| s.column.clone()));
        cols
    }
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
        Some(c) if problems.is_empty() => Ok(c),
        _ => Err(problems.into_error(path)),
    }
}

/// Parses a duration such as `250ms`, `15s`, `2m`; `0` means zero.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(t).map_err(|e| format!("{e}"))
}
