//! `Op::AttentionPacked` (one input of packed [q | k | v] rows, GPT-2) and `Op::Attention`
//! (q, k, v as three inputs; grouped-query heads, sliding window and soft cap as `AttnDims`
//! says): causal self-attention. What the forward saves depends on the backend: the composed GPU
//! kernel and the reference keep the (B,H,T,T) probabilities, the flash variants
//! (`--flash-attention`) only the (B,H,T) log-sum-exp; the fast CPU path always keeps the
//! log-sum-exp and recomputes the probabilities one head at a time.

use super::{wanted, Bwd, CpuPath, Device, Fwd, Grads, Value};
use crate::cpu::attention::Rows;
use crate::error::Result;
use crate::gpu::Tensor;
use crate::kernels::attention::{self, AttnDims, Heads};
use crate::kernels::{elementwise, flash_attention};
use kernels_ref as kr;

/// Widths of a packed [q | k | v] row: (q part, k or v part).
fn widths(d: &AttnDims) -> (usize, usize) {
    (d.h * d.d, d.kv_h * d.d)
}

/// The three inputs as GPU head views.
fn gpu_heads<'t>(cx: &Fwd<'t>, d: &AttnDims, packed: bool) -> [Heads<'t>; 3] {
    if packed {
        return packed_gpu(cx.x(0).gpu(), d);
    }
    [
        Heads::dense(cx.x(0).gpu(), d.h, d.d),
        Heads::dense(cx.x(1).gpu(), d.kv_h, d.d),
        Heads::dense(cx.x(2).gpu(), d.kv_h, d.d),
    ]
}

fn packed_gpu<'t>(qkv: &'t Tensor, d: &AttnDims) -> [Heads<'t>; 3] {
    let (qw, kw) = widths(d);
    let width = qw + 2 * kw;
    [Heads::packed(qkv, 0, width), Heads::packed(qkv, qw, width), Heads::packed(qkv, qw + kw, width)]
}

/// The three inputs as host row views (the fast path reads packed rows in place).
fn cpu_rows<'t>(cx: &Fwd<'t>, d: &AttnDims, packed: bool) -> [Rows<'t>; 3] {
    let (qw, kw) = widths(d);
    if packed {
        let data = cx.x(0).cpu();
        let width = qw + 2 * kw;
        return [
            Rows { data, width, offset: 0 },
            Rows { data, width, offset: qw },
            Rows { data, width, offset: qw + kw },
        ];
    }
    [
        Rows { data: cx.x(0).cpu(), width: qw, offset: 0 },
        Rows { data: cx.x(1).cpu(), width: kw, offset: 0 },
        Rows { data: cx.x(2).cpu(), width: kw, offset: 0 },
    ]
}

/// Dense q, k and v for the reference functions (copies out of packed rows).
fn dense([q, k, v]: [Rows; 3], d: &AttnDims) -> [Vec<f32>; 3] {
    let (qw, kw) = widths(d);
    [q.dense(qw), k.dense(kw), v.dense(kw)]
}

pub(super) fn forward(cx: &Fwd, out: &mut Value, d: AttnDims, packed: bool) -> Result<Option<Value>> {
    Ok(Some(match cx.dev {
        Device::Gpu(g) => {
            let [q, k, v] = gpu_heads(cx, &d, packed);
            let out = Heads::dense(out.gpu(), d.h, d.d);
            if cx.flash {
                let lse = Tensor::empty(g, &[d.b * d.h, d.t], "attention log-sum-exp")?;
                flash_attention::flash_attention_forward(g, out, &lse, q, k, v, d)?;
                Value::Gpu(lse)
            } else {
                let probs = Tensor::empty(g, &[d.b * d.h * d.t, d.t], "attention probabilities")?;
                attention::attention_forward(g, out, &probs, q, k, v, d)?;
                Value::Gpu(probs)
            }
        }
        Device::Cpu(CpuPath::Reference) => {
            let [q, k, v] = dense(cpu_rows(cx, &d, packed), &d);
            if cx.flash {
                let mut lse = vec![0f32; d.b * d.h * d.t];
                kr::attention_forward_lse(out.cpu_mut(), &mut lse, &q, &k, &v, d);
                Value::Cpu(lse)
            } else {
                let mut probs = vec![0f32; d.b * d.h * d.t * d.t];
                kr::attention_forward(out.cpu_mut(), &mut probs, &q, &k, &v, d);
                Value::Cpu(probs)
            }
        }
        Device::Cpu(CpuPath::Fast) => {
            let [q, k, v] = cpu_rows(cx, &d, packed);
            let mut lse = vec![0f32; d.b * d.h * d.t];
            crate::cpu::attention::forward(out.cpu_mut(), &mut lse, q, k, v, d);
            Value::Cpu(lse)
        }
    }))
}

pub(super) fn backward(cx: &Bwd, grads: &mut Grads, d: AttnDims, packed: bool) -> Result<()> {
    let saved = cx.saved("attention's probabilities or log-sum-exp");
    match cx.f.dev {
        Device::Gpu(gpu) if packed => {
            let Some(g) = grads[0].as_mut() else { return Ok(()) };
            let [dq, dk, dv] = packed_gpu(g.value.gpu(), &d);
            let dout = Heads::dense(cx.dy().gpu(), d.h, d.d);
            gpu_backward(
                gpu,
                cx.f.flash,
                [dq, dk, dv],
                dout,
                gpu_heads(&cx.f, &d, true),
                saved.gpu(),
                d,
                g.acc,
            )
        }
        Device::Gpu(gpu) => gpu_backward_three(cx, gpu, grads, d, saved.gpu()),
        Device::Cpu(path) => {
            let rows = cpu_rows(&cx.f, &d, packed);
            let dout = cx.dy().cpu();
            let [dq, dk, dv] = match path {
                CpuPath::Fast => crate::cpu::attention::backward(dout, rows, saved.cpu(), d),
                CpuPath::Reference => {
                    let [q, k, v] = dense(rows, &d);
                    let (mut dq, mut dk, mut dv) =
                        (vec![0f32; q.len()], vec![0f32; k.len()], vec![0f32; v.len()]);
                    let (q, k, v, s) = (&q[..], &k[..], &v[..], saved.cpu());
                    if cx.f.flash {
                        kr::attention_backward_lse(&mut dq, &mut dk, &mut dv, dout, q, k, v, s, d);
                    } else {
                        kr::attention_backward(&mut dq, &mut dk, &mut dv, dout, q, k, v, s, d);
                    }
                    [dq, dk, dv]
                }
            };
            if packed {
                if let Some(g) = grads[0].as_mut() {
                    g.put_cpu(pack(&dq, &dk, &dv, &d));
                }
            } else {
                let mut fresh = [Some(dq), Some(dk), Some(dv)];
                for (j, g) in wanted(grads) {
                    g.put_cpu(fresh[j].take().expect("one gradient per input"));
                }
            }
            Ok(())
        }
    }
}

/// Dense dq, dk, dv as packed [dq | dk | dv] rows.
fn pack(dq: &[f32], dk: &[f32], dv: &[f32], d: &AttnDims) -> Vec<f32> {
    let (qw, kw) = widths(d);
    let mut out = Vec::with_capacity(dq.len() + dk.len() + dv.len());
    for r in 0..d.b * d.t {
        out.extend_from_slice(&dq[r * qw..(r + 1) * qw]);
        out.extend_from_slice(&dk[r * kw..(r + 1) * kw]);
        out.extend_from_slice(&dv[r * kw..(r + 1) * kw]);
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn gpu_backward(
    gpu: &crate::gpu::Gpu,
    flash: bool,
    [dq, dk, dv]: [Heads; 3],
    dout: Heads,
    [q, k, v]: [Heads; 3],
    saved: &Tensor,
    d: AttnDims,
    acc: bool,
) -> Result<()> {
    if flash {
        flash_attention::flash_attention_backward(gpu, dq, dk, dv, dout, q, k, v, saved, d, acc)
    } else {
        attention::attention_backward(gpu, dq, dk, dv, dout, q, k, v, saved, d, acc)
    }
}

/// The GPU backward of `Op::Attention`, which yields dq, dk and dv in one pass: inputs that need
/// no gradient get a scratch buffer. The kernels take one accumulate flag; where the three
/// differ, the gradients go to fresh buffers that are then added or copied.
fn gpu_backward_three(
    cx: &Bwd,
    gpu: &crate::gpu::Gpu,
    grads: &mut Grads,
    d: AttnDims,
    saved: &Tensor,
) -> Result<()> {
    let mut scratch = Vec::new();
    for (j, g) in grads.iter().enumerate() {
        if g.is_none() {
            scratch.push(Some(Tensor::empty(gpu, cx.f.in_shape(j), "unused gradient")?));
        } else {
            scratch.push(None);
        }
    }
    let acc: Vec<bool> = grads.iter().map(|g| g.as_ref().is_some_and(|g| g.acc)).collect();
    let (acc_all, acc_none) = (acc.iter().all(|&a| a), acc.iter().all(|&a| !a));
    let direct = acc_all || acc_none;
    let fresh: Vec<Tensor> = if direct {
        Vec::new()
    } else {
        (0..3).map(|k| Tensor::empty(gpu, cx.f.in_shape(k), "attention gradient")).collect::<Result<_>>()?
    };
    let target = |k: usize| -> &Tensor {
        if !direct {
            return &fresh[k];
        }
        match (&grads[k], &scratch[k]) {
            (Some(g), _) => g.value.gpu(),
            (None, Some(s)) => s,
            (None, None) => unreachable!("a scratch buffer for every input without a gradient"),
        }
    };
    let qd = |t| Heads::dense(t, d.h, d.d);
    let kvd = |t| Heads::dense(t, d.kv_h, d.d);
    let (dq, dk, dv) = (qd(target(0)), kvd(target(1)), kvd(target(2)));
    let inputs = gpu_heads(&cx.f, &d, false);
    gpu_backward(gpu, cx.f.flash, [dq, dk, dv], qd(cx.dy().gpu()), inputs, saved, d, acc_all)?;
    for (g, f) in grads.iter().zip(&fresh) {
        if let Some(g) = g {
            elementwise::axpby(gpu, g.value.gpu(), f, 1.0, g.beta())?;
        }
    }
    Ok(())
}
