//! Whole models against PyTorch: randomly initialised 2-layer GPT-2, Qwen2 and Llama models and
//! 3-layer Gemma 3 models (one with logit soft-capping on) made by `tools/make_fixtures.py`
//! (transformers, float32, eager attention) give logits, loss, every parameter gradient and the
//! losses of 10 AdamW steps. The GPU path and the CPU reference path
//! must both match: loss within 1e-5 relative, logits and gradients within 1e-4 of the largest
//! PyTorch value, AdamW losses within 1e-4 relative.

mod common;

use pockettune::gradcheck::rel_err;
use pockettune::graph::Device;
use pockettune::models::{Model, SafetensorsFile};
use std::path::PathBuf;

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

struct Expected {
    file: SafetensorsFile,
    ids: Vec<u32>,
    targets: Vec<i32>,
    b: usize,
    t: usize,
}

impl Expected {
    fn load(name: &str) -> Expected {
        let file = SafetensorsFile::open(&dir(name).join("expected.safetensors")).unwrap();
        let (shape, ids) = file.get("input_ids").unwrap().unwrap();
        let (_, targets) = file.get("targets").unwrap().unwrap();
        Expected {
            ids: ids.iter().map(|&x| x as u32).collect(),
            targets: targets.iter().map(|&x| x as i32).collect(),
            b: shape[0],
            t: shape[1],
            file,
        }
    }
    fn tensor(&self, name: &str) -> Vec<f32> {
        self.file.get(name).unwrap().unwrap_or_else(|| panic!("fixture has no {name}")).1
    }
}

fn check(name: &str, dev: Device) {
    let ex = Expected::load(name);
    let (model, mut store) = Model::load(&dir(name), &dev).unwrap();
    let (graph, vars) = model.graph(&store, ex.b, ex.t).unwrap();
    let feed = Model::feed(&ex.ids, &ex.targets, ex.b, ex.t);

    let run = graph.forward(&store, &feed, &[vars.logits]).unwrap();
    let loss = run.loss(vars.loss).unwrap();
    let want_loss = ex.tensor("loss")[0];
    let loss_err = ((loss - want_loss) / want_loss).abs();
    assert!(loss_err <= 1e-5, "{name} on {}: loss {loss} vs torch {want_loss}", dev.name());
    let logits_err = rel_err(&run.read(vars.logits).unwrap(), &ex.tensor("logits"));
    assert!(logits_err <= 1e-4, "{name} on {}: logits rel err {logits_err:e}", dev.name());
    eprintln!("{}: loss rel err {loss_err:e}, logits rel err {logits_err:e}", dev.name());

    let mut run = run;
    run.backward(&mut store, vars.loss, 1.0).unwrap();
    let (mut checked, mut worst) = (0, 0f64);
    for name in ex.file.names().into_iter().filter(|n| n.starts_with("grad.")) {
        let ours = name.trim_start_matches("grad.").trim_start_matches("transformer.");
        let id = store
            .id(ours)
            .or_else(|| store.id(&name["grad.".len()..]))
            .unwrap_or_else(|| panic!("no parameter {ours}"));
        let got = store.get(id).grad.as_ref().unwrap().to_host(&dev).unwrap();
        let err = rel_err(&got, &ex.tensor(&name));
        assert!(err <= 1e-4, "{name} on {}: gradient of {ours}: rel err {err:e}", dev.name());
        worst = worst.max(err);
        checked += 1;
    }
    assert_eq!(checked, store.iter().count(), "every parameter's gradient is in the fixture");
    eprintln!("{}: {checked} gradients, worst rel err {worst:e}", dev.name());

    // 10 AdamW steps on the same batch from the same start.
    let (model, mut store) = Model::load(&dir(name), &dev).unwrap();
    let (graph, vars) = model.graph(&store, ex.b, ex.t).unwrap();
    let want = ex.tensor("adamw_losses");
    let mut worst_step = 0f32;
    for (step, &w) in want.iter().enumerate() {
        store.zero_grads().unwrap();
        let mut run = graph.forward(&store, &feed, &[]).unwrap();
        let l = run.loss(vars.loss).unwrap();
        let err = ((l - w) / w).abs();
        assert!(err <= 1e-4, "{name} on {}: AdamW step {step}: loss {l} vs torch {w}", dev.name());
        worst_step = worst_step.max(err);
        run.backward(&mut store, vars.loss, 1.0).unwrap();
        store.adamw_step(common::fixture_adamw(&dir(name))).unwrap();
    }
    eprintln!("{}: 10 AdamW losses ({} .. {}), worst rel err {worst_step:e}", dev.name(), want[0], want[9]);
}

fn gpu() -> Option<Device> {
    common::gpu().map(|g| Device::Gpu(g.clone()))
}

#[test]
fn gpt2_matches_pytorch_on_the_cpu_path() {
    check("gpt2-tiny", Device::Cpu);
}

#[test]
fn gpt2_matches_pytorch_on_the_gpu() {
    gpu().into_iter().for_each(|d| check("gpt2-tiny", d));
}

#[test]
fn qwen2_matches_pytorch_on_the_cpu_path() {
    check("qwen2-tiny", Device::Cpu);
}

#[test]
fn qwen2_matches_pytorch_on_the_gpu() {
    gpu().into_iter().for_each(|d| check("qwen2-tiny", d));
}

#[test]
fn llama_matches_pytorch_on_the_cpu_path() {
    check("llama-tiny", Device::Cpu);
}

#[test]
fn llama_matches_pytorch_on_the_gpu() {
    gpu().into_iter().for_each(|d| check("llama-tiny", d));
}

#[test]
fn gemma3_matches_pytorch_on_the_cpu_path() {
    check("gemma3-tiny", Device::Cpu);
}

#[test]
fn gemma3_matches_pytorch_on_the_gpu() {
    gpu().into_iter().for_each(|d| check("gemma3-tiny", d));
}

#[test]
fn gemma2_matches_pytorch_on_the_cpu_path() {
    check("gemma2-tiny", Device::Cpu);
}

#[test]
fn gemma2_matches_pytorch_on_the_gpu() {
    gpu().into_iter().for_each(|d| check("gemma2-tiny", d));
}

#[test]
fn gemma3_with_soft_capping_matches_pytorch_on_the_cpu_path() {
    check("gemma3-tiny-softcap", Device::Cpu);
}

#[test]
fn gemma3_with_soft_capping_matches_pytorch_on_the_gpu() {
    gpu().into_iter().for_each(|d| check("gemma3-tiny-softcap", d));
}

/// The soft-capping fixture is the plain Gemma 3 fixture with both caps on (same weights, same
/// batch): its logits must differ, or the caps would not be tested at all.
#[test]
fn soft_capping_changes_the_gemma3_fixture() {
    let weights = |name| SafetensorsFile::open(&dir(name).join("model.safetensors")).unwrap();
    let (wp, wc) = (weights("gemma3-tiny"), weights("gemma3-tiny-softcap"));
    for name in wp.names() {
        assert_eq!(wp.get(&name).unwrap(), wc.get(&name).unwrap(), "{name} differs between the fixtures");
    }
    let (plain, capped) = (Expected::load("gemma3-tiny"), Expected::load("gemma3-tiny-softcap"));
    assert_eq!(plain.ids, capped.ids);
    let err = rel_err(&capped.tensor("logits"), &plain.tensor("logits"));
    assert!(err > 0.05, "capping moved the logits by only {err:e} of their size");
}
