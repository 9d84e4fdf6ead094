//! No silent gaps: browser resume, upstream faults through a TCP proxy, broken
//! streams, slow and stuck clients, and connection churn. In every test a model client
//! converges to the view, ids strictly increase (checked by `Model::apply`), and a
//! snapshot appears only where one is specified.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use tailgate::sse::Item;
use tokio::io::AsyncReadExt;

use crate::support::proxy::{Mode, Proxy};
use crate::support::{
    converge, embedded_body, engine_subscriptions, get, initial, items_truth, metric, sql,
    wait_for, write_config, ChildGateway, Model, RawSseClient, SseClient, TestEngine, TestGateway,
    ITEMS_INIT, ITEMS_STREAM, WAIT,
};

const TICK: Duration = Duration::from_millis(200);

/// Engine history that outlasts any test.
const LONG_HISTORY: Duration = Duration::from_secs(600);

/// A gateway streaming `items_v` at `/items` from the engine at `upstream`; `extra`
/// goes between the `[upstream]` table and the stream.
async fn items_via(upstream: SocketAddr, extra: &str) -> TestGateway {
    let body = format!("{}{extra}{ITEMS_STREAM}", TestEngine::upstream(upstream));
    TestGateway::start(&body, &[]).await
}

/// An engine keeping `retain` of history, a proxy in front of it, and a gateway
/// reading through the proxy.
async fn proxied(retain: Duration, extra: &str) -> (TestEngine, Proxy, TestGateway) {
    let engine = TestEngine::start(ITEMS_INIT, retain, TICK).await;
    let proxy = Proxy::start(engine.addr).await;
    let gw = items_via(proxy.addr, extra).await;
    (engine, proxy, gw)
}

async fn wait_status(client: &mut SseClient, model: &mut Model, upstream: &str) -> Instant {
    let want = format!("\"upstream\":\"{upstream}\"");
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "no {upstream} status");
        match client.next_item(Duration::from_millis(100)).await {
            Some(Item::Event(e)) => {
                if e.event == "status" && e.data.contains(&want) {
                    return Instant::now();
                }
                model.apply(&e, "update");
            }
            Some(_) => {}
            None => assert!(
                !client.ended,
                "stream ended while waiting for {upstream} status"
            ),
        }
    }
}

async fn outage(reset: bool) {
    let (engine, proxy, gw) = proxied(LONG_HISTORY, "").await;
    let direct = sql(engine.addr).await;
    let mut client = gw.sse("/items").await;
    let mut model = initial(&mut client).await;

    proxy.set(Mode::Refuse);
    let cut = Instant::now();
    proxy.cut_all(reset);
    let detected = wait_status(&mut client, &mut model, "reconnecting").await;
    // Writes while the gateway cannot reach the engine.
    for id in 10..15 {
        direct
            .batch_execute(&format!("INSERT INTO items VALUES ({id}, 'outage', {id})"))
            .await
            .expect("insert");
    }
    direct
        .batch_execute("DELETE FROM items WHERE id = 1")
        .await
        .expect("delete");
    let restored = Instant::now();
    proxy.set(Mode::Pass);
    wait_status(&mut client, &mut model, "streaming").await;
    let recovered = restored.elapsed();
    let truth = items_truth(&direct).await;
    converge(&mut client, &mut model, "update", |m| m.sorted() == truth).await;
    assert_eq!(
        model.snapshots,
        vec!["initial"],
        "resumed without a snapshot"
    );
    eprintln!(
        "link {}: detected in {:?}, streaming again {:?} after the link returned",
        if reset { "reset" } else { "closed" },
        detected - cut,
        recovered
    );
    wait_for("one upstream session", WAIT, || async {
        (engine_subscriptions(&direct).await == 1).then_some(())
    })
    .await;
}

/// Changes waiting out a stream's `delay` are complete; losing the upstream must not
/// hold them back until it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_changes_are_delivered_during_an_outage() {
    let (engine, proxy, gw) = proxied(LONG_HISTORY, "[defaults]\ndelay = \"60s\"\n\n").await;
    let direct = sql(engine.addr).await;
    let mut client = gw.sse("/items").await;
    let mut model = initial(&mut client).await;
    direct
        .batch_execute("INSERT INTO items VALUES (7, 'held', 7)")
        .await
        .expect("insert");
    // Two reads from the engine after the write committed: the change and a later
    // progress row (ticks every 200 ms) have reached the gateway, so its timestamp is
    // closed and waits in the 60 s window.
    let before = proxy.forwarded();
    wait_for("the change and a later tick forwarded", WAIT, || async {
        (proxy.forwarded() >= before + 2).then_some(())
    })
    .await;
    for item in client.expect_quiet(Duration::from_millis(300)).await {
        if let Item::Event(e) = item {
            assert_ne!(e.event, "update", "delivered before the window closed");
            model.apply(&e, "update");
        }
    }
    proxy.set(Mode::Refuse);
    proxy.cut_all(false);
    let truth = items_truth(&direct).await;
    converge(&mut client, &mut model, "update", |m| m.sorted() == truth).await;
    assert_eq!(model.snapshots, vec!["initial"]);
    let (_, metrics) = gw.get("/metrics").await;
    assert_eq!(
        metrics.lines().find(|l| l.starts_with("upstream_up{")),
        Some("upstream_up{stream=\"/items\"} 0"),
        "delivered while the upstream is down"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_link_resumes_without_a_gap() {
    outage(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_link_resumes_without_a_gap() {
    outage(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_link_is_detected_by_missing_progress() {
    let (engine, proxy, gw) = proxied(LONG_HISTORY, "").await;
    let direct = sql(engine.addr).await;
    let mut client = gw.sse("/items").await;
    let mut model = initial(&mut client).await;

    let start = Instant::now();
    proxy.set(Mode::Blackhole);
    direct
        .batch_execute("INSERT INTO items VALUES (20, 'during', 1)")
        .await
        .expect("insert");
    let detected = wait_status(&mut client, &mut model, "reconnecting").await - start;
    assert!(
        detected < Duration::from_secs(6),
        "half-open link detected in {detected:?} with a 1 s progress timeout"
    );
    proxy.set(Mode::Pass);
    proxy.cut_all(false);
    direct
        .batch_execute("UPDATE items SET qty = 99 WHERE id = 2")
        .await
        .expect("update");
    let truth = items_truth(&direct).await;
    converge(&mut client, &mut model, "update", |m| m.sorted() == truth).await;
    assert_eq!(model.snapshots, vec!["initial"]);
    eprintln!("blackhole: detected in {detected:?}");
    wait_for("the stale session to be gone", WAIT, || async {
        (engine_subscriptions(&direct).await == 1).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_upstream_history_is_resynchronised_with_a_diff() {
    // The engine keeps 300 ms of history, so after a longer outage AS OF is refused.
    let (engine, proxy, gw) = proxied(Duration::from_millis(300), "").await;
    let direct = sql(engine.addr).await;
    let mut client = gw.sse("/items").await;
    let mut model = initial(&mut client).await;
    proxy.set(Mode::Refuse);
    proxy.cut_all(true);
    wait_status(&mut client, &mut model, "reconnecting").await;
    direct
        .batch_execute(
            "UPDATE items SET qty = 0 WHERE id = 1; INSERT INTO items VALUES (3, 'three', 3)",
        )
        .await
        .expect("writes");
    // Wait until the engine no longer holds the timestamp the gateway will resume
    // from, so the resync path is the one under test.
    let held = model.last_id.expect("an id");
    wait_for("the engine's history to pass the client's id", WAIT, || async {
        let probe = direct
            .batch_execute(&format!(
                "BEGIN; DECLARE probe CURSOR FOR SUBSCRIBE items_v WITH (SNAPSHOT = false) AS OF {held}; \
                 FETCH 0 probe; ROLLBACK"
            ))
            .await;
        let _ = direct.batch_execute("ROLLBACK").await;
        probe
            .err()
            .filter(|e| {
                e.as_db_error()
                    .is_some_and(|db| db.message().contains("not valid for all inputs"))
            })
            .map(|_| ())
    })
    .await;
    direct
        .batch_execute("INSERT INTO items VALUES (4, 'four', 4)")
        .await
        .expect("write");
    proxy.set(Mode::Pass);
    let truth = items_truth(&direct).await;
    converge(&mut client, &mut model, "update", |m| m.sorted() == truth).await;
    assert_eq!(
        model.snapshots,
        vec!["initial"],
        "only the difference was sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_resume_within_history_and_get_a_snapshot_outside_it() {
    let gw = TestGateway::embedded("", ITEMS_INIT, &format!("{ITEMS_STREAM}history = 6\n")).await;
    let db = gw.sql().await;
    let mut client = gw.sse("/items").await;
    let mut model = initial(&mut client).await;
    let mut ids = Vec::new();
    for id in 30..33 {
        db.batch_execute(&format!("INSERT INTO items VALUES ({id}, 'r', 1)"))
            .await
            .expect("insert");
        let e = client.next_data_event(WAIT).await;
        model.apply(&e, "update");
        ids.push(e.id.clone().expect("id"));
    }
    drop(client);
    db.batch_execute("INSERT INTO items VALUES (40, 'missed', 1)")
        .await
        .expect("insert");

    // Resume from the first update: the other two and the missed one, no snapshot.
    let mut resumed =
        SseClient::connect(gw.addr, "/items", &[("last-event-id", ids[0].as_str())]).await;
    let mut replay = Model {
        rows: model.rows.clone(),
        last_id: ids[0].parse().ok(),
        ..Model::default()
    };
    // Undo the two updates after ids[0] in the copy by rebuilding from the snapshot: the
    // replay must bring it to the truth.
    replay.rows.remove("{\"id\":31,\"name\":\"r\",\"qty\":1}");
    replay.rows.remove("{\"id\":32,\"name\":\"r\",\"qty\":1}");
    let truth = items_truth(&db).await;
    converge(&mut resumed, &mut replay, "update", |m| m.sorted() == truth).await;
    assert!(
        replay.snapshots.is_empty(),
        "resume replays without a snapshot"
    );
    assert_eq!(replay.updates, 3);

    // The query parameter works on a first request.
    let path = format!("/items?last_event_id={}", ids[2]);
    let mut by_query = SseClient::connect(gw.addr, &path, &[]).await;
    let e = by_query.next_data_event(WAIT).await;
    assert_eq!(e.event, "update");
    assert!(e.data.contains("missed"));

    // Push the first ids out of the six-event history, watching a live client so the
    // gateway is known to have them.
    for id in 50..58 {
        db.batch_execute(&format!("INSERT INTO items VALUES ({id}, 'h', 1)"))
            .await
            .expect("insert");
    }
    let mut seen = 0;
    while seen < 8 {
        if by_query.next_data_event(WAIT).await.event == "update" {
            seen += 1;
        }
    }
    let future = (u64::MAX - 1).to_string();
    // A NUL cannot travel in a header (HTTP rejects it), only percent-encoded in the query.
    let cases = [
        (ids[0].as_str(), "/items"),
        ("abc", "/items"),
        ("", "/items?last_event_id=1%00"),
        ("99999999999999999999999", "/items"),
        ("-5", "/items"),
        (future.as_str(), "/items"),
    ];
    for (id, path) in cases {
        let headers: &[(&str, &str)] = if id.is_empty() {
            &[]
        } else {
            &[("last-event-id", id)]
        };
        let mut c = SseClient::connect(gw.addr, path, headers).await;
        assert_eq!(c.status, 200);
        let e = c.next_data_event(WAIT).await;
        assert_eq!(e.event, "snapshot", "id {id:?} {path}");
        let v: Value = serde_json::from_str(&e.data).expect("json");
        assert_eq!(v["reason"], "resume-gap", "id {id:?} {path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_id_resumes_on_a_second_gateway() {
    let engine = TestEngine::start(ITEMS_INIT, LONG_HISTORY, TICK).await;
    let a = items_via(engine.addr, "").await;
    let b = items_via(engine.addr, "").await;
    let db = sql(engine.addr).await;
    let mut on_b = b.sse("/items").await;
    initial(&mut on_b).await;
    let mut on_a = a.sse("/items").await;
    let mut model = initial(&mut on_a).await;
    db.batch_execute("INSERT INTO items VALUES (60, 'x', 1)")
        .await
        .expect("insert");
    let e = on_a.next_data_event(WAIT).await;
    model.apply(&e, "update");
    let id = e.id.clone().expect("id");
    db.batch_execute("INSERT INTO items VALUES (61, 'y', 1); DELETE FROM items WHERE id = 2")
        .await
        .expect("writes");
    // Make sure B has seen the writes, then move the client over.
    on_b.next_data_event(WAIT).await;
    on_b.next_data_event(WAIT).await;
    drop(on_a);
    let mut moved = SseClient::connect(b.addr, "/items", &[("last-event-id", id.as_str())]).await;
    let truth = items_truth(&db).await;
    converge(&mut moved, &mut model, "update", |m| m.sorted() == truth).await;
    assert_eq!(
        model.snapshots,
        vec!["initial"],
        "resumed on the replica without a snapshot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_streams_degrade_alone() {
    let init = format!(
        "{ITEMS_INIT}CREATE TABLE zeros (a int);\nINSERT INTO zeros VALUES (1);\n\
         CREATE VIEW doomed AS SELECT id FROM items;\nCREATE TABLE blobs (b text);\n"
    );
    let gw = TestGateway::embedded(
        "[upstream]\nmax_row_bytes = 1000\nbackoff_max = \"300ms\"\n",
        &init,
        "[[streams]]\npath = \"/ok\"\nview = \"items_v\"\n\
         [[streams]]\npath = \"/dropped\"\nview = \"doomed\"\n\
         [[streams]]\npath = \"/eval\"\nquery = \"SELECT 10 / a AS q FROM zeros\"\n\
         [[streams]]\npath = \"/big\"\nview = \"blobs\"\n",
    )
    .await;
    let db = gw.sql().await;
    let mut ok = gw.sse("/ok").await;
    let mut ok_model = initial(&mut ok).await;
    let mut clients = Vec::new();
    for path in ["/dropped", "/eval", "/big"] {
        let mut c = gw.sse(path).await;
        initial(&mut c).await;
        clients.push(c);
    }
    db.batch_execute("DROP VIEW doomed; INSERT INTO zeros VALUES (0)")
        .await
        .expect("break two");
    let huge = "x".repeat(5000);
    db.execute("INSERT INTO blobs VALUES ($1)", &[&huge])
        .await
        .expect("big row");

    for (c, needle) in clients
        .iter_mut()
        .zip(["dropped", "division by zero", "exceeds"])
    {
        c.status_event(needle, WAIT).await;
    }
    // The healthy stream delivers every write promptly meanwhile.
    for i in 0..5 {
        let sent = Instant::now();
        db.batch_execute(&format!("INSERT INTO items VALUES ({}, 'ok', 1)", 70 + i))
            .await
            .expect("insert");
        let e = ok.next_data_event(WAIT).await;
        ok_model.apply(&e, "update");
        assert!(
            sent.elapsed() < Duration::from_secs(2),
            "healthy stream delayed"
        );
    }
    let (_, metrics) = gw.get("/metrics").await;
    for path in ["/dropped", "/eval", "/big"] {
        let errors = metric(
            &metrics,
            &format!("upstream_errors_total{{stream=\"{path}\"}}"),
        );
        assert!(errors >= Some(1), "{path}: {errors:?} errors in\n{metrics}");
    }
    assert!(metrics.contains("upstream_up{stream=\"/ok\"} 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_gets_a_lagged_snapshot_and_converges() {
    let gw = TestGateway::embedded(
        "",
        "CREATE TABLE blob (id int, body text);\nINSERT INTO blob VALUES (1, 'start');\n",
        "[[streams]]\npath = \"/blob\"\nview = \"blob\"\nkey = [\"id\"]\nclient_queue = 4\n",
    )
    .await;
    let db = gw.sql().await;
    let mut slow = RawSseClient::connect(gw.addr, "/blob").await;
    let mut model = Model::default();
    let deadline = Instant::now() + WAIT;
    while model.snapshots.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        match slow.next_item(left).await {
            Some(Item::Event(e)) => model.apply(&e, "update"),
            Some(_) => {}
            None => panic!(
                "no initial snapshot within {WAIT:?} (ended: {})",
                slow.ended
            ),
        }
    }
    // 30 MB of updates while the client reads nothing: far more than its 4 KiB receive
    // buffer and the gateway's send buffer hold.
    let body = "y".repeat(200_000);
    for i in 0..150 {
        db.execute(
            "UPDATE blob SET body = $1 WHERE id = 1",
            &[&format!("{i}:{body}")],
        )
        .await
        .expect("update");
    }
    // Only read once the gateway has published every update, so the backlog is real
    // however slowly the upstream side ran.
    wait_for("all 150 updates published", WAIT, || async {
        let (_, metrics) = gw.get("/metrics").await;
        metric(&metrics, "sse_batches_total{stream=\"/blob\"}")
            .filter(|n| *n >= 150)
            .map(|_| ())
    })
    .await;
    // The update number in a row's body (`{i}:yyy…`); the initial row's `start` has none.
    let body_number = |data: &str| -> Option<u32> {
        let at = data.find("\"body\":\"")?;
        let digits: String = data[at + 8..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    let mut lagged = false;
    // Which update each event carried: consecutive, starting at 0 after the initial
    // snapshot and right after the state a lagged snapshot holds.
    let mut seen: Vec<String> = vec!["initial snapshot".into()];
    let mut next: u32 = 0;
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "slow reader never caught up");
        match slow.next_item(Duration::from_millis(500)).await {
            Some(Item::Event(e)) => {
                if e.event == "snapshot" {
                    lagged |= e.data.contains("\"reason\":\"lagged\"");
                    let held = body_number(&e.data);
                    seen.push(format!("snapshot holding {held:?}"));
                    next = held.map_or(0, |n| n + 1);
                } else if e.event == "update" {
                    let n = body_number(&e.data)
                        .unwrap_or_else(|| panic!("an update without a numbered body: {seen:?}"));
                    assert_eq!(n, next, "silent gap: {seen:?}");
                    seen.push(n.to_string());
                    next = n + 1;
                }
                model.apply(&e, "update");
                let done = model
                    .keyed
                    .values()
                    .any(|row| row["body"].as_str().is_some_and(|b| b.starts_with("149:")));
                if done {
                    break;
                }
            }
            Some(_) => {}
            None => assert!(!slow.ended, "slow reader was disconnected"),
        }
    }
    assert!(
        lagged,
        "the overflow was announced with snapshot(lagged): {seen:?}"
    );
    let (_, metrics) = gw.get("/metrics").await;
    let lags = metric(&metrics, "sse_lagged_total{stream=\"/blob\"}");
    assert!(lags >= Some(1), "{lags:?} lags in\n{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_cut_off_without_slowing_others() {
    const SEND_TIMEOUT: Duration = Duration::from_secs(3);
    let gw = TestGateway::embedded(
        &format!("send_timeout = \"{}ms\"\n", SEND_TIMEOUT.as_millis()),
        "CREATE TABLE blob (id int, body text);\n",
        "[[streams]]\npath = \"/blob\"\nview = \"blob\"\n",
    )
    .await;
    let db = gw.sql().await;
    // A raw socket with a tiny receive buffer that sends its request and never reads.
    let mut stuck = RawSseClient::send_request(gw.addr, "/blob").await;
    let mut healthy = gw.sse("/blob").await;
    initial(&mut healthy).await;

    let body = "z".repeat(100_000);
    let mut worst = Duration::ZERO;
    for i in 0..80 {
        let sent = Instant::now();
        db.execute("INSERT INTO blob VALUES ($1, $2)", &[&i.to_string(), &body])
            .await
            .expect("insert");
        let e = healthy.next_data_event(WAIT).await;
        assert_eq!(e.event, "update");
        worst = worst.max(sent.elapsed());
    }
    // Waiting on the stuck client would cost a write up to the whole send timeout.
    assert!(
        worst < SEND_TIMEOUT / 2,
        "healthy client delayed by {worst:?} (send timeout {SEND_TIMEOUT:?})"
    );
    wait_for("the stuck client to be disconnected", WAIT, || async {
        let (_, metrics) = gw.get("/metrics").await;
        (metric(&metrics, "sse_stall_disconnects_total") >= Some(1)).then_some(())
    })
    .await;
    // Its socket is closed: reading drains what was buffered and then hits the end.
    let mut buf = vec![0u8; 1 << 20];
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match stuck.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the stuck connection was closed");
    eprintln!("never-reading client: healthy client's worst latency {worst:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_churn_leaves_nothing_behind() {
    // The gateway runs as its own process, so its descriptors and memory are its own.
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write_config(
        dir.path(),
        &embedded_body("", ITEMS_STREAM),
        &[("init.sql", ITEMS_INIT)],
    );
    let (gw, addr) = ChildGateway::start(&path);
    let churn = |n: usize| async move {
        for _ in 0..n / 250 {
            let mut batch = Vec::new();
            for _ in 0..250 {
                batch.push(tokio::spawn(async move {
                    let mut c = SseClient::connect(addr, "/items", &[]).await;
                    let e = c.next_data_event(WAIT).await;
                    assert_eq!(e.event, "snapshot");
                }));
            }
            for t in batch {
                t.await.expect("client task");
            }
        }
    };
    let gw = &gw;
    let settled = |fds: usize| async move {
        wait_for("connections to close", WAIT, || async move {
            let (_, metrics) = get(addr, "/metrics", &[]).await;
            let idle = metrics.contains("sse_clients{stream=\"/items\"} 0")
                && metrics.contains("http_connections 1\n");
            (idle && gw.fds_and_rss().0 <= fds).then_some(())
        })
        .await
    };
    // A first round warms up allocator pools; the second must leave nothing behind.
    churn(2500).await;
    settled(usize::MAX).await;
    let (fds, rss) = gw.fds_and_rss();
    churn(5000).await;
    settled(fds).await;
    let (fds_after, rss_after) = gw.fds_and_rss();
    let grown = rss_after.saturating_sub(rss);
    eprintln!("churn of 5000: fds {fds} -> {fds_after}, RSS {rss} -> {rss_after} KiB");
    assert!(
        grown < 8 * 1024,
        "RSS grew {grown} KiB over 5,000 connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_lifetime_ends_streams_and_browsers_resume() {
    let gw = TestGateway::embedded("max_lifetime = \"1s\"\n", ITEMS_INIT, ITEMS_STREAM).await;
    let db = gw.sql().await;
    let mut client = gw.sse("/items").await;
    let mut model = initial(&mut client).await;
    let started = Instant::now();
    for item in client.expect_closed(WAIT).await {
        if let Item::Event(e) = item {
            model.apply(&e, "update");
        }
    }
    let life = started.elapsed();
    assert!(
        life >= Duration::from_millis(700) && life < Duration::from_secs(3),
        "{life:?}"
    );
    db.batch_execute("INSERT INTO items VALUES (80, 'after', 1)")
        .await
        .expect("insert");
    let id = model.last_id.expect("id").to_string();
    let mut again = SseClient::connect(gw.addr, "/items", &[("last-event-id", id.as_str())]).await;
    let truth = items_truth(&db).await;
    converge(&mut again, &mut model, "update", |m| m.sorted() == truth).await;
    assert_eq!(model.snapshots, vec!["initial"]);
}

/// The engine as a child process, so it can be killed for real.
struct EngineProcess {
    child: std::process::Child,
}

impl Drop for EngineProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl EngineProcess {
    async fn start(addr: SocketAddr, init: &std::path::Path) -> EngineProcess {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_tailgate"))
            .args([
                "engine",
                "--listen",
                &addr.to_string(),
                "--tick",
                "200ms",
                "--init",
            ])
            .arg(init)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn engine");
        wait_for("the engine to accept connections", WAIT, || async {
            tokio::net::TcpStream::connect(addr).await.ok().map(|_| ())
        })
        .await;
        EngineProcess { child }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_and_restarting_the_engine_resyncs_without_a_snapshot() {
    let dir = tempfile::tempdir().expect("temp dir");
    let init = dir.path().join("init.sql");
    std::fs::write(&init, ITEMS_INIT).expect("init");
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let mut engine = EngineProcess::start(addr, &init).await;
    // The proxy keeps the gateway away from the engine from the kill until the
    // restarted engine has taken writes.
    let proxy = Proxy::start(addr).await;
    let gw = items_via(proxy.addr, "").await;
    let mut client = gw.sse("/items").await;
    let mut model = initial(&mut client).await;
    {
        let db = sql(addr).await;
        db.batch_execute("INSERT INTO items VALUES (85, 'before kill', 1)")
            .await
            .expect("insert");
        let truth = items_truth(&db).await;
        converge(&mut client, &mut model, "update", |m| m.sorted() == truth).await;
    }

    // The live link still passes; only new connections are refused.
    proxy.set(Mode::Refuse);
    let killed = Instant::now();
    engine.child.kill().expect("SIGKILL");
    let _ = engine.child.wait();
    let detected = wait_status(&mut client, &mut model, "reconnecting").await - killed;
    // The restarted engine has lost the earlier writes (it keeps tables in memory),
    // and takes new ones before the gateway is back.
    drop(engine);
    let restarted = Instant::now();
    let _engine = EngineProcess::start(addr, &init).await;
    let db = sql(addr).await;
    db.batch_execute(
        "INSERT INTO items VALUES (90, 'after restart', 1); UPDATE items SET qty = 7 WHERE id = 2",
    )
    .await
    .expect("writes after restart");
    proxy.set(Mode::Pass);
    let truth = items_truth(&db).await;
    converge(&mut client, &mut model, "update", |m| m.sorted() == truth).await;
    assert_eq!(
        model.snapshots,
        vec!["initial"],
        "the restart reached clients as changes, not a snapshot"
    );
    eprintln!(
        "engine kill: detected in {detected:?}, converged {:?} after the restart began",
        restarted.elapsed()
    );
}
