//! The engine's SQLite connection: opening it without double-quoted string
//! literals, the scalar functions Materialize has and SQLite lacks (versions,
//! `mz_epoch_ms`, `now`, `mz_bool`, `mz_div`), and the helpers every read
//! goes through, which refuse a statement that would write.

use std::collections::HashMap;

use rusqlite::config::DbConfig;
use rusqlite::functions::FunctionFlags;
use rusqlite::types::{Value, ValueRef};
use rusqlite::Connection;

use super::now_ms;
use crate::error::{SqlError, DIV_BY_ZERO_MARKER};
use crate::value::{format_timestamptz_ms, parse_bool, Datum, Row};

/// Opens the engine's SQLite connection. Materialize has no double-quoted
/// string literals: `"x"` always names a column, so SQLite's fallback of
/// reading an unknown `"x"` as the string `'x'` is off for DML and DDL.
pub(super) fn open_connection() -> rusqlite::Result<Connection> {
    let conn = Connection::open_in_memory()?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_DQS_DML, false)?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_DQS_DDL, false)?;
    Ok(conn)
}

/// Version strings reported by `mz_version()` and friends.
pub(crate) fn version_info(legacy: bool) -> (&'static str, i64) {
    if legacy {
        ("v0.26.4 (2b0ad1c4e)", 2604)
    } else {
        ("v0.160.0 (6f1e0c2a4)", 16000)
    }
}

pub(super) fn register_functions(conn: &Connection, legacy: bool) -> Result<(), rusqlite::Error> {
    let det = FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC;
    let volatile = FunctionFlags::SQLITE_UTF8;
    let (version, num) = version_info(legacy);
    conn.create_scalar_function("mz_version", 0, det, move |_| Ok(version.to_owned()))?;
    conn.create_scalar_function("mz_version_num", 0, det, move |_| Ok(num))?;
    let pg_version = format!(
        "PostgreSQL 9.5 on x86_64-unknown-linux-gnu (Materialize {})",
        version.split(' ').next().unwrap_or(version)
    );
    conn.create_scalar_function("version", 0, det, move |_| Ok(pg_version.clone()))?;
    conn.create_scalar_function("current_database", 0, det, |_| Ok("materialize".to_owned()))?;
    conn.create_scalar_function("current_schema", 0, det, |_| Ok("public".to_owned()))?;
    conn.create_scalar_function("now", 0, volatile, |_| Ok(format_timestamptz_ms(now_ms())))?;
    conn.create_scalar_function("mz_epoch_ms", 0, volatile, |_| Ok(now_ms()))?;
    conn.create_scalar_function("mz_now", 0, volatile, |_| Ok(now_ms()))?;
    conn.create_scalar_function("mz_bool", 1, det, |ctx| {
        Ok(match ctx.get_raw(0) {
            ValueRef::Null => Value::Null,
            ValueRef::Integer(i) => Value::Integer(i64::from(i != 0)),
            ValueRef::Real(f) => Value::Integer(i64::from(f != 0.0)),
            ValueRef::Text(t) => match parse_bool(&String::from_utf8_lossy(t)) {
                Some(b) => Value::Integer(i64::from(b)),
                None => {
                    return Err(rusqlite::Error::UserFunctionError(
                        format!(
                            "invalid input syntax for type boolean: \"{}\"",
                            String::from_utf8_lossy(t)
                        )
                        .into(),
                    ))
                }
            },
            ValueRef::Blob(_) => Value::Null,
        })
    })?;
    conn.create_scalar_function("mz_div", 2, det, |ctx| {
        let num = |v: ValueRef<'_>| -> Option<Value> {
            match v {
                ValueRef::Integer(i) => Some(Value::Integer(i)),
                ValueRef::Real(f) => Some(Value::Real(f)),
                ValueRef::Text(t) => {
                    let s = String::from_utf8_lossy(t);
                    s.trim()
                        .parse::<i64>()
                        .map(Value::Integer)
                        .or_else(|_| s.trim().parse::<f64>().map(Value::Real))
                        .ok()
                }
                _ => None,
            }
        };
        let (Some(a), Some(b)) = (num(ctx.get_raw(0)), num(ctx.get_raw(1))) else {
            return Ok(Value::Null);
        };
        let zero = || rusqlite::Error::UserFunctionError(DIV_BY_ZERO_MARKER.into());
        Ok(match (a, b) {
            (Value::Integer(x), Value::Integer(y)) => {
                if y == 0 {
                    return Err(zero());
                }
                Value::Integer(x.checked_div(y).ok_or_else(|| {
                    rusqlite::Error::UserFunctionError("bigint out of range".into())
                })?)
            }
            (a, b) => {
                let f = |v: Value| match v {
                    Value::Integer(i) => i as f64,
                    Value::Real(r) => r,
                    _ => 0.0,
                };
                let y = f(b);
                if y == 0.0 {
                    return Err(zero());
                }
                Value::Real(f(a) / y)
            }
        })
    })?;
    Ok(())
}

/// One result row of a statement with `n` columns.
pub(super) fn read_row(r: &rusqlite::Row<'_>, n: usize) -> rusqlite::Result<Row> {
    (0..n)
        .map(|i| r.get_ref(i).map(Datum::from_sqlite))
        .collect()
}

/// Refuses a statement that would write. Reads (SELECT, subscriptions, COPY)
/// run only what SQLite itself vouches for (`sqlite3_stmt_readonly`), as a
/// second line behind the parser, which lets only queries through.
pub(super) fn read_only(stmt: &rusqlite::Statement<'_>) -> Result<(), SqlError> {
    if stmt.readonly() {
        Ok(())
    } else {
        Err(SqlError::new(
            "25006",
            "cannot execute a statement that writes where only a query is allowed",
        ))
    }
}

/// A read-only statement through the statement cache, see [`read_only`].
pub(super) fn prepare_read<'c>(
    conn: &'c Connection,
    sql: &str,
) -> Result<rusqlite::CachedStatement<'c>, SqlError> {
    let stmt = conn.prepare_cached(sql)?;
    read_only(&stmt)?;
    Ok(stmt)
}

/// Every row of a query (through the statement cache).
pub(super) fn rows_of(
    conn: &Connection,
    sql: &str,
    params: &[Datum],
) -> Result<Vec<Row>, SqlError> {
    let mut stmt = prepare_read(conn, sql)?;
    let n = stmt.column_count();
    let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(read_row(r, n)?);
    }
    Ok(out)
}

/// Runs a prepared query and counts its rows.
pub(super) fn multiset(stmt: &mut rusqlite::Statement<'_>) -> Result<HashMap<Row, i64>, SqlError> {
    let n = stmt.column_count();
    let mut rows = stmt.query([])?;
    let mut out: HashMap<Row, i64> = HashMap::new();
    while let Some(r) = rows.next()? {
        *out.entry(read_row(r, n)?).or_insert(0) += 1;
    }
    Ok(out)
}

/// The name and declared type of each column of `table`.
pub(super) fn table_columns(
    conn: &Connection,
    table: &str,
) -> rusqlite::Result<Vec<(String, String)>> {
    let mut st = conn.prepare_cached("SELECT name, type FROM pragma_table_info(?1)")?;
    let rows = st.query_map([table], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// SQLite's column affinity for a declared type.
pub(super) fn affinity(declared: &str) -> char {
    let t = declared.to_ascii_uppercase();
    if t.contains("INT") {
        'i'
    } else if t.contains("CHAR") || t.contains("CLOB") || t.contains("TEXT") {
        't'
    } else if t.is_empty() || t.contains("BLOB") {
        'b'
    } else if t.contains("REAL") || t.contains("FLOA") || t.contains("DOUB") {
        'r'
    } else {
        'n'
    }
}
