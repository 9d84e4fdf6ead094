//! Lexing: the tokenizer, splitting a query string into statements, the
//! keywords that end an expression, parenthesis matching and identifier
//! quoting. Every other part of `sql` works on these tokens.

use crate::error::SqlError;

/// One lexical token.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Tok {
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
pub(crate) struct Token {
    pub(crate) tok: Tok,
    pub(super) start: usize,
    pub(super) end: usize,
}

impl Token {
    pub(crate) fn is_word(&self, w: &str) -> bool {
        matches!(&self.tok, Tok::Word(x) if x.eq_ignore_ascii_case(w))
    }

    /// Identifier text, folded to lower case unless quoted.
    pub(crate) fn ident(&self) -> Option<String> {
        match &self.tok {
            Tok::Word(w) => Some(w.to_ascii_lowercase()),
            Tok::Quoted(q) => Some(q.clone()),
            _ => None,
        }
    }
}

pub(crate) fn tokenize(sql: &str) -> Result<Vec<Token>, SqlError> {
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
pub(crate) fn split_statements(sql: &str) -> Result<Vec<String>, SqlError> {
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

pub(super) fn is_keyword(w: &str) -> bool {
    KEYWORDS.iter().any(|k| k.eq_ignore_ascii_case(w))
}

/// Index just past the `)` that closes the group opening at `open`; `None` when
/// it is never closed.
pub(super) fn group_end(toks: &[Token], open: usize) -> Option<usize> {
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

/// `name` as a double-quoted SQL identifier.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitting() {
        let parts = split_statements("BEGIN; SELECT ';'; -- x;\n FETCH 2 c;;").unwrap();
        assert_eq!(parts, vec!["BEGIN", "SELECT ';'", "FETCH 2 c"]);
    }
}
