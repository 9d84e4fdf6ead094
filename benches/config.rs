//! How validation time grows with the number of problems in `streams.toml`.
//!
//! Each generated file holds N `[[streams]]` entries with one bad duration each, so
//! `config::parse` reports N problems. The time per problem should not grow with N:
//! `cargo bench --bench config` prints a table and exits non-zero when the time per
//! problem at the largest N is more than [`MAX_RATIO`] times that at the smallest.
//! One more file puts the largest N entries on a single line, as inline tables, where
//! finding a column means counting along one very long line.
//!
//! Every run parses in a fresh process, as `tailgate check` does: in one long-lived
//! process a small parse sometimes reuses heap pages a large one left mapped and
//! sometimes faults them in anew, which alone moves its time by a factor of two.

use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

const SIZES: [usize; 4] = [1_000, 10_000, 40_000, 100_000];
/// Runs per file; the median counts.
const RUNS: usize = 7;
/// Linear validation keeps the per-problem time flat; allow noise and cache effects.
const MAX_RATIO: f64 = 3.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `[[streams]]` tables, one key a line.
    Tables,
    /// Inline tables, all on one line.
    Inline,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::Tables => "tables",
            Layout::Inline => "inline, 1 line",
        }
    }

    fn text(self, n: usize) -> String {
        let mut text = String::with_capacity(n * 64);
        match self {
            Layout::Tables => {
                for i in 0..n {
                    text.push_str(&format!(
                        "[[streams]]\npath = \"/s{i}\"\nview = \"v\"\ndelay = \"soon\"\n"
                    ));
                }
            }
            Layout::Inline => {
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
            }
        }
        text
    }
}

/// The child's side: one timed parse, printed in nanoseconds.
fn run_once(layout: Layout, n: usize) -> ExitCode {
    let text = layout.text(n);
    let start = Instant::now();
    let result = tailgate::config::parse(Path::new("bench.toml"), &text);
    let took = start.elapsed();
    match result {
        Err(tailgate::config::ConfigError::Invalid { total, .. }) if total == n => {
            println!("{}", took.as_nanos());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("expected {n} problems, got: {e}");
            ExitCode::FAILURE
        }
        Ok(_) => {
            eprintln!("expected {n} problems, the file passed");
            ExitCode::FAILURE
        }
    }
}

/// One timed parse in a fresh process.
fn time_once(layout: Layout, n: usize) -> Result<Duration, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the bench binary: {e}"))?;
    let out = Command::new(exe)
        .args(["--child", layout.name(), &n.to_string()])
        .output()
        .map_err(|e| format!("cannot run the bench binary: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout.trim().parse::<u64>() {
        Ok(nanos) if out.status.success() => Ok(Duration::from_nanos(nanos)),
        _ => Err(format!(
            "{} at N={n}: {}{}",
            layout.name(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let layout = match args.get(i + 1).map(String::as_str) {
            Some("tables") => Layout::Tables,
            _ => Layout::Inline,
        };
        let n = args.get(i + 2).and_then(|n| n.parse().ok()).unwrap_or(0);
        return run_once(layout, n);
    }

    let largest = SIZES[SIZES.len() - 1];
    let mut cases: Vec<(Layout, usize)> = SIZES.iter().map(|&n| (Layout::Tables, n)).collect();
    cases.push((Layout::Inline, largest));
    // The runs take turns, so a change in the machine's load falls on every case alike.
    let mut times = vec![Vec::with_capacity(RUNS); cases.len()];
    for _ in 0..RUNS {
        for (&(layout, n), times) in cases.iter().zip(&mut times) {
            match time_once(layout, n) {
                Ok(t) => times.push(t),
                Err(e) => {
                    eprintln!("FAIL: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }

    println!("| layout         |       N |  median ms | µs per problem |");
    println!("|---|---|---|---|");
    let mut per_problem = Vec::new();
    for (&(layout, n), mut t) in cases.iter().zip(times) {
        t.sort();
        let median = t[RUNS / 2];
        let per = median.as_secs_f64() * 1e6 / n as f64;
        println!(
            "| {:<14} | {n:>7} | {:>10.1} | {per:>14.2} |",
            layout.name(),
            median.as_secs_f64() * 1e3
        );
        per_problem.push(per);
    }

    let smallest = per_problem[0];
    let ratios = [
        (Layout::Tables, per_problem[SIZES.len() - 1] / smallest),
        (Layout::Inline, per_problem[SIZES.len()] / smallest),
    ];
    let mut linear = true;
    for (layout, ratio) in ratios {
        println!(
            "per-problem time, {} at N={largest} / tables at N={}: {ratio:.2} (limit {MAX_RATIO})",
            layout.name(),
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
