//! Subscriptions: planning one (its relation, dependencies and output layout),
//! starting it (constant collections complete at once, a future AS OF waits
//! in `pending`, the rest send their snapshot and replayed changes and go
//! live), publishing each write's diff to every subscription that reads a
//! changed table, and ending them. How a live subscription computes its diff
//! is its [`Source`].

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;

use rusqlite::Connection;
use tokio::sync::mpsc as tmpsc;

use super::catalog::RelKind;
use super::history::{now_ms, Changes, Pending};
use super::incremental::{eval_delta, Groups};
use super::sqlite::prepare_read;
use super::{Store, SubStart};
use crate::error::SqlError;
use crate::sql::{self, quote_ident, Relation, SubscribeStmt};
use crate::subscribe::{Output, ResultSet, SubEvent};
use crate::value::{format_timestamptz_ms, Row};

/// A live subscription: how it computes its diffs, what it reads, and where
/// its rows go.
pub(super) struct Sub {
    pub(super) source: Source,
    base_tables: BTreeSet<String>,
    pub(super) deps: BTreeSet<String>,
    pub(super) out: Output,
    pub(super) sink: tmpsc::UnboundedSender<SubEvent>,
    pub(super) last_progress: u64,
}

/// How a live subscription computes the diff of each write.
pub(super) enum Source {
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

/// A SUBSCRIBE resolved against the catalog, before it runs.
pub(super) struct Plan {
    pub(super) translated: String,
    pub(super) deps: BTreeSet<String>,
    pub(super) base_tables: BTreeSet<String>,
    pub(super) source_table: Option<String>,
    pub(super) out: Output,
}

fn bounds_error(as_of: u64, up_to: u64) -> SqlError {
    SqlError::new(
        "22000",
        format!(
            "subscription lower bound (`AS OF`) is greater than its upper bound (`UP TO`): {as_of} > {up_to}"
        ),
    )
}

impl Store {
    /// Resolves a SUBSCRIBE's relation and output layout without running it.
    pub(super) fn plan(&self, stmt: &SubscribeStmt) -> Result<Plan, SqlError> {
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

    pub(super) fn subscribe(
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
    pub(super) fn start(
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

    /// Pushes the diff at `ts` to every subscription that reads a changed table.
    pub(super) fn publish(&mut self, ts: u64, changes: &Changes) {
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

    pub(super) fn remove_sub(&mut self, id: u64) {
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

    pub(super) fn unlist_sub(&self, id: u64) {
        let _ = self.conn.execute(
            "DELETE FROM temp.mz_subscriptions WHERE id = ?1",
            [format!("s{id}")],
        );
        self.update_sub_count();
    }

    pub(super) fn update_sub_count(&self) {
        self.counters
            .subscriptions
            .store(self.subs.len() + self.pending.len(), Ordering::Relaxed);
    }
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
