//! Embedding gather and its deterministic scatter-add backward (`shaders/embedding.wgsl`).
//! Reference: `kernels_ref::embedding_forward`/`_backward`. The table may be chunked by rows
//! (GPT-2's 50257 x 768 f32 table is 147 MiB, above a phone's 128 MiB binding).

use super::u32_of;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, GpuBuffer, KernelKey, Split, Tensor};

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    dim: u32,
    start: u32,
    len: u32,
    u0: u32,
    n_unique: u32,
    k0: u32,
    k1: u32,
}

const WG: usize = 256;

/// Token ids of one batch, on the GPU, with the per-id position lists the backward needs
/// (built on the host, where the ids come from, so nothing is read back).
pub struct Ids {
    host: Vec<u32>,
    ids: GpuBuffer,
    /// offsets (n_unique + 1), unique ids (sorted), positions grouped by id in position order
    csr: GpuBuffer,
    unique: Vec<u32>,
    /// positions of the most frequent id (the scatter's loop length)
    max_count: usize,
}

impl Ids {
    pub fn new(gpu: &Gpu, ids: &[u32], vocab: usize) -> Result<Ids> {
        if let Some((pos, &bad)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
            return Err(Error::InvalidArgument {
                name: "token ids".into(),
                detail: format!("id {bad} at position {pos} is outside the vocabulary of {vocab}"),
            });
        }
        let mut order: Vec<u32> = (0..ids.len() as u32).collect();
        order.sort_by_key(|&i| (ids[i as usize], i));
        let mut unique = Vec::new();
        let mut offsets = Vec::new();
        for (k, &pos) in order.iter().enumerate() {
            let id = ids[pos as usize];
            if unique.last() != Some(&id) {
                unique.push(id);
                offsets.push(k as u32);
            }
        }
        offsets.push(order.len() as u32);
        let max_count = offsets.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0);
        let csr: Vec<u32> = offsets.iter().chain(&unique).chain(&order).copied().collect();
        let upload = |data: &[u32], what: &str| -> Result<GpuBuffer> {
            let buf = gpu.alloc((data.len().max(1) * 4) as u64, what)?;
            if !data.is_empty() {
                gpu.write(buf.raw(), 0, bytemuck::cast_slice(data))?;
            }
            Ok(buf)
        };
        Ok(Ids {
            ids: upload(ids, "token ids")?,
            csr: upload(&csr, "token id lists")?,
            host: ids.to_vec(),
            unique,
            max_count,
        })
    }

    pub fn len(&self) -> usize {
        self.host.len()
    }
    pub fn is_empty(&self) -> bool {
        self.host.is_empty()
    }
    pub fn host(&self) -> &[u32] {
        &self.host
    }
}

fn table_chunks<'t>(table: &'t Tensor, op: &str) -> Result<&'t [crate::gpu::Chunk]> {
    if table.is_chunked() && table.split() != Split::Rows {
        return Err(Error::shape(op, "an embedding table must be chunked by rows"));
    }
    Ok(table.chunks())
}

/// `out (N, C) = table[ids]`
pub fn embedding_forward(gpu: &Gpu, out: &Tensor, ids: &Ids, table: &Tensor) -> Result<()> {
    let dim = table.cols();
    super::check_len("embedding_forward", "out", out.numel(), ids.len() * dim)?;
    let ob = out.single("embedding")?;
    for ch in table_chunks(table, "embedding_forward")? {
        let p = Params {
            n: u32_of(ids.len() * dim, "embedding")?,
            dim: u32_of(dim, "embedding")?,
            start: u32_of(ch.start, "embedding")?,
            len: u32_of(ch.len, "embedding")?,
            ..Default::default()
        };
        let bufs = [Some(ids.ids.bind()), Some(ch.bind()), Some(ob)];
        gpu.dispatch(
            &KernelKey::new("embedding", "gather"),
            &bufs,
            bytemuck::bytes_of(&p),
            gpu.grid(ids.len() * dim, WG),
        )?;
    }
    Ok(())
}

/// `dtable[id] += sum of dout rows at the positions of id`. Rows of ids absent from the batch
/// are untouched, so zero `dtable` first unless accumulating.
pub fn embedding_backward(gpu: &Gpu, dtable: &Tensor, dout: &Tensor, ids: &Ids) -> Result<()> {
    let dim = dtable.cols();
    super::check_len("embedding_backward", "dout", dout.numel(), ids.len() * dim)?;
    let db = dout.single("embedding")?;
    let n_unique = ids.unique.len();
    for ch in table_chunks(dtable, "embedding_backward")? {
        let u0 = ids.unique.partition_point(|&id| (id as usize) < ch.start);
        let u1 = ids.unique.partition_point(|&id| (id as usize) < ch.start + ch.len);
        let n = (u1 - u0) * dim;
        let bufs = [Some(ids.csr.bind()), Some(db), Some(ch.bind())];
        // An id repeated more than LOOP_SPAN times (padding in a long batch) is summed over
        // several dispatches, each adding its span of positions.
        let p = Params {
            n: u32_of(n, "embedding")?,
            dim: u32_of(dim, "embedding")?,
            start: u32_of(ch.start, "embedding")?,
            len: u32_of(ch.len, "embedding")?,
            u0: u32_of(u0, "embedding")?,
            n_unique: u32_of(n_unique, "embedding")?,
            ..Default::default()
        };
        for (k0, kl) in super::loop_spans(ids.max_count) {
            let p = Params { k0: u32_of(k0, "embedding")?, k1: u32_of(k0 + kl, "embedding")?, ..p };
            gpu.dispatch(
                &KernelKey::new("embedding", "scatter_add"),
                &bufs,
                bytemuck::bytes_of(&p),
                gpu.grid(n, WG),
            )?;
        }
    }
    Ok(())
}
