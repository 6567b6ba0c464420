//! The LM head fused with the cross-entropy (`--fused-loss`): `loss = mean CE(softcap(x W^T),
//! targets)` and its gradients, with the vocabulary walked in chunks so that the (rows x
//! vocabulary) logits and their gradient never exist whole (the idea of Cut Cross-Entropy and
//! Liger's fused linear cross-entropy; the code is ours). Reference:
//! `kernels_ref::linear_cross_entropy_forward` / `_backward`.
//!
//! Forward, for each chunk `[v0, v1)` of the vocabulary: `S = x . W[v0:v1]^T` (the f32 matmul on
//! views into W's chunks; a packed weight's rows are first dequantized into a bounded buffer),
//! then `shaders/lm_head_loss.wgsl` folds S, soft-capped as it is read, into the running (max,
//! sum of exp, target logit) of each row, the state `cross_entropy.wgsl` keeps. Only that
//! (rows, 4) state is saved. Backward, for each chunk again: S is recomputed and turned in place
//! into `dS = (softmax - onehot) * dloss / count * softcap'`, then `dx (+)= dS . W[v0:v1]` and,
//! when W trains, `dW[v0:v1] (+)= dS^T . x`.
//!
//! Chunk rule ([`chunk_cols`]): as many columns as keep S (and a packed weight's dequantized
//! rows) within [`SCRATCH_BYTES`] and one binding, at most [`MAX_CHUNK_COLS`], rounded down to a
//! multiple of 256. At 8 x 128 rows that is 8,192 columns (32 MiB) instead of Gemma's 262,144
//! (1 GiB for the logits, as much again for their gradient). The cost is one more head product
//! in the backward pass (three instead of two; Cut Cross-Entropy pays the same).

use super::cross_entropy::Targets;
use super::matmul::{self, Dims, View};
use super::{elementwise, quant, reduce, u32_of};
use crate::error::{Error, Result};
use crate::gpu::Bind;
use crate::gpu::{Gpu, KernelKey, QTensor, Split, Tensor};

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    ld: u32,
    col0: u32,
    ncols: u32,
    first: u32,
    grad_scale: f32,
    cap: f32,
    _pad: u32,
}

const WG: u32 = 64;
/// Bytes of the per-chunk scratch: the logits chunk (rows x columns) plus, for a packed weight,
/// its dequantized rows (columns x C).
pub const SCRATCH_BYTES: usize = 32 << 20;
/// Most vocabulary columns in one chunk (few rows would otherwise take huge chunks).
pub const MAX_CHUNK_COLS: usize = 16_384;
const COL_ALIGN: usize = 256;

thread_local! {
    static CHUNK_OVERRIDE: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Run `f` with the fused head walking the vocabulary `cols` columns at a time on this thread
/// (tests and gradcheck use it to get many, ragged chunks out of a small vocabulary).
pub fn with_chunk_cols<R>(cols: usize, f: impl FnOnce() -> R) -> R {
    super::with_override(&CHUNK_OVERRIDE, cols.max(1), f)
}

/// The LM head's weight as the graph holds it.
#[derive(Clone, Copy)]
pub enum HeadWeight<'a> {
    /// f32, (V, C) when `trans_w` (a tied embedding, a Hugging Face head), else (C, V); may be
    /// chunked either way.
    F32 { w: &'a Tensor, trans_w: bool },
    /// A frozen weight in its stored format, (V, C).
    Packed(&'a QTensor),
    /// A frozen (V, C) weight not on the device: each vocabulary chunk's rows are uploaded when
    /// the walk reaches them (a streamed weight under `--memory-budget`).
    Rows(&'a dyn HeadRows),
}

/// A frozen (V, C) head that hands out vocabulary rows on the device on demand.
pub trait HeadRows {
    /// (vocabulary, hidden size)
    fn dims(&self) -> (usize, usize);
    /// Rows `v0..v0 + vl`, (vl, C), in f32 or in their stored format.
    fn rows(&self, gpu: &Gpu, v0: usize, vl: usize) -> Result<DeviceRows>;
}

/// Rows of a head on the device.
pub enum DeviceRows {
    F32(Tensor),
    Packed(QTensor),
}

impl HeadWeight<'_> {
    /// (vocabulary, hidden size)
    fn dims(&self) -> (usize, usize) {
        match self {
            HeadWeight::F32 { w, trans_w: true } => (w.rows(), w.cols()),
            HeadWeight::F32 { w, trans_w: false } => (w.cols(), w.rows()),
            HeadWeight::Packed(q) => (q.rows(), q.cols()),
            HeadWeight::Rows(r) => r.dims(),
        }
    }
    /// Whether each chunk's rows are first made into an f32 scratch buffer (dequantized or
    /// uploaded), which the chunk size leaves room for.
    fn rows_scratch(&self) -> bool {
        !matches!(self, HeadWeight::F32 { .. })
    }
}

/// Vocabulary columns per chunk for `n` rows of hidden size `c` (module comment).
pub fn chunk_cols(gpu: &Gpu, n: usize, c: usize, v: usize, packed: bool) -> Result<usize> {
    if let Some(cols) = CHUNK_OVERRIDE.with(|o| o.get()) {
        return Ok(cols.min(v).max(1));
    }
    let per_col = 4 * (n + if packed { c } else { 0 });
    let budget = SCRATCH_BYTES.min(gpu.max_binding() as usize);
    let mut cols = (budget / per_col.max(1)).min(MAX_CHUNK_COLS);
    if cols >= COL_ALIGN {
        cols -= cols % COL_ALIGN;
    }
    if cols == 0 {
        return Err(Error::shape(
            "lm_head_loss",
            format!("{n} rows do not fit one vocabulary column in {budget} bytes; use fewer tokens per step"),
        ));
    }
    Ok(cols.min(v).max(1))
}

fn key(entry: &'static str) -> KernelKey {
    KernelKey::new("lm_head_loss", entry).with("WG", WG)
}

/// A block of W that one buffer holds: vocabulary `v0..v0 + vl` by hidden `c0..c0 + cl`,
/// element (v, c) at `off + (v - v0) * s_v + (c - c0) * s_c`.
struct Block<'a> {
    buf: Bind<'a>,
    off: usize,
    s_v: usize,
    s_c: usize,
    v0: usize,
    vl: usize,
    c0: usize,
    cl: usize,
}

/// The blocks of `w` that cover vocabulary `v0..v0 + vl`, ordered by (v0, c0): W is split along
/// one axis only, so a block starting at vocabulary 0 (hidden 0) is the first to touch its
/// columns of dx (of S).
fn blocks(w: &Tensor, trans_w: bool, v0: usize, vl: usize) -> Vec<Block<'_>> {
    let (rows, cols) = (w.rows(), w.cols());
    let mut out = Vec::new();
    for ch in w.chunks() {
        let (r_range, c_range, ld) = match w.split() {
            Split::Rows => (ch.start..ch.start + ch.len, 0..cols, cols),
            Split::Cols => (0..rows, ch.start..ch.start + ch.len, ch.len),
        };
        let (v_range, h_range) = if trans_w { (r_range, c_range) } else { (c_range, r_range) };
        let (vs, ve) = (v_range.start.max(v0), v_range.end.min(v0 + vl));
        if vs >= ve || h_range.is_empty() {
            continue;
        }
        let (r, col) = if trans_w { (vs, h_range.start) } else { (h_range.start, vs) };
        let off = match w.split() {
            Split::Rows => (r - ch.start) * cols + col,
            Split::Cols => r * ch.len + (col - ch.start),
        };
        let (s_v, s_c) = if trans_w { (ld, 1) } else { (1, ld) };
        out.push(Block {
            buf: ch.bind(),
            off,
            s_v,
            s_c,
            v0: vs,
            vl: ve - vs,
            c0: h_range.start,
            cl: h_range.len(),
        });
    }
    out.sort_by_key(|b| (b.v0, b.c0));
    out
}

/// (buffer, first row, rows) of a tensor stored by whole rows.
fn row_chunks<'t>(t: &'t Tensor, what: &str) -> Result<Vec<(Bind<'t>, usize, usize)>> {
    match (t.chunks(), t.split()) {
        ([one], _) => Ok(vec![(one.bind(), 0, t.rows())]),
        (chunks, Split::Rows) => Ok(chunks.iter().map(|c| (c.bind(), c.start, c.len)).collect()),
        _ => Err(Error::shape(
            "lm_head_loss",
            format!("{what} {:?} is split by columns; store it by rows", t.shape()),
        )),
    }
}

/// One vocabulary chunk: its logits `S (n, vl)` and the blocks of W it was made from (for a
/// packed weight, its dequantized rows, which the dx product reads again).
struct ChunkLogits<'a> {
    s: Tensor,
    blocks: Vec<Block<'a>>,
}

/// `S = x . W[v0:v0+vl]^T` into a fresh scratch tensor. `rows` holds a packed weight's
/// dequantized rows, which the returned blocks point into.
fn chunk_logits<'a>(
    gpu: &Gpu,
    x: &Tensor,
    w: HeadWeight<'a>,
    rows: &'a mut Option<Tensor>,
    v0: usize,
    vl: usize,
) -> Result<ChunkLogits<'a>> {
    let (n, c) = (x.rows(), x.cols());
    let s = Tensor::empty(gpu, &[n, vl], "lm head logits chunk")?;
    let blocks = match w {
        HeadWeight::F32 { w, trans_w } => blocks(w, trans_w, v0, vl),
        HeadWeight::Packed(q) => {
            let t = Tensor::empty(gpu, &[vl, c], "lm head dequantized rows")?;
            quant::qdequantize(gpu, &t, q, v0)?;
            let t = rows.insert(t);
            vec![Block { buf: t.single("lm_head_loss")?, off: 0, s_v: c, s_c: 1, v0, vl, c0: 0, cl: c }]
        }
        HeadWeight::Rows(r) => {
            let t = match r.rows(gpu, v0, vl)? {
                DeviceRows::F32(t) => t,
                DeviceRows::Packed(q) => {
                    let t = Tensor::empty(gpu, &[vl, c], "lm head dequantized rows")?;
                    quant::qdequantize(gpu, &t, &q, 0)?;
                    t
                }
            };
            let t = rows.insert(t);
            vec![Block { buf: t.single("lm_head_loss")?, off: 0, s_v: c, s_c: 1, v0, vl, c0: 0, cl: c }]
        }
    };
    let sb = s.single("lm_head_loss")?;
    for b in &blocks {
        for &(xb, r0, rl) in &row_chunks(x, "x")? {
            let cv = View { off: r0 * vl + (b.v0 - v0), ..View::matrix(sb, 0, vl, false) };
            let av = View::matrix(xb, b.c0, c, false);
            let bv = View { s_i: b.s_c, s_j: b.s_v, ..View::matrix(b.buf, b.off, 0, false) };
            let d = Dims { m: rl, n: b.vl, k: b.cl, nb1: 1, nb2: 1 };
            matmul::matmul_strided(gpu, cv, av, bv, None, d, 1.0, b.c0 != 0)?;
        }
    }
    Ok(ChunkLogits { s, blocks })
}

/// The transpose of a view.
fn tr(v: View<'_>) -> View<'_> {
    View { s_i: v.s_j, s_j: v.s_i, ..v }
}

fn params(
    n: usize,
    vl: usize,
    v0: usize,
    first: bool,
    grad_scale: f32,
    softcap: Option<f32>,
) -> Result<Params> {
    super::check_trips("lm_head_loss", vl, WG as usize, 3)?;
    let u = |x: usize| u32_of(x, "lm_head_loss");
    Ok(Params {
        rows: u(n)?,
        ld: u(vl)?,
        col0: u(v0)?,
        ncols: u(vl)?,
        first: first as u32,
        grad_scale,
        cap: softcap.unwrap_or(0.0),
        _pad: 0,
    })
}

fn check(
    x: &Tensor,
    w: HeadWeight,
    state: &Tensor,
    targets: &Targets,
    softcap: Option<f32>,
) -> Result<(usize, usize, usize)> {
    let (v, c) = w.dims();
    let n = x.rows();
    if x.cols() != c {
        return Err(Error::shape("lm_head_loss", format!("x {:?} against a head of {v} x {c}", x.shape())));
    }
    super::check_len("lm_head_loss", "targets", targets.len(), n)?;
    super::check_len("lm_head_loss", "state", state.numel(), 4 * n)?;
    if let Some(cap) = softcap {
        super::activation::check_cap(cap)?;
    }
    Ok((n, c, v))
}

/// The mean loss `loss (1)` (NaN when every target is ignored, as PyTorch gives) and the
/// per-row `state (n, 4)` the backward pass needs, from `x (n, C)` and the head `w`.
pub fn lm_head_loss_forward(
    gpu: &Gpu,
    loss: &Tensor,
    state: &Tensor,
    x: &Tensor,
    w: HeadWeight,
    targets: &Targets,
    softcap: Option<f32>,
) -> Result<()> {
    let (n, c, v) = check(x, w, state, targets, softcap)?;
    super::check_len("lm_head_loss", "loss", loss.numel(), 1)?;
    let stb = state.single("lm_head_loss")?;
    let tb = targets.buffer();
    let cols = chunk_cols(gpu, n, c, v, w.rows_scratch())?;
    for (v0, vl) in super::spans(v, cols) {
        let mut rows = None;
        let ch = chunk_logits(gpu, x, w, &mut rows, v0, vl)?;
        let p = params(n, vl, v0, v0 == 0, 0.0, softcap)?;
        let shaders = ["lm_head_loss", "lm_head_loss_subgroup"];
        let key = super::rows::row_kernel(gpu, shaders, "head_stats", "lm_head_loss", vl, 3)?;
        let bufs = [Some(ch.s.single("lm_head_loss")?), Some(tb), Some(stb)];
        gpu.dispatch(&key, &bufs, bytemuck::bytes_of(&p), gpu.grid(n, 1))?;
    }
    let losses = Tensor::empty(gpu, &[n], "losses")?;
    let p = params(n, 0, 0, true, 0.0, softcap)?;
    let bufs = [None, Some(tb), Some(stb), Some(losses.single("lm_head_loss")?)];
    gpu.dispatch(&key("head_loss"), &bufs, bytemuck::bytes_of(&p), gpu.grid(n, WG as usize))?;
    // Filled by a dispatch, not uploaded: a host write would end the step's submission.
    let sum = Tensor::empty(gpu, &[1], "loss sum")?;
    elementwise::fill(gpu, &sum, 0.0)?;
    reduce::sum_into(gpu, &sum, 0, &losses, false)?;
    // 0/0 gives NaN when every row is ignored, as the composed cross-entropy does.
    elementwise::axpby(gpu, loss, &sum, 1.0 / targets.count() as f32, 0.0)
}

/// Gradients of `dloss * mean loss`: `dx (n, C)` and `dw` (W's shape), each optional with its
/// accumulate flag (add into it rather than overwrite). `state` is the forward's.
#[allow(clippy::too_many_arguments)]
pub fn lm_head_loss_backward(
    gpu: &Gpu,
    dx: Option<(&Tensor, bool)>,
    dw: Option<(&Tensor, bool)>,
    x: &Tensor,
    w: HeadWeight,
    state: &Tensor,
    targets: &Targets,
    softcap: Option<f32>,
    dloss: f32,
) -> Result<()> {
    let (n, c, v) = check(x, w, state, targets, softcap)?;
    if let Some((t, _)) = dx {
        if t.shape() != x.shape() {
            return Err(Error::shape("lm_head_loss", format!("dx {:?} for x {:?}", t.shape(), x.shape())));
        }
    }
    let dw = match (dw, w) {
        (None, _) => None,
        (Some((t, acc)), HeadWeight::F32 { w, trans_w }) => {
            if t.shape() != w.shape() {
                return Err(Error::shape(
                    "lm_head_loss",
                    format!("dW {:?} for W {:?}", t.shape(), w.shape()),
                ));
            }
            Some((t, acc, trans_w))
        }
        (Some(_), HeadWeight::Packed(_) | HeadWeight::Rows(_)) => {
            return Err(Error::Internal {
                context: "lm_head_loss backward".into(),
                message: "a packed or streamed (frozen) head weight was asked for a gradient".into(),
            })
        }
    };
    if dx.is_none() && dw.is_none() {
        return Ok(());
    }
    let stb = state.single("lm_head_loss")?;
    let tb = targets.buffer();
    let scale = if targets.count() == 0 { 0.0 } else { dloss / targets.count() as f32 };
    let xrows = row_chunks(x, "x")?;
    let cols = chunk_cols(gpu, n, c, v, w.rows_scratch())?;
    for (v0, vl) in super::spans(v, cols) {
        let mut rows = None;
        let ch = chunk_logits(gpu, x, w, &mut rows, v0, vl)?;
        let sb = ch.s.single("lm_head_loss")?;
        let p = params(n, vl, v0, false, scale, softcap)?;
        gpu.dispatch(
            &key("head_grad"),
            &[Some(sb), Some(tb), Some(stb)],
            bytemuck::bytes_of(&p),
            gpu.grid(n, 1),
        )?;
        // dS now holds the chunk's dlogits.
        let ds = |r0: usize, b: &Block| View { off: r0 * vl + (b.v0 - v0), ..View::matrix(sb, 0, vl, false) };
        if let Some((dxt, acc)) = dx {
            for b in &ch.blocks {
                for &(db, r0, rl) in &row_chunks(dxt, "dx")? {
                    let cv = View::matrix(db, b.c0, c, false);
                    let bv = View { s_i: b.s_v, s_j: b.s_c, ..View::matrix(b.buf, b.off, 0, false) };
                    let d = Dims { m: rl, n: b.cl, k: b.vl, nb1: 1, nb2: 1 };
                    matmul::matmul_strided(gpu, cv, ds(r0, b), bv, None, d, 1.0, acc || b.v0 != 0)?;
                }
            }
        }
        if let Some((dwt, acc, trans_w)) = dw {
            for b in blocks(dwt, trans_w, v0, vl) {
                for (i, &(xb, r0, rl)) in xrows.iter().enumerate() {
                    let cv = View {
                        s_i: if trans_w { b.s_v } else { b.s_c },
                        ..View::matrix(b.buf, b.off, 0, false)
                    };
                    let xv = View::matrix(xb, b.c0, c, false);
                    let dv = ds(r0, &b);
                    let accumulate = acc || i > 0;
                    if trans_w {
                        // dW rows v: dW[v0:v1] (vl, C) = dS^T (vl, rows) . x (rows, C)
                        let d = Dims { m: b.vl, n: b.cl, k: rl, nb1: 1, nb2: 1 };
                        matmul::matmul_strided(gpu, cv, tr(dv), xv, None, d, 1.0, accumulate)?;
                    } else {
                        // dW columns v: dW[:, v0:v1] (C, vl) = x^T (C, rows) . dS (rows, vl)
                        let d = Dims { m: b.cl, n: b.vl, k: rl, nb1: 1, nb2: 1 };
                        matmul::matmul_strided(gpu, cv, tr(xv), dv, None, d, 1.0, accumulate)?;
                    }
                }
            }
        }
    }
    Ok(())
}
