//! Where a step's time goes, op by op (`bench step --profile`): while [`profile`] runs, the
//! executor times each node's forward and backward step, and the steps of its own around them
//! (weights streamed in, activations packed to 16 bits and back), waiting for the GPU to finish
//! before and after each one so that a row holds that step's work alone. That serialises the
//! GPU (no overlap between steps, one wait per op), so a profiled step is slower than a plain
//! one: the rows say where the time goes, `bench step`'s own timing how long a step takes.
//! Rows are keyed by op, direction and output shape, so the LM head's product is told apart
//! from the layers'.

use serde::Serialize;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Instant;

/// One row of a profile: a kind of step and what it took, summed over its calls.
#[derive(Clone, Debug, Serialize)]
pub struct ProfileRow {
    /// e.g. `linear backward [512, 768]`, `activations to 16 bits`
    pub what: String,
    pub calls: u64,
    pub ms: f64,
}

thread_local! {
    static ROWS: RefCell<Option<BTreeMap<String, (u64, u64)>>> = const { RefCell::new(None) };
}

/// Run `f` with the executor's steps on this thread timed; returns its result and the rows,
/// slowest first.
pub fn profile<R>(f: impl FnOnce() -> R) -> (R, Vec<ProfileRow>) {
    ROWS.with(|r| *r.borrow_mut() = Some(BTreeMap::new()));
    let out = f();
    let rows = ROWS.with(|r| r.borrow_mut().take()).unwrap_or_default();
    let mut rows: Vec<ProfileRow> =
        rows.into_iter().map(|(what, (calls, ns))| ProfileRow { what, calls, ms: ns as f64 / 1e6 }).collect();
    rows.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    (out, rows)
}

/// Whether a profile is being taken on this thread.
pub(super) fn on() -> bool {
    ROWS.with(|r| r.borrow().is_some())
}

/// Run `f` as one call of `what` (named lazily: only when profiling), the device idle before
/// and after it so that its time is its own.
pub(super) fn timed<R>(
    dev: &super::Device,
    what: impl FnOnce() -> String,
    f: impl FnOnce() -> crate::error::Result<R>,
) -> crate::error::Result<R> {
    if !on() {
        return f();
    }
    let idle = || match dev {
        super::Device::Gpu(g) => g.sync(),
        super::Device::Cpu(_) => Ok(()),
    };
    idle()?;
    let start = Instant::now();
    let out = f()?;
    idle()?;
    let ns = start.elapsed().as_nanos() as u64;
    let what = what();
    ROWS.with(|r| {
        if let Some(rows) = r.borrow_mut().as_mut() {
            let row = rows.entry(what).or_insert((0, 0));
            row.0 += 1;
            row.1 += ns;
        }
    });
    Ok(out)
}
