//! The `tailgate` binary. For now only `tailgate engine`, which runs the
//! development engine on its own until Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the Materialize-compatible development engine.
    Engine {
        #[arg(long, default_value = "127.0.0.1:6875")]
        listen: SocketAddr,
        /// SQL file run once at start.
        #[arg(long)]
        init: Option<PathBuf>,
        /// Imitate Materialize v0.26 (TAIL instead of SUBSCRIBE).
        #[arg(long)]
        legacy: bool,
        /// Change history kept for AS OF, e.g. 10m.
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        retain: Duration,
        /// Progress interval, e.g. 1s.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        tick: Duration,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => {
            return Err(format!(
                "invalid duration unit in {s:?} (use ms, s, m or h)"
            ))
        }
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Engine {
            listen,
            init,
            legacy,
            retain,
            tick,
        } => {
            let shutdown = CancellationToken::new();
            let config = tailgate::engine::EngineConfig {
                listen,
                init,
                legacy,
                retain,
                tick,
            };
            let engine = tailgate::engine::start(config, shutdown.clone())
                .await
                .context("starting the engine")?;
            tokio::signal::ctrl_c()
                .await
                .context("waiting for Ctrl-C")?;
            shutdown.cancel();
            engine.stopped().await;
            Ok(())
        }
    }
}
