//! `streams.toml`: the raw serde mirror of the file and its validation into [`Config`].
//!
//! Loading is two steps. The text is parsed into a span-carrying TOML tree, each section
//! and each `[[streams]]` entry is deserialized on its own (with `deny_unknown_fields`),
//! and then [`RawConfig::validate`] turns the raw values into typed ones. Every problem
//! found along the way is collected, so one run reports them all, each with the file,
//! line and column (past [`MAX_LISTED`], the first are listed and the rest counted).
//! Validation does no I/O, and its time is linear in the size of the file and the
//! number of problems; reading secrets happens later, when the upstream connects.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

pub use crate::wire::ClientErrors;
use crate::wire::{RESERVED_EVENTS, RESERVED_PATHS};

/// Words that cannot be an unquoted table, view, column or cluster name: PostgreSQL's
/// reserved keywords, those it reserves but allows as function or type names (`join`,
/// `left`, ...), and the ones Materialize always reserves (`options`, `qualify`). Lower
/// case and sorted, for binary search.
const RESERVED_WORDS: [&str; 103] = [
    "all",
    "analyse",
    "analyze",
    "and",
    "any",
    "array",
    "as",
    "asc",
    "asymmetric",
    "authorization",
    "binary",
    "both",
    "case",
    "cast",
    "check",
    "collate",
    "collation",
    "column",
    "concurrently",
    "constraint",
    "create",
    "cross",
    "current_catalog",
    "current_date",
    "current_role",
    "current_schema",
    "current_time",
    "current_timestamp",
    "current_user",
    "default",
    "deferrable",
    "desc",
    "distinct",
    "do",
    "else",
    "end",
    "except",
    "false",
    "fetch",
    "for",
    "foreign",
    "freeze",
    "from",
    "full",
    "grant",
    "group",
    "having",
    "ilike",
    "in",
    "initially",
    "inner",
    "intersect",
    "into",
    "is",
    "isnull",
    "join",
    "lateral",
    "leading",
    "left",
    "like",
    "limit",
    "localtime",
    "localtimestamp",
    "natural",
    "not",
    "notnull",
    "null",
    "offset",
    "on",
    "only",
    "options",
    "or",
    "order",
    "outer",
    "overlaps",
    "placing",
    "primary",
    "qualify",
    "references",
    "returning",
    "right",
    "select",
    "session_user",
    "similar",
    "some",
    "symmetric",
    "system_user",
    "table",
    "tablesample",
    "then",
    "to",
    "trailing",
    "true",
    "union",
    "unique",
    "user",
    "using",
    "variadic",
    "verbose",
    "when",
    "where",
    "window",
    "with",
];

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

/// What a [`SqlTokens`] token is. Strings, quoted identifiers and comments are read whole,
/// so nothing inside them ever looks like a keyword, a parenthesis or a `;`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SqlKind {
    /// An unquoted word: a keyword or an identifier.
    Word,
    /// A string literal (plain, `E''` or dollar-quoted) or a quoted identifier.
    Quoted,
    Open,
    Close,
    Comma,
    Semicolon,
    /// Text that PostgreSQL and Materialize (or the development engine) read differently,
    /// so no check can vouch for what the server will see. Says how.
    Unclear(&'static str),
    /// A number, a parameter or an operator.
    Other,
}

#[derive(Debug, Clone, Copy)]
struct SqlToken {
    kind: SqlKind,
    /// Byte offsets in the scanned text.
    start: usize,
    end: usize,
}

/// The significant tokens of SQL text, following PostgreSQL's lexical rules: comments
/// and whitespace are skipped, block comments nest, `--` comments end at a newline or
/// a carriage return, `E''` strings escape with a backslash, and `$tag$` quotes.
struct SqlTokens<'s> {
    sql: &'s str,
    at: usize,
}

fn sql_tokens(sql: &str) -> SqlTokens<'_> {
    SqlTokens { sql, at: 0 }
}

/// The index just past the closing `quote` of a quoted text whose body starts at `i`;
/// a doubled quote is an escaped one. The end of `b` if the quote is never closed.
fn past_quoted(b: &[u8], mut i: usize, quote: u8, backslash_escapes: bool) -> usize {
    while i < b.len() {
        match b[i] {
            b'\\' if backslash_escapes => i += 2,
            c if c == quote && b.get(i + 1) == Some(&quote) => i += 2,
            c if c == quote => return i + 1,
            _ => i += 1,
        }
    }
    b.len()
}

impl Iterator for SqlTokens<'_> {
    type Item = SqlToken;

    fn next(&mut self) -> Option<SqlToken> {
        let b = self.sql.as_bytes();
        let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80;
        loop {
            let start = self.at;
            let c = *b.get(start)?;
            let next = b.get(start + 1).copied();
            let (kind, end) = match c {
                _ if c.is_ascii_whitespace() => {
                    self.at += 1;
                    continue;
                }
                b'-' if next == Some(b'-') => {
                    let end = b[start..]
                        .iter()
                        .position(|c| matches!(c, b'\n' | b'\r'))
                        .map_or(b.len(), |n| start + n);
                    self.at = end;
                    // Materialize and the development engine end the comment only at `\n`.
                    if b.get(end) == Some(&b'\r') && b.get(end + 1) != Some(&b'\n') {
                        let why = "a `--` comment ended by a lone carriage return (\\r) hides the rest of the line from Materialize but not from PostgreSQL; end the line with \\n";
                        (SqlKind::Unclear(why), end + 1)
                    } else {
                        continue;
                    }
                }
                b'/' if next == Some(b'*') => {
                    let mut depth = 0usize;
                    let mut i = start;
                    while i < b.len() {
                        if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                            depth += 1;
                            i += 2;
                        } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                            depth -= 1;
                            i += 2;
                            if depth == 0 {
                                break;
                            }
                        } else {
                            i += 1;
                        }
                    }
                    self.at = i.min(b.len());
                    continue;
                }
                b'\'' | b'"' => (SqlKind::Quoted, past_quoted(b, start + 1, c, false)),
                b'e' | b'E' if next == Some(b'\'') => {
                    (SqlKind::Quoted, past_quoted(b, start + 2, b'\'', true))
                }
                _ if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                    let len = b[start..].iter().position(|&c| !word(c));
                    (SqlKind::Word, len.map_or(b.len(), |n| start + n))
                }
                b'0'..=b'9' => {
                    let len = b[start..]
                        .iter()
                        .position(|&c| !(c.is_ascii_alphanumeric() || c == b'_' || c == b'.'));
                    (SqlKind::Other, len.map_or(b.len(), |n| start + n))
                }
                // A parameter such as `$1`.
                b'$' if next.is_some_and(|c| c.is_ascii_digit()) => {
                    let len = b[start + 1..].iter().position(|c| !c.is_ascii_digit());
                    (SqlKind::Other, len.map_or(b.len(), |n| start + 1 + n))
                }
                // A dollar quote, `$tag$ ... $tag$`, whose tag is empty or starts like an
                // identifier.
                b'$' => {
                    let tag_len = b[start + 1..]
                        .iter()
                        .position(|&c| !(c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80))
                        .unwrap_or(b.len() - start - 1);
                    if b.get(start + 1 + tag_len) == Some(&b'$') {
                        let tag = &self.sql[start..start + tag_len + 2];
                        let body = start + tag.len();
                        let end = self.sql[body..]
                            .find(tag)
                            .map_or(b.len(), |n| body + n + tag.len());
                        (SqlKind::Quoted, end)
                    } else {
                        // PostgreSQL refuses it; Materialize opens a dollar quote with any tag.
                        let why = "a `$` that is neither a parameter nor a dollar quote is an error in PostgreSQL but opens a quote in Materialize";
                        (SqlKind::Unclear(why), start + 1)
                    }
                }
                b'(' => (SqlKind::Open, start + 1),
                b')' => (SqlKind::Close, start + 1),
                b',' => (SqlKind::Comma, start + 1),
                b';' => (SqlKind::Semicolon, start + 1),
                _ => (SqlKind::Other, start + 1),
            };
            let end = end.min(b.len());
            self.at = end;
            return Some(SqlToken { kind, start, end });
        }
    }
}

/// Why `sql` is not one read-only query, with the byte offset in `sql` to point at.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NotAQuery {
    at: usize,
    message: String,
}

/// Checks that `sql` is a single query that only reads: `SELECT`, `VALUES`, `TABLE`,
/// `SHOW`, or `WITH` whose common table expressions and body are themselves such
/// queries, perhaps in parentheses. Writes hide in two places in PostgreSQL: as the
/// statement itself or a `WITH` body (`WITH d AS (DELETE ...) SELECT ...`), and as
/// `SELECT ... INTO`, which creates a table. Only the words that start a query are
/// checked, so a column named `delete` or `update_count` passes.
fn read_only_query(sql: &str) -> Result<(), NotAQuery> {
    let tokens: Vec<SqlToken> = sql_tokens(sql).collect();
    let refuse = |at: usize, message: String| Err(NotAQuery { at, message });
    // Where each parenthesis closes, so a group is skipped in one step whatever its depth.
    let mut closing = vec![tokens.len(); tokens.len()];
    let mut open = Vec::new();
    // `INTO` is reserved, so unquoted it is always the keyword.
    let mut into = None;
    for (i, t) in tokens.iter().enumerate() {
        match t.kind {
            SqlKind::Semicolon => {
                return refuse(
                    t.start,
                    "`query` must be a single statement (no `;`)".into(),
                );
            }
            SqlKind::Unclear(why) => return refuse(t.start, format!("`query`: {why}")),
            SqlKind::Word if into.is_none() && sql[t.start..t.end].eq_ignore_ascii_case("into") => {
                into = Some(t.start);
            }
            SqlKind::Open => open.push(i),
            SqlKind::Close => {
                if let Some(o) = open.pop() {
                    closing[o] = i;
                }
            }
            _ => {}
        }
    }
    let shape = QueryShape {
        sql,
        tokens: &tokens,
        closing,
    };
    // Token indexes where a query must start: the statement, and every subquery that
    // opens with `WITH` (its expressions could write too). Checking a `WITH` adds the
    // starts of its expressions and its body. Each start is checked once, and a group
    // is skipped in one step, so this stays linear however deep the nesting.
    let mut starts: Vec<usize> = (0..tokens.len())
        .filter(|&i| {
            tokens[i].kind == SqlKind::Open
                && tokens.get(i + 1).is_some_and(|t| shape.is_word(t, "with"))
        })
        .collect();
    let mut checked = vec![false; tokens.len() + 1];
    shape.query_at(0, true, &mut starts)?;
    checked[0] = true;
    while let Some(at) = starts.pop() {
        if !std::mem::replace(&mut checked[at], true) {
            shape.query_at(at, false, &mut starts)?;
        }
    }
    match into {
        Some(at) => refuse(
            at,
            "`query` must not use `SELECT ... INTO`, which writes a table".into(),
        ),
        None => Ok(()),
    }
}

/// A query's tokens, for checking what starts each (sub)query.
struct QueryShape<'a> {
    sql: &'a str,
    tokens: &'a [SqlToken],
    /// For the index of each `(`, the index of its `)` (the token count if unclosed).
    closing: Vec<usize>,
}

impl QueryShape<'_> {
    fn is_word(&self, t: &SqlToken, keyword: &str) -> bool {
        t.kind == SqlKind::Word && self.sql[t.start..t.end].eq_ignore_ascii_case(keyword)
    }

    fn word_at(&self, i: usize, keyword: &str) -> bool {
        self.tokens.get(i).is_some_and(|t| self.is_word(t, keyword))
    }

    fn kind_at(&self, i: usize, kind: SqlKind) -> bool {
        self.tokens.get(i).is_some_and(|t| t.kind == kind)
    }

    /// Where to point at token `i`, or at the end when the tokens have run out.
    fn offset(&self, i: usize) -> usize {
        self.tokens.get(i).map_or(self.sql.len(), |t| t.start)
    }

    /// The index after the group that opens at `i`.
    fn after_group(&self, i: usize) -> usize {
        (self.closing[i] + 1).min(self.tokens.len())
    }

    /// Checks the query expression starting at token `i`, in any number of parentheses.
    /// `SHOW` is a statement of its own, so it passes only as the `whole` query. A
    /// `WITH` adds the starts of its expressions and of its body to `starts`.
    fn query_at(
        &self,
        mut i: usize,
        whole: bool,
        starts: &mut Vec<usize>,
    ) -> Result<(), NotAQuery> {
        while self.kind_at(i, SqlKind::Open) {
            i += 1;
        }
        let Some(first) = self.tokens.get(i) else {
            return Err(NotAQuery {
                at: self.sql.len(),
                message: "`query` ends where a query should start".into(),
            });
        };
        let word = self.sql[first.start..first.end].to_ascii_uppercase();
        if first.kind == SqlKind::Word {
            match word.as_str() {
                "SELECT" | "VALUES" | "TABLE" => return Ok(()),
                "SHOW" if whole => return Ok(()),
                "WITH" => return self.with_list(i + 1, starts),
                _ => {}
            }
        }
        let what = if first.kind == SqlKind::Word {
            format!(", not `{word}`")
        } else {
            String::new()
        };
        Err(NotAQuery {
            at: first.start,
            message: format!(
                "`query` must be a read-only query (SELECT, VALUES, TABLE, SHOW, or WITH ... SELECT){what}"
            ),
        })
    }

    /// The common table expressions from token `i` (just after `WITH`): each is
    /// `name [(columns)] AS [[NOT] MATERIALIZED] (query)`, and a query follows them.
    fn with_list(&self, mut i: usize, starts: &mut Vec<usize>) -> Result<(), NotAQuery> {
        let unreadable = |i: usize| {
            NotAQuery {
            at: self.offset(i),
            message: "`query` has a WITH clause that cannot be read; expected `name [(columns)] AS (query)`".into(),
        }
        };
        // `RECURSIVE`, or Materialize's `MUTUALLY RECURSIVE [(options)]`, unless that word
        // names the first expression.
        let names = |i: usize| self.kind_at(i + 1, SqlKind::Open) || self.word_at(i + 1, "as");
        if self.word_at(i, "mutually") && !names(i) {
            if !self.word_at(i + 1, "recursive") {
                return Err(unreadable(i + 1));
            }
            i += 2;
            if self.kind_at(i, SqlKind::Open) {
                i = self.after_group(i);
            }
        } else if self.word_at(i, "recursive") && !names(i) {
            i += 1;
        }
        loop {
            if !(self.kind_at(i, SqlKind::Word) || self.kind_at(i, SqlKind::Quoted)) {
                return Err(unreadable(i));
            }
            i += 1;
            if self.kind_at(i, SqlKind::Open) {
                i = self.after_group(i);
            }
            if !self.word_at(i, "as") {
                return Err(unreadable(i));
            }
            i += 1;
            if self.word_at(i, "not") {
                i += 1;
            }
            if self.word_at(i, "materialized") {
                i += 1;
            }
            if !self.kind_at(i, SqlKind::Open) {
                return Err(unreadable(i));
            }
            starts.push(i);
            i = self.after_group(i);
            if !self.kind_at(i, SqlKind::Comma) {
                starts.push(i);
                return Ok(());
            }
            i += 1;
        }
    }
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

/// How many problems an error lists, in file order; the rest are only counted, so a
/// file with a problem on each of its 100,000 entries still gives a readable report.
pub const MAX_LISTED: usize = 100;

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
    #[error("{}", render_problems(.path, .problems, *.total))]
    Invalid {
        path: PathBuf,
        /// The first [`MAX_LISTED`] problems in file order.
        problems: Vec<Problem>,
        /// How many problems the file has in all.
        total: usize,
    },
}

impl ConfigError {
    /// The problems listed: all of them, or the first [`MAX_LISTED`].
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid { problems, .. } => problems,
        }
    }

    /// How many problems the file has, listed or not.
    pub fn total(&self) -> usize {
        match self {
            ConfigError::Read { .. } => 0,
            ConfigError::Invalid { total, .. } => *total,
        }
    }
}

fn render_problems(path: &Path, problems: &[Problem], total: usize) -> String {
    let mut out = format!("{} problem(s) in {}", thousands(total), path.display());
    for p in problems {
        out.push_str(&format!(
            "\n  {}:{}:{}: {}",
            path.display(),
            p.line,
            p.column,
            p.message
        ));
    }
    match total.saturating_sub(problems.len()) {
        0 => {}
        1 => out.push_str("\n  ... and 1 more problem"),
        more => out.push_str(&format!("\n  ... and {} more problems", thousands(more))),
    }
    out
}

/// `39900` as `39,900`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(d);
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
        Some(c) if problems.is_empty() => Ok(c),
        _ => Err(problems.into_error(path)),
    }
}

/// Collects problems by byte offset. Lines and columns are worked out only at the end,
/// for the problems listed, in one pass over the text: finding each from the start of
/// the file made validation quadratic in the number of problems.
struct Problems<'t> {
    text: &'t str,
    found: Vec<(usize, String)>,
}

impl<'t> Problems<'t> {
    fn new(text: &'t str) -> Self {
        Problems {
            text,
            found: Vec::new(),
        }
    }

    fn len(&self) -> usize {
        self.found.len()
    }

    fn is_empty(&self) -> bool {
        self.found.is_empty()
    }

    fn at(&mut self, offset: usize, message: impl Into<String>) {
        let offset = floor_char_boundary(self.text, offset);
        self.found.push((offset, message.into()));
    }

    /// The first [`MAX_LISTED`] problems in file order, whichever pass found them (the
    /// sort is stable, so problems at one place keep the order they were found in).
    fn into_error(self, path: &Path) -> ConfigError {
        let total = self.found.len();
        let mut found = self.found;
        found.sort_by_key(|(offset, _)| *offset);
        found.truncate(MAX_LISTED);
        let (mut line, mut column, mut at) = (1, 1, 0);
        let problems = found
            .into_iter()
            .map(|(offset, message)| {
                let passed = &self.text[at..offset];
                match passed.rfind('\n') {
                    Some(last) => {
                        line += passed.bytes().filter(|&b| b == b'\n').count();
                        column = passed[last + 1..].chars().count() + 1;
                    }
                    None => column += passed.chars().count(),
                }
                at = offset;
                Problem {
                    line,
                    column,
                    message,
                }
            })
            .collect();
        ConfigError::Invalid {
            path: path.to_path_buf(),
            problems,
            total,
        }
    }

    /// A problem at byte `inner` of the string value `value`.
    fn inside(&mut self, value: &Spanned<String>, inner: usize, message: impl Into<String>) {
        let offset = string_offset(self.text, value.span(), value.get_ref(), inner);
        self.at(offset, message);
    }

    fn toml(&mut self, e: &toml::de::Error) {
        let offset = e.span().map_or(0, |s| s.start);
        self.at(offset, e.message().trim().to_string());
    }
}

/// The offset in the file `text` of byte `inner` of the string `value`, written at
/// `span`. Exact where the source up to there reads as the value itself; an escape or
/// a line-ending backslash before it (or a CRLF the parser normalised) shifts the two,
/// and then the start of the value stands in.
fn string_offset(text: &str, span: Range<usize>, value: &str, inner: usize) -> usize {
    let raw = text.get(span.clone()).unwrap_or_default();
    let (delimiter, escapes) = match raw.as_bytes() {
        [b'"', b'"', b'"', ..] => (3, true),
        [b'\'', b'\'', b'\'', ..] => (3, false),
        [b'"', ..] => (1, true),
        [b'\'', ..] => (1, false),
        _ => return span.start,
    };
    let mut start = delimiter;
    // A newline right after the opening of a multi-line string is not part of it.
    if delimiter == 3 {
        if raw[start..].starts_with("\r\n") {
            start += 2;
        } else if raw[start..].starts_with('\n') {
            start += 1;
        }
    }
    let source = raw.get(start..start + inner);
    match (source, value.get(..inner)) {
        (Some(a), Some(b)) if a == b && !(escapes && a.contains('\\')) => {
            span.start + start + inner
        }
        _ => span.start,
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
            // Most tables read whole; only the others are taken apart key by key.
            if let Ok(read) = T::deserialize(ValueDeserializer::from(value.clone())) {
                return Some(read);
            }
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
    let before = p.len();
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
    (p.len() == before).then_some(stream)
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
}

/// Whether `name`, unquoted, is a reserved SQL word (case-insensitive).
fn is_reserved_word(name: &str) -> bool {
    RESERVED_WORDS
        .binary_search(&name.to_ascii_lowercase().as_str())
        .is_ok()
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

    /// Whether `sql` holds a `;` outside literals, quoted identifiers and comments.
    fn separates_statements(sql: &str) -> bool {
        sql_tokens(sql).any(|t| t.kind == SqlKind::Semicolon)
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
    fn read_only_queries_pass() {
        for sql in [
            "SELECT 1",
            "select * from t",
            "(SELECT 1) UNION (SELECT 2)",
            "((VALUES (1), (2)))",
            "TABLE t",
            "SHOW clusters",
            "/* c */ -- c\n SELECT 1",
            "/* a /* nested */ DELETE */ SELECT 1",
            "WITH a AS (SELECT 1) SELECT * FROM a",
            "WITH RECURSIVE r(n) AS (VALUES (1) UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT * FROM r",
            "WITH MUTUALLY RECURSIVE (RETURN AT RECURSION LIMIT 10) a (x int) AS (SELECT 1), b (y int) AS (SELECT x FROM a) SELECT * FROM b",
            "WITH a AS MATERIALIZED (SELECT 1), b AS NOT MATERIALIZED (TABLE a) (VALUES (1))",
            "WITH \"q\" AS ((WITH r AS (SELECT 1) TABLE r)) TABLE \"q\"",
            "WITH recursive AS (SELECT 1) SELECT * FROM recursive",
            "SELECT \"delete\" FROM t",
            "SELECT update_count FROM t",
            "SELECT 'DELETE' AS x, $$INSERT$$, $t$ ; $t$, E'\\' DELETE', \"into\"",
            "SELECT delete FROM t",
            "SELECT * FROM (WITH a AS (SELECT 1) SELECT * FROM a) s WHERE x IN (VALUES (1))",
            "SELECT $1, x FROM t -- DELETE\r\nWHERE y",
            "SELECT ts FROM t WITH ORDINALITY",
        ] {
            assert_eq!(read_only_query(sql), Ok(()), "{sql}");
        }
    }

    #[test]
    fn writes_and_other_statements_are_refused_where_they_start() {
        for (sql, at) in [
            ("DELETE FROM items", "DELETE"),
            ("  delete from items", "delete"),
            ("((DELETE FROM t))", "DELETE"),
            ("INSERT INTO t VALUES (1)", "INSERT"),
            ("UPDATE t SET a = 1", "UPDATE"),
            ("MERGE INTO t USING s ON true WHEN MATCHED THEN DELETE", "MERGE"),
            ("DROP TABLE t", "DROP"),
            ("EXPLAIN SELECT 1", "EXPLAIN"),
            ("SUBSCRIBE t", "SUBSCRIBE"),
            ("'SELECT'", "'SELECT'"),
            ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", "DELETE"),
            ("WITH a AS (SELECT 1), d AS ((UPDATE t SET a = 1 RETURNING a)) SELECT 1", "UPDATE"),
            ("WITH a AS (SELECT 1) DELETE FROM t", "DELETE"),
            ("WITH RECURSIVE d AS (INSERT INTO t VALUES (1) RETURNING *) TABLE d", "INSERT"),
            ("WITH a AS (SHOW clusters) SELECT 1", "SHOW"),
            ("SELECT * FROM (WITH d AS (DELETE FROM t RETURNING *) SELECT 1) s", "DELETE"),
            ("WITH a AS (SELECT * FROM (WITH b AS (MERGE INTO t USING s ON true WHEN MATCHED THEN DELETE) SELECT 1) s) TABLE a", "MERGE"),
            ("SELECT * INTO copy FROM t", "INTO"),
            ("/* SELECT */ DELETE FROM t", "DELETE"),
            ("/* /* */ SELECT 1 */ DELETE FROM t", "DELETE"),
            ("-- SELECT\nDELETE FROM t", "DELETE"),
            ("-- c\rSELECT 1 --\nDELETE FROM t", "-- c\r"),
            ("SELECT $x FROM t", "$x"),
            ("WITH (SELECT 1) SELECT 1", "(SELECT"),
            ("WITH a AS SELECT 1", "SELECT"),
            ("WITH a AS (SELECT 1)", ""),
            ("(((", ""),
            ("SELECT 1; DELETE FROM t", "; DELETE"),
        ] {
            let e = read_only_query(sql).expect_err(sql);
            assert!(sql[e.at..].starts_with(at), "{sql}: at {}: {}", e.at, e.message);
            assert!(at.is_empty() == (e.at == sql.len()), "{sql}: {}", e.message);
        }
        let e = read_only_query("DELETE FROM t").expect_err("delete");
        assert!(
            e.message.contains("read-only query") && e.message.contains("`DELETE`"),
            "{}",
            e.message
        );
    }

    #[test]
    fn a_refused_query_points_at_its_keyword_in_the_file() {
        let position = |query: &str| {
            let text = format!("[[streams]]\npath = \"/a\"\nquery = {query}\n");
            let p = check(&text).expect_err(query);
            assert_eq!(p.len(), 1, "{p:?}");
            (p[0].line, p[0].column)
        };
        assert_eq!(position("\"DELETE FROM t\""), (3, 10));
        assert_eq!(position("'  delete from t'"), (3, 12));
        assert_eq!(position("\"DELETE FROM t WHERE a = \\\"x\\\"\""), (3, 10));
        assert_eq!(
            position("\"\"\"\nWITH d AS (\n  DELETE FROM t RETURNING *)\nSELECT 1\"\"\""),
            (5, 3)
        );
        assert_eq!(
            position("'''\nWITH d AS (\n  DELETE FROM t RETURNING *)\nSELECT 1'''"),
            (5, 3)
        );
        assert_eq!(position("\"SELECT 1; DROP TABLE t\""), (3, 18));
        // An escape before the keyword shifts source and value: the value's start stands in.
        assert_eq!(
            position("\"WITH \\\"d\\\" AS (DELETE FROM t RETURNING *) SELECT 1\""),
            (3, 9)
        );
        assert_eq!(position("\"\\tDELETE FROM t\""), (3, 9));
    }

    /// Line and column of byte `offset`, counted from the start of `text`.
    fn naive_position(text: &str, offset: usize) -> (usize, usize) {
        let before = &text[..offset];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, column)
    }

    #[test]
    fn positions_are_right_for_many_problems_on_many_lines_and_on_one() {
        // Non-ASCII before each problem: columns count characters, not bytes.
        let n = 60;
        let mut tables = String::new();
        let mut inline = String::from("streams = [");
        for i in 0..n {
            tables.push_str(&format!(
                "[[streams]] # é\npath = \"/s{i}\"\nview = \"v\"\ndelay = \"soon\"\n"
            ));
            inline.push_str(&format!(
                "{{ path = \"/s{i}\", query = \"SELECT 'é'\", delay = \"soon\" }}, "
            ));
        }
        inline.push_str("]\n");
        for text in [tables, inline] {
            let p = check(&text).expect_err("invalid");
            assert_eq!(p.len(), n);
            let expected: Vec<(usize, usize)> = text
                .match_indices("\"soon\"")
                .map(|(offset, _)| naive_position(&text, offset))
                .collect();
            let got: Vec<(usize, usize)> = p.iter().map(|p| (p.line, p.column)).collect();
            assert_eq!(got, expected);
        }
    }

    #[test]
    fn past_a_hundred_problems_the_first_are_listed_and_the_rest_counted() {
        let n = 4_000;
        let mut text = String::new();
        for i in 0..n {
            text.push_str(&format!(
                "[[streams]]\npath = \"/s{i}\"\nview = \"v\"\ndelay = \"soon\"\n"
            ));
        }
        // Found in another order than the file's: the section first, then the streams.
        text.push_str("[server]\nheartbeat = \"often\"\n");
        let e = parse(Path::new("big.toml"), &text).expect_err("invalid");
        assert_eq!(e.total(), n + 1);
        let lines: Vec<usize> = e.problems().iter().map(|p| p.line).collect();
        assert_eq!(
            lines,
            (0..MAX_LISTED).map(|i| 4 * i + 4).collect::<Vec<_>>()
        );
        let report = e.to_string();
        assert!(
            report.starts_with("4,001 problem(s) in big.toml\n  big.toml:4:9: bad duration"),
            "{}",
            &report[..200]
        );
        assert!(
            report.ends_with("\n  ... and 3,901 more problems"),
            "{}",
            &report[report.len() - 200..]
        );
        assert_eq!(report.lines().count(), 1 + MAX_LISTED + 1);

        let e = parse(Path::new("a.toml"), "[server]\nheartbeat = \"often\"\n").expect_err("bad");
        assert_eq!((e.total(), e.problems().len()), (1, 1));
        assert!(!e.to_string().contains("more problem"));
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
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
    fn reserved_words_are_refused_as_names() {
        assert!(
            RESERVED_WORDS.windows(2).all(|w| w[0] < w[1]),
            "sorted, unique"
        );
        for (entry, line, column, word) in [
            ("view = \"select\"", 3, 9, "select"),
            ("view = \"public.Order\"", 3, 16, "Order"),
            ("view = \"v\"\nkey = [\"id\", \"USER\"]", 4, 14, "USER"),
            ("view = \"v\"\ncluster = \"default\"", 4, 11, "default"),
            ("view = \"v\"\nkey = [\"join\"]", 4, 8, "join"),
        ] {
            let p = check(&format!("[[streams]]\npath = \"/a\"\n{entry}\n")).expect_err(entry);
            assert_eq!(p.len(), 1, "{entry}: {p:?}");
            assert_eq!((p[0].line, p[0].column), (line, column), "{entry}: {p:?}");
            assert!(
                p[0].message.contains("reserved SQL word") && p[0].message.contains(word),
                "{entry}: {p:?}"
            );
        }
        // Words that merely contain or resemble one, and unreserved keywords, pass.
        check(
            "[[streams]]\npath = \"/a\"\nview = \"orders.selection\"\n\
             key = [\"user_id\", \"delete\", \"key\"]\ncluster = \"serving\"\n",
        )
        .expect("valid");
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
