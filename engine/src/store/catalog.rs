//! The catalog: tables and views by name, with their columns, the relations a
//! view reads and its translated body. Creating a table installs the triggers
//! that copy its changed rows into its log table; dropping a relation ends
//! every subscription that reads it.

use std::collections::BTreeSet;

use super::history::LOG_PREFIX;
use super::incremental::DELTA_PREFIX;
use super::sqlite::{prepare_read, table_columns};
use super::Store;
use crate::error::SqlError;
use crate::sql::{self, quote_ident, DropKind};
use crate::subscribe::SubEvent;
use crate::value::{Column, PgType};
use tokio::sync::mpsc as tmpsc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RelKind {
    Table,
    View,
}

pub(super) struct RelInfo {
    pub(super) kind: RelKind,
    pub(super) columns: Vec<Column>,
    /// Relations named in a view's definition.
    pub(super) deps: BTreeSet<String>,
    /// Translated view body, re-created as a temp view for AS OF replay.
    pub(super) body: Option<String>,
    /// Creation order, for re-creating views in dependency order.
    pub(super) seq: u64,
}

fn kind_name(k: RelKind) -> &'static str {
    match k {
        RelKind::Table => "table",
        RelKind::View => "view",
    }
}

fn already_exists(name: &str) -> SqlError {
    SqlError::new("42P07", format!("catalog item '{name}' already exists"))
}

/// The columns' names, quoted and comma-separated, for a column list.
pub(super) fn column_list(columns: &[Column]) -> String {
    let names: Vec<String> = columns.iter().map(|c| quote_ident(&c.name)).collect();
    names.join(", ")
}

impl Store {
    /// Relations named in `sql`, closed over view definitions.
    pub(super) fn dependencies(&self, text: &str) -> BTreeSet<String> {
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

    pub(super) fn describe(&self, text: &str) -> Result<Vec<Column>, SqlError> {
        self.describe_translated(text, &sql::translate(text)?)
    }

    /// Result columns of `text`, whose translation the caller already has.
    pub(super) fn describe_translated(
        &self,
        text: &str,
        translated: &str,
    ) -> Result<Vec<Column>, SqlError> {
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

    pub(super) fn create_table(&mut self, name: &str, text: &str) -> Result<(), SqlError> {
        if self.catalog.contains_key(name) {
            return Err(already_exists(name));
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
                cols = column_list(&cols),
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

    pub(super) fn create_view(
        &mut self,
        name: &str,
        body: &str,
        replace: bool,
    ) -> Result<(), SqlError> {
        if let Some(existing) = self.catalog.get(name) {
            if !replace || existing.kind != RelKind::View {
                return Err(already_exists(name));
            }
            self.drop(DropKind::View, &[name.to_owned()], false, false)?;
        }
        let translated = sql::translate(body)?;
        let columns = self.describe_translated(body, &translated)?;
        self.conn.execute_batch(&format!(
            "CREATE VIEW {} ({}) AS {translated}",
            quote_ident(name),
            column_list(&columns)
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

    pub(super) fn drop(
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
}
