//! The LM head fused with the cross-entropy on the fast CPU path (the math of
//! `kernels_ref::linear_cross_entropy`): the rows are walked in blocks whose (rows x
//! vocabulary) logits fit [`BLOCK_BYTES`], each block's logits one threaded `gemm`, so the
//! whole logits never exist. The forward keeps each row's log-sum-exp; the backward recomputes
//! a block's logits from it and turns them into dx and dW with two more products.

use super::elementwise::logsumexp;
use super::matmul;
use kernels_ref::{self as kr, HeadDims, MatmulDims, IGNORE_INDEX};
use rayon::prelude::*;

/// The logits of one block of rows at most (32 MiB: a 262,144-entry vocabulary walks 32 rows
/// at a time, GPT-2's 166).
pub const BLOCK_BYTES: usize = 32 << 20;

fn block_rows(d: &HeadDims) -> usize {
    (BLOCK_BYTES / 4 / d.v.max(1)).clamp(1, d.n.max(1))
}

fn check(x: &[f32], w: &[f32], targets: &[i32], d: &HeadDims) {
    assert_eq!(x.len(), d.n * d.c, "cpu head loss: x must hold N*C");
    assert_eq!(w.len(), d.v * d.c, "cpu head loss: W must hold V*C");
    assert_eq!(targets.len(), d.n, "cpu head loss: targets must hold N");
    assert!(d.v > 0, "cpu head loss: the vocabulary is empty");
}

/// The (capped) logits (rows, V) of `x_blk (rows, C)`.
fn logits(x_blk: &[f32], w: &[f32], d: &HeadDims) -> Vec<f32> {
    let rows = x_blk.len() / d.c.max(1);
    let mut y = vec![0f32; rows * d.v];
    // W stored (V, C) reads as B = W^T; stored (C, V) it is B as it is
    matmul(
        &mut y,
        x_blk,
        w,
        MatmulDims { batch: 1, m: rows, n: d.v, k: d.c, trans_a: false, trans_b: d.trans_w },
        false,
    );
    if let Some(c) = d.softcap {
        y.par_iter_mut().for_each(|z| *z = c * (*z / c).tanh());
    }
    y
}

/// The mean loss over kept rows (NaN when every row is ignored, as PyTorch gives) and each row's
/// log-sum-exp in `lse (N)`.
pub fn forward(lse: &mut [f32], x: &[f32], w: &[f32], targets: &[i32], d: HeadDims) -> f32 {
    check(x, w, targets, &d);
    assert_eq!(lse.len(), d.n, "cpu head loss: lse must hold N");
    let rows = block_rows(&d);
    let mut per_row = Vec::with_capacity(d.n);
    for (blk, (lse_b, t_b)) in lse.chunks_mut(rows).zip(targets.chunks(rows)).enumerate() {
        let r0 = blk * rows;
        let y = logits(&x[r0 * d.c..(r0 + t_b.len()) * d.c], w, &d);
        let losses: Vec<Option<f64>> = y
            .par_chunks(d.v)
            .zip(lse_b.par_iter_mut())
            .zip(t_b.par_iter())
            .map(|((yr, l), &t)| {
                *l = logsumexp(yr);
                kr::target_index("cpu head loss", t, d.v).map(|t| (*l - yr[t]) as f64)
            })
            .collect();
        per_row.extend(losses);
    }
    kr::mean_over_kept(&per_row)
}

/// The gradients of `dloss * mean loss`: `dx (N, C)` and `dw` (W's layout), each optional and
/// written, or added to when its flag says so.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    mut dx: Option<(&mut [f32], bool)>,
    mut dw: Option<(&mut [f32], bool)>,
    x: &[f32],
    w: &[f32],
    lse: &[f32],
    targets: &[i32],
    dloss: f32,
    d: HeadDims,
) {
    check(x, w, targets, &d);
    let count = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
    let scale = if count == 0 { 0.0 } else { dloss / count as f32 };
    let rows = block_rows(&d);
    let c = d.c;
    if let (0, Some((dw, false))) = (d.n, dw.as_mut()) {
        dw.fill(0.0); // no block writes it
    }
    for (blk, (lse_b, t_b)) in lse.chunks(rows).zip(targets.chunks(rows)).enumerate() {
        let (r0, r1) = (blk * rows, blk * rows + t_b.len());
        let x_blk = &x[r0 * c..r1 * c];
        let mut g = logits(x_blk, w, &d);
        g.par_chunks_mut(d.v).zip(lse_b.par_iter()).zip(t_b.par_iter()).for_each(|((gr, &l), &t)| {
            let Some(t) = kr::target_index("cpu head loss backward", t, d.v) else {
                gr.fill(0.0);
                return;
            };
            for (v, y) in gr.iter_mut().enumerate() {
                let cap = d.softcap.map_or(1.0, |cap| 1.0 - (*y / cap) * (*y / cap));
                let p = (*y - l).exp();
                *y = (p - if v == t { 1.0 } else { 0.0 }) * scale * cap;
            }
        });
        let n = t_b.len();
        if let Some((dx, acc)) = dx.as_mut() {
            // dx_blk (n, C) = g (n, V) W (V, C); W stored (C, V) reads transposed
            let dims = MatmulDims { batch: 1, m: n, n: c, k: d.v, trans_a: false, trans_b: !d.trans_w };
            matmul(&mut dx[r0 * c..r1 * c], &g, w, dims, *acc);
        }
        if let Some((dw, acc)) = dw.as_mut() {
            let first = blk == 0;
            let acc = *acc || !first;
            if d.trans_w {
                // dW (V, C) += g^T x_blk
                let dims = MatmulDims { batch: 1, m: d.v, n: c, k: n, trans_a: true, trans_b: false };
                matmul(dw, &g, x_blk, dims, acc);
            } else {
                // dW (C, V) += x_blk^T g
                let dims = MatmulDims { batch: 1, m: c, n: d.v, k: n, trans_a: true, trans_b: false };
                matmul(dw, x_blk, &g, dims, acc);
            }
        }
    }
}
