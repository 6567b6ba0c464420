//! `Op::Act` (tanh GELU, SiLU, soft-capping) and `Op::Glu` (act(gate) * up: SwiGLU or GeGLU).
//! The soft cap's backward reads its output (1 - (y / c)^2), so its often vocabulary-wide input
//! can be freed; the others read their inputs. The fast CPU path computes GELU and SiLU (and
//! their gated forms) in f32 itself and shares the reference's soft cap.

use super::{wanted, Bwd, CpuPath, Device, Fwd, Grads, Value};
use crate::cpu::elementwise::{self as fast, Unary};
use crate::error::Result;
use crate::kernels::activation::{self, Act};
use kernels_ref as kr;

pub(super) fn act_forward(cx: &Fwd, out: &mut Value, act: Act) -> Result<Option<Value>> {
    match cx.dev {
        Device::Gpu(g) => activation::act_forward(g, out.gpu(), cx.x(0).gpu(), act)?,
        Device::Cpu(CpuPath::Fast) if fast_act(act).is_some() => {
            fast::act_forward(out.cpu_mut(), cx.x(0).cpu(), fast_act(act).expect("checked"))
        }
        Device::Cpu(_) => match act {
            Act::Gelu => kr::gelu_forward(out.cpu_mut(), cx.x(0).cpu()),
            Act::Silu => kr::silu_forward(out.cpu_mut(), cx.x(0).cpu()),
            Act::Softcap(c) => kr::softcap_forward(out.cpu_mut(), cx.x(0).cpu(), c),
        },
    }
    Ok(None)
}

pub(super) fn act_backward(cx: &Bwd, grads: &mut Grads, act: Act) -> Result<()> {
    for (_, g) in wanted(grads) {
        match (cx.f.dev, act) {
            (Device::Gpu(gpu), Act::Softcap(c)) => {
                let (y, dy) = (cx.output().gpu(), cx.dy().gpu());
                activation::softcap_backward_from_output(gpu, g.value.gpu(), y, dy, c, g.acc)?
            }
            (Device::Gpu(gpu), act) => {
                activation::act_backward(gpu, g.value.gpu(), cx.f.x(0).gpu(), cx.dy().gpu(), act, g.acc)?
            }
            (Device::Cpu(CpuPath::Fast), Act::Gelu | Act::Silu) => {
                let act = fast_act(act).expect("GELU and SiLU");
                fast::act_backward(g.value.cpu_mut(), cx.f.x(0).cpu(), cx.dy().cpu(), act, g.acc)
            }
            (Device::Cpu(_), act) => {
                let mut d = vec![0f32; cx.dy().cpu().len()];
                match act {
                    Act::Gelu => kr::gelu_backward(&mut d, cx.f.x(0).cpu(), cx.dy().cpu()),
                    Act::Silu => kr::silu_backward(&mut d, cx.f.x(0).cpu(), cx.dy().cpu()),
                    Act::Softcap(c) => {
                        kr::softcap_backward_from_output(&mut d, cx.output().cpu(), cx.dy().cpu(), c)
                    }
                }
                g.put_cpu(d);
            }
        }
    }
    Ok(())
}

pub(super) fn glu_forward(cx: &Fwd, out: &mut Value, silu: bool) -> Result<Option<Value>> {
    match cx.dev {
        Device::Gpu(g) => {
            let act = if silu { Act::Silu } else { Act::Gelu };
            activation::glu_forward(g, out.gpu(), cx.x(0).gpu(), cx.x(1).gpu(), act)?;
        }
        Device::Cpu(CpuPath::Fast) => fast::glu_forward(
            out.cpu_mut(),
            cx.x(0).cpu(),
            cx.x(1).cpu(),
            if silu { Unary::Silu } else { Unary::Gelu },
        ),
        Device::Cpu(_) if silu => kr::swiglu_forward(out.cpu_mut(), cx.x(0).cpu(), cx.x(1).cpu()),
        Device::Cpu(_) => kr::geglu_forward(out.cpu_mut(), cx.x(0).cpu(), cx.x(1).cpu()),
    }
    Ok(None)
}

pub(super) fn glu_backward(cx: &Bwd, grads: &mut Grads, silu: bool) -> Result<()> {
    match cx.f.dev {
        Device::Gpu(gpu) => {
            let act = if silu { Act::Silu } else { Act::Gelu };
            let (gate, up) = (cx.f.x(0).gpu(), cx.f.x(1).gpu());
            for (j, g) in wanted(grads) {
                let (dgate, dup) =
                    if j == 0 { (Some(g.value.gpu()), None) } else { (None, Some(g.value.gpu())) };
                activation::glu_backward(gpu, dgate, dup, cx.dy().gpu(), gate, up, act, g.acc)?;
            }
        }
        Device::Cpu(CpuPath::Fast) => {
            let act = if silu { Unary::Silu } else { Unary::Gelu };
            let (dgate, dup) = match grads {
                [a, b] => (a.as_mut(), b.as_mut()),
                _ => unreachable!("a gated unit has two inputs"),
            };
            let dgate = dgate.map(|g| (g.value.cpu_mut().as_mut_slice(), g.acc));
            let dup = dup.map(|g| (g.value.cpu_mut().as_mut_slice(), g.acc));
            fast::glu_backward(dgate, dup, cx.dy().cpu(), cx.f.x(0).cpu(), cx.f.x(1).cpu(), act);
        }
        Device::Cpu(CpuPath::Reference) => {
            let n = cx.dy().cpu().len();
            let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
            let (dy, gate, up) = (cx.dy().cpu(), cx.f.x(0).cpu(), cx.f.x(1).cpu());
            if silu {
                kr::swiglu_backward(&mut dg, &mut du, dy, gate, up);
            } else {
                kr::geglu_backward(&mut dg, &mut du, dy, gate, up);
            }
            let mut fresh = [Some(dg), Some(du)];
            for (j, g) in wanted(grads) {
                g.put_cpu(fresh[j].take().expect("one gradient per input"));
            }
        }
    }
    Ok(())
}

/// The activations the fast CPU path computes itself (the soft cap is the reference's).
fn fast_act(act: Act) -> Option<Unary> {
    match act {
        Act::Gelu => Some(Unary::Gelu),
        Act::Silu => Some(Unary::Silu),
        Act::Softcap(_) => None,
    }
}
