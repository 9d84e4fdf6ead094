//! One client connection: startup, the simple and extended query protocols,
//! transactions, cursors, streaming SUBSCRIBE and COPY out.
//!
//! pgwire provides the message codec and TLS refusal; the message loop is ours,
//! because a streaming SUBSCRIBE must keep watching the socket (for a disconnect),
//! the cancel token and the shutdown token while it waits for rows. Each session
//! is one task spawned by the listener; it ends when the client leaves, on a
//! socket error, or when the engine's shutdown token is cancelled. Dropping a
//! session drops its cursors, whose guards unregister their subscriptions.
//!
//! This file has startup and the message loop, which hands each statement to
//! [`Session::execute`]; the statements are carried out by family:
//! - `txn`: BEGIN, COMMIT, ROLLBACK, SET/RESET and SHOW.
//! - `query`: SELECT and COPY out.
//! - `cursors`: SUBSCRIBE streams, DECLARE, FETCH and CLOSE.
//! - `ddl`: CREATE, DROP and writes.
//!
//! `extended` has the extended query protocol (Parse, Bind, Describe,
//! Execute), and `wire` the encoding of results and errors.

mod cursors;
mod ddl;
mod extended;
mod query;
mod txn;
mod wire;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use pgwire::api::{ClientInfo, PgWireConnectionState};
use pgwire::messages::extendedquery::CloseComplete;
use pgwire::messages::response::{
    CommandComplete, EmptyQueryResponse, ReadyForQuery, TransactionStatus,
};
use pgwire::messages::startup::{Authentication, BackendKeyData, ParameterStatus, SecretKey};
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage, ProtocolVersion};
use pgwire::tokio::server::{negotiate_tls, MaybeTls, PgWireMessageServerCodec};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use crate::error::SqlError;
use crate::sql::{self, Stmt};
use crate::store::{Command, Counters, StoreHandle};
use crate::value::{Column, Datum, Row};
use cursors::Cursor;
use ddl::tag_for;
use extended::{Portal, Prepared};
use txn::{default_vars, Txn};
use wire::{data_row, error_info, row_description};

type Socket = Framed<MaybeTls, PgWireMessageServerCodec<()>>;

/// A session's cancel secret and the cancel token of its running statement.
type CancelEntry = (Bytes, Arc<Mutex<CancellationToken>>);

/// State shared by the listener and every session.
pub(crate) struct Shared {
    store: StoreHandle,
    legacy: bool,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
    next_session: AtomicU64,
    /// pid → (secret, the running query's cancel token). A std Mutex: lookups are
    /// short and never span an `.await`.
    cancels: Mutex<HashMap<i32, CancelEntry>>,
}

impl Shared {
    pub(crate) fn new(
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
enum SessionError {
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
pub(crate) async fn serve(tcp: TcpStream, shared: Arc<Shared>) {
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
        let tag = tag_for(&stmt);
        match stmt {
            // Transactions and session variables (`txn`).
            Stmt::Begin => self.begin().await,
            Stmt::Commit => self.commit().await,
            Stmt::Rollback => self.rollback().await,
            Stmt::Set { name, value } => self.set(name, value).await,
            Stmt::Show { name } => self.show(name, formats, simple).await,
            // Queries and COPY (`query`).
            Stmt::Select { sql } => self.select(sql, params, formats, simple).await,
            Stmt::CopySelect(sql) => self.copy_select(sql).await,
            Stmt::CopySubscribe(s) => self.copy_subscribe(s, token).await,
            // SUBSCRIBE and cursors (`cursors`).
            Stmt::Subscribe(s) => self.stream_subscribe(s, formats, simple, token).await,
            Stmt::Declare { name, query } => self.declare(name, query, params).await,
            Stmt::Fetch(f) => self.fetch_cursor(f, formats, simple, token).await,
            Stmt::Close { name } => self.close(name).await,
            // DDL and writes (`ddl`).
            Stmt::Write { sql, tag } => self.write(sql, tag, params).await,
            Stmt::CreateTable { name, sql } => self.create_table(name, sql, tag).await,
            Stmt::CreateView {
                name,
                body,
                replace,
                ..
            } => self.create_view(name, body, replace, tag).await,
            Stmt::Drop {
                kind,
                names,
                if_exists,
                cascade,
            } => {
                self.drop_relations(kind, names, if_exists, cascade, tag)
                    .await
            }
            Stmt::CreateIndex | Stmt::Discard => self.complete(tag).await,
        }
    }
}
