//! The store: one dedicated thread that owns the SQLite connection, the catalog,
//! the logical clock, the change history and every subscription's state.
//!
//! Sessions talk to it through [`StoreHandle`] (a channel of [`Command`]s, each with
//! a oneshot reply), so SQLite is only ever touched from this thread. Every table
//! has triggers that copy changed rows into a log table; after each committed
//! write the store reads those logs, stamps the changes with a new timestamp,
//! appends them to the history (trimmed to the retention window) and pushes the
//! consolidated diff of every affected subscription to its session. A
//! subscription AS OF a time the clock has not reached waits in `pending` and
//! starts once a write or the wall clock gets there (the thread wakes for it).
//! The thread also emits progress rows every tick. It stops when it receives
//! [`Command::Shutdown`] or when every handle is dropped.
//!
//! This file has the thread, its command loop and reads; the rest of [`Store`]
//! is split by job:
//! - `sqlite`: opening the connection, Materialize's scalar functions, read
//!   helpers that refuse writes.
//! - `catalog`: tables (with their change-capture triggers), views, columns,
//!   dependencies, DROP.
//! - `history`: the logical clock, committing writes and capturing their
//!   changes, retention, AS OF replay and subscriptions waiting for a future
//!   AS OF.
//! - `subscriptions`: planning, starting and ending subscriptions, and
//!   publishing each write's diffs to them.
//! - `incremental`: maintaining a subscription from a write's changed rows
//!   (select-project-filters and grouped aggregates) instead of re-running it.

mod catalog;
mod history;
mod incremental;
mod sqlite;
mod subscriptions;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::{mpsc as tmpsc, oneshot};

use crate::error::SqlError;
use crate::sql::{self, DropKind, SubscribeStmt};
use crate::subscribe::SubEvent;
use crate::value::{format_timestamptz_ms, Column, Datum, Row};
use catalog::RelInfo;
use history::{now_u64, Clock, Pending, LOG_PREFIX};
use sqlite::{multiset, open_connection, prepare_read, register_functions, rows_of};
use subscriptions::Sub;

pub(crate) use history::now_ms;
pub(crate) use sqlite::version_info;

pub(crate) type Reply<T> = oneshot::Sender<Result<T, SqlError>>;

/// Result of a read query.
#[derive(Debug)]
pub(crate) struct QueryResult {
    pub(crate) columns: Vec<Column>,
    pub(crate) rows: Vec<Row>,
}

/// A subscription that has started: its output columns and id (0 for constant
/// subscriptions, which complete without being registered).
#[derive(Debug)]
pub(crate) struct SubStart {
    pub(crate) id: u64,
    pub(crate) columns: Vec<Column>,
}

pub(crate) enum Command {
    Query {
        sql: String,
        params: Vec<Datum>,
        reply: Reply<QueryResult>,
    },
    Describe {
        sql: String,
        reply: Reply<Vec<Column>>,
    },
    DescribeSubscribe {
        stmt: SubscribeStmt,
        reply: Reply<Vec<Column>>,
    },
    /// Runs the statements as one transaction with one timestamp; with `dry_run`
    /// it only reports affected-row counts and rolls back.
    Write {
        stmts: Vec<(String, Vec<Datum>)>,
        dry_run: bool,
        reply: Reply<Vec<usize>>,
    },
    CreateTable {
        name: String,
        sql: String,
        reply: Reply<()>,
    },
    CreateView {
        name: String,
        body: String,
        replace: bool,
        reply: Reply<()>,
    },
    Drop {
        kind: DropKind,
        names: Vec<String>,
        if_exists: bool,
        cascade: bool,
        reply: Reply<()>,
    },
    Subscribe {
        stmt: SubscribeStmt,
        session: u64,
        sink: tmpsc::UnboundedSender<SubEvent>,
        reply: Reply<SubStart>,
    },
    Unsubscribe {
        id: u64,
    },
    SessionOpened {
        id: u64,
        application_name: String,
    },
    SessionUpdated {
        id: u64,
        application_name: String,
    },
    SessionClosed {
        id: u64,
    },
    /// Runs a script (the `--init` file); statements are split and executed in order.
    Script {
        sql: String,
        reply: Reply<()>,
    },
    Shutdown,
}

/// Counters readable from outside the store thread.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) sessions: AtomicUsize,
    pub(crate) subscriptions: AtomicUsize,
}

/// Cheap cloneable access to the store thread.
#[derive(Clone)]
pub(crate) struct StoreHandle {
    tx: mpsc::Sender<Command>,
}

impl StoreHandle {
    pub(crate) fn send(&self, cmd: Command) {
        // The store only goes away at shutdown; a lost fire-and-forget command then
        // has nothing left to affect.
        let _ = self.tx.send(cmd);
    }

    /// Sends a command built around a reply channel and awaits the answer.
    pub(crate) async fn call<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<T, SqlError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .map_err(|_| SqlError::new("57P01", "the engine is shutting down"))?;
        rx.await
            .map_err(|_| SqlError::new("57P01", "the engine is shutting down"))?
    }
}

pub(crate) struct StoreConfig {
    pub(crate) legacy: bool,
    pub(crate) retain: Duration,
    pub(crate) tick: Duration,
}

/// Starts the store thread. Returns the handle and a receiver that resolves when
/// the thread has exited.
pub(crate) fn spawn(
    config: StoreConfig,
    counters: Arc<Counters>,
) -> std::io::Result<(StoreHandle, oneshot::Receiver<()>)> {
    let (tx, rx) = mpsc::channel();
    let (done_tx, done_rx) = oneshot::channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("tailgate-engine-store".into())
        .spawn(move || {
            match Store::new(config, counters) {
                Ok(mut store) => {
                    let _ = ready_tx.send(Ok(()));
                    store.run(rx);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
            let _ = done_tx.send(());
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok((StoreHandle { tx }, done_rx)),
        Ok(Err(e)) => Err(std::io::Error::other(e)),
        Err(e) => Err(std::io::Error::other(e)),
    }
}

struct Store {
    conn: Connection,
    legacy: bool,
    retain_ms: u64,
    tick: Duration,
    catalog: BTreeMap<String, RelInfo>,
    seq: u64,
    clock: Clock,
    /// Oldest timestamp `AS OF` may name: the engine's start, later the retention edge.
    start_ts: u64,
    history: HashMap<String, VecDeque<(u64, Row, i64)>>,
    subs: BTreeMap<u64, Sub>,
    /// Subscriptions whose AS OF the clock has not reached yet.
    pending: BTreeMap<u64, Pending>,
    next_sub: u64,
    /// Tables whose log received rows, filled by SQLite's update hook.
    dirty: Arc<Mutex<BTreeSet<String>>>,
    counters: Arc<Counters>,
    /// Whether eligible subscriptions are maintained from the changed rows; tests
    /// turn it off to compare against full re-evaluation.
    incremental: bool,
}

impl Store {
    fn new(config: StoreConfig, counters: Arc<Counters>) -> Result<Store, rusqlite::Error> {
        let conn = open_connection()?;
        conn.set_prepared_statement_cache_capacity(64);
        register_functions(&conn, config.legacy)?;
        conn.execute_batch(
            "CREATE TEMP TABLE mz_sessions (id bigint, application_name text, connected_at timestamptz);
             CREATE TEMP TABLE mz_subscriptions (id text, session_id bigint, query text, created_at timestamptz);",
        )?;
        let dirty: Arc<Mutex<BTreeSet<String>>> = Arc::default();
        let hook_dirty = dirty.clone();
        conn.update_hook(Some(
            move |action: rusqlite::hooks::Action, _db: &str, table: &str, _rowid: i64| {
                if action == rusqlite::hooks::Action::SQLITE_INSERT {
                    if let Some(t) = table.strip_prefix(LOG_PREFIX) {
                        // Short critical section inside SQLite's callback; never contended
                        // because only this thread uses the connection.
                        if let Ok(mut d) = hook_dirty.lock() {
                            if !d.contains(t) {
                                d.insert(t.to_owned());
                            }
                        }
                    }
                }
            },
        ));
        let start = now_u64();
        Ok(Store {
            conn,
            legacy: config.legacy,
            retain_ms: config.retain.as_millis() as u64,
            tick: config.tick.max(Duration::from_millis(10)),
            catalog: BTreeMap::new(),
            seq: 0,
            clock: Clock {
                last_write: start,
                floor: start + 1,
            },
            start_ts: start,
            history: HashMap::new(),
            subs: BTreeMap::new(),
            pending: BTreeMap::new(),
            next_sub: 1,
            dirty,
            counters,
            incremental: true,
        })
    }

    fn run(&mut self, rx: mpsc::Receiver<Command>) {
        let mut next_tick = Instant::now() + self.tick;
        loop {
            let wait = next_tick
                .saturating_duration_since(Instant::now())
                .min(self.until_due());
            match rx.recv_timeout(wait) {
                Ok(Command::Shutdown) => break,
                Ok(cmd) => self.handle(cmd),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            self.start_due();
            if Instant::now() >= next_tick {
                self.tick();
                next_tick = Instant::now() + self.tick;
            }
        }
        let sinks = std::mem::take(&mut self.subs)
            .into_values()
            .map(|s| s.sink)
            .chain(
                std::mem::take(&mut self.pending)
                    .into_values()
                    .map(|p| p.sink),
            );
        for sink in sinks {
            let _ = sink.send(SubEvent::Error(SqlError::new(
                "57P01",
                "terminating connection due to administrator command",
            )));
        }
        self.update_sub_count();
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Query { sql, params, reply } => {
                let _ = reply.send(self.query(&sql, &params));
            }
            Command::Describe { sql, reply } => {
                let _ = reply.send(self.describe(&sql));
            }
            Command::DescribeSubscribe { stmt, reply } => {
                let _ = reply.send(self.plan(&stmt).map(|p| p.out.columns.clone()));
            }
            Command::Write {
                stmts,
                dry_run,
                reply,
            } => {
                let _ = reply.send(self.write(&stmts, dry_run));
            }
            Command::CreateTable { name, sql, reply } => {
                let _ = reply.send(self.create_table(&name, &sql));
            }
            Command::CreateView {
                name,
                body,
                replace,
                reply,
            } => {
                let _ = reply.send(self.create_view(&name, &body, replace));
            }
            Command::Drop {
                kind,
                names,
                if_exists,
                cascade,
                reply,
            } => {
                let _ = reply.send(self.drop(kind, &names, if_exists, cascade));
            }
            Command::Subscribe {
                stmt,
                session,
                sink,
                reply,
            } => {
                let _ = reply.send(self.subscribe(&stmt, session, sink));
            }
            Command::Unsubscribe { id } => self.remove_sub(id),
            Command::SessionOpened {
                id,
                application_name,
            } => {
                let _ = self.conn.execute(
                    "INSERT INTO temp.mz_sessions VALUES (?1, ?2, ?3)",
                    rusqlite::params![id as i64, application_name, format_timestamptz_ms(now_ms())],
                );
            }
            Command::SessionUpdated {
                id,
                application_name,
            } => {
                let _ = self.conn.execute(
                    "UPDATE temp.mz_sessions SET application_name = ?2 WHERE id = ?1",
                    rusqlite::params![id as i64, application_name],
                );
            }
            Command::SessionClosed { id } => {
                let _ = self
                    .conn
                    .execute("DELETE FROM temp.mz_sessions WHERE id = ?1", [id as i64]);
            }
            Command::Script { sql, reply } => {
                let _ = reply.send(self.script(&sql));
            }
            Command::Shutdown => {}
        }
    }

    fn script(&mut self, text: &str) -> Result<(), SqlError> {
        for stmt in sql::split_statements(text)? {
            match sql::parse(&stmt, self.legacy)? {
                sql::Stmt::CreateTable { name, sql } => self.create_table(&name, &sql)?,
                sql::Stmt::CreateView {
                    name,
                    body,
                    replace,
                    ..
                } => self.create_view(&name, &body, replace)?,
                sql::Stmt::Drop {
                    kind,
                    names,
                    if_exists,
                    cascade,
                } => self.drop(kind, &names, if_exists, cascade)?,
                sql::Stmt::Write { sql, .. } => {
                    self.write(&[(sql, Vec::new())], false)?;
                }
                sql::Stmt::Select { sql } => {
                    self.query(&sql, &[])?;
                }
                sql::Stmt::CreateIndex
                | sql::Stmt::Begin
                | sql::Stmt::Commit
                | sql::Stmt::Set { .. } => {}
                other => {
                    return Err(SqlError::unsupported(format!(
                        "{other:?} in an init script is"
                    )))
                }
            }
        }
        Ok(())
    }

    fn eval_multiset(&self, translated: &str) -> Result<HashMap<Row, i64>, SqlError> {
        multiset(&mut *prepare_read(&self.conn, translated)?)
    }

    fn query(&self, text: &str, params: &[Datum]) -> Result<QueryResult, SqlError> {
        let translated = sql::translate(text)?;
        let columns = self.describe_translated(text, &translated)?;
        let rows = rows_of(&self.conn, &translated, params)?;
        Ok(QueryResult { columns, rows })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::Relation;

    pub(super) fn store() -> Store {
        let config = StoreConfig {
            legacy: false,
            retain: Duration::from_secs(600),
            tick: Duration::from_secs(1),
        };
        Store::new(config, Arc::default()).expect("store")
    }

    pub(super) fn write(store: &mut Store, stmts: &[String]) {
        let stmts: Vec<(String, Vec<Datum>)> =
            stmts.iter().map(|s| (s.clone(), Vec::new())).collect();
        store.write(&stmts, false).expect("write");
    }

    /// Subscribes with or without the incremental path; returns the id and events.
    pub(super) fn subscribe(
        store: &mut Store,
        what: &str,
        incremental: bool,
    ) -> (u64, tmpsc::UnboundedReceiver<SubEvent>) {
        let text = format!("SUBSCRIBE {what}");
        let Ok(sql::Stmt::Subscribe(stmt)) = sql::parse(&text, false) else {
            panic!("{text}");
        };
        let (tx, rx) = tmpsc::unbounded_channel();
        store.incremental = incremental;
        let start = store.subscribe(&stmt, 1, tx).expect(&text);
        store.incremental = true;
        (start.id, rx)
    }

    /// Reads run only what SQLite calls read-only, even past the parser: a
    /// query or subscription that would write fails and writes nothing.
    #[test]
    fn reads_never_write() {
        let mut s = store();
        s.script("CREATE TABLE t (a int); INSERT INTO t VALUES (1), (2);")
            .expect("schema");
        let Ok(sql::Stmt::Subscribe(mut stmt)) = sql::parse("SUBSCRIBE (SELECT 1)", false) else {
            panic!("subscribe");
        };
        for w in [
            "DELETE FROM t",
            "WITH x AS (SELECT 1) DELETE FROM t",
            "INSERT INTO t SELECT a FROM t",
            "UPDATE t SET a = 0",
            "DROP TABLE t",
            "CREATE TABLE z (a int)",
        ] {
            assert_eq!(s.query(w, &[]).expect_err(w).code, "25006", "{w}");
            assert_eq!(s.eval_multiset(w).expect_err(w).code, "25006", "{w}");
            stmt.relation = Relation::Query(w.to_owned());
            let (tx, _rx) = tmpsc::unbounded_channel();
            assert_eq!(s.subscribe(&stmt, 1, tx).expect_err(w).code, "25006", "{w}");
        }
        let rows = s.query("SELECT a FROM t ORDER BY a", &[]).expect("t");
        assert_eq!(rows.rows, vec![vec![Datum::Int(1)], vec![Datum::Int(2)]]);
        assert!(s.query("SELECT * FROM z", &[]).is_err());
        assert!(s.take_dirty().is_empty());
    }

    /// `"x"` is always a column, never the string 'x', and an unknown one is
    /// reported with Materialize's text and code.
    #[test]
    fn unknown_columns() {
        let mut s = store();
        s.script("CREATE TABLE items (id int, name text); INSERT INTO items VALUES (1, 'one');")
            .expect("schema");
        for (q, column) in [
            ("SELECT \"nosuchcol\" FROM items", "nosuchcol"),
            ("SELECT nosuchcol FROM items", "nosuchcol"),
            ("SELECT NoSuchCol FROM items", "nosuchcol"),
            ("SELECT \"NoSuchCol\" FROM items", "NoSuchCol"),
            ("SELECT items.nosuch FROM items", "items.nosuch"),
            ("SELECT id FROM items WHERE name = \"one\"", "one"),
            ("SELECT count(*) FROM items GROUP BY \"x\"", "x"),
        ] {
            let err = s.query(q, &[]).expect_err(q);
            assert_eq!(
                (err.code, err.message),
                ("42703", format!("column \"{column}\" does not exist")),
                "{q}"
            );
        }
        let err = s
            .create_view("v", "SELECT \"nosuchcol\" FROM items", false)
            .expect_err("view");
        assert_eq!(err.message, "column \"nosuchcol\" does not exist");
        let err = s
            .write(
                &[("UPDATE items SET name = \"two\"".to_owned(), Vec::new())],
                false,
            )
            .expect_err("update");
        assert_eq!(err.message, "column \"two\" does not exist");
        // Single-quoted strings are literals, double-quoted identifiers resolve.
        let r = s
            .query(
                "SELECT 'nosuchcol', \"name\" FROM items WHERE name = 'one'",
                &[],
            )
            .expect("literals");
        assert_eq!(
            r.rows,
            vec![vec![
                Datum::Text("nosuchcol".into()),
                Datum::Text("one".into())
            ]]
        );
    }
}
