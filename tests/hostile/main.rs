//! Hostile clients against a real gateway process on a two-worker runtime, while a
//! normal client keeps measuring.
//!
//! Its own test binary, so its timing checks do not share the machine's two cores with
//! the rest of the integration tests (`cargo test` runs test binaries one at a time).
//! Every attack runs while a probe reads a live stream, asks `/healthz` and queries the
//! engine; the probe's figures during the attack are checked against a baseline taken
//! just before it: events within 100 ms of the baseline's worst latency, `/healthz`
//! within 100 ms, the engine answering `SELECT 1`.

#[path = "../it/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tailgate::sse::Item;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use support::{ChildGateway, SseClient, WAIT};

/// The deadlines the attacked gateway runs with; short, so the test sees them pass.
const HEAD_TIMEOUT: Duration = Duration::from_secs(1);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_CONNECTIONS: usize = 60;
/// How late after its deadline a connection may be closed (timer and scheduling slack).
const SLACK: Duration = Duration::from_millis(750);

const INIT: &str = "CREATE TABLE ticks (id int, sent bigint);\n\
    INSERT INTO ticks VALUES (1, 0);\n\
    CREATE TABLE items (id int, name text);\n\
    INSERT INTO items VALUES (1, 'one');\n";

fn config() -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"1s\"\n\
         head_timeout = \"{}ms\"\nkeepalive_timeout = \"{}ms\"\nmax_connections = {MAX_CONNECTIONS}\n\
         [embedded]\ninit = \"init.sql\"\ntick = \"100ms\"\n\
         [[embedded.schedule]]\nevery = \"50ms\"\nsql = \"UPDATE ticks SET sent = mz_epoch_ms() WHERE id = 1\"\n\
         [[streams]]\npath = \"/ticks\"\nview = \"ticks\"\n\
         [[streams]]\npath = \"/items\"\nview = \"items\"\n",
        HEAD_TIMEOUT.as_millis(),
        KEEPALIVE_TIMEOUT.as_millis(),
    )
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The attacked gateway: a real process with two runtime workers, and its engine.
struct Target {
    _dir: tempfile::TempDir,
    _gw: ChildGateway,
    addr: SocketAddr,
    engine: SocketAddr,
}

impl Target {
    fn start() -> Target {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("init.sql"), INIT).expect("init");
        let path = dir.path().join("streams.toml");
        std::fs::write(&path, config()).expect("config");
        let (gw, addr) = ChildGateway::start_with_env(&path, &[("TOKIO_WORKER_THREADS", "2")]);
        let engine = gw
            .seen
            .iter()
            .find(|l| l.contains("Embedded development engine started"))
            .and_then(|l| support::log_field(l, "addr"))
            .and_then(|a| a.parse().ok())
            .expect("engine address in the log");
        Target {
            _dir: dir,
            _gw: gw,
            addr,
            engine,
        }
    }
}

/// What the probe saw in one window.
#[derive(Debug, Default)]
struct Window {
    /// Event latencies (receive time minus the row's write time), ms.
    events: Vec<i64>,
    /// `/healthz` round trips, ms, with their status.
    health: Vec<(u128, u16)>,
    /// `SELECT 1` round trips on the engine, ms.
    engine: Vec<u128>,
}

/// A normal client that keeps reading `/ticks`, asking `/healthz` and querying the
/// engine, recording into the current window.
struct Probe {
    window: Arc<Mutex<Window>>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Probe {
    async fn start(target: &Target) -> Probe {
        let window = Arc::new(Mutex::new(Window::default()));
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();

        let mut sse = SseClient::connect(target.addr, "/ticks", &[]).await;
        assert_eq!(sse.status, 200);
        let (w, s) = (Arc::clone(&window), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !s.is_cancelled() {
                let Some(item) = sse.next_item(Duration::from_millis(200)).await else {
                    assert!(!sse.ended, "the probe's stream ended");
                    continue;
                };
                let Item::Event(e) = item else { continue };
                if e.event != "update" {
                    continue;
                }
                let data: serde_json::Value = serde_json::from_str(&e.data).expect("json");
                let sent = data["changes"]
                    .as_array()
                    .and_then(|c| c.iter().filter_map(|c| c["row"]["sent"].as_i64()).max());
                if let Some(sent) = sent {
                    w.lock().expect("window").events.push(now_ms() - sent);
                }
            }
        }));

        let (w, s, addr) = (Arc::clone(&window), stop.clone(), target.addr);
        tasks.push(tokio::spawn(async move {
            while !s.is_cancelled() {
                let start = Instant::now();
                let (status, _) = tokio::time::timeout(WAIT, support::get(addr, "/healthz", &[]))
                    .await
                    .expect("/healthz answers");
                w.lock()
                    .expect("window")
                    .health
                    .push((start.elapsed().as_millis(), status));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));

        let sql = support::sql(target.engine).await;
        let (w, s) = (Arc::clone(&window), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !s.is_cancelled() {
                let start = Instant::now();
                tokio::time::timeout(Duration::from_secs(5), sql.simple_query("SELECT 1"))
                    .await
                    .expect("the engine answers in time")
                    .expect("SELECT 1");
                w.lock()
                    .expect("window")
                    .engine
                    .push(start.elapsed().as_millis());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
        Probe {
            window,
            stop,
            tasks,
        }
    }

    /// Starts a new window and returns the previous one.
    fn take(&self) -> Window {
        std::mem::take(&mut *self.window.lock().expect("window"))
    }

    async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            tokio::time::timeout(WAIT, t)
                .await
                .expect("probe stops")
                .expect("probe task did not panic");
        }
    }
}

/// Runs `attack` for its duration against a measured baseline, then checks the probe.
/// `refusals_ok` lets `/healthz` be refused with 503 (a flood holds every slot).
async fn under_attack<F>(probe: &Probe, name: &str, refusals_ok: bool, attack: F)
where
    F: std::future::Future<Output = ()>,
{
    probe.take();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let baseline = probe.take();
    assert!(
        baseline.events.len() >= 10,
        "{name}: too few baseline events: {baseline:?}"
    );
    let normal = baseline.events.iter().copied().max().unwrap_or(0);
    // Every window lasts at least 2 s, so the probe's figures cover a real stretch.
    futures::future::join(attack, tokio::time::sleep(Duration::from_secs(2))).await;
    let during = probe.take();
    eprintln!(
        "{name}: baseline worst {normal} ms over {} events; during: {} events, worst {:?} ms; healthz worst {:?} ms; engine worst {:?} ms",
        baseline.events.len(),
        during.events.len(),
        during.events.iter().max(),
        during.health.iter().map(|h| h.0).max(),
        during.engine.iter().max(),
    );
    assert!(
        during.events.len() >= 10,
        "{name}: events stopped arriving: {during:?}"
    );
    for latency in &during.events {
        assert!(
            *latency <= normal + 100,
            "{name}: an event took {latency} ms, normal is {normal} ms: {during:?}"
        );
    }
    assert!(!during.health.is_empty(), "{name}: no /healthz answer");
    for (ms, status) in &during.health {
        assert!(*ms <= 100, "{name}: /healthz took {ms} ms");
        assert!(
            *status == 200 || (refusals_ok && *status == 503),
            "{name}: /healthz answered {status}"
        );
    }
    assert!(
        !during.engine.is_empty(),
        "{name}: the engine did not answer"
    );
    for ms in &during.engine {
        assert!(*ms <= 1000, "{name}: SELECT 1 took {ms} ms");
    }
}

/// A fresh connection to `addr`, failing the test if connecting takes longer than
/// `WAIT` (a full accept backlog makes a connect wait).
async fn connect(addr: SocketAddr) -> TcpStream {
    tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connected in time")
        .expect("connect")
}

/// Waits until the server closes `socket` (EOF or reset), discarding what it sends;
/// returns how long that took.
async fn closed_within(socket: &mut TcpStream, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((start + limit).into(), socket.read(&mut buf)).await {
            Err(_) => panic!("the server kept the connection open past {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

/// Sends `head`, then junk as fast as the socket takes it, until the server closes
/// the connection; returns how long the junk was accepted.
async fn junk_after(addr: SocketAddr, head: &str, limit: Duration) -> Duration {
    let mut socket = connect(addr).await;
    socket.write_all(head.as_bytes()).await.expect("head");
    let junk = vec![b'J'; 65536];
    let start = Instant::now();
    let (mut read, mut write) = socket.split();
    let writer = async {
        while write.write_all(&junk).await.is_ok() {
            tokio::task::yield_now().await;
        }
    };
    let reader = async {
        let mut buf = [0u8; 4096];
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::select! {
        _ = writer => {}
        _ = reader => {}
        _ = tokio::time::sleep(limit) => panic!("junk accepted for {limit:?} without the server closing"),
    }
    start.elapsed()
}

/// Sends `head`, then junk, for up to 2 s: returns whether the server closed the
/// connection, and how many junk bytes it took. A write that cannot complete for
/// 500 ms means the server stopped reading.
async fn junk_until_closed_or_stalled(addr: SocketAddr, head: &str) -> (bool, usize) {
    let mut socket = connect(addr).await;
    socket.write_all(head.as_bytes()).await.expect("head");
    let junk = vec![b'J'; 65536];
    let mut sent = 0;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        match tokio::time::timeout(Duration::from_millis(500), socket.write_all(&junk)).await {
            Err(_) => return (false, sent),
            Ok(Err(_)) => return (true, sent),
            Ok(Ok(())) => sent += junk.len(),
        }
    }
    panic!("{sent} junk bytes accepted for 2 s: neither closed nor stalled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_cannot_stall_or_pin_the_gateway() {
    support::init_logging();
    let target = Target::start();
    let addr = target.addr;
    let probe = Probe::start(&target).await;

    // 1. Junk after a stream request on the fast path, from 4 connections that
    // reconnect as soon as they are closed, for 2 s.
    under_attack(&probe, "junk, fast path", false, async {
        let until = Instant::now() + Duration::from_secs(2);
        let attackers = (0..4).map(|_| async move {
            let mut rounds = 0;
            while Instant::now() < until {
                let took = junk_after(addr, "GET /items HTTP/1.1\r\nhost: x\r\n\r\n", WAIT).await;
                assert!(took < Duration::from_secs(1), "junk accepted for {took:?}");
                rounds += 1;
            }
            rounds
        });
        let rounds = futures::future::join_all(attackers).await;
        assert!(rounds.iter().all(|r| *r >= 2), "{rounds:?}");
    })
    .await;

    // 2. The same on hyper's path: a stream requested after a first request on the
    // connection, then junk. hyper reads once while it answers: the gateway either
    // closes the connection (more than its cap arrived in that read) or reads nothing
    // more, so the attacker's writes stall on a full window.
    under_attack(&probe, "junk, hyper path", false, async {
        let head = "GET /healthz HTTP/1.1\r\nhost: x\r\n\r\nGET /items HTTP/1.1\r\nhost: x\r\n\r\n";
        let attackers = (0..4).map(|_| junk_until_closed_or_stalled(addr, head));
        for (closed, sent) in futures::future::join_all(attackers).await {
            assert!(closed || sent <= 16 << 20, "{sent} junk bytes accepted");
        }
    })
    .await;

    // 3. Heads dripped a byte at a time: the first head (fast path), a second head
    // after a request (hyper), and a head with more than 32 headers (which the fast
    // path hands to hyper). Each is closed within the head deadline.
    under_attack(&probe, "dripped heads", false, async {
        let many_headers: String = (0..40).map(|i| format!("x-h{i}: v\r\n")).collect();
        let cases = [
            (
                String::new(),
                "GET /items HTTP/1.1\r\nhost: x\r\nx-slow: ".to_string(),
            ),
            (
                "GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n".to_string(),
                "GET /items HTTP/1.1\r\nhost: x\r\nx-slow: ".to_string(),
            ),
            (
                format!("GET /items HTTP/1.1\r\nhost: x\r\n{many_headers}"),
                "x-slow: ".to_string(),
            ),
        ];
        let drips = cases.into_iter().flat_map(|(opening, drip)| {
            (0..2).map(move |_| {
                let (opening, drip) = (opening.clone(), drip.clone());
                async move {
                    let mut socket = connect(addr).await;
                    let mut answered = Vec::new();
                    if !opening.is_empty() {
                        socket.write_all(opening.as_bytes()).await.expect("opening");
                        if opening.ends_with("\r\n\r\n") {
                            // Read the first answer, so the dripped head is a second one.
                            let mut buf = [0u8; 1024];
                            while !String::from_utf8_lossy(&answered).contains("ok\n") {
                                let n = tokio::time::timeout(WAIT, socket.read(&mut buf))
                                    .await
                                    .expect("the first answer in time")
                                    .expect("answer");
                                assert!(n > 0, "closed before answering");
                                answered.extend_from_slice(&buf[..n]);
                            }
                        }
                    }
                    let start = Instant::now();
                    let bytes = drip.into_bytes();
                    let mut i = 0;
                    let closed = loop {
                        let byte = bytes.get(i).copied().unwrap_or(b'a');
                        i += 1;
                        let wrote = tokio::time::timeout(WAIT, socket.write_all(&[byte]))
                            .await
                            .expect("the server stopped reading a dripped head without closing");
                        if wrote.is_err() {
                            break start.elapsed();
                        }
                        let mut buf = [0u8; 1024];
                        match tokio::time::timeout(
                            Duration::from_millis(100),
                            socket.read(&mut buf),
                        )
                        .await
                        {
                            Ok(Ok(0)) | Ok(Err(_)) => break start.elapsed(),
                            _ => {}
                        }
                        assert!(start.elapsed() < WAIT, "a dripped head was never cut off");
                    };
                    // Cut by the deadline: not before it, and not long after.
                    assert!(
                        closed <= HEAD_TIMEOUT + SLACK && closed + SLACK >= HEAD_TIMEOUT,
                        "a dripped head lasted {closed:?}"
                    );
                }
            })
        });
        futures::future::join_all(drips).await;
    })
    .await;

    // 4. Idle connections: one that never sends a head, and one idle after a request.
    under_attack(&probe, "idle connections", false, async {
        let silent = || async {
            let mut s = connect(addr).await;
            let took = closed_within(&mut s, WAIT).await;
            assert!(
                took <= HEAD_TIMEOUT + SLACK && took + SLACK >= HEAD_TIMEOUT,
                "silent for {took:?}"
            );
        };
        let kept_alive = async {
            let mut s = connect(addr).await;
            s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .expect("request");
            let took = closed_within(&mut s, WAIT).await;
            assert!(
                took <= KEEPALIVE_TIMEOUT + SLACK && took >= KEEPALIVE_TIMEOUT - SLACK,
                "idle keep-alive closed after {took:?}"
            );
        };
        futures::future::join(
            futures::future::join_all((0..4).map(|_| silent())),
            kept_alive,
        )
        .await;
    })
    .await;

    // 5. A complete head with more than 32 headers is still served (by hyper).
    let many: Vec<(String, String)> = (0..40).map(|i| (format!("x-h{i}"), "v".into())).collect();
    let headers: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut big = SseClient::connect(addr, "/items", &headers).await;
    assert_eq!(big.status, 200);
    big.assert_stream_headers();
    let first = big.next_data_event(WAIT).await;
    assert_eq!(first.event, "snapshot");
    drop(big);

    // 6. Pipelined requests are answered in order, the stream last.
    let mut socket = connect(addr).await;
    let mut burst = "GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n".repeat(50);
    burst.push_str("GET /items HTTP/1.1\r\nhost: x\r\n\r\n");
    socket.write_all(burst.as_bytes()).await.expect("burst");
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    while !String::from_utf8_lossy(&got).contains("event: snapshot") {
        let n = tokio::time::timeout(WAIT, socket.read(&mut buf))
            .await
            .expect("pipelined answers in time")
            .expect("read");
        assert!(n > 0, "closed during pipelined answers");
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert_eq!(text.matches("\r\n\r\nok\n").count(), 50, "{text}");
    assert!(text.contains("text/event-stream"));
    drop(socket);

    // 7. A flood up to max_connections: new clients are refused while it lasts, and
    // the slots come back within the head deadline without anyone leaving.
    under_attack(&probe, "connection flood", true, async {
        let mut flood = Vec::new();
        for _ in 0..MAX_CONNECTIONS + 5 {
            let mut s = connect(addr).await;
            s.write_all(b"GET /items HTTP/1.1\r\nhost: x\r\nx-slow: ")
                .await
                .expect("partial head");
            flood.push((Instant::now(), s));
        }
        // While the flood holds every slot, a complete request is refused with 503.
        let (status, _) = tokio::time::timeout(WAIT, support::get(addr, "/healthz", &[]))
            .await
            .expect("a refusal in time");
        assert_eq!(status, 503, "refused while the flood holds every slot");
        // Every flooder, held or over the limit, is closed at the head deadline,
        // counted from its own connect, without an answer it did not ask for.
        let outcomes =
            futures::future::join_all(flood.into_iter().map(|(opened, mut s)| async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 256];
                loop {
                    match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
                        Err(_) => panic!("a flooder was never closed"),
                        Ok(Ok(0)) | Ok(Err(_)) => break,
                        Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                    }
                }
                (opened.elapsed(), String::from_utf8_lossy(&got).to_string())
            }))
            .await;
        for (took, answer) in &outcomes {
            assert!(answer.is_empty(), "{answer}");
            assert!(
                *took <= HEAD_TIMEOUT + SLACK && *took + SLACK >= HEAD_TIMEOUT,
                "a flooder was closed after {took:?}"
            );
        }
        // The slots are back.
        let mut fresh = SseClient::connect(addr, "/items", &[]).await;
        assert_eq!(fresh.status, 200, "a slot is free again");
        fresh.next_data_event(WAIT).await;
    })
    .await;

    probe.stop().await;
}
