//! The extended query protocol: Parse, Bind, Describe and Execute (with
//! PortalSuspended for a row limit), and the prepared statements and portals
//! they name. Describe reports result columns without running the query.

use std::collections::VecDeque;

use bytes::Bytes;
use futures::SinkExt;
use pgwire::messages::data::{NoData, ParameterDescription};
use pgwire::messages::extendedquery::{BindComplete, ParseComplete, PortalSuspended};
use pgwire::messages::response::EmptyQueryResponse;
use pgwire::messages::PgWireBackendMessage;

use super::txn::show_columns;
use super::wire::{data_row, format_of, row_description};
use super::{ExecError, Session};
use crate::error::SqlError;
use crate::sql::{self, Stmt};
use crate::store::Command;
use crate::value::{Column, Datum, PgType, Row};

pub(super) struct Prepared {
    stmt: Option<Stmt>,
    param_types: Vec<u32>,
}

pub(super) struct Portal {
    stmt: Option<Stmt>,
    params: Vec<Datum>,
    formats: Vec<i16>,
    /// Rows left after a PortalSuspended.
    remaining: Option<(Vec<Column>, VecDeque<Row>)>,
    ran: bool,
}

impl Session {
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

    pub(super) async fn on_parse(
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

    pub(super) async fn on_bind(
        &mut self,
        b: pgwire::messages::extendedquery::Bind,
    ) -> Result<(), ExecError> {
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

    pub(super) async fn on_describe(
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

    pub(super) async fn on_execute(
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
                let res = self.query(sql, params).await?;
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
