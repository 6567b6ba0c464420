//! Shared by the GPU test files: one device per test binary, opened under the mobile profile.
//! Without an adapter the GPU tests fail in CI (`CI` set) and say why they skip elsewhere.

use pockettune::graph::Device;
use pockettune::{Gpu, GpuOptions, Profile};
use std::sync::{Arc, OnceLock};

#[allow(dead_code)]
pub fn gpu() -> Option<&'static Arc<Gpu>> {
    static GPU: OnceLock<Option<Arc<Gpu>>> = OnceLock::new();
    GPU.get_or_init(|| {
        let opts = GpuOptions { device: None, profile: Profile::Mobile };
        match Gpu::new(&opts) {
            Ok(g) => {
                eprintln!("GPU tests on {} (mobile limits)", g.summary());
                Some(Arc::new(g))
            }
            Err(e) if std::env::var_os("CI").is_some() => {
                panic!("CI is set and no GPU adapter could be opened: {e}")
            }
            Err(e) => {
                eprintln!("skipping GPU test: {e}");
                None
            }
        }
    })
    .as_ref()
}

/// The shared device as the graph's [`Device`].
#[allow(dead_code)]
pub fn gpu_device() -> Option<Device> {
    gpu().map(|g| Device::Gpu(g.clone()))
}

/// A device of the test's own, opened where the shared one opens (so it fails in CI without
/// an adapter too): a memory budget or a peak counter set on it stays out of other tests.
#[allow(dead_code)]
pub fn own_gpu_device() -> Option<Device> {
    gpu()?;
    let g = Gpu::new(&GpuOptions { device: None, profile: Profile::Mobile }).expect("a second device");
    Some(Device::Gpu(Arc::new(g)))
}

/// GPT-2's byte-to-character table (printable bytes stand for themselves, the rest are moved
/// above 255), so that a byte-level BPE vocabulary can be written without merges.
#[allow(dead_code)]
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap()
            }
        })
        .collect()
}

/// A model directory with a random 2-layer GPT-2 (vocabulary 257: the 256 bytes and
/// `<|endoftext|>`) and a matching byte-level tokenizer.json.
#[allow(dead_code)]
pub fn tiny_model_dir(dir: &std::path::Path, seed: u64) {
    use pockettune::models::gpt2::{Gpt2, Gpt2Config};
    use rand::{Rng, SeedableRng};
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64, "vocab_size": 257,
        "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let cfg: Gpt2Config = serde_json::from_value(config).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Gpt2::param_shapes(&cfg)
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let data = if name.contains("ln_") && name.ends_with(".weight") {
                vec![1.0; n]
            } else {
                (0..n).map(|_| rng.random_range(-0.1f32..0.1)).collect()
            };
            (name, shape, data)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    s.clone(),
                    bytemuck::cast_slice(d),
                )
                .unwrap(),
            )
        })
        .collect();
    std::fs::write(dir.join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();

    let vocab: serde_json::Map<String, serde_json::Value> =
        byte_chars().into_iter().enumerate().map(|(i, c)| (c.to_string(), serde_json::json!(i))).collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 256, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": true, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
}

/// The AdamW hyperparameters a fixture was made with (`adamw.json` in its directory).
#[allow(dead_code)]
pub fn fixture_adamw(dir: &std::path::Path) -> pockettune::kernels::optim::AdamW {
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adamw.json")).unwrap()).unwrap();
    let f = |v: &serde_json::Value| v.as_f64().unwrap() as f32;
    pockettune::kernels::optim::AdamW {
        lr: f(&cfg["lr"]),
        beta1: f(&cfg["betas"][0]),
        beta2: f(&cfg["betas"][1]),
        eps: f(&cfg["eps"]),
        weight_decay: f(&cfg["weight_decay"]),
    }
}

/// A fixture tensor against ours, as `rel_err` (largest difference over the largest fixture
/// value). At a real vocabulary (`tools/make_fixtures.py`, above BIG_VOCAB) the fixture keeps,
/// of a tensor with a vocabulary axis (logits, embedding and LM-head gradients), only the rows
/// listed in `vocab_rows`, with the whole tensor's sum of squares in `sumsq.<name>`: ours is
/// then cut to the same rows, and the larger of that error and the sum of squares' relative
/// error is returned.
#[allow(dead_code)]
pub fn fixture_err(ex: &pockettune::models::SafetensorsFile, name: &str, ours: &[f32]) -> f64 {
    use pockettune::gradcheck::rel_err;
    let (shape, want) = ex.get(name).unwrap().unwrap_or_else(|| panic!("fixture has no {name}"));
    let Some((_, sumsq)) = ex.get(&format!("sumsq.{name}")).unwrap() else {
        return rel_err(ours, &want);
    };
    let rows = ex.get("vocab_rows").unwrap().expect("a fixture with sums of squares lists vocab_rows").1;
    let axis = shape.iter().position(|&d| d == rows.len()).expect("the fixture's vocabulary axis");
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let vocab = ours.len() / (outer * inner);
    assert_eq!(outer * vocab * inner, ours.len(), "{name}: {} values for shape {shape:?}", ours.len());
    let cut: Vec<f32> = (0..outer)
        .flat_map(|o| {
            rows.iter().flat_map(move |&r| (0..inner).map(move |i| (o * vocab + r as usize) * inner + i))
        })
        .map(|at| ours[at])
        .collect();
    let ss: f64 = ours.iter().map(|&x| x as f64 * x as f64).sum();
    let want_ss = sumsq[0] as f64;
    rel_err(&cut, &want).max(((ss - want_ss) / want_ss).abs())
}

/// A PyTorch parity fixture's `expected.safetensors`: the batch (ids, targets, B, T) and the
/// tensors transformers computed (logits, loss, gradients).
#[allow(dead_code)]
pub struct Expected {
    pub file: pockettune::models::SafetensorsFile,
    pub ids: Vec<u32>,
    pub targets: Vec<i32>,
    pub b: usize,
    pub t: usize,
}

#[allow(dead_code)]
impl Expected {
    /// The fixture `tests/fixtures/<name>`.
    pub fn load(name: &str) -> Expected {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
        let file = pockettune::models::SafetensorsFile::open(&dir.join("expected.safetensors")).unwrap();
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
    pub fn tensor(&self, name: &str) -> Vec<f32> {
        self.file.get(name).unwrap().unwrap_or_else(|| panic!("fixture has no {name}")).1
    }
}

/// Tiny configs of every family, each feature the memory options touch switched on somewhere:
/// GPT-2 (packed q|k|v), Qwen2 (tied head, GQA), Llama (untied head), Gemma 3 (sliding window,
/// a strong final soft-cap of 3 so its derivative matters) and Gemma 2 (attention soft-cap).
#[allow(dead_code)]
pub fn family_configs() -> Vec<(&'static str, serde_json::Value)> {
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
                "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "final_logit_softcapping": 3.0}),
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

/// A step's loss and every trainable parameter's gradient (by name, in store order).
#[allow(dead_code)]
pub type Step = (f32, Vec<(String, Vec<f32>)>);

/// One training step of a random model of `config` at `b` x `t` with the graph built with
/// `options`: full fine-tuning, or LoRA (rank 4, dropout 0.25, B made non-zero so that A's
/// gradient is not zero). Random ids, one ignored target, dropout on.
#[allow(dead_code)]
pub fn model_step(
    config: &serde_json::Value,
    dev: &pockettune::graph::Device,
    lora: bool,
    options: pockettune::memory::GraphOptions,
    (b, t): (usize, usize),
) -> Step {
    use pockettune::models::Model;
    use rand::{Rng, SeedableRng};
    let (model, mut store) = Model::random(config.clone(), dev, 3).unwrap();
    if lora {
        let targets = pockettune::lora::default_targets(&model);
        let o = pockettune::lora::LoraOptions { rank: 4, alpha: 8.0, dropout: 0.25, targets };
        pockettune::lora::apply(&model, &mut store, &o, 5).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(23);
        let bs: Vec<_> = store
            .iter()
            .filter(|(_, p)| p.name.contains("lora_B"))
            .map(|(id, p)| (id, p.shape.clone()))
            .collect();
        for (id, shape) in bs {
            let data: Vec<f32> =
                (0..shape.iter().product()).map(|_| rng.random_range(-0.1f32..0.1)).collect();
            store.set_value(id, &data).unwrap();
        }
    }
    let vocab = model.vocab_size();
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let ids: Vec<u32> = (0..b * t).map(|_| rng.random_range(0..vocab as u32)).collect();
    let mut targets: Vec<i32> = (0..b * t).map(|_| rng.random_range(0..vocab as i32)).collect();
    targets[b * t / 2] = -100;
    let (graph, vars) = model.graph_with(&store, b, t, options).unwrap();
    assert_eq!(vars.logits.is_none(), options.fused_loss, "the fused graph has no logits");
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

/// Two steps agree: bit for bit when `exact`, else within float32 reassociation (2e-5 relative
/// on the loss, 1e-4 of each gradient's largest entry). Every gradient must be non-zero, or the
/// comparison could not see a difference.
#[allow(dead_code)]
pub fn compare_steps(what: &str, a: &Step, b: &Step, exact: bool) {
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

/// (batch, sequence) of [`small_lora_step`].
#[allow(dead_code)]
pub const SMALL_LORA_BT: (usize, usize) = (2, 9);

/// The small LoRA step the streaming tests share: rank 4, alpha 8, dropout 0.1 on the model's
/// default targets (adapter seed 5), batch 2 x 9 of ids and targets below 300, dropout seed 4.
#[allow(dead_code)]
pub fn small_lora_step(
    model: &pockettune::models::Model,
    store: &mut pockettune::graph::ParamStore,
    options: pockettune::memory::GraphOptions,
) -> (pockettune::graph::Graph, pockettune::models::Vars, pockettune::graph::Feed) {
    use pockettune::lora::{self, LoraOptions};
    let o = LoraOptions { rank: 4, alpha: 8.0, dropout: 0.1, targets: lora::default_targets(model) };
    lora::apply(model, store, &o, 5).unwrap();
    let (b, t) = SMALL_LORA_BT;
    let ids: Vec<u32> = (0..b * t).map(|i| (i * 37 % 300) as u32).collect();
    let targets: Vec<i32> = (0..b * t).map(|i| (i * 11 % 300) as i32).collect();
    let (graph, vars) = model.graph_with(store, b, t, options).unwrap();
    let mut feed = pockettune::models::Model::feed(&ids, &targets, b, t);
    feed.dropout_seed = Some(4);
    (graph, vars, feed)
}

/// The smallest `--memory-budget` the planner finds for one step of `graph` (GPU only).
#[allow(dead_code)]
pub fn planned_budget(
    dev: &Device,
    graph: &pockettune::graph::Graph,
    vars: &pockettune::models::Vars,
    store: &mut pockettune::graph::ParamStore,
    feed: &pockettune::graph::Feed,
) -> u64 {
    let offload = pockettune::memory::OptimizerOffload::None;
    pockettune::memory::smallest_budget(dev, graph, vars.loss, store, feed, offload)
        .unwrap()
        .expect("a GPU plan")
}
