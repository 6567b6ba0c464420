//! Kernel dispatch functions, one module per WGSL file in `shaders/`. Each function binds its
//! tensors, fills the `#[repr(C)]` twin of the shader's `Params` struct and records one or more
//! dispatches; nothing waits for the GPU. Outputs come first, then inputs, then sizes, as in
//! `kernels-ref`, whose functions are the specification of every kernel here.
//!
//! Phone GPUs allow four storage buffers per dispatch, so a backward pass that needs more
//! inputs is split into several entry points (see `norm` and `activation`).
//!
//! No invocation may loop more than [`MAX_LOOP_TRIPS`] times, counting every loop it runs:
//! llvmpipe (lavapipe, the CI driver) keeps one iteration counter per invocation, shared by all
//! the loops of a shader, and leaves whatever loop it is in once that counter reaches 65,535,
//! without an error (Mesa's `LP_MAX_TGSI_LOOP_ITERATIONS`). A loop whose trip count grows with
//! the data (matmul's K, a column sum over rows, the positions of one token id) therefore runs
//! over pieces of at most [`LOOP_SPAN`] trips, one dispatch per piece, each adding into the
//! output; the rest of the allowance is left for the fixed loops around it (tree reductions,
//! register tiles). Loops that stride by the workgroup size check their trip count with
//! [`check_trips`]. Other drivers do not stop loops, but very long dispatches also trip the
//! watchdogs of phone drivers, so the pieces are the same on every device.

pub mod activation;
pub mod attention;
pub mod cross_entropy;
pub mod elementwise;
pub mod embedding;
pub mod flash_attention;
pub mod half;
pub mod lm_head_loss;
pub mod matmul;
pub mod matmul_tune;
pub mod norm;
pub mod optim;
pub mod quant;
pub mod reduce;
pub mod rope;
pub mod rows;
pub mod softmax;

use crate::error::{Error, Result};

/// Most loop iterations one invocation may run, all loops together (see the module comment).
pub const MAX_LOOP_TRIPS: usize = 65_535;

/// Most iterations of a data-dependent loop in one dispatch.
pub const LOOP_SPAN: usize = 1 << 15;

/// `0..total` cut into `(start, len)` pieces of at most [`LOOP_SPAN`], in order; one empty
/// piece when `total` is 0, so that a kernel still writes its (empty-sum) output.
pub(crate) fn loop_spans(total: usize) -> impl Iterator<Item = (usize, usize)> {
    spans(total, LOOP_SPAN)
}

/// `0..total` cut into `(start, len)` pieces of at most `span` (one empty piece when `total`
/// is 0).
pub(crate) fn spans(total: usize, span: usize) -> impl Iterator<Item = (usize, usize)> {
    let span = span.max(1);
    (0..total.max(1)).step_by(span).map(move |s| (s, span.min(total.saturating_sub(s))))
}

/// Refuse a dispatch whose invocations would loop `trips` times (a row of `cols` values
/// walked by a workgroup of `wg`, `passes` times): past [`LOOP_SPAN`] a driver may stop the loop.
pub(crate) fn check_trips(op: &str, cols: usize, wg: usize, passes: usize) -> Result<()> {
    let trips = cols.div_ceil(wg) * passes;
    if trips > LOOP_SPAN {
        return Err(Error::shape(
            op,
            format!(
                "a row of {cols} values needs {trips} loop iterations per invocation; kernels are \
                 held to {LOOP_SPAN} (some drivers stop longer loops without an error)"
            ),
        ));
    }
    Ok(())
}

/// Run `f` with the thread-local override `key` set to `value`, then put back what was there
/// (the kernel and variant choices that tests, gradcheck and benches force per thread).
pub(crate) fn with_override<T: Copy + 'static, R>(
    key: &'static std::thread::LocalKey<std::cell::Cell<Option<T>>>,
    value: T,
    f: impl FnOnce() -> R,
) -> R {
    let previous = key.with(|v| v.replace(Some(value)));
    let result = f();
    key.with(|v| v.set(previous));
    result
}

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
