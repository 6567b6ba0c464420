//! Model families, one file each, configured from the checkpoint's `config.json` (or a GGUF
//! file's metadata, `gguf`) and loaded by Hugging Face tensor name from any weight source
//! (`load`).

pub mod gemma;
pub mod gguf;
pub mod gpt2;
pub mod llama;
mod load;
mod random;
pub use random::{write_random, write_random_gguf, PresetQuant};

pub use load::{device_form, open_source, LoadOptions};

use crate::error::{Error, Result};
use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io { path: path.to_path_buf(), cause: source }
}

/// A memory-mapped `.safetensors` file.
pub struct SafetensorsFile {
    path: PathBuf,
    map: memmap2::Mmap,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
        // SAFETY: the file is opened read-only and not modified while mapped by this process;
        // a concurrent writer elsewhere would be a user error we cannot rule out, as with any mmap.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io_err(path, e))?;
        let file = SafetensorsFile { path: path.to_path_buf(), map };
        file.parsed()?;
        Ok(file)
    }

    fn parsed(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.map).map_err(|e| Error::Checkpoint {
            path: self.path.clone(),
            detail: format!("not a readable safetensors file ({e}); is it truncated or corrupt?"),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn names(&self) -> Vec<String> {
        self.parsed().map(|s| s.names().into_iter().map(str::to_string).collect()).unwrap_or_default()
    }

    /// Drop the map's pages under `bytes` from this process (they stay in the page cache); a
    /// no-op for bytes outside this file's map.
    pub fn release_pages(&self, bytes: &[u8]) {
        crate::weights::release_pages(&self.map, bytes);
    }

    /// Shape and values (as f32) of `name`, if present. F32, F16 and BF16 are read.
    pub fn get(&self, name: &str) -> Result<Option<(Vec<usize>, Vec<f32>)>> {
        let st = self.parsed()?;
        let Ok(view) = st.tensor(name) else { return Ok(None) };
        let bytes = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => {
                bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
            }
            Dtype::F16 => {
                bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
            }
            Dtype::BF16 => {
                bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
            }
            Dtype::I64 => bytes
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
                .collect(),
            other => {
                return Err(Error::Checkpoint {
                    path: self.path.clone(),
                    detail: format!("tensor {name} has dtype {other:?}; F32, F16 and BF16 are supported"),
                })
            }
        };
        Ok(Some((view.shape().to_vec(), values)))
    }

    /// The stored bytes of `name` (F32, F16 or BF16), if present.
    pub fn stored(&self, name: &str) -> Result<Option<crate::weights::Stored<'_>>> {
        use kernels_ref::quant::GgmlType;
        let st = self.parsed()?;
        let Ok(view) = st.tensor(name) else { return Ok(None) };
        let ty = match view.dtype() {
            Dtype::F32 => GgmlType::F32,
            Dtype::F16 => GgmlType::F16,
            Dtype::BF16 => GgmlType::BF16,
            other => {
                return Err(Error::Checkpoint {
                    path: self.path.clone(),
                    detail: format!("tensor {name} has dtype {other:?}; F32, F16 and BF16 are supported"),
                })
            }
        };
        // the view borrows the parsed header; re-slice the same bytes from the map
        let data = view.data();
        let start = data.as_ptr() as usize - self.map.as_ptr() as usize;
        let bytes = std::borrow::Cow::Borrowed(&self.map[start..start + data.len()]);
        Ok(Some(crate::weights::Stored { shape: view.shape().to_vec(), ty, bytes }))
    }

    /// Like [`Self::get`], for a tensor that must be there with `shape`.
    pub fn require(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        match self.get(name)? {
            None => Err(Error::Checkpoint {
                path: self.path.clone(),
                detail: format!("tensor {name} is missing (the checkpoint does not match the config)"),
            }),
            Some((s, _)) if s != shape => Err(Error::Checkpoint {
                path: self.path.clone(),
                detail: format!("tensor {name} has shape {s:?}, the config implies {shape:?}"),
            }),
            Some((_, v)) => Ok(v),
        }
    }
}

/// The error for a `config.json` that parses but describes no valid model.
fn config_error(dir: &Path, detail: String) -> Error {
    Error::Checkpoint {
        path: dir.join("config.json"),
        detail: format!("{detail} (is this the config.json that came with the weights?)"),
    }
}

/// Config fields that must be at least 1 (a zero would divide by zero or make empty tensors).
fn at_least_one(fields: &[(&str, usize)]) -> std::result::Result<(), String> {
    match fields.iter().find(|(_, v)| *v == 0) {
        Some((name, _)) => Err(format!("{name} is 0; it must be at least 1")),
        None => Ok(()),
    }
}

/// Largest width (hidden, intermediate, heads, head size, vocabulary) a config may give: far
/// above any real model, and small enough that shapes multiplying two or three of them cannot
/// overflow.
const MAX_WIDTH: usize = 1 << 24;
/// Largest layer count (real models have up to a few hundred; each layer lists its tensors).
const MAX_LAYERS: usize = 1 << 12;
/// Largest position count (long-context models give about 10 million).
const MAX_POSITIONS: usize = 1 << 30;

/// Config fields that must not exceed `max` (a huge value overflowed in shape arithmetic, or
/// listed tensors for billions of layers, before the weights were even opened).
fn at_most(max: usize, fields: &[(&str, usize)]) -> std::result::Result<(), String> {
    match fields.iter().find(|(_, v)| *v > max) {
        Some((name, v)) => Err(format!("{name} is {v}, more than any model has (at most {max} here)")),
        None => Ok(()),
    }
}

/// The sizes of a RoPE decoder block (the Llama block and Gemma), as its `config.json` names
/// them, checked alike for every family that has one.
pub(crate) struct DecoderSizes {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub num_hidden_layers: usize,
    pub max_position_embeddings: usize,
}

impl DecoderSizes {
    /// None of them (nor any of `more`) 0, none beyond any model, query heads in whole groups
    /// per key/value head. The head dimension's parity is the caller's last check.
    pub(crate) fn check(&self, more: &[(&str, usize)]) -> std::result::Result<(), String> {
        let (h, kv) = (self.num_attention_heads, self.num_key_value_heads);
        let mut nonzero = vec![
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", h),
            ("num_key_value_heads", kv),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        nonzero.extend_from_slice(more);
        at_least_one(&nonzero)?;
        at_most(
            MAX_WIDTH,
            &[
                ("hidden_size", self.hidden_size),
                ("intermediate_size", self.intermediate_size),
                ("num_attention_heads", h),
                ("num_key_value_heads", kv),
                ("head_dim", self.head_dim),
                ("vocab_size", self.vocab_size),
            ],
        )?;
        at_most(MAX_LAYERS, &[("num_hidden_layers", self.num_hidden_layers)])?;
        at_most(MAX_POSITIONS, &[("max_position_embeddings", self.max_position_embeddings)])?;
        if h % kv != 0 {
            return Err(format!("num_attention_heads {h} is not a multiple of num_key_value_heads {kv}"));
        }
        Ok(())
    }
}

/// A config number that must be finite and positive (or, with `zero_ok`, zero).
fn positive_number(name: &str, v: f64, zero_ok: bool) -> std::result::Result<(), String> {
    if v.is_finite() && (v > 0.0 || (zero_ok && v == 0.0)) {
        return Ok(());
    }
    let want = if zero_ok { "a finite number, 0 or more" } else { "a positive finite number" };
    Err(format!("{name} is {v}; it must be {want}"))
}

/// Read and parse `config.json` of a model directory.
pub fn read_config<T: serde::de::DeserializeOwned>(dir: &Path) -> Result<T> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| io_err(&path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Checkpoint { path, detail: format!("config.json does not parse: {e}") })
}

use crate::graph::{Device, Feed, Graph, ParamStore, Var};
use crate::memory::GraphOptions;

/// A model of any supported family, chosen by `config.json`.
pub enum Model {
    Gpt2(gpt2::Gpt2),
    /// Qwen2 and Llama-family checkpoints.
    Llama(llama::Llama),
    Gemma(gemma::Gemma),
}

/// The values of one built training graph that callers read.
#[derive(Clone, Copy, Debug)]
pub struct Vars {
    /// `None` in a graph with the fused LM head + loss (`GraphOptions::fused_loss`), where the
    /// logits never exist whole; [`Model::logits_graph`] gives them for eval and generation.
    pub logits: Option<Var>,
    pub loss: Var,
}

/// The model families, by `config.json`'s `model_type`.
enum Family {
    Gpt2,
    /// Qwen2 and Llama
    Llama,
    /// Gemma 3 and Gemma 2
    Gemma,
}

const SUPPORTED: &str = "gpt2, qwen2, llama, gemma3_text, gemma2";

impl Family {
    fn of(model_type: &str) -> Option<Family> {
        match model_type {
            "gpt2" => Some(Family::Gpt2),
            "qwen2" | "llama" => Some(Family::Llama),
            "gemma3_text" | "gemma2" => Some(Family::Gemma),
            _ => None,
        }
    }
}

impl Model {
    pub fn vocab_size(&self) -> usize {
        match self {
            Model::Gpt2(m) => m.cfg.vocab_size,
            Model::Llama(m) => m.cfg.vocab_size,
            Model::Gemma(m) => m.cfg.vocab_size,
        }
    }

    pub fn max_positions(&self) -> usize {
        match self {
            Model::Gpt2(m) => m.cfg.n_positions,
            Model::Llama(m) => m.cfg.max_position_embeddings,
            Model::Gemma(m) => m.cfg.max_position_embeddings,
        }
    }

    /// The graph up to the logits, for `b` sequences of `t` tokens.
    pub fn logits_graph(&self, store: &ParamStore, b: usize, t: usize) -> Result<(Graph, Var)> {
        match self {
            Model::Gpt2(m) => m.logits_graph(store, b, t, None),
            Model::Llama(m) => m.logits_graph(store, b, t, None),
            Model::Gemma(m) => m.logits_graph(store, b, t, None),
        }
    }

    /// The graph up to the logits of `rows` positions only (chosen at run time by the third
    /// list of [`Self::inference_feed_rows`]): what generation and multiple-choice scoring
    /// need, without the LM head's product and read-back over every position.
    pub fn logits_graph_rows(
        &self,
        store: &ParamStore,
        b: usize,
        t: usize,
        rows: usize,
    ) -> Result<(Graph, Var)> {
        match self {
            Model::Gpt2(m) => m.logits_graph(store, b, t, Some(rows)),
            Model::Llama(m) => m.logits_graph(store, b, t, Some(rows)),
            Model::Gemma(m) => m.logits_graph(store, b, t, Some(rows)),
        }
    }

    /// The feed of [`Self::logits_graph_rows`]: `rows` are indices into the `b * t` positions
    /// (row-major), e.g. `t - 1` for the last position of the first sequence.
    pub fn inference_feed_rows(ids: &[u32], b: usize, t: usize, rows: &[u32]) -> Feed {
        let mut feed = Self::inference_feed(ids, b, t);
        feed.ids.push(rows.to_vec());
        feed
    }

    /// The training graph: logits and the mean cross-entropy against the fed targets.
    pub fn graph(&self, store: &ParamStore, b: usize, t: usize) -> Result<(Graph, Vars)> {
        self.graph_with(store, b, t, GraphOptions::default())
    }

    /// [`Self::graph`] with the memory options of `crate::memory` (exact rewrites).
    pub fn graph_with(
        &self,
        store: &ParamStore,
        b: usize,
        t: usize,
        options: GraphOptions,
    ) -> Result<(Graph, Vars)> {
        let (mut g, logits) = self.logits_graph(store, b, t)?;
        g.set_options(options);
        let targets = g.target_list(self.vocab_size());
        if options.fused_loss {
            // the head's product (and Gemma's soft-cap) become one node that walks the vocabulary
            let loss = g.fuse_linear_cross_entropy(logits, targets)?;
            return Ok((g, Vars { logits: None, loss }));
        }
        let loss = g.cross_entropy(logits, targets)?;
        Ok((g, Vars { logits: Some(logits), loss }))
    }

    /// The feed of [`Self::graph`] (token ids row-major, targets with -100 for no loss).
    pub fn feed(ids: &[u32], targets: &[i32], b: usize, t: usize) -> Feed {
        gpt2::Gpt2::feed(ids, targets, b, t)
    }

    /// The feed of [`Self::logits_graph`].
    pub fn inference_feed(ids: &[u32], b: usize, t: usize) -> Feed {
        gpt2::Gpt2::inference_feed(ids, b, t)
    }
}

/// Before the final norm, keep only `rows` of the `n` positions (picked by an id list fed at
/// run time, gathered like embedding rows), when given.
fn pick_rows(g: &mut Graph, x: Var, rows: Option<usize>, n: usize) -> Result<Var> {
    match rows {
        None => Ok(x),
        Some(r) => {
            let list = g.id_list(n);
            g.embedding(x, list, r)
        }
    }
}

/// A sequence of `t` tokens must fit the model's `max` positions.
fn check_sequence_length(t: usize, max: usize) -> Result<()> {
    if t > max {
        return Err(Error::InvalidArgument {
            name: "sequence length".into(),
            detail: format!("{t} is longer than the model's {max} positions"),
        });
    }
    Ok(())
}

/// Shapes of the benchmark presets: GPT-2 124M and 355M, a 2-layer GPT-2, and random models of
/// the Qwen2.5-0.5B, Gemma-3-270M, Gemma-3-1B and SmolLM2-135M shapes (as their published
/// configs give them; SmolLM2's checked against the metadata of its GGUF in assets/: 30 blocks,
/// 576 wide, 1536 feed-forward, 9 heads, 3 key/value heads, rope base 1e5, no output.weight).
pub fn preset_config(name: &str) -> Result<serde_json::Value> {
    Ok(match name {
        "gpt2" => serde_json::json!({"model_type": "gpt2", "n_layer": 12, "n_head": 12, "n_embd": 768,
            "n_positions": 1024, "vocab_size": 50257}),
        "gpt2-medium" => {
            serde_json::json!({"model_type": "gpt2", "n_layer": 24, "n_head": 16, "n_embd": 1024,
            "n_positions": 1024, "vocab_size": 50257})
        }
        "tiny" => serde_json::json!({"model_type": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 64,
            "n_positions": 256, "vocab_size": 50257}),
        "qwen2.5-0.5b" => {
            serde_json::json!({"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
            "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
            "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "tie_word_embeddings": true})
        }
        "gemma3-270m" => {
            serde_json::json!({"model_type": "gemma3_text", "hidden_size": 640, "intermediate_size": 2048,
            "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
            "vocab_size": 262144, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
            "query_pre_attn_scalar": 256, "sliding_window": 512, "sliding_window_pattern": 6,
            "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0})
        }
        "gemma3-1b" => {
            serde_json::json!({"model_type": "gemma3_text", "hidden_size": 1152, "intermediate_size": 6912,
            "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
            "vocab_size": 262144, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
            "query_pre_attn_scalar": 256, "sliding_window": 512, "sliding_window_pattern": 6,
            "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0})
        }
        "smollm2-135m" => {
            serde_json::json!({"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
            "tie_word_embeddings": true})
        }
        other => {
            return Err(Error::InvalidArgument {
                name: "preset".into(),
                detail: format!(
                    "unknown preset {other:?}: gpt2, gpt2-medium, tiny, qwen2.5-0.5b, gemma3-270m, \
                     gemma3-1b, smollm2-135m"
                ),
            })
        }
    })
}

impl Model {
    /// A randomly initialised model from a config (normal weights with std 0.02, norms at
    /// their identity: 1, or 0 for Gemma's `1 + w`).
    pub fn random(config: serde_json::Value, dev: &Device, seed: u64) -> Result<(Model, ParamStore)> {
        use load::Parsed;
        use rand::SeedableRng;
        use rand_distr::{Distribution, Normal};
        let parsed = Parsed::from_json(config)
            .map_err(|detail| Error::InvalidArgument { name: "config".into(), detail })?;
        let (shapes, norm_value) = match &parsed {
            Parsed::Gpt2(c) => (gpt2::Gpt2::param_shapes(c), 1.0),
            Parsed::Llama(c) => (llama::Llama::param_shapes(c), 1.0),
            Parsed::Gemma(c) => (gemma::Gemma::param_shapes(c), 0.0),
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let normal = Normal::new(0.0f32, 0.02).expect("a valid standard deviation");
        let mut store = ParamStore::new(dev.clone());
        for (name, shape) in shapes {
            let n: usize = shape.iter().product();
            let is_norm = shape.len() == 1 && (name.contains("norm") || name.contains("ln_"));
            let planning = matches!(dev, Device::Gpu(g) if g.planning());
            let data: Vec<f32> = if planning {
                vec![0.0; n] // a plan counts buffers; their values are never read
            } else if is_norm && name.ends_with(".weight") {
                vec![norm_value; n]
            } else if shape.len() == 1 {
                vec![0.0; n]
            } else {
                (0..n).map(|_| normal.sample(&mut rng)).collect()
            };
            store.add(&name, &shape, &data, true)?;
        }
        let model = parsed.build(&store)?;
        Ok((model, store))
    }
}
