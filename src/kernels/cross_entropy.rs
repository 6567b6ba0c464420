//! Cross-entropy over the vocabulary fused with log-softmax (`shaders/cross_entropy.wgsl`),
//! with PyTorch's `ignore_index = -100`, forward and backward. Reference:
//! `kernels_ref::cross_entropy_*`.
//!
//! Logits may be chunked by rows or by vocabulary (columns). Per chunk, `xent_stats` folds the
//! chunk into a running (max, sum of exp, target logit) per row, so no step ever needs the
//! whole vocabulary of a row in one binding.

use super::u32_of;
use crate::error::{Error, Result};
use crate::gpu::Bind;
use crate::gpu::{Gpu, GpuBuffer, KernelKey, Split, Tensor};

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    ld: u32,
    col0: u32,
    ncols: u32,
    row0: u32,
    first: u32,
    grad_scale: f32,
    _pad: u32,
}

pub const IGNORE_INDEX: i32 = -100;
/// The workgroup of the entries that do not reduce a row (`xent_loss`, `xent_backward`).
const WG: u32 = 64;

/// Target ids of one batch on the GPU (`IGNORE_INDEX` rows take no loss).
pub struct Targets {
    host: Vec<i32>,
    buf: GpuBuffer,
    count: usize,
}

impl Targets {
    pub fn new(gpu: &Gpu, targets: &[i32], vocab: usize) -> Result<Targets> {
        if let Some((pos, &bad)) =
            targets.iter().enumerate().find(|(_, &t)| t != IGNORE_INDEX && (t < 0 || t as usize >= vocab))
        {
            return Err(Error::InvalidArgument {
                name: "targets".into(),
                detail: format!("target {bad} at position {pos} is outside the vocabulary of {vocab} (and is not {IGNORE_INDEX})"),
            });
        }
        let buf = gpu.alloc((targets.len().max(1) * 4) as u64, "targets")?;
        if !targets.is_empty() {
            gpu.write(buf.raw(), 0, bytemuck::cast_slice(targets))?;
        }
        let count = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
        Ok(Targets { host: targets.to_vec(), buf, count })
    }
    /// Rows that count towards the loss.
    pub fn count(&self) -> usize {
        self.count
    }
    pub fn len(&self) -> usize {
        self.host.len()
    }
    pub fn is_empty(&self) -> bool {
        self.host.is_empty()
    }
    /// The ids on the GPU (read by the fused LM head + loss, `lm_head_loss`).
    pub(crate) fn buffer(&self) -> Bind<'_> {
        self.buf.bind()
    }
}

fn key(entry: &'static str) -> KernelKey {
    KernelKey::new("cross_entropy", entry).with("WG", WG)
}

/// (rows, ld, col0, ncols, row0) of each chunk of the logits.
fn pieces(logits: &Tensor) -> Vec<(usize, usize, usize, usize, usize)> {
    let (n, v) = (logits.rows(), logits.cols());
    logits
        .chunks()
        .iter()
        .map(|ch| match logits.split() {
            Split::Rows => (ch.len, v, 0, v, ch.start),
            Split::Cols => (n, ch.len, ch.start, ch.len, 0),
        })
        .collect()
}

fn params(piece: (usize, usize, usize, usize, usize), first: bool, grad_scale: f32) -> Result<Params> {
    let (rows, ld, col0, ncols, row0) = piece;
    super::check_trips("cross_entropy", ncols, WG as usize, 3)?;
    let u = |x: usize| u32_of(x, "cross_entropy");
    Ok(Params {
        rows: u(rows)?,
        ld: u(ld)?,
        col0: u(col0)?,
        ncols: u(ncols)?,
        row0: u(row0)?,
        first: first as u32,
        grad_scale,
        _pad: 0,
    })
}

/// Per-row losses (N) and the saved `state` (N, 4) for the backward. The mean loss is
/// `reduce::sum(losses) / targets.count()`.
pub fn cross_entropy_forward(
    gpu: &Gpu,
    losses: &Tensor,
    state: &Tensor,
    logits: &Tensor,
    targets: &Targets,
) -> Result<()> {
    let n = logits.rows();
    super::check_len("cross_entropy", "targets", targets.len(), n)?;
    super::check_len("cross_entropy", "losses", losses.numel(), n)?;
    super::check_len("cross_entropy", "state", state.numel(), 4 * n)?;
    let sb = state.single("cross_entropy")?;
    let split_rows = logits.split() == Split::Rows;
    for (i, (piece, ch)) in pieces(logits).into_iter().zip(logits.chunks()).enumerate() {
        let p = params(piece, split_rows || i == 0, 0.0)?;
        let shaders = ["cross_entropy", "cross_entropy_subgroup"];
        let key = super::rows::row_kernel(gpu, shaders, "xent_stats", "cross_entropy", piece.3, 3)?;
        let bufs = [Some(ch.bind()), Some(targets.buf.bind()), Some(sb)];
        gpu.dispatch(&key, &bufs, bytemuck::bytes_of(&p), gpu.grid(piece.0, 1))?;
    }
    let p = params((n, 0, 0, 0, 0), true, 0.0)?;
    let bufs = [None, Some(targets.buf.bind()), Some(sb), Some(losses.single("cross_entropy")?)];
    gpu.dispatch(&key("xent_loss"), &bufs, bytemuck::bytes_of(&p), gpu.grid(n, WG as usize))
}

/// Gradient of `dloss * mean loss` with respect to the logits (same chunk layout as logits).
pub fn cross_entropy_backward(
    gpu: &Gpu,
    dlogits: &Tensor,
    logits: &Tensor,
    state: &Tensor,
    targets: &Targets,
    dloss: f32,
) -> Result<()> {
    super::elementwise::same_layout("cross_entropy_backward", &[dlogits, logits])?;
    let scale = if targets.count == 0 { 0.0 } else { dloss / targets.count as f32 };
    let sb = state.single("cross_entropy")?;
    for ((piece, ch), dch) in pieces(logits).into_iter().zip(logits.chunks()).zip(dlogits.chunks()) {
        let p = params(piece, false, scale)?;
        let bufs = [Some(ch.bind()), Some(targets.buf.bind()), Some(sb), Some(dch.bind())];
        gpu.dispatch(&key("xent_backward"), &bufs, bytemuck::bytes_of(&p), gpu.grid(piece.0, 1))?;
    }
    Ok(())
}
