//! Every memory option of issue 10 is an exact rewrite of the training step: for every
//! architecture, on the GPU and on the CPU path, full fine-tuning and LoRA (with dropout), the
//! loss and every parameter gradient with an option on equal those with it off.
//!
//! - Activation checkpointing recomputes the same kernels on the same inputs (dropout masks are
//!   hashed from the step's seed and the node), so it must agree bit for bit.
//! - The fused loss and flash attention reorder sums (over vocabulary chunks, over key blocks):
//!   they agree within float32 reassociation, 2e-5 relative on the loss and 1e-4 of the largest
//!   gradient entry of each tensor (the products here sum at most a few hundred terms).

mod common;

use pockettune::graph::{Device, ParamStore};
use pockettune::lora::{self, LoraOptions};
use pockettune::memory::GraphOptions;
use pockettune::models::Model;
use rand::{Rng, SeedableRng};

fn configs() -> Vec<(&'static str, serde_json::Value)> {
    vec![
        (
            "gpt2",
            serde_json::json!({"model_type": "gpt2", "n_layer": 3, "n_head": 2, "n_embd": 32,
                "n_positions": 32, "vocab_size": 97}),
        ),
        (
            "qwen2",
            serde_json::json!({"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 48,
                "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 101,
                "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                "tie_word_embeddings": true}),
        ),
        (
            "llama",
            serde_json::json!({"model_type": "llama", "hidden_size": 32, "intermediate_size": 40,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "vocab_size": 89,
                "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                "tie_word_embeddings": false}),
        ),
        (
            "gemma3",
            serde_json::json!({"model_type": "gemma3_text", "hidden_size": 32, "intermediate_size": 48,
                "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                "vocab_size": 113, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
                "query_pre_attn_scalar": 16, "sliding_window": 3, "sliding_window_pattern": 2,
                "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "final_logit_softcapping": 30.0}),
        ),
        (
            "gemma2",
            serde_json::json!({"model_type": "gemma2", "hidden_size": 32, "intermediate_size": 48,
                "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                "vocab_size": 103, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
                "query_pre_attn_scalar": 16, "sliding_window": 4, "final_logit_softcapping": 30.0,
                "attn_logit_softcapping": 50.0}),
        ),
    ]
}

/// The loss and every trainable parameter's gradient of one step with `options`.
fn step(
    config: &serde_json::Value,
    dev: &Device,
    lora: bool,
    options: GraphOptions,
) -> (f32, Vec<(String, Vec<f32>)>) {
    let (model, mut store) = Model::random(config.clone(), dev, 3).unwrap();
    if lora {
        let targets = lora::default_targets(&model);
        let o = LoraOptions { rank: 4, alpha: 8.0, dropout: 0.25, targets };
        lora::apply(&model, &mut store, &o, 5).unwrap();
        nonzero_lora_b(&mut store);
    }
    let (b, t) = (2, 7);
    let vocab = model.vocab_size();
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let ids: Vec<u32> = (0..b * t).map(|_| rng.random_range(0..vocab as u32)).collect();
    let mut targets: Vec<i32> = (0..b * t).map(|_| rng.random_range(0..vocab as i32)).collect();
    targets[3] = -100;
    let (graph, vars) = model.graph_with(&store, b, t, options).unwrap();
    let mut feed = Model::feed(&ids, &targets, b, t);
    feed.dropout_seed = Some(99);
    store.zero_grads().unwrap();
    let mut run = graph.forward(&store, &feed, &[]).unwrap();
    run.backward(&mut store, vars.loss, 1.0).unwrap();
    let loss = run.loss(vars.loss).unwrap();
    drop(run);
    let grads = store
        .iter()
        .filter(|(_, p)| p.trainable)
        .map(|(_, p)| {
            let g = p.grad.as_ref().unwrap_or_else(|| panic!("{} has no gradient", p.name));
            (p.name.clone(), g.to_host(dev).unwrap())
        })
        .collect();
    (loss, grads)
}

/// LoRA's B starts at zero, which would leave A's gradient zero: give it values.
fn nonzero_lora_b(store: &mut ParamStore) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    let bs: Vec<_> = store
        .iter()
        .filter(|(_, p)| p.name.contains("lora_B"))
        .map(|(id, p)| (id, p.shape.clone()))
        .collect();
    for (id, shape) in bs {
        let data: Vec<f32> = (0..shape.iter().product()).map(|_| rng.random_range(-0.1f32..0.1)).collect();
        store.set_value(id, &data).unwrap();
    }
}

fn compare(what: &str, a: &(f32, Vec<(String, Vec<f32>)>), b: &(f32, Vec<(String, Vec<f32>)>), exact: bool) {
    let loss_tol = if exact { 0.0 } else { 2e-5 * a.0.abs().max(1.0) };
    assert!((a.0 - b.0).abs() <= loss_tol, "{what}: loss {} vs {}", a.0, b.0);
    assert_eq!(a.1.len(), b.1.len(), "{what}: trainable tensors");
    for ((name, x), (_, y)) in a.1.iter().zip(&b.1) {
        let scale = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{what}: {name} has a zero gradient (the test would not see a difference)");
        let tol = if exact { 0.0 } else { 1e-4 * scale };
        for (i, (p, q)) in x.iter().zip(y).enumerate() {
            assert!((p - q).abs() <= tol, "{what}: {name}[{i}] {p} vs {q} (tolerance {tol})");
        }
    }
}

fn check_device(dev: &Device, label: &str) {
    let checkpoint = GraphOptions { checkpoint_activations: true, ..GraphOptions::default() };
    let fused = GraphOptions { fused_loss: true, ..GraphOptions::default() };
    let flash = GraphOptions { flash_attention: true, ..GraphOptions::default() };
    let all = GraphOptions { fused_loss: true, flash_attention: true, checkpoint_activations: true };
    for (family, config) in configs() {
        for lora in [false, true] {
            let what = |o: &str| format!("{label} {family} {} {o}", if lora { "lora" } else { "full" });
            let plain = step(&config, dev, lora, GraphOptions::default());
            compare(&what("checkpointing"), &plain, &step(&config, dev, lora, checkpoint), true);
            compare(&what("fused loss"), &plain, &step(&config, dev, lora, fused), false);
            compare(&what("flash attention"), &plain, &step(&config, dev, lora, flash), false);
            compare(&what("all options"), &plain, &step(&config, dev, lora, all), false);
        }
    }
}

#[test]
fn every_memory_option_is_an_exact_rewrite_on_the_cpu_path() {
    check_device(&Device::Cpu, "cpu");
}

#[test]
fn every_memory_option_is_an_exact_rewrite_on_the_gpu() {
    let Some(gpu) = common::gpu() else { return };
    check_device(&Device::Gpu(gpu.clone()), "gpu");
}

/// Checkpointing keeps fewer values alive after the forward pass: the layer inputs, not
/// every activation and attention probability.
#[test]
fn checkpointing_keeps_fewer_values_after_the_forward_pass() {
    let (_, config) = &configs()[3];
    let (model, store) = Model::random(config.clone(), &Device::Cpu, 3).unwrap();
    let (b, t) = (1, 5);
    let ids = vec![1u32; b * t];
    let targets = vec![2i32; b * t];
    let feed = Model::feed(&ids, &targets, b, t);
    let live = |o: GraphOptions| {
        let (graph, _) = model.graph_with(&store, b, t, o).unwrap();
        graph.forward(&store, &feed, &[]).unwrap().live_values()
    };
    let plain = live(GraphOptions::default());
    let checkpointed = live(GraphOptions { checkpoint_activations: true, ..GraphOptions::default() });
    assert!(checkpointed * 3 < plain, "{checkpointed} values kept with checkpointing, {plain} without");
}
