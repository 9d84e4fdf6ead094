//! The suite: starts each contender (server on CPU 0), drives it with `loadgen` (CPU 1),
//! evaluates every goal as a ratio against an anchor measured in the same run, and
//! writes `results/<date>.json` and `results/latest.md`.
//!
//! Contenders: tailgate on its embedded engine, k0 (the ceiling), naive-axum, nchan
//! (nginx, one worker) and the tutorial's FastAPI + sse-starlette stack on the legacy
//! engine. A contender whose software is missing is skipped and its goals say so.
//! Every child process is stopped (SIGTERM, then SIGKILL) before the next run starts.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use serde::Serialize;
use serde_json::{json, Value};

use tailgate_bench::{sys, PAD};

mod auth;
mod charts;
mod scoped;
mod tlsmux;
mod views;

#[derive(Parser, Debug, Clone)]
#[command(about = "tailgate's side-by-side benchmark suite")]
struct Args {
    /// Scenario to run (repeat): idle, storm, fanout, light, overload, economy, tutorial,
    /// views, auth, scoped, tls, tls-idle, mux, all.
    #[arg(long, default_value = "all")]
    scenario: Vec<String>,
    /// A 10-second fan-out check of tailgate against k0 (CI): no nginx, no Python;
    /// fails only when nothing is delivered.
    #[arg(long)]
    smoke: bool,
    /// The bench directory (the tutorial, results).
    #[arg(long, default_value = "bench")]
    bench_dir: PathBuf,
    /// Where loadgen, k0 and naive-axum are (default: the workspace's target/release,
    /// beside <bench-dir>).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The gateway binary.
    #[arg(long, default_value = "target/release/tailgate")]
    tailgate: PathBuf,
    /// Where results go (default: <bench-dir>/results; a temp dir with --smoke).
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Fan-out rates, events per second. Every contender runs the rates (<= 50);
    /// above that, a contender stops at its first rate that misses the knee criterion.
    #[arg(long, value_delimiter = ',', default_value = "10,20,50,100,200")]
    rates: Vec<f64>,
    /// Tutorial client counts tried when looking for its saturation point (10 ticks/s).
    #[arg(long, value_delimiter = ',', default_value = "1000,2000,5000,10000")]
    tutorial_clients: Vec<usize>,
    /// Interleaved repetitions of each fan-out, light-load, views and auth run
    /// (A B A B ...); their median (the mean of two) is what the goals use.
    #[arg(long, default_value_t = 2)]
    reps: usize,
    /// Clients of the fan-out runs (smaller for a short development run).
    #[arg(long, default_value_t = 5000)]
    fanout_clients: usize,
    /// Clients of the idle runs; RSS is also read at 2,500, 5,000, 9,500 and 14,000 of
    /// 19,000 (scaled to this count) on the way up.
    #[arg(long, default_value_t = 19_000)]
    idle_clients: usize,
    /// Clients connecting at once in the storm and auth scenarios.
    #[arg(long, default_value_t = 10_000)]
    storm_clients: usize,
    /// Streams (one view each) of the views scenario.
    #[arg(long, default_value_t = 1000)]
    views_streams: usize,
    /// Clients of the scoped scenario, each on its own partition.
    #[arg(long, default_value_t = 10_000)]
    scoped_clients: usize,
    /// Writes per second of the scoped scenario's writer (each to one partition).
    #[arg(long, default_value_t = 1000.0)]
    scoped_rate: f64,
    /// Seconds of the scoped scenario's measurement window.
    #[arg(long, default_value_t = 15.0)]
    scoped_window: f64,
    /// Partition counts naive-scoped (one upstream session per partition) is tried at,
    /// in order, until one fails (0: skip naive-scoped).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "50,100,200,500,1000,2000,5000,9000"
    )]
    naive_partitions: Vec<usize>,
    /// Clients of the tls scenario (fan-out over TLS vs plaintext).
    #[arg(long, default_value_t = 5000)]
    tls_clients: usize,
    /// Events per second of the tls scenario.
    #[arg(long, value_delimiter = ',', default_value = "10,50")]
    tls_rates: Vec<f64>,
    /// Idle connections of the tls-idle scenario (RSS slope from half of them to all).
    #[arg(long, default_value_t = 5000)]
    tls_idle_clients: usize,
    /// Clients of the mux scenario (each: one mux of three streams, or three
    /// connections).
    #[arg(long, default_value_t = 1000)]
    mux_clients: usize,
    /// Writes per second (to one of the three streams) of the mux scenario.
    #[arg(long, value_delimiter = ',', default_value = "10,50")]
    mux_rates: Vec<f64>,
    /// The embedded engine's `tick` in the mux scenario (how often a view nobody
    /// writes to reports progress), one set of runs per value.
    #[arg(long, value_delimiter = ',', default_value = "1s,100ms")]
    mux_ticks: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Kind {
    Tailgate,
    K0,
    NaiveAxum,
    Nchan,
    Tutorial,
    NaiveScoped,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Tailgate => "tailgate",
            Kind::K0 => "k0",
            Kind::NaiveAxum => "naive-axum",
            Kind::Nchan => "nchan",
            Kind::Tutorial => "tutorial",
            Kind::NaiveScoped => "naive-scoped",
        }
    }
}

/// How to start a contender.
#[derive(Clone, Debug)]
struct Spec {
    kind: Kind,
    /// Ticks per second; 0 = idle.
    rate: f64,
    /// Streams (tailgate only; clients spread round-robin).
    streams: usize,
    client_queue: Option<usize>,
    /// tailgate only: JWT auth on, with this HS256 secret in its environment.
    auth_secret: Option<String>,
    /// tailgate and nchan: serve HTTPS with the suite's test certificate.
    tls: bool,
    /// tailgate only: the mux scenario's three streams (and how clients open them).
    mux: Option<tlsmux::MuxClients>,
    /// tailgate only: the embedded engine's `tick`.
    tick: Option<String>,
}

impl Spec {
    fn new(kind: Kind, rate: f64) -> Self {
        Self {
            kind,
            rate,
            streams: 1,
            client_queue: None,
            auth_secret: None,
            tls: false,
            mux: None,
            tick: None,
        }
    }
}

/// A running contender.
struct Server {
    children: Vec<Child>,
    /// Processes whose CPU and RSS count as the server's.
    pids: Vec<u32>,
    port: u16,
    paths: Vec<String>,
    /// pgwire conninfo of the engine (tailgate's embedded one, or the tutorial's).
    engine: Option<String>,
    publish_url: Option<String>,
    feed_pg: Option<String>,
    stats: Option<PathBuf>,
    rss_idle_kb: u64,
    /// The CA loadgen must trust (the server speaks TLS).
    tls_ca: Option<PathBuf>,
    /// Paths whose clients are owed the ticks (loadgen's --ticks-on); empty: all.
    ticks_on: Vec<String>,
    /// loadgen counts a tick when its mux group is complete.
    group_by_id: bool,
}

/// How to drive a contender.
#[derive(Clone, Debug)]
struct Load {
    clients: usize,
    connect_rate: f64,
    warmup: f64,
    duration: f64,
    drain: f64,
    /// Client counts at which loadgen also reads the server's RSS (then also at the end).
    rss_at: Vec<usize>,
    connect_timeout: f64,
    /// One request header line per client (`--header-file`).
    header_file: Option<PathBuf>,
    /// Further loadgen arguments (the scoped scenario's paths, check and writer).
    args: Vec<String>,
}

impl Load {
    fn steady(clients: usize, duration: f64) -> Self {
        Self {
            clients,
            connect_rate: 2500.0,
            warmup: 2.0,
            duration,
            drain: 2.0,
            rss_at: Vec::new(),
            connect_timeout: 30.0,
            header_file: None,
            args: Vec::new(),
        }
    }

    /// Seconds until the last connect starts.
    fn ramp(&self) -> f64 {
        if self.connect_rate > 0.0 {
            self.clients as f64 / self.connect_rate
        } else {
            0.0
        }
    }

    /// The longest loadgen may take (its own deadline, with its 2 s settles at RSS
    /// checkpoints) plus a margin.
    fn bound(&self) -> f64 {
        let checkpoints = if self.rss_at.is_empty() {
            0
        } else {
            self.rss_at.len() + 1
        };
        self.ramp()
            + self.connect_timeout * (1 + checkpoints) as f64
            + 2.0 * checkpoints.max(2) as f64
            + self.warmup
            + self.duration
            + self.drain
            + 30.0
    }
}

/// One loadgen run with its context, kept in the JSON results.
#[derive(Serialize, Clone)]
struct Run {
    scenario: String,
    contender: Kind,
    clients: usize,
    rate: f64,
    streams: usize,
    report: Value,
    /// k0's own sweep statistics.
    k0: Option<Value>,
    extra: BTreeMap<String, Value>,
}

/// Repeated runs of one contender at one setting.
#[derive(Default)]
struct Reps(Vec<Run>);

impl Reps {
    fn p99(&self) -> f64 {
        median(self.0.iter().map(|r| r.f("latency.p99_ms")).collect())
    }

    fn sum(&self, path: &str) -> f64 {
        self.0.iter().map(|r| r.f(path)).sum()
    }

    /// Over all runs; 0 when nothing was expected (a contender that delivered nothing
    /// inside the window cannot tell how many ticks were produced).
    fn delivered_ratio(&self) -> f64 {
        let expected = self.sum("expected");
        if expected > 0.0 {
            self.sum("delivered") / expected
        } else {
            0.0
        }
    }

    /// The knee criterion: median p99 within 100 ms and 99.9% delivered over all runs.
    fn passes(&self) -> bool {
        self.p99() <= 100.0 && self.delivered_ratio() >= 0.999
    }

    /// Each run's p99, e.g. "41.2/46.4 ms".
    fn spread(&self) -> String {
        let each: Vec<String> = self
            .0
            .iter()
            .map(|r| fmt_num(r.f("latency.p99_ms")))
            .collect();
        format!("{} ms", each.join("/"))
    }
}

/// The median; the mean of the middle two for an even count; NaN when empty.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The number at a dotted `path` of `v` (numeric parts index arrays); NaN when there
/// is none.
fn num(v: &Value, path: &str) -> f64 {
    path.split('.')
        .fold(v, |v, p| match p.parse::<usize>() {
            Ok(i) => &v[i],
            Err(_) => &v[p],
        })
        .as_f64()
        .unwrap_or(f64::NAN)
}

impl Run {
    /// A number from loadgen's report, e.g. `f("latency.p99_ms")`.
    fn f(&self, path: &str) -> f64 {
        num(&self.report, path)
    }

    /// A number from k0's own statistics; NaN for other contenders.
    fn k0_f(&self, path: &str) -> f64 {
        self.k0.as_ref().map_or(f64::NAN, |k| num(k, path))
    }
}

/// What a goal's ratio must be.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Limit {
    AtMost(f64),
    Below(f64),
    AtLeast(f64),
    /// Exactly this ratio; an unreadable value fails.
    Exactly(f64),
    /// A count that must be 0 (no anchor: the ratio is the value); an unreadable one fails.
    Zero,
    /// Reported, not judged: no limit has been set for this ratio yet.
    Report,
}

impl Limit {
    /// The goal's ratio and whether it passes; None when it cannot be judged (a missing
    /// value or anchor of a comparison).
    fn judge(self, value: f64, anchor: f64) -> (f64, Option<bool>) {
        let ratio = match self {
            Limit::Zero => value,
            _ if anchor == 0.0 && value == 0.0 => 1.0,
            _ => value / anchor,
        };
        let unknown = value.is_nan() || anchor.is_nan();
        let pass = match self {
            Limit::Report => None,
            Limit::Zero => Some(value == 0.0),
            Limit::Exactly(x) => Some(ratio == x),
            _ if unknown => None,
            Limit::AtMost(x) => Some(ratio <= x),
            Limit::Below(x) => Some(ratio < x),
            Limit::AtLeast(x) => Some(ratio >= x),
        };
        (ratio, pass)
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limit::AtMost(x) => write!(f, "<= {x}"),
            Limit::Below(x) => write!(f, "< {x}"),
            Limit::AtLeast(x) => write!(f, ">= {x}"),
            Limit::Exactly(x) => write!(f, "= {x}"),
            Limit::Zero => write!(f, "= 0"),
            Limit::Report => write!(f, "none yet"),
        }
    }
}

/// A scenario's own figures that do not fit the loadgen runs table (the views
/// scenario's startup, memory and reload times): rendered as a markdown table and kept
/// in the JSON results.
#[derive(Serialize, Clone, Default)]
struct Table {
    scenario: String,
    title: String,
    columns: Vec<String>,
    rows: Vec<Vec<Value>>,
    /// Said under the table.
    notes: Vec<String>,
    /// Everything measured, for the JSON results only.
    detail: Value,
}

/// One goal: value / anchor against a limit.
#[derive(Serialize, Clone)]
struct Goal {
    scenario: String,
    goal: String,
    value: f64,
    anchor: f64,
    ratio: f64,
    /// "<= 0.75", ">= 10", ...
    limit: String,
    pass: Option<bool>,
    unit: String,
    note: String,
}

struct Suite {
    args: Args,
    bin: PathBuf,
    tmp: PathBuf,
    next_port: u16,
    net: u8,
    pin: bool,
    runs: Vec<Run>,
    goals: Vec<Goal>,
    tables: Vec<Table>,
    skipped: Vec<String>,
    /// The test CA and localhost certificate of the TLS scenarios (made once per run).
    pki: Option<tlsmux::Pki>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match real_main(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("suite: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(args: Args) -> anyhow::Result<ExitCode> {
    let tmp = std::env::temp_dir().join(format!("tailgate-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let pin = std::thread::available_parallelism()
        .map(|n| n.get() >= 2)
        .unwrap_or(false);
    let mut s = Suite {
        bin: args
            .bin_dir
            .clone()
            .unwrap_or_else(|| args.bench_dir.join("../target/release")),
        tmp: tmp.clone(),
        next_port: 17_000 + (std::process::id() % 20) as u16 * 100,
        // Rotate the 127.x source networks between runs (TIME_WAIT from earlier runs).
        net: 10 + (sys::now_ms() / 1000 % 200) as u8,
        pin,
        runs: Vec::new(),
        goals: Vec::new(),
        tables: Vec::new(),
        skipped: Vec::new(),
        pki: None,
        args: args.clone(),
    };
    let started = Instant::now();
    let load_before = loadavg();
    let all = args.scenario.iter().any(|x| x == "all");
    let want = |name: &str| all || args.scenario.iter().any(|x| x == name);
    let mut result = Ok(());
    let mut scenario_load = serde_json::Map::new();
    if args.smoke {
        result = s.smoke();
    } else {
        for (name, f) in [
            (
                "fanout",
                Suite::fanout as fn(&mut Suite) -> anyhow::Result<()>,
            ),
            ("light", Suite::light),
            ("idle", Suite::idle),
            ("storm", Suite::storm),
            ("overload", Suite::overload),
            ("economy", Suite::economy),
            ("tutorial", Suite::tutorial),
            ("views", Suite::views),
            ("auth", Suite::auth),
            ("scoped", Suite::scoped),
            ("tls", Suite::tls),
            ("tls-idle", Suite::tls_idle),
            ("mux", Suite::mux),
        ] {
            if want(name) {
                let before = loadavg();
                eprintln!("== {name} (load average {before})");
                if let Err(e) = f(&mut s) {
                    eprintln!("scenario {name} failed: {e:#}");
                    s.skipped.push(format!("{name}: error: {e:#}"));
                }
                scenario_load.insert(name.into(), json!([before, loadavg()]));
            }
        }
    }
    let out_dir = match (&args.out_dir, args.smoke) {
        (Some(d), _) => d.clone(),
        (None, true) => tmp.join("results"),
        (None, false) => args.bench_dir.join("results"),
    };
    std::fs::create_dir_all(&out_dir)?;
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H%M%SZ"])
        .output()?;
    let date = String::from_utf8_lossy(&date.stdout).trim().to_string();
    let machine = json!({
        "date": date,
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "cpu": cpu_model(),
        "load_average_before": load_before,
        "load_average_after": loadavg(),
        "pinning": if s.pin { "server: taskset -c 0; loadgen: taskset -c 1" } else { "none (1 CPU)" },
        "fd_limit": fd_limit(),
        "duration_s": started.elapsed().as_secs_f64().round(),
        "smoke": args.smoke,
        "tailgate_commit": tailgate_commit(&args.tailgate),
        "load_average_per_scenario": scenario_load,
    });
    let doc = json!({
        "machine": machine,
        "goals": s.goals,
        "runs": s.runs,
        "tables": s.tables,
        "skipped": s.skipped,
    });
    let name = if args.smoke {
        format!("smoke-{date}.json")
    } else {
        format!("{date}.json")
    };
    std::fs::write(
        out_dir.join(&name),
        serde_json::to_string_pretty(&doc)? + "\n",
    )?;
    // The charts, from the runs just measured; a full run also refreshes the stable
    // `latest-*.svg` copies that bench/README.md embeds.
    let mut charts = Vec::new();
    if !args.smoke {
        for (name, chart) in charts::from_runs(&s.runs) {
            let dated = out_dir.join(format!("{date}-{name}.svg"));
            match chart.write_svg(&dated) {
                Ok(()) => {
                    if all {
                        std::fs::copy(&dated, out_dir.join(format!("latest-{name}.svg")))?;
                    }
                    charts.push(
                        dated
                            .file_name()
                            .unwrap_or_default()
                            .to_string_lossy()
                            .to_string(),
                    );
                }
                Err(e) => s.skipped.push(format!("chart {name}: {e:#}")),
            }
        }
    }
    let md = markdown(&machine, &s.goals, &s.runs, &s.tables, &charts, &s.skipped);
    // A subset run does not replace the full table.
    let md_name = if args.smoke {
        "smoke.md".to_string()
    } else if all {
        "latest.md".to_string()
    } else {
        format!("latest-{}.md", args.scenario.join("-"))
    };
    std::fs::write(out_dir.join(&md_name), &md)?;
    println!("{md}");
    eprintln!(
        "wrote {} and {}",
        out_dir.join(&name).display(),
        out_dir.join(&md_name).display()
    );
    let _ = std::fs::remove_dir_all(tmp.join("work"));
    result?;
    if args.smoke {
        // A missed ratio is not a failure here; nothing delivered is.
        let dead = s
            .runs
            .iter()
            .filter(|r| r.f("delivered") <= 0.0 || r.f("connected") <= 0.0)
            .map(|r| r.contender.name())
            .collect::<Vec<_>>();
        if s.runs.len() < 2 || !dead.is_empty() {
            eprintln!("smoke: no events delivered by {dead:?}");
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The commit the gateway binary was built from (`git describe` of the checkout that
/// holds it, `-dirty` when it has local changes), and the binary's build time.
fn tailgate_commit(binary: &Path) -> String {
    let dir = binary.canonicalize().ok().and_then(|p| {
        p.ancestors()
            .find(|a| a.join(".git").exists())
            .map(Path::to_path_buf)
    });
    let commit = dir
        .and_then(|d| {
            Command::new("git")
                .arg("-C")
                .arg(d)
                .args(["describe", "--always", "--dirty"])
                .output()
                .ok()
        })
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let built = std::fs::metadata(binary)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let built = Command::new("date")
        .args(["-u", "-d", &format!("@{built}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!("{commit} (binary built {built})")
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default()
}

fn fd_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid pointer to an rlimit.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    r.rlim_cur
}

fn wait_port(port: u16, deadline: Duration, child: &mut Child) -> anyhow::Result<()> {
    let end = Instant::now() + deadline;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    while Instant::now() < end {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("exited before listening on {port}: {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listening on {port} after {deadline:?}")
}

fn stop_child(c: &mut Child) {
    if let Ok(None) = c.try_wait() {
        // SAFETY: signalling a child we started, by its pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
    }
    let _ = c.wait();
}

fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn ticks_sql() -> String {
    format!("CREATE TABLE ticks (seq bigint, sent_ms bigint, pad text);\nINSERT INTO ticks VALUES (0, 0, '{PAD}');\n")
}

/// Counts the engine's active subscriptions (`mz_internal.mz_subscriptions`).
fn count_subscriptions(conninfo: &str) -> anyhow::Result<i64> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (client, conn) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_postgres::connect(conninfo, tokio_postgres::NoTls),
        )
        .await??;
        tokio::spawn(conn);
        let msgs = tokio::time::timeout(
            Duration::from_secs(10),
            client.simple_query("SELECT count(*) FROM mz_internal.mz_subscriptions"),
        )
        .await??;
        for m in msgs {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                return Ok(r.get(0).unwrap_or("0").parse::<i64>()?);
            }
        }
        bail!("no row")
    })
}

impl Suite {
    fn port(&mut self) -> u16 {
        self.next_port += 1;
        self.next_port
    }

    /// Starts nginx (pinned to the server's CPU) with `cfg` and prefix `dir`, waits
    /// for `port`, and makes its worker the process whose CPU and RSS count (taskset
    /// execs nginx, so the master is the child).
    fn start_nginx(
        &self,
        server: &mut Server,
        dir: &Path,
        cfg: &Path,
        port: u16,
    ) -> anyhow::Result<()> {
        let child = self
            .pinned("0", Path::new("nginx"))
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr.log"))?)
            .spawn()
            .context("starting nginx")?;
        let master = child.id();
        server.children.push(child);
        let last = server.children.len() - 1;
        wait_port(port, Duration::from_secs(10), &mut server.children[last])?;
        let end = Instant::now() + Duration::from_secs(5);
        let mut workers = children_of(master);
        while workers.is_empty() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50));
            workers = children_of(master);
        }
        server.pids = if workers.is_empty() {
            vec![master]
        } else {
            workers
        };
        Ok(())
    }

    fn pinned(&self, cpu: &str, program: &Path) -> Command {
        if self.pin {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpu).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    fn available(&self, kind: Kind) -> Result<(), String> {
        let nchan = Path::new("/usr/lib/nginx/modules/ngx_nchan_module.so").exists()
            && which("nginx").is_some();
        let venv = self
            .args
            .bench_dir
            .join("tutorial/.venv/bin/uvicorn")
            .exists();
        match kind {
            Kind::Nchan if !nchan => Err("nginx/nchan not installed".into()),
            Kind::Tutorial if !venv => Err("tutorial venv missing".into()),
            _ => Ok(()),
        }
    }

    fn start(&mut self, spec: &Spec) -> anyhow::Result<Server> {
        let port = self.port();
        let dir = self
            .tmp
            .join("work")
            .join(format!("{}-{port}", spec.kind.name()));
        std::fs::create_dir_all(&dir)?;
        let mut server = Server {
            children: Vec::new(),
            pids: Vec::new(),
            port,
            paths: vec!["/ticks".into()],
            engine: None,
            publish_url: None,
            feed_pg: None,
            stats: None,
            rss_idle_kb: 0,
            tls_ca: None,
            ticks_on: Vec::new(),
            group_by_id: false,
        };
        let pki = if spec.tls { Some(self.pki()?) } else { None };
        if let Some(pki) = &pki {
            server.tls_ca = Some(pki.ca.clone());
        }
        match spec.kind {
            Kind::Tailgate => {
                let init = match spec.mux {
                    Some(_) => tlsmux::mux_sql(),
                    None => ticks_sql(),
                };
                std::fs::write(dir.join("ticks.sql"), init)?;
                let mut toml = format!(
                    "[server]\nlisten = \"127.0.0.1:{port}\"\nheartbeat = \"15s\"\nmax_connections = 19500\n"
                );
                if let Some(pki) = &pki {
                    writeln!(
                        toml,
                        "tls = {{ cert_file = \"{}\", key_file = \"{}\" }}",
                        pki.cert.display(),
                        pki.key.display()
                    )?;
                }
                write!(
                    toml,
                    "\n[upstream]\nurl = \"embedded\"\n\n[embedded]\ninit = \"{}\"\n",
                    dir.join("ticks.sql").display()
                )?;
                if let Some(tick) = &spec.tick {
                    writeln!(toml, "tick = \"{tick}\"")?;
                }
                toml.push('\n');
                if spec.rate > 0.0 {
                    let every_us = (1e6 / spec.rate).round() as u64;
                    write!(
                        toml,
                        "[[embedded.schedule]]\nevery = \"{every_us}us\"\nsql = \"UPDATE ticks SET seq = seq + 1, sent_ms = mz_epoch_ms()\"\n\n"
                    )?;
                }
                if let Some(q) = spec.client_queue {
                    write!(toml, "[defaults]\nclient_queue = {q}\n\n")?;
                }
                if spec.auth_secret.is_some() {
                    toml.push_str(auth::AUTH_TOML);
                }
                server.paths.clear();
                // The mux scenario's three streams, or `streams` streams on the ticks.
                let streams = if let Some(mux) = spec.mux {
                    toml.push_str(tlsmux::MUX_STREAMS);
                    mux.client_paths(&mut server);
                    0
                } else {
                    spec.streams
                };
                for i in 0..streams {
                    let path = if spec.streams == 1 {
                        "/ticks".to_string()
                    } else {
                        format!("/ticks/{i}")
                    };
                    write!(
                        toml,
                        "[[streams]]\npath = \"{path}\"\nquery = \"SELECT seq, sent_ms, pad, {i} AS stream FROM ticks\"\nevent = \"tick\"\n\n"
                    )?;
                    server.paths.push(path);
                }
                let cfg = dir.join("tailgate.toml");
                std::fs::write(&cfg, toml)?;
                let log = std::fs::File::create(dir.join("tailgate.log"))?;
                let mut cmd = self.pinned("0", &self.args.tailgate.clone());
                cmd.arg("--config")
                    .arg(&cfg)
                    .env("RUST_LOG", "info")
                    .env("NO_COLOR", "1")
                    .env_remove(auth::SECRET_ENV)
                    .stdout(Stdio::null())
                    .stderr(log);
                if let Some(secret) = &spec.auth_secret {
                    cmd.env(auth::SECRET_ENV, secret);
                }
                let child = cmd
                    .spawn()
                    .with_context(|| format!("starting {}", self.args.tailgate.display()))?;
                server.pids.push(child.id());
                server.children.push(child);
                wait_port(port, Duration::from_secs(20), &mut server.children[0])?;
                // The embedded engine's address, for counting its subscriptions.
                let end = Instant::now() + Duration::from_secs(10);
                while server.engine.is_none() && Instant::now() < end {
                    let text =
                        std::fs::read_to_string(dir.join("tailgate.log")).unwrap_or_default();
                    server.engine = text
                        .lines()
                        .find(|l| l.contains("Embedded development engine started"))
                        .and_then(|l| l.split("addr=").nth(1))
                        .and_then(|a| a.split_whitespace().next())
                        .and_then(|a| a.parse::<SocketAddr>().ok())
                        .map(|a| {
                            format!(
                                "host={} port={} user=materialize dbname=materialize",
                                a.ip(),
                                a.port()
                            )
                        });
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            Kind::K0 | Kind::NaiveAxum => {
                let stats = dir.join("k0.json");
                let prog = self.bin.join(if spec.kind == Kind::K0 {
                    "k0"
                } else {
                    "naive-axum"
                });
                let mut cmd = self.pinned("0", &prog);
                cmd.arg("--listen")
                    .arg(format!("127.0.0.1:{port}"))
                    .arg("--rate")
                    .arg(spec.rate.to_string())
                    .arg("--duration")
                    .arg("600")
                    .stdout(Stdio::null());
                if spec.kind == Kind::K0 {
                    cmd.arg("--stats").arg(&stats);
                    server.stats = Some(stats);
                }
                let child = cmd
                    .spawn()
                    .with_context(|| format!("starting {}", prog.display()))?;
                server.pids.push(child.id());
                server.children.push(child);
                wait_port(port, Duration::from_secs(10), &mut server.children[0])?;
            }
            Kind::Nchan => {
                self.available(Kind::Nchan).map_err(anyhow::Error::msg)?;
                let conf = format!(
                    "load_module /usr/lib/nginx/modules/ngx_nchan_module.so;\n\
                     daemon off;\nmaster_process on;\nuser root;\nworker_processes 1;\n\
                     worker_rlimit_nofile 19990;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log warn;\n\
                     events {{ worker_connections 19990; }}\n\
                     http {{\n  access_log off;\n  nchan_shared_memory_size 64M;\n\
                     \x20 client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n\
                     \x20 fastcgi_temp_path {dir}/fcgi;\n  uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n\
                     \x20 server {{\n    listen 127.0.0.1:{port}{ssl} backlog=4096;\n{certs}\
                     \x20   location = /ticks {{ nchan_subscriber eventsource; nchan_channel_id s;\n\
                     \x20                       nchan_subscriber_first_message newest; }}\n\
                     \x20   location = /pub {{ nchan_publisher; nchan_channel_id s;\n\
                     \x20                     nchan_message_buffer_length 16; nchan_message_timeout 10s; }}\n  }}\n}}\n",
                    dir = dir.display(),
                    ssl = if pki.is_some() { " ssl" } else { "" },
                    certs = pki
                        .as_ref()
                        .map(|p| format!(
                            "    ssl_certificate {};\n    ssl_certificate_key {};\n",
                            p.cert.display(),
                            p.key.display()
                        ))
                        .unwrap_or_default(),
                );
                let cfg = dir.join("nginx.conf");
                std::fs::write(&cfg, conf)?;
                self.start_nginx(&mut server, &dir, &cfg, port)?;
                if spec.rate > 0.0 {
                    server.publish_url = Some(format!("http://127.0.0.1:{port}/pub"));
                }
            }
            Kind::NaiveScoped => bail!("naive-scoped runs only in the scoped scenario"),
            Kind::Tutorial => {
                self.available(Kind::Tutorial).map_err(anyhow::Error::msg)?;
                std::fs::write(dir.join("ticks.sql"), ticks_sql())?;
                let eport = self.port();
                let engine = self
                    .pinned("0", &self.args.tailgate.clone())
                    .args(["engine", "--legacy", "--listen"])
                    .arg(format!("127.0.0.1:{eport}"))
                    .arg("--init")
                    .arg(dir.join("ticks.sql"))
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(dir.join("engine.log"))?)
                    .spawn()
                    .context("starting the legacy engine")?;
                server.pids.push(engine.id());
                server.children.push(engine);
                wait_port(eport, Duration::from_secs(10), &mut server.children[0])?;
                let conninfo =
                    format!("host=127.0.0.1 port={eport} user=materialize dbname=materialize");
                let venv = self.args.bench_dir.join("tutorial/.venv/bin/uvicorn");
                let app = self
                    .pinned("0", &venv)
                    .args(["app:app", "--app-dir"])
                    .arg(self.args.bench_dir.join("tutorial"))
                    .args(["--host", "127.0.0.1", "--port"])
                    .arg(port.to_string())
                    .args([
                        "--loop",
                        "uvloop",
                        "--http",
                        "httptools",
                        "--backlog",
                        "4096",
                        "--log-level",
                        "warning",
                        "--no-access-log",
                    ])
                    .env("TUTORIAL_DSN", &conninfo)
                    .env("STREAM_DELAY", "1")
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(dir.join("uvicorn.log"))?)
                    .spawn()
                    .context("starting uvicorn")?;
                server.pids.push(app.id());
                server.children.push(app);
                wait_port(port, Duration::from_secs(20), &mut server.children[1])?;
                server.engine = Some(conninfo.clone());
                if spec.rate > 0.0 {
                    server.feed_pg = Some(conninfo);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        server.rss_idle_kb = server
            .pids
            .iter()
            .map(|p| sys::sample(Some(*p)).map(|s| s.rss_kb).unwrap_or(0))
            .sum();
        Ok(server)
    }

    fn stop(&mut self, mut server: Server) -> Option<Value> {
        for c in server.children.iter_mut().rev() {
            stop_child(c);
        }
        server
            .stats
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| serde_json::from_str(&t).ok())
    }

    fn loadgen(
        &mut self,
        server: &Server,
        load: &Load,
        rate: f64,
    ) -> anyhow::Result<(Child, PathBuf, f64)> {
        self.net = if self.net >= 250 { 10 } else { self.net + 1 };
        let out = self
            .tmp
            .join(format!("load-{}-{}.json", server.port, self.net));
        let mut cmd = self.pinned("1", &self.bin.join("loadgen"));
        cmd.arg("--addr")
            .arg(format!("127.0.0.1:{}", server.port))
            .arg("--clients")
            .arg(load.clients.to_string())
            .arg("--connect-rate")
            .arg(load.connect_rate.to_string())
            .arg("--src-net")
            .arg(self.net.to_string())
            .arg("--warmup")
            .arg(load.warmup.to_string())
            .arg("--duration")
            .arg(load.duration.to_string())
            .arg("--drain")
            .arg(load.drain.to_string())
            .arg("--connect-timeout")
            .arg(load.connect_timeout.to_string())
            .arg("--out")
            .arg(&out)
            .stdout(Stdio::null());
        for p in &server.paths {
            cmd.arg("--path").arg(p);
        }
        for p in &server.pids {
            cmd.arg("--server-pid").arg(p.to_string());
        }
        for n in &load.rss_at {
            cmd.arg("--rss-at").arg(n.to_string());
        }
        if let Some(f) = &load.header_file {
            cmd.arg("--header-file").arg(f);
        }
        if let Some(ca) = &server.tls_ca {
            cmd.arg("--tls-ca").arg(ca);
        }
        for p in &server.ticks_on {
            cmd.arg("--ticks-on").arg(p);
        }
        if server.group_by_id {
            cmd.arg("--group-by-id");
        }
        cmd.args(&load.args);
        if let Some(u) = &server.publish_url {
            cmd.arg("--publish-url")
                .arg(u)
                .arg("--feed-rate")
                .arg(rate.to_string());
        }
        if let Some(c) = &server.feed_pg {
            cmd.arg("--feed-pg")
                .arg(c)
                .arg("--feed-rate")
                .arg(rate.to_string());
        }
        // loadgen's own deadline (two 2 s settles included) plus a margin.
        let bound = load.bound();
        let child = cmd.spawn().context("starting loadgen")?;
        Ok((child, out, bound))
    }

    fn finish_load(&mut self, mut child: Child, out: PathBuf, bound: f64) -> anyhow::Result<Value> {
        let end = Instant::now() + Duration::from_secs_f64(bound);
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    bail!("loadgen failed: {status}");
                }
                break;
            }
            if Instant::now() > end {
                let _ = child.kill();
                let _ = child.wait();
                bail!("loadgen did not finish within {bound:.0} s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let text =
            std::fs::read_to_string(&out).with_context(|| format!("reading {}", out.display()))?;
        Ok(serde_json::from_str(&text)?)
    }

    /// `measure`, with a failure recorded in `skipped` as `what: error` instead of
    /// ending the scenario.
    fn measure_or_skip(
        &mut self,
        what: &str,
        scenario: &str,
        spec: &Spec,
        load: &Load,
    ) -> Option<Run> {
        self.measure(scenario, spec, load).unwrap_or_else(|e| {
            eprintln!("    {what}: {e:#}");
            self.skipped.push(format!("{what}: {e:#}"));
            None
        })
    }

    /// Starts the contender, runs one load against it, stops it; records the run.
    fn measure(&mut self, scenario: &str, spec: &Spec, load: &Load) -> anyhow::Result<Option<Run>> {
        if let Err(why) = self.available(spec.kind) {
            let msg = format!("{scenario}/{}: skipped ({why})", spec.kind.name());
            eprintln!("{msg}");
            if !self.skipped.contains(&msg) {
                self.skipped.push(msg);
            }
            return Ok(None);
        }
        eprintln!(
            "  {scenario}: {} N={} rate={} streams={}",
            spec.kind.name(),
            load.clients,
            spec.rate,
            spec.streams
        );
        let server = self.start(spec)?;
        let mut extra = BTreeMap::new();
        extra.insert("rss_idle_kb".into(), json!(server.rss_idle_kb));
        if scenario == "auth" {
            extra.insert(
                "auth".into(),
                json!(if spec.auth_secret.is_some() {
                    "jwt"
                } else {
                    "none"
                }),
            );
            if load.header_file.is_some() {
                extra.insert("tokens".into(), json!("one per client"));
            }
            // Before the storm: is a request without a token refused?
            extra.extend(auth::probe_statuses(
                server.port,
                load.header_file.as_deref(),
            ));
        }
        let result = (|| {
            let (child, out, bound) = self.loadgen(&server, load, spec.rate)?;
            if scenario == "economy" {
                // Count the engine's subscriptions in the middle of the window.
                std::thread::sleep(Duration::from_secs_f64(
                    load.ramp() + load.warmup + load.duration / 2.0 + 1.0,
                ));
                let subs = server.engine.as_deref().map(count_subscriptions);
                extra.insert(
                    "subscriptions".into(),
                    match subs {
                        Some(Ok(n)) => json!(n),
                        Some(Err(e)) => json!(format!("error: {e}")),
                        None => json!(null),
                    },
                );
            }
            self.finish_load(child, out, bound)
        })();
        let k0 = self.stop(server);
        let report = result?;
        let run = Run {
            scenario: scenario.into(),
            contender: spec.kind,
            clients: load.clients,
            rate: spec.rate,
            streams: spec.streams,
            report,
            k0,
            extra,
        };
        eprintln!(
            "    connected {} failed {} delivered {:.4} ({:.0}/s) p50 {:.1} ms p99 {:.1} ms first-event max {:.0} ms server CPU {:.2}",
            run.f("connected"),
            run.f("failed"),
            run.f("delivered_ratio"),
            run.f("delivered_per_s"),
            run.f("latency.p50_ms"),
            run.f("latency.p99_ms"),
            run.f("first_event_since_start.max_ms"),
            run.f("server_cpu"),
        );
        self.runs.push(run.clone());
        Ok(Some(run))
    }

    /// Records a goal: `value / anchor` of `values` against `limit`, or, when a run it
    /// needs is missing (`None`), that it could not be measured.
    fn goal(
        &mut self,
        scenario: &str,
        goal: &str,
        values: Option<(f64, f64)>,
        limit: Limit,
        unit: &str,
        note: &str,
    ) {
        let Some((value, anchor)) = values else {
            return self.missing(scenario, goal, "run missing");
        };
        let (ratio, pass) = limit.judge(value, anchor);
        self.goals.push(Goal {
            scenario: scenario.into(),
            goal: goal.into(),
            value,
            anchor,
            ratio,
            limit: limit.to_string(),
            pass,
            unit: unit.into(),
            note: note.into(),
        });
    }

    fn missing(&mut self, scenario: &str, goal: &str, why: &str) {
        self.goals.push(Goal {
            scenario: scenario.into(),
            goal: goal.into(),
            value: f64::NAN,
            anchor: f64::NAN,
            ratio: f64::NAN,
            limit: String::new(),
            pass: None,
            unit: String::new(),
            note: why.into(),
        });
    }

    // --- scenarios -------------------------------------------------------------------

    fn smoke(&mut self) -> anyhow::Result<()> {
        let load = Load {
            // Two runs of ~6 s each keep `bench/run --smoke` under 15 s.
            clients: 500,
            connect_rate: 2000.0,
            warmup: 0.5,
            duration: 4.0,
            drain: 0.5,
            rss_at: Vec::new(),
            connect_timeout: 10.0,
            header_file: None,
            args: Vec::new(),
        };
        let tg = self.measure("smoke", &Spec::new(Kind::Tailgate, 10.0), &load)?;
        let k0 = self.measure("smoke", &Spec::new(Kind::K0, 10.0), &load)?;
        if let (Some(tg), Some(k0)) = (tg, k0) {
            self.goal(
                "smoke",
                "delivered (tailgate / expected)",
                Some((tg.f("delivered"), tg.f("expected"))),
                Limit::AtLeast(1.0),
                "ticks",
                "",
            );
            self.goal(
                "smoke",
                "p99 latency vs k0 sweep(500)",
                Some((tg.f("latency.p99_ms"), k0.k0_f("sweep.p50_ms"))),
                Limit::AtMost(1.3),
                "ms",
                "informational in CI",
            );
        }
        Ok(())
    }

    fn fanout(&mut self) -> anyhow::Result<()> {
        let n = self.args.fanout_clients;
        let load = Load::steady(n, 6.0);
        let rates = self.args.rates.clone();
        let reps = self.args.reps.max(1);
        let mut by: BTreeMap<(Kind, u64), Reps> = BTreeMap::new();
        // A contender that missed the knee criterion at a rate above the rates
        // (10, 20, 50) is not tried higher; naive-axum is context only (no goal uses it).
        let mut stopped: BTreeMap<Kind, f64> = BTreeMap::new();
        for &rate in &rates {
            let kinds: Vec<Kind> = [Kind::Tailgate, Kind::K0, Kind::NaiveAxum, Kind::Nchan]
                .into_iter()
                .filter(|k| rate <= 50.0 || (*k != Kind::NaiveAxum && !stopped.contains_key(k)))
                .collect();
            for _ in 0..reps {
                for &kind in &kinds {
                    let what = format!("fanout/{} {rate}/s", kind.name());
                    if let Some(run) =
                        self.measure_or_skip(&what, "fanout", &Spec::new(kind, rate), &load)
                    {
                        by.entry((kind, rate as u64)).or_default().0.push(run);
                    }
                }
            }
            for &kind in &kinds {
                if rate >= 50.0 && by.get(&(kind, rate as u64)).is_some_and(|r| !r.passes()) {
                    stopped.entry(kind).or_insert(rate);
                }
            }
        }
        for &rate in rates.iter().filter(|r| **r <= 20.0) {
            let tg = by.get(&(Kind::Tailgate, rate as u64));
            self.goal(
                "fanout",
                &format!(
                    "delivered at {rate}/s, N={n} (delivered / expected, {} runs)",
                    tg.map_or(0, |r| r.0.len())
                ),
                tg.map(|r| (r.sum("delivered"), r.sum("expected"))),
                Limit::AtLeast(1.0),
                "ticks",
                &format!("gaps {}", tg.map_or(f64::NAN, |r| r.sum("gaps"))),
            );
        }
        let tg = by.get(&(Kind::Tailgate, rates[0] as u64));
        let sweep = by.get(&(Kind::K0, rates[0] as u64)).map(|r| {
            median(
                r.0.iter()
                    .map(|run| run.k0_f("sweep.p50_ms"))
                    .filter(|v| !v.is_nan())
                    .collect(),
            )
        });
        self.goal(
            "fanout",
            &format!("p99 at {}/s vs k0 sweep time (N={n})", rates[0]),
            tg.zip(sweep.filter(|s| s.is_finite()))
                .map(|(tg, sweep)| (tg.p99(), sweep)),
            Limit::AtMost(1.3),
            "ms",
            &tg.map(|tg| {
                format!(
                    "sweep = k0's median time to write one event to every client; medians of {} interleaved runs, tailgate p99 {}",
                    tg.0.len(),
                    tg.spread()
                )
            })
            .unwrap_or_default(),
        );
        let tried = |kind: Kind| -> Vec<String> {
            rates
                .iter()
                .filter_map(|&rate| by.get(&(kind, rate as u64)).map(|r| (rate, r)))
                .map(|(rate, r)| {
                    format!(
                        "{rate}/s p99 {} ms ({}) {:.2}%{}",
                        fmt_num(r.p99()),
                        r.spread(),
                        100.0 * r.delivered_ratio(),
                        if r.passes() { "" } else { " ✗" }
                    )
                })
                .collect()
        };
        let knee = |kind: Kind| -> Option<f64> {
            let mut best = 0.0;
            let mut any = false;
            for &rate in &rates {
                if let Some(r) = by.get(&(kind, rate as u64)) {
                    any = true;
                    if r.passes() && rate > best {
                        best = rate;
                    }
                }
            }
            any.then_some(best)
        };
        let tg = knee(Kind::Tailgate);
        for (anchor, limit) in [(Kind::K0, 0.8), (Kind::Nchan, 1.5)] {
            let note = format!(
                "tailgate: {}; {}: {}",
                tried(Kind::Tailgate).join(", "),
                anchor.name(),
                tried(anchor).join(", ")
            );
            self.goal(
                "fanout",
                &format!(
                    "knee vs {} (highest rate with p99 <= 100 ms, >= 99.9% delivered)",
                    anchor.name()
                ),
                tg.zip(knee(anchor)),
                Limit::AtLeast(limit),
                "ev/s",
                &note,
            );
        }
        Ok(())
    }

    fn light(&mut self) -> anyhow::Result<()> {
        let load = Load {
            drain: 3.0,
            ..Load::steady(1000, 10.0)
        };
        let mut by: BTreeMap<Kind, Reps> = BTreeMap::new();
        for rep in 0..self.args.reps.max(1) {
            for kind in [Kind::Tailgate, Kind::NaiveAxum, Kind::Nchan, Kind::Tutorial] {
                // The tutorial's p99 is its 1 s polling period: once is enough.
                if rep > 0 && kind == Kind::Tutorial {
                    continue;
                }
                let what = format!("light/{}", kind.name());
                if let Some(r) = self.measure_or_skip(&what, "light", &Spec::new(kind, 10.0), &load)
                {
                    by.entry(kind).or_default().0.push(r);
                }
            }
        }
        let p99: BTreeMap<Kind, f64> = by.iter().map(|(k, r)| (*k, r.p99())).collect();
        let spreads: Vec<String> = by
            .iter()
            .map(|(k, r)| format!("{} {}", k.name(), r.spread()))
            .collect();
        for (kind, limit) in [
            (Kind::NaiveAxum, 0.5),
            (Kind::Nchan, 0.33),
            (Kind::Tutorial, 0.2),
        ] {
            self.goal(
                "light",
                &format!("p99 vs {} (N=1000, 10/s)", kind.name()),
                p99.get(&Kind::Tailgate)
                    .copied()
                    .zip(p99.get(&kind).copied()),
                Limit::AtMost(limit),
                "ms",
                &format!(
                    "medians of interleaved runs; p99 per run: {}",
                    spreads.join("; ")
                ),
            );
        }
        Ok(())
    }

    fn idle(&mut self) -> anyhow::Result<()> {
        let n = self.args.idle_clients;
        let load = Load {
            clients: n,
            connect_rate: 2000.0,
            warmup: 1.0,
            duration: 10.0,
            drain: 0.5,
            rss_at: idle_checkpoints(n),
            connect_timeout: 30.0,
            header_file: None,
            args: Vec::new(),
        };
        let half = idle_checkpoints(n)[2];
        let mut slope = BTreeMap::new();
        let mut tg_run = None;
        for kind in [Kind::Tailgate, Kind::NaiveAxum, Kind::Nchan] {
            let what = format!("idle/{}", kind.name());
            let Some(r) = self.measure_or_skip(&what, "idle", &Spec::new(kind, 0.0), &load) else {
                continue;
            };
            // (connected clients, server RSS kB) at each checkpoint: the slope is taken
            // from the one at half the clients to the last, with all of them connected.
            if let Some(s) = rss_slope(&r.report["rss_points"], half) {
                slope.insert(kind, s);
                if let Some(last) = self.runs.last_mut() {
                    last.extra.insert("rss_slope_kb_per_conn".into(), json!(s));
                }
            }
            if kind == Kind::Tailgate {
                tg_run = Some(r);
            }
        }
        match &tg_run {
            Some(r) => {
                self.goal(
                    "idle",
                    &format!("clients connected and held ({})", thousands(n)),
                    Some((r.f("connected") - r.f("disconnects"), r.f("clients"))),
                    Limit::AtLeast(1.0),
                    "clients",
                    "",
                );
                self.goal(
                    "idle",
                    "idle CPU (share of one core)",
                    Some((r.f("server_cpu"), 1.0)),
                    Limit::Below(0.01),
                    "cores",
                    "10 s window, no writes, 15 s heartbeat",
                );
            }
            None => self.missing("idle", "connected", "tailgate run missing"),
        }
        for (kind, limit) in [(Kind::NaiveAxum, 0.75), (Kind::Nchan, 0.35)] {
            self.goal(
                "idle",
                &format!(
                    "RSS per connection vs {} (slope {} -> {})",
                    kind.name(),
                    thousands(half),
                    thousands(n)
                ),
                slope
                    .get(&Kind::Tailgate)
                    .copied()
                    .zip(slope.get(&kind).copied()),
                Limit::AtMost(limit),
                "KB/conn",
                "",
            );
        }
        Ok(())
    }

    /// All clients connect at once, then a short window (storm and auth).
    fn storm_load(&self) -> Load {
        Load {
            clients: self.args.storm_clients,
            connect_rate: 0.0,
            warmup: 0.5,
            duration: 3.0,
            drain: 0.5,
            rss_at: Vec::new(),
            connect_timeout: 40.0,
            header_file: None,
            args: Vec::new(),
        }
    }

    fn storm(&mut self) -> anyhow::Result<()> {
        let load = self.storm_load();
        let n = load.clients;
        let mut all = BTreeMap::new();
        for kind in [Kind::Tailgate, Kind::Nchan, Kind::NaiveAxum] {
            let what = format!("storm/{}", kind.name());
            if let Some(r) = self.measure_or_skip(&what, "storm", &Spec::new(kind, 10.0), &load) {
                all.insert(kind, r);
            }
        }
        let Some(tg) = all.get(&Kind::Tailgate) else {
            self.missing("storm", "storm", "tailgate run missing");
            return Ok(());
        };
        self.goal(
            "storm",
            "failed connects or clients without a first event",
            Some((tg.f("failed") + tg.f("clients_without_event"), 0.0)),
            Limit::Zero,
            "clients",
            "pass = 0",
        );
        match all.get(&Kind::Nchan) {
            Some(nc) => self.goal(
                "storm",
                &format!(
                    "time until all {} hold their first event vs nchan",
                    thousands(n)
                ),
                Some((
                    tg.f("first_event_since_start.max_ms"),
                    nc.f("first_event_since_start.max_ms"),
                )),
                Limit::AtMost(1.5),
                "ms",
                &format!(
                    "p99 {:.0} vs {:.0} ms",
                    tg.f("first_event_since_start.p99_ms"),
                    nc.f("first_event_since_start.p99_ms")
                ),
            ),
            None => self.missing("storm", "time to first event vs nchan", "nchan run missing"),
        }
        Ok(())
    }

    fn overload(&mut self) -> anyhow::Result<()> {
        let n = 10_000;
        let rate = 100.0;
        let queue = 64;
        let load = Load::steady(n, 10.0);
        let tg = self.measure(
            "overload",
            &Spec {
                client_queue: Some(queue),
                ..Spec::new(Kind::Tailgate, rate)
            },
            &load,
        )?;
        let k0 = self.measure("overload", &Spec::new(Kind::K0, rate), &load)?;
        let (Some(tg), Some(k0)) = (tg, k0) else {
            self.missing("overload", "overload", "run missing");
            return Ok(());
        };
        self.goal(
            "overload",
            &format!("delivered/s vs k0 batched (N={n}, {rate}/s offered)"),
            Some((tg.f("delivered_per_s"), k0.f("delivered_per_s"))),
            Limit::AtLeast(0.5),
            "ev/s",
            &format!("k0 ticks per write {:.1}", k0.k0_f("ticks_per_sweep_mean")),
        );
        // An event of this stream is ~330 bytes; a copy-per-client queue of client_queue
        // events per client is the memory the configuration allows.
        let rss_end = tg.f("server_end.0.rss_kb");
        let idle = tg
            .extra
            .get("rss_idle_kb")
            .and_then(|v| v.as_f64())
            .unwrap_or(f64::NAN);
        let bound_kb = (n * queue * 330) as f64 / 1024.0;
        self.goal(
            "overload",
            &format!("RSS growth vs configured bound (client_queue {queue} x 330 B x N)"),
            Some((rss_end - idle, bound_kb)),
            Limit::AtMost(1.0),
            "KB",
            "growth from the idle process to the end of the window",
        );
        self.goal(
            "overload",
            "silent clients (nothing for 5 s of the window)",
            Some((tg.f("silent_clients") + tg.f("clients_without_event"), 0.0)),
            Limit::Zero,
            "clients",
            &format!(
                "lagged snapshots {}, gaps {}, disconnects {}",
                tg.f("lagged_snapshots"),
                tg.f("gaps"),
                tg.f("disconnects_in_window")
            ),
        );
        // Lagging clients must be told: gaps imply lagged snapshots.
        let told = tg.f("gaps") == 0.0 || tg.f("lagged_snapshots") > 0.0;
        self.goal(
            "overload",
            "gaps are announced by snapshot(lagged)",
            Some((if told { 1.0 } else { 0.0 }, 1.0)),
            Limit::AtLeast(1.0),
            "",
            "",
        );
        Ok(())
    }

    fn economy(&mut self) -> anyhow::Result<()> {
        let load = Load::steady(2000, 4.0);
        let subscriptions = |r: &Run| {
            r.extra
                .get("subscriptions")
                .and_then(|v| v.as_f64())
                .unwrap_or(f64::NAN)
        };
        for streams in [1usize, 10, 50] {
            let spec = Spec {
                streams,
                ..Spec::new(Kind::Tailgate, 10.0)
            };
            let what = format!("economy/{streams}");
            if let Some(r) = self.measure_or_skip(&what, "economy", &spec, &load) {
                self.goal(
                    "economy",
                    &format!("upstream subscriptions / streams ({streams} streams, 2,000 clients)"),
                    Some((subscriptions(&r), streams as f64)),
                    Limit::Exactly(1.0),
                    "sessions",
                    "counted on the engine: mz_internal.mz_subscriptions",
                );
            }
        }
        let tl = Load::steady(100, 4.0);
        let tutorial = Spec::new(Kind::Tutorial, 10.0);
        if let Some(r) = self.measure_or_skip("economy/tutorial", "economy", &tutorial, &tl) {
            self.goal(
                "economy",
                "tutorial: upstream subscriptions / clients (100 clients, 1 stream)",
                Some((subscriptions(&r), 100.0)),
                Limit::AtLeast(0.0),
                "sessions",
                "reference: one per client",
            );
        }
        Ok(())
    }

    /// The tutorial's saturation point: more clients at 10 ticks/s until its delivered
    /// ticks/s stop growing (< 5% more than the best so far), its p99 passes 5 s, or
    /// connects fail; the saturation point is the N with its highest delivered ticks/s.
    /// tailgate then runs at that N with 10x the tick rate (100/s; 50/s if 100/s does
    /// not deliver >= 99.9%), since both at the same N and rate deliver N x rate.
    fn tutorial(&mut self) -> anyhow::Result<()> {
        let mut best: Option<Run> = None;
        let ns = self.args.tutorial_clients.clone();
        for n in ns {
            let load = Load {
                warmup: 3.0,
                drain: 3.0,
                connect_rate: 1000.0,
                connect_timeout: 30.0,
                ..Load::steady(n, 10.0)
            };
            let spec = Spec::new(Kind::Tutorial, 10.0);
            let Some(r) = self.measure_or_skip(&format!("tutorial/{n}"), "tutorial", &spec, &load)
            else {
                break;
            };
            let prev = best.as_ref().map(|b| b.f("delivered_per_s")).unwrap_or(0.0);
            let grew = r.f("delivered_per_s") >= 1.05 * prev;
            let failing = r.f("failed") > 0.01 * n as f64 || r.f("latency.p99_ms") > 5000.0;
            if r.f("delivered_per_s") > prev {
                best = Some(r);
            }
            if !grew || failing {
                break;
            }
        }
        let Some(tut) = best else {
            self.missing("tutorial", "tutorial comparison", "tutorial runs missing");
            return Ok(());
        };
        let n = tut.clients;
        let load = Load::steady(n, 10.0);
        let mut tg = None;
        for rate in [100.0, 50.0] {
            if let Some(r) = self.measure("tutorial", &Spec::new(Kind::Tailgate, rate), &load)? {
                let ok = r.f("delivered_ratio") >= 0.999;
                tg = Some(r);
                if ok {
                    break;
                }
            }
        }
        let Some(tg) = tg else {
            return Ok(());
        };
        let rate = tg.rate;
        self.goal(
            "tutorial",
            &format!(
                "ticks delivered/s vs the tutorial at its saturation point (N={n}; tutorial 10/s, tailgate {rate}/s)"
            ),
            Some((tg.f("delivered_per_s"), tut.f("delivered_per_s"))),
            Limit::AtLeast(10.0),
            "ev/s",
            "saturation = the N (of those tried) with the tutorial's highest delivered ticks/s",
        );
        self.goal(
            "tutorial",
            &format!("SSE events/s vs the tutorial (N={n}; tailgate {rate}/s)"),
            Some((tg.f("events_per_s"), tut.f("events_per_s"))),
            Limit::AtLeast(10.0),
            "ev/s",
            "the tutorial sends one event per client per FETCH (STREAM_DELAY = 1 s) carrying the ticks since the last one; tailgate one per tick",
        );
        self.goal(
            "tutorial",
            &format!("p99 vs the tutorial (N={n}; tailgate {rate}/s)"),
            Some((tg.f("latency.p99_ms"), tut.f("latency.p99_ms"))),
            Limit::Below(1.0),
            "ms",
            "",
        );
        Ok(())
    }
}

/// Where the idle runs also read the server's RSS: 2,500, 5,000, 9,500 and 14,000
/// of 19,000 clients, scaled to `n` (the slope goal starts at the third, half of `n`).
fn idle_checkpoints(n: usize) -> Vec<usize> {
    [2_500, 5_000, 9_500, 14_000]
        .iter()
        .map(|c| (c * n / 19_000).max(1))
        .collect()
}

/// RSS per connection (kB) from loadgen's `rss_points` ([connected, rss_kb] pairs):
/// from the point whose client count is nearest `from` to the last point.
fn rss_slope(points: &Value, from: usize) -> Option<f64> {
    let pts: Vec<(f64, f64)> = points
        .as_array()?
        .iter()
        .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?)))
        .collect();
    let &(c2, m2) = pts.last()?;
    let &(c1, m1) = pts[..pts.len() - 1].iter().min_by(|a, b| {
        (a.0 - from as f64)
            .abs()
            .total_cmp(&(b.0 - from as f64).abs())
    })?;
    (c2 > c1).then(|| (m2 - m1) / (c2 - c1))
}

/// 19000 as "19,000".
fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn which(prog: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(prog))
            .chain(
                ["/usr/sbin", "/sbin"]
                    .iter()
                    .map(|d| Path::new(d).join(prog)),
            )
            .find(|p| p.exists())
    })
}

fn fmt_num(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn markdown(
    machine: &Value,
    goals: &[Goal],
    runs: &[Run],
    tables: &[Table],
    charts: &[String],
    skipped: &[String],
) -> String {
    let mut md = String::new();
    let m = |k: &str| machine[k].to_string().trim_matches('"').to_string();
    let _ = writeln!(md, "# tailgate benchmark results\n");
    let _ = writeln!(
        md,
        "Run {} of tailgate {} on {} ({} CPUs, kernel {}); load average before {}, after {}; pinning: {}; fd limit {}; {} s.\n",
        m("date"),
        m("tailgate_commit"),
        m("cpu"),
        m("nproc"),
        m("kernel"),
        m("load_average_before"),
        m("load_average_after"),
        m("pinning"),
        m("fd_limit"),
        m("duration_s")
    );
    if let Some(per) = machine["load_average_per_scenario"].as_object() {
        let list: Vec<String> = per
            .iter()
            .map(|(k, v)| {
                format!(
                    "{k} {} → {}",
                    v[0].as_str().unwrap_or(""),
                    v[1].as_str().unwrap_or("")
                )
            })
            .collect();
        if !list.is_empty() {
            let _ = writeln!(
                md,
                "Load average (1/5/15 min) before → after each scenario: {}.\n",
                list.join("; ")
            );
        }
    }
    let _ = writeln!(md, "## Goals (value / same-run anchor)\n");
    let _ = writeln!(
        md,
        "| scenario | goal | value | anchor | ratio | limit | result | note |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    for g in goals {
        let result = match g.pass {
            Some(true) => "pass",
            Some(false) => "**FAIL**",
            None if g.limit == Limit::Report.to_string() && !g.value.is_nan() => "reported",
            None => "n/a",
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} {} | {} | {} | {} | {} | {} |",
            g.scenario,
            g.goal,
            fmt_num(g.value),
            g.unit,
            fmt_num(g.anchor),
            fmt_num(g.ratio),
            g.limit,
            result,
            g.note
        );
    }
    if !charts.is_empty() {
        let _ = writeln!(md, "\n## Charts\n");
        for c in charts {
            let _ = writeln!(md, "![{c}]({c})\n");
        }
    }
    for t in tables {
        let _ = writeln!(md, "\n## {}: {}\n", t.scenario, t.title);
        let _ = writeln!(md, "| {} |", t.columns.join(" | "));
        let _ = writeln!(md, "|{}", "---|".repeat(t.columns.len()));
        for row in &t.rows {
            let cells: Vec<String> = row
                .iter()
                .map(|v| match v {
                    Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
                    Value::Number(_) => fmt_num(v.as_f64().unwrap_or(f64::NAN)),
                    Value::String(s) => s.clone(),
                    Value::Null => "-".into(),
                    other => other.to_string(),
                })
                .collect();
            let _ = writeln!(md, "| {} |", cells.join(" | "));
        }
        for n in &t.notes {
            let _ = writeln!(md, "\n{n}");
        }
    }
    // Scenarios without load runs (views) have only their own tables.
    if !runs.is_empty() {
        runs_table(&mut md, runs);
    }
    if !skipped.is_empty() {
        let _ = writeln!(md, "\n## Skipped\n");
        for s in skipped {
            let _ = writeln!(md, "- {s}");
        }
    }
    if !runs.is_empty() {
        let _ = writeln!(
            md,
            "\nLatency = receive time − the tick's `sent_ms` (ms clock, same host), over ticks sent inside the window. \
             Delivered = ticks sent inside the window that reached each connected client, / (ticks produced × clients). \
             Server CPU and RSS: /proc of the server process(es) over the window (nchan: its worker; tutorial: uvicorn + engine)."
        );
    }
    md
}

/// The runs table: each loadgen run's absolute figures.
fn runs_table(md: &mut String, runs: &[Run]) {
    let _ = writeln!(md, "\n## Runs (absolute figures)\n");
    let _ = writeln!(
        md,
        "| scenario | contender | N | rate/s | streams | connected | failed | delivered | delivered/s | p50 ms | p99 ms | max ms | lagged | first event p99 / max ms | server CPU | loadgen CPU | RSS idle→end MB | extra |"
    );
    let _ = writeln!(
        md,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for r in runs {
        let rss_end: f64 = r.report["server_end"]
            .as_array()
            .map(|a| a.iter().filter_map(|s| s["rss_kb"].as_f64()).sum())
            .unwrap_or(0.0);
        let idle = r
            .extra
            .get("rss_idle_kb")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.0);
        let mut extra: Vec<String> = r
            .extra
            .iter()
            .filter(|(k, _)| k.as_str() != "rss_idle_kb")
            .map(|(k, v)| {
                format!(
                    "{k}={}",
                    v.as_f64().map(fmt_num).unwrap_or_else(|| v.to_string())
                )
            })
            .collect();
        if r.k0.is_some() {
            extra.push(format!(
                "k0 sweep p50/p99 {}/{} ms, ticks/write {}",
                fmt_num(r.k0_f("sweep.p50_ms")),
                fmt_num(r.k0_f("sweep.p99_ms")),
                fmt_num(r.k0_f("ticks_per_sweep_mean"))
            ));
        }
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {:.4} | {} | {} | {} | {} | {} | {} / {} | {:.3} | {:.3} | {:.0}→{:.0} | {} |",
            r.scenario,
            r.contender.name(),
            r.clients,
            r.rate,
            r.streams,
            r.f("connected"),
            r.f("failed"),
            r.f("delivered_ratio"),
            fmt_num(r.f("delivered_per_s")),
            fmt_num(r.f("latency.p50_ms")),
            fmt_num(r.f("latency.p99_ms")),
            fmt_num(r.f("latency.max_ms")),
            r.f("lagged_snapshots"),
            fmt_num(r.f("first_event_since_start.p99_ms")),
            fmt_num(r.f("first_event_since_start.max_ms")),
            r.f("server_cpu"),
            r.f("loadgen_cpu"),
            idle / 1024.0,
            rss_end / 1024.0,
            extra.join("; ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_by_path_through_objects_and_arrays() {
        let v = json!({ "latency": { "p99_ms": 4.5 }, "rss_points": [[9500, 120], [19000, 180]] });
        assert_eq!(num(&v, "latency.p99_ms"), 4.5);
        assert_eq!(num(&v, "rss_points.1.0"), 19000.0);
        assert!(num(&v, "rss_points.2.0").is_nan());
        assert!(num(&v, "latency.p50_ms").is_nan());
    }

    #[test]
    fn limits_judge_the_ratio() {
        assert_eq!(Limit::AtMost(1.3).judge(13.0, 10.0), (1.3, Some(true)));
        assert_eq!(Limit::Below(1.0).judge(10.0, 10.0), (1.0, Some(false)));
        assert_eq!(Limit::AtLeast(1.0).judge(0.0, 0.0), (1.0, Some(true)));
        // A comparison with a missing side cannot be judged...
        assert_eq!(Limit::AtMost(1.0).judge(1.0, f64::NAN).1, None);
        // ...but an exact count that could not be read fails.
        assert_eq!(Limit::Exactly(1.0).judge(f64::NAN, 10.0).1, Some(false));
        assert_eq!(Limit::Exactly(1.0).judge(10.0, 10.0), (1.0, Some(true)));
        assert_eq!(Limit::Zero.judge(3.0, 0.0), (3.0, Some(false)));
        assert_eq!(Limit::Zero.judge(0.0, 0.0), (0.0, Some(true)));
        assert_eq!(Limit::AtMost(0.75).to_string(), "<= 0.75");
        assert_eq!(Limit::AtLeast(10.0).to_string(), ">= 10");
        assert_eq!(Limit::Zero.to_string(), "= 0");
    }

    #[test]
    fn a_reported_ratio_is_not_judged() {
        assert_eq!(Limit::Report.judge(12.0, 10.0), (1.2, None));
        assert_eq!(Limit::Report.to_string(), "none yet");
        let g = Goal {
            scenario: "auth".into(),
            goal: "storm".into(),
            value: 12.0,
            anchor: 10.0,
            ratio: 1.2,
            limit: Limit::Report.to_string(),
            pass: None,
            unit: "ms".into(),
            note: String::new(),
        };
        let md = markdown(&json!({}), &[g], &[], &[], &[], &[]);
        assert!(md.contains("| none yet | reported |"), "{md}");
        assert!(!md.contains("## Runs"), "no load runs, no runs table");
    }

    #[test]
    fn tables_and_charts_are_in_the_markdown() {
        let t = Table {
            scenario: "views".into(),
            title: "1,000 views in one process".into(),
            columns: vec!["streams".into(), "ready s".into(), "ok".into(), "x".into()],
            rows: vec![vec![json!(1000), json!(1.6094), json!("yes"), json!(null)]],
            notes: vec!["A note.".into()],
            detail: json!({}),
        };
        let md = markdown(&json!({}), &[], &[], &[t], &["d-fanout.svg".into()], &[]);
        assert!(md.contains("![d-fanout.svg](d-fanout.svg)"));
        assert!(md.contains("## views: 1,000 views in one process"));
        assert!(
            md.contains(
                "| streams | ready s | ok | x |\n|---|---|---|---|\n| 1000 | 1.609 | yes | - |"
            ),
            "{md}"
        );
        assert!(md.contains("\nA note.\n"));
    }

    #[test]
    fn idle_checkpoints_scale_and_the_slope_starts_at_half() {
        assert_eq!(idle_checkpoints(19_000), vec![2_500, 5_000, 9_500, 14_000]);
        assert_eq!(idle_checkpoints(1_000), vec![131, 263, 500, 736]);
        let pts = json!([
            [2500, 20000],
            [5000, 25000],
            [9490, 30000],
            [14000, 40000],
            [19000, 50500]
        ]);
        // From the point nearest 9,500 to the last one.
        assert_eq!(
            rss_slope(&pts, 9_500),
            Some((50500.0 - 30000.0) / (19000.0 - 9490.0))
        );
        assert_eq!(rss_slope(&json!([[9500, 1]]), 9_500), None);
        assert_eq!(rss_slope(&json!([]), 9_500), None);
        // The old shape (9,500 and the end) still works.
        assert_eq!(
            rss_slope(&json!([[9500, 100], [19000, 195]]), 9_500),
            Some(0.01)
        );
    }

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(19_000), "19,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }
}
