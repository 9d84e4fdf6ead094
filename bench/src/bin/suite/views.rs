//! The views scenario: one gateway process serving 1,000 streams, one per view, on
//! the embedded engine, against the same binary with one stream, interleaved
//! (1, 1000, 1, 1000, ...; `--reps`).
//!
//! Per run: the time from spawning the gateway until `GET /readyz` on the admin port
//! answers 200; its RSS (and `/proc/<pid>/smaps_rollup`) after readiness with no
//! client; then a reload that changes one stream's `view` (a complete temp file
//! renamed over the config), timed until a client of that stream receives `snapshot`
//! with reason `config-changed` (the precise signal: the listing shows the new view as
//! soon as the reload is applied, before the new subscription has its snapshot, and
//! the stream's readiness never drops, since the hub keeps serving its state); and the
//! engine's `tailgate ...` sessions and subscriptions before and after that reload, by
//! id, so that the streams that did not change are seen to keep theirs.
//!
//! Both configs load the same init SQL (the table and every view), so the engines hold
//! the same data and the RSS difference is the streams' own.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use tailgate_bench::probe::{self, Watcher};
use tailgate_bench::sys;

use super::{median, stop_child, thousands, wait_port, Limit, Suite, Table};

/// The stream whose view the reload changes, and the view it changes to.
const CHANGED: usize = 1;
const ALT_VIEW: &str = "valt";

/// The smaps_rollup fields shown in the results table (all are in the JSON).
const MEMORY_FIELDS: [&str; 5] = [
    "Rss",
    "Anonymous",
    "Private_Dirty",
    "Shared_Clean",
    "Pss_File",
];

/// Rows in the table every view selects from.
const ROWS: usize = 2_000;

/// Every wait of the scenario ends by these.
const READY_WITHIN: Duration = Duration::from_secs(180);
const RELOAD_WITHIN: Duration = Duration::from_secs(30);
const SESSIONS_WITHIN: Duration = Duration::from_secs(15);

/// The name of view `i` (from 1) of `n`: v0001 ... v1000.
fn view_name(i: usize, n: usize) -> String {
    let width = n.to_string().len().max(4);
    format!("v{i:0width$}")
}

fn stream_path(i: usize, n: usize) -> String {
    let width = n.to_string().len().max(4);
    format!("/v/{i:0width$}")
}

/// One table `t` and `n` views on it, each different (four shapes, each with its own
/// constants), all select-project-filter so the engine maintains them incrementally;
/// plus the view the reload switches to.
pub(super) fn init_sql(n: usize) -> String {
    let mut sql = String::from("CREATE TABLE t (id bigint, grp bigint, val bigint, name text);\n");
    for chunk in (0..ROWS).collect::<Vec<_>>().chunks(500) {
        let rows: Vec<String> = chunk
            .iter()
            .map(|i| format!("({i}, {}, {}, 'row {i}')", i % 50, (i * 37) % 1000))
            .collect();
        let _ = writeln!(sql, "INSERT INTO t VALUES {};", rows.join(", "));
    }
    for i in 1..=n {
        let name = view_name(i, n);
        let r = i % ROWS;
        let body = match i % 4 {
            0 => format!(
                "SELECT id, val + {i} AS v FROM t WHERE id % {n} = {}",
                i % n
            ),
            1 => format!(
                "SELECT id, name FROM t WHERE id = {r} OR id = {}",
                (r + 1) % ROWS
            ),
            2 => format!(
                "SELECT id, grp, val * 2 AS doubled FROM t WHERE grp = {} AND val < {}",
                i % 50,
                (i * 7) % 1000
            ),
            _ => format!(
                "SELECT id, val, name FROM t WHERE id >= {r} AND id < {} AND val >= 0",
                r + 3
            ),
        };
        let _ = writeln!(sql, "CREATE VIEW {name} AS {body};");
    }
    let _ = writeln!(
        sql,
        "CREATE VIEW {ALT_VIEW} AS SELECT id, val FROM t WHERE id % 7 = 3 AND id < 100;"
    );
    sql
}

/// Where the gateway's streams come from.
#[derive(Clone, Debug)]
pub(super) enum Upstream {
    /// The embedded engine, loading this init file.
    Embedded(PathBuf),
    /// A separate `tailgate engine` process at this address.
    External(SocketAddr),
}

/// The gateway config: streams 1..=`streams` of `n` views, stream `CHANGED` on
/// `changed_view` when given.
pub(super) fn config(
    listen: u16,
    admin: u16,
    upstream: &Upstream,
    streams: usize,
    n: usize,
    changed_view: Option<&str>,
) -> String {
    let mut toml = format!(
        "[server]\nlisten = \"127.0.0.1:{listen}\"\nadmin_listen = \"127.0.0.1:{admin}\"\nlog_format = \"json\"\n\n"
    );
    match upstream {
        Upstream::Embedded(init) => {
            let _ = write!(
                toml,
                "[upstream]\nurl = \"embedded\"\n\n[embedded]\ninit = \"{}\"\n\n",
                init.display()
            );
        }
        Upstream::External(addr) => {
            let _ = write!(
                toml,
                "[upstream]\nurl = \"postgres://materialize@{addr}/materialize?sslmode=disable\"\n\n"
            );
        }
    }
    for i in 1..=streams {
        let view = match changed_view {
            Some(v) if i == CHANGED => v.to_string(),
            _ => view_name(i, n),
        };
        let _ = write!(
            toml,
            "[[streams]]\npath = \"{}\"\nview = \"{view}\"\n\n",
            stream_path(i, n)
        );
    }
    toml
}

/// Writes `text` to a temp file beside `path` and renames it over `path`, as editors
/// and ConfigMap updates do: the watcher never sees a half-written file.
fn rename_over(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("toml.tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// The rows of one query, as text, over a fresh connection (bounded in time).
pub(super) fn query_rows(conninfo: &str, sql: &str) -> anyhow::Result<Vec<Vec<String>>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (client, conn) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_postgres::connect(conninfo, tokio_postgres::NoTls),
        )
        .await
        .context("connecting to the engine: timeout")??;
        tokio::spawn(conn);
        let msgs = tokio::time::timeout(Duration::from_secs(20), client.simple_query(sql))
            .await
            .context("engine query: timeout")??;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                    (0..r.len())
                        .map(|i| r.get(i).unwrap_or("").to_string())
                        .collect(),
                ),
                _ => None,
            })
            .collect())
    })
}

/// The engine's view of the gateway's sessions: session id by application name
/// (`tailgate <path>`), and subscription ids with their session.
#[derive(Clone, Debug, Default)]
struct Sessions {
    by_name: BTreeMap<String, Vec<i64>>,
    subscriptions: BTreeMap<String, i64>,
}

impl Sessions {
    fn read(conninfo: &str) -> anyhow::Result<Self> {
        let mut s = Sessions::default();
        for row in query_rows(
            conninfo,
            "SELECT id, application_name FROM mz_internal.mz_sessions WHERE application_name LIKE 'tailgate %'",
        )? {
            let id = row.first().and_then(|v| v.parse().ok()).unwrap_or(-1);
            s.by_name
                .entry(row.get(1).cloned().unwrap_or_default())
                .or_default()
                .push(id);
        }
        for row in query_rows(
            conninfo,
            "SELECT id, session_id FROM mz_internal.mz_subscriptions",
        )? {
            let sid = row.get(1).and_then(|v| v.parse().ok()).unwrap_or(-1);
            s.subscriptions
                .insert(row.first().cloned().unwrap_or_default(), sid);
        }
        Ok(s)
    }

    fn count(&self) -> usize {
        self.by_name.values().map(Vec::len).sum()
    }

    fn ids(&self) -> BTreeSet<i64> {
        self.by_name.values().flatten().copied().collect()
    }
}

/// What one run measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
struct ViewsRun {
    streams: usize,
    ready_s: f64,
    rss_kb: f64,
    memory: BTreeMap<String, u64>,
    /// Reload (rename) to the client's `snapshot(config-changed)`.
    reload_ms: f64,
    /// Reload to the gateway's "Config reloaded." log line (ms resolution).
    applied_ms: f64,
    /// Reload to `/readyz` 200 again, polled after the snapshot arrived.
    ready_again_ms: f64,
    listing_ok: bool,
    sessions_before: usize,
    sessions_after: usize,
    /// Sessions present before and after with the same id (the streams not changed).
    untouched: usize,
    /// The changed stream's session was replaced: its old id gone, one new id.
    changed_replaced: bool,
    subscriptions_before: usize,
    subscriptions_after: usize,
    subscriptions_kept: usize,
    /// RSS of a separate engine process (breakdown runs only).
    engine_rss_kb: Option<f64>,
}

/// Kills the gateway (and a separate engine) when dropped, whatever happened.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in self.0.iter_mut().rev() {
            stop_child(c);
        }
    }
}

/// The JSON log lines written so far.
fn log_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The embedded engine's address, from the gateway's JSON log.
fn engine_addr(log: &Path, deadline: Instant) -> anyhow::Result<SocketAddr> {
    loop {
        if let Some(a) = log_lines(log)
            .iter()
            .filter(|l| l["message"] == "Embedded development engine started.")
            .find_map(|l| l["addr"].as_str()?.parse().ok())
        {
            return Ok(a);
        }
        if Instant::now() > deadline {
            bail!("no \"Embedded development engine started.\" line with addr in the log");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn conninfo(addr: SocketAddr) -> String {
    format!(
        "host={} port={} user=materialize dbname=materialize",
        addr.ip(),
        addr.port()
    )
}

impl Suite {
    pub(super) fn views(&mut self) -> anyhow::Result<()> {
        let n = self.args.views_streams.max(2);
        let reps = self.args.reps.max(1);
        let dir = self.tmp.join("work").join("views");
        std::fs::create_dir_all(&dir)?;
        let init = dir.join("views.sql");
        std::fs::write(&init, init_sql(n))?;
        let upstream = Upstream::Embedded(init.clone());
        let mut by: BTreeMap<usize, Vec<ViewsRun>> = BTreeMap::new();
        for rep in 0..reps {
            for streams in [1, n] {
                let what = format!("views/{streams} stream(s), run {}", rep + 1);
                eprintln!("  {what}");
                match self.views_run(&dir, &upstream, streams, n) {
                    Ok(r) => {
                        eprintln!(
                            "    ready {:.2} s, RSS {:.1} MB, reload -> snapshot(config-changed) {:.0} ms, sessions {} -> {} ({} untouched)",
                            r.ready_s,
                            r.rss_kb / 1024.0,
                            r.reload_ms,
                            r.sessions_before,
                            r.sessions_after,
                            r.untouched
                        );
                        by.entry(streams).or_default().push(r);
                    }
                    Err(e) => {
                        eprintln!("    {what}: {e:#}");
                        self.skipped.push(format!("{what}: {e:#}"));
                    }
                }
            }
        }
        // What the per-stream memory is made of: the same two configs against a
        // separate engine process, so the gateway's and the engine's shares are
        // measured apart (once; the interleaved runs above carry the goals).
        let mut split: BTreeMap<usize, ViewsRun> = BTreeMap::new();
        for streams in [1, n] {
            let what = format!("views/{streams} stream(s), separate engine");
            eprintln!("  {what}");
            match self.views_split_run(&dir, &init, streams, n) {
                Ok(r) => {
                    split.insert(streams, r);
                }
                Err(e) => {
                    eprintln!("    {what}: {e:#}");
                    self.skipped.push(format!("{what}: {e:#}"));
                }
            }
        }
        self.views_results(n, &by, &split);
        Ok(())
    }

    fn views_results(
        &mut self,
        n: usize,
        by: &BTreeMap<usize, Vec<ViewsRun>>,
        split: &BTreeMap<usize, ViewsRun>,
    ) {
        let none = Vec::new();
        let one = by.get(&1).unwrap_or(&none);
        let many = by.get(&n).unwrap_or(&none);
        let each = |runs: &[ViewsRun], f: fn(&ViewsRun) -> f64| -> String {
            runs.iter()
                .map(|r| format!("{:.0}", f(r)))
                .collect::<Vec<_>>()
                .join("/")
        };
        let nn = thousands(n);
        self.goal(
            "views",
            &format!("reload of one stream's view until its client has snapshot(config-changed), {nn} streams vs 1"),
            med(many, |r| r.reload_ms).zip(med(one, |r| r.reload_ms)),
            Limit::AtMost(2.0),
            "ms",
            &format!(
                "medians of interleaved runs; per run {nn}: {} ms, 1: {} ms; rename-over save",
                each(many, |r| r.reload_ms),
                each(one, |r| r.reload_ms)
            ),
        );
        // Counts must hold in every run: the run farthest from the expected count.
        let worst = |runs: &[ViewsRun], f: fn(&ViewsRun) -> usize, want: usize| -> Option<f64> {
            runs.iter()
                .map(f)
                .max_by_key(|v| v.abs_diff(want))
                .map(|v| v as f64)
        };
        for (when, f) in [
            (
                "before",
                (|r: &ViewsRun| r.sessions_before) as fn(&ViewsRun) -> usize,
            ),
            ("after", |r: &ViewsRun| r.sessions_after),
        ] {
            self.goal(
                "views",
                &format!(
                    "engine sessions of the gateway / streams, {when} the reload ({nn} streams)"
                ),
                worst(many, f, n).map(|v| (v, n as f64)),
                Limit::Exactly(1.0),
                "sessions",
                &format!(
                    "mz_internal.mz_sessions, application_name 'tailgate %'; per run: {}",
                    many.iter()
                        .map(|r| f(r).to_string())
                        .collect::<Vec<_>>()
                        .join("/")
                ),
            );
        }
        self.goal(
            "views",
            &format!("sessions kept by the {} streams not changed", thousands(n - 1)),
            worst(many, |r| r.untouched, n - 1).map(|v| (v, (n - 1) as f64)),
            Limit::Exactly(1.0),
            "sessions",
            &format!(
                "same session ids before and after; the changed stream's replaced in {} of {} runs; subscriptions kept per run: {}",
                many.iter().filter(|r| r.changed_replaced).count(),
                many.len(),
                many.iter()
                    .map(|r| format!("{} of {}", r.subscriptions_kept, r.subscriptions_before))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );

        let per_stream = |f: &dyn Fn(&ViewsRun) -> f64| -> Option<f64> {
            Some((med(many, f)? - med(one, f)?) / (n - 1) as f64)
        };
        let columns = [
            "streams",
            "run",
            "ready s",
            "RSS MB",
            "anon MB",
            "threads",
            "reload → snapshot ms",
            "reload → applied (log) ms",
            "reload → /readyz 200 ms",
            "listing shows new view",
            "sessions before → after",
            "untouched",
            "changed replaced",
            "subscriptions kept",
            "smaps_rollup kB",
        ];
        let mut rows = Vec::new();
        for (streams, runs) in by {
            for (i, r) in runs.iter().enumerate() {
                rows.push(vec![
                    json!(streams),
                    json!(i + 1),
                    json!(r.ready_s),
                    json!(r.rss_kb / 1024.0),
                    json!(mem("Anonymous")(r) / 1024.0),
                    json!(r.memory.get("Threads")),
                    json!(r.reload_ms),
                    json!(r.applied_ms),
                    json!(r.ready_again_ms),
                    json!(if r.listing_ok { "yes" } else { "no" }),
                    json!(format!("{} → {}", r.sessions_before, r.sessions_after)),
                    json!(r.untouched),
                    json!(if r.changed_replaced { "yes" } else { "no" }),
                    json!(format!(
                        "{} of {}",
                        r.subscriptions_kept, r.subscriptions_before
                    )),
                    json!(r
                        .memory
                        .iter()
                        .filter(|(k, _)| MEMORY_FIELDS.contains(&k.as_str()))
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")),
                ]);
            }
        }
        let kb = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} kB"));
        let mut notes = vec![
            format!(
                "Medians: ready after {} s with {nn} streams, {} s with 1; RSS {} MB vs {} MB.",
                med(many, |r| r.ready_s).map_or("-".into(), |v| format!("{v:.2}")),
                med(one, |r| r.ready_s).map_or("-".into(), |v| format!("{v:.2}")),
                med(many, |r| r.rss_kb / 1024.0).map_or("-".into(), |v| format!("{v:.1}")),
                med(one, |r| r.rss_kb / 1024.0).map_or("-".into(), |v| format!("{v:.1}")),
            ),
            format!(
                "RSS per idle stream = (RSS_{n} - RSS_1) / {}: {} (anonymous memory {}, Private_Dirty {}), gateway and embedded engine together; both configs load the same init SQL ({n} views), so this is the streams' own cost.",
                n - 1,
                kb(per_stream(&|r| r.rss_kb)),
                kb(per_stream(&mem("Anonymous"))),
                kb(per_stream(&mem("Private_Dirty"))),
            ),
        ];
        if let (Some(a), Some(b)) = (split.get(&1), split.get(&n)) {
            let d = |f: fn(&ViewsRun) -> f64| (f(b) - f(a)) / (n - 1) as f64;
            notes.push(format!(
                "With a separate engine process (one run each): gateway {:.1} kB and engine {:.1} kB per stream (gateway {:.1} → {:.1} MB, engine {:.1} → {:.1} MB); ready after {:.2} s vs {:.2} s.",
                d(|r| r.rss_kb),
                d(|r| r.engine_rss_kb.unwrap_or(f64::NAN)),
                a.rss_kb / 1024.0,
                b.rss_kb / 1024.0,
                a.engine_rss_kb.unwrap_or(f64::NAN) / 1024.0,
                b.engine_rss_kb.unwrap_or(f64::NAN) / 1024.0,
                a.ready_s,
                b.ready_s,
            ));
        }
        notes.push(
            "Ready = from spawning the gateway to `GET /readyz` 200 on the admin port (polled every 20 ms). \
             Reload = a complete temp file renamed over the config, with stream 1's `view` changed; \
             timed to the `snapshot` with reason `config-changed` at a client of that stream (the listing \
             shows the new view as soon as the reload is applied, and the stream stays ready throughout). \
             RSS after readiness and 1 s without clients."
                .into(),
        );
        let per_stream_json = json!({
            "rss_kb": per_stream(&|r| r.rss_kb),
            "anonymous_kb": per_stream(&mem("Anonymous")),
            "private_dirty_kb": per_stream(&mem("Private_Dirty")),
            "separate_engine": split.get(&1).zip(split.get(&n)).map(|(a, b)| json!({
                "gateway_kb": (b.rss_kb - a.rss_kb) / (n - 1) as f64,
                "engine_kb": (b.engine_rss_kb.unwrap_or(f64::NAN) - a.engine_rss_kb.unwrap_or(f64::NAN)) / (n - 1) as f64,
            })),
        });
        let detail = json!({ "runs": by, "separate_engine": split, "per_stream": per_stream_json });
        self.tables.push(Table {
            scenario: "views".into(),
            title: format!("{nn} views in one process"),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows,
            notes,
            detail,
        });
    }

    /// Starts the gateway on `upstream` with `streams` streams, measures, reloads.
    fn views_run(
        &mut self,
        dir: &Path,
        upstream: &Upstream,
        streams: usize,
        n: usize,
    ) -> anyhow::Result<ViewsRun> {
        self.views_measure(dir, upstream, streams, n, None)
    }

    /// The breakdown run: a separate `tailgate engine` process serves the views.
    fn views_split_run(
        &mut self,
        dir: &Path,
        init: &Path,
        streams: usize,
        n: usize,
    ) -> anyhow::Result<ViewsRun> {
        let eport = self.port();
        let mut engine = self
            .pinned("0", &self.args.tailgate.clone())
            .args(["engine", "--listen"])
            .arg(format!("127.0.0.1:{eport}"))
            .arg("--init")
            .arg(init)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(
                dir.join(format!("engine-{eport}.log")),
            )?)
            .spawn()
            .context("starting the engine")?;
        if let Err(e) = wait_port(eport, Duration::from_secs(60), &mut engine) {
            stop_child(&mut engine);
            return Err(e);
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], eport));
        let result = self.views_measure(
            dir,
            &Upstream::External(addr),
            streams,
            n,
            Some(engine.id()),
        );
        stop_child(&mut engine);
        result
    }

    fn views_measure(
        &mut self,
        dir: &Path,
        upstream: &Upstream,
        streams: usize,
        n: usize,
        engine_pid: Option<u32>,
    ) -> anyhow::Result<ViewsRun> {
        let (port, admin_port) = (self.port(), self.port());
        let admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
        // Its own directory: the gateway watches the config's directory.
        let run_dir = dir.join(format!("run-{port}"));
        std::fs::create_dir_all(&run_dir)?;
        let cfg = run_dir.join("tailgate.toml");
        std::fs::write(&cfg, config(port, admin_port, upstream, streams, n, None))?;
        let log = run_dir.join("tailgate.log");
        let t0 = Instant::now();
        let child = self
            .pinned("0", &self.args.tailgate.clone())
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", self.args.tailgate.display()))?;
        let pid = child.id();
        let mut procs = Procs(vec![child]);
        let mut r = ViewsRun {
            streams,
            ..ViewsRun::default()
        };

        // (a) Readiness.
        let deadline = t0 + READY_WITHIN;
        let mut last;
        loop {
            if let Ok(Some(status)) = procs.0[0].try_wait() {
                bail!(
                    "the gateway exited before it was ready: {status}; see {}",
                    log.display()
                );
            }
            match probe::get(admin, "/readyz", Duration::from_secs(5)) {
                Ok(a) if a.status == 200 => break,
                Ok(a) => last = String::from_utf8_lossy(&a.body).chars().take(300).collect(),
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() > deadline {
                bail!("/readyz not 200 within {READY_WITHIN:?}; last: {last}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        r.ready_s = t0.elapsed().as_secs_f64();

        // (b) Memory, idle.
        std::thread::sleep(Duration::from_secs(1));
        r.rss_kb = sys::sample(Some(pid))?.rss_kb as f64;
        r.memory = sys::memory_breakdown(pid)?;
        if let Some(e) = engine_pid {
            r.engine_rss_kb = Some(sys::sample(Some(e))?.rss_kb as f64);
        }

        // (d) Sessions before.
        let engine = match upstream {
            Upstream::Embedded(_) => engine_addr(&log, Instant::now() + Duration::from_secs(5))?,
            Upstream::External(a) => *a,
        };
        let engine = conninfo(engine);
        let before = Sessions::read(&engine)?;
        r.sessions_before = before.count();
        r.subscriptions_before = before.subscriptions.len();

        // (c) A client of the stream that changes, then the reload.
        let path = stream_path(CHANGED, n);
        let watch_end = Instant::now() + READY_WITHIN;
        let watcher = Watcher::start(
            SocketAddr::from(([127, 0, 0, 1], port)),
            &path,
            &[],
            watch_end,
        );
        let is_snapshot = |reason: &'static str| {
            move |e: &probe::Event| {
                e.event == "snapshot" && snapshot_reason(&e.data) == Some(reason)
            }
        };
        let (first, _) = watcher
            .wait_for(
                0,
                Instant::now() + Duration::from_secs(20),
                is_snapshot("initial"),
            )
            .context("the client's initial snapshot")?;
        // Quiet before the reload, so that the engine's and the watcher's start-up
        // work is done.
        std::thread::sleep(Duration::from_millis(500));
        let changed = config(port, admin_port, upstream, streams, n, Some(ALT_VIEW));
        let wall_ms = sys::now_ms();
        let t_reload = Instant::now();
        rename_over(&cfg, &changed)?;
        let (_, ev) = watcher
            .wait_for(
                first + 1,
                t_reload + RELOAD_WITHIN,
                is_snapshot("config-changed"),
            )
            .context("snapshot(config-changed) after the reload")?;
        r.reload_ms = (ev.at - t_reload).as_secs_f64() * 1000.0;
        r.applied_ms = log_lines(&log)
            .iter()
            .filter(|l| l["message"] == "Config reloaded.")
            .filter_map(|l| humantime::parse_rfc3339(l["time"].as_str()?).ok())
            .filter_map(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as f64 - wall_ms as f64)
            .next_back()
            .unwrap_or(f64::NAN);
        let (t_ready, _) = probe::wait_status(
            admin,
            "/readyz",
            200,
            Duration::from_millis(20),
            Instant::now() + Duration::from_secs(10),
        )?;
        r.ready_again_ms = (t_ready - t_reload).as_secs_f64() * 1000.0;
        let listing = probe::get(admin, "/", Duration::from_secs(10))?.json()?;
        r.listing_ok = listing["streams"].as_array().is_some_and(|s| {
            s.iter()
                .any(|s| s["path"] == path.as_str() && s["view"] == ALT_VIEW && s["ready"] == true)
        });
        drop(watcher);

        // (d) Sessions after: the changed stream's old session closes and its new one
        // opens asynchronously, so wait (bounded) for the count to settle.
        let name = format!("tailgate {path}");
        let old: BTreeSet<i64> = before
            .by_name
            .get(&name)
            .into_iter()
            .flatten()
            .copied()
            .collect();
        let end = Instant::now() + SESSIONS_WITHIN;
        let after = loop {
            let s = Sessions::read(&engine)?;
            let now: BTreeSet<i64> = s
                .by_name
                .get(&name)
                .into_iter()
                .flatten()
                .copied()
                .collect();
            let settled = s.count() == streams && now.len() == 1 && now.is_disjoint(&old);
            if settled || Instant::now() > end {
                break s;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        r.sessions_after = after.count();
        let (b_ids, a_ids) = (before.ids(), after.ids());
        r.untouched = b_ids.intersection(&a_ids).count();
        let now: BTreeSet<i64> = after
            .by_name
            .get(&name)
            .into_iter()
            .flatten()
            .copied()
            .collect();
        r.changed_replaced = now.len() == 1 && now.is_disjoint(&old) && old.len() == 1;
        r.subscriptions_after = after.subscriptions.len();
        r.subscriptions_kept = before
            .subscriptions
            .iter()
            .filter(|(id, sid)| after.subscriptions.get(*id) == Some(sid))
            .count();
        drop(procs);
        Ok(r)
    }
}

/// The median of `f` over `runs`; None without runs.
fn med(runs: &[ViewsRun], f: impl Fn(&ViewsRun) -> f64) -> Option<f64> {
    (!runs.is_empty()).then(|| median(runs.iter().map(f).collect()))
}

/// A smaps_rollup field of a run, in kB (NaN when absent).
fn mem(field: &'static str) -> impl Fn(&ViewsRun) -> f64 {
    move |r| r.memory.get(field).copied().map_or(f64::NAN, |v| v as f64)
}

/// The `reason` of a snapshot event's data.
fn snapshot_reason(data: &str) -> Option<&'static str> {
    let v: Value = serde_json::from_str(data).ok()?;
    [
        "initial",
        "config-changed",
        "lagged",
        "resume-gap",
        "upstream-reset",
    ]
    .into_iter()
    .find(|r| v["reason"] == *r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thousand_different_views_and_one_spare() {
        let sql = init_sql(1000);
        let views: Vec<&str> = sql
            .lines()
            .filter(|l| l.starts_with("CREATE VIEW"))
            .collect();
        assert_eq!(views.len(), 1001);
        assert!(views[0].starts_with("CREATE VIEW v0001 AS SELECT"));
        assert!(views[999].starts_with("CREATE VIEW v1000 AS SELECT"));
        assert!(views[1000].starts_with(&format!("CREATE VIEW {ALT_VIEW} ")));
        let bodies: BTreeSet<&str> = views
            .iter()
            .map(|v| v.split_once(" AS ").unwrap().1)
            .collect();
        assert_eq!(bodies.len(), 1001, "every view is different");
        assert_eq!(
            sql.lines()
                .filter(|l| l.starts_with("INSERT INTO t"))
                .count(),
            ROWS / 500
        );
    }

    #[test]
    fn configs_differ_only_in_the_changed_stream() {
        let up = Upstream::Embedded(PathBuf::from("/tmp/views.sql"));
        let a = config(1, 2, &up, 1000, 1000, None);
        let b = config(1, 2, &up, 1000, 1000, Some(ALT_VIEW));
        assert_eq!(a.matches("[[streams]]").count(), 1000);
        assert!(
            a.contains("admin_listen = \"127.0.0.1:2\"") && a.contains("log_format = \"json\"")
        );
        assert!(a.contains("path = \"/v/0001\"\nview = \"v0001\""));
        assert!(b.contains("path = \"/v/0001\"\nview = \"valt\""));
        let diff = a.lines().zip(b.lines()).filter(|(x, y)| x != y).count();
        assert_eq!(diff, 1);
        let ext = config(
            1,
            2,
            &Upstream::External("127.0.0.1:6875".parse().unwrap()),
            1,
            1000,
            None,
        );
        assert!(ext.contains(
            "url = \"postgres://materialize@127.0.0.1:6875/materialize?sslmode=disable\""
        ));
        assert!(!ext.contains("[embedded]"));
    }

    #[test]
    fn snapshot_reasons_are_read_from_the_data() {
        assert_eq!(
            snapshot_reason(r#"{"ts":"1","reason":"config-changed","changes":[]}"#),
            Some("config-changed")
        );
        assert_eq!(snapshot_reason(r#"{"reason":"other"}"#), None);
        assert_eq!(snapshot_reason("not json"), None);
    }

    #[test]
    fn names_are_zero_padded_to_the_count() {
        assert_eq!(view_name(7, 1000), "v0007");
        assert_eq!(stream_path(7, 12_000), "/v/00007");
    }
}
