//! The optimizer's flat loops on the fast CPU path: AdamW (`kernels_ref::adamw_step`'s math,
//! each element in f64 as the reference does, so both paths give the same bits), the clipping
//! scale and the zero-fill, over blocks of elements per task instead of one task per element.

use super::elementwise::CHUNK;
use kernels_ref::AdamW;
use rayon::prelude::*;

/// One AdamW step at `step` (1 for the first), updating `params`, `m` and `v` in place.
pub fn adamw_step(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], opt: AdamW, step: u32) {
    let n = params.len();
    assert!(grads.len() == n && m.len() == n && v.len() == n, "cpu adamw: lengths differ");
    assert!(step >= 1, "cpu adamw: step counts from 1");
    let (lr, b1, b2) = (opt.lr as f64, opt.beta1 as f64, opt.beta2 as f64);
    let (eps, wd) = (opt.eps as f64, opt.weight_decay as f64);
    let bc1 = 1.0 - b1.powi(step as i32);
    let bc2 = 1.0 - b2.powi(step as i32);
    params
        .par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(grads.par_chunks(CHUNK))
        .for_each(|(((p, m), v), g)| {
            for i in 0..p.len() {
                let gi = g[i] as f64;
                let mut pf = p[i] as f64;
                pf -= lr * wd * pf;
                let mf = b1 * m[i] as f64 + (1.0 - b1) * gi;
                let vf = b2 * v[i] as f64 + (1.0 - b2) * gi * gi;
                pf -= lr * (mf / bc1) / ((vf / bc2).sqrt() + eps);
                p[i] = pf as f32;
                m[i] = mf as f32;
                v[i] = vf as f32;
            }
        });
}

/// `x *= coef` (the clipping scale), rounded as the reference rounds it.
pub fn scale_in_place(x: &mut [f32], coef: f64) {
    x.par_chunks_mut(CHUNK).for_each(|c| c.iter_mut().for_each(|v| *v = (*v as f64 * coef) as f32));
}

/// `x = value` everywhere.
pub fn fill(x: &mut [f32], value: f32) {
    x.par_chunks_mut(CHUNK).for_each(|c| c.fill(value));
}
