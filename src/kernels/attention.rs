//! Causal self-attention with grouped-query heads and an optional sliding window, composed from
//! the strided matmul and the masked softmax. Reference: `kernels_ref::attention_*`.
//!
//! Shapes: q (B,T,H,D); k, v (B,T,KVH,D); out (B,T,H,D); probs (B,H,T,T) saved for backward.
//! Query head h reads kv head h / G, G = H / KVH. Each product runs G times, once per query
//! head within a group, batched over (b, kv head): the G query heads of a group then add
//! their dK and dV contributions in a fixed order (no races, same result every run).
//!   S = Q K^T;  P = softmax(scale * S, causal);  out = P V
//!   dP = dout V^T;  dV = P^T dout;  dS = scale * P (dP - rowsum(dP P));  dQ = dS K;  dK = dS^T Q

use super::matmul::{matmul_strided, Dims, View};
use super::softmax::{softmax_backward, softmax_forward, Mask};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};

pub use kernels_ref::AttnDims;

/// The group size H / KVH, after checking the tensors against the dimensions.
fn check_dims(d: &AttnDims, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<usize> {
    if d.kv_h == 0 || d.h % d.kv_h != 0 {
        return Err(Error::shape(
            "attention",
            format!("{} heads are not a multiple of {} kv heads", d.h, d.kv_h),
        ));
    }
    if d.window == Some(0) {
        return Err(Error::shape(
            "attention",
            "a sliding window of 0 positions sees nothing; use None for no window",
        ));
    }
    let (qn, kn) = (d.b * d.t * d.h * d.d, d.b * d.t * d.kv_h * d.d);
    for (name, t, want) in [("q", q, qn), ("k", k, kn), ("v", v, kn)] {
        super::check_len("attention", name, t.numel(), want)?;
    }
    Ok(d.h / d.kv_h)
}

/// Views for one query-head index `j` within a group, batched over (b, kv head).
struct Layout {
    d: AttnDims,
    g: usize,
}

impl Layout {
    /// (B,T,H,D) tensor, query head kvh * G + j: row t, column d.
    fn qlike<'a>(&self, buf: &'a wgpu::Buffer, j: usize, trans: bool) -> View<'a> {
        let d = self.d;
        View::matrix(buf, j * d.d, d.h * d.d, trans).batched(d.t * d.h * d.d, self.g * d.d)
    }
    /// (B,T,KVH,D) tensor: row t, column d.
    fn kvlike<'a>(&self, buf: &'a wgpu::Buffer, trans: bool) -> View<'a> {
        let d = self.d;
        View::matrix(buf, 0, d.kv_h * d.d, trans).batched(d.t * d.kv_h * d.d, d.d)
    }
    /// (B,H,T,T) tensor, head kvh * G + j: row i, column j'.
    fn scores<'a>(&self, buf: &'a wgpu::Buffer, j: usize, trans: bool) -> View<'a> {
        let d = self.d;
        View::matrix(buf, j * d.t * d.t, d.t, trans).batched(d.h * d.t * d.t, self.g * d.t * d.t)
    }
    fn dims(&self, m: usize, n: usize, k: usize) -> Dims {
        Dims { m, n, k, nb1: self.d.b, nb2: self.d.kv_h }
    }
}

/// `out = softmax(scale * q k^T, causal) v`; `probs` (B,H,T,T) is kept for the backward.
pub fn attention_forward(
    gpu: &Gpu,
    out: &Tensor,
    probs: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    d: AttnDims,
) -> Result<()> {
    let g = check_dims(&d, q, k, v)?;
    super::check_len("attention", "out", out.numel(), q.numel())?;
    super::check_len("attention", "probs", probs.numel(), d.b * d.h * d.t * d.t)?;
    let l = Layout { d, g };
    let scores = Tensor::empty(gpu, &[d.b * d.h * d.t, d.t], "attention scores")?;
    let (sb, qb, kb, vb) =
        (scores.single("attention")?, q.single("attention")?, k.single("attention")?, v.single("attention")?);
    for j in 0..g {
        matmul_strided(
            gpu,
            l.scores(sb, j, false),
            l.qlike(qb, j, false),
            l.kvlike(kb, true),
            None,
            l.dims(d.t, d.t, d.d),
            1.0,
            false,
        )?;
    }
    softmax_forward(gpu, probs, &scores, Mask::Causal { window: d.window }, d.scale)?;
    let (pb, ob) = (probs.single("attention")?, out.single("attention")?);
    for j in 0..g {
        matmul_strided(
            gpu,
            l.qlike(ob, j, false),
            l.scores(pb, j, false),
            l.kvlike(vb, false),
            None,
            l.dims(d.t, d.d, d.t),
            1.0,
            false,
        )?;
    }
    Ok(())
}

/// Gradients of [`attention_forward`]: dq, dk, dv written (or added to when `accumulate`).
pub fn attention_backward(
    gpu: &Gpu,
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    probs: &Tensor,
    d: AttnDims,
    accumulate: bool,
) -> Result<()> {
    let g = check_dims(&d, q, k, v)?;
    super::check_len("attention", "dq", dq.numel(), q.numel())?;
    super::check_len("attention", "dk", dk.numel(), k.numel())?;
    super::check_len("attention", "dv", dv.numel(), v.numel())?;
    let l = Layout { d, g };
    let dp = Tensor::empty(gpu, &[d.b * d.h * d.t, d.t], "attention dP")?;
    let (pb, dpb, dob) = (one(probs)?, one(&dp)?, one(dout)?);
    let (qb, kb, vb) = (one(q)?, one(k)?, one(v)?);
    let (dqb, dkb, dvb) = (one(dq)?, one(dk)?, one(dv)?);
    for j in 0..g {
        // dP = dout V^T ;  dV += P^T dout
        matmul_strided(
            gpu,
            l.scores(dpb, j, false),
            l.qlike(dob, j, false),
            l.kvlike(vb, true),
            None,
            l.dims(d.t, d.t, d.d),
            1.0,
            false,
        )?;
        matmul_strided(
            gpu,
            l.kvlike(dvb, false),
            l.scores(pb, j, true),
            l.qlike(dob, j, false),
            None,
            l.dims(d.t, d.d, d.t),
            1.0,
            accumulate || j > 0,
        )?;
    }
    let ds = Tensor::empty(gpu, &[d.b * d.h * d.t, d.t], "attention dS")?;
    softmax_backward(gpu, &ds, probs, &dp, d.scale)?;
    let dsb = one(&ds)?;
    for j in 0..g {
        // dQ = dS K ;  dK += dS^T Q
        matmul_strided(
            gpu,
            l.qlike(dqb, j, false),
            l.scores(dsb, j, false),
            l.kvlike(kb, false),
            None,
            l.dims(d.t, d.d, d.t),
            1.0,
            accumulate,
        )?;
        matmul_strided(
            gpu,
            l.kvlike(dkb, false),
            l.scores(dsb, j, true),
            l.qlike(qb, j, false),
            None,
            l.dims(d.t, d.d, d.t),
            1.0,
            accumulate || j > 0,
        )?;
    }
    Ok(())
}

fn one(t: &Tensor) -> Result<&wgpu::Buffer> {
    t.single("attention")
}
