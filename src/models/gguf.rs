//! Models from GGUF files: the `config.json` a Hugging Face checkpoint would carry, built from
//! the `<arch>.*` metadata, and each Hugging Face tensor name mapped to llama.cpp's with the
//! conversions of its converter (`convert_hf_to_gguf.py`) undone:
//!
//! - Llama-family Q and K projections: the converter interleaves the two halves of every head's
//!   rows (`reshape(heads, 2, d/2, in).swapaxes(1, 2)`), so HF row `i*d/2 + j` of a head is GGUF
//!   row `2j + i`. Only whole rows move, so a quantized tensor is un-permuted losslessly.
//! - Gemma norms: the converter stores `1 + w` (Gemma computes `x * (1 + w)`), so `w = gguf - 1`.
//! - GPT-2's Conv1D weights are stored (out, in); pockettune's GPT-2 wants (in, out): they are
//!   transposed, which needs f32 values (a quantized GPT-2 file trains and runs in f32).
//!
//! Architectures: `gemma3`, `gemma2`, `llama` (SmolLM2 and other Llama-family models), `qwen2`,
//! `gpt2`.

use crate::error::{Error, Result};
use crate::weights::{GgufFile, MetaValue, Stored};
use kernels_ref::quant::GgmlType;
use serde_json::{json, Value};
use std::borrow::Cow;

pub const ARCHITECTURES: &str = "gemma3, gemma2, llama, qwen2, gpt2";

fn bad(file: &GgufFile, detail: String) -> Error {
    Error::Checkpoint { path: file.path().to_path_buf(), detail }
}

/// The `config.json` (as JSON) of the model in `file`.
pub fn config(file: &GgufFile) -> Result<Value> {
    let arch = file.architecture()?.to_string();
    if !["gemma3", "gemma2", "llama", "qwen2", "gpt2"].contains(&arch.as_str()) {
        return Err(bad(
            file,
            format!("unsupported architecture {arch:?} (general.architecture); supported: {ARCHITECTURES}"),
        ));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let num = |k: &str| -> Result<f64> {
        file.get(&key(k))
            .and_then(MetaValue::as_f64)
            .ok_or_else(|| bad(file, format!("metadata {} is missing or not a number", key(k))))
    };
    let int = |k: &str| -> Result<usize> {
        file.get(&key(k))
            .and_then(MetaValue::as_u64)
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| bad(file, format!("metadata {} is missing or not a non-negative integer", key(k))))
    };
    let opt_num = |k: &str| file.get(&key(k)).and_then(MetaValue::as_f64);
    let embed = file
        .tensor("token_embd.weight")
        .ok_or_else(|| bad(file, "tensor token_embd.weight (the embedding) is missing".into()))?;
    // the embedding's row count is the vocabulary the weights have (the tokenizer's list may differ)
    let vocab = embed.ne.get(1).copied().unwrap_or(0);
    let tied = file.tensor("output.weight").is_none();
    let (hidden, layers, ctx) = (int("embedding_length")?, int("block_count")?, int("context_length")?);
    let mut cfg = match arch.as_str() {
        "gpt2" => json!({
            "model_type": "gpt2", "n_layer": layers, "n_head": int("attention.head_count")?,
            "n_embd": hidden, "n_positions": ctx, "vocab_size": vocab,
            "layer_norm_epsilon": num("attention.layer_norm_epsilon")?,
            "n_inner": int("feed_forward_length")?,
        }),
        "llama" | "qwen2" => {
            let heads = int("attention.head_count")?;
            let kv =
                file.get(&key("attention.head_count_kv")).and_then(MetaValue::as_u64).unwrap_or(heads as u64);
            let head_dim = file
                .get(&key("attention.key_length"))
                .and_then(MetaValue::as_u64)
                .or_else(|| file.get(&key("rope.dimension_count")).and_then(MetaValue::as_u64));
            if file.get(&key("rope.scaling.type")).and_then(MetaValue::as_str).is_some_and(|t| t != "none") {
                return Err(bad(
                    file,
                    format!("{} is set: RoPE scaling is not supported yet", key("rope.scaling.type")),
                ));
            }
            let mut cfg = json!({
                "model_type": arch, "hidden_size": hidden, "intermediate_size": int("feed_forward_length")?,
                "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
                "vocab_size": vocab, "max_position_embeddings": ctx,
                "rms_norm_eps": num("attention.layer_norm_rms_epsilon")?,
                "rope_theta": opt_num("rope.freq_base").unwrap_or(10000.0),
                "tie_word_embeddings": tied,
                "attention_bias": arch == "llama" && file.tensor("blk.0.attn_q.bias").is_some(),
            });
            if let Some(d) = head_dim {
                cfg["head_dim"] = json!(d);
            }
            cfg
        }
        "gemma3" | "gemma2" => {
            let heads = int("attention.head_count")?;
            let head_dim = int("attention.key_length")?;
            let mut cfg = json!({
                "model_type": if arch == "gemma3" { "gemma3_text" } else { "gemma2" },
                "hidden_size": hidden, "intermediate_size": int("feed_forward_length")?,
                "num_hidden_layers": layers, "num_attention_heads": heads,
                "num_key_value_heads": int("attention.head_count_kv")?, "head_dim": head_dim,
                "vocab_size": vocab, "max_position_embeddings": ctx,
                "rms_norm_eps": num("attention.layer_norm_rms_epsilon")?,
                // llama.cpp scales queries by 1/sqrt(head_dim), as transformers' configs of every
                // size but Gemma 3 27B (whose GGUF it recognises by size) give it
                "query_pre_attn_scalar": head_dim,
                "sliding_window": file.get(&key("attention.sliding_window")).and_then(MetaValue::as_u64),
                "tie_word_embeddings": tied,
            });
            if arch == "gemma3" {
                cfg["rope_theta"] = json!(opt_num("rope.freq_base").unwrap_or(1e6));
                cfg["rope_local_base_freq"] = json!(10000.0);
                if let Some(p) =
                    file.get(&key("attention.sliding_window_pattern")).and_then(MetaValue::as_u64)
                {
                    cfg["sliding_window_pattern"] = json!(p);
                }
            } else {
                cfg["rope_theta"] = json!(opt_num("rope.freq_base").unwrap_or(10000.0));
                cfg["final_logit_softcapping"] = json!(opt_num("final_logit_softcapping"));
                cfg["attn_logit_softcapping"] = json!(opt_num("attn_logit_softcapping"));
            }
            if file.get(&key("rope.scaling.type")).and_then(MetaValue::as_str).is_some_and(|t| t != "none") {
                return Err(bad(
                    file,
                    format!("{} is set: RoPE scaling is not supported yet", key("rope.scaling.type")),
                ));
            }
            cfg
        }
        other => {
            return Err(bad(
                file,
                format!(
                    "unsupported architecture {other:?} (general.architecture); supported: {ARCHITECTURES}"
                ),
            ))
        }
    };
    let class = match arch.as_str() {
        "gpt2" => "GPT2LMHeadModel",
        "llama" => "LlamaForCausalLM",
        "qwen2" => "Qwen2ForCausalLM",
        "gemma3" => "Gemma3ForCausalLM",
        _ => "Gemma2ForCausalLM",
    };
    cfg["architectures"] = json!([class]);
    Ok(cfg)
}

/// The tensor that the model calls `hf_name` (as the family's `param_shapes` names it, so
/// without GPT-2's `transformer.` prefix), converted back to what Hugging Face holds.
/// `None` when the file has no such tensor.
pub fn tensor<'a>(file: &'a GgufFile, cfg: &Value, hf_name: &str) -> Result<Option<Stored<'a>>> {
    let arch = file.architecture()?;
    let Some((name, conversion)) = gguf_name(arch, hf_name) else { return Ok(None) };
    let Some(info) = file.tensor(&name) else { return Ok(None) };
    let shape = info.shape();
    let bytes = Cow::Borrowed(file.data(info));
    let stored = Stored { shape, ty: info.ty, bytes };
    Ok(Some(match conversion {
        Conversion::None => stored,
        Conversion::NormMinusOne => {
            let values: Vec<f32> = stored.to_f32().into_iter().map(|v| v - 1.0).collect();
            f32_stored(stored.shape, &values)
        }
        Conversion::Transpose => {
            let [rows, cols] = stored.shape[..] else {
                return Err(bad(
                    file,
                    format!("tensor {name} has shape {:?}; a matrix was expected", stored.shape),
                ));
            };
            let v = stored.to_f32();
            let mut t = vec![0f32; v.len()];
            for r in 0..rows {
                for c in 0..cols {
                    t[c * rows + r] = v[r * cols + c];
                }
            }
            f32_stored(vec![cols, rows], &t)
        }
        Conversion::UnpermuteHeads { kv } => {
            let heads =
                if kv { cfg["num_key_value_heads"].as_u64() } else { cfg["num_attention_heads"].as_u64() };
            let heads = heads.unwrap_or(1) as usize;
            unpermute(file, &name, stored, heads)?
        }
    }))
}

fn f32_stored(shape: Vec<usize>, values: &[f32]) -> Stored<'static> {
    Stored { shape, ty: GgmlType::F32, bytes: Cow::Owned(bytemuck::cast_slice(values).to_vec()) }
}

/// Undo llama.cpp's interleaving of each head's two row halves (whole rows move; any storage
/// type).
fn unpermute<'a>(file: &GgufFile, name: &str, stored: Stored<'a>, heads: usize) -> Result<Stored<'a>> {
    let rows = stored.shape.first().copied().unwrap_or(0);
    if heads == 0 || rows % heads != 0 || !(rows / heads).is_multiple_of(2) {
        return Err(bad(file, format!("tensor {name} has {rows} rows, not {heads} heads of an even size")));
    }
    let row_bytes = stored.bytes.len() / rows;
    let (d, half) = (rows / heads, rows / heads / 2);
    let mut out = vec![0u8; stored.bytes.len()];
    for h in 0..heads {
        for i in 0..2 {
            for j in 0..half {
                let (dst, src) = (h * d + i * half + j, h * d + 2 * j + i);
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&stored.bytes[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    Ok(Stored { shape: stored.shape, ty: stored.ty, bytes: Cow::Owned(out) })
}

/// What the converter did to a tensor, to undo on reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Conversion {
    None,
    NormMinusOne,
    Transpose,
    UnpermuteHeads { kv: bool },
}

/// llama.cpp's name of Hugging Face tensor `hf` (as the family's `param_shapes` names it) in an
/// `arch` file, and the conversion to undo.
pub(crate) fn gguf_name(arch: &str, hf: &str) -> Option<(String, Conversion)> {
    use Conversion::*;
    let gemma = arch.starts_with("gemma");
    let norm = if gemma { NormMinusOne } else { None };
    let (suffix, base) = if let Some(b) = hf.strip_suffix(".weight") {
        ("weight", b)
    } else {
        ("bias", hf.strip_suffix(".bias")?)
    };
    let global = |name: &str, c: Conversion| Some((format!("{name}.{suffix}"), c));
    if arch == "gpt2" {
        match base {
            "wte" => return global("token_embd", None),
            "wpe" => return global("position_embd", None),
            "ln_f" => return global("output_norm", None),
            _ => {}
        }
        let rest = base.strip_prefix("h.")?;
        let (layer, part) = rest.split_once('.')?;
        let matrix = if suffix == "weight" { Transpose } else { None };
        let (name, c) = match part {
            "ln_1" => ("attn_norm", None),
            "attn.c_attn" => ("attn_qkv", matrix),
            "attn.c_proj" => ("attn_output", matrix),
            "ln_2" => ("ffn_norm", None),
            "mlp.c_fc" => ("ffn_up", matrix),
            "mlp.c_proj" => ("ffn_down", matrix),
            _ => return Option::None,
        };
        return Some((format!("blk.{layer}.{name}.{suffix}"), c));
    }
    match base {
        "model.embed_tokens" => return global("token_embd", None),
        "model.norm" => return global("output_norm", norm),
        "lm_head" => return global("output", None),
        _ => {}
    }
    let rest = base.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let permute = |kv| if arch == "llama" { UnpermuteHeads { kv } } else { None };
    let (name, c) = match part {
        "input_layernorm" => ("attn_norm", norm),
        "self_attn.q_proj" => ("attn_q", permute(false)),
        "self_attn.k_proj" => ("attn_k", permute(true)),
        "self_attn.v_proj" => ("attn_v", None),
        "self_attn.o_proj" => ("attn_output", None),
        "self_attn.q_norm" => ("attn_q_norm", norm),
        "self_attn.k_norm" => ("attn_k_norm", norm),
        "post_attention_layernorm" if gemma => ("post_attention_norm", norm),
        "post_attention_layernorm" => ("ffn_norm", None),
        "pre_feedforward_layernorm" => ("ffn_norm", norm),
        "post_feedforward_layernorm" => ("post_ffw_norm", norm),
        "mlp.gate_proj" => ("ffn_gate", None),
        "mlp.up_proj" => ("ffn_up", None),
        "mlp.down_proj" => ("ffn_down", None),
        _ => return Option::None,
    };
    Some((format!("blk.{layer}.{name}.{suffix}"), c))
}
