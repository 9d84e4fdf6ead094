//! The `tailgate` command: serve, check a config, or run the development engine.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::error;

use tailgate::config::{self, ConfigError, LogFormat};
use tailgate::error::error_chain;
use tailgate::telemetry;
use tailgate::Gateway;
use tailgate_engine::EngineConfig;

/// sysexits' EX_CONFIG-style code for a bad config file.
const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    version,
    about = "Serve Materialize views as live Server-Sent Events streams"
)]
struct Cli {
    /// The streams file.
    #[arg(
        long,
        short,
        global = true,
        default_value = "streams.toml",
        env = "TAILGATE_CONFIG"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the streams of the config file (the default).
    Serve,
    /// Validate the config file; exit 0 if valid, 64 if not.
    Check,
    /// Run the development engine on its own.
    Engine {
        #[arg(long, default_value = "127.0.0.1:6875")]
        listen: std::net::SocketAddr,
        /// SQL run once at start.
        #[arg(long)]
        init: Option<PathBuf>,
        /// Imitate Materialize v0.26 (TAIL instead of SUBSCRIBE).
        #[arg(long)]
        legacy: bool,
        /// How long change history is kept for AS OF.
        #[arg(long, default_value = "10m", value_parser = config::parse_duration)]
        retain: Duration,
        /// Interval of progress rows.
        #[arg(long, default_value = "1s", value_parser = config::parse_duration)]
        tick: Duration,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Check => match config::load(&cli.config) {
            Ok(c) => {
                println!(
                    "{}: ok, {} stream(s)",
                    cli.config.display(),
                    c.streams.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => bad_config(&e),
        },
        Command::Serve => {
            // The config chooses the log format, so it is read (and reported on) first.
            let config = match config::load(&cli.config) {
                Ok(c) => c,
                Err(e) => return bad_config(&e),
            };
            telemetry::init_logging(config.server.log_format);
            run(serve(config))
        }
        Command::Engine {
            listen,
            init,
            legacy,
            retain,
            tick,
        } => {
            telemetry::init_logging(LogFormat::Text);
            run(engine(EngineConfig {
                listen,
                init,
                legacy,
                retain,
                tick,
                schedule: Vec::new(),
            }))
        }
    }
}

/// Runs `work` on a multi-threaded runtime.
fn run(work: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(work),
        Err(e) => {
            error!(error = %e, "Cannot start the async runtime.");
            ExitCode::FAILURE
        }
    }
}

/// Serves the gateway until SIGINT or SIGTERM.
async fn serve(config: config::Config) -> ExitCode {
    let gateway = match Gateway::build(config).await {
        Ok(g) => g,
        Err(e) => {
            error!(error = %error_chain(&e), "Cannot start.");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = gateway.shutdown_token();
    tokio::spawn(async move {
        wait_for_signal().await;
        shutdown.cancel();
    });
    gateway.run_until_stopped().await;
    ExitCode::SUCCESS
}

/// Runs the development engine until SIGINT or SIGTERM.
async fn engine(config: EngineConfig) -> ExitCode {
    let shutdown = CancellationToken::new();
    let legacy = config.legacy;
    match tailgate_engine::start(config, shutdown.clone()).await {
        Ok(running) => {
            tracing::info!(addr = %running.local_addr(), legacy, "Development engine listening.");
            wait_for_signal().await;
            shutdown.cancel();
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!(error = %error_chain(&e), "Cannot start the engine.");
            ExitCode::FAILURE
        }
    }
}

fn bad_config(e: &ConfigError) -> ExitCode {
    eprintln!("{e}");
    ExitCode::from(EXIT_BAD_CONFIG)
}

/// Resolves on SIGINT or SIGTERM.
async fn wait_for_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
