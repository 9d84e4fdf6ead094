//! SQL text, in four jobs:
//!
//! - `lex`: the tokenizer, statement splitting, keywords and identifier quoting.
//! - `parse`: the Materialize-specific statements (SUBSCRIBE, TAIL, DECLARE,
//!   FETCH, CLOSE, COPY, SET, SHOW, transactions, CREATE, DROP) into [`Stmt`].
//!   Wherever Materialize takes only a query (SUBSCRIBE, COPY, DECLARE, views,
//!   CTEs) the parser checks that it is one, so no statement that writes runs
//!   as a read.
//! - `translate`: everything else passes to SQLite after a light rewrite
//!   ([`translate()`]).
//! - `analyze`: result column names and types, select-project-filter and
//!   grouped-aggregate detection for incremental maintenance, and the
//!   identifiers a query names.
//!
//! This module is pure; it spawns nothing.

mod analyze;
mod lex;
mod parse;
mod translate;

pub(crate) use analyze::{group_aggregate, identifiers, select_items, spf_relation};
pub(crate) use lex::{quote_ident, split_statements, tokenize, Tok};
pub(crate) use parse::{parse, CursorQuery, DropKind, FetchStmt, Relation, Stmt, SubscribeStmt};
pub(crate) use translate::translate;

#[cfg(test)]
mod tests {
    use super::*;

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
}
