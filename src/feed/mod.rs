//! Feeds: what one configured stream makes of its source's changes. Streams on the
//! same view or query (with the same key and cluster) share one upstream
//! subscription, the source; each stream has a feed, which shapes the rows (its
//! `columns`), splits them by partition (its template and `scope`) and filters
//! (`partitioned`), coalesces timestamps over its own `delay`, and hands the result to
//! the hubs its clients read.
//!
//! A feed is driven by its source's task (`upstream`); the [`Target`] is what the
//! route table hands the HTTP layer. A feed spawns no tasks.

pub mod partitioned;
pub mod values;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::StreamConfig;
use crate::hub::{Change, Hub, NotReady, State};
use crate::row::{Columns, Row, SourceChange};
use crate::wire::{EndReason, Health, Reason};
pub use partitioned::Partitioned;

/// A whole relation state at the source, as decoded rows.
#[derive(Debug, Clone)]
pub enum SourceState {
    /// Row → multiplicity.
    Diff(HashMap<Arc<Row>, i64>),
    /// Key JSON → row.
    Keyed(HashMap<Box<str>, Arc<Row>>),
}

impl SourceState {
    pub fn empty(keyed: bool) -> SourceState {
        if keyed {
            SourceState::Keyed(HashMap::new())
        } else {
            SourceState::Diff(HashMap::new())
        }
    }

    pub fn apply(&mut self, change: &SourceChange) {
        match (self, change) {
            (SourceState::Diff(m), SourceChange::Diff { row, diff }) => {
                crate::hub::add(m, Arc::clone(row), *diff)
            }
            (SourceState::Keyed(m), SourceChange::Upsert { key, row }) => match row {
                Some(row) => {
                    m.insert(key.clone(), Arc::clone(row));
                }
                None => {
                    m.remove(key);
                }
            },
            _ => {}
        }
    }
}

/// What clients of a stream attach to: one hub, or a scoped stream's channels.
#[derive(Clone)]
pub enum Target {
    Plain(Arc<Hub>),
    Partitioned(Arc<Partitioned>),
}

impl Target {
    /// A heartbeat to every client; a scoped stream also drops channels idle for
    /// `linger`.
    pub fn heartbeat(&self, linger: Duration) {
        match self {
            Target::Plain(hub) => hub.heartbeat(),
            Target::Partitioned(p) => p.heartbeat(linger),
        }
    }

    pub fn recheck(&self) {
        match self {
            Target::Plain(hub) => hub.recheck(),
            Target::Partitioned(p) => p.recheck(),
        }
    }

    pub fn close(&self, reason: EndReason) {
        match self {
            Target::Plain(hub) => hub.close(reason),
            Target::Partitioned(p) => p.close(reason),
        }
    }

    pub fn health(&self) -> Health {
        match self {
            Target::Plain(hub) => hub.health(),
            Target::Partitioned(p) => p.health(),
        }
    }

    pub fn readiness(&self) -> Result<(), NotReady> {
        match self {
            Target::Plain(hub) => hub.readiness(),
            Target::Partitioned(p) => crate::hub::readiness(p.ts().is_some(), &p.health()),
        }
    }

    /// The stream's timestamp, once it has its first snapshot.
    pub fn state_ts(&self) -> Option<u64> {
        match self {
            Target::Plain(hub) => hub.state_ts(),
            Target::Partitioned(p) => p.ts(),
        }
    }

    /// The stream's figures for metrics: summed over a scoped stream's channels.
    pub fn figures(&self) -> Figures {
        let relaxed = Ordering::Relaxed;
        let one = |hub: &Hub| Figures {
            clients: hub.stats.clients.load(relaxed) as u64,
            batches: hub.stats.batches.load(relaxed),
            lagged: hub.stats.lagged.load(relaxed),
            resets: hub.stats.resets.load(relaxed),
            upstream_errors: hub.stats.upstream_errors.load(relaxed),
            denied: std::array::from_fn(|i| hub.stats.denied[i].load(relaxed)),
            last_ts: hub.stats.last_ts.load(relaxed),
            channels: 1,
        };
        match self {
            Target::Plain(hub) => one(hub),
            Target::Partitioned(p) => {
                let mut f = Figures {
                    upstream_errors: p.upstream_errors.load(relaxed),
                    denied: std::array::from_fn(|i| p.denied[i].load(relaxed)),
                    last_ts: p.ts().unwrap_or(0),
                    ..Figures::default()
                };
                for hub in p.hubs() {
                    let c = one(&hub);
                    f.clients += c.clients;
                    f.batches += c.batches;
                    f.lagged += c.lagged;
                    f.resets += c.resets;
                    f.channels += 1;
                }
                f
            }
        }
    }

    /// Counts a request access control refused.
    pub fn denied(&self, reason: &str) {
        if let Some(i) = crate::hub::DENIALS.iter().position(|r| *r == reason) {
            match self {
                Target::Plain(hub) => hub.stats.denied[i].fetch_add(1, Ordering::Relaxed),
                Target::Partitioned(p) => p.denied[i].fetch_add(1, Ordering::Relaxed),
            };
        }
    }
}

/// A stream's figures at one moment.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Figures {
    pub clients: u64,
    pub batches: u64,
    pub lagged: u64,
    pub resets: u64,
    pub upstream_errors: u64,
    pub denied: [u64; 4],
    pub last_ts: u64,
    /// Hubs: 1 for a plain stream, the live channels of a scoped one.
    pub channels: u64,
}

/// What a feed does with the next snapshot its source reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Load it, telling connected clients `reason`.
    Snapshot(Reason),
    /// Clients have a state: send only the difference.
    Live,
}

/// See the module documentation.
pub struct Feed {
    pub stream: Arc<StreamConfig>,
    pub target: Target,
    /// The delay window; it can change on reload.
    delay: watch::Receiver<Duration>,
    phase: Phase,
    /// A plain stream's `columns`, resolved: indices and `"name":` prefixes.
    projection: Option<(Vec<usize>, Vec<Box<str>>)>,
    /// Why the stream's columns do not fit the relation, if they do not.
    broken: Option<String>,
    coalescer: Coalescer,
}

impl Feed {
    /// A feed whose first snapshot is told as `reason` to clients already connected
    /// (a new stream's hub has none; a stream moved to another source keeps its hub).
    pub fn new(
        stream: Arc<StreamConfig>,
        target: Target,
        delay: watch::Receiver<Duration>,
        reason: Reason,
    ) -> Feed {
        Feed {
            stream,
            target,
            delay,
            phase: Phase::Snapshot(reason),
            projection: None,
            broken: None,
            coalescer: Coalescer::default(),
        }
    }

    /// Whether the next snapshot must be loaded whole (a new feed).
    pub fn needs_snapshot(&self) -> bool {
        matches!(self.phase, Phase::Snapshot(_))
    }

    /// Fits the stream to the relation's columns. A column the relation lacks (or
    /// cannot compare) degrades the stream with a clear status, like a missing view.
    pub fn columns(&mut self, columns: &Columns) {
        let s = &self.stream;
        let result = match &self.target {
            Target::Plain(_) => match &s.columns {
                None => Ok(()),
                Some(names) => partitioned::resolve(columns, &[], &[], Some(names)).map(|r| {
                    self.projection = Some(r.projection);
                }),
            },
            Target::Partitioned(p) => {
                let resolved = partitioned::resolve(
                    columns,
                    &s.partition_columns(),
                    &s.filters,
                    s.columns.as_deref(),
                );
                p.set_resolved(resolved.as_ref().ok().cloned());
                resolved.map(|_| ())
            }
        };
        self.broken = result.err();
        if let Some(error) = &self.broken {
            self.set_health(Health::Reconnecting {
                error: error.clone(),
            });
        }
    }

    pub fn set_health(&self, health: Health) {
        let health = match &self.broken {
            // The stream cannot serve whatever the upstream does.
            Some(error) => Health::Reconnecting {
                error: error.clone(),
            },
            None => health,
        };
        match &self.target {
            Target::Plain(hub) => hub.set_health(health),
            Target::Partitioned(p) => p.set_health(health),
        }
    }

    pub fn warn(&self, error: String) {
        match &self.target {
            Target::Plain(hub) => hub.warn(error),
            Target::Partitioned(p) => p.warn(&error),
        }
    }

    pub fn upstream_error(&self) {
        match &self.target {
            Target::Plain(hub) => hub.stats.upstream_errors.fetch_add(1, Ordering::Relaxed),
            Target::Partitioned(p) => p.upstream_errors.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// A fresh state of the whole relation at `ts`: a new feed loads it as its
    /// snapshot; a live one sends clients only the difference.
    pub fn load(&mut self, ts: u64, state: &SourceState) {
        self.coalescer
            .flush(self.broken.is_some(), &self.target, &self.projection);
        if self.broken.is_some() {
            return;
        }
        match &self.target {
            Target::Plain(hub) => {
                let fresh = self.plain_state(state);
                match self.phase {
                    Phase::Snapshot(reason) => hub.load_snapshot(ts, fresh, reason),
                    Phase::Live => hub.resync(ts, fresh),
                }
            }
            Target::Partitioned(p) => match self.phase {
                Phase::Snapshot(reason) => p.load(ts, state, reason, false),
                Phase::Live => p.load(ts, state, Reason::UpstreamReset, true),
            },
        }
        self.phase = Phase::Live;
    }

    fn plain_state(&self, state: &SourceState) -> State {
        let mut out = State::empty(matches!(state, SourceState::Keyed(_)));
        match state {
            SourceState::Diff(rows) => {
                for (row, n) in rows {
                    out.apply(&Change::Diff {
                        row: shape(row, &self.projection),
                        diff: *n,
                    });
                }
            }
            SourceState::Keyed(rows) => {
                for (key, row) in rows {
                    out.apply(&Change::Upsert {
                        key: key.clone(),
                        row: Some(shape(row, &self.projection)),
                    });
                }
            }
        }
        out
    }

    /// The changes of one closed timestamp.
    pub fn push(&mut self, ts: u64, changes: &[SourceChange]) {
        let delay = *self.delay.borrow();
        let broken = self.broken.is_some();
        self.coalescer
            .push(broken, &self.target, &self.projection, delay, ts, changes);
    }

    /// Every timestamp below `closed + 1` is complete.
    pub fn progress(&mut self, closed: u64) {
        self.coalescer.closed = closed;
        if self.coalescer.changes.is_empty() && self.broken.is_none() {
            match &self.target {
                Target::Plain(hub) => hub.advance(closed),
                Target::Partitioned(p) => p.advance(closed),
            }
        }
    }

    /// When the delay window ends, if one is open.
    pub fn deadline(&self) -> Option<Instant> {
        self.coalescer.deadline
    }

    /// Sends what the delay window holds.
    pub fn flush(&mut self) {
        self.coalescer
            .flush(self.broken.is_some(), &self.target, &self.projection);
    }
}

/// A row as a stream sends it: whole, or its `columns`.
fn shape(row: &Row, projection: &Option<(Vec<usize>, Vec<Box<str>>)>) -> Box<str> {
    match projection {
        None => row.json.clone(),
        Some((indices, prefixes)) => row.project(indices, prefixes),
    }
}

/// Folds complete timestamps into one event per delay window.
#[derive(Default)]
struct Coalescer {
    changes: Vec<SourceChange>,
    min_ts: u64,
    /// The last closed timestamp; a flushed event's id.
    closed: u64,
    deadline: Option<Instant>,
}

impl Coalescer {
    fn push(
        &mut self,
        broken: bool,
        target: &Target,
        projection: &Option<(Vec<usize>, Vec<Box<str>>)>,
        delay: Duration,
        ts: u64,
        changes: &[SourceChange],
    ) {
        if delay.is_zero() && self.changes.is_empty() {
            if !broken {
                publish(target, projection, ts, ts, changes);
            }
            return;
        }
        if self.changes.is_empty() {
            self.min_ts = ts;
            self.deadline = Some(Instant::now() + delay);
        }
        self.changes.extend_from_slice(changes);
    }

    fn flush(
        &mut self,
        broken: bool,
        target: &Target,
        projection: &Option<(Vec<usize>, Vec<Box<str>>)>,
    ) {
        self.deadline = None;
        if self.changes.is_empty() {
            return;
        }
        let changes = std::mem::take(&mut self.changes);
        if !broken {
            publish(
                target,
                projection,
                self.min_ts,
                self.closed.max(self.min_ts),
                &changes,
            );
        }
    }
}

/// Publishes the changes of `[min_ts, id]` to a stream's clients.
fn publish(
    target: &Target,
    projection: &Option<(Vec<usize>, Vec<Box<str>>)>,
    min_ts: u64,
    id: u64,
    changes: &[SourceChange],
) {
    match target {
        Target::Plain(hub) => {
            let shaped: Vec<Change> = changes
                .iter()
                .map(|c| match c {
                    SourceChange::Diff { row, diff } => Change::Diff {
                        row: shape(row, projection),
                        diff: *diff,
                    },
                    SourceChange::Upsert { key, row } => Change::Upsert {
                        key: key.clone(),
                        row: row.as_deref().map(|r| shape(r, projection)),
                    },
                })
                .collect();
            hub.publish(min_ts, id, &shaped);
        }
        Target::Partitioned(p) => p.publish(min_ts, id, changes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Resume;

    fn change(n: i64) -> SourceChange {
        let json = format!("{{\"n\":{n}}}");
        let end = json.len() as u32 - 1;
        SourceChange::Diff {
            row: Arc::new(Row {
                json: json.into(),
                spans: Box::new([(5, end)]),
            }),
            diff: 1,
        }
    }

    /// Reads what a subscriber has been sent so far: (event, id) pairs.
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

    /// A live feed of a plain stream with `delay`, and its hub.
    fn feed(delay: Duration) -> (Feed, Arc<Hub>, watch::Sender<Duration>) {
        let config = crate::config::parse(
            std::path::Path::new("s.toml"),
            "[[streams]]\npath = \"/a\"\nview = \"v\"\n",
        )
        .expect("valid");
        let stream = Arc::clone(&config.streams[0]);
        let hub = Hub::new(crate::hub::Settings::new(
            &stream,
            crate::config::ClientErrors::Full,
        ));
        let (tx, rx) = watch::channel(delay);
        let mut feed = Feed::new(stream, Target::Plain(Arc::clone(&hub)), rx, Reason::Initial);
        feed.load(1, &SourceState::empty(false));
        (feed, hub, tx)
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_delay_each_timestamp_is_published_at_once() {
        let (mut feed, hub, _delay) = feed(Duration::ZERO);
        let mut sub = hub.subscribe(Resume::After(1));
        feed.push(5, &[change(5)]);
        feed.progress(5);
        assert_eq!(feed.deadline(), None);
        assert_eq!(
            sent(&mut sub).await,
            vec![("update".into(), Some("5".into()))]
        );
    }

    /// With a delay, every timestamp closed within the window goes out as one event
    /// when the window (opened by the first change) ends, with the last closed id.
    #[tokio::test(start_paused = true)]
    async fn a_delay_window_coalesces_timestamps_into_one_event() {
        let delay = Duration::from_secs(1);
        let (mut feed, hub, _delay) = feed(delay);
        let mut sub = hub.subscribe(Resume::After(1));
        let opened = Instant::now();
        feed.push(5, &[change(5)]);
        feed.progress(5);
        assert_eq!(feed.deadline(), Some(opened + delay));
        tokio::time::sleep(Duration::from_millis(400)).await;
        feed.push(7, &[change(7)]);
        feed.progress(9);
        // The window is the first change's: a later change does not extend it.
        assert_eq!(feed.deadline(), Some(opened + delay));
        assert!(
            sent(&mut sub).await.is_empty(),
            "nothing before the window ends"
        );
        if let Some(at) = feed.deadline() {
            tokio::time::sleep_until(at).await;
        }
        assert_eq!(Instant::now(), opened + delay);
        feed.flush();
        assert_eq!(
            sent(&mut sub).await,
            vec![("update".into(), Some("9".into()))]
        );
        assert_eq!(hub.state_ts(), Some(9));
        // An empty window flushes nothing, and progress alone moves the state on.
        feed.flush();
        feed.progress(12);
        assert!(sent(&mut sub).await.is_empty());
        assert_eq!(hub.state_ts(), Some(12));
    }
}
