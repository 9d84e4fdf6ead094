//! Analysis of queries without running them: naming and typing result
//! columns (`typing`), deciding whether a subscription can be maintained
//! incrementally (`incremental`), and the identifiers a query names, from
//! which the store finds the relations it depends on.

mod incremental;
mod typing;

use super::lex::{tokenize, Tok, Token};

pub(crate) use incremental::{group_aggregate, spf_relation};
pub(crate) use typing::select_items;

/// Splits `toks` at its top-level commas: select items, or a call's arguments.
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

/// Names (lower-cased) of every identifier in `sql`: a superset of the relations it
/// reads, intersected with the catalog to find dependencies.
pub(crate) fn identifiers(sql: &str) -> Vec<String> {
    tokenize(sql)
        .map(|toks| toks.iter().filter_map(|t| t.ident()).collect())
        .unwrap_or_default()
}
