//! One client connection: startup, the simple and extended query protocols,
//! transactions, cursors, streaming SUBSCRIBE and COPY out.
//!
//! pgwire provides the message codec and TLS refusal; the message loop is ours,
//! because a streaming SUBSCRIBE must keep watching the socket (for a disconnect),
//! the cancel token and the shutdown token while it waits for rows. Each session
//! is one task spawned by the listener; it ends when the client leaves, on a
//! socket error, or when the engine's shutdown token is cancelled. Dropping a
//! session drops its cursors, whose guards unregister their subscriptions.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use pgwire::api::{ClientInfo, PgWireConnectionState};
use pgwire::error::ErrorInfo;
use pgwire::messages::copy::{CopyData, CopyDone, CopyOutResponse};
use pgwire::messages::data::{
    DataRow, FieldDescription, NoData, ParameterDescription, RowDescription,
};
use pgwire::messages::extendedquery::{
    BindComplete, CloseComplete, ParseComplete, PortalSuspended,
};
use pgwire::messages::response::{
    CommandComplete, EmptyQueryResponse, ReadyForQuery, TransactionStatus,
};
use pgwire::messages::startup::{Authentication, BackendKeyData, ParameterStatus, SecretKey};
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage, ProtocolVersion};
use pgwire::tokio::server::{negotiate_tls, MaybeTls, PgWireMessageServerCodec};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use super::error::SqlError;
use super::sql::{self, CursorQuery, FetchStmt, Stmt, SubscribeStmt};
use super::store::{self, Command, Counters, StoreHandle};
use super::subscribe::SubEvent;
use super::value::{copy_escape, Column, Datum, PgType, Row};

type Socket = Framed<MaybeTls, PgWireMessageServerCodec<()>>;

/// A session's cancel secret and the cancel token of its running statement.
type CancelEntry = (Bytes, Arc<Mutex<CancellationToken>>);

/// State shared by the listener and every session.
pub struct Shared {
    pub store: StoreHandle,
    pub legacy: bool,
    pub counters: Arc<Counters>,
    pub shutdown: CancellationToken,
    next_session: AtomicU64,
    /// pid → (secret, the running query's cancel token). A std Mutex: lookups are
    /// short and never span an `.await`.
    cancels: Mutex<HashMap<i32, CancelEntry>>,
}

impl Shared {
    pub fn new(
        store: StoreHandle,
        legacy: bool,
        counters: Arc<Counters>,
        shutdown: CancellationToken,
    ) -> Shared {
        Shared {
            store,
            legacy,
            counters,
            shutdown,
            next_session: AtomicU64::new(1),
            cancels: Mutex::new(HashMap::new()),
        }
    }

    fn cancel(&self, pid: i32, secret: &SecretKey) {
        let target = self.cancels.lock().ok().and_then(|m| m.get(&pid).cloned());
        if let Some((s, token)) = target {
            if s == secret.to_bytes() {
                if let Ok(t) = token.lock() {
                    t.cancel();
                }
            }
        }
    }
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("client connection failed")]
    Io(#[source] std::io::Error),
    #[error("client disconnected")]
    Disconnected,
    #[error("engine shutting down")]
    Shutdown,
}

impl From<std::io::Error> for SessionError {
    fn from(e: std::io::Error) -> Self {
        SessionError::Io(e)
    }
}

/// A statement failure (reported, session continues) or a session failure.
#[derive(Debug)]
enum ExecError {
    Sql(SqlError),
    Session(SessionError),
}

impl From<SqlError> for ExecError {
    fn from(e: SqlError) -> Self {
        ExecError::Sql(e)
    }
}

impl From<SessionError> for ExecError {
    fn from(e: SessionError) -> Self {
        ExecError::Session(e)
    }
}

impl From<std::io::Error> for ExecError {
    fn from(e: std::io::Error) -> Self {
        ExecError::Session(SessionError::Io(e))
    }
}

/// Unregisters a subscription when its cursor or stream goes away.
struct SubGuard {
    id: u64,
    store: StoreHandle,
}

impl Drop for SubGuard {
    fn drop(&mut self) {
        if self.id != 0 {
            self.store.send(Command::Unsubscribe { id: self.id });
        }
    }
}

struct Subscription {
    columns: Vec<Column>,
    rx: mpsc::UnboundedReceiver<SubEvent>,
    _guard: SubGuard,
}

enum CursorBody {
    Rows(VecDeque<Row>),
    Sub {
        sub: Subscription,
        buffer: VecDeque<Row>,
        ended: bool,
        error: Option<SqlError>,
    },
}

struct Cursor {
    columns: Vec<Column>,
    body: CursorBody,
}

enum Txn {
    Idle,
    Open { writes: Vec<(String, Vec<Datum>)> },
    Failed,
}

struct Prepared {
    stmt: Option<Stmt>,
    param_types: Vec<u32>,
}

struct Portal {
    stmt: Option<Stmt>,
    params: Vec<Datum>,
    formats: Vec<i16>,
    /// Rows left after a PortalSuspended.
    remaining: Option<(Vec<Column>, VecDeque<Row>)>,
    ran: bool,
}

struct Session {
    id: u64,
    shared: Arc<Shared>,
    socket: Socket,
    pending: VecDeque<PgWireFrontendMessage>,
    vars: BTreeMap<String, String>,
    txn: Txn,
    cursors: HashMap<String, Cursor>,
    /// Cursors declared outside BEGIN: they end with the implicit transaction.
    implicit_cursors: Vec<String>,
    statements: HashMap<String, Prepared>,
    portals: HashMap<String, Portal>,
    cancel: Arc<Mutex<CancellationToken>>,
    skip_until_sync: bool,
}

/// Serves one TCP connection until it ends.
pub async fn serve(tcp: TcpStream, shared: Arc<Shared>) {
    let socket = match negotiate_tls::<()>(tcp, None).await {
        Ok(Some(s)) => s,
        _ => return,
    };
    let startup = tokio::time::timeout(Duration::from_secs(60), startup(socket, shared.clone()));
    let mut session = match startup.await {
        Ok(Ok(Some(s))) => s,
        _ => return,
    };
    shared.counters.sessions.fetch_add(1, Ordering::Relaxed);
    shared.store.send(Command::SessionOpened {
        id: session.id,
        application_name: session
            .vars
            .get("application_name")
            .cloned()
            .unwrap_or_default(),
    });
    let result = session.run().await;
    if let Err(e) = &result {
        tracing::debug!(session = session.id, error = %e, "Engine session ended.");
    }
    session.finish();
}

async fn startup(mut socket: Socket, shared: Arc<Shared>) -> Result<Option<Session>, SessionError> {
    loop {
        let msg = tokio::select! {
            _ = shared.shutdown.cancelled() => return Err(SessionError::Shutdown),
            m = socket.next() => m,
        };
        match msg {
            Some(Ok(PgWireFrontendMessage::CancelRequest(c))) => {
                shared.cancel(c.pid, &c.secret_key);
                return Ok(None);
            }
            Some(Ok(PgWireFrontendMessage::Startup(st))) => {
                pgwire::api::auth::protocol_negotiation(&mut socket, &st)
                    .await
                    .map_err(|_| SessionError::Disconnected)?;
                let id = shared.next_session.fetch_add(1, Ordering::Relaxed);
                let pid = (id % i32::MAX as u64) as i32;
                let secret = match socket.protocol_version() {
                    ProtocolVersion::PROTOCOL3_0 => SecretKey::I32(rand::random::<i32>()),
                    _ => {
                        let mut b = vec![0u8; 32];
                        rand::fill(&mut b[..]);
                        SecretKey::Bytes(b.into())
                    }
                };
                let mut vars = default_vars(shared.legacy);
                for (k, v) in &st.parameters {
                    match k.as_str() {
                        "application_name" => {
                            vars.insert(k.clone(), v.clone());
                        }
                        "options" => {
                            for opt in v.split_whitespace() {
                                let opt = opt.trim_start_matches("-c").trim_start_matches("--");
                                if let Some((name, value)) = opt.split_once('=') {
                                    vars.insert(name.to_ascii_lowercase(), value.to_owned());
                                }
                            }
                        }
                        _ => {}
                    }
                }
                socket
                    .feed(PgWireBackendMessage::Authentication(Authentication::Ok))
                    .await?;
                for name in [
                    "server_version",
                    "server_encoding",
                    "client_encoding",
                    "DateStyle",
                    "TimeZone",
                    "integer_datetimes",
                    "standard_conforming_strings",
                    "IntervalStyle",
                    "is_superuser",
                    "application_name",
                    "mz_version",
                ] {
                    if let Some(v) = vars.get(&name.to_ascii_lowercase()) {
                        socket
                            .feed(PgWireBackendMessage::ParameterStatus(ParameterStatus::new(
                                name.to_owned(),
                                v.clone(),
                            )))
                            .await?;
                    }
                }
                let cancel = Arc::new(Mutex::new(CancellationToken::new()));
                if let Ok(mut m) = shared.cancels.lock() {
                    m.insert(pid, (secret.to_bytes(), cancel.clone()));
                }
                socket
                    .feed(PgWireBackendMessage::BackendKeyData(BackendKeyData::new(
                        pid, secret,
                    )))
                    .await?;
                socket
                    .send(PgWireBackendMessage::ReadyForQuery(ReadyForQuery::new(
                        TransactionStatus::Idle,
                    )))
                    .await?;
                socket.set_state(PgWireConnectionState::ReadyForQuery);
                return Ok(Some(Session {
                    id,
                    shared,
                    socket,
                    pending: VecDeque::new(),
                    vars,
                    txn: Txn::Idle,
                    cursors: HashMap::new(),
                    implicit_cursors: Vec::new(),
                    statements: HashMap::new(),
                    portals: HashMap::new(),
                    cancel,
                    skip_until_sync: false,
                }));
            }
            Some(Ok(_)) => continue,
            _ => return Ok(None),
        }
    }
}

fn default_vars(legacy: bool) -> BTreeMap<String, String> {
    let (version, _) = store::version_info(legacy);
    let mut v = BTreeMap::new();
    for (k, val) in [
        ("application_name", ""),
        ("client_encoding", "UTF8"),
        ("client_min_messages", "notice"),
        ("cluster", if legacy { "default" } else { "quickstart" }),
        ("cluster_replica", ""),
        ("database", "materialize"),
        ("datestyle", "ISO, MDY"),
        ("extra_float_digits", "3"),
        ("failpoints", ""),
        ("idle_in_transaction_session_timeout", "2min"),
        ("integer_datetimes", "on"),
        ("intervalstyle", "postgres"),
        ("is_superuser", "off"),
        ("max_query_result_size", "1GB"),
        ("search_path", "public"),
        ("server_encoding", "UTF8"),
        ("server_version", "9.5.0"),
        ("server_version_num", "90500"),
        ("sql_safe_updates", "off"),
        ("standard_conforming_strings", "on"),
        ("statement_timeout", "10s"),
        ("timezone", "UTC"),
        ("transaction_isolation", "strict serializable"),
    ] {
        v.insert(k.to_owned(), val.to_owned());
    }
    if !legacy {
        v.insert("mz_version".to_owned(), version.to_owned());
    }
    v
}

fn error_info(e: &SqlError) -> ErrorInfo {
    ErrorInfo::new("ERROR".to_owned(), e.code.to_owned(), e.message.clone())
}

fn row_description(columns: &[Column], formats: &[i16]) -> RowDescription {
    RowDescription::new(
        columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                FieldDescription::new(
                    c.name.clone(),
                    0,
                    0,
                    c.ty.oid(),
                    c.ty.typlen(),
                    c.ty.typmod(),
                    format_of(formats, i),
                )
            })
            .collect(),
    )
}

fn format_of(formats: &[i16], i: usize) -> i16 {
    match formats {
        [] => 0,
        [one] => *one,
        many => many.get(i).copied().unwrap_or(0),
    }
}

fn data_row(row: &Row, columns: &[Column], formats: &[i16]) -> Result<DataRow, SqlError> {
    let mut buf = BytesMut::new();
    for (i, d) in row.iter().enumerate() {
        let ty = columns.get(i).map(|c| c.ty).unwrap_or(PgType::Text);
        let bytes = if format_of(formats, i) == 1 {
            d.to_binary(ty)?
        } else {
            d.to_text(ty).map(String::into_bytes)
        };
        match bytes {
            None => buf.put_i32(-1),
            Some(b) => {
                buf.put_i32(b.len() as i32);
                buf.put_slice(&b);
            }
        }
    }
    Ok(DataRow::new(buf, row.len() as i16))
}

fn copy_line(row: &Row, columns: &[Column]) -> Bytes {
    let mut s = String::new();
    for (i, d) in row.iter().enumerate() {
        if i > 0 {
            s.push('\t');
        }
        let ty = columns.get(i).map(|c| c.ty).unwrap_or(PgType::Text);
        match d.to_text(ty) {
            None => s.push_str("\\N"),
            Some(t) => copy_escape(&t, &mut s),
        }
    }
    s.push('\n');
    Bytes::from(s)
}

/// CopyOutResponse for `n` text columns.
fn copy_out_response(n: usize) -> PgWireBackendMessage {
    PgWireBackendMessage::CopyOutResponse(CopyOutResponse::new(0, n as i16, vec![0; n]))
}

fn tag_for(stmt: &Stmt) -> &'static str {
    match stmt {
        Stmt::CreateTable { .. } => "CREATE TABLE",
        Stmt::CreateView {
            materialized: true, ..
        } => "CREATE MATERIALIZED VIEW",
        Stmt::CreateView { .. } => "CREATE VIEW",
        Stmt::CreateIndex => "CREATE INDEX",
        Stmt::Drop { kind, .. } => match kind {
            sql::DropKind::Table => "DROP TABLE",
            sql::DropKind::View => "DROP VIEW",
            sql::DropKind::MaterializedView => "DROP MATERIALIZED VIEW",
            sql::DropKind::Index => "DROP INDEX",
        },
        Stmt::Discard => "DISCARD ALL",
        _ => "OK",
    }
}

fn decode_param(bytes: Option<&Bytes>, binary: bool, oid: u32) -> Datum {
    let Some(b) = bytes else {
        return Datum::Null;
    };
    if !binary {
        return Datum::Text(String::from_utf8_lossy(b).into_owned());
    }
    let int = |n: usize| -> Option<i64> {
        let arr = b.get(..n)?;
        Some(match n {
            2 => i64::from(i16::from_be_bytes([arr[0], arr[1]])),
            4 => i64::from(i32::from_be_bytes([arr[0], arr[1], arr[2], arr[3]])),
            _ => i64::from_be_bytes(arr.try_into().ok()?),
        })
    };
    let v = match PgType::from_oid(oid) {
        Some(PgType::Bool) => b.first().map(|x| Datum::Int(i64::from(*x != 0))),
        Some(PgType::Int2) => int(2).map(Datum::Int),
        Some(PgType::Int4) => int(4).map(Datum::Int),
        Some(PgType::Int8) => int(8).map(Datum::Int),
        Some(PgType::Float4) => b
            .get(..4)
            .and_then(|a| a.try_into().ok())
            .map(|a| Datum::Real(f64::from(f32::from_be_bytes(a)))),
        Some(PgType::Float8) => b
            .get(..8)
            .and_then(|a| a.try_into().ok())
            .map(|a| Datum::Real(f64::from_be_bytes(a))),
        Some(PgType::Jsonb) => Some(Datum::Text(
            String::from_utf8_lossy(b.get(1..).unwrap_or(&[])).into_owned(),
        )),
        Some(PgType::Bytea) => Some(Datum::Blob(b.to_vec())),
        _ => Some(Datum::Text(String::from_utf8_lossy(b).into_owned())),
    };
    v.unwrap_or(Datum::Null)
}

fn param_count(sql_text: &str) -> usize {
    sql::tokenize(sql_text)
        .map(|toks| {
            toks.iter()
                .filter_map(|t| match t.tok {
                    sql::Tok::Param(n) => Some(n as usize),
                    _ => None,
                })
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

impl Session {
    fn finish(&mut self) {
        self.cursors.clear();
        if let Ok(mut m) = self.shared.cancels.lock() {
            m.retain(|_, (_, t)| !Arc::ptr_eq(t, &self.cancel));
        }
        self.shared
            .store
            .send(Command::SessionClosed { id: self.id });
        self.shared
            .counters
            .sessions
            .fetch_sub(1, Ordering::Relaxed);
    }

    fn status(&self) -> TransactionStatus {
        match self.txn {
            Txn::Idle => TransactionStatus::Idle,
            Txn::Open { .. } => TransactionStatus::Transaction,
            Txn::Failed => TransactionStatus::Error,
        }
    }

    async fn next_msg(&mut self) -> Result<Option<PgWireFrontendMessage>, SessionError> {
        if let Some(m) = self.pending.pop_front() {
            return Ok(Some(m));
        }
        tokio::select! {
            _ = self.shared.shutdown.cancelled() => Err(SessionError::Shutdown),
            m = self.socket.next() => match m {
                Some(Ok(m)) => Ok(Some(m)),
                Some(Err(_)) => Err(SessionError::Disconnected),
                None => Ok(None),
            },
        }
    }

    async fn run(&mut self) -> Result<(), SessionError> {
        while let Some(msg) = self.next_msg().await? {
            if self.skip_until_sync && !matches!(msg, PgWireFrontendMessage::Sync(_)) {
                continue;
            }
            let res = match msg {
                PgWireFrontendMessage::Query(q) => {
                    self.simple_query(&q.query).await?;
                    Ok(())
                }
                PgWireFrontendMessage::Parse(p) => self.on_parse(p).await,
                PgWireFrontendMessage::Bind(b) => self.on_bind(b).await,
                PgWireFrontendMessage::Describe(d) => self.on_describe(d).await,
                PgWireFrontendMessage::Execute(e) => self.on_execute(e).await,
                PgWireFrontendMessage::Close(c) => {
                    let name = c.name.unwrap_or_default();
                    if c.target_type == b'S' {
                        self.statements.remove(&name);
                    } else {
                        self.portals.remove(&name);
                    }
                    self.socket
                        .feed(PgWireBackendMessage::CloseComplete(CloseComplete::new()))
                        .await?;
                    Ok(())
                }
                PgWireFrontendMessage::Flush(_) => {
                    self.socket.flush().await?;
                    Ok(())
                }
                PgWireFrontendMessage::Sync(_) => {
                    self.skip_until_sync = false;
                    self.portals.remove("");
                    self.end_implicit();
                    self.ready().await?;
                    Ok(())
                }
                PgWireFrontendMessage::Terminate(_) => return Ok(()),
                _ => Ok(()),
            };
            match res {
                Ok(()) => {}
                Err(ExecError::Session(e)) => return Err(e),
                Err(ExecError::Sql(e)) => {
                    self.send_error(&e).await?;
                    self.skip_until_sync = true;
                }
            }
        }
        Ok(())
    }

    async fn ready(&mut self) -> Result<(), SessionError> {
        let status = self.status();
        self.socket
            .send(PgWireBackendMessage::ReadyForQuery(ReadyForQuery::new(
                status,
            )))
            .await?;
        Ok(())
    }

    async fn send_error(&mut self, e: &SqlError) -> Result<(), SessionError> {
        if matches!(self.txn, Txn::Open { .. }) {
            self.txn = Txn::Failed;
        }
        self.socket
            .feed(PgWireBackendMessage::ErrorResponse(error_info(e).into()))
            .await?;
        Ok(())
    }

    /// Ends an implicit transaction: its cursors are gone, as in Materialize.
    fn end_implicit(&mut self) {
        for name in std::mem::take(&mut self.implicit_cursors) {
            self.cursors.remove(&name);
        }
    }

    /// Installs a fresh cancel token for the statement about to run.
    fn start_query(&self) -> CancellationToken {
        let token = CancellationToken::new();
        if let Ok(mut t) = self.cancel.lock() {
            *t = token.clone();
        }
        token
    }

    async fn simple_query(&mut self, text: &str) -> Result<(), SessionError> {
        let token = self.start_query();
        let stmts = match sql::split_statements(text) {
            Ok(s) => s,
            Err(e) => {
                self.send_error(&e).await?;
                return self.ready().await;
            }
        };
        if stmts.is_empty() {
            self.socket
                .feed(PgWireBackendMessage::EmptyQueryResponse(
                    EmptyQueryResponse::new(),
                ))
                .await?;
        }
        for s in stmts {
            let res = match sql::parse(&s, self.shared.legacy) {
                Ok(stmt) => self.execute(stmt, &[], &[], true, &token).await,
                Err(e) => Err(ExecError::Sql(e)),
            };
            match res {
                Ok(()) => {}
                Err(ExecError::Session(e)) => return Err(e),
                Err(ExecError::Sql(e)) => {
                    self.send_error(&e).await?;
                    break;
                }
            }
        }
        self.end_implicit();
        self.ready().await
    }

    async fn send_rows(
        &mut self,
        columns: &[Column],
        rows: impl IntoIterator<Item = Row>,
        formats: &[i16],
        describe: bool,
        tag: &str,
    ) -> Result<(), ExecError> {
        if describe {
            self.socket
                .feed(PgWireBackendMessage::RowDescription(row_description(
                    columns, formats,
                )))
                .await?;
        }
        let mut n = 0;
        for row in rows {
            let dr = data_row(&row, columns, formats)?;
            self.socket.feed(PgWireBackendMessage::DataRow(dr)).await?;
            n += 1;
        }
        self.complete(&format!("{tag} {n}")).await
    }

    async fn complete(&mut self, tag: &str) -> Result<(), ExecError> {
        self.socket
            .feed(PgWireBackendMessage::CommandComplete(CommandComplete::new(
                tag.to_owned(),
            )))
            .await?;
        Ok(())
    }

    /// Runs one statement and writes its response (without ReadyForQuery).
    async fn execute(
        &mut self,
        stmt: Stmt,
        params: &[Datum],
        formats: &[i16],
        simple: bool,
        token: &CancellationToken,
    ) -> Result<(), ExecError> {
        if matches!(self.txn, Txn::Failed) && !matches!(stmt, Stmt::Commit | Stmt::Rollback) {
            return Err(SqlError::aborted_txn().into());
        }
        let store = self.shared.store.clone();
        let tag = tag_for(&stmt);
        match stmt {
            Stmt::Begin => {
                if matches!(self.txn, Txn::Idle) {
                    self.txn = Txn::Open { writes: Vec::new() };
                    // Cursors of an implicit transaction now belong to this one.
                    self.implicit_cursors.clear();
                }
                self.complete("BEGIN").await
            }
            Stmt::Commit => {
                let txn = std::mem::replace(&mut self.txn, Txn::Idle);
                self.cursors.clear();
                self.implicit_cursors.clear();
                match txn {
                    Txn::Open { writes } if !writes.is_empty() => {
                        store
                            .call(|reply| Command::Write {
                                stmts: writes,
                                dry_run: false,
                                reply,
                            })
                            .await?;
                        self.complete("COMMIT").await
                    }
                    Txn::Failed => self.complete("ROLLBACK").await,
                    _ => self.complete("COMMIT").await,
                }
            }
            Stmt::Rollback => {
                self.txn = Txn::Idle;
                self.cursors.clear();
                self.implicit_cursors.clear();
                self.complete("ROLLBACK").await
            }
            Stmt::Set { name, value } => {
                if name == "cluster" && !matches!(self.txn, Txn::Idle) {
                    return Err(SqlError::new(
                        "25001",
                        "SET cluster cannot be called in an active transaction",
                    )
                    .into());
                }
                if name == "transaction_isolation" && value.is_none() {
                    return self.complete("SET").await;
                }
                let value = match value {
                    Some(v) => v,
                    None => default_vars(self.shared.legacy)
                        .get(&name)
                        .cloned()
                        .unwrap_or_default(),
                };
                if name == "application_name" {
                    store.send(Command::SessionUpdated {
                        id: self.id,
                        application_name: value.clone(),
                    });
                }
                self.vars.insert(name, value);
                self.complete("SET").await
            }
            Stmt::Show { name } => {
                let rows: Vec<Row> = if name == "all" {
                    self.vars
                        .iter()
                        .map(|(k, v)| vec![Datum::Text(k.clone()), Datum::Text(v.clone())])
                        .collect()
                } else {
                    let v = self.vars.get(&name).ok_or_else(|| {
                        SqlError::new(
                            "42704",
                            format!("unrecognized configuration parameter \"{name}\""),
                        )
                    })?;
                    vec![vec![Datum::Text(v.clone())]]
                };
                self.send_rows(&show_columns(&name), rows, formats, simple, "SELECT")
                    .await
            }
            Stmt::Select { sql } => {
                let params = params.to_vec();
                let res = store
                    .call(|reply| Command::Query { sql, params, reply })
                    .await?;
                self.send_rows(&res.columns, res.rows, formats, simple, "SELECT")
                    .await
            }
            Stmt::Write { sql, tag } => {
                let write = (sql, params.to_vec());
                let (stmts, dry_run) = match &mut self.txn {
                    // Checked now by a dry run of the whole transaction, applied at
                    // COMMIT; an error fails the transaction, dropping its writes.
                    Txn::Open { writes } => {
                        writes.push(write);
                        (writes.clone(), true)
                    }
                    _ => (vec![write], false),
                };
                let counts = store
                    .call(|reply| Command::Write {
                        stmts,
                        dry_run,
                        reply,
                    })
                    .await?;
                let count = counts.last().copied().unwrap_or(0);
                let tag = if tag == "INSERT" {
                    format!("INSERT 0 {count}")
                } else {
                    format!("{tag} {count}")
                };
                self.complete(&tag).await
            }
            Stmt::CreateTable { name, sql } => {
                store
                    .call(|reply| Command::CreateTable { name, sql, reply })
                    .await?;
                self.complete(tag).await
            }
            Stmt::CreateView {
                name,
                body,
                replace,
                ..
            } => {
                store
                    .call(|reply| Command::CreateView {
                        name,
                        body,
                        replace,
                        reply,
                    })
                    .await?;
                self.complete(tag).await
            }
            Stmt::Drop {
                kind,
                names,
                if_exists,
                cascade,
            } => {
                store
                    .call(|reply| Command::Drop {
                        kind,
                        names,
                        if_exists,
                        cascade,
                        reply,
                    })
                    .await?;
                self.complete(tag).await
            }
            Stmt::CreateIndex | Stmt::Discard => self.complete(tag).await,
            Stmt::Declare { name, query } => {
                if self.cursors.contains_key(&name) {
                    return Err(SqlError::new(
                        "42P03",
                        format!("cursor \"{name}\" already exists"),
                    )
                    .into());
                }
                let cursor = match query {
                    CursorQuery::Select(sql) => {
                        let params = params.to_vec();
                        let res = store
                            .call(|reply| Command::Query { sql, params, reply })
                            .await?;
                        Cursor {
                            columns: res.columns,
                            body: CursorBody::Rows(res.rows.into()),
                        }
                    }
                    CursorQuery::Subscribe(s) => {
                        let sub = self.subscribe(s).await?;
                        Cursor {
                            columns: sub.columns.clone(),
                            body: CursorBody::Sub {
                                sub,
                                buffer: VecDeque::new(),
                                ended: false,
                                error: None,
                            },
                        }
                    }
                };
                if matches!(self.txn, Txn::Idle) {
                    self.implicit_cursors.push(name.clone());
                }
                self.cursors.insert(name, cursor);
                self.complete("DECLARE CURSOR").await
            }
            Stmt::Fetch(f) => {
                let mut cursor = self
                    .cursors
                    .remove(&f.cursor)
                    .ok_or_else(|| SqlError::unknown_cursor(&f.cursor))?;
                let res = self.fetch(&mut cursor, &f, token).await;
                let columns = cursor.columns.clone();
                self.cursors.insert(f.cursor.clone(), cursor);
                let rows = res?;
                self.send_rows(&columns, rows, formats, simple, "FETCH")
                    .await
            }
            Stmt::Close { name } => {
                match name {
                    None => self.cursors.clear(),
                    Some(n) => {
                        if self.cursors.remove(&n).is_none() {
                            return Err(SqlError::unknown_cursor(&n).into());
                        }
                    }
                }
                self.complete("CLOSE CURSOR").await
            }
            Stmt::Subscribe(s) => {
                let mut sub = self.subscribe(s.clone()).await?;
                if simple {
                    self.socket
                        .feed(PgWireBackendMessage::RowDescription(row_description(
                            &sub.columns,
                            formats,
                        )))
                        .await?;
                }
                if !self.shared.legacy {
                    let mut notice = ErrorInfo::new(
                        "NOTICE".to_owned(),
                        "01000".to_owned(),
                        "streaming SUBSCRIBE rows directly requires a client that does not buffer output"
                            .to_owned(),
                    );
                    if self
                        .vars
                        .get("application_name")
                        .is_some_and(|a| a == "psql")
                    {
                        notice.hint = Some(
                            "Wrap your SUBSCRIBE statement in `COPY (SUBSCRIBE ...) TO STDOUT`."
                                .to_owned(),
                        );
                    }
                    self.socket
                        .feed(PgWireBackendMessage::NoticeResponse(notice.into()))
                        .await?;
                }
                self.socket.flush().await?;
                let n = self
                    .stream(&mut sub, token, |row, columns| {
                        data_row(row, columns, formats).map(PgWireBackendMessage::DataRow)
                    })
                    .await?;
                self.complete(&format!("SELECT {n}")).await
            }
            Stmt::CopySubscribe(s) => {
                let mut sub = self.subscribe(s).await?;
                let n = sub.columns.len();
                self.socket.send(copy_out_response(n)).await?;
                let count = self
                    .stream(&mut sub, token, |row, columns| {
                        Ok(PgWireBackendMessage::CopyData(CopyData::new(copy_line(
                            row, columns,
                        ))))
                    })
                    .await?;
                self.socket
                    .feed(PgWireBackendMessage::CopyDone(CopyDone::new()))
                    .await?;
                self.complete(&format!("COPY {count}")).await
            }
            Stmt::CopySelect(sql) => {
                let res = store
                    .call(|reply| Command::Query {
                        sql,
                        params: Vec::new(),
                        reply,
                    })
                    .await?;
                self.socket
                    .feed(copy_out_response(res.columns.len()))
                    .await?;
                let count = res.rows.len();
                for row in &res.rows {
                    self.socket
                        .feed(PgWireBackendMessage::CopyData(CopyData::new(copy_line(
                            row,
                            &res.columns,
                        ))))
                        .await?;
                }
                self.socket
                    .feed(PgWireBackendMessage::CopyDone(CopyDone::new()))
                    .await?;
                self.complete(&format!("COPY {count}")).await
            }
        }
    }

    /// Sends a subscription's rows as they come, each encoded by `encode` and
    /// flushed per batch, until it completes; returns how many were sent.
    async fn stream(
        &mut self,
        sub: &mut Subscription,
        token: &CancellationToken,
        encode: impl Fn(&Row, &[Column]) -> Result<PgWireBackendMessage, SqlError>,
    ) -> Result<usize, ExecError> {
        let mut count = 0usize;
        loop {
            match self.wait_event(&mut sub.rx, token, None).await? {
                Some(SubEvent::Rows(rows)) => {
                    for row in rows {
                        self.socket.feed(encode(&row, &sub.columns)?).await?;
                        count += 1;
                    }
                    self.socket.flush().await?;
                }
                Some(SubEvent::Done) => return Ok(count),
                Some(SubEvent::Error(e)) => return Err(e.into()),
                None => {}
            }
        }
    }

    async fn subscribe(&mut self, stmt: SubscribeStmt) -> Result<Subscription, ExecError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let session = self.id;
        let store = self.shared.store.clone();
        let start = store
            .call(|reply| Command::Subscribe {
                stmt,
                session,
                sink: tx,
                reply,
            })
            .await?;
        Ok(Subscription {
            columns: start.columns,
            rx,
            _guard: SubGuard {
                id: start.id,
                store,
            },
        })
    }

    /// Waits for the next subscription event while watching the socket, the
    /// cancel token and shutdown. `Ok(None)` when `deadline` passes first.
    async fn wait_event(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<SubEvent>,
        token: &CancellationToken,
        deadline: Option<Instant>,
    ) -> Result<Option<SubEvent>, ExecError> {
        let shutdown = self.shared.shutdown.clone();
        loop {
            let socket = &mut self.socket;
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Err(SessionError::Shutdown.into()),
                _ = token.cancelled() => return Err(SqlError::canceled().into()),
                ev = rx.recv() => {
                    return Ok(Some(ev.unwrap_or_else(|| {
                        SubEvent::Error(SqlError::new("57P01", "the subscription was terminated"))
                    })));
                }
                _ = sleep => return Ok(None),
                msg = socket.next() => match msg {
                    Some(Ok(PgWireFrontendMessage::Terminate(_))) | None | Some(Err(_)) => {
                        return Err(SessionError::Disconnected.into());
                    }
                    Some(Ok(m)) => self.pending.push_back(m),
                },
            }
        }
    }

    /// FETCH with Materialize's timing rules (materialize-protocol.md §3.2).
    async fn fetch(
        &mut self,
        cursor: &mut Cursor,
        f: &FetchStmt,
        token: &CancellationToken,
    ) -> Result<Vec<Row>, ExecError> {
        let want = f.count.map(|c| c as usize);
        let CursorBody::Sub {
            sub,
            buffer,
            ended,
            error,
        } = &mut cursor.body
        else {
            let CursorBody::Rows(rows) = &mut cursor.body else {
                return Ok(Vec::new());
            };
            let n = want.unwrap_or(rows.len()).min(rows.len());
            return Ok(rows.drain(..n).collect());
        };
        if let Some(e) = error {
            return Err(e.clone().into());
        }
        if want == Some(0) {
            return Ok(Vec::new());
        }
        fn apply(
            ev: SubEvent,
            buffer: &mut VecDeque<Row>,
            ended: &mut bool,
            error: &mut Option<SqlError>,
        ) {
            match ev {
                SubEvent::Rows(rows) => buffer.extend(rows),
                SubEvent::Done => *ended = true,
                SubEvent::Error(e) => *error = Some(e),
            }
        }
        while let Ok(ev) = sub.rx.try_recv() {
            apply(ev, buffer, ended, error);
        }
        match f.timeout {
            None => {
                while buffer.is_empty() && !*ended && error.is_none() {
                    if let Some(ev) = self.wait_event(&mut sub.rx, token, None).await? {
                        apply(ev, buffer, ended, error);
                    }
                    while let Ok(ev) = sub.rx.try_recv() {
                        apply(ev, buffer, ended, error);
                    }
                }
            }
            Some(t) => {
                let deadline = Instant::now() + t;
                while !*ended && error.is_none() && want.is_none_or(|w| buffer.len() < w) {
                    match self.wait_event(&mut sub.rx, token, Some(deadline)).await? {
                        Some(ev) => apply(ev, buffer, ended, error),
                        None => break,
                    }
                }
            }
        }
        if let Some(e) = error {
            return Err(e.clone().into());
        }
        let n = want.unwrap_or(buffer.len()).min(buffer.len());
        Ok(buffer.drain(..n).collect())
    }

    fn parse_one(&self, text: &str) -> Result<Option<Stmt>, SqlError> {
        let stmts = sql::split_statements(text)?;
        match stmts.as_slice() {
            [] => Ok(None),
            [one] => sql::parse(one, self.shared.legacy).map(Some),
            _ => Err(SqlError::syntax(
                "cannot insert multiple commands into a prepared statement",
            )),
        }
    }

    async fn on_parse(
        &mut self,
        p: pgwire::messages::extendedquery::Parse,
    ) -> Result<(), ExecError> {
        let stmt = self.parse_one(&p.query)?;
        let n = param_count(&p.query).max(p.type_oids.len());
        let mut param_types = p.type_oids.clone();
        param_types.resize(n, 0);
        for t in &mut param_types {
            if *t == 0 {
                *t = PgType::Text.oid();
            }
        }
        self.statements
            .insert(p.name.unwrap_or_default(), Prepared { stmt, param_types });
        self.socket
            .feed(PgWireBackendMessage::ParseComplete(ParseComplete::new()))
            .await?;
        Ok(())
    }

    async fn on_bind(&mut self, b: pgwire::messages::extendedquery::Bind) -> Result<(), ExecError> {
        let name = b.statement_name.unwrap_or_default();
        let prepared = self
            .statements
            .get(&name)
            .ok_or_else(|| SqlError::unknown_statement(&name))?;
        let params = b
            .parameters
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let binary = format_of(&b.parameter_format_codes, i) == 1;
                let oid = prepared.param_types.get(i).copied().unwrap_or(25);
                decode_param(p.as_ref(), binary, oid)
            })
            .collect();
        let portal = Portal {
            stmt: prepared.stmt.clone(),
            params,
            formats: b.result_column_format_codes.clone(),
            remaining: None,
            ran: false,
        };
        self.portals
            .insert(b.portal_name.unwrap_or_default(), portal);
        self.socket
            .feed(PgWireBackendMessage::BindComplete(BindComplete::new()))
            .await?;
        Ok(())
    }

    /// Result columns of a statement without running it.
    async fn describe_stmt(&mut self, stmt: &Stmt) -> Result<Option<Vec<Column>>, SqlError> {
        let store = self.shared.store.clone();
        Ok(match stmt {
            Stmt::Select { sql } => {
                let sql = sql.clone();
                Some(store.call(|reply| Command::Describe { sql, reply }).await?)
            }
            Stmt::Show { name } => Some(show_columns(name)),
            Stmt::Subscribe(s) => {
                let stmt = s.clone();
                Some(
                    store
                        .call(|reply| Command::DescribeSubscribe { stmt, reply })
                        .await?,
                )
            }
            Stmt::Fetch(f) => Some(
                self.cursors
                    .get(&f.cursor)
                    .map(|c| c.columns.clone())
                    .ok_or_else(|| SqlError::unknown_cursor(&f.cursor))?,
            ),
            _ => None,
        })
    }

    async fn on_describe(
        &mut self,
        d: pgwire::messages::extendedquery::Describe,
    ) -> Result<(), ExecError> {
        let name = d.name.unwrap_or_default();
        let (stmt, formats, params) = if d.target_type == b'S' {
            let p = self
                .statements
                .get(&name)
                .ok_or_else(|| SqlError::unknown_statement(&name))?;
            (p.stmt.clone(), Vec::new(), Some(p.param_types.clone()))
        } else {
            let p = self
                .portals
                .get(&name)
                .ok_or_else(|| SqlError::unknown_portal(&name))?;
            (p.stmt.clone(), p.formats.clone(), None)
        };
        if let Some(types) = params {
            self.socket
                .feed(PgWireBackendMessage::ParameterDescription(
                    ParameterDescription::new(types),
                ))
                .await?;
        }
        let cols = match &stmt {
            Some(s) => self.describe_stmt(s).await?,
            None => None,
        };
        match cols {
            Some(cols) => {
                self.socket
                    .feed(PgWireBackendMessage::RowDescription(row_description(
                        &cols, &formats,
                    )))
                    .await?
            }
            None => {
                self.socket
                    .feed(PgWireBackendMessage::NoData(NoData::new()))
                    .await?
            }
        }
        Ok(())
    }

    async fn on_execute(
        &mut self,
        e: pgwire::messages::extendedquery::Execute,
    ) -> Result<(), ExecError> {
        let name = e.name.unwrap_or_default();
        let max_rows = usize::try_from(e.max_rows).unwrap_or(0);
        let token = self.start_query();
        let Some(portal) = self.portals.get_mut(&name) else {
            return Err(SqlError::unknown_portal(&name).into());
        };
        let Some(stmt) = portal.stmt.clone() else {
            self.socket
                .feed(PgWireBackendMessage::EmptyQueryResponse(
                    EmptyQueryResponse::new(),
                ))
                .await?;
            return Ok(());
        };
        if portal.ran && matches!(stmt, Stmt::Declare { .. }) {
            return Err(SqlError::new("55000", format!("portal \"{name}\" cannot be run")).into());
        }
        portal.ran = true;
        let (params, formats) = (portal.params.clone(), portal.formats.clone());
        if let Some((cols, mut rows)) = portal.remaining.take() {
            return self
                .send_partial(&name, cols, &mut rows, &formats, max_rows)
                .await;
        }
        if max_rows > 0 {
            if let Stmt::Select { sql } = &stmt {
                let sql = sql.clone();
                let res = self
                    .shared
                    .store
                    .call(|reply| Command::Query { sql, params, reply })
                    .await?;
                let mut rows: VecDeque<Row> = res.rows.into();
                return self
                    .send_partial(&name, res.columns, &mut rows, &formats, max_rows)
                    .await;
            }
        }
        self.execute(stmt, &params, &formats, false, &token).await
    }

    async fn send_partial(
        &mut self,
        portal: &str,
        cols: Vec<Column>,
        rows: &mut VecDeque<Row>,
        formats: &[i16],
        max_rows: usize,
    ) -> Result<(), ExecError> {
        let n = if max_rows == 0 {
            rows.len()
        } else {
            max_rows.min(rows.len())
        };
        for row in rows.drain(..n) {
            let dr = data_row(&row, &cols, formats)?;
            self.socket.feed(PgWireBackendMessage::DataRow(dr)).await?;
        }
        if rows.is_empty() {
            self.complete(&format!("SELECT {n}")).await
        } else {
            if let Some(p) = self.portals.get_mut(portal) {
                p.remaining = Some((cols, std::mem::take(rows)));
            }
            self.socket
                .feed(PgWireBackendMessage::PortalSuspended(PortalSuspended::new()))
                .await?;
            Ok(())
        }
    }
}

fn show_columns(name: &str) -> Vec<Column> {
    if name == "all" {
        vec![
            Column::new("name", PgType::Text),
            Column::new("setting", PgType::Text),
        ]
    } else {
        vec![Column::new(name, PgType::Text)]
    }
}
