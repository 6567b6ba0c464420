//! Cross-entropy loss over logits with integer targets, PyTorch semantics (`reduction="mean"`,
//! `ignore_index = -100`), forward and backward.
//!
//! Math: `loss_i = logsumexp(logits_i) - logits_i[target_i]`, with
//! `logsumexp(x) = max x + ln Σ exp(x - max x)`; the returned loss is the mean over the rows
//! whose target is not ignored (NaN when every row is ignored, as PyTorch gives). The gradient
//! of `dloss * mean` is `(softmax(logits_i) - onehot(target_i)) * dloss / count` on kept rows
//! and 0 on ignored rows.

use rayon::prelude::*;

pub const IGNORE_INDEX: i32 = -100;

/// The row's target as an index, or `None` when ignored; panics on anything else out of range.
pub fn target_index(name: &str, target: i32, v: usize) -> Option<usize> {
    if target == IGNORE_INDEX {
        return None;
    }
    assert!(target >= 0 && (target as usize) < v, "{name}: target {target} out of range for {v} classes");
    Some(target as usize)
}

fn check(name: &str, logits: &[f32], targets: &[i32], n: usize, v: usize) {
    assert_eq!(logits.len(), n * v, "{name}: logits must hold N*V");
    assert_eq!(targets.len(), n, "{name}: targets must hold N");
    assert!(v > 0, "{name}: V must be positive");
}

fn max_and_logsumexp(x: &[f32]) -> (f64, f64) {
    let max = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let sum: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
    (max, max + sum.ln())
}

/// The mean of the kept rows' losses (`None`: an ignored row); NaN when every row is ignored,
/// as PyTorch gives.
pub fn mean_over_kept(per_row: &[Option<f64>]) -> f32 {
    let kept: Vec<f64> = per_row.iter().flatten().copied().collect();
    if kept.is_empty() {
        return f32::NAN;
    }
    (kept.iter().sum::<f64>() / kept.len() as f64) as f32
}

/// `losses (N)` per row and the mean over kept rows, from `logits (N, V)` and `targets (N)`.
pub fn cross_entropy_forward(losses: &mut [f32], logits: &[f32], targets: &[i32], n: usize, v: usize) -> f32 {
    let f = "cross_entropy_forward";
    check(f, logits, targets, n, v);
    assert_eq!(losses.len(), n, "{f}: losses must hold N");
    let per_row: Vec<Option<f64>> = logits
        .par_chunks(v)
        .zip(targets.par_iter())
        .map(|(x, &t)| {
            target_index(f, t, v).map(|t| {
                let (_, lse) = max_and_logsumexp(x);
                lse - x[t] as f64
            })
        })
        .collect();
    for (out, l) in losses.iter_mut().zip(&per_row) {
        *out = l.unwrap_or(0.0) as f32;
    }
    mean_over_kept(&per_row)
}

/// `dlogits (N, V)`, overwritten: the gradient of `dloss * mean loss`.
pub fn cross_entropy_backward(
    dlogits: &mut [f32],
    logits: &[f32],
    targets: &[i32],
    dloss: f32,
    n: usize,
    v: usize,
) {
    let f = "cross_entropy_backward";
    check(f, logits, targets, n, v);
    assert_eq!(dlogits.len(), n * v, "{f}: dlogits must hold N*V");
    let count = targets.iter().filter_map(|&t| target_index(f, t, v)).count();
    dlogits.par_chunks_mut(v).zip(logits.par_chunks(v).zip(targets.par_iter())).for_each(|(dx, (x, &t))| {
        match target_index(f, t, v) {
            None => dx.fill(0.0),
            Some(t) => {
                let g = dloss as f64 / count as f64;
                let (_, lse) = max_and_logsumexp(x);
                for (j, (dx, &xj)) in dx.iter_mut().zip(x).enumerate() {
                    let p = (xj as f64 - lse).exp();
                    let onehot = if j == t { 1.0 } else { 0.0 };
                    *dx = ((p - onehot) * g) as f32;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn uniform_logits_by_hand() {
        // Equal logits: softmax = 1/V, loss = ln V on every row whatever the target; the mean
        // over the 2 kept rows is ln 5. Gradient: (1/V - onehot) / 2 on kept rows, 0 on the
        // ignored one.
        let (n, v) = (3, 5);
        let logits = vec![0.7; n * v];
        let targets = [4, IGNORE_INDEX, 0];
        let mut losses = [f32::NAN; 3];
        let mean = cross_entropy_forward(&mut losses, &logits, &targets, n, v);
        let ln5 = 5f64.ln();
        assert_close("losses", &losses, &[ln5, 0.0, ln5], 1e-6);
        assert!((mean as f64 - ln5).abs() < 1e-6, "mean {mean}");
        let mut dl = vec![f32::NAN; n * v];
        cross_entropy_backward(&mut dl, &logits, &targets, 1.0, n, v);
        let mut want = vec![0.1f64; n * v];
        want[4] = (0.2 - 1.0) / 2.0;
        want[5..10].fill(0.0);
        want[10] = (0.2 - 1.0) / 2.0;
        assert_close("dlogits", &dl, &want, 1e-7);
    }

    #[test]
    fn every_row_ignored_gives_nan_loss_and_zero_gradient() {
        let logits = [1.0, 2.0, 3.0, 4.0];
        let targets = [IGNORE_INDEX, IGNORE_INDEX];
        let mut losses = [f32::NAN; 2];
        assert!(cross_entropy_forward(&mut losses, &logits, &targets, 2, 2).is_nan());
        assert_eq!(losses, [0.0, 0.0]);
        let mut dl = [f32::NAN; 4];
        cross_entropy_backward(&mut dl, &logits, &targets, 1.0, 2, 2);
        assert_eq!(dl, [0.0; 4]);
    }

    #[test]
    fn large_logits_do_not_overflow() {
        // logits [1000, 1000 + ln 3], target 0: loss = ln(1 + 3) - 0 = ln 4.
        let mut losses = [0.0];
        let mean = cross_entropy_forward(&mut losses, &[1000.0, 1000.0 + 3f32.ln()], &[0], 1, 2);
        assert!((mean as f64 - 4f64.ln()).abs() < 1e-4, "mean {mean}");
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = rng(70);
        for (n, v) in [(1, 1), (3, 5), (7, 3), (5, 7)] {
            let logits = uniform(&mut rng, n * v, -3.0, 3.0);
            let mut targets: Vec<i32> = (0..n).map(|i| ((i * 5 + 2) % v) as i32).collect();
            if n > 1 {
                targets[1] = IGNORE_INDEX;
            }
            let dloss = 0.8;
            let mut dl = vec![f32::NAN; n * v];
            cross_entropy_backward(&mut dl, &logits, &targets, dloss, n, v);
            // h = 1e-2: truncation h^2/6 |f'''| (|f'''| < 1 for logsumexp) is < 2e-5; the mean
            // loss (< 7) is rounded to f32 once, < 7 * 6e-8 / 2e-2 = 2e-5.
            check_grad("dlogits", &logits, &dl, 1e-2, 1e-4, 1e-3, 64, &mut rng, |x| {
                let mut losses = vec![0.0; n];
                dloss as f64 * cross_entropy_forward(&mut losses, x, &targets, n, v) as f64
            });
            for (row, &t) in dl.chunks(v).zip(&targets) {
                if t == IGNORE_INDEX {
                    assert!(row.iter().all(|&g| g == 0.0), "ignored row has gradient {row:?}");
                }
            }
        }
    }
}
