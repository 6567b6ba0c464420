//! Helpers shared by the tests: seeded random inputs and a central finite-difference check.
//!
//! The check perturbs one input element by `±h`, evaluates a scalar loss in f64, and compares
//! `(L+ - L-) / (x+ - x-)` with the analytic gradient. The denominator is the difference of the
//! two perturbed values as actually stored in f32, so rounding of `x ± h` costs nothing; what is
//! left is the truncation error O(h^2 f''') and the f32 rounding of the forward outputs divided
//! by 2h. Each caller states its tolerance and why.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// `n` values uniform in `[lo, hi)`.
pub fn uniform(rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// The scalar loss `L = sum(w ⊙ y)`, in f64.
pub fn weighted_sum(w: &[f32], y: &[f32]) -> f64 {
    assert_eq!(w.len(), y.len(), "weighted_sum: length mismatch");
    w.iter().zip(y).map(|(&a, &b)| a as f64 * b as f64).sum()
}

/// Largest `|a - b|` over two slices, for asserts on forward results.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "max_abs_diff: length mismatch");
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).abs()).fold(0.0, f64::max)
}

/// Asserts every element of `got` is within `tol` of `want`.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length mismatch");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g as f64 - w).abs() <= tol, "{what}[{i}]: got {g}, want {w} (tol {tol})");
    }
}

/// Central finite differences of `loss` at `x` against `grad`, on every element or, when `x`
/// has more than `max_checked`, on a random subset of `max_checked` of them. Passes when
/// `|fd - grad| <= atol + rtol * |grad|` everywhere; returns the largest error seen.
#[allow(clippy::too_many_arguments)]
pub fn check_grad(
    what: &str,
    x: &[f32],
    grad: &[f32],
    h: f32,
    atol: f64,
    rtol: f64,
    max_checked: usize,
    rng: &mut StdRng,
    loss: impl Fn(&[f32]) -> f64,
) -> f64 {
    assert_eq!(x.len(), grad.len(), "{what}: gradient length mismatch");
    let indices: Vec<usize> = if x.len() <= max_checked {
        (0..x.len()).collect()
    } else {
        (0..max_checked).map(|_| rng.random_range(0..x.len())).collect()
    };
    let mut xp = x.to_vec();
    let mut worst = 0.0f64;
    for i in indices {
        xp[i] = x[i] + h;
        let hi = xp[i];
        let l_plus = loss(&xp);
        xp[i] = x[i] - h;
        let lo = xp[i];
        let l_minus = loss(&xp);
        xp[i] = x[i];
        let fd = (l_plus - l_minus) / (hi as f64 - lo as f64);
        let g = grad[i] as f64;
        let err = (fd - g).abs();
        assert!(
            err <= atol + rtol * g.abs(),
            "{what}[{i}]: analytic {g}, finite difference {fd}, error {err} > {atol} + {rtol}*|g|"
        );
        worst = worst.max(err);
    }
    worst
}
