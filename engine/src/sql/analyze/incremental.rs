//! Which translated queries the store can maintain from a write's changed
//! rows instead of re-running them: select-project-filters over one relation
//! ([`spf_relation`]) and grouped `count`/`sum` aggregates over one table
//! ([`group_aggregate`]). Both lean towards "no": `None` means re-evaluate.

use super::split_items;
use crate::sql::lex::{is_keyword, quote_ident, tokenize, Tok, Token};

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
pub(crate) fn spf_relation(sql: &str) -> Option<String> {
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
pub(crate) struct GroupAgg {
    /// The relation read (lower-cased unless quoted).
    pub(crate) relation: String,
    /// The group columns, in GROUP BY order.
    pub(crate) keys: Vec<String>,
    /// Output position of each group column, in `keys` order.
    pub(crate) key_pos: Vec<usize>,
    /// Output positions of `sum` results and the columns they sum.
    pub(crate) sums: Vec<(usize, String)>,
}

/// Recognizes a translated query that is a grouped aggregate whose groups can be
/// recomputed one by one: every select item is a plain group column or
/// `count(*)`, `count(col)` or `sum(col)` over plain columns (each optionally
/// `AS name`), the GROUP BY lists plain columns that all appear as items, and
/// the rest (FROM and WHERE) is a select-project-filter by [`spf_relation`]. No
/// HAVING, DISTINCT, ORDER BY, other aggregates or expressions around them.
/// `None` when unsure.
pub(crate) fn group_aggregate(sql: &str) -> Option<GroupAgg> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::translate::translate;

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
