//! The logical clock and the change history. Every committed write that
//! changes rows is stamped with a strictly increasing timestamp, its changes
//! are read from the tables' log tables, appended to the history and
//! published. Each tick announces progress and trims the history to the
//! retention window. `AS OF` replays the history, and a subscription AS OF a
//! time the clock has not reached waits in `pending` until it gets there.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc as tmpsc;

use super::catalog::{column_list, RelInfo, RelKind};
use super::sqlite::{multiset, read_only, rows_of};
use super::subscriptions::Plan;
use super::Store;
use crate::error::SqlError;
use crate::sql::{self, quote_ident};
use crate::subscribe::{consolidate, diff_maps, SubEvent};
use crate::value::{Datum, Row};

/// Current wall-clock time in epoch milliseconds.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub(super) fn now_u64() -> u64 {
    u64::try_from(now_ms()).unwrap_or(0)
}

/// One write's consolidated changes, by table.
pub(super) type Changes = BTreeMap<String, Vec<(Row, i64)>>;

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

/// Each table's log table, which its triggers fill with its changed rows after
/// a `_tg_diff` column (+1 inserted, -1 deleted).
pub(super) const LOG_PREFIX: &str = "_tg_log_";

/// The logical clock: strictly increasing write timestamps in epoch ms.
pub(super) struct Clock {
    pub(super) last_write: u64,
    /// No write may be stamped below this (a frontier already announced).
    pub(super) floor: u64,
}

impl Clock {
    fn next_write(&mut self) -> u64 {
        let ts = now_u64().max(self.last_write + 1).max(self.floor);
        self.last_write = ts;
        self.floor = ts + 1;
        ts
    }

    pub(super) fn read_ts(&self) -> u64 {
        now_u64().max(self.last_write)
    }
}

/// A subscription whose AS OF is ahead of the clock. As in Materialize it
/// waits: nothing but its PROGRESS row at AS OF goes out until the clock
/// reaches AS OF (by a write stamped at or after it, or by wall time), and then
/// it starts as if subscribed at that moment, so writes up to AS OF are in its
/// snapshot and later ones follow at their own timestamps.
pub(super) struct Pending {
    pub(super) plan: Plan,
    pub(super) as_of: u64,
    pub(super) snapshot: bool,
    pub(super) sink: tmpsc::UnboundedSender<SubEvent>,
}

impl Store {
    pub(super) fn take_dirty(&self) -> BTreeSet<String> {
        match self.dirty.lock() {
            Ok(mut d) => std::mem::take(&mut *d),
            Err(_) => BTreeSet::new(),
        }
    }

    pub(super) fn write(
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

    pub(super) fn tick(&mut self) {
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

    pub(super) fn since(&self) -> u64 {
        self.start_ts
            .max(now_u64().saturating_sub(self.retain_ms))
            .min(self.clock.last_write)
    }

    /// How long until the earliest pending AS OF, by wall time.
    pub(super) fn until_due(&self) -> Duration {
        let now = now_u64();
        self.pending
            .values()
            .map(|p| Duration::from_millis(p.as_of.saturating_sub(now)))
            .min()
            .unwrap_or(Duration::MAX)
    }

    /// Starts every pending subscription whose AS OF the clock has reached.
    pub(super) fn start_due(&mut self) {
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

    /// Reconstructs the subscription's result at `as_of` and every change after it
    /// from the table history. Returns (state at AS OF, later batches, current state).
    pub(super) fn replay(&mut self, plan: &Plan, as_of: u64) -> Result<Replay, SqlError> {
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
            self.conn.execute_batch(&format!(
                "CREATE TEMP VIEW {} ({}) AS {}",
                quote_ident(name),
                column_list(&info.columns),
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

/// `INSERT INTO temp.<table> VALUES (?1, .., ?width)`.
pub(super) fn insert_temp_sql(table: &str, width: usize) -> String {
    let marks: Vec<String> = (1..=width).map(|i| format!("?{i}")).collect();
    format!(
        "INSERT INTO temp.{} VALUES ({})",
        quote_ident(table),
        marks.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::DropKind;
    use crate::store::tests::{store, subscribe, write};
    use std::sync::atomic::Ordering;

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
}
