//! `Op::Linear`: `x W (+ bias)`, W stored (in, out), or (out, in) when `trans_w` (a Hugging Face
//! Linear, a tied LM head). Backward: `dx = dy W^T`, `dW = x^T dy` (in W's layout),
//! `dbias = Σ_rows dy`. A packed (frozen, quantized or half) weight is read in its stored format
//! on the GPU and never gets a gradient.

use super::{packed_layout, wanted, Bwd, CpuPath, Device, Fwd, Grads, Value};
use crate::error::{Error, Result};
use crate::kernels::{matmul, quant, reduce};
use kernels_ref as kr;

/// `x (m, k) W -> (m, n)` as the matrix-product functions see it.
fn dims(x: &[usize], out: &[usize], trans_w: bool) -> kr::MatmulDims {
    kr::MatmulDims { batch: 1, m: x[0], n: out[1], k: x[1], trans_a: false, trans_b: trans_w }
}

pub(super) fn forward(cx: &Fwd, out: &mut Value, trans_w: bool) -> Result<Option<Value>> {
    let d = dims(cx.in_shape(0), cx.shape, trans_w);
    match cx.dev {
        Device::Gpu(g) => {
            let bias = cx.x_opt(2).map(Value::gpu);
            // the forward product in the device's precision (f16 products under `mixed`)
            matmul::with_precision(g.precision(), || match cx.x(1) {
                Value::Packed(w) => {
                    packed_layout(trans_w)?;
                    quant::qmatmul(g, out.gpu(), cx.x(0).gpu(), w, bias, false)
                }
                w => matmul::matmul(g, out.gpu(), cx.x(0).gpu(), w.gpu(), bias, false, trans_w, false),
            })?
        }
        Device::Cpu(CpuPath::Reference) => {
            let bias = cx.x_opt(2).map(Value::cpu);
            kr::matmul_forward(out.cpu_mut(), cx.x(0).cpu(), cx.x(1).cpu(), bias, d);
        }
        Device::Cpu(CpuPath::Fast) => {
            let out = out.cpu_mut();
            crate::cpu::matmul(out, cx.x(0).cpu(), cx.x(1).cpu(), d, false);
            if let Some(bias) = cx.x_opt(2) {
                crate::cpu::add_rows(out, bias.cpu());
            }
        }
    }
    Ok(None)
}

pub(super) fn backward(cx: &Bwd, grads: &mut Grads, trans_w: bool) -> Result<()> {
    let (x, w, dy) = (cx.f.x(0), cx.f.x(1), cx.dy());
    let d = dims(cx.f.in_shape(0), cx.f.shape, trans_w);
    for (j, g) in wanted(grads) {
        match (cx.f.dev, w) {
            (Device::Gpu(gpu), Value::Packed(w)) => {
                packed_layout(trans_w)?;
                match j {
                    0 => quant::qmatmul_dx(gpu, g.value.gpu(), dy.gpu(), w, g.acc)?,
                    2 => reduce::sum_rows(gpu, g.value.gpu(), dy.gpu(), g.acc)?,
                    _ => {
                        return Err(Error::Internal {
                            context: "linear backward".into(),
                            message: "a packed (frozen) weight was asked for a gradient".into(),
                        })
                    }
                }
            }
            (Device::Gpu(gpu), w) => {
                let t = Some(g.value.gpu());
                let (da, dw, db) = match j {
                    0 => (t, None, None),
                    1 => (None, t, None),
                    _ => (None, None, t),
                };
                matmul::matmul_backward(gpu, da, dw, db, dy.gpu(), x.gpu(), w.gpu(), false, trans_w, g.acc)?;
            }
            (Device::Cpu(CpuPath::Fast), w) => {
                let (x, w, dy, acc) = (x.cpu(), w.cpu(), dy.cpu(), g.acc);
                let out = g.value.cpu_mut();
                let (m, n, k) = (d.m, d.n, d.k);
                let mm = |m, n, k, trans_a, trans_b| kr::MatmulDims { batch: 1, m, n, k, trans_a, trans_b };
                match j {
                    // dx (m, k) = dy (m, n) W^T
                    0 => crate::cpu::matmul(out, dy, w, mm(m, k, n, false, !trans_w), acc),
                    // dW (k, n) = x^T dy, or (n, k) = dy^T x when stored transposed
                    1 if trans_w => crate::cpu::matmul(out, dy, x, mm(n, k, m, true, false), acc),
                    1 => crate::cpu::matmul(out, x, dy, mm(k, n, m, true, false), acc),
                    _ => crate::cpu::sum_rows(out, dy, acc),
                }
            }
            (Device::Cpu(CpuPath::Reference), w) => {
                let mut fresh = vec![0f32; cx.f.in_shape(j).iter().product()];
                let (x, w, dy) = (x.cpu(), w.cpu(), dy.cpu());
                match j {
                    0 => kr::matmul_backward(Some(&mut fresh), None, None, dy, x, w, d),
                    1 => kr::matmul_backward(None, Some(&mut fresh), None, dy, x, w, d),
                    _ => kr::matmul_backward(None, None, Some(&mut fresh), dy, x, w, d),
                }
                g.put_cpu(fresh);
            }
        }
    }
    Ok(())
}
