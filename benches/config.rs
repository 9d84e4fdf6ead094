//! How validation time grows with the number of problems in `streams.toml`.
//!
//! Each generated file holds N `[[streams]]` entries with one bad duration each, so
//! `config::parse` reports N problems. The time per problem should not grow with N:
//! `cargo bench --bench config` prints a table and exits non-zero when the time per
//! problem at the largest N is more than [`MAX_RATIO`] times that at the smallest.
//! One more file puts the largest N entries on a single line, as inline tables, where
//! finding a column means counting along one very long line.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const SIZES: [usize; 4] = [1_000, 10_000, 40_000, 100_000];
/// Linear validation keeps the per-problem time flat; allow noise and cache effects.
const MAX_RATIO: f64 = 3.0;

/// `n` entries as `[[streams]]` tables, one key a line.
fn tables(n: usize) -> String {
    let mut text = String::with_capacity(n * 64);
    for i in 0..n {
        text.push_str(&format!(
            "[[streams]]\npath = \"/s{i}\"\nview = \"v\"\ndelay = \"soon\"\n"
        ));
    }
    text
}

/// `n` entries as inline tables, all on one line.
fn inline(n: usize) -> String {
    let mut text = String::with_capacity(n * 48 + 16);
    text.push_str("streams = [");
    for i in 0..n {
        if i > 0 {
            text.push_str(", ");
        }
        text.push_str(&format!(
            "{{ path = \"/s{i}\", view = \"v\", delay = \"soon\" }}"
        ));
    }
    text.push_str("]\n");
    text
}

/// Median time of `config::parse` over a few runs; checks that it found `n` problems.
fn time_parse(text: &str, n: usize) -> Duration {
    let runs = if n >= 40_000 { 3 } else { 5 };
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        let result = tailgate::config::parse(Path::new("bench.toml"), text);
        times.push(start.elapsed());
        match result {
            Err(tailgate::config::ConfigError::Invalid { total, .. }) if total == n => {}
            Err(e) => panic!("expected {n} problems, got: {e}"),
            Ok(_) => panic!("expected {n} problems, the file passed"),
        }
    }
    times.sort();
    times[runs / 2]
}

fn row(layout: &str, n: usize, bytes: usize, took: Duration) -> f64 {
    let per = took.as_secs_f64() * 1e6 / n as f64;
    println!(
        "| {layout:<14} | {n:>7} | {:>8.2} | {:>9.1} | {per:>13.2} |",
        bytes as f64 / 1e6,
        took.as_secs_f64() * 1e3,
    );
    per
}

fn main() -> ExitCode {
    println!("| layout         |       N |       MB |  total ms | µs per problem |");
    println!("|---|---|---|---|---|");
    let mut per_problem = Vec::new();
    for n in SIZES {
        let text = tables(n);
        per_problem.push(row("tables", n, text.len(), time_parse(&text, n)));
    }
    let largest = SIZES[SIZES.len() - 1];
    let text = inline(largest);
    let one_line = row(
        "inline, 1 line",
        largest,
        text.len(),
        time_parse(&text, largest),
    );

    let smallest = per_problem[0];
    let ratios = [
        ("tables", per_problem[per_problem.len() - 1] / smallest),
        ("inline, 1 line", one_line / smallest),
    ];
    let mut linear = true;
    for (layout, ratio) in ratios {
        println!(
            "per-problem time, {layout} at N={largest} / tables at N={}: {ratio:.2} (limit {MAX_RATIO})",
            SIZES[0]
        );
        linear &= ratio <= MAX_RATIO;
    }
    if linear {
        ExitCode::SUCCESS
    } else {
        eprintln!("FAIL: validation time grows faster than the number of problems");
        ExitCode::FAILURE
    }
}
