//! Optimizer steps over flat parameter, gradient and moment buffers.
//!
//! AdamW exactly as `torch.optim.AdamW` (decoupled weight decay, step `t` counted from 1):
//! `p -= lr * wd * p`, `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`,
//! `p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`. Plain SGD with L2 weight decay:
//! `p -= lr * (g + wd * p)`. Each element is computed in f64 and stored in f32.

use rayon::prelude::*;

#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

/// One AdamW step at `step` (1 for the first), updating `params`, `m`, `v` in place.
pub fn adamw_step(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], opt: AdamW, step: u32) {
    let n = params.len();
    assert_eq!(grads.len(), n, "adamw_step: grads and params lengths differ");
    assert_eq!(m.len(), n, "adamw_step: m and params lengths differ");
    assert_eq!(v.len(), n, "adamw_step: v and params lengths differ");
    assert!(step >= 1, "adamw_step: step counts from 1");
    let (lr, b1, b2) = (opt.lr as f64, opt.beta1 as f64, opt.beta2 as f64);
    let (eps, wd) = (opt.eps as f64, opt.weight_decay as f64);
    let bc1 = 1.0 - b1.powi(step as i32);
    let bc2 = 1.0 - b2.powi(step as i32);
    // blocks of elements per task: one task per element would cost more than the update
    const CHUNK: usize = 4096;
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

/// One SGD step: `p -= lr * (g + weight_decay * p)`.
pub fn sgd_step(params: &mut [f32], grads: &[f32], lr: f32, weight_decay: f32) {
    assert_eq!(grads.len(), params.len(), "sgd_step: grads and params lengths differ");
    let (lr, wd) = (lr as f64, weight_decay as f64);
    params.par_iter_mut().zip(grads.par_iter()).for_each(|(p, &g)| {
        *p = (*p as f64 - lr * (g as f64 + wd * *p as f64)) as f32;
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    const OPT: AdamW = AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };

    #[test]
    fn first_adamw_step_moves_by_lr() {
        // From zero moments: m = 0.1 g, v = 0.001 g^2, so m/(1-0.9) = g and v/(1-0.999) = g^2,
        // and the update is lr * g / (|g| + eps) = lr * sign(g) when |g| >> eps. Decay first:
        // p = 2 -> 2 (1 - 1e-3 * 0.1) = 1.9998, then -/+ 1e-3.
        let mut p = [2.0, 2.0, 0.0];
        let (mut m, mut v) = ([0.0; 3], [0.0; 3]);
        adamw_step(&mut p, &[0.5, -30.0, 1e-3], &mut m, &mut v, OPT, 1);
        // p[2] = 0 with g = 1e-3 = lr: the update is lr * g / (g + eps). Tolerance 2e-7: half
        // an f32 ulp at 2 is 1.2e-7.
        let want = [1.9998 - 1e-3, 1.9998 + 1e-3, -1e-3 * 1e-3 / (1e-3 + 1e-8)];
        assert_close("p", &p, &want, 2e-7);
        // The moments carry the betas as the f32 values they are (0.9f32 = 0.899999976,
        // 0.999f32 = 0.999000013): 1 - b1 and 1 - b2 are 0.1 and 0.001 only to 2e-7 and
        // 1.3e-5 relative, which the bias correction cancels in p above.
        let (c1, c2) = (1.0 - 0.9f32 as f64, 1.0 - 0.999f32 as f64);
        assert_close("m", &m, &[c1 * 0.5, c1 * -30.0, c1 * 1e-3], 3e-7);
        assert_close("v", &v, &[c2 * 0.25, c2 * 900.0, c2 * 1e-6], 6e-8);
        assert!((m[0] - 0.05).abs() < 1e-7 && (v[1] - 0.9).abs() < 2e-5, "m {m:?} v {v:?}");
    }

    #[test]
    fn adamw_matches_an_unrolled_second_step() {
        // Two steps with gradients g1 then g2, written out by hand:
        // m2 = 0.9 * 0.1 g1 + 0.1 g2, v2 = 0.999 * 0.001 g1^2 + 0.001 g2^2,
        // p1 = p0 (1 - lr wd) - lr sign(g1) (approximately: eps kept exactly below),
        // p2 = p1 (1 - lr wd) - lr (m2 / (1 - 0.9^2)) / (sqrt(v2 / (1 - 0.999^2)) + eps).
        let mut rng = rng(80);
        let n = 37;
        let p0 = uniform(&mut rng, n, -1.0, 1.0);
        let g1 = uniform(&mut rng, n, -1.0, 1.0);
        let g2 = uniform(&mut rng, n, -1.0, 1.0);
        let (mut p, mut m, mut v) = (p0.clone(), vec![0.0; n], vec![0.0; n]);
        adamw_step(&mut p, &g1, &mut m, &mut v, OPT, 1);
        adamw_step(&mut p, &g2, &mut m, &mut v, OPT, 2);
        let (lr, wd, eps) = (OPT.lr as f64, OPT.weight_decay as f64, OPT.eps as f64);
        let (b1, b2) = (OPT.beta1 as f64, OPT.beta2 as f64);
        let want: Vec<f64> = (0..n)
            .map(|i| {
                let (g1, g2) = (g1[i] as f64, g2[i] as f64);
                let (m1, v1) = ((1.0 - b1) * g1, (1.0 - b2) * g1 * g1);
                let p1 = p0[i] as f64 * (1.0 - lr * wd)
                    - lr * (m1 / (1.0 - b1)) / ((v1 / (1.0 - b2)).sqrt() + eps);
                let (m2, v2) = (b1 * m1 + (1.0 - b1) * g2, b2 * v1 + (1.0 - b2) * g2 * g2);
                p1 * (1.0 - lr * wd) - lr * (m2 / (1.0 - b1 * b1)) / ((v2 / (1.0 - b2 * b2)).sqrt() + eps)
            })
            .collect();
        // The stored f32 moments and parameter after step 1 differ from the f64 chain by
        // relative 6e-8, which moves the result by well under 1e-6.
        assert_close("p after two steps", &p, &want, 1e-6);
    }

    #[test]
    fn sgd_by_hand() {
        // p = 1 - 0.1 * (2 + 0.5 * 1) = 0.75; p = -2 - 0.1 * (-1 + 0.5 * -2) = -1.8.
        let mut p = [1.0, -2.0];
        sgd_step(&mut p, &[2.0, -1.0], 0.1, 0.5);
        assert_close("p", &p, &[0.75, -1.8], 1e-7);
    }
}
