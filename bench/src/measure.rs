//! What the load client measures per event: which ticks an event carries, their
//! latency, and the per-client bookkeeping that turns events into deliveries.
//!
//! Every contender's events carry rows with a `seq` (one per produced tick, +1 each)
//! and a `sent_ms` (epoch milliseconds when the tick was produced), as JSON numbers
//! or decimal strings, in any key order. A tailgate update carries the retracted old
//! row and the new row; per client only ticks above the last seen `seq` count, so the
//! retraction and the state inside a snapshot are never counted as deliveries.

use serde::Serialize;

/// One tick found in an event's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tick {
    pub seq: u64,
    pub sent_ms: u64,
}

/// Calls `f` for every object in `data` that has both a `"seq"` and a `"sent_ms"` key.
/// A cheap scanner, not a JSON parser: it pairs the two keys in order of appearance,
/// which holds for flat rows (no nested objects between the two keys).
pub fn scan_ticks(data: &[u8], mut f: impl FnMut(Tick)) {
    let mut seq = None;
    let mut sent = None;
    for i in memchr::memchr_iter(b'"', data) {
        let rest = &data[i..];
        if let Some(after) = rest.strip_prefix(b"\"seq\":") {
            seq = number(after);
        } else if let Some(after) = rest.strip_prefix(b"\"sent_ms\":") {
            sent = number(after);
        } else {
            continue;
        }
        if let (Some(s), Some(t)) = (seq, sent) {
            f(Tick { seq: s, sent_ms: t });
            seq = None;
            sent = None;
        }
    }
}

/// True when the data says `"reason":"lagged"` (a resync after overflowing the queue).
pub fn is_lagged(data: &[u8]) -> bool {
    memchr::memmem::find(data, b"\"reason\":\"lagged\"").is_some()
}

fn number(s: &[u8]) -> Option<u64> {
    let s = s.strip_prefix(b" ").unwrap_or(s);
    let s = s.strip_prefix(b"\"").unwrap_or(s);
    let mut v: u64 = 0;
    let mut n = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            break;
        }
        v = v.checked_mul(10)?.checked_add((b - b'0') as u64)?;
        n += 1;
    }
    (n > 0).then_some(v)
}

/// Latency histogram in microseconds: 10 µs buckets below 100 ms, 1 ms buckets up to
/// 120 s, one overflow bucket. Quantiles are reported as the bucket's upper edge.
#[derive(Debug, Clone)]
pub struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    sum_us: u128,
    max_us: u64,
}

const FINE: u64 = 10_000; // buckets of 10 µs up to 100 ms
const COARSE: u64 = 120_000; // then 1 ms up to 120 s

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: vec![0; (FINE + COARSE + 1) as usize],
            count: 0,
            sum_us: 0,
            max_us: 0,
        }
    }
}

impl Histogram {
    pub fn record(&mut self, us: u64) {
        let b = if us < FINE * 10 {
            us / 10
        } else {
            (FINE + (us - FINE * 10) / 1000).min(FINE + COARSE)
        };
        self.buckets[b as usize] += 1;
        self.count += 1;
        self.sum_us += us as u128;
        self.max_us = self.max_us.max(us);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The value at quantile `q` (0..=1), in microseconds.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (b, &c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let b = b as u64;
                if b == FINE + COARSE {
                    return self.max_us;
                }
                let edge = if b < FINE {
                    (b + 1) * 10
                } else {
                    FINE * 10 + (b - FINE + 1) * 1000
                };
                return edge.min(self.max_us);
            }
        }
        self.max_us
    }

    pub fn summary(&self) -> LatencySummary {
        let ms = |us: u64| us as f64 / 1000.0;
        LatencySummary {
            count: self.count,
            mean_ms: if self.count == 0 {
                0.0
            } else {
                self.sum_us as f64 / self.count as f64 / 1000.0
            },
            p50_ms: ms(self.quantile(0.50)),
            p90_ms: ms(self.quantile(0.90)),
            p99_ms: ms(self.quantile(0.99)),
            p999_ms: ms(self.quantile(0.999)),
            max_ms: ms(self.max_us),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// The measurement window, in epoch milliseconds (of a tick's `sent_ms`, or of when an
/// event arrived).
#[derive(Debug, Clone, Copy, Default)]
pub struct Window {
    pub start_ms: u64,
    /// `u64::MAX` while the window is open.
    pub end_ms: u64,
}

impl Window {
    pub fn contains(&self, sent_ms: u64) -> bool {
        self.start_ms != 0 && sent_ms >= self.start_ms && sent_ms < self.end_ms
    }
}

/// Totals shared by every client of one load-client process.
#[derive(Debug, Default)]
pub struct Totals {
    pub latency: Histogram,
    /// Ticks delivered for the first time to some client, sent inside the window.
    pub delivered_in_window: u64,
    /// Every update event received (any time).
    pub events: u64,
    /// Update events received while the window was open (SSE events, not ticks:
    /// one event may carry several ticks).
    pub events_in_window: u64,
    pub snapshots: u64,
    pub lagged_snapshots: u64,
    /// Ticks a client never saw (seq gaps), inside the window.
    pub gaps_in_window: u64,
    /// Lowest and highest seq sent inside the window, seen by any client.
    pub min_seq: Option<u64>,
    pub max_seq: Option<u64>,
}

/// Per-client state: the highest tick seen so far.
#[derive(Debug, Default, Clone, Copy)]
pub struct ClientTicks {
    pub last_seq: Option<u64>,
}

impl ClientTicks {
    /// Accounts for one event received at `now_us` (epoch µs). A snapshot moves the
    /// client to its state without counting deliveries; an update counts every tick
    /// above the last one seen.
    pub fn on_event(
        &mut self,
        data: &[u8],
        snapshot: bool,
        now_us: u64,
        win: Window,
        totals: &mut Totals,
    ) {
        if snapshot {
            totals.snapshots += 1;
            if is_lagged(data) {
                totals.lagged_snapshots += 1;
            }
        } else {
            totals.events += 1;
            if win.contains(now_us / 1000) {
                totals.events_in_window += 1;
            }
        }
        scan_ticks(data, |t| {
            if self.last_seq.is_some_and(|l| t.seq <= l) {
                return;
            }
            let in_window = win.contains(t.sent_ms);
            if let (Some(l), true) = (self.last_seq, in_window) {
                totals.gaps_in_window += t.seq - l - 1;
            }
            self.last_seq = Some(t.seq);
            if snapshot || !in_window {
                return;
            }
            totals.delivered_in_window += 1;
            totals
                .latency
                .record(now_us.saturating_sub(t.sent_ms * 1000));
            totals.min_seq = Some(totals.min_seq.map_or(t.seq, |m| m.min(t.seq)));
            totals.max_seq = Some(totals.max_seq.map_or(t.seq, |m| m.max(t.seq)));
        });
    }
}

/// What the scoped scenario's check counts over all clients of one load client (rows
/// checked against the partition each client asked for and against what the writer
/// wrote to it).
#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct PartitionTotals {
    /// Rows (of any diff) that carried the partition column.
    pub rows: u64,
    /// Rows whose partition column is not the client's partition: the hard failure.
    pub misdelivered: u64,
    /// Rows whose partition column or `seq` could not be read.
    pub unreadable: u64,
    /// New rows (`diff` > 0, `seq` above the last seen in that partition) in updates.
    pub delivered: u64,
    /// Update rows with a `seq` the client had already seen in that partition.
    pub duplicates: u64,
    /// Writes skipped between two rows a client received (`seq` jumps).
    pub gaps: u64,
    /// Writes never received by the end of the drain: the writer's last `seq` of the
    /// partition minus the client's last.
    pub missing_at_end: u64,
    /// Writes owed to checked clients: per client, what the writer wrote to its
    /// partitions (all of them, for a client of the whole view).
    pub expected: u64,
    /// Clients checked at the end (a partition client always; a client of another
    /// stream only once it saw a row with the partition column).
    pub clients_checked: u64,
}

/// Reads a JSON value as u64: a number, or a decimal string (how tailgate sends
/// integers beyond JavaScript's exact range, and how COPY text arrives).
fn as_u64(v: &serde_json::Value) -> Option<u64> {
    match v {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// One client's check of the scoped scenario: the partition it asked for (`None` for
/// a client of an unscoped stream) and, per partition value seen, the last `seq`.
///
/// Rows are parsed as JSON: the scoped scenario delivers ~1,000 events/s in all, so a
/// full parse is cheap, and it checks every row rather than scanning for two keys.
#[derive(Debug, Default, Clone)]
pub struct PartitionRows {
    pub partition: Option<u64>,
    pub last: std::collections::BTreeMap<u64, u64>,
}

impl PartitionRows {
    pub fn new(partition: Option<u64>) -> Self {
        Self {
            partition,
            last: Default::default(),
        }
    }

    /// Accounts for one event's data: tailgate's `{"ts":..,"changes":[{"diff":d,"row":{..}}]}`
    /// (a snapshot sets the state), or a bare row object (nchan), taken as `diff` 1.
    /// Latency and in-window deliveries go to `totals`, as for ticks.
    #[allow(clippy::too_many_arguments)]
    pub fn on_event(
        &mut self,
        data: &[u8],
        snapshot: bool,
        column: &str,
        now_us: u64,
        win: Window,
        totals: &mut Totals,
        part: &mut PartitionTotals,
    ) {
        if snapshot {
            totals.snapshots += 1;
            if is_lagged(data) {
                totals.lagged_snapshots += 1;
            }
        } else {
            totals.events += 1;
            if win.contains(now_us / 1000) {
                totals.events_in_window += 1;
            }
        }
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
            part.unreadable += 1;
            return;
        };
        let rows: Vec<(i64, &serde_json::Value)> = match v.get("changes") {
            Some(serde_json::Value::Array(changes)) => changes
                .iter()
                .filter_map(|c| {
                    let diff = c.get("diff").and_then(|d| d.as_i64()).unwrap_or(1);
                    c.get("row").map(|r| (diff, r))
                })
                .collect(),
            _ if v.get(column).is_some() => vec![(1, &v)],
            _ => Vec::new(),
        };
        for (diff, row) in rows {
            let Some(value) = row.get(column) else {
                continue;
            };
            part.rows += 1;
            let (Some(c), Some(seq)) = (as_u64(value), row.get("seq").and_then(as_u64)) else {
                part.unreadable += 1;
                continue;
            };
            if self.partition.is_some_and(|p| p != c) {
                part.misdelivered += 1;
                continue;
            }
            if diff <= 0 {
                continue;
            }
            let last = self.last.entry(c).or_insert(0);
            if snapshot {
                *last = seq;
                continue;
            }
            if seq <= *last {
                part.duplicates += 1;
                continue;
            }
            part.gaps += seq - *last - 1;
            *last = seq;
            part.delivered += 1;
            let sent_ms = row.get("sent_ms").and_then(as_u64).unwrap_or(0);
            if win.contains(sent_ms) {
                totals.delivered_in_window += 1;
                totals.latency.record(now_us.saturating_sub(sent_ms * 1000));
            }
        }
    }

    /// At the end of the run: what the writer wrote (`written[c]` = last `seq` of
    /// partition `c`) that this client never received, added to `part`.
    pub fn finish(&self, written: &[u64], part: &mut PartitionTotals) {
        let owed = |c: u64| written.get(c as usize).copied().unwrap_or(0);
        match self.partition {
            Some(p) => {
                part.clients_checked += 1;
                part.expected += owed(p);
                let last = self.last.get(&p).copied().unwrap_or(0);
                part.missing_at_end += owed(p).saturating_sub(last);
            }
            // A client of the whole view owes every partition written; a client that
            // never saw the partition column (another stream) is not checked.
            None if !self.last.is_empty() => {
                part.clients_checked += 1;
                for (c, &w) in written.iter().enumerate() {
                    part.expected += w;
                    let last = self.last.get(&(c as u64)).copied().unwrap_or(0);
                    part.missing_at_end += w.saturating_sub(last);
                }
            }
            None => {}
        }
    }
}

/// Quantiles of a set of durations (connect times, time to first event), in ms.
#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct Spread {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Spread {
    pub fn of(mut v: Vec<f64>) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[(((q * v.len() as f64).ceil() as usize).max(1) - 1).min(v.len() - 1)];
        Self {
            count: v.len(),
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            max_ms: v[v.len() - 1],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticks(data: &str) -> Vec<(u64, u64)> {
        let mut v = Vec::new();
        scan_ticks(data.as_bytes(), |t| v.push((t.seq, t.sent_ms)));
        v
    }

    #[test]
    fn finds_ticks_in_every_contenders_payload() {
        // k0, naive-axum, nchan: a flat object.
        assert_eq!(
            ticks(r#"{"seq":12,"sent_ms":1700000000123,"pad":"xx"}"#),
            vec![(12, 1700000000123)]
        );
        // tailgate: retraction and insertion, keys sorted, numbers as strings.
        let tg = r#"{"ts":"9","changes":[{"diff":-1,"row":{"pad":"x","sent_ms":"100","seq":"4"}},{"diff":1,"row":{"pad":"x","sent_ms":"150","seq":"5"}}]}"#;
        assert_eq!(ticks(tg), vec![(4, 100), (5, 150)]);
        // the tutorial: a list of rows with spaces after colons.
        assert_eq!(
            ticks(r#"[{"seq": 3, "sent_ms": 7}, {"seq": 4, "sent_ms": 8}]"#),
            vec![(3, 7), (4, 8)]
        );
        assert_eq!(ticks(r#"{"seq":null,"sent_ms":5}"#), vec![]);
        assert!(is_lagged(br#"{"ts":"1","reason":"lagged","changes":[]}"#));
        assert!(!is_lagged(br#"{"ts":"1","reason":"initial","changes":[]}"#));
    }

    #[test]
    fn histogram_quantiles() {
        let mut h = Histogram::default();
        for us in 1..=1000u64 {
            h.record(us * 100); // 0.1 ms .. 100 ms
        }
        h.record(5_000_000);
        assert_eq!(h.count(), 1001);
        let p50 = h.quantile(0.5);
        assert!((50_000..=50_200).contains(&p50), "{p50}");
        assert_eq!(h.quantile(1.0), 5_000_000);
        assert!(h.quantile(0.99) <= 100_000);
        assert_eq!(Histogram::default().quantile(0.99), 0);
        h.record(10_000_000_000); // beyond the last bucket
        assert_eq!(h.quantile(1.0), 10_000_000_000);
    }

    #[test]
    fn snapshot_sets_the_state_and_updates_count_once() {
        let win = Window {
            start_ms: 100,
            end_ms: u64::MAX,
        };
        let mut t = Totals::default();
        let mut c = ClientTicks::default();
        c.on_event(
            br#"{"reason":"initial","changes":[{"row":{"seq":1,"sent_ms":90}}]}"#,
            true,
            0,
            win,
            &mut t,
        );
        assert_eq!((t.snapshots, t.delivered_in_window), (1, 0));
        // Update carrying the retraction of 1 and the insertion of 2: one delivery.
        c.on_event(br#"{"changes":[{"diff":-1,"row":{"seq":1,"sent_ms":90}},{"diff":1,"row":{"seq":2,"sent_ms":110}}]}"#, false, 115_000, win, &mut t);
        assert_eq!(t.delivered_in_window, 1);
        assert_eq!(t.latency.quantile(1.0), 5_000);
        // A duplicate does not count; a jump counts the gap.
        c.on_event(br#"{"seq":2,"sent_ms":110}"#, false, 120_000, win, &mut t);
        c.on_event(br#"{"seq":5,"sent_ms":140}"#, false, 141_000, win, &mut t);
        assert_eq!((t.delivered_in_window, t.gaps_in_window), (2, 2));
        assert_eq!((t.min_seq, t.max_seq), (Some(2), Some(5)));
        // A lagged snapshot resyncs without counting deliveries.
        c.on_event(
            br#"{"reason":"lagged","changes":[{"row":{"seq":9,"sent_ms":180}}]}"#,
            true,
            190_000,
            win,
            &mut t,
        );
        assert_eq!(
            (t.lagged_snapshots, t.delivered_in_window, c.last_seq),
            (1, 2, Some(9))
        );
        assert_eq!(t.events, 3);
    }

    #[test]
    fn ticks_outside_the_window_are_not_counted() {
        let win = Window {
            start_ms: 100,
            end_ms: 200,
        };
        let mut t = Totals::default();
        let mut c = ClientTicks::default();
        c.on_event(br#"{"seq":1,"sent_ms":50}"#, false, 60_000, win, &mut t);
        c.on_event(br#"{"seq":2,"sent_ms":150}"#, false, 160_000, win, &mut t);
        c.on_event(br#"{"seq":3,"sent_ms":250}"#, false, 260_000, win, &mut t);
        assert_eq!(t.delivered_in_window, 1);
        assert_eq!(t.latency.count(), 1);
        assert!(!Window::default().contains(5));
    }

    #[test]
    fn spread_quantiles() {
        let s = Spread::of((1..=100).map(|v| v as f64).collect());
        assert_eq!(
            (s.count, s.p50_ms, s.p99_ms, s.max_ms),
            (100, 50.0, 99.0, 100.0)
        );
        assert_eq!(Spread::of(vec![]), Spread::default());
    }

    #[test]
    fn partition_rows_check_scope_order_and_completeness() {
        let win = Window {
            start_ms: 100,
            end_ms: u64::MAX,
        };
        let mut t = Totals::default();
        let mut p = PartitionTotals::default();
        let mut c = PartitionRows::new(Some(7));
        let ev = |c: &mut PartitionRows,
                  data: &str,
                  snap: bool,
                  now: u64,
                  t: &mut Totals,
                  p: &mut PartitionTotals| {
            c.on_event(data.as_bytes(), snap, "customer_id", now, win, t, p)
        };
        ev(
            &mut c,
            r#"{"ts":"1","reason":"initial","changes":[{"diff":1,"row":{"customer_id":7,"seq":0,"sent_ms":0}}]}"#,
            true,
            90_000,
            &mut t,
            &mut p,
        );
        // An update: the retraction of seq 0 and seq 1; then a jump to 3 (one gap).
        ev(
            &mut c,
            r#"{"ts":"2","changes":[{"diff":-1,"row":{"customer_id":7,"seq":0,"sent_ms":0}},{"diff":1,"row":{"customer_id":7,"seq":1,"sent_ms":110}}]}"#,
            false,
            112_000,
            &mut t,
            &mut p,
        );
        ev(
            &mut c,
            r#"{"ts":"3","changes":[{"diff":1,"row":{"customer_id":"7","seq":"3","sent_ms":"120"}}]}"#,
            false,
            125_000,
            &mut t,
            &mut p,
        );
        // A duplicate, and another customer's row (never allowed, whatever its diff).
        ev(
            &mut c,
            r#"{"ts":"4","changes":[{"diff":1,"row":{"customer_id":7,"seq":3,"sent_ms":120}}]}"#,
            false,
            126_000,
            &mut t,
            &mut p,
        );
        ev(
            &mut c,
            r#"{"ts":"5","changes":[{"diff":-1,"row":{"customer_id":8,"seq":1,"sent_ms":130}}]}"#,
            false,
            131_000,
            &mut t,
            &mut p,
        );
        assert_eq!(
            (p.delivered, p.gaps, p.duplicates, p.misdelivered),
            (2, 1, 1, 1)
        );
        assert_eq!((t.delivered_in_window, t.snapshots, t.events), (2, 1, 4));
        assert_eq!(t.latency.quantile(1.0), 5_000);
        // The writer wrote seq 1..=5 to partition 7: 4 and 5 never arrived.
        c.finish(&[0, 0, 0, 0, 0, 0, 0, 5, 9], &mut p);
        assert_eq!((p.expected, p.missing_at_end, p.clients_checked), (5, 2, 1));
        // nchan's bare rows count as diff 1; a client of the whole view owes everything.
        let mut all = PartitionRows::new(None);
        let mut q = PartitionTotals::default();
        ev(
            &mut all,
            r#"{"customer_id":1,"seq":1,"sent_ms":150}"#,
            false,
            151_000,
            &mut t,
            &mut q,
        );
        ev(
            &mut all,
            r#"{"customer_id":2,"seq":2,"sent_ms":150}"#,
            false,
            151_000,
            &mut t,
            &mut q,
        );
        assert_eq!((q.delivered, q.gaps, q.misdelivered), (2, 1, 0));
        all.finish(&[0, 1, 3], &mut q);
        assert_eq!((q.expected, q.missing_at_end), (4, 1));
        // A client of a stream without the column is not checked.
        let mut quiet = PartitionRows::new(None);
        ev(
            &mut quiet,
            r#"{"ts":"1","changes":[{"diff":1,"row":{"n":1}}]}"#,
            true,
            0,
            &mut t,
            &mut q,
        );
        quiet.finish(&[5], &mut q);
        assert_eq!((q.expected, q.clients_checked, q.rows), (4, 1, 2));
        ev(&mut quiet, "not json", false, 0, &mut t, &mut q);
        assert_eq!(q.unreadable, 1);
    }
}
