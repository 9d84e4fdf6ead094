//! The development engine: a Materialize-compatible pgwire server backed by SQLite.
//!
//! (Skeleton: the real implementation lands with issue 2.)

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

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
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 6875)),
            init: None,
            legacy: false,
            retain: Duration::from_secs(600),
            tick: Duration::from_secs(1),
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
    #[error("init script {path} failed: {message}")]
    Init { path: PathBuf, message: String },
}

/// A running engine. Dropping it does not stop it; cancel the token given to [`start`].
pub struct RunningEngine {
    addr: SocketAddr,
}

impl RunningEngine {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Starts the engine's listener and returns once it accepts connections.
pub async fn start(
    config: EngineConfig,
    shutdown: CancellationToken,
) -> Result<RunningEngine, EngineError> {
    let _ = shutdown;
    Ok(RunningEngine {
        addr: config.listen,
    })
}
