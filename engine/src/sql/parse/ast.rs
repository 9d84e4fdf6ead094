//! The statements the parser produces. Only what the engine treats itself
//! is parsed into fields; the rest of a statement is kept as its SQL text
//! (already checked to be a query where only a query may go).

use std::time::Duration;

/// A parsed `SUBSCRIBE` / `TAIL`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SubscribeStmt {
    pub(crate) relation: Relation,
    /// `ENVELOPE UPSERT (KEY (...))` key columns.
    pub(crate) upsert_key: Option<Vec<String>>,
    pub(crate) progress: bool,
    pub(crate) snapshot: bool,
    pub(crate) as_of: Option<AsOf>,
    pub(crate) up_to: Option<u64>,
    /// Parsed from `TAIL` (legacy output rules).
    pub(crate) legacy: bool,
    pub(crate) text: String,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Relation {
    Name(String),
    Query(String),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct AsOf {
    pub(crate) ts: u64,
    pub(crate) at_least: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct FetchStmt {
    pub(crate) cursor: String,
    /// `None` = ALL.
    pub(crate) count: Option<u64>,
    pub(crate) timeout: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum CursorQuery {
    Subscribe(SubscribeStmt),
    Select(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DropKind {
    Table,
    View,
    MaterializedView,
    Index,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Stmt {
    Begin,
    Commit,
    Rollback,
    Set {
        name: String,
        value: Option<String>,
    },
    Show {
        name: String,
    },
    Subscribe(SubscribeStmt),
    Declare {
        name: String,
        query: CursorQuery,
    },
    Fetch(FetchStmt),
    Close {
        name: Option<String>,
    },
    CopySubscribe(SubscribeStmt),
    CopySelect(String),
    CreateTable {
        name: String,
        sql: String,
    },
    CreateView {
        name: String,
        body: String,
        materialized: bool,
        replace: bool,
    },
    CreateIndex,
    Drop {
        kind: DropKind,
        names: Vec<String>,
        if_exists: bool,
        cascade: bool,
    },
    Write {
        sql: String,
        tag: &'static str,
    },
    Select {
        sql: String,
    },
    Discard,
}
