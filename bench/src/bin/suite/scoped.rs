//! The scoped scenario: N clients (default 10,000), client i on its own partition of
//! one template stream (`/orders/{customer_id}`, customer i), and a writer changing
//! one row of a random customer per write (1,000 writes/s), so each write belongs to
//! exactly one partition and reaches exactly one client.
//!
//! Contenders, interleaved (scoped, unscoped, nchan, scoped, ...; `--reps`):
//!
//! - **tailgate scoped**: the template stream; every partition shares one upstream
//!   SUBSCRIBE;
//! - **tailgate unscoped** (the baseline): the same view, writer and rate on a plain
//!   stream `/orders` with one client, which receives all 1,000 writes/s, so the
//!   deliveries per second equal the scoped run's; the other N-1 clients hold a quiet
//!   plain stream (`/quiet`, a one-row view nobody writes), so the process holds the
//!   same N connections and one copy of the orders state, as the scoped one does.
//!   This run is also the RSS baseline: N clients on unscoped streams;
//! - **nchan**: one channel per customer; the writer POSTs each change to
//!   `/pub/<customer>`.
//!
//! Then **naive-scoped** (one pgwire session and `COPY (SUBSCRIBE ... WHERE
//! customer_id = c)` per client) at growing partition counts until it fails or hits
//! this machine's file-descriptor bound.
//!
//! The engine runs as its own process (`tailgate engine`) on CPU 1, beside the load
//! client and its writer, so the server on CPU 0 is the gateway alone: its CPU per
//! delivered event can be compared with nchan's worker, whose publisher is the same
//! load client. Every run gets a fresh engine, so every partition's `seq` starts at 0.
//! loadgen checks every row: its customer must be the client's partition
//! (misdelivery), and per partition the `seq`s must follow what the writer wrote
//! (gaps, duplicates, missing after the drain).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};

use tailgate_bench::{probe, sys, PAD};

use super::{
    median, stop_child, thousands, wait_port, Kind, Limit, Load, Reps, Run, Server, Suite,
};

/// Which server a scoped run measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Variant {
    Scoped,
    Unscoped,
    Nchan,
    Naive,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Scoped => "tailgate scoped",
            Variant::Unscoped => "tailgate unscoped",
            Variant::Nchan => "nchan",
            Variant::Naive => "naive-scoped",
        }
    }

    fn kind(self) -> Kind {
        match self {
            Variant::Scoped | Variant::Unscoped => Kind::Tailgate,
            Variant::Nchan => Kind::Nchan,
            Variant::Naive => Kind::NaiveScoped,
        }
    }
}

/// The orders table (one row per customer, `order_id` = `customer_id`, `seq` 0), the
/// view the streams serve, and the quiet one-row view of the baseline's idle clients.
pub(super) fn init_sql(customers: usize) -> String {
    let mut sql = String::from(
        "CREATE TABLE orders (order_id bigint, customer_id bigint, seq bigint, sent_ms bigint, pad text);\n",
    );
    for chunk in (0..customers).collect::<Vec<_>>().chunks(500) {
        let rows: Vec<String> = chunk
            .iter()
            .map(|c| format!("({c}, {c}, 0, 0, '{PAD}')"))
            .collect();
        let _ = writeln!(sql, "INSERT INTO orders VALUES {};", rows.join(", "));
    }
    sql.push_str(
        "CREATE VIEW orders_v AS SELECT order_id, customer_id, seq, sent_ms, pad FROM orders;\n\
         CREATE TABLE quiet (n bigint, pad text);\n",
    );
    let _ = writeln!(sql, "INSERT INTO quiet VALUES (1, '{PAD}');");
    sql.push_str("CREATE VIEW quiet_v AS SELECT n, pad FROM quiet;\n");
    sql
}

/// The gateway's config: the template stream, or the baseline's two plain streams.
/// `heartbeat` is 60 s in both, so no keepalive round falls inside a run (nchan sends
/// none): the runs compare the delivery path, not the cost of holding connections.
pub(super) fn gateway_config(
    port: u16,
    engine: SocketAddr,
    scoped: bool,
    clients: usize,
) -> String {
    let mut toml = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nheartbeat = \"60s\"\nmax_connections = 19500\n\n\
         [upstream]\nurl = \"postgres://materialize@{engine}/materialize?sslmode=disable\"\n\n"
    );
    if scoped {
        let _ = write!(
            toml,
            "[[streams]]\npath = \"/orders/{{customer_id}}\"\nview = \"orders_v\"\nmax_partitions = {}\n",
            (clients * 2).max(20_000)
        );
    } else {
        toml.push_str(
            "[[streams]]\npath = \"/orders\"\nview = \"orders_v\"\n\n\
             [[streams]]\npath = \"/quiet\"\nview = \"quiet_v\"\n",
        );
    }
    toml
}

/// nginx + nchan with one channel per customer: subscribers on `/orders/<c>`, the
/// publisher on `/pub/<c>`.
fn nchan_config(dir: &Path, port: u16) -> String {
    format!(
        "load_module /usr/lib/nginx/modules/ngx_nchan_module.so;\n\
         daemon off;\nmaster_process on;\nuser root;\nworker_processes 1;\n\
         worker_rlimit_nofile 19990;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log warn;\n\
         events {{ worker_connections 19990; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n  nchan_shared_memory_size 256M;\n\
         \x20 client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n\
         \x20 fastcgi_temp_path {dir}/fcgi;\n  uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n\
         \x20 server {{\n    listen 127.0.0.1:{port} backlog=4096;\n\
         \x20   location ~ ^/orders/([0-9]+)$ {{ nchan_subscriber eventsource; nchan_channel_id $1;\n\
         \x20                                   nchan_subscriber_first_message newest; }}\n\
         \x20   location ~ ^/pub/([0-9]+)$ {{ nchan_publisher; nchan_channel_id $1;\n\
         \x20                               nchan_message_buffer_length 16; nchan_message_timeout 60s; }}\n  }}\n}}\n",
        dir = dir.display()
    )
}

/// The engine's conninfo for tokio-postgres.
fn conninfo(addr: SocketAddr) -> String {
    format!(
        "host={} port={} user=materialize dbname=materialize",
        addr.ip(),
        addr.port()
    )
}

/// Gateway CPU per delivered event in µs: its CPU over the window / events delivered
/// in the window.
fn cpu_per_event_us(r: &Run) -> f64 {
    let per_s = r.f("delivered_per_s");
    if per_s > 0.0 {
        r.f("server_cpu") / per_s * 1e6
    } else {
        f64::NAN
    }
}

/// The server's RSS at the end of the window, kB.
fn rss_end_kb(r: &Run) -> f64 {
    r.report["server_end"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["rss_kb"].as_f64()).sum())
        .unwrap_or(f64::NAN)
}

/// Misdelivered, duplicated, skipped and missing rows of a run.
fn faults(r: &Run) -> (f64, f64) {
    let p = |k: &str| r.f(&format!("partitions.{k}"));
    (
        p("misdelivered") + p("unreadable"),
        p("duplicates") + p("gaps") + p("missing_at_end"),
    )
}

impl Suite {
    /// Starts `tailgate engine` on CPU 1 with the scenario's init SQL.
    fn scoped_engine(&mut self, dir: &Path, init: &Path) -> anyhow::Result<(Child, SocketAddr)> {
        let eport = self.port();
        let addr = SocketAddr::from(([127, 0, 0, 1], eport));
        let mut child = self
            .pinned("1", &self.args.tailgate.clone())
            .args(["engine", "--listen"])
            .arg(addr.to_string())
            .arg("--init")
            .arg(init)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("engine.log"))?)
            .spawn()
            .context("starting tailgate engine")?;
        if let Err(e) = wait_port(eport, Duration::from_secs(60), &mut child) {
            stop_child(&mut child);
            return Err(e);
        }
        Ok((child, addr))
    }

    /// One run of `variant` with `clients` clients and the writer over `clients`
    /// partitions; the engine (when the variant needs one) is stopped after it.
    fn scoped_run(
        &mut self,
        variant: Variant,
        clients: usize,
        init: &Path,
        seed: u64,
    ) -> anyhow::Result<Run> {
        let rate = self.args.scoped_rate;
        let port = self.port();
        let dir = self
            .tmp
            .join("work")
            .join(format!("scoped-{}-{port}", variant.kind().name()));
        std::fs::create_dir_all(&dir)?;
        eprintln!("  scoped: {} N={clients} writes/s={rate}", variant.name());
        let mut engine = None;
        let mut server = Server {
            children: Vec::new(),
            pids: Vec::new(),
            port,
            paths: Vec::new(),
            engine: None,
            publish_url: None,
            feed_pg: None,
            stats: None,
            rss_idle_kb: 0,
            tls_ca: None,
            ticks_on: Vec::new(),
            group_by_id: false,
        };
        let mut args: Vec<String> = vec![
            "--partition-column".into(),
            "customer_id".into(),
            "--write-rate".into(),
            rate.to_string(),
            "--write-partitions".into(),
            clients.to_string(),
            "--write-seed".into(),
            seed.to_string(),
        ];
        let started = (|| -> anyhow::Result<()> {
            if variant != Variant::Nchan {
                let (child, addr) = self.scoped_engine(&dir, init)?;
                engine = Some((child, addr));
                let ci = conninfo(addr);
                server.engine = Some(ci.clone());
                args.extend(["--write-pg".into(), ci.clone(), "--sessions-pg".into(), ci]);
            }
            match variant {
                Variant::Scoped | Variant::Unscoped => {
                    let (_, eaddr) = engine.as_ref().context("no engine")?;
                    let cfg = dir.join("tailgate.toml");
                    std::fs::write(
                        &cfg,
                        gateway_config(port, *eaddr, variant == Variant::Scoped, clients),
                    )?;
                    let child = self
                        .pinned("0", &self.args.tailgate.clone())
                        .arg("--config")
                        .arg(&cfg)
                        .env("RUST_LOG", "info")
                        .env("NO_COLOR", "1")
                        .stdout(Stdio::null())
                        .stderr(std::fs::File::create(dir.join("tailgate.log"))?)
                        .spawn()
                        .context("starting tailgate")?;
                    server.pids.push(child.id());
                    server.children.push(child);
                    wait_port(port, Duration::from_secs(30), &mut server.children[0])?;
                    probe::wait_status(
                        SocketAddr::from(([127, 0, 0, 1], port)),
                        "/readyz",
                        200,
                        Duration::from_millis(50),
                        Instant::now() + Duration::from_secs(60),
                    )?;
                    if variant == Variant::Scoped {
                        args.extend(["--path-template".into(), "/orders/{i}".into()]);
                    } else {
                        let file = dir.join("paths.txt");
                        let mut text = String::from("/orders\n");
                        for _ in 1..clients {
                            text.push_str("/quiet\n");
                        }
                        std::fs::write(&file, text)?;
                        args.extend(["--path-file".into(), file.display().to_string()]);
                    }
                }
                Variant::Nchan => {
                    self.available(Kind::Nchan).map_err(anyhow::Error::msg)?;
                    let cfg = dir.join("nginx.conf");
                    std::fs::write(&cfg, nchan_config(&dir, port))?;
                    self.start_nginx(&mut server, &dir, &cfg, port)?;
                    args.extend([
                        "--path-template".into(),
                        "/orders/{i}".into(),
                        "--write-url".into(),
                        format!("http://127.0.0.1:{port}/pub"),
                    ]);
                }
                Variant::Naive => {
                    let (_, eaddr) = engine.as_ref().context("no engine")?;
                    let prog = self.bin.join("naive-scoped");
                    let child = self
                        .pinned("0", &prog)
                        .arg("--listen")
                        .arg(format!("127.0.0.1:{port}"))
                        .arg("--engine")
                        .arg(conninfo(*eaddr))
                        .stdout(Stdio::null())
                        .stderr(std::fs::File::create(dir.join("naive.log"))?)
                        .spawn()
                        .with_context(|| format!("starting {}", prog.display()))?;
                    server.pids.push(child.id());
                    server.children.push(child);
                    wait_port(port, Duration::from_secs(10), &mut server.children[0])?;
                    args.extend(["--path-template".into(), "/orders/{i}".into()]);
                }
            }
            Ok(())
        })();
        let result = started.and_then(|()| {
            std::thread::sleep(Duration::from_millis(300));
            server.rss_idle_kb = server
                .pids
                .iter()
                .map(|p| sys::sample(Some(*p)).map(|s| s.rss_kb).unwrap_or(0))
                .sum();
            let engine_before = engine
                .as_ref()
                .and_then(|(c, _)| sys::sample(Some(c.id())).ok());
            let load = Load {
                connect_rate: if variant == Variant::Naive {
                    500.0
                } else {
                    2500.0
                },
                drain: 3.0,
                args: args.clone(),
                ..Load::steady(clients, self.args.scoped_window)
            };
            let (child, out, bound) = self.loadgen(&server, &load, rate)?;
            let report = self.finish_load(child, out, bound)?;
            let engine_after = engine
                .as_ref()
                .and_then(|(c, _)| sys::sample(Some(c.id())).ok());
            Ok((report, engine_before.zip(engine_after)))
        });
        for c in server.children.iter_mut().rev() {
            stop_child(c);
        }
        if let Some((mut c, _)) = engine {
            stop_child(&mut c);
        }
        let (report, engine_cpu) = result?;
        let mut extra = BTreeMap::new();
        extra.insert("variant".into(), json!(variant.name()));
        extra.insert("rss_idle_kb".into(), json!(server.rss_idle_kb));
        if let Some((a, b)) = engine_cpu {
            extra.insert(
                "engine_cpu_s".into(),
                json!(((b.cpu_s - a.cpu_s) * 100.0).round() / 100.0),
            );
        }
        let run = Run {
            scenario: "scoped".into(),
            contender: variant.kind(),
            clients,
            rate,
            streams: 1,
            report,
            k0: None,
            extra,
        };
        let mut run = run;
        let cpu = cpu_per_event_us(&run);
        run.extra.insert(
            "cpu_per_event_us".into(),
            json!((cpu * 100.0).round() / 100.0),
        );
        let (bad, lost) = faults(&run);
        eprintln!(
            "    connected {} failed {} delivered {}/{} ({:.0}/s in window) p99 {:.1} ms cpu/event {:.1} µs RSS {:.0} MB misdelivered {bad} lost {lost} upstream {}",
            run.f("connected"),
            run.f("failed"),
            run.f("delivered"),
            run.f("expected"),
            run.f("delivered_per_s"),
            run.f("latency.p99_ms"),
            cpu,
            rss_end_kb(&run) / 1024.0,
            run.report["upstream"]
        );
        self.runs.push(run.clone());
        Ok(run)
    }

    pub(super) fn scoped(&mut self) -> anyhow::Result<()> {
        let n = self.args.scoped_clients;
        let dir = self.tmp.join("work").join("scoped");
        std::fs::create_dir_all(&dir)?;
        let init = dir.join("init.sql");
        std::fs::write(
            &init,
            init_sql(n.max(*self.args.naive_partitions.iter().max().unwrap_or(&0))),
        )?;
        let mut by: BTreeMap<Variant, Reps> = BTreeMap::new();
        for rep in 0..self.args.reps.max(1) {
            for variant in [Variant::Scoped, Variant::Unscoped, Variant::Nchan] {
                if variant == Variant::Nchan {
                    if let Err(why) = self.available(Kind::Nchan) {
                        let msg = format!("scoped/nchan: skipped ({why})");
                        if !self.skipped.contains(&msg) {
                            self.skipped.push(msg);
                        }
                        continue;
                    }
                }
                // The same writer sequence for every contender of a repetition.
                match self.scoped_run(variant, n, &init, 1 + rep as u64) {
                    Ok(r) => by.entry(variant).or_default().0.push(r),
                    Err(e) => {
                        eprintln!("    scoped/{}: {e:#}", variant.name());
                        self.skipped
                            .push(format!("scoped/{}: {e:#}", variant.name()));
                    }
                }
            }
        }
        self.scoped_goals(n, &by);
        // naive-scoped's writer is held to what the same engine took from the same
        // writer in this run's tailgate scoped runs (one subscription), not to the
        // offered rate: this machine's noise slows the engine for every contender.
        let anchor_wps = by
            .get(&Variant::Scoped)
            .filter(|r| !r.0.is_empty())
            .map(|r| median(r.0.iter().map(|x| x.f("writer.writes_per_s")).collect()))
            .unwrap_or(self.args.scoped_rate);
        self.naive_steps(&init, anchor_wps)?;
        Ok(())
    }

    fn scoped_goals(&mut self, n: usize, by: &BTreeMap<Variant, Reps>) {
        let med = |v: Variant, f: &dyn Fn(&Run) -> f64| -> Option<f64> {
            by.get(&v)
                .filter(|r| !r.0.is_empty())
                .map(|r| median(r.0.iter().map(f).collect()))
        };
        let each = |v: Variant, f: &dyn Fn(&Run) -> f64, unit: &str| -> String {
            by.get(&v)
                .map(|r| {
                    r.0.iter()
                        .map(|x| super::fmt_num(f(x)))
                        .collect::<Vec<_>>()
                        .join("/")
                })
                .map(|s| format!("{} {s} {unit}", v.name()))
                .unwrap_or_default()
        };
        let p99 = |r: &Run| r.f("latency.p99_ms");
        let rss = |r: &Run| rss_end_kb(r) / 1024.0;
        let scoped = by.get(&Variant::Scoped);
        let sum = |f: &dyn Fn(&Run) -> f64| scoped.map(|r| r.0.iter().map(f).sum::<f64>());
        let runs = scoped.map_or(0, |r| r.0.len());
        self.goal(
            "scoped",
            &format!("rows delivered to a client of another partition ({runs} runs)"),
            sum(&|r| faults(r).0).map(|v| (v, 0.0)),
            Limit::Zero,
            "rows",
            &format!(
                "every row checked: its customer_id must be the client's partition; rows checked {}",
                sum(&|r| r.f("partitions.rows")).unwrap_or(f64::NAN)
            ),
        );
        self.goal(
            "scoped",
            &format!("writes delivered to their partition's client ({runs} runs)"),
            scoped.map(|r| (r.sum("delivered"), r.sum("expected"))),
            Limit::AtLeast(1.0),
            "rows",
            &format!(
                "duplicates {}, gaps {}, missing after the drain {}",
                sum(&|r| r.f("partitions.duplicates")).unwrap_or(f64::NAN),
                sum(&|r| r.f("partitions.gaps")).unwrap_or(f64::NAN),
                sum(&|r| r.f("partitions.missing_at_end")).unwrap_or(f64::NAN)
            ),
        );
        let sessions: Vec<(f64, f64)> = scoped
            .map(|r| {
                r.0.iter()
                    .map(|x| {
                        (
                            x.f("upstream.tailgate_sessions"),
                            x.f("upstream.subscriptions"),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let worst = sessions
            .iter()
            .map(|s| s.0.max(s.1))
            .fold(f64::NAN, f64::max);
        self.goal(
            "scoped",
            &format!(
                "upstream sessions (and subscriptions) of the gateway, {} partitions",
                thousands(n)
            ),
            (!sessions.is_empty()).then_some((worst, 1.0)),
            Limit::Exactly(1.0),
            "sessions",
            &format!(
                "per run (tailgate sessions, subscriptions) on the engine at the window's end: {}",
                sessions
                    .iter()
                    .map(|(a, b)| format!("({a}, {b})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        let ratio_note = |f: &dyn Fn(&Run) -> f64, unit: &str| {
            format!(
                "medians of interleaved runs; {}; {}",
                each(Variant::Scoped, f, unit),
                each(Variant::Unscoped, f, unit)
            )
        };
        self.goal(
            "scoped",
            "p99 latency, scoped vs unscoped (same writes/s, same deliveries/s)",
            med(Variant::Scoped, &p99).zip(med(Variant::Unscoped, &p99)),
            Limit::AtMost(1.5),
            "ms",
            &ratio_note(&p99, "ms"),
        );
        self.goal(
            "scoped",
            "gateway CPU per delivered event, scoped vs unscoped",
            med(Variant::Scoped, &cpu_per_event_us).zip(med(Variant::Unscoped, &cpu_per_event_us)),
            Limit::AtMost(2.0),
            "µs",
            &ratio_note(&cpu_per_event_us, "µs"),
        );
        self.goal(
            "scoped",
            &format!(
                "gateway RSS with {} clients, scoped vs unscoped",
                thousands(n)
            ),
            med(Variant::Scoped, &rss).zip(med(Variant::Unscoped, &rss)),
            Limit::AtMost(1.5),
            "MB",
            &ratio_note(&rss, "MB"),
        );
        let nchan_note = |f: &dyn Fn(&Run) -> f64, unit: &str| {
            format!(
                "{}; {}; nchan delivered {} of {} written, lost {}",
                each(Variant::Scoped, f, unit),
                each(Variant::Nchan, f, unit),
                by.get(&Variant::Nchan)
                    .map_or(f64::NAN, |r| r.sum("delivered")),
                by.get(&Variant::Nchan)
                    .map_or(f64::NAN, |r| r.sum("expected")),
                by.get(&Variant::Nchan)
                    .map_or(f64::NAN, |r| r.0.iter().map(|x| faults(x).1).sum())
            )
        };
        let ratio = |r: &Run| r.f("delivered_ratio");
        self.goal(
            "scoped",
            "writes delivered to their client after the drain, vs nchan",
            med(Variant::Scoped, &ratio).zip(med(Variant::Nchan, &ratio)),
            Limit::AtLeast(1.0),
            "",
            &format!(
                "delivered / written per run: {}; {}; writer writes/s per run: {}; {}",
                each(Variant::Scoped, &ratio, ""),
                each(Variant::Nchan, &ratio, ""),
                each(Variant::Scoped, &|r| r.f("writer.writes_per_s"), ""),
                each(Variant::Nchan, &|r| r.f("writer.writes_per_s"), "")
            ),
        );
        self.goal(
            "scoped",
            "p99 latency vs nchan, one channel per customer",
            med(Variant::Scoped, &p99).zip(med(Variant::Nchan, &p99)),
            Limit::AtMost(1.0),
            "ms",
            &nchan_note(&p99, "ms"),
        );
        self.goal(
            "scoped",
            "server CPU per delivered event vs nchan",
            med(Variant::Scoped, &cpu_per_event_us).zip(med(Variant::Nchan, &cpu_per_event_us)),
            Limit::AtMost(1.0),
            "µs",
            &nchan_note(&cpu_per_event_us, "µs"),
        );
        self.goal(
            "scoped",
            &format!("server RSS with {} clients vs nchan", thousands(n)),
            med(Variant::Scoped, &rss).zip(med(Variant::Nchan, &rss)),
            Limit::Report,
            "MB",
            &nchan_note(&rss, "MB"),
        );
    }

    /// naive-scoped at growing partition counts (one client per partition, the writer
    /// over those partitions) until a step fails: not every client connected with its
    /// first event, a misdelivered row, < 99.9% of the writes delivered after the
    /// drain, p99 > 1 s, or the engine taking < 0.9x the writes/s it took from the
    /// same writer with tailgate scoped (`anchor_wps`, this run). Its engine sessions are counted at each step.
    fn naive_steps(&mut self, init: &Path, anchor_wps: f64) -> anyhow::Result<()> {
        let steps: Vec<usize> = self
            .args
            .naive_partitions
            .iter()
            .copied()
            .filter(|p| *p > 0)
            .collect();
        if steps.is_empty() {
            self.skipped
                .push("scoped/naive-scoped: skipped (--naive-partitions 0)".into());
            return Ok(());
        }
        let mut rows = Vec::new();
        let mut largest = 0usize;
        let mut sessions_at_largest = f64::NAN;
        let mut sessions_last = (0usize, f64::NAN);
        let mut failed_at: Option<(usize, String)> = None;
        for p in steps {
            let why = match self.scoped_run(Variant::Naive, p, init, 1) {
                Err(e) => Some(format!("{e:#}")),
                Ok(r) => {
                    let (bad, _) = faults(&r);
                    let ratio = r.f("delivered_ratio");
                    let missing = r.f("failed") + r.f("clients_without_event");
                    // The writer awaits each UPDATE: an engine slowed by the sessions
                    // and dataflows it holds takes fewer writes than offered.
                    let wps = r.f("writer.writes_per_s");
                    sessions_last = (p, r.f("upstream.sessions"));
                    rows.push(vec![
                        json!(p),
                        json!(r.f("connected")),
                        json!(missing),
                        json!(r.f("upstream.sessions")),
                        json!(r.f("upstream.subscriptions")),
                        json!(ratio),
                        json!(r.f("latency.p99_ms")),
                        json!((wps * 10.0).round() / 10.0),
                        json!(r.f("server_cpu")),
                        json!(r.extra.get("engine_cpu_s").cloned().unwrap_or(Value::Null)),
                    ]);
                    if missing > 0.0 {
                        Some(format!("{missing} clients without a first event"))
                    } else if bad > 0.0 {
                        Some(format!("{bad} misdelivered rows"))
                    } else if ratio.is_nan() || ratio < 0.999 {
                        Some(format!("delivered {:.4} of the writes", ratio))
                    } else if r.f("latency.p99_ms").is_nan() || r.f("latency.p99_ms") > 1000.0 {
                        Some(format!("p99 {:.0} ms", r.f("latency.p99_ms")))
                    } else if wps.is_nan() || wps < 0.9 * anchor_wps {
                        Some(format!(
                            "the engine took {wps:.0} writes/s, {:.2}x what it took with tailgate's one subscription in this run ({anchor_wps:.0})",
                            wps / anchor_wps
                        ))
                    } else {
                        largest = p;
                        sessions_at_largest = r.f("upstream.sessions");
                        None
                    }
                }
            };
            if let Some(why) = why {
                eprintln!("    naive-scoped fails at {p}: {why}");
                failed_at = Some((p, why));
                break;
            }
        }
        let bound = match &failed_at {
            Some((p, why)) => format!("failed at {} partitions: {why}", thousands(*p)),
            None => format!(
                "survived every step tried; the next (10,000) needs 2 descriptors per partition in one process, beyond its {} limit",
                thousands(super::fd_limit() as usize)
            ),
        };
        self.tables.push(super::Table {
            scenario: "scoped".into(),
            title: "naive-scoped: one upstream session per partition".into(),
            columns: [
                "partitions",
                "connected",
                "without first event",
                "engine sessions",
                "engine subscriptions",
                "delivered / written",
                "p99 ms",
                "writes/s taken",
                "server CPU (cores)",
                "engine CPU s",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            rows,
            notes: vec![format!(
                "Largest partition count survived: {} ({bound}). A step survives with every client connected and holding its first event, no misdelivered row, >= 99.9% of the writes delivered after the drain, p99 <= 1 s and the engine taking >= 0.9x the writes/s it took in this run's tailgate scoped runs ({anchor_wps:.0}/s; the writer awaits each UPDATE). Engine sessions counted at the window's end include the load client's writer and the counting session.",
                thousands(largest)
            )],
            detail: json!({ "largest": largest, "failed_at": failed_at.as_ref().map(|f| f.0) }),
        });
        self.goal(
            "scoped",
            &format!(
                "upstream sessions: tailgate (any partition count) vs naive-scoped at its largest ({})",
                thousands(largest)
            ),
            Some((1.0, sessions_at_largest)),
            Limit::Report,
            "sessions",
            &format!(
                "{bound}; at its last step ({} partitions) the engine held {} sessions",
                thousands(sessions_last.0),
                sessions_last.1
            ),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_init_sql_has_one_row_per_customer_and_both_views() {
        let sql = init_sql(1200);
        assert_eq!(sql.matches("INSERT INTO orders").count(), 3);
        assert!(sql.contains("(1199, 1199, 0, 0, '"));
        assert!(!sql.contains("(1200, 1200"));
        assert!(sql.contains(
            "CREATE VIEW orders_v AS SELECT order_id, customer_id, seq, sent_ms, pad FROM orders;"
        ));
        assert!(sql.contains("CREATE VIEW quiet_v"));
    }

    #[test]
    fn configs_are_valid_toml_with_the_template_or_two_plain_streams() {
        let engine: SocketAddr = "127.0.0.1:6875".parse().unwrap();
        let scoped: toml::Table = toml::from_str(&gateway_config(9, engine, true, 10_000)).unwrap();
        let s = scoped["streams"].as_array().unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0]["path"].as_str(), Some("/orders/{customer_id}"));
        assert_eq!(s[0]["max_partitions"].as_integer(), Some(20_000));
        assert_eq!(scoped["server"]["heartbeat"].as_str(), Some("60s"));
        let plain: toml::Table = toml::from_str(&gateway_config(9, engine, false, 10_000)).unwrap();
        let paths: Vec<&str> = plain["streams"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s["path"].as_str())
            .collect();
        assert_eq!(paths, ["/orders", "/quiet"]);
        assert!(plain["upstream"]["url"]
            .as_str()
            .unwrap()
            .ends_with("@127.0.0.1:6875/materialize?sslmode=disable"));
    }
}
