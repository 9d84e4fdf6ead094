//! Transactions and session variables: BEGIN, COMMIT, ROLLBACK, SET/RESET
//! and SHOW. Writes inside BEGIN are collected here and applied at COMMIT with
//! one timestamp; after an error the transaction fails until it ends.

use std::collections::BTreeMap;

use super::{ExecError, Session};
use crate::error::SqlError;
use crate::store::{self, Command};
use crate::value::{Column, Datum, PgType, Row};

/// Where the session is in a transaction; `Open` holds the writes to apply at
/// COMMIT.
pub(super) enum Txn {
    Idle,
    Open { writes: Vec<(String, Vec<Datum>)> },
    Failed,
}

impl Session {
    pub(super) async fn begin(&mut self) -> Result<(), ExecError> {
        if matches!(self.txn, Txn::Idle) {
            self.txn = Txn::Open { writes: Vec::new() };
            // Cursors of an implicit transaction now belong to this one.
            self.implicit_cursors.clear();
        }
        self.complete("BEGIN").await
    }

    pub(super) async fn commit(&mut self) -> Result<(), ExecError> {
        let txn = std::mem::replace(&mut self.txn, Txn::Idle);
        self.cursors.clear();
        self.implicit_cursors.clear();
        match txn {
            Txn::Open { writes } if !writes.is_empty() => {
                self.shared
                    .store
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

    pub(super) async fn rollback(&mut self) -> Result<(), ExecError> {
        self.txn = Txn::Idle;
        self.cursors.clear();
        self.implicit_cursors.clear();
        self.complete("ROLLBACK").await
    }

    pub(super) async fn set(
        &mut self,
        name: String,
        value: Option<String>,
    ) -> Result<(), ExecError> {
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
            self.shared.store.send(Command::SessionUpdated {
                id: self.id,
                application_name: value.clone(),
            });
        }
        self.vars.insert(name, value);
        self.complete("SET").await
    }

    pub(super) async fn show(
        &mut self,
        name: String,
        formats: &[i16],
        simple: bool,
    ) -> Result<(), ExecError> {
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
}

pub(super) fn default_vars(legacy: bool) -> BTreeMap<String, String> {
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

pub(super) fn show_columns(name: &str) -> Vec<Column> {
    if name == "all" {
        vec![
            Column::new("name", PgType::Text),
            Column::new("setting", PgType::Text),
        ]
    } else {
        vec![Column::new(name, PgType::Text)]
    }
}
