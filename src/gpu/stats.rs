//! Counters of the host's side of GPU work: how many dispatches were recorded, how many
//! submissions carried them, and how long the host spent recording them and blocked on the GPU
//! (polls that wait, read-backs, error-scope pops). A training step on a real GPU is fast when
//! it is a few submissions of many dispatches with little waiting; `bench step` prints these
//! per step. Plain relaxed atomics: each is a running total read as a [`GpuStats`] snapshot,
//! and two snapshots subtract to the work in between.

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Running totals since the device was opened (shared with the buffer pool).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    dispatches: AtomicU64,
    bind_groups: AtomicU64,
    submissions: AtomicU64,
    waits: AtomicU64,
    wait_ns: AtomicU64,
    record_ns: AtomicU64,
    submit_ns: AtomicU64,
}

impl Counters {
    pub fn dispatch(&self, since: Instant) {
        self.dispatches.fetch_add(1, Ordering::Relaxed);
        self.record_ns.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
    /// Host time spent recording (a dispatch's or a submission's encoding) since `since`.
    pub fn record(&self, since: Instant) {
        self.record_ns.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
    /// Host time inside the queue's submit call since `since` (also counted as recording).
    pub fn submit(&self, since: Instant) {
        self.submit_ns.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
    pub fn bind_group(&self) {
        self.bind_groups.fetch_add(1, Ordering::Relaxed);
    }
    pub fn submission(&self) {
        self.submissions.fetch_add(1, Ordering::Relaxed);
    }
    /// Run `f`, a call that blocks until the GPU (or the driver) answers, and count its time.
    pub fn wait<T>(&self, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        self.waits.fetch_add(1, Ordering::Relaxed);
        self.wait_ns.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out
    }
    pub fn snapshot(&self) -> GpuStats {
        GpuStats {
            dispatches: self.dispatches.load(Ordering::Relaxed),
            bind_groups: self.bind_groups.load(Ordering::Relaxed),
            submissions: self.submissions.load(Ordering::Relaxed),
            waits: self.waits.load(Ordering::Relaxed),
            wait_ns: self.wait_ns.load(Ordering::Relaxed),
            record_ns: self.record_ns.load(Ordering::Relaxed),
            submit_ns: self.submit_ns.load(Ordering::Relaxed),
        }
    }
}

/// A snapshot of the counters (see [`crate::Gpu::stats`]); `later.since(&earlier)` is the work
/// between two snapshots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GpuStats {
    /// Kernel dispatches recorded (dispatches of zero workgroups and planning steps excluded).
    pub dispatches: u64,
    /// Bind groups created for them (the others were found in the cache, `super::binds`).
    pub bind_groups: u64,
    /// Command buffers handed to the queue (uploads that went out on their own included).
    pub submissions: u64,
    /// Blocking calls: polls that wait for a submission, read-backs, error-scope pops.
    pub waits: u64,
    /// Nanoseconds the host spent in those blocking calls.
    pub wait_ns: u64,
    /// Nanoseconds the host spent recording dispatches (uniform write, bind group, pass) and
    /// encoding them into submissions.
    pub record_ns: u64,
    /// The part of `record_ns` spent inside the queue's submit call. A driver may block there
    /// until earlier work is done (lavapipe does, while a step's status is read one step
    /// behind), so this is where waiting the host did not ask for shows.
    pub submit_ns: u64,
}

impl GpuStats {
    /// The work done between `earlier` and `self`.
    pub fn since(&self, earlier: &GpuStats) -> GpuStats {
        GpuStats {
            dispatches: self.dispatches - earlier.dispatches,
            bind_groups: self.bind_groups - earlier.bind_groups,
            submissions: self.submissions - earlier.submissions,
            waits: self.waits - earlier.waits,
            wait_ns: self.wait_ns - earlier.wait_ns,
            record_ns: self.record_ns - earlier.record_ns,
            submit_ns: self.submit_ns - earlier.submit_ns,
        }
    }
}
