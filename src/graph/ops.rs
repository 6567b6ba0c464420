//! Forward and backward of each graph op on both devices: the GPU through `crate::kernels`, the
//! CPU through `kernels_ref`. Each backward reads as its forward in reverse; gradient outputs
//! are written when their buffer is new and added to otherwise (a value used twice, like the
//! residual stream, collects both contributions; parameter gradients collect micro-batches).

use super::{Device, Feed, Op, ParamId, ParamStore, Run, Value, Var};
use crate::error::{Error, Result};
use crate::gpu::Tensor;
use crate::kernels::activation::{self, Act};
use crate::kernels::attention::{self, Heads};
use crate::kernels::cross_entropy::{self, Targets};
use crate::kernels::embedding::{self, Ids};
use crate::kernels::flash_attention;
use crate::kernels::lm_head_loss::{self, HeadWeight};
use crate::kernels::norm::{self, NormKind};
use crate::kernels::{elementwise, matmul, quant, reduce, rope};
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
}

impl Fed {
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
            Device::Cpu => Fed::Cpu {
                ids: feed.ids.clone(),
                targets: feed.targets.clone(),
                dropout_seed: feed.dropout_seed,
            },
        })
    }
}

/// The value of `v`: from the store for parameters, else from the run.
fn value<'a>(run: &'a Run, store: &'a ParamStore, v: Var) -> &'a Value {
    match run.graph.nodes[v.0].op {
        Op::Param(id) => run.resident(id).unwrap_or(&store.get(id).value),
        _ => run.values[v.0].as_ref().expect("the executor keeps every value until its last use"),
    }
}

pub(crate) fn forward(run: &mut Run, store: &ParamStore, i: usize) -> Result<(Value, Option<Value>)> {
    let node = &run.graph.nodes[i];
    let shape = run.graph.shapes[i].clone();
    let dev = run.dev.clone();
    let x = |j: usize| value(run, store, node.inputs[j]);
    let in_shape = |j: usize| run.graph.shapes[node.inputs[j].0].clone();
    let mut out = Value::empty(&dev, &shape, "activation")?;
    let mut saved = None;
    match (&dev, &node.op) {
        (_, Op::Param(_)) => unreachable!("parameters are not computed"),
        (Device::Gpu(g), Op::Embedding { ids }) => {
            let Fed::Gpu { ids: fed, .. } = &run.fed else { unreachable!() };
            match x(0) {
                Value::Packed(table) => quant::qembedding_forward(g, out.gpu(), &fed[*ids], table)?,
                // a streamed table: only the looked-up rows are read, on the host
                Value::Streamed(table) => out.gpu().write(g, &table.gather_rows(fed[*ids].host())?)?,
                table => embedding::embedding_forward(g, out.gpu(), &fed[*ids], table.gpu())?,
            }
        }
        (Device::Cpu, Op::Embedding { ids }) => {
            let Fed::Cpu { ids: fed, .. } = &run.fed else { unreachable!() };
            kr::embedding_forward(out.cpu_mut(), &fed[*ids], x(0).cpu(), shape[1]);
        }
        (Device::Gpu(g), Op::Add) => elementwise::add(g, out.gpu(), x(0).gpu(), x(1).gpu(), 1.0, 1.0)?,
        (Device::Gpu(g), Op::Scale { alpha }) => elementwise::axpby(g, out.gpu(), x(0).gpu(), *alpha, 0.0)?,
        (Device::Gpu(g), Op::Dropout { p, salt }) => match run.fed.dropout_seed() {
            Some(seed) => elementwise::dropout(g, out.gpu(), x(0).gpu(), *p, kr::hash32(seed ^ *salt))?,
            None => elementwise::axpby(g, out.gpu(), x(0).gpu(), 1.0, 0.0)?,
        },
        (Device::Cpu, Op::Dropout { p, salt }) => match run.fed.dropout_seed() {
            Some(seed) => kr::dropout(out.cpu_mut(), x(0).cpu(), *p, kr::hash32(seed ^ *salt)),
            None => out.cpu_mut().copy_from_slice(x(0).cpu()),
        },
        (Device::Cpu, Op::Scale { alpha }) => kr::scale(out.cpu_mut(), x(0).cpu(), *alpha),
        (Device::Cpu, Op::Add) => kr::add(out.cpu_mut(), x(0).cpu(), x(1).cpu()),
        (Device::Gpu(g), Op::LayerNorm { eps }) => {
            let stats = Tensor::empty(g, &[shape[0], 2], "layernorm stats")?;
            norm::norm_forward(
                g,
                out.gpu(),
                &stats,
                x(0).gpu(),
                x(1).gpu(),
                Some(x(2).gpu()),
                NormKind::Layer,
                *eps,
            )?;
            saved = Some(Value::Gpu(stats));
        }
        (Device::Cpu, Op::LayerNorm { eps }) => {
            let (rows, cols) = (shape[0], shape[1]);
            let (mut mean, mut rstd) = (vec![0f32; rows], vec![0f32; rows]);
            kr::layernorm_forward(
                out.cpu_mut(),
                &mut mean,
                &mut rstd,
                x(0).cpu(),
                x(1).cpu(),
                x(2).cpu(),
                rows,
                cols,
                *eps,
            );
            mean.extend(rstd);
            saved = Some(Value::Cpu(mean));
        }
        (Device::Gpu(g), Op::Linear { trans_w }) => {
            let bias = node.inputs.get(2).map(|&b| value(run, store, b).gpu());
            match x(1) {
                Value::Packed(w) => {
                    packed_layout(*trans_w)?;
                    quant::qmatmul(g, out.gpu(), x(0).gpu(), w, bias, false)?
                }
                w => matmul::matmul(g, out.gpu(), x(0).gpu(), w.gpu(), bias, false, *trans_w, false)?,
            }
        }
        (Device::Cpu, Op::Linear { trans_w }) => {
            let d = linear_dims(&in_shape(0), &shape, *trans_w);
            let bias = node.inputs.get(2).map(|&b| value(run, store, b).cpu());
            kr::matmul_forward(out.cpu_mut(), x(0).cpu(), x(1).cpu(), bias, d);
        }
        (Device::Gpu(g), Op::Act { act }) => activation::act_forward(g, out.gpu(), x(0).gpu(), *act)?,
        (Device::Cpu, Op::Act { act }) => match *act {
            Act::Gelu => kr::gelu_forward(out.cpu_mut(), x(0).cpu()),
            Act::Silu => kr::silu_forward(out.cpu_mut(), x(0).cpu()),
            Act::Softcap(c) => kr::softcap_forward(out.cpu_mut(), x(0).cpu(), c),
        },
        (Device::Gpu(g), Op::AttentionPacked { dims: d }) => {
            let (q, k, v) = packed(x(0).gpu(), d);
            saved = Some(attention_forward_gpu(g, flash_on(run), out.gpu(), q, k, v, d)?);
        }
        (Device::Cpu, Op::AttentionPacked { dims: d }) => {
            let (q, k, v) = unpack(x(0).cpu(), d);
            saved = Some(attention_forward_cpu(flash_on(run), out.cpu_mut(), &q, &k, &v, d));
        }
        (Device::Gpu(g), Op::RmsNorm { eps, shift }) => {
            let rows = shape.iter().product::<usize>() / in_shape(1)[0];
            let stats = Tensor::empty(g, &[rows, 2], "rmsnorm stats")?;
            let kind = NormKind::Rms { gemma: *shift != 0.0 };
            norm::norm_forward(g, out.gpu(), &stats, x(0).gpu(), x(1).gpu(), None, kind, *eps)?;
            saved = Some(Value::Gpu(stats));
        }
        (Device::Cpu, Op::RmsNorm { eps, shift }) => {
            let cols = in_shape(1)[0];
            let rows = shape.iter().product::<usize>() / cols;
            let mut rstd = vec![0f32; rows];
            kr::rmsnorm_forward(out.cpu_mut(), &mut rstd, x(0).cpu(), x(1).cpu(), rows, cols, *eps, *shift);
            saved = Some(Value::Cpu(rstd));
        }
        (Device::Gpu(g), Op::Rope { b, t, heads, head_dim, theta }) => {
            let table = rope::RopeTable::for_sequence(g, *t, *head_dim, *theta)?;
            rope::rope_forward(g, out.gpu(), x(0).gpu(), &table, *b, *heads)?;
        }
        (Device::Cpu, Op::Rope { b, t, heads, head_dim, theta }) => {
            let (cos, sin) = cpu_rope_table(*t, *head_dim, *theta);
            kr::rope_forward(out.cpu_mut(), x(0).cpu(), &cos, &sin, *b, *t, *heads, *head_dim);
        }
        (Device::Gpu(g), Op::Glu { silu }) => {
            let act = if *silu { Act::Silu } else { Act::Gelu };
            activation::glu_forward(g, out.gpu(), x(0).gpu(), x(1).gpu(), act)?;
        }
        (Device::Cpu, Op::Glu { silu }) => {
            if *silu {
                kr::swiglu_forward(out.cpu_mut(), x(0).cpu(), x(1).cpu());
            } else {
                kr::geglu_forward(out.cpu_mut(), x(0).cpu(), x(1).cpu());
            }
        }
        (Device::Gpu(g), Op::Attention { dims: d }) => {
            let (q, k, v) = (
                Heads::dense(x(0).gpu(), d.h, d.d),
                Heads::dense(x(1).gpu(), d.kv_h, d.d),
                Heads::dense(x(2).gpu(), d.kv_h, d.d),
            );
            saved = Some(attention_forward_gpu(g, flash_on(run), out.gpu(), q, k, v, d)?);
        }
        (Device::Cpu, Op::Attention { dims: d }) => {
            let (q, k, v) = (x(0).cpu(), x(1).cpu(), x(2).cpu());
            saved = Some(attention_forward_cpu(flash_on(run), out.cpu_mut(), q, k, v, d));
        }
        (Device::Gpu(g), Op::CrossEntropy { targets }) => {
            let Fed::Gpu { targets: fed, .. } = &run.fed else { unreachable!() };
            let n = in_shape(0)[0];
            let losses = Tensor::empty(g, &[n], "losses")?;
            let state = Tensor::empty(g, &[n, 4], "cross-entropy state")?;
            cross_entropy::cross_entropy_forward(g, &losses, &state, x(0).gpu(), &fed[*targets])?;
            // Filled by a dispatch, not uploaded: a host write would end the step's submission.
            let sum = Tensor::empty(g, &[1], "loss sum")?;
            elementwise::fill(g, &sum, 0.0)?;
            reduce::sum_into(g, &sum, 0, &losses, false)?;
            // Mean over counted rows; 0/0 gives NaN when every row is ignored, as in PyTorch.
            elementwise::axpby(g, out.gpu(), &sum, 1.0 / fed[*targets].count() as f32, 0.0)?;
            saved = Some(Value::Gpu(state));
        }
        (Device::Cpu, Op::CrossEntropy { targets }) => {
            let Fed::Cpu { targets: fed, .. } = &run.fed else { unreachable!() };
            let (n, v) = (in_shape(0)[0], in_shape(0)[1]);
            let mut losses = vec![0f32; n];
            out.cpu_mut()[0] = kr::cross_entropy_forward(&mut losses, x(0).cpu(), &fed[*targets], n, v);
        }
        (Device::Gpu(g), Op::LinearCrossEntropy { targets, trans_w, softcap }) => {
            let Fed::Gpu { targets: fed, .. } = &run.fed else { unreachable!() };
            let state = Tensor::empty(g, &[in_shape(0)[0], 4], "cross-entropy state")?;
            let w = head_weight(x(1), *trans_w)?;
            let fed = &fed[*targets];
            lm_head_loss::lm_head_loss_forward(g, out.gpu(), &state, x(0).gpu(), w, fed, *softcap)?;
            saved = Some(Value::Gpu(state));
        }
        (Device::Cpu, Op::LinearCrossEntropy { targets, trans_w, softcap }) => {
            let Fed::Cpu { targets: fed, .. } = &run.fed else { unreachable!() };
            let d = head_dims(&in_shape(0), &in_shape(1), *trans_w, *softcap);
            let mut losses = vec![0f32; d.n];
            out.cpu_mut()[0] =
                kr::linear_cross_entropy_forward(&mut losses, x(0).cpu(), x(1).cpu(), &fed[*targets], d);
        }
    }
    Ok((out, saved))
}

fn cpu_rope_table(t: usize, head_dim: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
    let positions: Vec<u32> = (0..t as u32).collect();
    let (mut cos, mut sin) = (vec![0f32; t * head_dim / 2], vec![0f32; t * head_dim / 2]);
    kr::rope_cos_sin(&mut cos, &mut sin, &positions, head_dim, theta);
    (cos, sin)
}

fn linear_dims(x: &[usize], out: &[usize], trans_w: bool) -> kr::MatmulDims {
    kr::MatmulDims { batch: 1, m: x[0], n: out[1], k: x[1], trans_a: false, trans_b: trans_w }
}

fn packed<'t>(qkv: &'t Tensor, d: &attention::AttnDims) -> (Heads<'t>, Heads<'t>, Heads<'t>) {
    let (qw, kw) = (d.h * d.d, d.kv_h * d.d);
    let width = qw + 2 * kw;
    (Heads::packed(qkv, 0, width), Heads::packed(qkv, qw, width), Heads::packed(qkv, qw + kw, width))
}

fn unpack(qkv: &[f32], d: &attention::AttnDims) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (qw, kw) = (d.h * d.d, d.kv_h * d.d);
    let width = qw + 2 * kw;
    let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
    for row in qkv.chunks(width) {
        q.extend_from_slice(&row[..qw]);
        k.extend_from_slice(&row[qw..qw + kw]);
        v.extend_from_slice(&row[qw + kw..]);
    }
    (q, k, v)
}

/// Where the gradient of an input goes.
enum Target {
    Param(ParamId),
    Act(usize),
}

/// The gradient buffer of input `v`, and whether to add to it (it already holds something);
/// `None` when `v` needs no gradient.
fn take_grad(
    run: &Run,
    store: &mut ParamStore,
    grads: &mut [Option<Value>],
    v: Var,
) -> Result<Option<(Target, Value, bool)>> {
    if !run.graph.requires_grad[v.0] {
        return Ok(None);
    }
    Ok(match run.graph.nodes[v.0].op {
        Op::Param(id) => store.take_grad(id)?.map(|(g, acc)| (Target::Param(id), g, acc)),
        _ => Some(match grads[v.0].take() {
            Some(g) => (Target::Act(v.0), g, true),
            None => (Target::Act(v.0), Value::empty(&run.dev, &run.graph.shapes[v.0], "gradient")?, false),
        }),
    })
}

fn put_grad(store: &mut ParamStore, grads: &mut [Option<Value>], target: Target, g: Value) {
    match target {
        Target::Param(id) => store.put_grad(id, g),
        Target::Act(i) => grads[i] = Some(g),
    }
}

/// GPU gradients from a kernel that can only overwrite its output: straight into `dst` when it
/// holds nothing yet, else into a fresh buffer that is then added to it.
fn write_or_add(
    gpu: &crate::gpu::Gpu,
    dst: &Tensor,
    accumulate: bool,
    what: &str,
    kernel: impl FnOnce(&Tensor) -> Result<()>,
) -> Result<()> {
    if !accumulate {
        return kernel(dst);
    }
    let fresh = Tensor::empty(gpu, dst.shape(), what)?;
    kernel(&fresh)?;
    elementwise::axpby(gpu, dst, &fresh, 1.0, 1.0)
}

/// CPU gradients: the reference functions overwrite, so add a fresh result where needed.
fn cpu_put(dst: &mut Value, fresh: Vec<f32>, accumulate: bool) {
    let d = dst.cpu_mut();
    if accumulate {
        d.iter_mut().zip(fresh).for_each(|(a, b)| *a += b);
    } else {
        *d = fresh;
    }
}

pub(crate) fn backward(
    run: &mut Run,
    store: &mut ParamStore,
    grads: &mut [Option<Value>],
    i: usize,
    dout: Option<&Value>,
    scale: f32,
) -> Result<()> {
    let graph = run.graph;
    let node = &graph.nodes[i];
    if let Op::Attention { dims } = node.op {
        return attention_backward(run, store, grads, i, dout.expect("attention is not the loss"), dims);
    }
    if let Op::LinearCrossEntropy { targets, trans_w, softcap } = node.op {
        return linear_cross_entropy_backward(run, store, grads, i, targets, (trans_w, softcap), scale);
    }
    let dev = run.dev.clone();
    let shape = graph.shapes[i].clone();
    for (j, &input) in node.inputs.iter().enumerate() {
        let Some((target, mut g, acc)) = take_grad(run, store, grads, input)? else { continue };
        let in_shape = graph.shapes[input.0].clone();
        {
            let x = |k: usize| value(run, store, node.inputs[k]);
            let dy = || dout.expect("every op but the loss gets an output gradient");
            // this node's own value, for the ops whose backward reads it (`backward_reads_output`)
            let output = || run.values[i].as_ref().expect("the executor keeps an output its backward reads");
            let saved = run.saved[i].as_ref();
            match (&dev, &node.op) {
                (_, Op::Param(_)) => unreachable!(),
                (Device::Gpu(gpu), Op::Embedding { ids }) => {
                    let Fed::Gpu { ids: fed, .. } = &run.fed else { unreachable!() };
                    if !acc {
                        g.fill(&dev, 0.0)?;
                    }
                    embedding::embedding_backward(gpu, g.gpu(), dy().gpu(), &fed[*ids])?;
                }
                (Device::Cpu, Op::Embedding { ids }) => {
                    let Fed::Cpu { ids: fed, .. } = &run.fed else { unreachable!() };
                    let mut d = vec![0f32; in_shape.iter().product()];
                    kr::embedding_backward(&mut d, dy().cpu(), &fed[*ids], in_shape[1]);
                    cpu_put(&mut g, d, acc);
                }
                (Device::Gpu(gpu), Op::Add) => {
                    elementwise::axpby(gpu, g.gpu(), dy().gpu(), 1.0, if acc { 1.0 } else { 0.0 })?
                }
                (Device::Cpu, Op::Add) => cpu_put(&mut g, dy().cpu().to_vec(), acc),
                (Device::Gpu(gpu), Op::Dropout { p, salt }) => match run.fed.dropout_seed() {
                    Some(seed) => write_or_add(gpu, g.gpu(), acc, "dropout gradient", |d| {
                        elementwise::dropout(gpu, d, dy().gpu(), *p, kr::hash32(seed ^ *salt))
                    })?,
                    None => elementwise::axpby(gpu, g.gpu(), dy().gpu(), 1.0, if acc { 1.0 } else { 0.0 })?,
                },
                (Device::Cpu, Op::Dropout { p, salt }) => {
                    let mut d = dy().cpu().to_vec();
                    if let Some(seed) = run.fed.dropout_seed() {
                        kr::dropout(&mut d, dy().cpu(), *p, kr::hash32(seed ^ *salt));
                    }
                    cpu_put(&mut g, d, acc);
                }
                (Device::Gpu(gpu), Op::Scale { alpha }) => {
                    elementwise::axpby(gpu, g.gpu(), dy().gpu(), *alpha, if acc { 1.0 } else { 0.0 })?
                }
                (Device::Cpu, Op::Scale { alpha }) => {
                    let mut d = vec![0f32; in_shape.iter().product()];
                    kr::scale(&mut d, dy().cpu(), *alpha);
                    cpu_put(&mut g, d, acc);
                }
                (Device::Gpu(gpu), Op::LayerNorm { .. }) => {
                    let stats = saved.expect("layernorm saves its statistics").gpu();
                    let (xs, w) = (x(0).gpu(), x(1).gpu());
                    let (dx, dw, db) = match j {
                        0 => (Some(g.gpu()), None, None),
                        1 => (None, Some(g.gpu()), None),
                        _ => (None, None, Some(g.gpu())),
                    };
                    norm::norm_backward(gpu, dx, dw, db, dy().gpu(), xs, w, stats, NormKind::Layer, acc)?;
                }
                (Device::Cpu, Op::LayerNorm { .. }) => {
                    let (rows, cols) = (shape[0], shape[1]);
                    let stats = saved.expect("layernorm saves its statistics").cpu();
                    let (mean, rstd) = stats.split_at(rows);
                    let (mut dx, mut dw, mut db) =
                        (vec![0f32; rows * cols], vec![0f32; cols], vec![0f32; cols]);
                    kr::layernorm_backward(
                        &mut dx,
                        &mut dw,
                        &mut db,
                        dy().cpu(),
                        x(0).cpu(),
                        x(1).cpu(),
                        mean,
                        rstd,
                        rows,
                        cols,
                    );
                    cpu_put(&mut g, [dx, dw, db].into_iter().nth(j.min(2)).expect("three outputs"), acc);
                }
                (Device::Gpu(gpu), Op::Linear { trans_w }) if matches!(x(1), Value::Packed(_)) => {
                    let Value::Packed(w) = x(1) else { unreachable!() };
                    packed_layout(*trans_w)?;
                    match j {
                        0 => quant::qmatmul_dx(gpu, g.gpu(), dy().gpu(), w, acc)?,
                        2 => reduce::sum_rows(gpu, g.gpu(), dy().gpu(), acc)?,
                        _ => {
                            return Err(Error::Internal {
                                context: "linear backward".into(),
                                message: "a packed (frozen) weight was asked for a gradient".into(),
                            })
                        }
                    }
                }
                (Device::Gpu(gpu), Op::Linear { trans_w }) => {
                    let (xs, w) = (x(0).gpu(), x(1).gpu());
                    let (da, dw, db) = match j {
                        0 => (Some(g.gpu()), None, None),
                        1 => (None, Some(g.gpu()), None),
                        _ => (None, None, Some(g.gpu())),
                    };
                    matmul::matmul_backward(gpu, da, dw, db, dy().gpu(), xs, w, false, *trans_w, acc)?;
                }
                (Device::Cpu, Op::Linear { trans_w }) => {
                    let d = linear_dims(&graph.shapes[node.inputs[0].0], &shape, *trans_w);
                    let mut fresh = vec![0f32; in_shape.iter().product()];
                    let (x0, w) = (x(0).cpu(), x(1).cpu());
                    match j {
                        0 => kr::matmul_backward(Some(&mut fresh), None, None, dy().cpu(), x0, w, d),
                        1 => kr::matmul_backward(None, Some(&mut fresh), None, dy().cpu(), x0, w, d),
                        _ => kr::matmul_backward(None, None, Some(&mut fresh), dy().cpu(), x0, w, d),
                    }
                    cpu_put(&mut g, fresh, acc);
                }
                (Device::Gpu(gpu), Op::Act { act: Act::Softcap(c) }) => {
                    let y = output().gpu();
                    activation::softcap_backward_from_output(gpu, g.gpu(), y, dy().gpu(), *c, acc)?
                }
                (Device::Gpu(gpu), Op::Act { act }) => {
                    activation::act_backward(gpu, g.gpu(), x(0).gpu(), dy().gpu(), *act, acc)?
                }
                (Device::Cpu, Op::Act { act }) => {
                    let mut d = vec![0f32; in_shape.iter().product()];
                    match *act {
                        Act::Gelu => kr::gelu_backward(&mut d, x(0).cpu(), dy().cpu()),
                        Act::Silu => kr::silu_backward(&mut d, x(0).cpu(), dy().cpu()),
                        Act::Softcap(c) => {
                            kr::softcap_backward_from_output(&mut d, output().cpu(), dy().cpu(), c)
                        }
                    }
                    cpu_put(&mut g, d, acc);
                }
                (Device::Gpu(gpu), Op::AttentionPacked { dims: d }) => {
                    let saved = saved.expect("attention saves its probabilities or log-sum-exp").gpu();
                    let (q, k, v) = packed(x(0).gpu(), d);
                    let (dq, dk, dv) = packed(g.gpu(), d);
                    let dout = Heads::dense(dy().gpu(), d.h, d.d);
                    let flash = flash_on(run);
                    attention_backward_gpu(gpu, flash, [dq, dk, dv], dout, [q, k, v], saved, *d, acc)?;
                }
                (Device::Cpu, Op::AttentionPacked { dims: d }) => {
                    let saved = saved.expect("attention saves its probabilities or log-sum-exp").cpu();
                    let (q, k, v) = unpack(x(0).cpu(), d);
                    let (dq, dk, dv) =
                        attention_backward_cpu(flash_on(run), dy().cpu(), [&q, &k, &v], saved, *d);
                    let (qw, kw) = (d.h * d.d, d.kv_h * d.d);
                    let fresh: Vec<f32> = (0..d.b * d.t)
                        .flat_map(|r| {
                            [&dq[r * qw..(r + 1) * qw], &dk[r * kw..(r + 1) * kw], &dv[r * kw..(r + 1) * kw]]
                                .concat()
                        })
                        .collect();
                    cpu_put(&mut g, fresh, acc);
                }
                (Device::Gpu(gpu), Op::RmsNorm { shift, .. }) => {
                    let stats = saved.expect("rmsnorm saves its statistics").gpu();
                    let kind = NormKind::Rms { gemma: *shift != 0.0 };
                    let (dx, dw) = if j == 0 { (Some(g.gpu()), None) } else { (None, Some(g.gpu())) };
                    norm::norm_backward(
                        gpu,
                        dx,
                        dw,
                        None,
                        dy().gpu(),
                        x(0).gpu(),
                        x(1).gpu(),
                        stats,
                        kind,
                        acc,
                    )?;
                }
                (Device::Cpu, Op::RmsNorm { shift, .. }) => {
                    let cols = graph.shapes[node.inputs[1].0][0];
                    let rows = shape.iter().product::<usize>() / cols;
                    let rstd = saved.expect("rmsnorm saves its statistics").cpu();
                    let (mut dx, mut dw) = (vec![0f32; rows * cols], vec![0f32; cols]);
                    kr::rmsnorm_backward(
                        &mut dx,
                        &mut dw,
                        dy().cpu(),
                        x(0).cpu(),
                        x(1).cpu(),
                        rstd,
                        rows,
                        cols,
                        *shift,
                    );
                    cpu_put(&mut g, if j == 0 { dx } else { dw }, acc);
                }
                (Device::Gpu(gpu), Op::Rope { b, t, heads, head_dim, theta }) => {
                    let table = rope::RopeTable::for_sequence(gpu, *t, *head_dim, *theta)?;
                    write_or_add(gpu, g.gpu(), acc, "rope gradient", |d| {
                        rope::rope_backward(gpu, d, dy().gpu(), &table, *b, *heads)
                    })?;
                }
                (Device::Cpu, Op::Rope { b, t, heads, head_dim, theta }) => {
                    let (cos, sin) = cpu_rope_table(*t, *head_dim, *theta);
                    let mut d = vec![0f32; in_shape.iter().product()];
                    kr::rope_backward(&mut d, dy().cpu(), &cos, &sin, *b, *t, *heads, *head_dim);
                    cpu_put(&mut g, d, acc);
                }
                (Device::Gpu(gpu), Op::Glu { silu }) => {
                    let act = if *silu { Act::Silu } else { Act::Gelu };
                    let (dgate, dup) = if j == 0 { (Some(g.gpu()), None) } else { (None, Some(g.gpu())) };
                    activation::glu_backward(gpu, dgate, dup, dy().gpu(), x(0).gpu(), x(1).gpu(), act, acc)?;
                }
                (Device::Cpu, Op::Glu { silu }) => {
                    let n = in_shape.iter().product();
                    let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
                    if *silu {
                        kr::swiglu_backward(&mut dg, &mut du, dy().cpu(), x(0).cpu(), x(1).cpu());
                    } else {
                        kr::geglu_backward(&mut dg, &mut du, dy().cpu(), x(0).cpu(), x(1).cpu());
                    }
                    cpu_put(&mut g, if j == 0 { dg } else { du }, acc);
                }
                (_, Op::Attention { .. }) => unreachable!("attention is handled by attention_backward"),
                (_, Op::LinearCrossEntropy { .. }) => {
                    unreachable!("the fused head + loss is handled by linear_cross_entropy_backward")
                }
                (Device::Gpu(gpu), Op::CrossEntropy { targets }) => {
                    let Fed::Gpu { targets: fed, .. } = &run.fed else { unreachable!() };
                    let state = saved.expect("cross-entropy saves its state").gpu();
                    write_or_add(gpu, g.gpu(), acc, "dlogits", |d| {
                        cross_entropy::cross_entropy_backward(
                            gpu,
                            d,
                            x(0).gpu(),
                            state,
                            &fed[*targets],
                            scale,
                        )
                    })?;
                }
                (Device::Cpu, Op::CrossEntropy { targets }) => {
                    let Fed::Cpu { targets: fed, .. } = &run.fed else { unreachable!() };
                    let (n, v) = (in_shape[0], in_shape[1]);
                    let mut d = vec![0f32; n * v];
                    kr::cross_entropy_backward(&mut d, x(0).cpu(), &fed[*targets], scale, n, v);
                    cpu_put(&mut g, d, acc);
                }
            }
        }
        put_grad(store, grads, target, g);
    }
    Ok(())
}

/// The backward of `Op::Attention`, which yields dq, dk and dv in one pass: inputs that need no
/// gradient get a scratch buffer.
fn attention_backward(
    run: &mut Run,
    store: &mut ParamStore,
    grads: &mut [Option<Value>],
    i: usize,
    dout: &Value,
    d: attention::AttnDims,
) -> Result<()> {
    let node = &run.graph.nodes[i];
    let dev = run.dev.clone();
    let mut outs = Vec::new();
    for &input in &node.inputs {
        outs.push(match take_grad(run, store, grads, input)? {
            Some(t) => (Some(t.0), t.1, t.2),
            None => (None, Value::empty(&dev, &run.graph.shapes[input.0], "unused gradient")?, false),
        });
    }
    let x = |k: usize| value(run, store, node.inputs[k]);
    let probs = run.saved[i].as_ref().expect("attention saves its probabilities or log-sum-exp");
    let flash = flash_on(run);
    // The kernels take one accumulate flag; where the three differ, add fresh results instead.
    let acc_all = outs.iter().all(|o| o.2);
    let acc_none = outs.iter().all(|o| !o.2);
    match &dev {
        Device::Gpu(gpu) => {
            let qd = |t| Heads::dense(t, d.h, d.d);
            let kvd = |t| Heads::dense(t, d.kv_h, d.d);
            let (xq, xk, xv) = (qd(x(0).gpu()), kvd(x(1).gpu()), kvd(x(2).gpu()));
            // Where the three flags agree the gradients go straight into their buffers;
            // otherwise into fresh ones that are then added or copied.
            let direct = acc_all || acc_none;
            let fresh: Vec<Tensor> = if direct {
                Vec::new()
            } else {
                (0..3)
                    .map(|k| Tensor::empty(gpu, &run.graph.shapes[node.inputs[k].0], "attention gradient"))
                    .collect::<Result<_>>()?
            };
            let target = |k: usize| if direct { outs[k].1.gpu() } else { &fresh[k] };
            let (dq, dk, dv) = (qd(target(0)), kvd(target(1)), kvd(target(2)));
            let (dout, saved) = (qd(dout.gpu()), probs.gpu());
            attention_backward_gpu(gpu, flash, [dq, dk, dv], dout, [xq, xk, xv], saved, d, acc_all)?;
            for (o, f) in outs.iter().zip(&fresh) {
                elementwise::axpby(gpu, o.1.gpu(), f, 1.0, if o.2 { 1.0 } else { 0.0 })?;
            }
        }
        Device::Cpu => {
            let (q, k, v) = (x(0).cpu(), x(1).cpu(), x(2).cpu());
            let (dq, dk, dv) = attention_backward_cpu(flash, dout.cpu(), [q, k, v], probs.cpu(), d);
            for (o, fresh) in outs.iter_mut().zip([dq, dk, dv]) {
                cpu_put(&mut o.1, fresh, o.2);
            }
        }
    }
    for (target, g, _) in outs {
        if let Some(t) = target {
            put_grad(store, grads, t, g);
        }
    }
    Ok(())
}

/// Whether this graph's attention is the flash variant (`GraphOptions::flash_attention`).
fn flash_on(run: &Run) -> bool {
    run.graph.options().flash_attention
}

/// Attention forward on the GPU; returns what the backward needs: the (B,H,T,T) probabilities
/// (composed kernel), or with `flash` only the (B,H,T) log-sum-exp.
fn attention_forward_gpu(
    g: &crate::gpu::Gpu,
    flash: bool,
    out: &Tensor,
    q: Heads,
    k: Heads,
    v: Heads,
    d: &attention::AttnDims,
) -> Result<Value> {
    let out = Heads::dense(out, d.h, d.d);
    if flash {
        let lse = Tensor::empty(g, &[d.b * d.h, d.t], "attention log-sum-exp")?;
        flash_attention::flash_attention_forward(g, out, &lse, q, k, v, *d)?;
        return Ok(Value::Gpu(lse));
    }
    let probs = Tensor::empty(g, &[d.b * d.h * d.t, d.t], "attention probabilities")?;
    attention::attention_forward(g, out, &probs, q, k, v, *d)?;
    Ok(Value::Gpu(probs))
}

/// [`attention_forward_gpu`] on the CPU reference path.
fn attention_forward_cpu(
    flash: bool,
    out: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: &attention::AttnDims,
) -> Value {
    if flash {
        let mut lse = vec![0f32; d.b * d.h * d.t];
        kr::attention_forward_lse(out, &mut lse, q, k, v, *d);
        return Value::Cpu(lse);
    }
    let mut probs = vec![0f32; d.b * d.h * d.t * d.t];
    kr::attention_forward(out, &mut probs, q, k, v, *d);
    Value::Cpu(probs)
}

/// Attention backward on the GPU from what [`attention_forward_gpu`] saved.
#[allow(clippy::too_many_arguments)]
fn attention_backward_gpu(
    gpu: &crate::gpu::Gpu,
    flash: bool,
    [dq, dk, dv]: [Heads; 3],
    dout: Heads,
    [q, k, v]: [Heads; 3],
    saved: &Tensor,
    d: attention::AttnDims,
    acc: bool,
) -> Result<()> {
    if flash {
        flash_attention::flash_attention_backward(gpu, dq, dk, dv, dout, q, k, v, saved, d, acc)
    } else {
        attention::attention_backward(gpu, dq, dk, dv, dout, q, k, v, saved, d, acc)
    }
}

/// Attention backward on the CPU reference path: fresh (dq, dk, dv).
fn attention_backward_cpu(
    flash: bool,
    dout: &[f32],
    [q, k, v]: [&[f32]; 3],
    saved: &[f32],
    d: attention::AttnDims,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (mut dq, mut dk, mut dv) = (vec![0f32; q.len()], vec![0f32; k.len()], vec![0f32; v.len()]);
    if flash {
        kr::attention_backward_lse(&mut dq, &mut dk, &mut dv, dout, q, k, v, saved, d);
    } else {
        kr::attention_backward(&mut dq, &mut dk, &mut dv, dout, q, k, v, saved, d);
    }
    (dq, dk, dv)
}

/// The LM head's weight of `Op::LinearCrossEntropy` for the GPU kernels.
fn head_weight(w: &Value, trans_w: bool) -> Result<HeadWeight<'_>> {
    Ok(match w {
        Value::Packed(q) => {
            packed_layout(trans_w)?;
            HeadWeight::Packed(q)
        }
        // a streamed head: the walk uploads each vocabulary chunk's rows (`stream::Residency::by_rows`)
        Value::Streamed(s) => {
            packed_layout(trans_w)?;
            HeadWeight::Rows(s.as_ref())
        }
        w => HeadWeight::F32 { w: w.gpu(), trans_w },
    })
}

/// Sizes of `Op::LinearCrossEntropy` for the reference functions.
fn head_dims(x: &[usize], w: &[usize], trans_w: bool, softcap: Option<f32>) -> kr::HeadDims {
    let v = if trans_w { w[0] } else { w[1] };
    kr::HeadDims { n: x[0], c: x[1], v, trans_w, softcap }
}

/// The backward of `Op::LinearCrossEntropy` (the loss node): dx and, when W trains, dW in one
/// walk over the vocabulary, which recomputes each chunk of the logits once for both.
fn linear_cross_entropy_backward(
    run: &mut Run,
    store: &mut ParamStore,
    grads: &mut [Option<Value>],
    i: usize,
    targets: usize,
    (trans_w, softcap): (bool, Option<f32>),
    scale: f32,
) -> Result<()> {
    let node = &run.graph.nodes[i];
    let dev = run.dev.clone();
    let mut dx = take_grad(run, store, grads, node.inputs[0])?;
    let mut dw = take_grad(run, store, grads, node.inputs[1])?;
    let x = |k: usize| value(run, store, node.inputs[k]);
    match (&dev, &run.fed) {
        (Device::Gpu(gpu), Fed::Gpu { targets: fed, .. }) => {
            let state = run.saved[i].as_ref().expect("the fused loss saves its state").gpu();
            lm_head_loss::lm_head_loss_backward(
                gpu,
                dx.as_ref().map(|(_, g, acc)| (g.gpu(), *acc)),
                dw.as_ref().map(|(_, g, acc)| (g.gpu(), *acc)),
                x(0).gpu(),
                head_weight(x(1), trans_w)?,
                state,
                &fed[targets],
                softcap,
                scale,
            )?;
        }
        (Device::Cpu, Fed::Cpu { targets: fed, .. }) => {
            let shape = |k: usize| &run.graph.shapes[node.inputs[k].0];
            let d = head_dims(shape(0), shape(1), trans_w, softcap);
            let mut fdx = dx.as_ref().map(|_| vec![0f32; d.n * d.c]);
            let mut fdw = dw.as_ref().map(|_| vec![0f32; d.v * d.c]);
            let (x0, w) = (x(0).cpu(), x(1).cpu());
            let (dx0, dw0) = (fdx.as_deref_mut(), fdw.as_deref_mut());
            kr::linear_cross_entropy_backward(dx0, dw0, x0, w, &fed[targets], scale, d);
            for (out, fresh) in [(&mut dx, fdx), (&mut dw, fdw)] {
                if let (Some((_, g, acc)), Some(fresh)) = (out.as_mut(), fresh) {
                    cpu_put(g, fresh, *acc);
                }
            }
        }
        _ => return Err(wrong_feed()),
    }
    for (target, g, _) in [dx, dw].into_iter().flatten() {
        put_grad(store, grads, target, g);
    }
    Ok(())
}

fn wrong_feed() -> Error {
    Error::Internal { context: "graph".into(), message: "the feed was uploaded for another device".into() }
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
