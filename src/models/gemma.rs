//! Gemma 3 text models (270M, 1B; `model_type` `gemma3_text`) and Gemma 2 (`gemma2`) from a
//! Hugging Face directory. What differs from the Llama block (see `llama.rs`):
//!
//! - RMSNorm scales by `(1 + w)`; four norms per layer: before and after attention, before and
//!   after the MLP (the "after" norms apply to the branch output, before the residual add)
//! - GeGLU MLP (tanh GELU); embeddings multiplied by sqrt(hidden_size); tied LM head
//! - layers alternate between sliding-window (local) and global attention as `layer_types`
//!   says; attention scale `query_pre_attn_scalar^-0.5`
//! - soft-capping `c tanh(x / c)` of the output logits (`final_logit_softcapping`) where the
//!   config sets it (Gemma 2 ships with 30, Gemma 3 with null)
//!
//! Gemma 3 only: q and k are RMS-normalised per head (`q_norm`, `k_norm`, weight of head_dim)
//! before RoPE, and local and global layers have their own RoPE bases.
//! Gemma 2 only: the attention scores are soft-capped (`attn_logit_softcapping`, 50 as shipped;
//! after the scale, before the mask). Gemma 3 replaced that cap by the q/k norms: transformers'
//! Gemma 3 reads `attn_logit_softcapping` but never applies it, and neither does pockettune (it
//! says so when a Gemma 3 config sets it), so that both compute the same model.

use crate::error::{Error, Result};
use crate::graph::{Graph, ParamId, ParamStore, Var};
use crate::kernels::attention::AttnDims;
use serde::Deserialize;
use std::path::Path;

/// Which Gemma generation a config describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum Generation {
    #[serde(rename = "gemma2")]
    Gemma2,
    #[serde(rename = "gemma3_text")]
    Gemma3,
}

#[derive(Clone, Debug, Deserialize)]
pub struct GemmaConfig {
    #[serde(rename = "model_type")]
    pub generation: Generation,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f32,
    #[serde(default = "default_scalar")]
    pub query_pre_attn_scalar: f64,
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub layer_types: Vec<String>,
    /// older configs: every `sliding_window_pattern`-th layer is global
    #[serde(default)]
    pub sliding_window_pattern: Option<usize>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_local_base_freq: Option<f64>,
    /// transformers 5: {"sliding_attention": {"rope_theta": ..}, "full_attention": {..}}
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
    #[serde(default = "default_act")]
    pub hidden_activation: String,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub use_bidirectional_attention: Option<bool>,
}

fn default_true() -> bool {
    true
}

fn default_eps() -> f32 {
    1e-6
}
fn default_scalar() -> f64 {
    256.0
}
fn default_act() -> String {
    "gelu_pytorch_tanh".into()
}

impl GemmaConfig {
    /// Gemma 3 checkpoints may carry Gemma 2's attention soft-cap, which Gemma 3 does not apply.
    pub(crate) fn note_ignored_softcap(&self, path: &Path) {
        if let (Generation::Gemma3, Some(c)) = (self.generation, self.attn_logit_softcapping) {
            eprintln!(
                "note: {} sets attn_logit_softcapping = {c}; Gemma 3 does not apply it (transformers \
                 neither), so it is ignored",
                path.join("config.json").display()
            );
        }
    }

    /// Whether layer `l` uses the sliding window. Without `layer_types`, every
    /// `sliding_window_pattern`-th layer is global (transformers' defaults: 6 for Gemma 3, 2
    /// for Gemma 2).
    pub fn is_sliding(&self, l: usize) -> bool {
        match self.layer_types.get(l) {
            Some(t) => t == "sliding_attention",
            None => {
                let default = if self.generation == Generation::Gemma2 { 2 } else { 6 };
                !(l + 1).is_multiple_of(self.sliding_window_pattern.unwrap_or(default))
            }
        }
    }

    /// RoPE base of a local (sliding) or global layer.
    pub fn theta(&self, sliding: bool) -> f64 {
        if self.generation == Generation::Gemma2 {
            // one base for every layer: rope_parameters.rope_theta (transformers 5) or rope_theta
            let from_params = self.rope_parameters.as_ref().and_then(|p| p.get("rope_theta")?.as_f64());
            return from_params.or(self.rope_theta).unwrap_or(10000.0);
        }
        let kind = if sliding { "sliding_attention" } else { "full_attention" };
        let from_params =
            self.rope_parameters.as_ref().and_then(|p| p.get(kind)?.get("rope_theta")?.as_f64());
        let old =
            if sliding { self.rope_local_base_freq.or(Some(10000.0)) } else { self.rope_theta.or(Some(1e6)) };
        from_params.or(old).unwrap_or(10000.0)
    }

    /// The cap of the attention scores this model applies (see the module notes).
    pub fn attention_softcap(&self) -> Option<f32> {
        match self.generation {
            Generation::Gemma2 => self.attn_logit_softcapping.map(|c| c as f32),
            Generation::Gemma3 => None,
        }
    }

    /// Refuse what pockettune does not compute, and sizes that describe no model.
    pub fn check(&self) -> std::result::Result<(), String> {
        let bad = |detail: String| Err(detail);
        for (name, cap) in [
            ("final_logit_softcapping", self.final_logit_softcapping),
            ("attn_logit_softcapping", self.attn_logit_softcapping),
        ] {
            // f32 is what the kernels use: the cap must stay positive there too
            if cap.is_some_and(|c| !(c as f32 > 0.0 && (c as f32).is_finite())) {
                return bad(format!("{name} {} is not a positive number (null turns it off)", cap.unwrap()));
            }
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return bad("rope_scaling is not supported yet".into());
        }
        if let Some(p) = &self.rope_parameters {
            let flat = p.get("rope_type").map(|t| ("all layers", t));
            let kinds = ["sliding_attention", "full_attention"];
            let per_kind = kinds.iter().filter_map(|&k| p.get(k)?.get("rope_type").map(|t| (k, t)));
            for (kind, t) in flat.into_iter().chain(per_kind) {
                if t.as_str() != Some("default") {
                    return bad(format!(
                        "rope_type {t} for {kind} is not supported yet (only the default RoPE)"
                    ));
                }
            }
        }
        if self.attention_bias {
            return bad(
                "attention_bias = true is not supported (Gemma checkpoints have no q/k/v/o bias)".into()
            );
        }
        if !self.tie_word_embeddings {
            return bad("tie_word_embeddings = false is not supported (Gemma ties its LM head)".into());
        }
        if self.use_bidirectional_attention == Some(true) {
            return bad(
                "use_bidirectional_attention = true is not supported (causal language models only)".into()
            );
        }
        if !matches!(self.hidden_activation.as_str(), "gelu_pytorch_tanh" | "gelu_new") {
            return bad(format!(
                "hidden_activation {:?}: only the tanh GELU is supported",
                self.hidden_activation
            ));
        }
        let d = self.head_dim;
        let sizes = super::DecoderSizes {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            head_dim: d,
            vocab_size: self.vocab_size,
            num_hidden_layers: self.num_hidden_layers,
            max_position_embeddings: self.max_position_embeddings,
        };
        sizes.check(&[
            // null turns the window off; 0 would be a window of no token
            ("sliding_window", self.sliding_window.unwrap_or(1)),
            ("sliding_window_pattern", self.sliding_window_pattern.unwrap_or(1)),
        ])?;
        if d == 0 || !d.is_multiple_of(2) {
            return bad(format!("head_dim {d} must be even and at least 2 (RoPE rotates pairs)"));
        }
        let kinds = ["sliding_attention", "full_attention"];
        if let Some(t) = self.layer_types.iter().find(|t| !kinds.contains(&t.as_str())) {
            return bad(format!("layer_types holds {t:?}; known: {kinds:?}"));
        }
        if !self.layer_types.is_empty() && self.layer_types.len() != self.num_hidden_layers {
            return bad(format!(
                "layer_types has {} entries for num_hidden_layers {}",
                self.layer_types.len(),
                self.num_hidden_layers
            ));
        }
        super::positive_number("rms_norm_eps", self.rms_norm_eps.into(), true)?;
        super::positive_number("query_pre_attn_scalar", self.query_pre_attn_scalar, false)?;
        super::positive_number("rope_theta", self.theta(false), false)?;
        super::positive_number(
            "rope_local_base_freq (the sliding layers' RoPE base)",
            self.theta(true),
            false,
        )
    }
}

struct Layer {
    input_norm: ParamId,
    q: ParamId,
    k: ParamId,
    v: ParamId,
    o: ParamId,
    /// Gemma 3 only
    qk_norm: Option<(ParamId, ParamId)>,
    post_attn_norm: ParamId,
    pre_ff_norm: ParamId,
    gate: ParamId,
    up: ParamId,
    down: ParamId,
    post_ff_norm: ParamId,
}

pub struct Gemma {
    pub cfg: GemmaConfig,
    embed: ParamId,
    layers: Vec<Layer>,
    norm: ParamId,
}

/// Gemma 3's q and k norms (Gemma 2 has none).
const QK_NORMS: [&str; 2] = ["self_attn.q_norm.weight", "self_attn.k_norm.weight"];

const LAYER_TENSORS: &[&str] = &[
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "self_attn.q_norm.weight",
    "self_attn.k_norm.weight",
    "post_attention_layernorm.weight",
    "pre_feedforward_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "post_feedforward_layernorm.weight",
];

impl Gemma {
    pub fn param_shapes(cfg: &GemmaConfig) -> Vec<(String, Vec<usize>)> {
        let (c, f, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let (h, kv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let shapes = [
            vec![c],
            vec![h * d, c],
            vec![kv * d, c],
            vec![kv * d, c],
            vec![c, h * d],
            vec![d],
            vec![d],
            vec![c],
            vec![c],
            vec![f, c],
            vec![f, c],
            vec![c, f],
            vec![c],
        ];
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![cfg.vocab_size, c])];
        for l in 0..cfg.num_hidden_layers {
            for (name, shape) in LAYER_TENSORS.iter().zip(&shapes) {
                if cfg.generation == Generation::Gemma2 && QK_NORMS.contains(name) {
                    continue; // Gemma 2 has no q/k norms
                }
                out.push((format!("model.layers.{l}.{name}"), shape.clone()));
            }
        }
        out.push(("model.norm.weight".into(), vec![c]));
        out
    }

    /// The model over parameters already in `store` (names as [`Self::param_shapes`] gives).
    pub fn from_store(cfg: GemmaConfig, store: &ParamStore) -> Result<Gemma> {
        let missing = Self::param_shapes(&cfg).into_iter().find(|(n, _)| store.id(n).is_none());
        if let Some((name, _)) = missing {
            return Err(Error::InvalidArgument {
                name: "parameter".into(),
                detail: format!("{name} is not in the store"),
            });
        }
        let id = |name: &str| store.id(name).expect("checked above");
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| {
                let at = |n: &str| id(&format!("model.layers.{l}.{n}"));
                let qk_norm =
                    (cfg.generation == Generation::Gemma3).then(|| (at(QK_NORMS[0]), at(QK_NORMS[1])));
                Layer {
                    input_norm: at("input_layernorm.weight"),
                    q: at("self_attn.q_proj.weight"),
                    k: at("self_attn.k_proj.weight"),
                    v: at("self_attn.v_proj.weight"),
                    o: at("self_attn.o_proj.weight"),
                    qk_norm,
                    post_attn_norm: at("post_attention_layernorm.weight"),
                    pre_ff_norm: at("pre_feedforward_layernorm.weight"),
                    gate: at("mlp.gate_proj.weight"),
                    up: at("mlp.up_proj.weight"),
                    down: at("mlp.down_proj.weight"),
                    post_ff_norm: at("post_feedforward_layernorm.weight"),
                }
            })
            .collect();
        Ok(Gemma { embed: id("model.embed_tokens.weight"), norm: id("model.norm.weight"), layers, cfg })
    }

    /// With `rows`, the logits of only that many fed positions (see [`super::pick_rows`]).
    pub fn logits_graph(
        &self,
        store: &ParamStore,
        b: usize,
        t: usize,
        rows: Option<usize>,
    ) -> Result<(Graph, Var)> {
        let cfg = &self.cfg;
        super::check_sequence_length(t, cfg.max_position_embeddings)?;
        let (h, kv, d) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let eps = cfg.rms_norm_eps;
        let mut g = Graph::new();
        let tokens = g.id_list(cfg.vocab_size);
        let _positions = g.id_list(cfg.max_position_embeddings); // RoPE uses 0..T
        let p = |g: &mut Graph, id: ParamId| g.param(store, id);
        let proj =
            |g: &mut Graph, x: Var, w: ParamId| -> Result<Var> { g.linear_lora(store, x, w, None, true) };
        let norm = |g: &mut Graph, x: Var, w: ParamId| -> Result<Var> {
            let w = g.param(store, w);
            g.rmsnorm(x, w, eps, 1.0)
        };
        let embed = p(&mut g, self.embed);
        let x = g.embedding(embed, tokens, b * t)?;
        // The scale is rounded to the weights' dtype (f32 here), as transformers does.
        let mut x = g.scale(x, (cfg.hidden_size as f32).sqrt());
        let scale = cfg.query_pre_attn_scalar.powf(-0.5) as f32;
        for (l, layer) in self.layers.iter().enumerate() {
            g.mark_layer_input(x);
            let sliding = cfg.is_sliding(l);
            let window = if sliding { cfg.sliding_window } else { None };
            let dims = AttnDims { b, t, h, kv_h: kv, d, window, scale, softcap: cfg.attention_softcap() };
            let theta = cfg.theta(sliding);
            let hn = norm(&mut g, x, layer.input_norm)?;
            let q = proj(&mut g, hn, layer.q)?;
            let k = proj(&mut g, hn, layer.k)?;
            let v = proj(&mut g, hn, layer.v)?;
            let (q, k) = match layer.qk_norm {
                Some((qn, kn)) => (norm(&mut g, q, qn)?, norm(&mut g, k, kn)?),
                None => (q, k),
            };
            let q = g.rope(q, b, t, h, d, theta)?;
            let k = g.rope(k, b, t, kv, d, theta)?;
            let a = g.attention(q, k, v, dims)?;
            let o = proj(&mut g, a, layer.o)?;
            let o = norm(&mut g, o, layer.post_attn_norm)?;
            x = g.add(x, o)?;
            let hn = norm(&mut g, x, layer.pre_ff_norm)?;
            let gate = proj(&mut g, hn, layer.gate)?;
            let up = proj(&mut g, hn, layer.up)?;
            let m = g.glu(gate, up, false)?;
            let down = proj(&mut g, m, layer.down)?;
            let down = norm(&mut g, down, layer.post_ff_norm)?;
            x = g.add(x, down)?;
        }
        g.mark_layer_input(x); // the last layer's output closes its segment
        let x = super::pick_rows(&mut g, x, rows, b * t)?;
        let x = norm(&mut g, x, self.norm)?;
        let head = p(&mut g, self.embed);
        let logits = g.linear(x, head, None, true)?;
        let logits = match cfg.final_logit_softcapping {
            Some(c) => g.softcap(logits, c as f32)?,
            None => logits,
        };
        Ok((g, logits))
    }
}
