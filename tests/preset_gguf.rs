//! `write_random_gguf`: a preset's shape as a quantized GGUF file (what `bench step
//! --preset-quant q4_k_m` streams). The file has llama.cpp's names and the Q4_K_M storage types
//! (the tables below are written out by hand from llama.cpp's rule; the rule itself is checked
//! against the real Gemma 3 270M Q4_K_M file when it is fetched), loads back with the model's
//! shapes and a working tokenizer, and a LoRA step on it under a budget smaller than the
//! quantized weights equals the all-resident step bit for bit (the same kernels on the same
//! bytes).

mod common;

use kernels_ref::quant::GgmlType;
use kernels_ref::quant::GgmlType::{Q4_K, Q5_0, Q6_K, Q8_0};
use pockettune::graph::{Device, ParamStore};
use pockettune::memory::GraphOptions;
use pockettune::models::{write_random_gguf, LoadOptions, Model, PresetQuant};
use pockettune::weights::{BaseDtype, GgufFile};
use std::path::Path;

/// Tied Gemma 3, 6 layers: llama.cpp's "more bits" layers of 6 are 2 and 5 (every third from
/// the first eighth, 0, and the last eighth, 5..). Rows of 256 elements (Q4_K/Q6_K fit) but for
/// `ffn_down`'s 640 (Q5_0/Q8_0 then).
fn gemma() -> serde_json::Value {
    serde_json::json!({"model_type": "gemma3_text", "hidden_size": 256, "intermediate_size": 640,
        "num_hidden_layers": 6, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 128,
        "vocab_size": 300, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
        "query_pre_attn_scalar": 128, "sliding_window": 4, "sliding_window_pattern": 2,
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0})
}

/// Untied Llama, 4 layers: the "more bits" layers are 2 (every third) and 3 (the last eighth).
fn llama() -> serde_json::Value {
    serde_json::json!({"model_type": "llama", "hidden_size": 256, "intermediate_size": 640,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": false})
}

/// The expected (GGUF name, row-major shape, type) of every tensor, by hand.
fn expected(config: &serde_json::Value) -> Vec<(String, Vec<usize>, GgmlType)> {
    let f32 = GgmlType::F32;
    let mut out = Vec::new();
    if config["model_type"] == "gemma3_text" {
        out.push(("token_embd.weight".to_string(), vec![300, 256], Q6_K)); // tied: the output matrix
        for l in 0..6 {
            let more = l == 2 || l == 5;
            for (name, shape, ty) in [
                ("attn_norm", vec![256], f32),
                ("attn_q", vec![256, 256], Q4_K),
                ("attn_k", vec![128, 256], Q4_K),
                ("attn_v", vec![128, 256], if more { Q6_K } else { Q4_K }),
                ("attn_output", vec![256, 256], Q4_K),
                ("attn_q_norm", vec![128], f32),
                ("attn_k_norm", vec![128], f32),
                ("post_attention_norm", vec![256], f32),
                ("ffn_norm", vec![256], f32),
                ("ffn_gate", vec![640, 256], Q4_K),
                ("ffn_up", vec![640, 256], Q4_K),
                ("ffn_down", vec![256, 640], if more { Q8_0 } else { Q5_0 }),
                ("post_ffw_norm", vec![256], f32),
            ] {
                out.push((format!("blk.{l}.{name}.weight"), shape, ty));
            }
        }
        out.push(("output_norm.weight".into(), vec![256], f32));
    } else {
        out.push(("token_embd.weight".to_string(), vec![300, 256], Q4_K));
        for l in 0..4 {
            let more = l == 2 || l == 3;
            for (name, shape, ty) in [
                ("attn_norm", vec![256], f32),
                ("attn_q", vec![256, 256], Q4_K),
                ("attn_k", vec![128, 256], Q4_K),
                ("attn_v", vec![128, 256], if more { Q6_K } else { Q4_K }),
                ("attn_output", vec![256, 256], Q4_K),
                ("ffn_norm", vec![256], f32),
                ("ffn_gate", vec![640, 256], Q4_K),
                ("ffn_up", vec![640, 256], Q4_K),
                ("ffn_down", vec![256, 640], if more { Q8_0 } else { Q5_0 }),
            ] {
                out.push((format!("blk.{l}.{name}.weight"), shape, ty));
            }
        }
        out.push(("output_norm.weight".into(), vec![256], f32));
        out.push(("output.weight".into(), vec![300, 256], Q6_K));
    }
    out
}

fn write(config: &serde_json::Value, dir: &Path) -> std::path::PathBuf {
    let path = dir.join("model.gguf");
    write_random_gguf(config, &path, 5, PresetQuant::Q4KM).unwrap();
    path
}

#[test]
fn the_file_has_q4_k_m_types_the_model_shapes_and_a_tokenizer() {
    for config in [gemma(), llama()] {
        let tmp = tempfile::tempdir().unwrap();
        let path = write(&config, tmp.path());
        let file = GgufFile::open(&path).unwrap();
        let want = expected(&config);
        let mut got: Vec<_> = file.tensors().iter().map(|t| (t.name.clone(), t.shape(), t.ty)).collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        let mut want_sorted = want.clone();
        want_sorted.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(got, want_sorted, "{}", config["model_type"]);
        assert!(!tmp.path().join(".model.gguf.part").exists(), "the partial file is renamed");

        // loads as the model: on the CPU path every weight dequantized (values of real weights'
        // size, norms at their identity), on the GPU the matrices kept in the file's types
        let load = LoadOptions { frozen: true, base_dtype: BaseDtype::Native, stream: false };
        let (model, store) = Model::load_with(&path, &Device::CPU_REF, &load).unwrap();
        let identity = if config["model_type"] == "llama" { 1.0 } else { 0.0 };
        for (_, p) in store.iter() {
            let v = p.value.to_host(&Device::CPU_REF).unwrap();
            if p.shape.len() == 1 {
                assert!(v.iter().all(|&x| x == identity), "{}: not the identity norm", p.name);
            } else {
                let rms = (v.iter().map(|x| (x * x) as f64).sum::<f64>() / v.len() as f64).sqrt();
                assert!(v.iter().all(|x| x.abs() < 1.0), "{}: values out of range", p.name);
                assert!((1e-3..0.2).contains(&rms), "{}: rms {rms}", p.name);
            }
        }
        assert_eq!(model.vocab_size(), 300);
        if let Some(gpu) = common::gpu() {
            let (_, store) = Model::load_with(&path, &Device::Gpu(gpu.clone()), &load).unwrap();
            let packed = store.iter().filter(|(_, p)| p.shape.len() == 2).count();
            for (_, p) in store.iter().filter(|(_, p)| p.shape.len() == 2) {
                assert_ne!(p.dtype, GgmlType::F32, "{} is not kept packed", p.name);
            }
            assert_eq!(packed, want.iter().filter(|(_, s, _)| s.len() == 2).count());
        }

        // the vocabulary is bytes: text goes to byte tokens and back
        let tok = pockettune::data::Tokenizer::from_gguf(&file).unwrap();
        assert_eq!(tok.vocab_size(), 300);
        let ids = tok.encode("Hi, é!").unwrap();
        assert_eq!(tok.bos(), Some(2));
        assert_eq!(tok.eot(), 1);
        assert_eq!(tok.decode(&ids).unwrap().trim_start(), "Hi, é!");
    }
}

#[test]
fn gpt2_is_refused_by_name() {
    let cfg = serde_json::json!({"model_type": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 256,
        "n_positions": 64, "vocab_size": 300});
    let tmp = tempfile::tempdir().unwrap();
    let e = write_random_gguf(&cfg, &tmp.path().join("m.gguf"), 1, PresetQuant::Q4KM).unwrap_err();
    assert!(e.to_string().contains("GPT-2"), "{e}");
    assert!(!tmp.path().join("m.gguf").exists());
}

/// Loss and adapter gradients of one LoRA step; under `budget` (the planned smallest when 0)
/// the frozen base streams. Returns the budget used.
fn lora_step(
    path: &Path,
    dev: &Device,
    budget: Option<u64>,
    options: GraphOptions,
) -> (f32, Vec<Vec<f32>>, u64) {
    let Device::Gpu(g) = dev else { unreachable!() };
    let load = LoadOptions { frozen: true, base_dtype: BaseDtype::Native, stream: budget.is_some() };
    let (model, mut store) = Model::load_with(path, dev, &load).unwrap();
    let (graph, vars, feed) = common::small_lora_step(&model, &mut store, options);
    nonzero_b(&mut store);
    let mut used = 0;
    if let Some(budget) = budget {
        let plan = common::planned_budget(dev, &graph, &vars, &mut store, &feed);
        used = if budget == 0 { plan } else { budget };
        g.set_memory_budget(Some(used));
    }
    store.zero_grads().unwrap();
    let mut run = graph.forward(&store, &feed, &[]).unwrap();
    run.backward(&mut store, vars.loss, 1.0).unwrap();
    assert_eq!(run.streamed_resident(), 0, "every streamed weight is released after its last use");
    let loss = run.loss(vars.loss).unwrap();
    drop(run);
    let grads = store
        .iter()
        .filter(|(_, p)| p.trainable)
        .map(|(_, p)| p.grad.as_ref().expect("an adapter gradient").to_host(dev).unwrap())
        .collect();
    (loss, grads, used)
}

fn nonzero_b(store: &mut ParamStore) {
    let bs: Vec<_> = store
        .iter()
        .filter(|(_, p)| p.name.contains("lora_B"))
        .map(|(id, p)| (id, p.shape.clone()))
        .collect();
    for (k, (id, shape)) in bs.into_iter().enumerate() {
        let data: Vec<f32> =
            (0..shape.iter().product()).map(|i| ((i * 7 + k) % 13) as f32 * 0.01 - 0.06).collect();
        store.set_value(id, &data).unwrap();
    }
}

#[test]
fn a_lora_step_on_the_quantized_base_under_a_budget_equals_the_resident_step() {
    let Some(_) = common::gpu() else { return };
    for config in [gemma(), llama()] {
        let tmp = tempfile::tempdir().unwrap();
        let path = write(&config, tmp.path());
        for options in [
            GraphOptions::default(),
            GraphOptions {
                checkpoint_activations: true,
                fused_loss: true,
                flash_attention: true,
                ..Default::default()
            },
        ] {
            let what = format!("{} {options:?}", config["model_type"]);
            let resident_dev = common::own_gpu_device().unwrap();
            let resident = lora_step(&path, &resident_dev, None, options);
            let Device::Gpu(rg) = &resident_dev else { unreachable!() };
            let resident_peak = rg.bytes_allocated().1;
            let dev = common::own_gpu_device().unwrap();
            let streamed = lora_step(&path, &dev, Some(0), options);
            let Device::Gpu(g) = &dev else { unreachable!() };
            let (budget, peak) = (streamed.2, g.bytes_allocated().1);
            assert!(
                budget < resident_peak,
                "{what}: the planned budget {budget}, resident peak {resident_peak}"
            );
            assert!(peak <= budget, "{what}: held {peak} bytes, budget {budget}");
            assert!(resident.0.is_finite(), "{what}: loss {}", resident.0);
            assert_eq!(resident.0, streamed.0, "{what}: loss");
            assert_eq!(resident.1, streamed.1, "{what}: adapter gradients");
        }
    }
}

/// The storage rule against the real file: every tensor of google's Gemma 3 270M as
/// llama.cpp's Q4_K_M stores it (`bash tools/fetch_assets.sh`).
#[test]
#[ignore = "needs the real GGUF files: bash tools/fetch_assets.sh"]
fn the_rule_gives_the_real_gemma_3_270m_q4_k_m_types() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/gemma3-270m/gemma-3-270m-Q4_K_M.gguf");
    let file = GgufFile::open(&path).unwrap();
    let layers = file.get("gemma3.block_count").and_then(|v| v.as_u64()).unwrap() as usize;
    let mut mixed = std::collections::BTreeSet::new();
    for t in file.tensors() {
        let ours = PresetQuant::Q4KM.storage(&t.name, &t.shape(), layers, true);
        assert_eq!(ours, t.ty, "{} {:?}", t.name, t.shape());
        mixed.insert(t.ty.name());
    }
    // the file mixes every type of the rule, fallbacks included
    assert_eq!(mixed.len(), 5, "{mixed:?}");
}
