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
//! Modules form a DAG; each uses only those listed after it.
//!
//! - [`gateway`]: wiring: the engine, the listener, the supervisor, the HTTP server,
//!   the reload loop and shutdown.
//! - [`http`]: the listener, connection deadlines, the event-stream fast path, TLS with
//!   HTTP/2 and HTTP/1.1, handlers, and the pages and browser client the gateway
//!   serves (`clients/js/` compiled in).
//! - [`reload`]: file watching, SIGHUP, the fallback poll, and checking a new file.
//! - [`supervisor`]: the running streams; applies a new config as a per-stream diff.
//! - [`route`]: the route table the HTTP layer reads, and the heartbeat task.
//! - [`upstream`]: one connection per stream: SUBSCRIBE, FETCH, decode, reconnect, resume.
//! - [`telemetry`]: logging and metrics.
//! - [`hub`]: per-stream state, resume history, and fan-out of once-encoded events.
//! - [`auth`]: tokens: finding, verifying, and admitting them to streams.
//! - [`config`]: the file's raw serde mirror, validated into typed [`config::Config`].
//! - [`tls`]: the public listener's certificate: checking a pair, the resolver that
//!   swaps it, and the task that reloads it when its files change.
//! - [`wire`]: the wire contract browsers see.
//! - [`sse`]: event-stream framing and a spec-conforming parser.
//! - [`error`]: rendering an error with its causes.
//!
//! The development engine is its own crate, `tailgate_engine`.
#![forbid(unsafe_code)]

pub mod auth;
pub mod config;
pub mod error;
pub mod feed;
pub mod gateway;
pub mod http;
pub mod hub;
pub mod mux;
pub mod reload;
pub mod route;
pub mod row;
pub mod sse;
pub mod supervisor;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod wire;

pub use gateway::{Gateway, GatewayError};
