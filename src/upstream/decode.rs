//! Turns SUBSCRIBE output rows (text format) into the gateway's changes.
//!
//! Values arrive as text; the column types learned when the query was prepared decide
//! how each becomes JSON: integers, floats and booleans as JSON scalars, json/jsonb as
//! (compacted) JSON, numeric as a string so no precision is lost, and everything else
//! (text, timestamps, dates, uuids, intervals...) as a string.

use tokio_postgres::types::Type;
use tokio_postgres::SimpleQueryRow;

use std::sync::Arc;

use crate::row::{Row, SourceChange};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("upstream output has unexpected columns: {0}")]
    Layout(String),
    #[error("column {column:?}: {message}")]
    Value { column: String, message: String },
    #[error("row of {bytes} bytes exceeds the limit of {limit} bytes")]
    Oversized { bytes: usize, limit: usize },
}

/// How a value column turns into JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bool,
    Integer,
    Float,
    Json,
    String,
}

impl Kind {
    fn of(t: &Type) -> Kind {
        match *t {
            Type::BOOL => Kind::Bool,
            Type::INT2 | Type::INT4 | Type::INT8 | Type::OID => Kind::Integer,
            Type::FLOAT4 | Type::FLOAT8 => Kind::Float,
            Type::JSON | Type::JSONB => Kind::Json,
            _ => Kind::String,
        }
    }
}

#[derive(Debug, Clone)]
struct Col {
    /// `"name":`, escaped once.
    prefix: String,
    kind: Kind,
    /// Position in the SUBSCRIBE output row.
    index: usize,
}

/// One decoded output row.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Progress(u64),
    Data {
        ts: u64,
        change: SourceChange,
    },
    /// Materialize found several rows for one key at `ts`; the key's value is undefined.
    KeyViolation {
        ts: u64,
        key: Box<str>,
    },
    /// A diff row of a keyed stream on a TAIL-era server, to pair by key.
    KeyedDiff {
        ts: u64,
        key: Box<str>,
        row: Arc<Row>,
        diff: i64,
    },
}

/// One timestamp's diff rows of a keyed stream: (key, row, diff).
pub type KeyedDiffs = Vec<(Box<str>, Arc<Row>, i64)>;

/// What one timestamp's diff rows of one key amount to, following Materialize's
/// ENVELOPE UPSERT rules: a lone insert or a retraction-insertion pair is an upsert, a
/// lone retraction a delete, and anything else a key violation (`Err`).
pub fn upserts(rows: KeyedDiffs) -> Vec<Result<SourceChange, Box<str>>> {
    let mut order: Vec<Box<str>> = Vec::new();
    let mut by_key: std::collections::HashMap<Box<str>, Vec<(Arc<Row>, i64)>> =
        std::collections::HashMap::new();
    for (key, row, diff) in rows {
        let entry = by_key.entry(key.clone()).or_insert_with(|| {
            order.push(key);
            Vec::new()
        });
        entry.push((row, diff));
    }
    order
        .into_iter()
        .map(|key| {
            let rows = by_key.remove(&key).unwrap_or_default();
            match rows.as_slice() {
                [(row, 1)] => Ok(SourceChange::Upsert {
                    key,
                    row: Some(Arc::clone(row)),
                }),
                [(_, -1)] => Ok(SourceChange::Upsert { key, row: None }),
                [(_, -1), (row, 1)] | [(row, 1), (_, -1)] => Ok(SourceChange::Upsert {
                    key,
                    row: Some(Arc::clone(row)),
                }),
                _ => Err(key),
            }
        })
        .collect()
}

/// The output layout of one subscription, fixed for its life.
#[derive(Debug, Clone)]
pub struct Layout {
    ts: usize,
    progressed: usize,
    /// `mz_diff` for diff output, `mz_state` for upsert output.
    op: usize,
    keyed: bool,
    /// Diff output to be paired into upserts (TAIL era).
    emulated: bool,
    /// Value columns in the relation's order.
    row: Vec<Col>,
    /// Key columns in KEY order (upsert only).
    key: Vec<Col>,
    max_row_bytes: usize,
}

impl Layout {
    /// Matches the output column names against the relation's columns.
    /// `emulate_upsert` is for TAIL-era servers, which have no ENVELOPE UPSERT: the
    /// output is in diff form, and rows are paired into upserts by key afterwards
    /// (see [`upserts`]).
    pub fn new(
        output: &[&str],
        relation: &[(String, Type)],
        key: Option<&[String]>,
        emulate_upsert: bool,
        max_row_bytes: usize,
    ) -> Result<Layout, DecodeError> {
        if emulate_upsert {
            let mut layout = Layout::new(output, relation, None, false, max_row_bytes)?;
            for k in key.unwrap_or(&[]) {
                let prefix = format!("{}:", json_string(k));
                let col = layout
                    .row
                    .iter()
                    .find(|c| c.prefix == prefix)
                    .cloned()
                    .ok_or_else(|| {
                        DecodeError::Layout(format!("key column {k:?} is not in the relation"))
                    })?;
                layout.key.push(col);
            }
            layout.emulated = true;
            return Ok(layout);
        }
        let find = |name: &str| {
            output
                .iter()
                .position(|c| *c == name)
                .ok_or_else(|| DecodeError::Layout(format!("no {name} in {output:?}")))
        };
        let ts = find("mz_timestamp")?;
        let progressed = find("mz_progressed")?;
        let (op, first) = match key {
            Some(_) => (find("mz_state")?, 3),
            None => (find("mz_diff")?, 3),
        };
        let data = output.get(first..).unwrap_or(&[]);
        let expected: Vec<&(String, Type)> = match key {
            None => relation.iter().collect(),
            Some(keys) => {
                let mut v = Vec::new();
                for k in keys {
                    let c = relation.iter().find(|(n, _)| n == k).ok_or_else(|| {
                        DecodeError::Layout(format!("key column {k:?} is not in the relation"))
                    })?;
                    v.push(c);
                }
                v.extend(relation.iter().filter(|(n, _)| !keys.contains(n)));
                v
            }
        };
        if data.len() != expected.len()
            || data
                .iter()
                .zip(&expected)
                .any(|(a, (b, _))| *a != b.as_str())
        {
            return Err(DecodeError::Layout(format!(
                "expected {:?}, got {data:?}",
                expected.iter().map(|(n, _)| n).collect::<Vec<_>>()
            )));
        }
        let col = |(name, ty): &(String, Type), index| Col {
            prefix: format!("{}:", json_string(name)),
            kind: Kind::of(ty),
            index,
        };
        let mut row = Vec::new();
        let mut key_cols = Vec::new();
        let nkeys = key.map_or(0, <[String]>::len);
        for (i, c) in expected.iter().enumerate() {
            let c = col(c, first + i);
            if i < nkeys {
                key_cols.push(c.clone());
            }
            row.push(c);
        }
        if key.is_some() {
            // Rows keep the relation's column order, whatever the KEY order.
            row.sort_by_key(|c| {
                relation
                    .iter()
                    .position(|(n, _)| format!("{}:", json_string(n)) == c.prefix)
                    .unwrap_or(usize::MAX)
            });
        }
        Ok(Layout {
            ts,
            progressed,
            op,
            keyed: key.is_some(),
            emulated: false,
            row,
            key: key_cols,
            max_row_bytes,
        })
    }

    pub fn decode(&self, r: &SimpleQueryRow) -> Result<Decoded, DecodeError> {
        let get = |i: usize| {
            r.try_get(i).map_err(|e| DecodeError::Value {
                column: r.columns().get(i).map_or("?", |c| c.name()).to_string(),
                message: e.to_string(),
            })
        };
        let ts_text = get(self.ts)?.unwrap_or("");
        let ts = ts_text.parse::<u64>().map_err(|_| DecodeError::Value {
            column: "mz_timestamp".into(),
            message: format!("not a timestamp: {ts_text:?}"),
        })?;
        if get(self.progressed)? == Some("t") {
            return Ok(Decoded::Progress(ts));
        }
        let size: usize = (0..r.len())
            .map(|i| get(i).map_or(0, |v| v.map_or(0, str::len)))
            .sum();
        if size > self.max_row_bytes {
            return Err(DecodeError::Oversized {
                bytes: size,
                limit: self.max_row_bytes,
            });
        }
        let op = get(self.op)?;
        let diff = || {
            op.and_then(|d| d.parse::<i64>().ok())
                .ok_or_else(|| DecodeError::Value {
                    column: "mz_diff".into(),
                    message: format!("not a diff: {op:?}"),
                })
        };
        if self.emulated {
            let diff = diff()?;
            return Ok(Decoded::KeyedDiff {
                ts,
                key: self.object(&self.key, &get)?.json,
                row: Arc::new(self.object(&self.row, &get)?),
                diff,
            });
        }
        let change = if self.keyed {
            let key = self.object(&self.key, &get)?.json;
            match op {
                Some("upsert") => SourceChange::Upsert {
                    key,
                    row: Some(Arc::new(self.object(&self.row, &get)?)),
                },
                Some("delete") => SourceChange::Upsert { key, row: None },
                Some("key_violation") => return Ok(Decoded::KeyViolation { ts, key }),
                other => {
                    return Err(DecodeError::Value {
                        column: "mz_state".into(),
                        message: format!("unknown state {other:?}"),
                    })
                }
            }
        } else {
            let diff = diff()?;
            SourceChange::Diff {
                row: Arc::new(self.object(&self.row, &get)?),
                diff,
            }
        };
        Ok(Decoded::Data { ts, change })
    }

    /// The JSON object of `cols`, with the span of each value.
    fn object<'r>(
        &self,
        cols: &[Col],
        get: &impl Fn(usize) -> Result<Option<&'r str>, DecodeError>,
    ) -> Result<Row, DecodeError> {
        let mut out = String::with_capacity(16 * cols.len() + 2);
        let mut spans = Vec::with_capacity(cols.len());
        out.push('{');
        for (i, c) in cols.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&c.prefix);
            let start = out.len();
            match get(c.index)? {
                None => out.push_str("null"),
                Some(text) => {
                    value(&mut out, c.kind, text).map_err(|message| DecodeError::Value {
                        column: c.prefix.trim_end_matches(':').trim_matches('"').to_string(),
                        message,
                    })?
                }
            }
            spans.push((start as u32, out.len() as u32));
        }
        out.push('}');
        Ok(Row {
            json: out.into_boxed_str(),
            spans: spans.into_boxed_slice(),
        })
    }
}

fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// Appends the JSON form of one non-null text value.
fn value(out: &mut String, kind: Kind, text: &str) -> Result<(), String> {
    match kind {
        Kind::Bool => match text {
            "t" | "true" => out.push_str("true"),
            "f" | "false" => out.push_str("false"),
            _ => return Err(format!("not a boolean: {text:?}")),
        },
        Kind::Integer => {
            let digits = text.strip_prefix('-').unwrap_or(text);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("not an integer: {text:?}"));
            }
            // Past 2^53 a JavaScript number is no longer exact: such values go as
            // decimal strings, like numeric.
            const MAX_SAFE: u64 = (1 << 53) - 1;
            if digits.len() >= 16 && digits.parse::<u64>().map_or(true, |d| d > MAX_SAFE) {
                out.push('"');
                out.push_str(text);
                out.push('"');
            } else {
                out.push_str(text);
            }
        }
        Kind::Float => {
            if is_json_number(text) {
                out.push_str(text);
            } else {
                // NaN and infinities have no JSON number form.
                match text.parse::<f64>() {
                    Ok(_) => out.push_str(&json_string(text)),
                    Err(_) => return Err(format!("not a float: {text:?}")),
                }
            }
        }
        Kind::Json => {
            let compact = compact_json(text).ok_or_else(|| "invalid json".to_string())?;
            out.push_str(&compact);
        }
        Kind::String => out.push_str(&json_string(text)),
    }
    Ok(())
}

/// JSON's number grammar: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
fn is_json_number(s: &str) -> bool {
    /// The length of the run of digits at the start of `b`.
    fn digits(b: &[u8]) -> usize {
        b.iter().take_while(|c| c.is_ascii_digit()).count()
    }
    let b = s.as_bytes();
    let mut i = usize::from(b.first() == Some(&b'-'));
    let int = digits(&b[i..]);
    if int == 0 || (int > 1 && b[i] == b'0') {
        return false;
    }
    i += int;
    if b.get(i) == Some(&b'.') {
        let frac = digits(&b[i + 1..]);
        if frac == 0 {
            return false;
        }
        i += 1 + frac;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let exp = digits(&b[i..]);
        if exp == 0 {
            return false;
        }
        i += exp;
    }
    i == b.len()
}

/// Validates JSON text and strips whitespace outside strings, keeping numbers verbatim.
fn compact_json(text: &str) -> Option<String> {
    serde_json::from_str::<serde::de::IgnoredAny>(text).ok()?;
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    for ch in text.chars() {
        if in_string {
            out.push(ch);
            if escaped {
                escaped = false;
            } else if ch == '\\' {
                escaped = true;
            } else if ch == '"' {
                in_string = false;
            }
        } else if !matches!(ch, ' ' | '\t' | '\n' | '\r') {
            if ch == '"' {
                in_string = true;
            }
            out.push(ch);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(kind: Kind, text: &str) -> Result<String, String> {
        let mut s = String::new();
        value(&mut s, kind, text).map(|_| s)
    }

    #[test]
    fn scalars_map_by_type() {
        assert_eq!(v(Kind::Bool, "t").as_deref(), Ok("true"));
        assert_eq!(v(Kind::Integer, "-42").as_deref(), Ok("-42"));
        assert!(v(Kind::Integer, "4x").is_err());
        assert_eq!(
            v(Kind::Integer, "9007199254740991").as_deref(),
            Ok("9007199254740991")
        );
        assert_eq!(
            v(Kind::Integer, "-9007199254740992").as_deref(),
            Ok("\"-9007199254740992\"")
        );
        assert_eq!(
            v(Kind::Integer, "18446744073709551615").as_deref(),
            Ok("\"18446744073709551615\"")
        );
        assert_eq!(v(Kind::Float, "1.5e+20").as_deref(), Ok("1.5e+20"));
        assert_eq!(v(Kind::Float, "NaN").as_deref(), Ok("\"NaN\""));
        assert_eq!(v(Kind::Float, "-Infinity").as_deref(), Ok("\"-Infinity\""));
        assert_eq!(
            v(Kind::String, "12345678901234567890.000000000001").as_deref(),
            Ok("\"12345678901234567890.000000000001\"")
        );
        assert_eq!(
            v(Kind::String, "a\n\"b\"\0").as_deref(),
            Ok("\"a\\n\\\"b\\\"\\u0000\"")
        );
    }

    #[test]
    fn json_is_compacted_to_one_line() {
        assert_eq!(
            v(Kind::Json, "{\n  \"a b\": [1, 2.50],\n \"c\": \"x\\n y\" }").as_deref(),
            Ok("{\"a b\":[1,2.50],\"c\":\"x\\n y\"}")
        );
        assert!(v(Kind::Json, "{oops").is_err());
    }

    #[test]
    fn diff_rows_pair_into_upserts_like_materialize() {
        let row = |v: &str| {
            Arc::new(Row {
                json: v.into(),
                spans: Box::new([]),
            })
        };
        let r = |k: &str, v: &str, d: i64| (Box::from(k), row(v), d);
        let got = upserts(vec![
            r("1", "a2", 1),
            r("1", "a1", -1),
            r("2", "b", 1),
            r("3", "c", -1),
            r("4", "d1", 1),
            r("4", "d2", 1),
        ]);
        assert_eq!(
            got,
            vec![
                Ok(SourceChange::Upsert {
                    key: "1".into(),
                    row: Some(row("a2"))
                }),
                Ok(SourceChange::Upsert {
                    key: "2".into(),
                    row: Some(row("b"))
                }),
                Ok(SourceChange::Upsert {
                    key: "3".into(),
                    row: None
                }),
                Err("4".into()),
            ]
        );
    }

    #[test]
    fn json_numbers() {
        for ok in ["0", "-0", "1.25", "1e5", "1E-5", "-12.5e+3"] {
            assert!(is_json_number(ok), "{ok}");
        }
        for bad in ["", "01", "1.", ".5", "1e", "+1", "Infinity"] {
            assert!(!is_json_number(bad), "{bad}");
        }
    }

    #[test]
    fn layout_checks_columns() {
        let rel = vec![
            ("id".to_string(), Type::INT4),
            ("name".to_string(), Type::TEXT),
        ];
        let ok = Layout::new(
            &["mz_timestamp", "mz_progressed", "mz_diff", "id", "name"],
            &rel,
            None,
            false,
            1 << 20,
        );
        assert!(ok.is_ok());
        let keyed = Layout::new(
            &["mz_timestamp", "mz_progressed", "mz_state", "name", "id"],
            &rel,
            Some(&["name".to_string()]),
            false,
            1 << 20,
        )
        .expect("keyed layout");
        assert_eq!(keyed.key.len(), 1);
        assert_eq!(keyed.row[0].prefix, "\"id\":");
        let bad = Layout::new(
            &["mz_timestamp", "mz_progressed", "mz_diff", "id"],
            &rel,
            None,
            false,
            1 << 20,
        );
        assert!(matches!(bad, Err(DecodeError::Layout(_))));
    }
}
