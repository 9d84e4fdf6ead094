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
}
