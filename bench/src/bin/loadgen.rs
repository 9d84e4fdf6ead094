//! The load client: opens N SSE connections from rotating 127.x source addresses,
//! parses every stream, and reports deliveries, latency, connect times, time to first
//! event, and its own and the server's CPU as JSON.
//!
//! One single-threaded runtime (pin it with `taskset`); one task per connection, all
//! reading into one shared scratch buffer. Optionally it also feeds the server: HTTP
//! POSTs (nchan) or SQL statements over pgwire (the tutorial's engine) at a fixed rate.
//! Every phase has a deadline and the process always exits by itself.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser as _;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep, sleep_until, timeout, Instant};

use tailgate_bench::measure::{
    ClientTicks, LatencySummary, PartitionRows, PartitionTotals, Spread, Totals, Window,
};
use tailgate_bench::sse::{Body, ChunkError, Head, Parser};
use tailgate_bench::sys::{self, ProcSample};
use tailgate_bench::{tick_json, Schedule, PAD};

#[derive(clap::Parser, Debug, Clone)]
#[command(about = "SSE load client: N connections, one report")]
struct Args {
    /// Server address (loopback only).
    #[arg(long)]
    addr: SocketAddr,
    /// Stream path; repeat to spread clients round-robin over several streams.
    #[arg(long, default_value = "/ticks")]
    path: Vec<String>,
    /// Client i requests this path with `{i}` replaced by i, and its partition is i
    /// (the scoped scenario: `/orders/{i}`). Overrides --path.
    #[arg(long)]
    path_template: Option<String>,
    /// A file of paths, one per line: client i requests line i (modulo the number of
    /// lines). Overrides --path; these clients have no partition of their own.
    #[arg(long)]
    path_file: Option<std::path::PathBuf>,
    /// Check rows by this partition column instead of counting ticks: every row a
    /// client of --path-template receives must carry its own partition, and per
    /// partition the `seq` of each row must follow what the writer wrote (gaps,
    /// duplicates, and what is missing after the drain).
    #[arg(long)]
    partition_column: Option<String>,
    /// The partition writer, over pgwire: `--write-sql` with `{c}` (the partition) and
    /// `{s}` (its next seq) replaced, at --write-rate, from the moment every client has
    /// settled until the end of the window.
    #[arg(long)]
    write_pg: Option<String>,
    #[arg(
        long,
        default_value = "UPDATE orders SET seq = {s}, sent_ms = mz_epoch_ms() WHERE customer_id = {c}"
    )]
    write_sql: String,
    /// The partition writer, over HTTP (nchan): POST <url>/<c> with the row as JSON
    /// (`order_id`, `customer_id`, `seq`, `sent_ms`, `pad`).
    #[arg(long)]
    write_url: Option<PublishUrl>,
    /// Writes per second of the partition writer (each to one partition).
    #[arg(long, default_value_t = 1000.0)]
    write_rate: f64,
    /// Partitions the writer picks from, uniformly at random (0 = --clients).
    #[arg(long, default_value_t = 0)]
    write_partitions: usize,
    /// Seed of the writer's partition choices (the same sequence for every contender).
    #[arg(long, default_value_t = 1)]
    write_seed: u64,
    /// At the end of the window, count this engine's sessions (all, and those whose
    /// application_name starts with `tailgate `) and its subscriptions.
    #[arg(long)]
    sessions_pg: Option<String>,
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// New connections per second; 0 opens all at once (a storm).
    #[arg(long, default_value_t = 2000.0)]
    connect_rate: f64,
    /// Second octet of the 127.x.y.z source addresses; rotate it between runs.
    #[arg(long, default_value_t = 1)]
    src_net: u8,
    /// Deadline for the connect phase, seconds after the last connect started.
    #[arg(long, default_value_t = 30.0)]
    connect_timeout: f64,
    /// Seconds between "all connected" and the measurement window.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Length of the measurement window, seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds to keep reading after the window, for ticks sent inside it.
    #[arg(long, default_value_t = 2.0)]
    drain: f64,
    /// The server's pid, sampled for CPU and RSS.
    #[arg(long)]
    server_pid: Vec<u32>,
    /// Also sample the server's RSS when this many clients are connected (repeat for
    /// several checkpoints on the way up; RSS slope, RSS chart). Once any is given, the
    /// RSS with all clients connected is sampled too.
    #[arg(long)]
    rss_at: Vec<usize>,
    /// A header sent on every request, `Name: value` (repeat for several).
    #[arg(long, value_parser = header_line)]
    header: Vec<String>,
    /// A file of header lines, `Name: value`, one per connection: client i sends line i
    /// (modulo the number of lines), e.g. its own `Authorization: Bearer <token>`.
    #[arg(long)]
    header_file: Option<std::path::PathBuf>,
    /// Quiet seconds before each RSS checkpoint.
    #[arg(long, default_value_t = 2.0)]
    settle: f64,
    /// Publish each tick with an HTTP POST to this loopback URL (http://127.0.0.1:P/pub).
    #[arg(long)]
    publish_url: Option<PublishUrl>,
    /// Run a statement over pgwire per tick, e.g. "host=127.0.0.1 port=6875 user=materialize".
    #[arg(long)]
    feed_pg: Option<String>,
    #[arg(
        long,
        default_value = "UPDATE ticks SET seq = seq + 1, sent_ms = mz_epoch_ms()"
    )]
    feed_sql: String,
    /// Ticks per second for --publish-url / --feed-pg.
    #[arg(long, default_value_t = 10.0)]
    feed_rate: f64,
    /// A client that received nothing in the last this-many seconds of the window is silent.
    #[arg(long, default_value_t = 5.0)]
    silence: f64,
    /// Write the JSON report here instead of stdout.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Speak TLS (HTTP/1.1 over TLS, ALPN `http/1.1`), trusting the PEM certificates
    /// in this file as roots (the suite's test CA).
    #[arg(long)]
    tls_ca: Option<std::path::PathBuf>,
    /// The server name the certificate is checked against (and sent as SNI).
    #[arg(long, default_value = "localhost")]
    tls_name: String,
    /// A tick counts when its event's group is complete: at the next event whose
    /// `id:` changes (the mux, where only a group's last event carries the id), not
    /// at the event that carries it.
    #[arg(long)]
    group_by_id: bool,
    /// Only clients of these paths are owed the ticks (`expected`); the others (a
    /// client's extra streams that never change) are connected but owe nothing.
    /// Default: every client.
    #[arg(long)]
    ticks_on: Vec<String>,
}

/// A request header line: `Name: value`, with a token name and no CR, LF or NUL.
fn header_line(line: &str) -> Result<String, String> {
    let (name, value) = line
        .split_once(':')
        .ok_or_else(|| format!("{line:?}: expected `Name: value`"))?;
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(token) {
        return Err(format!("{name:?} is not a header name"));
    }
    if value.contains(['\r', '\n', '\0']) {
        return Err(format!("the value of {name} holds CR, LF or NUL"));
    }
    Ok(format!("{name}: {}", value.trim()))
}

/// The per-connection header lines of `--header-file` (blank lines skipped).
fn header_file(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let lines = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            header_line(l).map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if lines.is_empty() {
        bail!("{}: no header lines", path.display());
    }
    Ok(lines)
}

/// `--publish-url`: where nchan's publisher listens.
#[derive(Debug, Clone)]
struct PublishUrl {
    addr: SocketAddr,
    path: String,
}

impl std::str::FromStr for PublishUrl {
    type Err = String;

    fn from_str(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or("expected http://ADDRESS:PORT/PATH")?;
        let (addr, path) = match rest.split_once('/') {
            Some((a, p)) => (a, format!("/{p}")),
            None => (rest, "/".to_string()),
        };
        let addr = addr
            .parse()
            .map_err(|e| format!("{addr}: {e} (expected an IP address and port)"))?;
        Ok(Self { addr, path })
    }
}

/// State shared by every connection task (single-threaded, so `RefCell`).
#[derive(Default)]
struct Shared {
    totals: Totals,
    /// Connected clients (not yet disconnected) that are owed the ticks (--ticks-on).
    ticked_live: usize,
    window: Window,
    connected: usize,
    failed: usize,
    settled: usize,
    disconnects: usize,
    disconnects_in_window: usize,
    bad_status: usize,
    errors: BTreeMap<String, usize>,
    connect_ms: Vec<f64>,
    /// Per client: epoch µs of the connect start and of the first event (0 = none yet).
    started_us: Vec<u64>,
    first_us: Vec<u64>,
    last_us: Vec<u64>,
    comments: u64,
    retry: Option<u64>,
    published: u64,
    publish_errors: u64,
    /// Per client, the partition check (with --partition-column).
    rows: Vec<PartitionRows>,
    part: PartitionTotals,
    /// Per partition, the last seq the writer wrote (= writes to it).
    written: Vec<u64>,
    writes: u64,
    write_errors: u64,
    /// Epoch µs of the writer's first and last write.
    writes_from_us: u64,
    writes_to_us: u64,
}

impl Shared {
    fn fail(&mut self, what: String) {
        self.failed += 1;
        self.settled += 1;
        *self.errors.entry(what).or_default() += 1;
    }

    /// Counts one tick fed to the server (a POST or a statement).
    fn fed(&mut self, ok: bool) {
        if ok {
            self.published += 1;
        } else {
            self.publish_errors += 1;
        }
    }
}

#[derive(Serialize)]
struct Report {
    clients: usize,
    connected: usize,
    failed: usize,
    bad_status: usize,
    errors: BTreeMap<String, usize>,
    disconnects: usize,
    disconnects_in_window: usize,
    connect: Spread,
    /// From each client's connect start to its first event.
    first_event: Spread,
    /// From the first connect start to each client's first event (storm time).
    first_event_since_start: Spread,
    clients_without_event: usize,
    window_s: f64,
    connected_at_window: usize,
    /// Of those, the clients owed the ticks (--ticks-on; all of them without it).
    ticked_at_window: usize,
    /// "tls" or "plain".
    transport: &'static str,
    /// Ticks produced during the window (seq span seen by any client).
    produced: u64,
    delivered: u64,
    expected: u64,
    delivered_ratio: f64,
    delivered_per_s: f64,
    gaps: u64,
    events: u64,
    /// SSE update events received per second during the window.
    events_per_s: f64,
    snapshots: u64,
    lagged_snapshots: u64,
    silent_clients: usize,
    latency: LatencySummary,
    comments: u64,
    retry_ms: Option<u64>,
    published: u64,
    publish_errors: u64,
    loadgen_cpu: f64,
    server_cpu: f64,
    server_start: Vec<ProcSample>,
    server_end: Vec<ProcSample>,
    /// (connected clients, server RSS kB summed over --server-pid) checkpoints.
    rss_points: Vec<(usize, u64)>,
    slab_kb_start: u64,
    slab_kb_end: u64,
    /// The partition check (with --partition-column).
    #[serde(skip_serializing_if = "Option::is_none")]
    partitions: Option<PartitionTotals>,
    /// The partition writer: writes done, failed, and per second while it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    writer: Option<serde_json::Value>,
    /// The engine's sessions and subscriptions at the end of the window (--sessions-pg).
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream: Option<serde_json::Value>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.addr.ip().is_loopback() {
        bail!("--addr must be a loopback address");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let report = local.block_on(&rt, run(args.clone()))?;
    let json = serde_json::to_string_pretty(&report)?;
    match &args.out {
        Some(p) => {
            std::fs::write(p, json + "\n").with_context(|| format!("writing {}", p.display()))?
        }
        None => println!("{json}"),
    }
    // Open sockets and tasks end with the process.
    std::process::exit(0);
}

fn server_samples(pids: &[u32]) -> Vec<ProcSample> {
    pids.iter()
        .map(|p| sys::sample(Some(*p)).unwrap_or_default())
        .collect()
}

fn rss_sum(pids: &[u32]) -> u64 {
    server_samples(pids).iter().map(|s| s.rss_kb).sum()
}

async fn run(args: Args) -> anyhow::Result<Report> {
    let n = args.clients;
    let paths = client_paths(&args)?;
    let write_partitions = if args.write_partitions == 0 {
        n
    } else {
        args.write_partitions
    };
    let shared = Rc::new(RefCell::new(Shared {
        started_us: vec![0; n],
        first_us: vec![0; n],
        last_us: vec![0; n],
        rows: if args.partition_column.is_some() {
            paths.iter().map(|(_, p)| PartitionRows::new(*p)).collect()
        } else {
            Vec::new()
        },
        written: vec![0; write_partitions],
        ..Shared::default()
    }));
    let column: Option<Rc<str>> = args.partition_column.as_deref().map(Rc::from);
    let tls = match &args.tls_ca {
        Some(ca) => Some(Rc::new(Tls::new(ca, &args.tls_name)?)),
        None => None,
    };
    let mode = Mode {
        tls,
        group_by_id: args.group_by_id,
    };
    let scratch = Rc::new(RefCell::new(vec![0u8; 64 * 1024]));
    let start = Instant::now();
    let start_us = sys::now_us();
    let connect_timeout = Duration::from_secs_f64(args.connect_timeout);
    // Everything stops by this time, whatever happens.
    let ramp = if args.connect_rate > 0.0 {
        n as f64 / args.connect_rate
    } else {
        0.0
    };
    // Each RSS checkpoint may wait up to the connect timeout and then settles.
    let checkpoints = if args.rss_at.is_empty() {
        0
    } else {
        args.rss_at.len() + 1
    };
    let hard_end = start
        + Duration::from_secs_f64(
            ramp + args.connect_timeout * (1 + checkpoints) as f64
                + (checkpoints.max(2) as f64) * args.settle
                + args.warmup
                + args.duration
                + args.drain
                + 5.0,
        );
    if let Some(url) = args.publish_url.clone() {
        tokio::task::spawn_local(publisher(url, args.feed_rate, hard_end, shared.clone()));
    }
    if let Some(conninfo) = args.feed_pg.clone() {
        tokio::task::spawn_local(feeder(
            conninfo,
            args.feed_sql.clone(),
            args.feed_rate,
            hard_end,
            shared.clone(),
        ));
    }

    let mut rss_points = Vec::new();
    // Shared, so a client's request does not copy them.
    let common: Rc<str> = args
        .header
        .iter()
        .map(|h| format!("{h}\r\n"))
        .collect::<String>()
        .into();
    let own: Vec<Rc<str>> = match &args.header_file {
        Some(p) => header_file(p)?
            .into_iter()
            .map(|h| format!("{h}\r\n").into())
            .collect(),
        None => Vec::new(),
    };
    let settle = Duration::from_secs_f64(args.settle);
    // Time spent at checkpoints; the ramp resumes at its rate after each one instead
    // of catching up in a burst.
    let mut paused = Duration::ZERO;
    for i in 0..n {
        if i > 0 && args.rss_at.contains(&i) {
            let t = Instant::now();
            wait_settled(&shared, i, t + connect_timeout).await;
            sleep(settle).await;
            let c = shared.borrow().connected;
            rss_points.push((c, rss_sum(&args.server_pid)));
            paused += t.elapsed();
        }
        if args.connect_rate > 0.0 {
            sleep_until(start + paused + Duration::from_secs_f64(i as f64 / args.connect_rate))
                .await;
        }
        let path = paths[i].0.clone();
        let headers = Headers {
            common: common.clone(),
            own: (!own.is_empty()).then(|| own[i % own.len()].clone()),
        };
        let ticked = args.ticks_on.is_empty() || args.ticks_on.contains(&path);
        tokio::task::spawn_local(client(
            i,
            args.addr,
            path,
            headers,
            sys::source_addr(args.src_net, i),
            connect_timeout,
            shared.clone(),
            scratch.clone(),
            column.clone(),
            mode.clone(),
            ticked,
        ));
    }
    wait_settled(&shared, n, Instant::now() + connect_timeout).await;
    if !args.rss_at.is_empty() {
        sleep(settle).await;
        let c = shared.borrow().connected;
        rss_points.push((c, rss_sum(&args.server_pid)));
    }
    // The partition writer runs from here (every client settled) to the window's end.
    let write_until =
        (Instant::now() + Duration::from_secs_f64(args.warmup + args.duration)).min(hard_end);
    let writer = if args.write_pg.is_some() || args.write_url.is_some() {
        Some(tokio::task::spawn_local(partition_writer(
            args.clone(),
            write_until,
            shared.clone(),
        )))
    } else {
        None
    };
    sleep(Duration::from_secs_f64(args.warmup)).await;

    // The measurement window.
    let (connected_at_window, ticked_at_window) = {
        let mut s = shared.borrow_mut();
        s.window = Window {
            start_ms: sys::now_ms(),
            end_ms: u64::MAX,
        };
        (s.connected - s.disconnects, s.ticked_live)
    };
    let slab_kb_start = sys::slab_kb();
    let server_start = server_samples(&args.server_pid);
    let self_start = sys::sample(None)?;
    sleep(Duration::from_secs_f64(args.duration)).await;
    let self_end = sys::sample(None)?;
    let server_end = server_samples(&args.server_pid);
    let slab_kb_end = sys::slab_kb();
    let window_end_us = sys::now_us();
    shared.borrow_mut().window.end_ms = window_end_us / 1000;
    let drain_end = (Instant::now() + Duration::from_secs_f64(args.drain)).min(hard_end);
    let upstream = match &args.sessions_pg {
        Some(conninfo) => Some(
            timeout(Duration::from_secs(5), upstream_sessions(conninfo))
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("timeout")))
                .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() })),
        ),
        None => None,
    };
    if let Some(w) = writer {
        // It stops by itself at the window's end; a write in flight may take a moment.
        // One that has not returned after 10 s is abandoned (and counted as not written).
        let abort = w.abort_handle();
        if timeout(Duration::from_secs(10), w).await.is_err() {
            abort.abort();
            shared.borrow_mut().write_errors += 1;
        }
    }
    sleep_until(drain_end).await;

    let mut s = shared.borrow_mut();
    // The partition check's end: what each client never received.
    let partitions = args.partition_column.as_ref().map(|_| {
        let mut part = std::mem::take(&mut s.part);
        for (i, rows) in s.rows.iter().enumerate() {
            // Clients that never connected are counted as failed, not checked here.
            if s.first_us[i] != 0 || rows.partition.is_none() {
                rows.finish(&s.written, &mut part);
            }
        }
        part
    });
    let writer = (args.write_pg.is_some() || args.write_url.is_some()).then(|| {
        let secs = s.writes_to_us.saturating_sub(s.writes_from_us) as f64 / 1e6;
        serde_json::json!({
            "writes": s.writes,
            "errors": s.write_errors,
            "partitions": s.written.len(),
            "partitions_written": s.written.iter().filter(|w| **w > 0).count(),
            "writes_per_s": if secs > 0.0 { s.writes as f64 / secs } else { 0.0 },
        })
    });
    let s = &*s;
    let t = &s.totals;
    let produced = match (t.min_seq, t.max_seq) {
        (Some(a), Some(b)) => b - a + 1,
        _ => 0,
    };
    // With the partition check, deliveries and what was owed are exact over the
    // whole run (every write to a checked client's partition), not window estimates.
    let (delivered, expected) = match &partitions {
        Some(p) => (p.delivered, p.expected),
        None => (t.delivered_in_window, produced * ticked_at_window as u64),
    };
    let silent_before = window_end_us.saturating_sub((args.silence * 1e6) as u64);
    let mut first = Vec::new();
    let mut first_since_start = Vec::new();
    let mut without = 0;
    let mut silent = 0;
    for i in 0..n {
        if s.started_us[i] == 0 {
            continue;
        }
        if s.first_us[i] == 0 {
            without += 1;
        } else {
            first.push((s.first_us[i] - s.started_us[i]) as f64 / 1000.0);
            first_since_start.push(s.first_us[i].saturating_sub(start_us) as f64 / 1000.0);
        }
        if s.last_us[i] != 0 && s.last_us[i] < silent_before {
            silent += 1;
        }
    }
    let server_cpu = server_start
        .iter()
        .zip(&server_end)
        .map(|(a, b)| sys::cpu_share(a, b))
        .sum();
    Ok(Report {
        clients: n,
        connected: s.connected,
        failed: s.failed,
        bad_status: s.bad_status,
        errors: s.errors.clone(),
        disconnects: s.disconnects,
        disconnects_in_window: s.disconnects_in_window,
        connect: Spread::of(s.connect_ms.clone()),
        first_event: Spread::of(first),
        first_event_since_start: Spread::of(first_since_start),
        clients_without_event: without,
        window_s: args.duration,
        connected_at_window,
        ticked_at_window,
        transport: if args.tls_ca.is_some() {
            "tls"
        } else {
            "plain"
        },
        produced,
        delivered,
        expected,
        delivered_ratio: if expected == 0 {
            0.0
        } else {
            delivered as f64 / expected as f64
        },
        delivered_per_s: t.delivered_in_window as f64 / args.duration,
        gaps: t.gaps_in_window,
        events: t.events,
        events_per_s: t.events_in_window as f64 / args.duration,
        snapshots: t.snapshots,
        lagged_snapshots: t.lagged_snapshots,
        silent_clients: silent,
        latency: t.latency.summary(),
        comments: s.comments,
        retry_ms: s.retry,
        published: s.published,
        publish_errors: s.publish_errors,
        loadgen_cpu: sys::cpu_share(&self_start, &self_end),
        server_cpu,
        server_start,
        server_end,
        rss_points,
        slab_kb_start,
        slab_kb_end,
        partitions,
        writer,
        upstream,
    })
}

/// Each client's path and partition: from --path-template (partition i), --path-file
/// or --path (round-robin; no partition).
fn client_paths(args: &Args) -> anyhow::Result<Vec<(String, Option<u64>)>> {
    let n = args.clients;
    if let Some(t) = &args.path_template {
        if !t.contains("{i}") {
            bail!("--path-template {t:?} has no {{i}}");
        }
        return Ok((0..n)
            .map(|i| (t.replace("{i}", &i.to_string()), Some(i as u64)))
            .collect());
    }
    let list: Vec<String> = match &args.path_file {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("reading {}", p.display()))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect(),
        None => args.path.clone(),
    };
    if list.is_empty() {
        bail!("no paths");
    }
    if let Some(bad) = list
        .iter()
        .find(|p| !p.starts_with('/') || p.contains([' ', '\r', '\n']))
    {
        bail!("{bad:?} is not a request path");
    }
    Ok((0..n)
        .map(|i| (list[i % list.len()].clone(), None))
        .collect())
}

/// xorshift64*: the writer's partition choices, the same for every contender.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n.max(1)
    }
}

/// The scoped scenario's writer: at `write_rate`, one change to a random partition
/// `c` (its next `seq`), over pgwire (`--write-pg`, the engine) or HTTP
/// (`--write-url`, nchan's per-channel publisher), until `stop`. A write that fails
/// is not counted as written.
async fn partition_writer(args: Args, stop: Instant, shared: Rc<RefCell<Shared>>) {
    let parts = shared.borrow().written.len();
    let mut rng = Rng(args.write_seed.max(1));
    let pg = match &args.write_pg {
        Some(conninfo) => match tokio_postgres::connect(conninfo, tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::task::spawn_local(connection);
                Some(client)
            }
            Err(e) => {
                eprintln!("loadgen: --write-pg {conninfo}: {e}");
                shared.borrow_mut().write_errors += 1;
                return;
            }
        },
        None => None,
    };
    let mut http: Option<TcpStream> = None;
    let schedule = Schedule::start(args.write_rate);
    shared.borrow_mut().writes_from_us = sys::now_us();
    let mut k: u64 = 0;
    loop {
        k += 1;
        let due = schedule.due(k);
        // A writer behind its schedule (a slow engine) stops at `stop` too, so no
        // write lands after the window plus the one in flight.
        if due >= stop || Instant::now() >= stop {
            break;
        }
        sleep_until(due).await;
        let c = rng.below(parts);
        let seq = shared.borrow().written[c] + 1;
        let ok = if let Some(client) = &pg {
            let sql = args
                .write_sql
                .replace("{c}", &c.to_string())
                .replace("{s}", &seq.to_string());
            client.simple_query(&sql).await.is_ok()
        } else if let Some(url) = &args.write_url {
            let body = format!(
                "{{\"order_id\":{c},\"customer_id\":{c},\"seq\":{seq},\"sent_ms\":{},\"pad\":\"{PAD}\"}}",
                sys::now_ms()
            );
            let req = format!(
                "POST {}/{c} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                url.path.trim_end_matches('/'),
                url.addr,
                body.len()
            );
            // A kept-alive connection the server has closed (nginx ends one after
            // `keepalive_requests`) fails on its next request: retry that write once on
            // a new connection. A POST answered but lost would be published twice and
            // show up as a duplicate, not be hidden.
            let mut ok = false;
            for _ in 0..2 {
                if http.is_none() {
                    http = TcpStream::connect(url.addr).await.ok();
                }
                ok = match http.as_mut() {
                    Some(conn) => post(conn, req.as_bytes()).await.is_ok(),
                    None => false,
                };
                if ok {
                    break;
                }
                http = None;
            }
            ok
        } else {
            false
        };
        let mut s = shared.borrow_mut();
        if ok {
            s.written[c] = seq;
            s.writes += 1;
        } else {
            s.write_errors += 1;
        }
        s.writes_to_us = sys::now_us();
    }
}

/// The engine's sessions (all; the gateway's, named `tailgate ...`) and subscriptions.
async fn upstream_sessions(conninfo: &str) -> anyhow::Result<serde_json::Value> {
    let (client, connection) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls).await?;
    tokio::task::spawn_local(connection);
    let count = |msgs: Vec<tokio_postgres::SimpleQueryMessage>| {
        msgs.into_iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => {
                    r.get(0).and_then(|v| v.parse::<u64>().ok())
                }
                _ => None,
            })
            .unwrap_or(0)
    };
    let all = count(
        client
            .simple_query("SELECT count(*) FROM mz_internal.mz_sessions")
            .await?,
    );
    let tailgate = count(
        client
            .simple_query(
                "SELECT count(*) FROM mz_internal.mz_sessions WHERE application_name LIKE 'tailgate %'",
            )
            .await?,
    );
    let subs = count(
        client
            .simple_query("SELECT count(*) FROM mz_internal.mz_subscriptions")
            .await?,
    );
    // This query's own session is one of `all`; the writer's is another when it
    // writes to this engine.
    Ok(serde_json::json!({
        "sessions": all,
        "tailgate_sessions": tailgate,
        "subscriptions": subs,
    }))
}

async fn wait_settled(shared: &Rc<RefCell<Shared>>, n: usize, deadline: Instant) {
    while shared.borrow().settled < n && Instant::now() < deadline {
        sleep(Duration::from_millis(20)).await;
    }
}

/// Header lines (each ending in CRLF) one client sends after the fixed ones.
struct Headers {
    common: Rc<str>,
    own: Option<Rc<str>>,
}

/// How every client connects and when its ticks count.
#[derive(Clone)]
struct Mode {
    tls: Option<Rc<Tls>>,
    group_by_id: bool,
}

/// loadgen's TLS client: rustls (ring), trusting the given roots, ALPN `http/1.1`.
struct Tls {
    connector: tokio_rustls::TlsConnector,
    name: rustls::pki_types::ServerName<'static>,
}

impl Tls {
    fn new(ca: &std::path::Path, name: &str) -> anyhow::Result<Self> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca)
            .with_context(|| format!("reading {}", ca.display()))?
        {
            roots.add(cert.with_context(|| format!("parsing {}", ca.display()))?)?;
        }
        if roots.is_empty() {
            bail!("{}: no certificate", ca.display());
        }
        let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            connector: tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)),
            name: rustls::pki_types::ServerName::try_from(name.to_string())
                .map_err(|e| anyhow::anyhow!("--tls-name {name}: {e}"))?,
        })
    }
}

/// Sends the request and reads the response head; returns it and the bytes read
/// after it (the start of the body).
async fn request<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    req: &[u8],
    connect_timeout: Duration,
) -> Result<(Head, Vec<u8>), String> {
    stream
        .write_all(req)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::with_capacity(2048);
    loop {
        match timeout(connect_timeout, stream.read_buf(&mut buf)).await {
            Ok(Ok(0)) => return Err("closed before response".into()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("read: {e}")),
            Err(_) => return Err("response: timeout".into()),
        }
        match Head::parse(&buf) {
            Ok(Some(head)) => {
                let rest = buf.split_off(head.len);
                return Ok((head, rest));
            }
            Ok(None) if buf.len() > 16 * 1024 => return Err("response head too long".into()),
            Ok(None) => {}
            Err(e) => return Err(format!("response head: {e}")),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn client(
    i: usize,
    addr: SocketAddr,
    path: String,
    headers: Headers,
    src: std::net::Ipv4Addr,
    connect_timeout: Duration,
    shared: Rc<RefCell<Shared>>,
    scratch: Rc<RefCell<Vec<u8>>>,
    column: Option<Rc<str>>,
    mode: Mode,
    ticked: bool,
) {
    let t0 = sys::now_us();
    shared.borrow_mut().started_us[i] = t0;
    let sock = match sys::bound_socket(src) {
        Ok(s) => s,
        Err(e) => return shared.borrow_mut().fail(format!("socket: {e}")),
    };
    let stream = match timeout(connect_timeout, sock.connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return shared.borrow_mut().fail(format!("connect: {e}")),
        Err(_) => return shared.borrow_mut().fail("connect: timeout".into()),
    };
    let host = if mode.tls.is_some() {
        format!("localhost:{}", addr.port())
    } else {
        addr.to_string()
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n{}{}\r\n",
        headers.common,
        headers.own.as_deref().unwrap_or("")
    );
    drop(headers);
    let conn = |framing| Conn {
        i,
        parser: Parser::new(),
        framing,
        ticks: ClientTicks::default(),
        column,
        group: mode.group_by_id.then(Group::default),
    };
    match &mode.tls {
        None => {
            let mut stream = stream;
            let (head, rest) = match request(&mut stream, req.as_bytes(), connect_timeout).await {
                Ok(x) => x,
                Err(e) => return shared.borrow_mut().fail(e),
            };
            let Some(mut conn) = connected(t0, &head, &shared, ticked).map(conn) else {
                return;
            };
            conn.body(&rest, &shared);
            drop(rest);
            loop {
                if stream.readable().await.is_err() {
                    break;
                }
                let mut buf = scratch.borrow_mut();
                match stream.try_read(&mut buf) {
                    Ok(0) => break,
                    Ok(k) => {
                        if !conn.body(&buf[..k], &shared) {
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(_) => break,
                }
            }
        }
        Some(tls) => {
            let handshake = tls.connector.connect(tls.name.clone(), stream);
            let mut stream = match timeout(connect_timeout, handshake).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return shared.borrow_mut().fail(format!("tls: {e}")),
                Err(_) => return shared.borrow_mut().fail("tls: timeout".into()),
            };
            let (head, rest) = match request(&mut stream, req.as_bytes(), connect_timeout).await {
                Ok(x) => x,
                Err(e) => return shared.borrow_mut().fail(e),
            };
            let Some(mut conn) = connected(t0, &head, &shared, ticked).map(conn) else {
                return;
            };
            conn.body(&rest, &shared);
            drop(rest);
            // Decrypted bytes need a buffer of their own per connection: a shared one
            // cannot be borrowed across the read's await.
            let mut buf = vec![0u8; 4096];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => {
                        if !conn.body(&buf[..k], &shared) {
                            break;
                        }
                    }
                }
            }
        }
    }
    let mut s = shared.borrow_mut();
    s.disconnects += 1;
    if ticked {
        s.ticked_live -= 1;
    }
    if s.window.start_ms != 0 && s.window.end_ms == u64::MAX {
        s.disconnects_in_window += 1;
    }
}

/// Accounts for a response head: a client with status 200 is connected (Some, with
/// the body's framing); any other status is a failure.
fn connected(t0: u64, head: &Head, shared: &RefCell<Shared>, ticked: bool) -> Option<Body> {
    let mut s = shared.borrow_mut();
    if head.status != 200 {
        s.bad_status += 1;
        s.fail(format!("status: {} {}", head.status, head.reason));
        return None;
    }
    s.connected += 1;
    s.settled += 1;
    if ticked {
        s.ticked_live += 1;
    }
    s.connect_ms.push((sys::now_us() - t0) as f64 / 1000.0);
    // Chunked (hyper, axum, nchan, uvicorn) or close-delimited (tailgate's fast path).
    Some(Body::of(head))
}

/// The events of a mux group not yet complete (--group-by-id): their data, held
/// until an event with a new id closes the group.
#[derive(Default)]
struct Group {
    last_id: Vec<u8>,
    held: Vec<(bool, Vec<u8>)>,
}

struct Conn {
    i: usize,
    parser: Parser,
    framing: Body,
    ticks: ClientTicks,
    /// The partition column, when rows are checked per partition.
    column: Option<Rc<str>>,
    /// --group-by-id: ticks count when their group is complete.
    group: Option<Group>,
}

impl Conn {
    /// Feeds the body bytes of one read; false when the body is malformed or finished.
    fn body(&mut self, bytes: &[u8], shared: &RefCell<Shared>) -> bool {
        let Conn {
            i,
            parser,
            framing,
            ticks,
            column,
            group,
        } = self;
        let mut s = shared.borrow_mut();
        let s = &mut *s;
        // Every event of one read arrived at the same time.
        let now = sys::now_us();
        let mut any = false;
        let more = framing.feed(bytes, |b| {
            parser.feed(b, |ev| {
                any = true;
                if let Some(g) = group.as_mut() {
                    // Held until the group's last event (the one with a new id); then
                    // every held event counts as received now.
                    if !matches!(ev.event, "status" | "end") {
                        g.held.push((ev.event == "snapshot", ev.data.to_vec()));
                    }
                    if ev.id != g.last_id.as_slice() {
                        g.last_id.clear();
                        g.last_id.extend_from_slice(ev.id);
                        for (snapshot, data) in g.held.drain(..) {
                            ticks.on_event(&data, snapshot, now, s.window, &mut s.totals);
                        }
                    }
                    return;
                }
                match (ev.event, column.as_deref()) {
                    ("status" | "end", _) => {}
                    (name, Some(col)) => s.rows[*i].on_event(
                        ev.data,
                        name == "snapshot",
                        col,
                        now,
                        s.window,
                        &mut s.totals,
                        &mut s.part,
                    ),
                    (name, None) => {
                        ticks.on_event(ev.data, name == "snapshot", now, s.window, &mut s.totals)
                    }
                }
            })
        });
        if any {
            if s.first_us[*i] == 0 {
                s.first_us[*i] = now;
            }
            s.last_us[*i] = now;
        }
        s.comments += std::mem::take(&mut parser.counters.comments);
        if parser.counters.retry.is_some() {
            s.retry = parser.counters.retry;
        }
        match more {
            Ok(more) => more,
            Err(ChunkError) => {
                *s.errors.entry("malformed chunked body".into()).or_default() += 1;
                false
            }
        }
    }
}

/// POSTs one tick per period to `url` over a keep-alive connection (nchan's publisher).
async fn publisher(url: PublishUrl, rate: f64, stop: Instant, shared: Rc<RefCell<Shared>>) {
    let schedule = Schedule::start(rate);
    let mut seq: u64 = 0;
    let mut conn: Option<TcpStream> = None;
    while Instant::now() < stop {
        seq += 1;
        sleep_until(schedule.due(seq)).await;
        let body = tick_json(seq, schedule.sent_ms(seq));
        let req = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            url.path,
            url.addr,
            body.len()
        );
        if conn.is_none() {
            conn = TcpStream::connect(url.addr).await.ok();
        }
        let ok = match conn.as_mut() {
            Some(c) => post(c, req.as_bytes()).await.is_ok(),
            None => false,
        };
        if !ok {
            conn = None;
        }
        shared.borrow_mut().fed(ok);
    }
}

/// Sends one request and reads its response (head and `content-length` body).
async fn post(c: &mut TcpStream, req: &[u8]) -> anyhow::Result<()> {
    timeout(Duration::from_secs(5), async {
        c.write_all(req).await?;
        let mut buf = Vec::with_capacity(1024);
        let head = loop {
            if c.read_buf(&mut buf).await? == 0 {
                bail!("closed");
            }
            if let Some(head) = Head::parse(&buf)? {
                break head;
            }
        };
        let mut have = buf.len() - head.len;
        let mut scratch = [0u8; 4096];
        while have < head.content_length.unwrap_or(0) {
            let k = c.read(&mut scratch).await?;
            if k == 0 {
                bail!("closed");
            }
            have += k;
        }
        if !(200..300).contains(&head.status) {
            bail!("status {}", head.status);
        }
        Ok(())
    })
    .await?
}

/// Runs `sql` once per period over pgwire (the tutorial's engine has no scheduler).
async fn feeder(
    conninfo: String,
    sql: String,
    rate: f64,
    stop: Instant,
    shared: Rc<RefCell<Shared>>,
) {
    let (client, connection) = match tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("loadgen: --feed-pg {conninfo}: {e}");
            shared.borrow_mut().fed(false);
            return;
        }
    };
    tokio::task::spawn_local(connection);
    let schedule = Schedule::start(rate);
    let mut seq: u64 = 0;
    while Instant::now() < stop {
        seq += 1;
        sleep_until(schedule.due(seq)).await;
        let ok = client.simple_query(&sql).await.is_ok();
        shared.borrow_mut().fed(ok);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_lines_need_a_name_and_a_clean_value() {
        assert_eq!(
            header_line("Authorization:  Bearer abc ").unwrap(),
            "Authorization: Bearer abc"
        );
        assert_eq!(header_line("X-A:").unwrap(), "X-A: ");
        assert!(header_line("no colon").is_err());
        assert!(header_line(": empty name").is_err());
        assert!(header_line("Bad Name: x").is_err());
        assert!(header_line("X: a\r\nInjected: b").is_err());
        let dir = std::env::temp_dir().join(format!("loadgen-hf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("h.txt");
        std::fs::write(&p, "Authorization: Bearer a\n\nAuthorization: Bearer b\n").unwrap();
        assert_eq!(
            header_file(&p).unwrap(),
            ["Authorization: Bearer a", "Authorization: Bearer b"]
        );
        std::fs::write(&p, "Authorization: Bearer a\nbroken\n").unwrap();
        let e = header_file(&p).unwrap_err().to_string();
        assert!(e.contains(":2:"), "{e}");
        std::fs::write(&p, "\n").unwrap();
        assert!(header_file(&p).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_mux_tick_counts_when_its_group_id_arrives() {
        let shared = RefCell::new(Shared {
            first_us: vec![0],
            last_us: vec![0],
            window: Window {
                start_ms: 1,
                end_ms: u64::MAX,
            },
            ..Shared::default()
        });
        let mut conn = Conn {
            i: 0,
            parser: Parser::new(),
            framing: Body::Close,
            ticks: ClientTicks::default(),
            column: None,
            group: Some(Group::default()),
        };
        let sent = sys::now_ms();
        let snap = "event: snapshot\ndata: {\"stream\":\"/a\",\"changes\":[{\"diff\":1,\"row\":{\"seq\":1,\"sent_ms\":1}}]}\nid: 10\n\n";
        assert!(conn.body(snap.as_bytes(), &shared));
        // An event of a group without its id yet: held, nothing counted.
        let held = format!("event: update\ndata: {{\"stream\":\"/a\",\"changes\":[{{\"diff\":1,\"row\":{{\"seq\":2,\"sent_ms\":{sent}}}}}]}}\n\n");
        assert!(conn.body(held.as_bytes(), &shared));
        assert_eq!(shared.borrow().totals.delivered_in_window, 0);
        // The group's last event (another stream's, no tick) carries the new id.
        let last = "event: update\ndata: {\"stream\":\"/b\",\"changes\":[]}\nid: 11\n\n";
        assert!(conn.body(last.as_bytes(), &shared));
        let s = shared.borrow();
        assert_eq!(s.totals.delivered_in_window, 1);
        assert_eq!(s.totals.snapshots, 1);
        assert_eq!(s.totals.latency.count(), 1);
    }

    #[test]
    fn publish_urls_need_an_address_and_get_a_path() {
        let u: PublishUrl = "http://127.0.0.1:8080/pub".parse().unwrap();
        assert_eq!((u.addr.port(), u.path.as_str()), (8080, "/pub"));
        let u: PublishUrl = "http://127.0.0.1:8080".parse().unwrap();
        assert_eq!(u.path, "/");
        assert!("https://127.0.0.1:8080/pub".parse::<PublishUrl>().is_err());
        assert!("http://localhost:8080/pub".parse::<PublishUrl>().is_err());
    }
}
