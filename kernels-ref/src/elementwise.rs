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
        for g in grads.iter_mut() {
            g.par_iter_mut().for_each(|x| *x = (*x as f64 * coef) as f32);
        }
    }
    total as f32
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
