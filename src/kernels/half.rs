//! Activations held in 16 bits between the forward and the backward pass (`shaders/half.wgsl`;
//! reference `kernels_ref::half_round`). The graph executor packs a value the backward pass
//! will read once its last forward reader has run, and unpacks it to f32 just before the first
//! backward step that reads it (`--activations`, `graph::Run`): the kept activations take half
//! the memory, and every kernel still reads and writes f32.
//!
//! Two values share a u32 word. The conversions are integer arithmetic, so every device rounds
//! alike (to nearest, ties to even) and none needs `shader_f16`. In f16, a finite value beyond
//! +-65504 saturates there (bf16 has f32's range: the safer format for models whose
//! activations grow large, such as Gemma's residual stream).

use super::u32_of;
use crate::error::Result;
use crate::gpu::{Bind, Gpu, GpuBuffer, KernelKey, Split, Tensor};
pub use kernels_ref::HalfFormat;

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    format: u32,
    _pad: [u32; 2],
}

const WG: usize = 256;

/// A tensor held in 16 bits, chunked as the f32 tensor it was made from.
#[derive(Debug)]
pub struct HalfTensor {
    format: HalfFormat,
    shape: Vec<usize>,
    split: Split,
    /// (start, len) of each chunk of the f32 tensor, and its words
    chunks: Vec<(usize, usize, GpuBuffer)>,
}

impl HalfTensor {
    /// The values, as f32 (unpacked on the GPU, then read back: waits for the GPU).
    pub fn to_host(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        unpack(gpu, self)?.to_host(gpu)
    }
}

/// Elements of a chunk of `len` rows (or columns) of a tensor split by `split`.
fn elems(shape: &[usize], split: Split, len: usize) -> usize {
    let cols = shape.last().copied().unwrap_or(1);
    let numel: usize = shape.iter().product();
    match split {
        Split::Rows => len * cols,
        Split::Cols => len * numel.checked_div(cols).unwrap_or(0),
    }
}

fn code(format: HalfFormat) -> u32 {
    match format {
        HalfFormat::F16 => 0,
        HalfFormat::Bf16 => 1,
    }
}

/// One conversion of `n` values from `src` into `dst` (`pack` or `unpack`).
fn convert(
    gpu: &Gpu,
    entry: &'static str,
    dst: Bind<'_>,
    src: Bind<'_>,
    n: usize,
    format: HalfFormat,
) -> Result<()> {
    let p = Params { n: u32_of(n, entry)?, format: code(format), ..Default::default() };
    gpu.dispatch(
        &KernelKey::new("half", entry),
        &[Some(dst), Some(src)],
        bytemuck::bytes_of(&p),
        gpu.grid(n.div_ceil(2), WG),
    )
}

/// `x` in 16 bits of `format` (new buffers; `x` is left as it is).
pub fn pack(gpu: &Gpu, x: &Tensor, format: HalfFormat) -> Result<HalfTensor> {
    let mut chunks = Vec::with_capacity(x.chunks().len());
    for c in x.chunks() {
        let n = elems(x.shape(), x.split(), c.len);
        let words = gpu.alloc((n.div_ceil(2).max(1) * 4) as u64, "activations held in 16 bits")?;
        convert(gpu, "pack", words.bind(), c.bind(), n, format)?;
        chunks.push((c.start, c.len, words));
    }
    Ok(HalfTensor { format, shape: x.shape().to_vec(), split: x.split(), chunks })
}

/// The f32 tensor `h` holds (new buffers, chunked as the tensor it was packed from).
pub fn unpack(gpu: &Gpu, h: &HalfTensor) -> Result<Tensor> {
    let plan: Vec<(usize, usize)> = h.chunks.iter().map(|&(s, l, _)| (s, l)).collect();
    let t = Tensor::empty_planned(gpu, &h.shape, h.split, &plan, "activations unpacked from 16 bits")?;
    for (c, (_, len, words)) in t.chunks().iter().zip(&h.chunks) {
        convert(gpu, "unpack", c.bind(), words.bind(), elems(&h.shape, h.split, *len), h.format)?;
    }
    Ok(t)
}
