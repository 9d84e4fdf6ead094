//! The TLS and mux scenarios.
//!
//! - `tls`: the fan-out workload (N clients, one stream written at R events/s) against
//!   tailgate serving HTTPS (HTTP/1.1 over TLS; every request then goes through
//!   hyper) and the same gateway serving plaintext (its fast path), interleaved
//!   (plain, tls, plain, tls, ...; `--reps`). Ratios TLS / plaintext of the median
//!   p99 and of the server CPU per delivered event.
//! - `tls-idle`: N idle event streams held over TLS by tailgate and by nginx + nchan
//!   (`listen ... ssl`, the same certificate), with tailgate over plaintext as a
//!   reference row, interleaved; the RSS slope per connection from N/2 to N.
//! - `mux`: three streams on three views, writes to one of them; each client opens
//!   the three through one `/_tailgate/mux` connection, or as three connections. A
//!   tick's latency is its receive time minus its `sent_ms`; on the mux it counts at
//!   the group's last event (the one with the new `id:`), when a client applies the
//!   group. The views nobody writes to advance only by the engine's `tick`, so the
//!   mux's added latency is bounded by it; one set of runs per `--mux-ticks` value.
//!
//! The certificate is made at run time with rcgen: a test CA and a `localhost` leaf
//! signed by it (ECDSA P-256); loadgen trusts the CA.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::json;

use super::{
    fmt_num, median, rss_slope, thousands, Kind, Limit, Load, Reps, Run, Server, Spec, Suite,
};
use tailgate_bench::PAD;

/// The test PKI of one suite run.
#[derive(Clone, Debug)]
pub(super) struct Pki {
    /// The CA certificate (PEM) loadgen trusts.
    pub ca: PathBuf,
    /// The `localhost` leaf (PEM) and its key, for the servers.
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Writes a test CA and a `localhost` (and 127.0.0.1) leaf signed by it into `dir`.
pub(super) fn make_pki(dir: &Path) -> anyhow::Result<Pki> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
    std::fs::create_dir_all(dir)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "tailgate bench test CA");
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()])?;
    leaf.subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let leaf = leaf.signed_by(&key, &ca)?;
    let pki = Pki {
        ca: dir.join("ca.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&pki.ca, ca.pem())?;
    std::fs::write(&pki.cert, leaf.pem())?;
    std::fs::write(&pki.key, key.serialize_pem())?;
    Ok(pki)
}

/// How the mux scenario's clients open the three streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum MuxClients {
    /// One `/_tailgate/mux?s=/a&s=/b&s=/c` connection per client.
    Mux,
    /// Three connections per client, one per stream.
    Separate,
}

/// The mux request of every mux client.
pub(super) const MUX_PATH: &str = "/_tailgate/mux?s=/a&s=/b&s=/c";

impl MuxClients {
    fn name(self) -> &'static str {
        match self {
            MuxClients::Mux => "mux",
            MuxClients::Separate => "separate",
        }
    }

    /// Connections per client.
    fn connections(self) -> usize {
        match self {
            MuxClients::Mux => 1,
            MuxClients::Separate => 3,
        }
    }

    /// What loadgen requests, and who is owed the ticks.
    pub(super) fn client_paths(self, server: &mut Server) {
        match self {
            MuxClients::Mux => {
                server.paths = vec![MUX_PATH.into()];
                server.ticks_on = Vec::new();
                server.group_by_id = true;
            }
            MuxClients::Separate => {
                // Client connections i, i+1, i+2 open /a, /b, /c (round-robin): only
                // the /a connections carry ticks.
                server.paths = ["/a", "/b", "/c"].map(String::from).to_vec();
                server.ticks_on = vec!["/a".into()];
                server.group_by_id = false;
            }
        }
    }
}

/// The mux scenario's data: the written `ticks` table (view `va`) and two tables no
/// one writes to (views `vb`, `vc`), each with a few rows.
pub(super) fn mux_sql() -> String {
    format!(
        "CREATE TABLE ticks (seq bigint, sent_ms bigint, pad text);\n\
         INSERT INTO ticks VALUES (0, 0, '{PAD}');\n\
         CREATE TABLE items (id int, name text, qty int);\n\
         INSERT INTO items VALUES (1, 'one', 10), (2, 'two', 20), (3, 'three', 30);\n\
         CREATE TABLE totals (region text, total bigint);\n\
         INSERT INTO totals VALUES ('north', 100), ('south', 200);\n\
         CREATE VIEW va AS SELECT seq, sent_ms, pad FROM ticks;\n\
         CREATE VIEW vb AS SELECT id, name, qty FROM items WHERE qty > 0;\n\
         CREATE VIEW vc AS SELECT region, total FROM totals;\n"
    )
}

/// The mux scenario's streams.
pub(super) const MUX_STREAMS: &str = "[[streams]]\npath = \"/a\"\nview = \"va\"\n\n\
     [[streams]]\npath = \"/b\"\nview = \"vb\"\n\n\
     [[streams]]\npath = \"/c\"\nview = \"vc\"\n\n";

/// Server CPU per delivered event of one run, µs.
fn cpu_per_event_us(r: &Run) -> f64 {
    let per_s = r.f("delivered_per_s");
    if per_s > 0.0 {
        r.f("server_cpu") / per_s * 1e6
    } else {
        f64::NAN
    }
}

fn med(reps: &Reps, f: impl Fn(&Run) -> f64) -> f64 {
    median(reps.0.iter().map(f).collect())
}

fn each(reps: Option<&Reps>, f: impl Fn(&Run) -> f64) -> String {
    reps.map(|r| {
        r.0.iter()
            .map(|x| fmt_num(f(x)))
            .collect::<Vec<_>>()
            .join("/")
    })
    .unwrap_or_default()
}

impl Suite {
    /// The run's test PKI, made on first use.
    pub(super) fn pki(&mut self) -> anyhow::Result<Pki> {
        if let Some(p) = &self.pki {
            return Ok(p.clone());
        }
        let pki = make_pki(&self.tmp.join("pki")).context("making the test certificate")?;
        self.pki = Some(pki.clone());
        Ok(pki)
    }

    /// Labels the last recorded run (`extra.variant`), for the runs table.
    fn label_last(&mut self, variant: &str) {
        if let Some(r) = self.runs.last_mut() {
            r.extra.insert("variant".into(), json!(variant));
        }
    }

    pub(super) fn tls(&mut self) -> anyhow::Result<()> {
        let n = self.args.tls_clients;
        let load = Load::steady(n, 8.0);
        let rates = self.args.tls_rates.clone();
        let mut by: BTreeMap<(bool, u64), Reps> = BTreeMap::new();
        for &rate in &rates {
            for _ in 0..self.args.reps.max(1) {
                for tls in [false, true] {
                    let variant = if tls { "tls" } else { "plain" };
                    let spec = Spec {
                        tls,
                        ..Spec::new(Kind::Tailgate, rate)
                    };
                    let what = format!("tls/{variant} {rate}/s");
                    if let Some(r) = self.measure_or_skip(&what, "tls", &spec, &load) {
                        self.label_last(variant);
                        by.entry((tls, rate as u64)).or_default().0.push(r);
                    }
                }
            }
        }
        for &rate in &rates {
            let plain = by.get(&(false, rate as u64));
            let tls = by.get(&(true, rate as u64));
            let both = tls.zip(plain);
            self.goal(
                "tls",
                &format!(
                    "delivered at {rate}/s, N={}, TLS vs plaintext",
                    thousands(n)
                ),
                both.map(|(t, p)| (t.delivered_ratio(), p.delivered_ratio())),
                Limit::AtLeast(0.999),
                "share",
                &format!(
                    "delivered/expected over all runs; gaps tls {} plain {}",
                    tls.map_or(f64::NAN, |r| r.sum("gaps")),
                    plain.map_or(f64::NAN, |r| r.sum("gaps"))
                ),
            );
            self.goal(
                "tls",
                &format!("p99 at {rate}/s, N={}, TLS vs plaintext", thousands(n)),
                both.map(|(t, p)| (t.p99(), p.p99())),
                Limit::AtMost(1.5),
                "ms",
                &format!(
                    "the suite's own limit; medians of interleaved runs; p99 per run tls {} ms, plain {} ms; p50 tls {} ms, plain {} ms",
                    each(tls, |r| r.f("latency.p99_ms")),
                    each(plain, |r| r.f("latency.p99_ms")),
                    each(tls, |r| r.f("latency.p50_ms")),
                    each(plain, |r| r.f("latency.p50_ms")),
                ),
            );
            self.goal(
                "tls",
                &format!(
                    "server CPU per delivered event at {rate}/s, TLS vs plaintext"
                ),
                both.map(|(t, p)| (med(t, cpu_per_event_us), med(p, cpu_per_event_us))),
                Limit::AtMost(2.0),
                "µs",
                &format!(
                    "the suite's own limit; per run tls {} µs, plain {} µs; loadgen CPU tls {}, plain {} cores",
                    each(tls, cpu_per_event_us),
                    each(plain, cpu_per_event_us),
                    each(tls, |r| r.f("loadgen_cpu")),
                    each(plain, |r| r.f("loadgen_cpu")),
                ),
            );
        }
        Ok(())
    }

    pub(super) fn tls_idle(&mut self) -> anyhow::Result<()> {
        let n = self.args.tls_idle_clients;
        let half = n / 2;
        let load = Load {
            clients: n,
            connect_rate: 2000.0,
            warmup: 1.0,
            duration: 3.0,
            drain: 0.5,
            rss_at: vec![half],
            connect_timeout: 30.0,
            header_file: None,
            args: Vec::new(),
        };
        let variants: [(&str, Kind, bool); 3] = [
            ("tailgate-tls", Kind::Tailgate, true),
            ("nchan-tls", Kind::Nchan, true),
            ("tailgate-plain", Kind::Tailgate, false),
        ];
        let mut slopes: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        let mut held: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for _ in 0..self.args.reps.max(1) {
            for (variant, kind, tls) in variants {
                let spec = Spec {
                    tls,
                    ..Spec::new(kind, 0.0)
                };
                let what = format!("tls-idle/{variant}");
                let Some(r) = self.measure_or_skip(&what, "tls-idle", &spec, &load) else {
                    continue;
                };
                self.label_last(variant);
                held.entry(variant)
                    .or_default()
                    .push(r.f("connected") - r.f("disconnects"));
                if let Some(s) = rss_slope(&r.report["rss_points"], half) {
                    slopes.entry(variant).or_default().push(s);
                    if let Some(last) = self.runs.last_mut() {
                        last.extra.insert("rss_slope_kb_per_conn".into(), json!(s));
                    }
                }
            }
        }
        let slope = |v: &str| slopes.get(v).map(|s| median(s.clone()));
        let spread = |v: &str| {
            slopes
                .get(v)
                .map(|s| s.iter().map(|x| fmt_num(*x)).collect::<Vec<_>>().join("/"))
                .unwrap_or_default()
        };
        let note = format!(
            "RSS slope {} -> {} connections, medians of interleaved runs; per run KB/conn: tailgate TLS {}, nginx+nchan TLS {}, tailgate plaintext {}",
            thousands(half),
            thousands(n),
            spread("tailgate-tls"),
            spread("nchan-tls"),
            spread("tailgate-plain")
        );
        for (variant, _, _) in variants {
            let h = held
                .get(variant)
                .map(|v| v.iter().cloned().fold(f64::INFINITY, f64::min));
            self.goal(
                "tls-idle",
                &format!("{variant}: idle streams held (fewest of the runs)"),
                h.map(|h| (h, n as f64)),
                Limit::AtLeast(1.0),
                "clients",
                "",
            );
        }
        self.goal(
            "tls-idle",
            "RSS per idle TLS connection, tailgate vs nginx + nchan",
            slope("tailgate-tls").zip(slope("nchan-tls")),
            Limit::AtMost(1.0),
            "KB/conn",
            &format!("the suite's own limit; {note}"),
        );
        self.goal(
            "tls-idle",
            "RSS per idle connection, tailgate TLS vs tailgate plaintext",
            slope("tailgate-tls").zip(slope("tailgate-plain")),
            Limit::Report,
            "KB/conn",
            &note,
        );
        Ok(())
    }

    pub(super) fn mux(&mut self) -> anyhow::Result<()> {
        let n = self.args.mux_clients;
        let rates = self.args.mux_rates.clone();
        let ticks = self.args.mux_ticks.clone();
        for tick in &ticks {
            let tick_ms = humantime::parse_duration(tick)
                .with_context(|| format!("--mux-ticks {tick}"))?
                .as_secs_f64()
                * 1000.0;
            for &rate in &rates {
                let mut by: BTreeMap<MuxClients, Reps> = BTreeMap::new();
                for _ in 0..self.args.reps.max(1) {
                    for mode in [MuxClients::Mux, MuxClients::Separate] {
                        let spec = Spec {
                            mux: Some(mode),
                            tick: Some(tick.clone()),
                            streams: 3,
                            ..Spec::new(Kind::Tailgate, rate)
                        };
                        let load = Load {
                            drain: 3.0,
                            ..Load::steady(n * mode.connections(), 10.0)
                        };
                        let what = format!("mux/{} tick {tick} {rate}/s", mode.name());
                        if let Some(r) = self.measure_or_skip(&what, "mux", &spec, &load) {
                            self.label_last(&format!("{} tick={tick}", mode.name()));
                            by.entry(mode).or_default().0.push(r);
                        }
                    }
                }
                let mux = by.get(&MuxClients::Mux);
                let sep = by.get(&MuxClients::Separate);
                let both = mux.zip(sep);
                let at = format!("{rate} writes/s, tick {tick}, {} clients", thousands(n));
                let per_run = format!(
                    "medians of interleaved runs; per run mux p50 {} / p99 {} ms, separate p50 {} / p99 {} ms",
                    each(mux, |r| r.f("latency.p50_ms")),
                    each(mux, |r| r.f("latency.p99_ms")),
                    each(sep, |r| r.f("latency.p50_ms")),
                    each(sep, |r| r.f("latency.p99_ms")),
                );
                self.goal(
                    "mux",
                    &format!("delivered through the mux, {at} (delivered / expected)"),
                    mux.map(|m| (m.sum("delivered"), m.sum("expected"))),
                    Limit::AtLeast(0.999),
                    "ticks",
                    &format!(
                        "separate: {:.4}; gaps mux {} separate {}",
                        sep.map_or(f64::NAN, |s| s.delivered_ratio()),
                        mux.map_or(f64::NAN, |r| r.sum("gaps")),
                        sep.map_or(f64::NAN, |r| r.sum("gaps"))
                    ),
                );
                self.goal(
                    "mux",
                    &format!("p50, mux vs three connections, {at}"),
                    both.map(|(m, s)| {
                        (
                            med(m, |r| r.f("latency.p50_ms")),
                            med(s, |r| r.f("latency.p50_ms")),
                        )
                    }),
                    Limit::Report,
                    "ms",
                    &per_run,
                );
                self.goal(
                    "mux",
                    &format!("p99, mux vs three connections, {at}"),
                    both.map(|(m, s)| (m.p99(), s.p99())),
                    Limit::Report,
                    "ms",
                    &per_run,
                );
                self.goal(
                    "mux",
                    &format!("p99 the mux adds (mux - separate) vs the engine tick, {at}"),
                    both.map(|(m, s)| (m.p99() - s.p99(), tick_ms)),
                    Limit::AtMost(1.0),
                    "ms",
                    "README: the added latency is bounded by the slowest stream's progress; here the unwritten views progress once per tick",
                );
            }
        }
        Ok(())
    }
}
