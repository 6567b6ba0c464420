//! Kernel dispatch functions, one module per WGSL file in `shaders/`. Each function binds its
//! tensors, fills the `#[repr(C)]` twin of the shader's `Params` struct and records one or more
//! dispatches; nothing waits for the GPU. Outputs come first, then inputs, then sizes, as in
//! `kernels-ref`, whose functions are the specification of every kernel here.
//!
//! Phone GPUs allow four storage buffers per dispatch, so a backward pass that needs more
//! inputs is split into several entry points (see `norm` and `activation`).

pub mod activation;
pub mod attention;
pub mod cross_entropy;
pub mod elementwise;
pub mod embedding;
pub mod matmul;
pub mod norm;
pub mod optim;
pub mod reduce;
pub mod rope;
pub mod softmax;

use crate::error::{Error, Result};

/// Element offsets and strides are passed to shaders as u32.
pub(crate) fn u32_of(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::shape(what, format!("{v} does not fit in 32 bits")))
}

pub(crate) fn check_len(op: &str, name: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::shape(op, format!("{name} has {got} elements, expected {want}")));
    }
    Ok(())
}
