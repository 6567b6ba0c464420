//! Causal self-attention on the fast CPU path: one task per (batch, kv head), the scores and
//! products of each head through `gemm`, in f32. The math is `kernels_ref::attention`'s
//! (grouped-query heads, sliding window, soft cap; FlashAttention-2's backward): the forward
//! keeps only each row's log-sum-exp, and the backward recomputes the head's probabilities
//! from it, `p_ij = exp(s_ij - lse_i)`, with `D_i = Σ_j p_ij dp_ij`.

use super::matmul_serial;
use super::simd::{exp, row_sum, vectorized};
use kernels_ref::{AttnDims, MatmulDims};
use rayon::prelude::*;

/// One input's rows: head `h` of row `r` (= b*T + t) starts at `r * width + offset + h * D`
/// (dense q, k or v, or one part of packed [q | k | v] rows).
#[derive(Clone, Copy)]
pub struct Rows<'a> {
    pub data: &'a [f32],
    pub width: usize,
    pub offset: usize,
}

impl Rows<'_> {
    /// Head `h` of batch `b` as a dense (T, D) matrix.
    fn head(&self, b: usize, h: usize, d: &AttnDims) -> Vec<f32> {
        let mut out = Vec::with_capacity(d.t * d.d);
        for t in 0..d.t {
            let at = (b * d.t + t) * self.width + self.offset + h * d.d;
            out.extend_from_slice(&self.data[at..at + d.d]);
        }
        out
    }

    /// The `part` values of every row from `offset` on, as a dense (rows, part) matrix.
    pub fn dense(&self, part: usize) -> Vec<f32> {
        if self.offset == 0 && part == self.width {
            return self.data.to_vec();
        }
        let rows = self.data.len() / self.width.max(1);
        let mut out = Vec::with_capacity(rows * part);
        for r in 0..rows {
            let at = r * self.width + self.offset;
            out.extend_from_slice(&self.data[at..at + part]);
        }
        out
    }
}

fn mm(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> MatmulDims {
    MatmulDims { batch: 1, m, n, k, trans_a, trans_b }
}

/// The (T, T) scores of one head, `s_ij` for visible `j` and -inf elsewhere, and d s / d u.
fn scores(q: &[f32], k: &[f32], d: &AttnDims) -> (Vec<f32>, Option<Vec<f32>>) {
    let t = d.t;
    let mut s = vec![0f32; t * t];
    matmul_serial(&mut s, q, k, mm(t, t, d.d, false, true), false);
    let mut grad = d.softcap.map(|_| vec![0f32; t * t]);
    for i in 0..t {
        let lo = d.window.map_or(0, |w| (i + 1).saturating_sub(w));
        let row = &mut s[i * t..(i + 1) * t];
        for (j, x) in row.iter_mut().enumerate() {
            if j < lo || j > i {
                *x = f32::NEG_INFINITY;
                continue;
            }
            let u = d.scale * *x;
            *x = match d.softcap {
                None => u,
                Some(c) => {
                    let th = (u / c).tanh();
                    if let Some(g) = grad.as_mut() {
                        g[i * t + j] = 1.0 - th * th;
                    }
                    c * th
                }
            };
        }
    }
    (s, grad)
}

/// `out (B,T,H,D)` and `lse (B,H,T)` from q, k and v.
pub fn forward(out: &mut [f32], lse: &mut [f32], q: Rows, k: Rows, v: Rows, d: AttnDims) {
    let (b, t, h, hd) = (d.b, d.t, d.h, d.d);
    assert_eq!(out.len(), b * t * h * hd, "cpu attention: out must hold B*T*H*D");
    assert_eq!(lse.len(), b * h * t, "cpu attention: lse must hold B*H*T");
    assert!(d.kv_h > 0 && h % d.kv_h == 0, "cpu attention: H {h} is not a multiple of KVH {}", d.kv_h);
    if t == 0 {
        return;
    }
    let group = h / d.kv_h;
    let heads: Vec<(Vec<f32>, Vec<f32>)> = (0..b * h)
        .into_par_iter()
        .map(|bh| {
            let (bi, hi) = (bh / h, bh % h);
            let (qh, kh, vh) = (q.head(bi, hi, &d), k.head(bi, hi / group, &d), v.head(bi, hi / group, &d));
            let (mut p, _) = scores(&qh, &kh, &d);
            let mut lse_h = vec![0f32; t];
            for (row, l) in p.chunks_mut(t).zip(&mut lse_h) {
                *l = vectorized(
                    #[inline(always)]
                    || {
                        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                        row.iter_mut().for_each(
                            #[inline(always)]
                            |x| *x = exp(*x - max),
                        );
                        let sum = row_sum(
                            row,
                            row,
                            #[inline(always)]
                            |x, _| x,
                        );
                        let inv = 1.0 / sum;
                        row.iter_mut().for_each(
                            #[inline(always)]
                            |x| *x *= inv,
                        );
                        max + sum.ln()
                    },
                );
            }
            let mut o = vec![0f32; t * hd];
            matmul_serial(&mut o, &p, &vh, mm(t, hd, t, false, false), false);
            (o, lse_h)
        })
        .collect();
    for (bh, (o, l)) in heads.iter().enumerate() {
        let (bi, hi) = (bh / h, bh % h);
        lse[bh * t..(bh + 1) * t].copy_from_slice(l);
        for ti in 0..t {
            let at = ((bi * t + ti) * h + hi) * hd;
            out[at..at + hd].copy_from_slice(&o[ti * hd..(ti + 1) * hd]);
        }
    }
}

/// Dense `dq (B,T,H,D)`, `dk`, `dv (B,T,KVH,D)` from `dout (B,T,H,D)` and the saved `lse`.
pub fn backward(dout: &[f32], [q, k, v]: [Rows; 3], lse: &[f32], d: AttnDims) -> [Vec<f32>; 3] {
    let (b, t, h, kvh, hd) = (d.b, d.t, d.h, d.kv_h, d.d);
    let group = h / kvh;
    let dense_out = Rows { data: dout, width: h * hd, offset: 0 };
    // one task per (batch, kv head): it owns dk and dv of that head and the dq of its group
    let parts: Vec<(Vec<Vec<f32>>, Vec<f32>, Vec<f32>)> = (0..b * kvh)
        .into_par_iter()
        .map(|bg| {
            let (bi, gi) = (bg / kvh, bg % kvh);
            let (kh, vh) = (k.head(bi, gi, &d), v.head(bi, gi, &d));
            let (mut dk, mut dv) = (vec![0f32; t * hd], vec![0f32; t * hd]);
            let mut dqs = Vec::with_capacity(group);
            for hi in gi * group..(gi + 1) * group {
                let (qh, doh) = (q.head(bi, hi, &d), dense_out.head(bi, hi, &d));
                let (mut p, dcap) = scores(&qh, &kh, &d);
                let l = &lse[(bi * h + hi) * t..][..t];
                for (row, &li) in p.chunks_mut(t).zip(l) {
                    vectorized(
                        #[inline(always)]
                        || {
                            row.iter_mut().for_each(
                                #[inline(always)]
                                |x| *x = exp(*x - li),
                            )
                        },
                    );
                }
                // dv += p^T dout
                matmul_serial(&mut dv, &p, &doh, mm(t, hd, t, true, false), true);
                // dp = dout v^T, then ds = p (dp - D) s'(u), scaled for q·k
                let mut ds = vec![0f32; t * t];
                matmul_serial(&mut ds, &doh, &vh, mm(t, t, hd, false, true), false);
                for i in 0..t {
                    let (pr, dr) = (&p[i * t..(i + 1) * t], &mut ds[i * t..(i + 1) * t]);
                    let cap = dcap.as_ref().map(|g| &g[i * t..(i + 1) * t]);
                    let scale = d.scale;
                    vectorized(
                        #[inline(always)]
                        || {
                            let di = row_sum(
                                pr,
                                dr,
                                #[inline(always)]
                                |p, d| p * d,
                            );
                            match cap {
                                None => dr.iter_mut().zip(pr).for_each(
                                    #[inline(always)]
                                    |(x, &p)| *x = p * (*x - di) * scale,
                                ),
                                Some(cap) => dr.iter_mut().zip(pr).zip(cap).for_each(
                                    #[inline(always)]
                                    |((x, &p), &c)| *x = p * (*x - di) * c * scale,
                                ),
                            }
                        },
                    );
                }
                let mut dq = vec![0f32; t * hd];
                matmul_serial(&mut dq, &ds, &kh, mm(t, hd, t, false, false), false);
                matmul_serial(&mut dk, &ds, &qh, mm(t, hd, t, true, false), true);
                dqs.push(dq);
            }
            (dqs, dk, dv)
        })
        .collect();
    let (mut dq, mut dk, mut dv) =
        (vec![0f32; b * t * h * hd], vec![0f32; b * t * kvh * hd], vec![0f32; b * t * kvh * hd]);
    for (bg, (dqs, dkh, dvh)) in parts.iter().enumerate() {
        let (bi, gi) = (bg / kvh, bg % kvh);
        for ti in 0..t {
            let at = ((bi * t + ti) * kvh + gi) * hd;
            dk[at..at + hd].copy_from_slice(&dkh[ti * hd..(ti + 1) * hd]);
            dv[at..at + hd].copy_from_slice(&dvh[ti * hd..(ti + 1) * hd]);
            for (k, dqh) in dqs.iter().enumerate() {
                let at = ((bi * t + ti) * h + gi * group + k) * hd;
                dq[at..at + hd].copy_from_slice(&dqh[ti * hd..(ti + 1) * hd]);
            }
        }
    }
    [dq, dk, dv]
}
