//! ggml's tensor storage types (the ones GGUF files carry for LLM weights) and their exact
//! dequantization to `f32`.
//!
//! Math and layouts come from ggml's definitions: the `block_*` structs of `ggml-common.h` and
//! the `dequantize_row_*` functions of `ggml-quants.c` (type ids from `ggml.h`); the byte layout
//! of each block is written out on its decoder in [`blocks`]. A weight is a row of blocks; each
//! block holds `block_elems` elements in `block_bytes` bytes, scales first (except Q6_K, whose
//! scale is last), then the packed quants. Dequantization here is bit for bit ggml's: the same
//! f32 multiplies and adds in the same order, checked against the `gguf` PyPI package's numpy
//! dequantizer (fixtures written by `tools/make_quant_fixtures.py`).
//!
//! [`random_blocks`] makes valid storage of any type for tests of the GPU kernels.

pub mod blocks;
#[cfg(test)]
mod tests;

use rayon::prelude::*;

pub use blocks::QK_K;

/// A ggml tensor storage type that pockettune reads. The discriminant is not the ggml id: use
/// [`GgmlType::id`] / [`GgmlType::from_id`].
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4_K,
    Q5_K,
    Q6_K,
}

impl GgmlType {
    /// Every supported type, floats first, then the 32-element quants, then the K-quants.
    pub const ALL: [GgmlType; 11] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];

    /// The type with ggml's id `id` (`enum ggml_type`), or None for a type not supported here
    /// (Q2_K, Q3_K, the IQ types, integers, ... and ids ggml never assigned).
    pub fn from_id(id: u32) -> Option<GgmlType> {
        GgmlType::ALL.into_iter().find(|t| t.id() == id)
    }

    /// ggml's id of the type (`GGML_TYPE_*` in `ggml.h`, the value GGUF tensor infos store).
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// The name ggml gives the type ("F32", "Q4_K", ...).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
        }
    }

    /// Elements per block: 1 for the float types, 32 for Q4_0..Q8_0, 256 for the K-quants.
    pub fn block_elems(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => 32,
            GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => QK_K,
        }
    }

    /// Bytes per block (ggml's `type_size`).
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4_K => 144,
            GgmlType::Q5_K => 176,
            GgmlType::Q6_K => 210,
        }
    }

    /// True for the block-quantized types (everything but F32, F16 and BF16).
    pub fn is_quantized(self) -> bool {
        self.block_elems() > 1
    }

    /// Bytes of `n` consecutive elements; None when `n` is not a whole number of blocks or the
    /// byte count overflows `usize`.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_elems()) {
            return None;
        }
        (n / self.block_elems()).checked_mul(self.block_bytes())
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The decoder of one block of `ty` (see [`blocks`] for each layout).
fn block_decoder(ty: GgmlType) -> fn(&[u8], &mut [f32]) {
    match ty {
        GgmlType::F32 => |b, y| y[0] = blocks::f32_elem(b),
        GgmlType::F16 => |b, y| y[0] = blocks::f16_elem(b),
        GgmlType::BF16 => |b, y| y[0] = blocks::bf16_elem(b),
        GgmlType::Q4_0 => blocks::q4_0,
        GgmlType::Q4_1 => blocks::q4_1,
        GgmlType::Q5_0 => blocks::q5_0,
        GgmlType::Q5_1 => blocks::q5_1,
        GgmlType::Q8_0 => blocks::q8_0,
        GgmlType::Q4_K => blocks::q4_k,
        GgmlType::Q5_K => blocks::q5_k,
        GgmlType::Q6_K => blocks::q6_k,
    }
}

/// Dequantize `out.len()` elements stored as `ty` in `bytes` (exactly `ty.bytes_for(out.len())`
/// bytes, little-endian), exactly as ggml's `dequantize_row_*` define them. Panics on a length
/// mismatch (callers check: this is a reference, not a parser of user input).
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let need = ty.bytes_for(out.len()).unwrap_or_else(|| {
        panic!(
            "dequantize: {} elements are not a whole number of {} blocks of {}",
            out.len(),
            ty,
            ty.block_elems()
        )
    });
    assert_eq!(bytes.len(), need, "dequantize: {} elements of {} take {} bytes", out.len(), ty, need);
    let decode = block_decoder(ty);
    // Parallel over runs of blocks (a real embedding is 10^8 elements); each block is decoded
    // independently, so the result does not depend on the split.
    let per_task = 4096 * ty.block_elems().max(16);
    let bytes_per_task = per_task / ty.block_elems() * ty.block_bytes();
    out.par_chunks_mut(per_task).zip(bytes.par_chunks(bytes_per_task)).for_each(|(y, b)| {
        for (y, b) in y.chunks_exact_mut(ty.block_elems()).zip(b.chunks_exact(ty.block_bytes())) {
            decode(b, y);
        }
    });
}

/// splitmix64: a tiny, fixed generator so that [`random_blocks`] gives the same bytes for a
/// seed on every platform and every version of the `rand` crate.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), 24 bits.
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// `±2^e` with e uniform in [lo, hi): a scale spread over several binades, as real ones are;
    /// negative only when `signed`.
    fn scale(&mut self, lo: f32, hi: f32, signed: bool) -> f32 {
        let m = (lo + (hi - lo) * self.unit()).exp2();
        if signed && self.next_u64() & 1 == 1 {
            -m
        } else {
            m
        }
    }

    fn fill(&mut self, b: &mut [u8]) {
        for chunk in b.chunks_mut(8) {
            let r = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
    }
}

/// Writes `v` rounded to f16 at byte `at`.
fn put_f16(b: &mut [u8], at: usize, v: f32) {
    b[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
}

/// Random but valid storage for `n` elements of `ty`, deterministic in `seed`: test data for
/// the GPU kernels. The packed quants (and the K-quants' 6-bit and 8-bit sub-block scales) are
/// uniformly random bytes, so every bit pattern occurs; the f16 scales are finite and of the
/// magnitude real weights have (the dequantized values stay within about ±1), negative where
/// ggml's quantizers can make them negative (Q4_0, Q5_0, Q8_0, Q6_K) and non-negative where
/// they cannot (the `d`, `dmin` of Q4_1/Q5_1/Q4_K/Q5_K; Q4_1/Q5_1's `m` takes either sign).
/// The float types get values uniform in ±0.1 rounded to the type. Panics unless `n` is a
/// whole number of blocks.
pub fn random_blocks(ty: GgmlType, n: usize, seed: u64) -> Vec<u8> {
    let len = ty
        .bytes_for(n)
        .unwrap_or_else(|| panic!("random_blocks: {n} elements are not a whole number of {ty} blocks"));
    let mut rng = SplitMix64(seed ^ (u64::from(ty.id()) << 56));
    let mut out = vec![0u8; len];
    for b in out.chunks_exact_mut(ty.block_bytes()) {
        rng.fill(b);
        match ty {
            GgmlType::F32 => b.copy_from_slice(&(0.2 * rng.unit() - 0.1).to_le_bytes()),
            GgmlType::F16 => put_f16(b, 0, 0.2 * rng.unit() - 0.1),
            GgmlType::BF16 => b.copy_from_slice(&half::bf16::from_f32(0.2 * rng.unit() - 0.1).to_le_bytes()),
            GgmlType::Q4_0 | GgmlType::Q5_0 => put_f16(b, 0, rng.scale(-14.0, -5.0, true)),
            GgmlType::Q8_0 => put_f16(b, 0, rng.scale(-16.0, -8.0, true)),
            GgmlType::Q4_1 | GgmlType::Q5_1 => {
                put_f16(b, 0, rng.scale(-14.0, -6.0, false));
                put_f16(b, 2, rng.scale(-12.0, -3.0, true));
            }
            GgmlType::Q4_K | GgmlType::Q5_K => {
                // sub-block scales and mins reach 63, quants 31: d * 63 * 31 stays below 1.
                put_f16(b, 0, rng.scale(-17.0, -11.0, false));
                put_f16(b, 2, rng.scale(-17.0, -8.0, false));
            }
            // i8 sub-block scales reach 128, quants 32: |d| * 128 * 32 stays below 1.
            GgmlType::Q6_K => put_f16(b, 208, rng.scale(-19.0, -12.0, true)),
        }
    }
    out
}
