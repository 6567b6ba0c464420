//! What a dispatch binds, made once and reused: the uniform ring and the bind-group cache.
//!
//! A training step records the same dispatches on the same buffers every step (the pool hands
//! the same buffers out in the same order), only some uniform values change (AdamW's step,
//! the learning rate). Creating a bind group and writing a uniform buffer for each of a
//! step's hundreds of dispatches was most of the host's recording time (docs/perf.md), so:
//! - **Uniform ring.** The n-th dispatch of a submission reads its parameters from slot n of
//!   a fixed set of uniform buffers (segments of [`SLOTS`] slots of [`SLOT`] bytes). The
//!   parameters are gathered on the host and written with one queue write per segment just
//!   before the submission: queue writes run after earlier submissions, so a segment can be
//!   rewritten for the next submission without waiting for the last.
//! - **Bind-group cache.** A bind group depends only on the pipeline, the slot and the storage
//!   buffers, so it is kept under that key and found again the next step. A cached bind group
//!   holds its buffers alive, so only buffers the pool owns are cached (the pool keeps them
//!   anyway, in use or free), and the cache is emptied whenever the pool gives buffers back to
//!   the driver ([`super::pool`]'s trim), so it never holds memory the pool no longer counts.
//!   It is also emptied past [`CAPACITY`] entries: a bound on its own size.

use parking_lot::Mutex;
use std::collections::HashMap;

/// Bytes of one uniform slot: the largest uniform struct a kernel may pass, and a multiple of
/// every adapter's uniform offset alignment (at most 256 by the WebGPU limits).
pub(crate) const SLOT: u64 = 256;
/// Slots in one uniform buffer of the ring.
pub(crate) const SLOTS: u64 = 256;
/// Most bind groups kept; past it the cache starts again empty.
pub(crate) const CAPACITY: usize = 8192;

/// Uniform buffers of [`SLOTS`] slots each; a submission's n-th dispatch uses slot n.
#[derive(Default)]
pub(crate) struct UniformRing {
    segments: Vec<wgpu::Buffer>,
    /// This submission's parameters, slot after slot.
    params: Vec<u8>,
}

impl UniformRing {
    /// Put `params` in slot `slot` (the submission's next) and return where it will be bound.
    pub fn push(&mut self, device: &wgpu::Device, slot: u64, params: &[u8]) -> (wgpu::Buffer, u64) {
        assert!(params.len() as u64 <= SLOT, "uniform struct larger than {SLOT} bytes");
        let start = (slot * SLOT) as usize;
        self.params.resize(start, 0);
        self.params.extend_from_slice(params);
        self.params.resize(start + SLOT as usize, 0);
        let segment = (slot / SLOTS) as usize;
        while self.segments.len() <= segment {
            self.segments.push(device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("params"),
                size: SLOT * SLOTS,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }));
        }
        (self.segments[segment].clone(), (slot % SLOTS) * SLOT)
    }

    /// Queue the writes of this submission's parameters (call just before submitting it).
    pub fn upload(&mut self, queue: &wgpu::Queue) {
        let bytes = (SLOT * SLOTS) as usize;
        for (segment, params) in self.segments.iter().zip(self.params.chunks(bytes)) {
            queue.write_buffer(segment, 0, params);
        }
        self.params.clear();
    }
}

/// A storage range a kernel binds: a whole buffer, or a tensor's place in a buffer it shares
/// with others (the flat parameter layout, `graph::params`). A kernel sees the range from its
/// index 0.
#[derive(Clone, Copy, Debug)]
pub struct Bind<'a> {
    pub buffer: &'a wgpu::Buffer,
    /// bytes from the buffer's start (a multiple of the adapter's storage offset alignment)
    pub offset: u64,
    /// bytes bound
    pub size: u64,
}

impl<'a> From<&'a wgpu::Buffer> for Bind<'a> {
    fn from(buffer: &'a wgpu::Buffer) -> Self {
        Bind { buffer, offset: 0, size: buffer.size() }
    }
}

impl Bind<'_> {
    /// Whether this is all of its buffer.
    pub fn whole(&self) -> bool {
        self.offset == 0 && self.size == self.buffer.size()
    }
}

/// What a bind group is made of: the pipeline (its layout), the uniform slot and the storage
/// ranges in binding order (buffer, offset, size). Holding the pipeline and buffers keeps their
/// identities unique.
#[derive(PartialEq, Eq, Hash)]
pub(crate) struct BindKey {
    pub pipeline: wgpu::ComputePipeline,
    pub slot: u64,
    pub buffers: Vec<Option<(wgpu::Buffer, u64, u64)>>,
    /// The device's scratch texture where the dispatch binds it (it lives as long as the
    /// device, unless a larger one replaces it).
    pub texture: Option<wgpu::TextureView>,
}

#[derive(Default)]
pub(crate) struct BindCache {
    map: Mutex<HashMap<BindKey, wgpu::BindGroup>>,
}

impl BindCache {
    pub fn get(&self, key: &BindKey) -> Option<wgpu::BindGroup> {
        self.map.lock().get(key).cloned()
    }
    pub fn insert(&self, key: BindKey, group: wgpu::BindGroup) {
        let mut map = self.map.lock();
        if map.len() >= CAPACITY {
            map.clear();
        }
        map.insert(key, group);
    }
    /// Drop every cached bind group (and so its hold on its buffers).
    pub fn clear(&self) {
        self.map.lock().clear();
    }
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }
}
