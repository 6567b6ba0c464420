//! Optimizer-state offload (`--optimizer-offload host|disk`): the AdamW moments live in host
//! memory or in a memory-mapped file instead of GPU buffers, and the update runs on the CPU
//! threads (ZeRO-Offload's idea, with llm.c's flat layout: one buffer, each trained parameter's
//! `m` then its `v` at an offset, in the store's order). The GPU then holds no optimizer state:
//! for AdamW that is twice the trained weights (GPT-2 124M full fine-tuning: 995 MB).
//!
//! A step, per trained parameter: its value and its (already clipped) gradient are copied into
//! one mappable staging buffer, many tensors per submission and one wait per batch (not one
//! per tensor); the host updates value and moments with [`adamw_host`], the shader's formula in
//! f32; the value goes back with a queue write. Tensors are cut into pieces of at most
//! [`Offload::set_transfer_piece`] elements, so that no staging buffer passes a device limit
//! whatever the tensor's size. On both CPU paths the same storage serves the reference AdamW
//! (`kernels_ref::adamw_step`, f64) with no transfer, so there the losses with offload equal those without bit for bit.
//!
//! The file of `disk` mode is scratch, not a checkpoint: it is created empty when the mode is
//! set (so an unwritable place fails before training starts), filled with zeros once the
//! trained parameters are known (so a full disk fails then, not with SIGBUS in mid-step), and
//! removed when the store goes. Checkpoints hold the moments as without offload
//! (`optimizer.safetensors`, through [`crate::graph::ParamStore::moments_to_host`]).

use super::OptimizerOffload;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Split};
use crate::graph::{Device, Param, ParamId, Value};
use crate::kernels::optim::{adamw_host, AdamW};
use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Elements per transfer piece by default: 16 MiB of values and 16 MiB of gradients.
const PIECE: usize = 4 << 20;

enum Storage {
    Host(Vec<f32>),
    Disk { map: memmap2::MmapMut },
}

impl Storage {
    fn values(&self) -> &[f32] {
        match self {
            Storage::Host(v) => v,
            Storage::Disk { map } => bytemuck::cast_slice(&map[..]),
        }
    }
    fn values_mut(&mut self) -> &mut [f32] {
        match self {
            Storage::Host(v) => v,
            Storage::Disk { map } => bytemuck::cast_slice_mut(&mut map[..]),
        }
    }
}

/// Moments of every trained parameter off the GPU.
pub struct Offload {
    mode: OptimizerOffload,
    /// the file of `disk` mode
    path: Option<PathBuf>,
    file: Option<std::fs::File>,
    /// parameter index -> (offset of its `m` in the flat storage, its element count); its `v`
    /// follows its `m`
    slots: HashMap<usize, (usize, usize)>,
    /// made once the trained parameters are known (first step or first restored moment)
    storage: Option<Storage>,
    piece: usize,
    /// reused from step to step (value and gradient of two pieces)
    staging: Option<wgpu::Buffer>,
}

fn disk_error(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::InvalidArgument {
        name: "--optimizer-offload disk".into(),
        detail: format!(
            "cannot {what} the optimizer-state file {}: {e}. Point --out at a writable directory \
             with room for twice the trained weights, or use --optimizer-offload host",
            path.display()
        ),
    }
}

impl Offload {
    /// Moments kept as `mode` says (`None` for on the GPU); `path` is the file of `disk` mode,
    /// created (with its directory) now.
    pub fn new(mode: OptimizerOffload, path: &Path) -> Result<Option<Offload>> {
        let file = match mode {
            OptimizerOffload::None => return Ok(None),
            OptimizerOffload::Host => None,
            OptimizerOffload::Disk => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| disk_error(path, "create the directory of", e))?;
                }
                let f = std::fs::File::options()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(path)
                    .map_err(|e| disk_error(path, "create", e))?;
                Some(f)
            }
        };
        Ok(Some(Offload {
            mode,
            path: file.as_ref().map(|_| path.to_path_buf()),
            file,
            slots: HashMap::new(),
            storage: None,
            piece: PIECE,
            staging: None,
        }))
    }

    pub fn mode(&self) -> OptimizerOffload {
        self.mode
    }
    /// The memory-mapped file of `disk` mode.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
    /// Host (or file) bytes the moments take, once laid out.
    pub fn bytes(&self) -> u64 {
        self.storage.as_ref().map_or(0, |s| 4 * s.values().len() as u64)
    }
    /// Elements per transfer piece (tests make it small to cross piece and batch boundaries).
    pub fn set_transfer_piece(&mut self, elems: usize) {
        self.piece = elems.max(1);
        self.staging = None;
    }

    /// Lay the moments of every trainable parameter out (zeros), once.
    fn ensure_layout(&mut self, params: &[Param]) -> Result<()> {
        if self.storage.is_some() {
            return Ok(());
        }
        let mut total = 0;
        for (i, p) in params.iter().enumerate().filter(|(_, p)| p.trainable) {
            let n: usize = p.shape.iter().product();
            self.slots.insert(i, (total, n));
            total += 2 * n;
        }
        self.storage = Some(match (&mut self.file, &self.path) {
            (Some(f), Some(path)) if total > 0 => {
                // Zeros written, not a sparse `set_len`: a full disk is an error here rather than
                // a SIGBUS when a page of the map is first written.
                let zeros = vec![0u8; 8 << 20];
                let mut left = 4 * total;
                while left > 0 {
                    let n = left.min(zeros.len());
                    f.write_all(&zeros[..n]).map_err(|e| disk_error(path, "fill", e))?;
                    left -= n;
                }
                f.flush().map_err(|e| disk_error(path, "fill", e))?;
                // SAFETY: the file was created by us, truncated, and is not shared; nothing else
                // maps or resizes it while this map lives.
                let map =
                    unsafe { memmap2::MmapMut::map_mut(&*f) }.map_err(|e| disk_error(path, "map", e))?;
                Storage::Disk { map }
            }
            _ => Storage::Host(vec![0.0; total]),
        });
        Ok(())
    }

    /// The slices of `m` and `v` of parameter `i`, elements `start..start + len`.
    fn slices(&mut self, i: usize, name: &str, start: usize, len: usize) -> Result<(&mut [f32], &mut [f32])> {
        let &(offset, n) = self.slots.get(&i).ok_or_else(|| Error::InvalidArgument {
            name: name.into(),
            detail: "became trainable after the offloaded optimizer state was laid out; \
                     set --optimizer-offload after choosing what to train"
                .into(),
        })?;
        let all = self.storage.as_mut().expect("laid out before use").values_mut();
        let (m, v) = all[offset..offset + 2 * n].split_at_mut(n);
        Ok((&mut m[start..start + len], &mut v[start..start + len]))
    }

    /// Parameter `id`'s moments (m, v), once laid out and while it is trained.
    pub fn moments(&self, id: ParamId) -> Option<(&[f32], &[f32])> {
        let &(offset, n) = self.slots.get(&id.0)?;
        let all = self.storage.as_ref()?.values();
        Some(all[offset..offset + 2 * n].split_at(n))
    }

    /// Set parameter `id`'s moments (restoring a checkpoint).
    pub(crate) fn set_moments(&mut self, params: &[Param], id: ParamId, m: &[f32], v: &[f32]) -> Result<()> {
        self.ensure_layout(params)?;
        let p = &params[id.0];
        let n: usize = p.shape.iter().product();
        if m.len() != n || v.len() != n {
            return Err(Error::shape(
                "set_moments",
                format!("{} holds {n} values, got {} and {}", p.name, m.len(), v.len()),
            ));
        }
        let (dm, dv) = self.slices(id.0, &p.name, 0, n)?;
        dm.copy_from_slice(m);
        dv.copy_from_slice(v);
        Ok(())
    }

    /// One AdamW step on every parameter with a gradient.
    pub(crate) fn adamw_step(
        &mut self,
        dev: &Device,
        params: &mut [Param],
        opt: AdamW,
        step: u32,
    ) -> Result<()> {
        self.ensure_layout(params)?;
        match dev {
            Device::Gpu(gpu) => {
                self.step_gpu(gpu, params, opt, step)?;
                self.step_host(params, opt, step)
            }
            Device::Cpu(_) => {
                for (i, p) in params.iter_mut().enumerate() {
                    let Param { value, grad: Some(grad), name, shape, .. } = p else { continue };
                    let n = shape.iter().product();
                    let (m, v) = self.slices(i, name, 0, n)?;
                    kernels_ref::adamw_step(value.cpu_mut(), grad.cpu(), m, v, opt, step);
                }
                Ok(())
            }
        }
    }

    /// Parameters on the host (full fine-tuning under a budget): value, gradient and moments
    /// are all here, so the update is [`adamw_host`] in place.
    fn step_host(&mut self, params: &mut [Param], opt: AdamW, step: u32) -> Result<()> {
        for (i, p) in params.iter_mut().enumerate() {
            let on_host = p.on_host();
            let Param { value: Value::Cpu(w), grad: Some(Value::Cpu(g)), name, .. } = p else { continue };
            if !on_host {
                continue;
            }
            let (m, v) = self.slices(i, name, 0, w.len())?;
            adamw_host(w, g, m, v, opt, step);
        }
        Ok(())
    }

    fn step_gpu(&mut self, gpu: &Gpu, params: &[Param], opt: AdamW, step: u32) -> Result<()> {
        // (parameter, chunk, first element in the chunk, elements, first element in the parameter)
        let mut pieces = Vec::new();
        for (i, p) in params.iter().enumerate() {
            let Some(grad) = &p.grad else { continue };
            if p.on_host() {
                continue; // `step_host`
            }
            let (Value::Gpu(w), Value::Gpu(g)) = (&p.value, grad) else {
                return Err(Error::shape(
                    "adamw (offloaded)",
                    format!("{} is not an f32 GPU tensor", p.name),
                ));
            };
            if w.is_chunked() && w.split() != Split::Rows {
                // Column chunks are not in the parameter's element order, which checkpoints use.
                return Err(Error::shape("adamw (offloaded)", format!("{} is split by columns", p.name)));
            }
            let chunks = crate::kernels::elementwise::same_layout("adamw (offloaded)", &[w, g])?;
            let mut flat = 0;
            for (c, (_, n)) in chunks.iter().enumerate() {
                for s in (0..*n).step_by(self.piece) {
                    pieces.push((i, c, s, self.piece.min(n - s), flat + s));
                }
                flat += n;
            }
        }
        let batch_elems = 2 * self.piece;
        let largest = pieces.iter().map(|p| p.3).sum::<usize>().min(batch_elems);
        let need = (8 * largest.max(1)) as u64;
        let staging = match self.staging.take() {
            Some(b) if b.size() >= need => b,
            _ => gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("optimizer offload read-back"),
                size: 8 * batch_elems.min(largest.max(1)) as u64,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
        };
        let result = self.run_batches(gpu, &staging, params, &pieces, batch_elems, opt, step);
        self.staging = Some(staging);
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn run_batches(
        &mut self,
        gpu: &Gpu,
        staging: &wgpu::Buffer,
        params: &[Param],
        pieces: &[(usize, usize, usize, usize, usize)],
        batch_elems: usize,
        opt: AdamW,
        step: u32,
    ) -> Result<()> {
        let buffers = |&(i, c, ..): &(usize, usize, usize, usize, usize)| {
            let p = &params[i];
            let g = p.grad.as_ref().expect("pieces come from parameters with gradients");
            (p.value.gpu().chunks()[c].bind(), g.gpu().chunks()[c].bind())
        };
        let mut rest = pieces;
        while !rest.is_empty() {
            let mut take = 0;
            let mut elems = 0;
            while take < rest.len() && (take == 0 || elems + rest[take].3 <= batch_elems) {
                elems += rest[take].3;
                take += 1;
            }
            let (batch, tail) = rest.split_at(take);
            rest = tail;
            // Values then gradients of each piece, side by side: one submission, one wait.
            let mut off = 0u64;
            for piece in batch {
                let (w, g) = buffers(piece);
                let (start, len) = (4 * piece.2 as u64, 4 * piece.3 as u64);
                gpu.copy(w, start, staging, off, len);
                gpu.copy(g, start, staging, off + len, len);
                off += 2 * len;
            }
            let mapped = map_read(gpu, staging, off)?;
            let mut at = 0usize;
            for piece in batch {
                let &(i, _, start, len, flat) = piece;
                let bytes = &mapped[at..at + 8 * len];
                at += 8 * len;
                let mut w: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes[..4 * len]);
                let g: Cow<[f32]> = match bytemuck::try_cast_slice(&bytes[4 * len..]) {
                    Ok(s) => Cow::Borrowed(s),
                    Err(_) => Cow::Owned(bytemuck::pod_collect_to_vec(&bytes[4 * len..])),
                };
                let (m, v) = self.slices(i, &params[i].name, flat, len)?;
                adamw_host(&mut w, &g, m, v, opt, step);
                gpu.write(buffers(piece).0, 4 * start as u64, bytemuck::cast_slice(&w))?;
            }
            drop(mapped);
            staging.unmap();
        }
        Ok(())
    }
}

/// Submit what is recorded, wait, and map the first `bytes` bytes of `staging` for reading.
fn map_read(gpu: &Gpu, staging: &wgpu::Buffer, bytes: u64) -> Result<wgpu::BufferView> {
    let internal =
        |message: String| Error::Internal { context: "optimizer offload read-back".into(), message };
    gpu.flush()?;
    let (tx, rx) = std::sync::mpsc::channel();
    staging.map_async(wgpu::MapMode::Read, 0..bytes, move |r| {
        let _ = tx.send(r);
    });
    gpu.wait_for(None, "optimizer offload read-back")?;
    gpu.check("optimizer offload read-back")?;
    match rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(internal(e.to_string())),
        Err(_) => return Err(internal("map callback dropped".into())),
    }
    staging.get_mapped_range(0..bytes).map_err(|e| internal(e.to_string()))
}

impl Drop for Offload {
    fn drop(&mut self) {
        // The file is scratch (checkpoints hold the moments): it goes with the store.
        self.storage = None;
        self.file = None;
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}
