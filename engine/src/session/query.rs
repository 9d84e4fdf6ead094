//! Queries and COPY: SELECT (and VALUES, WITH, TABLE) run on the store and
//! come back whole; `COPY (SELECT ...) TO STDOUT` sends them as text COPY
//! data, and `COPY (SUBSCRIBE ...) TO STDOUT` streams a subscription that way
//! until it completes.

use bytes::Bytes;
use futures::SinkExt;
use pgwire::messages::copy::{CopyData, CopyDone, CopyOutResponse};
use pgwire::messages::PgWireBackendMessage;
use tokio_util::sync::CancellationToken;

use super::{ExecError, Session};
use crate::error::SqlError;
use crate::sql::SubscribeStmt;
use crate::store::{Command, QueryResult};
use crate::value::{copy_escape, Column, Datum, PgType, Row};

impl Session {
    /// Runs a read query on the store.
    pub(super) async fn query(
        &self,
        sql: String,
        params: Vec<Datum>,
    ) -> Result<QueryResult, SqlError> {
        self.shared
            .store
            .call(|reply| Command::Query { sql, params, reply })
            .await
    }

    pub(super) async fn select(
        &mut self,
        sql: String,
        params: &[Datum],
        formats: &[i16],
        simple: bool,
    ) -> Result<(), ExecError> {
        let res = self.query(sql, params.to_vec()).await?;
        self.send_rows(&res.columns, res.rows, formats, simple, "SELECT")
            .await
    }

    pub(super) async fn copy_select(&mut self, sql: String) -> Result<(), ExecError> {
        let res = self.query(sql, Vec::new()).await?;
        self.socket
            .feed(copy_out_response(res.columns.len()))
            .await?;
        let count = res.rows.len();
        for row in &res.rows {
            self.socket.feed(copy_data(row, &res.columns)).await?;
        }
        self.socket
            .feed(PgWireBackendMessage::CopyDone(CopyDone::new()))
            .await?;
        self.complete(&format!("COPY {count}")).await
    }

    pub(super) async fn copy_subscribe(
        &mut self,
        s: SubscribeStmt,
        token: &CancellationToken,
    ) -> Result<(), ExecError> {
        let mut sub = self.subscribe(s).await?;
        let n = sub.columns.len();
        self.socket.send(copy_out_response(n)).await?;
        let count = self
            .stream(&mut sub, token, |row, columns| Ok(copy_data(row, columns)))
            .await?;
        self.socket
            .feed(PgWireBackendMessage::CopyDone(CopyDone::new()))
            .await?;
        self.complete(&format!("COPY {count}")).await
    }
}

/// One row as text COPY data: tab-separated, `\N` for NULL, values escaped.
fn copy_data(row: &Row, columns: &[Column]) -> PgWireBackendMessage {
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
    PgWireBackendMessage::CopyData(CopyData::new(Bytes::from(s)))
}

/// CopyOutResponse for `n` text columns.
fn copy_out_response(n: usize) -> PgWireBackendMessage {
    PgWireBackendMessage::CopyOutResponse(CopyOutResponse::new(0, n as i16, vec![0; n]))
}
