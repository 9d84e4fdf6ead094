//! The browser side over real HTTP and in a real headless Chromium: the client files
//! under `/_tailgate/` (content type, ETag, `304`), a stream's path giving browsers its
//! live page and every other client the event stream, the live page's table matching
//! the view after random writes (read from the DOM, with a screenshot for a person),
//! markup in a row staying text, the index linking every stream, the demo page,
//! `tailgate.js` coming back after an overload, and the Node tests of `clients/js`.
//!
//! Chromium tests need `/usr/bin/chromium` (see `browser.rs`); the Node test needs
//! `node` unless `TAILGATE_SKIP_NODE=1`.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::browser::overload_and_return;
use crate::support::devtools::{have_chromium, output_dir, Browser};
use crate::support::{
    bounded, get_full, SseClient, TestGateway, ITEMS_INIT, ITEMS_STREAM, SQL_WAIT, WAIT,
};

/// How long a page may take to show what the test waits for (Chromium's start-up
/// included on the first).
const PAGE_WAIT: Duration = Duration::from_secs(60);

/// Runs in every document the test browser opens, before the page's own scripts:
/// records Content-Security-Policy violations and calls to `alert`.
const WATCH: &str = "window.__violations = []; window.__alerts = 0;\
    document.addEventListener('securitypolicyviolation', (e) =>\
      window.__violations.push(`${e.violatedDirective} ${e.blockedURI}`));\
    window.alert = () => { window.__alerts++; };";

/// The live table as the page shows it: column names, and each row's cells (`null`
/// for a cell shown as SQL NULL), plus the status badge.
const READ_TABLE: &str = "(() => {\
    const t = document.querySelector('table.tg-table');\
    if (!t) return null;\
    const columns = [...t.querySelectorAll('thead th button')].map((b) => b.firstChild.textContent);\
    const rows = [...t.querySelectorAll('tbody tr')].map((tr) =>\
      [...tr.children].map((td) => td.classList.contains('tg-null') ? null : td.textContent));\
    const status = document.querySelector('.tg-status')?.textContent;\
    return { columns, rows, status };\
  })()";

fn header<'h>(headers: &'h hyper::HeaderMap, name: &str) -> &'h str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no {name} header in {headers:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_files_are_served_with_etags_and_revalidate() {
    let gw = TestGateway::embedded("", ITEMS_INIT, ITEMS_STREAM).await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (file, kind) in [
        ("tailgate.js", "text/javascript; charset=utf-8"),
        ("live.js", "text/javascript; charset=utf-8"),
        ("tailgate.d.ts", "application/typescript; charset=utf-8"),
        ("live.d.ts", "application/typescript; charset=utf-8"),
    ] {
        let path = format!("/_tailgate/{file}");
        let (status, headers, body) = get_full(gw.addr, &path, &[]).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(header(&headers, "content-type"), kind, "{path}");
        assert_eq!(header(&headers, "cache-control"), "no-cache", "{path}");
        assert_eq!(header(&headers, "x-content-type-options"), "nosniff");
        let on_disk = std::fs::read_to_string(root.join("clients/js").join(file)).expect("file");
        assert!(body == on_disk, "{path} is the file in clients/js");
        let etag = header(&headers, "etag").to_string();
        assert!(
            etag.starts_with('"') && etag.ends_with('"') && etag.len() > 10,
            "{etag}"
        );

        // A browser revalidating its copy.
        let (status, again, body) =
            get_full(gw.addr, &path, &[("if-none-match", etag.as_str())]).await;
        assert_eq!(status, 304, "{path}");
        assert!(body.is_empty());
        assert_eq!(header(&again, "etag"), etag);
        assert_eq!(header(&again, "cache-control"), "no-cache");
        let listed = format!("\"other\", W/{etag}");
        assert_eq!(
            get_full(gw.addr, &path, &[("if-none-match", &listed)])
                .await
                .0,
            304
        );
        let (status, _, body) = get_full(gw.addr, &path, &[("if-none-match", "\"stale\"")]).await;
        assert_eq!((status, body == on_disk), (200, true), "{path}");
    }
    // The pages' own scripts and the demo page are there too; nothing else is.
    for path in [
        "/_tailgate/stream-page.js",
        "/_tailgate/index-page.js",
        "/_tailgate/examples/sensors",
    ] {
        assert_eq!(gw.get(path).await.0, 200, "{path}");
    }
    assert_eq!(gw.get("/_tailgate/nope.js").await.0, 404);
    // Every file's tag differs.
    let mut tags = BTreeSet::new();
    for file in ["tailgate.js", "live.js", "stream-page.js", "index-page.js"] {
        let (_, headers, _) = get_full(gw.addr, &format!("/_tailgate/{file}"), &[]).await;
        tags.insert(header(&headers, "etag").to_string());
    }
    assert_eq!(tags.len(), 4, "{tags:?}");
}

#[test]
fn reserved_paths_cannot_be_streams() {
    let dir = tempfile::tempdir().expect("dir");
    for path in ["/_tailgate/tailgate.js", "/_tailgate", "/livez"] {
        let config = crate::support::write_config(
            dir.path(),
            &format!("[[streams]]\npath = \"{path}\"\nview = \"v\"\n"),
            &[],
        );
        let err = tailgate::config::load(&config).expect_err("refused");
        assert!(err.to_string().contains("reserved"), "{path}: {err}");
    }
}

/// The live page's checks over HTTP: its headers, its policy, and a body with no
/// inline script.
fn assert_live_page(status: u16, headers: &hyper::HeaderMap, body: &str) {
    assert_eq!(status, 200, "{body}");
    assert_eq!(header(headers, "content-type"), "text/html; charset=utf-8");
    assert_eq!(header(headers, "x-content-type-options"), "nosniff");
    assert_eq!(header(headers, "cache-control"), "no-cache");
    assert!(header(headers, "vary").contains("accept"), "{headers:?}");
    let csp = header(headers, "content-security-policy");
    for directive in [
        "default-src 'none'",
        "script-src 'self';",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
    ] {
        assert!(csp.contains(directive), "{directive} in {csp}");
    }
    assert!(csp.contains("style-src 'sha256-"), "{csp}");
    assert!(!csp.contains("unsafe"), "{csp}");
    assert!(body.contains("<script type=\"module\" src=\"/_tailgate/stream-page.js\"></script>"));
    assert_eq!(body.matches("<script").count(), 1, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_path_gives_browsers_the_page_and_other_clients_the_stream() {
    let gw = TestGateway::embedded("", ITEMS_INIT, ITEMS_STREAM).await;
    let navigating = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";

    // A browser's first request on a connection (the fast path hands it to hyper).
    let (status, headers, page) = get_full(gw.addr, "/items", &[("accept", navigating)]).await;
    assert_live_page(status, &headers, &page);
    let etag = header(&headers, "etag").to_string();
    let (status, _, body) = get_full(
        gw.addr,
        "/items?status=x",
        &[("accept", "text/html"), ("if-none-match", &etag)],
    )
    .await;
    assert_eq!((status, body.as_str()), (304, ""));
    // The same on a reused connection (hyper's path all along).
    let reused = SseClient::connect_reused(gw.addr, "/items", &[("accept", navigating)]).await;
    assert_eq!(reused.status, 200);
    assert_eq!(
        reused.headers.get("content-type").expect("type"),
        "text/html; charset=utf-8"
    );

    // EventSource, curl and a client that says nothing get the stream, on both paths.
    for accept in [Some("text/event-stream"), Some("*/*"), None] {
        let headers: Vec<(&str, &str)> = accept.iter().map(|a| ("accept", *a)).collect();
        for reuse in [false, true] {
            let mut client = if reuse {
                SseClient::connect_reused(gw.addr, "/items", &headers).await
            } else {
                SseClient::connect(gw.addr, "/items", &headers).await
            };
            client.assert_stream_headers();
            let first = client.next_data_event(WAIT).await;
            assert_eq!(first.event, "snapshot", "{accept:?} reused={reuse}");
        }
    }

    // The demo page, with hashes for its inline script and style.
    let (status, headers, demo) = get_full(gw.addr, "/_tailgate/examples/sensors", &[]).await;
    assert_eq!(status, 200);
    assert!(demo.contains("subscribe(\"/sensors\""));
    let csp = header(&headers, "content-security-policy");
    assert!(csp.contains("script-src 'self' 'sha256-"), "{csp}");
    assert!(csp.contains("style-src 'sha256-"), "{csp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_access_control_the_page_is_open_and_its_stream_is_not() {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("secret"), "page-test-secret").expect("secret");
    let gw = TestGateway::embedded(
        &format!(
            "[auth]\nmode = \"jwt\"\n\
             [[auth.issuers]]\niss = \"https://idp.test/\"\naudience = [\"tailgate\"]\n\
             algorithms = [\"HS256\"]\nsecret_file = \"{}\"\n",
            dir.path().join("secret").display()
        ),
        ITEMS_INIT,
        ITEMS_STREAM,
    )
    .await;
    let (status, headers, page) = get_full(gw.addr, "/items", &[("accept", "text/html")]).await;
    assert_live_page(status, &headers, &page);
    assert_eq!(
        SseClient::connect(gw.addr, "/items", &[("accept", "text/event-stream")])
            .await
            .status,
        401
    );
    if !have_chromium() {
        return;
    }
    // In a browser: the page says it is not signed in; with the cookie, the rows.
    let mut browser = Browser::launch(900, 500, WATCH).await;
    let url = format!("http://{}/items", gw.addr);
    browser.navigate(&url).await;
    browser
        .until(
            "the page to say it needs a token",
            PAGE_WAIT,
            "document.querySelector('.tg-problem')?.textContent ?? ''",
            |v| v.as_str().is_some_and(|t| t.contains("Not signed in")),
        )
        .await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"iss": "https://idp.test/", "aud": "tailgate", "exp": exp, "sub": "p"}),
        &jsonwebtoken::EncodingKey::from_secret(b"page-test-secret").expect("key"),
    )
    .expect("token");
    browser
        .call(
            "Network.setCookie",
            json!({"name": "tailgate_token", "value": token, "url": url, "httpOnly": true}),
        )
        .await;
    browser.navigate(&url).await;
    let db = gw.sql().await;
    let truth = table_truth(&db, "items").await;
    browser
        .until("the rows over the cookie", PAGE_WAIT, READ_TABLE, |v| {
            shown_rows(v) == Some(truth.clone())
        })
        .await;
}

/// Rows as the tests compare them: each row's (column, text or NULL) pairs in
/// column-name order, the rows sorted.
type Rows = Vec<Vec<(String, Option<String>)>>;

/// `SELECT * FROM table` as the live page shows it: each row as (column, text or
/// NULL) pairs in column-name order, the rows sorted.
async fn table_truth(db: &tokio_postgres::Client, table: &str) -> Rows {
    let query = format!("SELECT * FROM {table}");
    let messages = bounded(&query, SQL_WAIT, db.simple_query(&query))
        .await
        .expect("select");
    let mut rows: Rows = messages
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                let mut row: Vec<(String, Option<String>)> = r
                    .columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_string(), r.get(i).map(str::to_string)))
                    .collect();
                row.sort();
                Some(row)
            }
            _ => None,
        })
        .collect();
    rows.sort();
    rows
}

/// The rows a [`READ_TABLE`] value shows, in [`table_truth`]'s form.
fn shown_rows(table: &Value) -> Option<Rows> {
    let columns: Vec<String> = table["columns"]
        .as_array()?
        .iter()
        .map(|c| c.as_str().unwrap_or_default().to_string())
        .collect();
    let mut rows: Rows = table["rows"]
        .as_array()?
        .iter()
        .map(|cells| {
            let mut row: Vec<(String, Option<String>)> = columns
                .iter()
                .cloned()
                .zip(
                    cells
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|c| c.as_str().map(str::to_string)),
                )
                .collect();
            row.sort();
            row
        })
        .collect();
    rows.sort();
    Some(rows)
}

/// A random write to `items (id, name, qty)`: an insert (sometimes of a row that is
/// already there, sometimes with a NULL), an update or a delete. `next_id` is the next
/// new id.
fn random_write(rng: &mut impl Rng, next_id: &mut i64) -> String {
    const NAMES: [&str; 6] = [
        "plain",
        "with space",
        "o''neil",
        "ünïcødé ✓",
        "tab\there",
        "a,b;c",
    ];
    let name = NAMES[rng.random_range(0..NAMES.len())];
    let qty = if rng.random_bool(0.15) {
        "NULL".to_string()
    } else {
        rng.random_range(-50..500).to_string()
    };
    let some_id = rng.random_range(0..*next_id);
    match rng.random_range(0..10) {
        0..=3 => {
            *next_id += 1;
            format!(
                "INSERT INTO items VALUES ({}, '{name}', {qty})",
                *next_id - 1
            )
        }
        // The same row again: the page shows a diff stream's duplicates.
        4 => "INSERT INTO items VALUES (0, 'again', 1)".to_string(),
        5..=7 => format!("UPDATE items SET qty = {qty}, name = '{name}' WHERE id = {some_id}"),
        _ => format!("DELETE FROM items WHERE id = {some_id}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_live_page_matches_the_view_after_random_writes() {
    if !have_chromium() {
        return;
    }
    let gw = TestGateway::embedded(
        "",
        "CREATE TABLE items (id int, name text, qty int);\n\
         INSERT INTO items VALUES (1, 'one', 10), (2, 'two', 20), (3, 'three', NULL);\n",
        "[[streams]]\npath = \"/items\"\nquery = \"SELECT * FROM items\"\n",
    )
    .await;
    let db = gw.sql().await;
    let seed: u64 = std::env::var("TAILGATE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("random writes with TAILGATE_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let mut browser = Browser::launch(900, 560, WATCH).await;
    browser.navigate(&format!("http://{}/items", gw.addr)).await;
    let truth = table_truth(&db, "items").await;
    browser
        .until("the initial rows", PAGE_WAIT, READ_TABLE, |v| {
            shown_rows(v) == Some(truth.clone())
        })
        .await;

    let mut next_id = 4;
    for round in 0..4 {
        for _ in 0..12 {
            let write = random_write(&mut rng, &mut next_id);
            bounded(&write, SQL_WAIT, db.batch_execute(&write))
                .await
                .unwrap_or_else(|e| panic!("{write}: {e}"));
        }
        let truth = table_truth(&db, "items").await;
        let shown = browser
            .until(
                &format!("the rows after round {round} (seed {seed})"),
                WAIT,
                READ_TABLE,
                |v| shown_rows(v) == Some(truth.clone()),
            )
            .await;
        assert_eq!(shown["status"], "streaming", "{shown}");
    }
    // The page's own statistics and styling: a row count, a timestamp, the table
    // styled by live.js's stylesheet (its hash is in the policy), no violation.
    let page = browser
        .eval(
            "({ count: document.querySelector('.tg-stats')?.textContent,\
                collapse: getComputedStyle(document.querySelector('table.tg-table')).borderCollapse,\
                title: document.title, violations: window.__violations, alerts: window.__alerts })",
        )
        .await;
    let rows = table_truth(&db, "items").await.len();
    let plural = if rows == 1 { "row" } else { "rows" };
    assert!(
        page["count"]
            .as_str()
            .is_some_and(|t| t.contains(&format!("{rows} {plural}")) && t.contains("events/s")),
        "{page}"
    );
    assert_eq!(page["collapse"], "collapse", "{page}");
    assert_eq!(page["title"], "/items · tailgate");
    assert_eq!(page["violations"], json!([]), "{page}");

    let shot = output_dir().join("live-page.png");
    browser.screenshot(&shot).await;
    println!("live page screenshot: {}", shot.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_shows_markup_in_a_row_as_text() {
    if !have_chromium() {
        return;
    }
    const HOSTILE: [&str; 3] = [
        "<img src=x onerror=alert(1)>",
        "<script>alert(2)</script>",
        "\"><svg onload=alert(3)>",
    ];
    let gw = TestGateway::embedded(
        "",
        "CREATE TABLE notes (id int, body text);\nINSERT INTO notes VALUES (0, 'fine');\n",
        "[[streams]]\npath = \"/notes\"\nquery = \"SELECT id, body FROM notes\"\nkey = [\"id\"]\n",
    )
    .await;
    let db = gw.sql().await;
    let mut browser = Browser::launch(900, 400, WATCH).await;
    browser.navigate(&format!("http://{}/notes", gw.addr)).await;
    browser
        .until("the first row", PAGE_WAIT, READ_TABLE, |v| {
            v["rows"].as_array().is_some_and(|r| r.len() == 1)
        })
        .await;
    // Written while the page is open: they arrive as updates.
    for (i, text) in HOSTILE.iter().enumerate() {
        let write = format!(
            "INSERT INTO notes VALUES ({}, '{}')",
            i + 1,
            text.replace('\'', "''")
        );
        db.batch_execute(&write).await.expect("insert");
    }
    let truth = table_truth(&db, "notes").await;
    browser
        .until("the hostile rows", WAIT, READ_TABLE, |v| {
            shown_rows(v) == Some(truth.clone())
        })
        .await;
    let dom = browser
        .eval(
            "({ cells: [...document.querySelectorAll('table.tg-table td')].map((td) => td.textContent),\
                elements: document.querySelectorAll('table.tg-table img, table.tg-table script, table.tg-table svg').length,\
                anywhere: document.querySelectorAll('img, svg').length,\
                alerts: window.__alerts, violations: window.__violations })",
        )
        .await;
    for text in HOSTILE {
        assert!(
            dom["cells"]
                .as_array()
                .is_some_and(|c| c.iter().any(|v| v == text)),
            "{text} as a cell's text: {dom}"
        );
    }
    assert_eq!(dom["elements"], 0, "{dom}");
    assert_eq!(dom["anywhere"], 0, "{dom}");
    assert_eq!(dom["alerts"], 0, "{dom}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_index_page_links_every_stream() {
    if !have_chromium() {
        return;
    }
    let streams = "[[streams]]\npath = \"/items\"\nview = \"items_v\"\n\
        [[streams]]\npath = \"/items/keyed\"\nview = \"items_v\"\nkey = [\"id\"]\n\
        [[streams]]\npath = \"/big\"\nquery = \"SELECT id, qty FROM items WHERE qty > 10\"\nevent = \"big\"\n";
    let gw = TestGateway::embedded("", ITEMS_INIT, streams).await;
    let mut browser = Browser::launch(900, 600, WATCH).await;
    let index = format!("http://{}/", gw.addr);
    browser.navigate(&index).await;
    let links = browser
        .until(
            "three linked streams",
            PAGE_WAIT,
            "[...document.querySelectorAll('.tg-index li a')].map((a) => a.getAttribute('href'))",
            |v| v.as_array().is_some_and(|a| a.len() == 3),
        )
        .await;
    let links: BTreeSet<&str> = links
        .as_array()
        .expect("links")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(links, BTreeSet::from(["/items", "/items/keyed", "/big"]));
    let meta = browser
        .eval("[...document.querySelectorAll('.tg-index .tg-meta')].map((m) => m.textContent).join('|')")
        .await;
    assert!(
        meta.as_str()
            .is_some_and(|m| m.contains("view items_v") && m.contains("event big")),
        "{meta}"
    );
    let shot = output_dir().join("index-page.png");
    browser.screenshot(&shot).await;
    println!("index page screenshot: {}", shot.display());

    // A link opens the stream's live page.
    browser
        .eval("document.querySelector('.tg-index a[href=\"/items/keyed\"]').click()")
        .await;
    browser
        .until("the keyed stream's rows", PAGE_WAIT, READ_TABLE, |v| {
            v["rows"].as_array().is_some_and(|r| r.len() == 2)
        })
        .await;
    assert_eq!(browser.eval("location.pathname").await, "/items/keyed");

    // A failed reload is shown to the operator, as text.
    std::fs::write(
        gw.config_path(),
        crate::support::config_text(&crate::support::embedded_body(
            "",
            &format!("{streams}[[streams]]\npath = \"/<b>bad</b>\"\nview = \"items_v\"\n"),
        )),
    )
    .expect("rewrite");
    gw.wait_rejected(1).await;
    browser.navigate(&index).await;
    let notice = browser
        .until(
            "the reload error",
            PAGE_WAIT,
            "document.querySelector('.tg-notice pre')?.textContent ?? null",
            |v| v.is_string(),
        )
        .await;
    assert!(
        notice.as_str().is_some_and(|n| n.contains("/<b>bad</b>")),
        "{notice}"
    );
    assert_eq!(
        browser.eval("document.querySelectorAll('b').length").await,
        0
    );
    assert_eq!(browser.eval("window.__violations").await, json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_demo_page_draws_the_sensors() {
    if !have_chromium() {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let demo = std::fs::read_to_string(root.join("examples/demo.sql")).expect("demo.sql");
    // The demo's stream, and readings written fast enough to draw lines.
    let gw = TestGateway::embedded(
        "",
        &demo,
        "[[embedded.schedule]]\nevery = \"200ms\"\n\
         sql = \"INSERT INTO readings VALUES (abs(random()) % 3 + 1, 18 + abs(random()) % 1500 / 100.0, 990 + abs(random()) % 400 / 10.0, mz_epoch_ms())\"\n\
         [[streams]]\npath = \"/sensors\"\nview = \"sensors_view_1s\"\nevent = \"new_message\"\ndelay = \"200ms\"\n\
         [[streams]]\npath = \"/sensors/latest\"\nview = \"latest_reading\"\nkey = [\"sensor_id\"]\n",
    )
    .await;
    let mut browser = Browser::launch(800, 560, WATCH).await;
    browser
        .navigate(&format!("http://{}/_tailgate/examples/sensors", gw.addr))
        .await;
    let drawn = browser
        .until(
            "three sensors drawn",
            PAGE_WAIT,
            "({ lines: document.querySelectorAll('#chart polyline').length,\
                rows: document.querySelectorAll('#rows tr').length,\
                status: document.getElementById('status')?.textContent,\
                violations: window.__violations })",
            // A blocked inline script would never draw: stop at the first violation.
            |v| {
                (v["lines"] == 3 && v["rows"] == 3)
                    || v["violations"].as_array().is_some_and(|a| !a.is_empty())
            },
        )
        .await;
    assert_eq!(drawn["violations"], json!([]), "{drawn}");
    assert_eq!(drawn["status"], "streaming", "{drawn}");
    let shot = output_dir().join("demo-sensors.png");
    browser.screenshot(&shot).await;
    println!("demo page screenshot: {}", shot.display());

    // The demo's keyed stream on its live page (the README's picture).
    let mut browser = Browser::launch(760, 300, WATCH).await;
    browser
        .navigate(&format!("http://{}/sensors/latest", gw.addr))
        .await;
    let shown = browser
        .until("one row per sensor", PAGE_WAIT, READ_TABLE, |v| {
            v["rows"].as_array().is_some_and(|r| r.len() == 3)
        })
        .await;
    assert_eq!(
        shown["columns"][0], "sensor_id",
        "key columns first: {shown}"
    );
    assert_eq!(shown["status"], "streaming", "{shown}");
    let shot = output_dir().join("live-page-sensors.png");
    browser.screenshot(&shot).await;
    println!("live page screenshot: {}", shot.display());
}

/// A page on another origin that follows `/items` with `subscribe()` from the gateway's
/// `/_tailgate/tailgate.js`, reporting as `browser.rs`'s pages do.
const SUBSCRIBE_PAGE: &str = r#"<!doctype html><meta charset=utf-8><title>tailgate.js</title>
<script type="module">
import { subscribe } from "GATEWAY/_tailgate/tailgate.js";
const seen = { seq: 0, snapshots: [], updates: 0, lastId: null, errors: [], rows: [] };
const report = () => { seen.seq++; fetch("/report", { method: "POST", body: JSON.stringify(seen) }); };
subscribe("GATEWAY/items", {
  onChange(rows, info) {
    if (info.kind === "snapshot") seen.snapshots.push(info.reason); else seen.updates++;
    seen.lastId = info.id;
    const counts = new Map();
    for (const row of rows) { const k = JSON.stringify(row); counts.set(k, (counts.get(k) ?? 0) + 1); }
    seen.rows = [...counts.entries()];
    report();
  },
  onStatus(st) { if (st.state === "reconnecting") { seen.errors.push(st.error); report(); } },
});
</script>"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_tailgate_js_comes_back_after_an_overload_and_resumes() {
    if !have_chromium() {
        return;
    }
    let (_gw, latest, last_id) = overload_and_return(SUBSCRIBE_PAGE, |r| {
        r["errors"].as_array().is_some_and(|e| {
            e.iter()
                .any(|e| e.as_str().is_some_and(|e| e.contains("overloaded")))
        })
    })
    .await;
    assert_eq!(
        latest["snapshots"],
        json!(["initial"]),
        "it came back with Last-Event-ID {last_id} and resumed without a snapshot"
    );
}

#[test]
fn node_unit_tests_of_the_js_client_pass() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let run = std::process::Command::new("node")
        .args(["--test", "clients/js/test/"])
        .current_dir(root)
        .output();
    let output = match run {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                std::env::var_os("TAILGATE_SKIP_NODE").is_some_and(|v| v == "1"),
                "`node` is missing: install Node 20 or later (.ci/run does), \
                 or set TAILGATE_SKIP_NODE=1 to skip the clients/js tests"
            );
            eprintln!("node missing and TAILGATE_SKIP_NODE=1: skipping");
            return;
        }
        Err(e) => panic!("running node: {e}"),
    };
    assert!(
        output.status.success(),
        "node --test clients/js/test/ failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The index page's form for a template opens the partition it names, with the
/// filter, and the live page shows that partition's rows only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_index_form_opens_a_templates_partition() {
    if !have_chromium() {
        return;
    }
    let gw = TestGateway::embedded(
        "",
        "CREATE TABLE orders (order_id int, customer_id int, status text);\n\
         INSERT INTO orders VALUES (1, 42, 'open'), (2, 42, 'held'), (3, 7, 'open');\n",
        "[[streams]]\npath = \"/orders/{customer_id}\"\nview = \"orders\"\nkey = [\"order_id\"]\nfilters = [\"status\"]\n",
    )
    .await;
    let mut browser = Browser::launch(900, 500, WATCH).await;
    browser.navigate(&format!("http://{}/", gw.addr)).await;
    browser
        .until(
            "the template's form",
            PAGE_WAIT,
            "document.querySelectorAll('form input').length",
            |v| v == 2,
        )
        .await;
    browser
        .eval(
            "document.querySelector('input[name=customer_id]').value = '42';\
             document.querySelector('input[name=status]').value = 'open';\
             document.querySelector('form button').click()",
        )
        .await;
    let shown = browser
        .until("the partition's rows", PAGE_WAIT, READ_TABLE, |v| {
            v["rows"].as_array().is_some_and(|r| r.len() == 1)
        })
        .await;
    assert!(shown.to_string().contains("42"), "{shown}");
    assert_eq!(
        browser.eval("location.pathname + location.search").await,
        json!("/orders/42?status=open")
    );
    browser
        .screenshot(&output_dir().join("template-partition.png"))
        .await;
    assert_eq!(browser.eval("window.__violations").await, json!([]));
}
