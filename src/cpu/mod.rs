//! The fast CPU path (`--device cpu`): f32 arithmetic on every core, matrix products through
//! the `gemm` crate (packed, cache-blocked, SIMD micro-kernels, threaded on rayon's pool).
//!
//! Here: the matrix product ([`matmul`]), attention ([`attention`]), the LM head fused with the
//! loss ([`head_loss`]), the elementwise ops and the plain cross-entropy in f32 blocks
//! ([`elementwise`]), LayerNorm and RMSNorm ([`norm`]), the embedding's backward, host buffers
//! recycled by length ([`pool`]), activations held in 16 bits ([`half`]), and what makes the elementwise loops vectorize ([`simd`]).
//! RoPE, the embedding's forward, the soft cap and AdamW are the reference's
//! functions (threaded in blocks already), shared by both CPU paths. The reference path (`--device cpu-ref`) stays the judge: each
//! function here is tested against its `kernels-ref` twin (`tests/cpu_fast.rs`), and whole
//! models against the reference on every architecture.

pub mod attention;
pub mod elementwise;
pub mod half;
pub mod head_loss;
pub mod norm;
pub mod pool;
pub mod simd;

use kernels_ref::MatmulDims;
use rayon::prelude::*;

/// `C (M,N) = op(A) (M,K) · op(B) (K,N)`, or added to C when `accumulate`. `op` transposes
/// where `d` says: A stored (K,M) when `trans_a`, B stored (N,K) when `trans_b`. One matrix
/// (`d.batch` must be 1); threaded over the whole pool.
pub fn matmul(c: &mut [f32], a: &[f32], b: &[f32], d: MatmulDims, accumulate: bool) {
    matmul_with(c, a, b, d, accumulate, gemm::Parallelism::Rayon(0));
}

/// [`matmul`] on the calling thread only (for callers that are threaded already, one task per
/// attention head).
pub fn matmul_serial(c: &mut [f32], a: &[f32], b: &[f32], d: MatmulDims, accumulate: bool) {
    matmul_with(c, a, b, d, accumulate, gemm::Parallelism::None);
}

fn matmul_with(c: &mut [f32], a: &[f32], b: &[f32], d: MatmulDims, accumulate: bool, par: gemm::Parallelism) {
    let MatmulDims { batch, m, n, k, trans_a, trans_b } = d;
    assert_eq!(batch, 1, "cpu::matmul: one matrix at a time");
    assert_eq!(a.len(), m * k, "cpu::matmul: A must hold M*K = {m}*{k}");
    assert_eq!(b.len(), k * n, "cpu::matmul: B must hold K*N = {k}*{n}");
    assert_eq!(c.len(), m * n, "cpu::matmul: C must hold M*N = {m}*{n}");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    // (row stride, column stride) of each operand as stored
    let (a_rs, a_cs) = if trans_a { (1, m) } else { (k, 1) };
    let (b_rs, b_cs) = if trans_b { (1, k) } else { (n, 1) };
    // SAFETY: the lengths are checked above, so every element the strides reach lies inside
    // its slice; `c` is borrowed mutably and does not overlap `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// Adds `bias (N)` to every row of `out (M, N)`.
pub fn add_rows(out: &mut [f32], bias: &[f32]) {
    if bias.is_empty() {
        return;
    }
    out.par_chunks_mut(bias.len()).for_each(|row| row.iter_mut().zip(bias).for_each(|(o, b)| *o += b));
}

/// `out (N) (+)= Σ_rows x (M, N)` (a bias gradient), in f64 per column.
pub fn sum_rows(out: &mut [f32], x: &[f32], accumulate: bool) {
    let n = out.len();
    if n == 0 {
        return;
    }
    let rows = x.len() / n;
    out.par_iter_mut().enumerate().for_each(|(j, o)| {
        let s: f64 = (0..rows).map(|r| x[r * n + j] as f64).sum();
        *o = if accumulate { *o + s as f32 } else { s as f32 };
    });
}

/// Keep freed host memory for reuse instead of giving it back to the system at once.
///
/// The CPU path makes and frees every activation and gradient of a step (many MiB each). With
/// glibc's defaults each large buffer is its own `mmap`: first touches fault every page in, and
/// each `munmap` flushes every core's TLB; on GPT-2 124M that was a third of a LoRA step. Raising
/// the mmap and trim thresholds serves them from the heap, which keeps its peak (RSS then stays
/// near the step's peak, as a buffer pool's would). Called when a CPU device is opened; a no-op
/// off glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; both values are valid for these options.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// `dtable (V, C) (+)= scatter of dout (N, C) by ids (N)`: each output row's gradient added to
/// its id's row, in place (the reference builds a fresh V x C table: 154 MB for GPT-2's).
pub fn embedding_backward(dtable: &mut [f32], dout: &[f32], ids: &[u32], dim: usize, accumulate: bool) {
    assert!(dim > 0 && dtable.len().is_multiple_of(dim), "cpu embedding backward: dtable is not (V, {dim})");
    assert_eq!(dout.len(), ids.len() * dim, "cpu embedding backward: dout must hold N*C");
    let vocab = dtable.len() / dim;
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        panic!("cpu embedding backward: token id {bad} out of range for vocab {vocab}");
    }
    if !accumulate {
        elementwise::fill(dtable, 0.0);
    }
    for (row, &id) in dout.chunks(dim).zip(ids) {
        let at = id as usize * dim;
        dtable[at..at + dim].iter_mut().zip(row).for_each(|(d, g)| *d += g);
    }
}
