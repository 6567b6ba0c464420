//! Elementwise ops and the plain cross-entropy on the fast CPU path: the math of
//! `kernels_ref::{activation, elementwise, cross_entropy}` in f32, over blocks of
//! [`CHUNK`] elements per task (the reference spends a task and an f64 round trip per element).
//! Gradients are written, or added to their buffer when `accumulate` says so, with no fresh
//! buffer in between. Dropout draws the reference's mask (`kernels_ref::dropout_keep`), so both
//! paths drop the same elements.

use super::simd::{exp, row_sum, vectorized};
use kernels_ref as kr;
use rayon::prelude::*;

/// Elements per task: large enough that rayon's split costs nothing, small enough to balance.
pub const CHUNK: usize = 1 << 14;

/// `out[i] = f(a[i], b[i], c[i])`, or `out[i] += ...` when `accumulate`, over blocks in
/// parallel, each block one [`vectorized`] loop over zipped slices (no index, so no bounds
/// checks in the way of SIMD). Inputs a caller does not have are passed as `out` itself
/// would be: any slice of the same length (`map1`, `map2` do). `out` is read only when
/// accumulating: a fresh buffer's pages must be written before they are read, or the read maps
/// the shared zero page and the write after it costs a copy-on-write fault with a TLB flush on
/// every core.
fn map3(out: &mut [f32], accumulate: bool, [a, b, c]: [&[f32]; 3], f: impl Fn(f32, f32, f32) -> f32 + Sync) {
    assert!(
        a.len() == out.len() && b.len() == out.len() && c.len() == out.len(),
        "cpu elementwise: lengths differ"
    );
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)).zip(c.par_chunks(CHUNK)))
        .for_each(|(o, ((a, b), c))| {
            let ins = a.iter().zip(b).zip(c);
            vectorized(
                #[inline(always)]
                || {
                    if accumulate {
                        o.iter_mut().zip(ins).for_each(
                            #[inline(always)]
                            |(o, ((&a, &b), &c))| *o += f(a, b, c),
                        );
                    } else {
                        o.iter_mut().zip(ins).for_each(
                            #[inline(always)]
                            |(o, ((&a, &b), &c))| *o = f(a, b, c),
                        );
                    }
                },
            )
        });
}

fn map2(out: &mut [f32], accumulate: bool, a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) {
    map3(
        out,
        accumulate,
        [a, b, b],
        #[inline(always)]
        |a, b, _| f(a, b),
    );
}

fn map1(out: &mut [f32], accumulate: bool, a: &[f32], f: impl Fn(f32) -> f32 + Sync) {
    map3(
        out,
        accumulate,
        [a, a, a],
        #[inline(always)]
        |a, _, _| f(a),
    );
}

/// `x = value` everywhere.
pub fn fill(x: &mut [f32], value: f32) {
    x.par_chunks_mut(CHUNK).for_each(|c| c.fill(value));
}

/// The log-sum-exp of one row of logits, in f32.
pub(super) fn logsumexp(x: &[f32]) -> f32 {
    vectorized(
        #[inline(always)]
        || {
            let max = x.iter().fold(f32::NEG_INFINITY, |m, &a| m.max(a));
            let sum = row_sum(
                x,
                x,
                #[inline(always)]
                |a, _| exp(a - max),
            );
            max + sum.ln()
        },
    )
}

/// `out = a + b`.
pub fn add(out: &mut [f32], a: &[f32], b: &[f32]) {
    assert!(a.len() == out.len() && b.len() == out.len(), "cpu add: lengths differ");
    map2(
        out,
        false,
        a,
        b,
        #[inline(always)]
        |a, b| a + b,
    );
}

/// `out (+)= s * a`.
pub fn scale(out: &mut [f32], a: &[f32], s: f32, accumulate: bool) {
    assert_eq!(a.len(), out.len(), "cpu scale: lengths differ");
    map1(
        out,
        accumulate,
        a,
        #[inline(always)]
        |a| s * a,
    );
}

/// Inverted dropout: `out (+)= x / (1 - p)` where `kernels_ref::dropout_keep` keeps, else 0.
/// The seed's hash and the threshold are computed once here (the reference redoes both for
/// every element); the mask is the same.
pub fn dropout(out: &mut [f32], x: &[f32], p: f32, seed: u32, accumulate: bool) {
    assert_eq!(x.len(), out.len(), "cpu dropout: lengths differ");
    let scale = 1.0 / (1.0 - p);
    let threshold = (p as f64 * 4294967296.0).min(4294967295.0) as u32;
    let seed_hash = kr::hash32(seed);
    debug_assert!((0..64).all(|i| kr::dropout_keep(seed, i, p) == (kr::hash32(i ^ seed_hash) >= threshold)));
    // the element's index rides along as an f32 would not: exactly, through a block offset
    out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).enumerate().for_each(|(c, (o, x))| {
        let base = (c * CHUNK) as u32;
        #[inline(always)]
        fn keep(i: u32, x: f32, seed_hash: u32, threshold: u32, scale: f32) -> f32 {
            if kr::hash32(i ^ seed_hash) >= threshold {
                x * scale
            } else {
                0.0
            }
        }
        vectorized(
            #[inline(always)]
            || {
                if accumulate {
                    o.iter_mut().zip(x).enumerate().for_each(
                        #[inline(always)]
                        |(j, (o, &x))| *o += keep(base + j as u32, x, seed_hash, threshold, scale),
                    );
                } else {
                    o.iter_mut().zip(x).enumerate().for_each(
                        #[inline(always)]
                        |(j, (o, &x))| *o = keep(base + j as u32, x, seed_hash, threshold, scale),
                    );
                }
            },
        )
    });
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_K: f32 = 0.044_715;

/// `tanh u` as `1 - 2 / (e^{2u} + 1)`, through [`exp`] (libm's `tanhf` is a call, through
/// `expm1f`); exact at the ends, absolute error about 1e-7 near 0, which GELU multiplies by x/2.
#[inline(always)]
fn tanh(u: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * u) + 1.0)
}

/// tanh GELU and its derivative at `x`.
#[inline(always)]
fn gelu(x: f32) -> (f32, f32) {
    let t = tanh(SQRT_2_OVER_PI * (x + GELU_K * x * x * x));
    let y = 0.5 * x * (1.0 + t);
    let dy = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_K * x * x);
    (y, dy)
}

/// SiLU and its derivative at `x`.
#[inline(always)]
fn silu(x: f32) -> (f32, f32) {
    let s = 1.0 / (1.0 + exp(-x));
    (x * s, s * (1.0 + x * (1.0 - s)))
}

/// The activations the fast path computes itself.
#[derive(Clone, Copy, Debug)]
pub enum Unary {
    Gelu,
    Silu,
}

/// Run `$body` with `$f` bound to the activation's function (a fn item, so every call in the
/// loop is direct and inlined): a `match` inside the loop would keep it from vectorizing.
macro_rules! with_act {
    ($act:expr, $f:ident => $body:expr) => {
        match $act {
            Unary::Gelu => {
                let $f = gelu;
                $body
            }
            Unary::Silu => {
                let $f = silu;
                $body
            }
        }
    };
}

/// `y = act(x)`.
pub fn act_forward(y: &mut [f32], x: &[f32], act: Unary) {
    assert_eq!(y.len(), x.len(), "cpu activation: lengths differ");
    with_act!(act, f => map1(y, false, x, #[inline(always)] |x| f(x).0));
}

/// `dx (+)= dy * act'(x)`.
pub fn act_backward(dx: &mut [f32], x: &[f32], dy: &[f32], act: Unary, accumulate: bool) {
    assert!(dx.len() == x.len() && dy.len() == x.len(), "cpu activation backward: lengths differ");
    with_act!(act, f => map2(dx, accumulate, x, dy, #[inline(always)] |x, dy| dy * f(x).1));
}

/// `y = act(gate) * up` (SwiGLU with SiLU, GeGLU with GELU).
pub fn glu_forward(y: &mut [f32], gate: &[f32], up: &[f32], act: Unary) {
    assert!(gate.len() == y.len() && up.len() == y.len(), "cpu glu: lengths differ");
    with_act!(act, f => map2(y, false, gate, up, #[inline(always)] |g, u| f(g).0 * u));
}

/// `dgate (+)= dy * up * act'(gate)` and `dup (+)= dy * act(gate)`, each when asked for.
pub fn glu_backward(
    dgate: Option<(&mut [f32], bool)>,
    dup: Option<(&mut [f32], bool)>,
    dy: &[f32],
    gate: &[f32],
    up: &[f32],
    act: Unary,
) {
    if let Some((d, acc)) = dgate {
        with_act!(act, f => map3(d, acc, [dy, up, gate], #[inline(always)] |dy, u, g| dy * u * f(g).1));
    }
    if let Some((d, acc)) = dup {
        with_act!(act, f => map2(d, acc, dy, gate, #[inline(always)] |dy, g| dy * f(g).0));
    }
}

/// The mean cross-entropy over kept rows of `logits (N, V)` (NaN when every row is ignored),
/// and each row's log-sum-exp in `lse (N)` for the backward.
pub fn cross_entropy_forward(lse: &mut [f32], logits: &[f32], targets: &[i32], v: usize) -> f32 {
    assert_eq!(logits.len(), lse.len() * v, "cpu cross-entropy: logits must hold N*V");
    assert_eq!(targets.len(), lse.len(), "cpu cross-entropy: targets must hold N");
    let losses: Vec<Option<f64>> = logits
        .par_chunks(v)
        .zip(lse.par_iter_mut())
        .zip(targets.par_iter())
        .map(|((x, l), &t)| {
            *l = logsumexp(x);
            kr::target_index("cpu cross-entropy", t, v).map(|t| (*l - x[t]) as f64)
        })
        .collect();
    kr::mean_over_kept(&losses)
}

/// `dlogits (+)= (softmax - onehot) * dloss / kept rows`, 0 on ignored rows.
pub fn cross_entropy_backward(
    dlogits: &mut [f32],
    logits: &[f32],
    lse: &[f32],
    targets: &[i32],
    dloss: f32,
    accumulate: bool,
) {
    let v = logits.len() / lse.len().max(1);
    assert_eq!(dlogits.len(), logits.len(), "cpu cross-entropy backward: dlogits must hold N*V");
    let count = targets.iter().filter(|&&t| t != kr::IGNORE_INDEX).count();
    let g = if count == 0 { 0.0 } else { dloss / count as f32 };
    dlogits.par_chunks_mut(v.max(1)).zip(logits.par_chunks(v.max(1))).enumerate().for_each(|(r, (d, x))| {
        let t = kr::target_index("cpu cross-entropy backward", targets[r], v);
        let Some(t) = t else {
            if !accumulate {
                d.fill(0.0);
            }
            return;
        };
        let l = lse[r];
        // written without a read unless accumulating (see `map3`); the target's 1 after
        vectorized(
            #[inline(always)]
            || {
                if accumulate {
                    d.iter_mut().zip(x).for_each(|(o, &x)| *o += exp(x - l) * g);
                } else {
                    d.iter_mut().zip(x).for_each(|(o, &x)| *o = exp(x - l) * g);
                }
            },
        );
        d[t] -= g;
    });
}
