//! Line charts of measured results, as SVG.
//!
//! plotters is built without its font features (`ttf`, `font-kit`): text is laid out
//! with its built-in size estimate and written as SVG `<text>` elements, so drawing
//! needs no font files and no fontconfig, and the viewer's font renders the labels.

use std::ops::Range;
use std::path::Path;

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;

/// One line: a contender's points, drawn in the order given.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    /// Index into [`PALETTE`], so that a contender keeps its colour across charts.
    pub color: usize,
    pub points: Vec<(f64, f64)>,
}

/// Line colours that stay apart on white (and for the common colour blindnesses).
pub const PALETTE: [(u8, u8, u8); 6] = [
    (0xd6, 0x27, 0x28),
    (0x1f, 0x77, 0xb4),
    (0x2c, 0xa0, 0x2c),
    (0xff, 0x7f, 0x0e),
    (0x94, 0x67, 0xbd),
    (0x8c, 0x56, 0x4b),
];

/// A horizontal reference line (a limit), drawn dashed and named in the legend.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: String,
    pub y: f64,
}

/// What to draw.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_x: bool,
    pub log_y: bool,
    pub series: Vec<Series>,
    pub rules: Vec<Rule>,
}

const SIZE: (u32, u32) = (900, 560);

impl Chart {
    /// Points that can be drawn: finite, and positive on a log axis.
    fn usable(&self, (x, y): (f64, f64)) -> bool {
        x.is_finite() && y.is_finite() && (!self.log_x || x > 0.0) && (!self.log_y || y > 0.0)
    }

    /// The data's range on one axis, padded; a unit range without any usable point.
    fn range(&self, pick: impl Fn((f64, f64)) -> f64, log: bool, rules: bool) -> Range<f64> {
        let mut vals: Vec<f64> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .filter(|p| self.usable(*p))
            .map(pick)
            .collect();
        if rules {
            vals.extend(
                self.rules
                    .iter()
                    .map(|r| r.y)
                    .filter(|y| y.is_finite() && (!log || *y > 0.0)),
            );
        }
        let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if !lo.is_finite() || !hi.is_finite() {
            return if log { 1.0..10.0 } else { 0.0..1.0 };
        }
        if log {
            (lo / 1.5)..(hi * 1.5)
        } else {
            let lo = lo.min(0.0);
            let pad = ((hi - lo) * 0.08).max(if hi == 0.0 { 1.0 } else { hi.abs() * 0.05 });
            lo..(hi + pad)
        }
    }

    /// The chart as an SVG document.
    pub fn render_svg(&self) -> anyhow::Result<String> {
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
            let x = self.range(|p| p.0, self.log_x, false);
            let y = self.range(|p| p.1, self.log_y, true);
            match (self.log_x, self.log_y) {
                (false, false) => self.draw(&root, x, y)?,
                (true, false) => self.draw(&root, x.log_scale(), y)?,
                (false, true) => self.draw(&root, x, y.log_scale())?,
                (true, true) => self.draw(&root, x.log_scale(), y.log_scale())?,
            }
            root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        Ok(svg)
    }

    /// Writes the SVG to `path`.
    pub fn write_svg(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, self.render_svg()?)?;
        Ok(())
    }

    fn draw<X, Y>(
        &self,
        root: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
        x: X,
        y: Y,
    ) -> anyhow::Result<()>
    where
        X: AsRangedCoord<Value = f64>,
        Y: AsRangedCoord<Value = f64>,
        X::CoordDescType: ValueFormatter<f64>,
        Y::CoordDescType: ValueFormatter<f64>,
    {
        let e = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("{e}");
        root.fill(&WHITE).map_err(e)?;
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, ("sans-serif", 20))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(72)
            .build_cartesian_2d(x, y)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc(&self.x_label)
            .y_desc(&self.y_label)
            .x_label_formatter(&|v| short(*v))
            .y_label_formatter(&|v| short(*v))
            .label_style(("sans-serif", 13))
            .axis_desc_style(("sans-serif", 15))
            .draw()
            .map_err(e)?;
        for s in &self.series {
            let (r, g, b) = PALETTE[s.color % PALETTE.len()];
            let color = RGBColor(r, g, b).to_rgba();
            let points: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|p| self.usable(*p))
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(e)?
                .label(s.name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(e)?;
        }
        let (x_lo, x_hi) = {
            let r = self.range(|p| p.0, self.log_x, false);
            (r.start, r.end)
        };
        for r in &self.rules {
            if !(r.y.is_finite() && (!self.log_y || r.y > 0.0)) {
                continue;
            }
            let style = ShapeStyle::from(&BLACK.mix(0.6)).stroke_width(1);
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(x_lo, r.y), (x_hi, r.y)],
                    6,
                    4,
                    style,
                ))
                .map_err(e)?
                .label(r.name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()
            .map_err(e)?;
        Ok(())
    }
}

/// An axis label: 12,000 as "12k", 0.5 as "0.5".
fn short(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if a >= 1e4 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = if v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fabricated(log_y: bool) -> Chart {
        Chart {
            title: "p99 latency vs event rate (N=5,000)".into(),
            x_label: "events/s".into(),
            y_label: "p99 ms".into(),
            log_x: true,
            log_y,
            series: vec![
                Series {
                    name: "tailgate".into(),
                    color: 0,
                    points: vec![(10.0, 35.8), (20.0, 40.1), (50.0, 61.0), (200.0, 99.0)],
                },
                Series {
                    name: "naive-axum".into(),
                    color: 2,
                    points: vec![(10.0, 47.6), (20.0, 52.0), (50.0, f64::NAN)],
                },
                Series {
                    name: "nchan".into(),
                    color: 3,
                    points: vec![(10.0, 14.0), (50.0, 11_500.0)],
                },
                Series {
                    name: "empty".into(),
                    color: 9,
                    points: vec![],
                },
            ],
            rules: vec![Rule {
                name: "knee limit 100 ms".into(),
                y: 100.0,
            }],
        }
    }

    #[test]
    fn writes_a_well_formed_svg_naming_every_series() {
        for log_y in [true, false] {
            let svg = fabricated(log_y).render_svg().unwrap();
            let doc = roxmltree::Document::parse(&svg).expect("well-formed XML");
            let root = doc.root_element();
            assert_eq!(root.tag_name().name(), "svg");
            let texts: Vec<&str> = doc
                .descendants()
                .filter(|n| n.has_tag_name("text"))
                .filter_map(|n| n.text())
                .map(str::trim)
                .collect();
            for name in [
                "tailgate",
                "naive-axum",
                "nchan",
                "empty",
                "knee limit 100 ms",
                "events/s",
                "p99 ms",
                "p99 latency vs event rate (N=5,000)",
            ] {
                assert!(texts.contains(&name), "{name} missing from {texts:?}");
            }
            // One polyline per series with points, plus the dashed rule's segments.
            let lines = doc
                .descendants()
                .filter(|n| n.has_tag_name("polyline"))
                .count();
            assert!(lines >= 3, "{lines} polylines");
        }
    }

    #[test]
    fn writes_a_file_even_without_any_points() {
        let dir = std::env::temp_dir().join(format!("chart-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.svg");
        let chart = Chart {
            series: vec![],
            rules: vec![],
            ..fabricated(false)
        };
        chart.write_svg(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(roxmltree::Document::parse(&text).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn axis_labels_are_short() {
        assert_eq!(short(19_000.0), "19k");
        assert_eq!(short(2_500.0), "2500");
        assert_eq!(short(0.5), "0.5");
        assert_eq!(short(12.25), "12.2");
        assert_eq!(short(1_500_000.0), "1.5M");
    }
}
