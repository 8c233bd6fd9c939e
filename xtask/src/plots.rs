//! The load benchmark's plots: reads `load.json` (written by `latch-bench load`) and draws
//! `load-latency.svg` (latency percentiles against offered load, persistent connections) and
//! `load-cpu.svg` (each agent's vCPU per 1,000 requests/s) beside it, with plotters' SVG
//! backend. This module owns how the figures are drawn and the part of the JSON it reads; what
//! they measure is the load suite's (`docs/benchmarks.md`).

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};
use plotters::{
    coord::{Shift, combinators::BindKeyPoints as _},
    element::DashedPathElement,
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};
use serde::Deserialize;

use crate::cmd::relative;

/// The load suite's JSON, in the benchmark output directory.
pub const LOAD_JSON: &str = "load.json";
/// Latency percentiles against offered load, beside the JSON.
pub const LATENCY_SVG: &str = "load-latency.svg";
/// The agents' CPU per 1,000 requests/s, beside the JSON.
pub const CPU_SVG: &str = "load-cpu.svg";

/// `load.json`: only what the plots use.
#[derive(Deserialize)]
struct LoadReport {
    benchmark: String,
    rounds: usize,
    shapes: Vec<Shape>,
}

/// One shape of load and every setup's runs of it.
#[derive(Deserialize)]
struct Shape {
    #[serde(rename = "shape")]
    label: String,
    /// Offered requests per second.
    rate: u32,
    /// Persistent connections sharing the rate; `None`: a fresh connection per request.
    conns: Option<usize>,
    setups: Vec<SetupRuns>,
}

#[derive(Deserialize)]
struct SetupRuns {
    #[serde(rename = "setup")]
    label: String,
    /// Whether the setup ran agents (no agents is the baseline, with no CPU to plot).
    ran_agents: bool,
    runs: Vec<Run>,
}

#[derive(Deserialize)]
struct Run {
    load: Latency,
    /// Source agent, destination agent.
    vcpu_per_krps: [f64; 2],
}

#[derive(Deserialize)]
struct Latency {
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
}

impl SetupRuns {
    /// The median over the runs of `figure`, as the suite's own tables take it.
    fn median(&self, figure: impl Fn(&Run) -> f64) -> f64 {
        let mut values: Vec<f64> = self.runs.iter().map(figure).collect();
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied().unwrap_or(0.0)
    }
}

/// A percentile drawn on the latency plot, and how its line looks.
struct Percentile {
    label: &'static str,
    figure: fn(&Run) -> f64,
    line: LineKind,
}

#[derive(Clone, Copy)]
enum LineKind {
    Solid,
    Dashed,
    Dotted,
}

const PERCENTILES: [Percentile; 3] = [
    Percentile {
        label: "p50",
        figure: |run| run.load.p50_us,
        line: LineKind::Solid,
    },
    Percentile {
        label: "p99",
        figure: |run| run.load.p99_us,
        line: LineKind::Dashed,
    },
    Percentile {
        label: "p99.9",
        figure: |run| run.load.p999_us,
        line: LineKind::Dotted,
    },
];

/// One colour per setup, in the order the JSON names them (Okabe and Ito's colour-blind-safe
/// set, black first for the first setup, no agents).
const SETUP_COLOURS: [RGBColor; 7] = [
    RGBColor(0, 0, 0),
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
];

const SIZE: (u32, u32) = (1100, 600);
/// The legend's width, right of the chart.
const LEGEND_WIDTH: u32 = 320;
const FONT: &str = "sans-serif";
/// How much white the destination agent's bar has mixed in (the source agent's has none).
const DESTINATION_WHITENESS: f64 = 0.6;

/// Whether `dir/load.json` was written at or after `since` (so by the run that started then,
/// not left from an earlier one). A second's slack: the kernel stamps files from a clock coarser
/// than `SystemTime::now`, so a file written just after `since` can carry a time just before it.
pub fn load_json_written_since(dir: &Path, since: SystemTime) -> bool {
    let since = since.checked_sub(Duration::from_secs(1)).unwrap_or(since);
    std::fs::metadata(dir.join(LOAD_JSON))
        .and_then(|meta| meta.modified())
        .is_ok_and(|modified| modified >= since)
}

/// Draw both plots from `dir/load.json` into `dir`, and say so; returns the files written.
pub fn render(dir: &Path) -> anyhow::Result<[PathBuf; 2]> {
    let json = dir.join(LOAD_JSON);
    let report = read(&json)?;
    let latency = dir.join(LATENCY_SVG);
    draw_latency(&report, &latency)
        .with_context(|| format!("drawing {} from {}", relative(&latency), relative(&json)))?;
    let cpu = dir.join(CPU_SVG);
    draw_cpu(&report, &cpu)
        .with_context(|| format!("drawing {} from {}", relative(&cpu), relative(&json)))?;
    for written in [&latency, &cpu] {
        println!("wrote {}", written.display());
    }
    Ok([latency, cpu])
}

/// `load.json`, checked for what the plots need.
fn read(path: &Path) -> anyhow::Result<LoadReport> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", relative(path)))?;
    let report: LoadReport =
        serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(&text))
            .with_context(|| format!("{} is not the load suite's JSON", relative(path)))?;
    check(&report).with_context(|| format!("{} cannot be plotted", relative(path)))?;
    Ok(report)
}

fn check(report: &LoadReport) -> anyhow::Result<()> {
    if report.benchmark != "load" {
        bail!("its \"benchmark\" is {:?}, not \"load\"", report.benchmark);
    }
    if report.shapes.is_empty() {
        bail!("it has no shapes");
    }
    for shape in &report.shapes {
        if shape.rate == 0 {
            bail!("shape {:?} offers 0 requests/s", shape.label);
        }
        if shape.setups.is_empty() {
            bail!("shape {:?} has no setups", shape.label);
        }
        for setup in &shape.setups {
            let at = || format!("shape {:?}, setup {:?}", shape.label, setup.label);
            if setup.runs.is_empty() {
                bail!("{} has no runs", at());
            }
            for run in &setup.runs {
                let latencies = [run.load.p50_us, run.load.p99_us, run.load.p999_us];
                if latencies.iter().any(|us| !us.is_finite() || *us <= 0.0) {
                    bail!(
                        "{} has a latency of {latencies:?} µs; a log scale needs them above 0",
                        at()
                    );
                }
                if run.vcpu_per_krps.iter().any(|v| !v.is_finite() || *v < 0.0) {
                    bail!(
                        "{} has a CPU figure of {:?}, not a share of a vCPU",
                        at(),
                        run.vcpu_per_krps
                    );
                }
            }
        }
    }
    Ok(())
}

/// The setups' labels in the order they first appear, each with its colour.
fn setup_colours(report: &LoadReport) -> Vec<(&str, RGBColor)> {
    let mut labels: Vec<&str> = Vec::new();
    for setup in report.shapes.iter().flat_map(|shape| &shape.setups) {
        if !labels.contains(&setup.label.as_str()) {
            labels.push(&setup.label);
        }
    }
    labels
        .into_iter()
        .enumerate()
        .map(|(i, label)| (label, SETUP_COLOURS[i % SETUP_COLOURS.len()]))
        .collect()
}

fn colour_of(colours: &[(&str, RGBColor)], label: &str) -> RGBColor {
    colours
        .iter()
        .find(|(name, _)| *name == label)
        .map_or(BLACK, |(_, colour)| *colour)
}

/// `1,000` for 1000.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// A line through `points` in `kind`'s style, with its markers: p50 filled circles on a solid
/// line, p99 triangles on a dashed one, p99.9 crosses on a dotted one.
fn draw_percentile<X, Y>(
    chart: &mut ChartContext<'_, SVGBackend<'_>, Cartesian2d<X, Y>>,
    points: &[(f64, f64)],
    kind: LineKind,
    colour: RGBColor,
) -> anyhow::Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    let line = colour.stroke_width(2);
    let points = points.iter().copied();
    match kind {
        LineKind::Solid => {
            chart.draw_series(LineSeries::new(points.clone(), line))?;
            chart.draw_series(points.map(|at| Circle::new(at, 4, colour.filled())))?;
        }
        LineKind::Dashed => {
            chart.draw_series(DashedLineSeries::new(points.clone(), 10, 6, line))?;
            chart.draw_series(points.map(|at| TriangleMarker::new(at, 6, colour.filled())))?;
        }
        LineKind::Dotted => {
            chart.draw_series(DashedLineSeries::new(points.clone(), 2, 5, line))?;
            chart.draw_series(points.map(|at| Cross::new(at, 5, line)))?;
        }
    }
    Ok(())
}

/// Latency percentiles (medians over the runs) against offered load, for the shapes with
/// persistent connections: x the offered requests/s, y µs, both log scales.
fn draw_latency(report: &LoadReport, path: &Path) -> anyhow::Result<()> {
    let persistent: Vec<&Shape> = report
        .shapes
        .iter()
        .filter(|shape| shape.conns.is_some())
        .collect();
    let colours = setup_colours(report);
    let mut rates: Vec<f64> = persistent.iter().map(|s| f64::from(s.rate)).collect();
    rates.sort_by(f64::total_cmp);
    rates.dedup();
    let (Some(&slowest), Some(&fastest)) = (rates.first(), rates.last()) else {
        bail!("no shape runs over persistent connections");
    };
    let medians = persistent.iter().flat_map(|shape| {
        shape.setups.iter().flat_map(|setup| {
            PERCENTILES
                .iter()
                .map(|percentile| setup.median(percentile.figure))
        })
    });
    let (lowest, highest) = medians.fold((f64::INFINITY, 0.0_f64), |(lo, hi), us| {
        (lo.min(us), hi.max(us))
    });

    let (root, chart_area, legend_area) = canvas(path)?;
    let mut chart = chart_builder(
        &chart_area,
        format!(
            "Latency against offered load, persistent connections (median of {} rounds)",
            report.rounds
        ),
    )
    .build_cartesian_2d(
        (slowest / 2.0..fastest * 2.0)
            .log_scale()
            .with_key_points(rates.clone()),
        (lowest / 1.5..highest * 1.5).log_scale(),
    )?;
    chart
        .configure_mesh()
        .x_desc("offered load, requests/s (log scale)")
        .y_desc("latency, µs (log scale)")
        .x_label_formatter(&|rate| format!("{}/s", thousands(rate.round() as u64)))
        .y_label_formatter(&|us| thousands(us.round() as u64))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .draw()?;

    for &(setup_label, colour) in &colours {
        for percentile in &PERCENTILES {
            let mut points: Vec<(f64, f64)> = persistent
                .iter()
                .filter_map(|shape| {
                    let setup = shape.setups.iter().find(|s| s.label == setup_label)?;
                    Some((f64::from(shape.rate), setup.median(percentile.figure)))
                })
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            draw_percentile(&mut chart, &points, percentile.line, colour)?;
        }
    }

    let mut legend = Legend::new(&legend_area);
    legend.heading("setup")?;
    for &(label, colour) in &colours {
        legend.entry(label, Swatch::Block(colour.filled()))?;
    }
    legend.gap();
    legend.heading("percentile, median over the runs")?;
    for percentile in &PERCENTILES {
        legend.entry(percentile.label, Swatch::Line(percentile.line))?;
    }
    root.present()
        .with_context(|| format!("writing {}", relative(path)))
}

/// An SVG plot's drawing areas: the whole white canvas at `path`, and within it the chart's
/// area and the legend's on its right, as both plots lay them out.
type Canvas<'a> = (
    DrawingArea<SVGBackend<'a>, Shift>,
    DrawingArea<SVGBackend<'a>, Shift>,
    DrawingArea<SVGBackend<'a>, Shift>,
);

fn canvas(path: &Path) -> anyhow::Result<Canvas<'_>> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let (chart_area, legend_area) = root.split_horizontally(SIZE.0 - LEGEND_WIDTH);
    Ok((root, chart_area, legend_area))
}

/// A chart on `area` with `caption` and room for both axes' labels, as both plots draw it.
fn chart_builder<'a, 'b>(
    area: &'a DrawingArea<SVGBackend<'b>, Shift>,
    caption: String,
) -> ChartBuilder<'a, 'b, SVGBackend<'b>> {
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(caption, (FONT, 18))
        .margin(12)
        .x_label_area_size(50)
        .y_label_area_size(70);
    builder
}

/// Each agent's vCPU per 1,000 requests/s (medians over the runs), for each shape and each
/// setup that ran agents: source agent a filled bar, destination agent a lighter one beside it.
fn draw_cpu(report: &LoadReport, path: &Path) -> anyhow::Result<()> {
    let colours = setup_colours(report);
    let with_agents: Vec<&str> = colours
        .iter()
        .map(|(label, _)| *label)
        .filter(|label| {
            report
                .shapes
                .iter()
                .flat_map(|shape| &shape.setups)
                .any(|setup| setup.label == *label && setup.ran_agents)
        })
        .collect();
    if with_agents.is_empty() {
        bail!("no setup ran agents");
    }
    // Shape i is centred on x = i, its bars from i - 0.4 to i + 0.4: two per setup.
    let bar_width = 0.8 / (2 * with_agents.len()) as f64;
    let mut bars = Vec::new();
    for (i, shape) in report.shapes.iter().enumerate() {
        for (j, label) in with_agents.iter().enumerate() {
            let Some(setup) = shape.setups.iter().find(|s| s.label == *label) else {
                continue;
            };
            let colour = colour_of(&colours, label);
            let left = i as f64 - 0.4 + 2.0 * j as f64 * bar_width;
            for (agent, fill) in [(0, colour), (1, lighter(colour))] {
                let x0 = left + agent as f64 * bar_width;
                bars.push(Bar {
                    x: x0..x0 + bar_width * 0.92,
                    vcpu: setup.median(|run| run.vcpu_per_krps[agent]),
                    fill,
                    edge: colour,
                });
            }
        }
    }
    let highest = bars.iter().map(|bar| bar.vcpu).fold(0.0, f64::max);
    // Room above the highest bar for its figure.
    let top = if highest > 0.0 { highest * 1.2 } else { 1.0 };
    let shape_labels: Vec<&str> = report.shapes.iter().map(|s| s.label.as_str()).collect();

    let (root, chart_area, legend_area) = canvas(path)?;
    let mut chart = chart_builder(
        &chart_area,
        format!(
            "Agent CPU per 1,000 requests/s (median of {} rounds)",
            report.rounds
        ),
    )
    .build_cartesian_2d(-0.5..report.shapes.len() as f64 - 0.5, 0.0..top)?;
    // Asked for as many labels as shapes, plotters puts them one apart: on each shape's centre.
    let shape_label = |x: &f64| {
        let nearest = x.round();
        match shape_labels.get(nearest as usize) {
            Some(label) if (x - nearest).abs() < 1e-6 && nearest >= 0.0 => (*label).to_owned(),
            _ => String::new(),
        }
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(shape_labels.len())
        .x_desc("load shape")
        .y_desc("vCPU per 1,000 requests/s")
        .x_label_formatter(&shape_label)
        .y_label_formatter(&|v| format!("{v:.2}"))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .draw()?;
    chart.draw_series(bars.iter().map(|bar| {
        Rectangle::new(
            [(bar.x.start, 0.0), (bar.x.end, bar.vcpu)],
            bar.fill.filled(),
        )
    }))?;
    chart.draw_series(bars.iter().map(|bar| {
        Rectangle::new(
            [(bar.x.start, 0.0), (bar.x.end, bar.vcpu)],
            bar.edge.stroke_width(1),
        )
    }))?;
    // Each bar's figure above it, upright, so that a bar too short to see still says its value.
    let figure_font = (FONT, 12)
        .into_font()
        .transform(FontTransform::Rotate270)
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Center));
    chart.draw_series(bars.iter().map(|bar| {
        EmptyElement::at(((bar.x.start + bar.x.end) / 2.0, bar.vcpu))
            + Text::new(format!("{:.3}", bar.vcpu), (0, -4), figure_font.clone())
    }))?;

    let mut legend = Legend::new(&legend_area);
    legend.heading("setup (those with agents)")?;
    for label in &with_agents {
        legend.entry(label, Swatch::Block(colour_of(&colours, label).filled()))?;
    }
    legend.gap();
    legend.heading("bar")?;
    let grey = RGBColor(90, 90, 90);
    legend.entry("left: source agent", Swatch::Block(grey.filled()))?;
    legend.entry(
        "right, lighter: destination agent",
        Swatch::Block(lighter(grey).filled()),
    )?;
    root.present()
        .with_context(|| format!("writing {}", relative(path)))
}

/// One bar of the CPU plot: an agent's median vCPU per 1,000 requests/s.
struct Bar {
    x: std::ops::Range<f64>,
    vcpu: f64,
    fill: RGBColor,
    edge: RGBColor,
}

/// `colour` mixed with white, opaque (so that the mesh does not show through a bar).
fn lighter(colour: RGBColor) -> RGBColor {
    let towards_white = |c: u8| c + ((255 - c) as f64 * DESTINATION_WHITENESS).round() as u8;
    RGBColor(
        towards_white(colour.0),
        towards_white(colour.1),
        towards_white(colour.2),
    )
}

/// What a legend entry shows left of its label.
enum Swatch {
    /// A filled block (a setup's colour, a bar).
    Block(ShapeStyle),
    /// A percentile's line and marker, in black.
    Line(LineKind),
}

/// A legend drawn down the area right of a chart: headings, then entries of a swatch and a label.
struct Legend<'a, 'b> {
    area: &'a DrawingArea<SVGBackend<'b>, Shift>,
    /// The top of the next line, in pixels.
    y: i32,
}

impl<'a, 'b> Legend<'a, 'b> {
    const LEFT: i32 = 10;
    const SWATCH_WIDTH: i32 = 34;
    const LINE_HEIGHT: i32 = 24;

    fn new(area: &'a DrawingArea<SVGBackend<'b>, Shift>) -> Self {
        Self { area, y: 60 }
    }

    fn heading(&mut self, text: &str) -> anyhow::Result<()> {
        let font = (FONT, 15).into_font().style(FontStyle::Bold);
        self.area
            .draw(&Text::new(text, (Self::LEFT, self.y), font))?;
        self.y += Self::LINE_HEIGHT;
        Ok(())
    }

    fn gap(&mut self) {
        self.y += Self::LINE_HEIGHT / 2;
    }

    fn entry(&mut self, label: &str, swatch: Swatch) -> anyhow::Result<()> {
        let (left, right, middle) = (Self::LEFT, Self::LEFT + Self::SWATCH_WIDTH, self.y + 8);
        match swatch {
            Swatch::Block(style) => {
                self.area.draw(&Rectangle::new(
                    [(left, middle - 6), (right, middle + 6)],
                    style,
                ))?;
            }
            Swatch::Line(kind) => {
                let line = BLACK.stroke_width(2);
                let ends = [(left, middle), (right, middle)];
                let centre = ((left + right) / 2, middle);
                match kind {
                    LineKind::Solid => {
                        self.area.draw(&PathElement::new(ends, line))?;
                        self.area.draw(&Circle::new(centre, 4, BLACK.filled()))?;
                    }
                    LineKind::Dashed => {
                        self.area.draw(&DashedPathElement::new(ends, 10, 6, line))?;
                        self.area
                            .draw(&TriangleMarker::new(centre, 6, BLACK.filled()))?;
                    }
                    LineKind::Dotted => {
                        self.area.draw(&DashedPathElement::new(ends, 2, 5, line))?;
                        self.area.draw(&Cross::new(centre, 5, line))?;
                    }
                }
            }
        }
        let font = (FONT, 14).into_font();
        self.area
            .draw(&Text::new(label, (right + 10, self.y), font))?;
        self.y += Self::LINE_HEIGHT;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const SETUPS: [&str; 5] = [
        "no agents",
        "fast path (cached allow)",
        "tunnel, defaults",
        "tunnel, busyPollAdaptive: false",
        "tunnel, busyPoll: 0s",
    ];

    /// A directory of its own under the system's temporary one, emptied first.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-plots-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating a scratch directory");
        dir
    }

    /// A small `load.json` as the suite writes it: three shapes, five setups, two runs each.
    pub(crate) fn sample() -> serde_json::Value {
        let shapes = [
            ("1,000/s over one connection", 1000, Some(1)),
            ("10,000/s over four connections", 10_000, Some(4)),
            ("1,000/s, a fresh connection each", 1000, None),
        ];
        let shapes: Vec<_> = shapes
            .iter()
            .enumerate()
            .map(|(s, (label, rate, conns))| {
                let setups: Vec<_> = SETUPS
                    .iter()
                    .enumerate()
                    .map(|(k, setup)| {
                        let runs: Vec<_> = (0..2)
                            .map(|round| {
                                let p50 = 100.0 + 20.0 * k as f64 + 10.0 * s as f64 + round as f64;
                                let (vcpu, rss) = if k == 0 {
                                    ([0.0, 0.0], [0.0, 0.0])
                                } else {
                                    ([0.1 * k as f64, 0.08 * k as f64], [17.0, 16.5])
                                };
                                serde_json::json!({
                                    "load": {
                                        "due": 1000, "completed": 1000, "failures": 0,
                                        "rate": *rate as f64, "p50_us": p50,
                                        "p99_us": p50 * 3.0, "p999_us": p50 * 8.0,
                                        "max_us": p50 * 20.0,
                                    },
                                    "vcpu_per_krps": vcpu,
                                    "rss_mib": rss,
                                })
                            })
                            .collect();
                        serde_json::json!({"setup": setup, "ran_agents": k != 0, "runs": runs})
                    })
                    .collect();
                serde_json::json!({
                    "shape": label, "rate": rate, "conns": conns, "setups": setups,
                })
            })
            .collect();
        serde_json::json!({
            "benchmark": "load", "bytes": 1024, "rounds": 2, "secs": 1.0, "shapes": shapes,
        })
    }

    fn write_sample(dir: &Path, json: &serde_json::Value) {
        std::fs::write(dir.join(LOAD_JSON), json.to_string()).expect("writing the sample");
    }

    /// The text of every `<text>` element of an SVG, in order.
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|element| {
                let body = element.split_once('>')?.1;
                Some(body.split_once("</text>")?.0.trim().to_owned())
            })
            .collect()
    }

    #[test]
    fn both_plots_name_their_setups_and_axes() {
        let dir = scratch("render");
        write_sample(&dir, &sample());
        let written = render(&dir).expect("rendering the sample");
        assert_eq!(written, [dir.join(LATENCY_SVG), dir.join(CPU_SVG)]);

        let latency =
            texts(&std::fs::read_to_string(&written[0]).expect("reading the latency plot"));
        for expected in SETUPS.iter().chain(&[
            "p50",
            "p99",
            "p99.9",
            "offered load, requests/s (log scale)",
            "latency, µs (log scale)",
            "1,000/s",
            "10,000/s",
        ]) {
            assert!(
                latency.iter().any(|text| text == expected),
                "{expected:?} is not a text of the latency plot: {latency:?}"
            );
        }

        let cpu = texts(&std::fs::read_to_string(&written[1]).expect("reading the CPU plot"));
        for expected in SETUPS[1..].iter().chain(&[
            "load shape",
            "vCPU per 1,000 requests/s",
            "1,000/s over one connection",
            "10,000/s over four connections",
            "1,000/s, a fresh connection each",
            "left: source agent",
            "right, lighter: destination agent",
        ]) {
            assert!(
                cpu.iter().any(|text| text == expected),
                "{expected:?} is not a text of the CPU plot: {cpu:?}"
            );
        }
        assert!(
            !cpu.iter().any(|text| text == "no agents"),
            "the CPU plot shows the setup without agents: {cpu:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn latency_plot_draws_the_median_of_the_runs() {
        let mut json = sample();
        // Three runs of 100, 200 and 9,000 µs at p50 for one setup: the median, 200, is drawn;
        // the mean (3,100) would raise the y axis to its 1,000s.
        let runs = &mut json["shapes"][0]["setups"][0]["runs"];
        let run = runs[0].clone();
        *runs = serde_json::Value::Array(
            [100.0, 9000.0, 200.0]
                .iter()
                .map(|p50| {
                    let mut run = run.clone();
                    run["load"]["p50_us"] = serde_json::json!(p50);
                    run
                })
                .collect(),
        );
        let report: LoadReport = serde_json::from_value(json).expect("the sample parses");
        assert_eq!(
            report.shapes[0].setups[0].median(|run| run.load.p50_us),
            200.0
        );
    }

    #[test]
    fn malformed_json_is_an_error_naming_the_file() {
        let dir = scratch("malformed");
        let mut json = sample();
        json["shapes"][1]["rate"] = serde_json::json!("fast");
        write_sample(&dir, &json);
        let message = format!(
            "{:#}",
            render(&dir).expect_err("a rate that is not a number")
        );
        assert!(message.contains(LOAD_JSON), "{message}");
        assert!(message.contains("rate"), "{message}");

        std::fs::write(dir.join(LOAD_JSON), "{\"benchmark\": \"load\", ").expect("writing");
        let message = format!("{:#}", render(&dir).expect_err("truncated JSON"));
        assert!(message.contains(LOAD_JSON), "{message}");
        assert!(
            !dir.join(LATENCY_SVG).exists(),
            "a plot was drawn from truncated JSON"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn figures_a_log_scale_cannot_show_are_an_error() {
        let dir = scratch("zero");
        let mut json = sample();
        json["shapes"][0]["setups"][2]["runs"][1]["load"]["p99_us"] = serde_json::json!(0.0);
        write_sample(&dir, &json);
        let message = format!("{:#}", render(&dir).expect_err("a latency of 0 µs"));
        assert!(message.contains(LOAD_JSON), "{message}");
        assert!(message.contains("tunnel, defaults"), "{message}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_file_is_an_error_naming_it() {
        let dir = scratch("missing");
        let message = format!("{:#}", render(&dir).expect_err("no load.json"));
        assert!(message.contains(LOAD_JSON), "{message}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn load_json_counts_as_written_by_this_run_only_if_it_is_new() {
        let dir = scratch("fresh");
        let before = SystemTime::now();
        assert!(!load_json_written_since(&dir, before), "no load.json yet");
        write_sample(&dir, &sample());
        assert!(load_json_written_since(&dir, before));
        let later = SystemTime::now() + Duration::from_secs(60);
        assert!(
            !load_json_written_since(&dir, later),
            "a load.json from before the run counts as the run's"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(10_000), "10,000");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
