//! Optimizer steps over flat (possibly chunked) parameter buffers (`shaders/adamw.wgsl`):
//! AdamW with decoupled weight decay and bias correction, as `torch.optim.AdamW`, and SGD.
//! Reference: `kernels_ref::adamw_step`, `kernels_ref::sgd_step`.

use super::{elementwise::same_layout, u32_of};
use crate::error::Result;
use crate::gpu::{Gpu, KernelKey, Tensor};

pub use kernels_ref::AdamW;

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    _pad: [u32; 3],
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    step_size: f32,
    sqrt_bc2: f32,
    _pad1: u32,
}

/// One AdamW step (`step` counts from 1) on `params` with `grads`, updating moments `m`, `v`.
pub fn adamw_step(
    gpu: &Gpu,
    params: &Tensor,
    grads: &Tensor,
    m: &Tensor,
    v: &Tensor,
    opt: AdamW,
    step: u32,
) -> Result<()> {
    let t = step.max(1) as i32;
    let bc1 = 1.0 - (opt.beta1 as f64).powi(t);
    let bc2 = 1.0 - (opt.beta2 as f64).powi(t);
    for (bufs, n) in same_layout("adamw", &[params, grads, m, v])? {
        let p = Params {
            n: u32_of(n, "adamw")?,
            lr: opt.lr,
            beta1: opt.beta1,
            beta2: opt.beta2,
            eps: opt.eps,
            weight_decay: opt.weight_decay,
            step_size: (opt.lr as f64 / bc1) as f32,
            sqrt_bc2: bc2.sqrt() as f32,
            ..Default::default()
        };
        let b: Vec<_> = bufs.into_iter().map(Some).collect();
        gpu.dispatch(&KernelKey::new("adamw", "adamw"), &b, bytemuck::bytes_of(&p), gpu.grid(n, 256))?;
    }
    Ok(())
}

/// `p -= lr * (g + weight_decay * p)`
pub fn sgd_step(gpu: &Gpu, params: &Tensor, grads: &Tensor, lr: f32, weight_decay: f32) -> Result<()> {
    for (bufs, n) in same_layout("sgd", &[params, grads])? {
        let p = Params { n: u32_of(n, "sgd")?, lr, weight_decay, ..Default::default() };
        let b: Vec<_> = bufs.into_iter().map(Some).collect();
        gpu.dispatch(&KernelKey::new("adamw", "sgd"), &b, bytemuck::bytes_of(&p), gpu.grid(n, 256))?;
    }
    Ok(())
}
