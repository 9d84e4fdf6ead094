//! Subscription output: consolidating diffs and shaping them into Materialize's
//! row layouts (diff mode, `ENVELOPE UPSERT`, progress rows).
//!
//! The store thread computes diffs and calls [`Output`] to build rows; sessions
//! receive them as [`SubEvent`]s over an unbounded channel (Materialize buffers
//! subscription output unboundedly too). This module spawns nothing.

use std::collections::{BTreeMap, HashMap};

use rusqlite::types::ValueRef;

use super::error::SqlError;
use super::sql::SubscribeStmt;
use super::value::{Column, Datum, PgType, Row};

/// What a session receives from its subscription.
#[derive(Debug)]
pub(crate) enum SubEvent {
    /// Output rows in order (data and progress rows), one or more timestamps.
    Rows(Vec<Row>),
    /// The subscription failed (dropped relation, evaluation error); it is over.
    Error(SqlError),
    /// The subscription completed (constant input or UP TO reached).
    Done,
}

/// Sums the diffs of identical rows and drops the rows that cancel out; sorted by
/// row, which is the order Materialize emits within a timestamp.
pub(crate) fn consolidate(updates: impl IntoIterator<Item = (Row, i64)>) -> Vec<(Row, i64)> {
    let mut map: BTreeMap<Row, i64> = BTreeMap::new();
    for (row, diff) in updates {
        *map.entry(row).or_insert(0) += diff;
    }
    map.into_iter().filter(|(_, d)| *d != 0).collect()
}

/// The multiset difference `new - old`, consolidated.
pub(crate) fn diff_maps(old: &HashMap<Row, i64>, new: &HashMap<Row, i64>) -> Vec<(Row, i64)> {
    let mut out = Vec::new();
    for (row, n) in new {
        let d = n - old.get(row).copied().unwrap_or(0);
        if d != 0 {
            out.push((row.clone(), d));
        }
    }
    for (row, o) in old {
        if !new.contains_key(row) && *o != 0 {
            out.push((row.clone(), -o));
        }
    }
    out.sort();
    out
}

/// The previous result of a re-evaluated subscription, as encoded rows and their
/// counts. A new evaluation is fed row by row ([`ResultSet::observe`]) straight
/// from SQLite's values: an unchanged row costs one encoding into a reused buffer
/// and one hash lookup, with no allocation. [`ResultSet::finish`] then yields the
/// diff and makes the new result the previous one.
#[derive(Debug, Default)]
pub(crate) struct ResultSet {
    rows: HashMap<Box<[u8]>, Counts>,
    /// The row being encoded.
    scratch: Vec<u8>,
}

#[derive(Debug, Default)]
struct Counts {
    /// Count in the previous result.
    prev: i64,
    /// Count so far in the evaluation under way.
    seen: i64,
}

impl ResultSet {
    pub(crate) fn from_counts(counts: HashMap<Row, i64>) -> ResultSet {
        let mut set = ResultSet::default();
        for (row, n) in counts {
            set.scratch.clear();
            for d in &row {
                encode_value(&mut set.scratch, d.as_value_ref());
            }
            set.rows
                .entry(set.scratch.as_slice().into())
                .or_default()
                .prev += n;
        }
        set.rows.retain(|_, c| c.prev != 0);
        set
    }

    /// Counts one row of the evaluation under way.
    pub(crate) fn observe<'a, E>(
        &mut self,
        row: impl IntoIterator<Item = Result<ValueRef<'a>, E>>,
    ) -> Result<(), E> {
        self.scratch.clear();
        for v in row {
            encode_value(&mut self.scratch, v?);
        }
        match self.rows.get_mut(self.scratch.as_slice()) {
            Some(c) => c.seen += 1,
            None => {
                self.rows
                    .insert(self.scratch.as_slice().into(), Counts { prev: 0, seen: 1 });
            }
        }
        Ok(())
    }

    /// Ends the evaluation: returns `new - previous`, consolidated and sorted, and
    /// keeps the new result.
    pub(crate) fn finish(&mut self) -> Vec<(Row, i64)> {
        let mut out = Vec::new();
        self.rows.retain(|key, c| {
            if c.seen != c.prev {
                out.push((decode_row(key), c.seen - c.prev));
            }
            c.prev = c.seen;
            c.seen = 0;
            c.prev != 0
        });
        out.sort();
        out
    }

    /// Forgets a partial evaluation (one that failed), keeping the previous result.
    pub(crate) fn abandon(&mut self) {
        self.rows.retain(|_, c| {
            c.seen = 0;
            c.prev != 0
        });
    }
}

const TAG_NULL: u8 = 0;
const TAG_INT: u8 = 1;
const TAG_REAL: u8 = 2;
const TAG_TEXT: u8 = 3;
const TAG_BLOB: u8 = 4;

/// Appends one value; text goes in as [`Datum::from_sqlite`] would read it, so two
/// encodings are equal exactly when the datums are.
fn encode_value(buf: &mut Vec<u8>, v: ValueRef<'_>) {
    let bytes = |buf: &mut Vec<u8>, tag: u8, b: &[u8]| {
        buf.push(tag);
        buf.extend_from_slice(&(b.len() as u64).to_le_bytes());
        buf.extend_from_slice(b);
    };
    match v {
        ValueRef::Null => buf.push(TAG_NULL),
        ValueRef::Integer(i) => {
            buf.push(TAG_INT);
            buf.extend_from_slice(&i.to_le_bytes());
        }
        ValueRef::Real(f) => {
            buf.push(TAG_REAL);
            buf.extend_from_slice(&f.to_bits().to_le_bytes());
        }
        ValueRef::Text(t) => bytes(buf, TAG_TEXT, String::from_utf8_lossy(t).as_bytes()),
        ValueRef::Blob(b) => bytes(buf, TAG_BLOB, b),
    }
}

/// The inverse of [`encode_value`] over a whole row. Keys are only ever produced
/// by `encode_value`, so a malformed key cannot occur; it would decode short.
fn decode_row(mut key: &[u8]) -> Row {
    let mut row = Vec::new();
    let word = |k: &[u8]| -> Option<[u8; 8]> { k.get(..8)?.try_into().ok() };
    while let Some((&tag, rest)) = key.split_first() {
        let datum = match tag {
            TAG_INT | TAG_REAL => {
                let Some(w) = word(rest) else { break };
                key = &rest[8..];
                if tag == TAG_INT {
                    Datum::Int(i64::from_le_bytes(w))
                } else {
                    Datum::Real(f64::from_bits(u64::from_le_bytes(w)))
                }
            }
            TAG_TEXT | TAG_BLOB => {
                let Some(len) =
                    word(rest).and_then(|w| usize::try_from(u64::from_le_bytes(w)).ok())
                else {
                    break;
                };
                let Some(b) = rest.get(8..8 + len) else { break };
                key = &rest[8 + len..];
                if tag == TAG_TEXT {
                    Datum::Text(String::from_utf8_lossy(b).into_owned())
                } else {
                    Datum::Blob(b.to_vec())
                }
            }
            _ => {
                key = rest;
                Datum::Null
            }
        };
        row.push(datum);
    }
    row
}

/// The output layout of one subscription.
#[derive(Debug, Clone)]
pub(crate) struct Output {
    pub(crate) columns: Vec<Column>,
    pub(crate) progress: bool,
    pub(crate) legacy: bool,
    pub(crate) up_to: Option<u64>,
    /// For `ENVELOPE UPSERT`: key column positions (in KEY order) and the rest.
    upsert: Option<(Vec<usize>, Vec<usize>)>,
}

impl Output {
    pub(crate) fn new(stmt: &SubscribeStmt, rel: Vec<Column>) -> Result<Output, SqlError> {
        let mut columns = vec![Column::new("mz_timestamp", PgType::MzTimestamp)];
        if stmt.progress {
            columns.push(Column::new("mz_progressed", PgType::Bool));
        }
        let upsert = match &stmt.upsert_key {
            Some(keys) => {
                let mut key_idx = Vec::new();
                for k in keys {
                    let i = rel.iter().position(|c| &c.name == k).ok_or_else(|| {
                        SqlError::new("42703", format!("column \"{k}\" does not exist"))
                    })?;
                    key_idx.push(i);
                }
                let val_idx: Vec<usize> = (0..rel.len()).filter(|i| !key_idx.contains(i)).collect();
                columns.push(Column::new("mz_state", PgType::Text));
                for &i in key_idx.iter().chain(val_idx.iter()) {
                    if let Some(c) = rel.get(i) {
                        columns.push(c.clone());
                    }
                }
                Some((key_idx, val_idx))
            }
            None => {
                columns.push(Column::new("mz_diff", PgType::Int8));
                columns.extend(rel);
                None
            }
        };
        Ok(Output {
            columns,
            progress: stmt.progress,
            legacy: stmt.legacy,
            up_to: stmt.up_to,
            upsert,
        })
    }

    /// Whether a row at `ts` may still be emitted.
    pub(crate) fn before_up_to(&self, ts: u64) -> bool {
        self.up_to.is_none_or(|u| ts < u)
    }

    fn head(&self, ts: u64) -> Row {
        let mut row = vec![Datum::Text(ts.to_string())];
        if self.progress {
            row.push(Datum::Int(0));
        }
        row
    }

    pub(crate) fn progress_row(&self, ts: u64) -> Row {
        let mut row = vec![Datum::Text(ts.to_string()), Datum::Int(1)];
        row.resize(self.columns.len(), Datum::Null);
        row
    }

    /// Data rows for the consolidated `diffs` at `ts` (none at or past UP TO).
    pub(crate) fn rows(&self, ts: u64, diffs: Vec<(Row, i64)>) -> Vec<Row> {
        if !self.before_up_to(ts) || diffs.is_empty() {
            return Vec::new();
        }
        let Some((keys, vals)) = &self.upsert else {
            let mut diffs = diffs;
            diffs.sort();
            return diffs
                .into_iter()
                .map(|(r, d)| {
                    let mut row = self.head(ts);
                    row.push(Datum::Int(d));
                    row.extend(r);
                    row
                })
                .collect();
        };
        let pick = |r: &Row, idx: &[usize]| -> Row {
            idx.iter()
                .map(|&i| r.get(i).cloned().unwrap_or(Datum::Null))
                .collect()
        };
        let mut groups: BTreeMap<Row, Vec<(Row, i64)>> = BTreeMap::new();
        for (r, d) in diffs {
            groups.entry(pick(&r, keys)).or_default().push((r, d));
        }
        let nulls = || vec![Datum::Null; vals.len()];
        let mut out = Vec::new();
        for (key, updates) in groups {
            let (state, values) = match updates.as_slice() {
                [(r, 1)] => ("upsert", pick(r, vals)),
                [(_, -1)] => ("delete", nulls()),
                [(_, -1), (b, 1)] => ("upsert", pick(b, vals)),
                [(a, 1), (_, -1)] => ("upsert", pick(a, vals)),
                _ => ("key_violation", nulls()),
            };
            let mut row = self.head(ts);
            row.push(Datum::Text(state.to_owned()));
            row.extend(key);
            row.extend(values);
            out.push(row);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::{parse, Stmt};

    fn output(sql: &str) -> Output {
        let Ok(Stmt::Subscribe(s)) = parse(sql, false) else {
            panic!("{sql}")
        };
        Output::new(
            &s,
            vec![
                Column::new("a", PgType::Int4),
                Column::new("b", PgType::Int4),
            ],
        )
        .unwrap()
    }

    fn names(o: &Output) -> Vec<&str> {
        o.columns.iter().map(|c| c.name.as_str()).collect()
    }

    #[test]
    fn column_layouts() {
        assert_eq!(
            names(&output("SUBSCRIBE t")),
            ["mz_timestamp", "mz_diff", "a", "b"]
        );
        assert_eq!(
            names(&output("SUBSCRIBE t WITH (PROGRESS)")),
            ["mz_timestamp", "mz_progressed", "mz_diff", "a", "b"]
        );
        assert_eq!(
            names(&output("SUBSCRIBE t ENVELOPE UPSERT (KEY (a))")),
            ["mz_timestamp", "mz_state", "a", "b"]
        );
        assert_eq!(
            names(&output(
                "SUBSCRIBE t ENVELOPE UPSERT (KEY (b)) WITH (PROGRESS)"
            )),
            ["mz_timestamp", "mz_progressed", "mz_state", "b", "a"]
        );
    }

    #[test]
    fn consolidation_and_diff() {
        let r = |a: i64| vec![Datum::Int(a)];
        let c = consolidate(vec![(r(1), 1), (r(1), 1), (r(2), 1), (r(2), -1), (r(1), 1)]);
        assert_eq!(c, vec![(r(1), 3)]);
        let old: HashMap<Row, i64> = [(r(1), 1), (r(2), 2)].into_iter().collect();
        let new: HashMap<Row, i64> = [(r(2), 1), (r(3), 1)].into_iter().collect();
        assert_eq!(
            diff_maps(&old, &new),
            vec![(r(1), -1), (r(2), -1), (r(3), 1)]
        );
    }

    #[test]
    fn upsert_states() {
        let o = output("SUBSCRIBE t ENVELOPE UPSERT (KEY (a))");
        let r = |a: i64, b: i64| vec![Datum::Int(a), Datum::Int(b)];
        let rows = o.rows(
            5,
            vec![
                (r(1, 10), 1),
                (r(2, 20), -1),
                (r(3, 30), -1),
                (r(3, 31), 1),
                (r(4, 1), 1),
                (r(4, 2), 1),
            ],
        );
        let states: Vec<(String, Option<String>)> = rows
            .iter()
            .map(|row| {
                (
                    row[1].to_text(PgType::Text).unwrap(),
                    row[3].to_text(PgType::Int4),
                )
            })
            .collect();
        assert_eq!(
            states,
            vec![
                ("upsert".into(), Some("10".into())),
                ("delete".into(), None),
                ("upsert".into(), Some("31".into())),
                ("key_violation".into(), None),
            ]
        );
        assert!(o.rows(5, vec![]).is_empty());
    }

    #[test]
    fn up_to_cuts_rows_and_progress() {
        let o = output("SUBSCRIBE t WITH (PROGRESS) UP TO 10");
        assert!(o
            .rows(10, vec![(vec![Datum::Int(1), Datum::Int(1)], 1)])
            .is_empty());
        assert_eq!(
            o.rows(9, vec![(vec![Datum::Int(1), Datum::Int(1)], 1)])
                .len(),
            1
        );
        let p = o.progress_row(4);
        assert_eq!(p.len(), 5);
        assert_eq!(p[1], Datum::Int(1));
        assert!(p[2].is_null());
    }
}
