//! The training loop on a random tiny GPT-2 with a byte-level tokenizer: gradient accumulation,
//! determinism, resuming, and clear errors for bad data.

mod common;

use clap::Parser;
use pockettune::data::{Tokenizer, Tokens};
use pockettune::gradcheck::rel_err;
use pockettune::graph::Device;
use pockettune::models::gpt2::Gpt2;
use pockettune::train::{train, TrainOptions};
use std::path::Path;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    o: TrainOptions,
}

fn options(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> TrainOptions {
    let mut args = vec!["x", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap()];
    args.extend(["--out", out.to_str().unwrap(), "--batch-size", "2", "--seq-len", "16", "--lr", "1e-2"]);
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
    common::tiny_model_dir(&model, 7);
    let data = tmp.path().join("data.txt");
    std::fs::write(&data, TEXT.repeat(4)).unwrap();
    (tmp, model, data)
}

fn devices() -> Vec<&'static str> {
    let mut d = vec!["cpu"];
    if common::gpu().is_some() {
        d.push("0");
    }
    d
}

/// 4 micro-batches of 2 sequences give the gradients of one batch of 8.
#[test]
fn four_micro_batches_of_two_equal_one_batch_of_eight() {
    let (_tmp, model_dir, data) = setup();
    let tok = Tokenizer::load(&model_dir.join("tokenizer.json")).unwrap();
    let tokens = Tokens::load(&data, &tok).unwrap();
    let t = 16;
    let window = |w: usize| tokens.window(w, t);
    for spec in devices() {
        let dev = pockettune::train::open_device(Some(spec), Default::default()).unwrap();
        let grads = |batch: usize, micro: usize| -> Vec<Vec<f32>> {
            let (model, mut store) = Gpt2::load(&model_dir, &dev).unwrap();
            let (graph, vars) = model.graph(&store, batch, t).unwrap();
            for m in 0..micro {
                let (mut ids, mut targets) = (Vec::new(), Vec::new());
                for w in m * batch..(m + 1) * batch {
                    let (i, tg) = window(w);
                    ids.extend(i);
                    targets.extend(tg);
                }
                let mut run = graph.forward(&store, &Gpt2::feed(&ids, &targets, batch, t), &[]).unwrap();
                run.backward(&mut store, vars.loss, 1.0 / micro as f32).unwrap();
            }
            store.iter().map(|(_, p)| p.grad.as_ref().unwrap().to_host(&dev).unwrap()).collect()
        };
        let (one, four) = (grads(8, 1), grads(2, 4));
        for (a, b) in one.iter().zip(&four) {
            let err = rel_err(b, a);
            assert!(err <= 1e-5, "{}: accumulated gradient differs by {err:e}", dev.name());
        }
        if let Device::Gpu(_) = dev {
            eprintln!("gradient accumulation checked on the GPU");
        }
    }
}

#[test]
fn same_seed_same_losses_and_resume_continues_exactly() {
    let (tmp, model, data) = setup();
    for spec in devices() {
        let out = tmp.path().join(format!("run-{spec}"));
        let common = [
            "--steps",
            "6",
            "--shuffle",
            "--seed",
            "9",
            "--save-every",
            "3",
            "--warmup",
            "2",
            "--device",
            spec,
        ];
        let full = train(&options(&model, &data, &out, &common), false).unwrap();
        assert_eq!(full.losses.len(), 6);
        assert!(full.losses[5] < full.losses[0], "{spec}: training lowers the loss: {:?}", full.losses);

        let again = train(&options(&model, &data, &tmp.path().join(format!("again-{spec}")), &common), false)
            .unwrap();
        assert_eq!(again.losses, full.losses, "{spec}: same seed, same device, same losses");

        // Interrupted after step 3: point `latest` back at that checkpoint and resume.
        std::fs::write(out.join("latest"), "step-000003").unwrap();
        let mut resumed_args = common.to_vec();
        resumed_args.push("--resume");
        let resumed = train(&options(&model, &data, &out, &resumed_args), false).unwrap();
        assert_eq!(
            resumed.losses,
            full.losses[3..].to_vec(),
            "{spec}: resumed losses equal the uninterrupted run"
        );

        // With --keep-checkpoints 1 only the newest survives.
        let kept = tmp.path().join(format!("kept-{spec}"));
        let mut args = common[..common.len() - 2].to_vec();
        args.extend(["--keep-checkpoints", "1"]);
        train(&options(&model, &data, &kept, &args), false).unwrap();
        let dirs: Vec<_> =
            std::fs::read_dir(&kept).unwrap().filter_map(|e| e.ok()).filter(|e| e.path().is_dir()).collect();
        assert_eq!(dirs.len(), 1, "{spec}: one checkpoint kept");
        assert_eq!(std::fs::read_to_string(kept.join("latest")).unwrap(), "step-000006");

        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
        for key in [
            "step",
            "loss",
            "lr",
            "tokens",
            "ms_step",
            "tokens_per_s",
            "rss_bytes",
            "peak_rss_bytes",
            "gpu_bytes",
            "battery_pct",
            "throttle_ms",
        ] {
            assert!(first.get(key).is_some(), "metrics line lacks {key}: {first}");
        }
    }
}

#[test]
fn bad_data_gets_a_clear_error() {
    let (tmp, model, _) = setup();
    let out = tmp.path().join("out");
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let short = tmp.path().join("short.txt");
    std::fs::write(&short, "too short").unwrap();
    let bad_jsonl = tmp.path().join("bad.jsonl");
    std::fs::write(&bad_jsonl, "{\"prompt\": \"x\"}\n").unwrap();
    let cases: [(&Path, &str); 4] = [
        (&empty, "no tokens"),
        (&short, "fewer than one batch"),
        (&tmp.path().join("missing.txt"), "no such file"),
        (&bad_jsonl, "expected {\"text\""),
    ];
    for (data, want) in cases {
        // The error is about this data file (not any message that happens to say "data").
        match train(&options(&model, data, &out, &["--device", "cpu"]), false) {
            Err(pockettune::Error::Checkpoint { path, detail }) => {
                assert_eq!(path, data, "names the data file: {detail}");
                assert!(detail.contains(want), "{}: {detail}", data.display());
            }
            Err(e) => panic!("{}: expected an error about the data file, got: {e}", data.display()),
            Ok(_) => panic!("{}: trained", data.display()),
        }
    }
    // A tokenizer larger than the model's vocabulary does not belong to it.
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2-tiny");
    let mixed = tmp.path().join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(f), mixed.join(f)).unwrap();
    }
    std::fs::copy(model.join("tokenizer.json"), mixed.join("tokenizer.json")).unwrap();
    let err =
        train(&options(&mixed, &tmp.path().join("data.txt"), &out, &["--device", "cpu"]), false).unwrap_err();
    assert!(err.to_string().contains("do not belong together"), "{err}");
}

#[test]
fn prompt_completion_data_takes_loss_on_completions_only() {
    let (tmp, model, _) = setup();
    let tok = Tokenizer::load(&model.join("tokenizer.json")).unwrap();
    let jsonl = tmp.path().join("pairs.jsonl");
    std::fs::write(&jsonl, "{\"prompt\": \"Q: 2+2?\", \"completion\": \" A: 4\"}\n{\"text\": \"plain\"}\n")
        .unwrap();
    let t = Tokens::load(&jsonl, &tok).unwrap();
    let prompt = tok.encode("Q: 2+2?").unwrap().len();
    let completion = tok.encode(" A: 4").unwrap().len();
    assert_eq!(&t.counts[..prompt], vec![false; prompt].as_slice(), "prompt tokens take no loss");
    assert_eq!(&t.counts[prompt..prompt + completion], vec![true; completion].as_slice());
    assert_eq!(t.ids[prompt + completion], tok.eot(), "documents are joined by the end-of-text token");
}
