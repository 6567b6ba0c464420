//! `--optimizer-offload host|disk` (issue 10 point 2): AdamW moments in host memory or a
//! memory-mapped file, the update on the CPU threads. Checked against on-GPU AdamW on a tiny
//! GPT-2 and a tiny Llama, full fine-tuning and LoRA, on the GPU and the CPU path; the GPU holds
//! exactly the moments' bytes less; resuming with offload continues the uninterrupted run; an
//! unwritable place for the file is a clear error.
//!
//! Tolerances. On the CPU path the offloaded update is the reference AdamW (f64, as without
//! offload) on the same numbers, so the losses are equal bit for bit. On the GPU the host
//! update is the shader's formula in f32 operation for operation (`optim::adamw_host`), so the
//! two can differ only where the device rounds a division or square root other than IEEE or
//! fuses a multiply-add: at most a few ulp of an update of size lr. Over 4 steps at lr 1e-2
//! that moves the loss (about 5.5) by well under 1e-5 relative; the test allows 1e-5.

mod common;

use clap::Parser;
use pockettune::gpu::Category;
use pockettune::graph::{Device, ParamStore, Value};
use pockettune::kernels::optim::{self, AdamW};
use pockettune::memory::OptimizerOffload;
use pockettune::models::{LoadOptions, Model};
use pockettune::train::{open_device, train, TrainOptions};
use std::path::{Path, PathBuf};

const OPT: AdamW = AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
const GPU_LOSS_TOL: f32 = 1e-5;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn devices() -> Vec<&'static str> {
    let mut d = vec!["cpu"];
    if common::gpu().is_some() {
        d.push("0");
    }
    d
}

/// What a run of a few optimizer steps gives.
struct Run {
    losses: Vec<f32>,
    /// GPU bytes held after the steps with the pool trimmed (live buffers only)
    held: Option<u64>,
    /// GPU bytes the moments take on the GPU without offload (256-byte rounded buffers)
    moment_bytes: u64,
}

/// 4 optimizer steps (clip 1.0, AdamW) on one fixed batch of random tokens (so that the loss
/// falls step by step), on a fresh device.
fn run(model_dir: &Path, spec: &str, lora: bool, mode: OptimizerOffload, piece: Option<usize>) -> Run {
    let (b, t, steps) = (2, 16, 4);
    let dev = open_device(Some(spec), Default::default()).unwrap();
    let load = LoadOptions { frozen: lora, ..Default::default() };
    let (model, mut store) = Model::load_with(model_dir, &dev, &load).unwrap();
    if lora {
        let targets = pockettune::lora::default_targets(&model);
        let opts = pockettune::lora::LoraOptions { rank: 4, alpha: 8.0, dropout: 0.0, targets };
        pockettune::lora::apply(&model, &mut store, &opts, 5).unwrap();
    }
    let tmp = tempfile::tempdir().unwrap();
    store.set_optimizer_offload(mode, &tmp.path().join("out/optimizer-state.bin")).unwrap();
    if let Some(n) = piece {
        store.optimizer_offload_mut().unwrap().set_transfer_piece(n);
    }
    let (graph, vars) = model.graph(&store, b, t).unwrap();
    let vocab = model.vocab_size() as u64;
    let mut losses = Vec::new();
    let token = |i: usize| (kernels_ref::hash32(i as u32 + 17) as u64 % vocab) as u32;
    let ids: Vec<u32> = (0..b * t).map(token).collect();
    let targets: Vec<i32> = (0..b * t).map(|i| token(i + 1) as i32).collect();
    for _ in 0..steps {
        store.zero_grads().unwrap();
        let mut r = graph.forward(&store, &Model::feed(&ids, &targets, b, t), &[]).unwrap();
        r.backward(&mut store, vars.loss, 1.0).unwrap();
        losses.push(r.loss(vars.loss).unwrap());
        drop(r);
        store.clip_grad_norm(1.0).unwrap();
        store.adamw_step(OPT).unwrap();
    }
    if mode == OptimizerOffload::Disk {
        assert!(tmp.path().join("out/optimizer-state.bin").is_file(), "the disk file exists while in use");
    }
    let moment_bytes = moment_bytes(&store);
    let held = match &dev {
        Device::Gpu(g) => {
            g.sync().unwrap();
            g.trim();
            let optimizer_state =
                g.bytes_by_category().iter().find(|c| c.0 == Category::OptimizerState).unwrap().1;
            let want = if mode == OptimizerOffload::None { moment_bytes } else { 0 };
            assert_eq!(optimizer_state, want, "{mode:?}: live GPU bytes counted as optimizer state");
            Some(g.bytes_allocated().0)
        }
        Device::Cpu(_) => None,
    };
    Run { losses, held, moment_bytes }
}

/// What AdamW's moments take in GPU buffers without offload: two buffers per chunk of every
/// trained weight, as the pool rounds them (to 256 bytes).
fn moment_bytes(store: &ParamStore) -> u64 {
    let chunk_bytes = |p: &pockettune::graph::Param| -> u64 {
        match &p.value {
            Value::Gpu(t) => t.chunks().iter().map(|c| c.bytes().max(4).next_multiple_of(256)).sum(),
            _ => (4 * p.shape.iter().product::<usize>() as u64).max(4).next_multiple_of(256),
        }
    };
    store.iter().filter(|(_, p)| p.trainable).map(|(_, p)| 2 * chunk_bytes(p)).sum()
}

fn rel(a: f32, b: f32) -> f32 {
    (a - b).abs() / b.abs().max(1e-30)
}

#[test]
fn offloaded_adamw_gives_the_losses_of_on_gpu_adamw_and_no_moments_on_the_gpu() {
    let gpt2 = tempfile::tempdir().unwrap();
    common::tiny_model_dir(gpt2.path(), 7);
    for (model, dir) in [("gpt2", gpt2.path().to_path_buf()), ("llama", fixture("llama-tiny"))] {
        for lora in [false, true] {
            for spec in devices() {
                let what = format!("{model} {} on {spec}", if lora { "LoRA" } else { "full" });
                let base = run(&dir, spec, lora, OptimizerOffload::None, None);
                assert!(
                    base.losses[3] < base.losses[0],
                    "{what}: training lowers the loss {:?}",
                    base.losses
                );
                let host = run(&dir, spec, lora, OptimizerOffload::Host, None);
                // Pieces of 37 elements: every tensor crosses piece and batch boundaries.
                let disk = run(&dir, spec, lora, OptimizerOffload::Disk, Some(37));
                // Host and disk run the same arithmetic whatever the batching: equal exactly.
                assert_eq!(host.losses, disk.losses, "{what}: host and disk offload");
                match (base.held, host.held, disk.held) {
                    (None, ..) => assert_eq!(host.losses, base.losses, "{what}: offload on the CPU path"),
                    (Some(b), Some(h), Some(d)) => {
                        let worst = host
                            .losses
                            .iter()
                            .zip(&base.losses)
                            .map(|(&a, &b)| rel(a, b))
                            .fold(0.0, f32::max);
                        eprintln!(
                            "{what}: losses {:?} vs {:?}, worst rel {worst:e}",
                            host.losses, base.losses
                        );
                        assert!(worst <= GPU_LOSS_TOL, "{what}: {:?} vs {:?}", host.losses, base.losses);
                        assert_eq!(b - h, base.moment_bytes, "{what}: GPU bytes saved by host offload");
                        assert_eq!(b - d, base.moment_bytes, "{what}: GPU bytes saved by disk offload");
                    }
                    _ => unreachable!(),
                }
            }
        }
    }
}

/// The host AdamW against the GPU kernel on the same numbers (random values, gradients of
/// mixed magnitude, 3 steps): within 2 ulp-scale relative error on every output.
#[test]
fn host_adamw_is_the_shader_formula() {
    let Some(gpu) = common::gpu() else { return };
    let n = 10_000;
    let u = |seed: u32, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = kernels_ref::hash32(seed.wrapping_mul(7919).wrapping_add(i as u32));
                let x = h as f32 / u32::MAX as f32 * 2.0 - 1.0;
                x * scale * if i % 3 == 0 { 1e-4 } else { 1.0 }
            })
            .collect()
    };
    let mut p = u(1, 1.0);
    let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
    let t = |x: &[f32]| pockettune::Tensor::from_host(gpu, x, &[n], "t").unwrap();
    let (gp, gm, gv) = (t(&p), t(&m), t(&v));
    for step in 1..=3 {
        let g = u(10 + step, 0.5);
        optim::adamw_step(gpu, &gp, &t(&g), &gm, &gv, OPT, step).unwrap();
        optim::adamw_host(&mut p, &g, &mut m, &mut v, OPT, step);
    }
    for (name, host, dev) in [("p", &p, &gp), ("m", &m, &gm), ("v", &v, &gv)] {
        let dev = dev.to_host(gpu).unwrap();
        let worst = host
            .iter()
            .zip(&dev)
            .map(|(&a, &b)| (a - b).abs() / b.abs().max(f32::MIN_POSITIVE))
            .fold(0.0f32, f32::max);
        eprintln!("{name}: worst relative difference host vs GPU {worst:e}");
        assert!(worst <= 2.5e-7, "{name}: host AdamW differs from the shader by {worst:e}");
    }
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    o: TrainOptions,
}

fn options(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> TrainOptions {
    let mut args = vec!["x", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap()];
    args.extend(["--out", out.to_str().unwrap(), "--batch-size", "2", "--seq-len", "16", "--lr", "1e-2"]);
    args.extend(["--steps", "6", "--shuffle", "--seed", "9", "--save-every", "3"]);
    args.extend(extra);
    Cli::parse_from(args).o
}

const TEXT: &str = "It was the best of times, it was the worst of times, it was the age of wisdom, \
it was the age of foolishness, it was the epoch of belief, it was the epoch of incredulity.";

#[test]
fn resume_with_offload_continues_the_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    common::tiny_model_dir(&model, 7);
    let data = tmp.path().join("data.txt");
    std::fs::write(&data, TEXT.repeat(6)).unwrap();
    for spec in devices() {
        let plain_out = tmp.path().join(format!("plain-{spec}"));
        let plain = train(&options(&model, &data, &plain_out, &["--device", spec]), false).unwrap();
        for mode in ["host", "disk"] {
            let out = tmp.path().join(format!("{mode}-{spec}"));
            let args = ["--device", spec, "--optimizer-offload", mode];
            let full = train(&options(&model, &data, &out, &args), false).unwrap();
            assert!(!out.join("optimizer-state.bin").exists(), "{mode}: the scratch file goes with the run");
            std::fs::write(out.join("latest"), "step-000003").unwrap();
            let resumed =
                train(&options(&model, &data, &out, &[&args[..], &["--resume"]].concat()), false).unwrap();
            assert_eq!(resumed.losses, full.losses[3..].to_vec(), "{mode} on {spec}: resumed with offload");
            if spec == "cpu" {
                assert_eq!(full.losses, plain.losses, "{mode}: offload on the CPU path");
            } else {
                for (a, b) in full.losses.iter().zip(&plain.losses) {
                    assert!(rel(*a, *b) <= GPU_LOSS_TOL, "{mode}: {:?} vs {:?}", full.losses, plain.losses);
                }
            }
        }
        // A checkpoint written without offload resumes into offloaded moments (same file format).
        std::fs::write(plain_out.join("latest"), "step-000003").unwrap();
        let args = ["--device", spec, "--optimizer-offload", "disk", "--resume"];
        let resumed = train(&options(&model, &data, &plain_out, &args), false).unwrap();
        if spec == "cpu" {
            assert_eq!(resumed.losses, plain.losses[3..].to_vec(), "plain checkpoint resumed with offload");
        } else {
            for (a, b) in resumed.losses.iter().zip(&plain.losses[3..]) {
                assert!(rel(*a, *b) <= GPU_LOSS_TOL, "{:?} vs {:?}", resumed.losses, plain.losses);
            }
        }
    }
}

#[test]
fn disk_offload_in_an_unwritable_place_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    // Under a regular file: no directory can be made there, whoever runs the test (root too).
    let blocker = tmp.path().join("not-a-dir");
    std::fs::write(&blocker, "x").unwrap();
    let path = blocker.join("run/optimizer-state.bin");
    let mut store = ParamStore::new(Device::CPU_REF);
    let err = store.set_optimizer_offload(OptimizerOffload::Disk, &path).unwrap_err().to_string();
    assert!(
        err.contains("--optimizer-offload disk")
            && err.contains(&path.display().to_string())
            && err.contains("writable"),
        "{err}"
    );

    // Through `train`: refused before any step, naming the file.
    let model = tmp.path().join("model");
    common::tiny_model_dir(&model, 7);
    let data = tmp.path().join("data.txt");
    std::fs::write(&data, TEXT).unwrap();
    let out = blocker.join("run");
    let err =
        train(&options(&model, &data, &out, &["--device", "cpu", "--optimizer-offload", "disk"]), false)
            .unwrap_err()
            .to_string();
    assert!(err.contains("optimizer-state.bin") && err.contains("--optimizer-offload disk"), "{err}");
}

/// GPT-2 124M's shapes (the 147 MiB embedding in two chunks under the mobile limits), full
/// fine-tuning at batch 4 x 128: the GPU holds exactly the moments' bytes less with offload, the
/// losses of two steps agree, and the step times are printed (the figures in the report).
#[test]
#[ignore = "slow tier: cargo test --release --test optimizer_offload -- --ignored --nocapture"]
fn gpt2_124m_full_step_offloaded() {
    if common::gpu().is_none() {
        return;
    }
    let (b, t) = (4, 128);
    let tmp = tempfile::tempdir().unwrap();
    let mut base: Option<(Vec<f32>, u64)> = None;
    for mode in [OptimizerOffload::None, OptimizerOffload::Host, OptimizerOffload::Disk] {
        let dev = open_device(Some("0"), Default::default()).unwrap();
        let Device::Gpu(gpu) = &dev else { unreachable!() };
        let cfg = pockettune::models::preset_config("gpt2").unwrap();
        let (model, mut store) = Model::random(cfg, &dev, 1).unwrap();
        store.set_optimizer_offload(mode, &tmp.path().join("optimizer-state.bin")).unwrap();
        let (graph, vars) = model.graph(&store, b, t).unwrap();
        let vocab = model.vocab_size() as u64;
        let ids: Vec<u32> =
            (0..b * t).map(|i| (kernels_ref::hash32(i as u32) as u64 % vocab) as u32).collect();
        let targets: Vec<i32> = ids.iter().skip(1).chain(&ids[..1]).map(|&i| i as i32).collect();
        let feed = Model::feed(&ids, &targets, b, t);
        let mut losses = Vec::new();
        let mut times = Vec::new();
        for _ in 0..3 {
            let t0 = std::time::Instant::now();
            store.zero_grads().unwrap();
            let mut r = graph.forward(&store, &feed, &[]).unwrap();
            r.backward(&mut store, vars.loss, 1.0).unwrap();
            losses.push(r.loss(vars.loss).unwrap());
            drop(r);
            store.clip_grad_norm(1.0).unwrap();
            gpu.sync().unwrap();
            let t1 = std::time::Instant::now();
            store.adamw_step(AdamW { lr: 1e-4, ..OPT }).unwrap();
            gpu.sync().unwrap();
            times.push((t0.elapsed().as_secs_f64(), t1.elapsed().as_secs_f64()));
        }
        gpu.trim();
        let held = gpu.bytes_allocated().0;
        let (step, adam) = times[2];
        eprintln!(
            "{mode:?}: GPU bytes held {held} ({:.1} MiB), steady step {:.2} s of which AdamW {:.3} s \
             (first step {:.2} s / {:.3} s), losses {losses:?}, host moments {} bytes, RSS {:?}",
            held as f64 / 1048576.0,
            step,
            adam,
            times[0].0,
            times[0].1,
            store.optimizer_offload().map_or(0, |o| o.bytes()),
            pockettune::train::rss(),
        );
        match &base {
            None => base = Some((losses, held)),
            Some((want, base_held)) => {
                let moments = moment_bytes(&store);
                assert_eq!(base_held - held, moments, "{mode:?}: GPU bytes saved");
                for (a, w) in losses.iter().zip(want) {
                    assert!(rel(*a, *w) <= GPU_LOSS_TOL, "{mode:?}: {losses:?} vs {want:?}");
                }
            }
        }
    }
}
