//! The `pockettune` binary as a user runs it: --config files with command-line overrides,
//! JSON on stdout, clear errors and exit codes.

mod common;

use std::process::Command;

fn bin() -> Command {
    // no matmul autotune: tests neither read nor write the user's cache
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pockettune"));
    cmd.env("POCKETTUNE_MATMUL_AUTOTUNE", "off");
    cmd
}

#[test]
fn train_options_come_from_a_toml_file_and_the_command_line_wins() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    common::tiny_model_dir(&model, 3);
    let data = tmp.path().join("data.txt");
    std::fs::write(&data, "a b c d e f g h i j k l m n o p q r s t u v w x y z ".repeat(20)).unwrap();
    let config = tmp.path().join("run.toml");
    let out = tmp.path().join("out");
    std::fs::write(
        &config,
        format!(
            "model = {:?}\ndata = {:?}\nout = {:?}\nsteps = 2\nbatch_size = 2\nseq_len = 16\nshuffle = true\ndevice = \"cpu\"\n",
            model.to_str().unwrap(),
            data.to_str().unwrap(),
            out.to_str().unwrap()
        ),
    )
    .unwrap();
    let run = |extra: &[&str]| {
        let o = bin()
            .args(["train", "--config", config.to_str().unwrap(), "--json"])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "train failed: {}", String::from_utf8_lossy(&o.stderr));
        let summary: serde_json::Value =
            serde_json::from_slice(&o.stdout).expect("stdout is one JSON document");
        summary["steps"].as_u64().unwrap()
    };
    assert_eq!(run(&[]), 2, "steps from the file");
    assert_eq!(
        run(&["--steps", "3", "--out", tmp.path().join("out2").to_str().unwrap()]),
        3,
        "command line wins"
    );
}

/// Regression: `--config=run.toml` (one argument) was not recognised, so the file was ignored
/// and train failed for want of --model and --data.
#[test]
fn train_config_given_with_equals_sign_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    common::tiny_model_dir(&model, 3);
    let data = tmp.path().join("data.txt");
    std::fs::write(&data, "a b c d e f g h i j k l m n o p q r s t u v w x y z ".repeat(20)).unwrap();
    let config = tmp.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            "model = {:?}\ndata = {:?}\nout = {:?}\nsteps = 2\nbatch_size = 2\nseq_len = 16\ndevice = \"cpu\"\n",
            model.to_str().unwrap(),
            data.to_str().unwrap(),
            tmp.path().join("out").to_str().unwrap()
        ),
    )
    .unwrap();
    let o = bin().args(["train", &format!("--config={}", config.display()), "--json"]).output().unwrap();
    assert!(o.status.success(), "train failed: {}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).expect("stdout is one JSON document");
    assert_eq!(summary["steps"], 2, "steps from the file");

    // A --config anywhere but after `train` is refused by clap, not read.
    let o = bin().args(["eval", &format!("--config={}", config.display())]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unexpected argument '--config"));
}

/// Regression: `eval --batch-size 0` divided by zero (a panic, exit 101) and `generate
/// --temperature nan` panicked in the random draw; their siblings (zero sizes and counts,
/// negative temperature, top-p outside (0, 1]) were taken as given. Each is now refused with
/// exit 2 and a message naming the option, before any device or model is opened.
#[test]
fn zero_sizes_and_bad_sampling_settings_are_refused_naming_the_option() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    common::tiny_model_dir(&model, 3);
    let data = tmp.path().join("data.txt");
    std::fs::write(&data, "a b c d e f g h i j k l m n o p q r s t u v w x y z ".repeat(20)).unwrap();
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    let eval = ["eval", "--model", m, "--data", d, "--device", "cpu", "--seq-len", "16"];
    let generate = ["generate", "--model", m, "--prompt", "ab", "--device", "cpu"];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        ([&eval[..], &["--batch-size", "0"]].concat(), "--batch-size"),
        ([&eval[..], &["--seq-len", "0"]].concat(), "--seq-len"),
        ([&eval[..], &["--max-batches", "0"]].concat(), "--max-batches"),
        ([&generate[..], &["--temperature", "nan"]].concat(), "--temperature"),
        ([&generate[..], &["--temperature=-1"]].concat(), "--temperature"),
        ([&generate[..], &["--top-p", "0"]].concat(), "--top-p"),
        ([&generate[..], &["--top-p", "1.5"]].concat(), "--top-p"),
        ([&generate[..], &["--max-tokens", "0"]].concat(), "--max-tokens"),
        (vec!["bench", "step", "--preset", "tiny", "--batch-size", "0"], "--batch-size"),
        (vec!["bench", "step", "--preset", "tiny", "--steps", "0"], "--steps"),
        (vec!["bench", "kernels", "--rows", "0"], "--rows"),
    ];
    for (args, flag) in cases {
        let o = bin().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(&format!("error: invalid argument {flag}: ")), "{args:?}: {err}");
    }

    // Fewer windows than one batch: the error names the data file (it said "eval data").
    let o = bin().args([&eval[..], &["--batch-size", "100"]].concat()).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("{d}: ")) && err.contains("fewer than one batch of 100"), "{err}");
}

#[test]
fn errors_exit_nonzero_and_say_what_is_wrong() {
    let o = bin()
        .args(["train", "--model", "/no/such/model", "--data", "/no/such.txt", "--device", "cpu"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    // the path as given, before any device is opened or any kernel timed
    assert!(err.contains("/no/such/model: no such file or directory (given as --model)"), "{err}");
    assert!(!err.contains("matmul kernel"), "the kernels were timed before the path was checked: {err}");

    let o = bin().args(["gradcheck", "--kernel", "nope"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown kernel \"nope\""));
}

/// Regression: on a headless machine every command printed "error: XDG_RUNTIME_DIR is invalid
/// or not set in the environment" (twice per GPU listing: Mesa's device-select layer reaching
/// for a Wayland server because wgpu enabled the window-system surface extensions) before its
/// own output. A successful `info` prints no error line.
#[test]
fn info_on_a_headless_machine_prints_no_error_lines() {
    let o = bin().arg("info").env_remove("XDG_RUNTIME_DIR").env_remove("WAYLAND_DISPLAY").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    if !o.status.success() {
        assert!(std::env::var_os("CI").is_none(), "CI is set and `info` failed: {err}");
        eprintln!("skipping: `info` found no usable adapter: {err}");
        return;
    }
    assert!(err.contains("chosen:"), "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.trim_start().starts_with("error:")).collect();
    assert!(errors.is_empty(), "error lines on a successful run: {errors:?}\n{err}");
}

#[test]
fn gradcheck_json_reports_every_row() {
    if common::gpu().is_none() {
        return;
    }
    let o = bin().args(["gradcheck", "--json", "--kernel", "softmax", "--kernel", "adamw"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("stdout is one JSON document");
    assert_eq!(v["passed"], true);
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "softmax forward and backward, adamw step: {rows:?}");
    assert!(rows.iter().all(|r| r["max_rel_err"].as_f64().unwrap() <= r["tolerance"].as_f64().unwrap()));
}

/// `bench step --profile`: one more step timed op by op, on the GPU and on the CPU path; the
/// rows name each op with its direction and output shape, the LM head's products among them,
/// and add up to no more than the profiled step.
#[test]
fn bench_step_profile_says_where_the_step_goes() {
    if common::gpu().is_none() {
        return;
    }
    let o = bin()
        .args([
            "bench",
            "step",
            "--preset",
            "tiny",
            "--method",
            "lora",
            "--steps",
            "1",
            "--profile",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("stdout is one JSON document");
    let vocab = pockettune::models::preset_config("tiny").unwrap()["vocab_size"].as_u64().unwrap();
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "the GPU and the fast CPU path");
    for r in results {
        let p = &r["profile"];
        let rows = p["rows"].as_array().unwrap();
        let names: Vec<&str> = rows.iter().map(|r| r["what"].as_str().unwrap()).collect();
        let head = format!("linear backward [512, {vocab}]");
        assert!(names.contains(&head.as_str()), "{}: no row {head:?} in {names:?}", r["device"]);
        assert!(names.contains(&"attention forward [512, 64]"), "{names:?}");
        let sum: f64 = rows.iter().map(|r| r["ms"].as_f64().unwrap()).sum();
        let total = p["ms"].as_f64().unwrap();
        assert!(sum > 0.0 && sum <= total, "{}: rows sum to {sum} ms of a {total} ms step", r["device"]);
        let ms: Vec<f64> = rows.iter().map(|r| r["ms"].as_f64().unwrap()).collect();
        assert!(ms.windows(2).all(|w| w[0] >= w[1]), "rows are not slowest first: {ms:?}");
    }
    let o = bin().args(["bench", "step", "--plan", "--profile"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--profile"), "{err}");
}
