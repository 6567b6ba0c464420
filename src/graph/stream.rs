//! Streamed weights: a frozen weight that stays in the memory-mapped checkpoint (safetensors or
//! GGUF, in its stored format), or a trained weight kept in host memory (`params::Location::Host`),
//! until a node that reads it is about to run. The executor
//! ([`super::Run`]) uploads it then, ahead of use by one layer (the upload of layer l+1 is
//! written while layer l's work runs on the GPU; see `Gpu::write`'s staging ring), and releases
//! it after its last use in the forward pass; the backward pass streams it again, in reverse
//! layer order, for the products that read it (dX = dY W^T).
//!
//! The schedule is fixed by the graph: each streamed parameter's uses are known before the step
//! runs, as the (phase, order) of the forward steps, recomputations and backward steps that
//! read it ([`Residency`]).

use super::{Graph, Op, ParamId, ParamStore, Value};
use crate::error::Result;
use crate::gpu::{Gpu, QTensor, Tensor};
use crate::weights::Stored;
use kernels_ref::quant::GgmlType;
use std::collections::HashMap;
use std::sync::Arc;

/// A weight as the device stores it, fetched from the checkpoint.
pub enum DeviceForm {
    F32(Vec<f32>),
    /// ggml blocks, f16 or bf16, read by the quantized kernels
    Packed(GgmlType, Vec<u8>),
}

/// What to do with a weight's bytes, borrowed from the checkpoint's map: `(stored, device type)`
/// where the device type is None for f32.
/// where the device type is None for f32, and a function that lets the map's pages under some
/// of those bytes go once they are copied.
pub type Visit<'v> = &'v mut dyn FnMut(&Stored, Option<GgmlType>, &dyn Fn(&[u8])) -> Result<Value>;

/// Finds the weight in the checkpoint and hands its bytes to the visitor (then lets the map's
/// pages go: a weight read once per pass need not stay in the process's memory).
type Fetch = dyn Fn(Visit) -> Result<Value> + Send + Sync;

/// A frozen weight that lives in the checkpoint file, not on the device.
pub struct StreamedWeight {
    pub name: String,
    pub shape: Vec<usize>,
    /// the storage type on the device once uploaded
    pub ty: GgmlType,
    /// device bytes once uploaded
    pub bytes: u64,
    fetch: Box<Fetch>,
}

impl StreamedWeight {
    pub fn new(
        name: &str,
        shape: &[usize],
        ty: GgmlType,
        fetch: impl Fn(Visit) -> Result<Value> + Send + Sync + 'static,
    ) -> Self {
        let n: usize = shape.iter().product();
        let bytes = match ty {
            GgmlType::F32 => 4 * n as u64,
            t => (n / t.block_elems() * t.block_bytes()) as u64,
        };
        StreamedWeight { name: name.into(), shape: shape.to_vec(), ty, bytes, fetch: Box::new(fetch) }
    }

    /// Read from the checkpoint and upload: f32 bytes straight from the map (no host copy when
    /// they are aligned), a packed type as stored, anything else converted.
    pub fn upload(&self, gpu: &Gpu) -> Result<Value> {
        let (shape, name) = (&self.shape, &self.name);
        (self.fetch)(&mut |stored: &Stored, ty: Option<GgmlType>, release: &dyn Fn(&[u8])| {
            to_device(gpu, stored, ty, shape, name, release)
        })
    }

    /// Rows `v0..v0 + vl` of the (rows, columns) weight, uploaded as [`Self::upload`] would
    /// upload the whole: the fused LM head walks a streamed head this way, a vocabulary chunk at
    /// a time, so the whole table is never on the device.
    pub fn upload_rows(&self, gpu: &Gpu, v0: usize, vl: usize) -> Result<Value> {
        let _c = gpu.category(crate::gpu::Category::Weights);
        let shape = [vl, self.shape[1]];
        let name = format!("{} rows {v0}..{}", self.name, v0 + vl);
        if gpu.planning() {
            let part =
                StreamedWeight::new(&name, &shape, self.ty, |_| unreachable!("a stand-in is not read"));
            return part.stand_in(gpu);
        }
        (self.fetch)(&mut |stored: &Stored, ty: Option<GgmlType>, release: &dyn Fn(&[u8])| {
            let part = rows_of(stored, v0, vl);
            to_device(gpu, &part, ty, &shape, &name, release)
        })
    }

    /// The rows `ids` of the (rows, columns) weight as f32 on the host, `ids.len()` x columns
    /// (a look-up into a streamed embedding table: only the rows asked for are read).
    pub fn gather_rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let c = self.shape[1];
        let mut out = vec![0f32; ids.len() * c];
        (self.fetch)(&mut |stored: &Stored, _: Option<GgmlType>, _: &dyn Fn(&[u8])| {
            for (row, &id) in out.chunks_mut(c).zip(ids) {
                let one = rows_of(stored, id as usize, 1);
                kernels_ref::quant::dequantize(one.ty, &one.bytes, row);
            }
            Ok(Value::Cpu(Vec::new()))
        })?;
        Ok(out)
    }

    /// Buffers of the uploaded size, left unwritten (a planning step: `Gpu::plan`).
    fn stand_in(&self, gpu: &Gpu) -> Result<Value> {
        Ok(match self.ty {
            GgmlType::F32 => Value::Gpu(Tensor::empty(gpu, &self.shape, &self.name)?),
            ty => Value::Packed(QTensor::from_bytes(
                gpu,
                ty,
                &vec![0; self.bytes as usize],
                &self.shape,
                &self.name,
            )?),
        })
    }

    /// The values as f32, read from the checkpoint (exports and checks).
    pub fn to_host(&self) -> Result<Vec<f32>> {
        let host = (self.fetch)(&mut |stored: &Stored, ty: Option<GgmlType>, _: &dyn Fn(&[u8])| {
            Ok(match crate::models::device_form(stored, ty) {
                DeviceForm::F32(v) => Value::Cpu(v),
                DeviceForm::Packed(t, b) => {
                    let mut out = vec![0f32; self.shape.iter().product()];
                    kernels_ref::quant::dequantize(t, &b, &mut out);
                    Value::Cpu(out)
                }
            })
        })?;
        match host {
            Value::Cpu(v) => Ok(v),
            _ => unreachable!("the visitor above makes host values"),
        }
    }
}

/// `stored` on the device as `ty` says (None: f32).
fn to_device(
    gpu: &Gpu,
    stored: &Stored,
    ty: Option<GgmlType>,
    shape: &[usize],
    name: &str,
    release: &dyn Fn(&[u8]),
) -> Result<Value> {
    Ok(match (ty, stored.ty) {
        (None | Some(GgmlType::F32), GgmlType::F32) => {
            match bytemuck::try_cast_slice::<u8, f32>(&stored.bytes) {
                Ok(values) => Value::Gpu(upload_f32(gpu, values, shape, name, release)?),
                Err(_) => Value::Gpu(Tensor::from_host(gpu, &stored.to_f32(), shape, name)?),
            }
        }
        (None | Some(GgmlType::F32), _) => Value::Gpu(Tensor::from_host(gpu, &stored.to_f32(), shape, name)?),
        (Some(t), s) if t == s => Value::Packed(QTensor::from_bytes(gpu, t, &stored.bytes, shape, name)?),
        (Some(t), _) => match crate::models::device_form(stored, Some(t)) {
            DeviceForm::Packed(t, b) => Value::Packed(QTensor::from_bytes(gpu, t, &b, shape, name)?),
            DeviceForm::F32(v) => Value::Gpu(Tensor::from_host(gpu, &v, shape, name)?),
        },
    })
}

/// Rows `r0..r0 + n` of a stored (rows, columns) tensor, borrowed (a row is a whole number of
/// blocks in every stored type: ggml's rule).
fn rows_of<'s>(stored: &'s Stored, r0: usize, n: usize) -> Stored<'s> {
    let cols = stored.shape[1];
    let row = cols / stored.ty.block_elems() * stored.ty.block_bytes();
    Stored {
        shape: vec![n, cols],
        ty: stored.ty,
        bytes: std::borrow::Cow::Borrowed(&stored.bytes[r0 * row..(r0 + n) * row]),
    }
}

/// Upload f32 values read from the map in pieces of at most 16 MiB, letting each piece's pages
/// go once it is staged: a weight larger than the staging ring (Gemma's 1.2 GB embedding) then
/// never has all its pages resident at once.
fn upload_f32(
    gpu: &Gpu,
    values: &[f32],
    shape: &[usize],
    name: &str,
    release: &dyn Fn(&[u8]),
) -> Result<Tensor> {
    const PIECE: usize = 4 << 20; // values
    let t = Tensor::empty(gpu, shape, name)?;
    if t.split() != crate::gpu::Split::Rows {
        t.write(gpu, values)?;
        release(bytemuck::cast_slice(values));
        return Ok(t);
    }
    let cols = t.cols();
    for c in t.chunks() {
        let part = &values[c.start * cols..(c.start + c.len) * cols];
        for (k, piece) in part.chunks(PIECE).enumerate() {
            gpu.write(c.bind(), (k * PIECE * 4) as u64, bytemuck::cast_slice(piece))?;
            release(bytemuck::cast_slice(piece));
        }
    }
    Ok(t)
}

impl crate::kernels::lm_head_loss::HeadRows for StreamedWeight {
    fn dims(&self) -> (usize, usize) {
        (self.shape[0], self.shape[1])
    }
    fn rows(&self, gpu: &Gpu, v0: usize, vl: usize) -> Result<crate::kernels::lm_head_loss::DeviceRows> {
        use crate::kernels::lm_head_loss::DeviceRows;
        Ok(match self.upload_rows(gpu, v0, vl)? {
            Value::Gpu(t) => DeviceRows::F32(t),
            Value::Packed(q) => DeviceRows::Packed(q),
            _ => unreachable!("an upload makes device values"),
        })
    }
}

impl std::fmt::Debug for StreamedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StreamedWeight({} {:?} {})", self.name, self.shape, self.ty.name())
    }
}

/// When in a step a streamed parameter is read. Events are ordered by a key: forward step i
/// has key i (< n); in the backward pass, backward step i has key `3n - 2i + 1` (> n), and a
/// checkpointed segment's recomputation comes just before the backward step of its last node
/// e: key `3n - 2e`.
pub(super) struct Residency {
    /// per node, the streamed parameters its forward step reads
    forward_reads: HashMap<usize, Vec<ParamId>>,
    /// per node, the streamed parameters its backward step reads
    backward_reads: HashMap<usize, Vec<ParamId>>,
    /// per streamed parameter, the key of its last use in the forward pass and in the whole step
    last_forward: HashMap<ParamId, usize>,
    last_use: HashMap<ParamId, usize>,
    /// per layer segment (by the node where it starts), the streamed parameters it reads
    segment_params: Vec<(usize, usize, Vec<ParamId>)>,
    n: usize,
}

impl Residency {
    /// The schedule of `graph`'s streamed parameters; `segments` are the layer ranges
    /// (first node, last node), `recomputed` whether checkpointing recomputes them.
    pub fn plan(
        graph: &Graph,
        store: &ParamStore,
        requires_grad: &[bool],
        segments: &[(usize, usize)],
        recomputed: bool,
    ) -> Self {
        let n = graph.nodes.len();
        let streamed = |v: usize| match graph.nodes[v].op {
            Op::Param(id) if store.get(id).streams() => Some(id),
            _ => None,
        };
        let mut r = Residency {
            forward_reads: HashMap::new(),
            backward_reads: HashMap::new(),
            last_forward: HashMap::new(),
            last_use: HashMap::new(),
            segment_params: Vec::new(),
            n,
        };
        let segment_end = |i: usize| segments.iter().find(|(a, b)| (*a..=*b).contains(&i)).map(|s| s.1);
        for (i, node) in graph.nodes.iter().enumerate() {
            for (j, v) in node.inputs.iter().enumerate() {
                let Some(id) = streamed(v.0) else { continue };
                if Self::by_rows(node, j, store.get(id)) {
                    continue; // the op reads the rows it needs itself
                }
                r.forward_reads.entry(i).or_default().push(id);
                r.last_forward.insert(id, i);
                let mut keys = vec![i];
                if requires_grad[i] && node.op.backward_reads(j) {
                    r.backward_reads.entry(i).or_default().push(id);
                    keys.push(3 * n - 2 * i + 1);
                }
                if recomputed {
                    if let Some(e) = segment_end(i) {
                        keys.push(Self::recompute_key(n, e));
                    }
                }
                let last = r.last_use.entry(id).or_insert(0);
                *last = (*last).max(keys.into_iter().max().unwrap_or(0));
            }
        }
        for &(a, b) in segments {
            let mut ids: Vec<ParamId> =
                (a..=b).flat_map(|i| r.forward_reads.get(&i).cloned().unwrap_or_default()).collect();
            ids.sort();
            ids.dedup();
            r.segment_params.push((a, b, ids));
        }
        r
    }

    /// Whether input `j` of `node` is a frozen streamed weight that the op reads by rows from
    /// the checkpoint, never whole: an embedding table (the looked-up rows are gathered on the
    /// host) and the fused LM head (a vocabulary chunk's rows at a time). Then the whole weight
    /// is never uploaded, which matters most for a tied 262,144-row table.
    pub fn by_rows(node: &super::Node, j: usize, p: &super::Param) -> bool {
        let frozen_streamed = matches!(p.value, Value::Streamed(_));
        match node.op {
            Op::Embedding { .. } => frozen_streamed && j == 0,
            Op::LinearCrossEntropy { trans_w: true, .. } => frozen_streamed && j == 1,
            _ => false,
        }
    }

    pub fn forward_reads(&self, i: usize) -> &[ParamId] {
        self.forward_reads.get(&i).map_or(&[], Vec::as_slice)
    }
    pub fn backward_reads(&self, i: usize) -> &[ParamId] {
        self.backward_reads.get(&i).map_or(&[], Vec::as_slice)
    }
    /// Whether a parameter read at `key` can be released after it: no later use (in the forward
    /// pass, a parameter read again in the backward pass is released too, and streamed again,
    /// unless it belongs to the last layer or the head, which the backward pass starts with).
    pub fn release_after(&self, id: ParamId, key: usize, forward: bool) -> bool {
        let last = self.last_use[&id];
        if forward {
            self.last_forward[&id] == key && (last == key || key < self.last_layer_start())
        } else {
            last == key
        }
    }

    /// Forward keys from here on run in the last layer or after it (the final norm, the LM
    /// head and the loss): what they read is needed again at once by the backward pass.
    fn last_layer_start(&self) -> usize {
        self.segment_params.last().map_or(0, |s| s.0)
    }

    /// The streamed parameters to have resident when node `i` opens a layer: in the forward
    /// pass the next layer's; in the backward pass this layer's and the one before it, those
    /// that the backward pass (or a recomputation) still reads.
    pub fn ahead(&self, i: usize, forward: bool) -> Vec<ParamId> {
        let Some(k) = self.segment_params.iter().position(|s| (s.0..=s.1).contains(&i)) else {
            return vec![];
        };
        let layers: Vec<usize> = if forward { vec![k + 1] } else { vec![k, k.wrapping_sub(1)] };
        // the backward pass reaches this layer at this key (its recomputation, if any)
        let floor = Self::recompute_key(self.n, self.segment_params[k].1);
        layers
            .into_iter()
            .filter_map(|l| self.segment_params.get(l))
            .flat_map(|s| s.2.iter().copied())
            .filter(|id| forward || self.last_use[id] >= floor)
            .collect()
    }

    /// Whether node `i` starts a layer segment.
    pub fn starts_layer(&self, i: usize) -> bool {
        self.segment_params.iter().any(|s| s.0 == i)
    }
    pub fn ends_layer(&self, i: usize) -> bool {
        self.segment_params.iter().any(|s| s.1 == i)
    }
    pub fn key_backward(&self, i: usize) -> usize {
        3 * self.n - 2 * i + 1
    }
    /// The key of recomputing the segment that ends at node `e` (just before `e`'s backward).
    pub fn recompute_key(n: usize, e: usize) -> usize {
        3 * n - 2 * e
    }
}

/// The uploaded copies of streamed parameters during one step.
#[derive(Default)]
pub(super) struct Resident {
    values: HashMap<ParamId, Value>,
}

impl Resident {
    pub fn get(&self, id: ParamId) -> Option<&Value> {
        self.values.get(&id)
    }

    /// Upload `ids` that are not resident yet.
    pub fn ensure(&mut self, gpu: &Arc<Gpu>, store: &ParamStore, ids: &[ParamId]) -> Result<()> {
        for &id in ids {
            if self.values.contains_key(&id) {
                continue;
            }
            let p = store.get(id);
            let _c = gpu.category(crate::gpu::Category::Weights);
            let v = match &p.value {
                Value::Streamed(w) if gpu.planning() => w.stand_in(gpu)?,
                Value::Streamed(w) => w.upload(gpu)?,
                // a trained weight on the host (`params::Location::Host`)
                Value::Cpu(_) if gpu.planning() => Value::Gpu(Tensor::empty(gpu, &p.shape, &p.name)?),
                Value::Cpu(host) => Value::Gpu(Tensor::from_host(gpu, host, &p.shape, &p.name)?),
                _ => continue,
            };
            self.values.insert(id, v);
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn release(&mut self, id: ParamId) {
        self.values.remove(&id);
    }
}
