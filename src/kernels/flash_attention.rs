//! Attention whose memory does not grow with T^2: the same causal, grouped-query, windowed and
//! soft-capped attention as [`super::attention`], computed one block of query rows at a time,
//! keeping only the per-row log-sum-exp `lse` (B,H,T) for the backward pass instead of the
//! (B,H,T,T) probabilities. Reference: `kernels_ref::attention_forward_lse` / `_backward_lse`
//! (and, equal to them, `kernels_ref::attention_forward` / `_backward`).
//!
//! The idea is FlashAttention's (Dao et al., 2022; the backward's `D_i = sum_j p_ij dp_ij` is
//! FlashAttention-2's), arranged for drivers that reward the register-tiled matmul and punish
//! barriers: instead of one shader with an online softmax, each block of `bq` query rows
//! `i0..i1` runs the strided matmul over the keys `k0..i1` that the causal mask and the window
//! leave visible to any row of the block (`k0 = i0 + 1 - window`, or 0), so key blocks the mask
//! hides entirely are never computed. Per block, with S the (B*H, bq, keys) scratch:
//!   forward:  S = scale Q K^T;  row step: P = softmax(cap(S)) masked, lse;  O = P V
//!   backward: S = scale Q K^T;  dP = dO V^T;  row step (from lse, no second softmax pass):
//!             P, dS = P (dP - rowsum(P dP)) cap'(S);  dV += P^T dO;  dQ = scale dS K;
//!             dK += scale dS^T Q
//! The row step is `shaders/flash_attention.wgsl`. The scratch is reused by every block, so the
//! memory is O(bq T) (at most [`BLOCK_ELEMS`] floats per buffer) rather than O(T^2); dK and dV
//! rows are written by the first block that sees them and added to by later ones, in a fixed
//! order (same result every run).

use super::attention::{check_dims, AttnDims, Heads};
use super::matmul::{matmul_strided, Dims, View};
use super::{check_len, u32_of};
use crate::error::{Error, Result};
use crate::gpu::Bind;
use crate::gpu::{Gpu, Tensor};

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    cols: u32,
    bq: u32,
    t: u32,
    i0: u32,
    k0: u32,
    window: u32,
    cap: f32,
}

/// Floats in one score block (B*H, bq, keys): 8 MiB, so the two scratch blocks of the backward
/// stay far below a phone's 128 MiB binding and a few MiB of memory.
pub const BLOCK_ELEMS: usize = 1 << 21;

thread_local! {
    static BLOCK_OVERRIDE: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Run `f` with query blocks of `rows` rows on this thread (tests force several ragged blocks
/// on small T this way).
pub fn with_block_rows<R>(rows: usize, f: impl FnOnce() -> R) -> R {
    super::with_override(&BLOCK_OVERRIDE, rows, f)
}

/// Query rows per block: as many as keep one block within [`BLOCK_ELEMS`] floats, a multiple of
/// the matmul's 64-row tile where that is possible.
pub fn block_rows(d: &AttnDims) -> usize {
    if let Some(r) = BLOCK_OVERRIDE.with(|o| o.get()) {
        return r.clamp(1, d.t.max(1));
    }
    let per_row = (d.b * d.h * d.t).max(1);
    let mut bq = (BLOCK_ELEMS / per_row).max(1);
    if bq >= 64 {
        bq -= bq % 64;
    }
    bq.min(d.t.max(1))
}

/// One block: query rows `i0..i0 + bq`, keys `k0..k0 + keys` (`k0 + keys = i0 + bq`).
#[derive(Clone, Copy, Debug)]
struct Block {
    i0: usize,
    bq: usize,
    k0: usize,
    keys: usize,
}

fn blocks(d: &AttnDims, bq: usize) -> impl Iterator<Item = Block> + '_ {
    (0..d.t).step_by(bq.max(1)).map(move |i0| {
        let i1 = (i0 + bq).min(d.t);
        let k0 = d.window.map_or(0, |w| (i0 + 1).saturating_sub(w));
        Block { i0, bq: i1 - i0, k0, keys: i1 - k0 }
    })
}

/// The score scratch for `d`'s blocks: (rows, keys) of the largest one, checked against the
/// binding limit.
fn scratch(gpu: &Gpu, d: &AttnDims, bq: usize, what: &str) -> Result<Tensor> {
    let n = blocks(d, bq).map(|b| d.b * d.h * b.bq * b.keys).max().unwrap_or(0).max(1);
    if (n * 4) as u64 > gpu.max_binding() {
        return Err(Error::shape(
            "flash attention",
            format!(
                "one query row of every (batch, head) needs {} MiB of scores, above the {} MiB \
                 storage binding; use a smaller batch",
                (d.b * d.h * d.t * 4) >> 20,
                gpu.max_binding() >> 20
            ),
        ));
    }
    Tensor::empty(gpu, &[n], what)
}

/// Views of the (B,T,heads,D) operands and the (B*H, bq, keys) block, batched over
/// (b, kv head) with the G query heads of a group taken one at a time (as in `attention`).
struct Layout {
    d: AttnDims,
    g: usize,
}

impl Layout {
    /// Query head kvh * G + j of a (B,T,H,D) operand, from position `row0`.
    fn qlike<'a>(&self, buf: Bind<'a>, h: &Heads, j: usize, row0: usize, trans: bool) -> View<'a> {
        let d = self.d;
        View::matrix(buf, h.offset + row0 * h.row_stride + j * d.d, h.row_stride, trans)
            .batched(d.t * h.row_stride, self.g * d.d)
    }
    /// A (B,T,KVH,D) operand from position `row0`.
    fn kvlike<'a>(&self, buf: Bind<'a>, h: &Heads, row0: usize, trans: bool) -> View<'a> {
        let d = self.d;
        View::matrix(buf, h.offset + row0 * h.row_stride, h.row_stride, trans)
            .batched(d.t * h.row_stride, d.d)
    }
    /// Head kvh * G + j of the block, from local key column `col0`.
    fn block<'a>(&self, buf: Bind<'a>, b: Block, j: usize, col0: usize, trans: bool) -> View<'a> {
        let per_head = b.bq * b.keys;
        View::matrix(buf, j * per_head + col0, b.keys, trans).batched(self.d.h * per_head, self.g * per_head)
    }
    fn dims(&self, m: usize, n: usize, k: usize) -> Dims {
        Dims { m, n, k, nb1: self.d.b, nb2: self.d.kv_h }
    }
}

/// The row step of one block (`entry` of `shaders/flash_attention.wgsl`).
fn row_step(
    gpu: &Gpu,
    entry: &'static str,
    s: Bind<'_>,
    dp: Option<Bind<'_>>,
    lse: Bind<'_>,
    d: &AttnDims,
    b: Block,
) -> Result<()> {
    let shaders = ["flash_attention", "flash_attention_subgroup"];
    let key = super::rows::row_kernel(gpu, shaders, entry, "flash attention", b.keys, 3)?;
    let u = |v: usize| u32_of(v, "flash attention");
    let p = Params {
        rows: u(d.b * d.h * b.bq)?,
        cols: u(b.keys)?,
        bq: u(b.bq)?,
        t: u(d.t)?,
        i0: u(b.i0)?,
        k0: u(b.k0)?,
        window: u(d.window.unwrap_or(0))?,
        cap: d.softcap.unwrap_or(0.0),
    };
    gpu.dispatch(&key, &[Some(s), dp, Some(lse)], bytemuck::bytes_of(&p), gpu.grid(d.b * d.h * b.bq, 1))
}

/// `out = softmax(cap(scale q k^T), causal) v`; `lse` (B,H,T) is all the backward needs.
pub fn flash_attention_forward(
    gpu: &Gpu,
    out: Heads,
    lse: &Tensor,
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
    check_len("flash attention", "lse", lse.numel(), d.b * d.h * d.t)?;
    if d.t == 0 {
        return Ok(());
    }
    let l = Layout { d, g };
    let bq = block_rows(&d);
    let s = scratch(gpu, &d, bq, "attention score block")?;
    let (sb, lb) = (s.single("flash attention")?, lse.single("flash attention")?);
    for b in blocks(&d, bq) {
        for j in 0..g {
            let (c, a, bb) =
                (l.block(sb, b, j, 0, false), l.qlike(qb, &q, j, b.i0, false), l.kvlike(kb, &k, b.k0, true));
            matmul_strided(gpu, c, a, bb, None, l.dims(b.bq, b.keys, d.d), d.scale, false)?;
        }
        row_step(gpu, "attn_block_forward", sb, None, lb, &d, b)?;
        for j in 0..g {
            let (c, a, bb) = (
                l.qlike(ob, &out, j, b.i0, false),
                l.block(sb, b, j, 0, false),
                l.kvlike(vb, &v, b.k0, false),
            );
            matmul_strided(gpu, c, a, bb, None, l.dims(b.bq, d.d, b.keys), 1.0, false)?;
        }
    }
    Ok(())
}

/// Gradients of [`flash_attention_forward`] from the saved `lse`: dq, dk, dv written (or added
/// to when `accumulate`); they may be views into one packed tensor, like the inputs.
pub fn flash_attention_backward(
    gpu: &Gpu,
    dq: Heads,
    dk: Heads,
    dv: Heads,
    dout: Heads,
    q: Heads,
    k: Heads,
    v: Heads,
    lse: &Tensor,
    d: AttnDims,
    accumulate: bool,
) -> Result<()> {
    let g = check_dims(&d)?;
    let rows = d.b * d.t;
    let (qw, kw) = (d.h * d.d, d.kv_h * d.d);
    let (qb, kb, vb) = (q.check("q", rows, qw)?, k.check("k", rows, kw)?, v.check("v", rows, kw)?);
    let (dqb, dkb, dvb) = (dq.check("dq", rows, qw)?, dk.check("dk", rows, kw)?, dv.check("dv", rows, kw)?);
    let dob = dout.check("dout", rows, qw)?;
    check_len("flash attention", "lse", lse.numel(), d.b * d.h * d.t)?;
    if d.t == 0 {
        return Ok(());
    }
    let l = Layout { d, g };
    let bq = block_rows(&d);
    let s = scratch(gpu, &d, bq, "attention score block")?;
    let dp = scratch(gpu, &d, bq, "attention dP block")?;
    let (sb, dpb, lb) =
        (s.single("flash attention")?, dp.single("flash attention")?, lse.single("flash attention")?);
    // Key rows 0..written of dK and dV hold this call's sums so far.
    let mut written = 0;
    for b in blocks(&d, bq) {
        for j in 0..g {
            let (c, a, bb) =
                (l.block(sb, b, j, 0, false), l.qlike(qb, &q, j, b.i0, false), l.kvlike(kb, &k, b.k0, true));
            matmul_strided(gpu, c, a, bb, None, l.dims(b.bq, b.keys, d.d), d.scale, false)?;
            let (c, a, bb) = (
                l.block(dpb, b, j, 0, false),
                l.qlike(dob, &dout, j, b.i0, false),
                l.kvlike(vb, &v, b.k0, true),
            );
            matmul_strided(gpu, c, a, bb, None, l.dims(b.bq, b.keys, d.d), 1.0, false)?;
        }
        // S now holds P and dP holds dS.
        row_step(gpu, "attn_block_backward", sb, Some(dpb), lb, &d, b)?;
        let seen = written.clamp(b.k0, b.k0 + b.keys) - b.k0;
        for j in 0..g {
            let (c, a, bb) = (
                l.qlike(dqb, &dq, j, b.i0, false),
                l.block(dpb, b, j, 0, false),
                l.kvlike(kb, &k, b.k0, false),
            );
            matmul_strided(gpu, c, a, bb, None, l.dims(b.bq, d.d, b.keys), d.scale, accumulate)?;
            // Key columns 0..seen were written by an earlier block; the rest are new here.
            for (c0, len, acc) in [(0, seen, true), (seen, b.keys - seen, accumulate || j > 0)] {
                if len == 0 {
                    continue;
                }
                let (c, a, bb) = (
                    l.kvlike(dvb, &dv, b.k0 + c0, false),
                    l.block(sb, b, j, c0, true),
                    l.qlike(dob, &dout, j, b.i0, false),
                );
                matmul_strided(gpu, c, a, bb, None, l.dims(len, d.d, b.bq), 1.0, acc)?;
                let (c, a, bb) = (
                    l.kvlike(dkb, &dk, b.k0 + c0, false),
                    l.block(dpb, b, j, c0, true),
                    l.qlike(qb, &q, j, b.i0, false),
                );
                matmul_strided(gpu, c, a, bb, None, l.dims(len, d.d, b.bq), d.scale, acc)?;
            }
        }
        written = b.k0 + b.keys;
    }
    Ok(())
}
