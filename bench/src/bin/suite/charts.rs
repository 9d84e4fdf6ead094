//! The charts `bench/run` draws from the runs it just measured: p99 latency against
//! the event rate in the fan-out scenario, and the server's RSS against connections in
//! the idle scenario; one line per contender.

use std::collections::BTreeMap;

use tailgate_bench::chart::{Chart, Rule, Series};

use super::{median, thousands, Kind, Run};

/// Every chart that the runs have data for, with its file-name stem.
pub(super) fn from_runs(runs: &[Run]) -> Vec<(&'static str, Chart)> {
    let mut out = Vec::new();
    if let Some(c) = fanout(runs) {
        out.push(("fanout", c));
    }
    if let Some(c) = idle(runs) {
        out.push(("idle", c));
    }
    out
}

/// The median p99 of each contender's interleaved runs at each rate (log-log).
fn fanout(runs: &[Run]) -> Option<Chart> {
    let runs: Vec<&Run> = runs.iter().filter(|r| r.scenario == "fanout").collect();
    let n = runs.first()?.clients;
    let mut by: BTreeMap<Kind, BTreeMap<u64, Vec<f64>>> = BTreeMap::new();
    for r in &runs {
        let p99 = r.f("latency.p99_ms");
        by.entry(r.contender)
            .or_default()
            .entry((r.rate * 1000.0).round() as u64)
            .or_default()
            .extend(p99.is_finite().then_some(p99));
    }
    let series = by
        .into_iter()
        .map(|(kind, rates)| Series {
            name: kind.name().to_string(),
            color: kind as usize,
            points: rates
                .into_iter()
                .map(|(milli, p99s)| (milli as f64 / 1000.0, median(p99s)))
                .collect(),
        })
        .collect();
    Some(Chart {
        title: format!(
            "Fan-out: p99 latency vs event rate, {} clients (median of interleaved runs)",
            thousands(n)
        ),
        x_label: "events per second (log)".into(),
        y_label: "p99 latency, ms (log)".into(),
        log_x: true,
        log_y: true,
        series,
        rules: vec![Rule {
            name: "knee criterion: p99 100 ms".into(),
            y: 100.0,
        }],
    })
}

/// Each contender's RSS with no client, at each checkpoint on the way up, and with
/// every client connected.
fn idle(runs: &[Run]) -> Option<Chart> {
    let runs: Vec<&Run> = runs.iter().filter(|r| r.scenario == "idle").collect();
    runs.first()?;
    let mb = |kb: f64| kb / 1024.0;
    let series = runs
        .iter()
        .map(|r| {
            let mut points = Vec::new();
            if let Some(idle) = r.extra.get("rss_idle_kb").and_then(|v| v.as_f64()) {
                points.push((0.0, mb(idle)));
            }
            for p in r.report["rss_points"].as_array().into_iter().flatten() {
                if let (Some(c), Some(kb)) = (p[0].as_f64(), p[1].as_f64()) {
                    points.push((c, mb(kb)));
                }
            }
            Series {
                name: r.contender.name().to_string(),
                color: r.contender as usize,
                points,
            }
        })
        .collect();
    Some(Chart {
        title: "Idle: server RSS vs connected clients (15 s heartbeat, no events)".into(),
        x_label: "connected clients".into(),
        y_label: "server RSS, MB".into(),
        log_x: false,
        log_y: false,
        series,
        rules: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(scenario: &str, kind: Kind, rate: f64, report: serde_json::Value) -> Run {
        Run {
            scenario: scenario.into(),
            contender: kind,
            clients: 5000,
            rate,
            streams: 1,
            report,
            k0: None,
            extra: BTreeMap::from([("rss_idle_kb".to_string(), json!(10_240))]),
        }
    }

    /// The texts of a well-formed SVG document.
    fn texts(svg: &str) -> Vec<String> {
        let doc = roxmltree::Document::parse(svg).expect("well-formed SVG");
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        doc.descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text())
            .map(|t| t.trim().to_string())
            .collect()
    }

    #[test]
    fn fanout_lines_take_the_median_p99_per_rate() {
        let p = |v: f64| json!({ "latency": { "p99_ms": v } });
        let runs = vec![
            run("fanout", Kind::Tailgate, 10.0, p(30.0)),
            run("fanout", Kind::K0, 10.0, p(28.0)),
            run("fanout", Kind::Tailgate, 10.0, p(40.0)),
            run("fanout", Kind::Tailgate, 200.0, p(99.0)),
            run("fanout", Kind::Nchan, 50.0, json!({})),
            run("light", Kind::Tailgate, 10.0, p(7.0)),
        ];
        let charts = from_runs(&runs);
        assert_eq!(charts.len(), 1, "no idle runs, no idle chart");
        let (name, c) = &charts[0];
        assert_eq!(*name, "fanout");
        let tg = c.series.iter().find(|s| s.name == "tailgate").unwrap();
        assert_eq!(tg.points, vec![(10.0, 35.0), (200.0, 99.0)]);
        // A run without a p99 leaves a point that is not drawn.
        let nchan = c.series.iter().find(|s| s.name == "nchan").unwrap();
        assert!(nchan.points[0].1.is_nan());
        let svg = c.render_svg().unwrap();
        let texts = texts(&svg);
        for name in ["tailgate", "k0", "nchan", "knee criterion: p99 100 ms"] {
            assert!(texts.iter().any(|t| t == name), "{name}");
        }
    }

    #[test]
    fn idle_lines_start_at_the_idle_process() {
        let runs = vec![
            run(
                "idle",
                Kind::Tailgate,
                0.0,
                json!({ "rss_points": [[2500, 15360], [19000, 51200]] }),
            ),
            run(
                "idle",
                Kind::NaiveAxum,
                0.0,
                json!({ "rss_points": [[2500, 60000]] }),
            ),
        ];
        let charts = from_runs(&runs);
        assert_eq!(charts.len(), 1);
        let (name, c) = &charts[0];
        assert_eq!(*name, "idle");
        assert_eq!(
            c.series[0].points,
            vec![(0.0, 10.0), (2500.0, 15.0), (19000.0, 50.0)]
        );
        let dir = std::env::temp_dir().join(format!("suite-charts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("idle.svg");
        c.write_svg(&path).unwrap();
        let texts = texts(&std::fs::read_to_string(&path).unwrap());
        assert!(texts.iter().any(|t| t == "tailgate") && texts.iter().any(|t| t == "naive-axum"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
