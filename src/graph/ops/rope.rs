//! `Op::Rope`: the rotary embedding (rotate-half) of (B*T, heads*head_dim) rows at positions
//! 0..T; its backward is the inverse rotation of the output gradient.

use super::{wanted, Bwd, Device, Fwd, Grads, Value};
use crate::error::Result;
use crate::kernels::rope;
use kernels_ref as kr;

/// The sizes of one `Op::Rope`.
#[derive(Clone, Copy)]
pub(super) struct Rope {
    pub b: usize,
    pub t: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub theta: f64,
}

fn cpu_table(r: Rope) -> (Vec<f32>, Vec<f32>) {
    let positions: Vec<u32> = (0..r.t as u32).collect();
    let (mut cos, mut sin) = (vec![0f32; r.t * r.head_dim / 2], vec![0f32; r.t * r.head_dim / 2]);
    kr::rope_cos_sin(&mut cos, &mut sin, &positions, r.head_dim, r.theta);
    (cos, sin)
}

pub(super) fn forward(cx: &Fwd, out: &mut Value, r: Rope) -> Result<Option<Value>> {
    match cx.dev {
        Device::Gpu(g) => {
            let table = rope::RopeTable::for_sequence(g, r.t, r.head_dim, r.theta)?;
            rope::rope_forward(g, out.gpu(), cx.x(0).gpu(), &table, r.b, r.heads)?;
        }
        Device::Cpu(_) => {
            let (cos, sin) = cpu_table(r);
            kr::rope_forward(out.cpu_mut(), cx.x(0).cpu(), &cos, &sin, r.b, r.t, r.heads, r.head_dim);
        }
    }
    Ok(None)
}

pub(super) fn backward(cx: &Bwd, grads: &mut Grads, r: Rope) -> Result<()> {
    for (_, g) in wanted(grads) {
        match cx.f.dev {
            Device::Gpu(gpu) => {
                let table = rope::RopeTable::for_sequence(gpu, r.t, r.head_dim, r.theta)?;
                super::write_or_add(gpu, g, "rope gradient", |d| {
                    rope::rope_backward(gpu, d, cx.dy().gpu(), &table, r.b, r.heads)
                })?;
            }
            Device::Cpu(_) => {
                let (cos, sin) = cpu_table(r);
                let mut d = vec![0f32; cx.dy().cpu().len()];
                kr::rope_backward(&mut d, cx.dy().cpu(), &cos, &sin, r.b, r.t, r.heads, r.head_dim);
                g.put_cpu(d);
            }
        }
    }
    Ok(())
}
