//! SUBSCRIBE and cursors: a plain SUBSCRIBE streams rows until it completes,
//! `DECLARE ... CURSOR FOR SUBSCRIBE|SELECT` keeps a subscription or a result
//! in the session, FETCH takes rows from it with Materialize's timing rules,
//! and CLOSE drops it. A subscription is unregistered from the store when its
//! cursor or stream goes away. While a stream or a FETCH waits, the socket,
//! the cancel token and shutdown are watched.

use std::collections::VecDeque;

use futures::{SinkExt, StreamExt};
use pgwire::error::ErrorInfo;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::txn::Txn;
use super::wire::{data_row, row_description};
use super::{ExecError, Session, SessionError};
use crate::error::SqlError;
use crate::sql::{CursorQuery, FetchStmt, SubscribeStmt};
use crate::store::{Command, StoreHandle};
use crate::subscribe::SubEvent;
use crate::value::{Column, Datum, Row};

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

pub(super) struct Subscription {
    pub(super) columns: Vec<Column>,
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

pub(super) struct Cursor {
    pub(super) columns: Vec<Column>,
    body: CursorBody,
}

impl Session {
    pub(super) async fn stream_subscribe(
        &mut self,
        s: SubscribeStmt,
        formats: &[i16],
        simple: bool,
        token: &CancellationToken,
    ) -> Result<(), ExecError> {
        let mut sub = self.subscribe(s).await?;
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
                    "Wrap your SUBSCRIBE statement in `COPY (SUBSCRIBE ...) TO STDOUT`.".to_owned(),
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

    pub(super) async fn declare(
        &mut self,
        name: String,
        query: CursorQuery,
        params: &[Datum],
    ) -> Result<(), ExecError> {
        if self.cursors.contains_key(&name) {
            return Err(SqlError::new("42P03", format!("cursor \"{name}\" already exists")).into());
        }
        let cursor = match query {
            CursorQuery::Select(sql) => {
                let res = self.query(sql, params.to_vec()).await?;
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

    pub(super) async fn fetch_cursor(
        &mut self,
        f: FetchStmt,
        formats: &[i16],
        simple: bool,
        token: &CancellationToken,
    ) -> Result<(), ExecError> {
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

    pub(super) async fn close(&mut self, name: Option<String>) -> Result<(), ExecError> {
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

    /// Sends a subscription's rows as they come, each encoded by `encode` and
    /// flushed per batch, until it completes; returns how many were sent.
    pub(super) async fn stream(
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

    pub(super) async fn subscribe(
        &mut self,
        stmt: SubscribeStmt,
    ) -> Result<Subscription, ExecError> {
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

    /// FETCH with Materialize's timing rules (a FETCH without a timeout returns as soon as rows are ready; with one, it waits out the timeout).
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
}
