//! The hub's lock-protected inside: the state, the bounded ring of encoded events
//! (the resume history and every client's queue at once), the snapshot cache, and
//! moving a client's cursor along the ring.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::state::State;
use super::{Shared, Stats};
use crate::wire::{self, ChangesJson, EndReason, Health, Reason};

#[derive(Debug)]
pub(super) enum Entry {
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
    pub(super) fn size(&self) -> usize {
        match self {
            Entry::Batch { bytes, .. } | Entry::Frame(bytes) | Entry::Control(bytes) => bytes.len(),
            Entry::Reset(_) => 0,
        }
    }
}

pub(super) struct Inner {
    /// Settings, health and their frames, as the stream's other hubs hold them.
    pub(super) shared: Shared,
    /// `None` until the first complete snapshot arrives.
    pub(super) state: Option<State>,
    /// The timestamp the state is at.
    pub(super) state_ts: u64,
    pub(super) ring: VecDeque<Entry>,
    /// Sequence number of `ring[0]`.
    pub(super) base_seq: u64,
    pub(super) ring_bytes: usize,
    /// Oldest id a client may resume from, and the first entry that may serve it.
    pub(super) floor_ts: u64,
    pub(super) resume_seq: u64,
    /// Snapshots of the current state by reason, kept only while several clients
    /// may want one (see [`Inner::snapshot`]).
    pub(super) snapshots: Vec<(Reason, Bytes)>,
    /// Why and with which frame the stream ended, once it has.
    pub(super) end: Option<(EndReason, Bytes)>,
    /// Bumped when the rules that admit clients change: each client checks its
    /// credentials again.
    pub(super) rechecks: u32,
    /// Heartbeats so far. A keepalive is not a ring entry: kept there, a thousand
    /// of them would sit in every idle stream's (and every channel's) history.
    pub(super) keepalives: u64,
}

impl Inner {
    pub(super) fn head(&self) -> u64 {
        self.base_seq + self.ring.len() as u64
    }

    pub(super) fn push(&mut self, entry: Entry) {
        self.ring_bytes += entry.size();
        // Room is made first: pushing onto a full ring would double its capacity to
        // hold `history + 1` entries for an instant, and keep the doubled capacity.
        if self.ring.len() >= self.shared.settings.history {
            self.pop();
        }
        self.ring.push_back(entry);
        self.trim();
    }

    pub(super) fn trim(&mut self) {
        while self.ring.len() > self.shared.settings.history
            || (self.ring_bytes > self.shared.settings.history_bytes && self.ring.len() > 1)
        {
            if !self.pop() {
                break;
            }
        }
        self.resume_seq = self.resume_seq.max(self.base_seq);
    }

    /// Drops the oldest entry; false if there was none.
    fn pop(&mut self) -> bool {
        let Some(old) = self.ring.pop_front() else {
            return false;
        };
        self.ring_bytes -= old.size();
        self.base_seq += 1;
        if let Entry::Batch { id, .. } = old {
            self.floor_ts = self.floor_ts.max(id);
        }
        true
    }

    /// The snapshot of the current state for `reason`. With `share` (the hub has
    /// other clients who may need it too) it is kept, so it is encoded at most once
    /// per state; a lone client's snapshot is not kept (most channels of a scoped
    /// stream have one client, and would hold their encoded rows twice).
    pub(super) fn snapshot(&mut self, reason: Reason, share: bool) -> Option<Bytes> {
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
        let bytes = crate::sse::event(wire::SNAPSHOT, Some(ts), &data.finish());
        if share {
            self.snapshots.push((reason, bytes.clone()));
        }
        Some(bytes)
    }

    pub(super) fn state_changed(&mut self) {
        self.snapshots.clear();
    }

    /// Moves a client's cursor to the head, appending what it must write to `out`.
    /// Returns true once the client has everything and the stream has ended.
    /// `resumed` marks a client that asked to resume before the stream had any state:
    /// the first snapshot is a `resume-gap` for it, not `initial`.
    pub(super) fn catch_up(
        &mut self,
        pos: &mut u64,
        out: &mut Vec<Bytes>,
        stats: &Stats,
        resumed: bool,
    ) -> bool {
        let head = self.head();
        let share = stats.clients.load(Ordering::Relaxed) > 1;
        if *pos < self.base_seq || head - *pos > self.shared.settings.client_queue as u64 {
            stats.lagged.fetch_add(1, Ordering::Relaxed);
            let skipped_control = *pos < self.base_seq || self.has_control(*pos);
            if let Some(s) = self.snapshot(Reason::Lagged, share) {
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
                if let Some(s) = self.snapshot(reason, share) {
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
            Some((_, end)) => {
                out.push(end.clone());
                true
            }
            None => false,
        }
    }

    /// Whether the ring from `pos` on holds a status or retry change.
    pub(super) fn has_control(&self, pos: u64) -> bool {
        let start = pos.saturating_sub(self.base_seq) as usize;
        self.ring
            .range(start.min(self.ring.len())..)
            .any(|e| matches!(e, Entry::Control(_)))
    }

    /// The current `retry` and status, for a client that skipped their changes.
    pub(super) fn push_control(&self, out: &mut Vec<Bytes>) {
        out.push(self.shared.retry.clone());
        out.push(self.shared.status.clone());
    }

    /// The `status` a connecting client is sent first: only while the upstream is
    /// degraded.
    pub(super) fn degraded(&self) -> Option<Bytes> {
        matches!(self.shared.health(), Health::Reconnecting { .. })
            .then(|| self.shared.status.clone())
    }

    /// Where a resuming client's cursor goes, or `None` if the history cannot serve it.
    pub(super) fn resume_position(&self, after: u64) -> Option<u64> {
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
