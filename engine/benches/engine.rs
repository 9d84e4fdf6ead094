//! Engine throughput: single-row INSERTs per second over real pgwire, with and
//! without one subscriber, and the per-write cost as a subscribed view grows
//! (1k, 10k, 100k rows) for an aggregate, a grouped, an identity and a filtered
//! view.
//! Every write is its own statement and timestamp, and a subscribed run only
//! ends when its subscriber has FETCHed every diff.
//!
//! Run: `cargo bench --bench engine` (prints a Markdown table).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tailgate_engine::{self as engine, EngineConfig};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};
use tokio_util::sync::CancellationToken;

/// Upper bound on writes per scenario and on its duration.
const MAX_WRITES: usize = 10_000;
const MAX_TIME: Duration = Duration::from_secs(3);

async fn connect(addr: SocketAddr) -> Client {
    let url = format!(
        "host=127.0.0.1 port={} user=bench dbname=materialize",
        addr.port()
    );
    let (client, conn) = tokio_postgres::connect(&url, NoTls).await.expect("connect");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

struct Scenario {
    name: &'static str,
    /// Rows preloaded into `t` (and so in an identity view).
    preload: usize,
    /// What the subscriber reads, if anything.
    subscribe: Option<&'static str>,
    /// Diff rows the write of `a` produces for that subscriber.
    diffs: fn(usize) -> usize,
}

struct Outcome {
    writes: usize,
    elapsed: Duration,
}

async fn run(s: &Scenario) -> Outcome {
    let shutdown = CancellationToken::new();
    let config = EngineConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..EngineConfig::default()
    };
    let engine = engine::start(config, shutdown.clone())
        .await
        .expect("engine");
    let addr = engine.local_addr();
    let setup = connect(addr).await;
    setup
        .batch_execute(
            "CREATE TABLE t (a int, b text);
             CREATE VIEW everything AS SELECT a, b FROM t;
             CREATE VIEW total AS SELECT count(*) AS n, sum(a) AS s FROM t;
             CREATE VIEW groups AS SELECT a % 10 AS k, count(*) AS n FROM t GROUP BY a % 10;
             CREATE VIEW by_a AS SELECT a, count(*) AS n, sum(a) AS s FROM t GROUP BY a;
             CREATE VIEW tenth AS SELECT a, b FROM t WHERE a % 10 = 0;",
        )
        .await
        .expect("schema");
    if s.preload > 0 {
        setup
            .batch_execute(&format!(
                "INSERT INTO t WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {}) SELECT x, 'row ' || x FROM c",
                s.preload
            ))
            .await
            .expect("preload");
    }
    let reader = match s.subscribe {
        Some(rel) => {
            let sub = connect(addr).await;
            sub.batch_execute(&format!(
                "BEGIN; DECLARE c CURSOR FOR SUBSCRIBE {rel} WITH (SNAPSHOT = false)"
            ))
            .await
            .expect("declare");
            let (tx, rx) = tokio::sync::watch::channel(0usize);
            let task = tokio::spawn(async move {
                let mut seen = 0usize;
                loop {
                    // Without a timeout FETCH returns as soon as diffs are there, so
                    // the end of a run is not rounded up to a timeout step.
                    let msgs = match sub.simple_query("FETCH ALL c").await {
                        Ok(m) => m,
                        Err(_) => return,
                    };
                    seen += msgs
                        .iter()
                        .filter(|m| matches!(m, SimpleQueryMessage::Row(_)))
                        .count();
                    if tx.send(seen).is_err() {
                        return;
                    }
                }
            });
            Some((rx, task))
        }
        None => None,
    };
    let writer = connect(addr).await;
    let started = Instant::now();
    let mut writes = 0;
    while writes < MAX_WRITES && started.elapsed() < MAX_TIME {
        let a = s.preload + writes + 1;
        writer
            .simple_query(&format!("INSERT INTO t VALUES ({a}, 'row {a}')"))
            .await
            .expect("insert");
        writes += 1;
    }
    if let Some((mut rx, task)) = reader {
        let want: usize = (1..=writes).map(|w| (s.diffs)(s.preload + w)).sum();
        let waited =
            tokio::time::timeout(Duration::from_secs(120), rx.wait_for(|seen| *seen >= want)).await;
        assert!(
            matches!(waited, Ok(Ok(_))),
            "subscriber did not receive every diff"
        );
        task.abort();
    }
    let elapsed = started.elapsed();
    shutdown.cancel();
    engine.stopped().await;
    Outcome { writes, elapsed }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut scenarios = vec![
        Scenario {
            name: "baseline: no subscriber",
            preload: 0,
            subscribe: None,
            diffs: |_| 0,
        },
        Scenario {
            name: "SUBSCRIBE table",
            preload: 0,
            subscribe: Some("t"),
            diffs: |_| 1,
        },
        Scenario {
            name: "SUBSCRIBE view (10 groups)",
            preload: 10,
            subscribe: Some("groups"),
            diffs: |_| 2,
        },
    ];
    for n in [1_000, 10_000, 100_000] {
        scenarios.push(Scenario {
            name: "baseline: no subscriber",
            preload: n,
            subscribe: None,
            diffs: |_| 0,
        });
        scenarios.push(Scenario {
            name: "SUBSCRIBE table",
            preload: n,
            subscribe: Some("t"),
            diffs: |_| 1,
        });
        scenarios.push(Scenario {
            name: "SUBSCRIBE aggregate view",
            preload: n,
            subscribe: Some("total"),
            diffs: |_| 2,
        });
        scenarios.push(Scenario {
            name: "SUBSCRIBE grouped view (GROUP BY a)",
            preload: n,
            subscribe: Some("by_a"),
            diffs: |_| 1,
        });
        scenarios.push(Scenario {
            name: "SUBSCRIBE identity view",
            preload: n,
            subscribe: Some("everything"),
            diffs: |_| 1,
        });
        scenarios.push(Scenario {
            name: "SUBSCRIBE filtered view (a % 10 = 0)",
            preload: n,
            subscribe: Some("tenth"),
            diffs: |a| usize::from(a % 10 == 0),
        });
    }
    println!("| scenario | rows in t | writes | seconds | writes/s | ms per write |");
    println!("|---|---:|---:|---:|---:|---:|");
    for s in &scenarios {
        let o = rt.block_on(run(s));
        let secs = o.elapsed.as_secs_f64();
        println!(
            "| {} | {} | {} | {:.2} | {:.0} | {:.3} |",
            s.name,
            s.preload,
            o.writes,
            secs,
            o.writes as f64 / secs,
            secs * 1000.0 / o.writes as f64
        );
    }
}
