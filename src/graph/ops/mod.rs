//! The graph's ops, each in one home: its forward and backward on every backend (the GPU through
//! `crate::kernels`, the fast CPU path through `crate::cpu`, the CPU reference through
//! `kernels_ref`), and what its backward needs saved, side by side in the op's own file. Adding
//! a backend or a weight format touches each op's file; this one only routes a node to its home
//! and hands it its inputs ([`Fwd`]) or its input gradients ([`Bwd`], [`Grad`]).
//!
//! Each backward reads as its forward in reverse. Gradients are written when their buffer is
//! new and added to otherwise (`Grad::acc`): a value used twice, like the residual stream,
//! collects both contributions; parameter gradients collect micro-batches.

mod activation;
mod attention;
mod elementwise;
mod embedding;
mod linear;
mod loss;
mod norm;
mod rope;

use super::{CpuPath, Device, Feed, Op, ParamId, ParamStore, Run, Value, Var};
use crate::error::{Error, Result};
use crate::gpu::Tensor;
use crate::kernels::cross_entropy::Targets;
use crate::kernels::embedding::Ids;
use kernels_ref as kr;

/// The feed, uploaded for the device.
pub(crate) enum Fed {
    Gpu { ids: Vec<Ids>, targets: Vec<Targets>, dropout_seed: Option<u32> },
    Cpu { ids: Vec<Vec<u32>>, targets: Vec<Vec<i32>>, dropout_seed: Option<u32> },
}

impl Fed {
    fn dropout_seed(&self) -> Option<u32> {
        match self {
            Fed::Gpu { dropout_seed, .. } | Fed::Cpu { dropout_seed, .. } => *dropout_seed,
        }
    }

    fn gpu_ids(&self, list: usize) -> &Ids {
        match self {
            Fed::Gpu { ids, .. } => &ids[list],
            Fed::Cpu { .. } => unreachable!("a GPU op got the CPU feed"),
        }
    }
    fn cpu_ids(&self, list: usize) -> &[u32] {
        match self {
            Fed::Cpu { ids, .. } => &ids[list],
            Fed::Gpu { .. } => unreachable!("a CPU op got the GPU feed"),
        }
    }
    fn gpu_targets(&self, list: usize) -> &Targets {
        match self {
            Fed::Gpu { targets, .. } => &targets[list],
            Fed::Cpu { .. } => unreachable!("a GPU op got the CPU feed"),
        }
    }
    fn cpu_targets(&self, list: usize) -> &[i32] {
        match self {
            Fed::Cpu { targets, .. } => &targets[list],
            Fed::Gpu { .. } => unreachable!("a CPU op got the GPU feed"),
        }
    }

    pub fn new(dev: &Device, feed: &Feed, id_vocab: &[usize], target_vocab: &[usize]) -> Result<Fed> {
        for (list, (ids, &vocab)) in feed.ids.iter().zip(id_vocab).enumerate() {
            if let Some((pos, bad)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
                return Err(Error::InvalidArgument {
                    name: format!("token ids (list {list})"),
                    detail: format!("id {bad} at position {pos} is outside the vocabulary of {vocab}"),
                });
            }
        }
        for (list, (t, &vocab)) in feed.targets.iter().zip(target_vocab).enumerate() {
            let bad =
                t.iter().enumerate().find(|(_, &x)| x != kr::IGNORE_INDEX && (x < 0 || x as usize >= vocab));
            if let Some((pos, bad)) = bad {
                return Err(Error::InvalidArgument {
                    name: format!("targets (list {list})"),
                    detail: format!("target {bad} at position {pos} is outside 0..{vocab} and is not -100"),
                });
            }
        }
        Ok(match dev {
            Device::Gpu(g) => Fed::Gpu {
                ids: feed
                    .ids
                    .iter()
                    .zip(id_vocab)
                    .map(|(ids, &v)| Ids::new(g, ids, v))
                    .collect::<Result<_>>()?,
                targets: feed
                    .targets
                    .iter()
                    .zip(target_vocab)
                    .map(|(t, &v)| Targets::new(g, t, v))
                    .collect::<Result<_>>()?,
                dropout_seed: feed.dropout_seed,
            },
            Device::Cpu(_) => Fed::Cpu {
                ids: feed.ids.clone(),
                targets: feed.targets.clone(),
                dropout_seed: feed.dropout_seed,
            },
        })
    }
}

/// The value of `v`: from the store for parameters, else from the run (`None` once freed: a
/// backward step gets only the inputs `Op::backward_reads` names).
fn value<'a>(run: &'a Run, store: &'a ParamStore, v: Var) -> Option<&'a Value> {
    match run.graph.nodes[v.0].op {
        Op::Param(id) => Some(run.resident(id).unwrap_or(&store.get(id).value)),
        _ => run.values[v.0].as_ref(),
    }
}

/// What an op's forward reads: its inputs and their shapes, its own shape, the feed.
pub(super) struct Fwd<'a> {
    pub dev: &'a Device,
    pub fed: &'a Fed,
    /// the graph's attention is the flash variant (`GraphOptions::flash_attention`)
    pub flash: bool,
    inputs: Vec<Option<&'a Value>>,
    in_shapes: Vec<&'a [usize]>,
    pub shape: &'a [usize],
}

impl<'a> Fwd<'a> {
    fn new(run: &'a Run, store: &'a ParamStore, i: usize) -> Self {
        let node = &run.graph.nodes[i];
        Fwd {
            dev: &run.dev,
            fed: &run.fed,
            flash: run.graph.options().flash_attention,
            inputs: node.inputs.iter().map(|&v| value(run, store, v)).collect(),
            in_shapes: node.inputs.iter().map(|v| run.graph.shapes[v.0].as_slice()).collect(),
            shape: &run.graph.shapes[i],
        }
    }
    /// Input `j`'s value.
    pub fn x(&self, j: usize) -> &'a Value {
        self.inputs[j].expect("the executor keeps every value until its last use")
    }
    /// Input `j`'s value, when the op has that many inputs (an optional bias).
    pub fn x_opt(&self, j: usize) -> Option<&'a Value> {
        self.inputs.get(j).map(|_| self.x(j))
    }
    pub fn in_shape(&self, j: usize) -> &'a [usize] {
        self.in_shapes[j]
    }
}

/// What an op's backward reads: [`Fwd`]'s view, the output gradient, the op's own output
/// (`Op::backward_reads_output`) and what its forward saved.
pub(super) struct Bwd<'a> {
    pub f: Fwd<'a>,
    dout: Option<&'a Value>,
    output: Option<&'a Value>,
    pub saved: Option<&'a Value>,
    /// the loss ops' output gradient (a scalar, 1 / micro-batches)
    pub scale: f32,
}

impl<'a> Bwd<'a> {
    /// The output gradient (every op but the loss gets one).
    pub fn dy(&self) -> &'a Value {
        self.dout.expect("every op but the loss gets an output gradient")
    }
    pub fn output(&self) -> &'a Value {
        self.output.expect("the executor keeps an output its backward reads")
    }
    pub fn saved(&self, what: &str) -> &'a Value {
        self.saved.unwrap_or_else(|| panic!("{what} is saved by the forward pass"))
    }
}

/// The gradient buffer of one input: written when `acc` is false, added to when true.
pub(super) struct Grad {
    pub value: Value,
    pub acc: bool,
}

impl Grad {
    /// A host gradient from a function that can only overwrite: stored, or added to what is there.
    fn put_cpu(&mut self, fresh: Vec<f32>) {
        let d = self.value.cpu_mut();
        if self.acc {
            use rayon::prelude::*;
            d.par_iter_mut().zip(fresh.par_iter()).for_each(|(a, b)| *a += b);
        } else {
            *d = fresh;
        }
    }
    /// Beta of `y = alpha x + beta y` that writes (0) or adds (1).
    fn beta(&self) -> f32 {
        if self.acc {
            1.0
        } else {
            0.0
        }
    }
}

/// The gradients an op is asked for, one slot per input (`None`: that input needs none).
pub(super) type Grads = [Option<Grad>];

/// The inputs that need a gradient, with their buffers.
fn wanted(grads: &mut Grads) -> impl Iterator<Item = (usize, &mut Grad)> {
    grads.iter_mut().enumerate().filter_map(|(j, g)| g.as_mut().map(|g| (j, g)))
}

pub(crate) fn forward(run: &mut Run, store: &ParamStore, i: usize) -> Result<(Value, Option<Value>)> {
    let cx = Fwd::new(run, store, i);
    let mut out = Value::empty(cx.dev, cx.shape, "activation")?;
    let saved = match &run.graph.nodes[i].op {
        Op::Param(_) => unreachable!("parameters are not computed"),
        Op::Embedding { ids } => embedding::forward(&cx, &mut out, *ids)?,
        Op::Add => elementwise::add_forward(&cx, &mut out)?,
        Op::Scale { alpha } => elementwise::scale_forward(&cx, &mut out, *alpha)?,
        Op::Dropout { p, salt } => elementwise::dropout_forward(&cx, &mut out, *p, *salt)?,
        Op::LayerNorm { eps } => norm::layernorm_forward(&cx, &mut out, *eps)?,
        Op::RmsNorm { eps, shift } => norm::rmsnorm_forward(&cx, &mut out, *eps, *shift)?,
        Op::Linear { trans_w } => linear::forward(&cx, &mut out, *trans_w)?,
        Op::Act { act } => activation::act_forward(&cx, &mut out, *act)?,
        Op::Glu { silu } => activation::glu_forward(&cx, &mut out, *silu)?,
        Op::Rope { b, t, heads, head_dim, theta } => rope::forward(
            &cx,
            &mut out,
            rope::Rope { b: *b, t: *t, heads: *heads, head_dim: *head_dim, theta: *theta },
        )?,
        Op::AttentionPacked { dims } => attention::forward(&cx, &mut out, *dims, true)?,
        Op::Attention { dims } => attention::forward(&cx, &mut out, *dims, false)?,
        Op::CrossEntropy { targets } => loss::cross_entropy_forward(&cx, &mut out, *targets)?,
        Op::LinearCrossEntropy { targets, trans_w, softcap } => {
            loss::head_loss_forward(&cx, &mut out, *targets, *trans_w, *softcap)?
        }
    };
    Ok((out, saved))
}

/// Where the gradient of an input goes.
enum Target {
    Param(ParamId),
    Act(usize),
}

/// The gradient buffer of input `v` and its target; `None` when `v` needs no gradient.
fn take_grad(
    run: &Run,
    store: &mut ParamStore,
    grads: &mut [Option<Value>],
    v: Var,
) -> Result<Option<(Target, Grad)>> {
    if !run.graph.requires_grad[v.0] {
        return Ok(None);
    }
    Ok(match run.graph.nodes[v.0].op {
        Op::Param(id) => store.take_grad(id)?.map(|(g, acc)| (Target::Param(id), Grad { value: g, acc })),
        _ => Some(match grads[v.0].take() {
            Some(g) => (Target::Act(v.0), Grad { value: g, acc: true }),
            None => {
                let g = Value::empty(&run.dev, &run.graph.shapes[v.0], "gradient")?;
                (Target::Act(v.0), Grad { value: g, acc: false })
            }
        }),
    })
}

fn put_grad(store: &mut ParamStore, grads: &mut [Option<Value>], target: Target, g: Value) {
    match target {
        Target::Param(id) => store.put_grad(id, g),
        Target::Act(i) => grads[i] = Some(g),
    }
}

/// The backward step of node `i`: every input's gradient, from the output gradient `dout`
/// (`None` for the loss, whose gradient is `scale`).
pub(crate) fn backward(
    run: &mut Run,
    store: &mut ParamStore,
    grads: &mut [Option<Value>],
    i: usize,
    dout: Option<Value>,
    scale: f32,
) -> Result<()> {
    let graph = run.graph;
    let node = &graph.nodes[i];
    // An op that passes its output gradient through (`Op::passes_gradient`) gives the buffer
    // itself to the first input that needs a gradient and holds none yet (an activation, read
    // once by this node): no copy, and on the GPU no dispatch.
    let handed = node.op.passes_gradient().then(|| {
        node.inputs.iter().position(|&v| {
            graph.requires_grad[v.0]
                && !matches!(graph.nodes[v.0].op, Op::Param(_))
                && grads[v.0].is_none()
                && node.inputs.iter().filter(|&&w| w == v).count() == 1
        })
    });
    let handed = handed.flatten();
    // One buffer per input slot. A value read twice by the node (`add(x, x)`) gets its
    // gradient buffer at its first slot and a fresh one at the others, added in afterwards.
    let mut targets = Vec::new();
    let mut op_grads = Vec::new();
    let mut repeats = Vec::new(); // (slot, first slot of the same value)
    for (k, &input) in node.inputs.iter().enumerate() {
        let first = node.inputs[..k].iter().position(|&v| v == input);
        match first {
            _ if handed == Some(k) => {
                targets.push(None);
                op_grads.push(None);
            }
            Some(j) if graph.requires_grad[input.0] => {
                let fresh = Value::empty(&run.dev, &graph.shapes[input.0], "gradient")?;
                targets.push(None);
                op_grads.push(Some(Grad { value: fresh, acc: false }));
                repeats.push((k, j));
            }
            _ => {
                let (t, g) = take_grad(run, store, grads, input)?.unzip();
                targets.push(t);
                op_grads.push(g);
            }
        }
    }
    {
        let cx = Bwd {
            f: Fwd::new(run, store, i),
            dout: dout.as_ref(),
            output: run.values[i].as_ref(),
            saved: run.saved[i].as_ref(),
            scale,
        };
        let g = op_grads.as_mut_slice();
        match &node.op {
            Op::Param(_) => unreachable!("parameters have no backward step"),
            Op::Embedding { ids } => embedding::backward(&cx, g, *ids)?,
            Op::Add => elementwise::add_backward(&cx, g)?,
            Op::Scale { alpha } => elementwise::scale_backward(&cx, g, *alpha)?,
            Op::Dropout { p, salt } => elementwise::dropout_backward(&cx, g, *p, *salt)?,
            Op::LayerNorm { .. } => norm::layernorm_backward(&cx, g)?,
            Op::RmsNorm { shift, .. } => norm::rmsnorm_backward(&cx, g, *shift)?,
            Op::Linear { trans_w } => linear::backward(&cx, g, *trans_w)?,
            Op::Act { act } => activation::act_backward(&cx, g, *act)?,
            Op::Glu { silu } => activation::glu_backward(&cx, g, *silu)?,
            Op::Rope { b, t, heads, head_dim, theta } => rope::backward(
                &cx,
                g,
                rope::Rope { b: *b, t: *t, heads: *heads, head_dim: *head_dim, theta: *theta },
            )?,
            Op::AttentionPacked { dims } => attention::backward(&cx, g, *dims, true)?,
            Op::Attention { dims } => attention::backward(&cx, g, *dims, false)?,
            Op::CrossEntropy { targets } => loss::cross_entropy_backward(&cx, g, *targets)?,
            Op::LinearCrossEntropy { targets, trans_w, softcap } => {
                loss::head_loss_backward(&cx, g, *targets, *trans_w, *softcap)?
            }
        }
    }
    for (k, j) in repeats {
        let extra = op_grads[k].take().expect("a fresh buffer at every repeated slot").value;
        if let Some(first) = op_grads[j].as_mut() {
            match (&run.dev, &mut first.value, &extra) {
                (Device::Gpu(gpu), Value::Gpu(dst), Value::Gpu(src)) => {
                    crate::kernels::elementwise::axpby(gpu, dst, src, 1.0, 1.0)?
                }
                (Device::Cpu(_), Value::Cpu(dst), Value::Cpu(src)) => {
                    dst.iter_mut().zip(src).for_each(|(a, b)| *a += b)
                }
                _ => unreachable!("gradients live on the graph's device"),
            }
        }
    }
    for (t, g) in targets.into_iter().zip(op_grads) {
        if let (Some(t), Some(g)) = (t, g) {
            put_grad(store, grads, t, g.value);
        }
    }
    match (handed, dout) {
        (Some(k), Some(dout)) => grads[node.inputs[k].0] = Some(dout),
        (None, dout) => Value::recycle(&run.dev, dout),
        (Some(_), None) => {}
    }
    Ok(())
}

/// GPU gradients from a kernel that can only overwrite its output: straight into the buffer
/// when it holds nothing yet, else into a fresh one that is then added to it.
fn write_or_add(
    gpu: &crate::gpu::Gpu,
    g: &Grad,
    what: &str,
    kernel: impl FnOnce(&Tensor) -> Result<()>,
) -> Result<()> {
    let dst = g.value.gpu();
    if !g.acc {
        return kernel(dst);
    }
    let fresh = Tensor::empty(gpu, dst.shape(), what)?;
    kernel(&fresh)?;
    crate::kernels::elementwise::axpby(gpu, dst, &fresh, 1.0, 1.0)
}

/// Packed weights are read as Hugging Face Linear stores them, (out, in).
fn packed_layout(trans_w: bool) -> Result<()> {
    if trans_w {
        return Ok(());
    }
    Err(Error::Internal {
        context: "linear".into(),
        message: "a packed weight is stored (in, out); only (out, in) weights are kept packed".into(),
    })
}
