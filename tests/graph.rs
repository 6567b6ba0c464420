//! The graph executor's bookkeeping, on the GPT-2 fixture: activations freed after their last
//! use, frozen parameters without gradients (and the rest unchanged), no submission inside a
//! step until a number is read.

mod common;

use pockettune::gradcheck::rel_err;
use pockettune::graph::Device;
use pockettune::models::gpt2::Gpt2;
use pockettune::models::SafetensorsFile;
use std::path::PathBuf;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2-tiny")
}

fn batch() -> (Vec<u32>, Vec<i32>, usize, usize, SafetensorsFile) {
    let file = SafetensorsFile::open(&fixture().join("expected.safetensors")).unwrap();
    let (shape, ids) = file.get("input_ids").unwrap().unwrap();
    let (_, targets) = file.get("targets").unwrap().unwrap();
    (
        ids.iter().map(|&x| x as u32).collect(),
        targets.iter().map(|&x| x as i32).collect(),
        shape[0],
        shape[1],
        file,
    )
}

fn devices() -> Vec<Device> {
    let mut d = vec![Device::CPU_REF];
    d.extend(common::gpu().map(|g| Device::Gpu(g.clone())));
    d
}

#[test]
fn activations_are_freed_after_their_last_use() {
    let (ids, targets, b, t, _) = batch();
    for dev in devices() {
        let (model, mut store) = Gpt2::load(&fixture(), &dev).unwrap();
        let (graph, vars) = model.graph(&store, b, t).unwrap();
        let feed = Gpt2::feed(&ids, &targets, b, t);
        let mut run = graph.forward(&store, &feed, &[]).unwrap();
        let kept = run.live_values();
        run.backward(&mut store, vars.loss, 1.0).unwrap();
        assert_eq!(run.live_values(), 1, "{}: after backward only the loss remains", dev.name());

        // With every parameter frozen no backward will run, so the forward pass keeps nothing
        // but its output.
        let ids_all: Vec<_> = store.iter().map(|(id, _)| id).collect();
        for id in ids_all {
            store.freeze(id);
        }
        let (graph, _) = model.graph(&store, b, t).unwrap();
        let run = graph.forward(&store, &feed, &[]).unwrap();
        assert_eq!(run.live_values(), 1, "{}: inference keeps only the loss", dev.name());
        assert!(kept > 1, "{}: training keeps what backward needs ({kept} values)", dev.name());
    }
}

#[test]
fn frozen_parameters_get_no_gradient_and_the_rest_are_unchanged() {
    let (ids, targets, b, t, expected) = batch();
    for dev in devices() {
        let (model, mut store) = Gpt2::load(&fixture(), &dev).unwrap();
        for name in ["wte.weight", "wpe.weight", "h.0.attn.c_attn.weight", "ln_f.bias"] {
            store.freeze(store.id(name).unwrap());
        }
        let (graph, vars) = model.graph(&store, b, t).unwrap();
        let mut run = graph.forward(&store, &Gpt2::feed(&ids, &targets, b, t), &[]).unwrap();
        run.backward(&mut store, vars.loss, 1.0).unwrap();
        for (_, p) in store.iter() {
            if !p.trainable {
                assert!(p.grad.is_none(), "{}: frozen {} has a gradient buffer", dev.name(), p.name);
                continue;
            }
            let want = expected.get(&format!("grad.transformer.{}", p.name)).unwrap().unwrap().1;
            let err = rel_err(&p.grad.as_ref().unwrap().to_host(&dev).unwrap(), &want);
            assert!(err <= 1e-4, "{}: {} rel err {err:e} with other weights frozen", dev.name(), p.name);
        }
    }
}

#[test]
fn a_training_step_submits_nothing_until_the_loss_is_read() {
    let Some(_) = common::gpu() else { return };
    // A device of its own: the submission counter must not see the other tests' work.
    let gpu = std::sync::Arc::new(pockettune::Gpu::new(&Default::default()).unwrap());
    let (ids, targets, b, t, _) = batch();
    let dev = Device::Gpu(gpu.clone());
    let (model, mut store) = Gpt2::load(&fixture(), &dev).unwrap();
    let (graph, vars) = model.graph(&store, b, t).unwrap();
    let feed = Gpt2::feed(&ids, &targets, b, t);
    gpu.flush().unwrap();
    let before = gpu.submissions();
    let mut run = graph.forward(&store, &feed, &[]).unwrap();
    run.backward(&mut store, vars.loss, 1.0).unwrap();
    assert_eq!(gpu.submissions(), before, "forward + backward were recorded into one pending submission");
    run.loss(vars.loss).unwrap();
    assert_eq!(gpu.submissions(), before + 1, "reading the loss submits once");
}

/// Regression: every RoPE node uploaded its cos/sin table in the forward and again in the
/// backward pass, and each upload submits the work recorded so far; the tables are made once
/// per sequence length and device.
#[test]
fn rope_tables_are_uploaded_once_not_at_every_rope_node() {
    let Some(_) = common::gpu() else { return };
    let gpu = std::sync::Arc::new(pockettune::Gpu::new(&Default::default()).unwrap());
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama-tiny");
    let dev = Device::Gpu(gpu.clone());
    let (model, mut store) = pockettune::models::Model::load(&dir, &dev).unwrap();
    let (b, t) = (2, 8);
    let ids: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 7) % model.vocab_size() as u32).collect();
    let targets: Vec<i32> = ids.iter().map(|&i| ((i + 1) % model.vocab_size() as u32) as i32).collect();
    let (graph, vars) = model.graph(&store, b, t).unwrap();
    let feed = pockettune::models::Model::feed(&ids, &targets, b, t);
    for step in 0..2 {
        gpu.flush().unwrap();
        let before = gpu.submissions();
        let mut run = graph.forward(&store, &feed, &[]).unwrap();
        run.backward(&mut store, vars.loss, 1.0).unwrap();
        if step == 1 {
            assert_eq!(gpu.submissions(), before, "a second step uploads no RoPE table");
        }
        run.loss(vars.loss).unwrap();
    }
}

/// Soft-capping's backward reads its output, not its input: the uncapped logits (vocabulary
/// wide, the largest activation of a model) are freed as soon as the cap has run, and the
/// capped ones after the last backward step that reads them.
#[test]
fn soft_capping_frees_the_uncapped_logits() {
    use pockettune::graph::{Feed, Graph, ParamStore};
    for dev in devices() {
        let (n, c, v) = (6, 4, 5);
        let mut store = ParamStore::new(dev.clone());
        let w: Vec<f32> = (0..c * v).map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0).collect();
        let x: Vec<f32> = (0..n * c).map(|i| ((i * 5 % 9) as f32 - 4.0) / 2.0).collect();
        let wid = store.add("w", &[c, v], &w, true).unwrap();
        let xid = store.add("x", &[n, c], &x, false).unwrap();
        let mut g = Graph::new();
        let (wv, xv) = (g.param(&store, wid), g.param(&store, xid));
        let logits = g.linear(xv, wv, None, false).unwrap();
        let capped = g.softcap(logits, 2.0).unwrap();
        let targets = g.target_list(v);
        let loss = g.cross_entropy(capped, targets).unwrap();
        let feed = Feed {
            ids: vec![],
            targets: vec![(0..n as i32).map(|i| i % v as i32).collect()],
            dropout_seed: None,
        };
        let mut run = g.forward(&store, &feed, &[]).unwrap();
        assert!(
            run.read(logits).is_err(),
            "{}: the uncapped logits are freed after the forward pass",
            dev.name()
        );
        assert!(run.read(capped).is_ok(), "{}: the capped logits stay for the backward pass", dev.name());
        run.backward(&mut store, loss, 1.0).unwrap();
        assert!(run.read(capped).is_err(), "{}: and go after it", dev.name());
        assert_eq!(run.live_values(), 1, "{}: only the loss remains", dev.name());
        // the gradient through the cap, against the reference functions step by step
        let (mut lg, mut y) = (vec![0f32; n * v], vec![0f32; n * v]);
        let d = kernels_ref::MatmulDims { batch: 1, m: n, n: v, k: c, trans_a: false, trans_b: false };
        kernels_ref::matmul_forward(&mut lg, &x, &w, None, d);
        kernels_ref::softcap_forward(&mut y, &lg, 2.0);
        let (mut dy, mut dl, mut dw) = (vec![0f32; n * v], vec![0f32; n * v], vec![0f32; c * v]);
        kernels_ref::cross_entropy_backward(&mut dy, &y, &feed.targets[0], 1.0, n, v);
        kernels_ref::softcap_backward(&mut dl, &lg, &dy, 2.0);
        kernels_ref::matmul_backward(None, Some(&mut dw), None, &dl, &x, &w, d);
        let got = store.get(wid).grad.as_ref().unwrap().to_host(&dev).unwrap();
        assert!(rel_err(&got, &dw) <= 1e-5, "{}: dW rel err {:e}", dev.name(), rel_err(&got, &dw));
    }
}

/// Regression (review of the op homes): a node that reads one value twice, `add(x, x)`, gets
/// both contributions to x's gradient, on every device: the same as `scale(x, 2)`.
#[test]
fn a_value_read_twice_gets_both_gradients() {
    use pockettune::graph::{Feed, Graph, ParamStore};
    let (n, v) = (3, 5);
    let data: Vec<f32> = (0..n * v).map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0).collect();
    let targets = vec![1, 4, 0];
    let mut devs = devices();
    devs.push(Device::CPU);
    for dev in devs {
        let grad = |twice: bool| {
            let mut store = ParamStore::new(dev.clone());
            let id = store.add("x", &[n, v], &data, true).unwrap();
            let mut g = Graph::new();
            let x = g.param(&store, id);
            let list = g.target_list(v);
            let y = if twice { g.add(x, x).unwrap() } else { g.scale(x, 2.0) };
            let loss = g.cross_entropy(y, list).unwrap();
            let feed = Feed { ids: vec![], targets: vec![targets.clone()], dropout_seed: None };
            let mut run = g.forward(&store, &feed, &[]).unwrap();
            run.backward(&mut store, loss, 1.0).unwrap();
            drop(run);
            store.get(id).grad.as_ref().unwrap().to_host(&dev).unwrap()
        };
        let (twice, scaled) = (grad(true), grad(false));
        let err = rel_err(&twice, &scaled);
        assert!(err <= 1e-6, "{}: add(x, x) gives {twice:?}, scale(x, 2) {scaled:?}", dev.name());
        assert!(scaled.iter().any(|&g| g != 0.0), "a gradient that is all zeros checks nothing");
    }
}
