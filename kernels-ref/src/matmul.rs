//! Batched matrix multiply with optional transposes and bias, forward and backward, plus the fast
//! f32 [`sgemm`] of the CPU path.
//!
//! Math: `C = op(A) · op(B) + bias`, with `op(X)` = `X` or `Xᵀ` as stored. Backward:
//! `d op(A) = dC · op(B)ᵀ`, `d op(B) = op(A)ᵀ · dC`, `dbias = Σ_rows dC`; each is written back in
//! the storage layout of its operand. The reference multiplies f32 values converted to f64 (their
//! products are exact in f64) and sums in f64 through `matrixmultiply::dgemm`, blocked so that a
//! 512 x 768 x 50257 LM-head product needs a few MiB of f64 scratch, not gigabytes.

use matrixmultiply::{dgemm, sgemm as mm_sgemm};
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulDims {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
}

/// A read-only strided matrix inside an f32 slice: element `(i, j)` is `data[i*rs + j*cs]`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    /// `op(X)` of a row-major `(rows, cols)` matrix, or of a stored `(cols, rows)` one when
    /// `trans` is set.
    fn op(data: &'a [f32], rows: usize, cols: usize, trans: bool) -> Self {
        let (rs, cs) = if trans { (1, rows) } else { (cols, 1) };
        View { data, rows, cols, rs, cs }
    }

    fn t(self) -> Self {
        View { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }

    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.rs + j * self.cs]
    }
}

// Block sizes of the f64 scratch: each block is at most 2 MiB.
const MB: usize = 512;
const NB: usize = 512;
const KB: usize = 512;

/// `C (m,n) = A (m,k) · B (k,n) + bias (n)`, summed in f64 and rounded once to f32; C element
/// `(i, j)` is written at `c[i*rsc + j*csc]` (overwritten).
fn gemm_f64(c: &mut [f32], rsc: usize, csc: usize, a: View, b: View, bias: Option<&[f32]>) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "gemm: inner dimensions differ");
    if let Some(bias) = bias {
        assert_eq!(bias.len(), n, "gemm: bias length must be N");
    }
    let mut abuf = vec![0.0f64; MB * KB];
    let mut bbuf = vec![0.0f64; KB * NB];
    let mut acc = vec![0.0f64; MB * NB];
    for i0 in (0..m).step_by(MB) {
        let mb = MB.min(m - i0);
        for j0 in (0..n).step_by(NB) {
            let nb = NB.min(n - j0);
            for i in 0..mb {
                for j in 0..nb {
                    acc[i * nb + j] = bias.map_or(0.0, |bias| bias[j0 + j] as f64);
                }
            }
            for p0 in (0..k).step_by(KB) {
                let kb = KB.min(k - p0);
                for i in 0..mb {
                    for p in 0..kb {
                        abuf[i * kb + p] = a.at(i0 + i, p0 + p) as f64;
                    }
                }
                for p in 0..kb {
                    for j in 0..nb {
                        bbuf[p * nb + j] = b.at(p0 + p, j0 + j) as f64;
                    }
                }
                // SAFETY: abuf holds mb*kb, bbuf kb*nb and acc mb*nb contiguous row-major
                // elements, exactly the extents the strides below address.
                unsafe {
                    dgemm(
                        mb,
                        kb,
                        nb,
                        1.0,
                        abuf.as_ptr(),
                        kb as isize,
                        1,
                        bbuf.as_ptr(),
                        nb as isize,
                        1,
                        1.0,
                        acc.as_mut_ptr(),
                        nb as isize,
                        1,
                    );
                }
            }
            for i in 0..mb {
                for j in 0..nb {
                    c[(i0 + i) * rsc + (j0 + j) * csc] = acc[i * nb + j] as f32;
                }
            }
        }
    }
}

/// `C (batch,M,N) = op(A) (batch,M,K) · op(B) (batch,K,N) + bias (N)`, overwritten.
pub fn matmul_forward(c: &mut [f32], a: &[f32], b: &[f32], bias: Option<&[f32]>, d: MatmulDims) {
    let MatmulDims { batch, m, n, k, trans_a, trans_b } = d;
    assert_eq!(a.len(), batch * m * k, "matmul_forward: A must hold batch*M*K");
    assert_eq!(b.len(), batch * k * n, "matmul_forward: B must hold batch*K*N");
    assert_eq!(c.len(), batch * m * n, "matmul_forward: C must hold batch*M*N");
    for bi in 0..batch {
        let a = View::op(&a[bi * m * k..(bi + 1) * m * k], m, k, trans_a);
        let b = View::op(&b[bi * k * n..(bi + 1) * k * n], k, n, trans_b);
        gemm_f64(&mut c[bi * m * n..(bi + 1) * m * n], n, 1, a, b, bias);
    }
}

/// Gradients of [`matmul_forward`]: `dA` in A's storage layout, `dB` in B's, `dbias (N)` summed
/// over batch and rows. Each is optional and overwritten.
pub fn matmul_backward(
    da: Option<&mut [f32]>,
    db: Option<&mut [f32]>,
    dbias: Option<&mut [f32]>,
    dc: &[f32],
    a: &[f32],
    b: &[f32],
    d: MatmulDims,
) {
    let MatmulDims { batch, m, n, k, trans_a, trans_b } = d;
    assert_eq!(a.len(), batch * m * k, "matmul_backward: A must hold batch*M*K");
    assert_eq!(b.len(), batch * k * n, "matmul_backward: B must hold batch*K*N");
    assert_eq!(dc.len(), batch * m * n, "matmul_backward: dC must hold batch*M*N");
    if let Some(da) = da {
        assert_eq!(da.len(), a.len(), "matmul_backward: dA must match A");
        // d op(A) (M,K) = dC (M,N) · op(B)ᵀ (N,K), stored as A is.
        let (rs, cs) = if trans_a { (1, m) } else { (k, 1) };
        for bi in 0..batch {
            let dcv = View::op(&dc[bi * m * n..(bi + 1) * m * n], m, n, false);
            let bv = View::op(&b[bi * k * n..(bi + 1) * k * n], k, n, trans_b);
            gemm_f64(&mut da[bi * m * k..(bi + 1) * m * k], rs, cs, dcv, bv.t(), None);
        }
    }
    if let Some(db) = db {
        assert_eq!(db.len(), b.len(), "matmul_backward: dB must match B");
        // d op(B) (K,N) = op(A)ᵀ (K,M) · dC (M,N), stored as B is.
        let (rs, cs) = if trans_b { (1, k) } else { (n, 1) };
        for bi in 0..batch {
            let av = View::op(&a[bi * m * k..(bi + 1) * m * k], m, k, trans_a);
            let dcv = View::op(&dc[bi * m * n..(bi + 1) * m * n], m, n, false);
            gemm_f64(&mut db[bi * k * n..(bi + 1) * k * n], rs, cs, av.t(), dcv, None);
        }
    }
    if let Some(dbias) = dbias {
        assert_eq!(dbias.len(), n, "matmul_backward: dbias must hold N");
        dbias.par_iter_mut().enumerate().for_each(|(j, out)| {
            let s: f64 = (0..batch * m).map(|r| dc[r * n + j] as f64).sum();
            *out = s as f32;
        });
    }
}

/// The fast CPU path: `C (M,N) = op(A) · op(B)` in f32 through threaded `matrixmultiply`,
/// overwritten. A is stored `(M,K)` or, if `trans_a`, `(K,M)`; B `(K,N)` or, if `trans_b`, `(N,K)`.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
) {
    assert_eq!(a.len(), m * k, "sgemm: A must hold M*K");
    assert_eq!(b.len(), k * n, "sgemm: B must hold K*N");
    assert_eq!(c.len(), m * n, "sgemm: C must hold M*N");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c.fill(0.0);
        return;
    }
    let av = View::op(a, m, k, trans_a);
    let bv = View::op(b, k, n, trans_b);
    // SAFETY: the lengths asserted above are exactly the extents these strides address, and
    // beta = 0 means C is written without being read.
    unsafe {
        mm_sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            av.rs as isize,
            av.cs as isize,
            b.as_ptr(),
            bv.rs as isize,
            bv.cs as isize,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

#[cfg(test)]
mod tests;

/// Rows `r0..r0 + rows` and steps `k0..k0 + k` of a matrix with strides (`s_m`, `s_k`) packed
/// as the `subgroup-uniform` matmul reads A: blocks of 64 rows, each `windows` windows of 4,096
/// values, window w holding steps 64w..64w + 64 k-major (row r of step kk at kk * 64 + r); rows
/// and steps past the range are 0.
pub fn pack_a_windows(
    a: &[f32],
    (s_m, s_k): (usize, usize),
    (r0, rows): (usize, usize),
    (k0, k): (usize, usize),
    windows: usize,
) -> Vec<f32> {
    let blocks = rows.div_ceil(64);
    let mut out = vec![0f32; blocks * windows * 4096];
    for r in 0..rows {
        for kk in 0..k {
            let (block, row) = (r / 64, r % 64);
            let (win, step) = (kk / 64, kk % 64);
            out[(block * windows + win) * 4096 + step * 64 + row] = a[(r0 + r) * s_m + (k0 + kk) * s_k];
        }
    }
    out
}

/// Steps `k0..k0 + k` and columns `n0..n0 + n` of a matrix with strides (`s_k`, `s_n`) packed as
/// the `subgroup-uniform` matmul's texture holds B: row kk of `width` values holds the columns
/// of step k0 + kk, zeros past `n`.
pub fn pack_b_texels(
    b: &[f32],
    (s_k, s_n): (usize, usize),
    (k0, k): (usize, usize),
    (n0, n): (usize, usize),
    width: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; k * width];
    for kk in 0..k {
        for j in 0..n {
            out[kk * width + j] = b[(k0 + kk) * s_k + (n0 + j) * s_n];
        }
    }
    out
}
