//! GPT-2 (124M, 355M and any size of the same shape) from a Hugging Face model directory:
//! `config.json` and `model.safetensors` with Hugging Face key names, with or without the
//! `transformer.` prefix. Conv1D weights are stored (in, out), so every projection is `x W + b`;
//! the LM head is tied to the token embedding (`logits = x wte^T`).
//!
//!   x = wte[ids] + wpe[positions]
//!   per layer: x += c_proj(attn(c_attn(ln_1(x))));  x += mlp.c_proj(gelu(c_fc(ln_2(x))))
//!   logits = ln_f(x) wte^T;  loss = cross_entropy(logits, targets)

use crate::error::{Error, Result};
use crate::graph::{Device, Feed, Graph, ParamId, ParamStore, Var};
use crate::kernels::attention::AttnDims;
use serde::Deserialize;
use std::path::Path;

#[derive(Clone, Debug, Deserialize, serde::Serialize)]
pub struct Gpt2Config {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub n_positions: usize,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f32,
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_act")]
    pub activation_function: String,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default)]
    pub reorder_and_upcast_attn: bool,
}

fn default_eps() -> f32 {
    1e-5
}
fn default_act() -> String {
    "gelu_new".into()
}

impl Gpt2Config {
    /// Refuse what pockettune does not compute, and sizes that describe no model.
    pub fn check(&self) -> std::result::Result<(), String> {
        if !matches!(self.activation_function.as_str(), "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast") {
            return Err(format!(
                "activation_function {:?} is not supported (the tanh GELU variants are)",
                self.activation_function
            ));
        }
        if self.scale_attn_by_inverse_layer_idx || self.reorder_and_upcast_attn {
            return Err("scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported".into());
        }
        super::at_least_one(&[
            ("n_head", self.n_head),
            ("n_embd", self.n_embd),
            ("n_positions", self.n_positions),
            ("vocab_size", self.vocab_size),
            ("n_inner", self.inner()),
        ])?;
        let widths = [("n_head", self.n_head), ("n_embd", self.n_embd), ("vocab_size", self.vocab_size)];
        super::at_most(super::MAX_WIDTH, &widths)?;
        super::at_most(super::MAX_WIDTH, &[("n_inner", self.inner())])?;
        super::at_most(super::MAX_LAYERS, &[("n_layer", self.n_layer)])?;
        super::at_most(super::MAX_POSITIONS, &[("n_positions", self.n_positions)])?;
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(format!("n_embd {} is not a multiple of n_head {}", self.n_embd, self.n_head));
        }
        super::positive_number("layer_norm_epsilon", self.layer_norm_epsilon.into(), true)
    }
    pub fn inner(&self) -> usize {
        self.n_inner.unwrap_or(self.n_embd.saturating_mul(4))
    }
    /// GPT-2 124M.
    pub fn small() -> Self {
        Gpt2Config {
            n_layer: 12,
            n_head: 12,
            n_embd: 768,
            n_positions: 1024,
            vocab_size: 50257,
            layer_norm_epsilon: 1e-5,
            n_inner: None,
            activation_function: default_act(),
            scale_attn_by_inverse_layer_idx: false,
            reorder_and_upcast_attn: false,
        }
    }
}

struct Block {
    ln_1: (ParamId, ParamId),
    c_attn: (ParamId, ParamId),
    attn_proj: (ParamId, ParamId),
    ln_2: (ParamId, ParamId),
    c_fc: (ParamId, ParamId),
    mlp_proj: (ParamId, ParamId),
}

pub struct Gpt2 {
    pub cfg: Gpt2Config,
    wte: ParamId,
    wpe: ParamId,
    blocks: Vec<Block>,
    ln_f: (ParamId, ParamId),
}

/// The values of one built graph that callers read.
#[derive(Clone, Copy, Debug)]
pub struct Gpt2Vars {
    pub logits: Var,
    pub loss: Var,
}

impl Gpt2 {
    /// Every parameter name (without the `transformer.` prefix) and shape.
    pub fn param_shapes(cfg: &Gpt2Config) -> Vec<(String, Vec<usize>)> {
        let (c, v, p, f) = (cfg.n_embd, cfg.vocab_size, cfg.n_positions, cfg.inner());
        let mut out = vec![("wte.weight".to_string(), vec![v, c]), ("wpe.weight".to_string(), vec![p, c])];
        for l in 0..cfg.n_layer {
            let h = format!("h.{l}.");
            for (name, shape) in [
                ("ln_1.weight", vec![c]),
                ("ln_1.bias", vec![c]),
                ("attn.c_attn.weight", vec![c, 3 * c]),
                ("attn.c_attn.bias", vec![3 * c]),
                ("attn.c_proj.weight", vec![c, c]),
                ("attn.c_proj.bias", vec![c]),
                ("ln_2.weight", vec![c]),
                ("ln_2.bias", vec![c]),
                ("mlp.c_fc.weight", vec![c, f]),
                ("mlp.c_fc.bias", vec![f]),
                ("mlp.c_proj.weight", vec![f, c]),
                ("mlp.c_proj.bias", vec![c]),
            ] {
                out.push((format!("{h}{name}"), shape));
            }
        }
        out.push(("ln_f.weight".into(), vec![c]));
        out.push(("ln_f.bias".into(), vec![c]));
        out
    }

    /// GPT-2 355M.
    pub fn medium_config() -> Gpt2Config {
        Gpt2Config { n_layer: 24, n_head: 16, n_embd: 1024, ..Gpt2Config::small() }
    }

    /// Random weights as GPT-2 initialises them (normal, std 0.02; LayerNorm weight 1, biases 0),
    /// by name and shape.
    pub fn random_weights(cfg: &Gpt2Config, seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        use rand::SeedableRng;
        use rand_distr::{Distribution, Normal};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let normal = Normal::new(0.0f32, 0.02).expect("a valid standard deviation");
        Self::param_shapes(cfg)
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let data = if name.contains("ln_") && name.ends_with(".weight") {
                    vec![1.0; n]
                } else if name.ends_with(".bias") {
                    vec![0.0; n]
                } else {
                    (0..n).map(|_| normal.sample(&mut rng)).collect()
                };
                (name, shape, data)
            })
            .collect()
    }

    /// A randomly initialised model in a store on `dev` (benchmarks, examples).
    pub fn random(cfg: Gpt2Config, dev: &Device, seed: u64) -> Result<(Gpt2, ParamStore)> {
        let mut store = ParamStore::new(dev.clone());
        for (name, shape, data) in Self::random_weights(&cfg, seed) {
            store.add(&name, &shape, &data, true)?;
        }
        Ok((Self::from_store(cfg, &store)?, store))
    }

    /// Load a GPT-2 checkpoint (see [`super::Model::load`]).
    pub fn load(path: &Path, dev: &Device) -> Result<(Gpt2, ParamStore)> {
        match super::Model::load(path, dev)? {
            (super::Model::Gpt2(m), store) => Ok((m, store)),
            _ => Err(Error::Checkpoint { path: path.to_path_buf(), detail: "not a GPT-2 model".into() }),
        }
    }

    /// The model over parameters already in `store` (names as [`Self::param_shapes`] gives).
    pub fn from_store(cfg: Gpt2Config, store: &ParamStore) -> Result<Gpt2> {
        let id = |name: String| {
            store.id(&name).ok_or_else(|| Error::InvalidArgument {
                name: "parameter".into(),
                detail: format!("{name} is not in the store"),
            })
        };
        let pair = |prefix: String| -> Result<(ParamId, ParamId)> {
            Ok((id(format!("{prefix}.weight"))?, id(format!("{prefix}.bias"))?))
        };
        let blocks = (0..cfg.n_layer)
            .map(|l| {
                Ok(Block {
                    ln_1: pair(format!("h.{l}.ln_1"))?,
                    c_attn: pair(format!("h.{l}.attn.c_attn"))?,
                    attn_proj: pair(format!("h.{l}.attn.c_proj"))?,
                    ln_2: pair(format!("h.{l}.ln_2"))?,
                    c_fc: pair(format!("h.{l}.mlp.c_fc"))?,
                    mlp_proj: pair(format!("h.{l}.mlp.c_proj"))?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Gpt2 {
            wte: id("wte.weight".into())?,
            wpe: id("wpe.weight".into())?,
            ln_f: pair("ln_f".into())?,
            blocks,
            cfg,
        })
    }

    /// Record the training graph for batches of `b` sequences of `t` tokens.
    pub fn graph(&self, store: &ParamStore, b: usize, t: usize) -> Result<(Graph, Gpt2Vars)> {
        let (mut g, logits) = self.logits_graph(store, b, t, None)?;
        let targets = g.target_list(self.cfg.vocab_size);
        let loss = g.cross_entropy(logits, targets)?;
        Ok((g, Gpt2Vars { logits, loss }))
    }

    /// Record the graph up to the logits (inference: feed ids and positions, no targets).
    /// With `rows`, the logits of only that many fed positions (see [`super::pick_rows`]).
    pub fn logits_graph(
        &self,
        store: &ParamStore,
        b: usize,
        t: usize,
        rows: Option<usize>,
    ) -> Result<(Graph, Var)> {
        let cfg = &self.cfg;
        super::check_sequence_length(t, cfg.n_positions)?;
        let (c, n) = (cfg.n_embd, b * t);
        let eps = cfg.layer_norm_epsilon;
        let mut g = Graph::new();
        let tokens = g.id_list(cfg.vocab_size);
        let positions = g.id_list(cfg.n_positions);
        let p = |g: &mut Graph, id: ParamId| g.param(store, id);

        let wte = p(&mut g, self.wte);
        let wpe = p(&mut g, self.wpe);
        let tok = g.embedding(wte, tokens, n)?;
        let pos = g.embedding(wpe, positions, n)?;
        let mut x = g.add(tok, pos)?;
        let d = c / cfg.n_head;
        let dims = AttnDims {
            b,
            t,
            h: cfg.n_head,
            kv_h: cfg.n_head,
            d,
            window: None,
            scale: 1.0 / (d as f32).sqrt(),
            softcap: None,
        };
        for blk in &self.blocks {
            g.mark_layer_input(x);
            let (w, bias) = (p(&mut g, blk.ln_1.0), p(&mut g, blk.ln_1.1));
            let h = g.layernorm(x, w, bias, eps)?;
            let qkv = g.linear_lora(store, h, blk.c_attn.0, Some(blk.c_attn.1), false)?;
            let a = g.attention_packed(qkv, dims)?;
            let a = g.linear_lora(store, a, blk.attn_proj.0, Some(blk.attn_proj.1), false)?;
            x = g.add(x, a)?;
            let (w, bias) = (p(&mut g, blk.ln_2.0), p(&mut g, blk.ln_2.1));
            let h = g.layernorm(x, w, bias, eps)?;
            let h = g.linear_lora(store, h, blk.c_fc.0, Some(blk.c_fc.1), false)?;
            let h = g.gelu(h);
            let h = g.linear_lora(store, h, blk.mlp_proj.0, Some(blk.mlp_proj.1), false)?;
            x = g.add(x, h)?;
        }
        g.mark_layer_input(x); // the last layer's output closes its segment
        let x = super::pick_rows(&mut g, x, rows, b * t)?;
        let (w, bias) = (p(&mut g, self.ln_f.0), p(&mut g, self.ln_f.1));
        let x = g.layernorm(x, w, bias, eps)?;
        let logits = g.linear(x, wte, None, true)?;
        Ok((g, logits))
    }

    /// The feed for `b` sequences of `t` tokens (row-major) and their targets.
    pub fn feed(ids: &[u32], targets: &[i32], b: usize, t: usize) -> Feed {
        let mut feed = Self::inference_feed(ids, b, t);
        feed.targets.push(targets.to_vec());
        feed
    }

    /// The feed of [`Self::logits_graph`].
    pub fn inference_feed(ids: &[u32], b: usize, t: usize) -> Feed {
        let positions = (0..b).flat_map(|_| 0..t as u32).collect();
        Feed { ids: vec![ids.to_vec(), positions], targets: vec![], dropout_seed: None }
    }
}
