//! LayerNorm and RMSNorm (`shaders/norm.wgsl`), forward and backward, reading rows as vec4s
//! (`norm_vec4`, `norm_subgroup_vec4`) where their length is a multiple of 4. Reference:
//! `kernels_ref::layernorm_*`, `kernels_ref::rmsnorm_*`.
//!
//! `stats` is (rows, 2) = (mean, rstd) per row; RMSNorm stores mean = 0. `shift` is 1.0 for
//! Gemma's `(1 + w)` scaling. The backward of x is two dispatches (g = dy * (w + shift), then
//! dx from g) because a phone allows only four storage buffers per dispatch.

use super::{check_len, elementwise, reduce, u32_of};
use crate::error::Result;
use crate::gpu::{Gpu, KernelKey, Tensor};

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    cols: u32,
    flags: u32,
    row0: u32,
    eps: f32,
    shift: f32,
    row1: u32,
    _pad: u32,
}

/// The shader and its variant that reduces a row in one subgroup (`rows`).
const SHADERS: [&str; 2] = ["norm", "norm_subgroup"];
/// The same two reading and writing rows as vec4s (rows whose length is a multiple of 4).
const SHADERS_VEC4: [&str; 2] = ["norm_vec4", "norm_subgroup_vec4"];
/// `norm_backward_dw`'s workgroup: one invocation a column, no reduction.
const WG: u32 = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    Layer,
    /// RMSNorm; `gemma` selects the `(1 + w)` scaling.
    Rms {
        gemma: bool,
    },
}

impl NormKind {
    pub fn is_rms(self) -> bool {
        matches!(self, NormKind::Rms { .. })
    }
    /// 1.0 for Gemma's `(1 + w)`, else 0.0.
    pub fn shift(self) -> f32 {
        if self == (NormKind::Rms { gemma: true }) {
            1.0
        } else {
            0.0
        }
    }
}

/// The pipeline of a row entry (`norm_forward`, `norm_backward_dx`) for rows of `cols`.
fn row_key(gpu: &Gpu, entry: &'static str, kind: NormKind, cols: usize) -> Result<KernelKey> {
    let key = if elementwise::takes_vec4(cols) {
        super::rows::row_kernel(gpu, SHADERS_VEC4, entry, "norm", cols / 4, 3)?
    } else {
        super::rows::row_kernel(gpu, SHADERS, entry, "norm", cols, 3)?
    };
    Ok(key.with("RMS", kind.is_rms() as u32))
}

/// (rows, cols) of `x` normalised over groups of `w.numel()` values: the weight's length is the
/// normalised dimension, so (B*T, H*D) activations normalise per head with a (D) weight.
fn dims(op: &str, x: &Tensor, w: &Tensor) -> Result<(usize, usize)> {
    let cols = w.numel();
    if cols == 0 || !x.numel().is_multiple_of(cols) {
        return Err(crate::Error::shape(
            op,
            format!("{} values do not split into rows of the weight's {cols}", x.numel()),
        ));
    }
    Ok((x.numel() / cols, cols))
}

fn params((rows, cols): (usize, usize), kind: NormKind, eps: f32, accumulate: bool) -> Result<Params> {
    Ok(Params {
        rows: u32_of(rows, "norm")?,
        cols: u32_of(cols, "norm")?,
        flags: accumulate as u32,
        eps,
        shift: kind.shift(),
        ..Default::default()
    })
}

/// `y = norm(x) * (w + shift) (+ b)`; saves `stats` (rows, 2).
pub fn norm_forward(
    gpu: &Gpu,
    y: &Tensor,
    stats: &Tensor,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    kind: NormKind,
    eps: f32,
) -> Result<()> {
    check_len("norm_forward", "y", y.numel(), x.numel())?;
    let (rows, cols) = dims("norm_forward", x, w)?;
    check_len("norm_forward", "stats", stats.numel(), 2 * rows)?;
    let p = params((rows, cols), kind, eps, false)?;
    let bufs = [
        Some(x.single("norm")?),
        Some(w.single("norm")?),
        Some(y.single("norm")?),
        Some(stats.single("norm")?),
    ];
    let key = row_key(gpu, "norm_forward", kind, cols)?;
    gpu.dispatch(&key, &bufs, bytemuck::bytes_of(&p), gpu.grid(rows, 1))?;
    if let Some(b) = b {
        elementwise::add_row(gpu, y, b)?;
    }
    Ok(())
}

/// Gradients of [`norm_forward`]: `dx`, `dw`, `db` (LayerNorm bias), each optional; written,
/// or added to when `accumulate`.
pub fn norm_backward(
    gpu: &Gpu,
    dx: Option<&Tensor>,
    dw: Option<&Tensor>,
    db: Option<&Tensor>,
    dy: &Tensor,
    x: &Tensor,
    w: &Tensor,
    stats: &Tensor,
    kind: NormKind,
    accumulate: bool,
) -> Result<()> {
    check_len("norm_backward", "dy", dy.numel(), x.numel())?;
    let (rows, cols) = dims("norm_backward", x, w)?;
    let p = params((rows, cols), kind, 0.0, accumulate)?;
    let (xb, sb, dyb) = (x.single("norm")?, stats.single("norm")?, dy.single("norm")?);
    if let Some(dw) = dw {
        check_len("norm_backward", "dw", dw.numel(), cols)?;
        let bufs = [Some(xb), Some(dyb), Some(dw.single("norm")?), Some(sb)];
        // one invocation a column, or four columns where the rows are vec4s
        let (shader, per) = if elementwise::takes_vec4(cols) { ("norm_vec4", 4) } else { ("norm", 1) };
        for (r0, rl) in super::loop_spans(rows) {
            let p = Params {
                row0: u32_of(r0, "norm_backward")?,
                row1: u32_of(r0 + rl, "norm_backward")?,
                flags: (accumulate || r0 > 0) as u32,
                ..p
            };
            gpu.dispatch(
                &KernelKey::new(shader, "norm_backward_dw").with("WG", WG).with("RMS", kind.is_rms() as u32),
                &bufs,
                bytemuck::bytes_of(&p),
                gpu.grid(cols / per, WG as usize),
            )?;
        }
    }
    if let Some(db) = db {
        reduce::sum_rows(gpu, db, dy, accumulate)?;
    }
    if let Some(dx) = dx {
        check_len("norm_backward", "dx", dx.numel(), x.numel())?;
        let g = Tensor::empty(gpu, x.shape(), "norm backward g")?;
        elementwise::row_mul(gpu, &g, dy, w, kind.shift())?;
        let bufs = [Some(xb), Some(g.single("norm")?), Some(dx.single("norm")?), Some(sb)];
        let key = row_key(gpu, "norm_backward_dx", kind, cols)?;
        gpu.dispatch(&key, &bufs, bytemuck::bytes_of(&p), gpu.grid(rows, 1))?;
    }
    Ok(())
}
