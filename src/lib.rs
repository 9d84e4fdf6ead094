//! tailgate: live Materialize views as Server-Sent Events.
//!
//! One TOML file maps URL paths to Materialize views or queries. For each entry the
//! gateway keeps one upstream `SUBSCRIBE` and fans its changes out to any number of
//! browsers; when the file changes, it hot-reloads stream by stream.
//!
//! # Architecture
//!
//! ```text
//! streams.toml --notify--> reload --(diff)--> supervisor
//!                                               | one task per stream
//!                                               v
//! Materialize <--pgwire--> upstream task --batches--> hub (state + history, SSE bytes encoded once)
//!                                                       |
//! browsers <--text/event-stream-- http (hyper + axum) <-+
//! ```
//!
//! # Layout
//!
//! - [`config`]: the file's raw serde mirror, validated into typed [`config::Config`].
//! - [`reload`]: file watching, SIGHUP, the fallback poll, and applying a new file.
//! - [`supervisor`]: the running streams and the route table; applies config diffs.
//! - [`upstream`]: one connection per stream: SUBSCRIBE, FETCH, decode, reconnect, resume.
//! - [`hub`]: per-stream state, resume history, and fan-out of once-encoded events.
//! - [`http`]: the listener, connection tasks, and handlers.
//! - [`sse`]: event-stream encoding and a spec-conforming parser.
//! - [`telemetry`]: logging and metrics.
//! - [`gateway`]: wiring all of the above together.
#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod gateway;
pub mod http;
pub mod hub;
pub mod reload;
pub mod route;
pub mod sse;
pub mod supervisor;
pub mod telemetry;
pub mod upstream;
pub mod wire;

pub use gateway::{Gateway, GatewayError};
