//! Where Materialize takes only a query (inside `SUBSCRIBE (...)`, `COPY
//! (...)`, after `DECLARE ... FOR`, in a view and in each CTE), this checks
//! that it is one, so no statement that writes is ever run as a read, and
//! rewrites it into a form SQLite runs.

use crate::error::SqlError;
use crate::sql::lex::{group_end, is_keyword, Tok, Token};

/// Where Materialize's parser wants a query body and finds something else.
const QUERY_BODY: &str = "SELECT, VALUES, or a subquery in the query body";

/// Whether a query can start at `t`: SELECT, WITH, VALUES, TABLE or `(`.
pub(super) fn starts_query(t: &Token) -> bool {
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

pub(super) fn is_statement_word(t: &Token) -> bool {
    STATEMENT_WORDS.iter().any(|w| t.is_word(w))
}

/// A token as Materialize's parser names it after "found" (`EOF` for none):
/// keywords upper-cased, identifiers quoted.
pub(super) fn describe_token(t: Option<&Token>) -> String {
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
pub(super) fn query_text(
    sql: &str,
    toks: &[Token],
    mut lo: usize,
    mut hi: usize,
) -> Result<String, SqlError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::parse::{parse, CursorQuery, Relation, Stmt};

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
}
