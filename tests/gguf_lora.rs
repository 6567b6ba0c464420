//! `export --format gguf-lora` without llama.cpp: a LoRA adapter written for a tiny model's GGUF
//! file, read back with our GGUF reader, must carry what llama.cpp's loader checks
//! (`general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha` as an F32, the base's
//! architecture, `<base tensor>.lora_a` / `.lora_b` with `lora_a.ne = [in, r]`,
//! `lora_b.ne = [r, out]` against the base's `ne = [in, out]`), and for every module the delta
//! `(alpha / r) B A` of the file, with lora_b's rows put back in Hugging Face order, must be the
//! adapter's. The base GGUF files are made here from the fixtures' configs the way llama.cpp's
//! converter names and shapes them (GPT-2's Conv1D weights stored (out, in)); the exporter reads
//! only names, shapes and metadata, so the tensors hold zeros. The adapters: PEFT's own (GPT-2,
//! Gemma 3 fixtures) and pockettune's (Llama, Qwen2: `lora::apply`, then random B so that the
//! Q/K row permutation shows). What llama.cpp itself computes is checked by
//! tools/check_gguf_lora.py on the real SmolLM2 and Gemma 3 files.

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

fn config(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("config.json")).unwrap()).unwrap()
}

fn arch_of(cfg: &Value) -> &str {
    match cfg["model_type"].as_str().unwrap() {
        "gemma3_text" => "gemma3",
        a => a,
    }
}

/// llama.cpp's name of a projection (`model.layers.N.self_attn.q_proj.weight`,
/// `transformer.h.N.attn.c_attn.weight`, ...), written from its converter's tensor map.
fn llama_cpp_name(hf: &str) -> Option<String> {
    let hf = hf.trim_start_matches("transformer.");
    let rest = hf.strip_prefix("model.layers.").or_else(|| hf.strip_prefix("h."))?;
    let (layer, module) = rest.split_once('.')?;
    let g = match module.strip_suffix(".weight")? {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" | "attn.c_proj" => "attn_output",
        "attn.c_attn" => "attn_qkv",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" | "mlp.c_fc" => "ffn_up",
        "mlp.down_proj" | "mlp.c_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.weight"))
}

/// A base GGUF for fixture `name`: its architecture and head counts, and every projection under
/// llama.cpp's name and shape (zeros), except those of layers `>= layers` when given.
fn base_gguf(name: &str, layers: Option<usize>) -> Vec<u8> {
    let cfg = config(name);
    let arch = arch_of(&cfg);
    let st = SafetensorsFile::open(&fixture(name).join("model.safetensors")).unwrap();
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::Str(arch.into()));
    let heads = cfg["num_attention_heads"].as_u64().or(cfg["n_head"].as_u64()).unwrap();
    w.meta(&format!("{arch}.attention.head_count"), MetaValue::U32(heads as u32));
    if let Some(kv) = cfg["num_key_value_heads"].as_u64() {
        w.meta(&format!("{arch}.attention.head_count_kv"), MetaValue::U32(kv as u32));
    }
    for hf in st.names() {
        let Some(g) = llama_cpp_name(&hf) else { continue };
        let layer: usize = g.split('.').nth(1).unwrap().parse().unwrap();
        if layers.is_some_and(|n| layer >= n) {
            continue;
        }
        let (mut shape, v) = st.get(&hf).unwrap().unwrap();
        if arch == "gpt2" {
            shape.reverse(); // Conv1D (in, out) -> (out, in)
        }
        w.tensor(&g, &shape, GgmlType::F32, vec![0u8; v.len() * 4]);
    }
    w.to_bytes()
}

/// A pockettune adapter (rank 4, alpha 8, every projection) on fixture `name` with random B.
fn pockettune_adapter(name: &str, out: &Path) {
    let dev = Device::CPU_REF;
    let (model, mut store) = Model::load(&fixture(name), &dev).unwrap();
    let opts = pockettune::lora::LoraOptions {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: pockettune::lora::default_targets(&model),
    };
    pockettune::lora::apply(&model, &mut store, &opts, 7).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let bs: Vec<_> = store.iter().filter_map(|(id, _)| store.lora(id).map(|l| l.b)).collect();
    for b in bs {
        let n = store.get(b).shape.iter().product::<usize>();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-0.5..0.5)).collect();
        store.set_value(b, &v).unwrap();
    }
    pockettune::lora::save(out, &model, &store, &opts, &fixture(name)).unwrap();
}

fn f32s(file: &GgufFile, name: &str) -> Vec<f32> {
    let t = file.tensor(name).unwrap_or_else(|| panic!("no tensor {name}"));
    assert_eq!(t.ty, GgmlType::F32, "{name}");
    file.data(t).chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

/// Undo the converter's `reshape(heads, 2, d/2, cols).swapaxes(1, 2)` of a (rows, cols)
/// matrix: GGUF row (h, j, i) holds HF row (h, i, j).
fn unpermute(m: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let (d, half) = (rows / heads, rows / heads / 2);
    let mut out = vec![0f32; m.len()];
    for h in 0..heads {
        for j in 0..half {
            for i in 0..2 {
                let hf = h * d + i * half + j;
                let gg = h * d + j * 2 + i;
                out[hf * cols..(hf + 1) * cols].copy_from_slice(&m[gg * cols..(gg + 1) * cols]);
            }
        }
    }
    out
}

/// (out, in) = scale * B (out, r) A (r, in), in f64.
fn delta(b: &[f32], a: &[f32], out: usize, r: usize, scale: f64) -> Vec<f64> {
    let cols = a.len() / r;
    let mut d = vec![0f64; out * cols];
    for o in 0..out {
        for i in 0..cols {
            d[o * cols + i] =
                scale * (0..r).map(|k| b[o * r + k] as f64 * a[k * cols + i] as f64).sum::<f64>();
        }
    }
    d
}

/// Export `adapter` over fixture `base`'s GGUF and check the file against the adapter.
fn check(base: &str, adapter: &Path, modules: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let base_path = tmp.path().join("base.gguf");
    std::fs::write(&base_path, base_gguf(base, None)).unwrap();
    let out = tmp.path().join("sub/adapter.gguf");
    let summary = pockettune::lora_gguf::export(&base_path, adapter, &out).unwrap();

    let cfg = config(base);
    let arch = arch_of(&cfg);
    let peft: Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap()).unwrap();
    let (rank, alpha) = (peft["r"].as_u64().unwrap() as usize, peft["lora_alpha"].as_f64().unwrap() as f32);
    assert_eq!(summary.architecture, arch);
    assert_eq!((summary.alpha, summary.modules, summary.ranks), (alpha, modules, (rank, rank)), "{base}");

    let file = GgufFile::open(&out).unwrap();
    let base_file = GgufFile::open(&base_path).unwrap();
    let meta = |k: &str| file.get(k).cloned().unwrap_or_else(|| panic!("{base}: no {k}"));
    assert_eq!(meta("general.architecture"), MetaValue::Str(arch.into()));
    assert_eq!(meta("general.type"), MetaValue::Str("adapter".into()));
    assert_eq!(meta("adapter.type"), MetaValue::Str("lora".into()));
    assert_eq!(meta("adapter.lora.alpha"), MetaValue::F32(alpha));
    assert_eq!(file.tensors().len(), 2 * modules, "{base}");

    let st = SafetensorsFile::open(&adapter.join("adapter_model.safetensors")).unwrap();
    let mut seen = 0;
    for name in st.names().into_iter().filter(|n| n.ends_with(".lora_A.weight")) {
        let module = name.trim_start_matches("base_model.model.").trim_end_matches(".lora_A.weight");
        let (a_shape, a) = st.get(&name).unwrap().unwrap();
        let (b_shape, b) = st.get(&name.replace("lora_A", "lora_B")).unwrap().unwrap();
        let g = llama_cpp_name(&format!("{module}.weight")).unwrap();
        let (ga, gb) =
            (file.tensor(&format!("{g}.lora_a")).unwrap(), file.tensor(&format!("{g}.lora_b")).unwrap());
        let base_ne = &base_file.tensor(&g).unwrap().ne;
        // llama.cpp's checks, in ggml order
        assert_eq!((ga.ne[0], gb.ne[1], ga.ne[1]), (base_ne[0], base_ne[1], gb.ne[0]), "{base} {g}");
        assert_eq!((ga.ne.clone(), gb.ne.clone()), (vec![a_shape[1], rank], vec![rank, b_shape[0]]), "{g}");

        let (out_rows, r) = (b_shape[0], b_shape[1]);
        let mut gb_vals = f32s(&file, &format!("{g}.lora_b"));
        let permuted = arch == "llama" && (g.ends_with("attn_q.weight") || g.ends_with("attn_k.weight"));
        if permuted {
            let key =
                if g.ends_with("attn_q.weight") { "num_attention_heads" } else { "num_key_value_heads" };
            let heads = cfg[key].as_u64().unwrap() as usize;
            gb_vals = unpermute(&gb_vals, out_rows, r, heads);
            assert_ne!(gb_vals, f32s(&file, &format!("{g}.lora_b")), "{g}: rows should move");
        }
        // llama.cpp's scale: alpha from the metadata over the rank in lora_b's ne[0]
        let scale_file = alpha as f64 / gb.ne[0] as f64;
        let want = delta(&b, &a, out_rows, r, alpha as f64 / rank as f64);
        let got = delta(&gb_vals, &f32s(&file, &format!("{g}.lora_a")), out_rows, r, scale_file);
        let worst = got.iter().zip(&want).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
        assert!(worst == 0.0, "{base}: delta of {g} differs from the adapter's by up to {worst:e}");
        seen += 1;
    }
    assert_eq!(seen, modules, "{base}");
}

#[test]
fn llama_adapter_has_q_k_rows_permuted_per_head() {
    let tmp = tempfile::tempdir().unwrap();
    pockettune_adapter("llama-tiny", tmp.path());
    check("llama-tiny", tmp.path(), 2 * 7);
}

#[test]
fn qwen2_adapter_keeps_rows_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    pockettune_adapter("qwen2-tiny", tmp.path());
    check("qwen2-tiny", tmp.path(), 2 * 7);
}

#[test]
fn peft_gemma3_adapter_exports() {
    check("gemma3-tiny", &fixture("gemma3-tiny-lora"), 3 * 7);
}

#[test]
fn peft_gpt2_conv1d_adapter_exports_untransposed() {
    check("gpt2-tiny", &fixture("gpt2-tiny-lora"), 2 * 4);
}

fn export_err(base: &Path, adapter: &Path) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.gguf");
    let e = pockettune::lora_gguf::export(base, adapter, &out).unwrap_err().to_string();
    assert!(!out.exists(), "nothing is written on an error: {e}");
    e
}

#[test]
fn bad_bases_and_adapters_are_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let gemma_lora = fixture("gemma3-tiny-lora");
    let put = |name: &str, bytes: Vec<u8>| {
        let p = tmp.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };

    // a Hugging Face directory as base
    let e = export_err(&fixture("gemma3-tiny"), &gemma_lora);
    assert!(e.contains("needs the base model as a .gguf file"), "{e}");

    // the adapter of another family: GPT-2 modules over a Gemma base
    let gemma = put("gemma.gguf", base_gguf("gemma3-tiny", None));
    let e = export_err(&gemma, &fixture("gpt2-tiny-lora"));
    assert!(e.contains("transformer.h.0.attn.c_attn has no counterpart in a gemma3 model"), "{e}");

    // a layer the base does not have
    let short = put("short.gguf", base_gguf("gemma3-tiny", Some(2)));
    let e = export_err(&short, &gemma_lora);
    assert!(e.contains("model.layers.2.mlp.down_proj adapts blk.2.ffn_down.weight, which the base"), "{e}");

    // shapes that do not fit: the Gemma adapter's k_proj has 2 KV heads, the Llama base 1
    let llama = put("llama.gguf", base_gguf("llama-tiny", None));
    let e = export_err(&llama, &gemma_lora);
    assert!(
        e.contains("model.layers.0.self_attn.k_proj: lora_A [4, 64] and lora_B [32, 4] do not fit"),
        "{e}"
    );

    // an adapter file as the base
    let adapter_file = tmp.path().join("adapter.gguf");
    pockettune::lora_gguf::export(&gemma, &gemma_lora, &adapter_file).unwrap();
    let e = export_err(&adapter_file, &gemma_lora);
    assert!(e.contains("this is an adapter file, not a model"), "{e}");

    // DoRA, and a tensor that is not a LoRA factor (a trained norm PEFT keeps in modules_to_save)
    let dir = tmp.path().join("dora");
    std::fs::create_dir(&dir).unwrap();
    let st_bytes = std::fs::read(gemma_lora.join("adapter_model.safetensors")).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), &st_bytes).unwrap();
    std::fs::write(dir.join("adapter_config.json"), r#"{"r": 4, "lora_alpha": 8, "use_dora": true}"#)
        .unwrap();
    let e = export_err(&gemma, &dir);
    assert!(e.contains("rsLoRA and DoRA adapters cannot be exported"), "{e}");

    std::fs::write(dir.join("adapter_config.json"), r#"{"r": 4, "lora_alpha": 8}"#).unwrap();
    let extra = vec![0f32; 64];
    let mut tensors: Vec<(String, safetensors::tensor::TensorView)> = Vec::new();
    let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
    for (n, v) in st.tensors() {
        tensors.push((n, v));
    }
    let name = "base_model.model.model.norm.modules_to_save.default.weight".to_string();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![64], bytemuck::cast_slice(&extra))
            .unwrap();
    tensors.push((name.clone(), view));
    std::fs::write(dir.join("adapter_model.safetensors"), safetensors::serialize(tensors, None).unwrap())
        .unwrap();
    let e = export_err(&gemma, &dir);
    assert!(e.contains(&format!("tensor {name} is not a LoRA factor")), "{e}");
}

#[test]
fn cli_export_format_gguf_lora() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.gguf");
    std::fs::write(&base, base_gguf("gemma3-tiny", None)).unwrap();
    let out = tmp.path().join("lora.gguf");
    let run = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pockettune"));
        cmd.args(["export", "--format", "gguf-lora", "--model"]).arg(&base);
        cmd.arg("--adapter").arg(fixture("gemma3-tiny-lora")).arg("--out").arg(&out).args(extra);
        cmd.output().unwrap()
    };
    let o = run(&["--merge"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("drop --merge"));
    assert!(!out.exists());
    let o = run(&[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("gemma3 LoRA, 21 adapted tensors, rank 4, alpha 8"), "{stderr}");
    let file = GgufFile::open(&out).unwrap();
    assert_eq!(file.get("general.type"), Some(&MetaValue::Str("adapter".into())));
    assert_eq!(file.tensors().len(), 42);
}
