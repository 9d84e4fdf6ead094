//! HTTPS on the public listener, over real TLS on loopback with a test CA made at test
//! time: twenty streams on one HTTP/2 connection converge and end at shutdown; a
//! certificate swapped on disk reaches new connections while open streams go on; a bad
//! pair on disk keeps the old one and is reported; an HTTP/1.1-only client still gets
//! its stream; `tailgate check` names a missing certificate file; and headless
//! Chromium keeps ten live streams on one page over HTTP/2.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, PublicKeyData,
    SerialNumber,
};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use sha2::Digest;
use tailgate::sse::Item;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::support::devtools::{have_chromium, Browser};
use crate::support::{
    bounded, converge, embedded_body, initial, metric, multiset, wait_for, Model, SseClient,
    TestGateway, SQL_WAIT, WAIT,
};

/// A test CA, kept to sign leaves.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A leaf certificate for `localhost` and `127.0.0.1`: its PEM files, its DER (what a
/// handshake shows), and the SPKI pin Chromium takes.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
    spki_sha256: String,
}

impl Ca {
    fn new() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "tailgate test CA");
        let key = KeyPair::generate().expect("ca key");
        Ca {
            issuer: CertifiedIssuer::self_signed(params, key).expect("ca"),
        }
    }

    fn leaf(&self, serial: u64) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("leaf params");
        params.serial_number = Some(SerialNumber::from(serial));
        params
            .distinguished_name
            .push(DnType::CommonName, format!("tailgate test leaf {serial}"));
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        let spki = sha2::Sha256::digest(key.subject_public_key_info());
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
            spki_sha256: base64::engine::general_purpose::STANDARD.encode(spki),
        }
    }

    /// A client config trusting only this CA, offering `alpn`.
    fn client(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.issuer.der().clone()).expect("ca root");
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

/// Writes a leaf's pair where the config names it: each file through a temp file
/// renamed over it, as deployment tools do.
fn install(dir: &Path, leaf: &Leaf) {
    for (name, content) in [("cert.pem", &leaf.cert_pem), ("key.pem", &leaf.key_pem)] {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, content).expect("write");
        std::fs::rename(&tmp, dir.join(name)).expect("rename");
    }
}

/// `grp` says which partition of `/g/{grp}` a row is in.
const INIT: &str = "CREATE TABLE items (grp int, id int, name text);\n\
    CREATE VIEW items_v AS SELECT grp, id, name FROM items;\n\
    INSERT INTO items VALUES (0, 1, 'zero'), (1, 2, 'one');\n";

const STREAMS: &str = "[[streams]]\npath = \"/g/{grp}\"\nview = \"items_v\"\n\
    [[streams]]\npath = \"/items\"\nview = \"items_v\"\n";

/// Extra `[server]` keys of every gateway here.
const TLS: &str = "tls = { cert_file = \"cert.pem\", key_file = \"key.pem\" }\n";

/// A gateway serving HTTPS with `leaf`, plus `server` in `[server]` and `streams`.
async fn gateway(leaf: &Leaf, server: &str, streams: &str) -> TestGateway {
    TestGateway::start(
        &embedded_body(&format!("{TLS}{server}"), streams),
        &[
            ("init.sql", INIT),
            ("cert.pem", &leaf.cert_pem),
            ("key.pem", &leaf.key_pem),
        ],
    )
    .await
}

/// A TLS connection to the gateway, for `localhost`.
async fn connect(addr: SocketAddr, client: Arc<rustls::ClientConfig>) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("server name");
    tokio::time::timeout(
        WAIT,
        tokio_rustls::TlsConnector::from(client).connect(name, tcp),
    )
    .await
    .expect("handshake in time")
    .expect("handshake")
}

/// The leaf certificate a new connection is shown.
async fn served_leaf(addr: SocketAddr, ca: &Ca) -> CertificateDer<'static> {
    let tls = connect(addr, ca.client(&[b"h2"])).await;
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("a peer certificate")
        .clone()
        .into_owned()
}

/// One HTTP/2 connection to the gateway.
async fn h2(addr: SocketAddr, ca: &Ca) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    let tls = connect(addr, ca.client(&[b"h2", b"http/1.1"])).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    send
}

/// A GET on an HTTP/2 connection, as an event-stream client.
async fn get_on(
    send: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    addr: SocketAddr,
    path: &str,
) -> hyper::Response<hyper::body::Incoming> {
    get_with(send, addr, path, &[]).await
}

async fn get_with(
    send: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> hyper::Response<hyper::body::Incoming> {
    let mut request = hyper::Request::get(format!("https://localhost:{}{path}", addr.port()))
        .header("accept", "text/event-stream");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Empty::new()).expect("request");
    tokio::time::timeout(WAIT, send.send_request(request))
        .await
        .expect("response head in time")
        .expect("response")
}

async fn stream_on(
    send: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    addr: SocketAddr,
    path: &str,
) -> SseClient {
    let client = SseClient::from_response(get_on(send, addr, path).await);
    assert_eq!(client.status, 200, "{path}");
    client.assert_stream_headers();
    client
}

/// The body of a GET on an HTTP/2 connection.
async fn text_on(
    send: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    addr: SocketAddr,
    path: &str,
) -> String {
    let body = tokio::time::timeout(WAIT, get_on(send, addr, path).await.into_body().collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

/// Waits until `/readyz` answers `200` on this connection: a template's partitions
/// take clients once its relation is described.
async fn wait_ready(
    send: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    addr: SocketAddr,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let response = get_on(send, addr, "/readyz").await;
        let status = response.status();
        let _ = tokio::time::timeout(WAIT, response.into_body().collect()).await;
        if status == 200 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not ready within {WAIT:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn execute(sql: &tokio_postgres::Client, statement: &str) {
    bounded(statement, SQL_WAIT, sql.batch_execute(statement))
        .await
        .unwrap_or_else(|e| panic!("{statement}: {e}"));
}

/// The rows of partition `grp`, as a multiset of JSON rows.
async fn partition(sql: &tokio_postgres::Client, grp: i64) -> Vec<(String, i64)> {
    let query = format!("SELECT grp, id, name FROM items_v WHERE grp = {grp}");
    let rows = bounded(&query, SQL_WAIT, sql.simple_query(&query))
        .await
        .expect("select");
    multiset(rows.into_iter().filter_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => Some(json!({
            "grp": r.get(0).and_then(|v| v.parse::<i64>().ok()),
            "id": r.get(1).and_then(|v| v.parse::<i64>().ok()),
            "name": r.get(2),
        })),
        _ => None,
    }))
}

/// Waits until the certificate reloads recorded reach `ok` successes and `failed`
/// failures.
async fn wait_cert_reloads(gw: &TestGateway, ok: u64, failed: u64) {
    wait_for("a certificate reload", WAIT, || async {
        let status = gw.metrics.tls.get().expect("TLS is on").status();
        (status.reloads_ok >= ok && status.reloads_failed >= failed).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_streams_share_one_http2_connection_and_converge() {
    let ca = Ca::new();
    let mut gw = gateway(&ca.leaf(1), "", STREAMS).await;
    let sql = gw.sql().await;
    let mut send = h2(gw.addr, &ca).await;
    wait_ready(&mut send, gw.addr).await;

    let mut clients = Vec::new();
    for grp in 0..20 {
        let mut client = stream_on(&mut send, gw.addr, &format!("/g/{grp}")).await;
        let model = initial(&mut client).await;
        assert_eq!(model.sorted(), partition(&sql, grp).await, "/g/{grp}");
        clients.push((grp, client, model));
    }
    assert_eq!(gw.metrics.http2_streams.load(Ordering::Relaxed), 20);

    // Writes to every partition, some in one transaction, and a move between two.
    for grp in 0..20 {
        execute(
            &sql,
            &format!(
                "INSERT INTO items VALUES ({grp}, {}, 'row {grp}')",
                100 + grp
            ),
        )
        .await;
    }
    execute(
        &sql,
        "BEGIN; UPDATE items SET grp = 5 WHERE id = 1; DELETE FROM items WHERE id = 119; COMMIT",
    )
    .await;
    for (grp, client, model) in &mut clients {
        let truth = partition(&sql, *grp).await;
        converge(client, model, "update", |m| m.sorted() == truth).await;
        assert_eq!(model.snapshots, ["initial"], "/g/{grp}");
    }

    // The metrics, asked on the same connection: one socket for all of it.
    let metrics = text_on(&mut send, gw.addr, "/metrics").await;
    assert_eq!(
        metric(&metrics, "http_connections_accepted_total"),
        Some(1),
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "http2_connections"), Some(1));
    assert_eq!(
        metric(&metrics, "sse_clients{stream=\"/g/{grp}\"}"),
        Some(20)
    );
    assert_eq!(gw.metrics.connections_accepted.load(Ordering::Relaxed), 1);

    // Resume on the same connection: the changes after the id, no snapshot.
    let last = clients[5].2.last_id.expect("an id").to_string();
    execute(&sql, "INSERT INTO items VALUES (5, 55, 'while away')").await;
    let mut resumed = SseClient::from_response(
        get_with(&mut send, gw.addr, "/g/5", &[("last-event-id", &last)]).await,
    );
    assert_eq!(resumed.status, 200);
    let first = resumed.next_data_event(WAIT).await;
    assert_eq!(first.event, "update", "{first:?}");
    assert!(first.data.contains("while away"), "{first:?}");
    drop(resumed);
    let (_, client, model) = &mut clients[5];
    let truth = partition(&sql, 5).await;
    converge(client, model, "update", |m| m.sorted() == truth).await;

    // Shutdown: every stream hears `end` and closes; the gateway stops in time.
    gw.shutdown.cancel();
    for (grp, client, _) in &mut clients {
        let read = client.expect_closed(WAIT).await;
        assert!(
            read.iter()
                .any(|i| matches!(i, Item::Event(e) if e.event == "end")),
            "/g/{grp}: {read:?}"
        );
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_swapped_on_disk_serves_new_connections_and_spares_open_streams() {
    let ca = Ca::new();
    let (first, second) = (ca.leaf(1), ca.leaf(2));
    let gw = gateway(&first, "", STREAMS).await;
    let sql = gw.sql().await;
    assert_eq!(served_leaf(gw.addr, &ca).await, first.der);

    let mut send = h2(gw.addr, &ca).await;
    wait_ready(&mut send, gw.addr).await;
    let mut open = stream_on(&mut send, gw.addr, "/g/3").await;
    let mut model = initial(&mut open).await;
    assert!(model.rows.is_empty());

    install(gw.dir.path(), &second);
    wait_cert_reloads(&gw, 1, 0).await;
    assert_eq!(served_leaf(gw.addr, &ca).await, second.der);
    let status = gw.metrics.tls.get().expect("TLS is on").status();
    assert!(status.reload_successful);
    assert_eq!(
        status.reloads_failed, 0,
        "no error for a pair written file by file"
    );

    // The stream opened under the first certificate goes on.
    execute(&sql, "INSERT INTO items VALUES (3, 30, 'after the swap')").await;
    let truth = partition(&sql, 3).await;
    assert_eq!(truth.len(), 1);
    converge(&mut open, &mut model, "update", |m| m.sorted() == truth).await;
    // And a new stream on the old connection too.
    let mut again = stream_on(&mut send, gw.addr, "/g/3").await;
    let mut model = Model::default();
    converge(&mut again, &mut model, "update", |m| m.sorted() == truth).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_certificate_on_disk_keeps_the_old_one_and_is_reported() {
    let ca = Ca::new();
    let first = ca.leaf(1);
    let gw = gateway(&first, "", STREAMS).await;
    let certs = gw.metrics.tls.get().expect("TLS is on");

    // A truncated certificate: refused, reported, the first pair stays in force.
    let dir = gw.dir.path();
    std::fs::write(
        dir.join("cert.pem"),
        &first.cert_pem[..first.cert_pem.len() / 2],
    )
    .expect("write");
    wait_cert_reloads(&gw, 0, 1).await;
    let status = certs.status();
    assert!(!status.reload_successful);
    assert!(
        status
            .error
            .as_deref()
            .is_some_and(|e| e.contains("cert.pem")),
        "{status:?}"
    );
    assert_eq!(served_leaf(gw.addr, &ca).await, first.der);

    // A key that is not the certificate's: refused too.
    install(dir, &first);
    wait_cert_reloads(&gw, 1, 1).await;
    std::fs::write(dir.join("key.pem"), ca.leaf(9).key_pem).expect("write");
    wait_cert_reloads(&gw, 1, 2).await;
    assert!(certs
        .status()
        .error
        .as_deref()
        .is_some_and(|e| e.contains("does not match")));
    assert_eq!(served_leaf(gw.addr, &ca).await, first.der);
    let mut send = h2(gw.addr, &ca).await;
    let metrics = text_on(&mut send, gw.addr, "/metrics").await;
    assert_eq!(
        metric(&metrics, "tls_cert_reload_successful"),
        Some(0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "tls_cert_reloads_total{result=\"failure\"}"),
        Some(2)
    );
    // Each bad content is reported once, not at every poll.
    assert_eq!(certs.status().reloads_failed, 2);

    // A good pair again: in force, and the error cleared.
    let fixed = ca.leaf(3);
    install(dir, &fixed);
    wait_for("the fixed pair", WAIT, || async {
        certs.status().reload_successful.then_some(())
    })
    .await;
    assert_eq!(served_leaf(gw.addr, &ca).await, fixed.der);
    assert_eq!(certs.status().error, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_only_tls_client_gets_its_stream() {
    let ca = Ca::new();
    let gw = gateway(&ca.leaf(1), "", STREAMS).await;
    let sql = gw.sql().await;
    wait_ready(&mut h2(gw.addr, &ca).await, gw.addr).await;
    let tls = connect(gw.addr, ca.client(&[b"http/1.1"])).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let request = hyper::Request::get("/g/0")
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let response = tokio::time::timeout(WAIT, send.send_request(request))
        .await
        .expect("response in time")
        .expect("response");
    let mut client = SseClient::from_response(response);
    assert_eq!(client.status, 200);
    client.assert_stream_headers();
    let mut model = Model::default();
    let truth = partition(&sql, 0).await;
    converge(&mut client, &mut model, "update", |m| m.sorted() == truth).await;
    execute(&sql, "INSERT INTO items VALUES (0, 7, 'over http/1.1')").await;
    let truth = partition(&sql, 0).await;
    converge(&mut client, &mut model, "update", |m| m.sorted() == truth).await;
    // No ALPN at all is HTTP/1.1 too.
    let tls = connect(gw.addr, ca.client(&[])).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_connection_over_max_connections_gets_the_overload_answer() {
    let ca = Ca::new();
    let gw = gateway(
        &ca.leaf(1),
        "max_connections = 1\noverload_retry = \"1s\"\n",
        STREAMS,
    )
    .await;
    let mut held = h2(gw.addr, &ca).await;
    wait_ready(&mut held, gw.addr).await;
    let mut open = stream_on(&mut held, gw.addr, "/g/0").await;
    initial(&mut open).await;

    // HTTP/2: `200`, `retry` and `end(overloaded)`, then the connection closes.
    let mut send = h2(gw.addr, &ca).await;
    let mut refused = SseClient::from_response(get_on(&mut send, gw.addr, "/g/0").await);
    assert_eq!(refused.status, 200);
    let read = refused.expect_closed(WAIT).await;
    assert!(
        read.iter().any(|i| matches!(i, Item::Event(e)
            if e.event == "end" && e.data.contains("overloaded"))),
        "{read:?}"
    );
    // HTTP/1.1 over TLS: the same, and `503` for anything else.
    let tls = connect(gw.addr, ca.client(&[b"http/1.1"])).await;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let request = hyper::Request::get("/livez")
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let response = tokio::time::timeout(WAIT, send.send_request(request))
        .await
        .expect("answer in time")
        .expect("answer");
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(gw.metrics.connections_accepted.load(Ordering::Relaxed), 1);
    // The admitted connection still streams.
    let sql = gw.sql().await;
    execute(&sql, "INSERT INTO items VALUES (0, 70, 'still here')").await;
    open.wait_item(
        "the new row",
        WAIT,
        |i| matches!(i, Item::Event(e) if e.event == "update" && e.data.contains("still here")),
    )
    .await;
}

#[test]
fn a_missing_or_unusable_certificate_file_is_a_config_error() {
    let ca = Ca::new();
    let leaf = ca.leaf(1);
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("streams.toml");
    std::fs::write(
        &config,
        format!("[server]\n{TLS}http2_max_streams = 0\n[[streams]]\npath = \"/a\"\nview = \"v\"\n"),
    )
    .expect("write");
    std::fs::write(dir.path().join("key.pem"), &leaf.key_pem).expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tailgate"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("streams.toml:2:"), "{stderr}");
    assert!(stderr.contains("cert.pem"), "{stderr}");
    assert!(stderr.contains("http2_max_streams"), "{stderr}");

    // The key of another certificate: named at `key_file`.
    std::fs::write(dir.path().join("cert.pem"), ca.leaf(2).cert_pem).expect("write");
    let err = tailgate::config::load(&config).expect_err("a mismatched pair");
    assert!(err.to_string().contains("does not match"), "{err}");
}

/// Ten live streams on one page, each shown in its own element.
const TEN_STREAMS: &str = "(() => {\
    window.__shown = {};\
    for (let i = 0; i < 10; i++) {\
      const el = document.createElement('pre'); el.id = `s${i}`; document.body.append(el);\
      const es = new EventSource(`/g/${i}`);\
      for (const name of ['snapshot', 'update']) es.addEventListener(name, (e) => {\
        el.textContent += e.data + '\\n';\
      });\
    }\
    return true;\
  })()";

/// What each stream's element shows, with the page's protocol.
const READ_STREAMS: &str = "({ shown: [...Array(10).keys()].map((i) =>\
    document.getElementById(`s${i}`)?.textContent ?? ''),\
    protocol: performance.getEntriesByType('navigation')[0]?.nextHopProtocol })";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_keeps_ten_streams_live_over_http2() {
    if !have_chromium() {
        return;
    }
    let ca = Ca::new();
    let leaf = ca.leaf(1);
    let gw = gateway(&leaf, "", STREAMS).await;
    let sql = gw.sql().await;
    wait_ready(&mut h2(gw.addr, &ca).await, gw.addr).await;
    // The pin trusts exactly the test key, nothing else.
    let mut browser = Browser::launch_with(
        900,
        500,
        "",
        &[format!(
            "--ignore-certificate-errors-spki-list={}",
            leaf.spki_sha256
        )],
    )
    .await;
    browser
        .navigate(&format!("https://localhost:{}/", gw.addr.port()))
        .await;
    browser
        .until("the index page", WAIT, "document.readyState", |v| {
            v == "complete"
        })
        .await;
    browser.eval(TEN_STREAMS).await;
    let loaded = browser
        .until("ten snapshots", WAIT, READ_STREAMS, |v| {
            v["shown"].as_array().is_some_and(|s| {
                s.iter()
                    .all(|t| t.as_str().is_some_and(|t| t.contains("\"changes\"")))
            })
        })
        .await;
    assert_eq!(loaded["protocol"], "h2", "{loaded}");

    // A write to every partition after the page loaded reaches all ten.
    for grp in 0..10 {
        execute(
            &sql,
            &format!(
                "INSERT INTO items VALUES ({grp}, {}, 'late {grp}')",
                200 + grp
            ),
        )
        .await;
    }
    let shown = browser
        .until("a late row in every stream", WAIT, READ_STREAMS, |v| {
            v["shown"].as_array().is_some_and(|s| {
                s.iter()
                    .enumerate()
                    .all(|(i, t)| t.as_str().is_some_and(|t| t.contains(&format!("late {i}"))))
            })
        })
        .await;
    let shown: Vec<&str> = shown["shown"]
        .as_array()
        .map(|s| s.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for (i, text) in shown.iter().enumerate() {
        // Each stream holds its own partition's rows only.
        for other in (0..10).filter(|o| *o != i) {
            assert!(!text.contains(&format!("late {other}\"")), "s{i}: {text}");
        }
    }
    // All ten on HTTP/2, on as few sockets as Chromium chose (one, as a rule).
    assert!(gw.metrics.http2_streams.load(Ordering::Relaxed) >= 10);
    wait_for("Chromium's one HTTP/2 connection", WAIT, || async {
        (gw.metrics.http2_connections.load(Ordering::Relaxed) == 1).then_some(())
    })
    .await;
}

/// The mux is an ordinary request over HTTP/2 too: its groups arrive labelled, with
/// the group's id on its last event, beside a plain stream on the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mux_streams_over_http2_beside_a_plain_stream() {
    let ca = Ca::new();
    let gw = gateway(&ca.leaf(1), "", STREAMS).await;
    let sql = gw.sql().await;
    let mut send = h2(gw.addr, &ca).await;
    wait_ready(&mut send, gw.addr).await;
    let mut mux = stream_on(&mut send, gw.addr, "/_tailgate/mux?s=/g/0&s=/g/1").await;
    let mut plain = stream_on(&mut send, gw.addr, "/items").await;
    initial(&mut plain).await;
    let mut labels = Vec::new();
    while labels.len() < 2 {
        let e = mux.next_data_event(WAIT).await;
        assert_eq!(e.event, "snapshot");
        let data: serde_json::Value = serde_json::from_str(&e.data).expect("json");
        labels.push(data["stream"].as_str().unwrap_or("").to_string());
    }
    labels.sort();
    assert_eq!(labels, ["/g/0", "/g/1"]);
    execute(&sql, "INSERT INTO items VALUES (1, 77, 'seventy-seven')").await;
    let e = mux.next_data_event(WAIT).await;
    let data: serde_json::Value = serde_json::from_str(&e.data).expect("json");
    assert_eq!(
        (e.event.as_str(), &data["stream"]),
        ("update", &serde_json::json!("/g/1"))
    );
    assert_eq!(data["changes"][0]["row"]["id"], 77);
    // The group's id is a timestamp both streams have closed: at or past the event's.
    let id: u64 = e.id.as_deref().and_then(|i| i.parse().ok()).expect("an id");
    let ts: u64 = data["ts"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .expect("ts");
    assert!(id >= ts, "group id {id}, event at {ts}");
    plain.next_data_event(WAIT).await;
}
