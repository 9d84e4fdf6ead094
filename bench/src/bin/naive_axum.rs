//! naive-axum: what a first version would write. A tokio `broadcast` channel fed by a
//! timer, and per client a `BroadcastStream` mapped to axum `Sse` events, served by
//! `axum::serve` on a plain `TcpListener::bind` (backlog 128), default runtime.
//! Lagged receivers silently skip what they missed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::get;
use axum::Router;
use clap::Parser;
use futures::{Stream, StreamExt};
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;

use tailgate_bench::{tick_json, Schedule};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:7200")]
    listen: SocketAddr,
    /// Ticks per second; 0 sends none (idle).
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 300.0)]
    duration: f64,
}

async fn sse(
    State(tx): State<broadcast::Sender<String>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream = BroadcastStream::new(tx.subscribe())
        .filter_map(|m| async move { m.ok() })
        .map(|data| Ok(Event::default().event("tick").data(data)));
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (tx, _) = broadcast::channel::<String>(1024);
    if args.rate > 0.0 {
        let tx = tx.clone();
        let rate = args.rate;
        tokio::spawn(async move {
            let schedule = Schedule::start(rate);
            let mut interval = tokio::time::interval(schedule.period());
            interval.tick().await;
            let mut seq: u64 = 0;
            loop {
                interval.tick().await;
                seq += 1;
                let _ = tx.send(tick_json(seq, schedule.sent_ms(seq)));
            }
        });
    }
    let app = Router::new().route("/ticks", get(sse)).with_state(tx);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let _ = tokio::time::timeout(
        Duration::from_secs_f64(args.duration),
        axum::serve(listener, app),
    )
    .await;
    std::process::exit(0);
}
