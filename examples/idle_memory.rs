//! Memory per idle stream connection: starts the release gateway binary on its
//! embedded engine, opens N event streams that then sit idle, and prints the
//! gateway's resident set size (VmRSS) before and after, per mode:
//!
//! - `plain`: N plaintext HTTP/1.1 connections (the fast path);
//! - `tls-h1`: N TLS connections speaking HTTP/1.1;
//! - `tls-h2`: N TLS connections speaking HTTP/2, one stream each;
//! - `h2-mux`: one TLS connection carrying N HTTP/2 streams.
//!
//! ```text
//! cargo build --release --bin tailgate --example idle_memory
//! ulimit -n 65536; target/release/examples/idle_memory 2000 [mode ...]
//! ```
//!
//! Every mode gets a fresh gateway process. A stream counts as open once its snapshot
//! has arrived. The test certificate is made here, for `localhost`.

use std::error::Error;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

/// Connections being opened at once.
const OPENING: usize = 64;
const WAIT: Duration = Duration::from_secs(60);

const INIT: &str = "CREATE TABLE items (id int, name text, qty int);\n\
    CREATE VIEW items_v AS SELECT id, name, qty FROM items;\n\
    INSERT INTO items VALUES (1, 'one', 10), (2, 'two', 20);\n";

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(Ok(2000), |a| a.parse())?;
    let mut modes: Vec<String> = args.collect();
    if modes.is_empty() {
        modes = ["plain", "tls-h1", "tls-h2", "h2-mux"]
            .map(String::from)
            .to_vec();
    }
    let dir = tempfile::tempdir()?;
    let ca = make_pki(dir.path())?;
    println!("mode     streams  rss_before_kib  rss_after_kib  per_stream_kib");
    for mode in &modes {
        let tls = mode != "plain";
        let mut gateway = Gateway::start(dir.path(), tls)?;
        let result = measure(&gateway, mode, n, &ca).await;
        gateway.stop();
        let (before, after) = result?;
        println!(
            "{mode:<8} {n:>7}  {before:>14}  {after:>13}  {:>14.1}",
            (after.saturating_sub(before)) as f64 / n as f64
        );
    }
    Ok(())
}

/// Opens one warm-up stream (so the hub and the TLS state exist), reads the RSS, opens
/// `n` streams more, reads it again.
async fn measure(
    gateway: &Gateway,
    mode: &str,
    n: usize,
    ca: &Arc<rustls::ClientConfig>,
) -> Result<(u64, u64)> {
    let addr = gateway.addr;
    let mut held: Vec<Box<dyn Send>> = Vec::new();
    held.push(open(mode, addr, ca, 1).await?);
    let before = rss_kib(gateway.child.id())?;
    match mode {
        "h2-mux" => held.push(open(mode, addr, ca, n).await?),
        _ => {
            let mut opening = JoinSet::new();
            for _ in 0..n {
                if opening.len() >= OPENING {
                    if let Some(r) = opening.join_next().await {
                        held.push(r??);
                    }
                }
                let (mode, ca) = (mode.to_string(), Arc::clone(ca));
                opening.spawn(async move { open(&mode, addr, &ca, 1).await });
            }
            while let Some(r) = opening.join_next().await {
                held.push(r??);
            }
        }
    }
    let after = rss_kib(gateway.child.id())?;
    drop(held);
    Ok((before, after))
}

/// Opens `streams` streams of `/items` (more than one only for `h2-mux`) and returns
/// what keeps them open once each has had its snapshot.
async fn open(
    mode: &str,
    addr: SocketAddr,
    ca: &Arc<rustls::ClientConfig>,
    streams: usize,
) -> Result<Box<dyn Send>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    match mode {
        "plain" => Ok(Box::new(raw_stream(tcp).await?)),
        "tls-h1" => Ok(Box::new(
            raw_stream(tls(tcp, ca, b"http/1.1").await?).await?,
        )),
        "tls-h2" | "h2-mux" => {
            let io = tls(tcp, ca, b"h2").await?;
            let (send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                    .await?;
            tokio::spawn(conn);
            let mut opening = JoinSet::new();
            for _ in 0..streams {
                let mut send = send.clone();
                opening.spawn(async move {
                    let request =
                        hyper::Request::get(format!("https://localhost:{}/items", addr.port()))
                            .header("accept", "text/event-stream")
                            .body(Empty::<Bytes>::new())?;
                    let mut body = send.send_request(request).await?.into_body();
                    let mut seen = Vec::new();
                    while !contains(&seen, b"event: snapshot") {
                        match tokio::time::timeout(WAIT, body.frame()).await? {
                            Some(frame) => {
                                if let Ok(data) = frame?.into_data() {
                                    seen.extend_from_slice(&data);
                                }
                            }
                            None => return Err("the stream ended".into()),
                        }
                    }
                    Result::Ok(body)
                });
            }
            let mut bodies = Vec::with_capacity(streams);
            while let Some(r) = opening.join_next().await {
                bodies.push(r??);
            }
            Ok(Box::new((send, bodies)))
        }
        other => Err(format!("unknown mode {other}").into()),
    }
}

async fn tls(
    tcp: TcpStream,
    ca: &Arc<rustls::ClientConfig>,
    alpn: &[u8],
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut config = (**ca).clone();
    config.alpn_protocols = vec![alpn.to_vec()];
    let name = ServerName::try_from("localhost")?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?)
}

/// An HTTP/1.1 stream request written by hand, read until the snapshot.
async fn raw_stream<S: AsyncRead + AsyncWrite + Unpin>(mut io: S) -> Result<S> {
    io.write_all(b"GET /items HTTP/1.1\r\nhost: localhost\r\naccept: text/event-stream\r\n\r\n")
        .await?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !contains(&seen, b"event: snapshot") {
        let n = tokio::time::timeout(WAIT, io.read(&mut buf)).await??;
        if n == 0 {
            return Err("the stream closed".into());
        }
        seen.extend_from_slice(&buf[..n]);
    }
    Ok(io)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| "no VmRSS".into())
}

/// Writes a CA-signed `localhost` pair into `dir`; returns a client config trusting
/// the CA.
fn make_pki(dir: &Path) -> Result<Arc<rustls::ClientConfig>> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
    let key = KeyPair::generate()?;
    let leaf = CertificateParams::new(vec!["localhost".to_string()])?.signed_by(&key, &ca)?;
    std::fs::write(dir.join("cert.pem"), leaf.pem())?;
    std::fs::write(dir.join("key.pem"), key.serialize_pem())?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone())?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The gateway binary beside this example, serving `/items` from its engine.
struct Gateway {
    child: Child,
    addr: SocketAddr,
}

impl Gateway {
    fn start(dir: &Path, tls: bool) -> Result<Gateway> {
        let tls_line = if tls {
            "tls = { cert_file = \"cert.pem\", key_file = \"key.pem\" }\n"
        } else {
            ""
        };
        std::fs::write(dir.join("init.sql"), INIT)?;
        let config = dir.join("streams.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nmax_connections = 19000\n\
                 http2_max_streams = 10000\n{tls_line}\
                 [embedded]\ninit = \"init.sql\"\n\
                 [[streams]]\npath = \"/items\"\nview = \"items_v\"\n"
            ),
        )?;
        let mut child = Command::new(binary()?)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                if line.contains("Gateway listening") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = rx.recv_timeout(WAIT)?;
        let addr = line
            .split_whitespace()
            .find_map(|f| f.strip_prefix("addr="))
            .ok_or("no addr in the log line")?
            .parse()?;
        Ok(Gateway { child, addr })
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `tailgate` in the directory above this example's (`target/<profile>/`).
fn binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("no target directory")?;
    Ok(dir.join("tailgate"))
}
