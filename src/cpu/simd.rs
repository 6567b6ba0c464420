//! What lets the fast path's elementwise loops run in SIMD registers: an `exp` made of
//! arithmetic only (libm's `expf` is a call, and a loop with a call in it does not vectorize),
//! and [`vectorized`], which compiles a loop a second time for AVX2 + FMA and takes that copy
//! when the CPU has them (the crate is built for baseline x86-64, SSE2 only, so that one binary
//! runs everywhere; aarch64's NEON is baseline and needs no second copy).
//!
//! The `exp` is the classic range reduction (Cody and Waite): `x = n ln2 + r`, `|r| <= ln2 / 2`,
//! `e^x = 2^n e^r`, with `e^r` from its Taylor polynomial to degree 7 (truncation below 2e-9
//! relative on that range) and `2^n` built in the exponent bits. It is within a few ulps of
//! `expf` over the normal range (`tests/cpu_fast.rs` holds it to 4e-7 relative).

const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// Below this e^x is not a normal f32.
const LOWEST: f32 = -87.336_55;
/// 1.5 2^23: adding it rounds to an integer, held in the low mantissa bits
const ROUND: f32 = 12_582_912.0;
// ln 2 split in two (Cephes' constants): `n * LN2_HI` is exact for the n used here
const LN2_HI: f32 = 355.0 / 512.0;
const LN2_LO: f32 = -2.121_944_4e-4;

/// `e^x` in f32. Below -87.3 (where e^x is subnormal) it gives 0, as for -inf; above 88.7
/// infinity; NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let below = x < LOWEST;
    let x = x.clamp(LOWEST, 88.722_84); // NaN stays NaN
                                        // n = round(x log2 e), read from the low mantissa bits of x log2 e + 1.5 2^23 (a float to
                                        // integer `as` cast saturates and checks for NaN, which keeps the loop from vectorizing)
    let t = x * LOG2_E + ROUND;
    let n = t - ROUND;
    let ni = t.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // e^r, Horner form of sum r^i / i! for i <= 7
    let p = 1.0 / 5040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // 2^n split as 2^(n/2) 2^(n - n/2), so that n = 128 (x near 88.7) stays finite where it is
    let half = ni >> 1;
    let pow = |e: i32| f32::from_bits((e.wrapping_add(127) as u32) << 23);
    let e = p * pow(half) * pow(ni.wrapping_sub(half));
    if below {
        0.0
    } else {
        e
    }
}

/// `Σ f(a_j, b_j, c_j)` over a row, in eight f32 partial sums.
#[inline(always)]
pub fn row_sum3(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32) -> f32 {
    let n = a.len();
    let (b, c) = (&b[..n], &c[..n]);
    let mut part = [0f32; 8];
    let blocks = n / 8;
    for i in 0..blocks {
        for (k, p) in part.iter_mut().enumerate() {
            let j = i * 8 + k;
            *p += f(a[j], b[j], c[j]);
        }
    }
    part.iter().sum::<f32>() + (blocks * 8..n).map(|j| f(a[j], b[j], c[j])).sum::<f32>()
}

/// `Σ f(a_j, b_j)` over a row, in eight f32 partial sums.
#[inline(always)]
pub fn row_sum(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    row_sum3(
        a,
        b,
        a,
        #[inline(always)]
        |a, b, _| f(a, b),
    )
}

/// Run `f`, compiled for AVX2 and FMA where this CPU has them. `f` should be the whole loop
/// (it is inlined into the copy compiled for those features; a loop outside it is not).
#[inline(always)]
pub fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        #[target_feature(enable = "avx2,fma")]
        fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: the CPU has both features (checked just above).
        return unsafe { avx2(f) };
    }
    f()
}
