//! The GPU runtime: one device, its pipelines and its buffers, created once and reused.
//!
//! Kernels do not talk to wgpu directly. They call [`Gpu::dispatch`] with a [`KernelKey`]
//! (shader file, entry point, override constants: the key doubles as the debug label), the
//! storage buffers in binding order, and a `#[repr(C)]` uniform struct. Dispatches are recorded
//! into one compute pass of one pending command encoder and submitted together when somebody
//! needs a number ([`Gpu::read_bytes`]), writes a buffer from the host, or calls
//! [`Gpu::flush`]. Their uniforms and bind groups are reused from step to step (`binds`). wgpu
//! errors never panic: they are captured and returned as [`Error`] at the next check, once per
//! submission, naming the kernels it carried. [`Gpu::stats`] counts dispatches, submissions and
//! the host's recording and waiting time (`bench step` prints them per step).
//!
//! Recording and submission are in `submit`, host writes and read-backs in `transfer`, the
//! buffer pool in `pool`, reused bind groups and uniforms in `binds`.

pub mod adapter;
mod binds;
pub use binds::Bind;
mod matmul_kernel;
mod pool;
mod qtensor;
mod stats;
mod submit;
mod tensor;
mod transfer;

pub use adapter::{AdapterSummary, Profile, DEVICE_ENV};
pub use matmul_kernel::{MatmulKernel, Precision, StagedTile, MATMUL_ENV, STAGED_TILES};
pub use pool::{Category, CategoryGuard, GpuBuffer};
pub use qtensor::QTensor;
pub use stats::GpuStats;
use submit::Pending;
pub use submit::{rgba_texture, SubmitGate, GATED_BATCH};
pub use tensor::{Chunk, Split, Tensor};
pub use transfer::Readback;
use transfer::STAGING_LIMIT;

use crate::error::{Error, Result};
use crate::shaders;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

/// How to open a device.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Adapter index, type or name substring; `None` reads `POCKETTUNE_DEVICE`, then picks.
    pub device: Option<String>,
    pub profile: Profile,
}

/// Identifies one compute pipeline: shader file, entry point and override constants.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KernelKey {
    pub shader: &'static str,
    pub entry: &'static str,
    pub constants: Vec<(&'static str, u32)>,
}

impl KernelKey {
    pub fn new(shader: &'static str, entry: &'static str) -> Self {
        KernelKey { shader, entry, constants: Vec::new() }
    }
    pub fn with(mut self, name: &'static str, value: u32) -> Self {
        self.constants.push((name, value));
        self
    }
    pub fn label(&self) -> String {
        let mut s = format!("{}::{}", self.shader, self.entry);
        for (k, v) in &self.constants {
            s.push_str(&format!(" {k}={v}"));
        }
        s
    }
}

/// The device memory allocator's block size under the mobile profile (see `Gpu::new`).
const MOBILE_BLOCK: std::ops::Range<u64> = (8 << 20)..(8 << 20);

pub struct Gpu {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    summary: AdapterSummary,
    profile: Profile,
    limits: wgpu::Limits,
    adapter_limits: wgpu::Limits,
    modules: Mutex<HashMap<&'static str, Arc<wgpu::ShaderModule>>>,
    /// WGSL registered at run time (kernel variants under trial in benches/ and tools/).
    extra_sources: Mutex<HashMap<&'static str, String>>,
    /// The RGBA32F texture kernels read through ([`Self::scratch_texture`]), grown on demand.
    texture: Mutex<Option<(wgpu::Texture, wgpu::TextureView)>>,
    pipelines: Mutex<HashMap<KernelKey, Arc<Pipeline>>>,
    pool: Arc<pool::Pool>,
    pending: Mutex<Pending>,
    binds: Arc<binds::BindCache>,
    errors: Arc<Mutex<Vec<String>>>,
    /// Kernels submitted since the last [`Gpu::check`]: where an error it finds came from.
    unchecked: Mutex<std::collections::BTreeSet<(&'static str, &'static str)>>,
    lost: Arc<Mutex<Option<(String, String)>>>,
    dummy: wgpu::Buffer,
    gate: Mutex<Option<Arc<dyn SubmitGate>>>,
    stats: Arc<stats::Counters>,
    matmul: Mutex<MatmulKernel>,
    matmul_kernels: Vec<MatmulKernel>,
    precision: Mutex<Precision>,
    constants: Mutex<HashMap<String, Arc<dyn std::any::Any + Send + Sync>>>,
}

/// The device memory allocator's bytes now and at their peaks since the device opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DriverBytes {
    /// carved out for buffers
    pub allocated: u64,
    pub peak_allocated: u64,
    /// taken from the driver in blocks (allocated plus the blocks' free space)
    pub reserved: u64,
    pub peak_reserved: u64,
}

/// A compiled kernel and the layout of its bind group (fetched once, not per dispatch).
#[derive(Debug)]
pub struct Pipeline {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
}

impl Gpu {
    /// Open the adapter chosen by `opts` with the limits of its profile.
    pub fn new(opts: &GpuOptions) -> Result<Gpu> {
        let instance = adapter::instance();
        let adapters = adapter::enumerate(&instance);
        let env = std::env::var(DEVICE_ENV).ok();
        let spec = opts.device.as_deref().or(env.as_deref());
        let (index, summary) = adapter::select(&adapters, spec)?;
        let adapter = &adapters[index];
        let limits = opts.profile.limits(adapter);
        let desc = wgpu::DeviceDescriptor {
            label: Some("pockettune"),
            // Optional features are switched on where the adapter has them; kernels that use
            // them have a plain fallback (f16 is used only when `--precision mixed` asks).
            required_features: adapter.features() & (wgpu::Features::SUBGROUP | wgpu::Features::SHADER_F16),
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            // Under the mobile profile memory is the constraint. Where device memory is host
            // memory (phones, lavapipe) each of the allocator's blocks stays resident while any
            // buffer lives in it: 128-256 MiB blocks (Performance) held a Gemma 3 1B LoRA step
            // at ~1.3 GB of mostly empty blocks for 460 MiB of buffers, and MemoryUsage's 8-64
            // MiB blocks still reserved 188 MiB for 128 MiB of buffers (docs/perf.md). Blocks of
            // 8 MiB (4 MiB for host-visible memory, which is all of lavapipe's) give every
            // larger buffer its own allocation, returned to the driver when the buffer goes:
            // 141 MiB reserved for the same 128. The pool reuses buffers, so the extra driver
            // allocations are few.
            memory_hints: match opts.profile {
                Profile::Mobile => {
                    wgpu::MemoryHints::Manual { suballocated_device_memory_block_size: MOBILE_BLOCK }
                }
                Profile::Adapter => wgpu::MemoryHints::Performance,
            },
            trace: wgpu::Trace::Off,
        };
        let (device, queue) =
            pollster::block_on(adapter.request_device(&desc)).map_err(|e| Error::RequestDevice {
                adapter: summary.name.clone(),
                profile: opts.profile.to_string(),
                message: e.to_string(),
            })?;

        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let kind = match &e {
                wgpu::Error::OutOfMemory { .. } => "out of memory",
                wgpu::Error::Validation { .. } => "validation",
                wgpu::Error::Internal { .. } => "internal",
            };
            sink.lock().push(format!("{kind}: {e}"));
        }));
        let lost: Arc<Mutex<Option<(String, String)>>> = Arc::default();
        let lost_sink = lost.clone();
        device.set_device_lost_callback(move |reason, message| {
            *lost_sink.lock() = Some((format!("{reason:?}"), message));
        });

        let subgroups_of_8 = subgroup_width(&device, &summary).is_some();
        let matmul_kernels = MatmulKernel::available(subgroups_of_8, &limits);
        let matmul = MatmulKernel::from_env(&matmul_kernels, &limits)?
            .unwrap_or_else(|| MatmulKernel::default_of(&matmul_kernels));

        let dummy = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("unused binding"),
            size: 16,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let stats = Arc::new(stats::Counters::default());
        let binds = Arc::new(binds::BindCache::default());
        Ok(Gpu {
            pool: Arc::new(pool::Pool::new(device.clone(), stats.clone(), binds.clone())),
            device,
            queue,
            summary,
            profile: opts.profile,
            limits,
            adapter_limits: adapter.limits(),
            modules: Mutex::default(),
            extra_sources: Mutex::default(),
            texture: Mutex::default(),
            pipelines: Mutex::default(),
            pending: Mutex::default(),
            binds,
            errors,
            unchecked: Mutex::default(),
            lost,
            dummy,
            gate: Mutex::new(None),
            stats,
            matmul: Mutex::new(matmul),
            matmul_kernels,
            precision: Mutex::new(Precision::F32),
            constants: Mutex::default(),
        })
    }

    pub fn summary(&self) -> &AdapterSummary {
        &self.summary
    }
    pub fn profile(&self) -> Profile {
        self.profile
    }
    /// The limits the device was opened with (the profile's).
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }
    pub fn adapter_limits(&self) -> &wgpu::Limits {
        &self.adapter_limits
    }
    /// Largest storage binding, and so the largest chunk of a tensor, in bytes.
    pub fn max_binding(&self) -> u64 {
        self.limits.max_storage_buffer_binding_size.min(self.limits.max_buffer_size)
    }
    pub fn max_workgroups(&self) -> u32 {
        self.limits.max_compute_workgroups_per_dimension
    }
    /// The device memory allocator's figures, sampled when a buffer is made and when writes
    /// are staged: what it has carved out for buffers (the pool's and wgpu's own staging copies
    /// of uploads) and what it has reserved from the driver in blocks. `None` where the backend
    /// keeps no such report. Where device memory is host memory (phones, lavapipe) the reserved
    /// bytes are resident, so this accounts for the RSS the pool's figures do not explain.
    pub fn driver_bytes(&self) -> Option<DriverBytes> {
        self.pool.sample_driver();
        let d = self.pool.driver();
        (d.peak_reserved > 0).then_some(d)
    }

    /// Bytes currently held in GPU buffers (live and pooled), and the peak of that figure.
    pub fn bytes_allocated(&self) -> (u64, u64) {
        self.pool.bytes()
    }
    /// Bytes in GPU buffers that a tensor is using now (pooled ones not counted), and the peak
    /// of that figure since the last [`Self::reset_live_peak`].
    pub fn bytes_live(&self) -> (u64, u64) {
        self.pool.live_bytes()
    }
    /// Start the peaks of live bytes (the total's and each category's) again from now.
    pub fn reset_live_peak(&self) {
        self.pool.reset_live_peak()
    }
    /// Live bytes by category: (category, bytes now, peak bytes since the last
    /// [`Self::reset_live_peak`]), in [`Category::ALL`]'s order. Each category's peak is its
    /// own, so the peaks may add up to more than the peak of the total.
    pub fn bytes_by_category(&self) -> Vec<(Category, u64, u64)> {
        self.pool.bytes_by_category()
    }
    /// Count the buffers this thread allocates as `category` until the guard drops:
    /// `let _c = gpu.category(Category::Gradients);` (the same as [`Category::enter`]).
    pub fn category(&self, category: Category) -> CategoryGuard {
        category.enter()
    }
    /// Count buffers without creating them and run no kernel from now on (`bench step --plan`:
    /// the memory report of a step without computing it). See [`Self::plan`].
    pub fn set_planning(&self, on: bool) {
        self.pool.set_planning(on);
    }

    /// Whether a planning step is running ([`Self::plan`]).
    pub fn planning(&self) -> bool {
        self.pool.planning()
    }

    /// Run `f` as a planning step: every buffer it asks for is counted (live bytes, by
    /// category, and their peaks) but not created, and no kernel runs; reads return zeros.
    /// Returns the peak of live bytes during `f`, the bytes already live included: the smallest
    /// `--memory-budget` under which `f` runs (the pool gives pooled buffers back before it
    /// refuses, so at every allocation the bytes held can be the bytes live).
    pub fn plan<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<(T, u64)> {
        self.flush()?;
        let budget = self.memory_budget();
        self.pool.set_budget(None);
        let saved = self.pool.live_bytes();
        self.pool.reset_live_peak();
        let outer = self.pool.planning();
        self.pool.set_planning(true);
        let out = f();
        self.pool.set_planning(outer);
        self.pool.set_budget(budget);
        let peak = self.pool.live_bytes().1;
        self.pool.restore_live_peak(saved.1);
        Ok((out?, peak))
    }

    /// Hold at most `budget` bytes of buffers (`--memory-budget`); an allocation past it fails
    /// with [`Error::MemoryBudget`] after pooled buffers are given back.
    pub fn set_memory_budget(&self, budget: Option<u64>) {
        self.pool.set_budget(budget);
    }
    pub fn memory_budget(&self) -> Option<u64> {
        self.pool.budget()
    }
    pub fn submissions(&self) -> u64 {
        self.stats.snapshot().submissions
    }
    /// Dispatches, submissions and the host's recording and waiting time since the device was
    /// opened; subtract two snapshots ([`GpuStats::since`]) for the work in between.
    pub fn stats(&self) -> GpuStats {
        self.stats.snapshot()
    }
    /// Bytes of staged host writes allowed in flight: [`STAGING_LIMIT`], or an eighth of the
    /// memory budget if less (wgpu's staging copies are device memory the pool does not count).
    fn staging_limit(&self) -> u64 {
        self.pool.budget().map_or(STAGING_LIMIT, |b| STAGING_LIMIT.min(b / 8))
    }

    /// Block until the GPU has finished `submission` (everything submitted when `None`),
    /// counted as host-wait time in [`Self::stats`]. Callers that wait for everything submit
    /// first, so the buffers the pool gave back have then been destroyed.
    pub(crate) fn wait_for(&self, submission: Option<wgpu::SubmissionIndex>, context: &str) -> Result<()> {
        let idle = submission.is_none();
        let poll = match submission {
            Some(index) => wgpu::PollType::Wait { submission_index: Some(index), timeout: None },
            None => wgpu::PollType::wait_indefinitely(),
        };
        self.stats
            .wait(|| self.device.poll(poll))
            .map_err(|e| Error::Internal { context: context.into(), message: e.to_string() })?;
        if idle {
            self.pool.retired();
        }
        Ok(())
    }
    /// The matrix-product kernel in use.
    pub fn matmul_kernel(&self) -> MatmulKernel {
        *self.matmul.lock()
    }
    /// Every matrix-product kernel this device can run (the first needs no optional feature).
    pub fn matmul_kernels(&self) -> &[MatmulKernel] {
        &self.matmul_kernels
    }
    /// Switch the matrix-product kernel (gradcheck runs each; benchmarks compare them; the
    /// autotune sets its pick). A staged tile outside the offered list is allowed if it fits.
    pub fn set_matmul_kernel(&self, kernel: MatmulKernel) -> Result<()> {
        MatmulKernel::check_on(kernel, &self.matmul_kernels, &self.limits)?;
        *self.matmul.lock() = kernel;
        Ok(())
    }
    /// The device's smallest subgroup, where it has subgroups of at least 8 lanes (the
    /// subgroup kernels' condition): a workgroup this wide is one subgroup on every run.
    pub fn subgroup_width(&self) -> Option<u32> {
        subgroup_width(&self.device, &self.summary)
    }
    /// Whether the device runs f16 arithmetic in shaders (`shader_f16`).
    pub fn has_f16(&self) -> bool {
        self.device.features().contains(wgpu::Features::SHADER_F16)
    }
    /// The arithmetic of the forward products (`--precision`).
    pub fn precision(&self) -> Precision {
        *self.precision.lock()
    }
    /// Set the arithmetic of the forward products; `Mixed` needs `shader_f16`.
    pub fn set_precision(&self, precision: Precision) -> Result<()> {
        if precision == Precision::Mixed && !self.has_f16() {
            return Err(Error::InvalidArgument {
                name: "--precision".into(),
                detail: format!(
                    "mixed precision needs f16 arithmetic in shaders (shader_f16), which {} lacks \
                     (`pockettune info` lists its features); use --precision f32",
                    self.summary.name
                ),
            });
        }
        *self.precision.lock() = precision;
        Ok(())
    }
    /// Whether `POCKETTUNE_MATMUL` chose the kernel (the autotune then leaves it alone).
    pub fn matmul_forced(&self) -> bool {
        std::env::var_os(MATMUL_ENV).is_some()
    }

    /// A constant made once per device and `key` and shared after that (RoPE's cos/sin table
    /// for one sequence length, say), so that a step uploads nothing that does not change.
    pub fn constant<T: Send + Sync + 'static>(
        &self,
        key: &str,
        make: impl FnOnce() -> Result<T>,
    ) -> Result<Arc<T>> {
        if let Some(c) = self.constants.lock().get(key) {
            if let Ok(c) = c.clone().downcast::<T>() {
                return Ok(c);
            }
        }
        // Made for real even in a planning step: it is kept, so the step after the plan finds
        // it, and the plan counts it as that step will (live from here on).
        let planning = self.pool.planning();
        self.pool.set_planning(false);
        let made = make();
        self.pool.set_planning(planning);
        let made = Arc::new(made?);
        self.constants.lock().insert(key.to_string(), made.clone());
        Ok(made)
    }

    /// A small buffer to bind where a kernel's optional input (a bias, say) is switched off.
    pub fn placeholder(&self) -> Bind<'_> {
        Bind::from(&self.dummy)
    }
    /// Bind groups kept for reuse (see `binds`); none after [`Self::trim`].
    pub fn cached_bind_groups(&self) -> usize {
        self.binds.len()
    }
    /// Give pooled, unused buffers back to the driver (and the cached bind groups that hold
    /// them).
    pub fn trim(&self) {
        self.pool.trim();
    }

    /// Give the device up now: every later call returns [`Error::DeviceLost`]. This is also
    /// how the tests exercise the device-loss path that a phone driver takes on its own.
    pub fn destroy(&self) {
        self.device.destroy();
    }

    /// Install the hook that may hold back the next submission (see [`SubmitGate`]).
    pub fn set_submit_gate(&self, gate: Option<Arc<dyn SubmitGate>>) {
        *self.gate.lock() = gate;
    }

    /// A storage buffer of at least `bytes` bytes, from the pool when one is free.
    pub fn alloc(&self, bytes: u64, what: &str) -> Result<GpuBuffer> {
        let limit = self.limits.max_buffer_size.min(self.limits.max_storage_buffer_binding_size);
        if bytes > limit {
            return Err(Error::TooLarge { what: what.to_string(), bytes, limit });
        }
        match self.pool.get(bytes, what) {
            // Buffers given back under the budget are still taken until the GPU is done with
            // them (wgpu destroys a buffer after its last submission): wait for that, then
            // try again, so that the driver never holds more than the budget either.
            Err(Error::MemoryBudget { .. }) if self.pool.retiring() > 0 => {
                self.sync()?;
                self.pool.get(bytes, what)
            }
            other => other,
        }
    }

    fn module(&self, shader: &'static str) -> Result<Arc<wgpu::ShaderModule>> {
        if let Some(m) = self.modules.lock().get(shader) {
            return Ok(m.clone());
        }
        let extra = self.extra_sources.lock().get(shader).cloned();
        let source =
            extra.or_else(|| shaders::source(shader).map(str::to_string)).ok_or_else(|| Error::Internal {
                context: "shader lookup".into(),
                message: format!("no shader named {shader} is compiled into this binary or registered"),
            })?;
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(shader),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        if let Some(e) = self.stats.wait(|| pollster::block_on(scope.pop())) {
            return Err(self.scope_error(format!("shader {shader}.wgsl"), e));
        }
        let module = Arc::new(module);
        self.modules.lock().insert(shader, module.clone());
        Ok(module)
    }

    /// Make WGSL source available under `name` for [`KernelKey`]s (kernel variants on trial;
    /// the shipped kernels are compiled in from `shaders/`).
    pub fn register_shader(&self, name: &'static str, source: impl Into<String>) {
        self.binds.clear(); // holds the pipelines it was made for
        self.modules.lock().remove(name);
        self.pipelines.lock().retain(|k, _| k.shader != name);
        self.extra_sources.lock().insert(name, source.into());
    }

    /// The pipeline for `key`, compiled on first use.
    pub fn pipeline(&self, key: &KernelKey) -> Result<Arc<Pipeline>> {
        if let Some(p) = self.pipelines.lock().get(key) {
            return Ok(p.clone());
        }
        let module = self.module(key.shader)?;
        let label = key.label();
        let constants: Vec<(&str, f64)> = key.constants.iter().map(|&(k, v)| (k, v as f64)).collect();
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&label),
            layout: None,
            module: &module,
            entry_point: Some(key.entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &constants,
                // Every kernel writes its workgroup memory before reading it.
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        if let Some(e) = self.stats.wait(|| pollster::block_on(scope.pop())) {
            return Err(self.scope_error(format!("pipeline {label}"), e));
        }
        let layout = pipeline.get_bind_group_layout(0);
        let pipeline = Arc::new(Pipeline { pipeline, layout });
        self.pipelines.lock().insert(key.clone(), pipeline.clone());
        Ok(pipeline)
    }

    /// Number of workgroups for `n` items at `per_group` items each, spread over x and y so that
    /// no dimension passes the device limit. Kernels rebuild the linear index as
    /// `(wid.y * num_workgroups.x + wid.x)`.
    pub fn grid(&self, n: usize, per_group: usize) -> [u32; 3] {
        let groups = n.div_ceil(per_group.max(1)) as u64;
        let max = self.max_workgroups() as u64;
        if groups <= max {
            [groups as u32, 1, 1]
        } else {
            let y = groups.div_ceil(max);
            [groups.div_ceil(y) as u32, y as u32, 1]
        }
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// [`Gpu::subgroup_width`] of a device being opened.
fn subgroup_width(device: &wgpu::Device, summary: &AdapterSummary) -> Option<u32> {
    let min = summary.subgroup_size[0];
    (device.features().contains(wgpu::Features::SUBGROUP) && min >= 8).then_some(min)
}
