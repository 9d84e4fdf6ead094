//! Translation to SQLite: everything not Materialize-specific runs in SQLite
//! after a light rewrite ([`translate`]): schema qualifiers dropped, `x::type`
//! turned into casts, `/` turned into `mz_div` so division by zero is an error
//! as in Materialize, `$n` parameters into `?n`, `ILIKE` into `LIKE`, and
//! `double precision` and `timestamp with time zone` mapped.

use super::lex::{group_end, is_keyword, quote_ident, tokenize, Tok, Token};
use crate::error::SqlError;

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
pub(crate) fn translate(sql: &str) -> Result<String, SqlError> {
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

/// Reads a type name after `::`; returns it and the index after it.
pub(super) fn cast_type(toks: &[Token], mut i: usize) -> Result<(String, usize), SqlError> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
