//! The losses, scalar nodes whose backward starts the backward pass (`Bwd::scale` is the
//! output gradient): `Op::CrossEntropy` over materialised logits, and `Op::LinearCrossEntropy`,
//! the LM head fused with the loss (`--fused-loss`), whose vocabulary is walked in chunks so the
//! (rows x vocabulary) logits never exist whole. Mean over counted rows; 0/0 gives NaN when
//! every row is ignored, as in PyTorch.

use super::{Bwd, CpuPath, Device, Fwd, Grads, Value};
use crate::error::Result;
use crate::gpu::Tensor;
use crate::kernels::lm_head_loss::{self, HeadWeight};
use crate::kernels::{cross_entropy, elementwise, reduce};
use kernels_ref as kr;

pub(super) fn cross_entropy_forward(cx: &Fwd, out: &mut Value, targets: usize) -> Result<Option<Value>> {
    let (n, v) = (cx.in_shape(0)[0], cx.in_shape(0)[1]);
    match cx.dev {
        Device::Gpu(g) => {
            let fed = cx.fed.gpu_targets(targets);
            let losses = Tensor::empty(g, &[n], "losses")?;
            let state = Tensor::empty(g, &[n, 4], "cross-entropy state")?;
            cross_entropy::cross_entropy_forward(g, &losses, &state, cx.x(0).gpu(), fed)?;
            // Filled by a dispatch, not uploaded: a host write would end the step's submission.
            let sum = Tensor::empty(g, &[1], "loss sum")?;
            elementwise::fill(g, &sum, 0.0)?;
            reduce::sum_into(g, &sum, 0, &losses, false)?;
            elementwise::axpby(g, out.gpu(), &sum, 1.0 / fed.count() as f32, 0.0)?;
            Ok(Some(Value::Gpu(state)))
        }
        Device::Cpu(CpuPath::Fast) => {
            let mut lse = vec![0f32; n];
            let fed = cx.fed.cpu_targets(targets);
            out.cpu_mut()[0] =
                crate::cpu::elementwise::cross_entropy_forward(&mut lse, cx.x(0).cpu(), fed, v);
            Ok(Some(Value::Cpu(lse)))
        }
        Device::Cpu(CpuPath::Reference) => {
            let mut losses = vec![0f32; n];
            let fed = cx.fed.cpu_targets(targets);
            out.cpu_mut()[0] = kr::cross_entropy_forward(&mut losses, cx.x(0).cpu(), fed, n, v);
            Ok(None)
        }
    }
}

pub(super) fn cross_entropy_backward(cx: &Bwd, grads: &mut Grads, targets: usize) -> Result<()> {
    let Some(g) = grads[0].as_mut() else { return Ok(()) };
    let logits = cx.f.x(0);
    match cx.f.dev {
        Device::Gpu(gpu) => {
            let state = cx.saved("cross-entropy's state").gpu();
            let fed = cx.f.fed.gpu_targets(targets);
            super::write_or_add(gpu, g, "dlogits", |d| {
                cross_entropy::cross_entropy_backward(gpu, d, logits.gpu(), state, fed, cx.scale)
            })?;
        }
        Device::Cpu(CpuPath::Fast) => {
            let lse = cx.saved("cross-entropy's log-sum-exp").cpu();
            let fed = cx.f.fed.cpu_targets(targets);
            let d = g.value.cpu_mut();
            crate::cpu::elementwise::cross_entropy_backward(d, logits.cpu(), lse, fed, cx.scale, g.acc);
        }
        Device::Cpu(CpuPath::Reference) => {
            let (n, v) = (cx.f.in_shape(0)[0], cx.f.in_shape(0)[1]);
            let mut d = vec![0f32; n * v];
            kr::cross_entropy_backward(&mut d, logits.cpu(), cx.f.fed.cpu_targets(targets), cx.scale, n, v);
            g.put_cpu(d);
        }
    }
    Ok(())
}

/// The LM head's weight for the GPU kernels.
fn head_weight(w: &Value, trans_w: bool) -> Result<HeadWeight<'_>> {
    Ok(match w {
        Value::Packed(q) => {
            super::packed_layout(trans_w)?;
            HeadWeight::Packed(q)
        }
        // a streamed head: the walk uploads each vocabulary chunk's rows (`stream::Residency::by_rows`)
        Value::Streamed(s) => {
            super::packed_layout(trans_w)?;
            HeadWeight::Rows(s.as_ref())
        }
        w => HeadWeight::F32 { w: w.gpu(), trans_w },
    })
}

/// Sizes of the fused head + loss for the CPU functions.
fn head_dims(cx: &Fwd, trans_w: bool, softcap: Option<f32>) -> kr::HeadDims {
    let (x, w) = (cx.in_shape(0), cx.in_shape(1));
    let v = if trans_w { w[0] } else { w[1] };
    kr::HeadDims { n: x[0], c: x[1], v, trans_w, softcap }
}

pub(super) fn head_loss_forward(
    cx: &Fwd,
    out: &mut Value,
    targets: usize,
    trans_w: bool,
    softcap: Option<f32>,
) -> Result<Option<Value>> {
    let n = cx.in_shape(0)[0];
    Ok(match cx.dev {
        Device::Gpu(g) => {
            let state = Tensor::empty(g, &[n, 4], "cross-entropy state")?;
            let w = head_weight(cx.x(1), trans_w)?;
            let fed = cx.fed.gpu_targets(targets);
            lm_head_loss::lm_head_loss_forward(g, out.gpu(), &state, cx.x(0).gpu(), w, fed, softcap)?;
            Some(Value::Gpu(state))
        }
        Device::Cpu(CpuPath::Reference) => {
            let mut losses = vec![0f32; n];
            let (x, w, fed) = (cx.x(0).cpu(), cx.x(1).cpu(), cx.fed.cpu_targets(targets));
            out.cpu_mut()[0] =
                kr::linear_cross_entropy_forward(&mut losses, x, w, fed, head_dims(cx, trans_w, softcap));
            None
        }
        Device::Cpu(CpuPath::Fast) => {
            let (x, w, fed) = (cx.x(0).cpu(), cx.x(1).cpu(), cx.fed.cpu_targets(targets));
            let mut lse = vec![0f32; n];
            out.cpu_mut()[0] =
                crate::cpu::head_loss::forward(&mut lse, x, w, fed, head_dims(cx, trans_w, softcap));
            Some(Value::Cpu(lse))
        }
    })
}

/// dx and, when W trains, dW in one walk over the vocabulary, which recomputes each chunk of
/// the logits once for both.
pub(super) fn head_loss_backward(
    cx: &Bwd,
    grads: &mut Grads,
    targets: usize,
    trans_w: bool,
    softcap: Option<f32>,
) -> Result<()> {
    let (x, w) = (cx.f.x(0), cx.f.x(1));
    let (dx, dw) = match grads {
        [dx, dw] => (dx.as_mut(), dw.as_mut()),
        _ => unreachable!("the fused loss has two inputs"),
    };
    match cx.f.dev {
        Device::Gpu(gpu) => {
            lm_head_loss::lm_head_loss_backward(
                gpu,
                dx.map(|g| (g.value.gpu(), g.acc)),
                dw.map(|g| (g.value.gpu(), g.acc)),
                x.gpu(),
                head_weight(w, trans_w)?,
                cx.saved("the fused loss's state").gpu(),
                cx.f.fed.gpu_targets(targets),
                softcap,
                cx.scale,
            )?;
        }
        Device::Cpu(CpuPath::Reference) => {
            let d = head_dims(&cx.f, trans_w, softcap);
            let mut fdx = dx.as_ref().map(|_| vec![0f32; d.n * d.c]);
            let mut fdw = dw.as_ref().map(|_| vec![0f32; d.v * d.c]);
            let fed = cx.f.fed.cpu_targets(targets);
            kr::linear_cross_entropy_backward(
                fdx.as_deref_mut(),
                fdw.as_deref_mut(),
                x.cpu(),
                w.cpu(),
                fed,
                cx.scale,
                d,
            );
            for (g, fresh) in [(dx, fdx), (dw, fdw)] {
                if let (Some(g), Some(fresh)) = (g, fresh) {
                    g.put_cpu(fresh);
                }
            }
        }
        Device::Cpu(CpuPath::Fast) => {
            let d = head_dims(&cx.f, trans_w, softcap);
            let lse = cx.saved("the fused loss's log-sum-exp").cpu();
            let fed = cx.f.fed.cpu_targets(targets);
            let dx = dx.map(|g| (g.value.cpu_mut().as_mut_slice(), g.acc));
            let dw = dw.map(|g| (g.value.cpu_mut().as_mut_slice(), g.acc));
            crate::cpu::head_loss::backward(dx, dw, x.cpu(), w.cpu(), lse, fed, cx.scale, d);
        }
    }
    Ok(())
}
