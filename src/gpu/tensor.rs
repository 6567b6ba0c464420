//! Device tensors (f32, row-major). A tensor is seen as a matrix of `rows` = product of all
//! dimensions but the last, by `cols` = the last dimension. When it is larger than one storage
//! binding may be (128 MiB under the mobile profile; GPT-2's 50257 x 768 embedding is 147 MiB)
//! it is stored as several chunks, each its own buffer, split by rows or by columns. Kernels that
//! accept chunked tensors walk the chunks; the rest ask for [`Tensor::single`] and get a clear
//! error otherwise.
//!
//! A chunk is a range of a buffer: all of a buffer of its own, or its place in a buffer shared
//! with other tensors ([`Tensor::view`]: the flat parameter, gradient and moment layout of
//! `graph::params`, where one dispatch updates every parameter). Kernels bind the range
//! ([`Chunk::bind`]) and see it from index 0.

use super::{Bind, Gpu, GpuBuffer};
use crate::error::{Error, Result};
use std::sync::Arc;

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
    /// the buffer holding the chunk (shared by the tensors of a flat layout)
    store: Arc<GpuBuffer>,
    /// where the chunk starts in `store`, bytes
    offset: u64,
    /// the chunk's bytes
    bytes: u64,
    /// `store` holds other tensors' chunks too
    shared: bool,
}

impl Chunk {
    /// A chunk that is all of `buf`.
    pub fn whole(start: usize, len: usize, buf: GpuBuffer) -> Chunk {
        let bytes = buf.bytes();
        Chunk { start, len, store: Arc::new(buf), offset: 0, bytes, shared: false }
    }
    /// A chunk that is `bytes` bytes of `store` from `offset`.
    pub fn part(start: usize, len: usize, store: Arc<GpuBuffer>, offset: u64, bytes: u64) -> Chunk {
        debug_assert!(offset + bytes <= store.bytes());
        Chunk { start, len, store, offset, bytes, shared: true }
    }
    /// The chunk's range, to bind or copy (a chunk with a buffer of its own binds all of it,
    /// which may be a little more than `bytes`: the pool rounds sizes up).
    pub fn bind(&self) -> Bind<'_> {
        if !self.shared {
            return self.store.raw().into();
        }
        Bind { buffer: self.store.raw(), offset: self.offset, size: self.bytes }
    }
    /// The chunk's bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
    /// The buffer the chunk lies in, and where.
    pub fn store(&self) -> (&Arc<GpuBuffer>, u64) {
        (&self.store, self.offset)
    }
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

    /// The one range of an unchunked tensor.
    pub fn single(&self, op: &str) -> Result<Bind<'_>> {
        match self.chunks.as_slice() {
            [c] => Ok(c.bind()),
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
        let extent = match split {
            Split::Rows => numel.checked_div(cols).unwrap_or(0),
            Split::Cols => cols,
        };
        Self::empty_planned(gpu, shape, split, &plan(extent, max_per_chunk), what)
    }

    /// Uninitialised tensor split by `split` into the given chunks: (first row or column,
    /// rows or columns), in order, covering the tensor (as another tensor's chunks are).
    pub fn empty_planned(
        gpu: &Gpu,
        shape: &[usize],
        split: Split,
        plan: &[(usize, usize)],
        what: &str,
    ) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        let cols = shape.last().copied().unwrap_or(1);
        let rows = numel.checked_div(cols).unwrap_or(0);
        let stride = match split {
            Split::Rows => cols,
            Split::Cols => rows,
        };
        let mut chunks = Vec::new();
        for &(start, len) in plan {
            let bytes = (len * stride * 4) as u64;
            chunks.push(Chunk::whole(start, len, gpu.alloc(bytes, what)?));
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
                    gpu.write(c.bind(), 0, bytemuck::cast_slice(part))?;
                }
                Split::Cols => {
                    let mut part = Vec::with_capacity(rows * c.len);
                    for r in 0..rows {
                        part.extend_from_slice(&data[r * cols + c.start..r * cols + c.start + c.len]);
                    }
                    gpu.write(c.bind(), 0, bytemuck::cast_slice(&part))?;
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
            let bytes = gpu.read_bytes(c.bind(), 0, (c.len * stride * 4) as u64)?;
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

    /// Give the tensor's own buffers back to the driver rather than to the pool (see
    /// [`GpuBuffer::discard`]); a chunk in a shared buffer only lets go of it.
    pub fn discard(self) {
        for c in self.chunks {
            if let Ok(buf) = Arc::try_unwrap(c.store) {
                buf.discard();
            }
        }
    }

    /// A tensor of `shape` made of the given chunks (views into shared buffers), split by rows.
    pub fn from_chunks(shape: &[usize], chunks: Vec<Chunk>) -> Tensor {
        Tensor { shape: shape.to_vec(), split: Split::Rows, chunks }
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
