//! Whole models against PyTorch: randomly initialised 2-layer GPT-2, Qwen2 and Llama models and
//! 3-layer Gemma 3 models (one with logit soft-capping on) made by `tools/make_fixtures.py`
//! (transformers, float32, eager attention) give logits, loss, every parameter gradient and the
//! losses of 10 AdamW steps. Two more are tiny but for their real vocabularies (Qwen2.5's
//! 151,936 rows, Gemma 3's 262,144; weights in bfloat16; 5 AdamW steps), where only some
//! vocabulary rows of the logits and of the embedding gradient are kept, with the whole
//! tensor's sum of squares. The GPU path and both CPU paths (fast and reference) must match: loss
//! within 1e-5 relative, logits and gradients within 1e-4 of the largest PyTorch value (sums of
//! squares within 1e-4 relative), AdamW losses within 1e-4 relative.

mod common;

use pockettune::gradcheck::rel_err;
use pockettune::graph::Device;
use pockettune::memory::GraphOptions;
use pockettune::models::{Model, SafetensorsFile};
use std::path::PathBuf;

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn check(name: &str, dev: Device) {
    check_with(name, dev, GraphOptions::default());
}

/// The fixture's loss, logits (where the graph has them: not with the fused loss), every
/// gradient and the losses of its AdamW steps, with the graph built with `options`.
fn check_with(name: &str, dev: Device, options: GraphOptions) {
    let ex = common::Expected::load(name);
    let (model, mut store) = Model::load(&dir(name), &dev).unwrap();
    let (graph, vars) = model.graph_with(&store, ex.b, ex.t, options).unwrap();
    let feed = Model::feed(&ex.ids, &ex.targets, ex.b, ex.t);

    let run = graph.forward(&store, &feed, vars.logits.as_slice()).unwrap();
    let loss = run.loss(vars.loss).unwrap();
    let want_loss = ex.tensor("loss")[0];
    let loss_err = ((loss - want_loss) / want_loss).abs();
    assert!(loss_err <= 1e-5, "{name} on {}: loss {loss} vs torch {want_loss}", dev.name());
    if let Some(logits) = vars.logits {
        let logits_err = common::fixture_err(&ex.file, "logits", &run.read(logits).unwrap());
        assert!(logits_err <= 1e-4, "{name} on {}: logits rel err {logits_err:e}", dev.name());
        eprintln!("{}: loss rel err {loss_err:e}, logits rel err {logits_err:e}", dev.name());
    }

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
        let err = common::fixture_err(&ex.file, &name, &got);
        assert!(err <= 1e-4, "{name} on {}: gradient of {ours}: rel err {err:e}", dev.name());
        worst = worst.max(err);
        checked += 1;
    }
    assert_eq!(checked, store.iter().count(), "every parameter's gradient is in the fixture");
    eprintln!("{}: {checked} gradients, worst rel err {worst:e}", dev.name());

    // The fixture's AdamW steps on the same batch from the same start.
    let (model, mut store) = Model::load(&dir(name), &dev).unwrap();
    let (graph, vars) = model.graph_with(&store, ex.b, ex.t, options).unwrap();
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
    let last = want[want.len() - 1];
    eprintln!(
        "{}: {} AdamW losses ({} .. {last}), worst rel err {worst_step:e}",
        dev.name(),
        want.len(),
        want[0]
    );
}

const FAMILIES: [&str; 6] =
    ["gpt2-tiny", "qwen2-tiny", "llama-tiny", "gemma3-tiny", "gemma2-tiny", "gemma3-tiny-softcap"];
const ALL_OPTIONS: GraphOptions = GraphOptions {
    fused_loss: true,
    flash_attention: true,
    checkpoint_activations: true,
    activations: pockettune::memory::ActivationStore::F32,
};

/// Issue 10: the memory options are exact rewrites, so PyTorch's numbers hold with all of them
/// on (same tolerances as above).
#[test]
fn every_family_matches_pytorch_with_every_memory_option_on_the_cpu_path() {
    FAMILIES.iter().for_each(|f| check_with(f, Device::CPU_REF, ALL_OPTIONS));
}

#[test]
fn every_family_matches_pytorch_with_every_memory_option_on_the_gpu() {
    common::gpu_device()
        .into_iter()
        .for_each(|d| FAMILIES.iter().for_each(|f| check_with(f, d.clone(), ALL_OPTIONS)));
}

/// Issue 12: the fast CPU path (f32, `gemm`, threaded) is held to the GPU's tolerances on every
/// family, with and without the memory options.
#[test]
fn every_family_matches_pytorch_on_the_fast_cpu_path() {
    FAMILIES.iter().for_each(|f| check(f, Device::CPU));
    FAMILIES.iter().for_each(|f| check_with(f, Device::CPU, ALL_OPTIONS));
}

#[test]
fn real_vocabularies_match_pytorch_on_the_fast_cpu_path() {
    check("qwen2-tiny-vocab151936", Device::CPU);
    check("gemma3-tiny-vocab262144", Device::CPU);
}

#[test]
fn gpt2_matches_pytorch_on_the_cpu_path() {
    check("gpt2-tiny", Device::CPU_REF);
}

#[test]
fn gpt2_matches_pytorch_on_the_gpu() {
    common::gpu_device().into_iter().for_each(|d| check("gpt2-tiny", d));
}

#[test]
fn qwen2_matches_pytorch_on_the_cpu_path() {
    check("qwen2-tiny", Device::CPU_REF);
}

#[test]
fn qwen2_matches_pytorch_on_the_gpu() {
    common::gpu_device().into_iter().for_each(|d| check("qwen2-tiny", d));
}

#[test]
fn llama_matches_pytorch_on_the_cpu_path() {
    check("llama-tiny", Device::CPU_REF);
}

#[test]
fn llama_matches_pytorch_on_the_gpu() {
    common::gpu_device().into_iter().for_each(|d| check("llama-tiny", d));
}

#[test]
fn gemma3_matches_pytorch_on_the_cpu_path() {
    check("gemma3-tiny", Device::CPU_REF);
}

#[test]
fn gemma3_matches_pytorch_on_the_gpu() {
    common::gpu_device().into_iter().for_each(|d| check("gemma3-tiny", d));
}

#[test]
fn gemma2_matches_pytorch_on_the_cpu_path() {
    check("gemma2-tiny", Device::CPU_REF);
}

#[test]
fn gemma2_matches_pytorch_on_the_gpu() {
    common::gpu_device().into_iter().for_each(|d| check("gemma2-tiny", d));
}

#[test]
fn gemma3_with_soft_capping_matches_pytorch_on_the_cpu_path() {
    check("gemma3-tiny-softcap", Device::CPU_REF);
}

#[test]
fn gemma3_with_soft_capping_matches_pytorch_on_the_gpu() {
    common::gpu_device().into_iter().for_each(|d| check("gemma3-tiny-softcap", d));
}

// Regression (issue 8): on lavapipe the LM head's dX product, whose inner dimension is the
// vocabulary, lost every term past 65,535; no fixture had a vocabulary that large.

#[test]
fn qwen2_at_the_qwen25_vocabulary_matches_pytorch_on_the_cpu_path() {
    check("qwen2-tiny-vocab151936", Device::CPU_REF);
}

#[test]
fn qwen2_at_the_qwen25_vocabulary_matches_pytorch_on_the_gpu() {
    common::gpu_device().into_iter().for_each(|d| check("qwen2-tiny-vocab151936", d));
}

#[test]
fn gemma3_at_its_262144_vocabulary_matches_pytorch_on_the_cpu_path() {
    check("gemma3-tiny-vocab262144", Device::CPU_REF);
}

#[test]
fn gemma3_at_its_262144_vocabulary_matches_pytorch_on_the_gpu() {
    common::gpu_device().into_iter().for_each(|d| check("gemma3-tiny-vocab262144", d));
}

/// The real-vocabulary fixtures reach what they are for: the real row counts, input and target
/// ids past 2^16 and 2^17 and at the last row, each kept among the checked rows, and weights
/// stored in bfloat16 as the real checkpoints are.
#[test]
fn real_vocabulary_fixtures_cross_two_to_the_16_and_17() {
    for (name, vocab) in [("qwen2-tiny-vocab151936", 151_936), ("gemma3-tiny-vocab262144", 262_144)] {
        let (model, _) = Model::load(&dir(name), &Device::CPU_REF).unwrap();
        assert_eq!(model.vocab_size(), vocab, "{name}");
        let ex = common::Expected::load(name);
        let rows: Vec<u32> = ex.tensor("vocab_rows").iter().map(|&r| r as u32).collect();
        let targets: Vec<u32> = ex.targets.iter().filter(|&&t| t >= 0).map(|&t| t as u32).collect();
        for ids in [&ex.ids, &targets] {
            for at in [65_536, 131_072, vocab as u32 - 1] {
                assert!(ids.iter().any(|&i| i >= at), "{name}: no id from {at} on");
            }
            assert!(ids.iter().all(|i| rows.contains(i)), "{name}: an id outside vocab_rows");
        }
        let bytes = std::fs::read(dir(name).join("model.safetensors")).unwrap();
        let embedding =
            safetensors::SafeTensors::deserialize(&bytes).unwrap().tensor("model.embed_tokens.weight");
        assert_eq!(embedding.unwrap().dtype(), safetensors::Dtype::BF16, "{name}: bfloat16 weights");
        assert!(ex.file.get("sumsq.logits").unwrap().is_some(), "{name}: logits kept in part");
    }
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
    let (plain, capped) =
        (common::Expected::load("gemma3-tiny"), common::Expected::load("gemma3-tiny-softcap"));
    assert_eq!(plain.ids, capped.ids);
    let err = rel_err(&capped.tensor("logits"), &plain.tensor("logits"));
    assert!(err > 0.05, "capping moved the logits by only {err:e} of their size");
}
