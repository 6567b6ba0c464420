//! GGUF models. Each PyTorch parity fixture (a Hugging Face checkpoint with the logits, loss and
//! gradients transformers computed) is converted here to a GGUF file the way llama.cpp's
//! converter writes one (its tensor names; Llama Q/K rows interleaved per head; Gemma norms
//! stored as `1 + w`; GPT-2's Conv1D weights stored (out, in); the config as `<arch>.*`
//! metadata), loaded back through `--model FILE.gguf`'s path, and must give transformers'
//! logits and loss. The conversion below is written from the converter's description, apart
//! from the reader's own inverse mapping, so a wrong name, permutation or offset fails here.
//! Also: the reader on truncated, random and corrupted bytes (errors naming file and tensor,
//! no panic), and the real Gemma 3 270M / SmolLM2 files when fetched (`#[ignore]`).

#[allow(dead_code)]
mod common;

use kernels_ref::quant::GgmlType;
use pockettune::graph::Device;
use pockettune::models::{Model, SafetensorsFile};
use pockettune::weights::gguf::{GgufFile, GgufWriter, MetaValue};
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// llama.cpp's interleaving of a head's two row halves: GGUF row `2j + i` = HF row `i*d/2 + j`.
fn permute_rows(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let (d, half) = (rows / heads, rows / heads / 2);
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for j in 0..half {
            for i in 0..2 {
                let (dst, src) = (h * d + 2 * j + i, h * d + i * half + j);
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The GGUF name of a Hugging Face tensor, as llama.cpp's converter names it.
fn converter_name(arch: &str, hf: &str) -> String {
    let hf = hf.trim_start_matches("transformer.");
    let direct = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("wte.weight", "token_embd.weight"),
        ("wpe.weight", "position_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("ln_f.weight", "output_norm.weight"),
        ("ln_f.bias", "output_norm.bias"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = direct.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let (layer, rest) = if let Some(r) = hf.strip_prefix("h.") {
        r.split_once('.').unwrap()
    } else {
        hf.strip_prefix("model.layers.").unwrap().split_once('.').unwrap()
    };
    let gemma = arch.starts_with("gemma");
    let table: &[(&str, &str)] = &[
        ("ln_1", "attn_norm"),
        ("attn.c_attn", "attn_qkv"),
        ("attn.c_proj", "attn_output"),
        ("ln_2", "ffn_norm"),
        ("mlp.c_fc", "ffn_up"),
        ("mlp.c_proj", "ffn_down"),
        ("input_layernorm", "attn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("self_attn.q_norm", "attn_q_norm"),
        ("self_attn.k_norm", "attn_k_norm"),
        ("post_attention_layernorm", if gemma { "post_attention_norm" } else { "ffn_norm" }),
        ("pre_feedforward_layernorm", "ffn_norm"),
        ("post_feedforward_layernorm", "post_ffw_norm"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ];
    let (module, suffix) = rest.rsplit_once('.').unwrap();
    let g = table.iter().find(|(h, _)| *h == module).unwrap_or_else(|| panic!("no GGUF name for {hf}")).1;
    format!("blk.{layer}.{g}.{suffix}")
}

/// A GGUF file holding the fixture's model, as llama.cpp converts it, with every tensor
/// stored as f32 (or, with `half`, every matrix as f16).
fn convert(name: &str, half: bool) -> Vec<u8> {
    let dir = fixture(name);
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let st = SafetensorsFile::open(&dir.join("model.safetensors")).unwrap();
    let model_type = cfg["model_type"].as_str().unwrap();
    let arch = match model_type {
        "gemma3_text" => "gemma3",
        a => a,
    };
    let u = |k: &str| cfg[k].as_u64().unwrap();
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::Str(arch.into()));
    let key = |k: &str| format!("{arch}.{k}");
    let theta = |c: &Value| c["rope_parameters"]["rope_theta"].as_f64();
    if arch == "gpt2" {
        w.meta(&key("context_length"), MetaValue::U32(u("n_positions") as u32))
            .meta(&key("embedding_length"), MetaValue::U32(u("n_embd") as u32))
            .meta(&key("block_count"), MetaValue::U32(u("n_layer") as u32))
            .meta(&key("feed_forward_length"), MetaValue::U32(4 * u("n_embd") as u32))
            .meta(&key("attention.head_count"), MetaValue::U32(u("n_head") as u32))
            .meta(
                &key("attention.layer_norm_epsilon"),
                MetaValue::F32(cfg["layer_norm_epsilon"].as_f64().unwrap() as f32),
            );
    } else {
        let heads = u("num_attention_heads");
        w.meta(&key("context_length"), MetaValue::U32(u("max_position_embeddings") as u32))
            .meta(&key("embedding_length"), MetaValue::U32(u("hidden_size") as u32))
            .meta(&key("block_count"), MetaValue::U32(u("num_hidden_layers") as u32))
            .meta(&key("feed_forward_length"), MetaValue::U32(u("intermediate_size") as u32))
            .meta(&key("attention.head_count"), MetaValue::U32(heads as u32))
            .meta(&key("attention.head_count_kv"), MetaValue::U32(u("num_key_value_heads") as u32))
            .meta(
                &key("attention.layer_norm_rms_epsilon"),
                MetaValue::F32(cfg["rms_norm_eps"].as_f64().unwrap() as f32),
            );
        let head_dim = cfg["head_dim"].as_u64().unwrap_or(u("hidden_size") / heads);
        w.meta(&key("attention.key_length"), MetaValue::U32(head_dim as u32));
        w.meta(&key("rope.dimension_count"), MetaValue::U32(head_dim as u32));
        if arch.starts_with("gemma") {
            w.meta(&key("attention.sliding_window"), MetaValue::U32(u("sliding_window") as u32));
            let types = cfg["layer_types"].as_array().unwrap();
            let pattern = types.iter().position(|t| t == "full_attention").unwrap() + 1;
            w.meta(&key("attention.sliding_window_pattern"), MetaValue::U32(pattern as u32));
            let rope = if arch == "gemma3" {
                cfg["rope_parameters"]["full_attention"]["rope_theta"].as_f64()
            } else {
                theta(&cfg)
            };
            w.meta(&key("rope.freq_base"), MetaValue::F32(rope.unwrap() as f32));
            for cap in ["final_logit_softcapping", "attn_logit_softcapping"] {
                if let Some(c) = cfg[cap].as_f64() {
                    w.meta(&key(cap), MetaValue::F32(c as f32));
                }
            }
        } else {
            w.meta(&key("rope.freq_base"), MetaValue::F32(theta(&cfg).unwrap() as f32));
        }
    }
    for hf in st.names() {
        let (shape, mut v) = st.get(&hf).unwrap().unwrap();
        let gname = converter_name(arch, &hf);
        let mut gshape = shape.clone();
        if arch == "llama" && (hf.contains("q_proj") || hf.contains("k_proj")) {
            let heads =
                if hf.contains("q_proj") { u("num_attention_heads") } else { u("num_key_value_heads") };
            v = permute_rows(&v, shape[0], shape[1], heads as usize);
        }
        if arch.starts_with("gemma") && hf.ends_with("norm.weight") {
            v.iter_mut().for_each(|x| *x += 1.0);
        }
        if arch == "gpt2" && shape.len() == 2 && !hf.contains("wte") && !hf.contains("wpe") {
            let (r, c) = (shape[0], shape[1]);
            let mut t = vec![0f32; v.len()];
            for i in 0..r {
                for j in 0..c {
                    t[j * r + i] = v[i * c + j];
                }
            }
            v = t;
            gshape = vec![c, r];
        }
        if half && gshape.len() == 2 {
            let bytes = v.iter().flat_map(|x| ::half::f16::from_f32(*x).to_le_bytes()).collect();
            w.tensor(&gname, &gshape, GgmlType::F16, bytes);
        } else {
            w.tensor(&gname, &gshape, GgmlType::F32, f32_bytes(&v));
        }
    }
    w.to_bytes()
}

use common::Expected;

fn forward(path: &Path, ex: &Expected, dev: &Device) -> (f32, Vec<f32>) {
    let (model, store) = Model::load(path, dev).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (graph, vars) = model.graph(&store, ex.b, ex.t).unwrap();
    let run = graph
        .forward(&store, &Model::feed(&ex.ids, &ex.targets, ex.b, ex.t), vars.logits.as_slice())
        .unwrap();
    (run.loss(vars.loss).unwrap(), run.read(vars.logits.unwrap()).unwrap())
}

const FAMILIES: [&str; 5] = ["gpt2-tiny", "llama-tiny", "qwen2-tiny", "gemma3-tiny", "gemma2-tiny"];

#[test]
fn every_family_from_gguf_gives_transformers_logits() {
    let tmp = tempfile::tempdir().unwrap();
    for name in FAMILIES {
        let path = tmp.path().join(format!("{name}.gguf"));
        std::fs::write(&path, convert(name, false)).unwrap();
        let ex = Expected::load(name);
        let (loss, logits) = forward(&path, &ex, &Device::CPU_REF);
        let want = ex.file.get("loss").unwrap().unwrap().1[0];
        assert!(((loss - want) / want).abs() <= 1e-5, "{name}: loss {loss} vs transformers {want}");
        let err = common::fixture_err(&ex.file, "logits", &logits);
        assert!(err <= 1e-4, "{name}: logits rel err {err:e}");
        // the same model from its safetensors directory gives the same numbers: exactly, but
        // for Gemma, whose norms went through `w + 1 - 1` in f32 (a rounding of 2^-24 each)
        let (loss_st, logits_st) = forward(&fixture(name), &ex, &Device::CPU_REF);
        let worst = logits.iter().zip(&logits_st).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let allowed = if name.starts_with("gemma") { 1e-5 } else { 0.0 };
        assert!(worst <= allowed, "{name}: GGUF and safetensors logits differ by {worst:e}");
        assert!((loss - loss_st).abs() <= allowed, "{name}: loss {loss} vs {loss_st}");
    }
}

#[test]
fn f16_matrices_in_gguf_load_as_their_f16_values() {
    // f16 storage changes the weights by at most 2^-11 relative; the logits follow them
    let tmp = tempfile::tempdir().unwrap();
    for name in ["llama-tiny", "gemma3-tiny"] {
        let path = tmp.path().join(format!("{name}.gguf"));
        std::fs::write(&path, convert(name, true)).unwrap();
        let ex = Expected::load(name);
        let (loss, _) = forward(&path, &ex, &Device::CPU_REF);
        let want = ex.file.get("loss").unwrap().unwrap().1[0];
        assert!(((loss - want) / want).abs() <= 1e-3, "{name}: f16 loss {loss} vs transformers {want}");
    }
}

#[test]
fn config_comes_from_the_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.gguf");
    std::fs::write(&path, convert("llama-tiny", false)).unwrap();
    let file = GgufFile::open(&path).unwrap();
    let cfg = pockettune::models::gguf::config(&file).unwrap();
    let hf: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("llama-tiny/config.json")).unwrap()).unwrap();
    for k in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "head_dim",
        "tie_word_embeddings",
    ] {
        assert_eq!(cfg[k], hf[k], "{k}");
    }
}

/// A small valid file to damage: two tensors and some metadata.
fn small_file() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::Str("llama".into()))
        .meta("some.array", MetaValue::Array(vec![MetaValue::Str("a".into()), MetaValue::Str("bc".into())]))
        .meta("some.float", MetaValue::F32(1.5));
    w.tensor(
        "token_embd.weight",
        &[4, 32],
        GgmlType::Q8_0,
        kernels_ref::quant::random_blocks(GgmlType::Q8_0, 128, 1),
    );
    w.tensor("output_norm.weight", &[32], GgmlType::F32, f32_bytes(&[1.0; 32]));
    w.to_bytes()
}

#[test]
fn reader_round_trips_metadata_and_tensors() {
    let bytes = small_file();
    let f = GgufFile::from_bytes(Path::new("small.gguf"), &bytes).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.architecture().unwrap(), "llama");
    assert_eq!(f.get("some.float"), Some(&MetaValue::F32(1.5)));
    let arr = f.get("some.array").unwrap().as_array().unwrap();
    assert_eq!(arr[1].as_str(), Some("bc"));
    let t = f.tensor("token_embd.weight").unwrap();
    assert_eq!((t.shape(), t.ty), (vec![4, 32], GgmlType::Q8_0));
    assert_eq!(f.data(t), &kernels_ref::quant::random_blocks(GgmlType::Q8_0, 128, 1)[..]);
    assert_eq!(f.data(f.tensor("output_norm.weight").unwrap()), &f32_bytes(&[1.0; 32])[..]);
}

fn err_of(bytes: &[u8]) -> String {
    match std::panic::catch_unwind(|| GgufFile::from_bytes(Path::new("bad.gguf"), bytes)) {
        Ok(Ok(_)) => String::new(),
        Ok(Err(e)) => {
            let msg = e.to_string();
            assert!(msg.contains("bad.gguf"), "error does not name the file: {msg}");
            msg
        }
        Err(_) => panic!("the reader panicked on {} bytes", bytes.len()),
    }
}

#[test]
fn every_truncation_is_an_error_naming_the_file() {
    let bytes = small_file();
    for len in 0..bytes.len() {
        let msg = err_of(&bytes[..len]);
        // the last tensor's bytes (32 f32) end the file: every cut before the end is caught
        assert!(!msg.is_empty(), "a file cut to {len} of {} bytes was accepted", bytes.len());
    }
}

#[test]
fn random_and_mutated_bytes_never_panic() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6609);
    let good = small_file();
    for case in 0..3000 {
        let mut bytes = good.clone();
        let flips = rng.random_range(1..6);
        for _ in 0..flips {
            let i = rng.random_range(0..bytes.len().min(if case % 2 == 0 { 200 } else { usize::MAX }));
            bytes[i] = rng.random();
        }
        err_of(&bytes);
        let noise: Vec<u8> = (0..rng.random_range(0..300)).map(|_| rng.random()).collect();
        let mut prefixed = b"GGUF\x03\0\0\0".to_vec();
        prefixed.extend(&noise);
        err_of(&prefixed);
    }
}

#[test]
fn damaged_fields_get_clear_errors() {
    let with_tensor = |ty: u32, ne0: u64, offset: u64| {
        let mut w = GgufWriter::new();
        w.meta("general.architecture", MetaValue::Str("llama".into()));
        w.tensor("blk.0.attn_q.weight", &[1, 32], GgmlType::F32, f32_bytes(&[0.0; 32]));
        let mut b = w.to_bytes();
        // the tensor info: name, n_dims, ne[2], type, offset right after the metadata
        let at = b.windows(19).position(|s| s == b"blk.0.attn_q.weight").unwrap() + 19;
        b[at + 4..at + 12].copy_from_slice(&ne0.to_le_bytes());
        b[at + 20..at + 24].copy_from_slice(&ty.to_le_bytes());
        b[at + 24..at + 32].copy_from_slice(&offset.to_le_bytes());
        b
    };
    let msg = err_of(&with_tensor(99, 32, 0));
    assert!(msg.contains("blk.0.attn_q.weight") && msg.contains("type 99"), "{msg}");
    let msg = err_of(&with_tensor(0, 32, 4096));
    assert!(msg.contains("blk.0.attn_q.weight") && msg.contains("past the end"), "{msg}");
    let msg = err_of(&with_tensor(8, 33, 0));
    assert!(msg.contains("blk.0.attn_q.weight") && msg.contains("blocks"), "{msg}");
    let msg = err_of(b"GGML\x03\0\0\0");
    assert!(msg.contains("not a GGUF file"), "{msg}");
}

#[test]
fn unknown_architecture_is_refused_by_name() {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::Str("mamba".into()));
    w.tensor("token_embd.weight", &[4, 32], GgmlType::F32, f32_bytes(&[0.0; 128]));
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.gguf");
    w.write(&path).unwrap();
    let e = Model::load(&path, &Device::CPU_REF).err().expect("refused").to_string();
    assert!(e.contains("mamba") && e.contains("m.gguf") && e.contains("gemma3"), "{e}");
}

/// The real files (`bash tools/fetch_assets.sh` puts them under assets/).
fn asset(rel: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets").join(rel);
    assert!(p.exists(), "{} is missing: run `bash tools/fetch_assets.sh` first", p.display());
    p
}

#[test]
#[ignore = "needs the real GGUF files: bash tools/fetch_assets.sh"]
fn real_files_give_their_published_configs() {
    let gemma = GgufFile::open(&asset("gemma3-270m/gemma-3-270m-Q4_K_M.gguf")).unwrap();
    let c = pockettune::models::gguf::config(&gemma).unwrap();
    // google/gemma-3-270m's config.json
    for (k, v) in [
        ("hidden_size", 640),
        ("intermediate_size", 2048),
        ("num_hidden_layers", 18),
        ("num_attention_heads", 4),
        ("num_key_value_heads", 1),
        ("head_dim", 256),
        ("vocab_size", 262144),
        ("sliding_window", 512),
        ("query_pre_attn_scalar", 256),
    ] {
        assert_eq!(c[k].as_u64(), Some(v), "gemma {k}");
    }
    let smol = GgufFile::open(&asset("smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    let c = pockettune::models::gguf::config(&smol).unwrap();
    // HuggingFaceTB/SmolLM2-135M-Instruct's config.json
    for (k, v) in [
        ("hidden_size", 576),
        ("intermediate_size", 1536),
        ("num_hidden_layers", 30),
        ("num_attention_heads", 9),
        ("num_key_value_heads", 3),
        ("vocab_size", 49152),
    ] {
        assert_eq!(c[k].as_u64(), Some(v), "smollm2 {k}");
    }
    assert_eq!(c["tie_word_embeddings"], true);
}

/// A packed (f16) base on the GPU computes what the same values in f32 compute: logits, the
/// loss, and through a LoRA step the adapters' gradients (the dX product through the packed
/// weight, and the tied LM head and embedding gather of Gemma).
#[test]
fn packed_base_on_the_gpu_matches_its_f32_values() {
    use pockettune::graph::ParamStore;
    use pockettune::models::LoadOptions;
    use pockettune::weights::BaseDtype;
    let Some(gpu) = common::gpu() else { return };
    let dev = Device::Gpu(gpu.clone());
    let tmp = tempfile::tempdir().unwrap();
    for name in ["llama-tiny", "gemma3-tiny"] {
        let path = tmp.path().join(format!("{name}.gguf"));
        std::fs::write(&path, convert(name, true)).unwrap();
        let ex = Expected::load(name);
        let run = |base: BaseDtype| -> (f32, Vec<f32>, Vec<Vec<f32>>) {
            let load = LoadOptions { frozen: true, base_dtype: base, stream: false };
            let (model, mut store): (Model, ParamStore) = Model::load_with(&path, &dev, &load).unwrap();
            let packed = store.iter().filter(|(_, p)| p.dtype != GgmlType::F32).count();
            assert_eq!(
                packed > 0,
                base == BaseDtype::Native,
                "{name}: {packed} packed weights with {base:?}"
            );
            let o = pockettune::lora::LoraOptions {
                rank: 4,
                alpha: 8.0,
                dropout: 0.0,
                targets: pockettune::lora::default_targets(&model),
            };
            pockettune::lora::apply(&model, &mut store, &o, 7).unwrap();
            // B is zero at initialisation; give it values so that A's gradient is not zero
            let bs: Vec<_> = store
                .iter()
                .filter(|(_, p)| p.name.ends_with("lora_B.weight"))
                .map(|(id, p)| (id, p.shape.clone()))
                .collect();
            for (id, shape) in bs {
                let n: usize = shape.iter().product();
                let v: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.01).collect();
                store.set_value(id, &v).unwrap();
            }
            let (graph, vars) = model.graph(&store, ex.b, ex.t).unwrap();
            let mut r = graph
                .forward(&store, &Model::feed(&ex.ids, &ex.targets, ex.b, ex.t), vars.logits.as_slice())
                .unwrap();
            let (loss, logits) = (r.loss(vars.loss).unwrap(), r.read(vars.logits.unwrap()).unwrap());
            r.backward(&mut store, vars.loss, 1.0).unwrap();
            let grads = store
                .iter()
                .filter(|(_, p)| p.trainable)
                .map(|(_, p)| p.grad.as_ref().unwrap().to_host(&dev).unwrap())
                .collect();
            (loss, logits, grads)
        };
        let (loss_q, logits_q, grads_q) = run(BaseDtype::Native);
        let (loss_f, logits_f, grads_f) = run(BaseDtype::F32);
        // the same f16 values either way; only the accumulation order differs (f32)
        assert!((loss_q - loss_f).abs() <= 1e-5 * loss_f.abs(), "{name}: loss {loss_q} vs {loss_f}");
        let rel = |a: &[f32], b: &[f32]| {
            let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
            num / b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt().max(1e-30)
        };
        assert!(rel(&logits_q, &logits_f) <= 1e-5, "{name}: logits rel err {:e}", rel(&logits_q, &logits_f));
        assert_eq!(grads_q.len(), grads_f.len());
        for (i, (gq, gf)) in grads_q.iter().zip(&grads_f).enumerate() {
            assert!(rel(gq, gf) <= 1e-4, "{name}: adapter gradient {i} rel err {:e}", rel(gq, gf));
        }
    }
}

/// The logits of chosen positions only (generation, MMLU) are those rows of the full logits,
/// for every family, on the CPU path and the GPU.
#[test]
fn logits_of_chosen_rows_are_rows_of_the_full_logits() {
    let mut devices = vec![Device::CPU_REF];
    devices.extend(common::gpu().map(|g| Device::Gpu(g.clone())));
    for dev in &devices {
        for name in FAMILIES {
            let ex = Expected::load(name);
            let (model, store) = Model::load(&fixture(name), dev).unwrap();
            let (graph, logits) = model.logits_graph(&store, ex.b, ex.t).unwrap();
            let full = graph.forward(&store, &Model::inference_feed(&ex.ids, ex.b, ex.t), &[logits]).unwrap();
            let full = full.read(logits).unwrap();
            let rows = [ex.t as u32 - 1, 0, (ex.b * ex.t) as u32 - 1];
            let (graph, picked) = model.logits_graph_rows(&store, ex.b, ex.t, rows.len()).unwrap();
            let feed = Model::inference_feed_rows(&ex.ids, ex.b, ex.t, &rows);
            let got = graph.forward(&store, &feed, &[picked]).unwrap().read(picked).unwrap();
            let v = model.vocab_size();
            for (i, &r) in rows.iter().enumerate() {
                let want = &full[r as usize * v..(r as usize + 1) * v];
                let worst =
                    got[i * v..(i + 1) * v].iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(worst <= 1e-5, "{name} on {}: row {r} differs by {worst:e}", dev.name());
            }
        }
    }
}

/// `export` (merged, Hugging Face format) from a GGUF base writes a directory that loads and
/// computes what the base with its adapter computes.
#[test]
fn merged_export_from_a_gguf_base_loads_and_matches_the_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["llama-tiny", "gemma3-tiny"] {
        let base = tmp.path().join(format!("{name}.gguf"));
        std::fs::write(&base, convert(name, false)).unwrap();
        let ex = Expected::load(name);
        let (model, mut store) = Model::load(&base, &Device::CPU_REF).unwrap();
        let o = pockettune::lora::LoraOptions {
            rank: 2,
            alpha: 4.0,
            dropout: 0.0,
            targets: pockettune::lora::default_targets(&model),
        };
        pockettune::lora::apply(&model, &mut store, &o, 3).unwrap();
        let bs: Vec<_> = store
            .iter()
            .filter(|(_, p)| p.name.ends_with("lora_B.weight"))
            .map(|(id, p)| (id, p.shape.clone()))
            .collect();
        for (id, shape) in bs {
            let v: Vec<f32> =
                (0..shape.iter().product()).map(|i: usize| ((i * 13 % 7) as f32 - 3.0) * 0.05).collect();
            store.set_value(id, &v).unwrap();
        }
        let adapter = tmp.path().join(format!("{name}-adapter"));
        std::fs::create_dir_all(&adapter).unwrap();
        pockettune::lora::save(&adapter, &model, &store, &o, &base).unwrap();
        let logits = |store: &pockettune::graph::ParamStore, model: &Model| {
            let (graph, l) = model.logits_graph(store, ex.b, ex.t).unwrap();
            graph.forward(store, &Model::inference_feed(&ex.ids, ex.b, ex.t), &[l]).unwrap().read(l).unwrap()
        };
        let want = logits(&store, &model);
        let out = tmp.path().join(format!("{name}-merged"));
        let bin = env!("CARGO_BIN_EXE_pockettune");
        let st = std::process::Command::new(bin)
            .args(["export", "--model"])
            .arg(&base)
            .arg("--adapter")
            .arg(&adapter)
            .arg("--out")
            .arg(&out)
            .status()
            .unwrap();
        assert!(st.success(), "{name}: export failed");
        assert!(out.join("config.json").exists(), "{name}: no config.json");
        let (merged, mstore) = Model::load(&out, &Device::CPU_REF).unwrap();
        let got = logits(&mstore, &merged);
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-4, "{name}: merged logits differ by {worst:e}");
    }
}

/// A checkpoint split in several safetensors files (`model.safetensors.index.json`) loads as
/// the single file does; an index that puts a tensor in the wrong shard is refused by name.
#[test]
fn sharded_safetensors_load_like_one_file() {
    use safetensors::tensor::{serialize, Dtype, TensorView};
    let tmp = tempfile::tempdir().unwrap();
    let name = "llama-tiny";
    let st = SafetensorsFile::open(&fixture(name).join("model.safetensors")).unwrap();
    let mut names = st.names();
    names.sort();
    let dir = tmp.path().join("sharded");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture(name).join("config.json"), dir.join("config.json")).unwrap();
    let mut map = serde_json::Map::new();
    let half = names.len() / 2;
    for (i, part) in [&names[..half], &names[half..]].iter().enumerate() {
        let shard = format!("model-0000{}-of-00002.safetensors", i + 1);
        let data: Vec<(String, Vec<usize>, Vec<u8>)> = part
            .iter()
            .map(|n| {
                let (shape, v) = st.get(n).unwrap().unwrap();
                (n.clone(), shape, f32_bytes(&v))
            })
            .collect();
        let views: Vec<(String, TensorView)> = data
            .iter()
            .map(|(n, shape, bytes)| (n.clone(), TensorView::new(Dtype::F32, shape.clone(), bytes).unwrap()))
            .collect();
        std::fs::write(dir.join(&shard), serialize(views, None).unwrap()).unwrap();
        for n in part.iter() {
            map.insert(n.clone(), Value::String(shard.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let ex = Expected::load(name);
    let (loss_one, logits_one) = forward(&fixture(name), &ex, &Device::CPU_REF);
    let (loss, logits) = forward(&dir, &ex, &Device::CPU_REF);
    assert_eq!((loss, logits), (loss_one, logits_one));
    // a wrong shard in the index
    let moved = names[0].clone();
    map.insert(moved.clone(), Value::String("model-00002-of-00002.safetensors".into()));
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let e = Model::load(&dir, &Device::CPU_REF).err().expect("refused").to_string();
    assert!(e.contains(&moved) && e.contains("index.json"), "{e}");
}
