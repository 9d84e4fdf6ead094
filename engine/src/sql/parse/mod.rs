//! Parsing: the Materialize-specific statements (SUBSCRIBE, TAIL, DECLARE,
//! FETCH, CLOSE, COPY, SET, SHOW, transactions, CREATE and DROP) into [`Stmt`].
//! Everything else is classified by its first word and passed on as text.
//!
//! `subscribe` parses SUBSCRIBE/TAIL with their options and AS OF/UP TO
//! bounds; `query` checks that only a query goes where Materialize takes one.

mod ast;
mod query;
mod subscribe;

use std::time::Duration;

use super::lex::{group_end, tokenize, Tok, Token};
use crate::error::SqlError;
use query::{describe_token, is_statement_word, query_text, starts_query};
use subscribe::parse_subscribe;

pub(crate) use ast::{CursorQuery, DropKind, FetchStmt, Relation, Stmt, SubscribeStmt};

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
pub(crate) fn parse(sql: &str, legacy: bool) -> Result<Stmt, SqlError> {
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
fn parse_interval(s: &str) -> Result<Duration, SqlError> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
