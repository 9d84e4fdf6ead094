//! The mux over the real engine and real HTTP: two views of one table (its rows, and
//! `count(*)`) written at random, read through one `/_tailgate/mux` connection, agree
//! at every id the mux sends: across a resume, an upstream link reset and a `lagged`
//! snapshot. And a mux is refused as its constituents would be.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tailgate::sse::{Event, Item};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::support::proxy::{Mode, Proxy};
use crate::support::{
    bounded, embedded_body, get, get_full, sql, wait_for, SseClient, TestEngine, TestGateway,
    SQL_WAIT, WAIT,
};

const INIT: &str = "CREATE TABLE t (id int, v int);\n\
    CREATE VIEW rows_v AS SELECT id, v FROM t;\n\
    CREATE VIEW count_v AS SELECT count(*) AS n FROM t;\n\
    INSERT INTO t VALUES (1, 1), (2, 2), (3, 3);\n";

const STREAMS: &str = "[[streams]]\npath = \"/rows\"\nview = \"rows_v\"\n\
    [[streams]]\npath = \"/count\"\nview = \"count_v\"\n\
    [[streams]]\npath = \"/by/{id}\"\nview = \"rows_v\"\n";

const MUX: &str = "/_tailgate/mux?s=/rows&s=/count";

/// Engine history that outlasts any test.
const LONG_HISTORY: Duration = Duration::from_secs(600);

async fn embedded(server: &str, streams: &str) -> TestGateway {
    let gw = TestGateway::start(&embedded_body(server, streams), &[("init.sql", INIT)]).await;
    ready(gw.addr).await;
    gw
}

async fn ready(addr: SocketAddr) {
    wait_for("the gateway ready", WAIT, || async {
        (get(addr, "/readyz", &[]).await.0 == 200).then_some(())
    })
    .await;
}

/// What a page holds of a mux: each stream's rows, applied a group at a time.
struct Page {
    client: SseClient,
    rows: HashMap<String, HashMap<String, i64>>,
    /// Data events of the group whose id has not come yet.
    pending: Vec<(String, String, Value)>,
    /// The id in force after the last event read (as `EventSource` keeps it).
    seen_id: Option<String>,
    /// The id of the last complete group.
    last_id: Option<u64>,
    /// (stream, reason) of every snapshot applied.
    snapshots: Vec<(String, String)>,
    /// How many group ends were checked.
    cuts: usize,
    statuses: Vec<Value>,
}

impl Page {
    async fn open(addr: SocketAddr, resume: Option<&Page>) -> Page {
        let last = resume.and_then(|p| p.last_id).map(|id| id.to_string());
        let headers: Vec<(&str, &str)> = last
            .as_deref()
            .map(|id| vec![("last-event-id", id)])
            .unwrap_or_default();
        let client = SseClient::connect(addr, MUX, &headers).await;
        assert_eq!(client.status, 200);
        client.assert_stream_headers();
        let (rows, last_id, snapshots) = match resume {
            Some(p) => (p.rows.clone(), p.last_id, p.snapshots.clone()),
            None => Default::default(),
        };
        Page {
            client,
            rows,
            pending: Vec::new(),
            seen_id: None,
            last_id,
            snapshots,
            cuts: 0,
            statuses: Vec::new(),
        }
    }

    fn apply(&mut self, e: &Event) {
        let data: Value = serde_json::from_str(&e.data).expect("event data is JSON");
        let stream = data["stream"]
            .as_str()
            .expect("every mux event names its stream")
            .to_string();
        match e.event.as_str() {
            "status" => self.statuses.push(data),
            "end" => panic!("the mux ended: {data}"),
            name => {
                assert!(
                    name == "snapshot" || name == "update",
                    "unexpected event {name}"
                );
                self.pending.push((stream, name.to_string(), data));
                // A group's last event is the one whose id differs from the one in
                // force: only it carries an id line, and group ids only grow.
                if e.id.is_some() && e.id != self.seen_id {
                    let id = e.id.as_deref().and_then(|i| i.parse().ok()).expect("id");
                    self.commit(id);
                }
            }
        }
        self.seen_id = e.id.clone();
    }

    fn commit(&mut self, id: u64) {
        if let Some(last) = self.last_id {
            assert!(id > last, "group ids grow: {last} then {id}");
        }
        for (stream, name, data) in std::mem::take(&mut self.pending) {
            let ts: u64 = data["ts"]
                .as_str()
                .and_then(|t| t.parse().ok())
                .expect("ts");
            assert!(ts <= id, "an event at {ts} released in the group of {id}");
            let rows = self.rows.entry(stream.clone()).or_default();
            if name == "snapshot" {
                rows.clear();
                let reason = data["reason"].as_str().unwrap_or("?").to_string();
                self.snapshots.push((stream, reason));
            }
            for change in data["changes"].as_array().expect("changes") {
                let row = change["row"].to_string();
                let n = rows.entry(row.clone()).or_insert(0);
                *n += change["diff"].as_i64().expect("diff");
                if *n == 0 {
                    rows.remove(&row);
                }
            }
        }
        self.last_id = Some(id);
        let (rows, count) = self.cut();
        assert_eq!(rows, count, "at id {id} the rows and the count disagree");
        self.cuts += 1;
    }

    /// (rows held, the count stream's value) at the last group.
    fn cut(&self) -> (i64, i64) {
        let rows = self.rows.get("/rows").expect("rows at every id");
        let count = self.rows.get("/count").expect("count at every id");
        let n = match count.iter().collect::<Vec<_>>()[..] {
            [(row, 1)] => serde_json::from_str::<Value>(row).expect("row")["n"]
                .as_i64()
                .expect("n"),
            ref other => panic!("count_v is one row: {other:?}"),
        };
        (rows.values().sum(), n)
    }

    /// Reads for up to `limit`; false once nothing more came in it.
    async fn read(&mut self, limit: Duration) -> bool {
        match self.client.next_item(limit).await {
            Some(Item::Event(e)) => {
                self.apply(&e);
                true
            }
            Some(_) => true,
            None => {
                assert!(!self.client.ended, "the mux closed");
                false
            }
        }
    }

    /// Reads until the page holds `truth` rows at a group end.
    async fn converge(&mut self, truth: i64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !(self.pending.is_empty() && self.last_id.is_some() && self.cut() == (truth, truth)) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(
                !left.is_zero(),
                "no convergence to {truth} rows; at {:?}, {:?}",
                self.last_id,
                self.rows.get("/count")
            );
            self.read(left.min(Duration::from_millis(200))).await;
        }
    }

    /// Reads until `cuts` group ends have been checked since the page opened.
    async fn until_cuts(&mut self, cuts: usize) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.cuts < cuts {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(!left.is_zero(), "only {} groups", self.cuts);
            self.read(left).await;
        }
    }
}

async fn count(sql: &Client) -> i64 {
    let query = "SELECT count(*) FROM t";
    let messages = bounded(query, SQL_WAIT, sql.simple_query(query))
        .await
        .expect("count");
    messages
        .into_iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
            _ => None,
        })
        .expect("a count")
}

/// `n` random transactions: inserts of one to three rows, deletes, updates. Returns
/// when they are all committed.
fn writer(sql: Client, seed: u64, n: usize) -> JoinHandle<Client> {
    tokio::spawn(async move {
        let mut rng = StdRng::seed_from_u64(seed);
        for i in 0..n {
            let base = seed as i64 * 100_000 + i as i64 * 10;
            let statement = match rng.random_range(0..4) {
                0 | 1 => {
                    let values: Vec<String> = (0..rng.random_range(1..4))
                        .map(|k| format!("({}, {})", base + k, rng.random_range(0..50)))
                        .collect();
                    format!("INSERT INTO t VALUES {}", values.join(", "))
                }
                2 => format!("DELETE FROM t WHERE v = {}", rng.random_range(0..50)),
                _ => format!(
                    "UPDATE t SET v = v + 1 WHERE v % 7 = {}",
                    rng.random_range(0..7)
                ),
            };
            bounded(&statement, SQL_WAIT, sql.batch_execute(&statement))
                .await
                .expect("write");
        }
        sql
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_and_their_count_agree_at_every_id_and_across_a_resume() {
    let gw = embedded("", STREAMS).await;
    let mut page = Page::open(gw.addr, None).await;
    page.until_cuts(1).await;
    assert_eq!(page.cut(), (3, 3));
    let first: Vec<&str> = page.snapshots.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(
        first,
        ["/count", "/rows"],
        "both snapshots in the first group"
    );

    let write = writer(gw.sql().await, 1, 150);
    page.until_cuts(20).await;
    // Resume mid-flight from the last complete group: replayed, no snapshot.
    let cuts = page.cuts;
    let mut page = Page::open(gw.addr, Some(&page)).await;
    let db = write.await.expect("writer");
    let truth = count(&db).await;
    page.converge(truth).await;
    assert_eq!(
        page.snapshots.len(),
        2,
        "resumed without a snapshot: {:?}",
        page.snapshots
    );
    eprintln!("mux: {} + {} consistent groups", cuts, page.cuts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cut_holds_across_an_upstream_link_reset() {
    let engine = TestEngine::start(INIT, LONG_HISTORY, Duration::from_millis(100)).await;
    let proxy = Proxy::start(engine.addr).await;
    let body = format!("{}{STREAMS}", TestEngine::upstream(proxy.addr));
    let gw = TestGateway::start(&body, &[]).await;
    ready(gw.addr).await;
    let mut page = Page::open(gw.addr, None).await;
    page.until_cuts(1).await;

    let write = writer(sql(engine.addr).await, 2, 120);
    page.until_cuts(10).await;
    proxy.set(Mode::Refuse);
    proxy.cut_all(true);
    let deadline = tokio::time::Instant::now() + WAIT;
    while !page
        .statuses
        .iter()
        .any(|s| s["upstream"] == "reconnecting")
    {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        assert!(!left.is_zero(), "no reconnecting status");
        page.read(left).await;
    }
    proxy.set(Mode::Pass);
    let db = write.await.expect("writer");
    let truth = count(&db).await;
    page.converge(truth).await;
    let streams: Vec<&Value> = page.statuses.iter().map(|s| &s["stream"]).collect();
    assert!(
        streams.contains(&&Value::from("/rows")) && streams.contains(&&Value::from("/count")),
        "each stream's status, labelled: {:?}",
        page.statuses
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagged_snapshot_keeps_the_cut() {
    // `/count` closes its timestamps a window late, so the mux holds `/rows` for it,
    // past its tiny queue: `/rows` is replaced by a snapshot(lagged) at a timestamp
    // the count has closed too.
    let streams = "[[streams]]\npath = \"/rows\"\nview = \"rows_v\"\nclient_queue = 2\n\
        [[streams]]\npath = \"/count\"\nview = \"count_v\"\ndelay = \"300ms\"\n";
    let gw = embedded("", streams).await;
    let mut page = Page::open(gw.addr, None).await;
    page.until_cuts(1).await;
    let db = writer(gw.sql().await, 3, 200).await.expect("writer");
    let truth = count(&db).await;
    page.converge(truth).await;
    assert!(
        page.snapshots
            .iter()
            .any(|(s, r)| s == "/rows" && r == "lagged"),
        "a lagged snapshot: {:?}",
        page.snapshots
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mux_is_refused_as_its_streams_would_be() {
    let gw = embedded("mux_max_streams = 3\n", STREAMS).await;
    let cases: [(&str, u16, &str); 6] = [
        (
            "/_tailgate/mux?s=/rows&s=/nothing",
            404,
            "\"stream\":\"/nothing\"",
        ),
        (
            "/_tailgate/mux?s=/rows&s=/by/x",
            400,
            "\"parameter\":\"id\"",
        ),
        ("/_tailgate/mux?s=/rows&s=/rows", 400, "twice"),
        (
            "/_tailgate/mux?s=/rows&s=/count&s=/by/1&s=/by/2",
            400,
            "more than 3",
        ),
        ("/_tailgate/mux", 400, "names no stream"),
        (
            "/_tailgate/mux?s=/rows&stream=/count",
            400,
            "\"parameter\":\"stream\"",
        ),
    ];
    for (path, status, needle) in cases {
        let (got, _, body) = get_full(gw.addr, path, &[]).await;
        assert_eq!(got, status, "{path}: {body}");
        assert!(body.contains(needle), "{path}: {body}");
    }
    // A template's value travels percent-encoded in `s`, and its partition's rows
    // come labelled with the path as requested.
    let mut client = SseClient::connect(gw.addr, "/_tailgate/mux?s=%2Fby%2F2&s=/count", &[]).await;
    assert_eq!(client.status, 200);
    let mut labels = Vec::new();
    while labels.len() < 2 {
        let e = client.next_data_event(WAIT).await;
        assert_eq!(e.event, "snapshot");
        let data: Value = serde_json::from_str(&e.data).expect("json");
        if data["stream"] == "/by/2" {
            assert_eq!(data["changes"][0]["row"]["id"], 2);
        }
        labels.push(data["stream"].as_str().unwrap_or("").to_string());
    }
    labels.sort();
    assert_eq!(labels, ["/by/2", "/count"]);
}

/// A page on another origin following ten partitions with one `subscribe([...])`,
/// which `tailgate.js` opens as one mux: it reports each stream's `qty` values.
const TEN_PAGE: &str = r#"<!doctype html><meta charset=utf-8><title>ten streams</title>
<script type="module">
import { subscribe } from "GATEWAY/_tailgate/tailgate.js";
const paths = Array.from({ length: 10 }, (_, i) => `/by/${i + 1}`);
const seen = { seq: 0, groups: 0, qty: {}, errors: [] };
const report = () => { seen.seq++; fetch("/report", { method: "POST", body: JSON.stringify(seen) }); };
subscribe(paths, {
  base: "GATEWAY",
  onChange(rows, info) {
    seen.groups++;
    for (const [path, list] of rows) seen.qty[path] = list.map((r) => r.qty);
    report();
  },
  onStatus(st) { if (st.error) { seen.errors.push(st.error); report(); } },
  onEnd(reason) { seen.errors.push(reason); report(); },
});
</script>"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_follows_ten_streams_over_one_mux() {
    if !crate::support::devtools::have_chromium() {
        return;
    }
    let init = "CREATE TABLE t (id int, v int);\nCREATE VIEW rows_v AS SELECT id, v FROM t;\n\
        CREATE TABLE items (id int, name text, qty int);\n\
        CREATE VIEW items_v AS SELECT id, name, qty FROM items;\n";
    let streams = "[[streams]]\npath = \"/by/{id}\"\nview = \"items_v\"\n";
    let body = embedded_body("cors_origins = [\"*\"]\n", streams);
    let gw = TestGateway::start(&body, &[("init.sql", init)]).await;
    ready(gw.addr).await;
    let db = gw.sql().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let page = listener.local_addr().expect("addr");
    let rx = crate::browser::serve_page(
        listener,
        TEN_PAGE.replace("GATEWAY", &format!("http://{}", gw.addr)),
        String::new(),
    );
    let mut reports = crate::browser::Reports {
        rx,
        latest: Value::Null,
    };
    let (_browser, _profile) = crate::browser::chromium(page);
    let all = |r: &Value, qty: i64| {
        (1..=10).all(|i| r["qty"][format!("/by/{i}")] == serde_json::json!([qty + i]))
    };
    // Written after the page subscribed (or before: a snapshot carries them then),
    // and again once every stream shows them: all ten stay live.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    reports
        .until("a first group", deadline, |r| {
            r["groups"].as_u64() >= Some(1)
        })
        .await;
    let values: Vec<String> = (1..=10)
        .map(|i| format!("({i}, 'n{i}', {})", 100 + i))
        .collect();
    db.batch_execute(&format!("INSERT INTO items VALUES {}", values.join(", ")))
        .await
        .expect("insert");
    reports
        .until("every stream's row", deadline, |r| all(r, 100))
        .await;
    for i in 1..=10 {
        db.batch_execute(&format!(
            "UPDATE items SET qty = {} WHERE id = {i}",
            200 + i
        ))
        .await
        .expect("update");
    }
    let latest = reports
        .until("every stream's update", deadline, |r| all(r, 200))
        .await;
    assert_eq!(latest["errors"], serde_json::json!([]), "{latest}");
    // Without the mux, the seventh stream would wait for one of Chromium's six
    // connections to the gateway's origin forever.
    eprintln!("ten streams over one mux: {} groups", latest["groups"]);
}
