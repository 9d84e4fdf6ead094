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
use std::fmt::Write as _;
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
use tailgate_bench::{tick_json, Schedule};

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

/// Sockets that have been answered and wait for the writer to take them.
type Joining = Rc<RefCell<Vec<TcpStream>>>;

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
    let joining = Joining::default();
    {
        let joining = joining.clone();
        tokio::task::spawn_local(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                let joining = joining.clone();
                tokio::task::spawn_local(async move {
                    if let Ok(Ok(s)) = timeout(Duration::from_secs(10), handshake(s)).await {
                        joining.borrow_mut().push(s);
                    }
                });
            }
        });
    }
    let stop = Instant::now() + Duration::from_secs_f64(args.duration);
    let record = Rc::new(RefCell::new(Record::default()));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = writer(&args, joining, stop, record.clone()) => {},
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    };
    let stats = record.borrow().stats(args.rate);
    if let Some(p) = &args.stats {
        std::fs::write(p, serde_json::to_string_pretty(&stats)?)?;
    }
    std::process::exit(0);
}

/// What the writer has done so far; read when it stops, however it stops.
#[derive(Default)]
struct Record {
    sweeps: Vec<Sweep>,
    writes: u64,
    would_block: u64,
    dropped_backlogs: u64,
    closed: u64,
}

struct Sweep {
    clients: usize,
    ms: f64,
    /// Ticks written in this sweep.
    ticks: u64,
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

async fn writer(args: &Args, joining: Joining, stop: Instant, record: Rc<RefCell<Record>>) {
    let schedule = Schedule::start(args.rate);
    let mut clients: Vec<Client> = Vec::new();
    let mut seq: u64 = 0;
    while Instant::now() < stop {
        sleep_until(schedule.due(seq + 1)).await;
        // Every tick that is due by now goes out in this sweep, encoded once.
        let due = schedule.due_now();
        let mut buf = BytesMut::new();
        let first = seq;
        while seq < due.max(first + 1) {
            seq += 1;
            let data = tick_json(seq, schedule.sent_ms(seq));
            let _ = write!(buf, "event: tick\nid: {seq}\ndata: {data}\n\n");
        }
        let bytes: Bytes = buf.freeze();
        clients.extend(joining.borrow_mut().drain(..).map(|stream| Client {
            stream,
            pending: BytesMut::new(),
        }));
        let started = Instant::now();
        let mut rec = record.borrow_mut();
        let rec = &mut *rec;
        clients.retain_mut(|c| {
            if !c.pending.is_empty() {
                if c.pending.len() + bytes.len() > args.max_pending {
                    c.pending.clear();
                    rec.dropped_backlogs += 1;
                }
                c.pending.extend_from_slice(&bytes);
                return flush(c, rec);
            }
            rec.writes += 1;
            match c.stream.try_write(&bytes) {
                Ok(k) if k == bytes.len() => true,
                Ok(k) => {
                    c.pending.extend_from_slice(&bytes[k..]);
                    true
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    rec.would_block += 1;
                    c.pending.extend_from_slice(&bytes);
                    true
                }
                Err(_) => {
                    rec.closed += 1;
                    false
                }
            }
        });
        rec.sweeps.push(Sweep {
            clients: clients.len(),
            ms: started.elapsed().as_secs_f64() * 1000.0,
            ticks: seq - first,
        });
    }
}

fn flush(c: &mut Client, rec: &mut Record) -> bool {
    rec.writes += 1;
    match c.stream.try_write(&c.pending) {
        Ok(k) => {
            let _ = c.pending.split_to(k);
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            rec.would_block += 1;
            true
        }
        Err(_) => {
            rec.closed += 1;
            false
        }
    }
}

impl Record {
    fn stats(&self, rate: f64) -> Stats {
        let peak = self.sweeps.iter().map(|s| s.clients).max().unwrap_or(0);
        let full: Vec<&Sweep> = self
            .sweeps
            .iter()
            .filter(|s| peak > 0 && s.clients * 100 >= peak * 99)
            .collect();
        let full_ticks: u64 = full.iter().map(|s| s.ticks).sum();
        Stats {
            rate,
            ticks: self.sweeps.iter().map(|s| s.ticks).sum(),
            max_clients: peak,
            full_sweeps: full.len(),
            sweep: Spread::of(full.iter().map(|s| s.ms).collect()),
            ticks_per_sweep_mean: if full.is_empty() {
                0.0
            } else {
                full_ticks as f64 / full.len() as f64
            },
            writes: self.writes,
            would_block: self.would_block,
            dropped_backlogs: self.dropped_backlogs,
            closed: self.closed,
        }
    }
}
