//! Test helpers: a gateway on port 0 over the embedded engine, a real HTTP SSE client
//! with the crate's spec parser, a model client that applies events, and waiting for
//! conditions under a timeout.

pub mod devtools;
pub mod proxy;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use serde_json::Value;
use tailgate::config;
use tailgate::sse::{Event, Item, Parser};
use tailgate::Gateway;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(20);

/// The data most tests stream: a table `items`, a view `items_v` over it, and two rows.
pub const ITEMS_INIT: &str = "CREATE TABLE items (id int, name text, qty int);\n\
    CREATE VIEW items_v AS SELECT id, name, qty FROM items;\n\
    INSERT INTO items VALUES (1, 'one', 10), (2, 'two', 20);\n";

/// A stream of `items_v` at `/items`.
pub const ITEMS_STREAM: &str = "[[streams]]\npath = \"/items\"\nview = \"items_v\"\n";

/// The full config text for a test body that continues the `[server]` table.
pub fn config_text(body: &str) -> String {
    format!("[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n{body}")
}

/// A config body for the embedded engine running `init.sql`: `before` continues the
/// `[server]` table (or adds tables of its own), `after` continues `[embedded]` and
/// holds the streams.
pub fn embedded_body(before: &str, after: &str) -> String {
    format!("{before}[embedded]\ninit = \"init.sql\"\n{after}")
}

/// Writes `files` and a `streams.toml` holding `config_text(body)` into `dir`, and
/// returns the config's path.
pub fn write_config(dir: &Path, body: &str, files: &[(&str, &str)]) -> PathBuf {
    for (name, content) in files {
        std::fs::write(dir.join(name), content).expect("write file");
    }
    let path = dir.join("streams.toml");
    std::fs::write(&path, config_text(body)).expect("write config");
    path
}

/// Logs go to the test output only when `TEST_LOG` is set.
pub fn init_logging() {
    if std::env::var_os("TEST_LOG").is_some() {
        tailgate::telemetry::init_logging(tailgate::config::LogFormat::Text);
    }
}

/// Polls `check` until it returns `Some`, failing the test after `limit`. The limit
/// also bounds each call: a `check` that blocks fails the test instead of hanging it.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, check()).await {
            Ok(Some(v)) => return v,
            Ok(None) => {}
            Err(_) => panic!("timed out after {limit:?} waiting for {what} (a check blocked)"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of the series `series` (a metric name with its labels, as
/// `sse_lagged_total{stream="/a"}`) in a `/metrics` text, or `None` if it is missing.
pub fn metric(metrics: &str, series: &str) -> Option<u64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')
            .and_then(|v| v.trim().parse().ok())
    })
}

/// A gateway running from a streams.toml in a temp dir.
pub struct TestGateway {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub engine: Option<SocketAddr>,
    pub shutdown: CancellationToken,
    pub task: Option<JoinHandle<()>>,
    pub metrics: std::sync::Arc<tailgate::telemetry::Metrics>,
}

impl TestGateway {
    /// Starts a gateway whose config is `[server] listen = 127.0.0.1:0` plus `body`.
    /// Extra files (for `init`) are written next to the config first.
    pub async fn start(body: &str, files: &[(&str, &str)]) -> TestGateway {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = write_config(dir.path(), body, files);
        Self::launch(dir, &path).await
    }

    /// Starts a gateway on its embedded engine, which runs `init`; see [`embedded_body`].
    pub async fn embedded(before: &str, init: &str, after: &str) -> TestGateway {
        Self::start(&embedded_body(before, after), &[("init.sql", init)]).await
    }

    /// Starts a gateway on an existing config file inside `dir`.
    pub async fn launch(dir: tempfile::TempDir, path: &Path) -> TestGateway {
        init_logging();
        let config = config::load(path).expect("valid test config");
        let gateway = Gateway::build(config).await.expect("gateway starts");
        let addr = gateway.local_addr();
        let engine = gateway.engine_addr();
        let shutdown = gateway.shutdown_token();
        let metrics = gateway.metrics();
        let task = tokio::spawn(gateway.run_until_stopped());
        TestGateway {
            dir,
            addr,
            engine,
            shutdown,
            task: Some(task),
            metrics,
        }
    }

    /// Reloads seen so far, successful or not.
    pub fn reloads(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.metrics.reloads_ok.load(Relaxed),
            self.metrics.reloads_failed.load(Relaxed),
        )
    }

    /// Waits until the gateway has applied `n` successful reloads.
    pub async fn wait_reloaded(&self, n: u64) {
        wait_for("a config reload", WAIT, || async move {
            (self.reloads().0 >= n).then_some(())
        })
        .await
    }

    /// Waits until `n` failed reloads have been recorded.
    pub async fn wait_rejected(&self, n: u64) {
        wait_for("a rejected reload", WAIT, || async move {
            (self.reloads().1 >= n).then_some(())
        })
        .await
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("streams.toml")
    }

    /// A SQL session on the embedded engine.
    pub async fn sql(&self) -> tokio_postgres::Client {
        sql(self.engine.expect("embedded engine")).await
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        get(self.addr, path, &[]).await
    }

    /// The status of a GET without reading the (possibly endless) body.
    pub async fn status(&self, path: &str) -> u16 {
        SseClient::connect(self.addr, path, &[]).await.status
    }

    pub async fn sse(&self, path: &str) -> SseClient {
        SseClient::connect(self.addr, path, &[]).await
    }

    /// Stops the gateway and waits for it to exit.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("gateway stops in time")
                .expect("gateway task did not panic");
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// How long one helper query on the engine may take before the test fails.
pub const SQL_WAIT: Duration = Duration::from_secs(10);

/// `fut` (a query or a connect), failing the test if it takes longer than `limit`.
pub async fn bounded<T>(
    what: &str,
    limit: Duration,
    fut: impl std::future::Future<Output = T>,
) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} took longer than {limit:?}"))
}

/// A SQL session on the engine at `addr`; connecting fails the test after [`SQL_WAIT`].
pub async fn sql(addr: SocketAddr) -> tokio_postgres::Client {
    let (client, conn) = bounded(
        "connecting to the engine",
        SQL_WAIT,
        tokio_postgres::connect(
            &format!(
                "host={} port={} user=materialize dbname=materialize",
                addr.ip(),
                addr.port()
            ),
            tokio_postgres::NoTls,
        ),
    )
    .await
    .expect("connect to engine");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Number of active subscriptions the engine reports.
pub async fn engine_subscriptions(client: &tokio_postgres::Client) -> i64 {
    let query = "SELECT count(*) FROM mz_internal.mz_subscriptions";
    let row = bounded(query, SQL_WAIT, client.query_one(query, &[]))
        .await
        .expect("mz_subscriptions");
    row.get::<_, i64>(0)
}

/// The gateway's sessions on the engine (it names each `tailgate <path>`).
pub async fn gateway_sessions(client: &tokio_postgres::Client) -> i64 {
    let query =
        "SELECT count(*) FROM mz_internal.mz_sessions WHERE application_name LIKE 'tailgate %'";
    let row = bounded(query, SQL_WAIT, client.query_one(query, &[]))
        .await
        .expect("mz_sessions");
    row.get::<_, i64>(0)
}

/// A GET on a fresh connection, up to the response head.
async fn request(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> hyper::Response<Incoming> {
    let stream = bounded("connecting to the gateway", WAIT, TcpStream::connect(addr))
        .await
        .expect("connect to gateway");
    let (mut sender, conn) = bounded(
        "the HTTP handshake",
        WAIT,
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)),
    )
    .await
    .expect("http handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = hyper::Request::get(path).header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    tokio::time::timeout(
        WAIT,
        sender.send_request(req.body(Empty::<Bytes>::new()).expect("request")),
    )
    .await
    .expect("response head in time")
    .expect("response")
}

/// A plain GET, body collected.
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let resp = request(addr, path, headers).await;
    let status = resp.status().as_u16();
    let body = tokio::time::timeout(WAIT, resp.into_body().collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A GET with `headers`, body collected: the status, the response headers and the body.
pub async fn get_full(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, hyper::HeaderMap, String) {
    let resp = request(addr, path, headers).await;
    let status = resp.status().as_u16();
    let response_headers = resp.headers().clone();
    let body = tokio::time::timeout(WAIT, resp.into_body().collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes();
    (
        status,
        response_headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// An SSE client over real HTTP, parsing with the crate's spec parser.
pub struct SseClient {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    body: Incoming,
    parser: Parser,
    queue: std::collections::VecDeque<Item>,
    pub ended: bool,
}

impl SseClient {
    pub async fn connect(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> SseClient {
        Self::from_response(request(addr, path, headers).await)
    }

    /// Requests `path` as the second request of a connection whose first was
    /// `/healthz`, so hyper's path serves it rather than the event-stream fast path.
    pub async fn connect_reused(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> SseClient {
        use http_body_util::BodyExt;
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .expect("handshake");
        tokio::spawn(conn);
        let exchange = async {
            let health = hyper::Request::get("/healthz")
                .header("host", "x")
                .body(Empty::<Bytes>::new())
                .expect("request");
            let health = send.send_request(health).await.expect("healthz");
            health.into_body().collect().await.expect("body");
            send.ready().await.expect("connection reusable");
            let mut req = hyper::Request::get(path).header("host", "x");
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            send.send_request(req.body(Empty::<Bytes>::new()).expect("request"))
                .await
                .expect("stream")
        };
        let resp = tokio::time::timeout(WAIT, exchange)
            .await
            .expect("both response heads in time");
        SseClient::from_response(resp)
    }

    /// Reads a response the test requested itself.
    pub fn from_response(resp: hyper::Response<Incoming>) -> SseClient {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        SseClient {
            status,
            headers,
            body: resp.into_body(),
            parser: Parser::new(),
            queue: Default::default(),
            ended: false,
        }
    }

    /// The next item (event, retry or comment), or `None` if the stream ended or
    /// nothing came within `limit`: `ended` tells which. To check that a stream
    /// closed, or stayed open and quiet, use [`Self::expect_closed`] and
    /// [`Self::expect_quiet`].
    pub async fn next_item(&mut self, limit: Duration) -> Option<Item> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(item) = self.queue.pop_front() {
                return Some(item);
            }
            if self.ended {
                return None;
            }
            match tokio::time::timeout_at(deadline, self.body.frame()).await {
                Err(_) => return None,
                Ok(None) | Ok(Some(Err(_))) => self.ended = true,
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        let mut out = Vec::new();
                        self.parser.feed(&data, &mut out);
                        self.queue.extend(out);
                    }
                }
            }
        }
    }

    /// Reads until the server closes the stream, returning what came before
    /// the close; fails the test if the stream is still open after `limit`.
    pub async fn expect_closed(&mut self, limit: Duration) -> Vec<Item> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut read = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_item(left).await {
                Some(item) => read.push(item),
                None if self.ended => return read,
                None => {
                    panic!("the stream was still open after {limit:?}; read meanwhile: {read:?}")
                }
            }
        }
    }

    /// Reads for all of `window`, failing the test if a `snapshot` or an `end`
    /// arrives or the stream closes; returns what was read.
    pub async fn expect_quiet(&mut self, window: Duration) -> Vec<Item> {
        let deadline = tokio::time::Instant::now() + window;
        let mut read = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return read;
            }
            match self.next_item(left).await {
                Some(Item::Event(e)) if e.event == "snapshot" || e.event == "end" => {
                    panic!(
                        "{} during a quiet window: {e:?}; before it: {read:?}",
                        e.event
                    )
                }
                Some(item) => read.push(item),
                None => {
                    assert!(
                        !self.ended,
                        "the stream closed during a quiet window: {read:?}"
                    );
                }
            }
        }
    }

    /// Skips items until one satisfies `pred`, failing the test after `limit`.
    pub async fn wait_item(
        &mut self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&Item) -> bool,
    ) -> Item {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_item(left).await {
                Some(item) if pred(&item) => return item,
                Some(_) => continue,
                None => panic!("no {what} within {limit:?} (ended: {})", self.ended),
            }
        }
    }

    /// The next event that is not `status`, failing the test after `limit`.
    pub async fn next_data_event(&mut self, limit: Duration) -> Event {
        let item = self
            .wait_item(
                "a data event",
                limit,
                |i| matches!(i, Item::Event(e) if e.event != "status"),
            )
            .await;
        let Item::Event(e) = item else {
            unreachable!("wait_item returned an item its predicate refused")
        };
        e
    }

    /// The next `status` event whose data contains `needle`, failing the test after
    /// `limit`.
    pub async fn status_event(&mut self, needle: &str, limit: Duration) -> Event {
        let item = self
            .wait_item(
                &format!("a status event with {needle:?}"),
                limit,
                |i| matches!(i, Item::Event(e) if e.event == "status" && e.data.contains(needle)),
            )
            .await;
        let Item::Event(e) = item else {
            unreachable!("wait_item returned an item its predicate refused")
        };
        e
    }

    /// Asserts the headers every stream response carries.
    pub fn assert_stream_headers(&self) {
        for (name, value) in [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-cache"),
            ("x-accel-buffering", "no"),
        ] {
            assert_eq!(
                self.headers.get(name).map(|v| v.to_str().unwrap_or("")),
                Some(value),
                "{name}"
            );
        }
    }
}

/// Reads the initial snapshot into a new model, failing if the first data event is
/// anything else.
pub async fn initial(client: &mut SseClient) -> Model {
    let mut model = Model::default();
    let e = client.next_data_event(WAIT).await;
    assert_eq!(e.event, "snapshot");
    model.apply(&e, "update");
    model
}

/// A browser-side model: applies snapshot and update events to a multiset of rows.
#[derive(Debug, Default)]
pub struct Model {
    pub rows: HashMap<String, i64>,
    pub keyed: HashMap<String, Value>,
    pub last_id: Option<u64>,
    pub snapshots: Vec<String>,
    pub updates: usize,
}

impl Model {
    /// Applies one event, checking that ids strictly increase.
    pub fn apply(&mut self, e: &Event, update_event: &str) {
        if e.event != "snapshot" && e.event != update_event {
            return;
        }
        let data: Value = serde_json::from_str(&e.data).expect("event data is JSON");
        let id: u64 =
            e.id.as_deref()
                .expect("data events carry an id")
                .parse()
                .expect("numeric id");
        assert_eq!(data["ts"], Value::String(id.to_string()), "ts matches id");
        if let Some(last) = self.last_id {
            assert!(id > last, "ids strictly increase: {last} then {id}");
        }
        self.last_id = Some(id);
        if e.event == "snapshot" {
            self.snapshots
                .push(data["reason"].as_str().unwrap_or("?").to_string());
            self.rows.clear();
            self.keyed.clear();
        } else {
            self.updates += 1;
        }
        for change in data["changes"].as_array().expect("changes array") {
            if let Some(key) = change.get("key") {
                let k = key.to_string();
                match &change["row"] {
                    Value::Null => {
                        self.keyed.remove(&k);
                    }
                    row => {
                        self.keyed.insert(k, row.clone());
                    }
                }
            } else {
                let diff = change["diff"].as_i64().expect("diff");
                let row = change["row"].to_string();
                let n = self.rows.entry(row.clone()).or_insert(0);
                *n += diff;
                if *n == 0 {
                    self.rows.remove(&row);
                }
            }
        }
    }

    /// The multiset as sorted (row, count) pairs.
    pub fn sorted(&self) -> Vec<(String, i64)> {
        let mut v: Vec<_> = self.rows.iter().map(|(r, n)| (r.clone(), *n)).collect();
        v.sort();
        v
    }
}

/// Builds the canonical multiset of `rows` (JSON objects), for comparing with a model.
pub fn multiset(rows: impl IntoIterator<Item = Value>) -> Vec<(String, i64)> {
    let mut m: HashMap<String, i64> = HashMap::new();
    for r in rows {
        *m.entry(r.to_string()).or_insert(0) += 1;
    }
    let mut v: Vec<_> = m.into_iter().collect();
    v.sort();
    v
}

/// A development engine running in this process, outside any gateway.
pub struct TestEngine {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for TestEngine {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl TestEngine {
    pub async fn start(init: &str, retain: Duration, tick: Duration) -> TestEngine {
        init_logging();
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("init.sql");
        std::fs::write(&path, init).expect("init");
        let shutdown = CancellationToken::new();
        let running = tailgate_engine::start(
            tailgate_engine::EngineConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                init: Some(path),
                legacy: false,
                retain,
                tick,
                schedule: Vec::new(),
            },
            shutdown.clone(),
        )
        .await
        .expect("engine starts");
        TestEngine {
            addr: running.local_addr(),
            shutdown,
            _dir: dir,
        }
    }

    /// The `[upstream]` section pointing at `addr` (the engine or a proxy before it).
    pub fn upstream(addr: SocketAddr) -> String {
        format!(
            "[upstream]\nurl = \"postgres://materialize@{addr}/materialize?sslmode=disable\"\n\
             progress_timeout = \"1s\"\nbackoff_initial = \"50ms\"\nbackoff_max = \"300ms\"\n"
        )
    }
}

/// `SELECT id, name, qty FROM items_v` as a multiset of JSON rows.
pub async fn items_truth(sql: &tokio_postgres::Client) -> Vec<(String, i64)> {
    let query = "SELECT id, name, qty FROM items_v";
    let rows = bounded(query, SQL_WAIT, sql.simple_query(query))
        .await
        .expect("select");
    multiset(rows.into_iter().filter_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => Some(serde_json::json!({
            "id": r.get(0).and_then(|v| v.parse::<i64>().ok()),
            "name": r.get(1),
            "qty": r.get(2).and_then(|v| v.parse::<i64>().ok()),
        })),
        _ => None,
    }))
}

/// Reads events into `model` until `done` holds, failing after the wait limit.
pub async fn converge(
    client: &mut SseClient,
    model: &mut Model,
    event: &str,
    done: impl Fn(&Model) -> bool,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done(model) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        assert!(!left.is_zero(), "model did not converge: {model:?}");
        match client.next_item(left.min(Duration::from_millis(500))).await {
            Some(Item::Event(e)) => model.apply(&e, event),
            Some(_) => {}
            None => assert!(!client.ended, "stream ended before converging: {model:?}"),
        }
    }
}

/// The real binary serving a config, with its log lines readable.
pub struct ChildGateway {
    pub child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// Every log line read so far, in order.
    pub seen: Vec<String>,
}

impl Drop for ChildGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ChildGateway {
    pub fn start(config: &Path) -> (ChildGateway, SocketAddr) {
        Self::start_with_env(config, &[])
    }

    /// Starts the binary with extra environment variables.
    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> (ChildGateway, SocketAddr) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tailgate"))
            .arg("--config")
            .arg(config)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn gateway");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut gw = ChildGateway {
            child,
            lines,
            seen: Vec::new(),
        };
        let line = gw.wait_line("Gateway listening", Duration::from_secs(20));
        let addr = log_field(&line, "addr")
            .and_then(|a| a.parse().ok())
            .expect("address in the log line");
        (gw, addr)
    }

    /// The next log line containing `needle`, failing the test after `limit`, or as soon
    /// as the process closes its stderr (it exited or is exiting).
    pub fn wait_line(&mut self, needle: &str, limit: Duration) -> String {
        use std::sync::mpsc::RecvTimeoutError;
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "no log line containing {needle:?} within {limit:?}; log so far:\n{}",
                    self.seen.join("\n")
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "the gateway closed its log ({}) before a line containing {needle:?}; \
                     log so far:\n{}",
                    self.exit_status(Duration::from_secs(5)),
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Every log line so far, reading what has arrived without waiting.
    pub fn all_lines(&mut self) -> &[String] {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        &self.seen
    }

    /// How the process ended, waiting up to `limit` for it to end.
    fn exit_status(&mut self, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return format!("exited with {status}"),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => return format!("still running after {limit:?}"),
                Err(e) => return format!("exit status unknown: {e}"),
            }
        }
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
    }

    /// Open descriptors and resident memory (KiB) of the gateway process.
    pub fn fds_and_rss(&self) -> (usize, u64) {
        let pid = self.child.id();
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("the gateway's /proc/<pid>/fd")
            .count();
        let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .expect("the gateway's /proc/<pid>/status")
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .expect("VmRSS in /proc/<pid>/status");
        (fds, rss)
    }
}

/// A field of a log line, text (`name=value`) or JSON (`"name": "value"`).
pub fn log_field(line: &str, name: &str) -> Option<String> {
    if let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(line) {
        return fields.get(name).map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        });
    }
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .map(|v| v.trim_matches('"').to_string())
}

/// An SSE client on a raw socket with a tiny receive buffer, so that not reading
/// quickly backs up into the gateway instead of into the kernel. It relies on the
/// gateway's stream responses being close-delimited (no chunked framing).
pub struct RawSseClient {
    socket: TcpStream,
    parser: Parser,
    queue: std::collections::VecDeque<Item>,
    pub ended: bool,
}

impl RawSseClient {
    /// A socket with a 4 KiB receive buffer that has sent `GET path` and read nothing.
    pub async fn send_request(addr: SocketAddr, path: &str) -> TcpStream {
        use tokio::io::AsyncWriteExt;
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("rcvbuf");
        let mut socket = socket.connect(addr).await.expect("connect");
        socket
            .write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .expect("request");
        socket
    }

    pub async fn connect(addr: SocketAddr, path: &str) -> RawSseClient {
        use tokio::io::AsyncReadExt;
        let mut socket = Self::send_request(addr, path).await;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = tokio::time::timeout(WAIT, socket.read(&mut byte))
                .await
                .expect("head in time")
                .expect("read head");
            assert_eq!(n, 1, "connection closed in the head");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(!head.contains("transfer-encoding"), "{head}");
        RawSseClient {
            socket,
            parser: Parser::new(),
            queue: Default::default(),
            ended: false,
        }
    }

    /// Sends bytes on the connection, as a client that misbehaves would.
    pub async fn send(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.socket.write_all(bytes).await.expect("send");
    }

    /// The next item, or `None` if the stream ended or nothing came within `limit`:
    /// `ended` tells which.
    pub async fn next_item(&mut self, limit: Duration) -> Option<Item> {
        use tokio::io::AsyncReadExt;
        let deadline = tokio::time::Instant::now() + limit;
        let mut buf = vec![0u8; 4096];
        loop {
            if let Some(item) = self.queue.pop_front() {
                return Some(item);
            }
            if self.ended {
                return None;
            }
            match tokio::time::timeout_at(deadline, self.socket.read(&mut buf)).await {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => self.ended = true,
                Ok(Ok(n)) => {
                    let mut out = Vec::new();
                    self.parser.feed(&buf[..n], &mut out);
                    self.queue.extend(out);
                }
            }
        }
    }
}
