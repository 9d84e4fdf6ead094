//! Result column names and types the way Postgres would give them, from the
//! select list alone: Describe must not run the query. A bare column takes its
//! declared type through a [`ColumnLookup`]; other expressions get a static
//! type from their operators, functions and casts, or none when unsure.

use super::split_items;
use crate::sql::lex::{group_end, is_keyword, tokenize, Tok, Token};
use crate::sql::translate::cast_type;
use crate::value::PgType;

/// One select-list item, for naming and typing result columns the way Postgres
/// would without running the query.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SelectItem {
    pub(crate) name: String,
    pub(crate) ty: Option<PgType>,
    /// A bare column reference (`a` or `t.a`): its type comes from the relation.
    column_ref: Option<String>,
    pub(crate) star: bool,
}

/// Looks up a column's type by name in the relations the query reads.
pub(crate) type ColumnLookup<'a> = &'a dyn Fn(&str) -> Option<PgType>;

/// Analyzes the top-level select list of a query. `None` when it cannot tell.
pub(crate) fn select_items(sql: &str, lookup: ColumnLookup<'_>) -> Option<Vec<SelectItem>> {
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
fn expr_type(expr: &[Token], lookup: ColumnLookup<'_>) -> Option<PgType> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
