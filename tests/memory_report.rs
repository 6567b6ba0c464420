//! The memory report (`pockettune::memory::report`): GPU bytes by category go up and down
//! exactly as buffers are made and dropped under category scopes, a training step labels its
//! weights, gradients, moments and logits where they belong, and `bench step` / `train` carry
//! the report in their JSON.

mod common;

use pockettune::gpu::Category;
use pockettune::Gpu;
use std::collections::HashMap;
use std::process::Command;

/// The tests here read the device's global counters: one at a time.
static SERIAL: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

/// (now, peak) per category.
fn cats(gpu: &Gpu) -> HashMap<Category, (u64, u64)> {
    gpu.bytes_by_category().into_iter().map(|(c, now, peak)| (c, (now, peak))).collect()
}

/// The pool's size for a request of `bytes` (rounded up to 256).
fn pooled(bytes: u64) -> u64 {
    bytes.max(4).next_multiple_of(256)
}

#[test]
fn category_counters_follow_scopes_exactly() {
    let Some(gpu) = common::gpu() else { return };
    let _one = SERIAL.lock();
    gpu.reset_live_peak();
    let b = cats(gpu);
    let (live0, _) = gpu.bytes_live();
    let now = |c: Category| cats(gpu)[&c].0 - b[&c].0;
    let peak = |c: Category| cats(gpu)[&c].1 - b[&c].0;
    assert_eq!(Category::current(), Category::Other);
    {
        let _w = gpu.category(Category::Weights);
        let w = gpu.alloc(4000, "w").unwrap();
        assert_eq!(w.category(), Category::Weights);
        assert_eq!((now(Category::Weights), peak(Category::Weights)), (4096, 4096));
        {
            let _g = Category::Gradients.enter();
            let g = gpu.alloc(1000, "g").unwrap();
            assert_eq!((now(Category::Gradients), peak(Category::Gradients)), (1024, 1024));
            // Another thread keeps its own category: this one's scope does not label its buffer.
            std::thread::scope(|s| {
                s.spawn(|| {
                    assert_eq!(Category::current(), Category::Other);
                    let t = gpu.alloc(300, "t").unwrap();
                    assert_eq!(t.category(), Category::Other);
                });
            });
            assert_eq!(now(Category::Other), 0);
            assert_eq!(cats(gpu)[&Category::Other].1, b[&Category::Other].1.max(b[&Category::Other].0 + 512));
            assert_eq!(gpu.bytes_live().0 - live0, 4096 + 1024);
            drop(g);
            assert_eq!((now(Category::Gradients), peak(Category::Gradients)), (0, 1024));
        }
        // the inner scope ended: back to weights
        assert_eq!(Category::current(), Category::Weights);
        let w2 = gpu.alloc(100, "w2").unwrap();
        assert_eq!((now(Category::Weights), peak(Category::Weights)), (4096 + 256, 4096 + 256));
        drop(w);
        assert_eq!((now(Category::Weights), peak(Category::Weights)), (256, 4096 + 256));
        drop(w2);
        assert_eq!(now(Category::Weights), 0);
    }
    assert_eq!(Category::current(), Category::Other);
    for c in [Category::OptimizerState, Category::Activations, Category::LogitsLoss, Category::Staging] {
        assert_eq!((now(c), peak(c)), (0, 0), "{c:?}");
    }
    assert_eq!(gpu.bytes_live().0, live0);
    gpu.reset_live_peak();
    for (c, now, peak) in gpu.bytes_by_category() {
        assert_eq!(now, peak, "{c:?}: the reset starts each peak again from now");
    }
}

#[test]
fn the_driver_allocator_figures_cover_the_pools_buffers() {
    let Some(gpu) = common::gpu() else { return };
    let _one = SERIAL.lock();
    // A fresh size, so the pool cannot hand back a buffer it made before.
    let bytes = (24 << 20) + 4096 * 7;
    let b = gpu.alloc(bytes, "driver figures").unwrap();
    let d = gpu.driver_bytes().expect("Vulkan's allocator keeps a report");
    // Everything the pool holds, this buffer included, was carved out of the allocator's
    // blocks, which hold at least what was carved out of them.
    assert!(d.allocated >= gpu.bytes_allocated().0, "{d:?}");
    assert!(d.allocated >= bytes && d.reserved >= d.allocated, "{d:?}");
    assert!(d.peak_allocated >= d.allocated && d.peak_reserved >= d.reserved, "{d:?}");
    // The mobile profile's blocks are small: a buffer this large has its own allocation, so
    // the reserve does not run more than a few blocks past what is in use.
    assert!(d.reserved - d.allocated <= 64 << 20, "{d:?}");
    drop(b);
}

/// Under a budget the driver holds little more than the budget: buffers the pool gives back
/// are counted until the GPU is done with them (wgpu destroys them only then), and wgpu's
/// staging copies of uploads are kept to an eighth of the budget beside the largest single
/// upload. (Before, a 13 MiB budget saw 30 MiB carved out by the driver.)
#[test]
fn under_a_budget_the_driver_holds_little_more_than_the_budget() {
    if common::gpu().is_none() {
        return;
    }
    let budget: u64 = 13 << 20; // the tiny preset's planned smallest is 12.6 MiB
    let o = bin()
        .args(["bench", "step", "--preset", "tiny", "--method", "lora", "--steps", "1", "--no-cpu", "--json"])
        .args(["--batch-size", "2", "--seq-len", "64", "--memory-budget", "13M"])
        .args(["--fused-loss", "--flash-attention", "--checkpoint-activations"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "bench step failed: {err}");
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).expect("stdout is one JSON document");
    let g = &doc["results"][0]["memory"]["gpu"];
    assert!(g["peak_held_bytes"].as_u64().unwrap() <= budget, "{g}");
    // the largest single upload: one vocabulary chunk of the f32 head, 16,384 rows of 64
    let largest_upload = 16_384 * 64 * 4;
    let driver = g["driver"]["peak_allocated"].as_u64().unwrap();
    assert!(
        driver <= budget + budget / 8 + largest_upload,
        "driver peak {driver} for a budget of {budget}: {g}"
    );
}

#[test]
fn a_training_step_labels_weights_gradients_moments_and_logits() {
    use pockettune::graph::Device;
    use pockettune::kernels::optim::AdamW;
    use pockettune::models::{preset_config, Model};
    let Some(gpu) = common::gpu() else { return };
    let _one = SERIAL.lock();
    let dev = Device::Gpu(gpu.clone());
    gpu.reset_live_peak();
    let b = cats(gpu);
    let delta = |c: Category| {
        let (now, peak) = cats(gpu)[&c];
        (now - b[&c].0, peak - b[&c].0)
    };
    let (model, mut store) = Model::random(preset_config("tiny").unwrap(), &dev, 1).unwrap();
    // every parameter of a random model is trained: one f32 buffer each
    let w: u64 = store.iter().map(|(_, p)| pooled(4 * p.shape.iter().product::<usize>() as u64)).sum();
    assert_eq!(delta(Category::Weights), (w, w));

    let (bs, t) = (2, 4);
    let (graph, vars) = model.graph(&store, bs, t).unwrap();
    let ids: Vec<u32> = (0..(bs * t) as u32).map(|i| i * 7 + 1).collect();
    let targets: Vec<i32> = ids.iter().map(|&i| i as i32 + 1).collect();
    let feed = Model::feed(&ids, &targets, bs, t);
    let opt = AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
    let mut run = graph.forward(&store, &feed, &[]).unwrap();
    run.backward(&mut store, vars.loss, 1.0).unwrap();
    drop(run);
    store.adamw_step(opt).unwrap();
    gpu.sync().unwrap();

    // At the first update the trained parameters move into the flat layout (`graph::params`):
    // values and gradients are each held twice while they move, then once, in the shared
    // buffers; the moments are made there.
    let (_, held, flat) = store.flat_layout();
    assert_eq!(held, store.iter().count(), "every parameter laid out flat");
    let wf: u64 = flat.iter().map(|&b| pooled(b)).sum();
    assert!(wf >= w && wf < w + 256 * held as u64, "flat {wf} bytes for {w} of parameters");
    assert_eq!(delta(Category::Weights), (wf, w + wf));
    assert_eq!(delta(Category::Gradients), (wf, w + wf), "one gradient per parameter, nothing else");
    assert_eq!(delta(Category::OptimizerState), (2 * wf, 2 * wf), "two moments per parameter");
    // The logits (B*T, V) and their gradient are both live when the cross-entropy's backward
    // runs; nothing else of that size is counted there (the LM head's dX is an activation).
    let logits = pooled(4 * (bs * t * model.vocab_size()) as u64);
    let (now, peak) = delta(Category::LogitsLoss);
    assert_eq!(now, 0, "the run is gone");
    assert!((2 * logits..2 * logits + logits / 8).contains(&peak), "logits {logits}, peak {peak}");
    let (now, peak) = delta(Category::Activations);
    assert_eq!(now, 0, "the run is gone");
    assert!(peak > 0 && peak < logits, "activations peak {peak} (logits {logits})");
    assert_eq!(delta(Category::Staging), (0, 0), "f32 weights need no scratch");

    // With --fused-loss the logits never exist whole: what is counted there is the fused node's
    // vocabulary chunks and state, less than the logits themselves.
    let options = pockettune::memory::GraphOptions { fused_loss: true, ..Default::default() };
    let (graph, vars) = model.graph_with(&store, bs, t, options).unwrap();
    gpu.reset_live_peak();
    let before = cats(gpu)[&Category::LogitsLoss].0;
    let mut run = graph.forward(&store, &feed, &[]).unwrap();
    run.backward(&mut store, vars.loss, 1.0).unwrap();
    drop(run);
    gpu.sync().unwrap();
    let (now, peak) = cats(gpu)[&Category::LogitsLoss];
    assert_eq!(now, before);
    assert!(peak > before && peak - before < logits, "fused: peak {peak}, logits {logits}");
}

fn bin() -> Command {
    // no matmul autotune: tests neither read nor write the user's cache
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pockettune"));
    cmd.env("POCKETTUNE_MATMUL_AUTOTUNE", "off");
    cmd
}

#[test]
fn bench_step_json_carries_the_memory_report() {
    if common::gpu().is_none() {
        return;
    }
    let o = bin()
        .args(["bench", "step", "--preset", "tiny", "--method", "lora", "--steps", "1", "--no-cpu", "--json"])
        .args(["--batch-size", "1", "--seq-len", "16"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "bench step failed: {err}");
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).expect("stdout is one JSON document");
    let m = &doc["results"][0]["memory"];
    assert!(m["peak_rss_bytes"].as_u64().unwrap() > 0, "{m}");
    assert!(m["peak_rss_anon_bytes"].as_u64().unwrap() > 0, "{m}");
    assert!(m["peak_rss_file_bytes"].as_u64().unwrap() > 0, "{m}");
    assert!(m["rss_samples"].as_u64().unwrap() >= 2, "{m}");
    let g = &m["gpu"];
    assert!(g["peak_held_bytes"].as_u64().unwrap() >= g["peak_live_bytes"].as_u64().unwrap(), "{g}");
    let by = g["peak_live_by_category"].as_object().expect("categories");
    let mut names: Vec<&str> = by.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["activations", "gradients", "logits_and_loss", "optimizer_state", "other", "staging", "weights"]
    );
    let at = |k: &str| by[k].as_u64().unwrap();
    // LoRA on a 2-layer GPT-2: the adapters' gradients and moments are small next to the base
    let lora = at("gradients");
    assert!(lora > 0 && at("optimizer_state") == 2 * lora && at("weights") > 10 * lora, "{g}");
    assert!(at("logits_and_loss") >= 2 * 16 * 50257 * 4, "{g}");
    assert!(err.contains("logits and loss") && err.contains("peak RSS"), "the table on stderr: {err}");
    let d = &g["driver"];
    assert!(d["peak_reserved"].as_u64().unwrap() >= d["peak_allocated"].as_u64().unwrap(), "{g}");
    assert!(d["peak_allocated"].as_u64().unwrap() >= g["peak_held_bytes"].as_u64().unwrap(), "{g}");
    assert!(err.contains("driver reserved"), "the table on stderr: {err}");
}

#[test]
fn train_json_carries_the_memory_report() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    common::tiny_model_dir(&model, 3);
    let data = tmp.path().join("data.txt");
    std::fs::write(&data, "a b c d e f g h i j k l m n o p q r s t u v w x y z ".repeat(20)).unwrap();
    let (m, d, out) = (model.to_str().unwrap(), data.to_str().unwrap(), tmp.path().join("out"));
    let o = bin()
        .args(["train", "--model", m, "--data", d, "--out", out.to_str().unwrap(), "--device", "cpu"])
        .args(["--steps", "1", "--batch-size", "1", "--seq-len", "16", "--json"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "train failed: {err}");
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).expect("stdout is one JSON document");
    let mem = &doc["memory"];
    assert!(mem["peak_rss_bytes"].as_u64().unwrap() > 0, "{mem}");
    assert!(mem["peak_rss_anon_bytes"].as_u64().unwrap() > 0, "{mem}");
    assert!(mem["gpu"].is_null(), "the CPU path has no GPU figures: {mem}");
    assert!(err.contains("peak RSS"), "{err}");
}
