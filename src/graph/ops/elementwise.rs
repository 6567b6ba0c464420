//! The elementwise ops: `Op::Add` (a + b), `Op::Scale` (alpha x) and `Op::Dropout` (inverted
//! dropout whose mask is hashed from the feed's seed and the node's salt; identity without a
//! seed). Their backward passes are the same maps applied to the output gradient; the fast CPU
//! path writes or adds them in place.

use super::{wanted, Bwd, CpuPath, Device, Fwd, Grads, Value};
use crate::cpu::elementwise as fast;
use crate::error::Result;
use crate::kernels::elementwise;
use kernels_ref as kr;

pub(super) fn add_forward(cx: &Fwd, out: &mut Value) -> Result<Option<Value>> {
    match cx.dev {
        Device::Gpu(g) => elementwise::add(g, out.gpu(), cx.x(0).gpu(), cx.x(1).gpu(), 1.0, 1.0)?,
        Device::Cpu(CpuPath::Reference) => kr::add(out.cpu_mut(), cx.x(0).cpu(), cx.x(1).cpu()),
        Device::Cpu(CpuPath::Fast) => fast::add(out.cpu_mut(), cx.x(0).cpu(), cx.x(1).cpu()),
    }
    Ok(None)
}

pub(super) fn add_backward(cx: &Bwd, grads: &mut Grads) -> Result<()> {
    for (_, g) in wanted(grads) {
        match cx.f.dev {
            Device::Gpu(gpu) => elementwise::axpby(gpu, g.value.gpu(), cx.dy().gpu(), 1.0, g.beta())?,
            Device::Cpu(CpuPath::Reference) => g.put_cpu(cx.dy().cpu().to_vec()),
            Device::Cpu(CpuPath::Fast) => fast::scale(g.value.cpu_mut(), cx.dy().cpu(), 1.0, g.acc),
        }
    }
    Ok(())
}

pub(super) fn scale_forward(cx: &Fwd, out: &mut Value, alpha: f32) -> Result<Option<Value>> {
    match cx.dev {
        Device::Gpu(g) => elementwise::axpby(g, out.gpu(), cx.x(0).gpu(), alpha, 0.0)?,
        Device::Cpu(CpuPath::Reference) => kr::scale(out.cpu_mut(), cx.x(0).cpu(), alpha),
        Device::Cpu(CpuPath::Fast) => fast::scale(out.cpu_mut(), cx.x(0).cpu(), alpha, false),
    }
    Ok(None)
}

pub(super) fn scale_backward(cx: &Bwd, grads: &mut Grads, alpha: f32) -> Result<()> {
    for (_, g) in wanted(grads) {
        match cx.f.dev {
            Device::Gpu(gpu) => elementwise::axpby(gpu, g.value.gpu(), cx.dy().gpu(), alpha, g.beta())?,
            Device::Cpu(CpuPath::Reference) => {
                let mut d = vec![0f32; cx.dy().cpu().len()];
                kr::scale(&mut d, cx.dy().cpu(), alpha);
                g.put_cpu(d);
            }
            Device::Cpu(CpuPath::Fast) => fast::scale(g.value.cpu_mut(), cx.dy().cpu(), alpha, g.acc),
        }
    }
    Ok(())
}

/// The node's mask seed, or `None` when dropout is off (no seed in the feed).
fn mask_seed(seed: Option<u32>, salt: u32) -> Option<u32> {
    seed.map(|s| kr::hash32(s ^ salt))
}

pub(super) fn dropout_forward(cx: &Fwd, out: &mut Value, p: f32, salt: u32) -> Result<Option<Value>> {
    let seed = mask_seed(cx.fed.dropout_seed(), salt);
    match (cx.dev, seed) {
        (Device::Gpu(g), Some(seed)) => elementwise::dropout(g, out.gpu(), cx.x(0).gpu(), p, seed)?,
        (Device::Gpu(g), None) => elementwise::axpby(g, out.gpu(), cx.x(0).gpu(), 1.0, 0.0)?,
        (Device::Cpu(CpuPath::Reference), Some(seed)) => kr::dropout(out.cpu_mut(), cx.x(0).cpu(), p, seed),
        (Device::Cpu(CpuPath::Fast), Some(seed)) => {
            fast::dropout(out.cpu_mut(), cx.x(0).cpu(), p, seed, false)
        }
        (Device::Cpu(_), None) => out.cpu_mut().copy_from_slice(cx.x(0).cpu()),
    }
    Ok(None)
}

pub(super) fn dropout_backward(cx: &Bwd, grads: &mut Grads, p: f32, salt: u32) -> Result<()> {
    let seed = mask_seed(cx.f.fed.dropout_seed(), salt);
    for (_, g) in wanted(grads) {
        match (cx.f.dev, seed) {
            (Device::Gpu(gpu), Some(seed)) => super::write_or_add(gpu, g, "dropout gradient", |d| {
                elementwise::dropout(gpu, d, cx.dy().gpu(), p, seed)
            })?,
            (Device::Gpu(gpu), None) => elementwise::axpby(gpu, g.value.gpu(), cx.dy().gpu(), 1.0, g.beta())?,
            (Device::Cpu(CpuPath::Fast), Some(seed)) => {
                fast::dropout(g.value.cpu_mut(), cx.dy().cpu(), p, seed, g.acc)
            }
            (Device::Cpu(CpuPath::Fast), None) => fast::scale(g.value.cpu_mut(), cx.dy().cpu(), 1.0, g.acc),
            (Device::Cpu(CpuPath::Reference), seed) => {
                let mut d = cx.dy().cpu().to_vec();
                if let Some(seed) = seed {
                    kr::dropout(&mut d, cx.dy().cpu(), p, seed);
                }
                g.put_cpu(d);
            }
        }
    }
    Ok(())
}
