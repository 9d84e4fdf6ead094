//! The upstream side: one source per distinct subscription (view or query, key and
//! cluster), a dedicated connection running
//! `BEGIN; DECLARE c CURSOR FOR SUBSCRIBE ... WITH (PROGRESS)` and a `FETCH ALL c` loop,
//! feeding every stream on it.
//!
//! Rows are grouped by `mz_timestamp`; a timestamp is complete once a progress row
//! passes it. Complete timestamps go to every stream's feed (`feed`), which applies
//! its own delay window, shape and partitions. When the
//! link fails (error, closed socket, or no row at all for `progress_timeout`, which
//! reveals a half-open link since progress rows keep coming when nothing changes), the
//! task reconnects with capped, jittered exponential backoff and resumes with
//! `AS OF <frontier - 1>` and `SNAPSHOT = false`, so clients see no gap. If the upstream
//! no longer holds that timestamp, it reads a fresh snapshot and the feeds send clients
//! only the difference. A stream attached to a running source makes it read a fresh
//! snapshot the same way.
//!
//! [`SourceTask::run`] is one tokio task per source; it stops when its cancellation
//! token fires, dropping the connection (which ends the upstream subscription).

mod connect;
pub mod decode;
mod sql;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_postgres::SimpleQueryMessage;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use connect::{ConnectError, Target};
use decode::{DecodeError, Decoded, Layout};

use crate::config::{Source, StreamConfig, StreamPath, UpstreamConfig};
use crate::feed::{Feed, SourceState};
use crate::row::{Columns, SourceChange};
use crate::wire::Health;

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

/// What a source subscribes to. Streams with equal keys share one subscription.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceKey {
    pub source: Source,
    pub key: Option<Vec<String>>,
    pub cluster: Option<String>,
}

impl SourceKey {
    pub fn of(stream: &StreamConfig) -> SourceKey {
        SourceKey {
            source: stream.source.clone(),
            key: stream.key.clone(),
            cluster: stream.cluster.clone(),
        }
    }
}

/// A change to the streams a running source feeds.
pub enum Command {
    /// Feed another stream: the source reads a fresh snapshot for it (the others
    /// get only what changed, normally nothing).
    Attach(Box<Feed>),
    /// Stop feeding the stream at this path.
    Detach(StreamPath),
}

/// One upstream subscription and the streams it feeds: see the module documentation.
pub struct SourceTask {
    pub key: SourceKey,
    pub target: Arc<Target>,
    pub policy: Policy,
    pub feeds: Vec<Feed>,
    pub commands: mpsc::UnboundedReceiver<Command>,
}

/// What the next subscription must read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A snapshot, from scratch: new feeds load it, live ones get the difference.
    Snapshot,
    /// Changes after the frontier: every feed is live.
    Live,
}

/// Per-task state that survives reconnects.
struct Progress {
    phase: Phase,
    /// Everything below this timestamp has been received.
    frontier: Option<u64>,
}

/// Why a session ended without an error to report.
enum Ended {
    /// The subscription completed (a constant relation).
    Completed,
    /// A stream was attached: read a fresh snapshot at once.
    Restart,
}

impl SourceTask {
    /// The source's name in logs and its sessions' application name: its first
    /// stream's path.
    fn name(&self) -> StreamPath {
        self.feeds
            .first()
            .map_or_else(|| StreamPath::from("(none)"), |f| f.stream.path.clone())
    }

    pub async fn run(mut self, cancel: CancellationToken) {
        let mut progress = Progress {
            phase: Phase::Snapshot,
            frontier: None,
        };
        let mut attempt: u32 = 0;
        loop {
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.session(&mut progress, &mut attempt) => r,
            };
            // What delay windows hold is complete; an outage must not hold it back.
            for feed in &mut self.feeds {
                feed.flush();
            }
            let error = match result {
                Ok(Ended::Restart) => continue,
                Ok(Ended::Completed) => {
                    // Nothing more will come: keep the state, but still follow the
                    // streams attached or detached until cancelled.
                    info!(source = %self.name(), "Upstream subscription completed.");
                    loop {
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            Some(command) = self.commands.recv() => {
                                if self.command(command) {
                                    progress.phase = Phase::Snapshot;
                                    break;
                                }
                            }
                        }
                    }
                    continue;
                }
                Err(e) => e,
            };
            if error.is_history_lost() && progress.phase == Phase::Live {
                warn!(source = %self.name(), error = %error, "Upstream no longer holds our timestamp; resynchronising from a fresh snapshot.");
                progress.phase = Phase::Snapshot;
                progress.frontier = None;
                continue;
            }
            let text = crate::error::error_chain(&error);
            warn!(source = %self.name(), error = %text, attempt, "Upstream lost; reconnecting.");
            for feed in &self.feeds {
                feed.upstream_error();
                feed.set_health(Health::Reconnecting {
                    error: text.clone(),
                });
            }
            let pause = backoff(&self.policy, attempt);
            attempt = attempt.saturating_add(1);
            let wake = tokio::time::Instant::now() + pause;
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep_until(wake) => break,
                    Some(command) = self.commands.recv() => {
                        if self.command(command) {
                            progress.phase = Phase::Snapshot;
                        }
                    }
                }
            }
        }
    }

    /// Applies a command; true when a feed was attached (it needs a snapshot).
    fn command(&mut self, command: Command) -> bool {
        match command {
            Command::Attach(feed) => {
                self.feeds.push(*feed);
                true
            }
            Command::Detach(path) => {
                self.feeds.retain(|f| f.stream.path != path);
                false
            }
        }
    }

    /// One connection's life.
    async fn session(
        &mut self,
        progress: &mut Progress,
        attempt: &mut u32,
    ) -> Result<Ended, UpstreamError> {
        let key = self.key.clone();
        // The set-up futures are boxed: held inline, the largest of them (connect,
        // with its TLS handshake) would size this task for its whole life.
        let (client, conn) = Box::pin(
            self.target
                .connect(&self.name(), self.policy.connect_timeout),
        )
        .await?;
        // The connection task ends when the link does; aborting it on exit closes the
        // socket even if a query is still waiting.
        let mut conn = AbortOnDrop(conn);

        let version = Box::pin(client.query_one(sql::VERSION, &[]))
            .await
            .map_err(query_err("reading mz_version()"))?;
        let version: String = version
            .try_get(0)
            .map_err(query_err("reading mz_version()"))?;
        let legacy = is_legacy(&version).ok_or_else(|| UpstreamError::Version(version.clone()))?;
        if let Some(cluster) = &key.cluster {
            Box::pin(client.batch_execute(&sql::set_cluster(cluster)))
                .await
                .map_err(query_err("setting the cluster"))?;
        }
        let described = Box::pin(client.prepare(&sql::describe(&key.source)))
            .await
            .map_err(query_err("describing the relation"))?;
        let relation: Vec<(String, tokio_postgres::types::Type)> = described
            .columns()
            .iter()
            .map(|c| (c.name().to_string(), c.type_().clone()))
            .collect();
        let columns = Columns {
            names: relation.iter().map(|(n, _)| n.clone()).collect(),
            types: relation.iter().map(|(_, t)| t.clone()).collect(),
        };
        for feed in &mut self.feeds {
            feed.columns(&columns);
        }

        let resume_at = match progress.phase {
            Phase::Live => progress.frontier.map(|f| f.saturating_sub(1)),
            Phase::Snapshot => None,
        };
        let subscribe = sql::subscribe(&key.source, key.key.as_deref(), legacy, resume_at);
        debug!(source = %self.name(), sql = %subscribe, "Subscribing.");
        Box::pin(client.batch_execute(&sql::declare(&subscribe)))
            .await
            .map_err(query_err("declaring the subscription"))?;

        let mut layout: Option<Layout> = None;
        let mut building = SourceState::empty(key.key.is_some());
        let mut pending: BTreeMap<u64, Vec<SourceChange>> = BTreeMap::new();
        let mut keyed_diffs: BTreeMap<u64, decode::KeyedDiffs> = BTreeMap::new();
        let mut announced = false;

        let fetch = || -> Pin<Box<dyn Future<Output = Result<Vec<SimpleQueryMessage>, tokio_postgres::Error>> + Send + '_>> {
            Box::pin(client.simple_query(sql::FETCH))
        };
        let mut in_flight = fetch();
        loop {
            let deadline = self.feeds.iter().filter_map(Feed::deadline).min();
            let messages = tokio::select! {
                r = tokio::time::timeout(self.policy.progress_timeout, &mut in_flight) => match r {
                    Err(_) => return Err(UpstreamError::Silent(self.policy.progress_timeout)),
                    Ok(r) => r.map_err(query_err("fetching"))?,
                },
                _ = &mut conn.0 => return Err(UpstreamError::Closed),
                _ = sleep_until(deadline) => {
                    let now = Instant::now();
                    for feed in &mut self.feeds {
                        if feed.deadline().is_some_and(|d| d <= now) {
                            feed.flush();
                        }
                    }
                    continue;
                }
                Some(command) = self.commands.recv() => {
                    if self.command(command) {
                        progress.phase = Phase::Snapshot;
                        return Ok(Ended::Restart);
                    }
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
                            key.key.as_deref(),
                            legacy && key.key.is_some(),
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
                                    for feed in &self.feeds {
                                        feed.set_health(Health::Streaming);
                                    }
                                    // Materialize opens with a progress row at the AS OF
                                    // time, before the snapshot rows stamped with it; that
                                    // row closes nothing.
                                    let opening = pending.range(..frontier).next().is_none();
                                    if opening && progress.phase == Phase::Snapshot {
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
                for feed in &mut self.feeds {
                    feed.flush();
                }
                return Ok(Ended::Completed);
            }
        }
    }

    /// The change for a key whose value is undefined (several rows at one timestamp):
    /// drop it and say so, but keep streaming; the next clean upsert restores it.
    fn key_violation(&self, key: Box<str>) -> SourceChange {
        warn!(source = %self.name(), key = %key, "Key violation in the upstream's output.");
        for feed in &self.feeds {
            feed.warn(format!("key violation: several rows for key {key}"));
        }
        SourceChange::Upsert { key, row: None }
    }

    /// Hands every timestamp below `frontier` to the feeds (or to the state being
    /// built).
    fn close_timestamps(
        &mut self,
        progress: &mut Progress,
        building: &mut SourceState,
        pending: &mut BTreeMap<u64, Vec<SourceChange>>,
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
            Phase::Snapshot => {
                for change in closed.values().flatten() {
                    building.apply(change);
                }
                let state = std::mem::replace(building, SourceState::empty(self.key.key.is_some()));
                for feed in &mut self.feeds {
                    feed.load(at, &state);
                }
                progress.phase = Phase::Live;
            }
            Phase::Live => {
                for feed in &mut self.feeds {
                    for (ts, changes) in &closed {
                        feed.push(*ts, changes);
                    }
                    feed.progress(at);
                }
            }
        }
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
}
