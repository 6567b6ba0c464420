//! Row-wise softmax, forward and backward.
//!
//! Math: `y_j = exp(x_j - max x) / Σ_k exp(x_k - max x)` over each row (subtracting the max
//! changes nothing mathematically and keeps `exp` finite). Backward is the Jacobian-vector
//! product `dx_j = y_j (dy_j - Σ_k dy_k y_k)`.

use rayon::prelude::*;

/// `y (rows, cols) = softmax(x (rows, cols))` along each row.
pub fn softmax_forward(y: &mut [f32], x: &[f32], rows: usize, cols: usize) {
    assert_eq!(x.len(), rows * cols, "softmax_forward: x must hold rows*cols");
    assert_eq!(y.len(), rows * cols, "softmax_forward: y must hold rows*cols");
    if cols == 0 {
        return;
    }
    y.par_chunks_mut(cols).zip(x.par_chunks(cols)).for_each(|(y, x)| {
        let max = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let sum: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
        for (y, &x) in y.iter_mut().zip(x) {
            *y = ((x as f64 - max).exp() / sum) as f32;
        }
    });
}

/// `dx (rows, cols)` from the saved output `y` and upstream `dy`; overwritten.
pub fn softmax_backward(dx: &mut [f32], y: &[f32], dy: &[f32], rows: usize, cols: usize) {
    assert_eq!(y.len(), rows * cols, "softmax_backward: y must hold rows*cols");
    assert_eq!(dy.len(), rows * cols, "softmax_backward: dy must hold rows*cols");
    assert_eq!(dx.len(), rows * cols, "softmax_backward: dx must hold rows*cols");
    if cols == 0 {
        return;
    }
    dx.par_chunks_mut(cols).zip(y.par_chunks(cols).zip(dy.par_chunks(cols))).for_each(|(dx, (y, dy))| {
        let dot: f64 = y.iter().zip(dy).map(|(&y, &g)| y as f64 * g as f64).sum();
        for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(dy) {
            *dx = (y as f64 * (g as f64 - dot)) as f32;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn by_hand() {
        // exp(0) = 1, exp(ln 3) = 3, so softmax([0, ln 3]) = [1/4, 3/4].
        let mut y = [0.0; 2];
        softmax_forward(&mut y, &[0.0, 3f32.ln()], 1, 2);
        assert_close("softmax [0, ln 3]", &y, &[0.25, 0.75], 1e-7);
        // Shifting a row changes nothing, and a huge shift must not overflow.
        softmax_forward(&mut y, &[1000.0, 1000.0 + 3f32.ln()], 1, 2);
        assert_close("shifted by 1000", &y, &[0.25, 0.75], 1e-4);
        // dx = y (dy - y·dy): y = [1/4, 3/4], dy = [1, 0], y·dy = 1/4:
        // dx = [1/4 * 3/4, 3/4 * -1/4] = [3/16, -3/16].
        let mut dx = [0.0; 2];
        softmax_backward(&mut dx, &[0.25, 0.75], &[1.0, 0.0], 1, 2);
        assert_close("backward", &dx, &[3.0 / 16.0, -3.0 / 16.0], 1e-7);
    }

    #[test]
    fn rows_sum_to_one() {
        let mut rng = rng(10);
        let (rows, cols) = (7, 13);
        let x = uniform(&mut rng, rows * cols, -5.0, 5.0);
        let mut y = vec![0.0; rows * cols];
        softmax_forward(&mut y, &x, rows, cols);
        for row in y.chunks(cols) {
            let s: f64 = row.iter().map(|&v| v as f64).sum();
            assert!((s - 1.0).abs() < 1e-6, "row sums to {s}");
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = rng(11);
        for (rows, cols) in [(1, 1), (3, 5), (5, 7), (2, 1)] {
            let x = uniform(&mut rng, rows * cols, -2.0, 2.0);
            let w = uniform(&mut rng, rows * cols, -1.0, 1.0);
            let mut y = vec![0.0; rows * cols];
            softmax_forward(&mut y, &x, rows, cols);
            let mut dx = vec![f32::NAN; rows * cols];
            softmax_backward(&mut dx, &y, &w, rows, cols);
            // h = 1e-2: truncation h^2/6 |f'''| with |f'''| < 1 for softmax is < 2e-5; f32
            // rounding of the <= 7 outputs that move, each < 1, is < 7 * 6e-8 / 2e-2 = 2e-5.
            check_grad("softmax dx", &x, &dx, 1e-2, 1e-4, 1e-3, 64, &mut rng, |x| {
                let mut y = vec![0.0; rows * cols];
                softmax_forward(&mut y, x, rows, cols);
                weighted_sum(&w, &y)
            });
        }
    }
}
