//! The flat layout of the trained parameters on the GPU (see the parent module's doc): the
//! shared buffers, each parameter's views into them, and when the layout is made, kept or
//! dropped.

use super::{Param, ParamId, ParamStore};
use crate::error::Result;
use crate::gpu::Tensor;
use crate::graph::{Device, Value};
use std::sync::Arc;

/// The flat layout of the trained parameters on the GPU (see the module's doc): `ids` in the
/// order they are laid out, each at `places` (shared buffer, element offset); `value`, `grad`
/// and the moments are (n, 1) tensors whose chunks are the shared buffers (`segments`: each
/// one's first element and length), all with the same chunks, each parameter at the same place
/// in each. The moments are made at the first update, as they are without the layout. Space
/// between parameters (each starts at the storage offset alignment) holds zeros, which AdamW
/// leaves zero and which add nothing to the gradient norm.
pub(super) struct Flat {
    ids: Vec<ParamId>,
    places: Vec<(usize, usize)>,
    segments: Vec<(usize, usize)>,
    pub(super) value: Tensor,
    pub(super) grad: Tensor,
    pub(super) moments: Option<(Tensor, Tensor)>,
}

/// What a role of the flat layout takes from a parameter: its value, gradient, m or v.
type Slot = fn(&mut Param) -> Option<&mut Value>;

/// Shared buffers of `segments`, zero.
fn flat_buffers(
    gpu: &crate::gpu::Gpu,
    segments: &[(usize, usize)],
    what: &str,
    category: crate::gpu::Category,
) -> Result<Tensor> {
    let _c = category.enter(); // memory report
    let mut chunks = Vec::with_capacity(segments.len());
    for &(start, len) in segments {
        let buf = Arc::new(gpu.alloc((len * 4) as u64, what)?);
        chunks.push(crate::gpu::Chunk::part(start, len, buf, 0, (len * 4) as u64));
    }
    let total = segments.last().map_or(0, |&(s, l)| s + l);
    let t = Tensor::from_chunks(&[total, 1], chunks);
    crate::kernels::elementwise::fill(gpu, &t, 0.0)?;
    Ok(t)
}

/// A tensor of `shape` at `place` (shared buffer, element offset) of `flat`.
fn flat_view(flat: &Tensor, (seg, at): (usize, usize), shape: &[usize]) -> Tensor {
    let (store, _) = flat.chunks()[seg].store();
    let n: usize = shape.iter().product();
    let rows = n / shape.last().copied().unwrap_or(1).max(1);
    let chunk = crate::gpu::Chunk::part(0, rows, store.clone(), (at * 4) as u64, (n * 4) as u64);
    Tensor::from_chunks(shape, vec![chunk])
}

/// Copy each parameter's tensor of one role into `flat` and put the view in its place (the
/// tensor's own buffer goes back to the driver); a role's tensor not made yet is made there
/// (zero) by `make`.
fn move_into(
    gpu: &crate::gpu::Gpu,
    params: &mut [Param],
    flat: &Flat,
    into: &Tensor,
    slot: Slot,
    make: fn(&mut Param, Tensor),
) -> Result<()> {
    for (id, &place) in flat.ids.iter().zip(&flat.places) {
        let p = &mut params[id.0];
        let new = flat_view(into, place, &p.shape.clone());
        match slot(p) {
            Some(Value::Gpu(old)) => {
                let bytes = (old.numel() * 4) as u64;
                gpu.copy(old.single("flat layout")?, 0, new.single("flat layout")?, 0, bytes);
                std::mem::replace(old, new).discard(); // no later request asks for its size
            }
            Some(_) => unreachable!("candidates hold GPU values"),
            None => make(p, new),
        }
    }
    Ok(())
}

impl ParamStore {
    /// Lay the trained parameters out flat on the GPU at the next update (the default, unless
    /// `POCKETTUNE_FLAT=off`), or keep one buffer per tensor.
    pub fn set_flat(&mut self, on: bool) {
        self.flat_on = on;
        self.flat = None;
    }
    /// Cap each shared buffer of the flat layout at `bytes` (tests use it to make a small model
    /// span several).
    #[doc(hidden)]
    pub fn set_flat_buffer_limit(&mut self, bytes: u64) {
        self.flat_limit = Some(bytes);
        self.flat = None;
    }
    /// The flat layout's shared buffers: how many (per role: values, gradients, m, v), how
    /// many parameters they hold, and the bytes of each (0, 0, [] when the parameters are not
    /// laid out flat).
    pub fn flat_layout(&self) -> (usize, usize, Vec<u64>) {
        self.flat.as_ref().map_or((0, 0, Vec::new()), |f| {
            (f.value.chunks().len(), f.ids.len(), f.value.chunks().iter().map(|c| c.bytes()).collect())
        })
    }

    /// Which parameters the flat layout holds (by index).
    pub(super) fn flat_members(&self) -> Vec<bool> {
        let mut laid = vec![false; self.params.len()];
        for id in self.flat.iter().flat_map(|f| &f.ids) {
            laid[id.0] = true;
        }
        laid
    }

    /// The device gradients to clip: the flat layout's buffers, then every gradient outside it.
    pub(super) fn device_grads(&self) -> Vec<&Tensor> {
        let laid = self.flat_members();
        let flat = self.flat.iter().map(|f| &f.grad);
        let rest = self.params.iter().zip(&laid).filter(|(_, &l)| !l).filter_map(|(p, _)| p.grad.as_ref());
        flat.chain(rest.map(Value::gpu)).collect()
    }

    /// The parameters the flat layout would hold now: trained, resident on the GPU, unchunked
    /// (a tensor larger than one binding stays on its own; its gradient and moments, of the
    /// same shape, are unchunked too).
    fn flat_candidates(&self) -> Vec<ParamId> {
        self.iter()
            .filter(|(_, p)| p.trainable && !p.on_host())
            .filter(|(_, p)| matches!(&p.value, Value::Gpu(t) if !t.is_chunked()))
            .map(|(id, _)| id)
            .collect()
    }

    /// Whether the flat layout still holds exactly `ids`, each parameter's tensors still its
    /// views (a backward pass hands the same gradient back; anything that gives a parameter a
    /// buffer of its own drops the layout).
    fn flat_holds(&self, ids: &[ParamId]) -> bool {
        let Some(flat) = &self.flat else { return false };
        let inside = |t: &Tensor, of: &Tensor| {
            let (store, _) = t.chunks()[0].store();
            of.chunks().iter().any(|c| Arc::ptr_eq(c.store().0, store))
        };
        let held = |t: Option<&Value>, of: &Tensor| matches!(t, Some(Value::Gpu(t)) if inside(t, of));
        flat.ids == ids
            && ids.iter().all(|id| {
                let p = &self.params[id.0];
                let moments = match (&p.moments, &flat.moments) {
                    (Some((pm, pv)), Some((m, v))) => held(Some(pm), m) && held(Some(pv), v),
                    (None, None) => true,
                    _ => false,
                };
                held(Some(&p.value), &flat.value) && held(p.grad.as_ref(), &flat.grad) && moments
            })
    }

    /// Lay the trained parameters out flat (see [`Flat`]) unless they are already, or there is
    /// nothing to gain (fewer than two), or it is off (`POCKETTUNE_FLAT=off`, moments offloaded,
    /// parameters on the host), or a planning step is running; with `moments` (the update),
    /// the moments too. Called before the first backward pass ([`Self::zero_grads`]), only the
    /// values exist: they are copied in (held twice while they move, when nothing else is
    /// live), and the gradients are made in place, zero; the moments are made in place at the
    /// first update, as they are without the layout, so the step holds what the budget
    /// planner counted for it. Whatever exists already (moments restored from a checkpoint,
    /// gradients of a caller that did not zero them first) is copied in, one role at a time.
    /// The tensors' own buffers go back to the driver.
    pub(super) fn lay_out_flat(&mut self, moments: bool) -> Result<()> {
        let Device::Gpu(gpu) = &self.dev else { return Ok(()) };
        if !self.flat_on || gpu.planning() || self.offload.is_some() || self.has_host_params() {
            self.flat = None;
            return Ok(());
        }
        let ids = self.flat_candidates();
        if !self.flat_holds(&ids) {
            self.flat = None;
            if ids.len() < 2 {
                return Ok(());
            }
            // Where each parameter goes: (buffer, element offset), each at the storage offset
            // alignment, none across a buffer's end.
            let align = (gpu.limits().min_storage_buffer_offset_alignment.max(256) / 4) as usize;
            let limit = self.flat_limit.unwrap_or(u64::MAX).min(gpu.max_binding());
            let capacity = (limit / 4) as usize / align * align;
            let mut places = Vec::with_capacity(ids.len());
            let mut ends = vec![0usize];
            for id in &ids {
                let n = self.params[id.0].shape.iter().product::<usize>().max(1);
                if ends[ends.len() - 1] + n > capacity && ends[ends.len() - 1] > 0 {
                    ends.push(0);
                }
                let (buffer, at) = (ends.len() - 1, ends[ends.len() - 1]);
                places.push((buffer, at));
                ends[buffer] = (at + n).next_multiple_of(align);
            }
            let mut segments = Vec::with_capacity(ends.len());
            let mut start = 0;
            for len in ends {
                segments.push((start, len));
                start += len;
            }
            // Under `--memory-budget` the move holds one of the values, gradients or moments
            // twice for a moment, which the planner (one buffer per tensor) did not count: the
            // layout is made only where that fits now, and the parameters stay one buffer per
            // tensor otherwise.
            if let Some(budget) = gpu.memory_budget() {
                let flat_bytes = (start * 4) as u64;
                let grads = ids.iter().any(|id| self.params[id.0].grad.is_some());
                let moving = flat_bytes * if grads { 2 } else { 1 };
                if gpu.bytes_live().0 + moving + flat_bytes > budget {
                    return Ok(());
                }
            }
            use crate::gpu::Category;
            // The values, then the gradients: one of them held twice at a time while it moves.
            let value = flat_buffers(gpu, &segments, "parameters (flat)", Category::Weights)?;
            let grad = Tensor::from_chunks(&[0, 1], Vec::new()); // made below
            let mut flat = Flat { ids, places, segments, value, grad, moments: None };
            move_into(gpu, &mut self.params, &flat, &flat.value, |p| Some(&mut p.value), |_, _| {})?;
            let grad = flat_buffers(gpu, &flat.segments, "gradients (flat)", Category::Gradients)?;
            move_into(
                gpu,
                &mut self.params,
                &flat,
                &grad,
                |p| p.grad.as_mut(),
                |p, g| {
                    p.grad = Some(Value::Gpu(g));
                    p.stale = true; // written, not added to, by the first backward step
                },
            )?;
            flat.grad = grad;
            self.flat = Some(flat);
        }
        // The moments, at the first update (or now, when some exist already: restored from a
        // checkpoint, they move in like the rest).
        let Some(mut flat) = self.flat.take() else { return Ok(()) };
        let have = flat.ids.iter().any(|id| self.params[id.0].moments.is_some());
        let made = if flat.moments.is_none() && (moments || have) {
            flat_moments(gpu, &mut self.params, &flat)
        } else {
            Ok(None)
        };
        // Kept on an error too: the values and gradients are views into it.
        let made = made.map(|m| flat.moments = m.or(flat.moments.take()));
        self.flat = Some(flat);
        made
    }
}

/// The AdamW moments of the flat layout: m, then v, so that only one of them is held twice
/// while it moves. A parameter with no moments gets zero views; one with both moves both in.
fn flat_moments(
    gpu: &crate::gpu::Gpu,
    params: &mut [Param],
    flat: &Flat,
) -> Result<Option<(Tensor, Tensor)>> {
    use crate::gpu::Category;
    let mut made = Vec::with_capacity(2);
    let mut views: Vec<Vec<Tensor>> = Vec::with_capacity(2);
    for (i, what) in ["adam m (flat)", "adam v (flat)"].into_iter().enumerate() {
        let to = flat_buffers(gpu, &flat.segments, what, Category::OptimizerState)?;
        let mut these = Vec::with_capacity(flat.ids.len());
        for (id, &place) in flat.ids.iter().zip(&flat.places) {
            let p = &mut params[id.0];
            let new = flat_view(&to, place, &p.shape);
            match &mut p.moments {
                None => these.push(new),
                Some((Value::Gpu(m), Value::Gpu(v))) => {
                    let old = if i == 0 { m } else { v };
                    let bytes = (old.numel() * 4) as u64;
                    gpu.copy(old.single("flat layout")?, 0, new.single("flat layout")?, 0, bytes);
                    std::mem::replace(old, new).discard();
                }
                Some(_) => unreachable!("moments of a GPU parameter are on the GPU"),
            }
        }
        views.push(these);
        made.push(to);
    }
    let (vs, ms) = (views.pop().unwrap_or_default(), views.pop().unwrap_or_default());
    let bare = flat.ids.iter().filter(|id| params[id.0].moments.is_none()).map(|id| id.0);
    for ((id, m), v) in bare.collect::<Vec<_>>().into_iter().zip(ms).zip(vs) {
        params[id].moments = Some((Value::Gpu(m), Value::Gpu(v)));
    }
    let v = made.pop().expect("two made");
    Ok(Some((made.pop().expect("two made"), v)))
}
