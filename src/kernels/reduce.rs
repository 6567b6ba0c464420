//! Reductions (`shaders/reduce.wgsl`): column sums (bias gradients), sums and sums of squares
//! into a GPU accumulator, and clipping by global norm without a read-back. Reference:
//! `kernels_ref::sum`, `sum_squares`, `clip_grad_norm`. Every sum runs in a fixed order.

use super::{elementwise, u32_of};
use crate::error::Result;
use crate::gpu::Bind;
use crate::gpu::{Gpu, KernelKey, Split, Tensor};

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    cols: u32,
    n: u32,
    flags: u32,
    x_off: u32,
    slot: u32,
    max_norm: f32,
    _pad: u32,
}

const WG: usize = 256;
const PER_GROUP: usize = WG * 16;

/// `out[j] = sum over rows of x[r, j]` (`+=` when accumulating). `x` may be chunked.
pub fn sum_rows(gpu: &Gpu, out: &Tensor, x: &Tensor, accumulate: bool) -> Result<()> {
    super::check_len("sum_rows", "out", out.numel(), x.cols())?;
    let ob = out.single("sum_rows")?;
    for (i, ch) in x.chunks().iter().enumerate() {
        match x.split() {
            Split::Rows => sum_rows_chunk(gpu, ob, ch.bind(), ch.len, x.cols(), accumulate || i > 0)?,
            Split::Cols => {
                // A column chunk is a (rows, len) matrix whose sums land in out[start..]: sum
                // into a temporary (a binding has no offset) and copy.
                let tmp = Tensor::empty(gpu, &[ch.len], "sum_rows chunk")?;
                let tb = tmp.single("sum_rows")?;
                sum_rows_chunk(gpu, tb, ch.bind(), x.rows(), ch.len, false)?;
                if accumulate {
                    let old = Tensor::empty(gpu, &[ch.len], "sum_rows old")?;
                    gpu.copy(ob, (ch.start * 4) as u64, old.single("sum_rows")?, 0, (ch.len * 4) as u64);
                    elementwise::axpby(gpu, &tmp, &old, 1.0, 1.0)?;
                }
                gpu.copy(tb, 0, ob, (ch.start * 4) as u64, (ch.len * 4) as u64);
            }
        }
    }
    Ok(())
}

/// Column sums of a (rows, cols) matrix in one buffer, a span of rows per dispatch.
fn sum_rows_chunk(
    gpu: &Gpu,
    out: Bind<'_>,
    x: Bind<'_>,
    rows: usize,
    cols: usize,
    accumulate: bool,
) -> Result<()> {
    for (r0, rl) in super::loop_spans(rows) {
        let p = Params {
            rows: u32_of(rl, "sum_rows")?,
            cols: u32_of(cols, "sum_rows")?,
            flags: (accumulate || r0 > 0) as u32,
            x_off: u32_of(r0 * cols, "sum_rows")?,
            ..Default::default()
        };
        let key = KernelKey::new("reduce", "sum_rows");
        gpu.dispatch(&key, &[Some(out), Some(x)], bytemuck::bytes_of(&p), gpu.grid(cols, WG))?;
    }
    Ok(())
}

/// `acc[slot] += sum(x)` (or the sum of squares), computed on the GPU in a fixed order.
pub fn sum_into(gpu: &Gpu, acc: &Tensor, slot: usize, x: &Tensor, squares: bool) -> Result<()> {
    let ab = acc.single("sum_into")?;
    for ch in x.chunks() {
        let n = ch.bytes() as usize / 4;
        let groups = n.div_ceil(PER_GROUP).max(1);
        super::check_trips("sum_into", groups, WG, 1)?;
        let partial = Tensor::empty(gpu, &[groups], "partial sums")?;
        let pb = partial.single("sum_into")?;
        let p = Params { n: u32_of(n, "sum_into")?, flags: squares as u32, ..Default::default() };
        let key = KernelKey::new("reduce", "partial_sums");
        gpu.dispatch(&key, &[Some(pb), Some(ch.bind())], bytemuck::bytes_of(&p), gpu.grid(n, PER_GROUP))?;
        let p =
            Params { n: u32_of(groups, "sum_into")?, slot: u32_of(slot, "sum_into")?, ..Default::default() };
        gpu.dispatch(
            &KernelKey::new("reduce", "finish_sum"),
            &[Some(ab), Some(pb)],
            bytemuck::bytes_of(&p),
            [1, 1, 1],
        )?;
    }
    Ok(())
}

/// Sum of all elements, read back (a synchronisation point).
pub fn sum(gpu: &Gpu, x: &Tensor, squares: bool) -> Result<f32> {
    let acc = Tensor::from_host(gpu, &[0.0], &[1], "sum")?;
    sum_into(gpu, &acc, 0, x, squares)?;
    Ok(acc.to_host(gpu)?[0])
}

/// A training step's status on the GPU, a 4-element tensor (`shaders/reduce.wgsl`): the sum of
/// the squares of the gradients ([`STATUS_SQUARES`]), the clip coefficient ([`STATUS_COEF`]),
/// the sum of the micro-batches' losses ([`STATUS_LOSS`], added by [`sum_into`]), and whether
/// the update is skipped ([`STATUS_SKIP`]: 1 when the loss or the norm is not finite).
pub fn step_status(gpu: &Gpu) -> Result<Tensor> {
    // Zeroed by a dispatch, not uploaded, so that it adds nothing to wait for.
    let acc = Tensor::empty(gpu, &[4], "step status")?;
    elementwise::fill(gpu, &acc, 0.0)?;
    Ok(acc)
}
pub const STATUS_SQUARES: usize = 0;
pub const STATUS_COEF: usize = 1;
pub const STATUS_LOSS: usize = 2;
pub const STATUS_SKIP: usize = 3;

/// The sum of the squares of all `grads` into a new step status ([`step_status`]; read it when
/// the norm is wanted), with no clipping.
pub fn sum_squares(gpu: &Gpu, grads: &[&Tensor]) -> Result<Tensor> {
    let acc = step_status(gpu)?;
    for g in grads {
        sum_into(gpu, &acc, STATUS_SQUARES, g, true)?;
    }
    Ok(acc)
}

/// Clip gradients by their global L2 norm as `torch.nn.utils.clip_grad_norm_` does, entirely on
/// the GPU. Returns the step status ([`step_status`]) to read when the norm is wanted.
pub fn clip_grad_norm(gpu: &Gpu, grads: &[&Tensor], max_norm: f32) -> Result<Tensor> {
    let acc = step_status(gpu)?;
    clip_into(gpu, &acc, grads, max_norm)?;
    Ok(acc)
}

/// Into a step's `status` ([`step_status`], its loss sum added already): the gradients' sum of
/// squares, the clip coefficient and the skip flag; then, with `max_norm > 0` (0: no
/// clipping), the gradients scaled by the coefficient. Nothing is read back: AdamW reads the
/// skip flag on the GPU ([`super::optim::adamw_step_gated`]).
pub fn clip_into(gpu: &Gpu, status: &Tensor, grads: &[&Tensor], max_norm: f32) -> Result<()> {
    for g in grads {
        sum_into(gpu, status, STATUS_SQUARES, g, true)?;
    }
    let p = Params { max_norm: max_norm.max(0.0), ..Default::default() };
    gpu.dispatch(
        &KernelKey::new("reduce", "clip_coef"),
        &[Some(status.single("clip")?)],
        bytemuck::bytes_of(&p),
        [1, 1, 1],
    )?;
    if max_norm > 0.0 {
        for g in grads {
            elementwise::scale_by(gpu, g, status, STATUS_COEF)?;
        }
    }
    Ok(())
}
