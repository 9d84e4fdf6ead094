//! The upstream side of one stream: a dedicated connection running
//! `BEGIN; DECLARE c CURSOR FOR SUBSCRIBE ... WITH (PROGRESS)` and a `FETCH ALL c` loop.
//!
//! Rows are grouped by `mz_timestamp`; a timestamp is complete once a progress row
//! passes it. Complete timestamps go through the delay window into the hub. When the
//! link fails (error, closed socket, or no row at all for `progress_timeout`, which
//! reveals a half-open link since progress rows keep coming when nothing changes), the
//! task reconnects with capped, jittered exponential backoff and resumes with
//! `AS OF <frontier - 1>` and `SNAPSHOT = false`, so clients see no gap. If the upstream
//! no longer holds that timestamp, it reads a fresh snapshot and the hub sends clients
//! only the difference.
//!
//! [`StreamTask::run`] is one tokio task per stream; it stops when its cancellation
//! token fires, dropping the connection (which ends the upstream subscription).

mod connect;
pub mod decode;
mod sql;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_postgres::SimpleQueryMessage;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use connect::{ConnectError, Target};
use decode::{DecodeError, Decoded, Layout};

use crate::config::{StreamConfig, UpstreamConfig};
use crate::hub::{Change, Hub, State};
use crate::wire::{Health, Reason};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("{context}: {}", describe(.source))]
    Query {
        context: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("unrecognised upstream version {0:?}")]
    Version(String),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("no row from the upstream for {0:?}; the link is presumed dead")]
    Silent(Duration),
    #[error("the upstream connection closed")]
    Closed,
}

impl UpstreamError {
    /// The upstream no longer holds the timestamp we asked to resume from.
    fn is_history_lost(&self) -> bool {
        match self {
            UpstreamError::Query { source, .. } => source.as_db_error().is_some_and(|db| {
                db.message().contains("is not valid for all inputs")
                    || db.message().contains("could not find a valid timestamp")
            }),
            _ => false,
        }
    }
}

fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

fn query_err(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> UpstreamError {
    move |source| UpstreamError::Query { context, source }
}

/// Timeouts, backoff and limits shared by every stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Rows larger than this (sum of their text values) are a stream error.
    pub max_row_bytes: usize,
    pub connect_timeout: Duration,
    pub progress_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl From<&UpstreamConfig> for Policy {
    fn from(u: &UpstreamConfig) -> Self {
        Policy {
            max_row_bytes: u.max_row_bytes,
            connect_timeout: u.connect_timeout,
            progress_timeout: u.progress_timeout,
            backoff_initial: u.backoff_initial,
            backoff_max: u.backoff_max,
        }
    }
}

/// Everything one stream's upstream task needs.
pub struct StreamTask {
    pub stream: Arc<StreamConfig>,
    pub target: Arc<Target>,
    pub policy: Policy,
    pub hub: Arc<Hub>,
    /// The delay window; it can change on reload without restarting the task.
    pub delay: watch::Receiver<Duration>,
    /// Reason sent with the first snapshot this task loads into an already-ready hub.
    pub reason: Reason,
}

/// What the task must do with the next subscription's output.
enum Phase {
    /// Build a state from scratch and load it as a snapshot.
    Snapshot(Reason),
    /// Build a state from scratch and send clients only the difference.
    Resync,
    /// Changes continue the hub's state.
    Live,
}

/// Per-task state that survives reconnects.
struct Progress {
    phase: Phase,
    /// Everything below this timestamp has been received.
    frontier: Option<u64>,
    coalescer: Coalescer,
}

impl StreamTask {
    pub async fn run(mut self, cancel: CancellationToken) {
        let path = self.stream.path.clone();
        let mut progress = Progress {
            phase: Phase::Snapshot(self.reason),
            frontier: None,
            coalescer: Coalescer::default(),
        };
        let mut attempt: u32 = 0;
        loop {
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.session(&mut progress, &mut attempt) => r,
            };
            let error = match result {
                Ok(()) => {
                    // The subscription completed (a constant relation): nothing more will
                    // come, so keep the state and wait for cancellation.
                    info!(stream = %path, "Upstream subscription completed.");
                    cancel.cancelled().await;
                    return;
                }
                Err(e) => e,
            };
            // What the coalescer holds is complete; an outage must not hold it back.
            progress.coalescer.flush(&self.hub);
            if error.is_history_lost() && matches!(progress.phase, Phase::Live) {
                warn!(stream = %path, error = %error, "Upstream no longer holds our timestamp; resynchronising from a fresh snapshot.");
                progress.phase = Phase::Resync;
                progress.frontier = None;
                continue;
            }
            let text = crate::error::error_chain(&error);
            warn!(stream = %path, error = %text, attempt, "Upstream lost; reconnecting.");
            self.hub
                .stats
                .upstream_errors
                .fetch_add(1, Ordering::Relaxed);
            self.hub.set_health(Health::Reconnecting { error: text });
            let pause = backoff(&self.policy, attempt);
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// One connection's life. Returns `Ok` only if the subscription completed.
    async fn session(
        &mut self,
        progress: &mut Progress,
        attempt: &mut u32,
    ) -> Result<(), UpstreamError> {
        let stream = Arc::clone(&self.stream);
        let (client, conn) = self
            .target
            .connect(&stream.path, self.policy.connect_timeout)
            .await?;
        // The connection task ends when the link does; aborting it on exit closes the
        // socket even if a query is still waiting.
        let mut conn = AbortOnDrop(conn);

        let version = client
            .query_one(sql::VERSION, &[])
            .await
            .map_err(query_err("reading mz_version()"))?;
        let version: String = version
            .try_get(0)
            .map_err(query_err("reading mz_version()"))?;
        let legacy = is_legacy(&version).ok_or_else(|| UpstreamError::Version(version.clone()))?;
        if let Some(cluster) = &stream.cluster {
            client
                .batch_execute(&sql::set_cluster(cluster))
                .await
                .map_err(query_err("setting the cluster"))?;
        }
        let described = client
            .prepare(&sql::describe(&stream.source))
            .await
            .map_err(query_err("describing the relation"))?;
        let relation: Vec<(String, tokio_postgres::types::Type)> = described
            .columns()
            .iter()
            .map(|c| (c.name().to_string(), c.type_().clone()))
            .collect();

        let resume_at = match progress.phase {
            Phase::Live => progress.frontier.map(|f| f.saturating_sub(1)),
            _ => None,
        };
        let subscribe = sql::subscribe(&stream, legacy, resume_at);
        debug!(stream = %stream.path, sql = %subscribe, "Subscribing.");
        client
            .batch_execute(&sql::declare(&subscribe))
            .await
            .map_err(query_err("declaring the subscription"))?;

        let mut layout: Option<Layout> = None;
        let mut building = State::empty(stream.key.is_some());
        let mut pending: BTreeMap<u64, Vec<Change>> = BTreeMap::new();
        let mut keyed_diffs: BTreeMap<u64, decode::KeyedDiffs> = BTreeMap::new();
        let mut announced = false;

        let fetch = || -> Pin<Box<dyn Future<Output = Result<Vec<SimpleQueryMessage>, tokio_postgres::Error>> + Send + '_>> {
            Box::pin(client.simple_query(sql::FETCH))
        };
        let mut in_flight = fetch();
        loop {
            let deadline = progress.coalescer.deadline;
            let messages = tokio::select! {
                r = tokio::time::timeout(self.policy.progress_timeout, &mut in_flight) => match r {
                    Err(_) => return Err(UpstreamError::Silent(self.policy.progress_timeout)),
                    Ok(r) => r.map_err(query_err("fetching"))?,
                },
                _ = &mut conn.0 => return Err(UpstreamError::Closed),
                _ = sleep_until(deadline) => {
                    progress.coalescer.flush(&self.hub);
                    continue;
                }
            };
            in_flight = fetch();
            let mut rows = 0usize;
            for message in messages {
                match message {
                    SimpleQueryMessage::RowDescription(cols) if layout.is_none() => {
                        let names: Vec<&str> = cols.iter().map(|c| c.name()).collect();
                        layout = Some(Layout::new(
                            &names,
                            &relation,
                            stream.key.as_deref(),
                            legacy && stream.key.is_some(),
                            self.policy.max_row_bytes,
                        )?);
                    }
                    SimpleQueryMessage::Row(row) => {
                        rows += 1;
                        let Some(layout) = &layout else {
                            return Err(
                                DecodeError::Layout("row before row description".into()).into()
                            );
                        };
                        match layout.decode(&row)? {
                            Decoded::Data { ts, change } => {
                                pending.entry(ts).or_default().push(change)
                            }
                            Decoded::KeyedDiff { ts, key, row, diff } => {
                                keyed_diffs.entry(ts).or_default().push((key, row, diff));
                            }
                            Decoded::KeyViolation { ts, key } => {
                                pending.entry(ts).or_default().push(self.key_violation(key));
                            }
                            Decoded::Progress(frontier) => {
                                // TAIL era: pair the closed timestamps' keyed diffs.
                                let open = keyed_diffs.split_off(&frontier);
                                for (ts, rows) in std::mem::replace(&mut keyed_diffs, open) {
                                    for change in decode::upserts(rows) {
                                        let change =
                                            change.unwrap_or_else(|key| self.key_violation(key));
                                        pending.entry(ts).or_default().push(change);
                                    }
                                }
                                if !announced {
                                    announced = true;
                                    *attempt = 0;
                                    self.hub.set_health(Health::Streaming);
                                    // Materialize opens with a progress row at the AS OF
                                    // time, before the snapshot rows stamped with it; that
                                    // row closes nothing.
                                    let opening = pending.range(..frontier).next().is_none();
                                    if opening && !matches!(progress.phase, Phase::Live) {
                                        continue;
                                    }
                                }
                                self.close_timestamps(
                                    progress,
                                    &mut building,
                                    &mut pending,
                                    frontier,
                                );
                            }
                        }
                    }
                    _ => {}
                }
            }
            if rows == 0 {
                // FETCH without a timeout returns no rows only once the subscription ended.
                self.close_timestamps(progress, &mut building, &mut pending, u64::MAX);
                progress.coalescer.flush(&self.hub);
                return Ok(());
            }
        }
    }

    /// The change for a key whose value is undefined (several rows at one timestamp):
    /// drop it and say so, but keep streaming; the next clean upsert restores it.
    fn key_violation(&self, key: Box<str>) -> Change {
        warn!(stream = %self.stream.path, key = %key, "Key violation in the upstream's output.");
        self.hub
            .warn(format!("key violation: several rows for key {key}"));
        Change::Upsert { key, row: None }
    }

    /// Hands every timestamp below `frontier` to the hub (or to the state being built).
    fn close_timestamps(
        &self,
        progress: &mut Progress,
        building: &mut State,
        pending: &mut BTreeMap<u64, Vec<Change>>,
        frontier: u64,
    ) {
        // A resumed subscription opens with a progress row at its AS OF time, which is
        // behind what was already received; it closes nothing.
        if progress.frontier.is_some_and(|f| f > frontier) {
            return;
        }
        let rest = pending.split_off(&frontier);
        let closed = std::mem::replace(pending, rest);
        progress.frontier = Some(frontier);
        let at = frontier.saturating_sub(1);
        match progress.phase {
            Phase::Snapshot(_) | Phase::Resync => {
                for change in closed.values().flatten() {
                    building.apply(change);
                }
                let state = std::mem::replace(building, State::empty(self.stream.key.is_some()));
                match progress.phase {
                    Phase::Snapshot(reason) => self.hub.load_snapshot(at, state, reason),
                    _ => {
                        progress.coalescer.flush(&self.hub);
                        self.hub.resync(at, state);
                    }
                }
                progress.phase = Phase::Live;
            }
            Phase::Live => {
                let delay = *self.delay.borrow();
                for (ts, changes) in closed {
                    progress.coalescer.push(&self.hub, delay, ts, changes);
                }
                progress.coalescer.progress(&self.hub, at);
            }
        }
    }
}

/// Folds complete timestamps into one event per delay window.
#[derive(Default)]
struct Coalescer {
    changes: Vec<Change>,
    min_ts: u64,
    /// The last closed timestamp; a flushed event's id.
    closed: u64,
    deadline: Option<Instant>,
}

impl Coalescer {
    fn push(&mut self, hub: &Hub, delay: Duration, ts: u64, changes: Vec<Change>) {
        if delay.is_zero() && self.changes.is_empty() {
            hub.publish(ts, ts, &changes);
            return;
        }
        if self.changes.is_empty() {
            self.min_ts = ts;
            self.deadline = Some(Instant::now() + delay);
        }
        self.changes.extend(changes);
    }

    fn progress(&mut self, hub: &Hub, closed: u64) {
        self.closed = closed;
        if self.changes.is_empty() {
            hub.advance(closed);
        }
    }

    fn flush(&mut self, hub: &Hub) {
        self.deadline = None;
        if self.changes.is_empty() {
            return;
        }
        let changes = std::mem::take(&mut self.changes);
        hub.publish(self.min_ts, self.closed.max(self.min_ts), &changes);
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Whether `mz_version()` names a release before v0.27, where SUBSCRIBE was TAIL.
fn is_legacy(version: &str) -> Option<bool> {
    let v = version.trim().strip_prefix('v')?;
    let mut parts = v.split(|c: char| !c.is_ascii_digit());
    let major: u64 = parts.next()?.parse().ok()?;
    let minor: u64 = parts.next()?.parse().ok()?;
    Some(major == 0 && minor < 27)
}

/// Capped exponential backoff with jitter (between half and all of the step).
fn backoff(timing: &Policy, attempt: u32) -> Duration {
    let step = timing
        .backoff_initial
        .saturating_mul(1u32 << attempt.min(16))
        .min(timing.backoff_max);
    let half = step / 2;
    half + step
        .saturating_sub(half)
        .mul_f64(rand::rng().random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(is_legacy("v0.26.4 (5715fb31f)"), Some(true));
        assert_eq!(is_legacy("v0.27.0-alpha.1 (abc)"), Some(false));
        assert_eq!(
            is_legacy("v0.160.0 (abcdef123, helm chart: 25.2.0)"),
            Some(false)
        );
        assert_eq!(is_legacy("v26.1.0"), Some(false));
        assert_eq!(is_legacy("PostgreSQL 15"), None);
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let t = Policy {
            max_row_bytes: 1,
            connect_timeout: Duration::from_secs(1),
            progress_timeout: Duration::from_secs(1),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
        };
        for attempt in 0..40 {
            let d = backoff(&t, attempt);
            assert!(d <= Duration::from_secs(2));
            assert!(d >= Duration::from_millis(50));
        }
        assert!(backoff(&t, 30) >= Duration::from_secs(1));
        // Jittered: reconnects after a shared outage spread out instead of arriving
        // together. Twenty draws from a continuous range are never all equal unless
        // there is no jitter.
        for attempt in [0, 3, 30] {
            let first = backoff(&t, attempt);
            assert!(
                (0..20).any(|_| backoff(&t, attempt) != first),
                "attempt {attempt}: always {first:?}"
            );
        }
    }

    fn change(n: i64) -> Change {
        Change::Diff {
            row: format!("{{\"n\":{n}}}").into(),
            diff: 1,
        }
    }

    /// Reads what a subscriber of `hub` has been sent so far: (event, id) pairs.
    async fn sent(sub: &mut crate::hub::Subscription) -> Vec<(String, Option<String>)> {
        let mut frames = Vec::new();
        while let Ok(true) =
            tokio::time::timeout(Duration::from_millis(1), sub.next(&mut frames)).await
        {}
        let mut parser = crate::sse::Parser::new();
        let mut items = Vec::new();
        for f in &frames {
            parser.feed(f, &mut items);
        }
        items
            .into_iter()
            .filter_map(|i| match i {
                crate::sse::Item::Event(e) if e.event != "status" => Some((e.event, e.id)),
                _ => None,
            })
            .collect()
    }

    fn hub() -> Arc<Hub> {
        let config = crate::config::parse(
            std::path::Path::new("s.toml"),
            "[[streams]]\npath = \"/a\"\nview = \"v\"\n",
        )
        .expect("valid");
        let hub = Hub::new(crate::hub::Settings::new(
            &config.streams[0],
            crate::config::ClientErrors::Full,
        ));
        hub.load_snapshot(1, State::empty(false), Reason::Initial);
        hub
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_delay_each_timestamp_is_published_at_once() {
        let hub = hub();
        let mut sub = hub.subscribe(crate::wire::Resume::After(1));
        let mut c = Coalescer::default();
        c.push(&hub, Duration::ZERO, 5, vec![change(5)]);
        c.progress(&hub, 5);
        assert_eq!(c.deadline, None);
        assert_eq!(
            sent(&mut sub).await,
            vec![("update".into(), Some("5".into()))]
        );
    }

    /// With a delay, every timestamp closed within the window goes out as one event
    /// when the window (opened by the first change) ends, with the last closed id.
    #[tokio::test(start_paused = true)]
    async fn a_delay_window_coalesces_timestamps_into_one_event() {
        let hub = hub();
        let mut sub = hub.subscribe(crate::wire::Resume::After(1));
        let delay = Duration::from_secs(1);
        let mut c = Coalescer::default();
        let opened = Instant::now();
        c.push(&hub, delay, 5, vec![change(5)]);
        c.progress(&hub, 5);
        assert_eq!(c.deadline, Some(opened + delay));
        tokio::time::sleep(Duration::from_millis(400)).await;
        c.push(&hub, delay, 7, vec![change(7)]);
        c.progress(&hub, 9);
        // The window is the first change's: a later change does not extend it.
        assert_eq!(c.deadline, Some(opened + delay));
        assert!(
            sent(&mut sub).await.is_empty(),
            "nothing before the window ends"
        );
        sleep_until(c.deadline).await;
        assert_eq!(Instant::now(), opened + delay);
        c.flush(&hub);
        assert_eq!(
            sent(&mut sub).await,
            vec![("update".into(), Some("9".into()))]
        );
        assert_eq!(hub.state_ts(), Some(9));
        // An empty window flushes nothing, and progress alone moves the state on.
        c.flush(&hub);
        c.progress(&hub, 12);
        assert!(sent(&mut sub).await.is_empty());
        assert_eq!(hub.state_ts(), Some(12));
    }
}
