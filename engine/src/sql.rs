//! SQL text: tokenizing, splitting, parsing the Materialize-specific statements
//! (SUBSCRIBE, TAIL, DECLARE, FETCH, CLOSE, COPY, SET, SHOW, transactions) and
//! translating the rest to SQLite.
//!
//! Wherever Materialize takes only a query (SUBSCRIBE, COPY, DECLARE, views,
//! CTEs) the parser checks that it is one, so no statement that writes runs as
//! a read. Everything not Materialize-specific is passed to SQLite after a
//! light rewrite ([`translate`]): schema qualifiers dropped, `x::type` turned
//! into casts, `/` turned into `mz_div` so division by zero is an error as in
//! Materialize, `$n` parameters into `?n`. This module is pure; it spawns
//! nothing.

use std::time::Duration;

use super::error::SqlError;
use super::value::PgType;

/// One lexical token.
#[derive(Clone, Debug, PartialEq)]
pub enum Tok {
    /// Unquoted identifier or keyword, as written.
    Word(String),
    /// Double-quoted identifier, unescaped.
    Quoted(String),
    /// String literal content, unescaped.
    Str(String),
    Num(String),
    /// `$n` parameter.
    Param(u32),
    Op(String),
    LParen,
    RParen,
    Comma,
    Semi,
    Dot,
}

#[derive(Clone, Debug)]
pub struct Token {
    pub tok: Tok,
    pub start: usize,
    pub end: usize,
}

impl Token {
    pub fn is_word(&self, w: &str) -> bool {
        matches!(&self.tok, Tok::Word(x) if x.eq_ignore_ascii_case(w))
    }

    /// Identifier text, folded to lower case unless quoted.
    pub fn ident(&self) -> Option<String> {
        match &self.tok {
            Tok::Word(w) => Some(w.to_ascii_lowercase()),
            Tok::Quoted(q) => Some(q.clone()),
            _ => None,
        }
    }
}

pub fn tokenize(sql: &str) -> Result<Vec<Token>, SqlError> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c == b'-' && b.get(i + 1) == Some(&b'-') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
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
            if depth != 0 {
                return Err(SqlError::syntax("unterminated /* comment"));
            }
            continue;
        }
        let escape_string = (c == b'e' || c == b'E') && b.get(i + 1) == Some(&b'\'');
        if c == b'\'' || escape_string {
            if escape_string {
                i += 1;
            }
            i += 1;
            let mut s = Vec::new();
            loop {
                match b.get(i) {
                    None => return Err(SqlError::syntax("unterminated quoted string")),
                    Some(b'\'') if b.get(i + 1) == Some(&b'\'') => {
                        s.push(b'\'');
                        i += 2;
                    }
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if escape_string => {
                        let e = b.get(i + 1).copied().unwrap_or(b'\\');
                        s.push(match e {
                            b'n' => b'\n',
                            b't' => b'\t',
                            b'r' => b'\r',
                            b'b' => 8,
                            b'f' => 12,
                            other => other,
                        });
                        i += 2;
                    }
                    Some(&x) => {
                        s.push(x);
                        i += 1;
                    }
                }
            }
            out.push(Token {
                tok: Tok::Str(String::from_utf8_lossy(&s).into_owned()),
                start,
                end: i,
            });
            continue;
        }
        if c == b'"' {
            i += 1;
            let mut s = Vec::new();
            loop {
                match b.get(i) {
                    None => return Err(SqlError::syntax("unterminated quoted identifier")),
                    Some(b'"') if b.get(i + 1) == Some(&b'"') => {
                        s.push(b'"');
                        i += 2;
                    }
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(&x) => {
                        s.push(x);
                        i += 1;
                    }
                }
            }
            out.push(Token {
                tok: Tok::Quoted(String::from_utf8_lossy(&s).into_owned()),
                start,
                end: i,
            });
            continue;
        }
        if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
            while i < b.len()
                && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'$' || b[i] >= 0x80)
            {
                i += 1;
            }
            out.push(Token {
                tok: Tok::Word(sql[start..i].to_owned()),
                start,
                end: i,
            });
            continue;
        }
        if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(|d| d.is_ascii_digit())) {
            while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
                i += 1;
            }
            if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
                let mut j = i + 1;
                if j < b.len() && (b[j] == b'+' || b[j] == b'-') {
                    j += 1;
                }
                if j < b.len() && b[j].is_ascii_digit() {
                    i = j;
                    while i < b.len() && b[i].is_ascii_digit() {
                        i += 1;
                    }
                }
            }
            out.push(Token {
                tok: Tok::Num(sql[start..i].to_owned()),
                start,
                end: i,
            });
            continue;
        }
        if c == b'$' && b.get(i + 1).is_some_and(|d| d.is_ascii_digit()) {
            i += 1;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            let n = sql[start + 1..i]
                .parse()
                .map_err(|_| SqlError::syntax("bad parameter number"))?;
            out.push(Token {
                tok: Tok::Param(n),
                start,
                end: i,
            });
            continue;
        }
        let tok = match c {
            b'(' => Tok::LParen,
            b')' => Tok::RParen,
            b',' => Tok::Comma,
            b';' => Tok::Semi,
            b'.' => Tok::Dot,
            _ => {
                const OPS: [&str; 12] = [
                    "::", "<=", ">=", "<>", "!=", "||", "->>", "->", "#>>", "#>", "@>", "<@",
                ];
                let rest = &sql[i..];
                let op = OPS
                    .iter()
                    .filter(|o| rest.starts_with(**o))
                    .max_by_key(|o| o.len());
                match op {
                    Some(op) => {
                        i += op.len();
                        out.push(Token {
                            tok: Tok::Op((*op).to_owned()),
                            start,
                            end: i,
                        });
                        continue;
                    }
                    None => {
                        let ch = rest.chars().next().unwrap_or(' ');
                        i += ch.len_utf8();
                        out.push(Token {
                            tok: Tok::Op(ch.to_string()),
                            start,
                            end: i,
                        });
                        continue;
                    }
                }
            }
        };
        i += 1;
        out.push(Token { tok, start, end: i });
    }
    Ok(out)
}

/// Splits a query string into statements at top-level semicolons.
pub fn split_statements(sql: &str) -> Result<Vec<String>, SqlError> {
    let toks = tokenize(sql)?;
    let mut out = Vec::new();
    let mut first: Option<usize> = None;
    let mut last = 0;
    for t in &toks {
        if t.tok == Tok::Semi {
            if let Some(f) = first.take() {
                out.push(sql[f..last].to_owned());
            }
        } else {
            first.get_or_insert(t.start);
            last = t.end;
        }
    }
    if let Some(f) = first {
        out.push(sql[f..last].to_owned());
    }
    Ok(out)
}

/// A parsed `SUBSCRIBE` / `TAIL`.
#[derive(Clone, Debug, PartialEq)]
pub struct SubscribeStmt {
    pub relation: Relation,
    /// `ENVELOPE UPSERT (KEY (...))` key columns.
    pub upsert_key: Option<Vec<String>>,
    pub progress: bool,
    pub snapshot: bool,
    pub as_of: Option<AsOf>,
    pub up_to: Option<u64>,
    /// Parsed from `TAIL` (legacy output rules).
    pub legacy: bool,
    pub text: String,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Relation {
    Name(String),
    Query(String),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AsOf {
    pub ts: u64,
    pub at_least: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct FetchStmt {
    pub cursor: String,
    /// `None` = ALL.
    pub count: Option<u64>,
    pub timeout: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum CursorQuery {
    Subscribe(SubscribeStmt),
    Select(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropKind {
    Table,
    View,
    MaterializedView,
    Index,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Stmt {
    Begin,
    Commit,
    Rollback,
    Set {
        name: String,
        value: Option<String>,
    },
    Show {
        name: String,
    },
    Subscribe(SubscribeStmt),
    Declare {
        name: String,
        query: CursorQuery,
    },
    Fetch(FetchStmt),
    Close {
        name: Option<String>,
    },
    CopySubscribe(SubscribeStmt),
    CopySelect(String),
    CreateTable {
        name: String,
        sql: String,
    },
    CreateView {
        name: String,
        body: String,
        materialized: bool,
        replace: bool,
    },
    CreateIndex,
    Drop {
        kind: DropKind,
        names: Vec<String>,
        if_exists: bool,
        cascade: bool,
    },
    Write {
        sql: String,
        tag: &'static str,
    },
    Select {
        sql: String,
    },
    Discard,
}

/// Cursor over tokens with keyword helpers.
struct P<'a> {
    sql: &'a str,
    toks: &'a [Token],
    i: usize,
}

impl<'a> P<'a> {
    fn peek(&self) -> Option<&'a Token> {
        self.toks.get(self.i)
    }

    fn peek_word(&self, w: &str) -> bool {
        self.peek().is_some_and(|t| t.is_word(w))
    }

    fn eat_word(&mut self, w: &str) -> bool {
        if self.peek_word(w) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn expect_word(&mut self, w: &str) -> Result<(), SqlError> {
        if self.eat_word(w) {
            Ok(())
        } else {
            Err(self.unexpected(&format!("expected {}", w.to_uppercase())))
        }
    }

    fn eat(&mut self, tok: &Tok) -> bool {
        if self.peek().is_some_and(|t| &t.tok == tok) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, tok: &Tok, what: &str) -> Result<(), SqlError> {
        if self.eat(tok) {
            Ok(())
        } else {
            Err(self.unexpected(&format!("expected {what}")))
        }
    }

    fn unexpected(&self, what: &str) -> SqlError {
        match self.peek() {
            Some(t) => SqlError::syntax(format!("{what}, found {}", &self.sql[t.start..t.end])),
            None => SqlError::syntax(format!("{what}, found EOF")),
        }
    }

    fn ident(&mut self) -> Result<String, SqlError> {
        match self.peek().and_then(|t| t.ident()) {
            Some(id) => {
                self.i += 1;
                Ok(id)
            }
            None => Err(self.unexpected("expected identifier")),
        }
    }

    /// A possibly qualified name; only the last part is kept (one schema).
    fn object_name(&mut self) -> Result<String, SqlError> {
        let mut name = self.ident()?;
        while self.eat(&Tok::Dot) {
            name = self.ident()?;
        }
        Ok(name)
    }

    /// The query in the parenthesis group at the current `(`, checked and
    /// rewritten by [`query_text`]; moves past the group.
    fn group_query(&mut self) -> Result<String, SqlError> {
        let open = self.i;
        let end =
            group_end(self.toks, open).ok_or_else(|| SqlError::syntax("unbalanced parentheses"))?;
        self.i = end;
        query_text(self.sql, self.toks, open + 1, end - 1)
    }

    /// The query from the current token to the end of the statement, checked
    /// and rewritten by [`query_text`].
    fn rest_query(&mut self) -> Result<String, SqlError> {
        let start = self.i;
        self.i = self.toks.len();
        query_text(self.sql, self.toks, start, self.toks.len())
    }

    fn at_end(&self) -> bool {
        self.i >= self.toks.len()
    }

    fn rest_text(&self) -> &'a str {
        match self.peek() {
            Some(t) => &self.sql[t.start..],
            None => "",
        }
    }

    fn expect_end(&self) -> Result<(), SqlError> {
        if self.at_end() {
            Ok(())
        } else {
            Err(self.unexpected("expected end of statement"))
        }
    }
}

/// Parses one statement. `legacy` selects the v0.26 dialect (TAIL instead of
/// SUBSCRIBE).
pub fn parse(sql: &str, legacy: bool) -> Result<Stmt, SqlError> {
    let toks = tokenize(sql)?;
    let mut p = P {
        sql,
        toks: &toks,
        i: 0,
    };
    let Some(first) = p.peek() else {
        return Err(SqlError::syntax("empty statement"));
    };
    let Tok::Word(w) = &first.tok else {
        if first.tok == Tok::LParen {
            return Ok(Stmt::Select {
                sql: p.rest_query()?,
            });
        }
        return Err(p.unexpected("expected statement"));
    };
    let w = w.to_ascii_lowercase();
    match w.as_str() {
        "begin" | "start" => Ok(Stmt::Begin),
        "commit" | "end" => Ok(Stmt::Commit),
        "rollback" | "abort" => Ok(Stmt::Rollback),
        "set" | "reset" => parse_set(&mut p, w == "reset"),
        "show" => {
            p.i += 1;
            let mut name = p.ident()?;
            if name == "transaction" && p.eat_word("isolation") {
                p.expect_word("level")?;
                name = "transaction_isolation".to_owned();
            } else if name == "time" && p.eat_word("zone") {
                name = "timezone".to_owned();
            }
            Ok(Stmt::Show { name })
        }
        "subscribe" | "tail" => {
            let s = parse_subscribe(&mut p, legacy)?;
            p.expect_end()?;
            Ok(Stmt::Subscribe(s))
        }
        "declare" => {
            p.i += 1;
            let name = p.ident()?;
            p.eat_word("binary");
            p.eat_word("no");
            p.eat_word("scroll");
            p.expect_word("cursor")?;
            if p.eat_word("without") || p.eat_word("with") {
                p.expect_word("hold")?;
            }
            p.expect_word("for")?;
            let query = if p.peek_word("subscribe") || p.peek_word("tail") {
                let s = parse_subscribe(&mut p, legacy)?;
                p.expect_end()?;
                CursorQuery::Subscribe(s)
            } else if p.peek().is_some_and(starts_query) {
                CursorQuery::Select(p.rest_query()?)
            } else {
                let subscribe = if legacy { "TAIL" } else { "SUBSCRIBE" };
                return Err(SqlError::syntax(format!(
                    "Expected SELECT, VALUES, {subscribe}, or a subquery, found {}",
                    describe_token(p.peek())
                )));
            };
            Ok(Stmt::Declare { name, query })
        }
        "fetch" => parse_fetch(&mut p).map(Stmt::Fetch),
        "close" => {
            p.i += 1;
            if p.eat_word("all") {
                return Ok(Stmt::Close { name: None });
            }
            let name = p.ident()?;
            p.expect_end()?;
            Ok(Stmt::Close { name: Some(name) })
        }
        "copy" => parse_copy(&mut p, legacy),
        "create" => parse_create(&mut p),
        "drop" => parse_drop(&mut p),
        "insert" => Ok(Stmt::Write {
            sql: sql.to_owned(),
            tag: "INSERT",
        }),
        "update" => Ok(Stmt::Write {
            sql: sql.to_owned(),
            tag: "UPDATE",
        }),
        "delete" => Ok(Stmt::Write {
            sql: sql.to_owned(),
            tag: "DELETE",
        }),
        "select" | "with" | "values" | "table" => Ok(Stmt::Select {
            sql: p.rest_query()?,
        }),
        "discard" => Ok(Stmt::Discard),
        "alter" | "grant" | "revoke" | "explain" | "prepare" | "execute" | "deallocate"
        | "comment" | "validate" | "reassign" | "listen" | "notify" | "truncate" => Err(
            SqlError::unsupported(format!("{} statements are", w.to_uppercase())),
        ),
        other => Err(SqlError::syntax(format!(
            "Expected a keyword at the beginning of a statement, found identifier \"{other}\""
        ))),
    }
}

/// Where Materialize's parser wants a query body and finds something else.
const QUERY_BODY: &str = "SELECT, VALUES, or a subquery in the query body";

/// Whether a query can start at `t`: SELECT, WITH, VALUES, TABLE or `(`.
fn starts_query(t: &Token) -> bool {
    t.tok == Tok::LParen
        || ["select", "with", "values", "table"]
            .iter()
            .any(|w| t.is_word(w))
}

/// Words that begin statements other than queries, including SQLite's own.
const STATEMENT_WORDS: &[&str] = &[
    "abort",
    "alter",
    "analyze",
    "attach",
    "begin",
    "close",
    "comment",
    "commit",
    "copy",
    "create",
    "deallocate",
    "declare",
    "delete",
    "detach",
    "discard",
    "drop",
    "end",
    "execute",
    "explain",
    "fetch",
    "grant",
    "insert",
    "pragma",
    "prepare",
    "reindex",
    "release",
    "replace",
    "reset",
    "revoke",
    "rollback",
    "savepoint",
    "set",
    "show",
    "start",
    "subscribe",
    "tail",
    "truncate",
    "update",
    "upsert",
    "vacuum",
];

fn is_statement_word(t: &Token) -> bool {
    STATEMENT_WORDS.iter().any(|w| t.is_word(w))
}

/// A token as Materialize's parser names it after "found" (`EOF` for none):
/// keywords upper-cased, identifiers quoted.
fn describe_token(t: Option<&Token>) -> String {
    let Some(t) = t else {
        return "EOF".to_owned();
    };
    match &t.tok {
        Tok::Word(w) if is_keyword(w) || is_statement_word(t) => w.to_ascii_uppercase(),
        Tok::Word(w) => format!("identifier \"{}\"", w.to_ascii_lowercase()),
        Tok::Quoted(q) => format!("identifier \"{q}\""),
        Tok::Str(s) => format!("string literal \"{s}\""),
        Tok::Num(n) => format!("number \"{n}\""),
        Tok::Param(n) => format!("parameter \"${n}\""),
        Tok::Op(o) => format!("operator \"{o}\""),
        Tok::LParen => "left parenthesis".to_owned(),
        Tok::RParen => "right parenthesis".to_owned(),
        Tok::Comma => "comma".to_owned(),
        Tok::Semi => "semicolon".to_owned(),
        Tok::Dot => "dot".to_owned(),
    }
}

/// Checks that tokens `lo..hi` of `sql` form a query, as Materialize's parser
/// requires inside `SUBSCRIBE (...)`, `COPY (...)`, after `DECLARE ... FOR`, in
/// a view and in each CTE: `[WITH cte, ...] body [UNION|INTERSECT|EXCEPT body]...`
/// where a body is SELECT, VALUES, `TABLE name` or a parenthesised query.
/// Anything else, a DELETE in a CTE or after WITH included, is a 42601 syntax
/// error, so no statement that writes is ever run as a read.
///
/// Returns the query in a form SQLite accepts: it takes no parenthesised query
/// where a SELECT goes, nor `TABLE name`, so `((q))` becomes `q`, a
/// parenthesised operand `(q)` becomes `SELECT * FROM (q)` and `TABLE name`
/// becomes `SELECT * FROM name`. Expressions are not looked into; SQLite allows
/// only queries in subqueries.
fn query_text(sql: &str, toks: &[Token], mut lo: usize, mut hi: usize) -> Result<String, SqlError> {
    while lo < hi && toks[lo].tok == Tok::LParen && group_end(toks, lo) == Some(hi) {
        lo += 1;
        hi -= 1;
    }
    let unbalanced = || SqlError::syntax("unbalanced parentheses");
    // Past the range is the group's `)`, or the end of the statement.
    let expected = |what: &str, i: usize| {
        SqlError::syntax(format!(
            "Expected {what}, found {}",
            describe_token(toks.get(i))
        ))
    };
    let at = |i: usize| toks.get(i).filter(|_| i < hi);
    let text = |a: usize, b: usize| &sql[toks[a].start..toks[b].end];
    let mut out = String::new();
    let mut i = lo;
    if at(i).is_some_and(|t| t.is_word("with")) {
        i += 1;
        if at(i).is_some_and(|t| t.is_word("recursive")) {
            i += 1;
        }
        out.push_str(text(lo, i - 1));
        loop {
            let name = i;
            if at(i).and_then(Token::ident).is_none() {
                return Err(expected("identifier", i));
            }
            i += 1;
            if at(i).is_some_and(|t| t.tok == Tok::LParen) {
                i = group_end(toks, i)
                    .filter(|&e| e <= hi)
                    .ok_or_else(unbalanced)?;
            }
            if !at(i).is_some_and(|t| t.is_word("as")) {
                return Err(expected("AS", i));
            }
            i += 1;
            if at(i).is_some_and(|t| t.is_word("not")) {
                i += 1;
                if !at(i).is_some_and(|t| t.is_word("materialized")) {
                    return Err(expected("MATERIALIZED", i));
                }
                i += 1;
            } else if at(i).is_some_and(|t| t.is_word("materialized")) {
                i += 1;
            }
            if !at(i).is_some_and(|t| t.tok == Tok::LParen) {
                return Err(expected("left parenthesis", i));
            }
            let close = group_end(toks, i)
                .filter(|&e| e <= hi)
                .ok_or_else(unbalanced)?;
            out.push(' ');
            out.push_str(text(name, i));
            out.push_str(&query_text(sql, toks, i + 1, close - 1)?);
            out.push(')');
            i = close;
            if !at(i).is_some_and(|t| t.tok == Tok::Comma) {
                break;
            }
            out.push(',');
            i += 1;
        }
        out.push(' ');
    }
    loop {
        // One operand: up to the next set operator outside parentheses.
        let start = i;
        let mut depth = 0i32;
        while let Some(t) = at(i) {
            match t.tok {
                Tok::LParen => depth += 1,
                Tok::RParen => depth -= 1,
                _ if depth == 0
                    && ["union", "intersect", "except"]
                        .iter()
                        .any(|w| t.is_word(w)) =>
                {
                    break
                }
                _ => {}
            }
            i += 1;
        }
        let end = i;
        let Some(first) = at(start).filter(|_| start < end) else {
            return Err(expected(QUERY_BODY, start));
        };
        if first.is_word("select") || first.is_word("values") {
            out.push_str(text(start, end - 1));
        } else if first.is_word("table") {
            if at(start + 1).and_then(Token::ident).is_none() || start + 1 >= end {
                return Err(expected("identifier", start + 1));
            }
            out.push_str("SELECT * FROM ");
            out.push_str(text(start + 1, end - 1));
        } else if first.tok == Tok::LParen {
            let close = group_end(toks, start)
                .filter(|&e| e <= end)
                .ok_or_else(unbalanced)?;
            out.push_str("SELECT * FROM (");
            out.push_str(&query_text(sql, toks, start + 1, close - 1)?);
            out.push(')');
            if close < end {
                out.push(' ');
                out.push_str(text(close, end - 1));
            }
        } else {
            return Err(expected(QUERY_BODY, start));
        }
        if end >= hi {
            return Ok(out);
        }
        // The set operator and its ALL or DISTINCT.
        i = end + 1;
        if at(i).is_some_and(|t| t.is_word("all") || t.is_word("distinct")) {
            i += 1;
        }
        out.push(' ');
        out.push_str(text(end, i - 1));
        out.push(' ');
    }
}

fn parse_set(p: &mut P<'_>, reset: bool) -> Result<Stmt, SqlError> {
    p.i += 1;
    p.eat_word("session");
    p.eat_word("local");
    if !reset && p.peek_word("transaction") {
        // SET TRANSACTION ISOLATION LEVEL ...: accepted and ignored.
        return Ok(Stmt::Set {
            name: "transaction_isolation".to_owned(),
            value: None,
        });
    }
    let mut name = p.ident()?;
    if name == "time" && p.eat_word("zone") {
        name = "timezone".to_owned();
    } else if name == "names" {
        name = "client_encoding".to_owned();
    } else {
        while p.eat(&Tok::Dot) {
            name = format!("{name}.{}", p.ident()?);
        }
    }
    if reset {
        return Ok(Stmt::Set { name, value: None });
    }
    if !(p.eat_word("to") || p.eat(&Tok::Op("=".to_owned())))
        && name != "timezone"
        && name != "client_encoding"
    {
        return Err(p.unexpected("expected TO or ="));
    }
    if p.eat_word("default") {
        return Ok(Stmt::Set { name, value: None });
    }
    let mut parts = Vec::new();
    while let Some(t) = p.peek() {
        match &t.tok {
            Tok::Str(s) | Tok::Quoted(s) => parts.push(s.clone()),
            Tok::Word(w) | Tok::Num(w) => parts.push(w.clone()),
            Tok::Op(o) if o == "-" => parts.push("-".to_owned()),
            Tok::Comma => parts.push(",".to_owned()),
            _ => return Err(p.unexpected("expected a value")),
        }
        p.i += 1;
    }
    let mut value = String::new();
    for part in parts {
        if part == "," {
            value.push_str(", ");
        } else {
            value.push_str(&part);
        }
    }
    Ok(Stmt::Set {
        name,
        value: Some(value),
    })
}

fn parse_subscribe(p: &mut P<'_>, legacy: bool) -> Result<SubscribeStmt, SqlError> {
    let start = p.peek().map(|t| t.start).unwrap_or(0);
    let is_tail = p.peek_word("tail");
    if is_tail && !legacy {
        return Err(SqlError::syntax("TAIL has been renamed to SUBSCRIBE"));
    }
    if !is_tail && legacy {
        return Err(SqlError::syntax(
            "Expected a keyword at the beginning of a statement, found identifier \"subscribe\"",
        ));
    }
    p.i += 1;
    if !legacy {
        p.eat_word("to");
    }
    let relation = if p.peek().is_some_and(|t| t.tok == Tok::LParen) {
        Relation::Query(p.group_query()?)
    } else {
        Relation::Name(p.object_name()?)
    };
    let mut s = SubscribeStmt {
        relation,
        upsert_key: None,
        progress: false,
        snapshot: true,
        as_of: None,
        up_to: None,
        legacy,
        text: String::new(),
    };
    if !legacy {
        parse_envelope(p, &mut s)?;
    }
    let with = p.eat_word("with");
    if with && !p.peek().is_some_and(|t| t.tok == Tok::LParen) && !legacy {
        return Err(p.unexpected("expected ("));
    }
    if (with || legacy) && p.eat(&Tok::LParen) {
        loop {
            let opt = p.ident()?;
            let mut value = true;
            if p.eat(&Tok::Op("=".to_owned()))
                || !matches!(p.peek().map(|t| &t.tok), Some(Tok::Comma | Tok::RParen))
            {
                let v = p.peek().and_then(|t| match &t.tok {
                    Tok::Word(w) | Tok::Str(w) => super::value::parse_bool(w),
                    Tok::Num(n) => super::value::parse_bool(n),
                    _ => None,
                });
                value = v.ok_or_else(|| p.unexpected("expected a boolean"))?;
                p.i += 1;
            }
            match opt.as_str() {
                "progress" => s.progress = value,
                "snapshot" => s.snapshot = value,
                other => {
                    return Err(SqlError::syntax(format!(
                        "Expected one of PROGRESS or SNAPSHOT, found identifier \"{other}\""
                    )))
                }
            }
            if p.eat(&Tok::RParen) {
                break;
            }
            p.expect(&Tok::Comma, ", or )")?;
        }
    }
    if p.eat_word("as") {
        p.expect_word("of")?;
        let at_least = if p.eat_word("at") {
            p.expect_word("least")?;
            true
        } else {
            false
        };
        let ts = parse_timestamp_expr(p, legacy)?;
        s.as_of = Some(AsOf { ts, at_least });
    }
    if !legacy && p.eat_word("up") {
        p.expect_word("to")?;
        s.up_to = Some(parse_timestamp_expr(p, legacy)?);
    }
    if !legacy && s.upsert_key.is_none() {
        parse_envelope(p, &mut s)?;
    }
    let end = p
        .toks
        .get(p.i.saturating_sub(1))
        .map(|t| t.end)
        .unwrap_or(start);
    s.text = p.sql[start..end.max(start)].to_owned();
    Ok(s)
}

fn parse_envelope(p: &mut P<'_>, s: &mut SubscribeStmt) -> Result<(), SqlError> {
    if p.eat_word("envelope") {
        if p.eat_word("debezium") {
            return Err(SqlError::unsupported("ENVELOPE DEBEZIUM is"));
        }
        p.expect_word("upsert")?;
        p.expect(&Tok::LParen, "(")?;
        p.expect_word("key")?;
        p.expect(&Tok::LParen, "(")?;
        let mut keys = vec![p.ident()?];
        while p.eat(&Tok::Comma) {
            keys.push(p.ident()?);
        }
        p.expect(&Tok::RParen, ")")?;
        p.expect(&Tok::RParen, ")")?;
        s.upsert_key = Some(keys);
    } else if p.peek_word("within") {
        return Err(SqlError::unsupported("WITHIN TIMESTAMP ORDER BY is"));
    }
    Ok(())
}

const CASTABLE: &str = "AS OF or UP TO should be castable to a (non-null) mz_timestamp value";

/// Evaluates an `AS OF` / `UP TO` expression to a timestamp, with Materialize's
/// error texts for the cases it rejects.
fn parse_timestamp_expr(p: &mut P<'_>, legacy: bool) -> Result<u64, SqlError> {
    let start = p.i;
    let mut depth = 0;
    while let Some(t) = p.peek() {
        match &t.tok {
            Tok::LParen => depth += 1,
            Tok::RParen => depth -= 1,
            Tok::Word(w) if depth == 0 && p.i > start => {
                let w = w.to_ascii_lowercase();
                if w == "up" || w == "envelope" || w == "with" {
                    break;
                }
            }
            _ => {}
        }
        p.i += 1;
    }
    let toks = &p.toks[start..p.i];
    let words: Vec<String> = toks.iter().filter_map(|t| t.ident()).collect();
    let castable = || SqlError::internal(CASTABLE);
    let unmaterializable = || {
        SqlError::new(
            "0A000",
            "calling an unmaterializable function in AS OF or UP TO not yet supported",
        )
    };
    if toks.is_empty() {
        return Err(SqlError::syntax("expected an expression"));
    }
    if words
        .iter()
        .any(|w| w == "now" || w == "mz_now" || w == "current_timestamp")
    {
        if legacy && toks.len() == 3 && words.first().is_some_and(|w| w == "now") {
            return u64::try_from(super::store::now_ms()).map_err(|_| castable());
        }
        return Err(unmaterializable());
    }
    if words.iter().any(|w| w == "current_database") {
        if words.iter().any(|w| w == "mz_timestamp") {
            return Err(unmaterializable());
        }
        return Err(SqlError::internal(
            "AS OF or UP TO does not support implicitly casting from text to mz_timestamp",
        ));
    }
    let Some(first) = toks.first() else {
        return Err(castable());
    };
    let cast_to = if toks.len() >= 3 && toks[1].tok == Tok::Op("::".to_owned()) {
        toks.get(2).and_then(|t| t.ident())
    } else {
        None
    };
    if toks.len() != 1 && cast_to.is_none() {
        return Err(castable());
    }
    match &first.tok {
        Tok::Num(n) => {
            let (int, frac) = n.split_once('.').unwrap_or((n, ""));
            if !frac.bytes().all(|b| b == b'0') {
                return Err(castable());
            }
            int.parse::<u64>().map_err(|_| castable())
        }
        Tok::Str(s) => {
            if let Ok(v) = s.trim().parse::<u64>() {
                return Ok(v);
            }
            match super::value::parse_timestamp_micros(s) {
                Some(micros) if micros >= 0 && cast_to.is_some() => Ok((micros / 1000) as u64),
                _ => Err(castable()),
            }
        }
        _ => Err(castable()),
    }
}

fn parse_fetch(p: &mut P<'_>) -> Result<FetchStmt, SqlError> {
    p.i += 1;
    p.eat_word("forward");
    p.eat_word("next");
    let mut count = Some(1);
    if p.eat_word("all") {
        count = None;
    } else if let Some(Tok::Num(n)) = p.peek().map(|t| &t.tok) {
        count = Some(
            n.parse()
                .map_err(|_| p.unexpected("expected a row count"))?,
        );
        p.i += 1;
    }
    if !p.eat_word("from") {
        p.eat_word("in");
    }
    let cursor = p.ident()?;
    let mut timeout = None;
    if p.eat_word("with") {
        p.expect(&Tok::LParen, "(")?;
        let opt = p.ident()?;
        if opt != "timeout" {
            return Err(SqlError::syntax(format!(
                "Expected TIMEOUT, found identifier \"{opt}\""
            )));
        }
        p.eat(&Tok::Op("=".to_owned()));
        let d = match p.peek().map(|t| &t.tok) {
            Some(Tok::Str(s)) => parse_interval(s)?,
            Some(Tok::Num(n)) => parse_interval(n)?,
            _ => return Err(p.unexpected("expected an interval")),
        };
        p.i += 1;
        p.expect(&Tok::RParen, ")")?;
        if d > Duration::from_secs(86_400) {
            return Err(SqlError::internal(format!(
                "timeout out of range: {}s",
                d.as_secs_f64()
            )));
        }
        timeout = Some(d);
    }
    p.expect_end()?;
    Ok(FetchStmt {
        cursor,
        count,
        timeout,
    })
}

/// Parses a simple interval such as `1s`, `500ms`, `1 minute`, `1d` or `2` (seconds).
pub fn parse_interval(s: &str) -> Result<Duration, SqlError> {
    let t = s.trim().to_ascii_lowercase();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let invalid = || {
        SqlError::new(
            "22007",
            format!("invalid input syntax for type interval: \"{s}\""),
        )
    };
    let n: f64 = num.parse().map_err(|_| invalid())?;
    let secs = match unit.trim() {
        "" | "s" | "sec" | "secs" | "second" | "seconds" => n,
        "ms" | "millisecond" | "milliseconds" => n / 1000.0,
        "us" | "microsecond" | "microseconds" => n / 1e6,
        "m" | "min" | "mins" | "minute" | "minutes" => n * 60.0,
        "h" | "hr" | "hour" | "hours" => n * 3600.0,
        "d" | "day" | "days" => n * 86_400.0,
        _ => return Err(invalid()),
    };
    Ok(Duration::from_secs_f64(secs.max(0.0)))
}

fn parse_copy(p: &mut P<'_>, legacy: bool) -> Result<Stmt, SqlError> {
    p.i += 1;
    if !p.peek().is_some_and(|t| t.tok == Tok::LParen) {
        return Err(SqlError::unsupported("COPY of a table is"));
    }
    p.i += 1;
    let stmt = if p.peek_word("subscribe") || p.peek_word("tail") {
        let s = parse_subscribe(p, legacy)?;
        p.expect(&Tok::RParen, ")")?;
        Stmt::CopySubscribe(s)
    } else if p
        .peek()
        .is_some_and(|t| !starts_query(t) && is_statement_word(t))
    {
        // Materialize parses a whole statement here and refuses all but these two.
        return Err(SqlError::syntax("unsupported query in COPY"));
    } else {
        p.i -= 1;
        Stmt::CopySelect(p.group_query()?)
    };
    p.expect_word("to")?;
    p.expect_word("stdout")?;
    if (p.eat_word("with") || p.peek().is_some_and(|t| t.tok == Tok::LParen)) && p.eat(&Tok::LParen)
    {
        while !p.eat(&Tok::RParen) {
            let opt = p.ident()?;
            let val = p.peek().and_then(|t| t.ident()).unwrap_or_default();
            if opt == "format" && val != "text" {
                return Err(SqlError::unsupported(format!("COPY FORMAT {val} is")));
            }
            if opt != "format" {
                return Err(SqlError::unsupported(format!("COPY option {opt} is")));
            }
            p.i += 1;
            p.eat(&Tok::Comma);
            if p.at_end() {
                return Err(SqlError::syntax("expected )"));
            }
        }
    }
    p.expect_end()?;
    Ok(stmt)
}

fn parse_create(p: &mut P<'_>) -> Result<Stmt, SqlError> {
    p.i += 1;
    let replace = if p.eat_word("or") {
        p.expect_word("replace")?;
        true
    } else {
        false
    };
    p.eat_word("temporary");
    p.eat_word("temp");
    let materialized = p.eat_word("materialized");
    if p.eat_word("default") || p.peek_word("index") {
        return Ok(Stmt::CreateIndex);
    }
    if p.eat_word("table") {
        let if_not_exists = p.eat_word("if");
        if if_not_exists {
            p.expect_word("not")?;
            p.expect_word("exists")?;
        }
        let name = p.object_name()?;
        let rest = p.rest_text();
        let cols = if if_not_exists { "IF NOT EXISTS " } else { "" };
        return Ok(Stmt::CreateTable {
            sql: format!("CREATE TABLE {cols}\"{name}\" {rest}"),
            name,
        });
    }
    if p.eat_word("view") {
        let name = p.object_name()?;
        if p.eat_word("in") {
            p.expect_word("cluster")?;
            p.ident()?;
        }
        p.expect_word("as")?;
        return Ok(Stmt::CreateView {
            name,
            body: p.rest_query()?,
            materialized,
            replace,
        });
    }
    match p.peek().and_then(|t| t.ident()) {
        Some(kind) => Err(SqlError::unsupported(format!(
            "CREATE {} is",
            kind.to_uppercase()
        ))),
        None => Err(p.unexpected("expected TABLE, VIEW, MATERIALIZED VIEW or INDEX")),
    }
}

fn parse_drop(p: &mut P<'_>) -> Result<Stmt, SqlError> {
    p.i += 1;
    let kind = if p.eat_word("table") {
        DropKind::Table
    } else if p.eat_word("view") {
        DropKind::View
    } else if p.eat_word("materialized") {
        p.expect_word("view")?;
        DropKind::MaterializedView
    } else if p.eat_word("index") {
        DropKind::Index
    } else {
        return Err(SqlError::unsupported(format!(
            "DROP {} is",
            p.rest_text()
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_uppercase()
        )));
    };
    let if_exists = if p.eat_word("if") {
        p.expect_word("exists")?;
        true
    } else {
        false
    };
    let mut names = vec![p.object_name()?];
    while p.eat(&Tok::Comma) {
        names.push(p.object_name()?);
    }
    let cascade = p.eat_word("cascade");
    p.eat_word("restrict");
    p.expect_end()?;
    Ok(Stmt::Drop {
        kind,
        names,
        if_exists,
        cascade,
    })
}

/// Words that end a primary expression when seen before `(`, so `IN (..)` is not
/// mistaken for a function call.
const KEYWORDS: &[&str] = &[
    "select",
    "from",
    "where",
    "and",
    "or",
    "not",
    "in",
    "on",
    "as",
    "when",
    "then",
    "else",
    "case",
    "by",
    "having",
    "join",
    "values",
    "exists",
    "all",
    "any",
    "some",
    "union",
    "is",
    "like",
    "between",
    "using",
    "with",
    "distinct",
    "limit",
    "offset",
    "group",
    "order",
    "intersect",
    "except",
    "over",
    "filter",
    "returning",
    "set",
    "into",
];

fn is_keyword(w: &str) -> bool {
    KEYWORDS.iter().any(|k| k.eq_ignore_ascii_case(w))
}

/// Schemas that exist only in Materialize's catalog; the engine keeps everything
/// in SQLite's main (and temp, for introspection) schema.
const SCHEMAS: &[&str] = &[
    "materialize",
    "public",
    "mz_internal",
    "mz_catalog",
    "pg_catalog",
];

/// Rewrites Postgres/Materialize SQL into SQLite SQL.
pub fn translate(sql: &str) -> Result<String, SqlError> {
    let toks = tokenize(sql)?;
    let mut tr = Translator::default();
    tr.run(&toks)?;
    Ok(tr.out.join(" "))
}

#[derive(Default)]
struct Translator {
    out: Vec<String>,
    /// (index of `(`, index of `)`) for closed groups in `out`.
    groups: Vec<(usize, usize)>,
    stack: Vec<usize>,
}

impl Translator {
    fn run(&mut self, toks: &[Token]) -> Result<(), SqlError> {
        let mut i = 0;
        while i < toks.len() {
            let t = &toks[i];
            match &t.tok {
                Tok::Word(w)
                    if SCHEMAS.iter().any(|s| s.eq_ignore_ascii_case(w))
                        && toks.get(i + 1).is_some_and(|n| n.tok == Tok::Dot)
                        && toks.get(i + 2).is_some_and(|n| n.ident().is_some()) =>
                {
                    i += 2;
                    continue;
                }
                Tok::Word(w) if w.eq_ignore_ascii_case("ilike") => self.out.push("LIKE".into()),
                Tok::Word(w)
                    if w.eq_ignore_ascii_case("double")
                        && toks.get(i + 1).is_some_and(|n| n.is_word("precision")) =>
                {
                    self.out.push("float8".into());
                    i += 2;
                    continue;
                }
                Tok::Word(w)
                    if w.eq_ignore_ascii_case("timestamp")
                        && toks
                            .get(i + 1)
                            .is_some_and(|n| n.is_word("with") || n.is_word("without"))
                        && toks.get(i + 2).is_some_and(|n| n.is_word("time"))
                        && toks.get(i + 3).is_some_and(|n| n.is_word("zone")) =>
                {
                    let tz = toks.get(i + 1).is_some_and(|n| n.is_word("with"));
                    self.out
                        .push(if tz { "timestamptz" } else { "timestamp" }.into());
                    i += 4;
                    continue;
                }
                Tok::Word(w) => self.out.push(w.clone()),
                Tok::Quoted(q) => self.out.push(quote_ident(q)),
                Tok::Str(s) => self.out.push(format!("'{}'", s.replace('\'', "''"))),
                Tok::Num(n) => self.out.push(n.clone()),
                Tok::Param(n) => self.out.push(format!("?{n}")),
                Tok::LParen => {
                    self.stack.push(self.out.len());
                    self.out.push("(".into());
                }
                Tok::RParen => {
                    let open = self
                        .stack
                        .pop()
                        .ok_or_else(|| SqlError::syntax("unbalanced parentheses"))?;
                    self.groups.push((open, self.out.len()));
                    self.out.push(")".into());
                }
                Tok::Comma => self.out.push(",".into()),
                Tok::Semi => self.out.push(";".into()),
                Tok::Dot => self.out.push(".".into()),
                Tok::Op(op) if op == "::" => {
                    let left = self.pop_primary()?;
                    let (ty, next) = cast_type(toks, i + 1)?;
                    self.out.push(cast_expr(&left, &ty));
                    i = next;
                    continue;
                }
                Tok::Op(op) if op == "/" => {
                    let mut left = self.pop_primary()?;
                    while self.out.last().is_some_and(|o| o == "*" || o == "%") {
                        let op = self.out.pop().unwrap_or_default();
                        let l = self.pop_primary()?;
                        left = format!("{l} {op} {left}");
                    }
                    let end = primary_end(toks, i + 1)?;
                    let right_toks = toks.get(i + 1..end).unwrap_or(&[]);
                    if right_toks.is_empty() {
                        return Err(SqlError::syntax("expected an expression after /"));
                    }
                    let mut sub = Translator::default();
                    sub.run(right_toks)?;
                    self.out
                        .push(format!("mz_div({left}, {})", sub.out.join(" ")));
                    i = end;
                    continue;
                }
                Tok::Op(op) => self.out.push(op.clone()),
            }
            i += 1;
        }
        if !self.stack.is_empty() {
            return Err(SqlError::syntax("unbalanced parentheses"));
        }
        Ok(())
    }

    /// Removes and returns the text of the primary expression at the end of `out`.
    fn pop_primary(&mut self) -> Result<String, SqlError> {
        let last = self
            .out
            .len()
            .checked_sub(1)
            .ok_or_else(|| SqlError::syntax("expected an expression"))?;
        let mut start = last;
        if self.out[last] == ")" {
            let open = self
                .groups
                .iter()
                .find(|(_, c)| *c == last)
                .map(|(o, _)| *o)
                .ok_or_else(|| SqlError::syntax("unbalanced parentheses"))?;
            start = open;
            if let Some(prev) = open.checked_sub(1).and_then(|p| self.out.get(p)) {
                if is_function_name(prev) {
                    start = open - 1;
                    while start >= 2
                        && self.out[start - 1] == "."
                        && is_identifier(&self.out[start - 2])
                    {
                        start -= 2;
                    }
                }
            }
        } else if is_identifier(&self.out[last]) {
            while start >= 2 && self.out[start - 1] == "." && is_identifier(&self.out[start - 2]) {
                start -= 2;
            }
        } else if !(self.out[last].starts_with('\'')
            || self.out[last].starts_with('?')
            || self.out[last].starts_with(|c: char| c.is_ascii_digit() || c == '.')
            || self.out[last].starts_with("CAST(")
            || self.out[last].starts_with("mz_"))
        {
            return Err(SqlError::syntax(format!(
                "unexpected operator after {}",
                self.out[last]
            )));
        }
        let text = self.out[start..].join(" ");
        self.out.truncate(start);
        self.groups.retain(|(o, _)| *o < start);
        Ok(text)
    }
}

fn is_identifier(s: &str) -> bool {
    s.starts_with('"') || (s.starts_with(|c: char| c.is_alphabetic() || c == '_') && !is_keyword(s))
}

fn is_function_name(s: &str) -> bool {
    is_identifier(s) || s.eq_ignore_ascii_case("cast")
}

/// Index just past the primary expression starting at `i` (unary sign,
/// identifier chain, call, literal or group, then `::type` suffixes).
fn primary_end(toks: &[Token], mut i: usize) -> Result<usize, SqlError> {
    while toks
        .get(i)
        .is_some_and(|t| matches!(&t.tok, Tok::Op(o) if o == "-" || o == "+"))
    {
        i += 1;
    }
    let Some(t) = toks.get(i) else {
        return Ok(i);
    };
    let skip_group =
        |j: usize| group_end(toks, j).ok_or_else(|| SqlError::syntax("unbalanced parentheses"));
    i = match &t.tok {
        Tok::LParen => skip_group(i)?,
        Tok::Word(_) | Tok::Quoted(_) => {
            let mut j = i + 1;
            while toks.get(j).is_some_and(|t| t.tok == Tok::Dot)
                && toks.get(j + 1).is_some_and(|t| t.ident().is_some())
            {
                j += 2;
            }
            if toks.get(j).is_some_and(|t| t.tok == Tok::LParen) {
                skip_group(j)?
            } else {
                j
            }
        }
        _ => i + 1,
    };
    while toks
        .get(i)
        .is_some_and(|t| t.tok == Tok::Op("::".to_owned()))
    {
        i = cast_type(toks, i + 1)?.1;
    }
    Ok(i)
}

/// Index just past the `)` that closes the group opening at `open`; `None` when
/// it is never closed.
fn group_end(toks: &[Token], open: usize) -> Option<usize> {
    let mut depth = 0;
    for (j, t) in toks.iter().enumerate().skip(open) {
        match t.tok {
            Tok::LParen => depth += 1,
            Tok::RParen => {
                depth -= 1;
                if depth == 0 {
                    return Some(j + 1);
                }
            }
            _ => {}
        }
    }
    None
}

/// Reads a type name after `::`; returns it and the index after it.
fn cast_type(toks: &[Token], mut i: usize) -> Result<(String, usize), SqlError> {
    let mut words = Vec::new();
    while let Some(w) = toks.get(i).and_then(|t| t.ident()) {
        let multiword = words.is_empty()
            || matches!(
                w.as_str(),
                "precision" | "varying" | "with" | "without" | "time" | "zone"
            );
        if !multiword {
            break;
        }
        words.push(w);
        i += 1;
    }
    if words.is_empty() {
        return Err(SqlError::syntax("expected a type name after ::"));
    }
    if toks.get(i).is_some_and(|t| t.tok == Tok::LParen) {
        while toks.get(i).is_some_and(|t| t.tok != Tok::RParen) {
            i += 1;
        }
        i += 1;
    }
    Ok((words.join(" "), i))
}

fn cast_expr(expr: &str, ty: &str) -> String {
    match ty {
        "bool" | "boolean" => format!("mz_bool({expr})"),
        "mz_timestamp" | "int" | "integer" | "int4" | "int8" | "bigint" | "smallint" | "int2"
        | "uint8" | "uint4" => format!("CAST({expr} AS INTEGER)"),
        "real" | "float" | "float4" | "float8" | "double precision" | "double" => {
            format!("CAST({expr} AS REAL)")
        }
        "numeric" | "decimal" => format!("CAST({expr} AS NUMERIC)"),
        "text" | "varchar" | "string" | "char" | "character varying" | "bpchar" => {
            format!("CAST({expr} AS TEXT)")
        }
        // Dates, timestamps and JSON are stored as text; the cast only types the column.
        _ => expr.to_owned(),
    }
}

/// One select-list item, for naming and typing result columns the way Postgres
/// would without running the query.
#[derive(Debug, Clone, PartialEq)]
pub struct SelectItem {
    pub name: String,
    pub ty: Option<PgType>,
    /// A bare column reference (`a` or `t.a`): its type comes from the relation.
    pub column_ref: Option<String>,
    pub star: bool,
}

/// Looks up a column's type by name in the relations the query reads.
pub type ColumnLookup<'a> = &'a dyn Fn(&str) -> Option<PgType>;

/// Analyzes the top-level select list of a query. `None` when it cannot tell.
pub fn select_items(sql: &str, lookup: ColumnLookup<'_>) -> Option<Vec<SelectItem>> {
    let toks = tokenize(sql).ok()?;
    let mut depth = 0;
    let mut start = None;
    for (i, t) in toks.iter().enumerate() {
        match t.tok {
            Tok::LParen => depth += 1,
            Tok::RParen => depth -= 1,
            _ if depth == 0 && (t.is_word("select") || t.is_word("values")) => {
                start = Some(i);
                break;
            }
            _ => {}
        }
    }
    let start = start?;
    let values = toks.get(start)?.is_word("values");
    let mut i = start + 1;
    let mut items: Vec<&[Token]> = Vec::new();
    if values {
        if toks.get(i)?.tok != Tok::LParen {
            return None;
        }
        let end = group_end(&toks, i)?;
        split_items(toks.get(i + 1..end - 1)?, &mut items);
        return Some(
            items
                .iter()
                .enumerate()
                .map(|(n, it)| SelectItem {
                    name: format!("column{}", n + 1),
                    ty: expr_type(it, lookup),
                    column_ref: None,
                    star: false,
                })
                .collect(),
        );
    }
    if toks.get(i).is_some_and(|t| t.is_word("distinct")) {
        i += 1;
        if toks.get(i).is_some_and(|t| t.is_word("on")) {
            i += 1;
            let mut d = 0;
            while let Some(t) = toks.get(i) {
                i += 1;
                match t.tok {
                    Tok::LParen => d += 1,
                    Tok::RParen => {
                        d -= 1;
                        if d == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
            }
        }
    } else if toks.get(i).is_some_and(|t| t.is_word("all")) {
        i += 1;
    }
    let mut end = toks.len();
    let mut d = 0;
    for (j, t) in toks.iter().enumerate().skip(i) {
        match t.tok {
            Tok::LParen => d += 1,
            Tok::RParen => d -= 1,
            _ if d == 0
                && [
                    "from",
                    "where",
                    "group",
                    "order",
                    "limit",
                    "union",
                    "having",
                    "except",
                    "intersect",
                    "offset",
                ]
                .iter()
                .any(|k| t.is_word(k)) =>
            {
                end = j;
                break;
            }
            _ => {}
        }
    }
    split_items(toks.get(i..end)?, &mut items);
    Some(items.iter().map(|it| analyze_item(it, lookup)).collect())
}

fn split_items<'t>(toks: &'t [Token], items: &mut Vec<&'t [Token]>) {
    let mut d = 0;
    let mut s = 0;
    for (j, t) in toks.iter().enumerate() {
        match t.tok {
            Tok::LParen => d += 1,
            Tok::RParen => d -= 1,
            Tok::Comma if d == 0 => {
                items.push(&toks[s..j]);
                s = j + 1;
            }
            _ => {}
        }
    }
    if s < toks.len() {
        items.push(&toks[s..]);
    }
}

fn analyze_item(toks: &[Token], lookup: ColumnLookup<'_>) -> SelectItem {
    let star = toks
        .last()
        .is_some_and(|t| t.tok == Tok::Op("*".to_owned()));
    let mut expr = toks;
    let mut alias = None;
    let n = toks.len();
    if n >= 2 {
        if toks[n - 2].is_word("as") {
            alias = toks[n - 1].ident();
            expr = &toks[..n - 2];
        } else if let Some(a) = toks[n - 1].ident() {
            let prev_ends_expr = matches!(
                toks[n - 2].tok,
                Tok::RParen | Tok::Num(_) | Tok::Str(_) | Tok::Quoted(_)
            ) || matches!(&toks[n - 2].tok, Tok::Word(w) if !is_keyword(w) && !toks[n - 2].is_word("distinct"));
            let last_is_kw = matches!(&toks[n - 1].tok, Tok::Word(w) if is_keyword(w)
                || ["null", "true", "false", "end", "asc", "desc"].iter().any(|k| w.eq_ignore_ascii_case(k)));
            if prev_ends_expr && !last_is_kw {
                alias = Some(a);
                expr = &toks[..n - 1];
            }
        }
    }
    let column_ref = match expr {
        [t] => t
            .ident()
            .filter(|w| !is_keyword(w) && !["true", "false", "null"].contains(&w.as_str())),
        [.., a, b, c] if b.tok == Tok::Dot && a.ident().is_some() => c.ident(),
        _ => None,
    };
    let name = alias
        .or_else(|| column_ref.clone())
        .unwrap_or_else(|| default_name(expr));
    SelectItem {
        ty: expr_type(expr, lookup),
        name,
        column_ref,
        star,
    }
}

/// Postgres' default output name for an unaliased expression.
fn default_name(expr: &[Token]) -> String {
    // x::type → name of x, or the type for a literal.
    if let Some(pos) = expr.iter().rposition(|t| t.tok == Tok::Op("::".to_owned())) {
        let inner = default_name(&expr[..pos]);
        if inner == "?column?" {
            return expr.get(pos + 1).and_then(|t| t.ident()).unwrap_or(inner);
        }
        return inner;
    }
    match expr {
        [t] => t.ident().unwrap_or_else(|| "?column?".to_owned()),
        [c, l, ..] if c.is_word("cast") && l.tok == Tok::LParen => {
            let inner_end = expr
                .iter()
                .rposition(|t| t.is_word("as"))
                .unwrap_or(expr.len());
            default_name(expr.get(2..inner_end).unwrap_or(&[]))
        }
        [f, l, ..] if l.tok == Tok::LParen && expr.last().is_some_and(|t| t.tok == Tok::RParen) => {
            f.ident().unwrap_or_else(|| "?column?".to_owned())
        }
        [.., a, d, c] if d.tok == Tok::Dot && a.ident().is_some() => {
            c.ident().unwrap_or_else(|| "?column?".to_owned())
        }
        [first, ..] if first.is_word("case") => "case".to_owned(),
        _ => "?column?".to_owned(),
    }
}

/// Best-effort static type of an expression.
pub fn expr_type(expr: &[Token], lookup: ColumnLookup<'_>) -> Option<PgType> {
    if expr.is_empty() {
        return None;
    }
    if let Some(pos) = expr.iter().rposition(|t| t.tok == Tok::Op("::".to_owned())) {
        let depth_zero = expr[..pos].iter().fold(0i32, |d, t| match t.tok {
            Tok::LParen => d + 1,
            Tok::RParen => d - 1,
            _ => d,
        }) == 0;
        if depth_zero {
            let (ty, end) = cast_type(expr, pos + 1).ok()?;
            if end >= expr.len() {
                return Some(if ty == "mz_timestamp" {
                    PgType::MzTimestamp
                } else {
                    PgType::from_decl(&ty)
                });
            }
        }
    }
    // Top-level operators decide before operands.
    let mut d = 0;
    let mut has_arith = false;
    let mut has_concat = false;
    let mut has_bool = false;
    let mut operands: Vec<&[Token]> = Vec::new();
    let mut s = 0;
    for (j, t) in expr.iter().enumerate() {
        match &t.tok {
            Tok::LParen => d += 1,
            Tok::RParen => d -= 1,
            Tok::Op(o) if d == 0 => match o.as_str() {
                "=" | "<" | ">" | "<=" | ">=" | "<>" | "!=" | "~" | "@>" | "<@" => has_bool = true,
                "||" => has_concat = true,
                "+" | "-" | "*" | "/" | "%" => {
                    has_arith = true;
                    if j > s {
                        operands.push(&expr[s..j]);
                    }
                    s = j + 1;
                }
                "->>" | "#>>" => return Some(PgType::Text),
                "->" | "#>" => return Some(PgType::Jsonb),
                _ => {}
            },
            Tok::Word(w) if d == 0 => {
                let w = w.to_ascii_lowercase();
                if [
                    "and", "or", "not", "is", "like", "ilike", "in", "between", "exists",
                ]
                .contains(&w.as_str())
                {
                    has_bool = true;
                }
                if w == "case" && j == 0 {
                    let then = expr.iter().position(|t| t.is_word("then"))?;
                    let stop = expr
                        .iter()
                        .skip(then + 1)
                        .position(|t| t.is_word("when") || t.is_word("else") || t.is_word("end"))
                        .map(|p| p + then + 1)?;
                    return expr_type(expr.get(then + 1..stop)?, lookup);
                }
            }
            _ => {}
        }
    }
    if has_bool {
        return Some(PgType::Bool);
    }
    if has_concat {
        return Some(PgType::Text);
    }
    if has_arith {
        if s < expr.len() {
            operands.push(&expr[s..]);
        }
        let types: Vec<PgType> = operands
            .iter()
            .filter_map(|o| expr_type(o, lookup))
            .collect();
        return Some(if types.iter().any(|t| t.is_float()) {
            PgType::Float8
        } else if types.contains(&PgType::Numeric) {
            PgType::Numeric
        } else if types
            .iter()
            .any(|t| matches!(t, PgType::Int8 | PgType::MzTimestamp))
        {
            PgType::Int8
        } else {
            PgType::Int4
        });
    }
    match expr {
        [t] => match &t.tok {
            Tok::Num(n) => Some(if n.contains(['.', 'e', 'E']) {
                PgType::Numeric
            } else if n.parse::<i32>().is_ok() {
                PgType::Int4
            } else if n.parse::<i64>().is_ok() {
                PgType::Int8
            } else {
                PgType::Numeric
            }),
            Tok::Str(_) => Some(PgType::Text),
            Tok::Word(w) if w.eq_ignore_ascii_case("true") || w.eq_ignore_ascii_case("false") => {
                Some(PgType::Bool)
            }
            Tok::Word(w) if w.eq_ignore_ascii_case("current_timestamp") => {
                Some(PgType::Timestamptz)
            }
            _ => t.ident().and_then(|c| lookup(&c)),
        },
        [sign, rest @ ..] if matches!(&sign.tok, Tok::Op(o) if o == "-" || o == "+") => {
            expr_type(rest, lookup)
        }
        [.., a, dot, c] if expr.len() == 3 && dot.tok == Tok::Dot && a.ident().is_some() => {
            c.ident().and_then(|c| lookup(&c))
        }
        [l, .., r] if l.tok == Tok::LParen && r.tok == Tok::RParen => {
            let inner = &expr[1..expr.len() - 1];
            if inner.first().is_some_and(|t| t.is_word("select")) {
                return select_items_from_tokens(inner, lookup);
            }
            expr_type(inner, lookup)
        }
        [c, l, ..] if c.is_word("cast") && l.tok == Tok::LParen => {
            let as_pos = expr.iter().rposition(|t| t.is_word("as"))?;
            let (ty, _) = cast_type(expr, as_pos + 1).ok()?;
            Some(PgType::from_decl(&ty))
        }
        [f, l, ..] if l.tok == Tok::LParen => {
            let fname = f.ident()?;
            let args = expr.get(2..expr.len().saturating_sub(1)).unwrap_or(&[]);
            let mut first_arg: Vec<&[Token]> = Vec::new();
            split_items(args, &mut first_arg);
            let arg_ty = || {
                first_arg.first().and_then(|a| {
                    let a = if a.first().is_some_and(|t| t.is_word("distinct")) {
                        &a[1..]
                    } else {
                        a
                    };
                    expr_type(a, lookup)
                })
            };
            function_type(&fname, arg_ty)
        }
        _ => None,
    }
}

fn select_items_from_tokens(toks: &[Token], lookup: ColumnLookup<'_>) -> Option<PgType> {
    let mut items = Vec::new();
    let end = toks
        .iter()
        .position(|t| t.is_word("from"))
        .unwrap_or(toks.len());
    split_items(toks.get(1..end)?, &mut items);
    match items.as_slice() {
        [one] => analyze_item(one, lookup).ty,
        _ => None,
    }
}

fn function_type(name: &str, arg: impl Fn() -> Option<PgType>) -> Option<PgType> {
    Some(match name {
        "count" => PgType::Int8,
        "sum" => match arg() {
            Some(t) if t.is_int() => PgType::Int8,
            Some(t) if t.is_float() => PgType::Float8,
            _ => PgType::Numeric,
        },
        "avg" => match arg() {
            Some(t) if t.is_float() => PgType::Float8,
            _ => PgType::Numeric,
        },
        "min" | "max" | "abs" | "coalesce" | "nullif" | "greatest" | "least" => arg()?,
        "round" | "ceil" | "ceiling" | "floor" | "trunc" => match arg() {
            Some(t) if t.is_int() => t,
            Some(t) if t.is_float() => PgType::Float8,
            _ => PgType::Numeric,
        },
        "length" | "char_length" | "octet_length" | "strpos" | "position" | "mz_version_num"
        | "pg_backend_pid" => PgType::Int4,
        "upper" | "lower" | "concat" | "concat_ws" | "substr" | "substring" | "trim" | "ltrim"
        | "rtrim" | "btrim" | "replace" | "string_agg" | "group_concat" | "md5" | "format"
        | "to_char" | "left" | "right" | "lpad" | "rpad" | "repeat" | "reverse" | "initcap"
        | "mz_version" | "version" | "current_database" | "current_schema" | "current_user"
        | "current_setting" | "typeof" | "printf" | "quote_ident" | "split_part" => PgType::Text,
        "now" | "current_timestamp" | "to_timestamp" => PgType::Timestamptz,
        "mz_epoch_ms" | "mz_now" | "random_int" | "char_length_bytes" => PgType::Int8,
        "random" | "sqrt" | "power" | "pow" | "exp" | "ln" | "log" => PgType::Float8,
        "jsonb_build_object" | "json_build_object" | "jsonb_agg" | "json_agg" | "to_jsonb"
        | "json_object" | "json_array" | "json_group_array" | "json_group_object" => PgType::Jsonb,
        "bool_and" | "bool_or" | "every" => PgType::Bool,
        _ => return None,
    })
}

/// Scalar functions whose result depends only on their arguments. Only these may
/// appear in a query maintained incrementally ([`spf_relation`]); anything else
/// (aggregates, `random()`, `now()`, `mz_epoch_ms()`, date functions that can read
/// `'now'`, unknown names) makes it fall back to full re-evaluation.
const ROW_FUNCTIONS: &[&str] = &[
    "abs",
    "cast",
    "ceil",
    "ceiling",
    "char",
    "coalesce",
    "concat",
    "concat_ws",
    "floor",
    "hex",
    "ifnull",
    "iif",
    "instr",
    "json",
    "json_array",
    "json_extract",
    "json_object",
    "json_type",
    "json_valid",
    "length",
    "likely",
    "lower",
    "ltrim",
    "mz_bool",
    "mz_div",
    "nullif",
    "octet_length",
    "printf",
    "format",
    "quote",
    "replace",
    "round",
    "rtrim",
    "sign",
    "substr",
    "substring",
    "trim",
    "trunc",
    "typeof",
    "unicode",
    "unlikely",
    "upper",
];

/// Words that make a query more than a per-row select-project-filter: subqueries,
/// set operations, joins, grouping, windows, limits, and row identities that a
/// copy of the rows would not share.
const NOT_PER_ROW: &[&str] = &[
    "select",
    "with",
    "values",
    "union",
    "intersect",
    "except",
    "join",
    "natural",
    "cross",
    "group",
    "having",
    "distinct",
    "limit",
    "offset",
    "over",
    "window",
    "filter",
    "exists",
    "rowid",
    "oid",
    "_rowid_",
    "current_timestamp",
    "current_date",
    "current_time",
    "indexed",
    "returning",
    "raise",
    "match",
    "regexp",
];

/// The one relation a translated query reads, if the query is a select-project-
/// filter over it: `SELECT items FROM rel [[AS] alias] [WHERE cond] [ORDER BY ..]`
/// whose expressions are per-row and deterministic. Such a query is linear over
/// multisets, so its change is the query over the changed rows alone. `None` when
/// unsure; the caller then re-evaluates the whole query.
pub fn spf_relation(sql: &str) -> Option<String> {
    let toks = tokenize(sql).ok()?;
    let (first, rest) = toks.split_first()?;
    if !first.is_word("select") {
        return None;
    }
    let mut from = None;
    let mut depth = 0i32;
    for (i, t) in rest.iter().enumerate() {
        let call = rest.get(i + 1).is_some_and(|n| n.tok == Tok::LParen);
        match &t.tok {
            Tok::LParen => depth += 1,
            Tok::RParen => depth -= 1,
            Tok::Semi | Tok::Param(_) => return None,
            // A parameter (`?n` once translated) or a quoted function name.
            Tok::Op(o) if o == "?" => return None,
            Tok::Quoted(_) if call => return None,
            Tok::Word(w) => {
                if NOT_PER_ROW.iter().any(|k| k.eq_ignore_ascii_case(w)) {
                    return None;
                }
                if call
                    && !is_keyword(w)
                    && !ROW_FUNCTIONS.iter().any(|f| f.eq_ignore_ascii_case(w))
                {
                    return None;
                }
                if depth == 0 && w.eq_ignore_ascii_case("from") {
                    if from.is_some() {
                        return None;
                    }
                    from = Some(i);
                }
            }
            _ => {}
        }
    }
    let name_at = from? + 1;
    let name = plain_name(rest.get(name_at)?)?;
    let mut i = name_at + 1;
    if rest.get(i).is_some_and(|t| t.is_word("as")) {
        plain_name(rest.get(i + 1)?)?;
        i += 2;
    } else if rest.get(i).and_then(plain_name).is_some() {
        i += 1;
    }
    match rest.get(i) {
        None => Some(name),
        Some(t) if t.is_word("where") || t.is_word("order") => Some(name),
        Some(_) => None,
    }
}

/// A name that is not a keyword: lower-cased unless quoted.
fn plain_name(t: &Token) -> Option<String> {
    match &t.tok {
        Tok::Word(w) if !is_keyword(w) => Some(w.to_ascii_lowercase()),
        Tok::Quoted(q) => Some(q.clone()),
        _ => None,
    }
}

/// A grouped aggregate over one table that can be maintained per group:
/// `SELECT g1, .., gk, count(*), count(c), sum(c) FROM t [[AS] x] [WHERE cond]
/// GROUP BY g1, .., gk`, see [`group_aggregate`].
#[derive(Debug, PartialEq)]
pub struct GroupAgg {
    /// The relation read (lower-cased unless quoted).
    pub relation: String,
    /// The group columns, in GROUP BY order.
    pub keys: Vec<String>,
    /// Output position of each group column, in `keys` order.
    pub key_pos: Vec<usize>,
    /// Output positions of `sum` results and the columns they sum.
    pub sums: Vec<(usize, String)>,
}

/// Recognizes a translated query that is a grouped aggregate whose groups can be
/// recomputed one by one: every select item is a plain group column or
/// `count(*)`, `count(col)` or `sum(col)` over plain columns (each optionally
/// `AS name`), the GROUP BY lists plain columns that all appear as items, and
/// the rest (FROM and WHERE) is a select-project-filter by [`spf_relation`]. No
/// HAVING, DISTINCT, ORDER BY, other aggregates or expressions around them.
/// `None` when unsure.
pub fn group_aggregate(sql: &str) -> Option<GroupAgg> {
    let toks = tokenize(sql).ok()?;
    if !toks.first()?.is_word("select") {
        return None;
    }
    let depth0 = |word: &str| -> Option<usize> {
        let mut depth = 0i32;
        let mut found = None;
        for (i, t) in toks.iter().enumerate() {
            match &t.tok {
                Tok::LParen => depth += 1,
                Tok::RParen => depth -= 1,
                _ if depth == 0 && t.is_word(word) => {
                    if found.is_some() {
                        return None;
                    }
                    found = Some(i);
                }
                _ => {}
            }
        }
        found
    };
    let from = depth0("from")?;
    let group = depth0("group")?;
    if group < from || !toks.get(group + 1)?.is_word("by") {
        return None;
    }
    // GROUP BY col, col, ... up to the end.
    let mut keys = Vec::new();
    let by = &toks[group + 2..];
    for (i, t) in by.iter().enumerate() {
        if i % 2 == 0 {
            keys.push(plain_name(t)?);
        } else if t.tok != Tok::Comma {
            return None;
        }
    }
    if keys.is_empty() || by.len() % 2 == 0 {
        return None;
    }
    let mut items: Vec<&[Token]> = Vec::new();
    split_items(&toks[1..from], &mut items);
    let mut key_pos = vec![None; keys.len()];
    let mut sums = Vec::new();
    let mut args = Vec::new();
    for (pos, item) in items.iter().enumerate() {
        // Drop a trailing `AS name` or `name`.
        let body = match item {
            [rest @ .., a, n] if a.is_word("as") && plain_name(n).is_some() => rest,
            [rest @ .., n] if rest.len() > 1 && plain_name(n).is_some() => rest,
            _ => item,
        };
        match body {
            [c] => {
                let name = plain_name(c)?;
                let k = keys.iter().position(|k| *k == name)?;
                if key_pos[k].is_some() {
                    return None;
                }
                key_pos[k] = Some(pos);
                args.push(quote_ident(&name));
            }
            [f, l, star, r]
                if f.is_word("count")
                    && l.tok == Tok::LParen
                    && star.tok == Tok::Op("*".into())
                    && r.tok == Tok::RParen => {}
            [f, l, c, r] if l.tok == Tok::LParen && r.tok == Tok::RParen => {
                let name = plain_name(c)?;
                if f.is_word("sum") {
                    sums.push((pos, name.clone()));
                } else if !f.is_word("count") {
                    return None;
                }
                args.push(quote_ident(&name));
            }
            _ => return None,
        }
    }
    let key_pos = key_pos.into_iter().collect::<Option<Vec<usize>>>()?;
    if args.is_empty() {
        args.push("1".into());
    }
    // The FROM and WHERE part must be a per-row select-project-filter.
    let spf = format!(
        "SELECT {} {}",
        args.join(", "),
        &sql[toks[from].start..toks[group].start]
    );
    let relation = spf_relation(&spf)?;
    Some(GroupAgg {
        relation,
        keys,
        key_pos,
        sums,
    })
}

/// `name` as a double-quoted SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Names (lower-cased) of every identifier in `sql`: a superset of the relations it
/// reads, intersected with the catalog to find dependencies.
pub fn identifiers(sql: &str) -> Vec<String> {
    tokenize(sql)
        .map(|toks| toks.iter().filter_map(|t| t.ident()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(sql: &str) -> SubscribeStmt {
        match parse(sql, false) {
            Ok(Stmt::Subscribe(s)) => s,
            other => panic!("{sql}: {other:?}"),
        }
    }

    #[test]
    fn subscribe_forms() {
        let s = sub("SUBSCRIBE t");
        assert_eq!(s.relation, Relation::Name("t".into()));
        assert!(!s.progress && s.snapshot);
        let s = sub("SUBSCRIBE TO materialize.public.t WITH (PROGRESS, SNAPSHOT = false) AS OF AT LEAST 5 UP TO 10");
        assert_eq!(s.relation, Relation::Name("t".into()));
        assert!(s.progress && !s.snapshot);
        assert_eq!(
            s.as_of,
            Some(AsOf {
                ts: 5,
                at_least: true
            })
        );
        assert_eq!(s.up_to, Some(10));
        let s = sub("SUBSCRIBE (SELECT a, (b) FROM t) ENVELOPE UPSERT (KEY (a))");
        assert_eq!(s.relation, Relation::Query("SELECT a, (b) FROM t".into()));
        assert_eq!(s.upsert_key, Some(vec!["a".to_owned()]));
        let s = sub("SUBSCRIBE t WITH (PROGRESS) ENVELOPE UPSERT (KEY (b, a))");
        assert_eq!(s.upsert_key, Some(vec!["b".to_owned(), "a".to_owned()]));
        assert!(s.progress);
        let s = sub("SUBSCRIBE t WITH (PROGRESS = true) AS OF '12'::mz_timestamp");
        assert_eq!(s.as_of.map(|a| a.ts), Some(12));
    }

    #[test]
    fn subscribe_errors() {
        let err = |sql: &str| parse(sql, false).unwrap_err();
        assert_eq!(err("TAIL t").message, "TAIL has been renamed to SUBSCRIBE");
        assert_eq!(err("SUBSCRIBE t UP TO -1").message, CASTABLE);
        assert_eq!(err("SUBSCRIBE t UP TO null").message, CASTABLE);
        assert_eq!(
            err("SUBSCRIBE t UP TO null::mz_timestamp").message,
            CASTABLE
        );
        assert_eq!(err("SUBSCRIBE t UP TO 'xxx'").message, CASTABLE);
        assert_eq!(
            err("SUBSCRIBE (SELECT 1) AS OF NULL::timestamptz").message,
            CASTABLE
        );
        assert!(err("SUBSCRIBE t UP TO now()")
            .message
            .contains("unmaterializable"));
        assert!(err("SUBSCRIBE t UP TO mz_now()")
            .message
            .contains("unmaterializable"));
        assert!(err("SUBSCRIBE t UP TO current_database()::mz_timestamp")
            .message
            .contains("unmaterializable"));
        assert!(err("SUBSCRIBE t UP TO current_database()")
            .message
            .contains("implicitly casting"));
        assert_eq!(parse("SUBSCRIBE t", true).unwrap_err().code, "42601");
    }

    #[test]
    fn legacy_tail() {
        let Ok(Stmt::Subscribe(s)) = parse("TAIL t WITH (SNAPSHOT = false, PROGRESS)", true) else {
            panic!()
        };
        assert!(s.legacy && s.progress && !s.snapshot);
        let Ok(Stmt::Subscribe(s)) = parse("TAIL (SELECT 1) (PROGRESS) AS OF 7", true) else {
            panic!()
        };
        assert!(s.progress);
        assert_eq!(s.as_of.map(|a| a.ts), Some(7));
    }

    #[test]
    fn cursor_statements() {
        let Ok(Stmt::Declare {
            name,
            query: CursorQuery::Subscribe(s),
        }) = parse("DECLARE c CURSOR FOR SUBSCRIBE t WITH (PROGRESS)", false)
        else {
            panic!()
        };
        assert_eq!(name, "c");
        assert!(s.progress);
        let fetch = |count, timeout| {
            Stmt::Fetch(FetchStmt {
                cursor: "c".into(),
                count,
                timeout,
            })
        };
        assert_eq!(
            parse("FETCH 3 c WITH (timeout = '1s')", false).unwrap(),
            fetch(Some(3), Some(Duration::from_secs(1)))
        );
        assert_eq!(
            parse("FETCH FORWARD ALL FROM c", false).unwrap(),
            fetch(None, None)
        );
        assert_eq!(parse("FETCH c", false).unwrap(), fetch(Some(1), None));
        assert!(parse("FETCH c WITH (timeout = '2d')", false).is_err());
        assert!(matches!(
            parse("COPY (SUBSCRIBE t) TO STDOUT", false),
            Ok(Stmt::CopySubscribe(_))
        ));
        assert_eq!(
            parse("CLOSE c", false).unwrap(),
            Stmt::Close {
                name: Some("c".into())
            }
        );
    }

    /// Only a query goes inside SUBSCRIBE/TAIL (...), COPY (...) and DECLARE,
    /// in a view and in a CTE, as in Materialize's parser.
    #[test]
    fn only_queries_where_queries_go() {
        let body = |found: &str| format!("Expected {QUERY_BODY}, found {found}");
        for (sql, legacy, want) in [
            ("SUBSCRIBE (DROP TABLE z)", false, body("DROP")),
            ("SUBSCRIBE (DELETE FROM items)", false, body("DELETE")),
            (
                "SUBSCRIBE TO (INSERT INTO t VALUES (1)) WITH (PROGRESS)",
                false,
                body("INSERT"),
            ),
            ("SUBSCRIBE ()", false, body("right parenthesis")),
            (
                "SUBSCRIBE (SELECT 1 UNION ALL)",
                false,
                body("right parenthesis"),
            ),
            ("SUBSCRIBE ((UPDATE t SET a = 1))", false, body("UPDATE")),
            (
                "SUBSCRIBE (nonsense)",
                false,
                body("identifier \"nonsense\""),
            ),
            (
                "SUBSCRIBE (WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x)",
                false,
                body("DELETE"),
            ),
            (
                "SUBSCRIBE (WITH x AS (SELECT 1) DELETE FROM t)",
                false,
                body("DELETE"),
            ),
            (
                "SUBSCRIBE (SELECT 1 UNION (DELETE FROM t))",
                false,
                body("DELETE"),
            ),
            ("TAIL (DELETE FROM t)", true, body("DELETE")),
            (
                "COPY (DELETE FROM t) TO STDOUT",
                false,
                "unsupported query in COPY".into(),
            ),
            (
                "COPY (DROP TABLE t) TO STDOUT",
                false,
                "unsupported query in COPY".into(),
            ),
            (
                "COPY (WITH x AS (SELECT 1) DELETE FROM t) TO STDOUT",
                false,
                body("DELETE"),
            ),
            (
                "COPY (SUBSCRIBE (DELETE FROM t)) TO STDOUT",
                false,
                body("DELETE"),
            ),
            (
                "DECLARE c CURSOR FOR DELETE FROM t",
                false,
                "Expected SELECT, VALUES, SUBSCRIBE, or a subquery, found DELETE".into(),
            ),
            (
                "DECLARE c CURSOR FOR DROP TABLE t",
                true,
                "Expected SELECT, VALUES, TAIL, or a subquery, found DROP".into(),
            ),
            (
                "DECLARE c CURSOR FOR WITH x AS (SELECT 1) UPDATE t SET a = 1",
                false,
                body("UPDATE"),
            ),
            (
                "DECLARE c CURSOR FOR SUBSCRIBE (DELETE FROM t)",
                false,
                body("DELETE"),
            ),
            ("WITH x AS (SELECT 1) DELETE FROM t", false, body("DELETE")),
            (
                "WITH x AS SELECT 1",
                false,
                "Expected left parenthesis, found SELECT".into(),
            ),
            ("SELECT 1 UNION DELETE FROM t", false, body("DELETE")),
            ("CREATE VIEW v AS DELETE FROM t", false, body("DELETE")),
            ("TABLE", false, "Expected identifier, found EOF".into()),
        ] {
            let err = parse(sql, legacy).expect_err(sql);
            assert_eq!((err.code, err.message), ("42601", want), "{sql}");
        }
    }

    /// The query forms Materialize accepts come out in a form SQLite runs.
    #[test]
    fn queries_in_sqlite_form() {
        let relation = |sql: &str| match parse(sql, false) {
            Ok(Stmt::Subscribe(s)) => s.relation,
            other => panic!("{sql}: {other:?}"),
        };
        let query = |q: &str| Relation::Query(q.to_owned());
        assert_eq!(relation("SUBSCRIBE (TABLE t)"), query("SELECT * FROM t"));
        assert_eq!(
            relation("SUBSCRIBE ((SELECT a FROM t))"),
            query("SELECT a FROM t")
        );
        assert_eq!(
            relation("SUBSCRIBE ((SELECT 1) UNION ALL (VALUES (2)) ORDER BY 1)"),
            query("SELECT * FROM (SELECT 1) UNION ALL SELECT * FROM (VALUES (2)) ORDER BY 1")
        );
        assert_eq!(
            relation(
                "SUBSCRIBE (WITH RECURSIVE x (a) AS ((SELECT 1)), y AS MATERIALIZED (TABLE x) SELECT a FROM y)"
            ),
            query("WITH RECURSIVE x (a) AS (SELECT 1), y AS MATERIALIZED (SELECT * FROM x) SELECT a FROM y")
        );
        assert_eq!(
            parse("COPY (VALUES (1)) TO STDOUT", false).unwrap(),
            Stmt::CopySelect("VALUES (1)".into())
        );
        assert_eq!(
            parse("DECLARE c CURSOR FOR TABLE public.t", false).unwrap(),
            Stmt::Declare {
                name: "c".into(),
                query: CursorQuery::Select("SELECT * FROM public.t".into())
            }
        );
        for (sql, want) in [
            ("(SELECT 1)", "SELECT 1"),
            ("TABLE t", "SELECT * FROM t"),
            ("SELECT 'x' UNION SELECT 'y'", "SELECT 'x' UNION SELECT 'y'"),
        ] {
            assert_eq!(
                parse(sql, false).unwrap(),
                Stmt::Select { sql: want.into() },
                "{sql}"
            );
        }
    }

    #[test]
    fn splitting() {
        let parts = split_statements("BEGIN; SELECT ';'; -- x;\n FETCH 2 c;;").unwrap();
        assert_eq!(parts, vec!["BEGIN", "SELECT ';'", "FETCH 2 c"]);
    }

    #[test]
    fn translation() {
        assert_eq!(
            translate("SELECT 1/a FROM public.t").unwrap(),
            "SELECT mz_div(1, a) FROM t"
        );
        assert_eq!(
            translate("SELECT a*b/c").unwrap(),
            "SELECT mz_div(a * b, c)"
        );
        assert_eq!(
            translate("SELECT f(x)::text, 'a''b'").unwrap(),
            "SELECT CAST(f ( x ) AS TEXT) , 'a''b'"
        );
        assert_eq!(
            translate("SELECT (a+1)/2.0").unwrap(),
            "SELECT mz_div(( a + 1 ), 2.0)"
        );
        assert_eq!(
            translate("SELECT * FROM mz_internal.mz_sessions WHERE id = $1").unwrap(),
            "SELECT * FROM mz_sessions WHERE id = ?1"
        );
        assert_eq!(
            translate("SELECT 't'::bool").unwrap(),
            "SELECT mz_bool('t')"
        );
        assert_eq!(
            translate("CREATE TABLE x (a double precision)").unwrap(),
            "CREATE TABLE x ( a float8 )"
        );
    }

    #[test]
    fn select_list_typing() {
        let lookup = |c: &str| match c {
            "a" => Some(PgType::Int4),
            "f" => Some(PgType::Float8),
            _ => None,
        };
        let items = select_items(
            "SELECT count(*), sum(a) AS s, a, 1/a, 'x' || a, a > 1, avg(f) m, 1 FROM t",
            &lookup,
        )
        .unwrap();
        let got: Vec<(String, Option<PgType>)> =
            items.into_iter().map(|i| (i.name, i.ty)).collect();
        assert_eq!(
            got,
            vec![
                ("count".into(), Some(PgType::Int8)),
                ("s".into(), Some(PgType::Int8)),
                ("a".into(), Some(PgType::Int4)),
                ("?column?".into(), Some(PgType::Int4)),
                ("?column?".into(), Some(PgType::Text)),
                ("?column?".into(), Some(PgType::Bool)),
                ("m".into(), Some(PgType::Float8)),
                ("?column?".into(), Some(PgType::Int4)),
            ]
        );
        let items = select_items("VALUES (1, 'a')", &lookup).unwrap();
        assert_eq!(items[1].name, "column2");
        assert_eq!(items[1].ty, Some(PgType::Text));
        let items = select_items("SELECT sum(a)::text FROM t", &lookup).unwrap();
        assert_eq!(
            (items[0].name.as_str(), items[0].ty),
            ("sum", Some(PgType::Text))
        );
    }

    #[test]
    fn arbitrary_input_never_panics() {
        let alphabet: Vec<char> = "SELECT SUBSCRIBE FETCH ( ) ' \" ; , . :: / * $1 a t 1 é -- \n WITH AS OF UP TO KEY ENVELOPE COPY DECLARE"
            .chars()
            .collect();
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..3000 {
            let len = (seed % 40) as usize;
            let mut text = String::new();
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                text.push(alphabet[(seed % alphabet.len() as u64) as usize]);
            }
            let _ = split_statements(&text);
            let _ = parse(&text, false);
            let _ = parse(&text, true);
            let _ = translate(&text);
            let _ = select_items(&text, &|_| None);
            for prefix in [
                "SUBSCRIBE ",
                "COPY (",
                "DECLARE c CURSOR FOR ",
                "FETCH ",
                "SELECT ",
            ] {
                let t = format!("{prefix}{text}");
                let _ = parse(&t, false);
                let _ = translate(&t);
                let _ = select_items(&t, &|_| None);
            }
        }
    }

    #[test]
    fn select_project_filter_relation() {
        let rel = |q: &str| spf_relation(&translate(q).unwrap());
        for (q, want) in [
            ("SELECT a, b FROM t", "t"),
            ("SELECT * FROM \"Everything\"", "Everything"),
            (
                "select a + 1 AS x FROM T AS r WHERE r.b IS NULL OR a IN (1, 2)",
                "t",
            ),
            (
                "SELECT a::text || b, 10 / a FROM public.t x WHERE b % 10 = 0",
                "t",
            ),
            (
                "SELECT CASE WHEN a > 1 THEN upper(b) ELSE coalesce(b, '') END FROM t ORDER BY a",
                "t",
            ),
        ] {
            assert_eq!(rel(q).as_deref(), Some(want), "{q}");
        }
        for q in [
            "SELECT count(*) FROM t",
            "SELECT a, sum(b) FROM t GROUP BY a",
            "SELECT max(a, b) FROM t",
            "SELECT DISTINCT a FROM t",
            "SELECT a FROM t LIMIT 1",
            "SELECT a FROM t ORDER BY a OFFSET 2",
            "SELECT a, random() FROM t",
            "SELECT a, now() FROM t",
            "SELECT mz_epoch_ms() FROM t",
            "SELECT date('now') FROM t",
            "SELECT a, current_timestamp FROM t",
            "SELECT rowid, a FROM t",
            "SELECT a FROM t, u",
            "SELECT a FROM t JOIN u ON a = x",
            "SELECT a FROM t LEFT JOIN u ON a = x",
            "SELECT a FROM t WHERE a IN (SELECT x FROM u)",
            "SELECT a FROM t UNION SELECT x FROM u",
            "SELECT a, row_number() OVER () FROM t",
            "SELECT \"f\"(a) FROM t",
            "SELECT a FROM main.t",
            "SELECT a FROM (SELECT a FROM t)",
            "WITH c AS (SELECT a FROM t) SELECT a FROM c",
            "VALUES (1)",
            "SELECT 1",
            "SELECT a FROM t WHERE a = $1",
        ] {
            assert_eq!(rel(q), None, "{q}");
        }
    }

    #[test]
    fn group_aggregates() {
        let agg = |q: &str| group_aggregate(&translate(q).unwrap());
        let g = agg("SELECT b, a, count(*) AS n, sum(c) s, count(b) FROM t AS x WHERE x.c > 1 GROUP BY a, b")
            .expect("eligible");
        assert_eq!(
            g,
            GroupAgg {
                relation: "t".into(),
                keys: vec!["a".into(), "b".into()],
                key_pos: vec![1, 0],
                sums: vec![(3, "c".into())],
            }
        );
        assert!(agg("SELECT count(*), a FROM public.t GROUP BY a").is_some());
        for q in [
            "SELECT count(*) FROM t",
            "SELECT a, count(*) FROM t",
            "SELECT a, avg(b) FROM t GROUP BY a",
            "SELECT a, max(b) FROM t GROUP BY a",
            "SELECT a, count(DISTINCT b) FROM t GROUP BY a",
            "SELECT a, sum(b) + 1 FROM t GROUP BY a",
            "SELECT a, sum(b + 1) FROM t GROUP BY a",
            "SELECT a, b, count(*) FROM t GROUP BY a",
            "SELECT a, count(*) FROM t GROUP BY a, b",
            "SELECT a % 10, count(*) FROM t GROUP BY a % 10",
            "SELECT a, count(*) FROM t GROUP BY a HAVING count(*) > 1",
            "SELECT a, count(*) FROM t GROUP BY a ORDER BY a",
            "SELECT a, count(*) FROM t GROUP BY a LIMIT 1",
            "SELECT a, count(*) FROM t WHERE random() > 0 GROUP BY a",
            "SELECT a, count(*) FROM t, u GROUP BY a",
            "SELECT a, count(*) FROM t WHERE a IN (SELECT x FROM u) GROUP BY a",
            "SELECT a, count(*) OVER () FROM t GROUP BY a",
            "SELECT DISTINCT a, count(*) FROM t GROUP BY a",
            "SELECT a, count(*) FROM t WHERE a = $1 GROUP BY a",
        ] {
            assert_eq!(agg(q), None, "{q}");
        }
    }
}
