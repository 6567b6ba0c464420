//! Device tensors (f32, row-major). A tensor is seen as a matrix of `rows` = product of all
//! dimensions but the last, by `cols` = the last dimension. When it is larger than one storage
//! binding may be (128 MiB under the mobile profile; GPT-2's 50257 x 768 embedding is 147 MiB)
//! it is stored as several chunks, each its own buffer, split by rows or by columns. Kernels that
//! accept chunked tensors walk the chunks; the rest ask for [`Tensor::single`] and get a clear
//! error otherwise.

use super::{Gpu, GpuBuffer};
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Each chunk holds whole rows `start..start + len`.
    Rows,
    /// Each chunk holds columns `start..start + len` of every row, stored (rows, len).
    Cols,
}

#[derive(Debug)]
pub struct Chunk {
    pub start: usize,
    pub len: usize,
    pub buf: GpuBuffer,
}

#[derive(Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    split: Split,
    chunks: Vec<Chunk>,
}

/// Chunk boundaries for `extent` rows (or columns) of `stride` elements each, at most
/// `max_per_chunk` rows (or columns) per chunk.
fn plan(extent: usize, max_per_chunk: usize) -> Vec<(usize, usize)> {
    let step = max_per_chunk.max(1);
    (0..extent.max(1)).step_by(step).map(|s| (s, step.min(extent.max(1) - s))).collect()
}

impl Tensor {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn cols(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }
    pub fn rows(&self) -> usize {
        self.numel() / self.cols().max(1)
    }
    pub fn split(&self) -> Split {
        self.split
    }
    pub fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }
    pub fn is_chunked(&self) -> bool {
        self.chunks.len() > 1
    }

    /// The one buffer of an unchunked tensor.
    pub fn single(&self, op: &str) -> Result<&wgpu::Buffer> {
        match self.chunks.as_slice() {
            [c] => Ok(c.buf.raw()),
            _ => Err(Error::shape(
                op,
                format!(
                    "tensor {:?} is stored in {} chunks and {op} takes only unchunked tensors",
                    self.shape,
                    self.chunks.len()
                ),
            )),
        }
    }

    /// Uninitialised tensor, split by rows where one binding cannot hold it.
    pub fn empty(gpu: &Gpu, shape: &[usize], what: &str) -> Result<Tensor> {
        let cols = shape.last().copied().unwrap_or(1).max(1);
        let max_rows = (gpu.max_binding() / 4) as usize / cols;
        Self::empty_split(gpu, shape, Split::Rows, max_rows, what)
    }

    /// Uninitialised tensor split by `split` with at most `max_per_chunk` rows or columns a chunk.
    pub fn empty_split(
        gpu: &Gpu,
        shape: &[usize],
        split: Split,
        max_per_chunk: usize,
        what: &str,
    ) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        let cols = shape.last().copied().unwrap_or(1);
        let rows = numel.checked_div(cols).unwrap_or(0);
        let (extent, stride) = match split {
            Split::Rows => (rows, cols),
            Split::Cols => (cols, rows),
        };
        let mut chunks = Vec::new();
        for (start, len) in plan(extent, max_per_chunk) {
            let bytes = (len * stride * 4) as u64;
            let buf = gpu.alloc(bytes, what)?;
            chunks.push(Chunk { start, len, buf });
        }
        Ok(Tensor { shape: shape.to_vec(), split, chunks })
    }

    /// Upload host data (split by rows only where needed).
    pub fn from_host(gpu: &Gpu, data: &[f32], shape: &[usize], what: &str) -> Result<Tensor> {
        let t = Self::empty(gpu, shape, what)?;
        t.write(gpu, data)?;
        Ok(t)
    }

    /// Upload host data with an explicit chunking (tests use it to exercise chunked paths on
    /// small tensors).
    pub fn from_host_split(
        gpu: &Gpu,
        data: &[f32],
        shape: &[usize],
        split: Split,
        max_per_chunk: usize,
        what: &str,
    ) -> Result<Tensor> {
        let t = Self::empty_split(gpu, shape, split, max_per_chunk, what)?;
        t.write(gpu, data)?;
        Ok(t)
    }

    /// Overwrite the whole tensor with host data.
    pub fn write(&self, gpu: &Gpu, data: &[f32]) -> Result<()> {
        if data.len() != self.numel() {
            return Err(Error::shape(
                "upload",
                format!("tensor {:?} holds {} values, got {}", self.shape, self.numel(), data.len()),
            ));
        }
        let (rows, cols) = (self.rows(), self.cols());
        for c in &self.chunks {
            match self.split {
                Split::Rows => {
                    let part = &data[c.start * cols..(c.start + c.len) * cols];
                    gpu.write(c.buf.raw(), 0, bytemuck::cast_slice(part))?;
                }
                Split::Cols => {
                    let mut part = Vec::with_capacity(rows * c.len);
                    for r in 0..rows {
                        part.extend_from_slice(&data[r * cols + c.start..r * cols + c.start + c.len]);
                    }
                    gpu.write(c.buf.raw(), 0, bytemuck::cast_slice(&part))?;
                }
            }
        }
        Ok(())
    }

    /// Fill every element with `value` (used to poison outputs with NaN in tests).
    pub fn fill(&self, gpu: &Gpu, value: f32) -> Result<()> {
        self.write(gpu, &vec![value; self.numel()])
    }

    /// Read the whole tensor back (waits for the GPU).
    pub fn to_host(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        let (rows, cols) = (self.rows(), self.cols());
        let mut out = vec![0f32; self.numel()];
        for c in &self.chunks {
            let stride = match self.split {
                Split::Rows => cols,
                Split::Cols => rows,
            };
            let bytes = gpu.read_bytes(c.buf.raw(), 0, (c.len * stride * 4) as u64)?;
            let part: &[f32] = bytemuck::cast_slice(&bytes);
            match self.split {
                Split::Rows => out[c.start * cols..(c.start + c.len) * cols].copy_from_slice(part),
                Split::Cols => {
                    for r in 0..rows {
                        out[r * cols + c.start..r * cols + c.start + c.len]
                            .copy_from_slice(&part[r * c.len..(r + 1) * c.len]);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Give the tensor a new shape with the same number of elements (unchunked tensors, or a
    /// row split whose row length stays the same).
    pub fn reshape(mut self, shape: &[usize]) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        let same_cols = shape.last() == self.shape.last();
        if numel != self.numel() || (self.is_chunked() && !(same_cols && self.split == Split::Rows)) {
            return Err(Error::shape("reshape", format!("{:?} -> {:?}", self.shape, shape)));
        }
        self.shape = shape.to_vec();
        if !self.is_chunked() {
            self.split = Split::Rows;
            self.chunks[0].len = self.rows();
        }
        Ok(self)
    }
}
