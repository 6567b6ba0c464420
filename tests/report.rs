//! `pockettune report`: a metrics file made here (throttling from step 6, a 30 s pause at step 8,
//! a battery that drains, charges at steps 9-10 and has one null reading, temperature, evals at
//! steps 4, 8 and 12, no power readings, and a last line cut short by a kill) is drawn as SVG and
//! PNG, through the library and through the binary. The pictures are read back: the series'
//! titles, the number of points of each line, their order on the step axis and their spacing on
//! the time axis (the pause must take 30.75 of the run's 37.25 seconds between the first and last
//! step); the summary's figures are worked out by hand below. Bad inputs give the crate's errors.

use pockettune::report::{draw, read_metrics, Format};
use pockettune::Error;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One step line per step 1..=12 and evals at 4, 8, 12, then a cut-short line.
/// ms_step 500; throttle 250 ms from step 6; step 8 paused 30 s; elapsed_s adds them up:
/// 0.5 .. 2.5 (steps 1-5), 3.25, 4.0, 34.75, 35.5, 36.25, 37.0, 37.75.
fn metrics_text() -> String {
    let battery = [
        Some(69),
        Some(68),
        Some(67),
        None,
        Some(65),
        Some(64),
        Some(63),
        Some(62),
        Some(63),
        Some(64),
        Some(63),
        Some(62),
    ];
    let mut text = String::new();
    let mut elapsed = 0.0;
    for step in 1..=12u32 {
        let throttle = if step >= 6 { 250 } else { 0 };
        let paused = if step == 8 { 30_000 } else { 0 };
        elapsed += (500 + throttle + paused) as f64 / 1e3;
        let line = serde_json::json!({
            "step": step, "loss": 3.0 - 0.1 * step as f64, "lr": 1e-3, "tokens": 512 * step,
            "ms_step": 500.0, "tokens_per_s": if step >= 6 { 500.0 } else { 1000.0 },
            "rss_bytes": 1 << 30, "peak_rss_bytes": 1 << 30, "gpu_bytes": null,
            "battery_pct": battery[step as usize - 1], "charging": step == 9 || step == 10,
            "temp_c": 30.0 + step as f64, "throttle_ms": throttle, "paused_ms": paused,
            "power_w": null, "energy_j": null, "elapsed_s": elapsed, "grad_norm": 1.0,
        });
        text += &format!("{line}\n");
        if let Some(eval) = match step {
            4 => Some(2.9),
            8 => Some(2.7),
            12 => Some(2.75),
            _ => None,
        } {
            text += &format!(
                "{}\n",
                serde_json::json!({"step": step, "eval_loss": eval, "perplexity": f64::exp(eval)})
            );
        }
    }
    // Line 16: what a kill during the write leaves (no newline).
    text + "{\"step\":13,\"loss\":1.7,\"lr\""
}

fn run_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("metrics.jsonl"), metrics_text()).unwrap();
    dir
}

/// The data lines of an SVG: polylines 2 px wide (axes and grid are 1 px), as lists of points.
fn lines(svg: &Path) -> Vec<Vec<(f64, f64)>> {
    let text = std::fs::read_to_string(svg).unwrap();
    let doc = roxmltree::Document::parse(&text).unwrap_or_else(|e| panic!("{}: not XML: {e}", svg.display()));
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    doc.descendants()
        .filter(|n| n.has_tag_name("polyline") && n.attribute("stroke-width") == Some("2"))
        .map(|n| {
            n.attribute("points")
                .unwrap()
                .split_whitespace()
                .map(|p| {
                    let (x, y) = p.split_once(',').unwrap();
                    (x.parse().unwrap(), y.parse().unwrap())
                })
                .collect()
        })
        .collect()
}

fn texts(svg: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(svg).unwrap();
    let doc = roxmltree::Document::parse(&text).unwrap();
    doc.descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text().map(|t| t.trim().to_string()))
        .collect()
}

fn circles(svg: &Path) -> Vec<(f64, f64)> {
    let text = std::fs::read_to_string(svg).unwrap();
    let doc = roxmltree::Document::parse(&text).unwrap();
    doc.descendants()
        .filter(|n| n.has_tag_name("circle"))
        .map(|n| (n.attribute("cx").unwrap().parse().unwrap(), n.attribute("cy").unwrap().parse().unwrap()))
        .collect()
}

/// The charging bands of an SVG: green rectangles taller than a legend sample, as (x, width),
/// sorted by x.
fn bands(svg: &Path) -> Vec<(f64, f64)> {
    let text = std::fs::read_to_string(svg).unwrap();
    let doc = roxmltree::Document::parse(&text).unwrap();
    let num = |n: &roxmltree::Node, a: &str| n.attribute(a).unwrap().parse::<f64>().unwrap();
    let mut b: Vec<(f64, f64)> = doc
        .descendants()
        .filter(|n| {
            n.has_tag_name("rect") && n.attribute("fill") == Some("#2CA02C") && num(n, "height") > 100.0
        })
        .map(|n| (num(&n, "x"), num(&n, "width")))
        .collect();
    b.sort_by(|p, q| p.0.total_cmp(&q.0));
    b
}

fn sizes(lines: &[Vec<(f64, f64)>]) -> Vec<usize> {
    let mut s: Vec<usize> = lines.iter().map(Vec::len).collect();
    s.sort();
    s
}

/// The lines of the left (over steps) and right (over time) chart of a panel file.
fn left_right(lines: Vec<Vec<(f64, f64)>>) -> (Vec<Vec<(f64, f64)>>, Vec<Vec<(f64, f64)>>) {
    lines.into_iter().filter(|l| l.len() > 2).partition(|l| l[0].0 < 640.0)
}

#[test]
fn svg_report_draws_every_panel_with_data_and_the_right_points() {
    let dir = run_dir();
    let out = dir.path().join("pictures");
    let s = draw(dir.path(), &out, Format::Svg).unwrap();

    let names = ["overview", "loss", "speed", "battery", "temperature", "throttle"];
    let expected: Vec<PathBuf> = names.iter().map(|n| out.join(format!("{n}.svg"))).collect();
    assert_eq!(s.files, expected);
    for f in &s.files {
        assert!(f.is_file(), "{} not written", f.display());
    }
    // power_w is null on every line: no power panel, and a note says why.
    assert_eq!(s.skipped_panels, ["power"]);
    assert!(!out.join("power.svg").exists());
    assert!(s.notes.iter().any(|n| n.contains("power") && n.contains("power_w")), "{:?}", s.notes);
    assert!(s.notes.iter().any(|n| n.contains("line 16") && n.contains("cut short")), "{:?}", s.notes);

    // Summary figures, by hand from metrics_text.
    assert_eq!((s.steps, s.first_step, s.last_step), (12, 1, 12));
    assert!((s.final_loss.unwrap() - 1.8).abs() < 1e-12);
    assert_eq!((s.best_eval_loss, s.best_eval_step), (Some(2.7), Some(8)));
    assert!((s.duration_s - 37.75).abs() < 1e-9, "{}", s.duration_s);
    assert_eq!(s.time_source, "elapsed_s");
    assert!((s.throttled_s.unwrap() - 1.75).abs() < 1e-9);
    assert!((s.paused_s.unwrap() - 30.0).abs() < 1e-9);
    // Drops 69>68>67>(null)65>64>63>62, charging to 64, then 63, 62: 1+1+2+1+1+1 + 1+1 = 9.
    assert_eq!(
        (s.battery_start_pct, s.battery_end_pct, s.battery_used_pct),
        (Some(69.0), Some(62.0), Some(9.0))
    );

    // Loss: train loss 12 points and eval loss 3 points in each chart, two legend samples each.
    let loss = out.join("loss.svg");
    let t = texts(&loss);
    for title in
        ["loss over steps", "loss over time", "train loss", "eval loss", "optimizer step", "time (s)"]
    {
        assert!(t.iter().any(|x| x == title), "{title:?} not in {t:?}");
    }
    assert_eq!(sizes(&lines(&loss)), [2, 2, 2, 2, 3, 3, 12, 12]);
    let (left, _) = left_right(lines(&loss));
    let train = left.iter().find(|l| l.len() == 12).unwrap();
    // Loss falls every step: each point lower on the page (larger y) than the one before;
    // steps are evenly spaced.
    assert!(train.windows(2).all(|w| w[1].1 > w[0].1), "{train:?}");
    let gap = (train[11].0 - train[0].0) / 11.0;
    assert!(train.windows(2).all(|w| (w[1].0 - w[0].0 - gap).abs() <= 1.0), "{train:?}");
    // Eval markers: 3 per chart; over steps, 2.7 (step 8) lowest, then 2.75, then 2.9.
    let c = circles(&loss);
    assert_eq!(c.len(), 6, "{c:?}");
    let mut evals: Vec<(f64, f64)> = c.into_iter().filter(|p| p.0 < 640.0).collect();
    evals.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(evals[1].1 > evals[2].1 && evals[2].1 > evals[0].1, "{evals:?}");

    // Over time, the pause between steps 7 and 8 takes 30.75 of the 37.25 seconds from step 1
    // to step 12; over steps it is one step of eleven.
    let speed = out.join("speed.svg");
    assert_eq!(sizes(&lines(&speed)), [12, 12]);
    let (left, right) = left_right(lines(&speed));
    let (steps, time) = (&left[0], &right[0]);
    let share = |l: &Vec<(f64, f64)>| (l[7].0 - l[6].0) / (l[11].0 - l[0].0);
    assert!((share(time) - 30.75 / 37.25).abs() < 0.01, "{}", share(time));
    assert!((share(steps) - 1.0 / 11.0).abs() < 0.01, "{}", share(steps));

    // Battery: the null at step 4 breaks the line into steps 1-3 and 5-12; charging is shaded.
    let battery = out.join("battery.svg");
    assert_eq!(sizes(&lines(&battery)), [3, 3, 8, 8]);
    assert!(texts(&battery).iter().any(|x| x == "charging"));
    // The shading (the chart-high green rectangles) covers steps 9 and 10 without a gap: over
    // steps 8.5..10.5, over time from step 8's end to step 10's (34.75 s .. 36.25 s).
    let (left, right): (Vec<_>, Vec<_>) = bands(&battery).into_iter().partition(|b| b.0 < 640.0);
    assert_eq!((left.len(), right.len()), (2, 2), "{left:?} {right:?}");
    for b in [&left, &right] {
        assert!((b[0].0 + b[0].1 - b[1].0).abs() <= 1.0, "gap between the bands: {b:?}");
    }
    let step_px = (steps[11].0 - steps[0].0) / 11.0;
    assert!((left[1].0 + left[1].1 - left[0].0 - 2.0 * step_px).abs() <= 2.0, "{left:?}, {step_px}");
    let second_px = (time[11].0 - time[0].0) / (37.75 - 0.5);
    assert!((right[0].0 - time[7].0).abs() <= 1.0, "{right:?} {time:?}");
    assert!((right[1].0 + right[1].1 - right[0].0 - 1.5 * second_px).abs() <= 2.0, "{right:?}");

    assert_eq!(sizes(&lines(&out.join("temperature.svg"))), [12, 12]);
    // Throttled and paused running totals, two legend samples per chart.
    let throttle = out.join("throttle.svg");
    assert_eq!(sizes(&lines(&throttle)), [2, 2, 2, 2, 12, 12, 12, 12]);
    assert!(texts(&throttle).iter().any(|x| x == "paused"));

    // The overview holds the five panels.
    let t = texts(&out.join("overview.svg"));
    assert_eq!(t.iter().filter(|x| x.ends_with("over steps")).count(), 5, "{t:?}");
    assert!(!t.iter().any(|x| x.starts_with("power")));
}

#[test]
fn png_report_is_a_picture_with_text() {
    let dir = run_dir();
    let out = dir.path().join("png");
    let s = draw(&dir.path().join("metrics.jsonl"), &out, Format::Png).unwrap();
    assert_eq!(s.files.len(), 6);
    for (file, rows) in [(out.join("overview.png"), 5), (out.join("loss.png"), 1)] {
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&file).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0u8; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (1280, 380 * rows));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        let dark = |x0: u32, x1: u32, y0: u32, y1: u32| {
            let mut n = 0;
            for y in y0..y1 {
                for x in x0..x1 {
                    let i = ((y * info.width + x) * 3) as usize;
                    n += usize::from(buf[i] < 128 && buf[i + 1] < 128 && buf[i + 2] < 128);
                }
            }
            n
        };
        // The caption "loss over steps" is rasterised in the top band of the left chart (the
        // font is embedded: no system font is looked up), and the charts are drawn below it.
        assert!(dark(200, 440, 8, 34) > 100, "{}: no caption text drawn", file.display());
        assert!(dark(0, 1280, 0, 380) > dark(200, 440, 8, 34));
    }
}

#[test]
fn time_without_elapsed_s_is_summed_and_a_restarted_clock_continues() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old.jsonl");
    // Old files: no elapsed_s, paused_ms absent: time is the sum of ms_step and throttle_ms.
    let lines: String = (1..=4)
        .map(|s| {
            format!(
                "{{\"step\":{s},\"loss\":2.0,\"tokens_per_s\":100,\"ms_step\":1000,\"throttle_ms\":{}}}\n",
                if s > 2 { 500 } else { 0 }
            )
        })
        .collect();
    std::fs::write(&old, lines).unwrap();
    let run = read_metrics(&old).unwrap();
    let times: Vec<f64> = run.steps.iter().map(|l| l.time_s).collect();
    assert_eq!(times, [1.0, 2.0, 3.5, 5.0]);
    assert_eq!(run.time_source, "ms_step+throttle_ms+paused_ms");
    let s = draw(&old, &dir.path().join("r"), Format::Svg).unwrap();
    assert_eq!(s.duration_s, 5.0);
    // No battery, temperature, pauses or power in such a file; throttle_ms 0 is data.
    assert_eq!(s.skipped_panels, ["battery", "temperature", "power"]);
    assert_eq!((s.paused_s, s.energy_j), (None, None));
    assert_eq!(s.throttled_s, Some(1.0));

    // A resumed run's clock starts again at 0: its times continue from the last one seen.
    let resumed = dir.path().join("resumed.jsonl");
    let elapsed = [1.0, 2.0, 3.0, 0.5, 1.5];
    let lines: String = elapsed
        .iter()
        .enumerate()
        .map(|(i, e)| {
            format!(
                "{{\"step\":{},\"loss\":2.0,\"elapsed_s\":{e},\"power_w\":2.5,\"energy_j\":2.5}}\n",
                i + 1
            )
        })
        .collect();
    std::fs::write(&resumed, lines).unwrap();
    let times: Vec<f64> = read_metrics(&resumed).unwrap().steps.iter().map(|l| l.time_s).collect();
    assert_eq!(times, [1.0, 2.0, 3.0, 3.5, 4.5]);
    // Its power is known: the power panel is drawn and the energy summed (5 x 2.5 J).
    let s = draw(&resumed, &dir.path().join("r2"), Format::Svg).unwrap();
    assert_eq!(s.panels, ["loss", "power"]);
    assert_eq!(s.energy_j, Some(12.5));
}

fn report_error(metrics: &Path) -> String {
    let out = metrics.parent().unwrap().join("out");
    match draw(metrics, &out, Format::Svg) {
        Err(Error::Report { path, detail }) => {
            assert_eq!(path, metrics);
            detail
        }
        Err(e) => panic!("{}: expected Error::Report, got {e}", metrics.display()),
        Ok(_) => panic!("{}: drawn", metrics.display()),
    }
}

#[test]
fn bad_inputs_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let missing = report_error(&d.join("no-such-run"));
    assert!(missing.contains("no such file or directory"), "{missing}");
    std::fs::create_dir(d.join("empty-run")).unwrap();
    assert!(report_error(&d.join("empty-run")).contains("no metrics.jsonl"));

    let write = |name: &str, text: &str| {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    assert!(report_error(&write("empty.jsonl", "")).contains("empty"));
    assert!(report_error(&write("blank.jsonl", "\n  \n")).contains("empty"));

    let step = |s: u32| format!("{{\"step\":{s},\"loss\":2.0,\"elapsed_s\":{s}}}\n");
    // Garbage in the middle names its line; so does a cut line that is not the last one.
    let garbage = write("garbage.jsonl", &format!("{}{}not json\n{}", step(1), step(2), step(3)));
    let e = report_error(&garbage);
    assert!(e.contains("line 3 is not JSON") && e.contains("not json"), "{e}");
    let cut = write("cut-middle.jsonl", &format!("{}{{\"step\":2,\"lo\n{}", step(1), step(3)));
    assert!(report_error(&cut).contains("line 2 is not JSON"));
    // A complete last line (with its newline) is not a cut-short one.
    let bad_last = write("bad-last.jsonl", &format!("{}{{\"step\":2,\n", step(1)));
    assert!(report_error(&bad_last).contains("line 2 is not JSON"));
    assert!(report_error(&write("array.jsonl", &format!("{}[1,2]\n", step(1))))
        .contains("line 2 is JSON but not an object"));
    // Evals alone, or a single cut-short line, are no run to draw.
    let evals = write("evals.jsonl", "{\"step\":4,\"eval_loss\":2.5,\"perplexity\":12.2}\n");
    assert!(report_error(&evals).contains("no step lines"));
    assert!(report_error(&write("only-cut.jsonl", "{\"step\":1,\"lo")).contains("no step lines"));

    // The same file with the cut line last is fine.
    let ok = write("ok.jsonl", &format!("{}{}{{\"step\":3,\"lo", step(1), step(2)));
    assert_eq!(draw(&ok, &d.join("ok"), Format::Svg).unwrap().steps, 2);
}

fn pockettune(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pockettune")).args(args).output().unwrap()
}

#[test]
fn binary_prints_the_paths_or_one_json_document() {
    let dir = run_dir();
    let run = dir.path().to_str().unwrap();
    let o = pockettune(&["report", run]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8(o.stdout).unwrap();
    let paths: Vec<&str> = stdout.lines().collect();
    // Default --out: report/ beside the metrics file.
    assert_eq!(paths.len(), 6, "{stdout}");
    assert_eq!(Path::new(paths[0]), dir.path().join("report").join("overview.svg"));
    assert!(paths.iter().all(|p| Path::new(p).is_file()));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("line 16") && stderr.contains("power"), "{stderr}");

    let out = dir.path().join("png");
    let o = pockettune(&["report", run, "--format", "png", "--out", out.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["steps"], 12);
    assert_eq!(v["best_eval_loss"], 2.7);
    assert_eq!(v["paused_s"], 30.0);
    assert_eq!(v["skipped_panels"], serde_json::json!(["power"]));
    let files = v["files"].as_array().unwrap();
    assert_eq!(files.len(), 6);
    assert!(files
        .iter()
        .all(|f| f.as_str().unwrap().ends_with(".png") && Path::new(f.as_str().unwrap()).is_file()));

    let missing = dir.path().join("nowhere");
    let o = pockettune(&["report", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("nowhere") && stderr.contains("no such file or directory"), "{stderr}");
    assert!(o.stdout.is_empty());
}
