//! LayerNorm and RMSNorm on the fast CPU path: the math of `kernels_ref::norm` in f32, each
//! row one [`vectorized`] pass (eight partial sums, so that the row sums vectorize), and the
//! weight's gradient summed over blocks of [`ROWS`] rows per task, then across the blocks
//! (the reference sums each column down all rows, a strided walk per column).

use super::simd::{row_sum, row_sum3, vectorized};
use rayon::prelude::*;

/// Rows per task of the weight gradients' sums.
const ROWS: usize = 32;

fn lengths(f: &str, rows: usize, cols: usize, x: usize, w: usize, stats: usize) {
    assert!(
        x == rows * cols && w == cols && stats == rows,
        "cpu {f}: lengths do not match rows {rows}, cols {cols}"
    );
}

/// `y (rows, cols)`, `mean (rows)`, `rstd (rows)` from `x`, `w (cols)`, `b (cols)`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    y: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    w: &[f32],
    b: &[f32],
    cols: usize,
    eps: f32,
) {
    let rows = mean.len();
    lengths("layernorm", rows, cols, x.len(), w.len(), rstd.len());
    assert!(y.len() == x.len() && b.len() == cols, "cpu layernorm: y or b has the wrong length");
    if cols == 0 {
        return;
    }
    let n = cols as f32;
    y.par_chunks_mut(cols)
        .zip(x.par_chunks(cols))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .for_each(|((y, x), (mean, rstd))| {
            vectorized(
                #[inline(always)]
                || {
                    let mu = row_sum(
                        x,
                        x,
                        #[inline(always)]
                        |a, _| a,
                    ) / n;
                    let var = row_sum(
                        x,
                        x,
                        #[inline(always)]
                        |a, _| (a - mu) * (a - mu),
                    ) / n;
                    let rs = 1.0 / (var + eps).sqrt();
                    for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
                        *y = (x - mu) * rs * w + b;
                    }
                    (*mean, *rstd) = (mu, rs);
                },
            )
        });
}

/// `Σ_rows f(row)` of per-row contributions to a (cols) gradient, over blocks of [`ROWS`].
fn column_sums(
    rows: usize,
    cols: usize,
    outs: usize,
    f: impl Fn(usize, &mut [Vec<f32>]) + Sync,
) -> Vec<Vec<f32>> {
    (0..rows.div_ceil(ROWS))
        .into_par_iter()
        .map(|blk| {
            let mut acc = vec![vec![0f32; cols]; outs];
            for r in blk * ROWS..((blk + 1) * ROWS).min(rows) {
                f(r, &mut acc);
            }
            acc
        })
        .reduce(
            || vec![vec![0f32; cols]; outs],
            |mut a, b| {
                for (a, b) in a.iter_mut().zip(b) {
                    a.iter_mut().zip(b).for_each(
                        #[inline(always)]
                        |(a, b)| *a += b,
                    );
                }
                a
            },
        )
}

/// `dx (rows, cols)`, `dw (cols)`, `db (cols)`, each written when given, from `dy` and the
/// saved `mean`, `rstd`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dx: Option<&mut [f32]>,
    dwb: Option<(&mut [f32], &mut [f32])>,
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    mean: &[f32],
    rstd: &[f32],
    cols: usize,
) {
    let rows = mean.len();
    lengths("layernorm backward", rows, cols, x.len(), w.len(), rstd.len());
    assert_eq!(dy.len(), x.len(), "cpu layernorm backward: dy has the wrong length");
    if cols == 0 {
        return;
    }
    let n = cols as f32;
    if let Some(dx) = dx {
        dx.par_chunks_mut(cols).zip(dy.par_chunks(cols).zip(x.par_chunks(cols))).enumerate().for_each(
            |(r, (dx, (dy, x)))| {
                let (mu, rs) = (mean[r], rstd[r]);
                vectorized(
                    #[inline(always)]
                    || {
                        let g_mean = row_sum(
                            dy,
                            w,
                            #[inline(always)]
                            |d, w| d * w,
                        ) / n;
                        let gx_mean = row_sum3(
                            dy,
                            w,
                            x,
                            #[inline(always)]
                            |d, w, x| d * w * (x - mu),
                        ) * rs
                            / n;
                        for (((dx, &d), &w), &x) in dx.iter_mut().zip(dy).zip(w).zip(x) {
                            *dx = rs * (d * w - g_mean - (x - mu) * rs * gx_mean);
                        }
                    },
                )
            },
        );
    }
    if let Some((dw, db)) = dwb {
        let sums = column_sums(rows, cols, 2, |r, acc| {
            let (dy, x) = (&dy[r * cols..(r + 1) * cols], &x[r * cols..(r + 1) * cols]);
            let (mu, rs) = (mean[r], rstd[r]);
            let [aw, ab] = acc else { unreachable!("two sums") };
            vectorized(
                #[inline(always)]
                || {
                    for (((aw, ab), &d), &x) in aw.iter_mut().zip(ab.iter_mut()).zip(dy).zip(x) {
                        *aw += d * (x - mu) * rs;
                        *ab += d;
                    }
                },
            )
        });
        dw.copy_from_slice(&sums[0]);
        db.copy_from_slice(&sums[1]);
    }
}

/// `y (rows, cols)`, `rstd (rows)` from `x`, `w (cols)`; the scale is `w + w_offset`.
pub fn rmsnorm_forward(
    y: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    w: &[f32],
    cols: usize,
    eps: f32,
    w_offset: f32,
) {
    let rows = rstd.len();
    lengths("rmsnorm", rows, cols, x.len(), w.len(), rows);
    assert_eq!(y.len(), x.len(), "cpu rmsnorm: y has the wrong length");
    if cols == 0 {
        return;
    }
    let n = cols as f32;
    y.par_chunks_mut(cols).zip(x.par_chunks(cols)).zip(rstd.par_iter_mut()).for_each(|((y, x), rstd)| {
        vectorized(
            #[inline(always)]
            || {
                let rs = 1.0
                    / (row_sum(
                        x,
                        x,
                        #[inline(always)]
                        |a, _| a * a,
                    ) / n
                        + eps)
                        .sqrt();
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                    *y = x * rs * (w + w_offset);
                }
                *rstd = rs;
            },
        )
    });
}

/// `dx (rows, cols)` and `dw (cols)`, each written when given, from `dy` and the saved `rstd`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    dx: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    cols: usize,
    w_offset: f32,
) {
    let rows = rstd.len();
    lengths("rmsnorm backward", rows, cols, x.len(), w.len(), rows);
    assert_eq!(dy.len(), x.len(), "cpu rmsnorm backward: dy has the wrong length");
    if cols == 0 {
        return;
    }
    let n = cols as f32;
    if let Some(dx) = dx {
        dx.par_chunks_mut(cols).zip(dy.par_chunks(cols).zip(x.par_chunks(cols))).enumerate().for_each(
            |(r, (dx, (dy, x)))| {
                let rs = rstd[r];
                vectorized(
                    #[inline(always)]
                    || {
                        let gx_mean = row_sum3(
                            dy,
                            w,
                            x,
                            #[inline(always)]
                            |d, w, x| d * (w + w_offset) * x,
                        ) / n;
                        for (((dx, &d), &w), &x) in dx.iter_mut().zip(dy).zip(w).zip(x) {
                            *dx = rs * (d * (w + w_offset) - x * rs * rs * gx_mean);
                        }
                    },
                )
            },
        );
    }
    if let Some(dw) = dw {
        let sums = column_sums(rows, cols, 1, |r, acc| {
            let (dy, x) = (&dy[r * cols..(r + 1) * cols], &x[r * cols..(r + 1) * cols]);
            let rs = rstd[r];
            vectorized(
                #[inline(always)]
                || {
                    for ((a, &d), &x) in acc[0].iter_mut().zip(dy).zip(x) {
                        *a += d * x * rs;
                    }
                },
            )
        });
        dw.copy_from_slice(&sums[0]);
    }
}
