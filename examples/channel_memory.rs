//! Heap bytes per channel of a scoped stream, counted exactly by a global allocator
//! that tracks live bytes and allocations.
//!
//! A relation of `N` partitions (one per customer) of 3 rows each is loaded into a
//! [`Partitioned`]; then one channel is opened per partition (as a scoped request
//! does), one client subscribes to each and takes its opening frames, then (if asked)
//! the stream sends `HEARTBEATS` heartbeats that the clients take. The cost of
//! each step is printed per channel, then broken down by building standalone hubs
//! step by step, next to the cost of a client of a plain stream.
//!
//! ```text
//! cargo run --release --example channel_memory [N] [HEARTBEATS]
//! ```
//!
//! These are requested bytes: the allocator adds its own overhead per allocation
//! (about 8 to 16 bytes with glibc), hence the allocation counts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tailgate::config::ClientErrors;
use tailgate::feed::partitioned::{ChannelKey, Filter, Partitioned, Resolved};
use tailgate::feed::values::ValueKind;
use tailgate::feed::SourceState;
use tailgate::hub::{Change, Hub, Settings, Shared, State};
use tailgate::row::Row;
use tailgate::wire::{Health, Reason, Resume};

/// Counts live heap bytes and allocations.
struct Counting;

static BYTES: AtomicI64 = AtomicI64::new(0);
static COUNT: AtomicI64 = AtomicI64::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
            COUNT.fetch_add(1, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        COUNT.fetch_sub(1, Ordering::Relaxed);
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
            COUNT.fetch_add(1, Ordering::Relaxed);
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            BYTES.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Live bytes and allocations now.
fn live() -> (i64, i64) {
    (BYTES.load(Ordering::Relaxed), COUNT.load(Ordering::Relaxed))
}

/// Prints what was allocated since `from`, per item, and returns the new mark.
fn step(what: &str, from: (i64, i64), n: usize) -> (i64, i64) {
    let now = live();
    println!(
        "  {what:<48} {:>9.1} B  {:>6.2} allocs",
        (now.0 - from.0) as f64 / n as f64,
        (now.1 - from.1) as f64 / n as f64,
    );
    now
}

/// The gateway's default stream settings.
fn settings() -> Settings {
    Settings {
        event: "update".into(),
        retry: Duration::from_secs(15),
        history: 1024,
        history_bytes: 8 << 20,
        client_queue: 1024,
        client_errors: ClientErrors::Full,
    }
}

/// An `orders` row: id, customer_id, item, qty.
fn row(id: usize, customer: usize) -> Arc<Row> {
    let values = [
        id.to_string(),
        customer.to_string(),
        format!("\"item-{}\"", id % 97),
        (id % 7 + 1).to_string(),
    ];
    let names = ["id", "customer_id", "item", "qty"];
    let mut json = String::from("{");
    let mut spans = Vec::new();
    for (n, (name, value)) in names.iter().zip(&values).enumerate() {
        if n > 0 {
            json.push(',');
        }
        json.push_str(&format!("\"{name}\":"));
        let start = json.len() as u32;
        json.push_str(value);
        spans.push((start, json.len() as u32));
    }
    json.push('}');
    Arc::new(Row {
        json: json.into(),
        spans: spans.into(),
    })
}

const ROWS_PER_PART: usize = 3;

fn main() {
    let arg = |i: usize, default: usize| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
    };
    let n = arg(1, 10_000);
    let heartbeats = arg(2, 0);
    let resolved = Resolved {
        parts: vec![(1, ValueKind::Integer)],
        filters: Default::default(),
        projection: (Vec::new(), Vec::new()),
    };
    let mut rows = HashMap::new();
    for customer in 0..n {
        for r in 0..ROWS_PER_PART {
            rows.insert(row(customer * ROWS_PER_PART + r, customer), 1);
        }
    }
    let source = SourceState::Diff(rows);

    println!("{n} partitions of {ROWS_PER_PART} rows, per channel:");
    let p = Partitioned::new(false, settings(), n);
    p.set_resolved(Some(resolved.clone()));
    p.load(1, &source, Reason::Initial, false);
    p.set_health(Health::Streaming);
    let mark = live();
    let start = mark;
    // The request's key, kept as the channel's (with the 48-byte slot of this Vec,
    // freed in the next step).
    let keys: Vec<ChannelKey> = (0..n)
        .map(|c| ChannelKey::new(vec![c.to_string().into()], &Filter::new()))
        .collect();
    let mark = step("ChannelKey (of the request)", mark, n);
    let hubs: Vec<Arc<Hub>> = keys.into_iter().filter_map(|k| p.channel(k).ok()).collect();
    assert_eq!(hubs.len(), n, "every channel opens");
    let mark = step("Partitioned::channel", mark, n);
    let mut subs: Vec<_> = hubs.iter().map(|h| h.subscribe(Resume::Fresh)).collect();
    let mark = step("subscribe", mark, n);
    let mut out = Vec::new();
    for s in &mut subs {
        s.drain(&mut out);
        out.clear();
    }
    let mark = step("take opening frames", mark, n);
    let end = mark;
    // Heartbeats as the route task sends them (every 15 s by default).
    for _ in 0..heartbeats {
        p.heartbeat(Duration::from_secs(3600));
        for s in &mut subs {
            s.drain(&mut out);
            out.clear();
        }
    }
    if heartbeats > 0 {
        step(&format!("after {heartbeats} heartbeats"), mark, n);
    }
    drop(hubs);
    println!(
        "  {:<48} {:>9.1} B  {:>6.2} allocs",
        "TOTAL per channel + client (no heartbeats)",
        (end.0 - start.0) as f64 / n as f64,
        (end.1 - start.1) as f64 / n as f64
    );
    drop(subs);
    drop(p);

    println!("breakdown (standalone hubs, as a channel builds one):");
    let clock = Arc::new(AtomicU64::new(1));
    let mark = live();
    let watches: Vec<_> = (0..n)
        .map(|_| tokio::sync::watch::Sender::new(0u64))
        .collect();
    step("(a watch::Sender<u64> alone)", mark, n);
    drop(watches);
    let mark = live();
    let states: Vec<State> = (0..n)
        .map(|c| {
            let mut state = State::empty(false);
            for r in 0..ROWS_PER_PART {
                state.apply(&Change::Diff {
                    row: row(c * ROWS_PER_PART + r, c).json.clone(),
                    diff: 1,
                });
            }
            state
        })
        .collect();
    step("State of the partition's rows", mark, n);
    let shared = Shared::new(settings());
    let mark = live();
    let hubs: Vec<Arc<Hub>> = (0..n)
        .map(|_| Hub::with_clock(shared.clone(), Arc::clone(&clock)))
        .collect();
    let mark = step("Hub::with_clock (Hub, shared settings, frames)", mark, n);
    let streaming = shared.with_health(Health::Streaming);
    for h in &hubs {
        h.set_shared(streaming.clone());
    }
    let mark = step("set_shared(streaming) (status, ring entry)", mark, n);
    for (h, s) in hubs.iter().zip(states) {
        h.load_snapshot(1, s, Reason::Initial);
    }
    let mark = step("load_snapshot (ring entry; State moved in)", mark, n);
    let mut subs: Vec<_> = hubs.iter().map(|h| h.subscribe(Resume::Fresh)).collect();
    let mark = step("subscribe (Subscription, snapshot cache)", mark, n);
    for s in &mut subs {
        s.drain(&mut out);
        out.clear();
    }
    step("take opening frames", mark, n);
    drop(subs);
    let mark = live();
    drop(hubs);
    let freed = live();
    println!(
        "  {:<48} {:>9.1} B  {:>6.2} allocs",
        "hub incl. State, freed when dropped",
        (mark.0 - freed.0) as f64 / n as f64,
        (mark.1 - freed.1) as f64 / n as f64
    );

    println!("plain stream, for comparison: {n} clients of one hub");
    let hub = Hub::new(settings());
    hub.set_health(Health::Streaming);
    let mut state = State::empty(false);
    for r in 0..ROWS_PER_PART {
        state.apply(&Change::Diff {
            row: row(r, 0).json.clone(),
            diff: 1,
        });
    }
    hub.load_snapshot(1, state, Reason::Initial);
    drop(hub.subscribe(Resume::Fresh));
    let mark = live();
    let mut subs: Vec<_> = (0..n).map(|_| hub.subscribe(Resume::Fresh)).collect();
    for s in &mut subs {
        s.drain(&mut out);
        out.clear();
    }
    step("subscribe + take opening frames", mark, n);
}
