//! Lexical checks on SQL text from the config: a tokenizer that reads strings, quoted
//! identifiers, dollar quotes and comments whole; the check that a `query` is one
//! read-only query; and the rules for plain names.

/// Words that cannot be an unquoted table, view, column or cluster name: PostgreSQL's
/// reserved keywords, those it reserves but allows as function or type names (`join`,
/// `left`, ...), and the ones Materialize always reserves (`options`, `qualify`). Lower
/// case and sorted, for binary search.
pub(super) const RESERVED_WORDS: [&str; 103] = [
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

/// What a [`SqlTokens`] token is. Strings, quoted identifiers and comments are read whole,
/// so nothing inside them ever looks like a keyword, a parenthesis or a `;`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SqlKind {
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
pub(super) struct SqlToken {
    pub(super) kind: SqlKind,
    /// Byte offsets in the scanned text.
    start: usize,
    end: usize,
}

/// The significant tokens of SQL text, following PostgreSQL's lexical rules: comments
/// and whitespace are skipped, block comments nest, `--` comments end at a newline or
/// a carriage return, `E''` strings escape with a backslash, and `$tag$` quotes.
pub(super) struct SqlTokens<'s> {
    sql: &'s str,
    at: usize,
}

pub(super) fn sql_tokens(sql: &str) -> SqlTokens<'_> {
    SqlTokens { sql, at: 0 }
}

/// The index just past the closing `quote` of a quoted text whose body starts at `i`;
/// a doubled quote is an escaped one. The end of `b` if the quote is never closed.
pub(super) fn past_quoted(b: &[u8], mut i: usize, quote: u8, backslash_escapes: bool) -> usize {
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
pub(super) struct NotAQuery {
    pub(super) at: usize,
    pub(super) message: String,
}

/// Checks that `sql` is a single query that only reads: `SELECT`, `VALUES`, `TABLE`,
/// `SHOW`, or `WITH` whose common table expressions and body are themselves such
/// queries, perhaps in parentheses. Writes hide in two places in PostgreSQL: as the
/// statement itself or a `WITH` body (`WITH d AS (DELETE ...) SELECT ...`), and as
/// `SELECT ... INTO`, which creates a table. Only the words that start a query are
/// checked, so a column named `delete` or `update_count` passes.
pub(super) fn read_only_query(sql: &str) -> Result<(), NotAQuery> {
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
pub(super) struct QueryShape<'a> {
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

pub(super) fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
}

/// Whether `name`, unquoted, is a reserved SQL word (case-insensitive).
pub(super) fn is_reserved_word(name: &str) -> bool {
    RESERVED_WORDS
        .binary_search(&name.to_ascii_lowercase().as_str())
        .is_ok()
}

pub(super) fn is_relation_name(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() <= 3 && parts.iter().all(|p| is_identifier(p))
}
