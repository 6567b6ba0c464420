//! The parameter store: every weight of a model by name, with its shape, dtype, whether it is
//! trained, and where it lives, with its gradient and AdamW moments beside it.
//!
//! On the GPU the trained parameters are also laid out flat, as llm.c lays them out
//! ([`Flat`], in `flat`): before the first backward pass every trained parameter resident on the device moves into
//! one set of shared buffers (values, gradients, first and second moments, each a few buffers
//! of at most one storage binding, all four with the same layout), and each parameter's
//! tensors become views into them. Global-norm clipping and AdamW then take one dispatch per
//! shared buffer instead of a few per parameter (GPT-2 124M full fine-tuning: 1,131 dispatches
//! a step become 555), while every kernel still sees each parameter as a tensor of its own.
//! `POCKETTUNE_FLAT=off` keeps one buffer per tensor (for comparison), as do parameters on
//! the host, offloaded moments, and a run under `--memory-budget` whose budget cannot hold the
//! moment when the values are held twice.
//!
//! Frozen parameters (LoRA's base weights) get no gradient buffer and no optimizer state.
//!
//! Where a parameter lives ([`Location`]): resident on the device, or (full fine-tuning under
//! `--memory-budget`) on the host. A parameter on the host is uploaded by the executor for the
//! layer that reads it, as a streamed frozen weight is (`super::stream`); the gradient its
//! layer's backward steps make on the device is added into a host buffer when the backward pass
//! leaves that layer ("gradients streamed out", [`ParamStore::flush_grads`]), and the update
//! runs on the host with the moments there too (`memory::offload`). The device then holds one
//! or two layers' weights and gradients at a time, and global-norm clipping stays exact: every
//! gradient is complete, on the host or the device, before the norm is taken
//! ([`ParamStore::clip_grad_norm`]).

use super::{Device, Value};
use crate::error::{Error, Result};
use crate::gpu::Tensor;
use crate::kernels::optim::{self, AdamW};
use crate::kernels::reduce;
use crate::memory::{offload::Offload, OptimizerOffload};
use kernels_ref::quant::GgmlType;
use std::collections::HashMap;

mod flat;
use flat::Flat;

/// Environment variable: `off` keeps the trained parameters one buffer per tensor on the GPU.
pub const FLAT_ENV: &str = "POCKETTUNE_FLAT";

/// A training step between [`ParamStore::begin_step`] and [`ParamStore::outcome`].
pub struct PendingStep {
    /// on the device: [`reduce::step_status`]
    status: Option<Tensor>,
    /// elsewhere: the micro-batches' losses, summed in f32 as they come
    loss: f32,
    micro: usize,
    host: Option<StepOutcome>,
    readback: Option<crate::gpu::Readback>,
}

impl PendingStep {
    /// Add one micro-batch's loss: on the device, `loss` (a 1-element tensor) into the status,
    /// with no read-back; elsewhere `host`, its value, read by the caller.
    pub(crate) fn add_loss(
        &mut self,
        dev: &Device,
        loss: Option<&Tensor>,
        host: impl FnOnce() -> Result<f32>,
    ) -> Result<()> {
        match (&self.status, loss, dev) {
            (Some(status), Some(loss), Device::Gpu(g)) => {
                reduce::sum_into(g, status, reduce::STATUS_LOSS, loss, false)?
            }
            _ => self.loss += host()?,
        }
        self.micro += 1;
        Ok(())
    }
}

/// What a step did ([`ParamStore::outcome`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepOutcome {
    /// the loss, averaged over the micro-batches
    pub loss: f32,
    /// the global gradient norm before clipping (NaN when the loss was not finite on the host
    /// path, which then takes no norm; infinite when the sum of squares is not finite)
    pub grad_norm: f32,
    /// the update was skipped: the loss or the norm was not finite
    pub skipped: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParamId(pub usize);

/// Where a parameter's authoritative copy lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// In a device buffer for the whole run (or in host memory on the CPU path).
    Resident,
    /// A trained weight in host memory on a GPU run (`Value::Cpu`), uploaded for the layer that
    /// reads it; its gradient is gathered on the host.
    Host,
}

pub struct Param {
    pub name: String,
    pub shape: Vec<usize>,
    /// Storage on the device: F32, or the packed format of a frozen base weight.
    pub dtype: GgmlType,
    pub trainable: bool,
    pub location: Location,
    pub value: Value,
    /// Gradient, accumulated over micro-batches until [`ParamStore::zero_grads`]; made by the
    /// first backward pass that reaches the parameter (so a parameter frozen before training,
    /// like a LoRA base weight, never has one).
    pub grad: Option<Value>,
    /// `grad` holds last step's values, to be read as zero: [`ParamStore::zero_grads`] marks it
    /// instead of filling it, and the next backward step that reaches the parameter writes it
    /// instead of adding (no fill dispatch per parameter per step).
    stale: bool,
    /// AdamW moments, created on the first step.
    moments: Option<(Value, Value)>,
    /// A parameter on the host: the device gradient its layer's backward steps are adding to,
    /// until [`ParamStore::flush_grads`] adds it into `grad` (which is then on the host).
    pending: Option<Value>,
}

impl Param {
    /// AdamW moments (m, v), once the first step has made them.
    pub fn moments(&self) -> Option<(&Value, &Value)> {
        self.moments.as_ref().map(|(m, v)| (m, v))
    }
    /// A trained weight kept in host memory on a GPU run (see [`Location::Host`]).
    pub fn on_host(&self) -> bool {
        self.location == Location::Host
    }
    /// Whether the executor uploads this parameter for the nodes that read it (a frozen weight
    /// left in its checkpoint, or a trained weight on the host).
    pub fn streams(&self) -> bool {
        self.on_host() || matches!(self.value, Value::Streamed(_))
    }
}

/// A LoRA adapter on one weight: `y = x W + scale * dropout(x) A^T B^T`, A (rank, in) and
/// B (out, rank), named as PEFT names them (`base_model.model.<module>.lora_A.weight`).
#[derive(Clone, Debug)]
pub struct Lora {
    pub a: ParamId,
    pub b: ParamId,
    pub scale: f32,
    pub dropout: f32,
    /// the module path as Hugging Face names it, e.g. `transformer.h.0.attn.c_attn`
    pub module: String,
}

pub struct ParamStore {
    dev: Device,
    params: Vec<Param>,
    by_name: HashMap<String, ParamId>,
    step: u32,
    lora: HashMap<ParamId, Lora>,
    /// AdamW moments kept off the GPU (`--optimizer-offload`); `None`: next to the weights.
    offload: Option<Offload>,
    /// The trained parameters laid out flat on the GPU, once an update has laid them out.
    flat: Option<Flat>,
    /// Whether to lay them out flat (`POCKETTUNE_FLAT`, [`Self::set_flat`]).
    flat_on: bool,
    /// Most bytes of one shared buffer of the layout (tests make it small); `None`: the
    /// device's storage-binding limit.
    flat_limit: Option<u64>,
}

impl ParamStore {
    pub fn new(dev: Device) -> Self {
        ParamStore {
            dev,
            params: Vec::new(),
            by_name: HashMap::new(),
            step: 0,
            lora: HashMap::new(),
            offload: None,
            flat: None,
            flat_on: !std::env::var(FLAT_ENV).is_ok_and(|v| v.eq_ignore_ascii_case("off") || v == "0"),
            flat_limit: None,
        }
    }

    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// Add a parameter from host data (no gradient buffer yet: see [`Param::grad`]).
    pub fn add(&mut self, name: &str, shape: &[usize], data: &[f32], trainable: bool) -> Result<ParamId> {
        if self.by_name.contains_key(name) {
            return Err(Error::InvalidArgument { name: name.into(), detail: "parameter added twice".into() });
        }
        let _c = crate::gpu::Category::Weights.enter(); // memory report
        let value = Value::from_host(&self.dev, data, shape, name)?;
        self.add_value(name, shape, value, trainable)
    }

    /// Add a trained parameter kept in host memory and uploaded by the executor for the layer
    /// that reads it (full fine-tuning under `--memory-budget`; see [`Location::Host`]). On the
    /// CPU path every parameter is in host memory anyway: this is [`ParamStore::add`].
    pub fn add_host(&mut self, name: &str, shape: &[usize], data: Vec<f32>) -> Result<ParamId> {
        if matches!(self.dev, Device::Cpu(_)) {
            return self.add(name, shape, &data, true);
        }
        let n: usize = shape.iter().product();
        if data.len() != n {
            return Err(Error::shape("add_host", format!("{name}: {n} values expected, got {}", data.len())));
        }
        let id = self.add_value(name, shape, Value::Cpu(data), true)?;
        self.params[id.0].location = Location::Host;
        Ok(id)
    }

    /// Add a frozen weight left in its checkpoint file, uploaded by the executor when a node
    /// reads it (`super::stream`).
    pub fn add_streamed(&mut self, w: super::stream::StreamedWeight) -> Result<ParamId> {
        let (name, shape, ty) = (w.name.clone(), w.shape.clone(), w.ty);
        let id = self.add_value(&name, &shape, Value::Streamed(std::sync::Arc::new(w)), false)?;
        self.params[id.0].dtype = ty;
        Ok(id)
    }

    /// Add a frozen parameter kept in its stored format `ty` (`bytes` as in the file). On the
    /// CPU path it is dequantized to f32 (the reference computes in f32/f64 throughout).
    pub fn add_packed(&mut self, name: &str, shape: &[usize], ty: GgmlType, bytes: &[u8]) -> Result<ParamId> {
        let _c = crate::gpu::Category::Weights.enter(); // memory report
        let (value, dtype) = match &self.dev {
            Device::Gpu(g) if ty != GgmlType::F32 => {
                (Value::Packed(crate::gpu::QTensor::from_bytes(g, ty, bytes, shape, name)?), ty)
            }
            _ => {
                let mut data = vec![0f32; shape.iter().product()];
                kernels_ref::quant::dequantize(ty, bytes, &mut data);
                (Value::from_host(&self.dev, &data, shape, name)?, GgmlType::F32)
            }
        };
        let id = self.add_value(name, shape, value, false)?;
        self.params[id.0].dtype = dtype;
        Ok(id)
    }

    fn add_value(&mut self, name: &str, shape: &[usize], value: Value, trainable: bool) -> Result<ParamId> {
        if self.by_name.contains_key(name) {
            return Err(Error::InvalidArgument { name: name.into(), detail: "parameter added twice".into() });
        }
        let id = ParamId(self.params.len());
        self.params.push(Param {
            name: name.to_string(),
            shape: shape.to_vec(),
            dtype: GgmlType::F32,
            trainable,
            location: Location::Resident,
            value,
            grad: None,
            stale: false,
            moments: None,
            pending: None,
        });
        self.by_name.insert(name.to_string(), id);
        Ok(id)
    }

    /// Device bytes held by parameter values, by storage type (a memory report).
    pub fn value_bytes(&self) -> Vec<(GgmlType, u64)> {
        let mut by: std::collections::BTreeMap<&str, (GgmlType, u64)> = Default::default();
        for p in &self.params {
            let bytes = match &p.value {
                Value::Packed(q) => q.gpu_bytes(),
                // on the device only while a layer that reads it runs
                Value::Streamed(_) => 0,
                _ if p.on_host() => 0,
                _ => 4 * p.shape.iter().product::<usize>() as u64,
            };
            by.entry(p.dtype.name()).or_insert((p.dtype, 0)).1 += bytes;
        }
        by.into_values().collect()
    }

    /// Put a LoRA adapter on weight `base` (fan_in inputs, fan_out outputs) with A and B given
    /// (PEFT's initialisation is A Kaiming-uniform, B zeros: see `lora_init`).
    pub fn add_lora(
        &mut self,
        base: ParamId,
        module: &str,
        (fan_in, fan_out, rank): (usize, usize, usize),
        a: &[f32],
        b: &[f32],
        alpha: f32,
        dropout: f32,
    ) -> Result<()> {
        let a = self.add(&format!("base_model.model.{module}.lora_A.weight"), &[rank, fan_in], a, true)?;
        let b = self.add(&format!("base_model.model.{module}.lora_B.weight"), &[fan_out, rank], b, true)?;
        self.lora
            .insert(base, Lora { a, b, scale: alpha / rank as f32, dropout, module: module.to_string() });
        Ok(())
    }

    /// The LoRA adapter on weight `base`, if any.
    pub fn lora(&self, base: ParamId) -> Option<&Lora> {
        self.lora.get(&base)
    }
    /// Forget every adapter (after merging them into their base weights).
    pub fn drop_lora(&mut self) {
        let adapter_ids: Vec<ParamId> = self.lora.values().flat_map(|l| [l.a, l.b]).collect();
        self.lora.clear();
        for id in adapter_ids {
            self.freeze(id);
            self.by_name.remove(&self.params[id.0].name);
        }
    }

    /// Replace a parameter's values.
    pub fn set_value(&mut self, id: ParamId, data: &[f32]) -> Result<()> {
        let _c = crate::gpu::Category::Weights.enter(); // memory report
        self.flat = None; // the value gets a buffer of its own
        let p = &mut self.params[id.0];
        p.value = if p.on_host() {
            Value::Cpu(data.to_vec())
        } else {
            Value::from_host(&self.dev, data, &p.shape, &p.name)?
        };
        p.dtype = GgmlType::F32;
        Ok(())
    }

    pub fn has_lora(&self) -> bool {
        !self.lora.is_empty()
    }

    pub fn id(&self, name: &str) -> Option<ParamId> {
        self.by_name.get(name).copied()
    }
    pub fn get(&self, id: ParamId) -> &Param {
        &self.params[id.0]
    }
    pub fn get_mut(&mut self, id: ParamId) -> &mut Param {
        &mut self.params[id.0]
    }
    pub fn iter(&self) -> impl Iterator<Item = (ParamId, &Param)> {
        self.params.iter().enumerate().map(|(i, p)| (ParamId(i), p))
    }
    /// Number of values in trainable parameters.
    pub fn trainable_numel(&self) -> usize {
        self.params.iter().filter(|p| p.trainable).map(|p| p.shape.iter().product::<usize>()).sum()
    }

    /// Stop training a parameter: its gradient buffer and optimizer state are released.
    /// Graphs recorded afterwards compute no gradient for it (activation gradients still flow
    /// through it to whatever is trainable upstream).
    pub fn freeze(&mut self, id: ParamId) {
        self.flat = None; // laid out again without it at the next update
        let p = &mut self.params[id.0];
        p.trainable = false;
        p.grad = None;
        p.stale = false;
        p.pending = None;
        p.moments = None;
    }

    /// AdamW steps taken so far (bias correction uses it).
    pub fn adam_step(&self) -> u32 {
        self.step
    }
    pub fn set_adam_step(&mut self, step: u32) {
        self.step = step;
    }
    /// Set a parameter's AdamW moments (restoring a checkpoint).
    pub fn set_moments(&mut self, id: ParamId, m: &[f32], v: &[f32]) -> Result<()> {
        self.host_moments_offloaded()?;
        if let Some(off) = &mut self.offload {
            return off.set_moments(&self.params, id, m, v);
        }
        self.flat = None; // the moments get buffers of their own
        let p = &mut self.params[id.0];
        let _c = crate::gpu::Category::OptimizerState.enter(); // memory report
        let m = Value::from_host(&self.dev, m, &p.shape, "adam m")?;
        let v = Value::from_host(&self.dev, v, &p.shape, "adam v")?;
        p.moments = Some((m, v));
        Ok(())
    }

    /// The gradient buffer of a trainable parameter for a backward pass to add to (`true`), or
    /// a new one to write (`false`); `None` for a frozen parameter.
    pub(crate) fn take_grad(&mut self, id: ParamId) -> Result<Option<(Value, bool)>> {
        let _c = crate::gpu::Category::Gradients.enter(); // memory report
        let p = &mut self.params[id.0];
        let stale = std::mem::take(&mut p.stale);
        let slot = if p.on_host() { &mut p.pending } else { &mut p.grad };
        Ok(match slot.take() {
            Some(g) => Some((g, !stale)),
            None if p.trainable => Some((Value::empty(&self.dev, &p.shape, "gradient")?, false)),
            None => None,
        })
    }

    /// Give back the gradient buffer [`Self::take_grad`] handed out, now written.
    pub(crate) fn put_grad(&mut self, id: ParamId, g: Value) {
        let p = &mut self.params[id.0];
        if p.on_host() {
            p.pending = Some(g);
        } else {
            p.grad = Some(g);
        }
    }

    /// Add the device gradients of parameters on the host into their host gradients, and
    /// release the device buffers (the backward pass calls it as it leaves each layer, and at
    /// its end). In a planning step (`Gpu::plan`) the stand-in buffers are only released.
    pub fn flush_grads(&mut self) -> Result<()> {
        let Device::Gpu(gpu) = &self.dev else { return Ok(()) };
        for p in self.params.iter_mut().filter(|p| p.pending.is_some()) {
            let Some(Value::Gpu(g)) = p.pending.take() else { continue };
            if gpu.planning() {
                continue;
            }
            let part = g.to_host(gpu)?;
            match &mut p.grad {
                Some(Value::Cpu(acc)) => acc.iter_mut().zip(&part).for_each(|(a, b)| *a += b),
                _ => p.grad = Some(Value::Cpu(part)),
            }
        }
        Ok(())
    }

    /// Whether any parameter lives on the host ([`Location::Host`]).
    pub fn has_host_params(&self) -> bool {
        self.params.iter().any(Param::on_host)
    }

    /// Release every gradient buffer (after a planning step, whose buffers only stood in).
    pub fn clear_grads(&mut self) {
        self.flat = None;
        self.params.iter_mut().for_each(|p| {
            p.grad = None;
            p.stale = false;
            p.pending = None;
        });
    }

    /// Whether any parameter has a gradient buffer yet.
    pub fn has_grads(&self) -> bool {
        self.params.iter().any(|p| p.grad.is_some())
    }

    pub fn zero_grads(&mut self) -> Result<()> {
        // Before the first backward pass: the gradients and moments are then made in the flat
        // layout, and only the values move (while nothing else is live).
        self.lay_out_flat(false)?;
        for p in &mut self.params {
            let on_host = p.on_host();
            match &mut p.grad {
                // written, not added to, by the next backward step (see `Param::stale`)
                Some(_) if !on_host => p.stale = true,
                Some(g) => g.fill(&self.dev, 0.0)?,
                None => {}
            }
        }
        Ok(())
    }

    /// Zero the gradients that no backward step has written since [`Self::zero_grads`] (a
    /// parameter the graph did not reach): the backward pass calls it at its end, so every
    /// gradient anyone reads afterwards holds this step's values.
    pub fn settle_grads(&mut self) -> Result<()> {
        for p in self.params.iter_mut().filter(|p| p.stale) {
            if let Some(g) = &mut p.grad {
                g.fill(&self.dev, 0.0)?;
            }
            p.stale = false;
        }
        Ok(())
    }

    /// Scale all gradients so that their global L2 norm is at most `max_norm` (0: leave them),
    /// as `torch.nn.utils.clip_grad_norm_` does, and return that norm before clipping (on the
    /// GPU a read-back, which waits; a training step uses [`Self::update`], which does not).
    ///
    /// Gradients of parameters on the host (full fine-tuning under `--memory-budget`) are whole
    /// on the host by now, so the norm stays exact: their sum of squares (f64) is added to the
    /// device gradients' (read back), and one coefficient scales both, as torch computes it.
    /// A sum of squares beyond f32 (a norm above ~1.8e19) counts as infinite on every path: on
    /// the GPU the sum is f32 (and would zero every gradient through the coefficient), and a
    /// gradient that large would overflow AdamW's second moment.
    pub fn clip_grad_norm(&mut self, max_norm: f32) -> Result<f32> {
        self.settle_grads()?;
        self.lay_out_flat(false)?;
        let host_squares: Option<f64> = self.has_host_params().then(|| {
            self.params
                .iter()
                .filter(|p| p.on_host())
                .filter_map(|p| p.grad.as_ref())
                .map(|g| kernels_ref::sum_squares(g.cpu()))
                .sum()
        });
        let finite =
            |squares: f64| if (squares as f32).is_finite() { squares.sqrt() as f32 } else { f32::INFINITY };
        match (&self.dev, host_squares) {
            (Device::Gpu(g), None) => {
                let grads = self.device_grads();
                let acc = if max_norm > 0.0 {
                    reduce::clip_grad_norm(g, &grads, max_norm)?
                } else {
                    reduce::sum_squares(g, &grads)?
                };
                Ok(acc.to_host(g)?[0].sqrt())
            }
            (Device::Gpu(g), Some(host)) => {
                let on_device: Vec<&Tensor> = self
                    .params
                    .iter()
                    .filter(|p| !p.on_host())
                    .filter_map(|p| p.grad.as_ref())
                    .map(Value::gpu)
                    .collect();
                let device = if on_device.is_empty() {
                    0.0
                } else {
                    reduce::sum_squares(g, &on_device)?.to_host(g)?[0]
                };
                let squares = host + device as f64;
                let coef = max_norm as f64 / (squares.sqrt() + 1e-6);
                if max_norm > 0.0 && coef < 1.0 {
                    if !on_device.is_empty() {
                        let acc = Tensor::from_host(g, &[device, coef as f32], &[2], "grad norm")?;
                        for t in &on_device {
                            crate::kernels::elementwise::scale_by(g, t, &acc, 1)?;
                        }
                    }
                    for p in self.params.iter_mut().filter(|p| p.on_host()) {
                        if let Some(grad) = &mut p.grad {
                            kernels_ref::scale_by(grad.cpu_mut(), coef);
                        }
                    }
                }
                Ok(finite(squares))
            }
            (Device::Cpu(_), _) => {
                let mut grads: Vec<&mut [f32]> = self
                    .params
                    .iter_mut()
                    .filter_map(|p| p.grad.as_mut())
                    .map(|g| g.cpu_mut().as_mut_slice())
                    .collect();
                let squares: f64 = grads.iter().map(|g| kernels_ref::sum_squares(g)).sum();
                if max_norm > 0.0 {
                    kernels_ref::clip_grad_norm(&mut grads, max_norm);
                }
                Ok(finite(squares))
            }
        }
    }

    /// Keep the AdamW moments where `mode` says (`path`: the file of `disk` mode, created now);
    /// moments made already move there. See `memory::offload`.
    /// Parameters on the host keep their moments on the host whatever `mode` says (`none`
    /// means `host` then).
    pub fn set_optimizer_offload(&mut self, mode: OptimizerOffload, path: &std::path::Path) -> Result<()> {
        let mode = match mode {
            OptimizerOffload::None if self.has_host_params() => OptimizerOffload::Host,
            m => m,
        };
        let mut moved = Vec::new();
        for id in (0..self.params.len()).map(ParamId) {
            if let Some(mv) = self.moments_to_host(id)? {
                moved.push((id, mv));
            }
            self.params[id.0].moments = None;
        }
        self.offload = None; // before a new one truncates the same file
        self.flat = None;
        self.offload = Offload::new(mode, path)?;
        for (id, (m, v)) in moved {
            self.set_moments(id, &m, &v)?;
        }
        Ok(())
    }
    /// The offloaded optimizer state, when `--optimizer-offload` is on.
    pub fn optimizer_offload(&self) -> Option<&Offload> {
        self.offload.as_ref()
    }
    pub fn optimizer_offload_mut(&mut self) -> Option<&mut Offload> {
        self.offload.as_mut()
    }
    /// A trained parameter's AdamW moments (m, v) on the host, wherever they live, once made.
    pub fn moments_to_host(&self, id: ParamId) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
        let p = &self.params[id.0];
        if let Some(off) = &self.offload {
            let moments = off.moments(id).filter(|_| p.trainable);
            return Ok(moments.map(|(m, v)| (m.to_vec(), v.to_vec())));
        }
        p.moments().map(|(m, v)| Ok((m.to_host(&self.dev)?, v.to_host(&self.dev)?))).transpose()
    }

    /// Parameters on the host have their moments on the host: host offload unless set already.
    fn host_moments_offloaded(&mut self) -> Result<()> {
        if self.offload.is_none() && self.has_host_params() {
            self.offload = Offload::new(OptimizerOffload::Host, std::path::Path::new(""))?;
        }
        Ok(())
    }

    /// One AdamW step on every trainable parameter (moments created on the first call).
    pub fn adamw_step(&mut self, opt: AdamW) -> Result<()> {
        self.adamw(opt, None)
    }

    /// Whether a step's update is decided on the device ([`Self::begin_step`]): a GPU store
    /// with every trained parameter and its moments on the device.
    pub fn decides_on_device(&self) -> bool {
        matches!(self.dev, Device::Gpu(_)) && self.offload.is_none() && !self.has_host_params()
    }

    /// Start a training step: the gradients zeroed, and where the update is decided on the
    /// device ([`Self::decides_on_device`]) a status on the GPU that the micro-batches' losses
    /// are added into ([`super::Run::add_loss`]) with nothing read back. Then
    /// [`Self::update`], and [`Self::outcome`] to learn the loss and norm (and whether the
    /// update was skipped for a non-finite one).
    pub fn begin_step(&mut self) -> Result<PendingStep> {
        self.zero_grads()?;
        let status = match &self.dev {
            Device::Gpu(g) if self.decides_on_device() => Some(reduce::step_status(g)?),
            _ => None,
        };
        Ok(PendingStep { status, loss: 0.0, micro: 0, host: None, readback: None })
    }

    /// Clip the gradients by their global norm (`max_norm`, 0: no clipping) and take an AdamW
    /// step, unless the loss or the norm is not finite: then nothing changes (the weights, the
    /// moments, AdamW's step count). On the device the decision is made there (the clip
    /// kernel's skip flag, read by AdamW through its uniform: `kernels::optim`), so the
    /// update is recorded without waiting for the backward pass, and the status read back
    /// starts now; [`Self::outcome`] waits for it. Read the outcome before the next update
    /// (AdamW's step count is corrected there for a skipped step).
    pub fn update(&mut self, step: &mut PendingStep, max_norm: f32, opt: AdamW) -> Result<()> {
        let micro = step.micro.max(1) as f32;
        let Some(status) = &step.status else {
            let loss = step.loss / micro;
            let grad_norm = if loss.is_finite() { self.clip_grad_norm(max_norm)? } else { f32::NAN };
            let skipped = !(loss.is_finite() && grad_norm.is_finite());
            if !skipped {
                self.adamw_step(opt)?;
            }
            step.host = Some(StepOutcome { loss, grad_norm, skipped });
            return Ok(());
        };
        let Device::Gpu(g) = &self.dev else { unreachable!("a status on the GPU") };
        let g = g.clone();
        self.settle_grads()?;
        self.lay_out_flat(false)?;
        reduce::clip_into(&g, status, &self.device_grads(), max_norm)?;
        self.adamw(opt, Some(status))?;
        step.readback = Some(g.read_later(status.single("step status")?, 0, 16)?);
        Ok(())
    }

    /// The outcome of an updated step ([`Self::update`]): on the device, waits for the
    /// step's status (that submission only; work recorded since goes on).
    pub fn outcome(&mut self, step: PendingStep) -> Result<StepOutcome> {
        if let Some(out) = step.host {
            return Ok(out);
        }
        let (Some(readback), Device::Gpu(g)) = (step.readback, &self.dev) else {
            return Err(Error::Internal {
                context: "step outcome".into(),
                message: "outcome asked of a step that was not updated".into(),
            });
        };
        let s = readback.wait_f32(g)?;
        let squares = s[reduce::STATUS_SQUARES];
        let skipped = s[reduce::STATUS_SKIP] != 0.0;
        if skipped {
            self.step -= 1; // counted by the update; AdamW skipped it on the GPU
        }
        Ok(StepOutcome {
            loss: s[reduce::STATUS_LOSS] / step.micro.max(1) as f32,
            grad_norm: if squares.is_finite() { squares.sqrt() } else { f32::INFINITY },
            skipped,
        })
    }

    /// AdamW on every trained parameter; on the GPU, skipped there when `status` says so.
    fn adamw(&mut self, opt: AdamW, status: Option<&Tensor>) -> Result<()> {
        self.settle_grads()?;
        self.step += 1;
        let step = self.step;
        let _c = crate::gpu::Category::OptimizerState.enter(); // memory report
        self.host_moments_offloaded()?;
        if let Some(off) = &mut self.offload {
            return off.adamw_step(&self.dev, &mut self.params, opt, step);
        }
        self.lay_out_flat(true)?;
        if let (Some(flat), Device::Gpu(gpu)) = (&self.flat, &self.dev) {
            let (m, v) = flat.moments.as_ref().expect("made by lay_out_flat(true)");
            optim::adamw_step_gated(gpu, &flat.value, &flat.grad, m, v, opt, step, status)?;
        }
        let flat = self.flat_members();
        for (p, _) in self.params.iter_mut().zip(&flat).filter(|(_, &laid)| !laid) {
            let Some(grad) = &p.grad else { continue };
            if p.moments.is_none() {
                p.moments = Some((
                    Value::zeros(&self.dev, &p.shape, "adam m")?,
                    Value::zeros(&self.dev, &p.shape, "adam v")?,
                ));
            }
            let (m, v) = p.moments.as_mut().expect("created above");
            match (&mut p.value, grad, m, v) {
                (Value::Gpu(w), Value::Gpu(g), Value::Gpu(m), Value::Gpu(v)) => {
                    let Device::Gpu(gpu) = &self.dev else { unreachable!("GPU values on a GPU store") };
                    optim::adamw_step_gated(gpu, w, g, m, v, opt, step, status)?;
                }
                (Value::Cpu(w), Value::Cpu(g), Value::Cpu(m), Value::Cpu(v)) => {
                    kernels_ref::adamw_step(w, g, m, v, opt, step);
                }
                _ => unreachable!("a store holds values of one device"),
            }
        }
        Ok(())
    }
}
