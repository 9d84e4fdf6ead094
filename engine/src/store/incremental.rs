//! Incremental maintenance: a subscription whose query is a select-project-
//! filter over one table (through views that are too) runs over only a
//! write's changed rows, loaded into the table's delta table; a grouped
//! `count`/`sum` aggregate over one table recomputes only the groups those
//! rows belong to. Whether a query qualifies is decided from its translated
//! SQL by `sql`'s analysis and leans towards "no": everything else is
//! re-evaluated in full.

use std::collections::HashMap;

use rusqlite::Connection;

use super::catalog::{column_list, RelInfo, RelKind};
use super::history::insert_temp_sql;
use super::sqlite::{affinity, prepare_read, read_row, rows_of, table_columns};
use super::Store;
use crate::error::SqlError;
use crate::sql::{self, quote_ident};
use crate::subscribe::consolidate;
use crate::value::{Datum, Row};

/// Temp tables holding one write's changed rows of a table, with a `_tg_sign`
/// column, for [`Source::Delta`](super::subscriptions::Source::Delta) subscriptions.
pub(super) const DELTA_PREFIX: &str = "_tg_delta_";

/// State of a [`Source::Groups`](super::subscriptions::Source::Groups) subscription.
pub(super) struct Groups {
    pub(super) table: String,
    /// The whole query, re-run in full if a group ever sums to a non-integer.
    pub(super) full: String,
    /// The distinct group keys of the loaded delta rows.
    keys_sql: String,
    /// The query with the table shadowed by a CTE holding only the rows of the
    /// groups in `keys_sql` (matched with `IS`, so NULL keys are groups too).
    sql: String,
    key_pos: Vec<usize>,
    sum_pos: Vec<usize>,
    /// The current result: one row per group, by group key.
    pub(super) prev: HashMap<Row, Row>,
}

impl Groups {
    fn key(&self, row: &Row) -> Row {
        self.key_pos.iter().map(|&i| row[i].clone()).collect()
    }

    /// Whether a result row's sums are exact (integers or NULL). Sums that came
    /// out as reals depend on the order rows were added in.
    fn exact(&self, row: &Row) -> bool {
        self.sum_pos
            .iter()
            .all(|&i| matches!(row[i], Datum::Null | Datum::Int(_)))
    }

    /// The diff of one write whose changed rows are in the delta table, or
    /// `None` if a recomputed group's sum is not an integer (then nothing was
    /// changed and the caller re-evaluates the whole query instead).
    pub(super) fn update(
        &mut self,
        conn: &Connection,
    ) -> Result<Option<Vec<(Row, i64)>>, SqlError> {
        let keys = rows_of(conn, &self.keys_sql, &[])?;
        if keys.is_empty() {
            return Ok(Some(Vec::new()));
        }
        let mut fresh: HashMap<Row, Row> = HashMap::new();
        for row in rows_of(conn, &self.sql, &[])? {
            if !self.exact(&row) || fresh.insert(self.key(&row), row).is_some() {
                return Ok(None);
            }
        }
        // The written groups, then any result group not among them (none, since
        // key columns hold no distinct values that compare equal).
        let mut touched: Vec<Row> = keys;
        let extra: Vec<Row> = {
            let seen: std::collections::HashSet<&Row> = touched.iter().collect();
            fresh
                .keys()
                .filter(|k| !seen.contains(k))
                .cloned()
                .collect()
        };
        touched.extend(extra);
        let mut diffs = Vec::new();
        for key in touched {
            let new = fresh.remove(&key);
            let old = match &new {
                Some(n) => self.prev.insert(key, n.clone()),
                None => self.prev.remove(&key),
            };
            if old != new {
                diffs.extend(old.map(|r| (r, -1)));
                diffs.extend(new.map(|r| (r, 1)));
            }
        }
        Ok(Some(consolidate(diffs)))
    }
}

/// Runs a [`Source::Delta`](super::subscriptions::Source::Delta) query over the loaded delta rows: the retracted rows'
/// results count -1, the inserted rows' +1.
pub(super) fn eval_delta(conn: &Connection, sql: &str) -> Result<Vec<(Row, i64)>, SqlError> {
    let mut stmt = prepare_read(conn, sql)?;
    let n = stmt.column_count();
    let mut updates = Vec::new();
    for sign in [-1i64, 1] {
        let mut rows = stmt.query([sign])?;
        while let Some(r) = rows.next()? {
            updates.push((read_row(r, n)?, sign));
        }
    }
    Ok(consolidate(updates))
}

impl Store {
    /// Fills `table`'s delta table with a write's changes: each row as often as
    /// its diff says, with the diff's sign.
    pub(super) fn load_delta(&self, table: &str, diffs: &[(Row, i64)]) -> Result<(), SqlError> {
        let width = self.catalog.get(table).map_or(0, |r| r.columns.len());
        let mut st = self.conn.prepare_cached(&insert_temp_sql(
            &format!("{DELTA_PREFIX}{table}"),
            width + 1,
        ))?;
        for (row, diff) in diffs {
            let sign = Datum::Int(diff.signum());
            for _ in 0..diff.unsigned_abs() {
                st.execute(rusqlite::params_from_iter(
                    row.iter().chain(std::iter::once(&sign)),
                ))?;
            }
        }
        Ok(())
    }

    /// The incremental form of a subscription's translated query, if it is a
    /// select-project-filter over one table, directly or through views that are
    /// too: the table, and the query prefixed with CTEs that shadow the table and
    /// each of those views by name, the table's CTE reading its delta rows of
    /// one sign (`?1`). `None` means re-evaluate in full.
    pub(super) fn delta_plan(&self, translated: &str) -> Option<(String, String)> {
        let mut views: Vec<(String, &RelInfo)> = Vec::new();
        let mut rel = sql::spf_relation(translated)?;
        let table = loop {
            let info = self.catalog.get(&rel)?;
            match info.kind {
                RelKind::Table => break rel,
                RelKind::View => {
                    let next = sql::spf_relation(info.body.as_deref()?)?;
                    if views.len() >= 32 {
                        return None;
                    }
                    views.push((rel, info));
                    rel = next;
                }
            }
        };
        let info = self.catalog.get(&table)?;
        let delta = match self.ensure_delta_table(&table) {
            Ok(Some(d)) => d,
            Ok(None) => return None,
            Err(e) => {
                tracing::debug!(table = %table, error = %e, "No delta table; subscription re-evaluates in full.");
                return None;
            }
        };
        let cols = column_list(&info.columns);
        let mut ctes = vec![format!(
            "{} ({cols}) AS (SELECT {cols} FROM temp.{} WHERE \"_tg_sign\" = ?1)",
            quote_ident(&table),
            quote_ident(&delta)
        )];
        for (name, view) in views.iter().rev() {
            ctes.push(format!(
                "{} ({}) AS ({})",
                quote_ident(name),
                column_list(&view.columns),
                view.body.as_deref().unwrap_or_default()
            ));
        }
        let sql = format!("WITH {} {translated}", ctes.join(", "));
        self.same_width(translated, &sql).then_some((table, sql))
    }

    /// Whether a rewrite of `translated` prepares and keeps the result's width.
    fn same_width(&self, translated: &str, rewritten: &str) -> bool {
        let width = |sql: &str| self.conn.prepare(sql).map(|st| st.column_count()).ok();
        matches!((width(translated), width(rewritten)), (Some(a), Some(b)) if a == b)
    }

    /// The per-group form of a subscription's translated query, if it is (or is
    /// `SELECT *` from views that are) a grouped aggregate by
    /// [`sql::group_aggregate`] directly over a table, with group columns of
    /// INTEGER or TEXT affinity (where equal values are identical) and sums over
    /// INTEGER columns, and `current` (its result) has one exact row per group.
    /// Creates an index on the group columns so that recomputing a group reads
    /// only its rows.
    pub(super) fn group_plan(
        &self,
        translated: &str,
        current: &HashMap<Row, i64>,
    ) -> Option<Groups> {
        let mut body = translated.to_owned();
        for _ in 0..32 {
            let toks = sql::tokenize(&body).ok()?;
            let star = matches!(
                toks.as_slice(),
                [s, st, f, _] if s.is_word("select") && st.tok == sql::Tok::Op("*".into()) && f.is_word("from")
            );
            if !star {
                break;
            }
            let info = self.catalog.get(&toks[3].ident()?)?;
            if info.kind != RelKind::View {
                return None;
            }
            body = info.body.clone()?;
        }
        let agg = sql::group_aggregate(&body)?;
        let table = agg.relation.clone();
        if self.catalog.get(&table)?.kind != RelKind::Table {
            return None;
        }
        let delta = self.ensure_delta_table(&table).ok()??;
        let types: HashMap<String, String> = table_columns(&self.conn, &table)
            .ok()?
            .into_iter()
            .map(|(name, ty)| (name.to_lowercase(), ty))
            .collect();
        let aff = |c: &str| types.get(&c.to_lowercase()).map(|t| affinity(t));
        if !agg
            .keys
            .iter()
            .all(|k| matches!(aff(k), Some('i') | Some('t')))
            || !agg.sums.iter().all(|(_, c)| aff(c) == Some('i'))
        {
            return None;
        }
        let mut groups = Groups {
            table: table.clone(),
            full: translated.to_owned(),
            keys_sql: String::new(),
            sql: String::new(),
            key_pos: agg.key_pos,
            sum_pos: agg.sums.iter().map(|(i, _)| *i).collect(),
            prev: HashMap::new(),
        };
        for (row, n) in current {
            if *n != 1
                || !groups.exact(row)
                || groups.prev.insert(groups.key(row), row.clone()).is_some()
            {
                return None;
            }
        }
        let keys: Vec<String> = agg.keys.iter().map(|k| quote_ident(k)).collect();
        let index = quote_ident(&format!("_tg_idx_{table}({})", agg.keys.join(",")));
        if let Err(e) = self.conn.execute_batch(&format!(
            "CREATE INDEX IF NOT EXISTS main.{index} ON {} ({})",
            quote_ident(&table),
            keys.join(", ")
        )) {
            tracing::debug!(table = %table, error = %e, "No group index; subscription re-evaluates in full.");
            return None;
        }
        groups.keys_sql = format!(
            "SELECT DISTINCT {} FROM temp.{}",
            keys.join(", "),
            quote_ident(&delta)
        );
        let info = self.catalog.get(&table)?;
        let cols: Vec<String> = info.columns.iter().map(|c| quote_ident(&c.name)).collect();
        let picked: Vec<String> = cols.iter().map(|c| format!("\"_tg_r\".{c}")).collect();
        let on: Vec<String> = keys
            .iter()
            .map(|k| format!("\"_tg_r\".{k} IS \"_tg_k\".{k}"))
            .collect();
        groups.sql = format!(
            "WITH {} ({}) AS (SELECT {} FROM ({}) AS \"_tg_k\" CROSS JOIN main.{} AS \"_tg_r\" ON {}) {body}",
            quote_ident(&table),
            cols.join(", "),
            picked.join(", "),
            groups.keys_sql,
            quote_ident(&table),
            on.join(" AND ")
        );
        self.same_width(translated, &groups.sql).then_some(groups)
    }

    /// Creates `table`'s delta table if missing: its columns with the same
    /// declared types (so the same affinities), no constraints, plus `_tg_sign`.
    /// `Ok(None)` when a copy of its rows might not compare like the originals: a
    /// COLLATE clause, a STRICT table, or a column name that clashes.
    fn ensure_delta_table(&self, table: &str) -> Result<Option<String>, SqlError> {
        let ddl: String = self.conn.query_row(
            "SELECT sql FROM main.sqlite_master WHERE type = 'table' AND name = ?1 COLLATE NOCASE",
            [table],
            |r| r.get(0),
        )?;
        if sql::identifiers(&ddl)
            .iter()
            .any(|w| w == "collate" || w == "strict" || w.starts_with("_tg_"))
        {
            return Ok(None);
        }
        let defs: Vec<String> = table_columns(&self.conn, table)?
            .iter()
            .map(|(name, ty)| format!("{} {ty}", quote_ident(name)))
            .collect();
        let delta = format!("{DELTA_PREFIX}{table}");
        self.conn.execute_batch(&format!(
            "CREATE TEMP TABLE IF NOT EXISTS {} ({}, \"_tg_sign\")",
            quote_ident(&delta),
            defs.join(", ")
        ))?;
        Ok(Some(delta))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::subscriptions::Source;
    use crate::store::tests::{store, subscribe, write};
    use crate::subscribe::{ResultSet, SubEvent};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use tokio::sync::mpsc as tmpsc;

    fn is_delta(store: &Store, id: u64) -> bool {
        matches!(
            store.subs.get(&id).map(|s| &s.source),
            Some(Source::Delta { .. })
        )
    }

    fn is_groups(store: &Store, id: u64) -> bool {
        matches!(
            store.subs.get(&id).map(|s| &s.source),
            Some(Source::Groups(_))
        )
    }

    fn is_full(store: &Store, id: u64) -> bool {
        matches!(
            store.subs.get(&id).map(|s| &s.source),
            Some(Source::Query { .. })
        )
    }

    fn drain(rx: &mut tmpsc::UnboundedReceiver<SubEvent>) -> Vec<String> {
        drain_from(rx, 0)
    }

    /// The events so far, rows from column `skip` on.
    fn drain_from(rx: &mut tmpsc::UnboundedReceiver<SubEvent>, skip: usize) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            match ev {
                SubEvent::Rows(rows) => {
                    out.extend(rows.iter().map(|r| format!("{:?}", &r[skip..])))
                }
                other => out.push(format!("{other:?}")),
            }
        }
        out
    }

    const SCHEMA: &str = "
        CREATE TABLE t (a int, b text, c double precision);
        CREATE TABLE u (x int);
        CREATE VIEW v_id AS SELECT a, b, c FROM t;
        CREATE VIEW v_filter AS SELECT a, b FROM t WHERE a % 3 = 0;
        CREATE VIEW v_proj AS SELECT a + 1 AS a1, coalesce(b, 'none') AS b, upper(b) AS ub, c * 2 AS c2
            FROM t WHERE b IS NULL OR a > 4;
        CREATE VIEW v_on_view AS SELECT a1, b FROM v_proj WHERE a1 % 2 = 0;
        CREATE VIEW v_text AS SELECT * FROM t WHERE a = '5' OR b LIKE 'x%';
        CREATE VIEW v_case AS SELECT CASE WHEN a IS NULL THEN 'n' WHEN a > 5 THEN 'big' ELSE 'small' END AS size, b FROM t AS r WHERE r.c IS NOT NULL;
        INSERT INTO t VALUES (3, 'x', 1.5), (3, 'x', 1.5), (NULL, NULL, NULL), (6, 'y', 2);
    ";

    /// Every eligible subscription gets the same events from the incremental path
    /// as from full re-evaluation, over random inserts, updates and deletes with
    /// NULLs, duplicates and rows moving in and out of filters.
    #[test]
    fn incremental_matches_full_recompute() {
        let mut s = store();
        s.script(SCHEMA).expect("schema");
        let subjects = [
            "v_id",
            "v_filter",
            "v_proj",
            "v_on_view",
            "v_text",
            "v_case",
            "v_filter WITH (PROGRESS)",
            "v_filter ENVELOPE UPSERT (KEY (a))",
            "(SELECT b, a FROM t WHERE c IS NOT NULL)",
            "(SELECT a::text || b AS ab, -a AS neg FROM t)",
            "(SELECT * FROM v_on_view WHERE b <> 'x' ORDER BY a1)",
            "(SELECT a, b FROM t WHERE b % 10 = 0)",
        ];
        let mut pairs = Vec::new();
        for what in subjects {
            let (inc, inc_rx) = subscribe(&mut s, what, true);
            let (full, mut full_rx) = subscribe(&mut s, what, false);
            assert!(is_delta(&s, inc), "{what} is not incremental");
            assert!(!is_delta(&s, full));
            // The snapshots differ only in their AS OF timestamp.
            let mut inc_rx = inc_rx;
            assert_eq!(
                drain_from(&mut inc_rx, 1),
                drain_from(&mut full_rx, 1),
                "{what}"
            );
            pairs.push((what, inc_rx, full_rx));
        }
        let mut rng = StdRng::seed_from_u64(7);
        let int = |rng: &mut StdRng| match rng.random_range(0..8) {
            0 => "NULL".to_owned(),
            _ => rng.random_range(0..10).to_string(),
        };
        let text = |rng: &mut StdRng| {
            ["NULL", "'x'", "'xy'", "'y'", "'z'", "'10'"][rng.random_range(0..6)]
        };
        let real = |rng: &mut StdRng| ["NULL", "1.5", "2.0", "-0.0", "3"][rng.random_range(0..5)];
        let mut changed = vec![0usize; pairs.len()];
        for step in 0..400 {
            let mut stmts = Vec::new();
            for _ in 0..rng.random_range(1..=3) {
                stmts.push(match rng.random_range(0..8) {
                    0 | 1 => {
                        let rows: Vec<String> = (0..rng.random_range(1..=3))
                            .map(|_| {
                                format!(
                                    "({}, {}, {})",
                                    int(&mut rng),
                                    text(&mut rng),
                                    real(&mut rng)
                                )
                            })
                            .collect();
                        format!("INSERT INTO t VALUES {}", rows.join(", "))
                    }
                    2 => format!("UPDATE t SET a = a + 1 WHERE b = {}", text(&mut rng)),
                    3 => format!(
                        "UPDATE t SET b = {} WHERE a = {}",
                        text(&mut rng),
                        int(&mut rng)
                    ),
                    4 => format!(
                        "UPDATE t SET c = {} WHERE a IS NULL OR a < 3",
                        real(&mut rng)
                    ),
                    5 => format!("DELETE FROM t WHERE a = {}", int(&mut rng)),
                    6 => format!("DELETE FROM t WHERE b IS {}", text(&mut rng)),
                    _ => format!("INSERT INTO u VALUES ({})", int(&mut rng)),
                });
            }
            write(&mut s, &stmts);
            for (i, (what, inc_rx, full_rx)) in pairs.iter_mut().enumerate() {
                let inc = drain(inc_rx);
                if !inc.is_empty() {
                    changed[i] += 1;
                }
                assert_eq!(inc, drain(full_rx), "{what} after step {step}: {stmts:?}");
            }
        }
        assert_eq!(s.subs.len(), subjects.len() * 2, "a subscription ended");
        // Equal because both were silent proves nothing: every subject saw changes.
        for ((what, ..), n) in pairs.iter().zip(&changed) {
            assert!(*n >= 20, "{what} changed at only {n} steps");
        }
    }

    /// The full path's encoded previous result stays equal to the query's result.
    #[test]
    fn reevaluated_result_set_tracks_the_query() {
        let mut s = store();
        s.script(SCHEMA).expect("schema");
        let (id, mut rx) = subscribe(&mut s, "v_proj", false);
        let mut rng = StdRng::seed_from_u64(11);
        for _ in 0..100 {
            let a = rng.random_range(0..10);
            let stmt = match rng.random_range(0..3) {
                0 => format!("INSERT INTO t VALUES ({a}, 'x', {a}.5), ({a}, NULL, NULL)"),
                1 => format!("UPDATE t SET a = a + 2 WHERE a = {a}"),
                _ => format!("DELETE FROM t WHERE a = {a}"),
            };
            write(&mut s, &[stmt]);
        }
        drain(&mut rx);
        let Some(Source::Query { sql, prev }) = s.subs.get_mut(&id).map(|s| &mut s.source) else {
            panic!("not re-evaluated");
        };
        let sql = sql.clone();
        let mut kept = std::mem::take(prev);
        // Against an empty previous result, the diff is the whole current result.
        let current = s.eval_multiset(&sql).expect("eval");
        let mut from_empty = ResultSet::default();
        let mut stmt = s.conn.prepare(&sql).expect("prepare");
        let n = stmt.column_count();
        let mut rows = stmt.query([]).expect("query");
        while let Some(r) = rows.next().expect("row") {
            from_empty
                .observe((0..n).map(|i| r.get_ref(i)))
                .expect("observe");
        }
        drop(rows);
        let mut want: Vec<(Row, i64)> = current.into_iter().collect();
        want.sort();
        assert_eq!(from_empty.finish(), want);
        // And re-running against the kept result finds nothing changed.
        let mut rows = stmt.query([]).expect("query");
        while let Some(r) = rows.next().expect("row") {
            kept.observe((0..n).map(|i| r.get_ref(i))).expect("observe");
        }
        assert!(kept.finish().is_empty());
    }

    #[test]
    fn ineligible_queries_recompute_in_full() {
        let mut s = store();
        s.script(SCHEMA).expect("schema");
        s.script(
            "CREATE VIEW total AS SELECT count(*) AS n, sum(a) AS s FROM t;
             CREATE VIEW over_total AS SELECT n FROM total WHERE n > 1;
             CREATE TABLE folded (s text COLLATE NOCASE);",
        )
        .expect("views");
        for what in [
            "total",
            "over_total",
            "(SELECT a, avg(a) AS n FROM t GROUP BY a)",
            "(SELECT a, min(a) AS n FROM t GROUP BY a)",
            "(SELECT a, count(*) AS n FROM t GROUP BY a HAVING count(*) > 1)",
            "(SELECT a, count(DISTINCT b) AS n FROM t GROUP BY a)",
            "(SELECT a, sum(c) AS n FROM t GROUP BY a)",
            "(SELECT c, count(*) AS n FROM t GROUP BY c)",
            "(SELECT a % 10 AS k, count(*) AS n FROM t GROUP BY a % 10)",
            "(SELECT a, sum(a) + 1 AS n FROM t GROUP BY a)",
            "(SELECT a, b, count(*) AS n FROM t GROUP BY a)",
            "(SELECT a, count(*) AS n FROM t GROUP BY a ORDER BY a LIMIT 1)",
            "(SELECT a, count(*) AS n FROM t WHERE random() > 0 GROUP BY a)",
            "(SELECT a1, count(*) AS n FROM v_proj GROUP BY a1)",
            "(SELECT a, x, count(*) AS n FROM t, u GROUP BY a, x)",
            "(SELECT DISTINCT a FROM t)",
            "(SELECT a FROM t ORDER BY a LIMIT 2)",
            "(SELECT a, random() AS r FROM t)",
            "(SELECT a, mz_epoch_ms() AS now FROM t)",
            "(SELECT a, x FROM t, u)",
            "(SELECT a FROM t JOIN u ON a = x)",
            "(SELECT a FROM t WHERE a IN (SELECT x FROM u))",
            "(SELECT a FROM t UNION ALL SELECT x FROM u)",
            "(SELECT a, row_number() OVER () AS n FROM t)",
            "(SELECT s FROM folded WHERE s = 'A')",
        ] {
            let (id, _rx) = subscribe(&mut s, what, true);
            assert!(is_full(&s, id), "{what} was made incremental");
        }
    }

    /// Grouped `count`/`sum` subscriptions get the same events when only the
    /// written groups are recomputed as from full re-evaluation, over random
    /// inserts, updates and deletes with NULL group keys and NULL summands, groups
    /// appearing and disappearing and rows moving between groups; then a
    /// non-integer summand switches them to full re-evaluation seamlessly.
    #[test]
    fn grouped_aggregates_match_full_recompute() {
        let mut s = store();
        s.script(
            "CREATE TABLE g (k int, s text, v int, w bigint, f double precision);
             CREATE VIEW g_by_k AS SELECT k, count(*) AS n, count(v) AS nv, sum(v) AS sv FROM g GROUP BY k;
             CREATE VIEW g_by_ks AS SELECT s, k, sum(w) AS sw, count(*) AS n FROM g
                 WHERE v IS NULL OR v % 3 <> 0 GROUP BY k, s;
             CREATE VIEW g_star AS SELECT * FROM g_by_k;
             INSERT INTO g VALUES (1, 'x', 1, 10, 1.5), (NULL, NULL, NULL, NULL, NULL), (1, 'y', NULL, 5, 2);",
        )
        .expect("schema");
        let subjects = [
            "g_by_k",
            "g_by_ks",
            "g_star",
            "g_by_k WITH (PROGRESS)",
            "g_by_k ENVELOPE UPSERT (KEY (k))",
            "(SELECT s, count(f) AS nf, count(*) AS n FROM g GROUP BY s)",
            "(SELECT sum(v) AS sv, k FROM g AS x WHERE x.s <> 'z' GROUP BY k)",
            "(SELECT k, s, count(*) FROM g WHERE coalesce(v, 0) < 8 GROUP BY s, k)",
        ];
        let mut pairs = Vec::new();
        for what in subjects {
            let (inc, mut inc_rx) = subscribe(&mut s, what, true);
            let (full, mut full_rx) = subscribe(&mut s, what, false);
            assert!(is_groups(&s, inc), "{what} is not maintained per group");
            assert!(is_full(&s, full));
            assert_eq!(
                drain_from(&mut inc_rx, 1),
                drain_from(&mut full_rx, 1),
                "{what}"
            );
            pairs.push((what, inc, inc_rx, full_rx));
        }
        let mut rng = StdRng::seed_from_u64(13);
        let key = |rng: &mut StdRng| match rng.random_range(0..6) {
            0 => "NULL".to_owned(),
            _ => rng.random_range(0..6).to_string(),
        };
        let text = |rng: &mut StdRng| ["NULL", "'x'", "'y'", "'z'"][rng.random_range(0..4)];
        let num = |rng: &mut StdRng| match rng.random_range(0..5) {
            0 => "NULL".to_owned(),
            _ => rng.random_range(-3..1_000_000_000_000i64).to_string(),
        };
        let small = |rng: &mut StdRng| match rng.random_range(0..4) {
            0 => "NULL".to_owned(),
            _ => rng.random_range(-3..10).to_string(),
        };
        let mut changed = vec![0usize; pairs.len()];
        for step in 0..400 {
            let mut stmts = Vec::new();
            for _ in 0..rng.random_range(1..=3) {
                stmts.push(match rng.random_range(0..11) {
                    0..=2 => {
                        let rows: Vec<String> = (0..rng.random_range(1..=3))
                            .map(|_| {
                                format!(
                                    "({}, {}, {}, {}, {})",
                                    key(&mut rng),
                                    text(&mut rng),
                                    small(&mut rng),
                                    num(&mut rng),
                                    ["NULL", "1.5", "2"][rng.random_range(0..3)]
                                )
                            })
                            .collect();
                        format!("INSERT INTO g VALUES {}", rows.join(", "))
                    }
                    3 => format!("UPDATE g SET k = k + 1 WHERE s IS {}", text(&mut rng)),
                    4 => format!("UPDATE g SET k = NULL WHERE v = {}", small(&mut rng)),
                    5 => format!(
                        "UPDATE g SET s = {}, v = {} WHERE k IS {}",
                        text(&mut rng),
                        small(&mut rng),
                        key(&mut rng)
                    ),
                    6 => format!("UPDATE g SET w = {} WHERE v < 3", num(&mut rng)),
                    7 => format!("DELETE FROM g WHERE k IS {}", key(&mut rng)),
                    8 => format!("DELETE FROM g WHERE s IS {}", text(&mut rng)),
                    9 if rng.random_range(0..10) == 0 => "DELETE FROM g".to_owned(),
                    _ => format!("UPDATE g SET f = NULL WHERE k = {}", key(&mut rng)),
                });
            }
            write(&mut s, &stmts);
            for (i, (what, _, inc_rx, full_rx)) in pairs.iter_mut().enumerate() {
                let inc = drain(inc_rx);
                if !inc.is_empty() {
                    changed[i] += 1;
                }
                assert_eq!(inc, drain(full_rx), "{what} after step {step}: {stmts:?}");
            }
        }
        for (what, inc, ..) in &pairs {
            assert!(is_groups(&s, *inc), "{what} left the per-group path");
        }
        // Equal because both were silent proves nothing: every subject saw changes.
        for ((what, ..), n) in pairs.iter().zip(&changed) {
            assert!(*n >= 20, "{what} changed at only {n} steps");
        }
        // A real in an int column makes its sum a float: full re-evaluation from then on.
        for stmt in [
            "INSERT INTO g VALUES (2, 'x', 1.5, 2.5, NULL)",
            "UPDATE g SET k = 3 WHERE v = 1.5",
            "DELETE FROM g WHERE k = 3",
        ] {
            write(&mut s, &[stmt.to_owned()]);
            for (what, _, inc_rx, full_rx) in &mut pairs {
                assert_eq!(drain(inc_rx), drain(full_rx), "{what} after {stmt}");
            }
        }
        assert!(is_full(&s, pairs[0].1), "g_by_k still per group");
        assert_eq!(s.subs.len(), subjects.len() * 2, "a subscription ended");
    }

    /// Subscribes to `q` both ways (the incremental one must take the path
    /// `is_incremental` checks), applies `writes` one by one, and checks that
    /// both end with the same events, a division by zero last.
    fn assert_errors_match(
        schema: &str,
        q: &str,
        is_incremental: fn(&Store, u64) -> bool,
        writes: [&str; 2],
    ) {
        let mut s = store();
        s.script(schema).expect("schema");
        let (inc, mut inc_rx) = subscribe(&mut s, q, true);
        let (_, mut full_rx) = subscribe(&mut s, q, false);
        assert!(is_incremental(&s, inc), "{q}");
        // The snapshots differ only in their AS OF timestamp when a millisecond passes.
        assert_eq!(drain_from(&mut inc_rx, 1), drain_from(&mut full_rx, 1));
        for w in writes {
            write(&mut s, &[w.to_owned()]);
        }
        let events = drain(&mut inc_rx);
        assert!(events
            .last()
            .is_some_and(|e| e.contains("division by zero")));
        assert_eq!(events, drain(&mut full_rx));
        assert!(s.subs.is_empty());
    }

    /// Division by zero in a new row poisons the subscription either way.
    #[test]
    fn evaluation_errors_match() {
        assert_errors_match(
            "CREATE TABLE t (a int); INSERT INTO t VALUES (1);",
            "(SELECT 10 / a AS q FROM t)",
            is_delta,
            ["INSERT INTO t VALUES (2)", "INSERT INTO t VALUES (0)"],
        );
    }

    /// The same for a grouped aggregate whose filter divides by a group column.
    #[test]
    fn grouped_evaluation_errors_match() {
        assert_errors_match(
            "CREATE TABLE t (a int, b int); INSERT INTO t VALUES (1, 1);",
            "(SELECT a, count(*) AS n, sum(b) AS s FROM t WHERE 10 / a > 1 GROUP BY a)",
            is_groups,
            ["INSERT INTO t VALUES (2, 5)", "INSERT INTO t VALUES (0, 1)"],
        );
    }
}
