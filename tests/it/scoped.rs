//! Scoped streams over the real engine and real HTTP: clients of a template's
//! partitions (with and without query filters, diff and keyed) converge to their own
//! `SELECT ... WHERE`; an untouched partition hears nothing; rows that change
//! partition move out and in; one upstream subscription serves every partition and
//! every stream on a view; hostile values are refused before anything else; a token's
//! scope cannot be widened; and resume works within a partition.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use jsonwebtoken::{encode, EncodingKey, Header};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tailgate::sse::Item;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::support::{
    bounded, converge, embedded_body, engine_subscriptions, gateway_sessions, get, initial, metric,
    multiset, wait_for, Model, SseClient, TestGateway, SQL_WAIT, WAIT,
};

const CUSTOMERS: i64 = 200;
const STATUSES: [&str; 4] = ["open", "held", "shipped", "void"];
const REGIONS: [&str; 3] = ["eu", "us", "apac"];

/// `orders` with 400 rows over 200 customers, a view over it, and a table that the
/// hostile values must leave alone.
fn init() -> String {
    let mut rng = StdRng::seed_from_u64(7);
    let rows: Vec<String> = (1..=400)
        .map(|id| {
            format!(
                "({id}, {}, '{}', '{}', {})",
                rng.random_range(0..CUSTOMERS),
                STATUSES[rng.random_range(0..STATUSES.len())],
                REGIONS[rng.random_range(0..REGIONS.len())],
                rng.random_range(1..1000)
            )
        })
        .collect();
    format!(
        "CREATE TABLE orders (order_id int, customer_id int, status text, region text, total int);\n\
         CREATE VIEW orders_v AS SELECT order_id, customer_id, status, region, total FROM orders;\n\
         CREATE TABLE x (a int);\nINSERT INTO x VALUES (1);\n\
         INSERT INTO orders VALUES {};\n",
        rows.join(", ")
    )
}

const STREAMS: &str = "[[streams]]\npath = \"/orders/{customer_id}\"\nview = \"orders_v\"\n\
    filters = [\"status\", \"region\"]\ncolumns = [\"order_id\", \"customer_id\", \"status\", \"total\"]\n\
    [[streams]]\npath = \"/keyed/{customer_id}\"\nview = \"orders_v\"\nkey = [\"order_id\"]\n\
    filters = [\"status\"]\n";

async fn start(streams: &str) -> TestGateway {
    start_with("", streams).await
}

/// A gateway whose `[server]` table goes on with `server`.
async fn start_with(server: &str, streams: &str) -> TestGateway {
    let gw = TestGateway::start(&embedded_body(server, streams), &[("init.sql", &init())]).await;
    wait_for("the gateway ready", WAIT, || async {
        (get(gw.addr, "/readyz", &[]).await.0 == 200).then_some(())
    })
    .await;
    gw
}

/// Rows of `query` as JSON objects: the id columns and `total` as numbers, the rest
/// as strings.
async fn select(sql: &Client, query: &str) -> Vec<Value> {
    let messages = bounded(query, SQL_WAIT, sql.simple_query(query))
        .await
        .expect("select");
    messages
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                let mut row = serde_json::Map::new();
                for (i, c) in r.columns().iter().enumerate() {
                    let text = r.get(i).map(str::to_string);
                    let value = match c.name() {
                        "order_id" | "customer_id" | "total" => {
                            json!(text.and_then(|t| t.parse::<i64>().ok()))
                        }
                        _ => json!(text),
                    };
                    row.insert(c.name().to_string(), value);
                }
                Some(Value::Object(row))
            }
            _ => None,
        })
        .collect()
}

/// A client of one partition and its predicate.
struct Watcher {
    client: SseClient,
    model: Model,
    keyed: bool,
    /// The `WHERE` of the rows it should hold.
    predicate: String,
}

impl Watcher {
    async fn open(gw: &TestGateway, path: &str, keyed: bool, predicate: String) -> Watcher {
        let mut client = gw.sse(path).await;
        assert_eq!(client.status, 200, "{path}");
        let model = initial(&mut client).await;
        Watcher {
            client,
            model,
            keyed,
            predicate,
        }
    }

    async fn converge(&mut self, sql: &Client) {
        if self.keyed {
            let rows = select(
                sql,
                &format!("SELECT * FROM orders_v WHERE {}", self.predicate),
            )
            .await;
            let truth: HashMap<String, Value> = rows
                .into_iter()
                .map(|r| (json!({"order_id": r["order_id"]}).to_string(), r))
                .collect();
            converge(&mut self.client, &mut self.model, "update", |m| {
                m.keyed == truth
            })
            .await;
        } else {
            let rows = select(
                sql,
                &format!(
                    "SELECT order_id, customer_id, status, total FROM orders_v WHERE {}",
                    self.predicate
                ),
            )
            .await;
            let truth = multiset(rows);
            converge(&mut self.client, &mut self.model, "update", |m| {
                m.sorted() == truth
            })
            .await;
        }
    }
}

/// Random inserts, status changes, moves between customers (some of several rows in
/// one transaction) and deletes, biased towards the watched customers.
async fn random_writes(sql: &Client, watched: &[i64], n: usize) {
    let mut rng = StdRng::seed_from_u64(11);
    let mut next_id = 1000;
    let customer = |rng: &mut StdRng| {
        if rng.random_bool(0.6) {
            watched[rng.random_range(0..watched.len())]
        } else {
            rng.random_range(0..CUSTOMERS)
        }
    };
    for _ in 0..n {
        let order = rng.random_range(1..=400);
        let statement = match rng.random_range(0..10) {
            0..=3 => {
                next_id += 1;
                format!(
                    "INSERT INTO orders VALUES ({next_id}, {}, '{}', '{}', {})",
                    customer(&mut rng),
                    STATUSES[rng.random_range(0..4)],
                    REGIONS[rng.random_range(0..3)],
                    rng.random_range(1..1000)
                )
            }
            4..=5 => format!(
                "UPDATE orders SET status = '{}' WHERE order_id = {order}",
                STATUSES[rng.random_range(0..4)]
            ),
            6 => format!(
                "UPDATE orders SET customer_id = {} WHERE order_id = {order}",
                customer(&mut rng)
            ),
            7 => format!("DELETE FROM orders WHERE order_id = {order}"),
            _ => format!(
                "BEGIN; UPDATE orders SET customer_id = {} WHERE order_id = {order}; \
                 UPDATE orders SET customer_id = {}, status = 'held' WHERE order_id = {}; COMMIT",
                customer(&mut rng),
                customer(&mut rng),
                rng.random_range(1..=400)
            ),
        };
        bounded(&statement, SQL_WAIT, sql.batch_execute(&statement))
            .await
            .expect("write");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_twenty_partitions_converge_to_their_own_rows() {
    let gw = start(STREAMS).await;
    let sql = gw.sql().await;
    let watched: Vec<i64> = (0..20).map(|p| p * 10 + 3).collect();
    let mut watchers = Vec::new();
    for (p, c) in watched.iter().enumerate() {
        let (query, extra) = match p % 3 {
            0 => ("", String::new()),
            1 => (
                "?status=open&status=held",
                " AND status IN ('open', 'held')".to_string(),
            ),
            _ => (
                "?status=open&region=eu",
                " AND status = 'open' AND region = 'eu'".to_string(),
            ),
        };
        let predicate = format!("customer_id = {c}{extra}");
        watchers.push(Watcher::open(&gw, &format!("/orders/{c}{query}"), false, predicate).await);
        let (query, extra) = match p % 2 {
            0 => ("", ""),
            _ => ("?status=shipped", " AND status = 'shipped'"),
        };
        let predicate = format!("customer_id = {c}{extra}");
        watchers.push(Watcher::open(&gw, &format!("/keyed/{c}{query}"), true, predicate).await);
    }
    // The snapshots are already each client's own rows.
    for w in &mut watchers {
        w.converge(&sql).await;
    }
    random_writes(&sql, &watched, 300).await;
    for w in &mut watchers {
        w.converge(&sql).await;
        assert_eq!(w.model.snapshots, ["initial"], "{}", w.predicate);
    }
    // Diff and keyed streams: two sources, whatever the partitions.
    assert_eq!(gateway_sessions(&sql).await, 2);
    let (_, metrics) = gw.get("/metrics").await;
    assert_eq!(
        metric(&metrics, "sse_clients{stream=\"/orders/{customer_id}\"}"),
        Some(20)
    );
    // Twenty partitions, each with one filter set: one channel per client.
    assert_eq!(
        metric(&metrics, "stream_channels{stream=\"/keyed/{customer_id}\"}"),
        Some(20)
    );
    assert!(
        !metrics.contains("stream=\"/orders/3"),
        "metrics never name a value"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untouched_partition_hears_only_keepalives() {
    let gw = start_with(
        "heartbeat = \"100ms\"\n",
        "[[streams]]\npath = \"/orders/{customer_id}\"\nview = \"orders_v\"\n",
    )
    .await;
    let sql = gw.sql().await;
    let mut busy = gw.sse("/orders/1").await;
    let mut idle = gw.sse("/orders/2").await;
    initial(&mut busy).await;
    initial(&mut idle).await;
    for i in 0..20 {
        sql.batch_execute(&format!(
            "INSERT INTO orders VALUES ({}, 1, 'open', 'eu', 1)",
            5000 + i
        ))
        .await
        .expect("insert");
    }
    let mut model = Model::default();
    converge(&mut busy, &mut model, "update", |m| m.updates >= 1).await;
    let heard = idle.expect_quiet(Duration::from_millis(600)).await;
    assert!(
        heard.iter().all(|i| matches!(i, Item::Comment(_))),
        "only keepalives: {heard:?}"
    );
    assert!(!heard.is_empty(), "keepalives keep coming");
    sql.batch_execute("INSERT INTO orders VALUES (6000, 2, 'open', 'eu', 1)")
        .await
        .expect("insert");
    let e = idle.next_data_event(WAIT).await;
    assert_eq!(e.event, "update");
    assert!(e.data.contains("6000"), "{}", e.data);
}

/// A row whose customer changes leaves one partition and enters the other; two moves
/// in one transaction are one event for each side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_move_out_of_one_partition_and_into_another() {
    let gw = start(STREAMS).await;
    let sql = gw.sql().await;
    sql.batch_execute(
        "INSERT INTO orders VALUES (9001, 500, 'open', 'eu', 5), (9002, 501, 'open', 'eu', 6)",
    )
    .await
    .expect("insert");
    let mut diff_a = gw.sse("/orders/500").await;
    let mut diff_b = gw.sse("/orders/501").await;
    let mut keyed_a = gw.sse("/keyed/500").await;
    let mut keyed_b = gw.sse("/keyed/501").await;
    for c in [&mut diff_a, &mut diff_b, &mut keyed_a, &mut keyed_b] {
        let m = initial(c).await;
        assert_eq!(m.rows.len() + m.keyed.len(), 1);
    }
    sql.batch_execute("UPDATE orders SET customer_id = 501 WHERE order_id = 9001")
        .await
        .expect("move");
    let out = diff_a.next_data_event(WAIT).await;
    let v: Value = serde_json::from_str(&out.data).expect("json");
    assert_eq!(
        v["changes"],
        json!([{"row": {"order_id": 9001, "customer_id": 500, "status": "open", "total": 5}, "diff": -1}])
    );
    let into = diff_b.next_data_event(WAIT).await;
    let v: Value = serde_json::from_str(&into.data).expect("json");
    assert_eq!(
        v["changes"],
        json!([{"row": {"order_id": 9001, "customer_id": 501, "status": "open", "total": 5}, "diff": 1}])
    );
    assert_eq!(out.id, into.id, "one timestamp on both sides");
    let v: Value = serde_json::from_str(&keyed_a.next_data_event(WAIT).await.data).expect("json");
    assert_eq!(
        v["changes"],
        json!([{"key": {"order_id": 9001}, "row": null}])
    );
    let v: Value = serde_json::from_str(&keyed_b.next_data_event(WAIT).await.data).expect("json");
    assert_eq!(v["changes"][0]["key"], json!({"order_id": 9001}));
    assert_eq!(v["changes"][0]["row"]["customer_id"], 501);

    // Both rows swap sides in one transaction: one event per side, holding both.
    sql.batch_execute(
        "BEGIN; UPDATE orders SET customer_id = 500 WHERE order_id = 9001; \
         UPDATE orders SET customer_id = 500 WHERE order_id = 9002; COMMIT",
    )
    .await
    .expect("swap");
    let v: Value = serde_json::from_str(&diff_b.next_data_event(WAIT).await.data).expect("json");
    let diffs: BTreeSet<(i64, i64)> = v["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|c| {
            (
                c["row"]["order_id"].as_i64().unwrap_or(0),
                c["diff"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(diffs, BTreeSet::from([(9001, -1), (9002, -1)]));
    let v: Value = serde_json::from_str(&keyed_a.next_data_event(WAIT).await.data).expect("json");
    assert_eq!(v["changes"].as_array().map(Vec::len), Some(2));
    assert!(v["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .all(|c| c["row"]["customer_id"] == 500));
}

/// Five hundred partitions of a template and a plain stream on the same view: one
/// subscription on the engine, one session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_subscription_serves_every_partition_and_every_stream_on_a_view() {
    let gw = start(
        "[[streams]]\npath = \"/orders/{customer_id}\"\nview = \"orders_v\"\n\
         [[streams]]\npath = \"/all\"\nview = \"orders_v\"\n\
         [[streams]]\npath = \"/slim\"\nview = \"orders_v\"\ncolumns = [\"order_id\"]\n",
    )
    .await;
    let sql = gw.sql().await;
    let mut clients = Vec::new();
    for c in 0..500 {
        let mut client = gw.sse(&format!("/orders/{c}")).await;
        assert_eq!(client.status, 200);
        client.next_data_event(WAIT).await;
        clients.push(client);
    }
    let mut all = gw.sse("/all").await;
    initial(&mut all).await;
    assert_eq!(engine_subscriptions(&sql).await, 1);
    assert_eq!(gateway_sessions(&sql).await, 1);
    let (_, metrics) = gw.get("/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "stream_channels{stream=\"/orders/{customer_id}\"}"
        ),
        Some(500)
    );
    // The listing shows the template with its parameters.
    let (_, listing) = gw.get("/").await;
    let v: Value = serde_json::from_str(&listing).expect("json");
    let t = v["streams"]
        .as_array()
        .expect("streams")
        .iter()
        .find(|s| s["path"] == "/orders/{customer_id}")
        .expect("template listed")
        .clone();
    assert_eq!(t["params"], json!(["customer_id"]));
    assert_eq!(t["max_partitions"], 10000);
    let slim = v["streams"]
        .as_array()
        .expect("streams")
        .iter()
        .find(|s| s["path"] == "/slim")
        .expect("listed")
        .clone();
    assert_eq!(slim["columns"], json!(["order_id"]));
}

/// Every hostile value is a `400` naming its parameter, on both response paths, and
/// the engine's tables are as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_values_are_refused_and_reach_nothing() {
    let gw = start(STREAMS).await;
    let sql = gw.sql().await;
    let before = select(&sql, "SELECT * FROM orders").await.len();
    let long = "9".repeat(10_000);
    let cases: Vec<(String, &str)> = vec![
        ("/orders/1%20OR%201=1".into(), "customer_id"),
        (
            "/orders/%27%3B%20DROP%20TABLE%20x%3B%20--".into(),
            "customer_id",
        ),
        ("/orders/%00".into(), "customer_id"),
        (format!("/orders/{long}"), "customer_id"),
        ("/orders/042".into(), "customer_id"),
        ("/orders/%D9%A4%D9%A2".into(), "customer_id"),
        ("/orders/%5B1%5D".into(), "customer_id"),
        ("/orders/1,2".into(), "customer_id"),
        ("/orders/%FF".into(), "customer_id"),
        ("/orders/1?status=".into(), "status"),
        ("/orders/1?status=%00".into(), "status"),
        (format!("/orders/1?status={long}"), "status"),
        ("/orders/1?nope=1".into(), "nope"),
        ("/orders/1?customer_id=2".into(), "customer_id"),
        ("/orders/1?status%5B%5D=open".into(), "status[]"),
        ("/orders/1?total=5".into(), "total"),
    ];
    let many: String = (0..65).map(|i| format!("status=s{i}&")).collect();
    let cases = cases
        .into_iter()
        .chain([(format!("/orders/1?{many}"), "status")]);
    for (path, parameter) in cases {
        for accept in ["text/event-stream", "application/json"] {
            let (status, body) = get(gw.addr, &path, &[("accept", accept)]).await;
            assert_eq!(status, 400, "{path} ({accept}): {body}");
            let v: Value = serde_json::from_str(&body).expect("JSON error");
            assert_eq!(v["parameter"], parameter, "{path}: {body}");
            assert!(v["error"].as_str().is_some_and(|e| !e.contains("DROP")));
        }
    }
    // Fine values of the same shapes are served; text is only ever compared.
    for path in [
        "/orders/-1",
        "/orders/0",
        "/keyed/7?status=open&status=held",
        "/orders/1?status=open'%20OR%20'1'='1",
        "/orders/1?status=%D8%B4%D8%AD%D9%86",
    ] {
        assert_eq!(gw.status(path).await, 200, "{path}");
    }
    assert_eq!(select(&sql, "SELECT * FROM orders").await.len(), before);
    assert_eq!(select(&sql, "SELECT * FROM x").await.len(), 1);
}

const SECRET: &str = "a shared secret for the scoped stream tests, long enough";

fn token(claims: Value) -> String {
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()).expect("key"),
    )
    .expect("sign")
}

fn bearer(claims: Value) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 600;
    let mut claims = claims;
    claims["exp"] = json!(exp);
    claims["aud"] = json!("tailgate");
    format!("Bearer {}", token(claims))
}

/// The rows a client holds, as (order_id, customer_id).
fn held(m: &Model) -> BTreeSet<(i64, i64)> {
    m.rows
        .keys()
        .map(|r| {
            let v: Value = serde_json::from_str(r).expect("row");
            (
                v["order_id"].as_i64().unwrap_or(0),
                v["customer_id"].as_i64().unwrap_or(0),
            )
        })
        .collect()
}

/// A scope from the token's claim is always applied: the path and the query filters
/// can narrow it but never widen it (a template on the scope's own column is a config
/// error); an array claim means IN; a missing claim is 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokens_scope_cannot_be_widened() {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("secret"), SECRET).expect("secret");
    std::fs::write(dir.path().join("init.sql"), init()).expect("init");
    let body = format!(
        "[embedded]\ninit = \"init.sql\"\n\
         [auth]\nmode = \"jwt\"\n[[auth.issuers]]\niss = \"test\"\naudience = [\"tailgate\"]\n\
         algorithms = [\"HS256\"]\n\
         secret_file = \"{}\"\n\
         [[streams]]\npath = \"/mine\"\nview = \"orders_v\"\n\
         filters = [\"customer_id\", \"status\"]\ncolumns = [\"order_id\", \"customer_id\"]\n\
         scope = {{ column = \"customer_id\", claim = \"/app/customers\" }}\n\
         [[streams]]\npath = \"/region/{{region}}\"\nview = \"orders_v\"\n\
         columns = [\"order_id\", \"customer_id\"]\n\
         scope = {{ column = \"customer_id\", claim = \"/app/customers\" }}\n",
        dir.path().join("secret").display()
    );
    let path = crate::support::write_config(dir.path(), &body, &[]);
    let gw = TestGateway::launch(dir, &path).await;
    // A scoped stream learns its columns' types from its first snapshot.
    wait_for("the gateway ready", WAIT, || async {
        (get(gw.addr, "/readyz", &[]).await.0 == 200).then_some(())
    })
    .await;
    let sql = gw.sql().await;
    sql.batch_execute(
        "DELETE FROM orders WHERE customer_id IN (700, 701, 702); \
         INSERT INTO orders VALUES (7001, 700, 'open', 'eu', 1), (7002, 701, 'held', 'eu', 1), \
         (7003, 702, 'open', 'eu', 1), (7004, 701, 'open', 'us', 1)",
    )
    .await
    .expect("rows");
    let one = bearer(json!({"iss": "test", "app": {"customers": 700}}));
    let two = bearer(json!({"iss": "test", "app": {"customers": [700, "701"]}}));
    let open = |path: &str, auth: &str| {
        let path = path.to_string();
        let auth = auth.to_string();
        let addr = gw.addr;
        async move { SseClient::connect(addr, &path, &[("authorization", &auth)]).await }
    };

    let mut c = open("/mine", &one).await;
    assert_eq!(held(&initial(&mut c).await), BTreeSet::from([(7001, 700)]));
    let mut c = open("/mine", &two).await;
    assert_eq!(
        held(&initial(&mut c).await),
        BTreeSet::from([(7001, 700), (7002, 701), (7004, 701)])
    );
    // A filter narrows the scope.
    let mut c = open("/mine?customer_id=701", &two).await;
    assert_eq!(
        held(&initial(&mut c).await),
        BTreeSet::from([(7002, 701), (7004, 701)])
    );
    let mut c = open("/mine?status=open", &two).await;
    assert_eq!(
        held(&initial(&mut c).await),
        BTreeSet::from([(7001, 700), (7004, 701)])
    );
    // The path picks rows within the scope, never outside it.
    let mut c = open("/region/eu", &two).await;
    assert_eq!(
        held(&initial(&mut c).await),
        BTreeSet::from([(7001, 700), (7002, 701)])
    );
    let mut c = open("/region/us", &one).await;
    assert_eq!(held(&initial(&mut c).await), BTreeSet::new());

    // The query does not widen it.
    for (path, auth) in [
        ("/mine?customer_id=702", &one),
        ("/mine?customer_id=700&customer_id=702", &two),
    ] {
        let (status, body) = get(gw.addr, path, &[("authorization", auth)]).await;
        assert_eq!(status, 403, "{path}: {body}");
    }
    // A token without the claim, or with nothing usable in it.
    for claims in [
        json!({"iss": "test"}),
        json!({"iss": "test", "app": {"customers": null}}),
        json!({"iss": "test", "app": {"customers": []}}),
        json!({"iss": "test", "app": {"customers": [{"a": 1}]}}),
    ] {
        let (status, body) = get(gw.addr, "/mine", &[("authorization", &bearer(claims))]).await;
        assert_eq!(status, 403, "{body}");
    }
    // No token at all.
    assert_eq!(gw.status("/mine").await, 401);

    // A row that moves into the scope arrives; one that moves out leaves.
    let mut c = open("/mine", &one).await;
    initial(&mut c).await;
    sql.batch_execute("UPDATE orders SET customer_id = 700 WHERE order_id = 7003")
        .await
        .expect("move in");
    let v: Value = serde_json::from_str(&c.next_data_event(WAIT).await.data).expect("json");
    assert_eq!(
        v["changes"],
        json!([{"row": {"order_id": 7003, "customer_id": 700}, "diff": 1}])
    );
    let (_, metrics) = gw.get("/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "auth_denied_total{stream=\"/mine\",reason=\"forbidden\"}"
        ),
        Some(6)
    );
}

/// A client that reconnects with its last event id gets exactly its partition's
/// events since then, with no snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_replays_only_the_partitions_events() {
    let gw = start(STREAMS).await;
    let sql = gw.sql().await;
    let mut c = gw.sse("/orders/900?status=open").await;
    let mut model = initial(&mut c).await;
    sql.batch_execute("INSERT INTO orders VALUES (9100, 900, 'open', 'eu', 1)")
        .await
        .expect("insert");
    converge(&mut c, &mut model, "update", |m| m.updates == 1).await;
    let last = model.last_id.expect("an id");
    drop(c);
    for statement in [
        "INSERT INTO orders VALUES (9101, 900, 'open', 'eu', 2)",
        "INSERT INTO orders VALUES (9102, 901, 'open', 'eu', 3)",
        "INSERT INTO orders VALUES (9103, 900, 'held', 'eu', 4)",
        "UPDATE orders SET status = 'open' WHERE order_id = 9103",
    ] {
        sql.batch_execute(statement).await.expect("write");
    }
    let mut again = SseClient::connect(
        gw.addr,
        "/orders/900?status=open",
        &[("last-event-id", &last.to_string())],
    )
    .await;
    converge(&mut again, &mut model, "update", |m| m.rows.len() == 3).await;
    assert_eq!(model.snapshots, ["initial"], "resumed without a snapshot");
    assert_eq!(
        model.updates, 3,
        "the partition's two events, and nothing else"
    );
    let ids: BTreeSet<i64> = model
        .rows
        .keys()
        .map(|r| {
            serde_json::from_str::<Value>(r).expect("row")["order_id"]
                .as_i64()
                .unwrap_or(0)
        })
        .collect();
    assert_eq!(ids, BTreeSet::from([9100, 9101, 9103]));
}

/// `max_partitions` bounds the channels: past it, the overload answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_partitions_gives_the_overload_answer() {
    let gw = start(
        "[[streams]]\npath = \"/orders/{customer_id}\"\nview = \"orders_v\"\nmax_partitions = 2\n",
    )
    .await;
    let mut a = gw.sse("/orders/1").await;
    let mut b = gw.sse("/orders/2").await;
    initial(&mut a).await;
    initial(&mut b).await;
    // Another client of a held channel is served.
    let mut a2 = gw.sse("/orders/1").await;
    initial(&mut a2).await;
    let mut c = gw.sse("/orders/3").await;
    assert_eq!(c.status, 200);
    let items = c.expect_closed(WAIT).await;
    assert!(
        items.iter().any(
            |i| matches!(i, Item::Event(e) if e.event == "end" && e.data.contains("overloaded"))
        ),
        "{items:?}"
    );
    let (status, _) = get(gw.addr, "/orders/3", &[("accept", "application/json")]).await;
    assert_eq!(status, 503);
    let (_, metrics) = gw.get("/metrics").await;
    assert_eq!(
        metric(&metrics, "http_refused_total{reason=\"max_partitions\"}"),
        Some(2)
    );
}

/// A template, filter or column the relation lacks degrades that stream with a clear
/// error (in `/readyz`, the listing and the answer to its clients) while the others
/// on the same source serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_the_relation_lacks_degrades_only_its_stream() {
    let gw = TestGateway::start(
        &embedded_body(
            "",
            "[[streams]]\npath = \"/orders/{customer}\"\nview = \"orders_v\"\n\
             [[streams]]\npath = \"/slim\"\nview = \"orders_v\"\ncolumns = [\"order_id\", \"colour\"]\n\
             [[streams]]\npath = \"/fine/{customer_id}\"\nview = \"orders_v\"\n",
        ),
        &[("init.sql", &init())],
    )
    .await;
    // Only the two broken streams stay not ready, each with its error.
    let v = wait_for("only the broken streams not ready", WAIT, || async {
        let (status, body) = gw.get("/readyz").await;
        let v: Value = serde_json::from_str(&body).ok()?;
        let names: BTreeSet<String> = v["not_ready"]
            .as_array()?
            .iter()
            .filter_map(|s| s["stream"].as_str().map(str::to_string))
            .collect();
        let wanted = BTreeSet::from(["/orders/{customer}".to_string(), "/slim".to_string()]);
        (status == 503 && names == wanted).then_some(v)
    })
    .await;
    let errors = v["not_ready"].to_string();
    assert!(errors.contains("colour"), "{errors}");
    assert!(errors.contains("\\\"customer\\\""), "{errors}");
    // The healthy stream on the same source serves.
    let mut fine = gw.sse("/fine/3").await;
    initial(&mut fine).await;
    // The broken template cannot check its parameters: come back later.
    let mut c = gw.sse("/orders/3").await;
    assert_eq!(c.status, 200);
    let items = c.expect_closed(WAIT).await;
    assert!(
        items.iter().any(
            |i| matches!(i, Item::Event(e) if e.event == "end" && e.data.contains("unavailable"))
        ),
        "{items:?}"
    );
    assert_eq!(
        get(gw.addr, "/orders/3", &[("accept", "application/json")])
            .await
            .0,
        503
    );
    // The broken plain stream tells its clients why.
    let mut slim = gw.sse("/slim").await;
    slim.status_event("colour", WAIT).await;
}
