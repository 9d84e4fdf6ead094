//! HTTP/2 streams: hyper runs each one in its own task, spawned through [`Streams`],
//! which watches it for the send timeout; and the settings of the HTTP/2 server.
//!
//! Over HTTP/2 a page's streams share one socket, so a client that stops reading one
//! stream blocks nothing at the socket: flow control stops that stream alone. hyper
//! then holds the stream's next frame and stops polling its body until the client
//! grants window, so the client's cursor stays where it is in the hub's shared ring
//! (and gets `snapshot(lagged)` if it reads again after the ring has moved past it).
//! Nothing piles up per stream but that one frame. The send timeout remains: a stream
//! whose body handed hyper a frame that is still waiting for window `send_timeout`
//! later is dropped, which resets it (`RST_STREAM` with `CANCEL`), is counted in
//! `sse_stall_disconnects_total` and logged as `send-timeout`; the connection and its
//! other streams go on. A socket that accepts nothing at all is the connection's write
//! watchdog's business, as over HTTP/1.1 (`conn::drive`).
//!
//! Stream tasks live in the listener's task tracker, so shutdown waits for them.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use hyper_util::rt::TokioTimer;
use tokio::time::{Instant, Sleep};
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::telemetry::Metrics;

/// The receive window offered per stream and per connection. Requests here carry no
/// body, so a client has nothing to send that needs more; a body sent anyway is
/// refused with 413 and never read, and this bounds what it can park here.
const RECV_STREAM_WINDOW: u32 = 16 * 1024;
const RECV_CONNECTION_WINDOW: u32 = 64 * 1024;
/// Data a stream may queue in the HTTP/2 layer beyond what it has sent; past it the
/// stream's body is not polled, and its events wait in the hub's shared ring instead.
const SEND_BUFFER: usize = 64 * 1024;

tokio::task_local! {
    /// The stream whose task this is.
    static STREAM: Arc<StreamWatch>;
}

/// The stream the calling task serves, when it is an HTTP/2 stream's task.
pub(super) fn current_stream() -> Option<Arc<StreamWatch>> {
    STREAM.try_with(Arc::clone).ok()
}

/// One HTTP/2 stream's response, as its body and its task see it.
#[derive(Debug, Default)]
pub(super) struct StreamWatch {
    /// Polls of the response body so far.
    polls: AtomicU64,
    /// The last poll handed hyper a frame: the next one comes once it has been given
    /// window.
    waiting: AtomicBool,
    /// Set when the stream is dropped for the send timeout.
    timed_out: AtomicBool,
}

impl StreamWatch {
    /// The body was polled; `gave_frame` when it handed over a frame.
    pub(super) fn polled(&self, gave_frame: bool) {
        self.polls.fetch_add(1, Ordering::Relaxed);
        self.waiting.store(gave_frame, Ordering::Relaxed);
    }

    pub(super) fn timed_out(&self) -> bool {
        self.timed_out.load(Ordering::Relaxed)
    }

    /// The poll count of a frame still waiting for window, if one is.
    fn waiting(&self) -> Option<u64> {
        self.waiting
            .load(Ordering::Relaxed)
            .then(|| self.polls.load(Ordering::Relaxed))
    }
}

/// hyper's executor for a connection's stream tasks.
#[derive(Clone)]
pub(super) struct Streams {
    pub tracker: TaskTracker,
    pub send_timeout: Duration,
    pub metrics: Arc<Metrics>,
}

impl<F> hyper::rt::Executor<F> for Streams
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        let watch = Arc::new(StreamWatch::default());
        self.metrics.http2_streams.fetch_add(1, Ordering::Relaxed);
        let open = OpenStream(Arc::clone(&self.metrics));
        self.tracker.spawn(guarded(
            STREAM.scope(Arc::clone(&watch), fut),
            watch,
            self.send_timeout,
            open,
        ));
    }
}

/// Counts a stream in `http2_streams` while it lives.
struct OpenStream(Arc<Metrics>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.http2_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs a stream's task until it ends, or until a frame of its body has waited for
/// window for `send_timeout`; then drops it, which resets the stream. The timer exists
/// only while a frame waits.
async fn guarded<F: Future<Output = ()>>(
    stream: F,
    watch: Arc<StreamWatch>,
    send_timeout: Duration,
    open: OpenStream,
) {
    tokio::pin!(stream);
    // The poll count of the waiting frame the timer is for, and the timer.
    let mut timer: Option<(u64, Pin<Box<Sleep>>)> = None;
    let stalled = std::future::poll_fn(|cx| {
        if stream.as_mut().poll(cx).is_ready() {
            return Poll::Ready(false);
        }
        let Some(polls) = watch.waiting() else {
            timer = None;
            return Poll::Pending;
        };
        let deadline = Instant::now() + send_timeout;
        let sleep = match &mut timer {
            Some((seen, sleep)) if *seen == polls => sleep,
            Some((seen, sleep)) => {
                *seen = polls;
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => {
                &mut timer
                    .insert((polls, Box::pin(tokio::time::sleep_until(deadline))))
                    .1
            }
        };
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(true),
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
    if stalled {
        watch.timed_out.store(true, Ordering::Relaxed);
        open.0.stall_disconnects.fetch_add(1, Ordering::Relaxed);
        debug!("HTTP/2 stream got no window for the send timeout; resetting it.");
    }
    // Dropping the stream's task here, with `STREAM` still set for it, resets the
    // stream if it is not over, and logs its access line.
}

/// The HTTP/2 server of one connection: at most `max_streams` streams at once, small
/// receive windows, a bounded send buffer per stream.
pub(super) fn builder(
    streams: Streams,
    max_streams: u32,
) -> hyper::server::conn::http2::Builder<Streams> {
    let mut builder = hyper::server::conn::http2::Builder::new(streams);
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(max_streams)
        .initial_stream_window_size(RECV_STREAM_WINDOW)
        .initial_connection_window_size(RECV_CONNECTION_WINDOW)
        .max_send_buf_size(SEND_BUFFER);
    builder
}
