//! `pockettune report`: a training run's metrics file drawn as pictures, so that a user sees at a
//! glance what the run did and what the energy scheduler did to it.
//!
//! The input is the JSONL file `train` writes (see `Metrics` in [`crate::train`]): one object per
//! optimizer step (`step`, `loss`, `tokens_per_s`, `battery_pct`, `throttle_ms`, and from the power
//! work on `charging`, `temp_c`, `power_w`, `paused_ms`, `elapsed_s`), plus eval lines (`step`,
//! `eval_loss`). Each panel is one quantity drawn twice, side by side: over optimizer steps
//! (what the model saw) and over wall time (what the user waited through; a throttled or paused
//! stretch shows as steps spread out in time). Panels: loss with eval loss, tokens/s, battery
//! percent with the charging stretches shaded, temperature, the running totals of throttled and
//! paused seconds (over time, their slope is the share of the wall time lost to each), and power.
//! The summary adds the run's figures: final and best eval loss, throttled and paused seconds,
//! battery percentage points drained (falls only, as the power module counts them) and energy. A panel whose every value is null or absent (a desktop run has no battery)
//! is left out with a note rather than drawn empty.
//!
//! Time is `elapsed_s` where the line has it (wall seconds since the run started, throttling
//! and pauses included; a resumed run starts its clock again, so a drop continues from the last
//! time seen). Older files have no `elapsed_s`: time is then the running sum of `ms_step`,
//! `throttle_ms` and `paused_ms`, which misses the time spent on evals and checkpoints.
//!
//! Files: one per panel and `overview` with every panel stacked, as SVG (text stays `<text>`, so
//! no font is needed to write it) or PNG (rasterised with DejaVu Sans, embedded in the binary:
//! no system font library is used). A last line cut short by a kill is skipped with a note; any
//! other line that is not JSON is an error naming it.

use crate::error::{Error, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// Picture format of the files `draw` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Svg,
    Png,
}

impl Format {
    fn extension(self) -> &'static str {
        match self {
            Format::Svg => "svg",
            Format::Png => "png",
        }
    }
}

/// What `draw` wrote and the figures of the run it read.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ReportSummary {
    /// Files written, overview first.
    pub files: Vec<PathBuf>,
    pub panels: Vec<String>,
    /// Panels left out because every value was null or absent.
    pub skipped_panels: Vec<String>,
    pub steps: usize,
    pub first_step: u64,
    pub last_step: u64,
    /// Last non-null training loss.
    pub final_loss: Option<f64>,
    pub best_eval_loss: Option<f64>,
    pub best_eval_step: Option<u64>,
    /// Wall time the file covers, in seconds.
    pub duration_s: f64,
    /// `elapsed_s`, or `ms_step+throttle_ms+paused_ms` for files without it.
    pub time_source: String,
    /// Sums of `throttle_ms` and `paused_ms` (null when the file never reports them).
    pub throttled_s: Option<f64>,
    pub paused_s: Option<f64>,
    pub battery_start_pct: Option<f64>,
    pub battery_end_pct: Option<f64>,
    /// Percentage points drained: the sum of every fall between two readings, so that charging
    /// in between does not hide what the run used.
    pub battery_used_pct: Option<f64>,
    /// Sum of the steps' `energy_j` (null when no step reports it).
    pub energy_j: Option<f64>,
    /// Lines skipped and panels left out, in words.
    pub notes: Vec<String>,
}

/// A metrics file read: its step lines in file order, each with its wall time, and its evals.
pub struct Run {
    pub steps: Vec<StepLine>,
    /// (step, eval loss)
    pub evals: Vec<(u64, f64)>,
    pub time_source: String,
    pub notes: Vec<String>,
}

pub struct StepLine {
    pub step: u64,
    /// Seconds since the run started.
    pub time_s: f64,
    pub fields: Map<String, Value>,
}

impl StepLine {
    /// A numeric field; null, absent, non-numeric and non-finite all read as `None`.
    pub fn num(&self, key: &str) -> Option<f64> {
        self.fields.get(key).and_then(Value::as_f64).filter(|v| v.is_finite())
    }
}

/// The metrics file of a run: `path` itself if it is a file, else `path/metrics.jsonl`.
pub fn metrics_path(path: &Path) -> Result<PathBuf> {
    let err = |detail: String| Error::Report { path: path.to_path_buf(), detail };
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if path.is_dir() {
        let file = path.join("metrics.jsonl");
        if file.is_file() {
            return Ok(file);
        }
        return Err(err("this directory holds no metrics.jsonl; give the run's --out directory, \
                        or the file the run wrote with --metrics-out"
            .into()));
    }
    Err(err("no such file or directory; give a run directory (train's --out) or its metrics.jsonl".into()))
}

/// Reads a metrics file. Errors: unreadable or empty file, a complete line that is not a JSON
/// object (named by number), no step lines.
pub fn read_metrics(path: &Path) -> Result<Run> {
    let err = |detail: String| Error::Report { path: path.to_path_buf(), detail };
    let bytes = std::fs::read(path).map_err(|e| Error::Io { path: path.to_path_buf(), cause: e })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(err("the file is empty: the run has not finished a step yet".into()));
    }
    let text = String::from_utf8_lossy(&bytes);
    let (mut steps, mut evals, mut notes) = (Vec::new(), Vec::new(), Vec::new());
    let (mut other, mut time, mut offset, mut estimated) = (0usize, 0.0f64, 0.0f64, 0usize);
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value = match serde_json::from_str::<Value>(line) {
            Ok(v) => v,
            // `Metrics::log` writes a line and its newline in one write: a line without its
            // newline at the end of the file is one a kill cut short.
            Err(_) if !line.ends_with('\n') => {
                notes.push(format!(
                    "line {}: skipped, cut short ({} bytes, no newline): the run was stopped while \
                     writing it",
                    i + 1,
                    line.len()
                ));
                continue;
            }
            Err(e) => {
                return Err(err(format!(
                    "line {} is not JSON ({e}): {:?}; the file is damaged, remove or repair that line",
                    i + 1,
                    line.trim().chars().take(60).collect::<String>()
                )))
            }
        };
        let Value::Object(fields) = value else {
            return Err(err(format!("line {} is JSON but not an object; the file is damaged", i + 1)));
        };
        let Some(step) = fields.get("step").and_then(Value::as_u64) else {
            other += 1;
            continue;
        };
        if fields.contains_key("loss") {
            let line = StepLine { step, time_s: 0.0, fields };
            time = match line.num("elapsed_s") {
                // A resumed run restarts its clock: continue from the last time seen.
                Some(e) if e + offset < time => {
                    offset = time;
                    e + offset
                }
                Some(e) => e + offset,
                None => {
                    estimated += 1;
                    let ms: f64 =
                        ["ms_step", "throttle_ms", "paused_ms"].iter().filter_map(|k| line.num(k)).sum();
                    time + ms / 1e3
                }
            };
            steps.push(StepLine { time_s: time, ..line });
        } else if let Some(l) = fields.get("eval_loss").and_then(Value::as_f64).filter(|v| v.is_finite()) {
            evals.push((step, l));
        } else {
            other += 1;
        }
    }
    if steps.is_empty() {
        return Err(err("no step lines (objects with \"step\" and \"loss\"): is this a metrics file \
                        written by `pockettune train`?"
            .into()));
    }
    if other > 0 {
        notes.push(format!("{other} lines that are neither step nor eval lines ignored"));
    }
    let time_source = if estimated == 0 {
        "elapsed_s".to_string()
    } else {
        notes.push(format!(
            "{estimated} of {} step lines have no elapsed_s: their time is the running sum of \
             ms_step, throttle_ms and paused_ms (evals and checkpoints not counted)",
            steps.len()
        ));
        "ms_step+throttle_ms+paused_ms".to_string()
    };
    Ok(Run { steps, evals, time_source, notes })
}

/// Where a series' values come from.
#[derive(Clone, Copy)]
enum Source {
    /// A step-line field, multiplied by the factor (ms to s).
    Field(&'static str, f64),
    /// The running sum of a step-line field, times the factor: over time its slope is the
    /// share of the wall time spent that way, which reads better than per-step spikes.
    Total(&'static str, f64),
    Eval,
}

struct Series {
    label: &'static str,
    source: Source,
    color: RGBColor,
    /// Markers at every point (few points, such as evals).
    markers: bool,
}

struct Panel {
    name: &'static str,
    title: &'static str,
    y_desc: &'static str,
    series: Vec<Series>,
    /// Shade the steps whose `charging` is true.
    shade_charging: bool,
    /// Clamp the y range (percentages stay in 0..100).
    clamp: Option<(f64, f64)>,
}

const BLUE: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(255, 127, 14);
const GREEN: RGBColor = RGBColor(44, 160, 44);
const RED: RGBColor = RGBColor(214, 39, 40);
const PURPLE: RGBColor = RGBColor(148, 103, 189);

fn panels() -> Vec<Panel> {
    let s = |label, source, color, markers| Series { label, source, color, markers };
    let p = |name, title, y_desc, series| Panel {
        name,
        title,
        y_desc,
        series,
        shade_charging: false,
        clamp: None,
    };
    vec![
        p(
            "loss",
            "loss",
            "loss",
            vec![
                s("train loss", Source::Field("loss", 1.0), BLUE, false),
                s("eval loss", Source::Eval, ORANGE, true),
            ],
        ),
        p(
            "speed",
            "tokens/s",
            "tokens/s",
            vec![s("tokens/s", Source::Field("tokens_per_s", 1.0), BLUE, false)],
        ),
        Panel {
            shade_charging: true,
            clamp: Some((0.0, 100.0)),
            ..p(
                "battery",
                "battery",
                "percent",
                vec![s("battery %", Source::Field("battery_pct", 1.0), GREEN, false)],
            )
        },
        p(
            "temperature",
            "temperature",
            "°C",
            vec![s("temperature °C", Source::Field("temp_c", 1.0), RED, false)],
        ),
        p(
            "throttle",
            "time throttled and paused",
            "seconds so far",
            vec![
                s("throttled", Source::Total("throttle_ms", 1e-3), ORANGE, false),
                s("paused", Source::Total("paused_ms", 1e-3), PURPLE, false),
            ],
        ),
        p("power", "power", "watts", vec![s("power W", Source::Field("power_w", 1.0), PURPLE, false)]),
    ]
}

/// One series as (step, time, value) points; `None` values break the line.
fn points(run: &Run, source: Source) -> Vec<(f64, f64, Option<f64>)> {
    match source {
        Source::Field(key, factor) => {
            run.steps.iter().map(|l| (l.step as f64, l.time_s, l.num(key).map(|v| v * factor))).collect()
        }
        Source::Total(key, factor) => {
            let mut total = 0.0;
            let mut sum = |v: f64| {
                total += v * factor;
                total
            };
            run.steps.iter().map(|l| (l.step as f64, l.time_s, l.num(key).map(&mut sum))).collect()
        }
        // An eval line follows the step line of its step: it takes that step's time.
        Source::Eval => run
            .evals
            .iter()
            .filter_map(|&(step, v)| {
                let t = run.steps.iter().rev().find(|l| l.step == step)?.time_s;
                Some((step as f64, t, Some(v)))
            })
            .collect(),
    }
}

/// Draws every panel with data and writes `out/<panel>.<ext>` and `out/overview.<ext>`.
/// `metrics` is a run directory or a metrics file.
pub fn draw(metrics: &Path, out: &Path, format: Format) -> Result<ReportSummary> {
    let path = metrics_path(metrics)?;
    let mut run = read_metrics(&path)?;
    let (mut kept, mut skipped) = (Vec::new(), Vec::new());
    for panel in panels() {
        let has_data = panel.series.iter().any(|s| points(&run, s.source).iter().any(|p| p.2.is_some()));
        if has_data {
            kept.push(panel);
        } else {
            let keys: Vec<&str> = panel
                .series
                .iter()
                .map(|s| match s.source {
                    Source::Field(k, _) | Source::Total(k, _) => k,
                    Source::Eval => "eval_loss",
                })
                .collect();
            run.notes.push(format!(
                "panel {:?} left out: {} null or absent on every line",
                panel.name,
                keys.join(", ")
            ));
            skipped.push(panel.name.to_string());
        }
    }
    std::fs::create_dir_all(out).map_err(|e| Error::Io { path: out.to_path_buf(), cause: e })?;
    register_font();
    let mut files = Vec::new();
    let overview = out.join(format!("overview.{}", format.extension()));
    let refs: Vec<&Panel> = kept.iter().collect();
    render(&overview, format, &refs, &run)?;
    files.push(overview);
    for panel in &kept {
        let file = out.join(format!("{}.{}", panel.name, format.extension()));
        render(&file, format, &[panel], &run)?;
        files.push(file);
    }
    Ok(summarize(run, files, &kept, skipped))
}

fn summarize(run: Run, files: Vec<PathBuf>, kept: &[Panel], skipped: Vec<String>) -> ReportSummary {
    let col = |key: &str| run.steps.iter().filter_map(|l| l.num(key)).collect::<Vec<f64>>();
    let sum = |key: &str| {
        let v = col(key);
        (!v.is_empty()).then(|| v.iter().sum::<f64>())
    };
    let battery = col("battery_pct");
    let best = run.evals.iter().copied().min_by(|a, b| a.1.total_cmp(&b.1));
    ReportSummary {
        files,
        panels: kept.iter().map(|p| p.name.to_string()).collect(),
        skipped_panels: skipped,
        steps: run.steps.len(),
        first_step: run.steps[0].step,
        last_step: run.steps[run.steps.len() - 1].step,
        final_loss: run.steps.iter().rev().find_map(|l| l.num("loss")),
        best_eval_loss: best.map(|b| b.1),
        best_eval_step: best.map(|b| b.0),
        duration_s: run.steps.iter().map(|l| l.time_s).fold(0.0, f64::max),
        time_source: run.time_source.clone(),
        throttled_s: sum("throttle_ms").map(|ms| ms / 1e3),
        paused_s: sum("paused_ms").map(|ms| ms / 1e3),
        battery_start_pct: battery.first().copied(),
        battery_end_pct: battery.last().copied(),
        energy_j: sum("energy_j"),
        battery_used_pct: (!battery.is_empty())
            .then(|| battery.windows(2).map(|w| (w[0] - w[1]).max(0.0)).sum()),
        notes: run.notes,
    }
}

/// plotters' `ab_glyph` font table is empty until a font is registered; every text style names
/// "sans-serif", which SVG viewers also understand.
fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The embedded font is a valid TrueType file; if it ever failed to parse, drawing would
        // fail with a font error naming the file, not panic.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

const PANEL_SIZE: (u32, u32) = (1280, 380);

fn render(file: &Path, format: Format, panels: &[&Panel], run: &Run) -> Result<()> {
    let size = (PANEL_SIZE.0, PANEL_SIZE.1 * panels.len() as u32);
    let plot_err =
        |e: String| Error::Report { path: file.to_path_buf(), detail: format!("drawing failed: {e}") };
    match format {
        Format::Svg => {
            let root = SVGBackend::new(file, size).into_drawing_area();
            draw_rows(&root, panels, run).map_err(plot_err)?;
            root.present().map_err(|e| plot_err(e.to_string()))
        }
        Format::Png => {
            let mut rgb = vec![0u8; size.0 as usize * size.1 as usize * 3];
            {
                let root = BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area();
                draw_rows(&root, panels, run).map_err(plot_err)?;
                root.present().map_err(|e| plot_err(e.to_string()))?;
            }
            write_png(file, size, &rgb)
        }
    }
}

fn write_png(file: &Path, (w, h): (u32, u32), rgb: &[u8]) -> Result<()> {
    let io = |e: std::io::Error| Error::Io { path: file.to_path_buf(), cause: e };
    let enc_err = |e: png::EncodingError| Error::Report {
        path: file.to_path_buf(),
        detail: format!("PNG encoding: {e}"),
    };
    let f = std::fs::File::create(file).map_err(io)?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(f), w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(enc_err)?;
    writer.write_image_data(rgb).map_err(enc_err)?;
    writer.finish().map_err(enc_err)
}

fn draw_rows<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    panels: &[&Panel],
    run: &Run,
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    for (row, panel) in root.split_evenly((panels.len(), 1)).iter().zip(panels) {
        let (left, right) = row.split_horizontally(PANEL_SIZE.0 / 2);
        draw_chart(&left, panel, run, Axis::Steps).map_err(|e| e.to_string())?;
        draw_chart(&right, panel, run, Axis::Time).map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq)]
enum Axis {
    Steps,
    Time,
}

type DrawResult<DB> = std::result::Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn draw_chart<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    panel: &Panel,
    run: &Run,
    axis: Axis,
) -> DrawResult<DB> {
    let duration = run.steps.iter().map(|l| l.time_s).fold(0.0, f64::max);
    // Minutes or hours once seconds would make long tick labels.
    let (div, unit) = match duration {
        d if d >= 3.0 * 3600.0 => (3600.0, "h"),
        d if d >= 180.0 => (60.0, "min"),
        _ => (1.0, "s"),
    };
    let x_of = |p: &(f64, f64, Option<f64>)| match axis {
        Axis::Steps => p.0,
        Axis::Time => p.1 / div,
    };
    let all: Vec<Vec<(f64, f64, Option<f64>)>> = panel.series.iter().map(|s| points(run, s.source)).collect();
    let xs = run.steps.iter().map(|l| x_of(&(l.step as f64, l.time_s, None)));
    let (x0, x1) = match (axis, padded(xs, None, 0.0)) {
        (Axis::Steps, range) => range,
        // The clock starts at 0 (the first step line is written after the first step).
        (Axis::Time, (_, hi)) => (0.0, hi.max(1e-3)),
    };
    let ys = all.iter().flatten().filter_map(|p| p.2);
    let (y0, y1) = padded(ys, panel.clamp, 0.05);
    let (caption, x_desc) = match axis {
        Axis::Steps => (format!("{} over steps", panel.title), "optimizer step".to_string()),
        Axis::Time => (format!("{} over time", panel.title), format!("time ({unit})")),
    };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    let x_fmt = |v: &f64| match axis {
        Axis::Steps => format!("{v:.0}"),
        Axis::Time => tick(*v, x1 - x0),
    };
    let y_fmt = |v: &f64| tick(*v, y1 - y0);
    // Steps are whole: on a short run, one tick per step rather than 1.5, 2.5.
    let x_ticks = if axis == Axis::Steps { ((x1 - x0).round() as usize + 1).clamp(2, 10) } else { 10 };
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(panel.y_desc)
        .x_labels(x_ticks)
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .label_style(("sans-serif", 13))
        .draw()?;

    let mut labels = 0;
    if panel.shade_charging {
        // Each charging step's stretch of x: over steps, half a step either side; over time,
        // from the previous step's end to its own (when it ran).
        let mut prev = x0;
        let mut bands = Vec::new();
        for l in &run.steps {
            let x = x_of(&(l.step as f64, l.time_s, None));
            let (start, end) = if axis == Axis::Steps { (x - 0.5, x + 0.5) } else { (prev, x) };
            if l.fields.get("charging").and_then(Value::as_bool) == Some(true) {
                bands
                    .push(Rectangle::new([(start.max(x0), y0), (end.min(x1), y1)], GREEN.mix(0.15).filled()));
            }
            prev = x;
        }
        if !bands.is_empty() {
            labels += 1;
            chart
                .draw_series(bands)?
                .label("charging")
                .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], GREEN.mix(0.15).filled()));
        }
    }
    for (series, pts) in panel.series.iter().zip(&all) {
        let style = series.color.stroke_width(2);
        // Consecutive known values form one line; a null ends it.
        let mut segments: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
        for p in pts {
            match p.2 {
                Some(v) => segments.last_mut().expect("never empty").push((x_of(p), v)),
                None if segments.last().is_some_and(|s| !s.is_empty()) => segments.push(Vec::new()),
                None => {}
            }
        }
        segments.retain(|s| !s.is_empty());
        let mut labelled = false;
        for seg in &segments {
            let drawn = chart.draw_series(LineSeries::new(seg.iter().copied(), style))?;
            if !labelled && panel.series.len() > 1 {
                drawn
                    .label(series.label)
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
                labelled = true;
                labels += 1;
            }
            // A lone point draws no line: mark it, as every point of a sparse series.
            if series.markers || seg.len() == 1 {
                chart.draw_series(seg.iter().map(|&c| Circle::new(c, 3, series.color.filled())))?;
            }
        }
    }
    if labels > 0 {
        chart
            .configure_series_labels()
            // Running totals climb to the upper right: keep the legend out of their way.
            .position(if panel.series.iter().any(|s| matches!(s.source, Source::Total(..))) {
                SeriesLabelPosition::UpperLeft
            } else {
                SeriesLabelPosition::UpperRight
            })
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.4))
            .label_font(("sans-serif", 13))
            .draw()?;
    }
    Ok(())
}

/// A tick label with as many decimals as a span of this size needs.
fn tick(v: f64, span: f64) -> String {
    let decimals = match span {
        s if s >= 20.0 => 0,
        s if s >= 2.0 => 1,
        s if s >= 0.2 => 2,
        _ => 3,
    };
    format!("{v:.decimals$}")
}

/// The range of the values, widened by `pad` of its span on each side (a flat series by one
/// unit), clamped; an empty series gives 0..1.
fn padded(values: impl Iterator<Item = f64>, clamp: Option<(f64, f64)>, pad: f64) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return (0.0, 1.0);
    }
    let (lo, hi) =
        if hi - lo < 1e-9 { (lo - 1.0, hi + 1.0) } else { (lo - pad * (hi - lo), hi + pad * (hi - lo)) };
    match clamp {
        Some((a, b)) if lo.max(a) < hi.min(b) => (lo.max(a), hi.min(b)),
        _ => (lo, hi),
    }
}
