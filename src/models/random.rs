//! A randomly initialised model written to disk, one tensor at a time, so that a model larger
//! than host memory can be made: what the streaming benchmarks (`bench step --memory-budget`
//! with a preset) and tests load back through the memory map.
//!
//! - [`write_random`]: a Hugging Face directory (config.json and f32 model.safetensors), values
//!   as [`super::Model::random`] draws them (normal with std 0.02, norms at their identity,
//!   biases 0), each tensor from its own seeded generator.
//! - [`write_random_gguf`]: a GGUF file quantized as llama.cpp's Q4_K_M mix would store the
//!   model (its tensor names, `<arch>.*` metadata and a small `tokenizer.ggml.*` vocabulary), the
//!   packed blocks random but valid (`kernels_ref::quant::random_blocks`: weights of about
//!   +-0.02), norms at their identity, biases 0. It is written piece by piece: host memory holds
//!   the header and one piece of one tensor, never the file.

use super::load::Parsed;
use super::{gemma, gpt2, llama};
use crate::error::{Error, Result};
use crate::weights::gguf::GgufWriter;
use crate::weights::MetaValue;
use kernels_ref::quant::GgmlType;
use safetensors::tensor::View;
use safetensors::Dtype;
use std::borrow::Cow;
use std::io::Write;
use std::path::Path;

/// One tensor whose values are drawn when the writer asks for its bytes.
struct Lazy {
    shape: Vec<usize>,
    seed: u64,
    /// Some(v): every value is v (norms and biases)
    constant: Option<f32>,
}

impl View for &Lazy {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        use rand::SeedableRng;
        use rand_distr::{Distribution, Normal};
        let n: usize = self.shape.iter().product();
        let values: Vec<f32> = match self.constant {
            Some(v) => vec![v; n],
            None => {
                let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed);
                let normal = Normal::new(0.0f32, 0.02).expect("a valid standard deviation");
                (0..n).map(|_| normal.sample(&mut rng)).collect()
            }
        };
        Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        4 * self.shape.iter().product::<usize>()
    }
}

/// Write a random model of `config` into `dir` (created if needed).
pub fn write_random(config: &serde_json::Value, dir: &Path, seed: u64) -> Result<()> {
    let parsed = Parsed::from_json(config.clone())
        .map_err(|detail| Error::InvalidArgument { name: "config".into(), detail })?;
    let (shapes, norm_value) = match &parsed {
        Parsed::Gpt2(c) => (gpt2::Gpt2::param_shapes(c), 1.0),
        Parsed::Llama(c) => (llama::Llama::param_shapes(c), 1.0),
        Parsed::Gemma(c) => (gemma::Gemma::param_shapes(c), 0.0),
    };
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e| Error::Io { path, cause: e }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tensors: Vec<(String, Lazy)> = shapes
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let is_norm = shape.len() == 1 && (name.contains("norm") || name.contains("ln_"));
            let constant = match (is_norm && name.ends_with(".weight"), shape.len()) {
                (true, _) => Some(norm_value),
                (false, 1) => Some(0.0),
                _ => None,
            };
            (name, Lazy { shape, seed: seed.wrapping_mul(1_000_003).wrapping_add(i as u64), constant })
        })
        .collect();
    let file = dir.join("model.safetensors");
    safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (n.as_str(), t)), None, &file).map_err(
        |e| Error::Checkpoint { path: file.clone(), detail: format!("writing random weights: {e}") },
    )?;
    let config_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(config).expect("a JSON value serializes");
    std::fs::write(&config_path, text).map_err(io(&config_path))
}

/// How [`write_random_gguf`] stores a model's matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
pub enum PresetQuant {
    /// llama.cpp's Q4_K_M mix: Q4_K matrices; Q6_K for the output matrix (the token embedding
    /// when it is tied), and for `attn_v` and `ffn_down` in the first and last eighth of the
    /// layers and every third one between; a Q4_K (Q6_K) matrix whose rows are not whole
    /// 256-element blocks falls back to Q5_0 (Q8_0), as llama.cpp's does; norms f32.
    #[value(name = "q4_k_m")]
    #[serde(rename = "q4_k_m")]
    Q4KM,
}

impl PresetQuant {
    pub fn name(self) -> &'static str {
        match self {
            PresetQuant::Q4KM => "q4_k_m",
        }
    }

    /// The storage of GGUF tensor `name` (llama.cpp's name, e.g. `blk.3.attn_v.weight`) of
    /// row-major `shape` in a model of `layers` blocks; `tied`: the token embedding is also the
    /// output matrix.
    pub fn storage(self, name: &str, shape: &[usize], layers: usize, tied: bool) -> GgmlType {
        let [_, cols] = shape[..] else { return GgmlType::F32 };
        // llama.cpp's `use_more_bits`: the first and last eighth, and every third layer between
        // (past the first clause i >= layers / 8, so the subtraction cannot wrap)
        let more_bits = |i: usize| i < layers / 8 || i >= 7 * layers / 8 || (i - layers / 8) % 3 == 2;
        let layer =
            name.strip_prefix("blk.").and_then(|r| r.split_once('.')).and_then(|(i, _)| i.parse().ok());
        let wanted = match (name, layer) {
            ("output.weight", _) => GgmlType::Q6_K,
            ("token_embd.weight", _) if tied => GgmlType::Q6_K,
            (n, Some(i)) if (n.contains(".attn_v.") || n.contains(".ffn_down.")) && more_bits(i) => {
                GgmlType::Q6_K
            }
            _ => GgmlType::Q4_K,
        };
        // rows hold whole blocks: the K-quants' are 256 elements, the fallbacks' 32
        match wanted {
            _ if cols % 32 != 0 => GgmlType::F16,
            GgmlType::Q4_K if cols % 256 != 0 => GgmlType::Q5_0,
            GgmlType::Q6_K if cols % 256 != 0 => GgmlType::Q8_0,
            ty => ty,
        }
    }
}

/// Elements drawn and written at a time (a 1.2 GB embedding is written in ~20 MB pieces).
const PIECE_ELEMS: usize = 1 << 24;
/// The data alignment of the file (GGUF's default; no `general.alignment` is written).
const ALIGN: usize = 32;

/// One tensor of the file: its GGUF name, row-major shape, storage and contents.
struct GgufTensor {
    name: String,
    shape: Vec<usize>,
    ty: GgmlType,
    seed: u64,
    /// Some(v): every value is v (f32 norms and biases)
    constant: Option<f32>,
}

impl GgufTensor {
    fn len(&self) -> usize {
        self.ty.bytes_for(self.shape.iter().product()).expect("whole blocks by the choice of storage")
    }
    /// The bytes, in pieces of whole rows, each piece from its own seeded generator.
    fn write_to(&self, out: &mut impl Write) -> std::io::Result<()> {
        let n: usize = self.shape.iter().product();
        if let Some(v) = self.constant {
            return out.write_all(&v.to_le_bytes().repeat(n));
        }
        let cols = *self.shape.last().expect("a matrix");
        let rows_per_piece = (PIECE_ELEMS / cols).max(1);
        for (k, row0) in (0..n / cols).step_by(rows_per_piece).enumerate() {
            let rows = rows_per_piece.min(n / cols - row0);
            let seed = self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(k as u64);
            out.write_all(&kernels_ref::quant::random_blocks(self.ty, rows * cols, seed))?;
        }
        Ok(())
    }
}

/// llama.cpp's architecture name and the `<arch>.*` metadata of a parsed config.
fn gguf_metadata(parsed: &Parsed) -> Result<(&'static str, Vec<(String, MetaValue)>)> {
    let u = |v: usize| MetaValue::U32(v as u32);
    let f = |v: f64| MetaValue::F32(v as f32);
    let (arch, mut m) = match parsed {
        Parsed::Gpt2(_) => {
            return Err(Error::InvalidArgument {
                name: "preset".into(),
                detail: "a quantized GPT-2 would load as f32 (its Conv1D matrices are transposed on \
                         reading): use a Gemma, Qwen2 or Llama preset"
                    .into(),
            })
        }
        Parsed::Gemma(c) => {
            let gemma3 = c.generation == gemma::Generation::Gemma3;
            let arch = if gemma3 { "gemma3" } else { "gemma2" };
            let full = |c: &gemma::GemmaConfig| {
                c.rope_parameters.as_ref().and_then(|p| p["full_attention"]["rope_theta"].as_f64())
            };
            let theta = c.rope_theta.or_else(|| full(c)).unwrap_or(if gemma3 { 1e6 } else { 1e4 });
            let mut m = vec![
                ("context_length", u(c.max_position_embeddings)),
                ("embedding_length", u(c.hidden_size)),
                ("block_count", u(c.num_hidden_layers)),
                ("feed_forward_length", u(c.intermediate_size)),
                ("attention.head_count", u(c.num_attention_heads)),
                ("attention.head_count_kv", u(c.num_key_value_heads)),
                // readers take 1/sqrt(key_length) as the query scale (query_pre_attn_scalar)
                ("attention.key_length", u(c.head_dim)),
                ("attention.value_length", u(c.head_dim)),
                ("attention.layer_norm_rms_epsilon", f(c.rms_norm_eps.into())),
                ("rope.freq_base", f(theta)),
            ];
            if let Some(w) = c.sliding_window {
                m.push(("attention.sliding_window", u(w)));
            }
            let first_global = c.layer_types.iter().position(|t| t == "full_attention").map(|i| i + 1);
            if let (true, Some(p)) = (gemma3, c.sliding_window_pattern.or(first_global)) {
                m.push(("attention.sliding_window_pattern", u(p)));
            }
            for (key, cap) in [
                ("final_logit_softcapping", c.final_logit_softcapping),
                ("attn_logit_softcapping", c.attn_logit_softcapping),
            ] {
                if let Some(cap) = cap {
                    m.push((key, f(cap)));
                }
            }
            (arch, m)
        }
        Parsed::Llama(c) => {
            let arch = if c.model_type == "qwen2" { "qwen2" } else { "llama" };
            let head_dim = c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads);
            let theta =
                c.rope_theta.or_else(|| c.rope_parameters.as_ref().and_then(|p| p["rope_theta"].as_f64()));
            let m = vec![
                ("context_length", u(c.max_position_embeddings)),
                ("embedding_length", u(c.hidden_size)),
                ("block_count", u(c.num_hidden_layers)),
                ("feed_forward_length", u(c.intermediate_size)),
                ("attention.head_count", u(c.num_attention_heads)),
                ("attention.head_count_kv", u(c.num_key_value_heads.unwrap_or(c.num_attention_heads))),
                ("attention.key_length", u(head_dim)),
                ("attention.value_length", u(head_dim)),
                ("rope.dimension_count", u(head_dim)),
                ("attention.layer_norm_rms_epsilon", f(c.rms_norm_eps.into())),
                ("rope.freq_base", f(theta.unwrap_or(1e4))),
            ];
            (arch, m)
        }
    };
    let mut out = vec![("general.architecture".to_string(), MetaValue::Str(arch.into()))];
    out.extend(m.drain(..).map(|(k, v)| (format!("{arch}.{k}"), v)));
    Ok((arch, out))
}

/// A SentencePiece-style vocabulary of `n` tokens, so that the file carries a tokenizer
/// (`train --model FILE.gguf` reads it): `<pad> <eos> <bos> <unk>`, the 256 byte tokens
/// `<0x00>..<0xFF>`, the word boundary `\u{2581}`, then placeholder words; text tokenizes to
/// bytes and word boundaries.
fn tokenizer_metadata(n: usize) -> Vec<(String, MetaValue)> {
    let special = ["<pad>", "<eos>", "<bos>", "<unk>"];
    let token = |i: usize| match i {
        i if i < 4 => special[i].to_string(),
        i if i < 260 => format!("<0x{:02X}>", i - 4),
        260 => "\u{2581}".to_string(),
        i => format!("\u{2581}w{i}"),
    };
    // llama.cpp's token types: 1 normal, 2 unknown, 3 control, 6 byte
    let kind = |i: usize| match i {
        3 => 2,
        i if i < 4 => 3,
        i if i < 260 => 6,
        _ => 1,
    };
    let meta = |k: &str, v: MetaValue| (format!("tokenizer.ggml.{k}"), v);
    vec![
        meta("model", MetaValue::Str("llama".into())),
        meta("tokens", MetaValue::Array((0..n).map(|i| MetaValue::Str(token(i))).collect())),
        meta("scores", MetaValue::Array((0..n).map(|i| MetaValue::F32(-(i as f32))).collect())),
        meta("token_type", MetaValue::Array((0..n).map(|i| MetaValue::I32(kind(i))).collect())),
        meta("bos_token_id", MetaValue::U32(2)),
        meta("eos_token_id", MetaValue::U32(1)),
        meta("unknown_token_id", MetaValue::U32(3)),
        meta("padding_token_id", MetaValue::U32(0)),
        meta("add_bos_token", MetaValue::Bool(true)),
    ]
}

/// Write a random model of `config` as a GGUF file at `path`, its matrices stored as `quant`
/// says (see [`PresetQuant::storage`]). The file appears whole or not at all (written beside
/// and renamed).
pub fn write_random_gguf(
    config: &serde_json::Value,
    path: &Path,
    seed: u64,
    quant: PresetQuant,
) -> Result<()> {
    let parsed = Parsed::from_json(config.clone())
        .map_err(|detail| Error::InvalidArgument { name: "config".into(), detail })?;
    let (arch, mut metadata) = gguf_metadata(&parsed)?;
    let shapes = parsed.param_shapes();
    let layers = match &parsed {
        Parsed::Gemma(c) => c.num_hidden_layers,
        Parsed::Llama(c) => c.num_hidden_layers,
        Parsed::Gpt2(c) => c.n_layer,
    };
    let tied = !shapes.iter().any(|(n, _)| n == "lm_head.weight");
    let vocab = shapes.first().map_or(0, |(_, s)| s[0]);
    if vocab >= 4 {
        metadata.extend(tokenizer_metadata(vocab));
    }
    let mut tensors = Vec::with_capacity(shapes.len());
    for (i, (hf, shape)) in shapes.into_iter().enumerate() {
        let (name, _) = super::gguf::gguf_name(arch, &hf).ok_or_else(|| Error::InvalidArgument {
            name: "config".into(),
            detail: format!("tensor {hf} has no GGUF name for architecture {arch}"),
        })?;
        // GGUF stores Gemma's norms as 1 + w; every family's norms are at their identity
        let constant = match shape.len() {
            1 if hf.ends_with(".weight") => Some(1.0),
            1 => Some(0.0),
            _ => None,
        };
        let ty = quant.storage(&name, &shape, layers, tied);
        let seed = seed.wrapping_mul(1_000_003).wrapping_add(i as u64);
        tensors.push(GgufTensor { name, shape, ty, seed, constant });
    }

    let mut head = b"GGUF".to_vec();
    head.extend(3u32.to_le_bytes());
    head.extend((tensors.len() as u64).to_le_bytes());
    head.extend((metadata.len() as u64).to_le_bytes());
    for (k, v) in &metadata {
        GgufWriter::put_value(&mut head, &MetaValue::Str(k.clone()));
        head.extend(GgufWriter::type_id(v).to_le_bytes());
        GgufWriter::put_value(&mut head, v);
    }
    let mut offset = 0usize;
    for t in &tensors {
        GgufWriter::put_value(&mut head, &MetaValue::Str(t.name.clone()));
        head.extend((t.shape.len() as u32).to_le_bytes());
        t.shape.iter().rev().for_each(|d| head.extend((*d as u64).to_le_bytes())); // innermost first
        head.extend(t.ty.id().to_le_bytes());
        head.extend((offset as u64).to_le_bytes());
        offset += t.len().div_ceil(ALIGN) * ALIGN;
    }
    head.resize(head.len().div_ceil(ALIGN) * ALIGN, 0);

    let part = path.with_file_name(format!(
        ".{}.part",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("model.gguf")
    ));
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e| Error::Io { path: p, cause: e }
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let file = std::fs::File::create(&part).map_err(io(&part))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    out.write_all(&head).map_err(io(&part))?;
    for t in &tensors {
        t.write_to(&mut out).map_err(io(&part))?;
        let pad = t.len().div_ceil(ALIGN) * ALIGN - t.len();
        out.write_all(&[0u8; ALIGN][..pad]).map_err(io(&part))?;
    }
    let file = out.into_inner().map_err(|e| Error::Io { path: part.clone(), cause: e.into_error() })?;
    file.sync_all().map_err(io(&part))?;
    drop(file);
    std::fs::rename(&part, path).map_err(io(path))
}
