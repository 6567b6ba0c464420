//! One step's execution of a recorded graph: the forward pass's values and saved state, the
//! backward pass in reverse order, activations freed after their last use, checkpointed
//! segments recomputed, and streamed weights uploaded a layer ahead.

use super::{
    category, ops, params, profile, stream, CpuPath, Device, Graph, Op, ParamId, ParamStore, Value, Var,
};
use crate::error::{Error, Result};

/// The state of one forward pass, ready for its backward pass.
pub struct Run<'g> {
    pub(super) graph: &'g Graph,
    pub(super) dev: Device,
    pub(super) fed: ops::Fed,
    pub(super) values: Vec<Option<Value>>,
    /// per node: what its backward needs beyond its inputs (norm statistics, attention
    /// probabilities, cross-entropy state)
    pub(super) saved: Vec<Option<Value>>,
    /// values the caller asked to keep (never freed by the backward pass either)
    pub(super) keep: Vec<Var>,
    /// per node, its checkpointed segment (see [`Graph::mark_layer_input`])
    pub(super) segment: Vec<Option<usize>>,
    /// segments recomputed by this backward pass so far
    pub(super) done_segments: Vec<usize>,
    /// when weights stream: their schedule, and the ones uploaded now
    pub(super) residency: Option<stream::Residency>,
    pub(super) resident: stream::Resident,
    /// the 16-bit format activations are held in between the passes (`--activations`)
    pub(super) half: Option<crate::kernels::half::HalfFormat>,
}

impl Run<'_> {
    /// Upload the streamed weights node `i` reads (its forward step, or its backward step), and
    /// those of the next layer in that direction when `i` opens a layer.
    pub(super) fn stream_in(&mut self, store: &ParamStore, i: usize, forward: bool) -> Result<()> {
        let (Some(r), Device::Gpu(gpu)) = (&self.residency, &self.dev) else { return Ok(()) };
        let now = if forward { r.forward_reads(i) } else { r.backward_reads(i) };
        self.resident.ensure(gpu, store, now)?;
        let opens = if forward { r.starts_layer(i) } else { r.ends_layer(i) };
        if opens {
            self.resident.ensure(gpu, store, &r.ahead(i, forward))?;
        }
        Ok(())
    }

    /// How many streamed weights are uploaded now (none once the backward pass is done).
    pub fn streamed_resident(&self) -> usize {
        self.resident.len()
    }

    /// The uploaded copy of a streamed weight (for the ops).
    pub(crate) fn resident(&self, id: ParamId) -> Option<&Value> {
        self.resident.get(id)
    }

    /// Compute node `i` and free the inputs whose last forward use it was, unless `needed`
    /// (by a backward step) or kept.
    pub(super) fn forward_node(
        &mut self,
        store: &ParamStore,
        i: usize,
        last_forward: &[usize],
        needed: impl Fn(usize) -> bool,
    ) -> Result<()> {
        let g = self.graph;
        if let Op::Param(_) = g.nodes[i].op {
            return Ok(()); // read from the store when used
        }
        let _c = category::forward(g, i).enter(); // memory report: what the buffers hold
        let what = || format!("{} forward {:?}", g.nodes[i].op.name(), g.shapes[i]);
        let dev = self.dev.clone();
        let (value, saved) = profile::timed(&dev, what, || ops::forward(self, store, i))?;
        self.values[i] = Some(value);
        self.saved[i] = saved;
        for v in &g.nodes[i].inputs {
            let freeable = last_forward[v.0] == i && !needed(v.0) && !self.keep.contains(v);
            if freeable && !matches!(g.nodes[v.0].op, Op::Param(_)) {
                Value::recycle(&self.dev, self.values[v.0].take());
            }
        }
        Ok(())
    }

    /// Hold in 16 bits (`self.half`) the inputs of node `i` that no later forward step reads
    /// and a backward step will (`held`), unless kept for the caller: on the GPU by
    /// `kernels::half`, on a CPU path in host memory by `cpu::half` (the same values). A
    /// parameter has no value in the run (the store holds it), and an input read twice by the
    /// node is held already at its second turn: both fall through.
    pub(super) fn narrow_inputs(
        &mut self,
        i: usize,
        last_forward: &[usize],
        held: impl Fn(usize) -> bool,
    ) -> Result<()> {
        let Some(format) = self.half else { return Ok(()) };
        let g = self.graph;
        for v in &g.nodes[i].inputs {
            if last_forward[v.0] != i || !held(v.0) || self.keep.contains(v) {
                continue;
            }
            match (&mut self.values[v.0], &self.dev) {
                (Some(Value::Gpu(t)), Device::Gpu(gpu)) => {
                    let _c = category::forward(g, v.0).enter();
                    let h = crate::kernels::half::pack(gpu, t, format)?;
                    Value::recycle(&self.dev, self.values[v.0].replace(Value::Half(h)));
                }
                (Some(Value::Cpu(x)), Device::Cpu(_)) => {
                    // the f32 buffer goes back to the allocator, not to the fast path's pool:
                    // the point is to hold less
                    let bits = crate::cpu::half::narrow(x, format);
                    self.values[v.0] = Some(Value::HalfHost(bits, format));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Value `v` back in f32 if it is held in 16 bits (before a step that reads it).
    fn widen(&mut self, v: Var) -> Result<()> {
        let wide = match (&self.values[v.0], &self.dev) {
            (Some(Value::Half(h)), Device::Gpu(gpu)) => Value::Gpu(crate::kernels::half::unpack(gpu, h)?),
            (Some(Value::HalfHost(bits, format)), _) => {
                let mut out = match self.dev {
                    Device::Cpu(CpuPath::Fast) => crate::cpu::pool::take(bits.len()),
                    _ => vec![0f32; bits.len()],
                };
                crate::cpu::half::widen(&mut out, bits, *format);
                Value::Cpu(out)
            }
            _ => return Ok(()),
        };
        self.values[v.0] = Some(wide);
        Ok(())
    }

    /// Run segment `k`'s forward pass again from its kept input, keeping what its backward
    /// steps read (the values and saved state that checkpointing dropped).
    fn recompute(&mut self, store: &ParamStore, k: usize) -> Result<()> {
        let g = self.graph;
        let (first, last) = (g.layer_inputs[k].0 + 1, g.layer_inputs[k + 1].0);
        let mut last_forward = vec![0usize; g.nodes.len()];
        for i in first..=last {
            for v in &g.nodes[i].inputs {
                last_forward[v.0] = i;
            }
        }
        // what the segment's own backward steps read (later segments are done already)
        let mut needed = vec![false; g.nodes.len()];
        for j in first..=last {
            let op = &g.nodes[j].op;
            if g.requires_grad[j] {
                needed[j] |= op.backward_reads_output();
                for (idx, v) in g.nodes[j].inputs.iter().enumerate() {
                    needed[v.0] |= op.backward_reads(idx);
                }
            }
        }
        let key = stream::Residency::recompute_key(g.nodes.len(), last);
        for i in first..=last {
            if let (Some(r), Device::Gpu(gpu)) = (&self.residency, &self.dev) {
                self.resident.ensure(gpu, store, r.forward_reads(i))?;
            }
            for &v in &g.nodes[i].inputs {
                self.widen(v)?;
            }
            self.forward_node(store, i, &last_forward, |v| needed[v])?;
        }
        if let Some(r) = &self.residency {
            let done: Vec<_> = (first..=last)
                .flat_map(|i| r.forward_reads(i).iter().copied())
                .filter(|&id| r.release_after(id, key, false))
                .collect();
            done.into_iter().for_each(|id| self.resident.release(id));
        }
        for (i, value) in self.values.iter_mut().enumerate().take(last + 1).skip(first) {
            if !needed[i] && !self.keep.contains(&Var(i)) {
                *value = None; // e.g. the layer's output, made again only to feed others
            }
        }
        self.done_segments.push(k);
        Ok(())
    }
}

impl Run<'_> {
    /// A value kept by the forward pass (read back; a synchronisation point).
    pub fn read(&self, v: Var) -> Result<Vec<f32>> {
        match &self.values[v.0] {
            Some(x) => x.to_host(&self.dev),
            None => Err(Error::InvalidArgument {
                name: "var".into(),
                detail: "that value was freed; pass it in `keep` to forward()".into(),
            }),
        }
    }

    /// How many activations the run holds now (those the backward pass still needs).
    pub fn live_values(&self) -> usize {
        self.values.iter().filter(|v| v.is_some()).count()
    }

    /// The scalar value of `loss` (a synchronisation point).
    pub fn loss(&self, loss: Var) -> Result<f32> {
        Ok(self.read(loss)?[0])
    }

    /// Add the value of `loss` to `step` (`ParamStore::begin_step`): on the GPU with nothing
    /// read back, where the step's update is decided there.
    pub fn add_loss(&self, loss: Var, step: &mut params::PendingStep) -> Result<()> {
        let on_gpu = match &self.values[loss.0] {
            Some(Value::Gpu(t)) => Some(t),
            _ => None,
        };
        step.add_loss(&self.dev, on_gpu, || self.loss(loss))
    }

    /// Backward from the scalar `loss` with d(output)/d(loss) = `scale` (1 / micro-batches when
    /// accumulating). Parameter gradients are added to the store's gradient buffers.
    pub fn backward(&mut self, store: &mut ParamStore, loss: Var, scale: f32) -> Result<()> {
        let g = self.graph;
        if !matches!(g.nodes[loss.0].op, Op::CrossEntropy { .. } | Op::LinearCrossEntropy { .. }) {
            return Err(Error::InvalidArgument {
                name: "loss".into(),
                detail: "backward starts at a cross-entropy".into(),
            });
        }
        let n = g.nodes.len();
        // The earliest node whose backward reads each value: after it, the value can go.
        let mut first_backward = vec![usize::MAX; n];
        for (i, node) in g.nodes.iter().enumerate() {
            if g.requires_grad[i] && node.op.backward_reads_output() {
                first_backward[i] = first_backward[i].min(i);
            }
            for (j, v) in node.inputs.iter().enumerate() {
                if g.requires_grad[i] && node.op.backward_reads(j) {
                    first_backward[v.0] = first_backward[v.0].min(i);
                }
            }
        }
        let mut grads: Vec<Option<Value>> = (0..n).map(|_| None).collect();
        // Gradients of parameters on the host go there as the pass leaves each layer.
        let layers = g.layer_ranges();
        let layer_of = |i: usize| layers.iter().position(|&(a, b)| (a..=b).contains(&i));
        let mut layer = None;
        for i in (0..=loss.0).rev() {
            let node = &g.nodes[i];
            if !g.requires_grad[i] || matches!(node.op, Op::Param(_)) {
                continue;
            }
            let dout = if i == loss.0 { None } else { grads[i].take() };
            if dout.is_none() && i != loss.0 {
                continue; // does not reach the loss
            }
            if layer_of(i) != layer {
                store.flush_grads()?;
                layer = layer_of(i);
            }
            let dev = self.dev.clone();
            profile::timed(&dev, || "weights streamed in".into(), || self.stream_in(store, i, false))?;
            if let Some(k) = self.segment[i] {
                if !self.done_segments.contains(&k) {
                    self.recompute(store, k)?;
                }
            }
            let _c = category::backward(g, i).enter();
            let dev = self.dev.clone();
            profile::timed(
                &dev,
                || "activations from 16 bits".into(),
                || {
                    for (j, &v) in node.inputs.iter().enumerate() {
                        if node.op.backward_reads(j) {
                            self.widen(v)?;
                        }
                    }
                    if node.op.backward_reads_output() {
                        self.widen(Var(i))?;
                    }
                    Ok(())
                },
            )?;
            let what = || format!("{} backward {:?}", node.op.name(), g.shapes[i]);
            profile::timed(&dev, what, || ops::backward(self, store, &mut grads, i, dout, scale))?;
            if let Some(r) = &self.residency {
                let key = r.key_backward(i);
                let done: Vec<_> = r
                    .backward_reads(i)
                    .iter()
                    .copied()
                    .filter(|&id| r.release_after(id, key, false))
                    .collect();
                done.into_iter().for_each(|id| self.resident.release(id));
            }
            Value::recycle(&self.dev, self.saved[i].take());
            for v in node.inputs.iter().chain([Var(i)].iter()) {
                if first_backward[v.0] == i && *v != loss && !self.keep.contains(v) {
                    Value::recycle(&self.dev, self.values[v.0].take());
                }
            }
        }
        store.settle_grads()?;
        store.flush_grads()
    }
}
