//! `SUBSCRIBE` and `TAIL`: the relation or query, `WITH (PROGRESS, SNAPSHOT)`,
//! `ENVELOPE UPSERT (KEY (...))`, and the `AS OF [AT LEAST]` / `UP TO` bounds,
//! evaluated here to timestamps with Materialize's error texts.

use super::ast::{AsOf, Relation, SubscribeStmt};
use super::P;
use crate::error::SqlError;
use crate::sql::lex::Tok;

pub(super) fn parse_subscribe(p: &mut P<'_>, legacy: bool) -> Result<SubscribeStmt, SqlError> {
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
                    Tok::Word(w) | Tok::Str(w) => crate::value::parse_bool(w),
                    Tok::Num(n) => crate::value::parse_bool(n),
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
            return u64::try_from(crate::store::now_ms()).map_err(|_| castable());
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
            match crate::value::parse_timestamp_micros(s) {
                Some(micros) if micros >= 0 && cast_to.is_some() => Ok((micros / 1000) as u64),
                _ => Err(castable()),
            }
        }
        _ => Err(castable()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::parse::{parse, Stmt};

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
}
