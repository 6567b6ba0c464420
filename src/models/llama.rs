//! The Qwen2 / Llama block (Qwen2.5, SmolLM2 and other Llama-family checkpoints) from a Hugging
//! Face model directory, selected by `config.json`'s `model_type` (`qwen2` or `llama`).
//! Linear weights are stored (out, in), so every projection is `x W^T (+ b)`.
//!
//!   x = embed_tokens[ids]
//!   per layer: h = rmsnorm(x); q, k, v = h Wq^T + bq, h Wk^T + bk, h Wv^T + bv   (bias: Qwen2,
//!              or Llama with attention_bias); x += o_proj(attn(rope(q), rope(k), v)) (GQA)
//!              x += down_proj(silu(gate_proj(rmsnorm(x))) * up_proj(rmsnorm(x)))
//!   logits = rmsnorm(x) W_lm^T, W_lm = lm_head.weight or embed_tokens.weight when tied

use crate::error::{Error, Result};
use crate::graph::{Graph, ParamId, ParamStore, Var};
use crate::kernels::attention::AttnDims;
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize, serde::Serialize)]
pub struct LlamaConfig {
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f32,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// transformers 5 writes `{"rope_theta": ..., "rope_type": "default"}` here instead.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama: bias on q/k/v/o; Qwen2 always has q/k/v bias.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_eps() -> f32 {
    1e-6
}
fn default_act() -> String {
    "silu".into()
}

impl LlamaConfig {
    /// (attention heads, key/value heads, head dimension); the head dimension is 0 when
    /// neither `head_dim` nor the heads give one ([`Self::check`] refuses that).
    pub fn heads(&self) -> (usize, usize, usize) {
        let h = self.num_attention_heads;
        let d = self.head_dim.unwrap_or_else(|| self.hidden_size.checked_div(h).unwrap_or(0));
        (h, self.num_key_value_heads.unwrap_or(h), d)
    }
    /// RoPE base: `rope_theta`, else `rope_parameters.rope_theta`, else 10000.
    pub fn theta(&self) -> f64 {
        self.rope_theta
            .or_else(|| self.rope_parameters.as_ref()?.get("rope_theta")?.as_f64())
            .unwrap_or(10000.0)
    }
    fn qkv_bias(&self) -> bool {
        self.model_type == "qwen2" || self.attention_bias
    }
    /// Refuse what pockettune does not compute, and sizes that describe no model.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err("rope_scaling is not supported yet".into());
        }
        let rope_type = self.rope_parameters.as_ref().and_then(|p| p.get("rope_type")?.as_str());
        if rope_type.is_some_and(|t| t != "default") {
            return Err(format!("rope_type {rope_type:?} is not supported yet (only the default RoPE)"));
        }
        if self.hidden_act != "silu" {
            return Err(format!("hidden_act {:?}: only silu (SwiGLU) is supported", self.hidden_act));
        }
        let (h, kv, d) = self.heads();
        let sizes = super::DecoderSizes {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_attention_heads: h,
            num_key_value_heads: kv,
            head_dim: d,
            vocab_size: self.vocab_size,
            num_hidden_layers: self.num_hidden_layers,
            max_position_embeddings: self.max_position_embeddings,
        };
        sizes.check(&[])?;
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(h) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {h} (and no head_dim is given)",
                self.hidden_size
            ));
        }
        if d == 0 || d % 2 != 0 {
            return Err(format!("head_dim {d} must be even and at least 2 (RoPE rotates pairs)"));
        }
        super::positive_number("rms_norm_eps", self.rms_norm_eps.into(), true)?;
        super::positive_number("rope_theta", self.theta(), false)
    }
}

struct Layer {
    input_norm: ParamId,
    q: (ParamId, Option<ParamId>),
    k: (ParamId, Option<ParamId>),
    v: (ParamId, Option<ParamId>),
    o: (ParamId, Option<ParamId>),
    post_norm: ParamId,
    gate: ParamId,
    up: ParamId,
    down: ParamId,
}

pub struct Llama {
    pub cfg: LlamaConfig,
    embed: ParamId,
    layers: Vec<Layer>,
    norm: ParamId,
    lm_head: ParamId,
}

impl Llama {
    /// Every parameter name (as in the checkpoint) and shape.
    pub fn param_shapes(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
        let (c, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (h, kv, d) = cfg.heads();
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, c])];
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}.");
            out.push((format!("{p}input_layernorm.weight"), vec![c]));
            for (name, rows) in [("q_proj", h * d), ("k_proj", kv * d), ("v_proj", kv * d)] {
                out.push((format!("{p}self_attn.{name}.weight"), vec![rows, c]));
                if cfg.qkv_bias() {
                    out.push((format!("{p}self_attn.{name}.bias"), vec![rows]));
                }
            }
            out.push((format!("{p}self_attn.o_proj.weight"), vec![c, h * d]));
            if cfg.attention_bias {
                out.push((format!("{p}self_attn.o_proj.bias"), vec![c]));
            }
            out.push((format!("{p}post_attention_layernorm.weight"), vec![c]));
            out.push((format!("{p}mlp.gate_proj.weight"), vec![f, c]));
            out.push((format!("{p}mlp.up_proj.weight"), vec![f, c]));
            out.push((format!("{p}mlp.down_proj.weight"), vec![c, f]));
        }
        out.push(("model.norm.weight".into(), vec![c]));
        if !cfg.tie_word_embeddings {
            out.push(("lm_head.weight".into(), vec![v, c]));
        }
        out
    }

    pub fn from_store(cfg: LlamaConfig, store: &ParamStore) -> Result<Llama> {
        let id = |name: &str| {
            store.id(name).ok_or_else(|| Error::InvalidArgument {
                name: "parameter".into(),
                detail: format!("{name} is not in the store"),
            })
        };
        let proj = |p: &str| -> Result<(ParamId, Option<ParamId>)> {
            Ok((id(&format!("{p}.weight"))?, store.id(&format!("{p}.bias"))))
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| {
                let p = format!("model.layers.{l}.");
                Ok(Layer {
                    input_norm: id(&format!("{p}input_layernorm.weight"))?,
                    q: proj(&format!("{p}self_attn.q_proj"))?,
                    k: proj(&format!("{p}self_attn.k_proj"))?,
                    v: proj(&format!("{p}self_attn.v_proj"))?,
                    o: proj(&format!("{p}self_attn.o_proj"))?,
                    post_norm: id(&format!("{p}post_attention_layernorm.weight"))?,
                    gate: id(&format!("{p}mlp.gate_proj.weight"))?,
                    up: id(&format!("{p}mlp.up_proj.weight"))?,
                    down: id(&format!("{p}mlp.down_proj.weight"))?,
                })
            })
            .collect::<Result<_>>()?;
        let embed = id("model.embed_tokens.weight")?;
        let lm_head = if cfg.tie_word_embeddings { embed } else { id("lm_head.weight")? };
        Ok(Llama { embed, layers, norm: id("model.norm.weight")?, lm_head, cfg })
    }

    /// Record the graph up to the logits for `b` sequences of `t` tokens.
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
        let (h, kv, d) = cfg.heads();
        let mut g = Graph::new();
        let tokens = g.id_list(cfg.vocab_size);
        let _positions = g.id_list(cfg.max_position_embeddings); // fed for a uniform feed; RoPE uses 0..T
        let p = |g: &mut Graph, id: ParamId| g.param(store, id);
        let linear = |g: &mut Graph, x: Var, (w, bias): (ParamId, Option<ParamId>)| -> Result<Var> {
            g.linear_lora(store, x, w, bias, true)
        };
        let embed = p(&mut g, self.embed);
        let mut x = g.embedding(embed, tokens, b * t)?;
        let dims =
            AttnDims { b, t, h, kv_h: kv, d, window: None, scale: 1.0 / (d as f32).sqrt(), softcap: None };
        for layer in &self.layers {
            g.mark_layer_input(x);
            let w = p(&mut g, layer.input_norm);
            let hn = g.rmsnorm(x, w, cfg.rms_norm_eps, 0.0)?;
            let q = linear(&mut g, hn, layer.q)?;
            let k = linear(&mut g, hn, layer.k)?;
            let v = linear(&mut g, hn, layer.v)?;
            let q = g.rope(q, b, t, h, d, cfg.theta())?;
            let k = g.rope(k, b, t, kv, d, cfg.theta())?;
            let a = g.attention(q, k, v, dims)?;
            let o = linear(&mut g, a, layer.o)?;
            x = g.add(x, o)?;
            let w = p(&mut g, layer.post_norm);
            let hn = g.rmsnorm(x, w, cfg.rms_norm_eps, 0.0)?;
            let gate = linear(&mut g, hn, (layer.gate, None))?;
            let up = linear(&mut g, hn, (layer.up, None))?;
            let m = g.glu(gate, up, true)?;
            let down = linear(&mut g, m, (layer.down, None))?;
            x = g.add(x, down)?;
        }
        g.mark_layer_input(x); // the last layer's output closes its segment
        let x = super::pick_rows(&mut g, x, rows, b * t)?;
        let w = p(&mut g, self.norm);
        let x = g.rmsnorm(x, w, cfg.rms_norm_eps, 0.0)?;
        let head = p(&mut g, self.lm_head);
        let logits = g.linear(x, head, None, true)?;
        Ok((g, logits))
    }
}
