//! LoRA adapters as llama.cpp loads them (`llama-cli -m BASE.gguf --lora ADAPTER.gguf`):
//! `export --format gguf-lora` turns a PEFT adapter directory into a GGUF LoRA file for a given
//! base GGUF model.
//!
//! The format, as llama.cpp's `convert_lora_to_gguf.py` writes it and `llama-adapter.cpp` reads
//! it: metadata `general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha` (an
//! F32) and `general.architecture` equal to the base model's (llama.cpp refuses a mismatch);
//! for every adapted weight `W` of the base, two tensors named after W's GGUF name,
//! `<name>.lora_a` (PEFT's `lora_A`, row-major (r, in), so ggml `ne = [in, r]`) and
//! `<name>.lora_b` (PEFT's `lora_B`, (out, r), `ne = [r, out]`). llama.cpp computes
//! `W x + (alpha / r) * B (A x)`, with r read from `lora_b`'s `ne[0]` per tensor, which is
//! PEFT's scale. We write F32 factors (llama.cpp also takes F16/BF16/Q8_0).
//!
//! The factors go through the same conversion as the base weight they adapt, from the Hugging
//! Face layout to llama.cpp's ([`crate::models::gguf`] holds the name map and the inverse
//! conversions):
//! - Llama-family Q and K projections: llama.cpp interleaves the two halves of each head's
//!   rows (HF row `i*d/2 + j` of a head becomes GGUF row `2j + i`). Rows are outputs, so only
//!   `lora_b`'s rows move; `lora_a` (inputs) is unchanged.
//! - GPT-2's Conv1D weights, (in, out) in Hugging Face, are stored (out, in) in GGUF, the
//!   orientation PEFT's factors already have (its `fan_in_fan_out` only transposes the merged
//!   product), so nothing moves.
//! - Gemma's norms (stored `1 + w`) are never adapted.
//!
//! The base must be a GGUF file: its architecture, tensor names and shapes are what llama.cpp
//! checks the adapter against, so we check the same things here, before writing anything.

use crate::error::{Error, Result};
use crate::models::gguf::{gguf_name, Conversion, ARCHITECTURES};
use crate::models::SafetensorsFile;
use crate::weights::gguf::{GgufFile, GgufWriter, MetaValue};
use kernels_ref::quant::GgmlType;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

/// What was written.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufLoraSummary {
    /// `general.architecture` of the base (and of the adapter file).
    pub architecture: String,
    pub alpha: f32,
    /// Adapted base tensors (each one `lora_a` and one `lora_b`).
    pub modules: usize,
    /// Smallest and largest rank among them (equal unless the config has a `rank_pattern`).
    pub ranks: (usize, usize),
}

#[derive(Deserialize)]
struct PeftLoraConfig {
    #[serde(default)]
    peft_type: Option<String>,
    lora_alpha: f32,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    alpha_pattern: serde_json::Map<String, serde_json::Value>,
}

fn bad(path: &Path, detail: impl Into<String>) -> Error {
    Error::Checkpoint { path: path.to_path_buf(), detail: detail.into() }
}

/// One adapted module: its factors as PEFT stores them.
struct Factors {
    a: Option<(Vec<usize>, Vec<f32>)>,
    b: Option<(Vec<usize>, Vec<f32>)>,
}

/// Read `adapter_dir` (a PEFT LoRA adapter) and write it to `out` as a GGUF LoRA file for the
/// GGUF model `base`.
pub fn export(base: &Path, adapter_dir: &Path, out: &Path) -> Result<GgufLoraSummary> {
    if !crate::weights::is_gguf(base) {
        return Err(bad(
            base,
            "--format gguf-lora needs the base model as a .gguf file: llama.cpp applies the adapter over a GGUF \
             model, and the adapter file takes its architecture and tensor names from it. Convert a Hugging Face \
             model with llama.cpp's convert_hf_to_gguf.py and pass that file as --model",
        ));
    }
    let file = GgufFile::open(base)?;
    let (writer, summary) = build(&file, adapter_dir)?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::Io { path: dir.to_path_buf(), cause: e })?;
    }
    writer.write(out)?;
    Ok(summary)
}

/// The GGUF LoRA file (not yet written) of the PEFT adapter in `adapter_dir` over `base`.
pub fn build(base: &GgufFile, adapter_dir: &Path) -> Result<(GgufWriter, GgufLoraSummary)> {
    let arch = base.architecture()?.to_string();
    if !ARCHITECTURES.split(", ").any(|a| a == arch) {
        return Err(bad(
            base.path(),
            format!(
                "architecture {arch:?} is not supported for GGUF LoRA export (supported: {ARCHITECTURES})"
            ),
        ));
    }
    if base.get("general.type").and_then(MetaValue::as_str) == Some("adapter") {
        return Err(bad(
            base.path(),
            "this is an adapter file, not a model: --model must be the base model's GGUF",
        ));
    }
    let alpha = read_config(adapter_dir)?;
    let st_path = adapter_dir.join("adapter_model.safetensors");
    let st = SafetensorsFile::open(&st_path)?;

    // pair lora_A and lora_B by module; anything else cannot go into a llama.cpp LoRA file
    let mut modules: BTreeMap<String, Factors> = BTreeMap::new();
    for name in st.names() {
        let parsed = name.strip_prefix("base_model.model.").and_then(|rest| {
            rest.strip_suffix(".lora_A.weight")
                .map(|m| (m, true))
                .or_else(|| rest.strip_suffix(".lora_B.weight").map(|m| (m, false)))
        });
        let Some((module, is_a)) = parsed else {
            return Err(bad(
                &st_path,
                format!(
                    "tensor {name} is not a LoRA factor (base_model.model.<module>.lora_A/lora_B.weight): trained \
                     embeddings, biases or modules_to_save cannot go into a llama.cpp LoRA file"
                ),
            ));
        };
        let value = st.get(&name)?.ok_or_else(|| bad(&st_path, format!("tensor {name} cannot be read")))?;
        let entry = modules.entry(module.to_string()).or_insert(Factors { a: None, b: None });
        if is_a {
            entry.a = Some(value);
        } else {
            entry.b = Some(value);
        }
    }
    if modules.is_empty() {
        return Err(bad(&st_path, "the adapter holds no LoRA factors"));
    }

    let heads = |kv: bool| -> Result<usize> {
        let key = |k: &str| format!("{arch}.attention.{k}");
        let q = base.get(&key("head_count")).and_then(MetaValue::as_u64);
        let n = if kv { base.get(&key("head_count_kv")).and_then(MetaValue::as_u64).or(q) } else { q };
        n.and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| bad(base.path(), format!("metadata {} is missing or zero", key("head_count"))))
    };

    let mut tensors = Vec::new();
    for (module, f) in modules {
        let (Some((a_shape, a)), Some((b_shape, mut b))) = (f.a, f.b) else {
            return Err(bad(&st_path, format!("module {module} has only one of lora_A and lora_B")));
        };
        // the model's own name of the weight (GPT-2's without the `transformer.` prefix)
        let hf = format!("{}.weight", module.strip_prefix("transformer.").unwrap_or(&module));
        let Some((gname, conversion)) = gguf_name(&arch, &hf) else {
            return Err(bad(
                &st_path,
                format!(
                    "module {module} has no counterpart in a {arch} model (see {}): the adapter was made for another \
                     model family",
                    base.path().display()
                ),
            ));
        };
        let Some(info) = base.tensor(&gname) else {
            return Err(bad(
                &st_path,
                format!(
                    "module {module} adapts {gname}, which the base model {} does not have: the adapter was made \
                     for another base model",
                    base.path().display()
                ),
            ));
        };
        let (order, ne) = (base.tensors().iter().position(|t| t.name == gname).unwrap_or(0), info.ne.clone());
        let rank = a_shape.first().copied().unwrap_or(0);
        // base ne = [in, out]; A is (r, in) and B (out, r), row-major
        if ne.len() != 2 || rank == 0 || a_shape != [rank, ne[0]] || b_shape != [ne[1], rank] {
            return Err(bad(
                &st_path,
                format!(
                    "module {module}: lora_A {a_shape:?} and lora_B {b_shape:?} do not fit {gname} of the base \
                     (row-major shape {:?}; they must be [r, {}] and [{}, r]): the adapter was made for another \
                     base model",
                    info.shape(),
                    ne.first().copied().unwrap_or(0),
                    ne.get(1).copied().unwrap_or(0)
                ),
            ));
        }
        match conversion {
            Conversion::UnpermuteHeads { kv } => {
                b = permute_rows(&b, ne[1], rank, heads(kv)?, base.path(), &gname)?
            }
            Conversion::None | Conversion::Transpose => {}
            Conversion::NormMinusOne => {
                return Err(bad(
                    &st_path,
                    format!("module {module} is a norm; llama.cpp adapts only matrices"),
                ))
            }
        }
        tensors.push((order, gname, rank, a_shape, a, b_shape, b));
    }
    tensors.sort_by_key(|t| t.0);

    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::Str(arch.clone()))
        .meta("general.type", MetaValue::Str("adapter".into()))
        .meta("adapter.type", MetaValue::Str("lora".into()))
        .meta("adapter.lora.alpha", MetaValue::F32(alpha));
    let mut ranks = (usize::MAX, 0);
    for (_, gname, rank, a_shape, a, b_shape, b) in &tensors {
        ranks = (ranks.0.min(*rank), ranks.1.max(*rank));
        w.tensor(&format!("{gname}.lora_a"), a_shape, GgmlType::F32, bytemuck::cast_slice(a).to_vec());
        w.tensor(&format!("{gname}.lora_b"), b_shape, GgmlType::F32, bytemuck::cast_slice(b).to_vec());
    }
    Ok((w, GgufLoraSummary { architecture: arch, alpha, modules: tensors.len(), ranks }))
}

/// `lora_alpha` of the adapter's config, after refusing what llama.cpp's `alpha / r` cannot
/// express.
fn read_config(dir: &Path) -> Result<f32> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::Io { path: path.clone(), cause: e })?;
    let cfg: PeftLoraConfig =
        serde_json::from_str(&text).map_err(|e| bad(&path, format!("not a PEFT LoRA config: {e}")))?;
    if cfg.peft_type.as_deref().is_some_and(|t| t != "LORA") {
        return Err(bad(
            &path,
            format!("peft_type is {:?}; only LoRA adapters can be exported", cfg.peft_type),
        ));
    }
    if !cfg.lora_alpha.is_finite() {
        return Err(bad(&path, format!("lora_alpha {} is not a finite number", cfg.lora_alpha)));
    }
    if cfg.use_rslora || cfg.use_dora {
        return Err(bad(
            &path,
            "rsLoRA and DoRA adapters cannot be exported: llama.cpp scales every adapter by alpha / r",
        ));
    }
    if !cfg.alpha_pattern.is_empty() {
        return Err(bad(
            &path,
            "alpha_pattern (a different alpha per module) cannot be exported: a llama.cpp LoRA file has one alpha",
        ));
    }
    Ok(cfg.lora_alpha)
}

/// llama.cpp's interleaving of each head's two row halves, applied to a (rows, cols) row-major
/// matrix: HF row `h*d + i*d/2 + j` goes to GGUF row `h*d + 2j + i` (the inverse of
/// [`crate::models::gguf`]'s un-permutation of the base weight).
fn permute_rows(
    m: &[f32],
    rows: usize,
    cols: usize,
    heads: usize,
    path: &Path,
    name: &str,
) -> Result<Vec<f32>> {
    if !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(bad(path, format!("tensor {name} has {rows} rows, not {heads} heads of an even size")));
    }
    let (d, half) = (rows / heads, rows / heads / 2);
    let mut out = vec![0f32; m.len()];
    for h in 0..heads {
        for i in 0..2 {
            for j in 0..half {
                let (dst, src) = (h * d + 2 * j + i, h * d + i * half + j);
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&m[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(out)
}
