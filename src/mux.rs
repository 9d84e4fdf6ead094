//! A multiplexed stream: several streams' events on one connection, released at one
//! timestamp for all of them.
//!
//! Every stream shares Materialize's timeline, so a timestamp `T` means the same
//! moment in each. A mux reads each constituent's hub like any client (a cursor into
//! its ring), holds the events it reads, and releases them only up to `R`, the
//! smallest timestamp every constituent has closed. A released group is every held
//! event up to `R`, in timestamp order; only its last event carries an id, `R`, and
//! after the whole group the page's state is every constituent's view at `R`: a
//! consistent cut. Group ids only grow. A snapshot (the first, or after `lagged`,
//! `resume-gap`, `upstream-reset`, `config-changed`) is held like any event, and
//! nothing is released while a constituent has no state or holds a snapshot past
//! `R`, so a page never shows two streams at different moments.
//!
//! If one constituent stops closing timestamps (its upstream is down), `R` stops and
//! the others wait with it: the cut stays honest. Its `status` passes at once, so the
//! page knows why. Held events are bounded per constituent by its `client_queue`;
//! past it, they are dropped for a `snapshot(lagged)`, so memory stays bounded
//! however long the wait.
//!
//! Events are re-encoded per mux connection, with `"stream": "<path as requested>"`
//! added to their data: the one per-connection cost a mux has over single streams.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;

use crate::hub::Subscription;
use crate::sse;
use crate::wire::{self, EndReason};

/// One stream of a mux.
pub struct Part {
    /// The path as requested, which every event of this stream names.
    pub label: Arc<str>,
    sub: Subscription,
    /// Events read and not yet released, in timestamp order.
    held: VecDeque<Held>,
    /// The largest timestamp this stream is known to have closed: every event up to
    /// it has been read.
    closed: Option<u64>,
    /// Whether the client has been given a state (a snapshot) for this stream.
    delivered: bool,
    /// How many events may be held before they are replaced by a snapshot.
    limit: usize,
}

struct Held {
    ts: u64,
    snapshot: bool,
    name: Box<str>,
    data: Box<str>,
}

impl Part {
    /// A part reading `sub`, holding at most `limit` events. A part of a resumed mux
    /// starts `delivered`: the client has its state at the resume id, and the hub
    /// either replays from there or sends a snapshot (`resume-gap`).
    pub fn new(label: Arc<str>, sub: Subscription, limit: usize, resumed: bool) -> Part {
        Part {
            label,
            sub,
            held: VecDeque::new(),
            closed: None,
            delivered: resumed,
            limit: limit.max(1),
        }
    }
}

/// See the module documentation.
pub struct Mux {
    parts: Vec<Part>,
    /// The id of the last released group.
    released: Option<u64>,
    /// Reused for every read.
    frames: Vec<Bytes>,
    /// Set once the connection as a whole must end, after `out` is written.
    finished: bool,
    /// The reason of the last part that ended.
    ended_with: Option<EndReason>,
}

/// Why a part left the mux.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Left {
    pub label: Arc<str>,
    pub reason: EndReason,
}

impl Mux {
    /// A mux of `parts`; `resumed_at` is the id the client resumes from, if any.
    pub fn new(parts: Vec<Part>, resumed_at: Option<u64>) -> Mux {
        Mux {
            parts,
            released: resumed_at,
            frames: Vec::new(),
            finished: false,
            ended_with: None,
        }
    }

    /// Why the mux ended: the reason of the last stream that left it.
    pub fn ended_with(&self) -> Option<EndReason> {
        self.ended_with
    }

    /// Waits until there is something to write and appends it to `out`. Returns false
    /// once the mux has ended (after its last frames were handed out).
    pub async fn next(&mut self, out: &mut Vec<Bytes>) -> bool {
        let start = out.len();
        loop {
            if self.finished {
                return false;
            }
            self.read(out);
            self.release(out);
            if self.parts.is_empty() {
                self.finished = true;
            }
            if out.len() > start {
                return true;
            }
            if self.finished {
                return false;
            }
            if self.rechecks_pending() {
                return true;
            }
            let waits = self.parts.iter_mut().map(|p| Box::pin(p.sub.changed()));
            futures::future::select_all(waits).await;
        }
    }

    /// The labels of the parts whose access rules changed since the last call: the
    /// caller checks each again and ends the ones no longer admitted.
    pub fn take_rechecks(&mut self) -> Vec<Arc<str>> {
        self.parts
            .iter_mut()
            .filter_map(|p| p.sub.take_recheck().then(|| Arc::clone(&p.label)))
            .collect()
    }

    fn rechecks_pending(&self) -> bool {
        self.parts.iter().any(|p| p.sub.recheck_pending())
    }

    /// Ends one part (its rules no longer admit the client): `end` with its label,
    /// and the others go on.
    pub fn end_part(&mut self, label: &str, reason: EndReason, out: &mut Vec<Bytes>) {
        if let Some(i) = self.parts.iter().position(|p| &*p.label == label) {
            let part = self.parts.remove(i);
            out.push(end_frame(&part.label, reason));
            self.ended_with = Some(reason);
            // Held events of the others may now be releasable.
            self.release(out);
        }
    }

    /// Reads every part's new frames: events are held, everything else passes.
    fn read(&mut self, out: &mut Vec<Bytes>) {
        let mut ended: Vec<(usize, Option<EndReason>)> = Vec::new();
        for (i, part) in self.parts.iter_mut().enumerate() {
            let (alive, closed) = part.sub.drain(&mut self.frames);
            if let Some(ts) = closed {
                part.closed = Some(part.closed.map_or(ts, |c| c.max(ts)));
            }
            let mut end = None;
            for frame in self.frames.drain(..) {
                match read_frame(&frame) {
                    Frame::Event { name, data, .. } if name == wire::END => {
                        end = Some(end_reason(data));
                    }
                    Frame::Event {
                        name,
                        id: Some(ts),
                        data,
                    } => part.held.push_back(Held {
                        ts,
                        snapshot: name == wire::SNAPSHOT,
                        name: name.into(),
                        data: data.into(),
                    }),
                    // `status` and warnings: at once, with the stream's label.
                    Frame::Event {
                        name,
                        id: None,
                        data,
                    } => {
                        out.push(sse::event(name, None, &labelled(&part.label, data)));
                    }
                    // Keepalives and `retry` are the connection's: the first part's.
                    Frame::Other => {
                        if i == 0 {
                            out.push(frame);
                        }
                    }
                }
            }
            if part.held.len() > part.limit {
                part.held.clear();
                part.sub.skip_to_snapshot(&mut self.frames);
                for frame in self.frames.drain(..) {
                    if let Frame::Event {
                        name,
                        id: Some(ts),
                        data,
                    } = read_frame(&frame)
                    {
                        part.held.push_back(Held {
                            ts,
                            snapshot: true,
                            name: name.into(),
                            data: data.into(),
                        });
                    }
                }
            }
            if !alive || end.is_some() {
                ended.push((i, end));
            }
        }
        // What can be released goes out before an ending part leaves.
        if !ended.is_empty() {
            self.release(out);
        }
        for (i, reason) in ended.into_iter().rev() {
            let part = self.parts.remove(i);
            let reason = reason.unwrap_or(EndReason::Removed);
            out.push(end_frame(&part.label, reason));
            self.ended_with = Some(reason);
            // Only a stream removed from the config, or no longer allowed, leaves
            // alone; anything else (shutdown, reconfigured...) ends the connection.
            if !matches!(reason, EndReason::Removed | EndReason::Forbidden) {
                self.finished = true;
            }
        }
    }

    /// Releases every held event up to the common closed timestamp, as one group.
    fn release(&mut self, out: &mut Vec<Bytes>) {
        let Some(cut) = self.parts.iter().map(|p| p.closed).min().flatten() else {
            return;
        };
        if self.released.is_some_and(|r| cut <= r) {
            // Group ids only grow: a client that cannot see which events had an id
            // (EventSource) tells groups apart by a changed id.
            return;
        }
        let consistent = self.parts.iter().all(|p| {
            let snapshot_due = p.held.iter().any(|h| h.snapshot);
            let snapshot_ready = p.held.iter().any(|h| h.snapshot && h.ts <= cut);
            let snapshot_late = p.held.iter().any(|h| h.snapshot && h.ts > cut);
            !snapshot_late && (p.delivered || (snapshot_due && snapshot_ready))
        });
        if !consistent {
            return;
        }
        let mut group: Vec<(u64, usize, Held)> = Vec::new();
        for (i, part) in self.parts.iter_mut().enumerate() {
            while part.held.front().is_some_and(|h| h.ts <= cut) {
                if let Some(h) = part.held.pop_front() {
                    part.delivered |= h.snapshot;
                    group.push((h.ts, i, h));
                }
            }
        }
        if group.is_empty() {
            return;
        }
        // Stable: a part's own events keep their order.
        group.sort_by_key(|(ts, i, _)| (*ts, *i));
        let last = group.len() - 1;
        for (n, (_, i, h)) in group.into_iter().enumerate() {
            let id = (n == last).then_some(cut);
            out.push(sse::event(
                &h.name,
                id,
                &labelled(&self.parts[i].label, &h.data),
            ));
        }
        self.released = Some(cut);
    }
}

/// A frame as the hub encoded it.
enum Frame<'a> {
    Event {
        name: &'a str,
        id: Option<u64>,
        data: &'a str,
    },
    /// A comment or `retry`.
    Other,
}

/// Reads one frame of the hub's own encoding (`event:`, optional `id:`, one `data:`
/// line), which is all a ring holds besides comments and `retry`.
fn read_frame(frame: &[u8]) -> Frame<'_> {
    let Ok(text) = std::str::from_utf8(frame) else {
        return Frame::Other;
    };
    let (mut name, mut id, mut data) = (None, None, None);
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("event: ") {
            name = Some(v);
        } else if let Some(v) = line.strip_prefix("id: ") {
            id = v.parse().ok();
        } else if let Some(v) = line.strip_prefix("data: ") {
            data = Some(v);
        }
    }
    match (name, data) {
        (Some(name), Some(data)) => Frame::Event { name, id, data },
        _ => Frame::Other,
    }
}

/// Event data (a JSON object) with `"stream"` first.
fn labelled(label: &str, data: &str) -> String {
    let label = serde_json::Value::from(label).to_string();
    match data.strip_prefix('{') {
        Some("}") => format!("{{\"stream\":{label}}}"),
        Some(rest) => format!("{{\"stream\":{label},{rest}"),
        None => format!("{{\"stream\":{label},\"data\":{data}}}"),
    }
}

fn end_frame(label: &str, reason: EndReason) -> Bytes {
    let data = format!("{{\"reason\":\"{}\"}}", reason.as_str());
    sse::event(wire::END, None, &labelled(label, &data))
}

fn end_reason(data: &str) -> EndReason {
    let reason = serde_json::from_str::<serde_json::Value>(data)
        .ok()
        .and_then(|v| v["reason"].as_str().map(str::to_string));
    EndReason::ALL
        .into_iter()
        .find(|r| Some(r.as_str()) == reason.as_deref())
        .unwrap_or(EndReason::Removed)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::Value;

    use super::*;
    use crate::config::ClientErrors;
    use crate::hub::{Change, Hub, Settings, State};
    use crate::wire::{Health, Reason, Resume};

    fn hub(client_queue: usize) -> Arc<Hub> {
        Hub::new(Settings {
            event: "update".into(),
            retry: Duration::from_secs(15),
            history: 1024,
            history_bytes: 1 << 20,
            client_queue,
            client_errors: ClientErrors::Full,
        })
    }

    fn row(n: i64) -> Change {
        Change::Diff {
            row: format!("{{\"n\":{n}}}").into(),
            diff: 1,
        }
    }

    /// (event, id, data) of everything but `status` the mux hands out within a short
    /// wait.
    async fn read(mux: &mut Mux) -> Vec<(String, Option<u64>, Value)> {
        let mut got = read_all(mux).await;
        got.retain(|(e, _, _)| e != "status");
        got
    }

    async fn read_all(mux: &mut Mux) -> Vec<(String, Option<u64>, Value)> {
        let mut frames = Vec::new();
        let mut batch = Vec::new();
        while let Ok(true) =
            tokio::time::timeout(Duration::from_millis(30), mux.next(&mut batch)).await
        {
            frames.append(&mut batch);
        }
        frames.append(&mut batch);
        let mut out = Vec::new();
        for f in &frames {
            if let Frame::Event { name, id, data } = read_frame(f) {
                out.push((
                    name.to_string(),
                    id,
                    serde_json::from_str(data).expect("json"),
                ));
            }
        }
        out
    }

    fn mux(hubs: &[(&str, &Arc<Hub>)], limit: usize, resume: Resume) -> Mux {
        let at = match resume {
            Resume::After(id) => Some(id),
            _ => None,
        };
        let parts = hubs
            .iter()
            .map(|(label, hub)| {
                Part::new((*label).into(), hub.subscribe(resume), limit, at.is_some())
            })
            .collect();
        Mux::new(parts, at)
    }

    #[tokio::test]
    async fn the_first_snapshots_go_out_together_at_one_timestamp() {
        let (a, b) = (hub(100), hub(100));
        a.load_snapshot(10, State::empty(false), Reason::Initial);
        let mut m = mux(&[("/a", &a), ("/b", &b)], 100, Resume::Fresh);
        assert!(read(&mut m).await.is_empty(), "b has no state yet");
        b.load_snapshot(12, State::empty(false), Reason::Initial);
        assert!(read(&mut m).await.is_empty(), "a has not closed 12 yet");
        a.publish(11, 11, &[row(1)]);
        a.advance(12);
        let got = read(&mut m).await;
        let names: Vec<(&str, &str, Option<u64>)> = got
            .iter()
            .map(|(e, id, d)| (e.as_str(), d["stream"].as_str().unwrap_or(""), *id))
            .collect();
        assert_eq!(
            names,
            [
                ("snapshot", "/a", None),
                ("update", "/a", None),
                ("snapshot", "/b", Some(12))
            ]
        );
        assert_eq!(got[1].2["ts"], "11");
    }

    #[tokio::test]
    async fn an_event_waits_for_every_stream_to_close_its_timestamp() {
        let (a, b) = (hub(100), hub(100));
        a.load_snapshot(10, State::empty(false), Reason::Initial);
        b.load_snapshot(10, State::empty(false), Reason::Initial);
        let mut m = mux(&[("/a", &a), ("/b", &b)], 100, Resume::Fresh);
        assert_eq!(read(&mut m).await.len(), 2);
        a.publish(15, 15, &[row(1)]);
        b.advance(14);
        assert!(read(&mut m).await.is_empty(), "b is at 14");
        b.publish(15, 15, &[row(2)]);
        let got = read(&mut m).await;
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].1, got[1].1), (None, Some(15)));
        // Group ids only grow: nothing goes out again at 15.
        a.advance(15);
        assert!(read(&mut m).await.is_empty());
    }

    #[tokio::test]
    async fn a_stalled_stream_holds_the_others_within_bounds_and_status_passes() {
        let (a, b) = (hub(100), hub(100));
        a.load_snapshot(10, State::empty(false), Reason::Initial);
        b.load_snapshot(10, State::empty(false), Reason::Initial);
        let mut m = mux(&[("/a", &a), ("/b", &b)], 3, Resume::Fresh);
        read(&mut m).await;
        b.set_health(Health::Reconnecting {
            error: "gone".into(),
        });
        for ts in 11..20 {
            a.publish(ts, ts, &[row(ts as i64)]);
        }
        let got = read_all(&mut m).await;
        assert_eq!(got.len(), 1, "only b's status: {got:?}");
        assert_eq!(got[0].0, "status");
        assert_eq!(got[0].2["stream"], "/b");
        // b comes back: a's held events were replaced by one snapshot(lagged).
        b.set_health(Health::Streaming);
        b.advance(25);
        a.advance(25);
        let got = read(&mut m).await;
        let kinds: Vec<(&str, Option<&str>)> = got
            .iter()
            .map(|(e, _, d)| (e.as_str(), d["reason"].as_str()))
            .collect();
        assert!(kinds.contains(&("snapshot", Some("lagged"))), "{kinds:?}");
        assert_eq!(got.last().map(|g| g.1), Some(Some(25)));
    }

    #[tokio::test]
    async fn a_resumed_mux_replays_every_stream_from_one_id() {
        let (a, b) = (hub(100), hub(100));
        a.load_snapshot(10, State::empty(false), Reason::Initial);
        b.load_snapshot(10, State::empty(false), Reason::Initial);
        a.publish(11, 11, &[row(1)]);
        b.publish(12, 12, &[row(2)]);
        a.advance(12);
        let mut m = mux(&[("/a", &a), ("/b", &b)], 100, Resume::After(10));
        let got = read(&mut m).await;
        let ids: Vec<(&str, Option<u64>)> =
            got.iter().map(|(e, id, _)| (e.as_str(), *id)).collect();
        assert_eq!(ids, [("update", None), ("update", Some(12))]);
    }

    #[tokio::test]
    async fn a_removed_stream_leaves_alone_and_shutdown_ends_the_mux() {
        let (a, b) = (hub(100), hub(100));
        a.load_snapshot(10, State::empty(false), Reason::Initial);
        b.load_snapshot(10, State::empty(false), Reason::Initial);
        let mut m = mux(&[("/a", &a), ("/b", &b)], 100, Resume::Fresh);
        read(&mut m).await;
        b.close(EndReason::Removed);
        let got = read(&mut m).await;
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].0.as_str(), &got[0].2["stream"]),
            ("end", &Value::from("/b"))
        );
        // /a alone now decides the cut.
        a.publish(11, 11, &[row(1)]);
        assert_eq!(read(&mut m).await[0].1, Some(11));
        a.close(EndReason::Shutdown);
        let mut frames = Vec::new();
        assert!(!m.next(&mut frames).await || !m.next(&mut frames).await);
        assert_eq!(m.ended_with(), Some(EndReason::Shutdown));
    }
}
