//! A scoped stream: one view's rows split into partitions by the template's and the
//! scope's columns, and a hub ("channel") for each set of partitions and query filters
//! that clients are connected to.
//!
//! The rows of every partition are kept (they are the view's state, shared with the
//! source's decoded rows), so a new client's snapshot is its partition. Each change is
//! routed to its row's partition, then to the channels of that partition whose filters
//! it passes, and encoded once per channel: the work per change is proportional to the
//! channels that should see it, never to the clients. A channel is a hub like any
//! other (ring, resume, lag, snapshots), created when its first client comes and
//! dropped a while after its last one leaves; a partition without channels holds no
//! encoded history. Channels do not hear of timestamps that did not touch them: they
//! read the stream's clock instead.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::values::ValueKind;
use super::SourceState;
use crate::hub::{Change, Hub, Settings, Shared, State};
use crate::row::{Columns, Row, SourceChange};
use crate::wire::{EndReason, Health, Reason};

/// One partition's key: the canonical values of the partition columns, joined by NUL
/// (which no canonical value holds). Shared, so the routes and the changes of a batch
/// name a partition without copying its key.
pub type PartKey = Arc<str>;

/// The columns a scoped stream needs, resolved against the relation.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The partition columns: the template's parameters in path order, then the
    /// scope's column.
    pub parts: Vec<(usize, ValueKind)>,
    /// Columns a query filter may name.
    pub filters: BTreeMap<String, (usize, ValueKind)>,
    /// What clients are sent: column indices and their `"name":` prefixes.
    pub projection: (Vec<usize>, Vec<Box<str>>),
}

impl Resolved {
    /// The partition of `row`, or `None` when a partition column is NULL (no
    /// parameter equals NULL, so no client can see it).
    fn part(&self, row: &Row) -> Option<PartKey> {
        let mut key = String::new();
        for (n, (i, kind)) in self.parts.iter().enumerate() {
            if n > 0 {
                key.push('\0');
            }
            key.push_str(&kind.of_row(row.value(*i))?);
        }
        Some(key.into())
    }

    fn project(&self, row: &Row) -> Box<str> {
        if self.projection.0.is_empty() {
            row.json.clone()
        } else {
            row.project(&self.projection.0, &self.projection.1)
        }
    }
}

/// Which rows of its partitions a channel's clients want: for each filtered column,
/// the canonical values allowed (several values of one filter mean IN, different
/// filters AND).
pub type Filter = BTreeMap<usize, BTreeSet<Box<str>>>;

/// A channel's identity: its partitions and its filter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelKey {
    pub parts: Vec<PartKey>,
    pub filter: Vec<(usize, Vec<Box<str>>)>,
}

impl ChannelKey {
    pub fn new(mut parts: Vec<PartKey>, filter: &Filter) -> ChannelKey {
        parts.sort();
        parts.dedup();
        ChannelKey {
            parts,
            filter: filter
                .iter()
                .map(|(c, v)| (*c, v.iter().cloned().collect()))
                .collect(),
        }
    }

    fn passes(&self, resolved: &Resolved, row: &Row) -> bool {
        self.filter.iter().all(|(col, allowed)| {
            let kind = resolved
                .filters
                .values()
                .find(|(i, _)| i == col)
                .map(|(_, k)| *k);
            kind.and_then(|k| k.of_row(row.value(*col)))
                .is_some_and(|v| allowed.contains(&v))
        })
    }
}

/// Why a channel cannot be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelError {
    /// The stream has its `max_partitions` channels.
    TooMany,
    /// The relation has not been described yet (or lacks a column): parameters
    /// cannot be checked.
    NotReady,
}

struct Channel {
    hub: Arc<Hub>,
    /// Since when it has had no client.
    idle_since: Option<Instant>,
}

/// The rows of one partition.
enum Rows {
    Diff(HashMap<Arc<Row>, i64>),
    Keyed(HashMap<Box<str>, Arc<Row>>),
}

struct Inner {
    resolved: Option<Arc<Resolved>>,
    /// The settings, health and frames every channel holds a clone of.
    shared: Shared,
    max_channels: usize,
    /// `None` until the first snapshot.
    ts: Option<u64>,
    partitions: HashMap<PartKey, Rows>,
    /// Keyed streams: the partition each key's row is in, so a row that moves is
    /// taken out of its old partition.
    key_part: HashMap<Box<str>, PartKey>,
    /// Keys shared with `routes`.
    channels: HashMap<Arc<ChannelKey>, Channel>,
    /// Partition → the channels that include it.
    routes: HashMap<PartKey, Vec<Arc<ChannelKey>>>,
    end: Option<EndReason>,
}

/// See the module documentation.
pub struct Partitioned {
    keyed: bool,
    inner: Mutex<Inner>,
    /// The stream's closed timestamp, which every channel reads.
    clock: Arc<AtomicU64>,
    /// Counters of the stream as a whole (channels count their own clients).
    pub upstream_errors: AtomicU64,
    pub denied: [AtomicU64; 4],
}

impl Partitioned {
    pub fn new(keyed: bool, settings: Settings, max_channels: usize) -> Arc<Partitioned> {
        Arc::new(Partitioned {
            keyed,
            inner: Mutex::new(Inner {
                resolved: None,
                shared: Shared::new(settings),
                max_channels,
                ts: None,
                partitions: HashMap::new(),
                key_part: HashMap::new(),
                channels: HashMap::new(),
                routes: HashMap::new(),
                end: None,
            }),
            clock: Arc::new(AtomicU64::new(0)),
            upstream_errors: AtomicU64::new(0),
            denied: Default::default(),
        })
    }

    /// Held for short, synchronous sections only.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The resolved columns, once the relation is described.
    pub fn resolved(&self) -> Option<Arc<Resolved>> {
        self.lock().resolved.clone()
    }

    /// Sets the columns resolved against the relation (`None`: they could not be).
    pub fn set_resolved(&self, resolved: Option<Resolved>) {
        self.lock().resolved = resolved.map(Arc::new);
    }

    /// The hub of a channel, created (with the partitions' rows as its snapshot) when
    /// it is the first client's.
    pub fn channel(&self, key: ChannelKey) -> Result<Arc<Hub>, ChannelError> {
        let mut inner = self.lock();
        if let Some(channel) = inner.channels.get_mut(&key) {
            channel.idle_since = None;
            return Ok(Arc::clone(&channel.hub));
        }
        let Some(resolved) = inner.resolved.clone() else {
            return Err(ChannelError::NotReady);
        };
        if inner.channels.len() >= inner.max_channels {
            return Err(ChannelError::TooMany);
        }
        let hub = Hub::with_clock(inner.shared.clone(), Arc::clone(&self.clock));
        if let Some(ts) = inner.ts {
            let state = self.channel_state(&inner, &resolved, &key);
            hub.load_snapshot(ts, state, Reason::Initial);
        }
        if let Some(reason) = inner.end {
            hub.close(reason);
        }
        let key = Arc::new(key);
        for part in &key.parts {
            let list = inner.routes.entry(Arc::clone(part)).or_default();
            // Most partitions have one channel: no room for more until it is needed.
            list.reserve_exact(1);
            list.push(Arc::clone(&key));
        }
        inner.channels.insert(
            key,
            Channel {
                hub: Arc::clone(&hub),
                idle_since: None,
            },
        );
        Ok(hub)
    }

    /// The rows of a channel: its partitions', through its filter.
    fn channel_state(&self, inner: &Inner, resolved: &Resolved, key: &ChannelKey) -> State {
        let mut state = State::empty(self.keyed);
        for part in &key.parts {
            match inner.partitions.get(part) {
                Some(Rows::Diff(rows)) => {
                    for (row, n) in rows.iter().filter(|(r, _)| key.passes(resolved, r)) {
                        state.apply(&Change::Diff {
                            row: resolved.project(row),
                            diff: *n,
                        });
                    }
                }
                Some(Rows::Keyed(rows)) => {
                    for (k, row) in rows.iter().filter(|(_, r)| key.passes(resolved, r)) {
                        state.apply(&Change::Upsert {
                            key: k.clone(),
                            row: Some(resolved.project(row)),
                        });
                    }
                }
                None => {}
            }
        }
        state
    }

    /// Replaces every partition with a fresh state of the source; channels get a
    /// snapshot with `reason`, or (`resync`) only the difference.
    pub fn load(&self, ts: u64, source: &SourceState, reason: Reason, resync: bool) {
        let mut inner = self.lock();
        let Some(resolved) = inner.resolved.clone() else {
            return;
        };
        inner.partitions.clear();
        inner.key_part.clear();
        match source {
            SourceState::Diff(rows) => {
                for (row, n) in rows {
                    if let Some(part) = resolved.part(row) {
                        let entry = inner
                            .partitions
                            .entry(part)
                            .or_insert_with(|| Rows::Diff(HashMap::new()));
                        if let Rows::Diff(m) = entry {
                            m.insert(Arc::clone(row), *n);
                        }
                    }
                }
            }
            SourceState::Keyed(rows) => {
                for (key, row) in rows {
                    if let Some(part) = resolved.part(row) {
                        inner.key_part.insert(key.clone(), part.clone());
                        let entry = inner
                            .partitions
                            .entry(part)
                            .or_insert_with(|| Rows::Keyed(HashMap::new()));
                        if let Rows::Keyed(m) = entry {
                            m.insert(key.clone(), Arc::clone(row));
                        }
                    }
                }
            }
        }
        let first = inner.ts.is_none();
        inner.ts = Some(ts);
        for (key, channel) in &inner.channels {
            let state = self.channel_state(&inner, &resolved, key);
            if resync && !first {
                channel.hub.resync(ts, state);
            } else {
                channel.hub.load_snapshot(ts, state, reason);
            }
        }
        // Only now: a channel at `ts` by the clock must already hold its events.
        self.clock.store(ts, Ordering::Release);
    }

    /// Routes the changes of the timestamps `[min_ts, id]` to their partitions and
    /// channels, and publishes each touched channel's share as one event.
    pub fn publish(&self, min_ts: u64, id: u64, changes: &[SourceChange]) {
        let mut inner = self.lock();
        let Some(resolved) = inner.resolved.clone() else {
            return;
        };
        if inner.ts.is_none() {
            return;
        }
        // What each partition sees, in the batch's order (a channel of several
        // partitions must apply a row's move out of one and into another in order):
        // a change (by index), or a keyed row leaving it for another partition.
        let mut seen: Vec<(PartKey, Seen)> = Vec::new();
        let mut note = |part: &PartKey, what: Seen| seen.push((part.clone(), what));
        for (n, change) in changes.iter().enumerate() {
            match change {
                SourceChange::Diff { row, diff } => {
                    let Some(part) = resolved.part(row) else {
                        continue;
                    };
                    let rows = inner
                        .partitions
                        .entry(part.clone())
                        .or_insert_with(|| Rows::Diff(HashMap::new()));
                    if let Rows::Diff(m) = rows {
                        crate::hub::add(m, Arc::clone(row), *diff);
                    }
                    note(&part, Seen::Change(n));
                }
                SourceChange::Upsert { key, row } => {
                    let new_part = row.as_ref().and_then(|r| resolved.part(r));
                    let old_part = inner.key_part.get(key).cloned();
                    if let Some(old) = old_part.filter(|o| Some(o) != new_part.as_ref()) {
                        if let Some(Rows::Keyed(m)) = inner.partitions.get_mut(&old) {
                            m.remove(key);
                        }
                        inner.key_part.remove(key);
                        note(&old, Seen::Left(key.clone()));
                    }
                    match (&new_part, row) {
                        (Some(part), Some(r)) => {
                            inner.key_part.insert(key.clone(), part.clone());
                            let rows = inner
                                .partitions
                                .entry(part.clone())
                                .or_insert_with(|| Rows::Keyed(HashMap::new()));
                            if let Rows::Keyed(m) = rows {
                                m.insert(key.clone(), Arc::clone(r));
                            }
                            note(part, Seen::Change(n));
                        }
                        _ => {
                            if let Some(old) = inner.key_part.remove(key) {
                                if let Some(Rows::Keyed(m)) = inner.partitions.get_mut(&old) {
                                    m.remove(key);
                                }
                                note(&old, Seen::Change(n));
                            }
                        }
                    }
                }
            }
        }
        // Only partitions this batch touched can have become empty: the work stays
        // per change, whatever the number of partitions.
        for (part, _) in &seen {
            let empty = match inner.partitions.get(part) {
                Some(Rows::Diff(m)) => m.is_empty(),
                Some(Rows::Keyed(m)) => m.is_empty(),
                None => false,
            };
            if empty {
                inner.partitions.remove(part);
            }
        }
        // Each touched channel's share, filtered once per channel per batch.
        let mut out: HashMap<&ChannelKey, Vec<Change>> = HashMap::new();
        for (part, what) in &seen {
            for ch in inner.routes.get(part).into_iter().flatten() {
                let list = out.entry(&**ch).or_default();
                match what {
                    Seen::Change(i) => list.extend(channel_change(&resolved, ch, &changes[*i])),
                    Seen::Left(key) => list.push(Change::Upsert {
                        key: key.clone(),
                        row: None,
                    }),
                }
            }
        }
        for (key, list) in out {
            if let Some(channel) = inner.channels.get(key) {
                channel.hub.publish(min_ts, id, &list);
            }
        }
        inner.ts = Some(id);
        self.clock.store(id, Ordering::Release);
    }

    /// Moves the stream's timestamp on when a timestamp closed with no changes.
    pub fn advance(&self, ts: u64) {
        let mut inner = self.lock();
        if inner.ts.is_some_and(|t| ts > t) {
            inner.ts = Some(ts);
            self.clock.store(ts, Ordering::Release);
        }
    }

    /// Encodes the new `status` once, for every channel.
    pub fn set_health(&self, health: Health) {
        let mut inner = self.lock();
        if *inner.shared.health() == health {
            return;
        }
        inner.shared = inner.shared.with_health(health);
        for channel in inner.channels.values() {
            channel.hub.set_shared(inner.shared.clone());
        }
    }

    pub fn warn(&self, error: &str) {
        for channel in self.lock().channels.values() {
            channel.hub.warn(error.to_string());
        }
    }

    pub fn update_settings(&self, settings: Settings, max_channels: usize) {
        let mut inner = self.lock();
        inner.shared = inner.shared.with_settings(settings);
        for channel in inner.channels.values() {
            channel.hub.set_shared(inner.shared.clone());
        }
        inner.max_channels = max_channels;
    }

    /// Sends a heartbeat on every channel, and drops channels that have had no
    /// client for `linger` (long enough for a browser to reconnect and resume).
    pub fn heartbeat(&self, linger: Duration) {
        let mut inner = self.lock();
        let now = Instant::now();
        let mut gone = Vec::new();
        for (key, channel) in inner.channels.iter_mut() {
            channel.hub.heartbeat();
            if channel.hub.stats.clients.load(Ordering::Relaxed) > 0 {
                channel.idle_since = None;
            } else if *channel.idle_since.get_or_insert(now) + linger <= now {
                gone.push(key.clone());
            }
        }
        for key in gone {
            inner.channels.remove(&key);
            for part in &key.parts {
                if let Some(list) = inner.routes.get_mut(part) {
                    list.retain(|k| !Arc::ptr_eq(k, &key));
                    if list.is_empty() {
                        inner.routes.remove(part);
                    }
                }
            }
        }
    }

    pub fn recheck(&self) {
        for channel in self.lock().channels.values() {
            channel.hub.recheck();
        }
    }

    pub fn close(&self, reason: EndReason) {
        let mut inner = self.lock();
        inner.end = Some(reason);
        for channel in inner.channels.values() {
            channel.hub.close(reason);
        }
    }

    /// The live channels' hubs, for the stream's figures.
    pub fn hubs(&self) -> Vec<Arc<Hub>> {
        self.lock()
            .channels
            .values()
            .map(|c| Arc::clone(&c.hub))
            .collect()
    }

    pub fn health(&self) -> Health {
        self.lock().shared.health().clone()
    }

    /// The stream's timestamp, once it has its first snapshot.
    pub fn ts(&self) -> Option<u64> {
        self.lock().ts
    }

    /// Partitions holding rows, and live channels.
    pub fn sizes(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.partitions.len(), inner.channels.len())
    }
}

/// What a partition sees of a batch.
enum Seen {
    /// The change at this index of the batch.
    Change(usize),
    /// A keyed row left it for another partition.
    Left(Box<str>),
}

/// What one source change is for one channel: the projected change if the row passes
/// the channel's filter; for a keyed row that does not, a delete (a no-op if the
/// channel does not hold the key).
fn channel_change(resolved: &Resolved, ch: &ChannelKey, change: &SourceChange) -> Option<Change> {
    match change {
        SourceChange::Diff { row, diff } => ch.passes(resolved, row).then(|| Change::Diff {
            row: resolved.project(row),
            diff: *diff,
        }),
        SourceChange::Upsert { key, row } => Some(Change::Upsert {
            key: key.clone(),
            row: row
                .as_ref()
                .filter(|r| ch.passes(resolved, r))
                .map(|r| resolved.project(r)),
        }),
    }
}

/// Resolves a scoped stream's columns against the relation: every named column must
/// exist, and partition and filter columns must have a comparable type.
pub fn resolve(
    columns: &Columns,
    parts: &[String],
    filters: &[String],
    projection: Option<&[String]>,
) -> Result<Resolved, String> {
    let find = |name: &str, what: &str| -> Result<(usize, ValueKind), String> {
        let i = columns
            .index(name)
            .ok_or_else(|| format!("{what} column {name:?} is not in the relation"))?;
        let kind = ValueKind::of(&columns.types[i]).ok_or_else(|| {
            format!(
                "{what} column {name:?} has type {}, which cannot be a parameter",
                columns.types[i]
            )
        })?;
        Ok((i, kind))
    };
    let parts = parts
        .iter()
        .map(|p| find(p, "partition"))
        .collect::<Result<Vec<_>, _>>()?;
    let filters = filters
        .iter()
        .map(|f| find(f, "filter").map(|v| (f.clone(), v)))
        .collect::<Result<BTreeMap<_, _>, _>>()?;
    let projection = match projection {
        None => (Vec::new(), Vec::new()),
        Some(names) => {
            let mut indices = Vec::new();
            for name in names {
                indices.push(columns.index(name).ok_or_else(|| {
                    format!("column {name:?} of `columns` is not in the relation")
                })?);
            }
            let prefixes = names.iter().map(|n| crate::row::prefix(n)).collect();
            (indices, prefixes)
        }
    };
    Ok(Resolved {
        parts,
        filters,
        projection,
    })
}
