//! The graph executor: a model records its forward pass once as a list of nodes (shapes only),
//! and every step runs that list forward, then backward in reverse order, on the GPU or on the
//! CPU (`Device::Cpu`: the fast path or the reference), the same graph either way. Each op's
//! forward and backward on every backend live in its own file under `ops/`; recording is
//! here, a step's execution ([`Run`]) in `run`.
//!
//! - Gradients are computed only where needed: a node's output needs a gradient if any input
//!   does, and inputs, token ids and frozen parameters never do (no buffer, no optimizer state).
//! - Every activation is freed as soon as its last consumer has run: after its last forward
//!   use when no backward step needs it, else after the last backward step that reads it. Freed
//!   GPU buffers go back to the pool and serve the next allocation of that size.
//! - Nothing waits for the GPU inside a step: dispatches are recorded and submitted together;
//!   the loss is read back only when asked for ([`Run::loss`]). Submissions pass the device's
//!   submit gate, the one place where a power policy may hold work back.

mod category;
mod ops;
pub mod params;
pub mod profile;
mod run;
pub mod stream;

pub use params::{Param, ParamId, ParamStore, PendingStep, StepOutcome};
pub use run::Run;

use crate::error::{Error, Result};
use crate::gpu::{Gpu, QTensor, Tensor};
use crate::kernels::activation::Act;
use crate::kernels::attention::AttnDims;
use crate::kernels::elementwise;
use crate::memory::GraphOptions;
use std::sync::Arc;

/// Where a graph runs.
#[derive(Clone)]
pub enum Device {
    Gpu(Arc<Gpu>),
    /// Host memory, computed by one of the two CPU paths.
    Cpu(CpuPath),
}

/// The two ways to run on the CPU; values, feeds and parameters are the same host vectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuPath {
    /// `--device cpu`: f32, matrix products through `gemm`, threaded on every core
    /// (`crate::cpu`).
    Fast,
    /// `--device cpu-ref`: the reference functions of `kernels-ref`, f64 accumulation; the
    /// judge of every other path.
    Reference,
}

impl Device {
    /// The fast CPU path.
    pub const CPU: Device = Device::Cpu(CpuPath::Fast);
    /// The CPU reference path.
    pub const CPU_REF: Device = Device::Cpu(CpuPath::Reference);

    pub fn name(&self) -> String {
        match self {
            Device::Gpu(g) => match g.precision() {
                crate::gpu::Precision::F32 => g.summary().name.clone(),
                p => format!("{} ({p} precision)", g.summary().name),
            },
            Device::Cpu(CpuPath::Fast) => format!("cpu (f32, {} threads)", rayon::current_num_threads()),
            Device::Cpu(CpuPath::Reference) => "cpu-ref (reference path, f64 accumulation)".into(),
        }
    }
}

/// A tensor's storage on one device (its shape is kept by whoever owns it).
pub enum Value {
    Gpu(Tensor),
    /// A frozen weight in its stored format (ggml blocks, f16 or bf16), read by the matmul and
    /// embedding kernels as they go.
    Packed(QTensor),
    /// A frozen weight left in the memory-mapped checkpoint; the executor uploads it for the
    /// nodes that read it (`--memory-budget`, see [`stream`]).
    Streamed(Arc<stream::StreamedWeight>),
    /// Host memory: every value on the CPU path; on a GPU run, a trained weight kept on the host
    /// and streamed like the above (`params::Location::Host`), or its gradient.
    Cpu(Vec<f32>),
    /// An activation held in 16 bits until the backward pass reads it (`--activations`): the
    /// executor unpacks it to [`Value::Gpu`] first, so no op sees this.
    Half(crate::kernels::half::HalfTensor),
    /// The same on a CPU path, in host memory (the bits of each value), made [`Value::Cpu`]
    /// again before an op reads it.
    HalfHost(Vec<u16>, crate::kernels::half::HalfFormat),
}

impl Value {
    pub fn from_host(dev: &Device, data: &[f32], shape: &[usize], what: &str) -> Result<Value> {
        Ok(match dev {
            Device::Gpu(g) => Value::Gpu(Tensor::from_host(g, data, shape, what)?),
            Device::Cpu(_) => Value::Cpu(data.to_vec()),
        })
    }
    /// Uninitialised on the GPU, last use's contents on the fast CPU path (a recycled buffer,
    /// `crate::cpu::pool`): every kernel there writes its whole output. Zeros on the CPU
    /// reference path.
    pub fn empty(dev: &Device, shape: &[usize], what: &str) -> Result<Value> {
        Ok(match dev {
            Device::Gpu(g) => Value::Gpu(Tensor::empty(g, shape, what)?),
            Device::Cpu(CpuPath::Fast) => Value::Cpu(crate::cpu::pool::take(shape.iter().product())),
            Device::Cpu(CpuPath::Reference) => Value::Cpu(vec![0.0; shape.iter().product()]),
        })
    }

    /// Give a value the executor is done with back for reuse (host buffers of the fast CPU
    /// path; anything else is simply dropped).
    pub(crate) fn recycle(dev: &Device, v: Option<Value>) {
        if let (Device::Cpu(CpuPath::Fast), Some(Value::Cpu(buf))) = (dev, v) {
            crate::cpu::pool::give(buf);
        }
    }
    pub fn zeros(dev: &Device, shape: &[usize], what: &str) -> Result<Value> {
        let mut v = Value::empty(dev, shape, what)?;
        v.fill(dev, 0.0)?;
        Ok(v)
    }
    pub fn fill(&mut self, dev: &Device, x: f32) -> Result<()> {
        match (self, dev) {
            (Value::Gpu(t), Device::Gpu(g)) => elementwise::fill(g, t, x),
            (Value::Packed(_) | Value::Streamed(_) | Value::Half(_) | Value::HalfHost(..), _) => {
                Err(packed_value())
            }
            (Value::Cpu(v), _) => {
                crate::cpu::elementwise::fill(v, x);
                Ok(())
            }
            _ => Err(wrong_device()),
        }
    }
    pub fn to_host(&self, dev: &Device) -> Result<Vec<f32>> {
        match (self, dev) {
            (Value::Gpu(t), Device::Gpu(g)) => t.to_host(g),
            (Value::Packed(q), Device::Gpu(g)) => q.to_host(g),
            (Value::Streamed(w), _) => w.to_host(),
            (Value::Half(h), Device::Gpu(g)) => h.to_host(g),
            (Value::HalfHost(bits, format), _) => {
                let mut out = vec![0f32; bits.len()];
                crate::cpu::half::widen(&mut out, bits, *format);
                Ok(out)
            }
            (Value::Cpu(v), _) => Ok(v.clone()),
            _ => Err(wrong_device()),
        }
    }
    pub(crate) fn gpu(&self) -> &Tensor {
        match self {
            Value::Gpu(t) => t,
            Value::Packed(_) => panic!("a packed weight reached a kernel that reads only f32"),
            Value::Streamed(_) => panic!("a streamed weight reached a kernel before its upload"),
            Value::Half(_) | Value::HalfHost(..) => {
                panic!("a 16-bit activation reached a kernel before it was unpacked")
            }
            Value::Cpu(_) => panic!("a CPU value reached a GPU kernel"),
        }
    }
    pub(crate) fn cpu(&self) -> &[f32] {
        match self {
            Value::Cpu(v) => v,
            _ => panic!("a GPU value reached a CPU kernel"),
        }
    }
    pub(crate) fn cpu_mut(&mut self) -> &mut Vec<f32> {
        match self {
            Value::Cpu(v) => v,
            _ => panic!("a GPU value reached a CPU kernel"),
        }
    }
}

fn packed_value() -> Error {
    Error::Internal {
        context: "graph".into(),
        message: "a packed value (a frozen weight, or an activation held in 16 bits) cannot be written"
            .into(),
    }
}

fn wrong_device() -> Error {
    Error::Internal { context: "graph".into(), message: "a value is on another device than the graph".into() }
}

/// A value in the graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Var(usize);

#[derive(Clone, Debug)]
pub(crate) enum Op {
    /// A parameter from the store.
    Param(ParamId),
    /// rows of `table` (input 0) picked by id list `ids` of the feed
    Embedding { ids: usize },
    /// a + b
    Add,
    /// LayerNorm of input 0 with weight 1 and bias 2
    LayerNorm { eps: f32 },
    /// x W (+ bias); W stored transposed when `trans_w` (a tied LM head)
    Linear { trans_w: bool },
    /// an elementwise activation: tanh GELU, SiLU or soft-capping
    Act { act: Act },
    /// causal self-attention over packed [q | k | v] rows
    AttentionPacked { dims: AttnDims },
    /// causal grouped-query self-attention over separate q (input 0), k (1), v (2)
    Attention { dims: AttnDims },
    /// RMSNorm of input 0 with weight 1, scaled by (w + shift)
    RmsNorm { eps: f32, shift: f32 },
    /// rotary embedding (rotate-half) of (B*T, heads*head_dim) rows at positions 0..T
    Rope { b: usize, t: usize, heads: usize, head_dim: usize, theta: f64 },
    /// act(gate) * up: SwiGLU (SiLU) or GeGLU (tanh GELU)
    Glu { silu: bool },
    /// alpha * x
    Scale { alpha: f32 },
    /// inverted dropout with probability p; the mask is hashed from the feed's dropout seed and
    /// `salt` (identity when the feed has no seed: evaluation)
    Dropout { p: f32, salt: u32 },
    /// mean cross-entropy of logits against target list `targets` of the feed (a scalar)
    CrossEntropy { targets: usize },
    /// mean cross-entropy of the logits `softcap(x W)` (input 0: x, 1: W; W stored transposed
    /// when `trans_w`) against target list `targets`, the vocabulary walked in chunks so that
    /// the logits never exist whole (`--fused-loss`; a scalar)
    LinearCrossEntropy { targets: usize, trans_w: bool, softcap: Option<f32> },
}

impl Op {
    /// Whether the backward of this op reads the value of its input `i`.
    fn backward_reads(&self, i: usize) -> bool {
        match self {
            // from its output instead: 1 - (y / c)^2, so the (often vocabulary-wide) input can go
            Op::Act { act: Act::Softcap(_) } => false,
            Op::Param(_) | Op::Add | Op::Embedding { .. } | Op::Rope { .. } | Op::Scale { .. } => false,
            Op::Dropout { .. } => false,
            Op::RmsNorm { .. } => i < 2,
            Op::Attention { .. } | Op::Glu { .. } => true,
            Op::LayerNorm { .. } => i < 2,
            Op::Linear { .. } => i < 2,
            Op::Act { .. } | Op::AttentionPacked { .. } | Op::CrossEntropy { .. } => true,
            // recomputes each chunk of the logits from x and W
            Op::LinearCrossEntropy { .. } => true,
        }
    }

    /// The op's name in a profile (`profile`).
    fn name(&self) -> &'static str {
        match self {
            Op::Param(_) => "param",
            Op::Embedding { .. } => "embedding",
            Op::Add => "add",
            Op::LayerNorm { .. } => "layernorm",
            Op::Linear { .. } => "linear",
            Op::Act { act: Act::Gelu } => "gelu",
            Op::Act { act: Act::Silu } => "silu",
            Op::Act { act: Act::Softcap(_) } => "softcap",
            Op::AttentionPacked { .. } | Op::Attention { .. } => "attention",
            Op::RmsNorm { .. } => "rmsnorm",
            Op::Rope { .. } => "rope",
            Op::Glu { silu: true } => "swiglu",
            Op::Glu { silu: false } => "geglu",
            Op::Scale { .. } => "scale",
            Op::Dropout { .. } => "dropout",
            Op::CrossEntropy { .. } => "cross_entropy",
            Op::LinearCrossEntropy { .. } => "linear_cross_entropy",
        }
    }

    /// Whether the backward of this op reads its own output.
    fn backward_reads_output(&self) -> bool {
        matches!(self, Op::Act { act: Act::Softcap(_) })
    }

    /// Whether the gradient of every input is the output gradient itself (a + b): the executor
    /// then hands the output gradient's buffer to one input that has none yet, instead of a copy.
    fn passes_gradient(&self) -> bool {
        matches!(self, Op::Add)
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Node {
    pub op: Op,
    pub inputs: Vec<Var>,
}

/// Token ids and targets of one step, in the order the graph declared them.
#[derive(Default, Clone, Debug)]
pub struct Feed {
    pub ids: Vec<Vec<u32>>,
    pub targets: Vec<Vec<i32>>,
    /// seed of this step's dropout masks; `None` turns dropout off (evaluation, generation)
    pub dropout_seed: Option<u32>,
}

/// A recorded forward pass (one node per value; node i produces `Var(i)`).
#[derive(Default, Clone, Debug)]
pub struct Graph {
    nodes: Vec<Node>,
    shapes: Vec<Vec<usize>>,
    requires_grad: Vec<bool>,
    /// (vocabulary size) of each declared id list
    id_lists: Vec<usize>,
    /// (vocabulary size) of each declared target list
    target_lists: Vec<usize>,
    /// exact rewrites that trade compute for memory (see `crate::memory`)
    options: GraphOptions,
    /// the input of each layer and the output of the last, in order: the segments that
    /// activation checkpointing keeps one value of and recomputes
    layer_inputs: Vec<Var>,
}

impl Graph {
    pub fn new() -> Self {
        Graph::default()
    }

    /// A graph whose executor applies `options` (set them before recording the model).
    pub fn with_options(options: GraphOptions) -> Self {
        Graph { options, ..Graph::default() }
    }

    pub fn options(&self) -> GraphOptions {
        self.options
    }

    pub fn set_options(&mut self, options: GraphOptions) {
        self.options = options;
    }

    /// Mark `x` as the input of the next layer (and, after the last layer, its output). With
    /// activation checkpointing, the nodes between two marks form a segment whose values are
    /// dropped after the forward pass and recomputed from the first mark in the backward pass.
    pub fn mark_layer_input(&mut self, x: Var) {
        if self.layer_inputs.last().is_none_or(|l| l.0 < x.0) {
            self.layer_inputs.push(x);
        }
    }

    /// (first node, last node) of each layer, from the marks.
    fn layer_ranges(&self) -> Vec<(usize, usize)> {
        self.layer_inputs.windows(2).map(|w| (w[0].0 + 1, w[1].0)).collect()
    }

    /// Per node, the checkpointed segment it belongs to (none without checkpointing).
    fn segments(&self) -> Vec<Option<usize>> {
        let mut seg = vec![None; self.nodes.len()];
        if self.options.checkpoint_activations {
            for (k, w) in self.layer_inputs.windows(2).enumerate() {
                seg[w[0].0 + 1..=w[1].0].iter_mut().for_each(|s| *s = Some(k));
            }
        }
        seg
    }

    pub fn shape(&self, v: Var) -> &[usize] {
        &self.shapes[v.0]
    }

    fn push(&mut self, op: Op, inputs: Vec<Var>, shape: Vec<usize>) -> Var {
        let grad = match &op {
            Op::Param(_) => false, // set by `param`
            _ => inputs.iter().any(|v| self.requires_grad[v.0]),
        };
        self.nodes.push(Node { op, inputs });
        self.shapes.push(shape);
        self.requires_grad.push(grad);
        Var(self.nodes.len() - 1)
    }

    fn check(&self, op: &str, ok: bool, detail: impl FnOnce() -> String) -> Result<()> {
        if ok {
            Ok(())
        } else {
            Err(Error::shape(op, detail()))
        }
    }

    pub fn param(&mut self, store: &ParamStore, id: ParamId) -> Var {
        let p = store.get(id);
        let v = self.push(Op::Param(id), vec![], p.shape.clone());
        self.requires_grad[v.0] = p.trainable;
        v
    }

    /// Declare a list of token ids (fed at run time) over a vocabulary of `vocab`.
    pub fn id_list(&mut self, vocab: usize) -> usize {
        self.id_lists.push(vocab);
        self.id_lists.len() - 1
    }
    /// Declare a list of targets (fed at run time; -100 = ignored) over `vocab` classes.
    pub fn target_list(&mut self, vocab: usize) -> usize {
        self.target_lists.push(vocab);
        self.target_lists.len() - 1
    }

    /// (n, C) rows of `table` (V, C) picked by id list `ids` of length n.
    pub fn embedding(&mut self, table: Var, ids: usize, n: usize) -> Result<Var> {
        let s = self.shape(table).to_vec();
        self.check("embedding", s.len() == 2 && self.id_lists.get(ids) == Some(&s[0]), || {
            format!("table {s:?} does not match id list {ids}")
        })?;
        Ok(self.push(Op::Embedding { ids }, vec![table], vec![n, s[1]]))
    }

    pub fn add(&mut self, a: Var, b: Var) -> Result<Var> {
        let (sa, sb) = (self.shape(a).to_vec(), self.shape(b).to_vec());
        self.check("add", sa == sb, || format!("{sa:?} + {sb:?}"))?;
        Ok(self.push(Op::Add, vec![a, b], sa))
    }

    pub fn layernorm(&mut self, x: Var, w: Var, b: Var, eps: f32) -> Result<Var> {
        let s = self.shape(x).to_vec();
        let c = *s.last().unwrap_or(&0);
        let ok = self.shape(w) == [c] && self.shape(b) == [c];
        self.check("layernorm", ok, || {
            format!("x {s:?}, weight {:?}, bias {:?}", self.shape(w), self.shape(b))
        })?;
        Ok(self.push(Op::LayerNorm { eps }, vec![x, w, b], s))
    }

    /// `x (rows, K) . W (K, N) + bias (N)`; `W` is (N, K) when `trans_w`.
    pub fn linear(&mut self, x: Var, w: Var, bias: Option<Var>, trans_w: bool) -> Result<Var> {
        let (sx, sw) = (self.shape(x).to_vec(), self.shape(w).to_vec());
        let (k, n) = match (sw.as_slice(), trans_w) {
            ([k, n], false) => (*k, *n),
            ([n, k], true) => (*k, *n),
            _ => return Err(Error::shape("linear", format!("weight {sw:?} is not a matrix"))),
        };
        self.check("linear", sx.len() == 2 && sx[1] == k, || {
            format!("x {sx:?} . W {sw:?} (transposed: {trans_w})")
        })?;
        if let Some(b) = bias {
            self.check("linear", self.shape(b) == [n], || format!("bias {:?}, N = {n}", self.shape(b)))?;
        }
        let mut inputs = vec![x, w];
        inputs.extend(bias);
        Ok(self.push(Op::Linear { trans_w }, inputs, vec![sx[0], n]))
    }

    pub fn gelu(&mut self, x: Var) -> Var {
        let s = self.shape(x).to_vec();
        self.push(Op::Act { act: Act::Gelu }, vec![x], s)
    }

    /// `cap tanh(x / cap)` (Gemma's logit soft-capping); `cap` must be a positive number.
    pub fn softcap(&mut self, x: Var, cap: f32) -> Result<Var> {
        crate::kernels::activation::check_cap(cap)?;
        let s = self.shape(x).to_vec();
        Ok(self.push(Op::Act { act: Act::Softcap(cap) }, vec![x], s))
    }

    /// RMSNorm over groups of `w`'s length (the last dimension, or each head of (B*T, H*D) rows
    /// for a (D) weight), scaled by `w + shift` (shift 1 for Gemma's `1 + w`).
    pub fn rmsnorm(&mut self, x: Var, w: Var, eps: f32, shift: f32) -> Result<Var> {
        let s = self.shape(x).to_vec();
        let c = *s.last().unwrap_or(&0);
        let ok = matches!(self.shape(w), [n] if *n > 0 && c.is_multiple_of(*n));
        self.check("rmsnorm", ok, || format!("x {s:?}, weight {:?}", self.shape(w)))?;
        Ok(self.push(Op::RmsNorm { eps, shift }, vec![x, w], s))
    }

    /// Rotary position embedding of `x` (B*T, heads * head_dim) at positions 0..T.
    pub fn rope(
        &mut self,
        x: Var,
        b: usize,
        t: usize,
        heads: usize,
        head_dim: usize,
        theta: f64,
    ) -> Result<Var> {
        let s = self.shape(x).to_vec();
        self.check("rope", s == [b * t, heads * head_dim] && head_dim.is_multiple_of(2), || {
            format!("x {s:?} for B {b}, T {t}, {heads} heads of {head_dim}")
        })?;
        Ok(self.push(Op::Rope { b, t, heads, head_dim, theta }, vec![x], s))
    }

    /// `act(gate) * up` with SiLU (SwiGLU) or tanh GELU (GeGLU).
    pub fn glu(&mut self, gate: Var, up: Var, silu: bool) -> Result<Var> {
        let s = self.shape(gate).to_vec();
        self.check("glu", self.shape(up) == s.as_slice(), || format!("gate {s:?}, up {:?}", self.shape(up)))?;
        Ok(self.push(Op::Glu { silu }, vec![gate, up], s))
    }

    /// Inverted dropout with probability `p` (see [`Feed::dropout_seed`]).
    pub fn dropout(&mut self, x: Var, p: f32) -> Var {
        let s = self.shape(x).to_vec();
        let salt = self.nodes.len() as u32;
        self.push(Op::Dropout { p, salt }, vec![x], s)
    }

    /// `x W (+ bias)` for a stored weight, plus its LoRA branch when the store has an adapter on
    /// it: `+ (scale * dropout(x) A^T) B^T`. `W` is (out, in) when `trans_w` (Hugging Face
    /// Linear), else (in, out) (GPT-2's Conv1D).
    pub fn linear_lora(
        &mut self,
        store: &ParamStore,
        x: Var,
        w: ParamId,
        bias: Option<ParamId>,
        trans_w: bool,
    ) -> Result<Var> {
        let wv = self.param(store, w);
        let bv = bias.map(|b| self.param(store, b));
        let y = self.linear(x, wv, bv, trans_w)?;
        let Some(lora) = store.lora(w).cloned() else { return Ok(y) };
        let xd = if lora.dropout > 0.0 { self.dropout(x, lora.dropout) } else { x };
        let (a, b) = (self.param(store, lora.a), self.param(store, lora.b));
        let h = self.linear(xd, a, None, true)?;
        // scaled at rank r, where it costs (tokens, r) elements, not (tokens, out): the same
        // product, since a scalar passes through B
        let h = if lora.scale == 1.0 { h } else { self.scale(h, lora.scale) };
        let h = self.linear(h, b, None, true)?;
        self.add(y, h)
    }

    /// `alpha * x` (Gemma's embedding scale).
    pub fn scale(&mut self, x: Var, alpha: f32) -> Var {
        let s = self.shape(x).to_vec();
        self.push(Op::Scale { alpha }, vec![x], s)
    }

    /// Causal grouped-query attention: q (B*T, H*D), k and v (B*T, KVH*D).
    pub fn attention(&mut self, q: Var, k: Var, v: Var, dims: AttnDims) -> Result<Var> {
        let rows = dims.b * dims.t;
        let ok = self.shape(q) == [rows, dims.h * dims.d]
            && self.shape(k) == [rows, dims.kv_h * dims.d]
            && self.shape(v) == [rows, dims.kv_h * dims.d];
        self.check("attention", ok, || {
            format!("q {:?}, k {:?}, v {:?} for {dims:?}", self.shape(q), self.shape(k), self.shape(v))
        })?;
        Ok(self.push(Op::Attention { dims }, vec![q, k, v], vec![rows, dims.h * dims.d]))
    }

    /// Causal self-attention over rows (B*T, (H + 2 KVH) D) packed as [q | k | v].
    pub fn attention_packed(&mut self, qkv: Var, dims: AttnDims) -> Result<Var> {
        let s = self.shape(qkv).to_vec();
        let width = (dims.h + 2 * dims.kv_h) * dims.d;
        self.check("attention", s == [dims.b * dims.t, width], || format!("qkv {s:?} for {dims:?}"))?;
        Ok(self.push(Op::AttentionPacked { dims }, vec![qkv], vec![dims.b * dims.t, dims.h * dims.d]))
    }

    /// Mean cross-entropy of `logits` (n, V) against target list `targets`: a scalar.
    pub fn cross_entropy(&mut self, logits: Var, targets: usize) -> Result<Var> {
        let s = self.shape(logits).to_vec();
        self.check("cross_entropy", s.len() == 2 && self.target_lists.get(targets) == Some(&s[1]), || {
            format!("logits {s:?} do not match target list {targets}")
        })?;
        Ok(self.push(Op::CrossEntropy { targets }, vec![logits], vec![1]))
    }

    /// Mean cross-entropy of `softcap(x W)` against target list `targets` without the logits
    /// ever existing whole (`kernels::lm_head_loss`): x (n, C), W (C, V), or (V, C) when
    /// `trans_w`; a scalar.
    pub fn linear_cross_entropy(
        &mut self,
        x: Var,
        w: Var,
        trans_w: bool,
        softcap: Option<f32>,
        targets: usize,
    ) -> Result<Var> {
        let (sx, sw) = (self.shape(x).to_vec(), self.shape(w).to_vec());
        let (c, v) = match (sw.as_slice(), trans_w) {
            ([c, v], false) => (*c, *v),
            ([v, c], true) => (*c, *v),
            _ => return Err(Error::shape("linear_cross_entropy", format!("weight {sw:?} is not a matrix"))),
        };
        let ok = sx.len() == 2 && sx[1] == c && self.target_lists.get(targets) == Some(&v);
        self.check("linear_cross_entropy", ok, || {
            format!("x {sx:?} . W {sw:?} (transposed: {trans_w}) against target list {targets}")
        })?;
        if let Some(cap) = softcap {
            crate::kernels::activation::check_cap(cap)?;
        }
        Ok(self.push(Op::LinearCrossEntropy { targets, trans_w, softcap }, vec![x, w], vec![1]))
    }

    /// Replace the graph's tail `logits = x W` (then optionally `softcap(logits)`), which must be
    /// its last nodes with `logits` the very last, by one [`Self::linear_cross_entropy`] against
    /// `targets`: the same loss, the logits never stored. A head with a bias, or any other tail,
    /// is refused (the caller keeps the plain cross-entropy).
    pub fn fuse_linear_cross_entropy(&mut self, logits: Var, targets: usize) -> Result<Var> {
        let refuse = |why: &str| Error::shape("fuse_linear_cross_entropy", why.to_string());
        if logits.0 + 1 != self.nodes.len() {
            return Err(refuse("the logits are not the graph's last node"));
        }
        let (head, softcap) = match self.nodes[logits.0].op {
            Op::Act { act: Act::Softcap(c) } => (self.nodes[logits.0].inputs[0], Some(c)),
            _ => (logits, None),
        };
        // everything after the head's product is the soft-cap, so nothing else reads the product
        if head.0 + 1 + softcap.is_some() as usize != self.nodes.len() {
            return Err(refuse("the LM head's product is not followed by the logits alone"));
        }
        let Op::Linear { trans_w } = self.nodes[head.0].op else {
            return Err(refuse("the logits do not come from a linear LM head"));
        };
        let [x, w] = self.nodes[head.0].inputs[..] else {
            return Err(refuse("the LM head has a bias"));
        };
        self.nodes.truncate(head.0);
        self.shapes.truncate(head.0);
        self.requires_grad.truncate(head.0);
        self.layer_inputs.retain(|v| v.0 < head.0);
        self.linear_cross_entropy(x, w, trans_w, softcap, targets)
    }

    /// Run the forward pass. Values that the backward pass needs stay alive in the returned
    /// [`Run`]; the rest are freed as soon as their last consumer has run.
    pub fn forward<'g>(&'g self, store: &ParamStore, feed: &Feed, keep: &[Var]) -> Result<Run<'g>> {
        let dev = store.device().clone();
        self.check_feed(feed)?;
        let fed = ops::Fed::new(&dev, feed, &self.id_lists, &self.target_lists)?;
        let n = self.nodes.len();
        let mut last_forward = vec![0usize; n];
        let mut needed_backward = vec![false; n];
        for (i, node) in self.nodes.iter().enumerate() {
            needed_backward[i] |= self.requires_grad[i] && node.op.backward_reads_output();
            for (j, v) in node.inputs.iter().enumerate() {
                last_forward[v.0] = i;
                needed_backward[v.0] |= self.requires_grad[i] && node.op.backward_reads(j);
            }
        }
        // Checkpointing: a value whose every consumer lies in its own segment is recomputed
        // in the backward pass instead of kept; the layer inputs (the marks) are kept.
        let segment = self.segments();
        let checkpointing = self.options.checkpoint_activations;
        let mut recomputed = vec![false; n];
        for (i, s) in segment.iter().enumerate() {
            recomputed[i] = s.is_some() && !keep.contains(&Var(i));
        }
        for (i, node) in self.nodes.iter().enumerate() {
            for v in &node.inputs {
                recomputed[v.0] &= segment[v.0] == segment[i];
            }
        }
        let half = self.options.activations.format(&dev);
        let streaming = matches!(dev, Device::Gpu(_)) && store.iter().any(|(_, p)| p.streams());
        let residency = streaming.then(|| {
            stream::Residency::plan(self, store, &self.requires_grad, &self.layer_ranges(), checkpointing)
        });
        let mut run = Run {
            graph: self,
            dev,
            fed,
            values: (0..n).map(|_| None).collect(),
            saved: Vec::new(),
            keep: keep.to_vec(),
            segment,
            done_segments: Vec::new(),
            residency,
            resident: stream::Resident::default(),
            half,
        };
        run.saved.resize_with(n, || None);
        for i in 0..n {
            // a layer input stays until its segment is recomputed
            let needed = |v: usize| {
                (needed_backward[v] && !recomputed[v])
                    || (checkpointing && self.layer_inputs.contains(&Var(v)))
            };
            let dev = run.dev.clone();
            profile::timed(&dev, || "weights streamed in".into(), || run.stream_in(store, i, true))?;
            run.forward_node(store, i, &last_forward, needed)?;
            // what the backward pass reads, held in 16 bits once the forward pass is done with it
            // (a checkpointed layer's input too: its recomputation starts from the rounded
            // values, as the backward steps of an unchecked layer read rounded ones)
            let dev = run.dev.clone();
            profile::timed(
                &dev,
                || "activations to 16 bits".into(),
                || run.narrow_inputs(i, &last_forward, needed),
            )?;
            if run.segment[i].is_some() {
                run.saved[i] = None; // made again when the segment is recomputed
            }
            if let Some(r) = &run.residency {
                let done: Vec<_> =
                    r.forward_reads(i).iter().copied().filter(|&id| r.release_after(id, i, true)).collect();
                done.into_iter().for_each(|id| run.resident.release(id));
            }
        }
        Ok(run)
    }

    fn check_feed(&self, feed: &Feed) -> Result<()> {
        if feed.ids.len() != self.id_lists.len() || feed.targets.len() != self.target_lists.len() {
            return Err(Error::InvalidArgument {
                name: "feed".into(),
                detail: format!(
                    "the graph takes {} id lists and {} target lists, got {} and {}",
                    self.id_lists.len(),
                    self.target_lists.len(),
                    feed.ids.len(),
                    feed.targets.len()
                ),
            });
        }
        Ok(())
    }
}
