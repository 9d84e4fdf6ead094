//! DDL and writes: CREATE TABLE/VIEW, DROP, INSERT/UPDATE/DELETE, and the
//! statements accepted as no-ops (CREATE INDEX, DISCARD). Each is one store
//! command; a write inside BEGIN is only checked (a dry run of the whole
//! transaction so far) and applied at COMMIT.

use super::txn::Txn;
use super::{ExecError, Session};
use crate::sql::{DropKind, Stmt};
use crate::store::Command;
use crate::value::Datum;

impl Session {
    pub(super) async fn write(
        &mut self,
        sql: String,
        tag: &'static str,
        params: &[Datum],
    ) -> Result<(), ExecError> {
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
        let counts = self
            .shared
            .store
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

    pub(super) async fn create_table(
        &mut self,
        name: String,
        sql: String,
        tag: &'static str,
    ) -> Result<(), ExecError> {
        self.shared
            .store
            .call(|reply| Command::CreateTable { name, sql, reply })
            .await?;
        self.complete(tag).await
    }

    pub(super) async fn create_view(
        &mut self,
        name: String,
        body: String,
        replace: bool,
        tag: &'static str,
    ) -> Result<(), ExecError> {
        self.shared
            .store
            .call(|reply| Command::CreateView {
                name,
                body,
                replace,
                reply,
            })
            .await?;
        self.complete(tag).await
    }

    pub(super) async fn drop_relations(
        &mut self,
        kind: DropKind,
        names: Vec<String>,
        if_exists: bool,
        cascade: bool,
        tag: &'static str,
    ) -> Result<(), ExecError> {
        self.shared
            .store
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
}

/// The CommandComplete tag of a DDL statement.
pub(super) fn tag_for(stmt: &Stmt) -> &'static str {
    match stmt {
        Stmt::CreateTable { .. } => "CREATE TABLE",
        Stmt::CreateView {
            materialized: true, ..
        } => "CREATE MATERIALIZED VIEW",
        Stmt::CreateView { .. } => "CREATE VIEW",
        Stmt::CreateIndex => "CREATE INDEX",
        Stmt::Drop { kind, .. } => match kind {
            DropKind::Table => "DROP TABLE",
            DropKind::View => "DROP VIEW",
            DropKind::MaterializedView => "DROP MATERIALIZED VIEW",
            DropKind::Index => "DROP INDEX",
        },
        Stmt::Discard => "DISCARD ALL",
        _ => "OK",
    }
}
