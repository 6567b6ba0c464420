//! Causal self-attention with grouped-query heads and an optional sliding window, composed from
//! the strided matmul and the masked softmax. Reference: `kernels_ref::attention_*`.
//!
//! Shapes: q (B,T,H,D); k, v (B,T,KVH,D); out (B,T,H,D); probs (B,H,T,T) saved for backward.
//! Query head h reads kv head h / G, G = H / KVH. Each product runs G times, once per query
//! head within a group, batched over (b, kv head): the G query heads of a group then add
//! their dK and dV contributions in a fixed order (no races, same result every run).
//!   S = Q K^T;  P = softmax(scale * S, causal);  out = P V
//!   dP = dout V^T;  dV = P^T dout;  dS = scale * P (dP - rowsum(dP P));  dQ = dS K;  dK = dS^T Q
//! With a soft cap c the softmax reads Z = c tanh(U / c), U = scale * S (the matmul applies the
//! scale), and dS gains the factor 1 - tanh^2(U / c). The backward recomputes U into dP's
//! buffer once dP has been used, so capping costs a matmul but no memory.

use super::activation::{act_grad_mul, act_inplace, Act};
use super::matmul::{matmul_strided, Dims, View};
use super::softmax::{softmax_backward, softmax_forward, Mask};
use crate::error::{Error, Result};
use crate::gpu::Bind;
use crate::gpu::{Gpu, Tensor};

pub use kernels_ref::AttnDims;

/// A (B, T, heads, D) operand inside a tensor: the row of position (b, t) starts at element
/// `offset + (b * T + t) * row_stride`. Dense tensors have `row_stride = heads * D`; GPT-2's
/// packed `c_attn` output (B*T, 3C) holds q, k and v at offsets 0, C, 2C with stride 3C.
#[derive(Clone, Copy)]
pub struct Heads<'t> {
    pub t: &'t Tensor,
    pub offset: usize,
    pub row_stride: usize,
}

impl<'t> Heads<'t> {
    pub fn dense(t: &'t Tensor, heads: usize, d: usize) -> Self {
        Heads { t, offset: 0, row_stride: heads * d }
    }
    pub fn packed(t: &'t Tensor, offset: usize, row_stride: usize) -> Self {
        Heads { t, offset, row_stride }
    }
    pub(crate) fn check(&self, name: &str, rows: usize, width: usize) -> Result<Bind<'t>> {
        let need = if rows == 0 { 0 } else { self.offset + (rows - 1) * self.row_stride + width };
        if self.row_stride < width || self.t.numel() < need {
            return Err(Error::shape(
                "attention",
                format!(
                    "{name}: {rows} rows of {width} at offset {} stride {} do not fit a tensor of {}",
                    self.offset,
                    self.row_stride,
                    self.t.numel()
                ),
            ));
        }
        self.t.single("attention")
    }
}

/// The group size H / KVH, after checking the dimensions.
pub(crate) fn check_dims(d: &AttnDims) -> Result<usize> {
    if d.kv_h == 0 || !d.h.is_multiple_of(d.kv_h) {
        return Err(Error::shape(
            "attention",
            format!("{} heads are not a multiple of {} kv heads", d.h, d.kv_h),
        ));
    }
    if let Some(c) = d.softcap {
        super::activation::check_cap(c)?;
    }
    if d.window == Some(0) {
        return Err(Error::shape(
            "attention",
            "a sliding window of 0 positions sees nothing; use None for no window",
        ));
    }
    Ok(d.h / d.kv_h)
}

/// Views for one query-head index `j` within a group, batched over (b, kv head).
struct Layout {
    d: AttnDims,
    g: usize,
}

impl Layout {
    /// (B,T,H,D) operand, query head kvh * G + j: row t, column d.
    fn qlike<'a>(&self, (buf, h): (Bind<'a>, &Heads), j: usize, trans: bool) -> View<'a> {
        let d = self.d;
        View::matrix(buf, h.offset + j * d.d, h.row_stride, trans).batched(d.t * h.row_stride, self.g * d.d)
    }
    /// (B,T,KVH,D) operand: row t, column d.
    fn kvlike<'a>(&self, (buf, h): (Bind<'a>, &Heads), trans: bool) -> View<'a> {
        let d = self.d;
        View::matrix(buf, h.offset, h.row_stride, trans).batched(d.t * h.row_stride, d.d)
    }
    /// (B,H,T,T) tensor, head kvh * G + j: row i, column j'.
    fn scores<'a>(&self, buf: Bind<'a>, j: usize, trans: bool) -> View<'a> {
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
    out: Heads,
    probs: &Tensor,
    q: Heads,
    k: Heads,
    v: Heads,
    d: AttnDims,
) -> Result<()> {
    let g = check_dims(&d)?;
    let rows = d.b * d.t;
    let (qb, kb, vb) = (
        q.check("q", rows, d.h * d.d)?,
        k.check("k", rows, d.kv_h * d.d)?,
        v.check("v", rows, d.kv_h * d.d)?,
    );
    let ob = out.check("out", rows, d.h * d.d)?;
    super::check_len("attention", "probs", probs.numel(), d.b * d.h * d.t * d.t)?;
    let l = Layout { d, g };
    let scores = Tensor::empty(gpu, &[d.b * d.h * d.t, d.t], "attention scores")?;
    let mask = Mask::Causal { window: d.window };
    match d.softcap {
        None => {
            raw_scores(gpu, &l, &scores, (qb, &q), (kb, &k), 1.0)?;
            softmax_forward(gpu, probs, &scores, mask, d.scale)?;
        }
        Some(c) => {
            raw_scores(gpu, &l, &scores, (qb, &q), (kb, &k), d.scale)?;
            act_inplace(gpu, &scores, Act::Softcap(c))?;
            softmax_forward(gpu, probs, &scores, mask, 1.0)?;
        }
    }
    let pb = one(probs)?;
    for j in 0..g {
        let (c, a, b) = (l.qlike((ob, &out), j, false), l.scores(pb, j, false), l.kvlike((vb, &v), false));
        matmul_strided(gpu, c, a, b, None, l.dims(d.t, d.d, d.t), 1.0, false)?;
    }
    Ok(())
}

/// Gradients of [`attention_forward`]: dq, dk, dv written (or added to when `accumulate`).
/// They may be views into one packed tensor, like the inputs.
pub fn attention_backward(
    gpu: &Gpu,
    dq: Heads,
    dk: Heads,
    dv: Heads,
    dout: Heads,
    q: Heads,
    k: Heads,
    v: Heads,
    probs: &Tensor,
    d: AttnDims,
    accumulate: bool,
) -> Result<()> {
    let g = check_dims(&d)?;
    let rows = d.b * d.t;
    let (qw, kw) = (d.h * d.d, d.kv_h * d.d);
    let (qb, kb, vb) = (q.check("q", rows, qw)?, k.check("k", rows, kw)?, v.check("v", rows, kw)?);
    let (dqb, dkb, dvb) = (dq.check("dq", rows, qw)?, dk.check("dk", rows, kw)?, dv.check("dv", rows, kw)?);
    let dob = dout.check("dout", rows, qw)?;
    let l = Layout { d, g };
    let dp = Tensor::empty(gpu, &[d.b * d.h * d.t, d.t], "attention dP")?;
    let (pb, dpb) = (one(probs)?, one(&dp)?);
    for j in 0..g {
        // dP = dout V^T ;  dV += P^T dout
        let (c, a, b) = (l.scores(dpb, j, false), l.qlike((dob, &dout), j, false), l.kvlike((vb, &v), true));
        matmul_strided(gpu, c, a, b, None, l.dims(d.t, d.t, d.d), 1.0, false)?;
        let (c, a, b) = (l.kvlike((dvb, &dv), false), l.scores(pb, j, true), l.qlike((dob, &dout), j, false));
        matmul_strided(gpu, c, a, b, None, l.dims(d.t, d.d, d.t), 1.0, accumulate || j > 0)?;
    }
    let ds = Tensor::empty(gpu, &[d.b * d.h * d.t, d.t], "attention dS")?;
    softmax_backward(gpu, &ds, probs, &dp, d.scale)?;
    if let Some(c) = d.softcap {
        raw_scores(gpu, &l, &dp, (qb, &q), (kb, &k), d.scale)?; // dP is spent: U goes there
        act_grad_mul(gpu, &ds, &dp, Act::Softcap(c))?;
    }
    let dsb = one(&ds)?;
    for j in 0..g {
        // dQ = dS K ;  dK += dS^T Q
        let (c, a, b) = (l.qlike((dqb, &dq), j, false), l.scores(dsb, j, false), l.kvlike((kb, &k), false));
        matmul_strided(gpu, c, a, b, None, l.dims(d.t, d.d, d.t), 1.0, accumulate)?;
        let (c, a, b) = (l.kvlike((dkb, &dk), false), l.scores(dsb, j, true), l.qlike((qb, &q), j, false));
        matmul_strided(gpu, c, a, b, None, l.dims(d.t, d.d, d.t), 1.0, accumulate || j > 0)?;
    }
    Ok(())
}

/// `scores = alpha Q K^T` for every head, (B,H,T,T).
fn raw_scores(
    gpu: &Gpu,
    l: &Layout,
    scores: &Tensor,
    q: (Bind<'_>, &Heads),
    k: (Bind<'_>, &Heads),
    alpha: f32,
) -> Result<()> {
    let sb = one(scores)?;
    for j in 0..l.g {
        let (c, a, b) = (l.scores(sb, j, false), l.qlike(q, j, false), l.kvlike(k, true));
        matmul_strided(gpu, c, a, b, None, l.dims(l.d.t, l.d.t, l.d.d), alpha, false)?;
    }
    Ok(())
}

fn one(t: &Tensor) -> Result<Bind<'_>> {
    t.single("attention")
}
