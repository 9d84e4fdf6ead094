//! How long a stream added to `streams.toml` takes to serve its first snapshot,
//! measured from the file write (debounce included), against the time an existing
//! stream takes to answer a new client with its snapshot, measured in the same run.
//!
//! `cargo bench --bench reload` prints a table; the goal is a p99 under 500 ms.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ROUNDS: usize = 30;
const INIT: &str = "CREATE TABLE items (id int, name text);\n\
    CREATE VIEW items_v AS SELECT id, name FROM items;\n\
    INSERT INTO items VALUES (1, 'one'), (2, 'two');\n";

fn config(paths: &[String]) -> String {
    let mut text =
        String::from("[server]\nlisten = \"127.0.0.1:0\"\n[embedded]\ninit = \"init.sql\"\n");
    for p in paths {
        text.push_str(&format!(
            "[[streams]]\npath = \"{p}\"\nview = \"items_v\"\n"
        ));
    }
    text
}

/// Connects and reads until the first snapshot; `None` on a 404.
async fn snapshot(addr: SocketAddr, path: &str) -> Option<()> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.starts_with(b"HTTP/1.1 404") {
            return None;
        }
        if buf.windows(15).any(|w| w == b"event: snapshot") {
            return Some(());
        }
    }
}

fn write_in_place(path: &Path, text: &str) {
    if let Err(e) = std::fs::write(path, text) {
        panic!("cannot write {}: {e}", path.display());
    }
}

fn write_by_rename(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    write_in_place(&tmp, text);
    if let Err(e) = std::fs::rename(&tmp, path) {
        panic!("cannot rename: {e}");
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn row(name: &str, mut v: Vec<Duration>) -> Duration {
    v.sort();
    let (p50, p99, max) = (percentile(&v, 0.5), percentile(&v, 0.99), v[v.len() - 1]);
    println!(
        "| {name:<34} | {:>8.1} | {:>8.1} | {:>8.1} |",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3
    );
    p99
}

/// Adds one stream per round with `style` and times write → first snapshot.
async fn measure(
    addr: SocketAddr,
    path: &Path,
    paths: &mut Vec<String>,
    style: fn(&Path, &str),
) -> Vec<Duration> {
    let mut times = Vec::new();
    for _ in 0..ROUNDS {
        let p = format!("/added{}", paths.len());
        paths.push(p.clone());
        let t = Instant::now();
        style(path, &config(paths));
        while snapshot(addr, &p).await.is_none() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        times.push(t.elapsed());
    }
    times
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("init.sql"), INIT).expect("init");
    let path = dir.path().join("streams.toml");
    let mut paths = vec!["/base".to_string()];
    write_in_place(&path, &config(&paths));
    let cfg = tailgate::config::load(&path).expect("config");
    let gateway = tailgate::Gateway::build(cfg).await.expect("gateway");
    let addr = gateway.local_addr();
    let shutdown = gateway.shutdown_token();
    let task = tokio::spawn(gateway.run_until_stopped());
    while snapshot(addr, "/base").await.is_none() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let mut baseline = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        snapshot(addr, "/base").await.expect("existing stream");
        baseline.push(t.elapsed());
    }

    let in_place = measure(addr, &path, &mut paths, write_in_place).await;
    let renamed = measure(addr, &path, &mut paths, write_by_rename).await;

    println!("\nReload: file write to first snapshot of an added stream ({ROUNDS} rounds each)\n");
    println!(
        "| {:<34} | {:>8} | {:>8} | {:>8} |",
        "case", "p50 ms", "p99 ms", "max ms"
    );
    println!("|{:-<36}|{:->10}|{:->10}|{:->10}|", "", "", "", "");
    let base = row("baseline: snapshot of existing", baseline);
    let a = row("added, in-place write", in_place);
    let b = row("added, rename over (editor save)", renamed);
    let worst = a.max(b);
    println!(
        "\np99 {:.1} ms = {:.1}x the existing-stream baseline; goal < 500 ms: {}",
        worst.as_secs_f64() * 1e3,
        worst.as_secs_f64() / base.as_secs_f64().max(1e-9),
        if worst < Duration::from_millis(500) {
            "PASS"
        } else {
            "FAIL"
        }
    );
    shutdown.cancel();
    let _ = task.await;
}
