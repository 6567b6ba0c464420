//! How the row kernels reduce a row. Softmax, the norms, cross-entropy, the fused LM-head loss
//! and flash attention's row pass run one workgroup per row, each invocation walking the row
//! with the workgroup's stride, then sum (or take the max of) what the invocations hold. Two
//! ways, one shader source for both (`src/shaders.rs`, `DERIVED`):
//!
//! - [`RowReduce::Workgroup`]: 64 invocations, a tree through workgroup memory with a barrier
//!   at every halving. Runs everywhere.
//! - [`RowReduce::Subgroup`]: a workgroup as wide as the device's smallest subgroup, so that
//!   it is one subgroup, reduced by `subgroupAdd` / `subgroupMax`: no workgroup memory, no
//!   barrier. lavapipe runs every barrier as a switch through the workgroup's eight subgroups;
//!   there GPT-2's attention softmax (6,144 rows of 128) went from 37-40 to 4.7 ms
//!   (docs/perf.md).
//!
//! [`RowReduce::Subgroup`] is chosen where the device has subgroups of at least 8 lanes
//! ([`Gpu::subgroup_width`]) and the narrower workgroup keeps the row's loops within
//! [`super::LOOP_SPAN`] trips (a 262,144-wide vocabulary row does not: it keeps 64
//! invocations). [`ROW_REDUCE_ENV`] or [`with_row_reduce`] force one for comparisons.

use crate::error::{Error, Result};
use crate::gpu::{Gpu, KernelKey};

/// How a row kernel reduces a row (module comment).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowReduce {
    Workgroup,
    Subgroup,
}

impl RowReduce {
    pub const ALL: [RowReduce; 2] = [RowReduce::Workgroup, RowReduce::Subgroup];

    pub fn name(self) -> &'static str {
        match self {
            RowReduce::Workgroup => "workgroup",
            RowReduce::Subgroup => "subgroup",
        }
    }

    /// The way named `name` (`workgroup` or `subgroup`).
    pub fn parse(name: &str) -> Result<RowReduce> {
        Self::ALL.into_iter().find(|v| v.name() == name).ok_or_else(|| Error::InvalidArgument {
            name: ROW_REDUCE_ENV.into(),
            detail: format!("{name:?} is not a way to reduce a row: use workgroup or subgroup"),
        })
    }

    /// The ways `gpu` can run: both where it has subgroups of at least 8 lanes.
    pub fn available(gpu: &Gpu) -> Vec<RowReduce> {
        match gpu.subgroup_width() {
            Some(_) => Self::ALL.to_vec(),
            None => vec![RowReduce::Workgroup],
        }
    }
}

/// Environment variable that forces a [`RowReduce`] for the whole process (where the device
/// can run it).
pub const ROW_REDUCE_ENV: &str = "POCKETTUNE_ROW_REDUCE";

/// The row kernels' workgroup where they reduce through workgroup memory.
pub const WORKGROUP_WIDTH: u32 = 64;

thread_local! {
    static OVERRIDE: std::cell::Cell<Option<RowReduce>> = const { std::cell::Cell::new(None) };
}

/// Run `f` with the row kernels on this thread reducing by `way` where the device can
/// (tests, gradcheck and benches compare the two this way).
pub fn with_row_reduce<R>(way: RowReduce, f: impl FnOnce() -> R) -> R {
    super::with_override(&OVERRIDE, way, f)
}

/// The way asked for on this thread: [`with_row_reduce`]'s, else [`ROW_REDUCE_ENV`]'s, else
/// `None` (the device's best).
fn asked() -> Result<Option<RowReduce>> {
    static ENV: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if let Some(v) = OVERRIDE.with(|v| v.get()) {
        return Ok(Some(v));
    }
    ENV.get_or_init(|| std::env::var(ROW_REDUCE_ENV).ok()).as_deref().map(RowReduce::parse).transpose()
}

/// The pipeline of `entry` in the row kernel `shader` (its `_subgroup` variant is
/// `subgroup_shader`) for rows of `cols` values walked `passes` times (its workgroup width set);
/// refuses rows whose loops would pass [`super::LOOP_SPAN`] trips at any width.
pub(crate) fn row_kernel(
    gpu: &Gpu,
    [shader, subgroup_shader]: [&'static str; 2],
    entry: &'static str,
    op: &str,
    cols: usize,
    passes: usize,
) -> Result<KernelKey> {
    let asked = asked()?;
    let width = gpu.subgroup_width().filter(|&w| {
        asked != Some(RowReduce::Workgroup) && super::check_trips(op, cols, w as usize, passes).is_ok()
    });
    Ok(match width {
        Some(w) => KernelKey::new(subgroup_shader, entry).with("WG", w),
        None => {
            super::check_trips(op, cols, WORKGROUP_WIDTH as usize, passes)?;
            KernelKey::new(shader, entry).with("WG", WORKGROUP_WIDTH)
        }
    })
}
