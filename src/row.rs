//! Rows as they come from upstream, before any stream has shaped them: the row's JSON
//! object (all the relation's columns, in its order) with the span of each column's
//! value in it, so a stream can send the object as it is, pick some columns, or read
//! a column's value to route or filter the row, without parsing JSON again.

use std::sync::Arc;

/// One row of the relation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Row {
    /// `{"col":value,...}` over every column of the relation.
    pub json: Box<str>,
    /// For each column, where its JSON value is in `json`.
    pub spans: Box<[(u32, u32)]>,
}

impl Row {
    /// Column `i`'s JSON value (`42`, `"text"`, `null`, ...).
    pub fn value(&self, i: usize) -> &str {
        let (a, b) = self.spans[i];
        &self.json[a as usize..b as usize]
    }

    /// The JSON object of the columns at `indices`, named by `prefixes` (`"name":`).
    pub fn project(&self, indices: &[usize], prefixes: &[Box<str>]) -> Box<str> {
        let len: usize = indices
            .iter()
            .zip(prefixes)
            .map(|(i, p)| p.len() + self.value(*i).len() + 1)
            .sum();
        let mut out = String::with_capacity(len + 2);
        out.push('{');
        for (n, (i, prefix)) in indices.iter().zip(prefixes).enumerate() {
            if n > 0 {
                out.push(',');
            }
            out.push_str(prefix);
            out.push_str(self.value(*i));
        }
        out.push('}');
        out.into_boxed_str()
    }
}

/// One change of the relation, shared by every stream on its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceChange {
    /// A row inserted (`diff > 0`) or retracted (`diff < 0`).
    Diff { row: Arc<Row>, diff: i64 },
    /// A keyed stream's upsert (`Some`) or delete (`None`); `key` is the key's JSON
    /// object.
    Upsert {
        key: Box<str>,
        row: Option<Arc<Row>>,
    },
}

/// The relation's columns as the upstream described them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Columns {
    pub names: Vec<String>,
    pub types: Vec<tokio_postgres::types::Type>,
}

impl Columns {
    pub fn index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }
}

/// `"name":` for a column, JSON-escaped once.
pub fn prefix(name: &str) -> Box<str> {
    format!("{}:", serde_json::Value::from(name)).into_boxed_str()
}
