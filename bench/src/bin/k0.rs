//! k0: the practical ceiling. No framework: accept (backlog 4096), answer the GET with
//! a fixed head and a close-delimited body, then one task owns every socket. Each
//! sweep encodes the due ticks once into one buffer and `try_write`s it to every
//! socket, queueing bytes only on `WouldBlock` (flushed on the next sweep). When a
//! sweep takes longer than the tick period, several ticks go out in one write: the
//! batched (throughput-bound) regime.
//!
//! It records each sweep's duration and writes a summary to `--stats` when it stops
//! (after `--duration`, or on SIGTERM/SIGINT).

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use clap::Parser;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{sleep_until, timeout, Instant};

use tailgate_bench::measure::Spread;
use tailgate_bench::{sys, tick_json};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:7100")]
    listen: SocketAddr,
    /// Ticks per second.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Bytes a client may have queued before its backlog is dropped.
    #[arg(long, default_value_t = 1 << 20)]
    max_pending: usize,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 300.0)]
    duration: f64,
    /// Write the sweep summary (JSON) here on exit.
    #[arg(long)]
    stats: Option<std::path::PathBuf>,
}

struct Client {
    stream: TcpStream,
    pending: BytesMut,
}

#[derive(Default)]
struct State {
    joining: Vec<TcpStream>,
}

#[derive(Serialize)]
struct Stats {
    rate: f64,
    ticks: u64,
    max_clients: usize,
    /// Sweeps made while at least 99% of the peak client count was connected.
    full_sweeps: usize,
    /// Duration of those sweeps (one write per client each).
    sweep: Spread,
    /// Ticks per full sweep (1 = latency-bound, >1 = batched).
    ticks_per_sweep_mean: f64,
    writes: u64,
    would_block: u64,
    dropped_backlogs: u64,
    closed: u64,
}

const HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\nretry: 15000\n\n";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let sock = TcpSocket::new_v4()?;
    sock.set_reuseaddr(true)?;
    sock.bind(args.listen)?;
    let listener = sock.listen(4096)?;
    let state = Rc::new(RefCell::new(State::default()));
    {
        let state = state.clone();
        tokio::task::spawn_local(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                let state = state.clone();
                tokio::task::spawn_local(async move {
                    if let Ok(Ok(s)) = timeout(Duration::from_secs(10), handshake(s)).await {
                        state.borrow_mut().joining.push(s);
                    }
                });
            }
        });
    }
    let stop = Instant::now() + Duration::from_secs_f64(args.duration);
    let record = Rc::new(RefCell::new(Record {
        stats: empty_stats(),
        sweeps: Vec::new(),
    }));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = writer(&args, state, stop, record.clone()) => {},
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    };
    let stats = {
        let r = record.borrow();
        summarize(&r.stats, &r.sweeps)
    };
    if let Some(p) = &args.stats {
        std::fs::write(p, serde_json::to_string_pretty(&stats)?)?;
    }
    std::process::exit(0);
}

/// What the writer has done so far; read when it stops, however it stops.
struct Record {
    stats: Stats,
    /// (clients, sweep ms, ticks written) per sweep.
    sweeps: Vec<(usize, f64, u64)>,
}

fn empty_stats() -> Stats {
    Stats {
        rate: 0.0,
        ticks: 0,
        max_clients: 0,
        full_sweeps: 0,
        sweep: Spread::default(),
        ticks_per_sweep_mean: 0.0,
        writes: 0,
        would_block: 0,
        dropped_backlogs: 0,
        closed: 0,
    }
}

async fn handshake(mut s: TcpStream) -> std::io::Result<TcpStream> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let k = s.read(&mut buf).await?;
        if k == 0 || head.len() > 16 * 1024 {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        head.extend_from_slice(&buf[..k]);
    }
    s.set_nodelay(true)?;
    s.write_all(HEAD).await?;
    Ok(s)
}

async fn writer(
    args: &Args,
    state: Rc<RefCell<State>>,
    stop: Instant,
    record: Rc<RefCell<Record>>,
) {
    let period = Duration::from_secs_f64(1.0 / args.rate);
    let t0 = Instant::now();
    let t0_ms = sys::now_ms();
    let mut clients: Vec<Client> = Vec::new();
    let mut seq: u64 = 0;
    record.borrow_mut().stats.rate = args.rate;
    while Instant::now() < stop {
        sleep_until(t0 + period * (seq as u32 + 1)).await;
        // Every tick that is due by now goes out in this sweep, encoded once.
        let due = (t0.elapsed().as_secs_f64() * args.rate) as u64;
        let mut buf = BytesMut::new();
        let first = seq;
        while seq < due.max(first + 1) {
            seq += 1;
            let sent_ms = t0_ms + (period * seq as u32).as_millis() as u64;
            buf.extend_from_slice(
                format!(
                    "event: tick\nid: {seq}\ndata: {}\n\n",
                    tick_json(seq, sent_ms)
                )
                .as_bytes(),
            );
        }
        let bytes: Bytes = buf.freeze();
        clients.extend(state.borrow_mut().joining.drain(..).map(|stream| Client {
            stream,
            pending: BytesMut::new(),
        }));
        let started = Instant::now();
        let mut rec = record.borrow_mut();
        let Record { stats, sweeps } = &mut *rec;
        clients.retain_mut(|c| {
            if !c.pending.is_empty() {
                if c.pending.len() + bytes.len() > args.max_pending {
                    c.pending.clear();
                    stats.dropped_backlogs += 1;
                }
                c.pending.extend_from_slice(&bytes);
                return flush(c, stats);
            }
            stats.writes += 1;
            match c.stream.try_write(&bytes) {
                Ok(k) if k == bytes.len() => true,
                Ok(k) => {
                    c.pending.extend_from_slice(&bytes[k..]);
                    true
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    stats.would_block += 1;
                    c.pending.extend_from_slice(&bytes);
                    true
                }
                Err(_) => {
                    stats.closed += 1;
                    false
                }
            }
        });
        sweeps.push((
            clients.len(),
            started.elapsed().as_secs_f64() * 1000.0,
            seq - first,
        ));
        stats.ticks = seq;
        stats.max_clients = stats.max_clients.max(clients.len());
    }
}

fn flush(c: &mut Client, stats: &mut Stats) -> bool {
    stats.writes += 1;
    match c.stream.try_write(&c.pending) {
        Ok(k) => {
            let _ = c.pending.split_to(k);
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            stats.would_block += 1;
            true
        }
        Err(_) => {
            stats.closed += 1;
            false
        }
    }
}

fn summarize(stats: &Stats, sweeps: &[(usize, f64, u64)]) -> Stats {
    let peak = sweeps.iter().map(|s| s.0).max().unwrap_or(0);
    let full: Vec<&(usize, f64, u64)> = sweeps
        .iter()
        .filter(|s| peak > 0 && s.0 * 100 >= peak * 99)
        .collect();
    let ticks: u64 = full.iter().map(|s| s.2).sum();
    Stats {
        rate: stats.rate,
        ticks: stats.ticks,
        max_clients: peak,
        full_sweeps: full.len(),
        sweep: Spread::of(full.iter().map(|s| s.1).collect()),
        ticks_per_sweep_mean: if full.is_empty() {
            0.0
        } else {
            ticks as f64 / full.len() as f64
        },
        writes: stats.writes,
        would_block: stats.would_block,
        dropped_backlogs: stats.dropped_backlogs,
        closed: stats.closed,
    }
}
