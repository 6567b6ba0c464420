//! Resume is proven, not assumed. The `pockettune` binary trains a tiny GPT-2 and is killed with
//! SIGKILL at seeded random moments: half of the kills at a random delay after the run has
//! written its next checkpoint, half while a checkpoint is being written
//! (`POCKETTUNE_TEST_SLOW_CHECKPOINT_MS` pauses between its files so that the window is wide).
//! After every kill `OUT/latest` must name a complete checkpoint (every file present and
//! loadable); each run continues with `--resume` until one finishes. Then the metrics file must
//! hold every step exactly once with the values of an uninterrupted run (loss, learning rate,
//! gradient norm, tokens, evaluations), and the final checkpoint must hold the same weights and
//! moments, byte for byte.

mod common;

use pockettune::checkpoint;
use pockettune::data::Tokenizer;
use pockettune::graph::Device;
use pockettune::models::Model;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

const BIN: &str = env!("CARGO_BIN_EXE_pockettune");
const SLOW_MS: u64 = 40;

const TEXT: &str = "It was the best of times, it was the worst of times, it was the age of wisdom, \
it was the age of foolishness, it was the epoch of belief, it was the epoch of incredulity, \
it was the season of Light, it was the season of Darkness, it was the spring of hope, \
it was the winter of despair, we had everything before us, we had nothing before us.";

struct Setup {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    model: PathBuf,
    data: PathBuf,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let model = root.join("model");
    common::tiny_model_dir(&model, 11);
    // Little data, so that 12 steps of 2 micro-batches cross several epochs (shuffled anew).
    let data = root.join("data.txt");
    std::fs::write(&data, TEXT).unwrap();
    Setup { _tmp: tmp, root, model, data }
}

/// `pockettune train` on the setup, stderr to `log`.
fn train(s: &Setup, out: &Path, device: &str, resume: bool, log: &Path) -> Child {
    let mut cmd = Command::new(BIN);
    cmd.env("POCKETTUNE_MATMUL_AUTOTUNE", "off"); // the user's cache stays untouched
    cmd.arg("train").args(["--model", s.model.to_str().unwrap(), "--data", s.data.to_str().unwrap()]);
    cmd.args(["--out", out.to_str().unwrap(), "--device", device]);
    cmd.args(["--steps", "12", "--batch-size", "2", "--seq-len", "16", "--grad-accum", "2"]);
    cmd.args(["--lr", "1e-2", "--warmup", "2", "--shuffle", "--seed", "5"]);
    cmd.args(["--eval-fraction", "0.2", "--eval-every", "4", "--eval-batches", "2"]);
    cmd.args(["--save-every", "2", "--keep-checkpoints", "2"]);
    if resume {
        cmd.arg("--resume");
    }
    cmd.env("POCKETTUNE_TEST_SLOW_CHECKPOINT_MS", SLOW_MS.to_string());
    cmd.stdout(Stdio::null()).stderr(std::fs::File::create(log).unwrap());
    cmd.spawn().expect("the pockettune binary starts")
}

fn assert_success(status: ExitStatus, log: &Path) {
    assert!(status.success(), "training failed ({status}):\n{}", std::fs::read_to_string(log).unwrap());
}

/// The metrics lines without the fields that measure time and memory.
fn metrics(out: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let mut v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("metrics line {l:?}: {e}"));
            let o = v.as_object_mut().unwrap();
            for k in ["ms_step", "tokens_per_s", "rss_bytes", "peak_rss_bytes", "gpu_bytes", "elapsed_s"] {
                o.remove(k);
            }
            v
        })
        .collect()
}

/// The same lines (each step once, in order) with the same values.
fn assert_same_metrics(got: &[serde_json::Value], want: &[serde_json::Value], context: &str) {
    let order = |lines: &[serde_json::Value]| -> Vec<String> {
        lines
            .iter()
            .map(|l| format!("{}{}", l["step"], if l.get("eval_loss").is_some() { "e" } else { "" }))
            .collect()
    };
    assert_eq!(order(got), order(want), "{context}: metrics lines (step, e = evaluation)");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g, w, "{context}: metrics line differs from the uninterrupted run's");
    }
}

/// `latest` names a complete checkpoint: every file present and loadable, its state at the step
/// its name says. Returns that step (None before the first checkpoint).
fn assert_latest_complete(out: &Path, context: &str) -> Option<usize> {
    let dir = checkpoint::latest(out).unwrap_or_else(|e| panic!("{context}: {e}"))?;
    for f in ["config.json", "tokenizer.json", "model.safetensors", "optimizer.safetensors", "state.json"] {
        assert!(dir.join(f).is_file(), "{context}: {} lacks {f}", dir.display());
    }
    let (_, mut store) = Model::load(&dir, &Device::CPU_REF)
        .unwrap_or_else(|e| panic!("{context}: weights of {}: {e}", dir.display()));
    Tokenizer::load(&dir.join("tokenizer.json")).unwrap_or_else(|e| panic!("{context}: {e}"));
    let state = checkpoint::restore(&dir, &mut store).unwrap_or_else(|e| panic!("{context}: {e}"));
    assert_eq!(dir.file_name().unwrap().to_str().unwrap(), format!("step-{:06}", state.step), "{context}");
    assert_eq!(state.adam_step as usize, state.step, "{context}: every step so far updated the weights");
    Some(state.step)
}

/// Temporary files and directories of interrupted writes under `out`.
fn debris(out: &Path) -> Vec<String> {
    std::fs::read_dir(out)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.ends_with(".tmp") || n.ends_with(".old"))
                .collect()
        })
        .unwrap_or_default()
}

/// The temporary directories of checkpoint writes under `out`: (step, last modified).
fn checkpoint_writes(out: &Path) -> Vec<(usize, SystemTime)> {
    debris(out)
        .iter()
        .filter_map(|n| {
            let step = n.strip_prefix(".step-")?.strip_suffix(".tmp")?.parse().ok()?;
            Some((step, std::fs::metadata(out.join(n)).ok()?.modified().ok()?))
        })
        .collect()
}

/// Whether a checkpoint write of step `from` or later is under way (or was cut short), one that
/// was not there in `before`.
fn writing_checkpoint(out: &Path, before: &[(usize, SystemTime)], from: usize) -> bool {
    checkpoint_writes(out).iter().any(|w| w.0 >= from && !before.contains(w))
}

/// The step of the checkpoint `out/latest` names (0 before the first).
fn latest_step(out: &Path) -> usize {
    let dir = checkpoint::latest(out).ok().flatten();
    let name = dir.as_ref().and_then(|d| d.file_name()?.to_str()?.strip_prefix("step-")?.parse().ok());
    name.unwrap_or(0)
}

/// Kill runs on `device` `kills` times, resuming each time, then let the last run finish; compare
/// with an uninterrupted run.
fn kill_and_resume(device: &str, kills: usize, seed: u64) {
    let s = setup();
    let reference = s.root.join("reference");
    let t0 = Instant::now();
    let log = s.root.join("reference.log");
    let mut child = train(&s, &reference, device, false, &log);
    // How long the start takes (to the first metrics line), and the steps after it.
    let first_line = reference.join("metrics.jsonl");
    while std::fs::metadata(&first_line).map_or(true, |m| m.len() == 0) && child.try_wait().unwrap().is_none()
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    let start_time = t0.elapsed();
    assert_success(child.wait().unwrap(), &log);
    let train_time = t0.elapsed() - start_time;
    let want = metrics(&reference);
    assert_eq!(want.iter().filter(|l| l.get("loss").is_some()).count(), 12, "{device}: 12 steps");

    let out = s.root.join("killed");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut killed, mut in_checkpoint, mut done) = (0, 0, None);
    let mut latest_after_kills = Vec::new();
    for attempt in 0..=kills {
        let log = s.root.join(format!("attempt-{attempt}.log"));
        let before = checkpoint_writes(&out);
        let mut child = train(&s, &out, device, done.is_some(), &log);
        if attempt == kills {
            assert_success(child.wait().unwrap(), &log);
            break;
        }
        // A kill inside a checkpoint write lands within the next `reach` steps (two
        // checkpoints), so that the kills spread over the run.
        let reach = (12 - done.unwrap_or(0)).min(4);
        let finished = if attempt % 2 == 0 {
            // Once the run has written its next checkpoint (so that each such kill leaves one
            // mid-run to resume from), anywhere in about two steps after it. Found by the run's
            // own progress, not by a clock: on a loaded machine a run goes at half or twice the
            // reference run's pace, and clock-timed kills landed after the run had ended.
            let from = done.unwrap_or(0);
            let within = (train_time / 6).mul_f64(rng.random_range(0.0..1.0));
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break Some(status);
                }
                if latest_step(&out) > from {
                    std::thread::sleep(within);
                    break child.try_wait().unwrap();
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        } else {
            // Inside the write of one of the checkpoints in reach (every 2 steps), once its
            // temporary directory appears (it lives through at least 5 pauses of SLOW_MS, so a
            // kill within 4 of them lands inside).
            let target = done.unwrap_or(0) + 2 * rng.random_range(1..=(reach / 2).max(1));
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break Some(status);
                }
                if writing_checkpoint(&out, &before, target) {
                    std::thread::sleep(Duration::from_millis(rng.random_range(0..4 * SLOW_MS)));
                    break child.try_wait().unwrap();
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        if let Some(status) = finished {
            // The run ended before the kill: it must have finished training, not failed.
            assert_success(status, &log);
            break;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        killed += 1;
        let context = format!("{device}: after kill {attempt}");
        in_checkpoint += writing_checkpoint(&out, &before, 0) as usize;
        let step = assert_latest_complete(&out, &context);
        if let Some(prev) = done {
            let step = step.unwrap_or_else(|| panic!("{context}: `latest` is gone"));
            assert!(step >= prev, "{context}: latest went back from step {prev} to {step}");
        }
        latest_after_kills.push(step);
        done = step;
    }
    eprintln!(
        "{device}: {killed} kills ({in_checkpoint} inside a checkpoint write); latest after each: \
         {latest_after_kills:?}"
    );
    assert!(killed >= kills / 2, "{device}: the runs finished before they could be killed");
    assert!(in_checkpoint >= 1, "{device}: no kill landed inside a checkpoint write");
    assert!(
        latest_after_kills.iter().any(|s| s.is_some_and(|s| s > 0 && s < 12)),
        "{device}: no kill left a checkpoint mid-run to resume from"
    );

    assert_same_metrics(&metrics(&out), &want, device);
    assert_eq!(assert_latest_complete(&out, device), Some(12));
    for f in ["model.safetensors", "optimizer.safetensors", "state.json"] {
        let (a, b) = (reference.join("step-000012").join(f), out.join("step-000012").join(f));
        assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(), "{device}: final {f} differs");
    }
    assert_eq!(debris(&out), Vec::<String>::new(), "{device}: temporary files left behind");
    let mut dirs: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("step-"))
        .collect();
    dirs.sort();
    assert_eq!(dirs, ["step-000010", "step-000012"], "{device}: --keep-checkpoints 2");
}

#[test]
fn sigkill_at_random_moments_then_resume_equals_one_run_on_cpu() {
    kill_and_resume("cpu", 8, 1);
}

#[test]
fn sigkill_at_random_moments_then_resume_equals_one_run_on_gpu() {
    if common::gpu().is_none() {
        return;
    }
    kill_and_resume("0", 4, 2);
}

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    o: pockettune::train::TrainOptions,
}

fn options(s: &Setup, out: &Path, extra: &[&str]) -> pockettune::train::TrainOptions {
    use clap::Parser;
    let mut args = vec!["x", "--model", s.model.to_str().unwrap(), "--data", s.data.to_str().unwrap()];
    args.extend(["--out", out.to_str().unwrap(), "--batch-size", "2", "--seq-len", "16", "--lr", "1e-2"]);
    args.extend(["--steps", "6", "--save-every", "3", "--shuffle", "--device", "cpu"]);
    args.extend(extra);
    Cli::parse_from(args).o
}

/// Regression: a resumed run appended to metrics.jsonl, so the steps between its checkpoint and
/// the interruption were there twice (and a line cut short by a kill stayed in the middle).
#[test]
fn resume_drops_the_metrics_lines_written_after_its_checkpoint() {
    let s = setup();
    let out = s.root.join("out");
    pockettune::train::train(&options(&s, &out, &[]), false).unwrap();
    let want = metrics(&out);
    // Interrupted after step 5, in the middle of writing line 6; the last checkpoint is step 3.
    let path = out.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[5].contains("\"step\":6"), "{text}");
    std::fs::write(&path, format!("{}\n{}", lines[..5].join("\n"), &lines[5][..20])).unwrap();
    std::fs::write(out.join("latest"), "step-000003").unwrap();
    pockettune::train::train(&options(&s, &out, &["--resume"]), false).unwrap();
    assert_same_metrics(&metrics(&out), &want, "resumed from step 3");

    // A run without --resume starts the file afresh.
    pockettune::train::train(&options(&s, &out, &[]), false).unwrap();
    assert_same_metrics(&metrics(&out), &want, "a fresh run in the same directory");
}

/// Regression: a checkpoint was written file by file into its final directory, so a kill left
/// a half-written `step-NNNNNN` (which pruning then counted as a checkpoint) and saving a step
/// again mixed new files with old ones. Now a step directory is renamed into place complete,
/// and what an interrupted write leaves is cleared.
#[test]
fn a_checkpoint_directory_is_complete_or_absent_and_debris_is_cleared() {
    let s = setup();
    let out = s.root.join("out");
    pockettune::train::train(&options(&s, &out, &["--keep-checkpoints", "1"]), false).unwrap();
    let want = std::fs::read(out.join("step-000006/model.safetensors")).unwrap();
    // Debris of a write killed half-way, and an older step-000006 with a file of its own.
    std::fs::create_dir_all(out.join(".step-000003.tmp")).unwrap();
    std::fs::write(out.join(".step-000003.tmp/model.safetensors"), "half").unwrap();
    std::fs::write(out.join("step-000006/stale.txt"), "from another run").unwrap();
    pockettune::train::train(&options(&s, &out, &["--keep-checkpoints", "1"]), false).unwrap();
    assert_eq!(debris(&out), Vec::<String>::new());
    assert!(!out.join("step-000006/stale.txt").exists(), "step-000006 was replaced as a whole");
    assert!(std::fs::read(out.join("step-000006/model.safetensors")).unwrap() == want);
    assert_eq!(assert_latest_complete(&out, "after a second run"), Some(6));
    let mut names: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["latest", "metrics.jsonl", "step-000006"]);
}

/// Regression (seen once in CI): a kill after the last checkpoint's `latest` was written but
/// before the pruning after it left one checkpoint too many, and the resumed run, with no step
/// left to train, wrote no checkpoint that would prune it. A kill during a deletion must not
/// leave a half-deleted `step-NNNNNN` either.
#[test]
fn a_resume_at_the_last_step_finishes_the_pruning_a_kill_interrupted() {
    let s = setup();
    let out = s.root.join("out");
    pockettune::train::train(&options(&s, &out, &["--keep-checkpoints", "0"]), false).unwrap();
    // Three complete checkpoints (as if the pruning after step 6 never ran), a deletion cut
    // short (a step without its state.json), and one renamed for deletion but not yet gone.
    for step in [1, 2] {
        let dir = out.join(format!("step-00000{step}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in std::fs::read_dir(out.join("step-000003")).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
        }
    }
    std::fs::remove_file(out.join("step-000001/state.json")).unwrap();
    std::fs::create_dir_all(out.join(".step-000000.old")).unwrap();
    // a directory of the user's own whose name only starts like a checkpoint's stays
    std::fs::create_dir_all(out.join("step-notes")).unwrap();
    let resumed =
        pockettune::train::train(&options(&s, &out, &["--keep-checkpoints", "2", "--resume"]), false)
            .unwrap();
    assert!(resumed.losses.is_empty(), "nothing left to train: {:?}", resumed.losses);
    assert_eq!(debris(&out), Vec::<String>::new());
    let mut names: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["latest", "metrics.jsonl", "step-000003", "step-000006", "step-notes"]);
    assert_eq!(assert_latest_complete(&out, "after the resume"), Some(6));
}

/// LoRA checkpoints (a PEFT adapter plus the optimizer state) go through the same write and
/// resume exactly too.
#[test]
fn lora_checkpoints_are_complete_and_resume_exactly() {
    let s = setup();
    let out = s.root.join("lora");
    let lora = ["--method", "lora", "--lora-rank", "4"];
    let full = pockettune::train::train(&options(&s, &out, &lora), false).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "state.json"] {
        assert!(out.join("step-000003").join(f).is_file(), "step-000003 lacks {f}");
    }
    std::fs::write(out.join("latest"), "step-000003").unwrap();
    let resumed =
        pockettune::train::train(&options(&s, &out, &[&lora[..], &["--resume"]].concat()), false).unwrap();
    assert_eq!(resumed.losses, full.losses[3..], "resumed LoRA losses equal the uninterrupted run's");
    assert_eq!(debris(&out), Vec::<String>::new());
}
