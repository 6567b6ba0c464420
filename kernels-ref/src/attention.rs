//! Causal multi-head self-attention with grouped-query heads and an optional sliding window,
//! forward and backward (the core between the Q/K/V projections and the output projection).
//!
//! Math, per batch `b` and query head `h` (kv head `g = h / (H / KVH)`):
//! `u_ij = scale * q_i · k_j` for visible `j` (`j <= i`, and `i - j < window` when windowed),
//! `s_ij = u_ij`, or `c tanh(u_ij / c)` with a soft cap `c` (Gemma's `attn_logit_softcapping`),
//! `p_i = softmax_j(s_ij)` over visible `j` (invisible entries exactly 0), `out_i = Σ_j p_ij v_j`.
//! Backward: `dp_ij = dout_i · v_j`, `ds_ij = p_ij (dp_ij - Σ_j' p_ij' dp_ij') s'(u_ij)` with
//! `s'(u) = 1`, or `1 - tanh^2(u / c)` when capped,
//! `dq_i = scale Σ_j ds_ij k_j`, `dk_j = scale Σ_{h in group} Σ_i ds_ij q_i`,
//! `dv_j = Σ_{h in group} Σ_i p_ij dout_i`. Each output row is written by one task that sums
//! its terms in a fixed order, so results do not depend on the thread count.
//!
//! [`attention_forward_lse`] / [`attention_backward_lse`] are the flash-style twins (the GPU's
//! `kernels::flash_attention`): they keep only `lse_i = log Σ_j exp(s_ij)` (B,H,T) and recompute
//! `p_ij = exp(s_ij - lse_i)`, so no (B,H,T,T) tensor exists; the backward's row term is
//! `D_i = Σ_j p_ij dp_ij` (FlashAttention-2).

use rayon::prelude::*;

#[derive(Clone, Copy, Debug)]
pub struct AttnDims {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub kv_h: usize,
    pub d: usize,
    pub window: Option<usize>,
    pub scale: f32,
    /// soft cap `c` of the scores: `c tanh(scale q·k / c)` (None: no cap)
    pub softcap: Option<f32>,
}

impl AttnDims {
    fn check(&self, name: &str) {
        assert!(
            self.kv_h > 0 && self.h.is_multiple_of(self.kv_h),
            "{name}: H {} is not a multiple of KVH {}",
            self.h,
            self.kv_h
        );
        assert!(self.window != Some(0), "{name}: a window of 0 hides every position");
        let positive = |c: f32| c > 0.0 && c.is_finite();
        assert!(
            self.softcap.is_none_or(positive),
            "{name}: soft cap {:?} is not a positive number",
            self.softcap
        );
    }

    /// The score of a raw dot product `q·k`: `u = scale q·k`, soft-capped when a cap is set.
    fn score(&self, dot: f64) -> f64 {
        let u = self.scale as f64 * dot;
        self.softcap.map_or(u, |c| c as f64 * (u / c as f64).tanh())
    }

    /// d score / d u at a raw dot product `q·k`.
    fn score_grad(&self, dot: f64) -> f64 {
        self.softcap.map_or(1.0, |c| 1.0 - (self.scale as f64 * dot / c as f64).tanh().powi(2))
    }

    /// Visible key positions `j` for query position `i`.
    fn visible(&self, i: usize) -> std::ops::Range<usize> {
        let lo = self.window.map_or(0, |w| (i + 1).saturating_sub(w));
        lo..i + 1
    }

    fn q_at(&self, b: usize, t: usize, h: usize) -> usize {
        ((b * self.t + t) * self.h + h) * self.d
    }

    fn kv_at(&self, b: usize, t: usize, g: usize) -> usize {
        ((b * self.t + t) * self.kv_h + g) * self.d
    }
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

fn check_len(name: &str, what: &str, len: usize, want: usize) {
    assert_eq!(len, want, "{name}: {what} has {len} elements, expected {want}");
}

/// `out (B,T,H,D)` and `probs (B,H,T,T)` from `q (B,T,H,D)`, `k`, `v (B,T,KVH,D)`.
pub fn attention_forward(out: &mut [f32], probs: &mut [f32], q: &[f32], k: &[f32], v: &[f32], d: AttnDims) {
    let f = "attention_forward";
    d.check(f);
    let AttnDims { b, t, h, kv_h, d: hd, .. } = d;
    check_len(f, "out", out.len(), b * t * h * hd);
    check_len(f, "probs", probs.len(), b * h * t * t);
    check_len(f, "q", q.len(), b * t * h * hd);
    check_len(f, "k", k.len(), b * t * kv_h * hd);
    check_len(f, "v", v.len(), b * t * kv_h * hd);
    if t == 0 {
        return;
    }
    let group = h / kv_h;
    // probs: one task per (b, h, i) row.
    probs.par_chunks_mut(t).enumerate().for_each(|(row, p)| {
        let (bi, hi, i) = (row / (h * t), (row / t) % h, row % t);
        let qi = &q[d.q_at(bi, i, hi)..][..hd];
        let vis = d.visible(i);
        let s: Vec<f64> =
            vis.clone().map(|j| d.score(dot(qi, &k[d.kv_at(bi, j, hi / group)..][..hd]))).collect();
        let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = s.iter().map(|&x| (x - max).exp()).sum();
        p.fill(0.0);
        for (j, &sj) in vis.zip(&s) {
            p[j] = ((sj - max).exp() / sum) as f32;
        }
    });
    if hd == 0 {
        return;
    }
    // out: one task per (b, i, h) row.
    let probs = &*probs;
    out.par_chunks_mut(hd).enumerate().for_each(|(row, o)| {
        let (bi, i, hi) = (row / (t * h), (row / h) % t, row % h);
        let p = &probs[((bi * h + hi) * t + i) * t..][..t];
        for (c, o) in o.iter_mut().enumerate() {
            let s: f64 = d.visible(i).map(|j| p[j] as f64 * v[d.kv_at(bi, j, hi / group) + c] as f64).sum();
            *o = s as f32;
        }
    });
}

/// `dq (B,T,H,D)`, `dk`, `dv (B,T,KVH,D)`, all overwritten, from `dout (B,T,H,D)` and the saved
/// `probs (B,H,T,T)`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    d: AttnDims,
) {
    let f = "attention_backward";
    d.check(f);
    let AttnDims { b, t, h, kv_h, d: hd, .. } = d;
    check_len(f, "dq", dq.len(), b * t * h * hd);
    check_len(f, "dk", dk.len(), b * t * kv_h * hd);
    check_len(f, "dv", dv.len(), b * t * kv_h * hd);
    check_len(f, "dout", dout.len(), b * t * h * hd);
    check_len(f, "q", q.len(), b * t * h * hd);
    check_len(f, "k", k.len(), b * t * kv_h * hd);
    check_len(f, "v", v.len(), b * t * kv_h * hd);
    check_len(f, "probs", probs.len(), b * h * t * t);
    if t == 0 || hd == 0 {
        return;
    }
    let group = h / kv_h;
    let scale = d.scale as f64;
    // ds (B,H,T,T) in f64: softmax backward of dp = dout · v, zero where invisible.
    let mut ds = vec![0.0f64; b * h * t * t];
    ds.par_chunks_mut(t).enumerate().for_each(|(row, ds)| {
        let (bi, hi, i) = (row / (h * t), (row / t) % h, row % t);
        let p = &probs[row * t..][..t];
        let doi = &dout[d.q_at(bi, i, hi)..][..hd];
        let qi = &q[d.q_at(bi, i, hi)..][..hd];
        let dp: Vec<f64> = d.visible(i).map(|j| dot(doi, &v[d.kv_at(bi, j, hi / group)..][..hd])).collect();
        let pdp: f64 = d.visible(i).zip(&dp).map(|(j, &dpj)| p[j] as f64 * dpj).sum();
        for (j, &dpj) in d.visible(i).zip(&dp) {
            let cap = if d.softcap.is_some() {
                d.score_grad(dot(qi, &k[d.kv_at(bi, j, hi / group)..][..hd]))
            } else {
                1.0
            };
            ds[j] = p[j] as f64 * (dpj - pdp) * cap;
        }
    });
    let ds = &ds;
    let ds_at = |bi: usize, hi: usize, i: usize, j: usize| ds[((bi * h + hi) * t + i) * t + j];
    let p_at = |bi: usize, hi: usize, i: usize, j: usize| probs[((bi * h + hi) * t + i) * t + j] as f64;
    // dq: one task per (b, i, h) row.
    dq.par_chunks_mut(hd).enumerate().for_each(|(row, dq)| {
        let (bi, i, hi) = (row / (t * h), (row / h) % t, row % h);
        for (c, dq) in dq.iter_mut().enumerate() {
            let s: f64 =
                d.visible(i).map(|j| ds_at(bi, hi, i, j) * k[d.kv_at(bi, j, hi / group) + c] as f64).sum();
            *dq = (scale * s) as f32;
        }
    });
    // dk, dv: one task per (b, j, g) row, summing over the group's query heads and the query
    // positions that see j.
    dk.par_chunks_mut(hd).zip(dv.par_chunks_mut(hd)).enumerate().for_each(|(row, (dk, dv))| {
        let (bi, j, g) = (row / (t * kv_h), (row / kv_h) % t, row % kv_h);
        for c in 0..hd {
            let (mut sk, mut sv) = (0.0f64, 0.0f64);
            for hi in g * group..(g + 1) * group {
                for i in (j..t).filter(|&i| d.visible(i).contains(&j)) {
                    sk += ds_at(bi, hi, i, j) * q[d.q_at(bi, i, hi) + c] as f64;
                    sv += p_at(bi, hi, i, j) * dout[d.q_at(bi, i, hi) + c] as f64;
                }
            }
            dk[c] = (scale * sk) as f32;
            dv[c] = sv as f32;
        }
    });
}

/// Keys per block of [`attention_forward_lse`]'s online softmax.
pub const KEY_BLOCK: usize = 16;

/// Flash-style forward: `out (B,T,H,D)` and the log-sum-exp `lse (B,H,T)` of each query row's
/// scores, `lse_i = log Σ_j exp(s_ij)` over visible `j`; no (B,H,T,T) tensor. Each row walks its
/// visible keys in blocks of [`KEY_BLOCK`] with the online softmax (running max `m`, running sum
/// `l` and output rescaled by `exp(m_old - m_new)` when the max grows): a different algorithm
/// from [`attention_forward`], with the same result up to rounding.
pub fn attention_forward_lse(out: &mut [f32], lse: &mut [f32], q: &[f32], k: &[f32], v: &[f32], d: AttnDims) {
    let f = "attention_forward_lse";
    d.check(f);
    let AttnDims { b, t, h, kv_h, d: hd, .. } = d;
    assert!(hd > 0, "{f}: head dimension 0");
    check_len(f, "out", out.len(), b * t * h * hd);
    check_len(f, "lse", lse.len(), b * h * t);
    check_len(f, "q", q.len(), b * t * h * hd);
    check_len(f, "k", k.len(), b * t * kv_h * hd);
    check_len(f, "v", v.len(), b * t * kv_h * hd);
    let group = h / kv_h;
    // out: one task per (b, i, h) row, which also yields that row's lse.
    let lses: Vec<f32> = out
        .par_chunks_mut(hd)
        .enumerate()
        .map(|(row, o)| {
            let (bi, i, hi) = (row / (t * h), (row / h) % t, row % h);
            let qi = &q[d.q_at(bi, i, hi)..][..hd];
            let (mut m, mut l, mut acc) = (f64::NEG_INFINITY, 0.0f64, vec![0.0f64; hd]);
            let vis = d.visible(i);
            for j0 in vis.clone().step_by(KEY_BLOCK) {
                let keys = j0..(j0 + KEY_BLOCK).min(vis.end);
                let s: Vec<f64> =
                    keys.clone().map(|j| d.score(dot(qi, &k[d.kv_at(bi, j, hi / group)..][..hd]))).collect();
                let m_new = s.iter().cloned().fold(m, f64::max);
                let rescale = (m - m_new).exp(); // 0 on the first block (m = -inf)
                l *= rescale;
                acc.iter_mut().for_each(|a| *a *= rescale);
                for (j, &sj) in keys.zip(&s) {
                    let e = (sj - m_new).exp();
                    l += e;
                    let vj = &v[d.kv_at(bi, j, hi / group)..][..hd];
                    acc.iter_mut().zip(vj).for_each(|(a, &x)| *a += e * x as f64);
                }
                m = m_new;
            }
            o.iter_mut().zip(&acc).for_each(|(o, &a)| *o = (a / l) as f32);
            (m + l.ln()) as f32
        })
        .collect();
    for (row, &x) in lses.iter().enumerate() {
        let (bi, i, hi) = (row / (t * h), (row / h) % t, row % h);
        lse[(bi * h + hi) * t + i] = x;
    }
}

/// Gradients of [`attention_forward_lse`] from the saved `lse (B,H,T)`: `p_ij = exp(s_ij -
/// lse_i)` is recomputed where needed, `D_i = Σ_j p_ij dp_ij` once per row, then
/// `ds_ij = p_ij (dp_ij - D_i) s'(u_ij)` as in [`attention_backward`]. `dq`, `dk`, `dv`
/// overwritten; memory O(B H T), no (B,H,T,T) tensor.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_lse(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    lse: &[f32],
    d: AttnDims,
) {
    let f = "attention_backward_lse";
    d.check(f);
    let AttnDims { b, t, h, kv_h, d: hd, .. } = d;
    assert!(hd > 0, "{f}: head dimension 0");
    check_len(f, "dq", dq.len(), b * t * h * hd);
    check_len(f, "dk", dk.len(), b * t * kv_h * hd);
    check_len(f, "dv", dv.len(), b * t * kv_h * hd);
    check_len(f, "dout", dout.len(), b * t * h * hd);
    check_len(f, "q", q.len(), b * t * h * hd);
    check_len(f, "k", k.len(), b * t * kv_h * hd);
    check_len(f, "v", v.len(), b * t * kv_h * hd);
    check_len(f, "lse", lse.len(), b * h * t);
    let group = h / kv_h;
    let scale = d.scale as f64;
    // (p_ij, dp_ij, s'(u_ij)) for query (bi, hi, i) and key j.
    let p_dp = |bi: usize, hi: usize, i: usize, j: usize| -> (f64, f64, f64) {
        let (qi, kj) = (&q[d.q_at(bi, i, hi)..][..hd], &k[d.kv_at(bi, j, hi / group)..][..hd]);
        let qk = dot(qi, kj);
        let p = (d.score(qk) - lse[(bi * h + hi) * t + i] as f64).exp();
        let dp = dot(&dout[d.q_at(bi, i, hi)..][..hd], &v[d.kv_at(bi, j, hi / group)..][..hd]);
        (p, dp, d.score_grad(qk))
    };
    // D (B,H,T): one task per row.
    let dsum: Vec<f64> = (0..b * h * t)
        .into_par_iter()
        .map(|row| {
            let (bi, hi, i) = (row / (h * t), (row / t) % h, row % t);
            d.visible(i).map(|j| p_dp(bi, hi, i, j)).map(|(p, dp, _)| p * dp).sum()
        })
        .collect();
    let ds = |bi: usize, hi: usize, i: usize, j: usize| -> (f64, f64) {
        let (p, dp, cap) = p_dp(bi, hi, i, j);
        (p, p * (dp - dsum[(bi * h + hi) * t + i]) * cap)
    };
    // dq: one task per (b, i, h) row.
    dq.par_chunks_mut(hd).enumerate().for_each(|(row, dq)| {
        let (bi, i, hi) = (row / (t * h), (row / h) % t, row % h);
        let mut acc = vec![0.0f64; hd];
        for j in d.visible(i) {
            let (_, s) = ds(bi, hi, i, j);
            let kj = &k[d.kv_at(bi, j, hi / group)..][..hd];
            acc.iter_mut().zip(kj).for_each(|(a, &x)| *a += s * x as f64);
        }
        dq.iter_mut().zip(&acc).for_each(|(o, &a)| *o = (scale * a) as f32);
    });
    // dk, dv: one task per (b, j, g) row over the group's heads and the queries that see j.
    dk.par_chunks_mut(hd).zip(dv.par_chunks_mut(hd)).enumerate().for_each(|(row, (dk, dv))| {
        let (bi, j, g) = (row / (t * kv_h), (row / kv_h) % t, row % kv_h);
        let (mut sk, mut sv) = (vec![0.0f64; hd], vec![0.0f64; hd]);
        for hi in g * group..(g + 1) * group {
            for i in (j..t).filter(|&i| d.visible(i).contains(&j)) {
                let (p, s) = ds(bi, hi, i, j);
                let (qi, doi) = (&q[d.q_at(bi, i, hi)..][..hd], &dout[d.q_at(bi, i, hi)..][..hd]);
                sk.iter_mut().zip(qi).for_each(|(a, &x)| *a += s * x as f64);
                sv.iter_mut().zip(doi).for_each(|(a, &x)| *a += p * x as f64);
            }
        }
        dk.iter_mut().zip(&sk).for_each(|(o, &a)| *o = (scale * a) as f32);
        dv.iter_mut().zip(&sv).for_each(|(o, &a)| *o = a as f32);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    fn run(q: &[f32], k: &[f32], v: &[f32], d: AttnDims) -> (Vec<f32>, Vec<f32>) {
        let mut out = vec![f32::NAN; d.b * d.t * d.h * d.d];
        let mut probs = vec![f32::NAN; d.b * d.h * d.t * d.t];
        attention_forward(&mut out, &mut probs, q, k, v, d);
        (out, probs)
    }

    /// Copies each kv head to the `h / kv_h` query heads that share it (Hugging Face
    /// `repeat_kv`), turning a GQA input into an equivalent multi-head one.
    fn repeat_kv(x: &[f32], d: AttnDims) -> Vec<f32> {
        let group = d.h / d.kv_h;
        let mut y = Vec::with_capacity(d.b * d.t * d.h * d.d);
        for row in x.chunks(d.d * d.kv_h) {
            for g in 0..d.kv_h {
                for _ in 0..group {
                    y.extend_from_slice(&row[g * d.d..(g + 1) * d.d]);
                }
            }
        }
        y
    }

    #[test]
    fn by_hand() {
        // T = 2, one head, D = 1, scale 1, q = [5, ln 3], k = [0, 1], v = [2, 4].
        // Row 0 sees only j = 0: p = [1, 0], out = 2.
        // Row 1 scores [ln 3 * 0, ln 3 * 1] = [0, ln 3]: p = [1/4, 3/4], out = 2/4 + 12/4 = 3.5.
        let mut d = AttnDims { b: 1, t: 2, h: 1, kv_h: 1, d: 1, window: None, scale: 1.0, softcap: None };
        let (q, k, v) = ([5.0, 3f32.ln()], [0.0, 1.0], [2.0, 4.0]);
        let (out, probs) = run(&q, &k, &v, d);
        assert_close("probs", &probs, &[1.0, 0.0, 0.25, 0.75], 1e-7);
        assert_close("out", &out, &[2.0, 3.5], 1e-6);
        // A window of 1 lets each position see only itself: out = v.
        d.window = Some(1);
        let (out, probs) = run(&q, &k, &v, d);
        assert_eq!(probs, [1.0, 0.0, 0.0, 1.0]);
        assert_eq!(out, [2.0, 4.0]);
        // A soft cap of 1 turns row 1's scores into [tanh 0, tanh(ln 3)] = [0, 0.8] (tanh(ln 3) =
        // (9 - 1) / (9 + 1)): p = [1, e^0.8] / (1 + e^0.8) = [0.3100255, 0.6899745],
        // out = 2 p0 + 4 p1 = 3.3799490.
        d.window = None;
        d.softcap = Some(1.0);
        let (out, probs) = run(&q, &k, &v, d);
        assert_close("capped probs", &probs, &[1.0, 0.0, 0.310_025_5, 0.689_974_5], 1e-7);
        assert_close("capped out", &out, &[2.0, 3.379_949], 1e-6);
    }

    #[test]
    fn gqa_equals_repeated_kv_and_masks_exactly() {
        let mut rng = rng(60);
        for (window, softcap) in
            [(None, None), (Some(2), None), (Some(4), None), (None, Some(1.5)), (Some(2), Some(1.5))]
        {
            let d = AttnDims { b: 2, t: 7, h: 6, kv_h: 2, d: 3, window, scale: 0.7, softcap };
            let q = uniform(&mut rng, d.b * d.t * d.h * d.d, -2.0, 2.0);
            let k = uniform(&mut rng, d.b * d.t * d.kv_h * d.d, -2.0, 2.0);
            let v = uniform(&mut rng, d.b * d.t * d.kv_h * d.d, -2.0, 2.0);
            let (out, probs) = run(&q, &k, &v, d);
            let mha = AttnDims { kv_h: d.h, ..d };
            let (out_mha, probs_mha) = run(&q, &repeat_kv(&k, d), &repeat_kv(&v, d), mha);
            assert_eq!(out, out_mha, "window {window:?} softcap {softcap:?}");
            assert_eq!(probs, probs_mha, "window {window:?} softcap {softcap:?}");
            for (row, p) in probs.chunks(d.t).enumerate() {
                let i = row % d.t;
                for (j, &pj) in p.iter().enumerate() {
                    let visible = j <= i && window.is_none_or(|w| i - j < w);
                    assert_eq!(
                        pj > 0.0,
                        visible,
                        "row {row} j {j} window {window:?} softcap {softcap:?}: p {pj}"
                    );
                }
                let s: f64 = p.iter().map(|&x| x as f64).sum();
                assert!((s - 1.0).abs() < 1e-6, "row {row} sums to {s}");
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = rng(61);
        let cases = [
            AttnDims { b: 1, t: 1, h: 1, kv_h: 1, d: 1, window: None, scale: 1.0, softcap: None },
            AttnDims {
                b: 2,
                t: 5,
                h: 4,
                kv_h: 2,
                d: 3,
                window: None,
                scale: 3f32.sqrt().recip(),
                softcap: None,
            },
            AttnDims {
                b: 1,
                t: 7,
                h: 3,
                kv_h: 1,
                d: 5,
                window: Some(3),
                scale: 5f32.sqrt().recip(),
                softcap: None,
            },
            AttnDims { b: 1, t: 6, h: 2, kv_h: 2, d: 4, window: Some(1), scale: 0.5, softcap: None },
            AttnDims { b: 1, t: 5, h: 4, kv_h: 1, d: 2, window: Some(2), scale: 1.0, softcap: None },
            // soft caps of the order of the scores (|u| <= D scale), so tanh bends them; the
            // cap adds scale^3 |tanh'''| / c^2 <= 2 scale^3 / c^2 < 1.1 to the third derivative
            AttnDims { b: 2, t: 5, h: 4, kv_h: 2, d: 3, window: None, scale: 0.6, softcap: Some(0.8) },
            AttnDims { b: 1, t: 7, h: 3, kv_h: 1, d: 5, window: Some(3), scale: 0.8, softcap: Some(1.0) },
        ];
        for d in cases {
            let q = uniform(&mut rng, d.b * d.t * d.h * d.d, -1.0, 1.0);
            let k = uniform(&mut rng, d.b * d.t * d.kv_h * d.d, -1.0, 1.0);
            let v = uniform(&mut rng, d.b * d.t * d.kv_h * d.d, -1.0, 1.0);
            let w = uniform(&mut rng, q.len(), -1.0, 1.0);
            let (_, probs) = run(&q, &k, &v, d);
            let (mut dq, mut dk, mut dv) =
                (vec![f32::NAN; q.len()], vec![f32::NAN; k.len()], vec![f32::NAN; v.len()]);
            attention_backward(&mut dq, &mut dk, &mut dv, &w, &q, &k, &v, &probs, d);
            let loss = |q: &[f32], k: &[f32], v: &[f32]| weighted_sum(&w, &run(q, k, v, d).0);
            // h = 1e-2 on O(1) inputs: scores are smooth with |third derivative| of order 1, so
            // truncation h^2/6 * O(1) ~ 2e-5; perturbing one k or v element moves up to
            // T*H*D = 40 outputs of size < 1, rounding < 40 * 6e-8 / 2e-2 ~ 1e-4 in the worst
            // case (rounding errors are random, so far less in practice: ~7e-6 seen).
            let (h, atol, rtol) = (1e-2, 1e-4, 1e-3);
            let what = format!("{d:?}");
            check_grad(&format!("dq {what}"), &q, &dq, h, atol, rtol, 40, &mut rng, |x| loss(x, &k, &v));
            check_grad(&format!("dk {what}"), &k, &dk, h, atol, rtol, 40, &mut rng, |x| loss(&q, x, &v));
            check_grad(&format!("dv {what}"), &v, &dv, h, atol, rtol, 40, &mut rng, |x| loss(&q, &k, x));
        }
    }

    /// The lse twins equal the probability versions: same outputs and gradients, and `lse` is
    /// the log-sum-exp of the visible scores. T = 40 spans several key blocks of 16, and
    /// windows of 19 and 5 cut rows mid-block.
    #[test]
    fn lse_versions_equal_the_probability_versions() {
        let mut rng = rng(62);
        let cases = [
            AttnDims { b: 1, t: 1, h: 1, kv_h: 1, d: 1, window: None, scale: 1.0, softcap: None },
            AttnDims { b: 2, t: 40, h: 6, kv_h: 2, d: 5, window: None, scale: 0.45, softcap: None },
            AttnDims { b: 1, t: 40, h: 3, kv_h: 1, d: 8, window: Some(19), scale: 0.35, softcap: None },
            AttnDims { b: 2, t: 17, h: 2, kv_h: 2, d: 4, window: Some(5), scale: 0.5, softcap: Some(1.2) },
            AttnDims { b: 1, t: 33, h: 4, kv_h: 1, d: 3, window: None, scale: 0.6, softcap: Some(0.8) },
        ];
        for d in cases {
            let what = format!("{d:?}");
            let q = uniform(&mut rng, d.b * d.t * d.h * d.d, -2.0, 2.0);
            let k = uniform(&mut rng, d.b * d.t * d.kv_h * d.d, -2.0, 2.0);
            let v = uniform(&mut rng, d.b * d.t * d.kv_h * d.d, -2.0, 2.0);
            let w = uniform(&mut rng, q.len(), -1.0, 1.0);
            let (out, probs) = run(&q, &k, &v, d);
            let (mut out2, mut lse) = (vec![f32::NAN; out.len()], vec![f32::NAN; d.b * d.h * d.t]);
            attention_forward_lse(&mut out2, &mut lse, &q, &k, &v, d);
            // Both accumulate in f64 and round once to f32 (|out| <= max |v| = 2): a few ulps.
            assert!(max_abs_diff(&out, &out2) <= 1e-6, "out {what}: {}", max_abs_diff(&out, &out2));
            for (row, &l) in lse.iter().enumerate() {
                let (bi, hi, i) = (row / (d.h * d.t), (row / d.t) % d.h, row % d.t);
                let qi = &q[d.q_at(bi, i, hi)..][..d.d];
                let direct: f64 = d
                    .visible(i)
                    .map(|j| d.score(dot(qi, &k[d.kv_at(bi, j, hi / (d.h / d.kv_h))..][..d.d])).exp())
                    .sum::<f64>()
                    .ln();
                assert!((l as f64 - direct).abs() <= 1e-6 * direct.abs().max(1.0), "lse {what} row {row}");
            }
            let n = |len: usize| vec![f32::NAN; len];
            let (mut dq, mut dk, mut dv) = (n(q.len()), n(k.len()), n(v.len()));
            attention_backward(&mut dq, &mut dk, &mut dv, &w, &q, &k, &v, &probs, d);
            let (mut dq2, mut dk2, mut dv2) = (n(q.len()), n(k.len()), n(v.len()));
            attention_backward_lse(&mut dq2, &mut dk2, &mut dv2, &w, &q, &k, &v, &lse, d);
            // attention_backward reads p rounded to f32 (relative 6e-8) and lse is f32 too
            // (p = exp(s - lse) off by |lse| 6e-8 < 1e-6 relative); each gradient sums at most
            // T * H / KVH = 120 terms of size < 2 * 2 * 4: < 120 * 16 * 1e-6 ~ 2e-3 in the worst
            // case, ~1e-5 for random roundings; held to 1e-4.
            for (name, a, b) in [("dq", &dq, &dq2), ("dk", &dk, &dk2), ("dv", &dv, &dv2)] {
                let err = max_abs_diff(a, b);
                assert!(err <= 1e-4, "{name} {what}: {err}");
            }
        }
    }
}
