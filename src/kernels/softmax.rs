//! Row-wise softmax (`shaders/softmax.wgsl`), optionally with attention's causal and
//! sliding-window mask and a scale on the input. Reference: `kernels_ref::softmax_*`.

use super::rows::row_kernel;
use super::{check_len, u32_of};
use crate::error::Result;
use crate::gpu::{Gpu, Tensor};

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    cols: u32,
    causal: u32,
    window: u32,
    scale: f32,
    _pad: [u32; 3],
}

/// The shader and its variant that reduces a row in one subgroup (`rows`).
const SHADERS: [&str; 2] = ["softmax", "softmax_subgroup"];

/// Which entries of a row take part.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mask {
    #[default]
    None,
    /// Rows are (.., query i) of a (.., T, T) tensor: key j visible iff j <= i and i - j < window.
    Causal { window: Option<usize> },
}

fn params(rows: usize, cols: usize, mask: Mask, scale: f32) -> Result<Params> {
    let (causal, window) = match mask {
        Mask::None => (0, 0),
        Mask::Causal { window } => (1, u32_of(window.unwrap_or(0), "softmax window")?),
    };
    Ok(Params {
        rows: u32_of(rows, "softmax")?,
        cols: u32_of(cols, "softmax")?,
        causal,
        window,
        scale,
        _pad: [0; 3],
    })
}

/// `y = softmax(scale * x)` over each row (masked entries 0).
pub fn softmax_forward(gpu: &Gpu, y: &Tensor, x: &Tensor, mask: Mask, scale: f32) -> Result<()> {
    check_len("softmax_forward", "y", y.numel(), x.numel())?;
    let key = row_kernel(gpu, SHADERS, "softmax_forward", "softmax", x.cols(), 3)?;
    let p = params(x.rows(), x.cols(), mask, scale)?;
    let bufs = [Some(x.single("softmax")?), Some(y.single("softmax")?)];
    gpu.dispatch(&key, &bufs, bytemuck::bytes_of(&p), gpu.grid(x.rows(), 1))
}

/// `dx = scale * y * (dy - sum(dy * y))` over each row.
pub fn softmax_backward(gpu: &Gpu, dx: &Tensor, y: &Tensor, dy: &Tensor, scale: f32) -> Result<()> {
    check_len("softmax_backward", "dx", dx.numel(), y.numel())?;
    check_len("softmax_backward", "dy", dy.numel(), y.numel())?;
    let key = row_kernel(gpu, SHADERS, "softmax_backward", "softmax", y.cols(), 3)?;
    let p = params(y.rows(), y.cols(), Mask::None, scale)?;
    let bufs = [Some(y.single("softmax")?), Some(dx.single("softmax")?), Some(dy.single("softmax")?)];
    gpu.dispatch(&key, &bufs, bytemuck::bytes_of(&p), gpu.grid(y.rows(), 1))
}
