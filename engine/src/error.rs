//! Client-visible SQL errors: a SQLSTATE and a message, sent as ErrorResponse.
//!
//! Every failure a client can cause ends up here, so one connection's error is
//! always a value, never a panic or a torn-down task.

/// An error reported to one client as an ErrorResponse; the session stays usable.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message} (SQLSTATE {code})")]
pub struct SqlError {
    pub code: &'static str,
    pub message: String,
}

impl SqlError {
    pub fn new(code: &'static str, message: impl Into<String>) -> SqlError {
        SqlError {
            code,
            message: message.into(),
        }
    }

    pub fn syntax(message: impl Into<String>) -> SqlError {
        SqlError::new("42601", message)
    }

    pub fn unsupported(what: impl std::fmt::Display) -> SqlError {
        SqlError::new("0A000", format!("{what} not supported"))
    }

    pub fn internal(message: impl Into<String>) -> SqlError {
        SqlError::new("XX000", message)
    }

    pub fn unknown_relation(name: &str) -> SqlError {
        SqlError::new("42P01", format!("unknown catalog item '{name}'"))
    }

    pub fn unknown_cursor(name: &str) -> SqlError {
        SqlError::new("34000", format!("cursor \"{name}\" does not exist"))
    }

    pub fn unknown_portal(name: &str) -> SqlError {
        SqlError::new("34000", format!("portal \"{name}\" does not exist"))
    }

    pub fn unknown_statement(name: &str) -> SqlError {
        SqlError::new(
            "26000",
            format!("prepared statement \"{name}\" does not exist"),
        )
    }

    pub fn division_by_zero() -> SqlError {
        SqlError::new("XX000", "Evaluation error: division by zero")
    }

    pub fn canceled() -> SqlError {
        SqlError::new("57014", "canceling statement due to user request")
    }

    pub fn aborted_txn() -> SqlError {
        SqlError::new(
            "25P02",
            "current transaction is aborted, commands ignored until end of transaction block",
        )
    }
}

/// Marker text the `mz_div` SQLite function fails with, recognised when mapping
/// SQLite errors back to Materialize's evaluation error.
pub(crate) const DIV_BY_ZERO_MARKER: &str = "tailgate: division by zero";

impl From<rusqlite::Error> for SqlError {
    fn from(e: rusqlite::Error) -> SqlError {
        // SQLite's own message, without rusqlite's " in <sql> at offset <n>", and
        // the SQL from the offending token on, where SQLite points at one.
        let (text, at) = match &e {
            rusqlite::Error::SqlInputError {
                msg, sql, offset, ..
            } => (
                msg.clone(),
                usize::try_from(*offset).ok().and_then(|o| sql.get(o..)),
            ),
            rusqlite::Error::SqliteFailure(_, Some(msg)) => (msg.clone(), None),
            other => (other.to_string(), None),
        };
        if text.contains(DIV_BY_ZERO_MARKER) {
            return SqlError::division_by_zero();
        }
        let lower = text.to_ascii_lowercase();
        if let Some(name) = lower.strip_prefix("no such table: ") {
            let name = name.rsplit('.').next().unwrap_or(name);
            return SqlError::unknown_relation(name);
        }
        if let Some(name) = lower.strip_prefix("no such view: ") {
            return SqlError::unknown_relation(name);
        }
        if let Some(name) = text.strip_prefix("no such column: ") {
            return unknown_column(name, at.is_some_and(|sql| sql.starts_with('"')));
        }
        if let Some(name) = lower.strip_prefix("no such function: ") {
            return SqlError::new("42883", format!("function {name}() does not exist"));
        }
        if lower.contains("syntax error")
            || lower.starts_with("near ")
            || lower.contains("incomplete input")
        {
            return SqlError::syntax(text);
        }
        if lower.contains("already exists") {
            return SqlError::new("42P07", text);
        }
        if lower.contains("unique constraint") {
            return SqlError::new("23505", text);
        }
        if lower.contains("not null constraint") {
            return SqlError::new("23502", text);
        }
        if lower.contains("has no column named") || lower.contains("values were supplied") {
            return SqlError::new("42703", text);
        }
        SqlError::internal(text)
    }
}

/// Materialize's unknown-column error from the name in SQLite's "no such
/// column" message. Materialize folds unquoted identifiers to lower case and
/// SQLite reports them as written, so only a quoted name keeps its case: one
/// SQLite shows quoted (with a hint, since double-quoted strings are off), or
/// one whose token in the SQL (`quoted_in_sql`) is quoted.
fn unknown_column(reported: &str, quoted_in_sql: bool) -> SqlError {
    let reported = reported
        .strip_suffix(" - should this be a string literal in single-quotes?")
        .unwrap_or(reported);
    let name = match reported.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        Some(quoted) => quoted.replace("\"\"", "\""),
        None if quoted_in_sql => reported.to_owned(),
        None => reported.to_ascii_lowercase(),
    };
    SqlError::new("42703", format!("column \"{name}\" does not exist"))
}
