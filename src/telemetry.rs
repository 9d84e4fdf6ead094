//! Logging setup and the process-wide counters behind `/metrics` and `GET /`.
//!
//! Per-stream figures live on each hub ([`crate::hub::Stats`]); this module renders them
//! next to the gateway's own counters in the Prometheus text format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::hub::Hub;
use crate::wire::Health;

/// Installs the `tracing` subscriber; `RUST_LOG` overrides the default level.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}

/// A per-stream metric: name, Prometheus type, and how to read it off a hub.
type Family = (&'static str, &'static str, fn(&Hub) -> u64);

/// Gateway-wide counters.
#[derive(Debug)]
pub struct Metrics {
    pub reload_successful: AtomicBool,
    pub reload_success_unix: AtomicU64,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    /// The last reload error, rendered with file, line and column.
    pub reload_error: Mutex<Option<String>>,
    pub connections: AtomicUsize,
    pub connections_refused: AtomicU64,
    /// Over-limit connections being answered right now.
    pub refusing: AtomicUsize,
    pub stall_disconnects: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            reload_successful: AtomicBool::new(true),
            reload_success_unix: AtomicU64::new(unix_now()),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            reload_error: Mutex::new(None),
            connections: AtomicUsize::new(0),
            connections_refused: AtomicU64::new(0),
            refusing: AtomicUsize::new(0),
            stall_disconnects: AtomicU64::new(0),
        }
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Metrics {
    pub fn reload_ok(&self) {
        self.reload_successful.store(true, Ordering::Relaxed);
        self.reload_success_unix
            .store(unix_now(), Ordering::Relaxed);
        self.reloads_ok.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut e) = self.reload_error.lock() {
            *e = None;
        }
    }

    pub fn reload_failed(&self, error: String) {
        self.reload_successful.store(false, Ordering::Relaxed);
        self.reloads_failed.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut e) = self.reload_error.lock() {
            *e = Some(error);
        }
    }

    pub fn last_reload_error(&self) -> Option<String> {
        self.reload_error.lock().ok().and_then(|e| e.clone())
    }

    /// The Prometheus text exposition of the gateway's counters and of `streams`
    /// (configured path, hub).
    pub fn render<'a>(&self, streams: &[(&'a str, &'a Hub)]) -> String {
        let mut out = String::new();
        let r = Ordering::Relaxed;
        single(
            &mut out,
            "config_last_reload_successful",
            "gauge",
            u64::from(self.reload_successful.load(r)),
        );
        single(
            &mut out,
            "config_last_reload_success_timestamp_seconds",
            "gauge",
            self.reload_success_unix.load(r),
        );
        let _ = writeln!(
            out,
            "# TYPE config_reloads_total counter\nconfig_reloads_total{{result=\"success\"}} {}\nconfig_reloads_total{{result=\"failure\"}} {}",
            self.reloads_ok.load(r),
            self.reloads_failed.load(r)
        );
        let connections = self.connections.load(r) as u64;
        single(&mut out, "http_connections", "gauge", connections);
        single(
            &mut out,
            "http_connections_refused_total",
            "counter",
            self.connections_refused.load(r),
        );
        single(
            &mut out,
            "sse_stall_disconnects_total",
            "counter",
            self.stall_disconnects.load(r),
        );
        let families: [Family; 6] = [
            ("sse_clients", "gauge", |h| {
                h.stats.clients.load(Ordering::Relaxed) as u64
            }),
            ("sse_batches_total", "counter", |h| {
                h.stats.batches.load(Ordering::Relaxed)
            }),
            ("sse_lagged_total", "counter", |h| {
                h.stats.lagged.load(Ordering::Relaxed)
            }),
            ("upstream_errors_total", "counter", |h| {
                h.stats.upstream_errors.load(Ordering::Relaxed)
            }),
            ("sse_resets_total", "counter", |h| {
                h.stats.resets.load(Ordering::Relaxed)
            }),
            ("upstream_last_ts", "gauge", |h| {
                h.stats.last_ts.load(Ordering::Relaxed)
            }),
        ];
        for (name, kind, get) in families {
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (path, hub) in streams {
                let _ = writeln!(out, "{name}{{stream=\"{path}\"}} {}", get(hub));
            }
        }
        let _ = writeln!(out, "# TYPE upstream_up gauge");
        for (path, hub) in streams {
            let up = matches!(hub.health(), Health::Streaming);
            let _ = writeln!(out, "upstream_up{{stream=\"{path}\"}} {}", u8::from(up));
        }
        out
    }
}

/// One unlabelled metric with its `# TYPE` line.
fn single(out: &mut String, name: &str, kind: &str, value: u64) {
    let _ = writeln!(out, "# TYPE {name} {kind}\n{name} {value}");
}
