//! A client's subscription: its cursor into the hub's ring, and the count of connected
//! clients.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;

use super::Hub;
use crate::wire::{EndReason, Reason, Resume};

impl Hub {
    /// A client's subscription: `retry`, then a snapshot or the replay its `resume`
    /// asks for, then every event until the hub closes.
    pub fn subscribe(self: &Arc<Self>, resume: Resume) -> Subscription {
        let hub = Arc::clone(self);
        // Read before the lock is taken, so anything pushed after the catch-up below
        // wakes it; at worst a wake-up finds nothing new.
        let seen = self.version.load(Ordering::Acquire);
        // Counted first, so that the snapshot below is kept only if another client
        // might want it too.
        let guard = ClientGuard::new(&hub);
        let mut first = Vec::with_capacity(4);
        let mut pos;
        let ended;
        let resumed;
        let checked;
        let keepalives;
        {
            let mut inner = hub.lock();
            checked = inner.rechecks;
            keepalives = inner.keepalives;
            resumed = inner.state.is_none() && !matches!(resume, Resume::Fresh);
            first.push(inner.shared.retry.clone());
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
                    let share = hub.stats.clients.load(Ordering::Relaxed) > 1;
                    if let Some(s) = inner.snapshot(reason, share) {
                        first.push(s);
                    }
                }
            }
            ended = inner.catch_up(&mut pos, &mut first, &hub.stats, resumed);
        }
        Subscription {
            guard,
            hub,
            seen,
            pos,
            ended,
            resumed,
            checked,
            keepalives,
            recheck: false,
            first,
        }
    }
}

/// One client's cursor into a hub's ring. Frames are shared `Bytes`: a client never
/// copies an event, it only holds references to the hub's encoding.
pub struct Subscription {
    hub: Arc<Hub>,
    /// The hub's version this client last acted on.
    seen: u64,
    pos: u64,
    ended: bool,
    /// Asked to resume before the stream had a state; cleared by its first snapshot.
    resumed: bool,
    /// The hub's recheck count this client has acted on.
    checked: u32,
    /// The hub's heartbeat count this client has answered with a keepalive.
    keepalives: u64,
    /// The rules changed since the client last looked.
    recheck: bool,
    /// Frames computed when the client subscribed, handed out first.
    first: Vec<Bytes>,
    guard: ClientGuard,
}

impl Subscription {
    /// Waits until there is something to write, or the rules changed
    /// ([`Subscription::take_recheck`]), and appends what to write to `out`. Returns
    /// false once the stream has ended (after its `end` frame was handed out).
    pub async fn next(&mut self, out: &mut Vec<Bytes>) -> bool {
        if !self.first.is_empty() {
            // Taken, not appended: the buffer is not kept for the connection's life.
            out.extend(std::mem::take(&mut self.first));
            return true;
        }
        while !self.ended {
            self.wait().await;
            self.take(out);
            if !out.is_empty() || self.recheck {
                return true;
            }
        }
        false
    }

    /// Waits until the hub may have something new for this client (or it ended);
    /// [`Subscription::drain`] then takes it. For a reader of several hubs at once.
    pub async fn changed(&mut self) {
        if !self.first.is_empty() || self.ended {
            return;
        }
        self.wait().await;
    }

    /// Waits until the hub's version differs from the one last seen, and marks it
    /// seen. Cancel-safe: nothing is marked until it returns.
    async fn wait(&mut self) {
        loop {
            let notified = self.hub.wake.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the version is read, so a bump after the read wakes it.
            notified.as_mut().enable();
            let version = self.hub.version.load(Ordering::Acquire);
            if version != self.seen {
                self.seen = version;
                return;
            }
            notified.await;
        }
    }

    /// Takes everything the hub has for this client now, without waiting, and the
    /// timestamp the hub's state is at (`None` before its first snapshot). Every
    /// event with an id up to that timestamp is in `out` or was taken before: both
    /// are read under one lock. Returns false once the stream has ended.
    pub fn drain(&mut self, out: &mut Vec<Bytes>) -> (bool, Option<u64>) {
        out.extend(std::mem::take(&mut self.first));
        // Marked seen before the lock: anything pushed after the catch-up wakes
        // `changed` again.
        self.seen = self.hub.version.load(Ordering::Acquire);
        let ts = self.take(out);
        (!self.ended, ts)
    }

    /// Takes, under one lock, what the hub has for this client: its new frames and a
    /// keepalive (unless the stream has ended for it), and a change of the rules.
    /// Returns the timestamp the hub's state is at.
    fn take(&mut self, out: &mut Vec<Bytes>) -> Option<u64> {
        let mut inner = self.hub.lock();
        if !self.ended {
            self.ended = inner.catch_up(&mut self.pos, out, &self.hub.stats, self.resumed);
            self.resumed &= inner.state.is_none();
            keepalive(&mut self.keepalives, self.ended, &inner, out);
        }
        if inner.rechecks != self.checked {
            self.checked = inner.rechecks;
            self.recheck = true;
        }
        inner.state.as_ref().map(|_| inner.state_ts)
    }

    /// Skips to the head of the ring with a `snapshot(lagged)`: for a reader that
    /// holds frames of its own and fell too far behind with them.
    pub fn skip_to_snapshot(&mut self, out: &mut Vec<Bytes>) {
        let mut inner = self.hub.lock();
        self.hub.stats.lagged.fetch_add(1, Ordering::Relaxed);
        let share = self.hub.stats.clients.load(Ordering::Relaxed) > 1;
        if let Some(s) = inner.snapshot(Reason::Lagged, share) {
            out.push(s);
        }
        self.pos = inner.head();
    }

    /// Whether a recheck is waiting to be taken, without taking it.
    pub fn recheck_pending(&self) -> bool {
        self.recheck
    }

    /// Whether the rules that admit clients changed since the last call: the caller
    /// checks its credentials again.
    pub fn take_recheck(&mut self) -> bool {
        std::mem::take(&mut self.recheck)
    }

    /// Why the stream ended, once the hub has ended it.
    pub fn end_reason(&self) -> Option<EndReason> {
        self.hub.lock().end.as_ref().map(|(reason, _)| *reason)
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

/// Counts connected clients for metrics; decrements when the stream is dropped.
pub(super) struct ClientGuard(Arc<Hub>);

impl ClientGuard {
    pub(super) fn new(hub: &Arc<Hub>) -> Self {
        hub.stats.clients.fetch_add(1, Ordering::Relaxed);
        ClientGuard(Arc::clone(hub))
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.stats.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One `: keepalive` if the hub had a heartbeat since the client's last (several
/// missed ones need only one).
fn keepalive(seen: &mut u64, ended: bool, inner: &super::ring::Inner, out: &mut Vec<Bytes>) {
    if inner.keepalives != *seen && !ended {
        *seen = inner.keepalives;
        out.push(Bytes::from_static(crate::sse::KEEPALIVE));
    }
}
