//! pockettune: fine-tuning language models on phone and desktop GPUs through wgpu compute.
//!
//! Layers, each depending only on those before it: `kernels-ref` (the CPU reference, its own
//! crate) <- [`gpu`] (device, pipelines, buffers, tensors) <- [`kernels`] (one module per WGSL
//! kernel family, forward and backward) <- [`gradcheck`] (GPU against reference) and
//! [`bench`] <- the `pockettune` binary.

pub mod bench;
pub mod checkpoint;
pub mod cpu;
pub mod data;
pub mod error;
pub mod generate;
pub mod gpu;
pub mod gradcheck;
pub mod graph;
pub mod kernels;
pub mod lora;
pub mod lora_gguf;
pub mod memory;
pub mod mmlu;
pub mod models;
pub mod power;
pub mod report;
pub mod shaders;
pub mod train;
pub mod weights;

pub use error::{Error, Result};
pub use gpu::{Gpu, GpuOptions, MatmulKernel, Profile, Tensor};
