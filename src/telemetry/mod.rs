//! Logging (`log`) and the process-wide counters behind `/metrics` and `GET /`.
//!
//! Per-stream figures live on each hub ([`crate::hub::Stats`]) and are summed over a
//! scoped stream's channels ([`crate::feed::Figures`]); this module renders them next
//! to the gateway's own counters in the Prometheus text format.

mod log;

pub use log::init_logging;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::feed::{Figures, Target};
use crate::tls::Certificates;
use crate::wire::{EndReason, Health};

/// Why a stream connection ended, as the access log and the metrics tell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// The client closed the connection (or a write to it failed).
    ClientGone,
    /// The client's socket accepted nothing for `send_timeout`.
    SendTimeout,
    /// The client sent data after its stream request.
    SentData,
    /// `max_lifetime` was reached.
    Lifetime,
    /// Access control refused the request (`401` or `403`).
    Denied,
    /// A scoped stream's parameter or filter was refused (`400`).
    BadRequest,
    /// The gateway ended the stream on purpose, and told the client why.
    Told(EndReason),
}

impl StreamEnd {
    pub const ALL: [StreamEnd; 13] = [
        StreamEnd::ClientGone,
        StreamEnd::SendTimeout,
        StreamEnd::SentData,
        StreamEnd::Lifetime,
        StreamEnd::Denied,
        StreamEnd::BadRequest,
        StreamEnd::Told(EndReason::Removed),
        StreamEnd::Told(EndReason::Shutdown),
        StreamEnd::Told(EndReason::Overloaded),
        StreamEnd::Told(EndReason::TokenExpired),
        StreamEnd::Told(EndReason::Forbidden),
        StreamEnd::Told(EndReason::Reconfigured),
        StreamEnd::Told(EndReason::Unavailable),
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StreamEnd::ClientGone => "client-gone",
            StreamEnd::SendTimeout => "send-timeout",
            StreamEnd::SentData => "client-sent-data",
            StreamEnd::Lifetime => "lifetime",
            StreamEnd::Denied => "denied",
            StreamEnd::BadRequest => "bad-request",
            StreamEnd::Told(reason) => reason.as_str(),
        }
    }

    /// The index of this reason in [`StreamEnd::ALL`], for its counter.
    pub fn index(self) -> usize {
        StreamEnd::ALL.iter().position(|e| *e == self).unwrap_or(0)
    }
}

/// Why a request was refused for overload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_connections` open connections.
    MaxConnections,
    /// The client address holds `max_connections_per_ip` streams.
    MaxConnectionsPerIp,
    /// A scoped stream holds `max_partitions` channels.
    MaxPartitions,
}

impl Refusal {
    const ALL: [Refusal; 3] = [
        Refusal::MaxConnections,
        Refusal::MaxConnectionsPerIp,
        Refusal::MaxPartitions,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::MaxConnectionsPerIp => "max_connections_per_ip",
            Refusal::MaxPartitions => "max_partitions",
        }
    }
}

/// A stream's figures with its upstream's state, read once per scrape.
struct Reading {
    figures: Figures,
    up: bool,
    ready: bool,
}

/// A per-stream metric: name, Prometheus type, and how to read it off a reading.
type Family = (&'static str, &'static str, fn(&Reading) -> u64);

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
    /// Connections the public listener took in (not those refused over
    /// `max_connections`): tells how many sockets a set of streams needed.
    pub connections_accepted: AtomicU64,
    pub connections_refused: AtomicU64,
    /// Over-limit connections being answered right now.
    pub refusing: AtomicUsize,
    /// Requests answered with the overload answer, by [`Refusal`].
    refusals: [AtomicU64; 3],
    pub stall_disconnects: AtomicU64,
    /// Finished stream connections, by [`StreamEnd`].
    pub stream_ends: [AtomicU64; 13],
    /// The public listener's certificate, when it serves TLS.
    pub tls: OnceLock<Arc<Certificates>>,
    /// TLS handshakes that failed or did not finish within `head_timeout`.
    pub tls_handshake_failures: AtomicU64,
    /// Open HTTP/2 connections, and the streams open on them.
    pub http2_connections: AtomicUsize,
    pub http2_streams: AtomicUsize,
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
            connections_accepted: AtomicU64::new(0),
            connections_refused: AtomicU64::new(0),
            refusing: AtomicUsize::new(0),
            refusals: Default::default(),
            stall_disconnects: AtomicU64::new(0),
            stream_ends: Default::default(),
            tls: OnceLock::new(),
            tls_handshake_failures: AtomicU64::new(0),
            http2_connections: AtomicUsize::new(0),
            http2_streams: AtomicUsize::new(0),
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

    pub fn refused(&self, why: Refusal) {
        let i = Refusal::ALL.iter().position(|r| *r == why).unwrap_or(0);
        self.refusals[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn last_reload_error(&self) -> Option<String> {
        self.reload_error.lock().ok().and_then(|e| e.clone())
    }

    /// The Prometheus text exposition of the gateway's counters and of `streams`
    /// (configured path, target).
    pub fn render(&self, streams: &[(&str, &Target)]) -> String {
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
            "http_connections_accepted_total",
            "counter",
            self.connections_accepted.load(r),
        );
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
        single(
            &mut out,
            "http2_connections",
            "gauge",
            self.http2_connections.load(r) as u64,
        );
        single(
            &mut out,
            "http2_streams",
            "gauge",
            self.http2_streams.load(r) as u64,
        );
        if let Some(certs) = self.tls.get() {
            let status = certs.status();
            single(
                &mut out,
                "tls_cert_reload_successful",
                "gauge",
                u64::from(status.reload_successful),
            );
            single(
                &mut out,
                "tls_cert_last_reload_success_timestamp_seconds",
                "gauge",
                status.loaded_unix,
            );
            let _ = writeln!(
                out,
                "# TYPE tls_cert_reloads_total counter\ntls_cert_reloads_total{{result=\"success\"}} {}\ntls_cert_reloads_total{{result=\"failure\"}} {}",
                status.reloads_ok, status.reloads_failed
            );
            single(
                &mut out,
                "tls_handshake_failures_total",
                "counter",
                self.tls_handshake_failures.load(r),
            );
        }
        labelled(
            &mut out,
            "http_refused_total",
            Refusal::ALL.iter().map(|r| r.as_str()).zip(&self.refusals),
        );
        labelled(
            &mut out,
            "sse_connections_closed_total",
            StreamEnd::ALL
                .iter()
                .map(|e| e.as_str())
                .zip(&self.stream_ends),
        );
        let readings: Vec<(&str, Reading)> = streams
            .iter()
            .map(|(path, target)| {
                let reading = Reading {
                    figures: target.figures(),
                    up: matches!(target.health(), Health::Streaming),
                    ready: target.readiness().is_ok(),
                };
                (*path, reading)
            })
            .collect();
        let families: [Family; 9] = [
            ("sse_clients", "gauge", |s| s.figures.clients),
            ("sse_batches_total", "counter", |s| s.figures.batches),
            ("sse_lagged_total", "counter", |s| s.figures.lagged),
            ("upstream_errors_total", "counter", |s| {
                s.figures.upstream_errors
            }),
            ("sse_resets_total", "counter", |s| s.figures.resets),
            ("upstream_last_ts", "gauge", |s| s.figures.last_ts),
            ("upstream_up", "gauge", |s| u64::from(s.up)),
            ("stream_ready", "gauge", |s| u64::from(s.ready)),
            ("stream_channels", "gauge", |s| s.figures.channels),
        ];
        let _ = writeln!(out, "# TYPE auth_denied_total counter");
        for (path, reading) in &readings {
            for (reason, n) in crate::hub::DENIALS.iter().zip(&reading.figures.denied) {
                let _ = writeln!(
                    out,
                    "auth_denied_total{{stream=\"{path}\",reason=\"{reason}\"}} {n}"
                );
            }
        }
        for (name, kind, get) in families {
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (path, reading) in &readings {
                let _ = writeln!(out, "{name}{{stream=\"{path}\"}} {}", get(reading));
            }
        }
        out
    }
}

/// A counter with one `reason` label.
fn labelled<'a>(
    out: &mut String,
    name: &str,
    series: impl Iterator<Item = (&'a str, &'a AtomicU64)>,
) {
    let _ = writeln!(out, "# TYPE {name} counter");
    for (reason, value) in series {
        let _ = writeln!(
            out,
            "{name}{{reason=\"{reason}\"}} {}",
            value.load(Ordering::Relaxed)
        );
    }
}

/// One unlabelled metric with its `# TYPE` line.
fn single(out: &mut String, name: &str, kind: &str, value: u64) {
    let _ = writeln!(out, "# TYPE {name} {kind}\n{name} {value}");
}
