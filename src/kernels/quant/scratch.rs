//! The scratch variant of the quantized products: W is walked in blocks of whole rows; each
//! block is dequantized (`quant.wgsl`'s `dequantize`) into one f32 scratch buffer and
//! multiplied by the f32 matmul (`matmul::matmul_strided`, with whichever kernel
//! `matmul::current_kernel` picks), so the product runs at the f32 matmul's speed for one decode
//! of each weight per call.
//!
//! - forward: `y[:, rows] = x . W[rows, :]^T (+ bias[rows])` for each block of rows;
//! - dX: `dx += dy[:, rows] . W[rows, :]`, the blocks after the first adding into dx.
//!
//! The scratch holds at most [`SCRATCH_BYTES`](super::SCRATCH_BYTES) (and one binding), so a
//! 262,144 x 640 LM head costs 32 MiB of f32 at a time instead of 640 MiB. It is a pooled
//! [`Tensor`]: released when the call returns and handed to the next call of the same size
//! (the GPU runs the recorded work in order, so a later user of the buffer sees the writes of
//! this call finished). Blocks never straddle a chunk of W; the f32 products are further cut at
//! every chunk boundary of x, y (dy, dx), as the fused kernels' are. Math: the reference is the
//! same as the fused kernels' (`kernels_ref::quant::dequantize`, then an f64 matmul).

use super::{chunk_starts, cuts, dequantize_rows, locate, starts, SCRATCH_BYTES, SCRATCH_LIMIT};
use crate::error::Result;
use crate::gpu::Bind;
use crate::gpu::{Gpu, QTensor, Split, Tensor};
use crate::kernels::matmul::{matmul_strided, Dims, View};

/// Rows of W per block: as many as the scratch limit holds, in whole 256-column tiles of the
/// subgroup matmul where there is room for one, at least one row, at most N.
fn block_rows(gpu: &Gpu, n: usize, k: usize) -> usize {
    let limit = SCRATCH_LIMIT.with(|v| v.get()).unwrap_or(SCRATCH_BYTES).min(gpu.max_binding() as usize);
    let rows = (limit / (4 * k)).max(1);
    let rows = if rows >= 256 { rows / 256 * 256 } else { rows };
    rows.min(n)
}

/// W's row blocks (inside its chunks) and a scratch tensor for the largest.
fn blocks(gpu: &Gpu, w: &QTensor, what: &str) -> Result<(Vec<(usize, usize)>, Tensor)> {
    let (n, k) = (w.rows(), w.cols());
    let blocks = cuts(n, &chunk_starts(w), block_rows(gpu, n, k));
    let rows = blocks.iter().map(|b| b.1).max().unwrap_or(1);
    let _c = crate::gpu::Category::Staging.enter(); // memory report: dequantization scratch
    let scratch = Tensor::empty(gpu, &[rows, k], what)?;
    Ok((blocks, scratch))
}

/// `b0..b0 + len` cut at the points of `at` inside it.
fn pieces(b0: usize, len: usize, at: &[usize]) -> Vec<(usize, usize)> {
    let mut points: Vec<usize> = at.iter().copied().filter(|&s| s > b0 && s < b0 + len).collect();
    points.extend([b0, b0 + len]);
    points.sort_unstable();
    points.dedup();
    points.windows(2).map(|w| (w[0], w[1] - w[0])).collect()
}

/// `y (M,N) = x (M,K) . W^T (+ bias) (+ y if accumulate)`; the arguments are checked by
/// `quant::qmatmul`.
pub(super) fn qmatmul(
    gpu: &Gpu,
    y: &Tensor,
    x: &Tensor,
    w: &QTensor,
    bias: Option<Bind<'_>>,
    accumulate: bool,
) -> Result<()> {
    let (m, k) = (x.rows(), x.cols());
    let (blocks, scratch) = blocks(gpu, w, "qmatmul scratch")?;
    let sb = scratch.single("qmatmul scratch")?;
    let ms = cuts(m, &[starts(x, Split::Rows), starts(y, Split::Rows)].concat(), usize::MAX);
    let ks = cuts(k, &starts(x, Split::Cols), usize::MAX);
    let y_cols = starts(y, Split::Cols);
    for &(b0, bl) in &blocks {
        dequantize_rows(gpu, sb, 0, w, b0, bl)?;
        for (n0, nl) in pieces(b0, bl, &y_cols) {
            for &(m0, ml) in &ms {
                let (yb, y_off, y_ld) = locate(y, m0, n0);
                let c = View::matrix(yb, y_off, y_ld, false);
                for (i, &(k0, kl)) in ks.iter().enumerate() {
                    let (xb, x_off, x_ld) = locate(x, m0, k0);
                    let a = View::matrix(xb, x_off, x_ld, false);
                    // B (K, N): the scratch rows, transposed
                    let b = View::matrix(sb, (n0 - b0) * k + k0, k, true);
                    let bias = bias.filter(|_| i == 0).map(|buf| (buf, n0));
                    let d = Dims { m: ml, n: nl, k: kl, nb1: 1, nb2: 1 };
                    matmul_strided(gpu, c, a, b, bias, d, 1.0, accumulate || i > 0)?;
                }
            }
        }
    }
    Ok(())
}

/// `dx (M,K) = dy (M,N) . W (+ dx if accumulate)`; the arguments are checked by
/// `quant::qmatmul_dx`.
pub(super) fn qmatmul_dx(gpu: &Gpu, dx: &Tensor, dy: &Tensor, w: &QTensor, accumulate: bool) -> Result<()> {
    let (m, k) = (dy.rows(), w.cols());
    let (blocks, scratch) = blocks(gpu, w, "qmatmul_dx scratch")?;
    let sb = scratch.single("qmatmul_dx scratch")?;
    let ms = cuts(m, &[starts(dx, Split::Rows), starts(dy, Split::Rows)].concat(), usize::MAX);
    let ks = cuts(k, &starts(dx, Split::Cols), usize::MAX);
    let dy_cols = starts(dy, Split::Cols);
    for &(b0, bl) in &blocks {
        dequantize_rows(gpu, sb, 0, w, b0, bl)?;
        for (n0, nl) in pieces(b0, bl, &dy_cols) {
            for &(m0, ml) in &ms {
                let (dyb, dy_off, dy_ld) = locate(dy, m0, n0);
                let a = View::matrix(dyb, dy_off, dy_ld, false);
                for &(k0, kl) in &ks {
                    let (dxb, dx_off, dx_ld) = locate(dx, m0, k0);
                    let c = View::matrix(dxb, dx_off, dx_ld, false);
                    let b = View::matrix(sb, (n0 - b0) * k + k0, k, false);
                    let d = Dims { m: ml, n: kl, k: nl, nb1: 1, nb2: 1 };
                    // the first rows of W write dx (or add to it when asked); the rest add
                    matmul_strided(gpu, c, a, b, None, d, 1.0, accumulate || n0 > 0)?;
                }
            }
        }
    }
    Ok(())
}
