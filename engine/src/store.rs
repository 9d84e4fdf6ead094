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

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::config::DbConfig;
use rusqlite::functions::FunctionFlags;
use rusqlite::types::{Value, ValueRef};
use rusqlite::Connection;
use tokio::sync::{mpsc as tmpsc, oneshot};

use super::error::{SqlError, DIV_BY_ZERO_MARKER};
use super::sql::{self, quote_ident, DropKind, Relation, SubscribeStmt};
use super::subscribe::{consolidate, diff_maps, Output, ResultSet, SubEvent};
use super::value::{format_timestamptz_ms, parse_bool, Column, Datum, PgType, Row};

/// Current wall-clock time in epoch milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn now_u64() -> u64 {
    u64::try_from(now_ms()).unwrap_or(0)
}

pub type Reply<T> = oneshot::Sender<Result<T, SqlError>>;

/// One write's consolidated changes, by table.
type Changes = BTreeMap<String, Vec<(Row, i64)>>;

/// Logged changes by write, in time order: each write's timestamp and its
/// (table, row, diff) entries.
type WriteBatches = Vec<(u64, Vec<(String, Row, i64)>)>;

/// A subscription's result at AS OF, the diff of each later write by timestamp,
/// and its current result.
type Replay = (
    HashMap<Row, i64>,
    Vec<(u64, Vec<(Row, i64)>)>,
    HashMap<Row, i64>,
);

/// Result of a read query.
#[derive(Debug)]
pub struct QueryResult {
    pub columns: Vec<Column>,
    pub rows: Vec<Row>,
}

/// A subscription that has started: its output columns and id (0 for constant
/// subscriptions, which complete without being registered).
#[derive(Debug)]
pub struct SubStart {
    pub id: u64,
    pub columns: Vec<Column>,
}

pub enum Command {
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
pub struct Counters {
    pub sessions: AtomicUsize,
    pub subscriptions: AtomicUsize,
}

/// Cheap cloneable access to the store thread.
#[derive(Clone)]
pub struct StoreHandle {
    tx: mpsc::Sender<Command>,
}

impl StoreHandle {
    pub fn send(&self, cmd: Command) {
        // The store only goes away at shutdown; a lost fire-and-forget command then
        // has nothing left to affect.
        let _ = self.tx.send(cmd);
    }

    /// Sends a command built around a reply channel and awaits the answer.
    pub async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, SqlError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .map_err(|_| SqlError::new("57P01", "the engine is shutting down"))?;
        rx.await
            .map_err(|_| SqlError::new("57P01", "the engine is shutting down"))?
    }
}

pub struct StoreConfig {
    pub legacy: bool,
    pub retain: Duration,
    pub tick: Duration,
}

/// Starts the store thread. Returns the handle and a receiver that resolves when
/// the thread has exited.
pub fn spawn(
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RelKind {
    Table,
    View,
}

struct RelInfo {
    kind: RelKind,
    columns: Vec<Column>,
    /// Relations named in a view's definition.
    deps: BTreeSet<String>,
    /// Translated view body, re-created as a temp view for AS OF replay.
    body: Option<String>,
    /// Creation order, for re-creating views in dependency order.
    seq: u64,
}

enum Source {
    /// Subscriptions directly on a table take the logged changes as the diff.
    Table(String),
    /// A select-project-filter over one table (through views): `sql` runs over the
    /// write's changed rows of `table`, loaded into its delta table, once for the
    /// retracted rows (`?1 = -1`) and once for the inserted ones (`?1 = 1`).
    Delta { table: String, sql: String },
    /// A grouped `count`/`sum` aggregate over one table: each write recomputes
    /// only the groups its changed rows belong to.
    Groups(Box<Groups>),
    /// Everything else is re-evaluated and diffed against the previous result.
    Query { sql: String, prev: ResultSet },
}

impl Source {
    /// The table whose changed rows this source reads from its delta table.
    fn delta_table(&self) -> Option<&str> {
        match self {
            Source::Delta { table, .. } => Some(table),
            Source::Groups(g) => Some(&g.table),
            _ => None,
        }
    }
}

/// State of a [`Source::Groups`] subscription.
struct Groups {
    table: String,
    /// The whole query, re-run in full if a group ever sums to a non-integer.
    full: String,
    /// The distinct group keys of the loaded delta rows.
    keys_sql: String,
    /// The query with the table shadowed by a CTE holding only the rows of the
    /// groups in `keys_sql` (matched with `IS`, so NULL keys are groups too).
    sql: String,
    key_pos: Vec<usize>,
    sum_pos: Vec<usize>,
    /// The current result: one row per group, by group key.
    prev: HashMap<Row, Row>,
}

impl Groups {
    fn key(&self, row: &Row) -> Row {
        self.key_pos.iter().map(|&i| row[i].clone()).collect()
    }

    /// Whether a result row's sums are exact (integers or NULL). Sums that came
    /// out as reals depend on the order rows were added in.
    fn exact(&self, row: &Row) -> bool {
        self.sum_pos
            .iter()
            .all(|&i| matches!(row[i], Datum::Null | Datum::Int(_)))
    }

    /// The diff of one write whose changed rows are in the delta table, or
    /// `None` if a recomputed group's sum is not an integer (then nothing was
    /// changed and the caller re-evaluates the whole query instead).
    fn update(&mut self, conn: &Connection) -> Result<Option<Vec<(Row, i64)>>, SqlError> {
        let keys = rows_of(conn, &self.keys_sql, &[])?;
        if keys.is_empty() {
            return Ok(Some(Vec::new()));
        }
        let mut fresh: HashMap<Row, Row> = HashMap::new();
        for row in rows_of(conn, &self.sql, &[])? {
            if !self.exact(&row) || fresh.insert(self.key(&row), row).is_some() {
                return Ok(None);
            }
        }
        // The written groups, then any result group not among them (none, since
        // key columns hold no distinct values that compare equal).
        let mut touched: Vec<Row> = keys;
        let extra: Vec<Row> = {
            let seen: std::collections::HashSet<&Row> = touched.iter().collect();
            fresh
                .keys()
                .filter(|k| !seen.contains(k))
                .cloned()
                .collect()
        };
        touched.extend(extra);
        let mut diffs = Vec::new();
        for key in touched {
            let new = fresh.remove(&key);
            let old = match &new {
                Some(n) => self.prev.insert(key, n.clone()),
                None => self.prev.remove(&key),
            };
            if old != new {
                diffs.extend(old.map(|r| (r, -1)));
                diffs.extend(new.map(|r| (r, 1)));
            }
        }
        Ok(Some(consolidate(diffs)))
    }
}

/// SQLite's column affinity for a declared type.
fn affinity(declared: &str) -> char {
    let t = declared.to_ascii_uppercase();
    if t.contains("INT") {
        'i'
    } else if t.contains("CHAR") || t.contains("CLOB") || t.contains("TEXT") {
        't'
    } else if t.is_empty() || t.contains("BLOB") {
        'b'
    } else if t.contains("REAL") || t.contains("FLOA") || t.contains("DOUB") {
        'r'
    } else {
        'n'
    }
}

/// One result row of a statement with `n` columns.
fn read_row(r: &rusqlite::Row<'_>, n: usize) -> rusqlite::Result<Row> {
    (0..n)
        .map(|i| r.get_ref(i).map(Datum::from_sqlite))
        .collect()
}

/// Refuses a statement that would write. Reads (SELECT, subscriptions, COPY)
/// run only what SQLite itself vouches for (`sqlite3_stmt_readonly`), as a
/// second line behind the parser, which lets only queries through.
fn read_only(stmt: &rusqlite::Statement<'_>) -> Result<(), SqlError> {
    if stmt.readonly() {
        Ok(())
    } else {
        Err(SqlError::new(
            "25006",
            "cannot execute a statement that writes where only a query is allowed",
        ))
    }
}

/// A read-only statement through the statement cache, see [`read_only`].
fn prepare_read<'c>(
    conn: &'c Connection,
    sql: &str,
) -> Result<rusqlite::CachedStatement<'c>, SqlError> {
    let stmt = conn.prepare_cached(sql)?;
    read_only(&stmt)?;
    Ok(stmt)
}

/// Opens the engine's SQLite connection. Materialize has no double-quoted
/// string literals: `"x"` always names a column, so SQLite's fallback of
/// reading an unknown `"x"` as the string `'x'` is off for DML and DDL.
fn open_connection() -> rusqlite::Result<Connection> {
    let conn = Connection::open_in_memory()?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_DQS_DML, false)?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_DQS_DDL, false)?;
    Ok(conn)
}

/// Every row of a query (through the statement cache).
fn rows_of(conn: &Connection, sql: &str, params: &[Datum]) -> Result<Vec<Row>, SqlError> {
    let mut stmt = prepare_read(conn, sql)?;
    let n = stmt.column_count();
    let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(read_row(r, n)?);
    }
    Ok(out)
}

/// The name and declared type of each column of `table`.
fn table_columns(conn: &Connection, table: &str) -> rusqlite::Result<Vec<(String, String)>> {
    let mut st = conn.prepare_cached("SELECT name, type FROM pragma_table_info(?1)")?;
    let rows = st.query_map([table], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

struct Sub {
    source: Source,
    base_tables: BTreeSet<String>,
    deps: BTreeSet<String>,
    out: Output,
    sink: tmpsc::UnboundedSender<SubEvent>,
    last_progress: u64,
}

/// A subscription whose AS OF is ahead of the clock. As in Materialize it
/// waits: nothing but its PROGRESS row at AS OF goes out until the clock
/// reaches AS OF (by a write stamped at or after it, or by wall time), and then
/// it starts as if subscribed at that moment, so writes up to AS OF are in its
/// snapshot and later ones follow at their own timestamps.
struct Pending {
    plan: Plan,
    as_of: u64,
    snapshot: bool,
    sink: tmpsc::UnboundedSender<SubEvent>,
}

/// The logical clock: strictly increasing write timestamps in epoch ms.
struct Clock {
    last_write: u64,
    /// No write may be stamped below this (a frontier already announced).
    floor: u64,
}

impl Clock {
    fn next_write(&mut self) -> u64 {
        let ts = now_u64().max(self.last_write + 1).max(self.floor);
        self.last_write = ts;
        self.floor = ts + 1;
        ts
    }

    fn read_ts(&self) -> u64 {
        now_u64().max(self.last_write)
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

const LOG_PREFIX: &str = "_tg_log_";
/// Temp tables holding one write's changed rows of a table, with a `_tg_sign`
/// column, for [`Source::Delta`] subscriptions.
const DELTA_PREFIX: &str = "_tg_delta_";

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

    /// Relations named in `sql`, closed over view definitions.
    fn dependencies(&self, text: &str) -> BTreeSet<String> {
        let mut deps = BTreeSet::new();
        let mut todo: Vec<String> = sql::identifiers(text)
            .into_iter()
            .filter(|i| self.catalog.contains_key(i))
            .collect();
        while let Some(name) = todo.pop() {
            if deps.insert(name.clone()) {
                if let Some(info) = self.catalog.get(&name) {
                    todo.extend(info.deps.iter().cloned());
                }
            }
        }
        deps
    }

    fn describe(&self, text: &str) -> Result<Vec<Column>, SqlError> {
        self.describe_translated(text, &sql::translate(text)?)
    }

    /// Result columns of `text`, whose translation the caller already has.
    fn describe_translated(&self, text: &str, translated: &str) -> Result<Vec<Column>, SqlError> {
        let stmt = prepare_read(&self.conn, translated)?;
        let deps: Vec<&RelInfo> = sql::identifiers(text)
            .iter()
            .filter_map(|i| self.catalog.get(i))
            .collect();
        let lookup = |c: &str| -> Option<PgType> {
            deps.iter()
                .flat_map(|r| r.columns.iter())
                .find(|col| col.name == c)
                .map(|col| col.ty)
        };
        let items = sql::select_items(text, &lookup);
        let cols = stmt.columns();
        let aligned = items
            .as_ref()
            .filter(|items| items.len() == cols.len() && !items.iter().any(|i| i.star));
        Ok(cols
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let item = aligned.and_then(|items| items.get(i));
                let name = item
                    .map(|it| it.name.clone())
                    .unwrap_or_else(|| c.name().to_owned());
                let ty = c
                    .decl_type()
                    .map(PgType::from_decl)
                    .or_else(|| item.and_then(|it| it.ty))
                    .or_else(|| lookup(&name))
                    .unwrap_or(PgType::Text);
                Column::new(name, ty)
            })
            .collect())
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

    fn take_dirty(&self) -> BTreeSet<String> {
        match self.dirty.lock() {
            Ok(mut d) => std::mem::take(&mut *d),
            Err(_) => BTreeSet::new(),
        }
    }

    fn write(
        &mut self,
        stmts: &[(String, Vec<Datum>)],
        dry_run: bool,
    ) -> Result<Vec<usize>, SqlError> {
        self.conn.execute_batch("SAVEPOINT tg_write")?;
        let result = self.write_inner(stmts);
        let (counts, changes) = match result {
            Ok(v) if !dry_run => v,
            other => {
                let _ = self
                    .conn
                    .execute_batch("ROLLBACK TO tg_write; RELEASE tg_write");
                self.take_dirty();
                return other.map(|(counts, _)| counts);
            }
        };
        self.conn.execute_batch("RELEASE tg_write")?;
        if changes.is_empty() {
            return Ok(counts);
        }
        let ts = self.clock.next_write();
        for (table, diffs) in &changes {
            let h = self.history.entry(table.clone()).or_default();
            for (row, diff) in diffs {
                h.push_back((ts, row.clone(), *diff));
            }
        }
        self.publish(ts, &changes);
        // A write stamped at or after a pending AS OF brings the clock there.
        self.start_due();
        Ok(counts)
    }

    fn write_inner(
        &mut self,
        stmts: &[(String, Vec<Datum>)],
    ) -> Result<(Vec<usize>, Changes), SqlError> {
        let mut counts = Vec::with_capacity(stmts.len());
        for (text, params) in stmts {
            let translated = sql::translate(text)?;
            let mut stmt = self.conn.prepare_cached(&translated)?;
            counts.push(stmt.execute(rusqlite::params_from_iter(params.iter()))?);
        }
        let mut changes = BTreeMap::new();
        for table in self.take_dirty() {
            let log = quote_ident(&format!("{LOG_PREFIX}{table}"));
            let rows = rows_of(&self.conn, &format!("SELECT * FROM {log}"), &[])?;
            self.conn.execute(&format!("DELETE FROM {log}"), [])?;
            let diffs = consolidate(rows.into_iter().filter_map(|mut r| {
                if r.is_empty() {
                    return None;
                }
                let diff = r.remove(0).as_i64().unwrap_or(0);
                Some((r, diff))
            }));
            if !diffs.is_empty() {
                changes.insert(table, diffs);
            }
        }
        Ok((counts, changes))
    }

    /// Pushes the diff at `ts` to every subscription that reads a changed table.
    fn publish(&mut self, ts: u64, changes: &Changes) {
        let mut finished = Vec::new();
        let ids: Vec<u64> = self
            .subs
            .iter()
            .filter(|(_, s)| s.base_tables.iter().any(|t| changes.contains_key(t)))
            .map(|(id, _)| *id)
            .collect();
        // Each changed table that incremental subscriptions read is loaded into its
        // delta table once, inside a savepoint whose rollback empties them again.
        let loads: BTreeSet<&str> = ids
            .iter()
            .filter_map(|id| {
                let table = self.subs.get(id)?.source.delta_table()?;
                changes.contains_key(table).then_some(table)
            })
            .collect();
        let mut load_errors: HashMap<String, SqlError> = HashMap::new();
        let savepoint = if loads.is_empty() {
            Ok(false)
        } else {
            self.conn
                .execute_batch("SAVEPOINT tg_delta")
                .map(|()| true)
                .map_err(SqlError::from)
        };
        let in_savepoint = matches!(savepoint, Ok(true));
        for table in loads {
            let diffs = changes.get(table).map(Vec::as_slice).unwrap_or_default();
            let loaded = match &savepoint {
                Ok(_) => self.load_delta(table, diffs),
                Err(e) => Err(e.clone()),
            };
            if let Err(e) = loaded {
                load_errors.insert(table.to_owned(), e);
            }
        }
        for id in ids {
            let Some(sub) = self.subs.get_mut(&id) else {
                continue;
            };
            let evaluated = match &mut sub.source {
                Source::Table(t) => Ok(changes.get(t).cloned().unwrap_or_default()),
                Source::Delta { table, sql } => match load_errors.get(table) {
                    _ if !changes.contains_key(table) => Ok(Vec::new()),
                    Some(e) => Err(e.clone()),
                    None => eval_delta(&self.conn, sql),
                },
                Source::Groups(g) => match load_errors.get(&g.table) {
                    _ if !changes.contains_key(&g.table) => Ok(Vec::new()),
                    Some(e) => Err(e.clone()),
                    None => match g.update(&self.conn) {
                        Ok(Some(d)) => Ok(d),
                        Ok(None) => {
                            // Switch to full re-evaluation from the result so far.
                            let mut prev = ResultSet::from_counts(
                                g.prev.drain().map(|(_, row)| (row, 1)).collect(),
                            );
                            let sql = std::mem::take(&mut g.full);
                            let d = reevaluate(&self.conn, &sql, &mut prev);
                            sub.source = Source::Query { sql, prev };
                            d
                        }
                        Err(e) => Err(e),
                    },
                },
                Source::Query { sql, prev } => reevaluate(&self.conn, sql, prev),
            };
            let diffs = match evaluated {
                Ok(d) => d,
                Err(e) => {
                    let _ = sub.sink.send(SubEvent::Error(e));
                    finished.push(id);
                    continue;
                }
            };
            let mut rows = sub.out.rows(ts, diffs);
            let frontier = ts + 1;
            if sub.out.progress && sub.out.before_up_to(frontier) && frontier > sub.last_progress {
                rows.push(sub.out.progress_row(frontier));
                sub.last_progress = frontier;
            }
            let done = !sub.out.before_up_to(frontier);
            if !rows.is_empty() && sub.sink.send(SubEvent::Rows(rows)).is_err() {
                finished.push(id);
                continue;
            }
            if done {
                let _ = sub.sink.send(SubEvent::Done);
                finished.push(id);
            }
        }
        if in_savepoint {
            let _ = self
                .conn
                .execute_batch("ROLLBACK TO tg_delta; RELEASE tg_delta");
        }
        for id in finished {
            self.remove_sub(id);
        }
    }

    /// Fills `table`'s delta table with a write's changes: each row as often as
    /// its diff says, with the diff's sign.
    fn load_delta(&self, table: &str, diffs: &[(Row, i64)]) -> Result<(), SqlError> {
        let width = self.catalog.get(table).map_or(0, |r| r.columns.len());
        let mut st = self.conn.prepare_cached(&insert_temp_sql(
            &format!("{DELTA_PREFIX}{table}"),
            width + 1,
        ))?;
        for (row, diff) in diffs {
            let sign = Datum::Int(diff.signum());
            for _ in 0..diff.unsigned_abs() {
                st.execute(rusqlite::params_from_iter(
                    row.iter().chain(std::iter::once(&sign)),
                ))?;
            }
        }
        Ok(())
    }

    /// The incremental form of a subscription's translated query, if it is a
    /// select-project-filter over one table, directly or through views that are
    /// too: the table, and the query prefixed with CTEs that shadow the table and
    /// each of those views by name, the table's CTE reading its delta rows of
    /// one sign (`?1`). `None` means re-evaluate in full.
    fn delta_plan(&self, translated: &str) -> Option<(String, String)> {
        let mut views: Vec<(String, &RelInfo)> = Vec::new();
        let mut rel = sql::spf_relation(translated)?;
        let table = loop {
            let info = self.catalog.get(&rel)?;
            match info.kind {
                RelKind::Table => break rel,
                RelKind::View => {
                    let next = sql::spf_relation(info.body.as_deref()?)?;
                    if views.len() >= 32 {
                        return None;
                    }
                    views.push((rel, info));
                    rel = next;
                }
            }
        };
        let info = self.catalog.get(&table)?;
        let delta = match self.ensure_delta_table(&table) {
            Ok(Some(d)) => d,
            Ok(None) => return None,
            Err(e) => {
                tracing::debug!(table = %table, error = %e, "No delta table; subscription re-evaluates in full.");
                return None;
            }
        };
        let names = |cols: &[Column]| -> String {
            let q: Vec<String> = cols.iter().map(|c| quote_ident(&c.name)).collect();
            q.join(", ")
        };
        let cols = names(&info.columns);
        let mut ctes = vec![format!(
            "{} ({cols}) AS (SELECT {cols} FROM temp.{} WHERE \"_tg_sign\" = ?1)",
            quote_ident(&table),
            quote_ident(&delta)
        )];
        for (name, view) in views.iter().rev() {
            ctes.push(format!(
                "{} ({}) AS ({})",
                quote_ident(name),
                names(&view.columns),
                view.body.as_deref().unwrap_or_default()
            ));
        }
        let sql = format!("WITH {} {translated}", ctes.join(", "));
        self.same_width(translated, &sql).then_some((table, sql))
    }

    /// Whether a rewrite of `translated` prepares and keeps the result's width.
    fn same_width(&self, translated: &str, rewritten: &str) -> bool {
        let width = |sql: &str| self.conn.prepare(sql).map(|st| st.column_count()).ok();
        matches!((width(translated), width(rewritten)), (Some(a), Some(b)) if a == b)
    }

    /// The per-group form of a subscription's translated query, if it is (or is
    /// `SELECT *` from views that are) a grouped aggregate by
    /// [`sql::group_aggregate`] directly over a table, with group columns of
    /// INTEGER or TEXT affinity (where equal values are identical) and sums over
    /// INTEGER columns, and `current` (its result) has one exact row per group.
    /// Creates an index on the group columns so that recomputing a group reads
    /// only its rows.
    fn group_plan(&self, translated: &str, current: &HashMap<Row, i64>) -> Option<Groups> {
        let mut body = translated.to_owned();
        for _ in 0..32 {
            let toks = sql::tokenize(&body).ok()?;
            let star = matches!(
                toks.as_slice(),
                [s, st, f, _] if s.is_word("select") && st.tok == sql::Tok::Op("*".into()) && f.is_word("from")
            );
            if !star {
                break;
            }
            let info = self.catalog.get(&toks[3].ident()?)?;
            if info.kind != RelKind::View {
                return None;
            }
            body = info.body.clone()?;
        }
        let agg = sql::group_aggregate(&body)?;
        let table = agg.relation.clone();
        if self.catalog.get(&table)?.kind != RelKind::Table {
            return None;
        }
        let delta = self.ensure_delta_table(&table).ok()??;
        let types: HashMap<String, String> = table_columns(&self.conn, &table)
            .ok()?
            .into_iter()
            .map(|(name, ty)| (name.to_lowercase(), ty))
            .collect();
        let aff = |c: &str| types.get(&c.to_lowercase()).map(|t| affinity(t));
        if !agg
            .keys
            .iter()
            .all(|k| matches!(aff(k), Some('i') | Some('t')))
            || !agg.sums.iter().all(|(_, c)| aff(c) == Some('i'))
        {
            return None;
        }
        let mut groups = Groups {
            table: table.clone(),
            full: translated.to_owned(),
            keys_sql: String::new(),
            sql: String::new(),
            key_pos: agg.key_pos,
            sum_pos: agg.sums.iter().map(|(i, _)| *i).collect(),
            prev: HashMap::new(),
        };
        for (row, n) in current {
            if *n != 1
                || !groups.exact(row)
                || groups.prev.insert(groups.key(row), row.clone()).is_some()
            {
                return None;
            }
        }
        let keys: Vec<String> = agg.keys.iter().map(|k| quote_ident(k)).collect();
        let index = quote_ident(&format!("_tg_idx_{table}({})", agg.keys.join(",")));
        if let Err(e) = self.conn.execute_batch(&format!(
            "CREATE INDEX IF NOT EXISTS main.{index} ON {} ({})",
            quote_ident(&table),
            keys.join(", ")
        )) {
            tracing::debug!(table = %table, error = %e, "No group index; subscription re-evaluates in full.");
            return None;
        }
        groups.keys_sql = format!(
            "SELECT DISTINCT {} FROM temp.{}",
            keys.join(", "),
            quote_ident(&delta)
        );
        let info = self.catalog.get(&table)?;
        let cols: Vec<String> = info.columns.iter().map(|c| quote_ident(&c.name)).collect();
        let picked: Vec<String> = cols.iter().map(|c| format!("\"_tg_r\".{c}")).collect();
        let on: Vec<String> = keys
            .iter()
            .map(|k| format!("\"_tg_r\".{k} IS \"_tg_k\".{k}"))
            .collect();
        groups.sql = format!(
            "WITH {} ({}) AS (SELECT {} FROM ({}) AS \"_tg_k\" CROSS JOIN main.{} AS \"_tg_r\" ON {}) {body}",
            quote_ident(&table),
            cols.join(", "),
            picked.join(", "),
            groups.keys_sql,
            quote_ident(&table),
            on.join(" AND ")
        );
        self.same_width(translated, &groups.sql).then_some(groups)
    }

    /// Creates `table`'s delta table if missing: its columns with the same
    /// declared types (so the same affinities), no constraints, plus `_tg_sign`.
    /// `Ok(None)` when a copy of its rows might not compare like the originals: a
    /// COLLATE clause, a STRICT table, or a column name that clashes.
    fn ensure_delta_table(&self, table: &str) -> Result<Option<String>, SqlError> {
        let ddl: String = self.conn.query_row(
            "SELECT sql FROM main.sqlite_master WHERE type = 'table' AND name = ?1 COLLATE NOCASE",
            [table],
            |r| r.get(0),
        )?;
        if sql::identifiers(&ddl)
            .iter()
            .any(|w| w == "collate" || w == "strict" || w.starts_with("_tg_"))
        {
            return Ok(None);
        }
        let defs: Vec<String> = table_columns(&self.conn, table)?
            .iter()
            .map(|(name, ty)| format!("{} {ty}", quote_ident(name)))
            .collect();
        let delta = format!("{DELTA_PREFIX}{table}");
        self.conn.execute_batch(&format!(
            "CREATE TEMP TABLE IF NOT EXISTS {} ({}, \"_tg_sign\")",
            quote_ident(&delta),
            defs.join(", ")
        ))?;
        Ok(Some(delta))
    }

    fn tick(&mut self) {
        let frontier = now_u64().max(self.clock.last_write + 1);
        self.clock.floor = self.clock.floor.max(frontier);
        let mut finished = Vec::new();
        for (id, sub) in self.subs.iter_mut() {
            if !sub.out.before_up_to(frontier) {
                let _ = sub.sink.send(SubEvent::Done);
                finished.push(*id);
            } else if sub.out.progress && frontier > sub.last_progress {
                sub.last_progress = frontier;
                if sub
                    .sink
                    .send(SubEvent::Rows(vec![sub.out.progress_row(frontier)]))
                    .is_err()
                {
                    finished.push(*id);
                }
            } else if sub.sink.is_closed() {
                finished.push(*id);
            }
        }
        finished.extend(
            self.pending
                .iter()
                .filter(|(_, p)| p.sink.is_closed())
                .map(|(id, _)| *id),
        );
        for id in finished {
            self.remove_sub(id);
        }
        let since = self.since();
        for h in self.history.values_mut() {
            while h.front().is_some_and(|(ts, _, _)| *ts < since) {
                h.pop_front();
            }
        }
    }

    fn since(&self) -> u64 {
        self.start_ts
            .max(now_u64().saturating_sub(self.retain_ms))
            .min(self.clock.last_write)
    }

    fn create_table(&mut self, name: &str, text: &str) -> Result<(), SqlError> {
        if self.catalog.contains_key(name) {
            return Err(SqlError::new(
                "42P07",
                format!("catalog item '{name}' already exists"),
            ));
        }
        if name.starts_with("_tg_") || name.starts_with("mz_") {
            return Err(SqlError::new(
                "42939",
                format!("unacceptable table name '{name}'"),
            ));
        }
        let translated = sql::translate(text)?;
        self.conn.execute_batch("SAVEPOINT tg_ddl")?;
        let res = (|| -> Result<Vec<Column>, SqlError> {
            self.conn.execute_batch(&translated)?;
            let cols: Vec<Column> = table_columns(&self.conn, name)?
                .into_iter()
                .map(|(n, t)| Column::new(n, PgType::from_decl(&t)))
                .collect();
            let log = quote_ident(&format!("{LOG_PREFIX}{name}"));
            let names: Vec<String> = cols.iter().map(|c| quote_ident(&c.name)).collect();
            let new: Vec<String> = cols
                .iter()
                .map(|c| format!("NEW.{}", quote_ident(&c.name)))
                .collect();
            let old: Vec<String> = cols
                .iter()
                .map(|c| format!("OLD.{}", quote_ident(&c.name)))
                .collect();
            let t = quote_ident(name);
            let trig = |kind: &str| quote_ident(&format!("_tg_{kind}_{name}"));
            self.conn.execute_batch(&format!(
                "CREATE TABLE {log} (_tg_diff, {cols});
                 CREATE TRIGGER {ti} AFTER INSERT ON {t} BEGIN INSERT INTO {log} VALUES (1, {new}); END;
                 CREATE TRIGGER {td} AFTER DELETE ON {t} BEGIN INSERT INTO {log} VALUES (-1, {old}); END;
                 CREATE TRIGGER {tu} AFTER UPDATE ON {t} BEGIN INSERT INTO {log} VALUES (-1, {old}); INSERT INTO {log} VALUES (1, {new}); END;",
                cols = names.join(", "),
                new = new.join(", "),
                old = old.join(", "),
                ti = trig("ins"),
                td = trig("del"),
                tu = trig("upd"),
            ))?;
            Ok(cols)
        })();
        match res {
            Ok(columns) => {
                self.conn.execute_batch("RELEASE tg_ddl")?;
                self.seq += 1;
                self.catalog.insert(
                    name.to_owned(),
                    RelInfo {
                        kind: RelKind::Table,
                        columns,
                        deps: BTreeSet::new(),
                        body: None,
                        seq: self.seq,
                    },
                );
                Ok(())
            }
            Err(e) => {
                let _ = self
                    .conn
                    .execute_batch("ROLLBACK TO tg_ddl; RELEASE tg_ddl");
                Err(e)
            }
        }
    }

    fn create_view(&mut self, name: &str, body: &str, replace: bool) -> Result<(), SqlError> {
        if let Some(existing) = self.catalog.get(name) {
            if !replace || existing.kind != RelKind::View {
                return Err(SqlError::new(
                    "42P07",
                    format!("catalog item '{name}' already exists"),
                ));
            }
            self.drop(DropKind::View, &[name.to_owned()], false, false)?;
        }
        let translated = sql::translate(body)?;
        let columns = self.describe_translated(body, &translated)?;
        let names: Vec<String> = columns.iter().map(|c| quote_ident(&c.name)).collect();
        self.conn.execute_batch(&format!(
            "CREATE VIEW {} ({}) AS {translated}",
            quote_ident(name),
            names.join(", ")
        ))?;
        let deps = sql::identifiers(body)
            .into_iter()
            .filter(|i| self.catalog.contains_key(i))
            .collect();
        self.seq += 1;
        self.catalog.insert(
            name.to_owned(),
            RelInfo {
                kind: RelKind::View,
                columns,
                deps,
                body: Some(translated),
                seq: self.seq,
            },
        );
        Ok(())
    }

    fn drop(
        &mut self,
        kind: DropKind,
        names: &[String],
        if_exists: bool,
        cascade: bool,
    ) -> Result<(), SqlError> {
        if kind == DropKind::Index {
            return Ok(());
        }
        for name in names {
            let Some(info) = self.catalog.get(name) else {
                if if_exists {
                    continue;
                }
                return Err(SqlError::unknown_relation(name));
            };
            let want = match kind {
                DropKind::Table => RelKind::Table,
                _ => RelKind::View,
            };
            if info.kind != want {
                return Err(SqlError::new(
                    "42809",
                    format!(
                        "materialize.public.{name} is a {} not a {}",
                        kind_name(info.kind),
                        kind_name(want)
                    ),
                ));
            }
            let dependents: Vec<String> = self
                .catalog
                .iter()
                .filter(|(_, r)| r.deps.contains(name))
                .map(|(n, _)| n.clone())
                .collect();
            if !dependents.is_empty() && !cascade {
                return Err(SqlError::new(
                    "2BP01",
                    format!(
                        "cannot drop {} \"materialize.public.{name}\": still depended upon by view \"materialize.public.{}\"",
                        kind_name(info.kind),
                        dependents.join("\", \"materialize.public.")
                    ),
                ));
            }
            for d in dependents {
                self.drop(DropKind::View, &[d], true, true)?;
            }
            self.drop_one(name)?;
        }
        Ok(())
    }

    fn drop_one(&mut self, name: &str) -> Result<(), SqlError> {
        let Some(info) = self.catalog.remove(name) else {
            return Ok(());
        };
        match info.kind {
            RelKind::Table => {
                self.conn.execute_batch(&format!(
                    "DROP TABLE {}; DROP TABLE IF EXISTS {}; DROP TABLE IF EXISTS temp.{};",
                    quote_ident(name),
                    quote_ident(&format!("{LOG_PREFIX}{name}")),
                    quote_ident(&format!("{DELTA_PREFIX}{name}"))
                ))?;
                self.history.remove(name);
            }
            RelKind::View => {
                self.conn
                    .execute_batch(&format!("DROP VIEW {}", quote_ident(name)))?;
            }
        }
        let affected: Vec<(u64, tmpsc::UnboundedSender<SubEvent>)> = self
            .subs
            .iter()
            .filter(|(_, s)| s.deps.contains(name))
            .map(|(id, s)| (*id, s.sink.clone()))
            .chain(
                self.pending
                    .iter()
                    .filter(|(_, p)| p.plan.deps.contains(name))
                    .map(|(id, p)| (*id, p.sink.clone())),
            )
            .collect();
        for (id, sink) in affected {
            let _ = sink.send(SubEvent::Error(SqlError::new(
                "42704",
                format!("relation 'materialize.public.{name}' was dropped"),
            )));
            self.remove_sub(id);
        }
        Ok(())
    }

    fn remove_sub(&mut self, id: u64) {
        let live = self.subs.remove(&id).is_some();
        if self.pending.remove(&id).is_some() || live {
            self.unlist_sub(id);
        }
    }

    /// Lists a subscription in `mz_subscriptions` and the counters.
    fn list_sub(&self, id: u64, session: u64, text: &str) {
        let _ = self.conn.execute(
            "INSERT INTO temp.mz_subscriptions VALUES (?1, ?2, ?3, ?4)",
            rusqlite::params![
                format!("s{id}"),
                session as i64,
                text,
                format_timestamptz_ms(now_ms())
            ],
        );
        self.update_sub_count();
    }

    fn unlist_sub(&self, id: u64) {
        let _ = self.conn.execute(
            "DELETE FROM temp.mz_subscriptions WHERE id = ?1",
            [format!("s{id}")],
        );
        self.update_sub_count();
    }

    fn update_sub_count(&self) {
        self.counters
            .subscriptions
            .store(self.subs.len() + self.pending.len(), Ordering::Relaxed);
    }

    /// How long until the earliest pending AS OF, by wall time.
    fn until_due(&self) -> Duration {
        let now = now_u64();
        self.pending
            .values()
            .map(|p| Duration::from_millis(p.as_of.saturating_sub(now)))
            .min()
            .unwrap_or(Duration::MAX)
    }

    /// Starts every pending subscription whose AS OF the clock has reached.
    fn start_due(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let now = self.clock.read_ts();
        let due: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.as_of <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let Some(p) = self.pending.remove(&id) else {
                continue;
            };
            let sink = p.sink.clone();
            match self.start(id, p.plan, p.as_of, p.snapshot, false, p.sink) {
                Ok(true) => {}
                Ok(false) => self.unlist_sub(id),
                Err(e) => {
                    let _ = sink.send(SubEvent::Error(e));
                    self.unlist_sub(id);
                }
            }
        }
    }

    /// Resolves a SUBSCRIBE's relation and output layout without running it.
    fn plan(&self, stmt: &SubscribeStmt) -> Result<Plan, SqlError> {
        let (translated, rel_columns, source_table) = match &stmt.relation {
            Relation::Name(name) => {
                let info = self
                    .catalog
                    .get(name)
                    .ok_or_else(|| SqlError::unknown_relation(name))?;
                let select = format!("SELECT * FROM {}", quote_ident(name));
                let table = (info.kind == RelKind::Table).then(|| name.clone());
                (sql::translate(&select)?, info.columns.clone(), table)
            }
            Relation::Query(q) => {
                let translated = sql::translate(q)?;
                let columns = self.describe_translated(q, &translated)?;
                (translated, columns, None)
            }
        };
        let deps = match &stmt.relation {
            Relation::Name(name) => {
                let mut d = self.dependencies(name);
                d.insert(name.clone());
                d
            }
            Relation::Query(q) => self.dependencies(q),
        };
        let out = Output::new(stmt, rel_columns)?;
        Ok(Plan {
            translated,
            base_tables: deps
                .iter()
                .filter(|d| {
                    self.catalog
                        .get(*d)
                        .is_some_and(|r| r.kind == RelKind::Table)
                })
                .cloned()
                .collect(),
            deps,
            source_table,
            out,
        })
    }

    fn subscribe(
        &mut self,
        stmt: &SubscribeStmt,
        session: u64,
        sink: tmpsc::UnboundedSender<SubEvent>,
    ) -> Result<SubStart, SqlError> {
        let plan = self.plan(stmt)?;
        let columns = plan.out.columns.clone();
        if plan.base_tables.is_empty() {
            // A constant collection: complete at once, stamped with the maximum (or,
            // in TAIL's era, zero) timestamp.
            let ts = if stmt.legacy { 0 } else { u64::MAX };
            if let Some(up_to) = stmt.up_to {
                if ts > up_to {
                    return Err(bounds_error(ts, up_to));
                }
            }
            if stmt.snapshot {
                match self.eval_multiset(&plan.translated) {
                    Ok(rows) => {
                        let rows = plan.out.rows(ts, rows.into_iter().collect());
                        if !rows.is_empty() {
                            let _ = sink.send(SubEvent::Rows(rows));
                        }
                    }
                    Err(e) => {
                        let _ = sink.send(SubEvent::Error(e));
                        return Ok(SubStart { id: 0, columns });
                    }
                }
            }
            let _ = sink.send(SubEvent::Done);
            return Ok(SubStart { id: 0, columns });
        }

        let since = self.since();
        let read_ts = self.clock.read_ts();
        let as_of = match stmt.as_of {
            None => read_ts,
            Some(a) if a.at_least => a.ts.max(since),
            Some(a) if a.ts < since => {
                return Err(SqlError::internal(format!(
                "Timestamp ({}) is not valid for all inputs: [Antichain {{ elements: [{since}] }}]",
                a.ts
            )))
            }
            Some(a) => a.ts,
        };
        if let Some(up_to) = stmt.up_to {
            if as_of > up_to {
                return Err(bounds_error(as_of, up_to));
            }
            if as_of == up_to {
                let _ = sink.send(SubEvent::Done);
                return Ok(SubStart { id: 0, columns });
            }
        }
        let id = self.next_sub;
        self.next_sub += 1;
        if as_of > read_ts {
            // Materialize announces the AS OF at once (`ActiveSubscribe::initialize`);
            // the data waits for the clock.
            if plan.out.progress && !plan.out.legacy {
                let _ = sink.send(SubEvent::Rows(vec![plan.out.progress_row(as_of)]));
            }
            self.pending.insert(
                id,
                Pending {
                    plan,
                    as_of,
                    snapshot: stmt.snapshot,
                    sink,
                },
            );
            self.list_sub(id, session, &stmt.text);
            return Ok(SubStart { id, columns });
        }
        if !self.start(id, plan, as_of, stmt.snapshot, true, sink)? {
            return Ok(SubStart { id: 0, columns });
        }
        self.list_sub(id, session, &stmt.text);
        Ok(SubStart { id, columns })
    }

    /// Starts a subscription at `as_of`, which the clock has reached: sends the
    /// state at AS OF (with `snapshot`) and every later change up to now, then
    /// registers it under `id` to go live. `initial_progress` says whether the
    /// PROGRESS row at AS OF is still to be sent. `Ok(false)` when it completed
    /// or failed on the spot and was not registered.
    fn start(
        &mut self,
        id: u64,
        plan: Plan,
        as_of: u64,
        snapshot: bool,
        initial_progress: bool,
        sink: tmpsc::UnboundedSender<SubEvent>,
    ) -> Result<bool, SqlError> {
        let replay = if as_of >= self.clock.last_write {
            let state = match &plan.source_table {
                Some(t) => self.eval_multiset(&format!("SELECT * FROM {}", quote_ident(t))),
                None => self.eval_multiset(&plan.translated),
            };
            state.map(|s| (s.clone(), Vec::new(), s))
        } else {
            self.replay(&plan, as_of)
        };
        let (state, batches, current) = match replay {
            Ok(r) => r,
            Err(e) if e.code == "XX000" && e.message.starts_with("Evaluation error") => {
                let _ = sink.send(SubEvent::Error(e));
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        let out = plan.out;
        let mut rows = Vec::new();
        if initial_progress && out.progress && !out.legacy {
            rows.push(out.progress_row(as_of));
        }
        if snapshot {
            rows.extend(out.rows(as_of, state.into_iter().collect()));
        }
        // Saturating: an AS OF of u64::MAX waits forever, but may be named.
        let mut last_progress = as_of.saturating_add(1);
        if out.progress && out.before_up_to(last_progress) {
            rows.push(out.progress_row(last_progress));
        }
        for (ts, diffs) in batches {
            rows.extend(out.rows(ts, diffs));
            if out.progress && out.before_up_to(ts + 1) {
                rows.push(out.progress_row(ts + 1));
                last_progress = ts + 1;
            }
        }
        if !rows.is_empty() {
            let _ = sink.send(SubEvent::Rows(rows));
        }
        // Nothing may be written at or before a frontier announced.
        let frontier = as_of.max(self.clock.last_write).saturating_add(1);
        self.clock.floor = self.clock.floor.max(frontier);
        if !out.before_up_to(frontier) {
            let _ = sink.send(SubEvent::Done);
            return Ok(false);
        }
        let delta = match plan.source_table {
            None if self.incremental => self.delta_plan(&plan.translated),
            _ => None,
        };
        let source = match (plan.source_table, delta) {
            (Some(t), _) => Source::Table(t),
            (None, Some((table, sql))) => Source::Delta { table, sql },
            (None, None) => match self
                .incremental
                .then(|| self.group_plan(&plan.translated, &current))
                .flatten()
            {
                Some(g) => Source::Groups(Box::new(g)),
                None => Source::Query {
                    sql: plan.translated,
                    prev: ResultSet::from_counts(current),
                },
            },
        };
        self.subs.insert(
            id,
            Sub {
                source,
                base_tables: plan.base_tables,
                deps: plan.deps,
                out,
                sink,
                last_progress,
            },
        );
        Ok(true)
    }

    /// Reconstructs the subscription's result at `as_of` and every change after it
    /// from the table history. Returns (state at AS OF, later batches, current state).
    fn replay(&mut self, plan: &Plan, as_of: u64) -> Result<Replay, SqlError> {
        // All history entries after AS OF for the tables involved, in time order.
        let mut later: Vec<(u64, &str, &Row, i64)> = Vec::new();
        for t in &plan.base_tables {
            if let Some(h) = self.history.get(t) {
                for (ts, row, diff) in h.iter().rev() {
                    if *ts <= as_of {
                        break;
                    }
                    later.push((*ts, t, row, *diff));
                }
            }
        }
        later.sort_by_key(|(ts, ..)| *ts);
        let mut past: HashMap<String, HashMap<Row, i64>> = HashMap::new();
        for t in &plan.base_tables {
            let mut state = self.eval_multiset(&format!("SELECT * FROM {}", quote_ident(t)))?;
            for (_, _, row, diff) in later.iter().filter(|(_, table, ..)| table == t) {
                *state.entry((*row).clone()).or_insert(0) -= diff;
            }
            state.retain(|_, c| *c > 0);
            past.insert(t.clone(), state);
        }
        let mut groups: WriteBatches = Vec::new();
        for (ts, table, row, diff) in later {
            match groups.last_mut() {
                Some((g, entries)) if *g == ts => {
                    entries.push((table.to_owned(), row.clone(), diff))
                }
                _ => groups.push((ts, vec![(table.to_owned(), row.clone(), diff)])),
            }
        }

        if let Some(t) = &plan.source_table {
            let snapshot = past.remove(t).unwrap_or_default();
            let mut current = snapshot.clone();
            let mut batches = Vec::new();
            for (ts, entries) in groups {
                let diffs = consolidate(entries.into_iter().map(|(_, r, d)| (r, d)));
                for (r, d) in &diffs {
                    *current.entry(r.clone()).or_insert(0) += d;
                }
                batches.push((ts, diffs));
            }
            current.retain(|_, c| *c != 0);
            return Ok((snapshot, batches, current));
        }

        self.conn.execute_batch("SAVEPOINT tg_asof")?;
        let res = self.replay_in_temp(plan, &past, groups);
        let _ = self
            .conn
            .execute_batch("ROLLBACK TO tg_asof; RELEASE tg_asof");
        self.take_dirty();
        res
    }

    fn replay_in_temp(
        &self,
        plan: &Plan,
        past: &HashMap<String, HashMap<Row, i64>>,
        groups: WriteBatches,
    ) -> Result<Replay, SqlError> {
        for (t, state) in past {
            let q = quote_ident(t);
            self.conn.execute_batch(&format!(
                "CREATE TEMP TABLE {q} AS SELECT * FROM main.{q} WHERE 0"
            ))?;
            for (row, count) in state {
                for _ in 0..*count {
                    self.insert_temp(t, row)?;
                }
            }
        }
        let mut views: Vec<(&String, &RelInfo)> = plan
            .deps
            .iter()
            .filter_map(|d| self.catalog.get(d).map(|r| (d, r)))
            .filter(|(_, r)| r.kind == RelKind::View)
            .collect();
        views.sort_by_key(|(_, r)| r.seq);
        for (name, info) in views {
            let cols: Vec<String> = info.columns.iter().map(|c| quote_ident(&c.name)).collect();
            self.conn.execute_batch(&format!(
                "CREATE TEMP VIEW {} ({}) AS {}",
                quote_ident(name),
                cols.join(", "),
                info.body.as_deref().unwrap_or("SELECT 1")
            ))?;
        }
        // Not the statement cache: these run against temporary shadow tables.
        let eval = |s: &Store| {
            let mut stmt = s.conn.prepare(&plan.translated)?;
            read_only(&stmt)?;
            multiset(&mut stmt)
        };
        let snapshot = eval(self)?;
        let mut prev = snapshot.clone();
        let mut batches = Vec::new();
        for (ts, entries) in groups {
            for (table, row, diff) in entries {
                if diff > 0 {
                    for _ in 0..diff {
                        self.insert_temp(&table, &row)?;
                    }
                } else {
                    self.delete_temp(&table, &row, -diff)?;
                }
            }
            let next = eval(self)?;
            let d = diff_maps(&prev, &next);
            if !d.is_empty() {
                batches.push((ts, d));
            }
            prev = next;
        }
        Ok((snapshot, batches, prev))
    }

    fn insert_temp(&self, table: &str, row: &Row) -> Result<(), SqlError> {
        let mut st = self
            .conn
            .prepare_cached(&insert_temp_sql(table, row.len()))?;
        st.execute(rusqlite::params_from_iter(row.iter()))?;
        Ok(())
    }

    fn delete_temp(&self, table: &str, row: &Row, count: i64) -> Result<(), SqlError> {
        let Some(info) = self.catalog.get(table) else {
            return Ok(());
        };
        let conds: Vec<String> = info
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{} IS ?{}", quote_ident(&c.name), i + 1))
            .collect();
        let q = quote_ident(table);
        let mut st = self.conn.prepare_cached(&format!(
            "DELETE FROM temp.{q} WHERE rowid IN (SELECT rowid FROM temp.{q} WHERE {} LIMIT {count})",
            conds.join(" AND ")
        ))?;
        st.execute(rusqlite::params_from_iter(row.iter()))?;
        Ok(())
    }
}

/// Runs a [`Source::Delta`] query over the loaded delta rows: the retracted rows'
/// results count -1, the inserted rows' +1.
fn eval_delta(conn: &Connection, sql: &str) -> Result<Vec<(Row, i64)>, SqlError> {
    let mut stmt = prepare_read(conn, sql)?;
    let n = stmt.column_count();
    let mut updates = Vec::new();
    for sign in [-1i64, 1] {
        let mut rows = stmt.query([sign])?;
        while let Some(r) = rows.next()? {
            updates.push((read_row(r, n)?, sign));
        }
    }
    Ok(consolidate(updates))
}

/// Re-runs `sql` and returns its diff against `prev`, which then holds the new
/// result (or, on error, still the old one).
fn reevaluate(
    conn: &Connection,
    sql: &str,
    prev: &mut ResultSet,
) -> Result<Vec<(Row, i64)>, SqlError> {
    let scan = |prev: &mut ResultSet| -> Result<(), SqlError> {
        let mut stmt = prepare_read(conn, sql)?;
        let n = stmt.column_count();
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            prev.observe((0..n).map(|i| r.get_ref(i)))?;
        }
        Ok(())
    };
    match scan(prev) {
        Ok(()) => Ok(prev.finish()),
        Err(e) => {
            prev.abandon();
            Err(e)
        }
    }
}

/// `INSERT INTO temp.<table> VALUES (?1, .., ?width)`.
fn insert_temp_sql(table: &str, width: usize) -> String {
    let marks: Vec<String> = (1..=width).map(|i| format!("?{i}")).collect();
    format!(
        "INSERT INTO temp.{} VALUES ({})",
        quote_ident(table),
        marks.join(", ")
    )
}

fn kind_name(k: RelKind) -> &'static str {
    match k {
        RelKind::Table => "table",
        RelKind::View => "view",
    }
}

/// Runs a prepared query and counts its rows.
fn multiset(stmt: &mut rusqlite::Statement<'_>) -> Result<HashMap<Row, i64>, SqlError> {
    let n = stmt.column_count();
    let mut rows = stmt.query([])?;
    let mut out: HashMap<Row, i64> = HashMap::new();
    while let Some(r) = rows.next()? {
        *out.entry(read_row(r, n)?).or_insert(0) += 1;
    }
    Ok(out)
}

fn bounds_error(as_of: u64, up_to: u64) -> SqlError {
    SqlError::new(
        "22000",
        format!(
            "subscription lower bound (`AS OF`) is greater than its upper bound (`UP TO`): {as_of} > {up_to}"
        ),
    )
}

struct Plan {
    translated: String,
    deps: BTreeSet<String>,
    base_tables: BTreeSet<String>,
    source_table: Option<String>,
    out: Output,
}

/// Version strings reported by `mz_version()` and friends.
pub fn version_info(legacy: bool) -> (&'static str, i64) {
    if legacy {
        ("v0.26.4 (2b0ad1c4e)", 2604)
    } else {
        ("v0.160.0 (6f1e0c2a4)", 16000)
    }
}

fn register_functions(conn: &Connection, legacy: bool) -> Result<(), rusqlite::Error> {
    let det = FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC;
    let volatile = FunctionFlags::SQLITE_UTF8;
    let (version, num) = version_info(legacy);
    conn.create_scalar_function("mz_version", 0, det, move |_| Ok(version.to_owned()))?;
    conn.create_scalar_function("mz_version_num", 0, det, move |_| Ok(num))?;
    let pg_version = format!(
        "PostgreSQL 9.5 on x86_64-unknown-linux-gnu (Materialize {})",
        version.split(' ').next().unwrap_or(version)
    );
    conn.create_scalar_function("version", 0, det, move |_| Ok(pg_version.clone()))?;
    conn.create_scalar_function("current_database", 0, det, |_| Ok("materialize".to_owned()))?;
    conn.create_scalar_function("current_schema", 0, det, |_| Ok("public".to_owned()))?;
    conn.create_scalar_function("now", 0, volatile, |_| Ok(format_timestamptz_ms(now_ms())))?;
    conn.create_scalar_function("mz_epoch_ms", 0, volatile, |_| Ok(now_ms()))?;
    conn.create_scalar_function("mz_now", 0, volatile, |_| Ok(now_ms()))?;
    conn.create_scalar_function("mz_bool", 1, det, |ctx| {
        Ok(match ctx.get_raw(0) {
            ValueRef::Null => Value::Null,
            ValueRef::Integer(i) => Value::Integer(i64::from(i != 0)),
            ValueRef::Real(f) => Value::Integer(i64::from(f != 0.0)),
            ValueRef::Text(t) => match parse_bool(&String::from_utf8_lossy(t)) {
                Some(b) => Value::Integer(i64::from(b)),
                None => {
                    return Err(rusqlite::Error::UserFunctionError(
                        format!(
                            "invalid input syntax for type boolean: \"{}\"",
                            String::from_utf8_lossy(t)
                        )
                        .into(),
                    ))
                }
            },
            ValueRef::Blob(_) => Value::Null,
        })
    })?;
    conn.create_scalar_function("mz_div", 2, det, |ctx| {
        let num = |v: ValueRef<'_>| -> Option<Value> {
            match v {
                ValueRef::Integer(i) => Some(Value::Integer(i)),
                ValueRef::Real(f) => Some(Value::Real(f)),
                ValueRef::Text(t) => {
                    let s = String::from_utf8_lossy(t);
                    s.trim()
                        .parse::<i64>()
                        .map(Value::Integer)
                        .or_else(|_| s.trim().parse::<f64>().map(Value::Real))
                        .ok()
                }
                _ => None,
            }
        };
        let (Some(a), Some(b)) = (num(ctx.get_raw(0)), num(ctx.get_raw(1))) else {
            return Ok(Value::Null);
        };
        let zero = || rusqlite::Error::UserFunctionError(DIV_BY_ZERO_MARKER.into());
        Ok(match (a, b) {
            (Value::Integer(x), Value::Integer(y)) => {
                if y == 0 {
                    return Err(zero());
                }
                Value::Integer(x.checked_div(y).ok_or_else(|| {
                    rusqlite::Error::UserFunctionError("bigint out of range".into())
                })?)
            }
            (a, b) => {
                let f = |v: Value| match v {
                    Value::Integer(i) => i as f64,
                    Value::Real(r) => r,
                    _ => 0.0,
                };
                let y = f(b);
                if y == 0.0 {
                    return Err(zero());
                }
                Value::Real(f(a) / y)
            }
        })
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn store() -> Store {
        let config = StoreConfig {
            legacy: false,
            retain: Duration::from_secs(600),
            tick: Duration::from_secs(1),
        };
        Store::new(config, Arc::default()).expect("store")
    }

    fn write(store: &mut Store, stmts: &[String]) {
        let stmts: Vec<(String, Vec<Datum>)> =
            stmts.iter().map(|s| (s.clone(), Vec::new())).collect();
        store.write(&stmts, false).expect("write");
    }

    /// Subscribes with or without the incremental path; returns the id and events.
    fn subscribe(
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

    fn is_delta(store: &Store, id: u64) -> bool {
        matches!(
            store.subs.get(&id).map(|s| &s.source),
            Some(Source::Delta { .. })
        )
    }

    fn is_groups(store: &Store, id: u64) -> bool {
        matches!(
            store.subs.get(&id).map(|s| &s.source),
            Some(Source::Groups(_))
        )
    }

    fn is_full(store: &Store, id: u64) -> bool {
        matches!(
            store.subs.get(&id).map(|s| &s.source),
            Some(Source::Query { .. })
        )
    }

    fn drain(rx: &mut tmpsc::UnboundedReceiver<SubEvent>) -> Vec<String> {
        drain_from(rx, 0)
    }

    /// The events so far, rows from column `skip` on.
    fn drain_from(rx: &mut tmpsc::UnboundedReceiver<SubEvent>, skip: usize) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            match ev {
                SubEvent::Rows(rows) => {
                    out.extend(rows.iter().map(|r| format!("{:?}", &r[skip..])))
                }
                other => out.push(format!("{other:?}")),
            }
        }
        out
    }

    const SCHEMA: &str = "
        CREATE TABLE t (a int, b text, c double precision);
        CREATE TABLE u (x int);
        CREATE VIEW v_id AS SELECT a, b, c FROM t;
        CREATE VIEW v_filter AS SELECT a, b FROM t WHERE a % 3 = 0;
        CREATE VIEW v_proj AS SELECT a + 1 AS a1, coalesce(b, 'none') AS b, upper(b) AS ub, c * 2 AS c2
            FROM t WHERE b IS NULL OR a > 4;
        CREATE VIEW v_on_view AS SELECT a1, b FROM v_proj WHERE a1 % 2 = 0;
        CREATE VIEW v_text AS SELECT * FROM t WHERE a = '5' OR b LIKE 'x%';
        CREATE VIEW v_case AS SELECT CASE WHEN a IS NULL THEN 'n' WHEN a > 5 THEN 'big' ELSE 'small' END AS size, b FROM t AS r WHERE r.c IS NOT NULL;
        INSERT INTO t VALUES (3, 'x', 1.5), (3, 'x', 1.5), (NULL, NULL, NULL), (6, 'y', 2);
    ";

    /// Every eligible subscription gets the same events from the incremental path
    /// as from full re-evaluation, over random inserts, updates and deletes with
    /// NULLs, duplicates and rows moving in and out of filters.
    #[test]
    fn incremental_matches_full_recompute() {
        let mut s = store();
        s.script(SCHEMA).expect("schema");
        let subjects = [
            "v_id",
            "v_filter",
            "v_proj",
            "v_on_view",
            "v_text",
            "v_case",
            "v_filter WITH (PROGRESS)",
            "v_filter ENVELOPE UPSERT (KEY (a))",
            "(SELECT b, a FROM t WHERE c IS NOT NULL)",
            "(SELECT a::text || b AS ab, -a AS neg FROM t)",
            "(SELECT * FROM v_on_view WHERE b <> 'x' ORDER BY a1)",
            "(SELECT a, b FROM t WHERE b % 10 = 0)",
        ];
        let mut pairs = Vec::new();
        for what in subjects {
            let (inc, inc_rx) = subscribe(&mut s, what, true);
            let (full, mut full_rx) = subscribe(&mut s, what, false);
            assert!(is_delta(&s, inc), "{what} is not incremental");
            assert!(!is_delta(&s, full));
            // The snapshots differ only in their AS OF timestamp.
            let mut inc_rx = inc_rx;
            assert_eq!(
                drain_from(&mut inc_rx, 1),
                drain_from(&mut full_rx, 1),
                "{what}"
            );
            pairs.push((what, inc_rx, full_rx));
        }
        let mut rng = StdRng::seed_from_u64(7);
        let int = |rng: &mut StdRng| match rng.random_range(0..8) {
            0 => "NULL".to_owned(),
            _ => rng.random_range(0..10).to_string(),
        };
        let text = |rng: &mut StdRng| {
            ["NULL", "'x'", "'xy'", "'y'", "'z'", "'10'"][rng.random_range(0..6)]
        };
        let real = |rng: &mut StdRng| ["NULL", "1.5", "2.0", "-0.0", "3"][rng.random_range(0..5)];
        for step in 0..400 {
            let mut stmts = Vec::new();
            for _ in 0..rng.random_range(1..=3) {
                stmts.push(match rng.random_range(0..8) {
                    0 | 1 => {
                        let rows: Vec<String> = (0..rng.random_range(1..=3))
                            .map(|_| {
                                format!(
                                    "({}, {}, {})",
                                    int(&mut rng),
                                    text(&mut rng),
                                    real(&mut rng)
                                )
                            })
                            .collect();
                        format!("INSERT INTO t VALUES {}", rows.join(", "))
                    }
                    2 => format!("UPDATE t SET a = a + 1 WHERE b = {}", text(&mut rng)),
                    3 => format!(
                        "UPDATE t SET b = {} WHERE a = {}",
                        text(&mut rng),
                        int(&mut rng)
                    ),
                    4 => format!(
                        "UPDATE t SET c = {} WHERE a IS NULL OR a < 3",
                        real(&mut rng)
                    ),
                    5 => format!("DELETE FROM t WHERE a = {}", int(&mut rng)),
                    6 => format!("DELETE FROM t WHERE b IS {}", text(&mut rng)),
                    _ => format!("INSERT INTO u VALUES ({})", int(&mut rng)),
                });
            }
            write(&mut s, &stmts);
            for (what, inc_rx, full_rx) in &mut pairs {
                assert_eq!(
                    drain(inc_rx),
                    drain(full_rx),
                    "{what} after step {step}: {stmts:?}"
                );
            }
        }
        assert_eq!(s.subs.len(), subjects.len() * 2, "a subscription ended");
    }

    /// The full path's encoded previous result stays equal to the query's result.
    #[test]
    fn reevaluated_result_set_tracks_the_query() {
        let mut s = store();
        s.script(SCHEMA).expect("schema");
        let (id, mut rx) = subscribe(&mut s, "v_proj", false);
        let mut rng = StdRng::seed_from_u64(11);
        for _ in 0..100 {
            let a = rng.random_range(0..10);
            let stmt = match rng.random_range(0..3) {
                0 => format!("INSERT INTO t VALUES ({a}, 'x', {a}.5), ({a}, NULL, NULL)"),
                1 => format!("UPDATE t SET a = a + 2 WHERE a = {a}"),
                _ => format!("DELETE FROM t WHERE a = {a}"),
            };
            write(&mut s, &[stmt]);
        }
        drain(&mut rx);
        let Some(Source::Query { sql, prev }) = s.subs.get_mut(&id).map(|s| &mut s.source) else {
            panic!("not re-evaluated");
        };
        let sql = sql.clone();
        let mut kept = std::mem::take(prev);
        // Against an empty previous result, the diff is the whole current result.
        let current = s.eval_multiset(&sql).expect("eval");
        let mut from_empty = ResultSet::default();
        let mut stmt = s.conn.prepare(&sql).expect("prepare");
        let n = stmt.column_count();
        let mut rows = stmt.query([]).expect("query");
        while let Some(r) = rows.next().expect("row") {
            from_empty
                .observe((0..n).map(|i| r.get_ref(i)))
                .expect("observe");
        }
        drop(rows);
        let mut want: Vec<(Row, i64)> = current.into_iter().collect();
        want.sort();
        assert_eq!(from_empty.finish(), want);
        // And re-running against the kept result finds nothing changed.
        let mut rows = stmt.query([]).expect("query");
        while let Some(r) = rows.next().expect("row") {
            kept.observe((0..n).map(|i| r.get_ref(i))).expect("observe");
        }
        assert!(kept.finish().is_empty());
    }

    #[test]
    fn ineligible_queries_recompute_in_full() {
        let mut s = store();
        s.script(SCHEMA).expect("schema");
        s.script(
            "CREATE VIEW total AS SELECT count(*) AS n, sum(a) AS s FROM t;
             CREATE VIEW over_total AS SELECT n FROM total WHERE n > 1;
             CREATE TABLE folded (s text COLLATE NOCASE);",
        )
        .expect("views");
        for what in [
            "total",
            "over_total",
            "(SELECT a, avg(a) AS n FROM t GROUP BY a)",
            "(SELECT a, min(a) AS n FROM t GROUP BY a)",
            "(SELECT a, count(*) AS n FROM t GROUP BY a HAVING count(*) > 1)",
            "(SELECT a, count(DISTINCT b) AS n FROM t GROUP BY a)",
            "(SELECT a, sum(c) AS n FROM t GROUP BY a)",
            "(SELECT c, count(*) AS n FROM t GROUP BY c)",
            "(SELECT a % 10 AS k, count(*) AS n FROM t GROUP BY a % 10)",
            "(SELECT a, sum(a) + 1 AS n FROM t GROUP BY a)",
            "(SELECT a, b, count(*) AS n FROM t GROUP BY a)",
            "(SELECT a, count(*) AS n FROM t GROUP BY a ORDER BY a LIMIT 1)",
            "(SELECT a, count(*) AS n FROM t WHERE random() > 0 GROUP BY a)",
            "(SELECT a1, count(*) AS n FROM v_proj GROUP BY a1)",
            "(SELECT a, x, count(*) AS n FROM t, u GROUP BY a, x)",
            "(SELECT DISTINCT a FROM t)",
            "(SELECT a FROM t ORDER BY a LIMIT 2)",
            "(SELECT a, random() AS r FROM t)",
            "(SELECT a, mz_epoch_ms() AS now FROM t)",
            "(SELECT a, x FROM t, u)",
            "(SELECT a FROM t JOIN u ON a = x)",
            "(SELECT a FROM t WHERE a IN (SELECT x FROM u))",
            "(SELECT a FROM t UNION ALL SELECT x FROM u)",
            "(SELECT a, row_number() OVER () AS n FROM t)",
            "(SELECT s FROM folded WHERE s = 'A')",
        ] {
            let (id, _rx) = subscribe(&mut s, what, true);
            assert!(is_full(&s, id), "{what} was made incremental");
        }
    }

    /// Grouped `count`/`sum` subscriptions get the same events when only the
    /// written groups are recomputed as from full re-evaluation, over random
    /// inserts, updates and deletes with NULL group keys and NULL summands, groups
    /// appearing and disappearing and rows moving between groups; then a
    /// non-integer summand switches them to full re-evaluation seamlessly.
    #[test]
    fn grouped_aggregates_match_full_recompute() {
        let mut s = store();
        s.script(
            "CREATE TABLE g (k int, s text, v int, w bigint, f double precision);
             CREATE VIEW g_by_k AS SELECT k, count(*) AS n, count(v) AS nv, sum(v) AS sv FROM g GROUP BY k;
             CREATE VIEW g_by_ks AS SELECT s, k, sum(w) AS sw, count(*) AS n FROM g
                 WHERE v IS NULL OR v % 3 <> 0 GROUP BY k, s;
             CREATE VIEW g_star AS SELECT * FROM g_by_k;
             INSERT INTO g VALUES (1, 'x', 1, 10, 1.5), (NULL, NULL, NULL, NULL, NULL), (1, 'y', NULL, 5, 2);",
        )
        .expect("schema");
        let subjects = [
            "g_by_k",
            "g_by_ks",
            "g_star",
            "g_by_k WITH (PROGRESS)",
            "g_by_k ENVELOPE UPSERT (KEY (k))",
            "(SELECT s, count(f) AS nf, count(*) AS n FROM g GROUP BY s)",
            "(SELECT sum(v) AS sv, k FROM g AS x WHERE x.s <> 'z' GROUP BY k)",
            "(SELECT k, s, count(*) FROM g WHERE coalesce(v, 0) < 8 GROUP BY s, k)",
        ];
        let mut pairs = Vec::new();
        for what in subjects {
            let (inc, mut inc_rx) = subscribe(&mut s, what, true);
            let (full, mut full_rx) = subscribe(&mut s, what, false);
            assert!(is_groups(&s, inc), "{what} is not maintained per group");
            assert!(is_full(&s, full));
            assert_eq!(
                drain_from(&mut inc_rx, 1),
                drain_from(&mut full_rx, 1),
                "{what}"
            );
            pairs.push((what, inc, inc_rx, full_rx));
        }
        let mut rng = StdRng::seed_from_u64(13);
        let key = |rng: &mut StdRng| match rng.random_range(0..6) {
            0 => "NULL".to_owned(),
            _ => rng.random_range(0..6).to_string(),
        };
        let text = |rng: &mut StdRng| ["NULL", "'x'", "'y'", "'z'"][rng.random_range(0..4)];
        let num = |rng: &mut StdRng| match rng.random_range(0..5) {
            0 => "NULL".to_owned(),
            _ => rng.random_range(-3..1_000_000_000_000i64).to_string(),
        };
        let small = |rng: &mut StdRng| match rng.random_range(0..4) {
            0 => "NULL".to_owned(),
            _ => rng.random_range(-3..10).to_string(),
        };
        for step in 0..400 {
            let mut stmts = Vec::new();
            for _ in 0..rng.random_range(1..=3) {
                stmts.push(match rng.random_range(0..11) {
                    0..=2 => {
                        let rows: Vec<String> = (0..rng.random_range(1..=3))
                            .map(|_| {
                                format!(
                                    "({}, {}, {}, {}, {})",
                                    key(&mut rng),
                                    text(&mut rng),
                                    small(&mut rng),
                                    num(&mut rng),
                                    ["NULL", "1.5", "2"][rng.random_range(0..3)]
                                )
                            })
                            .collect();
                        format!("INSERT INTO g VALUES {}", rows.join(", "))
                    }
                    3 => format!("UPDATE g SET k = k + 1 WHERE s IS {}", text(&mut rng)),
                    4 => format!("UPDATE g SET k = NULL WHERE v = {}", small(&mut rng)),
                    5 => format!(
                        "UPDATE g SET s = {}, v = {} WHERE k IS {}",
                        text(&mut rng),
                        small(&mut rng),
                        key(&mut rng)
                    ),
                    6 => format!("UPDATE g SET w = {} WHERE v < 3", num(&mut rng)),
                    7 => format!("DELETE FROM g WHERE k IS {}", key(&mut rng)),
                    8 => format!("DELETE FROM g WHERE s IS {}", text(&mut rng)),
                    9 if rng.random_range(0..10) == 0 => "DELETE FROM g".to_owned(),
                    _ => format!("UPDATE g SET f = NULL WHERE k = {}", key(&mut rng)),
                });
            }
            write(&mut s, &stmts);
            for (what, _, inc_rx, full_rx) in &mut pairs {
                assert_eq!(
                    drain(inc_rx),
                    drain(full_rx),
                    "{what} after step {step}: {stmts:?}"
                );
            }
        }
        for (what, inc, ..) in &pairs {
            assert!(is_groups(&s, *inc), "{what} left the per-group path");
        }
        // A real in an int column makes its sum a float: full re-evaluation from then on.
        for stmt in [
            "INSERT INTO g VALUES (2, 'x', 1.5, 2.5, NULL)",
            "UPDATE g SET k = 3 WHERE v = 1.5",
            "DELETE FROM g WHERE k = 3",
        ] {
            write(&mut s, &[stmt.to_owned()]);
            for (what, _, inc_rx, full_rx) in &mut pairs {
                assert_eq!(drain(inc_rx), drain(full_rx), "{what} after {stmt}");
            }
        }
        assert!(is_full(&s, pairs[0].1), "g_by_k still per group");
        assert_eq!(s.subs.len(), subjects.len() * 2, "a subscription ended");
    }

    /// The data rows (and progress rows) a subscription has sent so far.
    fn rows(rx: &mut tmpsc::UnboundedReceiver<SubEvent>) -> Vec<Row> {
        let mut out = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            match ev {
                SubEvent::Rows(rows) => out.extend(rows),
                other => panic!("{other:?}"),
            }
        }
        out
    }

    /// A subscription AS OF a time the clock has not reached waits: it sends
    /// only its PROGRESS row at AS OF until a write stamped at or after AS OF
    /// brings the clock there. Writes up to AS OF are in its snapshot, stamped
    /// AS OF; later ones follow as updates at their own timestamps.
    #[test]
    fn future_as_of_waits_for_the_clock() {
        let ts = |t: u64| Datum::Text(t.to_string());
        let progress = |t: u64| vec![ts(t), Datum::Int(1), Datum::Null, Datum::Null];
        let data =
            |t: u64, d: i64, a: i64| vec![ts(t), Datum::Int(0), Datum::Int(d), Datum::Int(a)];
        let count = |t: u64, d: i64, n: i64| vec![ts(t), Datum::Int(d), Datum::Int(n)];
        // The write that brings the clock there lands at AS OF or past it.
        for late in [0, 5] {
            let mut s = store();
            s.script(
                "CREATE TABLE t (a int); CREATE VIEW v AS SELECT count(*) AS n FROM t;
                 INSERT INTO t VALUES (1);",
            )
            .expect("schema");
            let as_of = s.clock.read_ts() + 60_000;
            let (tid, mut t_rx) =
                subscribe(&mut s, &format!("t WITH (PROGRESS) AS OF {as_of}"), true);
            let (vid, mut v_rx) = subscribe(&mut s, &format!("v AS OF AT LEAST {as_of}"), true);
            assert!(s.pending.contains_key(&tid) && s.pending.contains_key(&vid));
            assert_eq!(s.counters.subscriptions.load(Ordering::Relaxed), 2);
            assert_eq!(rows(&mut t_rx), vec![progress(as_of)]);
            assert!(rows(&mut v_rx).is_empty());
            write(&mut s, &["INSERT INTO t VALUES (2)".to_owned()]);
            assert!(s.clock.last_write < as_of);
            assert!(rows(&mut t_rx).is_empty() && rows(&mut v_rx).is_empty());
            s.clock.floor = as_of + late;
            write(&mut s, &["INSERT INTO t VALUES (3)".to_owned()]);
            let w3 = s.clock.last_write;
            assert_eq!(w3, as_of + late);
            assert!(s.pending.is_empty(), "started");
            assert!(s.subs.contains_key(&tid) && s.subs.contains_key(&vid));
            let (want_t, want_v) = if late == 0 {
                (
                    vec![
                        data(as_of, 1, 1),
                        data(as_of, 1, 2),
                        data(as_of, 1, 3),
                        progress(as_of + 1),
                    ],
                    vec![count(as_of, 1, 3)],
                )
            } else {
                (
                    vec![
                        data(as_of, 1, 1),
                        data(as_of, 1, 2),
                        progress(as_of + 1),
                        data(w3, 1, 3),
                        progress(w3 + 1),
                    ],
                    vec![count(as_of, 1, 2), count(w3, -1, 2), count(w3, 1, 3)],
                )
            };
            assert_eq!(rows(&mut t_rx), want_t, "late {late}");
            assert_eq!(rows(&mut v_rx), want_v, "late {late}");
            // Live from then on, never at or before AS OF.
            write(&mut s, &["DELETE FROM t WHERE a = 1".to_owned()]);
            let w4 = s.clock.last_write;
            assert!(w4 > w3);
            assert_eq!(rows(&mut t_rx), vec![data(w4, -1, 1), progress(w4 + 1)]);
            assert_eq!(rows(&mut v_rx), vec![count(w4, 1, 2), count(w4, -1, 3)]);
        }
    }

    /// A waiting subscription is listed, can end, and ends when what it reads
    /// is dropped; an AS OF however far ahead just waits.
    #[test]
    fn future_as_of_lifecycle() {
        let mut s = store();
        s.script("CREATE TABLE t (a int); CREATE VIEW v AS SELECT a FROM t;")
            .expect("schema");
        let listed = |s: &Store| {
            s.query("SELECT id FROM mz_subscriptions", &[])
                .expect("list")
                .rows
                .len()
        };
        let as_of = s.clock.read_ts() + 60_000;
        let (gone, _) = subscribe(&mut s, &format!("t AS OF {as_of}"), true);
        let (_, mut v_rx) = subscribe(&mut s, &format!("v AS OF {as_of}"), true);
        let (_, _far) = subscribe(&mut s, "t AS OF 18446744073709551615", true);
        assert_eq!((s.pending.len(), listed(&s)), (3, 3));
        s.remove_sub(gone);
        assert_eq!((s.pending.len(), listed(&s)), (2, 2));
        s.drop(DropKind::View, &["v".to_owned()], false, false)
            .expect("drop");
        match v_rx.try_recv() {
            Ok(SubEvent::Error(e)) => assert_eq!(
                (e.code, e.message.as_str()),
                ("42704", "relation 'materialize.public.v' was dropped")
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!((s.pending.len(), listed(&s)), (1, 1));
        assert_eq!(s.counters.subscriptions.load(Ordering::Relaxed), 1);
        assert!(s.until_due() > Duration::from_secs(50));
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

    /// Subscribes to `q` both ways (the incremental one must take the path
    /// `is_incremental` checks), applies `writes` one by one, and checks that
    /// both end with the same events, a division by zero last.
    fn assert_errors_match(
        schema: &str,
        q: &str,
        is_incremental: fn(&Store, u64) -> bool,
        writes: [&str; 2],
    ) {
        let mut s = store();
        s.script(schema).expect("schema");
        let (inc, mut inc_rx) = subscribe(&mut s, q, true);
        let (_, mut full_rx) = subscribe(&mut s, q, false);
        assert!(is_incremental(&s, inc), "{q}");
        // The snapshots differ only in their AS OF timestamp when a millisecond passes.
        assert_eq!(drain_from(&mut inc_rx, 1), drain_from(&mut full_rx, 1));
        for w in writes {
            write(&mut s, &[w.to_owned()]);
        }
        let events = drain(&mut inc_rx);
        assert!(events
            .last()
            .is_some_and(|e| e.contains("division by zero")));
        assert_eq!(events, drain(&mut full_rx));
        assert!(s.subs.is_empty());
    }

    /// Division by zero in a new row poisons the subscription either way.
    #[test]
    fn evaluation_errors_match() {
        assert_errors_match(
            "CREATE TABLE t (a int); INSERT INTO t VALUES (1);",
            "(SELECT 10 / a AS q FROM t)",
            is_delta,
            ["INSERT INTO t VALUES (2)", "INSERT INTO t VALUES (0)"],
        );
    }

    /// The same for a grouped aggregate whose filter divides by a group column.
    #[test]
    fn grouped_evaluation_errors_match() {
        assert_errors_match(
            "CREATE TABLE t (a int, b int); INSERT INTO t VALUES (1, 1);",
            "(SELECT a, count(*) AS n, sum(b) AS s FROM t WHERE 10 / a > 1 GROUP BY a)",
            is_groups,
            ["INSERT INTO t VALUES (2, 5)", "INSERT INTO t VALUES (0, 1)"],
        );
    }
}
