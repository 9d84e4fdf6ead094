//! Engine conformance tests: the engine runs in-process on 127.0.0.1:0 and is
//! driven over real pgwire with tokio-postgres (and psql where noted). Every wait
//! is bounded; nothing sleeps for a fixed time to let things happen.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tailgate_engine::{self as engine, EngineConfig, RunningEngine};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};
use tokio_util::sync::CancellationToken;

use crate::support::{engine_subscriptions, wait_for};

const LIMIT: Duration = Duration::from_secs(10);

struct TestEngine {
    engine: Option<RunningEngine>,
    shutdown: CancellationToken,
}

impl TestEngine {
    async fn start() -> TestEngine {
        Self::with(EngineConfig::default()).await
    }

    async fn with(mut config: EngineConfig) -> TestEngine {
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let shutdown = CancellationToken::new();
        let engine = engine::start(config, shutdown.clone())
            .await
            .expect("engine starts");
        TestEngine {
            engine: Some(engine),
            shutdown,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.engine.as_ref().expect("running").local_addr()
    }

    async fn connect(&self) -> Client {
        crate::support::sql(self.addr()).await
    }

    fn stats(&self) -> engine::EngineStats {
        self.engine.as_ref().expect("running").stats()
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(e) = self.engine.take() {
            tokio::time::timeout(LIMIT, e.stopped())
                .await
                .expect("engine stops");
        }
    }
}

impl Drop for TestEngine {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn bounded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f).await.expect("timed out")
}

/// Waits until the engine lists `n` subscriptions, as seen by `client`.
async fn wait_subscriptions(client: &Client, n: i64) {
    wait_for(&format!("{n} subscriptions"), LIMIT, || async {
        (engine_subscriptions(client).await == n).then_some(())
    })
    .await
}

/// The messages of a simple query that must succeed.
async fn simple(client: &Client, sql: &str) -> Vec<SimpleQueryMessage> {
    bounded(client.simple_query(sql))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Rows of a simple query as text.
async fn rows(client: &Client, sql: &str) -> Vec<Vec<Option<String>>> {
    simple(client, sql)
        .await
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
            }
            _ => None,
        })
        .collect()
}

/// Column names of the last result of a simple query.
async fn columns(client: &Client, sql: &str) -> Vec<String> {
    simple(client, sql)
        .await
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::RowDescription(cols) => {
                Some(cols.iter().map(|c| c.name().to_owned()).collect())
            }
            _ => None,
        })
        .next_back()
        .unwrap_or_default()
}

async fn error(client: &Client, sql: &str) -> (String, String) {
    let err = bounded(client.simple_query(sql)).await.expect_err(sql);
    let db = err.as_db_error().unwrap_or_else(|| panic!("{sql}: {err}"));
    (db.code().code().to_owned(), db.message().to_owned())
}

fn s(v: &str) -> Option<String> {
    Some(v.to_owned())
}

/// The `mz_timestamp` (first column) of a row.
fn row_ts(row: &[Option<String>]) -> u64 {
    row[0]
        .as_deref()
        .and_then(|t| t.parse().ok())
        .expect("a timestamp")
}

/// Reads a result stream to its end; the error that ends it, if any.
async fn drain<T>(
    stream: impl Stream<Item = Result<T, tokio_postgres::Error>>,
) -> Result<usize, tokio_postgres::Error> {
    futures::pin_mut!(stream);
    let mut n = 0;
    while let Some(item) = stream.next().await {
        item?;
        n += 1;
    }
    Ok(n)
}

#[tokio::test]
async fn versions_and_session_variables() {
    let e = TestEngine::start().await;
    let c = e.connect().await;
    let r = rows(&c, "SELECT mz_version(), mz_version_num(), version()").await;
    assert!(r[0][0].as_deref().unwrap().starts_with("v0.160.0 ("));
    assert_eq!(r[0][1], s("16000"));
    assert_eq!(
        r[0][2],
        s("PostgreSQL 9.5 on x86_64-unknown-linux-gnu (Materialize v0.160.0)")
    );
    assert_eq!(rows(&c, "SHOW cluster").await, vec![vec![s("quickstart")]]);
    rows(&c, "SET cluster = prod; SET application_name = 'tests'").await;
    assert_eq!(rows(&c, "SHOW cluster").await, vec![vec![s("prod")]]);
    assert_eq!(
        rows(&c, "SHOW server_version").await,
        vec![vec![s("9.5.0")]]
    );
    let r = rows(&c, "SELECT application_name FROM mz_internal.mz_sessions").await;
    assert_eq!(r, vec![vec![s("tests")]]);
    assert_eq!(e.stats().sessions, 1);
    assert_eq!(error(&c, "SHOW nonsense").await.0, "42704");
    e.stop().await;
}

#[tokio::test]
async fn column_names_for_each_mode() {
    let e = TestEngine::start().await;
    let c = e.connect().await;
    rows(&c, "CREATE TABLE t (a int, b int)").await;
    for (sub, want) in [
        ("SUBSCRIBE t", "mz_timestamp mz_diff a b"),
        (
            "SUBSCRIBE t WITH (PROGRESS)",
            "mz_timestamp mz_progressed mz_diff a b",
        ),
        (
            "SUBSCRIBE t ENVELOPE UPSERT (KEY (a))",
            "mz_timestamp mz_state a b",
        ),
        (
            "SUBSCRIBE t ENVELOPE UPSERT (KEY (a)) WITH (PROGRESS)",
            "mz_timestamp mz_progressed mz_state a b",
        ),
        (
            "SUBSCRIBE t ENVELOPE UPSERT (KEY (b))",
            "mz_timestamp mz_state b a",
        ),
        (
            "SUBSCRIBE t WITH (PROGRESS) ENVELOPE UPSERT (KEY (b))",
            "mz_timestamp mz_progressed mz_state b a",
        ),
    ] {
        let cols = columns(
            &c,
            &format!("BEGIN; DECLARE c CURSOR FOR {sub}; FETCH 0 c; COMMIT"),
        )
        .await;
        assert_eq!(cols.join(" "), want, "{sub}");
    }
    // Extended protocol: Describe of FETCH gives the cursor's columns and types.
    let mut c2 = e.connect().await;
    let tx = bounded(c2.transaction()).await.unwrap();
    bounded(tx.batch_execute("DECLARE c CURSOR FOR SUBSCRIBE t WITH (PROGRESS)"))
        .await
        .unwrap();
    let st = bounded(tx.prepare("FETCH ALL c")).await.unwrap();
    let types: Vec<(&str, u32)> = st
        .columns()
        .iter()
        .map(|c| (c.name(), c.type_().oid()))
        .collect();
    assert_eq!(
        types,
        vec![
            ("mz_timestamp", 1700),
            ("mz_progressed", 16),
            ("mz_diff", 20),
            ("a", 23),
            ("b", 23)
        ]
    );
    bounded(tx.rollback()).await.unwrap();
    e.stop().await;
}

#[tokio::test]
async fn dataflow_error_poisons_cursor() {
    let e = TestEngine::start().await;
    let c = e.connect().await;
    rows(
        &c,
        "CREATE TABLE t (a int); INSERT INTO t VALUES (1), (2), (0)",
    )
    .await;
    rows(&c, "CREATE VIEW v AS SELECT 1/a AS x FROM t").await;
    for q in ["SUBSCRIBE (SELECT 1/a FROM t)", "SUBSCRIBE v"] {
        rows(&c, &format!("BEGIN; DECLARE c CURSOR FOR {q}")).await;
        for _ in 0..2 {
            let (code, msg) = error(&c, "FETCH 1 c").await;
            assert_eq!(
                (code.as_str(), msg.as_str()),
                ("XX000", "Evaluation error: division by zero")
            );
            rows(&c, "ROLLBACK; BEGIN").await;
            rows(&c, &format!("DECLARE c CURSOR FOR {q}")).await;
        }
        rows(&c, "ROLLBACK").await;
    }
    assert_eq!(
        error(&c, "SELECT 1/a FROM t").await.1,
        "Evaluation error: division by zero"
    );
    e.stop().await;
}

#[tokio::test]
async fn up_to_and_bounds_validation() {
    let e = TestEngine::start().await;
    let c = e.connect().await;
    rows(&c, "CREATE TABLE t (a int)").await;
    let castable = "AS OF or UP TO should be castable to a (non-null) mz_timestamp value";
    for q in [
        "SUBSCRIBE t UP TO -1",
        "SUBSCRIBE t UP TO null",
        "SUBSCRIBE t UP TO null::mz_timestamp",
        "SUBSCRIBE t UP TO 'xxx'",
        "SUBSCRIBE (SELECT 1) AS OF NULL::timestamptz",
    ] {
        assert_eq!(error(&c, q).await.1, castable, "{q}");
    }
    for q in [
        "SUBSCRIBE t UP TO now()",
        "SUBSCRIBE t UP TO mz_now()",
        "SUBSCRIBE t UP TO current_database()::mz_timestamp",
    ] {
        assert_eq!(
            error(&c, q).await.1,
            "calling an unmaterializable function in AS OF or UP TO not yet supported",
            "{q}"
        );
    }
    assert_eq!(
        error(&c, "SUBSCRIBE t UP TO current_database()").await.1,
        "AS OF or UP TO does not support implicitly casting from text to mz_timestamp"
    );
    let (code, msg) = error(&c, "SUBSCRIBE (SELECT 1) AS OF 10 UP TO 5").await;
    assert_eq!(code, "22000");
    assert_eq!(msg, "subscription lower bound (`AS OF`) is greater than its upper bound (`UP TO`): 18446744073709551615 > 5");
    // UP TO in the near future: rows before it stream, then the subscription completes.
    // AS OF pins the lower bound: left to default to the engine's clock, it would pass
    // UP TO (error 22000) if the test stalled between reading the clock and subscribing.
    let now = engine_now(&c).await;
    let up_to = now + 1500;
    rows(&c, "INSERT INTO t VALUES (1)").await;
    let r = rows(&c, &format!("SUBSCRIBE t AS OF {now} UP TO {up_to}")).await;
    assert_eq!(r.len(), 1);
    assert!(row_ts(&r[0]) < up_to);
    // A cursor whose subscription ended returns 0 rows at once.
    let now = engine_now(&c).await;
    let up_to = now + 200;
    rows(
        &c,
        &format!(
            "BEGIN; DECLARE c CURSOR FOR SUBSCRIBE t WITH (PROGRESS) AS OF {now} UP TO {up_to}"
        ),
    )
    .await;
    let mut seen = 0;
    loop {
        let r = rows(&c, "FETCH ALL c").await;
        if r.is_empty() {
            break;
        }
        seen += r.len();
        assert!(r.iter().all(|row| row_ts(row) < up_to));
    }
    assert!(seen >= 2, "snapshot and progress before UP TO");
    // "At once": a cursor that waited here would wait for rows that never come
    // (until `rows` gives up), so 2 s tells as well as a tighter bound, and holds
    // on a loaded machine.
    let started = Instant::now();
    assert!(rows(&c, "FETCH ALL c").await.is_empty());
    assert!(started.elapsed() < Duration::from_secs(2));
    rows(&c, "COMMIT").await;
    e.stop().await;
}

async fn engine_now(c: &Client) -> u64 {
    row_ts(&rows(c, "SELECT mz_epoch_ms()").await[0])
}

#[tokio::test]
async fn constant_queries_complete() {
    let e = TestEngine::start().await;
    let c = e.connect().await;
    for q in ["SUBSCRIBE (SELECT 1)", "SUBSCRIBE (SELECT 1) AS OF 42"] {
        let r = rows(
            &c,
            &format!("BEGIN; DECLARE c CURSOR FOR {q}; FETCH ALL c; COMMIT"),
        )
        .await;
        assert_eq!(
            r,
            vec![vec![s("18446744073709551615"), s("1"), s("1")]],
            "{q}"
        );
    }
    rows(&c, "CREATE MATERIALIZED VIEW foo AS VALUES (1), (2), (3)").await;
    assert!(rows(&c, "SUBSCRIBE foo WITH (SNAPSHOT = false)")
        .await
        .is_empty());
    let r = rows(&c, "SUBSCRIBE foo WITH (SNAPSHOT)").await;
    assert_eq!(r.len(), 3);
    assert_eq!(e.stats().subscriptions, 0);
    e.stop().await;
}

#[tokio::test]
async fn consolidation_and_fetch_timing() {
    let e = TestEngine::start().await;
    let c = e.connect().await;
    let w = e.connect().await;
    rows(&c, "CREATE TABLE t (data text)").await;
    rows(&c, "BEGIN; DECLARE c CURSOR FOR SUBSCRIBE t").await;
    rows(
        &w,
        "INSERT INTO t VALUES ('line 42'), ('line 42'), ('line 42')",
    )
    .await;
    let r = rows(&c, "FETCH ALL c").await;
    assert_eq!(r.len(), 1);
    assert_eq!((r[0][1].clone(), r[0][2].clone()), (s("3"), s("line 42")));
    // Two identical inserts in one write transaction: one row, diff 2, one timestamp.
    rows(
        &w,
        "BEGIN; INSERT INTO t VALUES ('x'); INSERT INTO t VALUES ('x'); COMMIT",
    )
    .await;
    let r = rows(&c, "FETCH ALL c").await;
    assert_eq!((r.len(), r[0][1].clone()), (1, s("2")));
    // FETCH ALL with a timeout waits the full timeout; 0s returns at once.
    let started = Instant::now();
    assert!(rows(&c, "FETCH ALL c WITH (timeout = '300ms')")
        .await
        .is_empty());
    assert!(started.elapsed() >= Duration::from_millis(300));
    // "At once": a FETCH that ignored the 0 s timeout would wait for a row that
    // never comes (until `rows` gives up), so 2 s tells as well as a tighter bound,
    // and holds on a loaded machine.
    let started = Instant::now();
    assert!(rows(&c, "FETCH ALL c WITH (timeout = '0s')")
        .await
        .is_empty());
    assert!(started.elapsed() < Duration::from_secs(2));
    // FETCH n with timeout returns as soon as n rows are there.
    rows(&w, "INSERT INTO t VALUES ('a'), ('b'), ('c')").await;
    let started = Instant::now();
    assert_eq!(rows(&c, "FETCH 3 c WITH (timeout = '1d')").await.len(), 3);
    assert!(started.elapsed() < Duration::from_secs(2));
    // FETCH 4 with 3 rows waits out the timeout and returns 3.
    rows(&w, "INSERT INTO t VALUES ('d'), ('e'), ('f')").await;
    let started = Instant::now();
    assert_eq!(
        rows(&c, "FETCH 4 c WITH (timeout = '300ms')").await.len(),
        3
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    // FETCH without timeout blocks until a row arrives, then returns up to n.
    let fetch = rows(&c, "FETCH c");
    tokio::pin!(fetch);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut fetch)
            .await
            .is_err(),
        "FETCH returned before any row arrived"
    );
    rows(&w, "INSERT INTO t VALUES ('g'), ('h')").await;
    assert_eq!(fetch.await.len(), 1);
    assert_eq!(rows(&c, "FETCH c").await.len(), 1);
    // FETCH 0 returns nothing and does not wait.
    assert!(rows(&c, "FETCH 0 c").await.is_empty());
    rows(&c, "COMMIT").await;
    // A SELECT cursor over an empty table never blocks.
    rows(&c, "CREATE TABLE empty (a int)").await;
    let r = rows(
        &c,
        "BEGIN; DECLARE s CURSOR FOR SELECT * FROM empty; FETCH ALL s; FETCH s; COMMIT",
    )
    .await;
    assert!(r.is_empty());
    e.stop().await;
}

#[tokio::test]
async fn cursor_wire_basics() {
    let e = TestEngine::start().await;
    let c = e.connect().await;
    rows(
        &c,
        "CREATE TABLE t (a int); INSERT INTO t VALUES (1), (2), (3)",
    )
    .await;
    // Multi-statement simple query is one implicit transaction.
    let msgs = bounded(c.simple_query("DECLARE c CURSOR FOR SUBSCRIBE t; FETCH 2 c; FETCH 10 c"))
        .await
        .unwrap();
    let counts: Vec<u64> = msgs
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .collect();
    assert_eq!(counts, vec![0, 2, 1]);
    // The cursor is gone after the implicit transaction.
    assert_eq!(error(&c, "FETCH c").await.0, "34000");
    rows(&c, "DECLARE c CURSOR FOR SUBSCRIBE t").await;
    assert_eq!(error(&c, "FETCH c").await.0, "34000");
    // Duplicate cursors and unknown cursors.
    rows(&c, "BEGIN; DECLARE c CURSOR FOR SUBSCRIBE t").await;
    assert_eq!(
        error(&c, "DECLARE c CURSOR FOR SUBSCRIBE t").await.0,
        "42P03"
    );
    // The failed transaction rejects statements until it ends.
    assert_eq!(error(&c, "SELECT 1").await.0, "25P02");
    rows(&c, "ROLLBACK").await;
    rows(&c, "BEGIN; DECLARE c CURSOR FOR SUBSCRIBE t").await;
    assert_eq!(rows(&c, "FETCH 0 c").await.len(), 0);
    rows(&c, "CLOSE c").await;
    assert_eq!(error(&c, "FETCH c").await.0, "34000");
    rows(&c, "ROLLBACK").await;
    e.stop().await;
}

#[tokio::test]
async fn extended_protocol_prepare_and_fetch() {
    let e = TestEngine::start().await;
    let mut c = e.connect().await;
    bounded(c.batch_execute(
        "CREATE TABLE t (id bigint, name text, ok boolean, score double precision, n numeric);
         CREATE VIEW v AS SELECT id, name, ok, score, count(*) AS c, sum(id) AS s FROM t GROUP BY id, name, ok, score",
    ))
    .await
    .unwrap();
    let st = bounded(c.prepare("SELECT * FROM v")).await.unwrap();
    let cols: Vec<(&str, u32)> = st
        .columns()
        .iter()
        .map(|c| (c.name(), c.type_().oid()))
        .collect();
    assert_eq!(
        cols,
        vec![
            ("id", 20),
            ("name", 25),
            ("ok", 16),
            ("score", 701),
            ("c", 20),
            ("s", 20)
        ]
    );
    bounded(c.execute(
        "INSERT INTO t VALUES (1, 'a\tb\nc \"q\" ünï', true, 2.5, 1.25)",
        &[],
    ))
    .await
    .unwrap();
    let r = bounded(c.query("SELECT * FROM v", &[])).await.unwrap();
    assert_eq!(r[0].get::<_, i64>(0), 1);
    assert_eq!(r[0].get::<_, String>(1), "a\tb\nc \"q\" ünï");
    assert!(r[0].get::<_, bool>(2));
    assert_eq!(r[0].get::<_, f64>(3), 2.5);
    assert_eq!(r[0].get::<_, i64>(4), 1);
    // Parameters bound as text.
    let r = bounded(c.query("SELECT name FROM t WHERE id = $1::bigint", &[&"1"]))
        .await
        .unwrap();
    assert_eq!(r.len(), 1);
    // FETCH through the extended protocol inside a transaction.
    let tx = bounded(c.transaction()).await.unwrap();
    bounded(tx.batch_execute("DECLARE c CURSOR FOR SUBSCRIBE (SELECT id, name, ok FROM t)"))
        .await
        .unwrap();
    let r = bounded(tx.query("FETCH ALL c", &[])).await.unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].get::<_, i64>("mz_diff"), 1);
    assert_eq!(r[0].get::<_, i64>("id"), 1);
    assert!(r[0].get::<_, bool>("ok"));
    bounded(tx.commit()).await.unwrap();
    e.stop().await;
}

#[tokio::test]
async fn aggregate_change_is_a_retraction_insertion_pair() {
    let e = TestEngine::start().await;
    let c = e.connect().await;
    let w = e.connect().await;
    rows(&c, "CREATE TABLE t (a int); INSERT INTO t VALUES (1), (2); CREATE VIEW n AS SELECT count(*) AS total FROM t").await;
    rows(
        &c,
        "BEGIN; DECLARE c CURSOR FOR SUBSCRIBE n WITH (PROGRESS)",
    )
    .await;
    let snap = rows(&c, "FETCH ALL c WITH (timeout = '100ms')").await;
    assert!(snap.iter().any(|r| r[1] == s("f") && r[3] == s("2")));
    rows(&w, "INSERT INTO t VALUES (3)").await;
    let data = fetch_data(&c, 2).await;
    let mut diffs: Vec<(Option<String>, Option<String>)> =
        data.iter().map(|r| (r[2].clone(), r[3].clone())).collect();
    diffs.sort();
    assert_eq!(diffs, vec![(s("-1"), s("2")), (s("1"), s("3"))]);
    assert_eq!(data[0][0], data[1][0], "same timestamp");
    rows(&c, "COMMIT").await;
    e.stop().await;
}

/// Collects data rows (mz_progressed = f) from a PROGRESS cursor until `n` arrived.
async fn fetch_data(c: &Client, n: usize) -> Vec<Vec<Option<String>>> {
    let mut data = Vec::new();
    let deadline = Instant::now() + LIMIT;
    while data.len() < n {
        assert!(Instant::now() < deadline, "only {} of {n} rows", data.len());
        let batch = rows(c, "FETCH ALL c WITH (timeout = '50ms')").await;
        for r in batch {
            if r[1] == s("f") {
                data.push(r);
            }
        }
    }
    data
}

/// Checks that PROGRESS cursor `c` has only progress rows to give.
///
/// No rows at all passes too, on purpose: with the default 1 s tick a progress row
/// need not come within 100 ms, and what is checked is that no data row is left.
/// Callers use it after reading the changes of writes already made, so a data row
/// still to come would be there at once, not after the window.
async fn assert_only_progress(c: &Client) {
    let left = rows(c, "FETCH ALL c WITH (timeout = '100ms')").await;
    assert!(left.iter().all(|r| r[1] == s("t")), "{left:?}");
}

#[tokio::test]
async fn as_of_replays_history() {
    let e = TestEngine::start().await;
    let c = e.connect().await;
    let w = e.connect().await;
    rows(
        &c,
        "CREATE TABLE t (a int); CREATE VIEW n AS SELECT count(*) AS total FROM t",
    )
    .await;
    rows(
        &c,
        "BEGIN; DECLARE c CURSOR FOR SUBSCRIBE t WITH (PROGRESS)",
    )
    .await;
    for v in 1..=3 {
        rows(&w, &format!("INSERT INTO t VALUES ({v})")).await;
    }
    let live = fetch_data(&c, 3).await;
    rows(&c, "COMMIT").await;
    let ts: Vec<u64> = live.iter().map(|r| row_ts(r)).collect();
    assert!(ts[0] < ts[1] && ts[1] < ts[2]);

    // With SNAPSHOT: state at AS OF stamped AS OF, then later changes at their own time.
    rows(
        &c,
        &format!(
            "BEGIN; DECLARE c CURSOR FOR SUBSCRIBE t WITH (PROGRESS) AS OF {}",
            ts[1]
        ),
    )
    .await;
    let got = fetch_data(&c, 3).await;
    let got: Vec<(u64, String)> = got
        .iter()
        .map(|r| (row_ts(r), r[3].clone().unwrap()))
        .collect();
    assert_eq!(
        got,
        vec![
            (ts[1], "1".into()),
            (ts[1], "2".into()),
            (ts[2], "3".into())
        ]
    );
    assert_only_progress(&c).await;
    rows(&c, "COMMIT").await;

    // SNAPSHOT = false: only changes strictly after AS OF.
    rows(
        &c,
        &format!(
            "BEGIN; DECLARE c CURSOR FOR SUBSCRIBE t WITH (PROGRESS, SNAPSHOT = false) AS OF {}",
            ts[1]
        ),
    )
    .await;
    let got = fetch_data(&c, 1).await;
    assert_eq!(
        (got[0][0].clone(), got[0][3].clone()),
        (Some(ts[2].to_string()), s("3"))
    );
    assert_only_progress(&c).await;
    rows(&c, "COMMIT").await;

    // A view is re-evaluated over the reconstructed past.
    rows(
        &c,
        &format!(
            "BEGIN; DECLARE c CURSOR FOR SUBSCRIBE n WITH (PROGRESS) AS OF {}",
            ts[0]
        ),
    )
    .await;
    let got = fetch_data(&c, 5).await;
    let got: Vec<(u64, String, String)> = got
        .iter()
        .map(|r| (row_ts(r), r[2].clone().unwrap(), r[3].clone().unwrap()))
        .collect();
    assert_eq!(
        got,
        vec![
            (ts[0], "1".into(), "1".into()),
            (ts[1], "-1".into(), "1".into()),
            (ts[1], "1".into(), "2".into()),
            (ts[2], "-1".into(), "2".into()),
            (ts[2], "1".into(), "3".into()),
        ]
    );
    rows(&c, "COMMIT").await;

    // Before the retained history: Materialize's error, at DECLARE time.
    let (code, msg) = error(&c, "BEGIN; DECLARE c CURSOR FOR SUBSCRIBE t AS OF 1").await;
    assert_eq!(code, "XX000");
    assert!(
        msg.starts_with("Timestamp (1) is not valid for all inputs: [Antichain { elements: ["),
        "{msg}"
    );
    rows(&c, "ROLLBACK").await;
    // AT LEAST picks the oldest valid time instead.
    rows(
        &c,
        "BEGIN; DECLARE c CURSOR FOR SUBSCRIBE t WITH (PROGRESS) AS OF AT LEAST 1",
    )
    .await;
    assert_eq!(fetch_data(&c, 3).await.len(), 3);
    rows(&c, "COMMIT").await;
    e.stop().await;
}

#[tokio::test]
async fn legacy_tail() {
    let e = TestEngine::with(EngineConfig {
        legacy: true,
        ..EngineConfig::default()
    })
    .await;
    let c = e.connect().await;
    let r = rows(&c, "SELECT mz_version(), mz_version_num()").await;
    assert!(r[0][0].as_deref().unwrap().starts_with("v0.26.4 ("));
    assert_eq!(r[0][1], s("2604"));
    assert_eq!(error(&c, "SUBSCRIBE (SELECT 1)").await.0, "42601");
    rows(&c, "CREATE TABLE t (a int); INSERT INTO t VALUES (7)").await;
    let cols = columns(
        &c,
        "BEGIN; DECLARE c CURSOR FOR TAIL t WITH (PROGRESS); FETCH 0 c",
    )
    .await;
    assert_eq!(cols.join(" "), "mz_timestamp mz_progressed mz_diff a");
    // No initial progress row in the TAIL era: the snapshot comes first.
    let r = rows(&c, "FETCH 1 c").await;
    assert_eq!((r[0][1].clone(), r[0][3].clone()), (s("f"), s("7")));
    rows(&c, "COMMIT").await;
    let r = rows(
        &c,
        "BEGIN; DECLARE c CURSOR FOR TAIL (SELECT 123) (PROGRESS = true); FETCH ALL c; COMMIT",
    )
    .await;
    assert_eq!(r, vec![vec![s("0"), s("f"), s("1"), s("123")]]);
    e.stop().await;
    let e = TestEngine::start().await;
    let c = e.connect().await;
    assert_eq!(
        error(&c, "TAIL t").await,
        ("42601".into(), "TAIL has been renamed to SUBSCRIBE".into())
    );
    e.stop().await;
}

#[tokio::test]
async fn envelope_upsert() {
    let e = TestEngine::start().await;
    let c = e.connect().await;
    let w = e.connect().await;
    rows(
        &c,
        "CREATE TABLE t (k int, v text); INSERT INTO t VALUES (1, 'a')",
    )
    .await;
    rows(
        &c,
        "BEGIN; DECLARE c CURSOR FOR SUBSCRIBE t ENVELOPE UPSERT (KEY (k)) WITH (PROGRESS)",
    )
    .await;
    let got = fetch_data(&c, 1).await;
    assert_eq!(got[0][2..], [s("upsert"), s("1"), s("a")]);
    rows(&w, "UPDATE t SET v = 'b' WHERE k = 1").await;
    assert_eq!(
        fetch_data(&c, 1).await[0][2..],
        [s("upsert"), s("1"), s("b")]
    );
    rows(&w, "DELETE FROM t WHERE k = 1").await;
    assert_eq!(fetch_data(&c, 1).await[0][2..], [s("delete"), s("1"), None]);
    rows(&w, "INSERT INTO t VALUES (2, 'x'), (2, 'y')").await;
    assert_eq!(
        fetch_data(&c, 1).await[0][2..],
        [s("key_violation"), s("2"), None]
    );
    rows(&c, "COMMIT").await;
    e.stop().await;
}

#[tokio::test]
async fn errors_keep_connections_usable() {
    let e = TestEngine::start().await;
    let c = e.connect().await;
    let other = e.connect().await;
    rows(&c, "CREATE TABLE t (a int)").await;
    rows(
        &other,
        "BEGIN; DECLARE c CURSOR FOR SUBSCRIBE t WITH (PROGRESS)",
    )
    .await;
    assert_eq!(error(&c, "SELEC 1").await.0, "42601");
    assert_eq!(rows(&c, "SELECT 1").await, vec![vec![s("1")]]);
    assert_eq!(
        error(&c, "SELECT * FROM nope").await,
        ("42P01".into(), "unknown catalog item 'nope'".into())
    );
    assert_eq!(error(&c, "SUBSCRIBE nope").await.0, "42P01");
    assert_eq!(error(&c, "CREATE SOURCE s FROM x").await.0, "0A000");
    assert_eq!(error(&c, "BEGIN; SELECT * FROM nope").await.0, "42P01");
    assert_eq!(error(&c, "INSERT INTO t VALUES (1)").await.0, "25P02");
    rows(&c, "ROLLBACK").await;
    // The other connection still streams.
    rows(&c, "INSERT INTO t VALUES (5)").await;
    assert_eq!(fetch_data(&other, 1).await[0][3], s("5"));
    e.stop().await;
}

#[tokio::test]
async fn disconnect_frees_subscription() {
    let e = TestEngine::start().await;
    let observer = e.connect().await;
    rows(&observer, "CREATE TABLE t (a int)").await;
    let gone = e.connect().await;
    rows(&gone, "BEGIN; DECLARE c CURSOR FOR SUBSCRIBE t").await;
    let streaming = e.connect().await;
    let cancel = streaming.cancel_token();
    let stream =
        tokio::spawn(async move { streaming.simple_query("SUBSCRIBE t").await.map(|_| ()) });
    wait_subscriptions(&observer, 2).await;
    assert_eq!(e.stats().subscriptions, 2);
    assert_eq!(e.stats().sessions, 3);
    drop(gone);
    wait_subscriptions(&observer, 1).await;
    // A cancel request ends the streaming query with 57014.
    bounded(cancel.cancel_query(NoTls)).await.unwrap();
    let err = bounded(stream).await.unwrap().expect_err("cancelled");
    assert_eq!(err.code().map(|c| c.code()), Some("57014"));
    wait_subscriptions(&observer, 0).await;
    // Only the observer is left: the other two clients are gone.
    wait_for("one session", LIMIT, || async {
        (e.stats().sessions == 1).then_some(())
    })
    .await;
    e.stop().await;
}

#[tokio::test]
async fn drop_ends_plain_subscribe_and_copy() {
    let e = TestEngine::start().await;
    let c = e.connect().await;
    for kind in ["simple", "extended", "copy"] {
        rows(&c, "CREATE TABLE t (a int); INSERT INTO t VALUES (1)").await;
        let sub = e.connect().await;
        let task = tokio::spawn(async move {
            match kind {
                "simple" => sub.simple_query("SUBSCRIBE t").await.map(|m| m.len()),
                "extended" => {
                    drain(
                        sub.query_raw("SUBSCRIBE t", std::iter::empty::<i32>())
                            .await?,
                    )
                    .await
                }
                _ => drain(sub.copy_out("COPY (SUBSCRIBE t) TO STDOUT").await?).await,
            }
        });
        wait_subscriptions(&c, 1).await;
        rows(&c, "DROP TABLE t").await;
        let err = bounded(task).await.unwrap().expect_err(kind);
        let db = err.as_db_error().unwrap_or_else(|| panic!("{kind}: {err}"));
        assert_eq!(db.code().code(), "42704", "{kind}");
        assert_eq!(
            db.message(),
            "relation 'materialize.public.t' was dropped",
            "{kind}"
        );
    }
    e.stop().await;
}

async fn next_line(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) -> String {
    bounded(lines.next_line())
        .await
        .expect("read psql")
        .expect("a line from psql")
}

/// Needs psql at `/usr/bin/psql` (`.ci/run` installs it); without it the test fails
/// unless `TAILGATE_SKIP_PSQL=1` says to skip it.
#[tokio::test]
async fn psql_copy_subscribe_receives_writes() {
    let psql = std::path::Path::new("/usr/bin/psql");
    if !psql.exists() {
        assert!(
            std::env::var_os("TAILGATE_SKIP_PSQL").is_some_and(|v| v == "1"),
            "{} is missing: install postgresql-client (.ci/run does), \
             or set TAILGATE_SKIP_PSQL=1 to skip this test",
            psql.display()
        );
        eprintln!(
            "{} missing and TAILGATE_SKIP_PSQL=1: skipping",
            psql.display()
        );
        return;
    }
    let e = TestEngine::start().await;
    let c = e.connect().await;
    rows(
        &c,
        "CREATE TABLE t (a int, b text); INSERT INTO t VALUES (1, 'before')",
    )
    .await;
    // stdbuf makes psql flush each row, so every line can be read as it arrives.
    let mut child = tokio::process::Command::new("stdbuf")
        .arg("-oL")
        .arg(psql)
        .args([
            "-X",
            "-h",
            "127.0.0.1",
            "-p",
            &e.addr().port().to_string(),
            "-U",
            "materialize",
            "-d",
            "materialize",
            "-c",
            "COPY (SUBSCRIBE t) TO STDOUT",
        ])
        .env("PGCONNECT_TIMEOUT", "5")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn psql");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let first = next_line(&mut lines).await;
    assert_eq!(
        first.split('\t').skip(1).collect::<Vec<_>>(),
        ["1", "1", "before"]
    );
    // Each row written by another connection reaches psql while COPY runs.
    rows(&c, "INSERT INTO t VALUES (2, 'tab\there')").await;
    let second = next_line(&mut lines).await;
    assert_eq!(
        second.split('\t').skip(1).collect::<Vec<_>>(),
        ["1", "2", "tab\\there"]
    );
    rows(&c, "INSERT INTO t VALUES (3, NULL)").await;
    let third = next_line(&mut lines).await;
    assert_eq!(
        third.split('\t').skip(1).collect::<Vec<_>>(),
        ["1", "3", "\\N"]
    );
    let ts: Vec<u64> = [&first, &second, &third]
        .iter()
        .map(|l| {
            l.split('\t')
                .next()
                .and_then(|t| t.parse().ok())
                .expect("timestamp")
        })
        .collect();
    assert!(ts[0] < ts[1] && ts[1] < ts[2]);
    // Dropping the table ends the COPY with Materialize's error, and psql exits.
    rows(&c, "DROP TABLE t").await;
    let out = bounded(child.wait_with_output()).await.expect("psql exits");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("relation 'materialize.public.t' was dropped"),
        "{stderr}"
    );
    e.stop().await;
}

#[tokio::test]
async fn sustained_writes_reach_subscriber() {
    let e = TestEngine::start().await;
    let c = e.connect().await;
    let w = e.connect().await;
    rows(&c, "CREATE TABLE t (a int); CREATE VIEW v AS SELECT a % 10 AS k, count(*) AS n FROM t GROUP BY a % 10").await;
    rows(&c, "BEGIN; DECLARE c CURSOR FOR SUBSCRIBE v").await;
    let n = 300;
    for i in 0..n {
        bounded(w.execute(&format!("INSERT INTO t VALUES ({i})"), &[]))
            .await
            .unwrap();
    }
    // Each insert changes one group: -1 old count (except the first per group), +1 new.
    let mut got = 0;
    let deadline = Instant::now() + LIMIT;
    while got < 2 * n - 10 {
        assert!(Instant::now() < deadline, "got {got}");
        got += rows(&c, "FETCH ALL c WITH (timeout = '50ms')").await.len();
    }
    assert_eq!(got, 2 * n - 10);
    rows(&c, "COMMIT").await;
    e.stop().await;
}

/// Only a query may stand inside SUBSCRIBE (...), COPY (...) and DECLARE ...
/// FOR, as in Materialize: anything else is a syntax error, however often it
/// is tried, and tables, rows and catalog stay as they were.
#[tokio::test]
async fn only_queries_inside_subscribe_copy_and_declare() {
    let e = TestEngine::start().await;
    let c = e.connect().await;
    rows(
        &c,
        "CREATE TABLE t (a int); CREATE TABLE z (b int);
         INSERT INTO t VALUES (1), (2); INSERT INTO z VALUES (3)",
    )
    .await;
    for attempt in [
        "SUBSCRIBE (DROP TABLE z)",
        "SUBSCRIBE (DELETE FROM t)",
        "SUBSCRIBE (INSERT INTO t VALUES (3))",
        "SUBSCRIBE (WITH x AS (DELETE FROM t RETURNING a) SELECT * FROM x)",
        "SUBSCRIBE (WITH x AS (SELECT 1) DELETE FROM t)",
        "SUBSCRIBE ((SELECT a FROM t) UNION (DELETE FROM t))",
        "COPY (DELETE FROM t) TO STDOUT",
        "COPY (DROP TABLE z) TO STDOUT",
        "COPY (SUBSCRIBE (DROP TABLE z)) TO STDOUT",
        "COPY (WITH x AS (SELECT 1) UPDATE t SET a = 0) TO STDOUT",
        "DECLARE c CURSOR FOR DELETE FROM t",
        "BEGIN; DECLARE c CURSOR FOR WITH x AS (SELECT 1) DELETE FROM t",
        "BEGIN; DECLARE c CURSOR FOR SUBSCRIBE (DROP TABLE z)",
        "WITH x AS (SELECT 1) DELETE FROM t",
        "CREATE VIEW v AS DROP TABLE z",
    ] {
        for _ in 0..2 {
            let (code, msg) = error(&c, attempt).await;
            assert_eq!(code, "42601", "{attempt}: {msg}");
            rows(&c, "ROLLBACK").await;
        }
    }
    assert_eq!(
        error(&c, "SUBSCRIBE (DROP TABLE z)").await.1,
        "Expected SELECT, VALUES, or a subquery in the query body, found DROP"
    );
    assert_eq!(
        error(&c, "COPY (DELETE FROM t) TO STDOUT").await.1,
        "unsupported query in COPY"
    );
    // The extended protocol refuses them at Parse.
    for attempt in [
        "SUBSCRIBE (DELETE FROM t)",
        "COPY (DELETE FROM t) TO STDOUT",
    ] {
        let err = bounded(c.prepare(attempt)).await.expect_err(attempt);
        assert_eq!(err.code().map(|c| c.code()), Some("42601"), "{attempt}");
    }
    // Tables, rows and catalog are as they were.
    assert_eq!(
        rows(&c, "SELECT a FROM t ORDER BY a").await,
        vec![vec![s("1")], vec![s("2")]]
    );
    assert_eq!(rows(&c, "TABLE z").await, vec![vec![s("3")]]);
    assert_eq!(
        error(&c, "CREATE TABLE z (b int)").await,
        ("42P07".into(), "catalog item 'z' already exists".into())
    );
    assert!(error(&c, "SELECT * FROM v").await.1.contains("'v'"));
    // Every query form Materialize takes there still runs.
    let r = rows(
        &c,
        "BEGIN; DECLARE c CURSOR FOR SUBSCRIBE ((SELECT a FROM t) UNION ALL (TABLE z));
         FETCH 3 c; COMMIT",
    )
    .await;
    let mut got: Vec<Option<String>> = r.iter().map(|r| r[2].clone()).collect();
    got.sort();
    assert_eq!(got, vec![s("1"), s("2"), s("3")]);
    let r = rows(
        &c,
        "BEGIN; DECLARE c CURSOR FOR (VALUES (7)); FETCH ALL c; COMMIT",
    )
    .await;
    assert_eq!(r, vec![vec![s("7")]]);
    let copied = bounded(drain(
        bounded(c.copy_out("COPY (TABLE t) TO STDOUT"))
            .await
            .unwrap(),
    ))
    .await
    .unwrap();
    assert_eq!(copied, 2);
    assert_eq!(e.stats().subscriptions, 0);
    e.stop().await;
}

/// A double-quoted name is always a column, as in Materialize: an unknown one
/// is 42703 `column "x" does not exist`, never the string 'x'.
#[tokio::test]
async fn unknown_columns_as_materialize_reports_them() {
    let e = TestEngine::start().await;
    let c = e.connect().await;
    rows(&c, crate::support::ITEMS_INIT).await;
    for (q, column) in [
        ("SELECT \"nosuchcol\" FROM items", "nosuchcol"),
        ("SELECT NoSuchCol FROM items", "nosuchcol"),
        ("SELECT items.nosuchcol FROM items", "items.nosuchcol"),
        ("SUBSCRIBE (SELECT \"nosuchcol\" FROM items)", "nosuchcol"),
        (
            "BEGIN; DECLARE c CURSOR FOR SELECT id FROM items WHERE name = \"one\"",
            "one",
        ),
        ("COPY (SELECT \"x\" FROM items) TO STDOUT", "x"),
        ("UPDATE items SET name = \"two\"", "two"),
        (
            "CREATE VIEW v AS SELECT \"nosuchcol\" FROM items",
            "nosuchcol",
        ),
    ] {
        assert_eq!(
            error(&c, q).await,
            (
                "42703".into(),
                format!("column \"{column}\" does not exist")
            ),
            "{q}"
        );
        rows(&c, "ROLLBACK").await;
    }
    let err = bounded(c.prepare("SELECT \"nosuchcol\" FROM items"))
        .await
        .expect_err("describe");
    let db = err.as_db_error().expect("a server error");
    assert_eq!(
        (db.code().code(), db.message()),
        ("42703", "column \"nosuchcol\" does not exist")
    );
    // Single-quoted strings are literals; double-quoted names resolve.
    assert_eq!(
        rows(
            &c,
            "SELECT 'nosuchcol', \"name\" FROM items WHERE \"id\" = 1 AND name = 'one'"
        )
        .await,
        vec![vec![s("nosuchcol"), s("one")]]
    );
    e.stop().await;
}

/// AS OF in the future waits, as in Materialize: FETCH returns nothing (with
/// PROGRESS, only the progress row at AS OF) until the clock reaches AS OF, by
/// wall time here. Then the snapshot at AS OF comes, holding the writes made
/// before it, and later writes follow at their own timestamps. Each write's
/// timestamp is read from a second subscription.
#[tokio::test]
async fn as_of_in_the_future_waits_for_the_clock() {
    let e = TestEngine::start().await;
    let c = e.connect().await;
    let w = e.connect().await;
    let observer = e.connect().await;
    rows(&c, "CREATE TABLE t (a int); INSERT INTO t VALUES (1)").await;
    rows(
        &observer,
        "BEGIN; DECLARE o CURSOR FOR SUBSCRIBE t WITH (SNAPSHOT = false)",
    )
    .await;
    // Writes `v` and returns its timestamp.
    let write = |v: i64| {
        let (w, observer) = (&w, &observer);
        async move {
            rows(w, &format!("INSERT INTO t VALUES ({v})")).await;
            let r = rows(observer, "FETCH 1 o").await;
            assert_eq!(r[0][2], Some(v.to_string()));
            row_ts(&r[0])
        }
    };
    let mut value = 1;
    for (at_least, progress) in [("", false), ("AT LEAST ", true)] {
        let as_of = engine_now(&c).await + 800;
        let options = if progress { "WITH (PROGRESS) " } else { "" };
        rows(
            &c,
            &format!("BEGIN; DECLARE c CURSOR FOR SUBSCRIBE t {options}AS OF {at_least}{as_of}"),
        )
        .await;
        let early = rows(&c, "FETCH ALL c WITH (timeout = '100ms')").await;
        value += 1;
        let before = write(value).await;
        assert!(
            before < as_of,
            "the steps before AS OF took over 800 ms; the test cannot tell"
        );
        if progress {
            assert_eq!(
                early,
                vec![vec![s(&as_of.to_string()), s("t"), None, None]],
                "only the progress row at AS OF"
            );
        } else {
            assert!(early.is_empty(), "{early:?}");
        }
        // Waits for the clock, then the snapshot at AS OF with every row so far.
        let r = rows(&c, "FETCH ALL c").await;
        assert!(engine_now(&c).await >= as_of);
        let data: Vec<&Vec<Option<String>>> =
            r.iter().filter(|r| !progress || r[1] == s("f")).collect();
        let mut snapshot: Vec<(u64, i64)> = data
            .iter()
            .map(|r| {
                (
                    row_ts(r),
                    r[r.len() - 1].as_deref().unwrap().parse().unwrap(),
                )
            })
            .collect();
        snapshot.sort();
        let want: Vec<(u64, i64)> = (1..=value).map(|v| (as_of, v)).collect();
        assert_eq!(snapshot, want);
        // A write now comes as an update at its own, later timestamp.
        value += 1;
        let after = write(value).await;
        assert!(after > as_of);
        let update = if progress {
            fetch_data(&c, 1).await
        } else {
            rows(&c, "FETCH ALL c").await
        };
        assert_eq!(update.len(), 1);
        assert_eq!(row_ts(&update[0]), after);
        assert_eq!(update[0][update[0].len() - 1], Some(value.to_string()));
        rows(&c, "COMMIT").await;
    }
    rows(&observer, "COMMIT").await;
    e.stop().await;
}
