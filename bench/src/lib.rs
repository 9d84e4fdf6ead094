//! tailgate's benchmark suite: a load client, two reference servers, and the driver
//! that runs every contender side by side and writes the results table.
//!
//! # Layout
//!
//! | path | what |
//! |---|---|
//! | `src/sse.rs` | the load client's response head, chunked-body decoder and event-stream parser |
//! | `src/measure.rs` | ticks in payloads, latency histogram, per-client accounting |
//! | `src/sys.rs` | clocks, `/proc` samples, sockets on rotating 127.x source addresses |
//! | `src/chart.rs` | SVG line charts of measured results (plotters, no fonts needed) |
//! | `src/jwt.rs` | HS256 tokens for the auth scenario |
//! | `src/probe.rs` | one-shot HTTP GETs (`/readyz`, the listing) and a timestamping event-stream watcher |
//! | `src/lib.rs` | `tick_json` and `Schedule`: the payload and tick clock of every synthetic producer |
//! | `src/bin/loadgen.rs` | the load client (N SSE connections, JSON report) |
//! | `src/bin/k0.rs` | the ceiling: encode once, `try_write` to every socket |
//! | `src/bin/naive_axum.rs` | tokio broadcast + `BroadcastStream` + axum `Sse` |
//! | `src/bin/suite/main.rs` | starts contenders, runs scenarios, writes `results/` |
//! | `src/bin/suite/charts.rs` | the fan-out and idle charts, from the runs just measured |
//! | `src/bin/suite/views.rs` | the views scenario: 1,000 streams in one process |
//! | `src/bin/suite/auth.rs` | the auth scenario: the connect storm with JWT auth on and off |
//! | `src/bin/suite/tlsmux.rs` | the tls, tls-idle and mux scenarios, and the run's test certificate (rcgen) |
//! | `tutorial/app.py` | the tutorial's FastAPI + sse-starlette pattern |
//! | `run` | the one command |

pub mod chart;
pub mod jwt;
pub mod measure;
pub mod probe;
pub mod sse;
pub mod sys;

/// The payload every synthetic contender sends for tick `seq`: the same fields as the
/// rows of tailgate's `ticks` table, about 120 bytes.
pub fn tick_json(seq: u64, sent_ms: u64) -> String {
    format!("{{\"seq\":{seq},\"sent_ms\":{sent_ms},\"pad\":\"{PAD}\"}}")
}

/// Padding that brings an event to about 120 bytes on the wire.
pub const PAD: &str = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";

/// The clock every synthetic producer (k0, naive-axum, loadgen's publishers) ticks by:
/// tick `seq` (from 1) is due `seq` periods after the start, and its `sent_ms` is that
/// due time on the epoch clock, so a producer that falls behind shows up as latency.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    start: tokio::time::Instant,
    start_ms: u64,
    period: std::time::Duration,
}

impl Schedule {
    /// Starts now, at `rate` ticks per second (> 0).
    pub fn start(rate: f64) -> Self {
        Self {
            start: tokio::time::Instant::now(),
            start_ms: sys::now_ms(),
            period: std::time::Duration::from_secs_f64(1.0 / rate),
        }
    }

    pub fn period(&self) -> std::time::Duration {
        self.period
    }

    /// When tick `seq` is due.
    pub fn due(&self, seq: u64) -> tokio::time::Instant {
        self.start + self.period * seq as u32
    }

    /// The `sent_ms` of tick `seq`.
    pub fn sent_ms(&self, seq: u64) -> u64 {
        self.start_ms + (self.period * seq as u32).as_millis() as u64
    }

    /// How many ticks are due by now.
    pub fn due_now(&self) -> u64 {
        self.start.elapsed().div_duration_f64(self.period) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedule_ticks_once_per_period() {
        let s = Schedule::start(20.0);
        assert_eq!(s.period(), std::time::Duration::from_millis(50));
        assert_eq!(s.sent_ms(3) - s.sent_ms(0), 150);
        assert_eq!(s.due(4) - s.due(1), std::time::Duration::from_millis(150));
        assert!(s.due_now() < 20, "no tick is due this soon");
    }
}
