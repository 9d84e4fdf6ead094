//! One hub per stream: the current state, a bounded ring of encoded events (which is both
//! the resume history and every client's queue), and the fan-out to clients.
//!
//! Every batch is encoded to SSE bytes once, under the hub's lock, and pushed onto the
//! ring. Clients hold only a cursor into the ring: a client that is behind takes every
//! frame it missed in one wake-up (batched writes), and a client that falls further
//! behind than its queue allows gets a fresh `snapshot` with reason `lagged`. Memory is
//! therefore bounded by the ring and the snapshot cache, whatever the clients do.
//!
//! The hub spawns no tasks. Client streams end when the hub is closed (`end` event) or
//! dropped, and the stream task that feeds the hub lives in [`crate::supervisor`].

use std::collections::hash_map::Entry as MapEntry;
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tokio::sync::watch;

use crate::config::{ClientErrors, StreamConfig};
use crate::sse;

/// One row change, with rows and keys already encoded as JSON objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Diff {
        row: Box<str>,
        diff: i64,
    },
    Upsert {
        key: Box<str>,
        row: Option<Box<str>>,
    },
}

/// A full relation state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Row JSON → multiplicity.
    Diff(HashMap<Box<str>, i64>),
    /// Key JSON → row JSON.
    Keyed(HashMap<Box<str>, Box<str>>),
}

impl State {
    pub fn empty(keyed: bool) -> State {
        if keyed {
            State::Keyed(HashMap::new())
        } else {
            State::Diff(HashMap::new())
        }
    }

    pub fn len(&self) -> usize {
        match self {
            State::Diff(m) => m.len(),
            State::Keyed(m) => m.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies one change; the caller guarantees the change matches the state's kind.
    pub fn apply(&mut self, change: &Change) {
        match (self, change) {
            (State::Diff(m), Change::Diff { row, diff }) => match m.entry(row.clone()) {
                MapEntry::Occupied(mut e) => {
                    *e.get_mut() += diff;
                    if *e.get() == 0 {
                        e.remove();
                    }
                }
                MapEntry::Vacant(e) => {
                    if *diff != 0 {
                        e.insert(*diff);
                    }
                }
            },
            (State::Keyed(m), Change::Upsert { key, row }) => match row {
                Some(row) => {
                    m.insert(key.clone(), row.clone());
                }
                None => {
                    m.remove(key);
                }
            },
            _ => {}
        }
    }
}

/// Why a client is told to replace its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Initial,
    ResumeGap,
    Lagged,
    UpstreamReset,
    ConfigChanged,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Initial => "initial",
            Reason::ResumeGap => "resume-gap",
            Reason::Lagged => "lagged",
            Reason::UpstreamReset => "upstream-reset",
            Reason::ConfigChanged => "config-changed",
        }
    }
}

/// Why a stream ends on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    Removed,
    Shutdown,
}

/// Where a new client wants to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// No `Last-Event-ID`: start with a snapshot.
    Fresh,
    /// A well-formed id: replay after it if the history still covers it.
    After(u64),
    /// An id that cannot be ours: snapshot with `resume-gap`.
    Invalid,
}

/// Upstream health as clients see it in `status` events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Streaming,
    Reconnecting { error: String },
}

/// Per-stream settings that can change without touching the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub event: String,
    pub retry: Duration,
    pub history: usize,
    pub history_bytes: usize,
    pub client_queue: usize,
    /// What `status` events say about upstream errors.
    pub client_errors: ClientErrors,
}

impl Settings {
    pub fn new(s: &StreamConfig, client_errors: ClientErrors) -> Self {
        Settings {
            event: s.event.clone(),
            retry: s.retry,
            history: s.history,
            history_bytes: s.history_bytes,
            client_queue: s.client_queue,
            client_errors,
        }
    }
}

/// The error text clients see under [`ClientErrors::Generic`].
const GENERIC_ERROR: &str = "the upstream is unavailable";

/// Upper bound on the number of changes a resync sends as an ordinary update; larger
/// differences are sent as a `snapshot` with reason `upstream-reset`.
const MAX_RESYNC_CHANGES: usize = 100_000;

#[derive(Debug)]
enum Entry {
    /// Changes with timestamps in `[min_ts, id]`; after it the state is at `id`.
    Batch {
        min_ts: u64,
        id: u64,
        bytes: Bytes,
    },
    Frame(Bytes),
    /// A frame that changes what a client must know (the upstream's status, the
    /// `retry` delay): a client that skips it is told the current values instead.
    Control(Bytes),
    Reset(Reason),
}

impl Entry {
    fn size(&self) -> usize {
        match self {
            Entry::Batch { bytes, .. } | Entry::Frame(bytes) | Entry::Control(bytes) => bytes.len(),
            Entry::Reset(_) => 0,
        }
    }
}

struct Inner {
    settings: Settings,
    /// `retry: <ms>`, encoded once per setting.
    retry_frame: Bytes,
    /// `None` until the first complete snapshot arrives.
    state: Option<State>,
    /// The timestamp the state is at.
    state_ts: u64,
    ring: VecDeque<Entry>,
    /// Sequence number of `ring[0]`.
    base_seq: u64,
    ring_bytes: usize,
    /// Oldest id a client may resume from, and the first entry that may serve it.
    floor_ts: u64,
    resume_seq: u64,
    snapshots: Vec<(Reason, Bytes)>,
    health: Health,
    /// The `status` event of `health`, encoded once: for clients that skipped a change
    /// of it, and for every client that connects while the upstream is degraded.
    status: Bytes,
    end: Option<Bytes>,
}

impl Inner {
    fn head(&self) -> u64 {
        self.base_seq + self.ring.len() as u64
    }

    fn push(&mut self, entry: Entry) {
        self.ring_bytes += entry.size();
        self.ring.push_back(entry);
        self.trim();
    }

    fn trim(&mut self) {
        while self.ring.len() > self.settings.history
            || (self.ring_bytes > self.settings.history_bytes && self.ring.len() > 1)
        {
            let Some(old) = self.ring.pop_front() else {
                break;
            };
            self.ring_bytes -= old.size();
            self.base_seq += 1;
            if let Entry::Batch { id, .. } = old {
                self.floor_ts = self.floor_ts.max(id);
            }
        }
        self.resume_seq = self.resume_seq.max(self.base_seq);
    }

    /// The snapshot of the current state for `reason`, encoded at most once per state.
    fn snapshot(&mut self, reason: Reason) -> Option<Bytes> {
        let state = self.state.as_ref()?;
        if let Some((_, b)) = self.snapshots.iter().find(|(r, _)| *r == reason) {
            return Some(b.clone());
        }
        let ts = self.state_ts;
        let mut data = ChangesJson::new(ts, Some(reason), state.len());
        match state {
            State::Diff(m) => m.iter().for_each(|(row, n)| data.diff(row, *n)),
            State::Keyed(m) => m.iter().for_each(|(key, row)| data.upsert(key, Some(row))),
        }
        let bytes = sse::event("snapshot", Some(ts), &data.finish());
        self.snapshots.push((reason, bytes.clone()));
        Some(bytes)
    }

    fn state_changed(&mut self) {
        self.snapshots.clear();
    }

    /// Moves a client's cursor to the head, appending what it must write to `out`.
    /// Returns true once the client has everything and the stream has ended.
    /// `resumed` marks a client that asked to resume before the stream had any state:
    /// the first snapshot is a `resume-gap` for it, not `initial`.
    fn catch_up(
        &mut self,
        pos: &mut u64,
        out: &mut Vec<Bytes>,
        stats: &Stats,
        resumed: bool,
    ) -> bool {
        let head = self.head();
        if *pos < self.base_seq || head - *pos > self.settings.client_queue as u64 {
            stats.lagged.fetch_add(1, Ordering::Relaxed);
            let skipped_control = *pos < self.base_seq || self.has_control(*pos);
            if let Some(s) = self.snapshot(Reason::Lagged) {
                out.push(s);
            }
            if skipped_control {
                self.push_control(out);
            }
            *pos = head;
        }
        let start = (*pos - self.base_seq) as usize;
        let last_reset = self.ring.range(start..).rev().find_map(|e| match e {
            Entry::Reset(r) => Some(*r),
            _ => None,
        });
        match last_reset {
            // A reset replaces the state, so one snapshot stands for every entry.
            Some(reason) => {
                let reason = match reason {
                    Reason::Initial if resumed => Reason::ResumeGap,
                    other => other,
                };
                if let Some(s) = self.snapshot(reason) {
                    out.push(s);
                }
                if self.has_control(*pos) {
                    self.push_control(out);
                }
            }
            None => {
                for entry in self.ring.range(start..) {
                    if let Entry::Batch { bytes, .. }
                    | Entry::Frame(bytes)
                    | Entry::Control(bytes) = entry
                    {
                        out.push(bytes.clone());
                    }
                }
            }
        }
        *pos = head;
        match &self.end {
            Some(end) => {
                out.push(end.clone());
                true
            }
            None => false,
        }
    }

    /// Whether the ring from `pos` on holds a status or retry change.
    fn has_control(&self, pos: u64) -> bool {
        let start = pos.saturating_sub(self.base_seq) as usize;
        self.ring
            .range(start.min(self.ring.len())..)
            .any(|e| matches!(e, Entry::Control(_)))
    }

    /// The current `retry` and status, for a client that skipped their changes.
    fn push_control(&self, out: &mut Vec<Bytes>) {
        out.push(self.retry_frame.clone());
        out.push(self.status.clone());
    }

    /// The `status` a connecting client is sent first: only while the upstream is
    /// degraded.
    fn degraded(&self) -> Option<Bytes> {
        matches!(self.health, Health::Reconnecting { .. }).then(|| self.status.clone())
    }

    /// Where a resuming client's cursor goes, or `None` if the history cannot serve it.
    fn resume_position(&self, after: u64) -> Option<u64> {
        self.state.as_ref()?;
        if after < self.floor_ts || after > self.state_ts {
            return None;
        }
        let mut seq = self.resume_seq;
        for entry in self
            .ring
            .range(((self.resume_seq - self.base_seq) as usize)..)
        {
            match entry {
                Entry::Batch { min_ts, id, .. } => {
                    if *id <= after {
                        seq += 1;
                        continue;
                    }
                    // The client has everything up to `after`; this batch must hold
                    // only later changes, or it would be applied twice.
                    return (*min_ts > after).then_some(seq);
                }
                Entry::Reset(_) => return None,
                Entry::Frame(_) | Entry::Control(_) => seq += 1,
            }
        }
        Some(seq)
    }
}

/// The data of `snapshot` and update events:
/// `{"ts":"<ts>","reason":"<reason>","changes":[...]}`, `reason` only in snapshots.
/// Rows and keys are already JSON, so they are copied in as they are.
struct ChangesJson {
    out: String,
    empty: bool,
}

impl ChangesJson {
    fn new(ts: u64, reason: Option<Reason>, changes: usize) -> Self {
        let mut out = String::with_capacity(64 + changes * 48);
        let _ = write!(out, "{{\"ts\":\"{ts}\",");
        if let Some(reason) = reason {
            out.push_str("\"reason\":\"");
            out.push_str(reason.as_str());
            out.push_str("\",");
        }
        out.push_str("\"changes\":[");
        ChangesJson { out, empty: true }
    }

    /// The buffer, with a separator if a change came before.
    fn next(&mut self) -> &mut String {
        if !std::mem::take(&mut self.empty) {
            self.out.push(',');
        }
        &mut self.out
    }

    fn diff(&mut self, row: &str, diff: i64) {
        let out = self.next();
        let _ = write!(out, "{{\"diff\":{diff},\"row\":");
        out.push_str(row);
        out.push('}');
    }

    fn upsert(&mut self, key: &str, row: Option<&str>) {
        let out = self.next();
        out.push_str("{\"key\":");
        out.push_str(key);
        out.push_str(",\"row\":");
        out.push_str(row.unwrap_or("null"));
        out.push('}');
    }

    fn push(&mut self, change: &Change) {
        match change {
            Change::Diff { row, diff } => self.diff(row, *diff),
            Change::Upsert { key, row } => self.upsert(key, row.as_deref()),
        }
    }

    fn finish(mut self) -> String {
        self.out.push_str("]}");
        self.out
    }
}

/// Counters the metrics endpoint reads.
#[derive(Debug, Default)]
pub struct Stats {
    pub clients: AtomicUsize,
    pub batches: AtomicU64,
    pub lagged: AtomicU64,
    pub resets: AtomicU64,
    pub upstream_errors: AtomicU64,
    pub last_ts: AtomicU64,
}

/// See the module documentation.
pub struct Hub {
    inner: Mutex<Inner>,
    /// Carries the ring's head sequence; clients wait on it.
    head: watch::Sender<u64>,
    pub stats: Stats,
}

impl Hub {
    pub fn new(settings: Settings) -> Arc<Hub> {
        let connecting = Health::Reconnecting {
            error: "connecting".into(),
        };
        let status = status_frame(&connecting, settings.client_errors);
        Arc::new(Hub {
            inner: Mutex::new(Inner {
                retry_frame: sse::retry(settings.retry.as_millis()),
                settings,
                state: None,
                state_ts: 0,
                ring: VecDeque::new(),
                base_seq: 0,
                ring_bytes: 0,
                floor_ts: 0,
                resume_seq: 0,
                snapshots: Vec::new(),
                status,
                health: connecting,
                end: None,
            }),
            head: watch::Sender::new(0),
            stats: Stats::default(),
        })
    }

    /// The lock is only held for short, non-async sections, so a std mutex is right; a
    /// panic while holding it cannot leave the ring half-updated in a way that matters
    /// more than losing the stream, so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self, inner: &Inner) {
        self.head.send_replace(inner.head());
    }

    pub fn update_settings(&self, settings: Settings) {
        let mut inner = self.lock();
        if settings.client_errors != inner.settings.client_errors {
            let frame = status_frame(&inner.health, settings.client_errors);
            inner.status = frame.clone();
            inner.push(Entry::Control(frame));
            self.notify(&inner);
        }
        if settings.retry != inner.settings.retry {
            inner.retry_frame = sse::retry(settings.retry.as_millis());
            // Connected browsers learn the new reconnection delay too, not only new ones.
            let frame = inner.retry_frame.clone();
            inner.push(Entry::Control(frame));
            self.notify(&inner);
        }
        inner.settings = settings;
        inner.trim();
    }

    /// True once the first snapshot has been loaded.
    pub fn is_ready(&self) -> bool {
        self.lock().state.is_some()
    }

    /// The timestamp of the published state, if any.
    pub fn state_ts(&self) -> Option<u64> {
        let inner = self.lock();
        inner.state.as_ref().map(|_| inner.state_ts)
    }

    #[cfg(test)]
    fn state(&self) -> Option<State> {
        self.lock().state.clone()
    }

    pub fn health(&self) -> Health {
        self.lock().health.clone()
    }

    /// Replaces the whole state. The first call makes the hub ready (clients get
    /// `snapshot` with reason `initial`); later calls send `reason` to every client.
    pub fn load_snapshot(&self, ts: u64, state: State, reason: Reason) {
        let mut inner = self.lock();
        let reason = if inner.state.is_none() {
            Reason::Initial
        } else {
            self.stats.resets.fetch_add(1, Ordering::Relaxed);
            reason
        };
        inner.state = Some(state);
        inner.state_ts = ts;
        inner.floor_ts = ts;
        inner.state_changed();
        inner.push(Entry::Reset(reason));
        inner.resume_seq = inner.head();
        self.stats.last_ts.store(ts, Ordering::Relaxed);
        self.notify(&inner);
    }

    /// Publishes the changes of the timestamps `[min_ts, id]` as one event. Changes are
    /// consolidated against the state first; if nothing is left, only the state's
    /// timestamp moves.
    pub fn publish(&self, min_ts: u64, id: u64, changes: &[Change]) {
        let mut inner = self.lock();
        let Some(state) = inner.state.as_mut() else {
            return;
        };
        let net = consolidate(state, changes);
        for c in &net {
            state.apply(c);
        }
        inner.state_ts = inner.state_ts.max(id);
        inner.state_changed();
        self.stats.last_ts.store(inner.state_ts, Ordering::Relaxed);
        if net.is_empty() {
            return;
        }
        let mut data = ChangesJson::new(id, None, net.len());
        for change in &net {
            data.push(change);
        }
        let bytes = sse::event(&inner.settings.event, Some(id), &data.finish());
        inner.push(Entry::Batch { min_ts, id, bytes });
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.notify(&inner);
    }

    /// Moves the state's timestamp forward when a timestamp closed with no changes.
    pub fn advance(&self, ts: u64) {
        let mut inner = self.lock();
        if inner.state.is_some() && ts > inner.state_ts {
            inner.state_ts = ts;
            inner.state_changed();
            self.stats.last_ts.store(ts, Ordering::Relaxed);
        }
    }

    /// Replaces the state with one read afresh at `ts`, sending clients only the
    /// difference. Falls back to a `snapshot` (`upstream-reset`) when the difference is
    /// too large or the state changed kind.
    pub fn resync(&self, ts: u64, fresh: State) {
        let diff = {
            let inner = self.lock();
            inner.state.as_ref().and_then(|old| {
                // Anything after the published state may have changed.
                let min_ts = inner.state_ts.saturating_add(1).min(ts);
                difference(old, &fresh).map(|changes| (min_ts, changes))
            })
        };
        match diff {
            Some((min_ts, changes)) if changes.len() <= MAX_RESYNC_CHANGES => {
                self.publish(min_ts, ts, &changes);
            }
            _ => self.load_snapshot(ts, fresh, Reason::UpstreamReset),
        }
    }

    /// Reports upstream health to clients when it changes.
    pub fn set_health(&self, health: Health) {
        let mut inner = self.lock();
        if inner.health == health {
            return;
        }
        let frame = status_frame(&health, inner.settings.client_errors);
        inner.health = health;
        inner.status = frame.clone();
        inner.push(Entry::Control(frame));
        self.notify(&inner);
    }

    /// Tells clients about a problem that does not stop the stream, as a `status`
    /// event with the upstream still `streaming`.
    pub fn warn(&self, error: String) {
        let mut inner = self.lock();
        let error = match inner.settings.client_errors {
            ClientErrors::Full => error.as_str(),
            ClientErrors::Generic => "the upstream sent data the gateway could not serve",
        };
        let frame = sse::event(
            "status",
            None,
            &serde_json::json!({"upstream": "streaming", "error": error}).to_string(),
        );
        inner.push(Entry::Frame(frame));
        self.notify(&inner);
    }

    /// Sends a `: keepalive` comment to every client.
    pub fn heartbeat(&self) {
        let mut inner = self.lock();
        if inner.end.is_none() {
            inner.push(Entry::Frame(Bytes::from_static(sse::KEEPALIVE)));
            self.notify(&inner);
        }
    }

    /// Ends every client stream with `event: end`.
    pub fn close(&self, reason: EndReason) {
        let mut inner = self.lock();
        if inner.end.is_some() {
            return;
        }
        let reason = match reason {
            EndReason::Removed => "removed",
            EndReason::Shutdown => "shutdown",
        };
        inner.end = Some(sse::event(
            "end",
            None,
            &format!("{{\"reason\":\"{reason}\"}}"),
        ));
        self.notify(&inner);
    }

    /// A client's subscription: `retry`, then a snapshot or the replay its `resume`
    /// asks for, then every event until the hub closes.
    pub fn subscribe(self: &Arc<Self>, resume: Resume) -> Subscription {
        let hub = Arc::clone(self);
        // Subscribed before the lock is taken, so anything pushed after the catch-up
        // below wakes it; at worst a wake-up finds nothing new.
        let rx = self.head.subscribe();
        let mut first = Vec::with_capacity(4);
        let mut pos;
        let ended;
        let resumed;
        {
            let mut inner = hub.lock();
            resumed = inner.state.is_none() && !matches!(resume, Resume::Fresh);
            first.push(inner.retry_frame.clone());
            first.extend(inner.degraded());
            pos = inner.head();
            let replay = match resume {
                Resume::After(after) => inner.resume_position(after),
                _ => None,
            };
            match replay {
                Some(from) => pos = from,
                None => {
                    let reason = match resume {
                        Resume::Fresh => Reason::Initial,
                        _ => Reason::ResumeGap,
                    };
                    if let Some(s) = inner.snapshot(reason) {
                        first.push(s);
                    }
                }
            }
            ended = inner.catch_up(&mut pos, &mut first, &hub.stats, resumed);
        }
        Subscription {
            guard: ClientGuard::new(&hub),
            hub,
            rx,
            pos,
            ended,
            resumed,
            first,
        }
    }
}

/// One client's cursor into a hub's ring. Frames are shared `Bytes`: a client never
/// copies an event, it only holds references to the hub's encoding.
pub struct Subscription {
    hub: Arc<Hub>,
    rx: watch::Receiver<u64>,
    pos: u64,
    ended: bool,
    /// Asked to resume before the stream had a state; cleared by its first snapshot.
    resumed: bool,
    /// Frames computed when the client subscribed, handed out first.
    first: Vec<Bytes>,
    guard: ClientGuard,
}

impl Subscription {
    /// Waits until there is something to write and appends it to `out`. Returns false
    /// once the stream has ended (after its `end` frame was handed out).
    pub async fn next(&mut self, out: &mut Vec<Bytes>) -> bool {
        if !self.first.is_empty() {
            out.append(&mut self.first);
            return true;
        }
        while !self.ended {
            if self.rx.changed().await.is_err() {
                self.ended = true;
                break;
            }
            let mut inner = self.hub.lock();
            self.ended = inner.catch_up(&mut self.pos, out, &self.hub.stats, self.resumed);
            self.resumed &= inner.state.is_none();
            drop(inner);
            if !out.is_empty() {
                return true;
            }
        }
        false
    }

    /// The subscription as a body stream, one frame per item.
    pub fn into_stream(mut self) -> impl Stream<Item = Result<Bytes, Infallible>> {
        async_stream::stream! {
            let mut frames = Vec::new();
            while self.next(&mut frames).await {
                for frame in frames.drain(..) {
                    yield Ok(frame);
                }
            }
            drop(self.guard);
        }
    }
}

fn status_frame(health: &Health, errors: ClientErrors) -> Bytes {
    let data = match health {
        Health::Streaming => "{\"upstream\":\"streaming\",\"error\":null}".to_string(),
        Health::Reconnecting { error } => serde_json::json!({
            "upstream": "reconnecting",
            "error": match errors {
                ClientErrors::Full => error.as_str(),
                ClientErrors::Generic => GENERIC_ERROR,
            },
        })
        .to_string(),
    };
    sse::event("status", None, &data)
}

/// Counts connected clients for metrics; decrements when the stream is dropped.
struct ClientGuard(Arc<Hub>);

impl ClientGuard {
    fn new(hub: &Arc<Hub>) -> Self {
        hub.stats.clients.fetch_add(1, Ordering::Relaxed);
        ClientGuard(Arc::clone(hub))
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.stats.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The net effect of `changes` on `state`, in first-seen order, without no-ops.
fn consolidate(state: &State, changes: &[Change]) -> Vec<Change> {
    match state {
        State::Diff(_) => {
            let mut order: Vec<&str> = Vec::new();
            let mut sums: HashMap<&str, i64> = HashMap::new();
            for c in changes {
                if let Change::Diff { row, diff } = c {
                    let e = sums.entry(row).or_insert_with(|| {
                        order.push(row);
                        0
                    });
                    *e += diff;
                }
            }
            order
                .into_iter()
                .filter_map(|row| {
                    let diff = sums.get(row).copied().unwrap_or(0);
                    (diff != 0).then(|| Change::Diff {
                        row: row.into(),
                        diff,
                    })
                })
                .collect()
        }
        State::Keyed(current) => {
            let mut order: Vec<&str> = Vec::new();
            let mut last: HashMap<&str, Option<&str>> = HashMap::new();
            for c in changes {
                if let Change::Upsert { key, row } = c {
                    if last.insert(key, row.as_deref()).is_none() {
                        order.push(key);
                    }
                }
            }
            order
                .into_iter()
                .filter_map(|key| {
                    let new = last.get(key).copied().flatten();
                    let old = current.get(key).map(|r| &**r);
                    (new != old).then(|| Change::Upsert {
                        key: key.into(),
                        row: new.map(Into::into),
                    })
                })
                .collect()
        }
    }
}

/// The changes that turn `old` into `new`, or `None` if they are of different kinds.
fn difference(old: &State, new: &State) -> Option<Vec<Change>> {
    let mut out = Vec::new();
    match (old, new) {
        (State::Diff(a), State::Diff(b)) => {
            for (row, n) in a {
                let m = b.get(row).copied().unwrap_or(0);
                if m != *n {
                    out.push(Change::Diff {
                        row: row.clone(),
                        diff: m - n,
                    });
                }
            }
            for (row, m) in b {
                if !a.contains_key(row) {
                    out.push(Change::Diff {
                        row: row.clone(),
                        diff: *m,
                    });
                }
            }
        }
        (State::Keyed(a), State::Keyed(b)) => {
            for (key, row) in a {
                match b.get(key) {
                    Some(r) if r == row => {}
                    other => out.push(Change::Upsert {
                        key: key.clone(),
                        row: other.cloned(),
                    }),
                }
            }
            for (key, row) in b {
                if !a.contains_key(key) {
                    out.push(Change::Upsert {
                        key: key.clone(),
                        row: Some(row.clone()),
                    });
                }
            }
        }
        _ => return None,
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::{Item, Parser};
    use futures::StreamExt;
    use std::pin::Pin;

    fn settings(client_queue: usize, history: usize) -> Settings {
        Settings {
            event: "update".into(),
            retry: Duration::from_secs(15),
            history,
            history_bytes: 1 << 20,
            client_queue,
            client_errors: ClientErrors::Full,
        }
    }

    fn diff(row: &str, diff: i64) -> Change {
        Change::Diff {
            row: row.into(),
            diff,
        }
    }

    type Ev = (String, Option<String>, serde_json::Value);

    /// A subscribed client that parses what it receives.
    struct Client {
        stream: Pin<Box<dyn Stream<Item = Result<Bytes, Infallible>> + Send>>,
        parser: Parser,
    }

    impl Client {
        fn new(hub: &Arc<Hub>, resume: Resume) -> Client {
            Client {
                stream: Box::pin(hub.subscribe(resume).into_stream()),
                parser: Parser::new(),
            }
        }

        /// A client that has read its opening frames.
        async fn connected(hub: &Arc<Hub>) -> Client {
            let mut client = Client::new(hub, Resume::Fresh);
            client.items().await;
            client
        }

        /// Everything received since the last call, parsed.
        async fn items(&mut self) -> Vec<Item> {
            let mut out = Vec::new();
            while let Ok(Some(Ok(chunk))) =
                tokio::time::timeout(Duration::from_millis(20), self.stream.next()).await
            {
                self.parser.feed(&chunk, &mut out);
            }
            out
        }

        async fn events(&mut self) -> Vec<Ev> {
            events(&self.items().await)
        }
    }

    fn events(items: &[Item]) -> Vec<Ev> {
        items
            .iter()
            .filter_map(|i| match i {
                Item::Event(e) if e.event != "status" => Some((
                    e.event.clone(),
                    e.id.clone(),
                    serde_json::from_str(&e.data).expect("json data"),
                )),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn snapshot_then_updates_in_order() {
        let hub = Hub::new(settings(100, 100));
        let mut early = Client::new(&hub, Resume::Fresh);
        let items = early.items().await;
        assert_eq!(items.first(), Some(&Item::Retry(15000)));
        assert!(items
            .iter()
            .any(|i| matches!(i, Item::Event(e) if e.event == "status")));

        let mut state = State::empty(false);
        state.apply(&diff("{\"a\":1}", 2));
        hub.load_snapshot(10, state, Reason::ConfigChanged);
        let ev = early.events().await;
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].0, "snapshot");
        assert_eq!(ev[0].2["reason"], "initial");
        assert_eq!(ev[0].2["changes"][0]["diff"], 2);
        hub.publish(11, 11, &[diff("{\"a\":1}", -1), diff("{\"a\":2}", 1)]);
        hub.publish(12, 12, &[diff("{\"a\":3}", 1), diff("{\"a\":3}", -1)]);
        hub.publish(13, 13, &[diff("{\"a\":4}", 1)]);

        let ev = early.events().await;
        assert_eq!(ev.len(), 2, "{ev:?}");
        assert_eq!(ev[0].1.as_deref(), Some("11"));
        assert_eq!(ev[0].2["changes"].as_array().map(Vec::len), Some(2));
        // The no-op timestamp 12 produced no event; ids strictly increase.
        assert_eq!(ev[1].1.as_deref(), Some("13"));
        assert_eq!(hub.state_ts(), Some(13));
    }

    #[tokio::test]
    async fn resume_replays_exactly_the_missing_batches() {
        let hub = Hub::new(settings(100, 100));
        hub.load_snapshot(10, State::empty(false), Reason::Initial);
        for ts in 11..=15 {
            hub.publish(ts, ts, &[diff(&format!("{{\"t\":{ts}}}"), 1)]);
        }
        hub.advance(20);
        let ev = Client::new(&hub, Resume::After(12)).events().await;
        let ids: Vec<_> = ev.iter().map(|e| e.1.clone().unwrap_or_default()).collect();
        assert_eq!(ids, vec!["13", "14", "15"]);
        assert!(ev.iter().all(|e| e.0 == "update"));

        // Between batches, and at the state's own timestamp: nothing or the tail.
        let mut s = Client::new(&hub, Resume::After(18));
        assert!(s.events().await.is_empty());

        for (after, why) in [(9, "before the floor"), (21, "from the future")] {
            let ev = Client::new(&hub, Resume::After(after)).events().await;
            assert_eq!(ev.len(), 1, "{why}");
            assert_eq!(ev[0].2["reason"], "resume-gap", "{why}");
        }
        let ev = Client::new(&hub, Resume::Invalid).events().await;
        assert_eq!(ev[0].2["reason"], "resume-gap");
    }

    #[tokio::test]
    async fn coalesced_batches_are_never_split_on_resume() {
        let hub = Hub::new(settings(100, 100));
        hub.load_snapshot(10, State::empty(false), Reason::Initial);
        hub.publish(11, 15, &[diff("{\"a\":1}", 1), diff("{\"a\":2}", 1)]);
        let ev = Client::new(&hub, Resume::After(12)).events().await;
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].2["reason"], "resume-gap");
    }

    #[tokio::test]
    async fn history_is_bounded_and_old_ids_get_a_snapshot() {
        let hub = Hub::new(settings(100, 3));
        hub.load_snapshot(10, State::empty(false), Reason::Initial);
        for ts in 11..=20 {
            hub.publish(ts, ts, &[diff(&format!("{{\"t\":{ts}}}"), 1)]);
        }
        let ev = Client::new(&hub, Resume::After(16)).events().await;
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].2["reason"], "resume-gap");
        let ev = Client::new(&hub, Resume::After(17)).events().await;
        assert_eq!(ev.len(), 3);
    }

    #[tokio::test]
    async fn a_client_that_falls_behind_gets_a_lagged_snapshot() {
        let hub = Hub::new(settings(4, 1000));
        hub.load_snapshot(10, State::empty(false), Reason::Initial);
        let mut slow = Client::connected(&hub).await;
        for ts in 11..=30 {
            hub.publish(ts, ts, &[diff(&format!("{{\"t\":{ts}}}"), 1)]);
        }
        let ev = slow.events().await;
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(ev[0].2["reason"], "lagged");
        assert_eq!(ev[0].2["changes"].as_array().map(Vec::len), Some(20));
        assert_eq!(hub.stats.lagged.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_lagged_client_still_learns_that_the_upstream_is_down() {
        let hub = Hub::new(settings(4, 1000));
        hub.load_snapshot(10, State::empty(false), Reason::Initial);
        hub.set_health(Health::Streaming);
        let mut slow = Client::connected(&hub).await;
        hub.publish(11, 11, &[diff("{\"t\":11}", 1)]);
        hub.set_health(Health::Reconnecting {
            error: "link lost".into(),
        });
        for _ in 0..10 {
            hub.heartbeat();
        }
        let items = slow.items().await;
        let status: Vec<_> = items
            .iter()
            .filter_map(|i| match i {
                Item::Event(e) if e.event == "status" => Some(e.data.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(events(&items)[0].2["reason"], "lagged");
        assert_eq!(status.len(), 1, "{items:?}");
        assert!(status[0].contains("link lost"), "{status:?}");
    }

    #[tokio::test]
    async fn generic_errors_hide_the_upstream_text_from_clients() {
        let hub = Hub::new(settings(100, 100));
        hub.load_snapshot(10, State::empty(false), Reason::Initial);
        let mut s = Client::connected(&hub).await;
        let secret = "relation \"payroll_secret\" does not exist (SQLSTATE 42P01)";
        hub.set_health(Health::Reconnecting {
            error: secret.into(),
        });
        let statuses = |items: Vec<Item>| -> Vec<String> {
            items
                .into_iter()
                .filter_map(|i| match i {
                    Item::Event(e) if e.event == "status" => Some(e.data),
                    _ => None,
                })
                .collect()
        };
        assert!(statuses(s.items().await)[0].contains("payroll_secret"));
        hub.update_settings(Settings {
            client_errors: ClientErrors::Generic,
            ..settings(100, 100)
        });
        let seen = statuses(s.items().await);
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert!(!seen[0].contains("payroll"), "{seen:?}");
        assert!(seen[0].contains(GENERIC_ERROR), "{seen:?}");
        hub.warn("key violation: several rows for key {\"ssn\":1}".into());
        let seen = statuses(s.items().await);
        assert!(!seen[0].contains("ssn"), "{seen:?}");
        let fresh = statuses(Client::new(&hub, Resume::Fresh).items().await);
        assert!(!fresh[0].contains("payroll"), "{fresh:?}");
        // The operator still sees the detail.
        assert!(
            matches!(hub.health(), Health::Reconnecting { error } if error.contains("payroll"))
        );
    }

    #[tokio::test]
    async fn a_resume_before_the_first_snapshot_is_a_resume_gap() {
        let hub = Hub::new(settings(100, 100));
        let mut resumed = Client::new(&hub, Resume::After(5));
        let mut hostile = Client::new(&hub, Resume::Invalid);
        let mut fresh = Client::new(&hub, Resume::Fresh);
        for client in [&mut resumed, &mut hostile, &mut fresh] {
            assert!(client.events().await.is_empty());
        }
        hub.load_snapshot(10, State::empty(false), Reason::Initial);
        hub.publish(11, 11, &[diff("{\"a\":1}", 1)]);
        let reasons = |ev: Vec<Ev>| {
            ev.iter()
                .map(|e| e.2["reason"].as_str().unwrap_or("-").to_string())
                .collect::<Vec<_>>()
        };
        // The snapshot already holds timestamp 11, so no update follows it.
        let gap = vec!["resume-gap".to_string()];
        assert_eq!(reasons(resumed.events().await), gap);
        assert_eq!(reasons(hostile.events().await), gap);
        let initial = vec!["initial".to_string()];
        assert_eq!(reasons(fresh.events().await), initial);
    }

    #[tokio::test]
    async fn a_new_retry_reaches_connected_clients() {
        let hub = Hub::new(settings(100, 100));
        hub.load_snapshot(10, State::empty(false), Reason::Initial);
        let mut s = Client::connected(&hub).await;
        hub.update_settings(settings(100, 100));
        assert!(s.items().await.is_empty(), "unchanged retry");
        hub.update_settings(Settings {
            retry: Duration::from_millis(2500),
            ..settings(100, 100)
        });
        assert_eq!(s.items().await, vec![Item::Retry(2500)], "connected client");
        let items = Client::new(&hub, Resume::Fresh).items().await;
        assert_eq!(items.first(), Some(&Item::Retry(2500)), "new client");

        // A reset that replaces the range holding the change still carries it.
        hub.update_settings(Settings {
            retry: Duration::from_millis(4000),
            ..settings(100, 100)
        });
        hub.load_snapshot(11, State::empty(false), Reason::ConfigChanged);
        let items = s.items().await;
        assert!(items.contains(&Item::Retry(4000)), "{items:?}");
        assert_eq!(events(&items)[0].2["reason"], "config-changed");
    }

    #[tokio::test]
    async fn keyed_streams_consolidate_per_key() {
        let hub = Hub::new(settings(100, 100));
        let mut state = State::empty(true);
        state.apply(&Change::Upsert {
            key: "{\"id\":1}".into(),
            row: Some("{\"id\":1,\"v\":\"a\"}".into()),
        });
        hub.load_snapshot(10, state, Reason::Initial);
        let mut s = Client::connected(&hub).await;
        let up = |id: i64, v: Option<&str>| Change::Upsert {
            key: format!("{{\"id\":{id}}}").into(),
            row: v.map(|v| format!("{{\"id\":{id},\"v\":\"{v}\"}}").into()),
        };
        // Key 2 comes and goes within the batch; key 1 ends where it started.
        hub.publish(
            11,
            12,
            &[
                up(2, Some("x")),
                up(1, Some("b")),
                up(2, None),
                up(1, Some("a")),
                up(3, Some("c")),
            ],
        );
        hub.publish(13, 13, &[up(1, None)]);
        let ev = s.events().await;
        assert_eq!(ev.len(), 2, "{ev:?}");
        assert_eq!(
            ev[0].2["changes"],
            serde_json::json!([{"key":{"id":3},"row":{"id":3,"v":"c"}}])
        );
        assert_eq!(
            ev[1].2["changes"],
            serde_json::json!([{"key":{"id":1},"row":null}])
        );
    }

    #[tokio::test]
    async fn resync_sends_only_the_difference_and_reset_sends_a_snapshot() {
        let hub = Hub::new(settings(100, 100));
        let mut old = State::empty(false);
        old.apply(&diff("{\"a\":1}", 1));
        old.apply(&diff("{\"a\":2}", 1));
        hub.load_snapshot(10, old, Reason::Initial);
        let mut s = Client::connected(&hub).await;

        let mut fresh = State::empty(false);
        fresh.apply(&diff("{\"a\":2}", 1));
        fresh.apply(&diff("{\"a\":3}", 2));
        hub.resync(20, fresh.clone());
        let ev = s.events().await;
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].0, "update");
        let mut changes: Vec<String> = ev[0].2["changes"]
            .as_array()
            .map(|a| a.iter().map(|c| c.to_string()).collect())
            .unwrap_or_default();
        changes.sort();
        assert_eq!(
            changes,
            vec![
                "{\"diff\":-1,\"row\":{\"a\":1}}",
                "{\"diff\":2,\"row\":{\"a\":3}}"
            ]
        );
        assert_eq!(hub.state(), Some(fresh));

        hub.load_snapshot(30, State::empty(true), Reason::ConfigChanged);
        hub.close(EndReason::Removed);
        let ev = s.events().await;
        assert_eq!(ev[0].2["reason"], "config-changed");
        assert_eq!(ev[1].0, "end");
        assert_eq!(ev[1].2["reason"], "removed");
        assert!(s.stream.next().await.is_none(), "stream ends after `end`");
        assert_eq!(hub.stats.clients.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_resync_that_cannot_be_diffed_is_an_upstream_reset() {
        let hub = Hub::new(settings(100, 100));
        hub.load_snapshot(10, State::empty(false), Reason::Initial);
        let mut s = Client::connected(&hub).await;
        let mut keyed = State::empty(true);
        keyed.apply(&Change::Upsert {
            key: "{\"k\":1}".into(),
            row: Some("{\"k\":1}".into()),
        });
        hub.resync(20, keyed);
        let ev = s.events().await;
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].0, "snapshot");
        assert_eq!(ev[0].2["reason"], "upstream-reset");
        assert_eq!(ev[0].1.as_deref(), Some("20"));
    }
}
