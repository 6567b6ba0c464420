//! The flat parameter layout on the GPU (`graph::params`): at the first update the trained
//! parameters, their gradients and AdamW moments move into shared buffers, each parameter's
//! tensors becoming views, so that clipping and AdamW take a dispatch per shared buffer.
//!
//! - Training is unchanged by it: the same steps with one buffer per tensor give the same
//!   losses and parameters, bit for bit without clipping (AdamW is elementwise; only the
//!   views' places differ; the norm, reported, is a sum in another order: within 1e-5), and
//!   with clipping within the rounding of that sum: one clipped step, the parameters and
//!   moments within 1e-5 of each tensor's largest value. (Over several clipped steps the
//!   last-bit difference in the clipping coefficient reaches the next step's gradients, and
//!   AdamW's division by sqrt(v) turns a relative change in a near-zero gradient into an
//!   update of lr's size: that is AdamW's sensitivity, not the layout's, so one step is
//!   compared.)
//! - Every family, full fine-tuning and LoRA; the layout over one buffer and over several
//!   (the buffer size capped small), so that parameters at a buffer's start and at offsets in
//!   it, and views into different buffers, are all exercised.
//! - The dispatches of clipping and AdamW fall from a few per parameter to a few per buffer.
//! - Moments read back per parameter (what a checkpoint saves) come out of the views.

mod common;

use pockettune::graph::{Device, ParamStore};
use pockettune::kernels::optim::AdamW;
use pockettune::memory::GraphOptions;
use pockettune::models::Model;
use rand::{Rng, SeedableRng};

struct Run {
    norms: Vec<f32>,
    losses: Vec<f32>,
    /// every trainable parameter's value and moments after the steps
    params: Vec<(String, Vec<f32>, Vec<f32>, Vec<f32>)>,
    /// dispatches of the last step's clipping and AdamW
    update_dispatches: u64,
    /// (buffers, parameters) of the flat layout
    layout: (usize, usize),
}

fn train(dev: &Device, config: &serde_json::Value, lora: bool, clip: (f32, usize), flat: Option<u64>) -> Run {
    let (max_norm, steps) = clip;
    let (model, mut store): (Model, ParamStore) = Model::random(config.clone(), dev, 3).unwrap();
    if lora {
        let targets = pockettune::lora::default_targets(&model);
        let o = pockettune::lora::LoraOptions { rank: 4, alpha: 8.0, dropout: 0.0, targets };
        pockettune::lora::apply(&model, &mut store, &o, 5).unwrap();
    }
    match flat {
        Some(limit) => store.set_flat_buffer_limit(limit),
        None => store.set_flat(false),
    }
    let (b, t) = (2, 8);
    let vocab = model.vocab_size();
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let ids: Vec<u32> = (0..b * t).map(|_| rng.random_range(0..vocab as u32)).collect();
    let targets: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    let (graph, vars) = model.graph_with(&store, b, t, GraphOptions::default()).unwrap();
    let feed = Model::feed(&ids, &targets, b, t);
    let opt = AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
    let Device::Gpu(gpu) = dev else { unreachable!("a GPU device") };
    let (mut norms, mut losses, mut update_dispatches) = (Vec::new(), Vec::new(), 0);
    for _ in 0..steps {
        store.zero_grads().unwrap();
        let mut run = graph.forward(&store, &feed, &[]).unwrap();
        run.backward(&mut store, vars.loss, 1.0).unwrap();
        losses.push(run.loss(vars.loss).unwrap());
        drop(run);
        let before = gpu.stats().dispatches;
        norms.push(store.clip_grad_norm(max_norm).unwrap());
        store.adamw_step(opt).unwrap();
        update_dispatches = gpu.stats().dispatches - before;
    }
    let params = store
        .iter()
        .filter(|(_, p)| p.trainable)
        .map(|(id, p)| {
            let (m, v) = store.moments_to_host(id).unwrap().expect("moments after a step");
            (p.name.clone(), p.value.to_host(dev).unwrap(), m, v)
        })
        .collect();
    let (buffers, held, _) = store.flat_layout();
    Run { norms, losses, params, update_dispatches, layout: (buffers, held) }
}

fn compare(what: &str, a: &Run, b: &Run, exact: bool) {
    let tol = |x: f32| if exact { 0.0 } else { 1e-5 * x.abs().max(1e-30) };
    // the norm itself is a sum taken in another order either way
    for (i, (x, y)) in a.norms.iter().zip(&b.norms).enumerate() {
        assert!((x - y).abs() <= 1e-5 * x.abs(), "{what}: step {i} gradient norm {x} vs {y}");
    }
    for (i, (x, y)) in a.losses.iter().zip(&b.losses).enumerate() {
        assert!((x - y).abs() <= tol(*x), "{what}: step {i} loss {x} vs {y}");
    }
    assert_eq!(a.params.len(), b.params.len());
    for ((name, va, ma, sa), (_, vb, mb, sb)) in a.params.iter().zip(&b.params) {
        for (part, x, y) in [("value", va, vb), ("m", ma, mb), ("v", sa, sb)] {
            let scale = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(scale > 0.0 || part != "value", "{what}: {name} is all zero");
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                assert!((p - q).abs() <= tol(scale), "{what}: {name} {part}[{i}] {p} vs {q}");
            }
        }
    }
}

#[test]
fn the_flat_layout_trains_as_one_buffer_per_tensor_does() {
    let Some(dev) = common::gpu_device() else { return };
    for (family, config) in common::family_configs() {
        for lora in [false, true] {
            let what = format!("{family} {}", if lora { "LoRA" } else { "full" });
            let apart = train(&dev, &config, lora, (0.0, 3), None);
            assert_eq!(apart.layout, (0, 0), "{what}: laid out flat when told not to");
            let n = apart.params.len();
            // one buffer (no cap below the device's), then about a quarter of the parameters'
            // bytes a buffer
            let bytes: usize = apart.params.iter().map(|p| 4 * p.1.len()).sum();
            let mut figures = String::new();
            for limit in [u64::MAX, (bytes / 4).max(1024) as u64] {
                let flat = train(&dev, &config, lora, (0.0, 3), Some(limit));
                let (buffers, held) = flat.layout;
                assert_eq!(held, n, "{what}: the layout holds {held} of {n} trained parameters");
                assert!(limit < u64::MAX || buffers == 1, "{what}: {buffers} buffers without a cap");
                assert!(
                    limit == u64::MAX || buffers >= 3,
                    "{what}: {buffers} buffers under a cap of {limit}"
                );
                compare(&format!("{what}, {buffers} buffers, no clipping"), &apart, &flat, true);
                figures += &format!(" {} with {buffers} buffers,", flat.update_dispatches);
                // three dispatches per buffer, against three per tensor: the sum of squares
                // (two passes) and AdamW
                assert!(
                    flat.update_dispatches <= 3 * buffers as u64 + 2
                        && apart.update_dispatches >= 3 * n as u64,
                    "{what}: update dispatches {} flat ({buffers} buffers) vs {} apart ({n} tensors)",
                    flat.update_dispatches,
                    apart.update_dispatches
                );
            }
            let apart_steady = apart.update_dispatches;
            let apart = train(&dev, &config, lora, (0.1, 1), None);
            let flat = train(&dev, &config, lora, (0.1, 1), Some(u64::MAX));
            assert!(apart.norms.iter().all(|&x| x > 0.1), "{what}: clipping never acted: {:?}", apart.norms);
            compare(&format!("{what}, clipped at 0.1"), &apart, &flat, false);
            eprintln!(
                "{what}: {n} tensors; a step's norm and AdamW: {} dispatches apart,{figures} flat",
                apart_steady
            );
        }
    }
}
