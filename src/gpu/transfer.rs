//! Moving bytes between the host and the GPU: staged writes, blocking reads and reads that
//! complete later (a step's outcome, read one step behind).

use super::{Bind, Gpu};
use crate::error::{Error, Result};

/// Staged host writes above this many bytes are submitted and waited for, so loading a model
/// holds at most this much staging memory instead of a second copy of the weights.
pub(super) const STAGING_LIMIT: u64 = 64 << 20;

type MapReceiver = std::sync::mpsc::Receiver<std::result::Result<(), wgpu::BufferAsyncError>>;

impl Gpu {
    /// Copy host data into `dst` at byte offset `offset`. Recorded work is submitted first so
    /// that it reads the old contents, as program order says it should.
    /// Staging memory is bounded: past [`STAGING_LIMIT`] bytes the writes are submitted and
    /// waited for (wgpu keeps each write's staging copy until a submission completes).
    pub fn write<'a>(&self, dst: impl Into<Bind<'a>>, offset: u64, data: &[u8]) -> Result<()> {
        if self.pool.planning() {
            return Ok(());
        }
        let dst = dst.into();
        let (dst, offset) = (dst.buffer, dst.offset + offset);
        let mut pending = self.pending.lock();
        self.submit_locked(&mut pending);
        self.queue.write_buffer(dst, offset, data);
        pending.staged += data.len() as u64;
        // A ring of two halves: a full half is submitted; past the limit, wait for the oldest
        // half only, never for the GPU to go idle, so the next layer's upload overlaps this
        // layer's work (streamed weights, `graph::stream`).
        let limit = self.staging_limit();
        if pending.staged >= limit / 2 {
            self.pool.sample_driver(); // the staging copies are at their most now
            let index = self.queue.submit([]);
            self.stats.submission();
            let staged = std::mem::take(&mut pending.staged);
            pending.ring.push_back((index, staged));
        }
        while pending.ring.iter().map(|r| r.1).sum::<u64>() > limit {
            let (oldest, _) = pending.ring.pop_front().expect("a non-empty ring");
            self.wait_for(Some(oldest), "poll")?;
        }
        drop(pending);
        self.check("upload")
    }

    /// Read `bytes` bytes of `src` from `offset` back to the host (waits for the GPU).
    pub fn read_bytes<'a>(&self, src: impl Into<Bind<'a>>, offset: u64, bytes: u64) -> Result<Vec<u8>> {
        if bytes == 0 || self.pool.planning() {
            return Ok(vec![0; bytes as usize]);
        }
        let staging = self.copy_out(src, offset, bytes);
        self.flush()?;
        let rx = Self::map(&staging);
        self.wait_for(None, "read-back")?;
        self.check("read-back")?;
        Self::mapped(&staging, &rx)
    }

    /// Start reading `bytes` bytes of `src` from `offset` back, without waiting: the copy is
    /// submitted now, and [`Readback::wait`] waits for that submission only, not for work
    /// recorded after it. A training step's status is read so, one step behind
    /// (`graph::params::ParamStore::outcome`).
    pub fn read_later<'a>(&self, src: impl Into<Bind<'a>>, offset: u64, bytes: u64) -> Result<Readback> {
        if bytes == 0 || self.pool.planning() {
            return Ok(Readback { bytes, map: None });
        }
        let staging = self.copy_out(src, offset, bytes);
        let mut pending = self.pending.lock();
        let index = self.submit_locked(&mut pending).expect("the copy was recorded");
        drop(pending);
        self.check("submit")?;
        let rx = Self::map(&staging);
        Ok(Readback { bytes, map: Some((staging, rx, index)) })
    }

    /// Record a copy into a new MAP_READ buffer (storage buffers cannot be mapped on most GPUs).
    fn copy_out<'a>(&self, src: impl Into<Bind<'a>>, offset: u64, bytes: u64) -> wgpu::Buffer {
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("read-back"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.copy(src, offset, &staging, 0, bytes);
        staging
    }

    /// Ask for `staging` to be mapped once the GPU is done with it (after the submission that
    /// copies into it: a buffer with a map pending cannot be submitted).
    fn map(staging: &wgpu::Buffer) -> MapReceiver {
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        rx
    }

    /// The bytes of a mapped read-back buffer (its map callback has run).
    fn mapped(staging: &wgpu::Buffer, rx: &MapReceiver) -> Result<Vec<u8>> {
        match rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(Error::Internal { context: "read-back".into(), message: e.to_string() })
            }
            Err(_) => {
                return Err(Error::Internal {
                    context: "read-back".into(),
                    message: "map callback dropped".into(),
                })
            }
        }
        let data = staging
            .get_mapped_range(..)
            .map_err(|e| Error::Internal { context: "read-back".into(), message: e.to_string() })?;
        Ok(data.to_vec())
    }
}

/// A read-back in flight ([`Gpu::read_later`]).
pub struct Readback {
    bytes: u64,
    /// the mapped buffer, its callback's answer, the submission that copies into it; `None`
    /// for nothing to read or a planning step (zeros)
    map: Option<(wgpu::Buffer, MapReceiver, wgpu::SubmissionIndex)>,
}

impl Readback {
    /// Wait for the submission that made the copy (not for anything recorded since), and
    /// return the bytes.
    pub fn wait(self, gpu: &Gpu) -> Result<Vec<u8>> {
        let Some((staging, rx, index)) = self.map else {
            return Ok(vec![0; self.bytes as usize]);
        };
        gpu.wait_for(Some(index), "read-back")?;
        gpu.check("read-back")?;
        Gpu::mapped(&staging, &rx)
    }
    /// [`Self::wait`] as f32 values.
    pub fn wait_f32(self, gpu: &Gpu) -> Result<Vec<f32>> {
        Ok(bytemuck::pod_collect_to_vec(&self.wait(gpu)?))
    }
}
