//! LayerNorm (GPT-2) and RMSNorm (Llama, Qwen, Gemma) over the last dimension, forward and
//! backward.
//!
//! LayerNorm: `xhat = (x - mean) * rstd`, `rstd = 1/sqrt(var + eps)` with the biased variance,
//! `y = xhat * w + b`. Backward, with `g = dy * w`:
//! `dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`, `dw = Σ_rows dy * xhat`, `db = Σ_rows dy`.
//! RMSNorm: `rstd = 1/sqrt(mean(x^2) + eps)`, `y = x * rstd * (w + w_offset)` where `w_offset`
//! is 0 (Llama/Qwen) or 1 (Gemma stores `w` and multiplies by `1 + w`). Backward, with
//! `g = dy * (w + w_offset)`: `dx = rstd * (g - x * rstd^2 * mean(g * x))`,
//! `dw = Σ_rows dy * x * rstd`. `mean` and `rstd` are saved per row for the backward pass.

use rayon::prelude::*;

fn check(name: &str, what: &str, len: usize, want: usize) {
    assert_eq!(len, want, "{name}: {what} has {len} elements, expected {want}");
}

/// `y (rows, cols)`, `mean (rows)`, `rstd (rows)` from `x (rows, cols)`, `w (cols)`, `b (cols)`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    y: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    w: &[f32],
    b: &[f32],
    rows: usize,
    cols: usize,
    eps: f32,
) {
    let f = "layernorm_forward";
    check(f, "y", y.len(), rows * cols);
    check(f, "mean", mean.len(), rows);
    check(f, "rstd", rstd.len(), rows);
    check(f, "x", x.len(), rows * cols);
    check(f, "w", w.len(), cols);
    check(f, "b", b.len(), cols);
    if cols == 0 {
        return;
    }
    y.par_chunks_mut(cols)
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .zip(x.par_chunks(cols))
        .for_each(|((y, (mean, rstd)), x)| {
            let mu = x.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
            let var = x.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / cols as f64;
            let rs = 1.0 / (var + eps as f64).sqrt();
            for j in 0..cols {
                y[j] = ((x[j] as f64 - mu) * rs * w[j] as f64 + b[j] as f64) as f32;
            }
            *mean = mu as f32;
            *rstd = rs as f32;
        });
}

/// `dx (rows, cols)`, `dw (cols)`, `db (cols)`, all overwritten, from `dy (rows, cols)` and the
/// saved `mean (rows)`, `rstd (rows)`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    mean: &[f32],
    rstd: &[f32],
    rows: usize,
    cols: usize,
) {
    let f = "layernorm_backward";
    check(f, "dx", dx.len(), rows * cols);
    check(f, "dw", dw.len(), cols);
    check(f, "db", db.len(), cols);
    check(f, "dy", dy.len(), rows * cols);
    check(f, "x", x.len(), rows * cols);
    check(f, "w", w.len(), cols);
    check(f, "mean", mean.len(), rows);
    check(f, "rstd", rstd.len(), rows);
    if cols == 0 {
        return;
    }
    let xhat = |r: usize, j: usize| (x[r * cols + j] as f64 - mean[r] as f64) * rstd[r] as f64;
    dx.par_chunks_mut(cols).enumerate().for_each(|(r, dx)| {
        let dy = &dy[r * cols..(r + 1) * cols];
        let g = |j: usize| dy[j] as f64 * w[j] as f64;
        let g_mean = (0..cols).map(g).sum::<f64>() / cols as f64;
        let gx_mean = (0..cols).map(|j| g(j) * xhat(r, j)).sum::<f64>() / cols as f64;
        for (j, dx) in dx.iter_mut().enumerate() {
            *dx = (rstd[r] as f64 * (g(j) - g_mean - xhat(r, j) * gx_mean)) as f32;
        }
    });
    dw.par_iter_mut().zip(db.par_iter_mut()).enumerate().for_each(|(j, (dw, db))| {
        *dw = (0..rows).map(|r| dy[r * cols + j] as f64 * xhat(r, j)).sum::<f64>() as f32;
        *db = (0..rows).map(|r| dy[r * cols + j] as f64).sum::<f64>() as f32;
    });
}

/// `y (rows, cols)`, `rstd (rows)` from `x (rows, cols)`, `w (cols)`; scale is `w + w_offset`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_forward(
    y: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    w: &[f32],
    rows: usize,
    cols: usize,
    eps: f32,
    w_offset: f32,
) {
    let f = "rmsnorm_forward";
    check(f, "y", y.len(), rows * cols);
    check(f, "rstd", rstd.len(), rows);
    check(f, "x", x.len(), rows * cols);
    check(f, "w", w.len(), cols);
    if cols == 0 {
        return;
    }
    y.par_chunks_mut(cols).zip(rstd.par_iter_mut()).zip(x.par_chunks(cols)).for_each(|((y, rstd), x)| {
        let ms = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / cols as f64;
        let rs = 1.0 / (ms + eps as f64).sqrt();
        for j in 0..cols {
            y[j] = (x[j] as f64 * rs * (w[j] as f64 + w_offset as f64)) as f32;
        }
        *rstd = rs as f32;
    });
}

/// `dx (rows, cols)`, `dw (cols)`, both overwritten, from `dy (rows, cols)` and saved `rstd`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    dx: &mut [f32],
    dw: &mut [f32],
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    rows: usize,
    cols: usize,
    w_offset: f32,
) {
    let f = "rmsnorm_backward";
    check(f, "dx", dx.len(), rows * cols);
    check(f, "dw", dw.len(), cols);
    check(f, "dy", dy.len(), rows * cols);
    check(f, "x", x.len(), rows * cols);
    check(f, "w", w.len(), cols);
    check(f, "rstd", rstd.len(), rows);
    if cols == 0 {
        return;
    }
    dx.par_chunks_mut(cols).enumerate().for_each(|(r, dx)| {
        let (x, dy, rs) = (&x[r * cols..(r + 1) * cols], &dy[r * cols..(r + 1) * cols], rstd[r] as f64);
        let g = |j: usize| dy[j] as f64 * (w[j] as f64 + w_offset as f64);
        let gx_mean = (0..cols).map(|j| g(j) * x[j] as f64).sum::<f64>() / cols as f64;
        for j in 0..cols {
            dx[j] = (rs * (g(j) - x[j] as f64 * rs * rs * gx_mean)) as f32;
        }
    });
    dw.par_iter_mut().enumerate().for_each(|(j, dw)| {
        let s: f64 =
            (0..rows).map(|r| dy[r * cols + j] as f64 * x[r * cols + j] as f64 * rstd[r] as f64).sum();
        *dw = s as f32;
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn layernorm_by_hand() {
        // x = [1, 2, 3]: mean 2, biased var (1 + 0 + 1)/3 = 2/3, rstd = sqrt(3/2) = 1.2247449
        // (eps 0). With w = 2, b = 1: y = [1 - 2.4494897, 1, 1 + 2.4494897].
        let (mut y, mut mean, mut rstd) = ([0.0; 3], [0.0], [0.0]);
        let x = [1.0, 2.0, 3.0];
        layernorm_forward(&mut y, &mut mean, &mut rstd, &x, &[2.0; 3], &[1.0; 3], 1, 3, 0.0);
        let r = 1.5f64.sqrt();
        assert_close("y", &y, &[1.0 - 2.0 * r, 1.0, 1.0 + 2.0 * r], 1e-6);
        assert_close("mean", &mean, &[2.0], 0.0);
        assert_close("rstd", &rstd, &[r], 1e-7);
    }

    #[test]
    fn rmsnorm_by_hand() {
        // x = [3, 4]: mean(x^2) = 25/2, rstd = 1/sqrt(12.5) = 0.28284271; y = x * rstd * scale.
        let x = [3.0, 4.0];
        let r = 1.0 / 12.5f64.sqrt();
        let (mut y, mut rstd) = ([0.0; 2], [0.0]);
        rmsnorm_forward(&mut y, &mut rstd, &x, &[1.0, 0.5], 1, 2, 0.0, 0.0);
        assert_close("offset 0", &y, &[3.0 * r, 2.0 * r], 1e-7);
        assert_close("rstd", &rstd, &[r], 3e-8); // half an f32 ulp at 0.28 is 1.5e-8
                                                 // Gemma: scale 1 + w; w = 0 is the identity scale.
        rmsnorm_forward(&mut y, &mut rstd, &x, &[0.0, 0.0], 1, 2, 0.0, 1.0);
        assert_close("offset 1", &y, &[3.0 * r, 4.0 * r], 1e-7);
    }

    // h = 1e-2 on O(1) inputs: truncation h^2/6 |f'''| (|f'''| up to ~10 for a normalised row
    // of 1..7 elements) is up to ~2e-4 in the worst case, ~4e-5 seen; f32 rounding of the <= 7
    // moved outputs (each < 4) adds < 7 * 4 * 6e-8 / 2e-2 = 1e-4. Hence atol 3e-4, rtol 3e-3.
    const H: f32 = 1e-2;
    const ATOL: f64 = 3e-4;
    const RTOL: f64 = 3e-3;

    #[test]
    fn layernorm_backward_matches_finite_differences() {
        let mut rng = rng(20);
        for (rows, cols) in [(1, 2), (3, 5), (5, 7), (2, 3)] {
            let x = uniform(&mut rng, rows * cols, -2.0, 2.0);
            let w = uniform(&mut rng, cols, 0.5, 1.5);
            let b = uniform(&mut rng, cols, -1.0, 1.0);
            let wl = uniform(&mut rng, rows * cols, -1.0, 1.0);
            let eps = 1e-5;
            let loss = |x: &[f32], w: &[f32], b: &[f32]| {
                let (mut y, mut m, mut r) = (vec![0.0; rows * cols], vec![0.0; rows], vec![0.0; rows]);
                layernorm_forward(&mut y, &mut m, &mut r, x, w, b, rows, cols, eps);
                weighted_sum(&wl, &y)
            };
            let (mut y, mut mean, mut rstd) = (vec![0.0; rows * cols], vec![0.0; rows], vec![0.0; rows]);
            layernorm_forward(&mut y, &mut mean, &mut rstd, &x, &w, &b, rows, cols, eps);
            let (mut dx, mut dw, mut db) = (vec![f32::NAN; rows * cols], vec![9.0; cols], vec![9.0; cols]);
            layernorm_backward(&mut dx, &mut dw, &mut db, &wl, &x, &w, &mean, &rstd, rows, cols);
            check_grad("ln dx", &x, &dx, H, ATOL, RTOL, 64, &mut rng, |x| loss(x, &w, &b));
            check_grad("ln dw", &w, &dw, H, ATOL, RTOL, 64, &mut rng, |w| loss(&x, w, &b));
            check_grad("ln db", &b, &db, H, ATOL, RTOL, 64, &mut rng, |b| loss(&x, &w, b));
        }
    }

    #[test]
    fn rmsnorm_backward_matches_finite_differences_for_both_offsets() {
        let mut rng = rng(21);
        for w_offset in [0.0, 1.0] {
            for (rows, cols) in [(1, 1), (3, 5), (5, 7), (2, 3)] {
                // |x| >= 0.5, so a one-element row stays away from the kink of x / |x| at 0.
                let mut x = uniform(&mut rng, rows * cols, -1.5, 1.5);
                x.iter_mut().for_each(|v| *v += 0.5f32.copysign(*v));
                let w = uniform(&mut rng, cols, -1.0, 1.0);
                let wl = uniform(&mut rng, rows * cols, -1.0, 1.0);
                let eps = 1e-6;
                let loss = |x: &[f32], w: &[f32]| {
                    let (mut y, mut r) = (vec![0.0; rows * cols], vec![0.0; rows]);
                    rmsnorm_forward(&mut y, &mut r, x, w, rows, cols, eps, w_offset);
                    weighted_sum(&wl, &y)
                };
                let (mut y, mut rstd) = (vec![0.0; rows * cols], vec![0.0; rows]);
                rmsnorm_forward(&mut y, &mut rstd, &x, &w, rows, cols, eps, w_offset);
                let (mut dx, mut dw) = (vec![f32::NAN; rows * cols], vec![9.0; cols]);
                rmsnorm_backward(&mut dx, &mut dw, &wl, &x, &w, &rstd, rows, cols, w_offset);
                let what = format!("offset {w_offset} ({rows},{cols})");
                check_grad(&format!("rms dx {what}"), &x, &dx, H, ATOL, RTOL, 64, &mut rng, |x| loss(x, &w));
                check_grad(&format!("rms dw {what}"), &w, &dw, H, ATOL, RTOL, 64, &mut rng, |w| loss(&x, w));
            }
        }
    }
}
