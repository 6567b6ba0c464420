//! The parameter store: every weight of a model by name, with its shape, dtype, whether it is
//! trained, and where it lives. One flat list serves parameters, gradients and optimizer
//! moments (llm.c's layout, one entry per tensor), so the optimizer is one loop over it.
//!
//! Frozen parameters (LoRA's base weights) get no gradient buffer and no optimizer state.
//! Everything is resident on the device today; `Location` is where memory-mapped, streamed
//! shards will be described.

use super::{Device, Value};
use crate::error::{Error, Result};
use crate::kernels::optim::{self, AdamW};
use crate::memory::{offload::Offload, OptimizerOffload};
use kernels_ref::quant::GgmlType;
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParamId(pub usize);

/// Where a parameter's authoritative copy lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// In a device buffer for the whole run.
    Resident,
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
    /// AdamW moments, created on the first step.
    moments: Option<(Value, Value)>,
}

impl Param {
    /// AdamW moments (m, v), once the first step has made them.
    pub fn moments(&self) -> Option<(&Value, &Value)> {
        self.moments.as_ref().map(|(m, v)| (m, v))
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
            moments: None,
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
                Value::Streamed(_) => 0, // on the device only while a layer that reads it runs
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
        let p = &mut self.params[id.0];
        p.value = Value::from_host(&self.dev, data, &p.shape, &p.name)?;
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
        let p = &mut self.params[id.0];
        p.trainable = false;
        p.grad = None;
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
        if let Some(off) = &mut self.offload {
            return off.set_moments(&self.params, id, m, v);
        }
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
        Ok(match p.grad.take() {
            Some(g) => Some((g, true)),
            None if p.trainable => Some((Value::empty(&self.dev, &p.shape, "gradient")?, false)),
            None => None,
        })
    }

    /// Release every gradient buffer (after a planning step, whose buffers only stood in).
    pub fn clear_grads(&mut self) {
        self.params.iter_mut().for_each(|p| p.grad = None);
    }

    /// Whether any parameter has a gradient buffer yet.
    pub fn has_grads(&self) -> bool {
        self.params.iter().any(|p| p.grad.is_some())
    }

    pub fn zero_grads(&mut self) -> Result<()> {
        for p in &mut self.params {
            if let Some(g) = &mut p.grad {
                g.fill(&self.dev, 0.0)?;
            }
        }
        Ok(())
    }

    /// Scale all gradients so that their global L2 norm is at most `max_norm`, as
    /// `torch.nn.utils.clip_grad_norm_` does (on the GPU without a read-back).
    pub fn clip_grad_norm(&mut self, max_norm: f32) -> Result<()> {
        match &self.dev {
            Device::Gpu(g) => {
                let grads: Vec<&crate::gpu::Tensor> =
                    self.params.iter().filter_map(|p| p.grad.as_ref()).map(Value::gpu).collect();
                crate::kernels::reduce::clip_grad_norm(g, &grads, max_norm)?;
            }
            Device::Cpu => {
                let mut grads: Vec<&mut [f32]> = self
                    .params
                    .iter_mut()
                    .filter_map(|p| p.grad.as_mut())
                    .map(|g| g.cpu_mut().as_mut_slice())
                    .collect();
                kernels_ref::clip_grad_norm(&mut grads, max_norm);
            }
        }
        Ok(())
    }

    /// Keep the AdamW moments where `mode` says (`path`: the file of `disk` mode, created now);
    /// moments made already move there. See `memory::offload`.
    pub fn set_optimizer_offload(&mut self, mode: OptimizerOffload, path: &std::path::Path) -> Result<()> {
        let mut moved = Vec::new();
        for id in (0..self.params.len()).map(ParamId) {
            if let Some(mv) = self.moments_to_host(id)? {
                moved.push((id, mv));
            }
            self.params[id.0].moments = None;
        }
        self.offload = None; // before a new one truncates the same file
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

    /// One AdamW step on every trainable parameter (moments created on the first call).
    pub fn adamw_step(&mut self, opt: AdamW) -> Result<()> {
        self.step += 1;
        let step = self.step;
        let _c = crate::gpu::Category::OptimizerState.enter(); // memory report
        if let Some(off) = &mut self.offload {
            return off.adamw_step(&self.dev, &mut self.params, opt, step);
        }
        for p in &mut self.params {
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
                    optim::adamw_step(gpu, w, g, m, v, opt, step)?;
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
