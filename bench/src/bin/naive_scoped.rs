//! naive-scoped: what a first version of per-partition streams would write. Every
//! request for `/orders/{c}` opens its own pgwire session and runs
//! `COPY (SUBSCRIBE (SELECT <columns> FROM <view> WHERE <column> = c)) TO STDOUT`,
//! and each COPY row becomes one axum `Sse` event. So the engine holds one session and
//! one subscription per connected client (here: per partition), where tailgate holds
//! one for all of them. Served by `axum::serve` on a listener with backlog 4096, so
//! the accept queue is not what limits it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use clap::Parser;
use futures::{stream, StreamExt};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:7300")]
    listen: SocketAddr,
    /// The engine, e.g. "host=127.0.0.1 port=6875 user=materialize dbname=materialize".
    #[arg(long)]
    engine: String,
    #[arg(long, default_value = "orders_v")]
    view: String,
    /// The partition column (the path's parameter).
    #[arg(long, default_value = "customer_id")]
    column: String,
    /// The view's columns, in order (COPY rows carry no names).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "order_id,customer_id,seq,sent_ms,pad"
    )]
    columns: Vec<String>,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 600.0)]
    duration: f64,
}

struct App {
    args: Args,
}

/// One COPY text row (`mz_timestamp`, `mz_diff`, then the view's columns) as
/// tailgate's event data; integers as numbers, anything else as a string.
fn event_data(line: &[u8], columns: &[String]) -> Option<(String, String)> {
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\n');
    let mut fields = line.split('\t');
    let ts = fields.next()?;
    let diff: i64 = fields.next()?.parse().ok()?;
    let mut row = serde_json::Map::new();
    for (name, value) in columns.iter().zip(fields) {
        let v = match value.parse::<i64>() {
            Ok(n) => serde_json::Value::from(n),
            Err(_) if value == "\\N" => serde_json::Value::Null,
            Err(_) => serde_json::Value::from(value),
        };
        row.insert(name.clone(), v);
    }
    let data = serde_json::json!({ "ts": ts, "changes": [{ "diff": diff, "row": row }] });
    Some((ts.to_string(), data.to_string()))
}

async fn partition(State(app): State<Arc<App>>, Path(c): Path<i64>) -> Response {
    let a = &app.args;
    let conninfo = format!("{} application_name=naive-scoped", a.engine);
    let (client, connection) = match tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await
    {
        Ok(x) => x,
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    };
    tokio::spawn(connection);
    let sql = format!(
        "COPY (SUBSCRIBE (SELECT {} FROM {} WHERE {} = {c})) TO STDOUT",
        a.columns.join(", "),
        a.view,
        a.column
    );
    let copy = match client.copy_out(sql.as_str()).await {
        Ok(s) => s,
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    };
    let columns = a.columns.clone();
    // SUBSCRIBE's first rows, at its first timestamp, are the partition's snapshot:
    // they go out as `event: snapshot`, like tailgate's initial state.
    let mut first_ts: Option<String> = None;
    // The client lives as long as the stream: dropping it ends the session.
    let events = stream::unfold((Box::pin(copy), client), |(mut copy, client)| async move {
        let chunk: Bytes = copy.next().await?.ok()?;
        Some((chunk, (copy, client)))
    })
    .flat_map(move |chunk| {
        let events: Vec<Result<Event, Infallible>> = chunk
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .filter_map(|l| event_data(l, &columns))
            .map(|(ts, d)| {
                let first = first_ts.get_or_insert_with(|| ts.clone());
                let ev = Event::default().data(d);
                Ok(if *first == ts {
                    ev.event("snapshot")
                } else {
                    ev
                })
            })
            .collect();
        stream::iter(events)
    });
    Sse::new(events).into_response()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listen = args.listen;
    let duration = args.duration;
    let app = Router::new()
        .route("/orders/{c}", get(partition))
        .with_state(Arc::new(App { args }));
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(listen)?;
    let listener = socket.listen(4096)?;
    let _ = tokio::time::timeout(
        Duration::from_secs_f64(duration),
        axum::serve(listener, app),
    )
    .await;
    std::process::exit(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_rows_become_tailgate_shaped_events() {
        let cols: Vec<String> = ["order_id", "customer_id", "seq", "pad"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (ts, d) = event_data(b"1795901281426\t1\t7\t7\t3\txx\n", &cols).unwrap();
        assert_eq!(ts, "1795901281426");
        let v: serde_json::Value = serde_json::from_str(&d).unwrap();
        assert_eq!(v["ts"], "1795901281426");
        assert_eq!(v["changes"][0]["diff"], 1);
        assert_eq!(v["changes"][0]["row"]["customer_id"], 7);
        assert_eq!(v["changes"][0]["row"]["pad"], "xx");
        assert!(event_data(b"garbage", &cols).is_none());
    }
}
