//! Elementwise arithmetic and the reductions the training loop needs: residual add, scaling,
//! sums, and global gradient-norm clipping.
//!
//! Sums run in f64 over fixed chunks of 4096 elements, and the chunk sums are added in order,
//! so the result does not depend on the thread count. Clipping follows PyTorch's
//! `clip_grad_norm_`: `total = sqrt(Σ g^2)` over all gradients, `coef = max_norm / (total + 1e-6)`,
//! and every gradient is multiplied by `coef` when `coef < 1`.

use rayon::prelude::*;

const CHUNK: usize = 4096;

/// `out = a + b` elementwise.
pub fn add(out: &mut [f32], a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), out.len(), "add: a and out lengths differ");
    assert_eq!(b.len(), out.len(), "add: b and out lengths differ");
    out.par_iter_mut()
        .zip(a.par_iter().zip(b.par_iter()))
        .for_each(|(o, (&a, &b))| *o = (a as f64 + b as f64) as f32);
}

/// `out = s * a` elementwise.
pub fn scale(out: &mut [f32], a: &[f32], s: f32) {
    assert_eq!(a.len(), out.len(), "scale: a and out lengths differ");
    out.par_iter_mut().zip(a.par_iter()).for_each(|(o, &a)| *o = (s as f64 * a as f64) as f32);
}

fn chunked_sum(x: &[f32], f: impl Fn(f64) -> f64 + Sync) -> f64 {
    let partial: Vec<f64> = x.par_chunks(CHUNK).map(|c| c.iter().map(|&v| f(v as f64)).sum()).collect();
    partial.iter().sum()
}

/// `Σ x`, in f64.
pub fn sum(x: &[f32]) -> f64 {
    chunked_sum(x, |v| v)
}

/// `Σ x^2`, in f64.
pub fn sum_squares(x: &[f32]) -> f64 {
    chunked_sum(x, |v| v * v)
}

/// Scales every gradient by `max_norm / (total + 1e-6)` when that is below 1; returns `total`,
/// the global L2 norm before clipping.
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f32) -> f32 {
    let total = grads.iter().map(|g| sum_squares(g)).sum::<f64>().sqrt();
    let coef = max_norm as f64 / (total + 1e-6);
    if coef < 1.0 {
        grads.iter_mut().for_each(|g| scale_by(g, coef));
    }
    total as f32
}

/// `x *= coef` in place, each element through f64 (clipping's scale).
pub fn scale_by(x: &mut [f32], coef: f64) {
    x.par_chunks_mut(CHUNK).for_each(|c| c.iter_mut().for_each(|v| *v = (*v as f64 * coef) as f32));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn by_hand() {
        let mut out = [0.0; 3];
        add(&mut out, &[1.0, 2.0, 3.0], &[0.5, -2.0, 4.0]);
        assert_eq!(out, [1.5, 0.0, 7.0]);
        scale(&mut out, &[1.0, -2.0, 3.0], 0.5);
        assert_eq!(out, [0.5, -1.0, 1.5]);
        assert_eq!(sum(&[1.0, 2.0, 3.5]), 6.5);
        assert_eq!(sum_squares(&[1.0, -2.0, 3.0]), 14.0);
        assert_eq!(sum(&[]), 0.0);
    }

    #[test]
    fn sums_are_f64_and_independent_of_chunking() {
        // 10000 copies of 0.1f32 (= 0.100000001490116...) plus one 1e8: an f32 running sum
        // would lose the small terms; the f64 sum keeps them to ~1e-6.
        let mut x = vec![0.1f32; 10_000];
        x.push(1e8);
        let want = 1e8 + 10_000.0 * 0.1f32 as f64;
        assert!((sum(&x) - want).abs() < 1e-6, "sum {}", sum(&x));
        let serial: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum();
        assert!((sum_squares(&x) - serial).abs() <= serial * 1e-15);
    }

    #[test]
    fn clip_grad_norm_by_hand() {
        // Gradients [3] and [4]: total norm 5. max_norm 1 scales by 1/(5 + 1e-6) to [0.6, 0.8];
        // max_norm 10 gives coef ~2 >= 1 and leaves them alone.
        let (mut a, mut b) = ([3.0f32], [4.0f32]);
        let total = clip_grad_norm(&mut [&mut a[..], &mut b[..]], 10.0);
        assert_eq!((total, a, b), (5.0, [3.0], [4.0]));
        let total = clip_grad_norm(&mut [&mut a[..], &mut b[..]], 1.0);
        assert_eq!(total, 5.0);
        assert_close("clipped", &[a[0], b[0]], &[3.0 / (5.0 + 1e-6), 4.0 / (5.0 + 1e-6)], 1e-7);
        let after = (sum_squares(&a) + sum_squares(&b)).sqrt();
        assert!((after - 1.0).abs() < 1e-6, "norm after clipping {after}");
        // A mild clip: [3, 4] with max_norm 4 becomes [2.4, 3.2] (coef 0.8).
        let (mut a, mut b) = ([3.0f32], [4.0f32]);
        clip_grad_norm(&mut [&mut a[..], &mut b[..]], 4.0);
        assert_close("coef 0.8", &[a[0], b[0]], &[2.4, 3.2], 1e-6);
    }
}

/// The 32-bit integer hash behind dropout masks (the "lowbias32" mixer): the GPU kernel and
/// this reference compute the same mask from (seed, index), so no mask is stored or uploaded.
#[inline]
pub fn hash32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// Whether element `i` survives dropout with probability `p` under `seed`.
pub fn dropout_keep(seed: u32, i: u32, p: f32) -> bool {
    let threshold = (p as f64 * 4294967296.0).min(4294967295.0) as u32;
    hash32(i ^ hash32(seed)) >= threshold
}

/// Inverted dropout: `out[i] = x[i] / (1 - p)` where kept, 0 where dropped. The backward is the
/// same function applied to the output gradient (same seed, same mask).
pub fn dropout(out: &mut [f32], x: &[f32], p: f32, seed: u32) {
    assert_eq!(x.len(), out.len(), "dropout: x and out lengths differ");
    let scale = 1.0 / (1.0 - p as f64);
    out.par_iter_mut().zip(x.par_iter()).enumerate().for_each(|(i, (o, &v))| {
        *o = if dropout_keep(seed, i as u32, p) { (v as f64 * scale) as f32 } else { 0.0 };
    });
}

#[cfg(test)]
mod dropout_tests {
    use super::*;

    #[test]
    fn dropout_drops_about_p_and_scales_the_rest() {
        let n = 100_000;
        let x = vec![1.0f32; n];
        let mut y = vec![0f32; n];
        dropout(&mut y, &x, 0.1, 7);
        let dropped = y.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
        assert!((dropped - 0.1).abs() < 0.005, "dropped {dropped}");
        // 1 / (1 - 0.1) = 1.111...
        assert!(y.iter().filter(|&&v| v != 0.0).all(|&v| (v - 1.0 / 0.9).abs() < 1e-6));
        // p = 0 keeps everything unchanged.
        dropout(&mut y, &x, 0.0, 7);
        assert!(y.iter().all(|&v| v == 1.0));
    }

    #[test]
    fn hash_matches_known_values() {
        // lowbias32 of 0 is 0; of 1, worked through the three xor-shift-multiply rounds.
        assert_eq!(hash32(0), 0);
        let mut x: u32 = 1;
        x ^= x >> 16;
        x = x.wrapping_mul(0x7feb352d);
        x ^= x >> 15;
        x = x.wrapping_mul(0x846ca68b);
        x ^= x >> 16;
        assert_eq!(hash32(1), x);
        assert_ne!(hash32(1), hash32(2));
    }
}
