//! A real browser: headless Chromium's `EventSource` follows the wire contract,
//! reconnects when the gateway rotates connections (`max_lifetime`), resumes with its
//! own `Last-Event-ID`, and ends up with exactly the view's rows.
//!
//! It needs Chromium at `/usr/bin/chromium` (`.ci/run` installs it); without it the
//! test fails unless `TAILGATE_SKIP_BROWSER=1` says to skip it.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::support::devtools::{have_chromium, headless};
use crate::support::{items_truth, TestGateway, ITEMS_STREAM, WAIT};

const PAGE: &str = r#"<!doctype html><meta charset=utf-8><title>tailgate</title><script>
const rows = new Map();
const seen = { seq: 0, opens: 0, snapshots: [], updates: 0, lastId: null, ends: [] };
const apply = (changes) => {
  for (const c of changes) {
    const k = JSON.stringify(c.row), n = (rows.get(k) || 0) + c.diff;
    if (n === 0) rows.delete(k); else rows.set(k, n);
  }
};
// Each report is its own fetch, so they can arrive out of order: `seq` tells the newest.
const report = () => { seen.seq++; fetch("/report", { method: "POST",
  body: JSON.stringify({ ...seen, rows: [...rows.entries()] }) }); };
const es = new EventSource("GATEWAY/items");
es.onopen = () => { seen.opens++; report(); };
es.addEventListener("snapshot", (e) => {
  const d = JSON.parse(e.data); rows.clear(); apply(d.changes);
  seen.snapshots.push(d.reason); seen.lastId = e.lastEventId; report();
});
es.addEventListener("update", (e) => {
  apply(JSON.parse(e.data).changes); seen.updates++; seen.lastId = e.lastEventId; report();
});
es.addEventListener("end", (e) => { seen.ends.push(JSON.parse(e.data).reason); report(); });
</script>"#;

/// Serves the page and collects the page's reports.
async fn page_server(
    gateway: std::net::SocketAddr,
) -> (std::net::SocketAddr, mpsc::UnboundedReceiver<Value>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let page = PAGE.replace("GATEWAY", &format!("http://{gateway}"));
    (addr, serve_page(listener, page, String::new()))
}

/// Serves `page` (with `headers`, each ending in CRLF) on `listener` and collects the
/// page's reports (`POST /report`).
pub(crate) fn serve_page(
    listener: TcpListener,
    page: String,
    headers: String,
) -> mpsc::UnboundedReceiver<Value> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let page = page.clone();
            let headers = headers.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                let head_end = loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while buf.len() < head_end + len {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let body = if head.starts_with("post /report") {
                    if let Ok(v) = serde_json::from_slice(&buf[head_end..head_end + len]) {
                        let _ = tx.send(v);
                    }
                    String::new()
                } else {
                    page
                };
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\n{headers}content-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    rx
}

/// Headless Chromium opening `page`; killed when the child is dropped.
pub(crate) fn chromium(page: std::net::SocketAddr) -> (tokio::process::Child, tempfile::TempDir) {
    let profile = tempfile::tempdir().expect("profile dir");
    let browser = headless(&profile)
        .arg(format!("http://{page}/"))
        .spawn()
        .expect("start chromium");

    (browser, profile)
}

/// The page's reports, newest first.
pub(crate) struct Reports {
    pub(crate) rx: mpsc::UnboundedReceiver<Value>,
    /// The report with the highest `seq` so far (`Null` before the first).
    pub(crate) latest: Value,
}

impl Reports {
    /// Reads reports until the newest satisfies `done`, failing the test at `deadline`.
    /// Reports older than the latest (they overtook each other) are dropped.
    pub(crate) async fn until(
        &mut self,
        what: &str,
        deadline: tokio::time::Instant,
        done: impl Fn(&Value) -> bool,
    ) -> &Value {
        while !done(&self.latest) {
            let report = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!("no report with {what} in time; latest: {}", self.latest)
                })
                .expect("page server alive");
            if report["seq"].as_u64() > self.latest["seq"].as_u64() {
                self.latest = report;
            }
        }
        &self.latest
    }
}

/// The page's rows, canonicalised like the test's truth.
pub(crate) fn page_rows(report: &Value) -> Vec<(String, i64)> {
    let mut rows: HashMap<String, i64> = HashMap::new();
    for entry in report["rows"].as_array().into_iter().flatten() {
        let row: Value =
            serde_json::from_str(entry[0].as_str().unwrap_or("null")).unwrap_or(Value::Null);
        *rows.entry(row.to_string()).or_insert(0) += entry[1].as_i64().unwrap_or(0);
    }
    let mut v: Vec<_> = rows.into_iter().collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_eventsource_resumes_across_rotations_and_matches_the_view() {
    if !have_chromium() {
        return;
    }
    let gw = TestGateway::embedded(
        "max_lifetime = \"1s\"\ncors_origins = [\"*\"]\n",
        "CREATE TABLE items (id int, name text, qty int);\n\
         CREATE VIEW items_v AS SELECT id, name, qty FROM items;\n\
         INSERT INTO items VALUES (1, 'one', 10), (2, 'two \"quoted\"\\n', 20);\n",
        &format!("{ITEMS_STREAM}retry = \"100ms\"\n"),
    )
    .await;
    let db = gw.sql().await;
    let (page, rx) = page_server(gw.addr).await;
    let mut reports = Reports {
        rx,
        latest: Value::Null,
    };
    let (_browser, _profile) = chromium(page);

    // The browser's start-up counts against the first report's limit.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let latest = reports
        .until("a snapshot", deadline, |r| {
            r["snapshots"].as_array().is_some_and(|s| !s.is_empty())
        })
        .await;
    assert_eq!(latest["snapshots"], serde_json::json!(["initial"]));

    // Write one change at a time until the browser has reconnected at least twice.
    let mut id = 10;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while reports.latest["opens"].as_u64().unwrap_or(0) < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the browser reconnected {} times",
            reports.latest["opens"]
        );
        db.batch_execute(&format!("INSERT INTO items VALUES ({id}, 'w{id}', {id})"))
            .await
            .expect("insert");
        let want = reports.latest["updates"].as_u64().unwrap_or(0) + 1;
        reports
            .until(&format!("{want} updates"), deadline, |r| {
                r["updates"].as_u64().unwrap_or(0) >= want
            })
            .await;
        id += 1;
    }
    db.batch_execute("DELETE FROM items WHERE id = 1; UPDATE items SET qty = 0 WHERE id = 2")
        .await
        .expect("writes");
    let truth = items_truth(&db).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let latest = reports
        .until("the view's rows", deadline, |r| page_rows(r) == truth)
        .await;
    assert_eq!(
        latest["snapshots"],
        serde_json::json!(["initial"]),
        "reconnects resumed from Last-Event-ID without a snapshot"
    );
}

/// Drives a page on another origin (`page`, with `GATEWAY` for the gateway's origin)
/// through an overload of `/items`: once it holds a snapshot, the test takes a slot
/// from the browser's address and the per-address limit drops to one, so the
/// browser's next reconnect (at its connection's `max_lifetime`) is refused. Writes go
/// on until `overloaded` says the page heard of it, three more are made while it is
/// kept away, and then the slot is given back. Returns the gateway and the page's
/// report once the page shows the view's rows, and the last event id it had before.
pub(crate) async fn overload_and_return(
    page: &str,
    overloaded: impl Fn(&Value) -> bool,
) -> (TestGateway, Value, Value) {
    let server = "max_lifetime = \"2s\"\ncors_origins = [\"*\"]\noverload_retry = \"500ms\"\n";
    let streams = format!("{ITEMS_STREAM}retry = \"100ms\"\n");
    let gw = TestGateway::embedded(
        &format!("{server}max_connections_per_ip = 5\n"),
        crate::support::ITEMS_INIT,
        &streams,
    )
    .await;
    let db = gw.sql().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let rx = serve_page(
        listener,
        page.replace("GATEWAY", &format!("http://{}", gw.addr)),
        String::new(),
    );
    let mut reports = Reports {
        rx,
        latest: Value::Null,
    };
    let (_browser, _profile) = chromium(addr);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    reports
        .until("a snapshot", deadline, |r| {
            r["snapshots"].as_array().is_some_and(|s| !s.is_empty())
        })
        .await;

    let mut rival = gw.sse("/items").await;
    rival.next_data_event(WAIT).await;
    std::fs::write(
        gw.config_path(),
        crate::support::config_text(&crate::support::embedded_body(
            &format!("{server}max_connections_per_ip = 1\n"),
            &streams,
        )),
    )
    .expect("rewrite");
    gw.wait_reloaded(1).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut id = 10;
    while !overloaded(&reports.latest) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never overloaded: {}",
            reports.latest
        );
        db.batch_execute(&format!("INSERT INTO items VALUES ({id}, 'w{id}', {id})"))
            .await
            .expect("insert");
        id += 1;
        let seq = reports.latest["seq"].as_u64().unwrap_or(0);
        reports
            .until("a newer report", deadline, |r| {
                r["seq"].as_u64() > Some(seq)
            })
            .await;
    }
    let last_id = reports.latest["lastId"].clone();
    // Changes made while the browser is kept away.
    for _ in 0..3 {
        db.batch_execute(&format!(
            "INSERT INTO items VALUES ({id}, 'away{id}', {id})"
        ))
        .await
        .expect("insert");
        id += 1;
    }
    drop(rival);
    let truth = items_truth(&db).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let latest = reports
        .until("the view's rows after coming back", deadline, |r| {
            page_rows(r) == truth
        })
        .await
        .clone();
    (gw, latest, last_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_comes_back_after_an_overload_and_resumes() {
    if !have_chromium() {
        return;
    }
    let (gw, latest, last_id) = overload_and_return(PAGE, |r| {
        r["ends"]
            .as_array()
            .is_some_and(|e| e.iter().any(|r| r == "overloaded"))
    })
    .await;
    assert_eq!(
        latest["snapshots"],
        serde_json::json!(["initial"]),
        "it came back with Last-Event-ID {last_id} and resumed without a snapshot"
    );
    let (_, metrics) = gw.get("/metrics").await;
    assert!(
        crate::support::metric(
            &metrics,
            "http_refused_total{reason=\"max_connections_per_ip\"}"
        )
        .is_some_and(|n| n >= 1),
        "{metrics}"
    );
}

/// A page on another origin that opens a stream with `withCredentials`, so the browser
/// sends the gateway the cookie it was given; and one without, which is refused.
const COOKIE_PAGE: &str = r#"<!doctype html><meta charset=utf-8><title>cookie</title><script>
const seen = { seq: 0, snapshots: [], rows: 0, plainState: null, plainErrors: 0 };
const report = () => { seen.seq++; fetch("/report", { method: "POST", body: JSON.stringify(seen) }); };
const es = new EventSource("GATEWAY/items", { withCredentials: true });
es.addEventListener("snapshot", (e) => {
  const d = JSON.parse(e.data); seen.snapshots.push(d.reason); seen.rows = d.changes.length; report();
});
const plain = new EventSource("GATEWAY/items");
plain.onerror = () => { seen.plainErrors++; seen.plainState = plain.readyState; report(); };
</script>"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_authenticates_with_a_cookie_across_origins() {
    if !have_chromium() {
        return;
    }
    let page_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let page = page_listener.local_addr().expect("addr");
    let dir = tempfile::tempdir().expect("dir");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "cookie-test-secret").expect("secret");
    let gw = TestGateway::embedded(
        &format!(
            "cors_origins = [\"http://{page}\"]\ncors_credentials = true\n\
             [auth]\nmode = \"jwt\"\ntoken_sources = [\"cookie:tailgate_token\"]\n\
             [[auth.issuers]]\niss = \"https://idp.test/\"\naudience = [\"tailgate\"]\n\
             algorithms = [\"HS256\"]\nsecret_file = \"{}\"\n",
            secret.display()
        ),
        crate::support::ITEMS_INIT,
        ITEMS_STREAM,
    )
    .await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"iss": "https://idp.test/", "aud": "tailgate", "exp": exp, "sub": "c"}),
        &jsonwebtoken::EncodingKey::from_secret(b"cookie-test-secret").expect("key"),
    )
    .expect("token");
    // The page's origin sets the cookie: same host, another port, so the browser
    // sends it to the gateway when a request carries credentials.
    let rx = serve_page(
        page_listener,
        COOKIE_PAGE.replace("GATEWAY", &format!("http://{}", gw.addr)),
        format!("set-cookie: tailgate_token={token}; Path=/; HttpOnly; SameSite=Lax\r\n"),
    );
    let mut reports = Reports {
        rx,
        latest: Value::Null,
    };
    let (_browser, _profile) = chromium(page);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let latest = reports
        .until(
            "a snapshot over the cookie and a refusal without it",
            deadline,
            |r| {
                r["snapshots"].as_array().is_some_and(|s| !s.is_empty())
                    && r["plainErrors"].as_u64().unwrap_or(0) >= 1
            },
        )
        .await;
    assert_eq!(latest["snapshots"], serde_json::json!(["initial"]));
    assert_eq!(latest["rows"], 2);
    // A 401 closes an EventSource for good (readyState 2).
    assert_eq!(latest["plainState"], 2, "{latest}");
}
