//! Gateway tests over the real engine and real HTTP.
//!
//! The config text given to `TestGateway::start` continues the `[server]` table, so a
//! test can add server keys before its own sections.

use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tailgate::sse::Item;

use crate::support::{
    converge, engine_subscriptions, gateway_sessions, initial, items_truth, multiset, Model,
    SseClient, TestGateway, ITEMS_INIT, ITEMS_STREAM, WAIT,
};

/// The items truth as a keyed stream on `id` would hold it: key JSON → row JSON.
fn by_id(truth: &[(String, i64)]) -> std::collections::BTreeMap<String, String> {
    truth
        .iter()
        .map(|(row, _)| {
            let v: Value = serde_json::from_str(row).expect("row");
            (json!({"id": v["id"]}).to_string(), v.to_string())
        })
        .collect()
}

/// A keyed model's rows in the same form as [`by_id`].
fn keyed_rows(m: &Model) -> std::collections::BTreeMap<String, String> {
    m.keyed
        .iter()
        .map(|(k, v)| (k.clone(), v.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_clients_converge_to_the_view_for_diff_and_keyed_streams() {
    let gw = TestGateway::embedded(
        "",
        ITEMS_INIT,
        &format!(
            "{ITEMS_STREAM}[[streams]]\npath = \"/items/by-id\"\n\
             query = \"SELECT id, name, qty FROM items\"\nkey = [\"id\"]\nevent = \"row\"\n"
        ),
    )
    .await;
    let sql = gw.sql().await;
    let mut diff_client = gw.sse("/items").await;
    let mut keyed_client = gw.sse("/items/by-id").await;
    assert_eq!(diff_client.status, 200);
    diff_client.assert_stream_headers();
    let mut keyed_model = Model::default();
    let mut diff_model = initial(&mut diff_client).await;
    assert_eq!(diff_model.snapshots, vec!["initial"]);
    assert_eq!(diff_model.rows.len(), 2);

    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut next_id = 3;
    let mut live: Vec<i64> = vec![1, 2];
    for step in 0..120 {
        let op = rng.random_range(0..10);
        let stmt = if op < 4 || live.is_empty() {
            let id = next_id;
            next_id += 1;
            live.push(id);
            format!(
                "INSERT INTO items VALUES ({id}, 'item {id}', {})",
                rng.random_range(0..100)
            )
        } else if op < 8 {
            let id = live[rng.random_range(0..live.len())];
            format!(
                "UPDATE items SET qty = qty + {}, name = 'n{step}' WHERE id = {id}",
                rng.random_range(1..5)
            )
        } else {
            let at = rng.random_range(0..live.len());
            let id = live.swap_remove(at);
            format!("DELETE FROM items WHERE id = {id}")
        };
        if step % 10 == 0 {
            // A multi-statement transaction commits at one timestamp.
            let id = next_id;
            next_id += 1;
            live.push(id);
            sql.batch_execute(&format!(
                "BEGIN; {stmt}; INSERT INTO items VALUES ({id}, 'tx', 1); COMMIT"
            ))
            .await
            .expect("transaction");
        } else {
            sql.batch_execute(&stmt).await.expect("statement");
        }
    }
    let truth = items_truth(&sql).await;
    converge(&mut diff_client, &mut diff_model, "update", |m| {
        m.sorted() == truth
    })
    .await;
    assert!(diff_model.updates > 10, "updates arrived as update events");
    assert_eq!(
        diff_model.snapshots,
        vec!["initial"],
        "no unexpected snapshot"
    );

    let want = by_id(&truth);
    converge(&mut keyed_client, &mut keyed_model, "row", |m| {
        keyed_rows(m) == want
    })
    .await;
    assert_eq!(keyed_model.snapshots, vec!["initial"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_share_one_upstream_subscription() {
    let gw = TestGateway::embedded("", ITEMS_INIT, ITEMS_STREAM).await;
    let sql = gw.sql().await;
    let mut clients = Vec::new();
    for _ in 0..200 {
        clients.push(gw.sse("/items").await);
    }
    for c in &mut clients {
        assert_eq!(c.next_data_event(WAIT).await.event, "snapshot");
    }
    sql.batch_execute("INSERT INTO items VALUES (3, 'three', 30)")
        .await
        .expect("insert");
    for c in &mut clients {
        let e = c.next_data_event(WAIT).await;
        assert_eq!(e.event, "update");
        assert!(e.data.contains("three"));
    }
    assert_eq!(
        engine_subscriptions(&sql).await,
        1,
        "one SUBSCRIBE for 200 clients"
    );
    assert_eq!(
        gateway_sessions(&sql).await,
        1,
        "one upstream session for 200 clients"
    );
    let (_, listing) = gw.get("/").await;
    let listing: Value = serde_json::from_str(&listing).expect("listing JSON");
    assert_eq!(listing["streams"][0]["clients"], 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_text_arrives_intact() {
    let gw = TestGateway::embedded(
        "",
        "CREATE TABLE notes (id int, body text);\n",
        "[[streams]]\npath = \"/t\"\nview = \"notes\"\n",
    )
    .await;
    let sql = gw.sql().await;
    let mut client = gw.sse("/t").await;
    assert_eq!(client.next_data_event(WAIT).await.event, "snapshot");
    let hostile = [
        "line\nbreak",
        "crlf\r\nbreak",
        "cr\ronly",
        "nul\0byte",
        "quotes \" ' \\ and `ticks`",
        "non-ASCII: é ü 中文 🎉 \u{2028} \u{feff}",
        "data: fake\n\nevent: end\n\n",
        "",
    ];
    for (i, text) in hostile.iter().enumerate() {
        sql.execute("INSERT INTO notes VALUES ($1, $2)", &[&i.to_string(), text])
            .await
            .expect("insert hostile text");
    }
    let mut model = Model::default();
    let want = multiset(
        hostile
            .iter()
            .enumerate()
            .map(|(i, t)| json!({"id": i, "body": t})),
    );
    converge(&mut client, &mut model, "update", |m| m.sorted() == want).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_coalesces_and_retry_event_and_heartbeat_are_as_configured() {
    let gw = TestGateway::embedded(
        "heartbeat = \"300ms\"\n",
        ITEMS_INIT,
        "[[streams]]\npath = \"/now\"\nview = \"items_v\"\nevent = \"new_message\"\nretry = \"2500ms\"\n\
         [[streams]]\npath = \"/slow\"\nview = \"items_v\"\ndelay = \"1s\"\n",
    )
    .await;
    let sql = gw.sql().await;
    let mut now = gw.sse("/now").await;
    let mut slow = gw.sse("/slow").await;
    assert_eq!(now.next_item(WAIT).await, Some(Item::Retry(2500)));
    assert_eq!(slow.next_item(WAIT).await, Some(Item::Retry(15000)));
    assert_eq!(now.next_data_event(WAIT).await.event, "snapshot");
    assert_eq!(slow.next_data_event(WAIT).await.event, "snapshot");

    let writing = std::time::Instant::now();
    for id in 10..16 {
        sql.batch_execute(&format!("INSERT INTO items VALUES ({id}, 'x', 1)"))
            .await
            .expect("insert");
    }
    let spread = writing.elapsed();
    // Six writes, six timestamps: one event each without delay...
    let mut ids = Vec::new();
    while ids.len() < 6 {
        let e = now.next_data_event(WAIT).await;
        assert_eq!(e.event, "new_message");
        ids.push(e.id.clone());
    }
    // ...and far fewer with a one-second window, holding all six rows.
    let mut rows = 0;
    let mut events = 0;
    while rows < 6 {
        let e = slow.next_data_event(WAIT).await;
        assert_eq!(e.event, "update");
        let v: Value = serde_json::from_str(&e.data).expect("json");
        rows += v["changes"].as_array().map_or(0, Vec::len);
        events += 1;
    }
    assert_eq!(rows, 6);
    // One window opens per second at most while the writes go on, plus one that the
    // writes may straddle: 2 when they take under a second, as they normally do.
    let windows = 1 + spread.as_millis().div_ceil(1000);
    assert!(
        events <= windows,
        "a 1 s delay folded six writes made over {spread:?} into {events} events"
    );

    // Keep-alives every 300 ms, not the default 15 s: with what was already sent read
    // first, three arrive within three seconds.
    while now.next_item(Duration::from_millis(1)).await.is_some() {}
    assert!(!now.ended, "the stream closed");
    let window = tokio::time::Instant::now() + Duration::from_secs(3);
    for n in 1..=3 {
        now.wait_item(
            &format!("keep-alive {n} of 3 in a 3 s window"),
            window.saturating_duration_since(tokio::time::Instant::now()),
            |i| matches!(i, Item::Comment(c) if c == "keepalive"),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_engine_streams_through_tail() {
    let gw = TestGateway::embedded(
        "",
        ITEMS_INIT,
        &format!("legacy = true\n{ITEMS_STREAM}[[streams]]\npath = \"/by-id\"\nview = \"items_v\"\nkey = [\"id\"]\n"),
    )
    .await;
    let sql = gw.sql().await;
    let version: String = sql
        .query_one("SELECT mz_version()", &[])
        .await
        .expect("version")
        .get(0);
    assert!(version.starts_with("v0.26"), "{version}");
    let mut client = gw.sse("/items").await;
    let mut model = initial(&mut client).await;
    // Keys are paired from TAIL's diffs in the gateway, as ENVELOPE UPSERT would.
    let mut keyed = gw.sse("/by-id").await;
    let mut keyed_model = initial(&mut keyed).await;
    assert_eq!(keyed_model.keyed.len(), 2);
    sql.batch_execute(
        "DELETE FROM items WHERE id = 1; INSERT INTO items VALUES (5, 'five', 5); \
         UPDATE items SET qty = 21 WHERE id = 2",
    )
    .await
    .expect("writes");
    let truth = items_truth(&sql).await;
    converge(&mut client, &mut model, "update", |m| m.sorted() == truth).await;
    let want = by_id(&truth);
    converge(&mut keyed, &mut keyed_model, "update", |m| {
        keyed_rows(m) == want
    })
    .await;
    assert_eq!(keyed_model.snapshots, vec!["initial"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_stream_reports_status_while_others_deliver() {
    let gw = TestGateway::embedded(
        "",
        ITEMS_INIT,
        &format!("[[streams]]\npath = \"/broken\"\nview = \"no_such_view\"\n{ITEMS_STREAM}"),
    )
    .await;
    let sql = gw.sql().await;
    let mut broken = gw.sse("/broken").await;
    assert_eq!(broken.status, 200, "a degraded stream still answers 200");
    let status = broken.status_event("no_such_view", WAIT).await;
    let v: Value = serde_json::from_str(&status.data).expect("json");
    assert_eq!(v["upstream"], "reconnecting");

    let mut items = gw.sse("/items").await;
    assert_eq!(items.next_data_event(WAIT).await.event, "snapshot");
    sql.batch_execute("INSERT INTO items VALUES (9, 'nine', 9)")
        .await
        .expect("insert");
    let e = items.next_data_event(WAIT).await;
    assert!(e.data.contains("nine"));

    let (_, listing) = gw.get("/").await;
    let listing: Value = serde_json::from_str(&listing).expect("json");
    let broken_entry = listing["streams"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["path"] == "/broken").cloned())
        .expect("listed");
    assert_eq!(broken_entry["upstream"], "reconnecting");
    let (_, metrics) = gw.get("/metrics").await;
    assert!(
        metrics.contains("upstream_up{stream=\"/broken\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("upstream_up{stream=\"/items\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_get_404_and_the_listing_has_html() {
    let gw = TestGateway::embedded("", ITEMS_INIT, ITEMS_STREAM).await;
    assert_eq!(gw.status("/nope").await, 404);
    let (status, page) = crate::support::get(gw.addr, "/", &[("accept", "text/html")]).await;
    assert_eq!(status, 200);
    // The links are rendered by the page's script (tests/it/pages.rs runs it).
    assert!(page.contains("/_tailgate/index-page.js"), "{page}");
    let (_, json) = gw.get("/").await;
    let v: Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["streams"][0]["view"], "items_v");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_every_stream_with_end() {
    let mut gw = TestGateway::embedded(
        "",
        ITEMS_INIT,
        "[[streams]]\npath = \"/a\"\nview = \"items_v\"\n\
         [[streams]]\npath = \"/b\"\nview = \"items\"\n",
    )
    .await;
    let mut a = gw.sse("/a").await;
    let mut b = gw.sse("/b").await;
    assert_eq!(a.next_data_event(WAIT).await.event, "snapshot");
    assert_eq!(b.next_data_event(WAIT).await.event, "snapshot");
    let started = std::time::Instant::now();
    gw.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stopped within the grace period"
    );
    for c in [&mut a, &mut b] {
        let e = c.next_data_event(WAIT).await;
        assert_eq!(e.event, "end");
        assert_eq!(e.data, "{\"reason\":\"shutdown\"}");
        let after = c.expect_closed(WAIT).await;
        assert!(
            after.is_empty(),
            "the stream closes right after end: {after:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_requested_on_a_reused_connection_is_served_too() {
    use http_body_util::BodyExt;
    let gw = TestGateway::embedded("", ITEMS_INIT, ITEMS_STREAM).await;
    // The first request on the connection is not a stream, so hyper serves the
    // connection, and the stream request after it goes through the router.
    let tcp = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = |path: &str| {
        hyper::Request::get(path)
            .header("host", "x")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("request")
    };
    let exchange = async {
        let health = send.send_request(req("/healthz")).await.expect("healthz");
        assert_eq!(health.status(), 200);
        health.into_body().collect().await.expect("body");
        send.ready().await.expect("connection reusable");
        send.send_request(req("/items")).await.expect("stream")
    };
    let resp = tokio::time::timeout(WAIT, exchange)
        .await
        .expect("both response heads in time");
    let mut stream = SseClient::from_response(resp);
    assert_eq!(stream.status, 200);
    stream.assert_stream_headers();
    assert_eq!(stream.next_item(WAIT).await, Some(Item::Retry(15000)));
    stream
        .wait_item(
            "a snapshot",
            WAIT,
            |i| matches!(i, Item::Event(e) if e.event == "snapshot"),
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_violation_is_reported_and_the_stream_goes_on() {
    let gw = TestGateway::embedded(
        "",
        ITEMS_INIT,
        "[[streams]]\npath = \"/by-id\"\nview = \"items\"\nkey = [\"id\"]\n",
    )
    .await;
    let sql = gw.sql().await;
    let mut client = gw.sse("/by-id").await;
    let mut model = initial(&mut client).await;
    // Two rows for one key at one timestamp: Materialize reports `key_violation`.
    sql.batch_execute("INSERT INTO items VALUES (8, 'a', 1), (8, 'b', 2)")
        .await
        .expect("duplicate key");
    let status = client.status_event("key violation", WAIT).await;
    assert!(
        status.data.contains("\"upstream\":\"streaming\""),
        "{}",
        status.data
    );
    sql.batch_execute("INSERT INTO items VALUES (7, 'seven', 7)")
        .await
        .expect("insert");
    converge(&mut client, &mut model, "update", |m| {
        m.keyed.contains_key("{\"id\":7}") && !m.keyed.contains_key("{\"id\":8}")
    })
    .await;
    assert_eq!(
        model.snapshots,
        vec!["initial"],
        "no reconnect, no snapshot"
    );
    let (_, metrics) = gw.get("/metrics").await;
    assert!(
        metrics.contains("upstream_errors_total{stream=\"/by-id\"} 0"),
        "{metrics}"
    );
}

/// Sends raw request bytes on a fresh connection and reads the answer until the server
/// closes or `until` appears.
async fn raw(addr: std::net::SocketAddr, request: &str, until: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(addr).await.expect("connect");
    socket.write_all(request.as_bytes()).await.expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(until) {
        match tokio::time::timeout(WAIT, socket.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("no {until:?} in time: {}", String::from_utf8_lossy(&got)),
        }
    }
    String::from_utf8_lossy(&got).to_lowercase()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_conformance_head_host_bodies_accept_and_cors() {
    let gw = TestGateway::embedded(
        "cors_origins = [\"https://app.example\"]\n",
        ITEMS_INIT,
        ITEMS_STREAM,
    )
    .await;
    let addr = gw.addr;

    // HEAD on a stream: the stream's headers, no body, and the connection stays usable.
    let head = raw(
        addr,
        "HEAD /items HTTP/1.1\r\nhost: x\r\n\r\nGET /healthz HTTP/1.1\r\nhost: x\r\n\r\n",
        "ok\n",
    )
    .await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    assert!(!head.contains("event:"), "{head}");
    assert_eq!(head.matches("http/1.1 200").count(), 2, "{head}");

    // HTTP/1.1 without Host: 400, on the stream path and elsewhere; HTTP/1.0 needs none.
    for path in ["/items", "/healthz"] {
        let answer = raw(addr, &format!("GET {path} HTTP/1.1\r\n\r\n"), "\r\n\r\n").await;
        assert!(answer.starts_with("http/1.1 400"), "{path}: {answer}");
    }
    let answer = raw(addr, "GET /healthz HTTP/1.0\r\n\r\n", "ok\n").await;
    assert!(answer.starts_with("http/1.0 200"), "{answer}");

    // A body is refused without being read, on a stream and elsewhere.
    for path in ["/items", "/"] {
        let answer = raw(
            addr,
            &format!("GET {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello"),
            "\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("http/1.1 413"), "{path}: {answer}");
        assert!(answer.contains("connection: close"), "{answer}");
    }

    // GET / varies by Accept and honours q=0.
    let listing = raw(
        addr,
        "GET / HTTP/1.1\r\nhost: x\r\naccept: application/json, text/html;q=0\r\nconnection: close\r\n\r\n",
        "\"streams\"",
    )
    .await;
    assert!(
        listing.contains("content-type: application/json"),
        "{listing}"
    );
    assert!(listing.contains("vary: accept"), "{listing}");
    let page = raw(
        addr,
        "GET / HTTP/1.1\r\nhost: x\r\naccept: text/html,*/*;q=0.8\r\nconnection: close\r\n\r\n",
        "</html>",
    )
    .await;
    assert!(page.contains("content-type: text/html"), "{page}");
    let refused = raw(
        addr,
        "GET / HTTP/1.1\r\nhost: x\r\naccept: image/png\r\nconnection: close\r\n\r\n",
        "\r\n\r\n",
    )
    .await;
    assert!(refused.starts_with("http/1.1 406"), "{refused}");

    // Answers vary by Origin even when the origin is not allowed, on both paths.
    for (origin, allowed) in [
        ("https://app.example", true),
        ("https://evil.example", false),
    ] {
        let mut fast = SseClient::connect(addr, "/items", &[("origin", origin)]).await;
        assert_eq!(fast.status, 200);
        let vary = fast.headers.get("vary").map(|v| v.to_str().unwrap_or(""));
        assert_eq!(vary, Some("origin"), "{origin}");
        let acao = fast.headers.get("access-control-allow-origin");
        assert_eq!(acao.is_some(), allowed, "{origin}");
        fast.next_data_event(WAIT).await;
        let listing = raw(
            addr,
            &format!("GET / HTTP/1.1\r\nhost: x\r\norigin: {origin}\r\nconnection: close\r\n\r\n"),
            "\"streams\"",
        )
        .await;
        assert!(listing.contains("vary: origin"), "{listing}");
        assert_eq!(
            listing.contains("access-control-allow-origin: https://app.example"),
            allowed
        );
    }

    // A preflight for a fetch-based client sending Last-Event-ID cross-origin.
    let preflight = raw(
        addr,
        "OPTIONS /items HTTP/1.1\r\nhost: x\r\norigin: https://app.example\r\n\
         access-control-request-method: GET\r\naccess-control-request-headers: last-event-id\r\n\
         connection: close\r\n\r\n",
        "\r\n\r\n",
    )
    .await;
    assert!(preflight.starts_with("http/1.1 204"), "{preflight}");
    assert!(
        preflight.contains("access-control-allow-origin: https://app.example"),
        "{preflight}"
    );
    assert!(
        preflight.contains("access-control-allow-headers: last-event-id"),
        "{preflight}"
    );
    assert!(
        preflight.contains("access-control-allow-methods: get, head, options"),
        "{preflight}"
    );
    let other = raw(
        addr,
        "POST /items HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        "\r\n\r\n",
    )
    .await;
    assert!(other.starts_with("http/1.1 405"), "{other}");
    assert!(other.contains("allow: get, head, options"), "{other}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generic_client_errors_keep_the_detail_in_the_listing_only() {
    let gw = TestGateway::embedded(
        "client_errors = \"generic\"\n",
        ITEMS_INIT,
        "[[streams]]\npath = \"/gone\"\nview = \"no_such_view_secret\"\n",
    )
    .await;
    let mut client = gw.sse("/gone").await;
    let status = client.status_event("reconnecting", WAIT).await;
    assert!(
        !status.data.contains("no_such_view_secret"),
        "{}",
        status.data
    );
    assert!(
        status.data.contains("the upstream is unavailable"),
        "{}",
        status.data
    );
    let listing = wait_for_listing_error(&gw).await;
    assert!(listing.contains("no_such_view_secret"), "{listing}");
}

/// The listing once the first stream reports an upstream error.
async fn wait_for_listing_error(gw: &TestGateway) -> String {
    crate::support::wait_for("an error in the listing", WAIT, || async {
        let (_, body) = gw.get("/").await;
        let v: Value = serde_json::from_str(&body).ok()?;
        v["streams"][0]["error"]
            .as_str()
            .filter(|e| *e != "connecting")
            .map(|_| body.clone())
    })
    .await
}
