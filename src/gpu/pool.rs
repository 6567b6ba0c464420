//! Storage buffers, pooled by size. Training allocates the same shapes every step, so a freed
//! buffer is kept and handed out again for the next request of the same (256-byte rounded)
//! size instead of going back to the driver. Bytes held (live and pooled) and bytes live (in
//! use by a tensor) are counted for the metrics: the first is what the driver gave out, the
//! second what the computation needed.

use crate::error::{Error, Result};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

pub(crate) struct Pool {
    device: wgpu::Device,
    free: Mutex<HashMap<u64, Vec<wgpu::Buffer>>>,
    /// (bytes held now, peak bytes held)
    held: Mutex<(u64, u64)>,
    /// (bytes live now, peak bytes live)
    live: Mutex<(u64, u64)>,
}

impl Pool {
    pub fn new(device: wgpu::Device) -> Self {
        Pool { device, free: Mutex::default(), held: Mutex::new((0, 0)), live: Mutex::new((0, 0)) }
    }

    /// (bytes held now, peak bytes held)
    pub fn bytes(&self) -> (u64, u64) {
        *self.held.lock()
    }

    /// (bytes live now, peak bytes live)
    pub fn live_bytes(&self) -> (u64, u64) {
        *self.live.lock()
    }

    /// Start the peak of live bytes again from the bytes live now.
    pub fn reset_live_peak(&self) {
        let mut live = self.live.lock();
        live.1 = live.0;
    }

    pub fn get(self: &Arc<Self>, bytes: u64, what: &str) -> Result<GpuBuffer> {
        let size = bytes.max(4).next_multiple_of(256);
        let reused = self.free.lock().get_mut(&size).and_then(Vec::pop);
        let buffer = match reused {
            Some(b) => b,
            None => {
                let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
                let b = self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(what),
                    size,
                    usage: wgpu::BufferUsages::STORAGE
                        | wgpu::BufferUsages::COPY_SRC
                        | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                if pollster::block_on(scope.pop()).is_some() {
                    return Err(Error::OutOfMemory {
                        context: format!("allocating {size} bytes for {what}"),
                    });
                }
                let mut held = self.held.lock();
                held.0 += size;
                held.1 = held.1.max(held.0);
                b
            }
        };
        let mut live = self.live.lock();
        live.0 += buffer.size();
        live.1 = live.1.max(live.0);
        drop(live);
        Ok(GpuBuffer { buffer: Some(buffer), bytes, pool: self.clone() })
    }

    /// Give every pooled (unused) buffer back to the driver.
    pub fn trim(&self) {
        let mut free = self.free.lock();
        let released: u64 = free.iter().map(|(size, v)| size * v.len() as u64).sum();
        free.clear();
        self.held.lock().0 -= released;
    }
}

/// A storage buffer that returns to its pool when dropped.
pub struct GpuBuffer {
    buffer: Option<wgpu::Buffer>,
    bytes: u64,
    pool: Arc<Pool>,
}

impl GpuBuffer {
    pub fn raw(&self) -> &wgpu::Buffer {
        self.buffer.as_ref().expect("buffer present until drop")
    }
    /// Bytes requested (the buffer itself may be a little larger).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for GpuBuffer {
    fn drop(&mut self) {
        if let Some(b) = self.buffer.take() {
            self.pool.live.lock().0 -= b.size();
            self.pool.free.lock().entry(b.size()).or_default().push(b);
        }
    }
}

impl std::fmt::Debug for GpuBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuBuffer({} bytes)", self.bytes)
    }
}
