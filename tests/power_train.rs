//! The power policies inside `train` (issue 11): a trace-driven run throttles exactly on the
//! steps below the threshold or above the temperature limit, a critical battery writes a
//! checkpoint and pauses (or stops with status 3), the paused or stopped run gives the losses of
//! an uninterrupted one, and a run killed while it waits leaves a checkpoint it resumes from.
//!
//! Runs go through the binary on the CPU path (`--device cpu`: deterministic and quick), with
//! traces written by each test (and the shipped `examples/battery-drain.csv`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

struct Run {
    tmp: tempfile::TempDir,
    model: PathBuf,
    data: PathBuf,
}

fn setup() -> Run {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = (tmp.path().join("model"), tmp.path().join("data.txt"));
    common::tiny_model_dir(&model, 9);
    std::fs::write(&data, "a b c d e f g h i j k l m n o p q r s t u v w x y z ".repeat(30)).unwrap();
    Run { tmp, model, data }
}

impl Run {
    fn cmd(&self, out: &str, steps: usize, extra: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pockettune"));
        cmd.args(["train", "--device", "cpu", "--model"]).arg(&self.model).arg("--data").arg(&self.data);
        cmd.arg("--out").arg(self.tmp.path().join(out));
        cmd.args([
            "--steps",
            &steps.to_string(),
            "--batch-size",
            "2",
            "--seq-len",
            "8",
            "--save-every",
            "100",
        ]);
        cmd.args(["--power-poll", "0.01"]).args(extra);
        cmd
    }
    fn train(&self, out: &str, steps: usize, extra: &[&str]) -> Output {
        self.cmd(out, steps, extra).output().unwrap()
    }
    fn trace(&self, name: &str, rows: &str) -> String {
        let path = self.tmp.path().join(name);
        std::fs::write(&path, format!("step,percent,charging,temp_c\n{rows}")).unwrap();
        format!("trace:{}", path.display())
    }
    fn steps(&self, out: &str) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.tmp.path().join(out).join("metrics.jsonl")).unwrap();
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v.get("loss").is_some())
            .collect()
    }
    fn dir(&self, out: &str) -> PathBuf {
        self.tmp.path().join(out)
    }
}

fn ok(o: &Output) -> String {
    let text = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{text}");
    text
}

fn losses(steps: &[serde_json::Value]) -> Vec<f64> {
    steps.iter().map(|s| s["loss"].as_f64().unwrap()).collect()
}

fn column(steps: &[serde_json::Value], name: &str) -> Vec<f64> {
    steps.iter().map(|s| s[name].as_f64().unwrap_or_else(|| panic!("{name} in {s}"))).collect()
}

#[test]
fn a_trace_throttles_exactly_below_the_threshold_and_above_the_temperature() {
    let r = setup();
    // step: 1 80 %, 3 exactly 60 %, 4 59.5 %, 6 charging (battery rules off), 7 hot (46 > 45),
    // 8 44 (not 2 degrees below), 9 43 (back)
    let rows = "1,80,false,30\n3,60,false,30\n4,59.5,false,30\n6,50,true,30\n7,50,true,46\n8,50,true,44\n9,50,true,43\n";
    let source = r.trace("t.csv", rows);
    let text = ok(&r.train("out", 9, &["--power-source", &source, "--throttle-duty", "0.5"]));
    let steps = r.steps("out");
    let duty = column(&steps, "duty");
    assert_eq!(duty, [1.0, 1.0, 1.0, 0.5, 0.5, 1.0, 0.5, 0.5, 1.0], "{text}");
    let throttle = column(&steps, "throttle_ms");
    for (k, (&d, &t)) in duty.iter().zip(&throttle).enumerate() {
        // a duty of 0.5 sleeps as long as the step worked
        assert_eq!(t > 0.0, d < 1.0, "step {}: duty {d}, throttled {t} ms", k + 1);
        if d < 1.0 {
            let busy = steps[k]["ms_step"].as_f64().unwrap() - t;
            assert!(t >= 0.9 * busy, "step {}: slept {t} ms for {busy} ms of work", k + 1);
        }
    }
    assert_eq!(column(&steps, "battery_pct"), [80.0, 80.0, 60.0, 59.5, 59.5, 50.0, 50.0, 50.0, 50.0]);
    assert_eq!(steps[5]["charging"], true);
    assert_eq!(column(&steps, "temp_c")[6], 46.0);
    assert!(steps.iter().all(|s| s["paused_ms"].as_f64() == Some(0.0) && s["elapsed_s"].as_f64().is_some()));
    // the same losses as an unthrottled run: the policy changes when work runs, not what it computes
    ok(&r.train("plain", 9, &["--power-source", "none"]));
    assert_eq!(losses(&steps), losses(&r.steps("plain")));
}

#[test]
fn a_critical_battery_checkpoints_pauses_and_goes_on_with_the_same_losses() {
    let r = setup();
    // critical at step 4; two polls unplugged, then the charger
    let rows = "1,40,false,30\n4,10,false,30\n4,10,false,30\n4,10,false,30\n4,11,true,30\n";
    let source = r.trace("t.csv", rows);
    let text = ok(&r.train("out", 6, &["--power-source", &source, "--power-threshold", "0"]));
    assert!(text.contains("paused") && text.contains("step-000003"), "{text}");
    assert!(r.dir("out/step-000003").is_dir(), "the pause wrote a checkpoint");
    let steps = r.steps("out");
    let paused = column(&steps, "paused_ms");
    assert!(paused[3] > 0.0 && paused.iter().enumerate().all(|(k, &p)| k == 3 || p == 0.0), "{paused:?}");
    ok(&r.train("plain", 6, &["--power-source", "none"]));
    assert_eq!(losses(&steps), losses(&r.steps("plain")));
}

#[test]
fn on_critical_stop_exits_3_with_a_checkpoint_that_resumes_exactly() {
    let r = setup();
    let source = r.trace("t.csv", "1,40,false,30\n4,10,false,30\n");
    let o = r.train("out", 6, &["--power-source", &source, "--on-critical", "stop"]);
    let text = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{text}");
    assert!(
        text.contains("before step 4") && text.contains("--resume") && text.contains("step-000003"),
        "{text}"
    );
    let resumed = r.train("out", 6, &["--power-source", "none", "--resume"]);
    ok(&resumed);
    ok(&r.train("plain", 6, &["--power-source", "none"]));
    assert_eq!(losses(&r.steps("out")), losses(&r.steps("plain")));
}

/// Killed while it waits for the charger: the checkpoint the pause wrote loads, and the resumed
/// run gives the uninterrupted run's losses.
#[test]
fn a_run_killed_during_a_pause_resumes_from_its_checkpoint() {
    let r = setup();
    let source = r.trace("t.csv", "1,40,false,30\n3,10,false,30\n");
    let mut child = r
        .cmd("out", 5, &["--power-source", &source, "--power-poll", "0.05"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let latest = r.dir("out/latest");
    let t0 = std::time::Instant::now();
    while !std::fs::read_to_string(&latest).is_ok_and(|s| s.trim() == "step-000002") {
        assert!(t0.elapsed().as_secs() < 120, "no checkpoint before the pause");
        assert!(child.try_wait().unwrap().is_none(), "the run ended instead of pausing");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(200)); // well into the wait
    assert!(child.try_wait().unwrap().is_none(), "still paused");
    child.kill().unwrap();
    child.wait().unwrap();
    ok(&r.train("out", 5, &["--power-source", "none", "--resume"]));
    ok(&r.train("plain", 5, &["--power-source", "none"]));
    assert_eq!(losses(&r.steps("out")), losses(&r.steps("plain")));
}

/// The README's worked example: the shipped trace over its 40 steps with the default policies.
#[test]
fn the_shipped_trace_runs_with_the_default_policies() {
    let r = setup();
    let trace = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/battery-drain.csv");
    let source = format!("trace:{}", trace.display());
    let text = ok(&r.train("out", 40, &["--power-source", &source, "--throttle-duty", "0.8"]));
    let steps = r.steps("out");
    let duty = column(&steps, "duty");
    let near = |d: f64, want: f64| (d - want).abs() < 1e-6; // an f32 in the JSON
    assert_eq!(duty[10], 1.0, "step 11 at exactly 60 %: {text}");
    assert!(near(duty[11], 0.8), "step 12 at 59 %: {}", duty[11]);
    assert!(column(&steps, "paused_ms")[30] > 0.0, "the critical pause at step 31");
    assert!(r.dir("out/step-000030").is_dir());
    assert_eq!(duty[33], 1.0, "charging at 38 degrees: full speed");
    assert!(near(duty[36], 0.8), "charging but 46 degrees: {}", duty[36]);
    assert_eq!(duty[39], 1.0, "42.5 degrees: back to full speed");
}
