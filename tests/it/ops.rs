//! Operations against a real gateway process: readiness, the admin listener, JSON and
//! access logs, overload answers that keep `EventSource` coming back, per-address
//! limits with and without a trusted proxy, and that no secret reaches a log line.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use tailgate::sse::Item;

use crate::support::proxy::{Mode, Proxy};
use crate::support::{
    config_text, get, log_field, metric, sql, wait_for, ChildGateway, RawSseClient, SseClient,
    TestEngine, ITEMS_INIT, WAIT,
};

/// Writes `streams.toml` (and `init.sql` for the embedded engine) into `dir`.
fn write(dir: &Path, body: &str) -> std::path::PathBuf {
    std::fs::write(dir.join("init.sql"), ITEMS_INIT).expect("init");
    let path = dir.join("streams.toml");
    std::fs::write(&path, config_text(body)).expect("config");
    path
}

/// The admin listener's address from the "Gateway listening" line.
fn admin_addr(gw: &ChildGateway) -> SocketAddr {
    gw.seen
        .iter()
        .find(|l| l.contains("Gateway listening"))
        .and_then(|l| log_field(l, "admin"))
        .and_then(|a| a.parse().ok())
        .expect("the admin address in the log")
}

/// `/readyz`'s status and body.
async fn readyz(addr: SocketAddr) -> (u16, Value) {
    let (status, body) = get(addr, "/readyz", &[]).await;
    (status, serde_json::from_str(&body).expect("readyz is JSON"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_first_snapshot_and_the_upstream() {
    let engine = TestEngine::start(
        ITEMS_INIT,
        Duration::from_secs(600),
        Duration::from_millis(200),
    )
    .await;
    let proxy = Proxy::start(engine.addr).await;
    proxy.set(Mode::Refuse);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write(
        dir.path(),
        &format!(
            "admin_listen = \"127.0.0.1:0\"\n{}[[streams]]\npath = \"/items\"\nview = \"items_v\"\n",
            TestEngine::upstream(proxy.addr)
        ),
    );
    let (gw, addr) = ChildGateway::start(&path);
    let admin = admin_addr(&gw);

    // Before the first snapshot: live, not ready, and why.
    assert_eq!(get(admin, "/livez", &[]).await.0, 200);
    let (status, body) = readyz(admin).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["not_ready"][0]["stream"], "/items");
    assert_eq!(body["not_ready"][0]["reason"], "no snapshot yet");

    // The upstream comes: ready.
    proxy.set(Mode::Pass);
    let body = wait_for("ready", WAIT, || async {
        let (status, body) = readyz(admin).await;
        (status == 200).then_some(body)
    })
    .await;
    assert_eq!(body["ready"], true);
    let (_, metrics) = get(admin, "/metrics", &[]).await;
    assert_eq!(metric(&metrics, "stream_ready{stream=\"/items\"}"), Some(1));

    // The upstream goes: not ready again, with the reason.
    proxy.set(Mode::Refuse);
    proxy.cut_all(false);
    let body = wait_for("not ready after the outage", WAIT, || async {
        let (status, body) = readyz(admin).await;
        (status == 503).then_some(body)
    })
    .await;
    assert_eq!(
        body["not_ready"][0]["reason"], "upstream reconnecting",
        "{body}"
    );
    assert!(body["not_ready"][0]["error"].is_string(), "{body}");
    assert_eq!(get(admin, "/livez", &[]).await.0, 200, "still live");
    proxy.set(Mode::Pass);
    wait_for("ready again", WAIT, || async {
        (readyz(admin).await.0 == 200).then_some(())
    })
    .await;

    // The operator's routes are on the admin listener only.
    for route in ["/metrics", "/livez", "/healthz", "/readyz"] {
        assert_eq!(get(addr, route, &[]).await.0, 404, "public {route}");
        assert_eq!(get(admin, route, &[]).await.0, 200, "admin {route}");
    }
    assert_eq!(
        get(admin, "/items", &[]).await.0,
        404,
        "no streams on the admin port"
    );
    let (_, public) = get(addr, "/", &[]).await;
    let public: Value = serde_json::from_str(&public).expect("json");
    assert_eq!(public["streams"][0]["path"], "/items");
    assert!(public.get("config").is_none(), "{public}");
    assert!(public["streams"][0].get("view").is_none(), "{public}");
    let (_, full) = get(admin, "/", &[]).await;
    let full: Value = serde_json::from_str(&full).expect("json");
    assert_eq!(full["streams"][0]["view"], "items_v");
    assert!(full.get("config").is_some());
    // Both listeners' index pages, and the files they load.
    for listener in [addr, admin] {
        let (status, page) = get(listener, "/", &[("accept", "text/html")]).await;
        assert_eq!(status, 200);
        assert!(page.contains("/_tailgate/index-page.js"), "{page}");
        for file in ["index-page.js", "live.js", "tailgate.js"] {
            let path = format!("/_tailgate/{file}");
            assert_eq!(get(listener, &path, &[]).await.0, 200, "{listener} {path}");
        }
    }
    let mut client = SseClient::connect(addr, "/items", &[]).await;
    assert_eq!(client.status, 200);
    client.next_data_event(WAIT).await;
}

/// Waits for the access line whose `end` is `end`.
fn access_line(gw: &mut ChildGateway, end: &str) -> Value {
    let needle = format!("\"end\":\"{end}\"");
    let line = gw.wait_line(&needle, WAIT);
    let v: Value = serde_json::from_str(&line).expect("a JSON access line");
    assert_eq!(v["target"], "tailgate::access", "{line}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_and_one_access_line_per_stream_with_its_end() {
    let dir = tempfile::tempdir().expect("temp dir");
    let body = "log_format = \"json\"\nsend_timeout = \"1s\"\n\
                [upstream]\npassword_env = \"TAILGATE_TEST_SECRET_PASSWORD\"\n\
                [embedded]\ninit = \"init.sql\"\n\
                [[streams]]\npath = \"/items\"\nview = \"items_v\"\n\
                [[streams]]\npath = \"/big\"\nquery = \"SELECT id, name FROM items WHERE qty = 99\"\n\
                [[streams]]\npath = \"/short\"\nview = \"items_v\"\n";
    let path = write(dir.path(), body);
    let (mut gw, addr) = ChildGateway::start_with_env(
        &path,
        &[("TAILGATE_TEST_SECRET_PASSWORD", "hunter2-password")],
    );

    // A client that leaves, with a secret in its query string.
    let mut client = SseClient::connect(
        addr,
        "/items?access_token=SECRET-TOKEN-123&x=1",
        &[("x-forwarded-for", "203.0.113.5")],
    )
    .await;
    client.next_data_event(WAIT).await;
    drop(client);
    let line = access_line(&mut gw, "client-gone");
    assert_eq!(line["stream"], "/items");
    assert_eq!(line["path"], "/items?access_token=REDACTED&x=1");
    assert_eq!(line["status"], 200);
    assert_eq!(line["client"], "127.0.0.1", "no proxy is trusted");
    assert!(line["bytes"].as_u64().expect("bytes") > 100, "{line}");
    assert!(line["events"].as_u64().expect("events") >= 1, "{line}");
    assert!(line["duration_ms"].is_u64(), "{line}");

    // A client that sends data after its request.
    let mut raw = RawSseClient::connect(addr, "/items").await;
    raw.send(&[b'J'; 4096]).await;
    access_line(&mut gw, "client-sent-data");

    // A client that never reads, while large rows arrive.
    let stuck = RawSseClient::send_request(addr, "/big").await;
    let engine: SocketAddr = gw
        .seen
        .iter()
        .find(|l| l.contains("Embedded development engine started"))
        .and_then(|l| log_field(l, "addr"))
        .and_then(|a| a.parse().ok())
        .expect("engine address");
    let writer = sql(engine).await;
    let big = "x".repeat(100_000);
    let deadline = Instant::now() + WAIT;
    let mut id = 1000;
    while !gw
        .all_lines()
        .iter()
        .any(|l| l.contains("\"end\":\"send-timeout\""))
    {
        assert!(
            Instant::now() < deadline,
            "the stuck client was never cut off"
        );
        id += 1;
        writer
            .batch_execute(&format!("INSERT INTO items VALUES ({id}, '{big}', 99)"))
            .await
            .expect("insert");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(stuck);

    // A stream removed by a reload.
    let mut short = SseClient::connect(addr, "/short", &[]).await;
    short.next_data_event(WAIT).await;
    std::fs::write(
        &path,
        config_text(&body.replace("[[streams]]\npath = \"/short\"\nview = \"items_v\"\n", "")),
    )
    .expect("rewrite");
    short.expect_closed(WAIT).await;
    access_line(&mut gw, "removed");

    // Shutdown.
    let mut last = SseClient::connect(addr, "/items", &[]).await;
    last.next_data_event(WAIT).await;
    gw.signal("-TERM");
    last.expect_closed(WAIT).await;
    access_line(&mut gw, "shutdown");
    wait_for("the gateway to exit", WAIT, || {
        std::future::ready(gw.child.try_wait().expect("wait"))
    })
    .await;

    // Every line is one JSON object with the fields, and no secret is anywhere.
    let lines = gw.all_lines().to_vec();
    assert!(lines.len() > 5, "{lines:#?}");
    for line in &lines {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        for field in ["time", "level", "target", "message"] {
            assert!(v.get(field).is_some(), "no {field}: {line}");
        }
        for secret in ["SECRET-TOKEN-123", "hunter2-password"] {
            assert!(!line.contains(secret), "a secret in the log: {line}");
        }
    }
}

/// Reads an overload answer: `200`, `retry:` within 50-150% of `retry_ms`, then
/// `end` with `overloaded`, then the close.
async fn assert_overloaded(mut client: SseClient, retry_ms: u64) {
    assert_eq!(client.status, 200);
    client.assert_stream_headers();
    let items = client.expect_closed(WAIT).await;
    let retry = items.iter().find_map(|i| match i {
        Item::Retry(ms) => Some(*ms),
        _ => None,
    });
    let retry = retry.expect("a retry hint");
    assert!(
        retry >= retry_ms / 2 && retry <= retry_ms * 3 / 2,
        "retry {retry} for {retry_ms}"
    );
    let end = items.iter().find_map(|i| match i {
        Item::Event(e) if e.event == "end" => Some(e.data.clone()),
        _ => None,
    });
    assert_eq!(
        end.as_deref(),
        Some("{\"reason\":\"overloaded\"}"),
        "{items:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_limit_event_streams_are_told_to_come_back() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write(
        dir.path(),
        "max_connections = 10\noverload_retry = \"2s\"\n[embedded]\ninit = \"init.sql\"\n\
         [[streams]]\npath = \"/items\"\nview = \"items_v\"\n",
    );
    let (_gw, addr) = ChildGateway::start(&path);
    let mut held = Vec::new();
    for _ in 0..10 {
        let mut c = SseClient::connect(addr, "/items", &[]).await;
        c.next_data_event(WAIT).await;
        held.push(c);
    }
    let over = (0..20).map(|_| async move {
        let c = SseClient::connect(addr, "/items", &[("accept", "text/event-stream")]).await;
        assert_overloaded(c, 2000).await;
    });
    futures::future::join_all(over).await;
    // Not an event stream: 503 with Retry-After.
    let (status, _) = get(addr, "/healthz", &[]).await;
    assert_eq!(status, 503);
    // A slot comes back: served again.
    drop(held.pop());
    let mut again = wait_for("a slot", WAIT, || async {
        let c = SseClient::connect(addr, "/items", &[]).await;
        let mut c = c;
        match c.next_item(Duration::from_secs(5)).await {
            Some(Item::Retry(15000)) => Some(c),
            _ => None,
        }
    })
    .await;
    assert_eq!(again.next_data_event(WAIT).await.event, "snapshot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_address_limits_with_and_without_a_trusted_proxy() {
    for trusted in [false, true] {
        let dir = tempfile::tempdir().expect("temp dir");
        let proxies = if trusted {
            "trusted_proxies = [\"127.0.0.0/8\"]\n"
        } else {
            ""
        };
        let path = write(
            dir.path(),
            &format!(
                "max_connections_per_ip = 2\noverload_retry = \"1s\"\n{proxies}\
                 [embedded]\ninit = \"init.sql\"\n\
                 [[streams]]\npath = \"/items\"\nview = \"items_v\"\n"
            ),
        );
        let (_gw, addr) = ChildGateway::start(&path);
        let from = |ip: &'static str| [("x-forwarded-for", ip)];
        let mut a1 = SseClient::connect(addr, "/items", &from("10.0.0.1")).await;
        a1.next_data_event(WAIT).await;
        let mut a2 = SseClient::connect(addr, "/items", &from("10.0.0.1")).await;
        a2.next_data_event(WAIT).await;
        // A third from the same client: told to come back.
        let third = SseClient::connect(addr, "/items", &from("10.0.0.1")).await;
        assert_overloaded(third, 1000).await;
        let other = SseClient::connect(addr, "/items", &from("10.0.0.2")).await;
        if trusted {
            // The proxy is believed: 10.0.0.2 is another client.
            let mut other = other;
            assert_eq!(other.next_data_event(WAIT).await.event, "snapshot");
        } else {
            // Not believed: every request is from 127.0.0.1, which holds two.
            assert_overloaded(other, 1000).await;
        }
        // Closing one gives its slot back.
        drop(a1);
        wait_for("a slot back", WAIT, || async {
            let mut c = SseClient::connect(addr, "/items", &from("10.0.0.1")).await;
            let first = c.next_item(Duration::from_secs(5)).await;
            matches!(first, Some(Item::Retry(15000))).then_some(())
        })
        .await;
        drop(a2);
    }
}
