//! Relation state: row changes, a full state (a multiset of rows or a map by key),
//! consolidation of a batch against the state, and the difference between two states.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::HashMap;

use crate::wire::ChangesJson;

/// Adds `diff` to `key`'s count in a multiset, which holds no zero counts.
pub fn add<K: std::hash::Hash + Eq>(m: &mut HashMap<K, i64>, key: K, diff: i64) {
    match m.entry(key) {
        MapEntry::Occupied(mut e) => {
            *e.get_mut() += diff;
            if *e.get() == 0 {
                e.remove();
            }
        }
        MapEntry::Vacant(e) => {
            if diff != 0 {
                e.insert(diff);
            }
        }
    }
}

/// One row change, with rows and keys already encoded as JSON objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Diff {
        row: Box<str>,
        diff: i64,
    },
    Upsert {
        key: Box<str>,
        row: Option<Box<str>>,
    },
}

impl Change {
    /// Appends this change to an event's data.
    pub fn encode(&self, data: &mut ChangesJson) {
        match self {
            Change::Diff { row, diff } => data.diff(row, *diff),
            Change::Upsert { key, row } => data.upsert(key, row.as_deref()),
        }
    }
}

/// A full relation state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Row JSON → multiplicity.
    Diff(HashMap<Box<str>, i64>),
    /// Key JSON → row JSON.
    Keyed(HashMap<Box<str>, Box<str>>),
}

impl State {
    pub fn empty(keyed: bool) -> State {
        if keyed {
            State::Keyed(HashMap::new())
        } else {
            State::Diff(HashMap::new())
        }
    }

    pub fn len(&self) -> usize {
        match self {
            State::Diff(m) => m.len(),
            State::Keyed(m) => m.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies one change; the caller guarantees the change matches the state's kind.
    pub fn apply(&mut self, change: &Change) {
        match (self, change) {
            (State::Diff(m), Change::Diff { row, diff }) => add(m, row.clone(), *diff),
            (State::Keyed(m), Change::Upsert { key, row }) => match row {
                Some(row) => {
                    m.insert(key.clone(), row.clone());
                }
                None => {
                    m.remove(key);
                }
            },
            _ => {}
        }
    }
}

/// The net effect of `changes` on `state`, in first-seen order, without no-ops.
pub(super) fn consolidate(state: &State, changes: &[Change]) -> Vec<Change> {
    match state {
        State::Diff(_) => {
            let mut order: Vec<&str> = Vec::new();
            let mut sums: HashMap<&str, i64> = HashMap::new();
            for c in changes {
                if let Change::Diff { row, diff } = c {
                    let e = sums.entry(row).or_insert_with(|| {
                        order.push(row);
                        0
                    });
                    *e += diff;
                }
            }
            order
                .into_iter()
                .filter_map(|row| {
                    let diff = sums.get(row).copied().unwrap_or(0);
                    (diff != 0).then(|| Change::Diff {
                        row: row.into(),
                        diff,
                    })
                })
                .collect()
        }
        State::Keyed(current) => {
            let mut order: Vec<&str> = Vec::new();
            let mut last: HashMap<&str, Option<&str>> = HashMap::new();
            for c in changes {
                if let Change::Upsert { key, row } = c {
                    if last.insert(key, row.as_deref()).is_none() {
                        order.push(key);
                    }
                }
            }
            order
                .into_iter()
                .filter_map(|key| {
                    let new = last.get(key).copied().flatten();
                    let old = current.get(key).map(|r| &**r);
                    (new != old).then(|| Change::Upsert {
                        key: key.into(),
                        row: new.map(Into::into),
                    })
                })
                .collect()
        }
    }
}

/// The changes that turn `old` into `new`, or `None` if they are of different kinds.
pub(super) fn difference(old: &State, new: &State) -> Option<Vec<Change>> {
    let mut out = Vec::new();
    match (old, new) {
        (State::Diff(a), State::Diff(b)) => {
            for (row, n) in a {
                let m = b.get(row).copied().unwrap_or(0);
                if m != *n {
                    out.push(Change::Diff {
                        row: row.clone(),
                        diff: m - n,
                    });
                }
            }
            for (row, m) in b {
                if !a.contains_key(row) {
                    out.push(Change::Diff {
                        row: row.clone(),
                        diff: *m,
                    });
                }
            }
        }
        (State::Keyed(a), State::Keyed(b)) => {
            for (key, row) in a {
                match b.get(key) {
                    Some(r) if r == row => {}
                    other => out.push(Change::Upsert {
                        key: key.clone(),
                        row: other.cloned(),
                    }),
                }
            }
            for (key, row) in b {
                if !a.contains_key(key) {
                    out.push(Change::Upsert {
                        key: key.clone(),
                        row: Some(row.clone()),
                    });
                }
            }
        }
        _ => return None,
    }
    Some(out)
}
