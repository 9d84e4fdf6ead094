//! Every SQL statement the gateway sends upstream is built here, from the validated
//! config only: no request value ever reaches SQL.

use crate::config::Source;

/// The relation as it appears after `SUBSCRIBE`.
fn relation(source: &Source) -> String {
    match source {
        Source::View(v) => v.clone(),
        // The newline keeps a trailing `--` comment from swallowing the parenthesis.
        Source::Query(q) if q.contains("--") => format!("({q}\n)"),
        Source::Query(q) => format!("({q})"),
    }
}

/// A plain query over the relation, prepared (never run) to learn its column types.
pub fn describe(source: &Source) -> String {
    match source {
        Source::View(v) => format!("SELECT * FROM {v}"),
        Source::Query(q) => q.clone(),
    }
}

/// Selects the session's cluster; `cluster` is a validated identifier.
pub fn set_cluster(cluster: &str) -> String {
    format!("SET cluster = {cluster}")
}

/// The SUBSCRIBE (or TAIL, before v0.27) statement of a source, resuming after
/// `resume_at` without a snapshot when given.
pub fn subscribe(
    source: &Source,
    key: Option<&[String]>,
    legacy: bool,
    resume_at: Option<u64>,
) -> String {
    let mut sql = String::new();
    sql.push_str(if legacy { "TAIL " } else { "SUBSCRIBE " });
    sql.push_str(&relation(source));
    if let (false, Some(key)) = (legacy, key) {
        sql.push_str(" ENVELOPE UPSERT (KEY (");
        sql.push_str(&key.join(", "));
        sql.push_str("))");
    }
    sql.push_str(" WITH (PROGRESS");
    if resume_at.is_some() {
        sql.push_str(", SNAPSHOT = false");
    }
    sql.push(')');
    if let Some(ts) = resume_at {
        sql.push_str(&format!(" AS OF {ts}"));
    }
    sql
}

/// The statement that opens the subscription as a cursor in a transaction.
pub fn declare(subscribe: &str) -> String {
    format!("BEGIN; DECLARE c CURSOR FOR {subscribe}")
}

/// Fetches everything the cursor has; without a timeout it returns as soon as rows
/// are ready.
pub const FETCH: &str = "FETCH ALL c";

/// Reads the server's version, to choose between SUBSCRIBE and TAIL.
pub const VERSION: &str = "SELECT mz_version()";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements() {
        let v = Source::View("v".into());
        assert_eq!(
            subscribe(&v, None, false, None),
            "SUBSCRIBE v WITH (PROGRESS)"
        );
        assert_eq!(
            subscribe(&v, None, true, Some(41)),
            "TAIL v WITH (PROGRESS, SNAPSHOT = false) AS OF 41"
        );
        let q = Source::Query("SELECT a, b FROM t".into());
        assert_eq!(
            subscribe(&q, Some(&["a".to_string()]), false, None),
            "SUBSCRIBE (SELECT a, b FROM t) ENVELOPE UPSERT (KEY (a)) WITH (PROGRESS)"
        );
        let c = Source::Query("SELECT 1 -- one".into());
        assert_eq!(
            subscribe(&c, None, false, None),
            "SUBSCRIBE (SELECT 1 -- one\n) WITH (PROGRESS)"
        );
        assert_eq!(describe(&v), "SELECT * FROM v");
    }
}
