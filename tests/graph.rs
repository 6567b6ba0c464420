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
    let mut d = vec![Device::Cpu];
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
