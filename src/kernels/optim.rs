//! Optimizer steps over flat (possibly chunked) parameter buffers (`shaders/adamw.wgsl`):
//! AdamW with decoupled weight decay and bias correction, as `torch.optim.AdamW`, and SGD.
//! Reference: `kernels_ref::adamw_step`, `kernels_ref::sgd_step`.
//!
//! [`adamw_host`] is the shader's AdamW on the CPU threads, operation for operation in f32, for
//! moments offloaded to host memory or a file (`--optimizer-offload`, `memory::offload`); both
//! take their bias-correction constants from [`AdamConsts`], so the two differ only where the
//! GPU rounds a division or a square root differently from IEEE f32 (WGSL allows it 2.5 ulp
//! and an inverse square root) or fuses a multiply-add.

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
    /// nonzero: no change (`shaders/adamw.wgsl`); patched from a step's status on the GPU
    skip: f32,
}

/// The per-step constants of AdamW's bias correction, computed in f64 and rounded once:
/// `step_size = lr / (1 - b1^t)`, `sqrt_bc2 = sqrt(1 - b2^t)`.
#[derive(Clone, Copy, Debug)]
pub struct AdamConsts {
    pub step_size: f32,
    pub sqrt_bc2: f32,
}

impl AdamConsts {
    pub fn new(opt: AdamW, step: u32) -> AdamConsts {
        let t = step.max(1) as i32;
        let bc1 = 1.0 - (opt.beta1 as f64).powi(t);
        let bc2 = 1.0 - (opt.beta2 as f64).powi(t);
        AdamConsts { step_size: (opt.lr as f64 / bc1) as f32, sqrt_bc2: bc2.sqrt() as f32 }
    }
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
    adamw_step_gated(gpu, params, grads, m, v, opt, step, None)
}

/// Byte offset of `skip` in the AdamW uniform.
const SKIP_FIELD: u64 = std::mem::offset_of!(Params, skip) as u64;

/// [`adamw_step`], skipped on the GPU (nothing changes) when element [`STATUS_SKIP`](super::reduce::STATUS_SKIP) of the
/// step's `status` ([`super::reduce::clip_into`]) is nonzero: the decision to skip a step with
/// a non-finite loss or gradient norm needs no read-back before the update.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step_gated(
    gpu: &Gpu,
    params: &Tensor,
    grads: &Tensor,
    m: &Tensor,
    v: &Tensor,
    opt: AdamW,
    step: u32,
    status: Option<&Tensor>,
) -> Result<()> {
    let gate = match status {
        Some(s) => {
            let b = s.single("adamw status")?;
            let at = (super::reduce::STATUS_SKIP * 4) as u64;
            vec![(crate::gpu::Bind { offset: b.offset + at, size: 4, ..b }, SKIP_FIELD)]
        }
        None => Vec::new(),
    };
    let c = AdamConsts::new(opt, step);
    for (bufs, n) in same_layout("adamw", &[params, grads, m, v])? {
        let p = Params {
            n: u32_of(n, "adamw")?,
            lr: opt.lr,
            beta1: opt.beta1,
            beta2: opt.beta2,
            eps: opt.eps,
            weight_decay: opt.weight_decay,
            step_size: c.step_size,
            sqrt_bc2: c.sqrt_bc2,
            ..Default::default()
        };
        let b: Vec<_> = bufs.into_iter().map(Some).collect();
        let key = KernelKey::new("adamw", "adamw");
        gpu.dispatch_patched(&key, &b, bytemuck::bytes_of(&p), gpu.grid(n, 256), &gate)?;
    }
    Ok(())
}

/// Elements per rayon task of [`adamw_host`]: large enough that scheduling costs nothing
/// beside the arithmetic, small enough that a 2-core phone splits a LoRA adapter too.
const HOST_TASK: usize = 1 << 14;

/// `shaders/adamw.wgsl`'s `adamw` on the CPU threads (rayon), in f32 with the shader's order of
/// operations, so that offloaded moments give the losses of on-GPU AdamW up to the GPU's own
/// rounding: `w = p (1 - lr wd)`, `m = b1 m + (1 - b1) g`, `v = b2 v + ((1 - b2) g) g`,
/// `p = w - (step_size m) / (sqrt(v) / sqrt_bc2 + eps)`.
pub fn adamw_host(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], opt: AdamW, step: u32) {
    use rayon::prelude::*;
    let n = params.len();
    assert!(grads.len() == n && m.len() == n && v.len() == n, "adamw_host: operand lengths differ");
    let c = AdamConsts::new(opt, step);
    let decay = 1.0 - opt.lr * opt.weight_decay;
    params
        .par_chunks_mut(HOST_TASK)
        .zip(grads.par_chunks(HOST_TASK))
        .zip(m.par_chunks_mut(HOST_TASK))
        .zip(v.par_chunks_mut(HOST_TASK))
        .for_each(|(((p, g), m), v)| {
            for i in 0..p.len() {
                let g = g[i];
                let w = p[i] * decay;
                let mi = opt.beta1 * m[i] + (1.0 - opt.beta1) * g;
                let vi = opt.beta2 * v[i] + (1.0 - opt.beta2) * g * g;
                m[i] = mi;
                v[i] = vi;
                p[i] = w - c.step_size * mi / (vi.sqrt() / c.sqrt_bc2 + opt.eps);
            }
        });
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
