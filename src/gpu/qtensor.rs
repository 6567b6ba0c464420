//! A frozen weight kept on the GPU in its stored format: F16, BF16 or one of ggml's block types,
//! the bytes of the GGUF file unchanged. Kernels that read it (`kernels::quant`) dequantize as
//! they read, so a Q4_K base costs 4.5 bits a weight in GPU memory instead of 32.
//!
//! Layout: a 2-D weight (rows, cols) — a GGUF tensor with `ne = [cols, rows]` — is `rows`
//! consecutive rows of `cols / block_elems` blocks each (ggml-common.h's `block_*` structs; the
//! reference decoder is `kernels_ref::quant`). Like [`Tensor`](super::Tensor) it is split by
//! whole rows into chunks, each its own buffer, so that no chunk passes the device's
//! storage-binding limit (Gemma 3's 262,144 x 640 embedding is 170 MiB in Q8_0 and 320 MiB in
//! F16). A row need not be a multiple of 4 bytes (Q4_0 blocks are 18 bytes); each chunk's buffer
//! is padded to 4 bytes and the kernels read bytes at any offset.

use super::{Chunk, Gpu};
use crate::error::{Error, Result};
use kernels_ref::quant::{dequantize, GgmlType};

#[derive(Debug)]
pub struct QTensor {
    ty: GgmlType,
    shape: Vec<usize>,
    row_bytes: usize,
    chunks: Vec<Chunk>,
}

impl QTensor {
    /// Upload `bytes`, the storage of a weight of `shape` in type `ty`, chunked as the binding
    /// limit requires. `what` names the tensor in errors.
    pub fn from_bytes(gpu: &Gpu, ty: GgmlType, bytes: &[u8], shape: &[usize], what: &str) -> Result<QTensor> {
        Self::from_bytes_split(gpu, ty, bytes, shape, usize::MAX, what)
    }

    /// [`Self::from_bytes`] with at most `max_rows` rows a chunk (tests use it to exercise the
    /// chunk walk on small weights).
    pub fn from_bytes_split(
        gpu: &Gpu,
        ty: GgmlType,
        bytes: &[u8],
        shape: &[usize],
        max_rows: usize,
        what: &str,
    ) -> Result<QTensor> {
        let bad = |detail: String| Error::shape(&format!("weight {what}"), detail);
        if ty == GgmlType::F32 {
            return Err(bad("F32 weights are Tensors; a QTensor holds F16, BF16 or a block type".into()));
        }
        let (rows, cols) = match shape {
            [] => return Err(bad("a weight needs at least one dimension".into())),
            [.., cols] => (shape[..shape.len() - 1].iter().product::<usize>(), *cols),
        };
        if rows == 0 || cols == 0 {
            return Err(bad(format!("shape {shape:?} is empty")));
        }
        let row_bytes = ty.bytes_for(cols).ok_or_else(|| {
            bad(format!(
                "rows of {cols} values are not a whole number of {ty} blocks of {} values; \
                 ggml stores {ty} only for rows that are",
                ty.block_elems()
            ))
        })?;
        let want = rows.checked_mul(row_bytes).ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
        if bytes.len() != want {
            return Err(bad(format!(
                "{rows} x {cols} values in {ty} take {want} bytes, got {}: the file's tensor data \
                 is truncated or its shape or type is wrong",
                bytes.len()
            )));
        }
        // Byte offsets inside a chunk are u32 in the shaders.
        let max_chunk = gpu.max_binding().min(u32::MAX as u64 - 3) as usize;
        let per_chunk = (max_chunk / row_bytes).min(max_rows.max(1));
        if per_chunk == 0 {
            return Err(Error::TooLarge {
                what: what.to_string(),
                bytes: row_bytes as u64,
                limit: max_chunk as u64,
            });
        }
        let mut chunks = Vec::new();
        for start in (0..rows).step_by(per_chunk) {
            let len = per_chunk.min(rows - start);
            let data = &bytes[start * row_bytes..(start + len) * row_bytes];
            let buf = gpu.alloc(data.len().next_multiple_of(4) as u64, what)?;
            // wgpu writes whole words: the last partial word goes separately, padded.
            let whole = data.len() / 4 * 4;
            if whole > 0 {
                gpu.write(buf.raw(), 0, &data[..whole])?;
            }
            if whole < data.len() {
                let mut tail = [0u8; 4];
                tail[..data.len() - whole].copy_from_slice(&data[whole..]);
                gpu.write(buf.raw(), whole as u64, &tail)?;
            }
            chunks.push(Chunk::whole(start, len, buf));
        }
        Ok(QTensor { ty, shape: shape.to_vec(), row_bytes, chunks })
    }

    /// Round f32 values to `ty` (F16 or BF16, nearest even) and upload them: a safetensors base
    /// held in half precision (`--base-dtype f16`).
    pub fn from_f32(gpu: &Gpu, ty: GgmlType, data: &[f32], shape: &[usize], what: &str) -> Result<QTensor> {
        let bytes: Vec<u8> = match ty {
            GgmlType::F16 => data.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
            GgmlType::BF16 => data.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
            _ => {
                return Err(Error::InvalidArgument {
                    name: format!("storage type of {what}"),
                    detail: format!("f32 values convert to F16 or BF16 only, not {ty}"),
                })
            }
        };
        let numel: usize = shape.iter().product();
        if data.len() != numel {
            return Err(Error::shape(
                &format!("weight {what}"),
                format!("shape {shape:?} holds {numel} values, got {}", data.len()),
            ));
        }
        Self::from_bytes(gpu, ty, &bytes, shape, what)
    }

    pub fn ty(&self) -> GgmlType {
        self.ty
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn cols(&self) -> usize {
        self.shape[self.shape.len() - 1]
    }
    pub fn rows(&self) -> usize {
        self.shape[..self.shape.len() - 1].iter().product()
    }
    /// Bytes of one stored row.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }
    /// The chunks, each holding rows `start..start + len`.
    pub fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }
    /// Bytes of GPU memory the weight asked for (its stored bytes, each chunk padded to 4).
    pub fn gpu_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| (c.len * self.row_bytes).next_multiple_of(4) as u64).sum()
    }

    /// The stored bytes, read back from the GPU (waits for it).
    pub fn bytes_to_host(&self, gpu: &Gpu) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.rows() * self.row_bytes);
        for c in &self.chunks {
            let len = c.len * self.row_bytes;
            let bytes = gpu.read_bytes(c.bind(), 0, len.next_multiple_of(4) as u64)?;
            out.extend_from_slice(&bytes[..len]);
        }
        Ok(out)
    }

    /// The weight dequantized to f32 on the host (merging an adapter, exporting, tests).
    pub fn to_host(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        let bytes = self.bytes_to_host(gpu)?;
        let mut out = vec![0f32; self.rows() * self.cols()];
        dequantize(self.ty, &bytes, &mut out);
        Ok(out)
    }
}
