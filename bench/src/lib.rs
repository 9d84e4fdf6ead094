//! tailgate's benchmark suite: a load client, two reference servers, and the driver
//! that runs every contender side by side and writes the results table.
//!
//! # Layout
//!
//! | path | what |
//! |---|---|
//! | `src/sse.rs` | the load client's chunked-body decoder and event-stream parser |
//! | `src/measure.rs` | ticks in payloads, latency histogram, per-client accounting |
//! | `src/sys.rs` | clocks, `/proc` samples, sockets on rotating 127.x source addresses |
//! | `src/bin/loadgen.rs` | the load client (N SSE connections, JSON report) |
//! | `src/bin/k0.rs` | the ceiling: encode once, `try_write` to every socket |
//! | `src/bin/naive_axum.rs` | tokio broadcast + `BroadcastStream` + axum `Sse` |
//! | `src/bin/suite.rs` | starts contenders, runs scenarios, writes `results/` |
//! | `tutorial/app.py` | the tutorial's FastAPI + sse-starlette pattern |
//! | `run` | the one command |

pub mod measure;
pub mod sse;
pub mod sys;

/// The payload every synthetic contender sends for tick `seq`: the same fields as the
/// rows of tailgate's `ticks` table, about 120 bytes.
pub fn tick_json(seq: u64, sent_ms: u64) -> String {
    format!("{{\"seq\":{seq},\"sent_ms\":{sent_ms},\"pad\":\"{PAD}\"}}")
}

/// Padding that brings an event to about 120 bytes on the wire.
pub const PAD: &str = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";
