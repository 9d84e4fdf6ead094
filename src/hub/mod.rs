//! One hub per stream: the current state, a bounded ring of encoded events (which is both
//! the resume history and every client's queue), and the fan-out to clients.
//!
//! Every batch is encoded to SSE bytes once, under the hub's lock, and pushed onto the
//! ring. Clients hold only a cursor into the ring: a client that is behind takes every
//! frame it missed in one wake-up (batched writes), and a client that falls further
//! behind than its queue allows gets a fresh `snapshot` with reason `lagged`. Memory is
//! therefore bounded by the ring and the snapshot cache, whatever the clients do.
//!
//! - `state`: row changes and relation states.
//! - `ring`: the lock-protected ring, snapshot cache and client catch-up.
//! - `subscription`: a client's cursor.
//!
//! The hub spawns no tasks. Client streams end when the hub is closed (`end` event) or
//! dropped, and the task that feeds the hub lives in the `upstream` module.

mod ring;
mod state;
mod subscription;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::config::{ClientErrors, StreamConfig};
use crate::sse;
use crate::wire::{self, ChangesJson, EndReason, Health, Reason};
use ring::{Entry, Inner};
pub use state::{add, Change, State};
use state::{consolidate, difference};
pub use subscription::Subscription;

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

/// What every hub of a stream holds alike: its settings, and the `retry` and `status`
/// frames they and the upstream's health encode to. A scoped stream's channels all
/// clone one `Shared`, so none of it is allocated per channel.
#[derive(Debug, Clone)]
pub struct Shared {
    settings: Arc<Settings>,
    /// `retry: <ms>`, encoded once per setting.
    retry: Bytes,
    /// Behind an `Arc`: an error's text is not copied into every channel.
    health: Arc<Health>,
    /// The `status` event of `health`: for clients that skipped a change of it, and
    /// for every client that connects while the upstream is degraded.
    status: Bytes,
}

impl Shared {
    /// A stream's settings, with its upstream still connecting.
    pub fn new(settings: Settings) -> Shared {
        let health = Health::connecting();
        Shared {
            retry: sse::retry(settings.retry.as_millis()),
            status: wire::status_frame(&health, settings.client_errors),
            settings: Arc::new(settings),
            health: Arc::new(health),
        }
    }

    /// The same with new settings; frames are encoded again only if they change.
    pub fn with_settings(&self, settings: Settings) -> Shared {
        Shared {
            retry: if settings.retry == self.settings.retry {
                self.retry.clone()
            } else {
                sse::retry(settings.retry.as_millis())
            },
            status: if settings.client_errors == self.settings.client_errors {
                self.status.clone()
            } else {
                wire::status_frame(&self.health, settings.client_errors)
            },
            settings: Arc::new(settings),
            health: Arc::clone(&self.health),
        }
    }

    /// The same with another upstream health.
    pub fn with_health(&self, health: Health) -> Shared {
        if health == *self.health {
            return self.clone();
        }
        Shared {
            settings: Arc::clone(&self.settings),
            retry: self.retry.clone(),
            status: wire::status_frame(&health, self.settings.client_errors),
            health: Arc::new(health),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn health(&self) -> &Health {
        &self.health
    }
}

/// Why a stream is not ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotReady {
    /// The first snapshot has not arrived yet; the upstream's error, if it has one.
    NoSnapshot(Option<String>),
    /// The upstream is down, with its error.
    Upstream(String),
}

/// Whether a stream with (or without) its first snapshot and this health serves its
/// view live. Without a snapshot, an error (other than not having connected yet) is
/// named too: a stream whose relation lacks a column never gets one.
pub fn readiness(has_state: bool, health: &Health) -> Result<(), NotReady> {
    match (has_state, health) {
        (false, Health::Reconnecting { error }) if *health != Health::connecting() => {
            Err(NotReady::NoSnapshot(Some(error.clone())))
        }
        (false, _) => Err(NotReady::NoSnapshot(None)),
        (true, Health::Reconnecting { error }) => Err(NotReady::Upstream(error.clone())),
        (true, Health::Streaming) => Ok(()),
    }
}

/// Upper bound on the number of changes a resync sends as an ordinary update; larger
/// differences are sent as a `snapshot` with reason `upstream-reset`.
const MAX_RESYNC_CHANGES: usize = 100_000;

/// Counters the metrics endpoint reads.
#[derive(Debug, Default)]
pub struct Stats {
    pub clients: AtomicUsize,
    /// Requests refused by access control, by [`crate::auth::Denial::reason`] (in
    /// the order of `DENIALS`).
    pub denied: [AtomicU64; 4],
    pub batches: AtomicU64,
    pub lagged: AtomicU64,
    pub resets: AtomicU64,
    pub upstream_errors: AtomicU64,
    pub last_ts: AtomicU64,
}

/// The reasons of [`Stats::denied`], in order.
pub const DENIALS: [&str; 4] = ["missing", "invalid", "expired", "forbidden"];

impl Stats {
    pub fn denied(&self, reason: &str) {
        if let Some(i) = DENIALS.iter().position(|r| *r == reason) {
            self.denied[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// See the module documentation.
pub struct Hub {
    inner: Mutex<Inner>,
    /// Bumped (under the lock) whenever clients have something to look at; a client
    /// compares it with the value it last acted on.
    version: AtomicU64,
    /// Wakes the clients waiting on `version`. A `Notify` lives inline, where a watch
    /// channel would allocate a few hundred bytes per hub (per channel of a scoped
    /// stream).
    wake: Notify,
    pub stats: Stats,
    /// A scoped stream's clock: the timestamp its partitions are at. A channel hub
    /// hears only of timestamps that touched it; the others pass on this clock.
    clock: Option<Arc<AtomicU64>>,
}

impl Hub {
    pub fn new(settings: Settings) -> Arc<Hub> {
        Self::build(Shared::new(settings), None)
    }

    /// A hub with a stream's shared settings and frames, whose state is also at every
    /// timestamp `clock` reaches: a scoped stream's channel.
    pub fn with_clock(shared: Shared, clock: Arc<AtomicU64>) -> Arc<Hub> {
        Self::build(shared, Some(clock))
    }

    fn build(shared: Shared, clock: Option<Arc<AtomicU64>>) -> Arc<Hub> {
        Arc::new(Hub {
            inner: Mutex::new(Inner {
                shared,
                state: None,
                state_ts: 0,
                ring: VecDeque::new(),
                base_seq: 0,
                ring_bytes: 0,
                floor_ts: 0,
                resume_seq: 0,
                snapshots: Vec::new(),
                end: None,
                rechecks: 0,
                keepalives: 0,
            }),
            version: AtomicU64::new(0),
            wake: Notify::new(),
            stats: Stats::default(),
            clock,
        })
    }

    /// The lock is only held for short, non-async sections, so a std mutex is right; a
    /// panic while holding it cannot leave the ring half-updated in a way that matters
    /// more than losing the stream, so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(clock) = &self.clock {
            let ts = clock.load(Ordering::Acquire);
            if inner.state.is_some() && ts > inner.state_ts {
                inner.state_ts = ts;
                inner.state_changed();
            }
        }
        inner
    }

    /// Wakes the clients. Called with the lock held (`_inner`), so a client that sees
    /// the new version also sees what changed.
    fn notify(&self, _inner: &Inner) {
        self.version.fetch_add(1, Ordering::Release);
        self.wake.notify_waiters();
    }

    pub fn update_settings(&self, settings: Settings) {
        let mut inner = self.lock();
        let shared = inner.shared.with_settings(settings);
        self.replace_shared(&mut inner, shared);
    }

    /// Takes new shared settings and frames (see [`Shared`]), telling connected
    /// clients of a new `status` or `retry`.
    pub fn set_shared(&self, shared: Shared) {
        self.replace_shared(&mut self.lock(), shared);
    }

    /// Read and replaced under one lock, so a health and a settings change cannot
    /// undo each other.
    fn replace_shared(&self, inner: &mut Inner, shared: Shared) {
        let old = &inner.shared;
        let status = shared.health != old.health
            || shared.settings.client_errors != old.settings.client_errors;
        let retry = shared.settings.retry != old.settings.retry;
        inner.shared = shared;
        if status {
            let frame = inner.shared.status.clone();
            inner.push(Entry::Control(frame));
            self.notify(inner);
        }
        if retry {
            // Connected browsers learn the new reconnection delay too, not only new ones.
            let frame = inner.shared.retry.clone();
            inner.push(Entry::Control(frame));
            self.notify(inner);
        }
        inner.trim();
    }

    /// True once the first snapshot has been loaded.
    pub fn is_ready(&self) -> bool {
        self.lock().state.is_some()
    }

    /// Whether the stream is serving its view live: it has its first snapshot and its
    /// upstream is streaming. `Err` says why not.
    pub fn readiness(&self) -> Result<(), NotReady> {
        let inner = self.lock();
        readiness(inner.state.is_some(), inner.shared.health())
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
        self.lock().shared.health().clone()
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
            change.encode(&mut data);
        }
        let bytes = sse::event(&inner.shared.settings.event, Some(id), &data.finish());
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
        if *inner.shared.health() != health {
            let shared = inner.shared.with_health(health);
            self.replace_shared(&mut inner, shared);
        }
    }

    /// Tells clients about a problem that does not stop the stream, as a `status`
    /// event with the upstream still `streaming`.
    pub fn warn(&self, error: String) {
        let mut inner = self.lock();
        let frame = wire::warning_frame(&error, inner.shared.settings.client_errors);
        inner.push(Entry::Frame(frame));
        self.notify(&inner);
    }

    /// Sends a `: keepalive` comment to every client.
    pub fn heartbeat(&self) {
        let mut inner = self.lock();
        if inner.end.is_none() {
            inner.keepalives = inner.keepalives.wrapping_add(1);
            self.notify(&inner);
        }
    }

    /// Asks every connected client to check its credentials against the current
    /// rules (after a reload changed them).
    pub fn recheck(&self) {
        let mut inner = self.lock();
        inner.rechecks = inner.rechecks.wrapping_add(1);
        self.notify(&inner);
    }

    /// Ends every client stream with `event: end`.
    pub fn close(&self, reason: EndReason) {
        let mut inner = self.lock();
        if inner.end.is_some() {
            return;
        }
        inner.end = Some((reason, reason.frame()));
        self.notify(&inner);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::{Item, Parser};
    use crate::wire::Resume;
    use futures::Stream;
    use futures::StreamExt;
    use std::convert::Infallible;
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

        // Between batches, at a timestamp the state already holds: nothing to replay,
        // but a live stream that gets what comes next, and only that.
        let mut s = Client::new(&hub, Resume::After(18));
        let items = s.items().await;
        assert_eq!(items.first(), Some(&Item::Retry(15000)), "{items:?}");
        assert!(events(&items).is_empty(), "{items:?}");

        for (after, why) in [(9, "before the floor"), (21, "from the future")] {
            let ev = Client::new(&hub, Resume::After(after)).events().await;
            assert_eq!(ev.len(), 1, "{why}");
            assert_eq!(ev[0].2["reason"], "resume-gap", "{why}");
        }
        let ev = Client::new(&hub, Resume::Invalid).events().await;
        assert_eq!(ev[0].2["reason"], "resume-gap");

        hub.publish(21, 21, &[diff("{\"t\":21}", 1)]);
        let ev = s.events().await;
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(ev[0].0, "update");
        assert_eq!(ev[0].1.as_deref(), Some("21"));
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
    async fn heartbeats_reach_clients_without_filling_the_ring() {
        let hub = Hub::new(settings(4, 1000));
        hub.load_snapshot(10, State::empty(false), Reason::Initial);
        let mut client = Client::connected(&hub).await;
        let before = hub.lock().ring.len();
        for _ in 0..2000 {
            hub.heartbeat();
        }
        assert_eq!(hub.lock().ring.len(), before, "no ring entry per heartbeat");
        // Missed heartbeats need one keepalive, and no snapshot(lagged).
        let items = client.items().await;
        let comments = items
            .iter()
            .filter(|i| matches!(i, Item::Comment(c) if c == "keepalive"))
            .count();
        assert_eq!(comments, 1, "{items:?}");
        assert!(events(&items).is_empty(), "{items:?}");
        hub.heartbeat();
        let items = client.items().await;
        assert!(items
            .iter()
            .any(|i| matches!(i, Item::Comment(c) if c == "keepalive")));
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
        for t in 12..22 {
            hub.publish(t, t, &[diff(&format!("{{\"t\":{t}}}"), 1)]);
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
        assert!(seen[0].contains(wire::GENERIC_ERROR), "{seen:?}");
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
        let after = tokio::time::timeout(Duration::from_secs(1), s.stream.next()).await;
        assert!(
            matches!(after, Ok(None)),
            "stream ends right after `end`: {after:?}"
        );
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
