//! A non-finite loss or gradient norm, made for real by a learning rate so large that the weights
//! overflow after the first update: `--on-nan stop` (the default) stops the run naming the step
//! and leaves `latest` at the last good checkpoint; `--on-nan skip` skips the updates, counts
//! them, and never writes a checkpoint from a non-finite state. On the CPU path and the GPU.

mod common;

use clap::Parser;
use pockettune::checkpoint;
use pockettune::graph::Device;
use pockettune::models::Model;
use pockettune::train::{train, TrainOptions, TrainSummary};
use pockettune::Error;
use std::path::Path;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    o: TrainOptions,
}

fn options(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> TrainOptions {
    let mut args = vec!["x", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap()];
    args.extend(["--out", out.to_str().unwrap(), "--batch-size", "2", "--seq-len", "16"]);
    args.extend(extra);
    Cli::parse_from(args).o
}

const TEXT: &str = "It was the best of times, it was the worst of times, it was the age of wisdom, \
it was the age of foolishness, it was the epoch of belief, it was the epoch of incredulity, \
it was the season of Light, it was the season of Darkness, it was the spring of hope, \
it was the winter of despair, we had everything before us, we had nothing before us.";

fn setup() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    common::tiny_model_dir(&model, 3);
    let data = tmp.path().join("data.txt");
    std::fs::write(&data, TEXT.repeat(2)).unwrap();
    (tmp, model, data)
}

fn devices() -> Vec<&'static str> {
    let mut d = vec!["cpu"];
    if common::gpu().is_some() {
        d.push("0");
    }
    d
}

/// The step lines of a metrics file.
fn steps(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .collect()
}

fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let (_, store) = Model::load(dir, &Device::CPU_REF).unwrap();
    store.iter().map(|(_, p)| (p.name.clone(), p.value.to_host(&Device::CPU_REF).unwrap())).collect()
}

const STEPS: usize = 5;
/// 1e30 per AdamW update: the first step is finite, the weights then overflow the forward pass.
const HUGE_LR: [&str; 12] = [
    "--lr",
    "1e30",
    "--schedule",
    "constant",
    "--steps",
    "5",
    "--save-every",
    "1",
    "--keep-checkpoints",
    "0",
    "--seed",
    "4",
];

#[test]
fn a_non_finite_loss_stops_the_run_naming_the_step_and_latest_stays_the_last_good_checkpoint() {
    let (tmp, model, data) = setup();
    for spec in devices() {
        let out = tmp.path().join(format!("stop-{spec}"));
        let mut args = HUGE_LR.to_vec();
        args.extend(["--device", spec]);
        let err = train(&options(&model, &data, &out, &args), false).unwrap_err();
        let message = err.to_string();
        let Error::NonFinite { step, what, value, .. } = err else {
            panic!("{spec}: not a NonFinite error: {message}")
        };
        eprintln!("{spec}: {message}");
        assert!(!value.is_finite(), "{spec}: {message}");
        assert!(what == "loss" || what == "gradient norm", "{spec}: {what}");
        assert!(step >= 2, "{spec}: the first step of a sane model is finite: {message}");
        assert!(message.contains(&format!("step {step}")), "{spec}: the message names the step: {message}");

        // The steps before it were taken and saved; `latest` names the one before it, complete and
        // finite; nothing was written for the failed step.
        let good = format!("step-{:06}", step - 1);
        assert!(message.contains(&good), "{spec}: the message names the last good checkpoint: {message}");
        assert_eq!(std::fs::read_to_string(out.join("latest")).unwrap(), good, "{spec}");
        assert!(!out.join(format!("step-{step:06}")).exists(), "{spec}: a checkpoint of the failed step");
        let dir = checkpoint::latest(&out).unwrap().unwrap();
        assert!(weights(&dir).iter().all(|(_, w)| w.iter().all(|x| x.is_finite())), "{spec}");
        let lines = steps(&out);
        assert_eq!(lines.len(), step - 1, "{spec}: one metrics line per step taken");
        assert!(lines
            .iter()
            .all(|l| l["loss"].as_f64().is_some_and(f64::is_finite) && l["skipped_nan"] == 0));

        // --resume from it meets the same step again and stops the same way.
        args.push("--resume");
        let again = train(&options(&model, &data, &out, &args), false).unwrap_err();
        assert!(matches!(again, Error::NonFinite { step: s, .. } if s == step), "{spec}: {again}");
        assert_eq!(std::fs::read_to_string(out.join("latest")).unwrap(), good, "{spec}");
    }
}

#[test]
fn on_nan_skip_skips_the_updates_counts_them_and_keeps_the_last_good_weights() {
    let (tmp, model, data) = setup();
    for spec in devices() {
        let out = tmp.path().join(format!("skip-{spec}"));
        let mut args = HUGE_LR.to_vec();
        args.extend(["--device", spec, "--on-nan", "skip"]);
        let summary = train(&options(&model, &data, &out, &args), false).unwrap();
        assert_eq!(summary.steps, STEPS, "{spec}: the run goes on to the end");
        let lines = steps(&out);
        assert_eq!(lines.len(), STEPS, "{spec}");
        let first_bad = lines
            .iter()
            .position(|l| l["skipped_nan"] != 0)
            .unwrap_or_else(|| panic!("{spec}: no step was skipped: {lines:?}"));
        assert!(first_bad >= 1, "{spec}: the first step of a sane model is finite");
        // Once the weights overflow, every later step is non-finite too and is skipped.
        for (i, l) in lines.iter().enumerate() {
            let skipped = if i >= first_bad { i + 1 - first_bad } else { 0 };
            assert_eq!(l["skipped_nan"], skipped, "{spec}: cumulative count at step {}: {l}", i + 1);
            let finite = l["loss"].as_f64().is_some_and(f64::is_finite)
                && l["grad_norm"].as_f64().is_some_and(f64::is_finite);
            assert_eq!(finite, i < first_bad, "{spec}: step {}: {l}", i + 1);
        }
        assert_eq!(summary.skipped_nan, STEPS - first_bad, "{spec}: the summary counts them");

        // No update after the last good step: every later checkpoint holds its weights, finite,
        // with the AdamW step count of the updates actually applied.
        let good = weights(&out.join(format!("step-{first_bad:06}")));
        assert!(good.iter().all(|(_, w)| w.iter().all(|x| x.is_finite())), "{spec}");
        for step in first_bad + 1..=STEPS {
            let dir = out.join(format!("step-{step:06}"));
            assert!(weights(&dir) == good, "{spec}: step {step} changed the weights");
            let state: checkpoint::TrainState =
                serde_json::from_str(&std::fs::read_to_string(dir.join("state.json")).unwrap()).unwrap();
            assert_eq!(
                (state.adam_step as usize, state.skipped_nan),
                (first_bad, step - first_bad),
                "{spec}"
            );
        }
        assert_eq!(std::fs::read_to_string(out.join("latest")).unwrap(), format!("step-{STEPS:06}"));
    }
}

/// At 1e4 per update the loss stays finite (1e12 and more) while the gradients outgrow f32 a step
/// or two later (the sum of their squares overflows, or the backward pass makes NaN). With and
/// without clipping.
#[test]
fn a_non_finite_gradient_norm_under_a_finite_loss_stops_or_is_skipped_too() {
    let (tmp, model, data) = setup();
    for spec in devices() {
        for clip in ["0", "1"] {
            let args = |out: &str, on_nan: &'static str| {
                let out = tmp.path().join(format!("{out}-{spec}-{clip}"));
                let extra = [
                    "--lr",
                    "1e4",
                    "--schedule",
                    "constant",
                    "--steps",
                    "4",
                    "--save-every",
                    "1",
                    "--max-grad-norm",
                    clip,
                    "--device",
                    spec,
                    "--on-nan",
                    on_nan,
                ];
                (options(&model, &data, &out, &extra), out)
            };
            let (o, out) = args("stop", "stop");
            let err = train(&o, false).unwrap_err();
            let Error::NonFinite { step, ref what, value, .. } = err else { panic!("{spec}: {err}") };
            assert!(what == "gradient norm" && !value.is_finite(), "{spec} clip {clip}: {err}");
            assert!(step >= 2, "{spec} clip {clip}: {err}");
            assert_eq!(std::fs::read_to_string(out.join("latest")).unwrap(), format!("step-{:06}", step - 1));

            let (o, out) = args("skip", "skip");
            let summary = train(&o, false).unwrap();
            assert!(summary.skipped_nan >= 1, "{spec} clip {clip}");
            let line = &steps(&out)[step - 1];
            assert_eq!(line["skipped_nan"], 1, "{spec} clip {clip}: {line}");
            assert!(line["loss"].as_f64().is_some_and(f64::is_finite), "{spec} clip {clip}: {line}");
            assert!(line["grad_norm"].is_null(), "{spec} clip {clip}: {line}");
        }
    }
}

/// The last line of defence: whatever the loop checked, `checkpoint::save` refuses a state with a
/// non-finite weight and leaves `latest` alone.
#[test]
fn a_checkpoint_is_never_written_from_non_finite_weights() {
    let (tmp, model_dir, _) = setup();
    let out = tmp.path().join("out");
    let (_, mut store) = Model::load(&model_dir, &Device::CPU_REF).unwrap();
    let state = checkpoint::TrainState {
        step: 1,
        adam_step: 0,
        epoch: 0,
        batch_index: 1,
        seed: 0,
        tokens_seen: 32,
        skipped_nan: 0,
    };
    checkpoint::save(&out, &model_dir, &store, &state, None).unwrap();
    let (id, p) = store.iter().nth(3).unwrap();
    let (name, mut w) = (p.name.clone(), p.value.to_host(&Device::CPU_REF).unwrap());
    w[1] = f32::INFINITY;
    store.set_value(id, &w).unwrap();
    let err = checkpoint::save(&out, &model_dir, &store, &checkpoint::TrainState { step: 2, ..state }, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("step 2") && err.contains(&name) && err.contains("inf"), "{err}");
    assert_eq!(std::fs::read_to_string(out.join("latest")).unwrap(), "step-000001");
    let names: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 2, "only step-000001 and latest: {names:?}");
}

/// A step's outcome is read one step behind when nothing waits on it (no checkpoint or
/// evaluation at that step; the GPU then decides the skip itself): the same losses, norms,
/// skips, AdamW step count and weights as reading each at once, and `--on-nan stop` names the
/// same step.
#[test]
fn reading_each_steps_outcome_one_step_behind_changes_nothing() {
    let (tmp, model, data) = setup();
    for spec in devices() {
        let run = |save_every: &'static str, on_nan: &'static str| {
            let out = tmp.path().join(format!("behind-{spec}-{save_every}-{on_nan}"));
            let mut args = HUGE_LR.to_vec();
            let at = args.iter().position(|a| *a == "--save-every").unwrap() + 1;
            args[at] = save_every;
            args.extend(["--device", spec, "--on-nan", on_nan]);
            (train(&options(&model, &data, &out, &args), false), out)
        };
        let ((now, now_out), (behind, behind_out)) = (run("1", "skip"), run("0", "skip"));
        let (now, behind) = (now.unwrap(), behind.unwrap());
        assert!(now.skipped_nan >= 1, "{spec}: the run has a non-finite step to skip");
        assert_eq!((now.skipped_nan, now.steps), (behind.skipped_nan, behind.steps), "{spec}");
        let fields = |out: &Path| {
            steps(out)
                .iter()
                .map(|l| ["step", "loss", "grad_norm", "skipped_nan", "lr", "tokens"].map(|k| l[k].clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(fields(&now_out), fields(&behind_out), "{spec}: the metrics lines");
        let last = format!("step-{:06}", 5);
        assert!(weights(&now_out.join(&last)) == weights(&behind_out.join(&last)), "{spec}: the weights");
        let state = |out: &Path| {
            let json = std::fs::read_to_string(out.join(&last).join("state.json")).unwrap();
            serde_json::from_str::<checkpoint::TrainState>(&json).unwrap().adam_step
        };
        assert_eq!(state(&now_out), state(&behind_out), "{spec}: AdamW's step count");

        let step_of = |r: Result<TrainSummary, Error>| match r {
            Err(Error::NonFinite { step, .. }) => step,
            other => panic!("{spec}: not a NonFinite error: {:?}", other.map(|_: TrainSummary| ())),
        };
        assert_eq!(
            step_of(run("1", "stop").0),
            step_of(run("0", "stop").0),
            "{spec}: the step --on-nan stop names"
        );
    }
}
