//! Recording and submitting: dispatches go into one compute pass of one pending encoder,
//! copies end the pass, and a submission goes out when a number is needed, a host write
//! is staged past its limit, or somebody flushes; errors are checked once per submission.

use super::{binds, Bind, Gpu, KernelKey};
use crate::error::{Error, Result};

#[derive(Default)]
pub(super) struct Pending {
    /// The compute pass open on `encoder`: a submission's dispatches share one pass (wgpu
    /// orders each dispatch after the ones before it that it depends on), ended by a copy or
    /// the submission. Declared before `encoder` so that it ends first when dropped.
    pass: Option<wgpu::ComputePass<'static>>,
    encoder: Option<wgpu::CommandEncoder>,
    dispatches: usize,
    /// The parameters of this encoder's dispatches, slot by slot (see [`binds`]).
    uniforms: binds::UniformRing,
    /// (shader, entry point) of each dispatch in this encoder, to say which kernels a failed
    /// submission carried (errors are checked per submission, see [`Gpu::check`]).
    kernels: Vec<(&'static str, &'static str)>,
    /// Bytes of host writes staged since the last submission (see [`Gpu::write`]).
    pub(super) staged: u64,
    /// The staging ring: submissions that carried staged writes, with their bytes, oldest
    /// first (wgpu frees a write's staging copy when its submission completes).
    pub(super) ring: std::collections::VecDeque<(wgpu::SubmissionIndex, u64)>,
}

impl Pending {
    /// The open encoder, made if there is none.
    fn encoder(&mut self, device: &wgpu::Device) -> &mut wgpu::CommandEncoder {
        self.encoder.get_or_insert_with(|| {
            device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("step") })
        })
    }

    /// The encoder for a copy: a copy ends the open compute pass.
    fn copy_encoder(&mut self, device: &wgpu::Device) -> &mut wgpu::CommandEncoder {
        self.pass = None;
        self.encoder(device)
    }
}

/// A hook consulted before every submission: the place where a power policy (battery level,
/// temperature) may sleep before more work reaches the GPU. While a gate is installed, the
/// work recorded in a step goes out in submissions of at most [`GATED_BATCH`] dispatches, each
/// waited for before the next, so that one long step (a slow phone GPU, a large model) is held
/// back too, not only the gaps between steps.
pub trait SubmitGate: Send + Sync {
    fn before_submit(&self, dispatches: usize);
}

/// Most dispatches in one submission while a [`SubmitGate`] is installed (without one, a step
/// is recorded into as few submissions as its reads and writes allow).
pub const GATED_BATCH: usize = 64;

impl Gpu {
    /// Record one dispatch. `buffers[i]` is bound at `@binding(i + 1)`, the uniform `params`
    /// at `@binding(0)`. `None` leaves a binding out, for entry points that do not use it.
    pub fn dispatch(
        &self,
        key: &KernelKey,
        buffers: &[Option<Bind<'_>>],
        params: &[u8],
        groups: [u32; 3],
    ) -> Result<()> {
        self.record(key, buffers, None, params, groups, &[])
    }

    /// [`Self::dispatch`] with a texture bound after the buffers, at `@binding(buffers.len() +
    /// 1)` (the `subgroup-uniform` matmul reads B from [`Self::scratch_texture`]).
    pub fn dispatch_with_texture(
        &self,
        key: &KernelKey,
        buffers: &[Option<Bind<'_>>],
        texture: &wgpu::TextureView,
        params: &[u8],
        groups: [u32; 3],
    ) -> Result<()> {
        self.record(key, buffers, Some(texture), params, groups, &[])
    }

    /// The device's one RGBA32F texture that kernels read and copies fill
    /// ([`Self::copy_to_texture`]), at least `width` x `height` texels: made at first use and
    /// remade larger when a use needs more, so that it is held once, not once per product
    /// (the GPU runs the copies and the reads in the order recorded). At most 2,048 x 512
    /// texels (16 MiB) as the `subgroup-uniform` matmul uses it; not in the pool's memory
    /// report. `None` while planning (nothing is made then).
    pub fn scratch_texture(&self, width: u32, height: u32) -> Option<(wgpu::Texture, wgpu::TextureView)> {
        if self.pool.planning() {
            return None;
        }
        let mut held = self.texture.lock();
        if let Some((t, v)) = held.as_ref() {
            if t.width() >= width && t.height() >= height {
                return Some((t.clone(), v.clone()));
            }
        }
        let (width, height) =
            held.as_ref().map_or((width, height), |(t, _)| (t.width().max(width), t.height().max(height)));
        let texture = rgba_texture(&self.device, width, height, "scratch texture");
        let view = texture.create_view(&Default::default());
        *held = Some((texture.clone(), view.clone()));
        Some((texture, view))
    }

    /// Record a copy of `height` rows of `width` RGBA32F texels from `src` (rows of `width x 16`
    /// bytes, a multiple of 256) into the top-left of `texture`.
    pub fn copy_to_texture(&self, src: Bind<'_>, texture: &wgpu::Texture, width: u32, height: u32) {
        if self.pool.planning() {
            return;
        }
        let mut pending = self.pending.lock();
        let encoder = pending.copy_encoder(&self.device);
        encoder.copy_buffer_to_texture(
            wgpu::TexelCopyBufferInfo {
                buffer: src.buffer,
                layout: wgpu::TexelCopyBufferLayout {
                    offset: src.offset,
                    bytes_per_row: Some(width * 16),
                    rows_per_image: Some(height),
                },
            },
            wgpu::TexelCopyTextureInfo {
                texture,
                mip_level: 0,
                origin: wgpu::Origin3d::ZERO,
                aspect: wgpu::TextureAspect::All,
            },
            wgpu::Extent3d { width, height, depth_or_array_layers: 1 },
        );
    }

    /// [`Self::dispatch`] with some of the uniform's 4-byte fields taken from GPU buffers when
    /// the dispatch runs, not from the host: each patch `(from, field)` copies the 4 bytes at
    /// `from` over the bytes of `params` at offset `field`, just before the dispatch (the
    /// host's parameters are written before the submission's commands run). This is how a
    /// decision made on the GPU reaches a kernel without a read-back or another storage
    /// binding: AdamW's `skip`, from a step's status (`kernels::optim`).
    pub fn dispatch_patched(
        &self,
        key: &KernelKey,
        buffers: &[Option<Bind<'_>>],
        params: &[u8],
        groups: [u32; 3],
        patches: &[(Bind<'_>, u64)],
    ) -> Result<()> {
        self.record(key, buffers, None, params, groups, patches)
    }

    /// Every dispatch's recording: [`Self::dispatch_patched`] with an optional texture.
    fn record(
        &self,
        key: &KernelKey,
        buffers: &[Option<Bind<'_>>],
        texture: Option<&wgpu::TextureView>,
        params: &[u8],
        groups: [u32; 3],
        patches: &[(Bind<'_>, u64)],
    ) -> Result<()> {
        if groups.contains(&0) || self.pool.planning() {
            return Ok(());
        }
        let max = self.max_workgroups();
        if groups.iter().any(|&g| g > max) {
            return Err(Error::Internal {
                context: key.label(),
                message: format!("dispatch {groups:?} exceeds {max} workgroups per dimension"),
            });
        }
        let start = std::time::Instant::now();
        let pipeline = self.pipeline(key)?;
        let label = key.label();
        let mut pending = self.pending.lock();
        let slot = pending.dispatches as u64;
        let (uniform, offset) = pending.uniforms.push(&self.device, slot, params);
        for (from, field) in patches {
            assert!(field + 4 <= params.len() as u64, "patch past the uniform's end");
            let encoder = pending.copy_encoder(&self.device);
            encoder.copy_buffer_to_buffer(from.buffer, from.offset, &uniform, offset + field, 4);
        }
        // Only the pool's buffers are cached for: the pool holds them anyway, and drops the
        // cache before it gives any back (see `binds`). A texture bound is the device's scratch
        // texture, which lives as long as the device (a cached group keeps a replaced one alive
        // until the cache is next emptied).
        let cacheable =
            buffers.iter().flatten().all(|b| b.buffer == &self.dummy || self.pool.knows(b.buffer));
        let bind_key = cacheable.then(|| binds::BindKey {
            pipeline: pipeline.pipeline.clone(),
            slot,
            buffers: buffers.iter().map(|b| b.map(|b| (b.buffer.clone(), b.offset, b.size))).collect(),
            texture: texture.cloned(),
        });
        let bind_group = match bind_key.as_ref().and_then(|k| self.binds.get(k)) {
            Some(group) => group,
            None => {
                let size = wgpu::BufferSize::new(binds::SLOT);
                let mut entries = vec![wgpu::BindGroupEntry {
                    binding: 0,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: &uniform,
                        offset,
                        size,
                    }),
                }];
                for (i, b) in buffers.iter().enumerate() {
                    if let Some(b) = b {
                        let resource = if b.whole() {
                            b.buffer.as_entire_binding()
                        } else {
                            wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                buffer: b.buffer,
                                offset: b.offset,
                                size: wgpu::BufferSize::new(b.size),
                            })
                        };
                        entries.push(wgpu::BindGroupEntry { binding: i as u32 + 1, resource });
                    }
                }
                if let Some(view) = texture {
                    let resource = wgpu::BindingResource::TextureView(view);
                    entries.push(wgpu::BindGroupEntry { binding: buffers.len() as u32 + 1, resource });
                }
                // No error scope of its own: popping one per dispatch blocked the host on the
                // driver every time. A bad bind group is reported through the device's error
                // sink, labelled with the kernel, and becomes an `Error` at the submission's
                // check (`Self::check`).
                let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some(&label),
                    layout: &pipeline.layout,
                    entries: &entries,
                });
                self.stats.bind_group();
                if let Some(k) = bind_key {
                    self.binds.insert(k, group.clone());
                }
                group
            }
        };
        if pending.pass.is_none() {
            let pass = pending.encoder(&self.device).begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("step"),
                timestamp_writes: None,
            });
            pending.pass = Some(pass.forget_lifetime());
        }
        let pass = pending.pass.as_mut().expect("opened above");
        pass.set_pipeline(&pipeline.pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        pending.dispatches += 1;
        pending.kernels.push((key.shader, key.entry));
        self.stats.dispatch(start);
        if pending.dispatches >= GATED_BATCH && self.gate.lock().is_some() {
            self.submit_locked(&mut pending);
        }
        Ok(())
    }

    /// Record a buffer-to-buffer copy into the pending encoder (offsets within each range).
    pub fn copy<'a, 'b>(
        &self,
        src: impl Into<Bind<'a>>,
        src_off: u64,
        dst: impl Into<Bind<'b>>,
        dst_off: u64,
        bytes: u64,
    ) {
        if self.pool.planning() {
            return;
        }
        let (src, dst) = (src.into(), dst.into());
        let (src, src_off, dst, dst_off) =
            (src.buffer, src.offset + src_off, dst.buffer, dst.offset + dst_off);
        let mut pending = self.pending.lock();
        let encoder = pending.copy_encoder(&self.device);
        encoder.copy_buffer_to_buffer(src, src_off, dst, dst_off, bytes);
    }

    /// Submit everything recorded so far (after the submit gate, if one is set).
    pub fn flush(&self) -> Result<()> {
        let mut pending = self.pending.lock();
        self.submit_locked(&mut pending);
        drop(pending);
        self.check("submit")
    }

    /// Submit while holding the pending lock, so that no host write can be queued between
    /// taking the encoder and submitting it (it would run before commands recorded earlier).
    pub(super) fn submit_locked(&self, pending: &mut Pending) -> Option<wgpu::SubmissionIndex> {
        pending.pass = None; // ends the pass, so that the encoder can finish
        let encoder = pending.encoder.take()?;
        let dispatches = std::mem::take(&mut pending.dispatches);
        let gate = self.gate.lock().clone();
        if let Some(gate) = &gate {
            gate.before_submit(dispatches);
        }
        self.unchecked.lock().extend(pending.kernels.drain(..));
        // wgpu encodes a recorded pass into driver commands at `finish`: recording time too
        let start = std::time::Instant::now();
        pending.uniforms.upload(&self.queue);
        let commands = encoder.finish();
        let submit = std::time::Instant::now();
        let index = self.queue.submit([commands]);
        self.stats.submit(submit);
        self.stats.record(start);
        if gate.is_some() {
            // Gated (throttled): each batch finishes before the next is recorded, so the gate's
            // host clock measures the GPU's work, and a long step is spread out, not queued at
            // once with its whole throttle owed at its end.
            let _ = self.wait_for(Some(index.clone()), "submit");
        }
        if pending.staged > 0 {
            // a submission carries the staged writes with it
            let staged = std::mem::take(&mut pending.staged);
            pending.ring.push_back((index.clone(), staged));
        }
        self.stats.submission();
        Some(index)
    }

    /// Wait until the GPU has finished everything submitted.
    pub fn sync(&self) -> Result<()> {
        self.flush()?;
        self.wait_for(None, "poll")?;
        self.check("wait")
    }

    /// Turn errors captured since the last check into an [`Error`]. Dispatches have no error
    /// scope of their own (a blocking pop each): what went wrong in a submission is found
    /// here, after it, and the error names the kernels submitted since the last check beside
    /// wgpu's message (which names a bad bind group's kernel by its label).
    pub fn check(&self, context: &str) -> Result<()> {
        let kernels = std::mem::take(&mut *self.unchecked.lock());
        if let Some(lost) = self.lost_error() {
            return Err(lost);
        }
        let errors = std::mem::take(&mut *self.errors.lock());
        let context = match kernels.len() {
            0 => context.to_string(),
            n => {
                let names: Vec<String> = kernels.iter().take(16).map(|(s, e)| format!("{s}::{e}")).collect();
                let more = if n > 16 { format!(" and {} more", n - 16) } else { String::new() };
                format!("{context} (kernels submitted since the last check: {}{more})", names.join(", "))
            }
        };
        match errors.first() {
            None => Ok(()),
            Some(e) if e.starts_with("out of memory") => Err(Error::OutOfMemory { context }),
            Some(_) => Err(Error::Validation { context, message: errors.join("\n") }),
        }
    }

    /// [`Error::DeviceLost`] if the device is gone. Polls first: the driver reports a loss
    /// through a callback that runs while the device is polled.
    fn lost_error(&self) -> Option<Error> {
        let _ = self.device.poll(wgpu::PollType::Poll);
        self.lost.lock().clone().map(|(reason, message)| Error::DeviceLost { reason, message })
    }

    /// A validation error from an error scope, unless the device is lost (which makes every
    /// object invalid, and is the error worth reporting).
    pub(super) fn scope_error(&self, context: String, e: wgpu::Error) -> Error {
        self.lost_error().unwrap_or(Error::Validation { context, message: e.to_string() })
    }
}

/// An RGBA32F texture of `width x height` texels that kernels read (`textureLoad`) and copies
/// fill: texel (n / 4, k) of B holds 4 adjacent columns, as `matmul_pack_b` lays it out. Public
/// for the probes in `benches/`, which time the same texture on a device of their own.
pub fn rgba_texture(device: &wgpu::Device, width: u32, height: u32, label: &str) -> wgpu::Texture {
    device.create_texture(&wgpu::TextureDescriptor {
        label: Some(label),
        size: wgpu::Extent3d { width, height, depth_or_array_layers: 1 },
        mip_level_count: 1,
        sample_count: 1,
        dimension: wgpu::TextureDimension::D2,
        format: wgpu::TextureFormat::Rgba32Float,
        usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
        view_formats: &[],
    })
}
