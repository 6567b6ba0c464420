//! Storage buffers, pooled by size. Training allocates the same shapes every step, so a freed
//! buffer is kept and handed out again for the next request of the same (256-byte rounded)
//! size instead of going back to the driver. Bytes held (live and pooled) and bytes live (in
//! use by a tensor) are counted for the metrics: the first is what the driver gave out, the
//! second what the computation needed. Live bytes are also counted by [`Category`] (weights,
//! gradients, optimizer state, ...): each buffer records the category in force on its thread
//! when it was handed out (see [`Category::enter`]), so that its release subtracts from the
//! same one.

use crate::error::{Error, Result};
use parking_lot::Mutex;
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Arc;

/// What a GPU buffer is for, in the memory report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// Parameter values (trained or frozen, f32 or packed).
    Weights,
    /// Parameter gradients.
    Gradients,
    /// AdamW moments.
    OptimizerState,
    /// Activations of the forward pass, what the backward pass saves (norm statistics,
    /// attention probabilities) and the activations' gradients.
    Activations,
    /// The logits (the LM head's output, soft-capped or not), their gradient and the
    /// cross-entropy's state and losses.
    LogitsLoss,
    /// Upload staging and scratch (dequantized weights, matmul operands packed for a kernel).
    Staging,
    /// Anything allocated outside a category scope (reduction partials, token ids, ...).
    Other,
}

impl Category {
    pub const ALL: [Category; 7] = [
        Category::Weights,
        Category::Gradients,
        Category::OptimizerState,
        Category::Activations,
        Category::LogitsLoss,
        Category::Staging,
        Category::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Category::Weights => "weights",
            Category::Gradients => "gradients",
            Category::OptimizerState => "optimizer state",
            Category::Activations => "activations",
            Category::LogitsLoss => "logits and loss",
            Category::Staging => "staging",
            Category::Other => "other",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Count buffers handed out on this thread as `self` until the guard drops (scopes nest:
    /// the innermost wins, and dropping a guard restores the category before it). Per thread,
    /// not per device, so that a thread uploading weights in the background does not relabel
    /// what the step's thread allocates meanwhile.
    pub fn enter(self) -> CategoryGuard {
        CategoryGuard { previous: CURRENT.with(|c| c.replace(self)), _not_send: std::marker::PhantomData }
    }

    /// The category in force on this thread.
    pub fn current() -> Category {
        CURRENT.with(Cell::get)
    }
}

thread_local! {
    static CURRENT: Cell<Category> = const { Cell::new(Category::Other) };
}

/// Restores the previous category when dropped (see [`Category::enter`]).
#[must_use = "the category applies until the guard is dropped"]
pub struct CategoryGuard {
    previous: Category,
    /// stays on the thread whose category it changed
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for CategoryGuard {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.previous));
    }
}

/// Live bytes: the total and each category, now and at their peaks (each peak on its own: the
/// categories need not peak at the same moment).
#[derive(Clone, Copy, Debug, Default)]
struct Live {
    now: u64,
    peak: u64,
    by: [u64; Category::ALL.len()],
    by_peak: [u64; Category::ALL.len()],
}

pub(crate) struct Pool {
    device: wgpu::Device,
    /// the device's counters: an allocation's out-of-memory check is a blocking pop
    stats: Arc<super::stats::Counters>,
    /// Bind groups cached by the device (`super::binds`): they hold buffers, so they go
    /// whenever buffers go back to the driver.
    binds: Arc<super::binds::BindCache>,
    /// Every buffer the pool made and still holds (in use or free): the ones a bind group
    /// may be cached for.
    known: Mutex<std::collections::HashSet<wgpu::Buffer>>,
    /// Free buffers by size, each under the number it was made with. The lowest number is
    /// handed out first, so that a step which asks for the same sizes in the same order gets
    /// the same buffers whatever order the last step freed them in: its bind groups are then
    /// found in the cache (`super::binds`).
    free: Mutex<HashMap<u64, std::collections::BTreeMap<u64, wgpu::Buffer>>>,
    /// The number the next buffer is made with.
    made: std::sync::atomic::AtomicU64,
    /// (bytes held now, peak bytes held)
    held: Mutex<(u64, u64)>,
    live: Mutex<Live>,
    /// `--memory-budget`: bytes held may not pass it
    budget: Mutex<Option<u64>>,
    /// Bytes given back to the driver since the GPU was last seen idle: wgpu destroys a
    /// dropped buffer only once the submissions that use it are done, so until then its memory
    /// is still taken. Counted against the budget; `Gpu::alloc` waits for the GPU (and sets
    /// this to 0 through [`Pool::retired`]) when they stand in the way.
    retiring: std::sync::atomic::AtomicU64,
    /// The device memory allocator's figures, sampled when a buffer is made (and by the device
    /// when uploads are staged); see `Gpu::driver_bytes`.
    driver: Mutex<super::DriverBytes>,
    /// A planning step (see `Gpu::plan`): buffers are counted, not created; all share `stand_in`.
    planning: std::sync::atomic::AtomicBool,
    stand_in: wgpu::Buffer,
}

/// Every pooled buffer is a storage buffer that copies go in and out of; it may also be bound
/// as a uniform window (the `subgroup-uniform` matmul reads its packed A that way).
const USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::UNIFORM)
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

impl Pool {
    pub fn new(
        device: wgpu::Device,
        stats: Arc<super::stats::Counters>,
        binds: Arc<super::binds::BindCache>,
    ) -> Self {
        let stand_in = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("planning stand-in"),
            size: 256,
            usage: USAGE,
            mapped_at_creation: false,
        });
        Pool {
            device,
            stats,
            binds,
            known: Mutex::default(),
            stand_in,
            planning: Default::default(),
            free: Mutex::default(),
            made: Default::default(),
            held: Mutex::new((0, 0)),
            live: Mutex::default(),
            budget: Mutex::new(None),
            retiring: Default::default(),
            driver: Mutex::default(),
        }
    }

    pub fn set_planning(&self, on: bool) {
        self.planning.store(on, std::sync::atomic::Ordering::Relaxed);
    }
    pub fn planning(&self) -> bool {
        self.planning.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set_budget(&self, budget: Option<u64>) {
        *self.budget.lock() = budget;
    }
    pub fn budget(&self) -> Option<u64> {
        *self.budget.lock()
    }

    /// Under a budget, make room for `size` new bytes: give pooled buffers back to the driver,
    /// and refuse if the live ones leave no room.
    fn admit(&self, size: u64, what: &str) -> Result<()> {
        let Some(budget) = self.budget() else { return Ok(()) };
        if self.held.lock().0 + self.retiring() + size <= budget {
            return Ok(());
        }
        self.trim();
        let held = self.held.lock().0 + self.retiring();
        if held + size <= budget {
            return Ok(());
        }
        Err(Error::MemoryBudget {
            budget_mib: crate::memory::mib(budget),
            needed_mib: crate::memory::mib(held + size),
            detail: format!(
                "{} for {what} does not fit beside the {} the engine holds",
                crate::memory::mib(size),
                crate::memory::mib(held)
            ),
            hint: format!(
                "It needs at least {}; `pockettune bench step --plan` with the same model and options \
                 gives the smallest budget that works",
                crate::memory::mib(held + size)
            ),
        })
    }

    /// Bytes given back to the driver that the GPU may still be using (see `retiring`).
    pub fn retiring(&self) -> u64 {
        self.retiring.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The GPU has been idle since the buffers given back were dropped: their memory is free.
    pub fn retired(&self) {
        self.retiring.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// Read the allocator's report into the driver figures (now, and the peaks).
    pub fn sample_driver(&self) {
        if let Some(r) = self.device.generate_allocator_report() {
            let mut d = self.driver.lock();
            d.allocated = r.total_allocated_bytes;
            d.reserved = r.total_reserved_bytes;
            d.peak_allocated = d.peak_allocated.max(d.allocated);
            d.peak_reserved = d.peak_reserved.max(d.reserved);
        }
    }

    /// The driver figures as last sampled.
    pub fn driver(&self) -> super::DriverBytes {
        *self.driver.lock()
    }

    /// (bytes held now, peak bytes held)
    pub fn bytes(&self) -> (u64, u64) {
        *self.held.lock()
    }

    /// (bytes live now, peak bytes live)
    pub fn live_bytes(&self) -> (u64, u64) {
        let live = self.live.lock();
        (live.now, live.peak)
    }

    /// (category, bytes live now, peak bytes live) for every category, in [`Category::ALL`]'s
    /// order.
    pub fn bytes_by_category(&self) -> Vec<(Category, u64, u64)> {
        let live = *self.live.lock();
        Category::ALL.iter().map(|&c| (c, live.by[c.index()], live.by_peak[c.index()])).collect()
    }

    /// Put the peak of live bytes back to `peak` (or the bytes live now, if more): after a
    /// planning step, whose peak is not the run's.
    pub fn restore_live_peak(&self, peak: u64) {
        let mut live = self.live.lock();
        live.peak = peak.max(live.now);
    }

    /// Start the peaks of live bytes (the total and each category's) again from the bytes live now.
    pub fn reset_live_peak(&self) {
        let mut live = self.live.lock();
        live.peak = live.now;
        live.by_peak = live.by;
    }

    pub fn get(self: &Arc<Self>, bytes: u64, what: &str) -> Result<GpuBuffer> {
        let size = bytes.max(4).next_multiple_of(256);
        if self.planning() {
            let mut held = self.held.lock();
            held.0 += size; // a plan holds exactly what is live
            held.1 = held.1.max(held.0);
            drop(held);
            return Ok(self.hand_out((0, self.stand_in.clone()), size, bytes, true));
        }
        let reused = self.free.lock().get_mut(&size).and_then(|free| free.pop_first());
        let buffer = match reused {
            Some(b) => b,
            None => {
                self.admit(size, what)?;
                let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
                let b = self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(what),
                    size,
                    usage: USAGE,
                    mapped_at_creation: false,
                });
                if self.stats.wait(|| pollster::block_on(scope.pop())).is_some() {
                    return Err(Error::OutOfMemory {
                        context: format!("allocating {size} bytes for {what}"),
                    });
                }
                let mut held = self.held.lock();
                held.0 += size;
                held.1 = held.1.max(held.0);
                drop(held);
                self.known.lock().insert(b.clone());
                self.sample_driver(); // a new buffer: the allocator's figures moved
                (self.made.fetch_add(1, std::sync::atomic::Ordering::Relaxed), b)
            }
        };
        Ok(self.hand_out(buffer, size, bytes, false))
    }

    /// Count `size` bytes live in the current category and wrap the buffer.
    fn hand_out(
        self: &Arc<Self>,
        (number, buffer): (u64, wgpu::Buffer),
        size: u64,
        bytes: u64,
        planned: bool,
    ) -> GpuBuffer {
        let category = Category::current();
        let i = category.index();
        let mut live = self.live.lock();
        live.now += size;
        live.peak = live.peak.max(live.now);
        live.by[i] += size;
        live.by_peak[i] = live.by_peak[i].max(live.by[i]);
        drop(live);
        GpuBuffer { buffer: Some(buffer), number, size, bytes, planned, category, pool: self.clone() }
    }

    /// Whether `buffer` is one of the pool's (in use or free).
    pub fn knows(&self, buffer: &wgpu::Buffer) -> bool {
        self.known.lock().contains(buffer)
    }

    /// Give every pooled (unused) buffer back to the driver, with the cached bind groups that
    /// would otherwise keep them alive.
    pub fn trim(&self) {
        let mut free = self.free.lock();
        let released: u64 = free.iter().map(|(size, v)| size * v.len() as u64).sum();
        let mut known = self.known.lock();
        for (_, b) in free.drain().flat_map(|(_, v)| v) {
            known.remove(&b);
        }
        drop(known);
        self.binds.clear();
        self.held.lock().0 -= released;
        self.retiring.fetch_add(released, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A storage buffer that returns to its pool when dropped.
pub struct GpuBuffer {
    buffer: Option<wgpu::Buffer>,
    /// the number it was made with (its place in the pool's free list)
    number: u64,
    /// bytes counted live (the buffer's size, or what it stands for in a planning step)
    size: u64,
    /// a planning step's stand-in: counted, never pooled
    planned: bool,
    bytes: u64,
    /// the category its bytes are counted in (the one in force when it was handed out)
    category: Category,
    pool: Arc<Pool>,
}

impl GpuBuffer {
    pub fn raw(&self) -> &wgpu::Buffer {
        self.buffer.as_ref().expect("buffer present until drop")
    }
    /// All of the buffer, to bind.
    pub fn bind(&self) -> super::Bind<'_> {
        self.raw().into()
    }
    /// Bytes requested (the buffer itself may be a little larger).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
    /// The category this buffer's bytes are counted in.
    pub fn category(&self) -> Category {
        self.category
    }
}

impl GpuBuffer {
    /// Give the buffer back to the driver instead of to the pool (a buffer of a size no later
    /// request is likely to ask for, e.g. a parameter's own after it moved into the flat
    /// layout). The cached bind groups go too: one of them may hold it.
    pub fn discard(mut self) {
        let Some(b) = self.buffer.take() else { return };
        let pool = self.pool.clone();
        let mut live = pool.live.lock();
        live.now -= self.size;
        live.by[self.category.index()] -= self.size;
        drop(live);
        pool.held.lock().0 -= self.size;
        if !self.planned {
            pool.known.lock().remove(&b);
            pool.binds.clear();
            pool.retiring.fetch_add(self.size, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl Drop for GpuBuffer {
    fn drop(&mut self) {
        if let Some(b) = self.buffer.take() {
            let mut live = self.pool.live.lock();
            live.now -= self.size;
            live.by[self.category.index()] -= self.size;
            drop(live);
            if self.planned {
                self.pool.held.lock().0 -= self.size;
            } else {
                self.pool.free.lock().entry(b.size()).or_default().insert(self.number, b);
            }
        }
    }
}

impl std::fmt::Debug for GpuBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuBuffer({} bytes)", self.bytes)
    }
}
