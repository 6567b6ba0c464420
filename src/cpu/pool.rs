//! Host buffers of the fast CPU path, recycled by length. A step makes and frees about a
//! gigabyte of activations and gradients; taking a buffer back from here costs nothing, where a
//! fresh one is zeroed (or faulted in page by page) first. The executor gives buffers back as
//! it frees values ([`give`]); [`take`] hands one out with last use's contents, which every
//! fast-path kernel overwrites whole (`Value::empty` says so). The pool keeps at most
//! [`MAX_BYTES`]; beyond that, buffers go back to the allocator.

use std::collections::HashMap;
use std::sync::Mutex;

/// The most the pool holds (a few steps' worth of GPT-2 124M activations).
pub const MAX_BYTES: usize = 2 << 30;
/// Buffers smaller than this are left to the allocator (cheap there, and numerous).
const MIN_LEN: usize = 1 << 12;

#[derive(Default)]
struct Pool {
    free: HashMap<usize, Vec<Vec<f32>>>,
    bytes: usize,
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);

/// A buffer of `n` elements: a recycled one (contents left from its last use) or fresh zeros.
pub fn take(n: usize) -> Vec<f32> {
    if n >= MIN_LEN {
        let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
        let pool = guard.get_or_insert_with(Pool::default);
        if let Some(v) = pool.free.get_mut(&n).and_then(Vec::pop) {
            pool.bytes -= n * 4;
            return v;
        }
    }
    vec![0.0; n]
}

/// Keep `v` for the next [`take`] of its length (or free it when the pool is full).
pub fn give(v: Vec<f32>) {
    let n = v.len();
    if n < MIN_LEN {
        return;
    }
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let pool = guard.get_or_insert_with(Pool::default);
    if pool.bytes + n * 4 <= MAX_BYTES {
        pool.bytes += n * 4;
        pool.free.entry(n).or_default().push(v);
    }
}

/// Bytes the pool holds now.
pub fn held_bytes() -> usize {
    POOL.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map_or(0, |p| p.bytes)
}

/// Give every buffer the pool holds back to the allocator.
pub fn release() {
    if let Some(pool) = POOL.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        pool.free.clear();
        pool.bytes = 0;
    }
}
