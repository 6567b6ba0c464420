//! `--memory-budget`: frozen weights stream from the memory-mapped checkpoint into GPU buffers
//! layer by layer. A LoRA step under a budget smaller than the weights gives the same loss and
//! adapter gradients as the all-resident step (the same kernels on the same bytes: bit for bit),
//! the bytes the pool holds never pass the budget, and a budget too small is a clear error.
//!
//! Each test opens its own device: the budget and the peak counters are per device.

mod common;

use pockettune::graph::{Device, ParamStore};
use pockettune::lora::{self, LoraOptions};
use pockettune::memory::GraphOptions;
use pockettune::models::{LoadOptions, Model};
use pockettune::Error;
use std::path::Path;

fn configs() -> Vec<serde_json::Value> {
    vec![
        serde_json::json!({"model_type": "gpt2", "n_layer": 6, "n_head": 4, "n_embd": 256,
            "n_positions": 64, "vocab_size": 300}),
        serde_json::json!({"model_type": "gemma3_text", "hidden_size": 256, "intermediate_size": 512,
            "num_hidden_layers": 6, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 128,
            "vocab_size": 300, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
            "query_pre_attn_scalar": 128, "sliding_window": 4, "sliding_window_pattern": 2,
            "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "final_logit_softcapping": 30.0}),
    ]
}

/// Loss and adapter gradients of one LoRA step of the model in `dir`.
fn lora_step(
    dir: &Path,
    dev: &Device,
    stream: bool,
    options: GraphOptions,
) -> pockettune::Result<(f32, Vec<Vec<f32>>)> {
    let load = LoadOptions { frozen: true, stream, ..Default::default() };
    let (model, mut store) = Model::load_with(dir, dev, &load)?;
    let o = LoraOptions { rank: 4, alpha: 8.0, dropout: 0.1, targets: lora::default_targets(&model) };
    lora::apply(&model, &mut store, &o, 5)?;
    nonzero_b(&mut store)?;
    let (b, t) = (2, 9);
    let ids: Vec<u32> = (0..b * t).map(|i| (i * 37 % 300) as u32).collect();
    let targets: Vec<i32> = (0..b * t).map(|i| (i * 11 % 300) as i32).collect();
    let (graph, vars) = model.graph_with(&store, b, t, options)?;
    let mut feed = Model::feed(&ids, &targets, b, t);
    feed.dropout_seed = Some(4);
    store.zero_grads()?;
    let mut run = graph.forward(&store, &feed, &[])?;
    run.backward(&mut store, vars.loss, 1.0)?;
    assert_eq!(run.streamed_resident(), 0, "every streamed weight is released after its last use");
    let loss = run.loss(vars.loss)?;
    drop(run);
    let mut grads = Vec::new();
    for (_, p) in store.iter().filter(|(_, p)| p.trainable) {
        grads.push(p.grad.as_ref().expect("an adapter gradient").to_host(dev)?);
    }
    Ok((loss, grads))
}

fn nonzero_b(store: &mut ParamStore) -> pockettune::Result<()> {
    let bs: Vec<_> = store
        .iter()
        .filter(|(_, p)| p.name.contains("lora_B"))
        .map(|(id, p)| (id, p.shape.clone()))
        .collect();
    for (k, (id, shape)) in bs.into_iter().enumerate() {
        let data: Vec<f32> =
            (0..shape.iter().product()).map(|i| ((i * 7 + k) % 13) as f32 * 0.01 - 0.06).collect();
        store.set_value(id, &data)?;
    }
    Ok(())
}

fn weight_bytes(config: &serde_json::Value) -> u64 {
    let (_, store) = Model::random(config.clone(), &Device::CPU_REF, 0).unwrap();
    store.iter().map(|(_, p)| 4 * p.shape.iter().product::<usize>() as u64).sum()
}

#[test]
fn a_budget_smaller_than_the_weights_streams_them_and_gives_the_same_step() {
    let Some(_) = common::gpu() else { return };
    for (k, config) in configs().into_iter().enumerate() {
        let tmp = tempfile::tempdir().unwrap();
        pockettune::models::write_random(&config, tmp.path(), 7 + k as u64).unwrap();
        let weights = weight_bytes(&config);
        for options in [
            GraphOptions::default(),
            GraphOptions {
                checkpoint_activations: true,
                fused_loss: true,
                flash_attention: true,
                ..Default::default()
            },
        ] {
            let resident_dev = common::own_gpu_device().unwrap();
            let resident = lora_step(tmp.path(), &resident_dev, false, options).unwrap();
            let Device::Gpu(rg) = &resident_dev else { unreachable!() };
            let resident_peak = rg.bytes_allocated().1;

            let dev = common::own_gpu_device().unwrap();
            let Device::Gpu(g) = &dev else { unreachable!() };
            let budget = weights * 3 / 5;
            g.set_memory_budget(Some(budget));
            let streamed = lora_step(tmp.path(), &dev, true, options).unwrap();
            let peak = g.bytes_allocated().1;
            assert!(peak <= budget, "config {k}: held {peak} bytes at the peak, budget {budget}");
            assert!(peak < resident_peak, "config {k}: streaming held {peak}, resident {resident_peak}");
            assert_eq!(resident.0, streamed.0, "config {k} {options:?}: loss");
            assert_eq!(resident.1, streamed.1, "config {k} {options:?}: adapter gradients");
        }
    }
}

#[test]
fn a_budget_too_small_for_one_layer_is_a_clear_error() {
    let Some(_) = common::gpu() else { return };
    let config = &configs()[0];
    let tmp = tempfile::tempdir().unwrap();
    pockettune::models::write_random(config, tmp.path(), 3).unwrap();
    let dev = common::own_gpu_device().unwrap();
    let Device::Gpu(g) = &dev else { unreachable!() };
    g.set_memory_budget(Some(64 << 10));
    let err = lora_step(tmp.path(), &dev, true, GraphOptions::default()).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::MemoryBudget { .. }), "{text}");
    assert!(text.contains("--memory-budget 0.1 MiB") && text.contains("needs at least"), "{text}");
}

/// The planned budget is the smallest that works: training steps run under it (holding at most
/// it), and fail under one 256 bytes (one buffer granule) smaller.
#[test]
fn the_planned_budget_is_the_smallest_that_works() {
    let Some(_) = common::gpu() else { return };
    for (k, config) in configs().into_iter().enumerate() {
        let tmp = tempfile::tempdir().unwrap();
        pockettune::models::write_random(&config, tmp.path(), 11 + k as u64).unwrap();
        for options in [
            GraphOptions::default(),
            GraphOptions {
                checkpoint_activations: true,
                fused_loss: true,
                flash_attention: true,
                ..Default::default()
            },
        ] {
            let mut needed = None;
            for shortfall in [0u64, 256] {
                let dev = common::own_gpu_device().unwrap();
                let Device::Gpu(g) = &dev else { unreachable!() };
                let load = LoadOptions { frozen: true, stream: true, ..Default::default() };
                let (model, mut store) = Model::load_with(tmp.path(), &dev, &load).unwrap();
                let (graph, vars, feed) = common::small_lora_step(&model, &mut store, options);
                let plan = common::planned_budget(&dev, &graph, &vars, &mut store, &feed);
                assert!(needed.is_none_or(|n| n == plan), "the plan is the same on every device");
                needed = Some(plan);
                let budget = plan - shortfall;
                g.set_memory_budget(Some(budget));
                // three steps: from the second on, gradients and moments live the whole step
                let result = (|| -> pockettune::Result<()> {
                    for _ in 0..3 {
                        store.zero_grads()?;
                        let mut run = graph.forward(&store, &feed, &[])?;
                        run.backward(&mut store, vars.loss, 1.0)?;
                        run.loss(vars.loss)?;
                        drop(run);
                        store.clip_grad_norm(1.0)?;
                        store.adamw_step(pockettune::kernels::optim::AdamW {
                            lr: 1e-3,
                            beta1: 0.9,
                            beta2: 0.999,
                            eps: 1e-8,
                            weight_decay: 0.0,
                        })?;
                    }
                    g.sync()
                })();
                let what = format!("config {k} {options:?}: budget {budget} (plan {plan})");
                if shortfall == 0 {
                    result.unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert!(g.bytes_allocated().1 <= budget, "{what}: held {}", g.bytes_allocated().1);
                } else {
                    let err = result.expect_err(&what);
                    assert!(matches!(err, Error::MemoryBudget { .. }), "{what}: {err}");
                    let flags = pockettune::memory::MemoryFlags::default();
                    let refused = pockettune::memory::check_budget(
                        Some(budget),
                        Some(plan),
                        common::SMALL_LORA_BT.0,
                        common::SMALL_LORA_BT.1,
                        &flags,
                    )
                    .unwrap_err();
                    assert!(refused.to_string().contains(&pockettune::memory::mib(plan)), "{refused}");
                }
            }
        }
    }
}

/// Running out of device memory in the middle of a run is a clear error that names the intact
/// checkpoint, which a resumed run (with room again) continues from.
#[test]
fn running_out_mid_run_keeps_the_last_checkpoint_and_says_so() {
    let Some(_) = common::gpu() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (model, data, out) = (tmp.path().join("model"), tmp.path().join("data.txt"), tmp.path().join("out"));
    common::tiny_model_dir(&model, 3);
    std::fs::write(&data, "a b c d e f g h i j k l m n o p q r s t u v w x y z ".repeat(20)).unwrap();
    let train = |extra: &[&str], env: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pockettune"));
        cmd.env("POCKETTUNE_MATMUL_AUTOTUNE", "off"); // the user's cache stays untouched
        cmd.args(["train", "--model"]).arg(&model).arg("--data").arg(&data).arg("--out").arg(&out);
        cmd.args(["--steps", "4", "--save-every", "1", "--batch-size", "2", "--seq-len", "16"]).args(extra);
        if let Some(spec) = env {
            cmd.env("POCKETTUNE_TEST_BUDGET_AT_STEP", spec);
        }
        cmd.output().unwrap()
    };
    // before step 3 the device is held to 4 KiB: the step's first buffer does not fit
    let failed = train(&[], Some("2:4096"));
    let text = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success(), "{text}");
    assert!(text.contains("--memory-budget 0.0 MiB") && text.contains("at step 3"), "{text}");
    assert!(
        text.contains("step-000002") && text.contains("is intact") && text.contains("--resume"),
        "{text}"
    );
    let latest = std::fs::read_to_string(out.join("latest")).unwrap();
    assert_eq!(latest.trim(), "step-000002");
    let resumed = train(&["--resume"], None);
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    assert_eq!(std::fs::read_to_string(out.join("latest")).unwrap().trim(), "step-000004");
}

/// A large tied (Gemma 3) or untied (Llama) vocabulary under a budget of a quarter of the
/// weights with the fused loss: the embedding and LM head are never uploaded whole (the
/// look-up gathers its rows on the host, the head walk uploads one vocabulary chunk's rows at
/// a time: 10 chunks of at most 16,384 rows), the device's weight bytes stay below one
/// table, and the step equals the resident one bit for bit (the same chunks either way).
#[test]
fn a_large_vocabulary_streams_by_rows_under_a_quarter_of_the_weights() {
    let Some(_) = common::gpu() else { return };
    let vocab = 150_000;
    let configs = [
        serde_json::json!({"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
            "vocab_size": vocab, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
            "query_pre_attn_scalar": 32, "sliding_window": 4, "sliding_window_pattern": 2,
            "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "final_logit_softcapping": 30.0}),
        serde_json::json!({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": vocab, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": false}),
    ];
    let options = GraphOptions { fused_loss: true, ..Default::default() };
    for (k, config) in configs.iter().enumerate() {
        let tmp = tempfile::tempdir().unwrap();
        pockettune::models::write_random(config, tmp.path(), 40 + k as u64).unwrap();
        let weights = weight_bytes(config);
        let table = 4 * vocab as u64 * 64;
        let resident = lora_step(tmp.path(), &common::own_gpu_device().unwrap(), false, options).unwrap();
        let dev = common::own_gpu_device().unwrap();
        let Device::Gpu(g) = &dev else { unreachable!() };
        let budget = weights / 4;
        g.set_memory_budget(Some(budget));
        let streamed =
            lora_step(tmp.path(), &dev, true, options).unwrap_or_else(|e| panic!("config {k}: {e}"));
        let peak = g.bytes_allocated().1;
        let weight_peak =
            g.bytes_by_category().iter().find(|c| c.0 == pockettune::gpu::Category::Weights).unwrap().2;
        assert!(peak <= budget, "config {k}: held {peak} bytes, budget {budget}");
        assert!(weight_peak < table / 2, "config {k}: {weight_peak} bytes of weights at once, table {table}");
        assert_eq!(resident.0, streamed.0, "config {k}: loss");
        assert_eq!(resident.1, streamed.1, "config {k}: adapter gradients");
        eprintln!(
            "config {k}: peak {peak} bytes (weights {weight_peak}) under {budget}; tables {table} each"
        );
    }
}
