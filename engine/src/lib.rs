//! The development engine: a Materialize-compatible pgwire server backed by an
//! embedded SQLite.
//!
//! It imitates what a Materialize client sees (as documented for SUBSCRIBE, FETCH and AS OF):
//! SUBSCRIBE/TAIL with progress, AS OF/UP TO and ENVELOPE UPSERT, cursors with
//! FETCH timing, COPY out, Materialize's error codes and version strings. It is
//! a development and test engine, not a production database.
//!
//! # Layout
//! - `lib.rs`: the public API ([`start`], [`RunningEngine`]) and the listener task.
//! - `session/`: one task per connection. `mod.rs` has startup and the pgwire
//!   message loop; the statements are carried out by family in `txn`
//!   (transactions, SET/SHOW), `query` (SELECT, COPY), `cursors` (SUBSCRIBE,
//!   DECLARE, FETCH, CLOSE) and `ddl` (CREATE, DROP, writes); `extended` has the
//!   extended query protocol and `wire` the encoding of results.
//! - `store/`: the SQLite thread. `mod.rs` has the thread and its command loop;
//!   `sqlite` the connection and its SQL functions, `catalog` the tables and
//!   views, `history` the logical clock, change history and AS OF,
//!   `subscriptions` their start, publishing and end, and `incremental` their
//!   maintenance from a write's changed rows.
//! - `sql/`: `lex` (tokenizer, statement splitting), `parse` (the Materialize
//!   statement parser and its AST), `translate` (the rewrite to SQLite) and
//!   `analyze` (result column types, incremental eligibility, identifiers).
//! - `subscribe`: diff consolidation and Materialize's output layouts.
//! - `value`: Postgres types and text/binary encodings.
//! - `error`: [`SqlError`], the client-visible error every failure becomes.
//!
//! # Tasks and shutdown
//! [`start`] spawns the store thread and a listener task; the listener spawns one
//! task per connection on a [`TaskTracker`]. Cancelling the shutdown token stops
//! the listener, ends every session (their subscriptions are unregistered as
//! their cursors drop) and then stops the store thread. [`RunningEngine::stopped`]
//! resolves once all of that has finished.
//!
//! Scheduled statements ([`EngineConfig::schedule`]) run in one task each and stop with
//! the shutdown token.
//!
//! # SQL extensions
//! `mz_epoch_ms()` returns the wall clock in epoch milliseconds (int8), so scheduled
//! writes can carry the time; `now()` returns it as Postgres `timestamptz` text.
//! `mz_internal.mz_sessions` and `mz_internal.mz_subscriptions` list the connected
//! sessions and active subscriptions.

mod error;
mod session;
mod sql;
mod store;
mod subscribe;
mod value;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use error::SqlError;

/// How the engine runs. Built by the CLI (`tailgate engine`) or by the gateway for
/// `[upstream] url = "embedded"`.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Address to listen on; port 0 picks an ephemeral port.
    pub listen: SocketAddr,
    /// SQL file run once at start (tables, views, seed rows).
    pub init: Option<PathBuf>,
    /// Imitate Materialize v0.26: `TAIL` only.
    pub legacy: bool,
    /// How long the change history is kept for `AS OF`.
    pub retain: Duration,
    /// Interval of progress rows when nothing is written.
    pub tick: Duration,
    /// Statements run on timers, so a demo is alive.
    pub schedule: Vec<Scheduled>,
}

/// A statement the engine runs every `every`, as if a client sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scheduled {
    pub every: Duration,
    pub sql: String,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 6875)),
            init: None,
            legacy: false,
            retain: Duration::from_secs(600),
            tick: Duration::from_secs(1),
            schedule: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the engine's SQLite thread")]
    Store(#[source] std::io::Error),
    #[error("cannot read init script {path}")]
    ReadInit {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("init script {path} failed: {message}")]
    Init { path: PathBuf, message: String },
}

/// What the engine is serving right now, as seen from its side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EngineStats {
    /// Connected client sessions (after startup).
    pub sessions: usize,
    /// Active subscriptions (SUBSCRIBE streams, COPY, cursors).
    pub subscriptions: usize,
}

/// A running engine. Dropping it does not stop it; cancel the token given to [`start`].
pub struct RunningEngine {
    addr: SocketAddr,
    counters: Arc<store::Counters>,
    /// The listener task; it waits for every session before it returns.
    listener: tokio::task::JoinHandle<()>,
    store_done: oneshot::Receiver<()>,
}

impl RunningEngine {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            sessions: self.counters.sessions.load(Ordering::Relaxed),
            subscriptions: self.counters.subscriptions.load(Ordering::Relaxed),
        }
    }

    /// Resolves once the listener, every session and the store thread have ended
    /// (after the shutdown token was cancelled).
    pub async fn stopped(self) {
        let _ = self.listener.await;
        let _ = self.store_done.await;
    }
}

/// Starts the engine's listener and returns once it accepts connections.
pub async fn start(
    config: EngineConfig,
    shutdown: CancellationToken,
) -> Result<RunningEngine, EngineError> {
    let init = match &config.init {
        Some(path) => Some((
            path.clone(),
            tokio::fs::read_to_string(path)
                .await
                .map_err(|source| EngineError::ReadInit {
                    path: path.clone(),
                    source,
                })?,
        )),
        None => None,
    };
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| EngineError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| EngineError::Bind {
        addr: config.listen,
        source,
    })?;
    let counters = Arc::new(store::Counters::default());
    let (store, store_done) = store::spawn(
        store::StoreConfig {
            legacy: config.legacy,
            retain: config.retain,
            tick: config.tick,
        },
        counters.clone(),
    )
    .map_err(EngineError::Store)?;
    if let Some((path, sql)) = init {
        if let Err(e) = store
            .call(|reply| store::Command::Script { sql, reply })
            .await
        {
            store.send(store::Command::Shutdown);
            return Err(EngineError::Init {
                path,
                message: e.message,
            });
        }
    }
    // Tracked with the sessions, so the store outlives them all.
    let sessions = TaskTracker::new();
    for write in config.schedule {
        sessions.spawn(scheduled(write, store.clone(), shutdown.clone()));
    }
    let shared = Arc::new(session::Shared::new(
        store.clone(),
        config.legacy,
        counters.clone(),
        shutdown.clone(),
    ));
    let listener_task = tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((tcp, _)) => {
                    sessions.spawn(session::serve(tcp, shared.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Engine accept failed.");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        sessions.close();
        sessions.wait().await;
        store.send(store::Command::Shutdown);
    });
    tracing::info!(addr = %addr, legacy = config.legacy, "Engine listening.");
    Ok(RunningEngine {
        addr,
        counters,
        listener: listener_task,
        store_done,
    })
}

/// Runs one scheduled statement on its timer until `shutdown`; a failure is logged and
/// the next tick tries again.
async fn scheduled(write: Scheduled, store: store::StoreHandle, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(write.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let sql = write.sql.clone();
        if let Err(e) = store
            .call(|reply| store::Command::Script { sql, reply })
            .await
        {
            tracing::warn!(error = %e.message, sql = %write.sql, "Scheduled write failed.");
        }
    }
}
