//! One decoder per ggml block type: the byte layout of the block, then the arithmetic that turns
//! it into `f32`, in the same f32 operations and the same order as ggml's `dequantize_row_*`
//! (so the result is bit for bit ggml's; Rust never fuses a multiply and an add on its own).
//!
//! Every multi-byte field is little-endian. `f16` fields are IEEE half precision, widened
//! exactly. Each function reads exactly one block (`b.len()` is the type's block size) and
//! writes exactly one block of outputs (`y.len()` is the type's element count per block); the
//! caller in `quant.rs` cuts the row into blocks and checks the lengths.

use half::{bf16, f16};

/// Elements in one K-quant super-block (ggml's `QK_K`).
pub const QK_K: usize = 256;

/// The little-endian f16 at byte `at`, widened to f32 (exact).
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// F32: 4 bytes, one little-endian IEEE single.
pub fn f32_elem(b: &[u8]) -> f32 {
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// F16: 2 bytes, one little-endian IEEE half; widening is exact.
pub fn f16_elem(b: &[u8]) -> f32 {
    f16_at(b, 0)
}

/// BF16: 2 bytes, the top 16 bits of an f32 (little-endian u16); widening appends 16 zero bits.
pub fn bf16_elem(b: &[u8]) -> f32 {
    bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

/// Q4_0, 32 elements in 18 bytes:
/// - bytes 0..2: `d`, f16 scale
/// - bytes 2..18: `qs[16]`; byte j holds element j in its low nibble and element j+16 in its
///   high nibble
///
/// `x = (q - 8) * d`, q in 0..=15.
pub fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// Q4_1, 32 elements in 20 bytes:
/// - bytes 0..2: `d`, f16 scale; bytes 2..4: `m`, f16 minimum (offset)
/// - bytes 4..20: `qs[16]`, nibbles as in Q4_0 (low: element j, high: element j+16)
///
/// `x = q * d + m`, q in 0..=15.
pub fn q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0x0F) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// The fifth bit of element j (0..32) of a Q5_0/Q5_1 block: bit j of the little-endian u32 `qh`.
fn fifth_bit(qh: u32, j: usize) -> u8 {
    (((qh >> j) & 1) << 4) as u8
}

/// Q5_0, 32 elements in 22 bytes:
/// - bytes 0..2: `d`, f16 scale
/// - bytes 2..6: `qh`, a little-endian u32 whose bit j is bit 4 of element j
/// - bytes 6..22: `qs[16]`, the low 4 bits: byte j low nibble = element j, high = element j+16
///
/// `x = (q - 16) * d`, q in 0..=31.
pub fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let q0 = (qs[j] & 0x0F) | fifth_bit(qh, j);
        let q1 = (qs[j] >> 4) | fifth_bit(qh, j + 16);
        y[j] = (q0 as i32 - 16) as f32 * d;
        y[j + 16] = (q1 as i32 - 16) as f32 * d;
    }
}

/// Q5_1, 32 elements in 24 bytes:
/// - bytes 0..2: `d`, f16 scale; bytes 2..4: `m`, f16 minimum
/// - bytes 4..8: `qh`, little-endian u32, bit j = bit 4 of element j
/// - bytes 8..24: `qs[16]`, low 4 bits as in Q5_0
///
/// `x = q * d + m`, q in 0..=31.
pub fn q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let q0 = (qs[j] & 0x0F) | fifth_bit(qh, j);
        let q1 = (qs[j] >> 4) | fifth_bit(qh, j + 16);
        y[j] = q0 as f32 * d + m;
        y[j + 16] = q1 as f32 * d + m;
    }
}

/// Q8_0, 32 elements in 34 bytes:
/// - bytes 0..2: `d`, f16 scale
/// - bytes 2..34: `qs[32]`, i8, element j = byte j
///
/// `x = q * d`, q in -128..=127.
pub fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

/// The eight 6-bit scales and eight 6-bit mins of a Q4_K/Q5_K super-block, unpacked from its
/// 12 bytes `s` (ggml's `get_scale_min_k4`). Sub-block i (elements 32i..32i+32):
/// - i < 4: scale = low 6 bits of `s[i]`, min = low 6 bits of `s[i+4]`
/// - i >= 4: scale = low nibble of `s[i+4]` | (top 2 bits of `s[i-4]`) << 4,
///   min = high nibble of `s[i+4]` | (top 2 bits of `s[i]`) << 4
///
/// So bytes 0..4 carry scales 0..4 and the high bits of scales 4..8, bytes 4..8 mins 0..4 and
/// the high bits of mins 4..8, bytes 8..12 the low nibbles of scales (low) and mins (high) 4..8.
pub fn scales_mins_k4(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for i in 0..4 {
        sc[i] = s[i] & 63;
        mn[i] = s[i + 4] & 63;
    }
    for i in 4..8 {
        sc[i] = (s[i + 4] & 0x0F) | ((s[i - 4] >> 6) << 4);
        mn[i] = (s[i + 4] >> 4) | ((s[i] >> 6) << 4);
    }
    (sc, mn)
}

/// Q4_K, 256 elements in 144 bytes, 8 sub-blocks of 32:
/// - bytes 0..2: `d`, f16 super-scale of the scales; bytes 2..4: `dmin`, f16 super-scale of the
///   mins
/// - bytes 4..16: `scales[12]`, eight 6-bit scales and eight 6-bit mins ([`scales_mins_k4`])
/// - bytes 16..144: `qs[128]`, four groups of 32 bytes; group g byte l holds element 64g+l
///   (sub-block 2g) in its low nibble and element 64g+32+l (sub-block 2g+1) in its high nibble
///
/// `x = (d * sc_i) * q - (dmin * m_i)`, q in 0..=15, i the element's sub-block.
pub fn q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let (sc, mn) = scales_mins_k4(&b[4..16]);
    let qs = &b[16..144];
    for g in 0..4 {
        let (d1, m1) = (d * sc[2 * g] as f32, dmin * mn[2 * g] as f32);
        let (d2, m2) = (d * sc[2 * g + 1] as f32, dmin * mn[2 * g + 1] as f32);
        let q = &qs[32 * g..32 * g + 32];
        let y = &mut y[64 * g..64 * g + 64];
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0x0F) as f32 - m1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// Q5_K, 256 elements in 176 bytes, 8 sub-blocks of 32:
/// - bytes 0..2: `d`, f16; bytes 2..4: `dmin`, f16 (as in Q4_K)
/// - bytes 4..16: `scales[12]`, packed as in Q4_K ([`scales_mins_k4`])
/// - bytes 16..48: `qh[32]`; bit i of byte l is bit 4 of element 32i+l (sub-block i)
/// - bytes 48..176: `qs[128]`, the low 4 bits, laid out as Q4_K's `qs`
///
/// `x = (d * sc_i) * q - (dmin * m_i)`, q in 0..=31.
pub fn q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let (sc, mn) = scales_mins_k4(&b[4..16]);
    let qh = &b[16..48];
    let qs = &b[48..176];
    for g in 0..4 {
        let (d1, m1) = (d * sc[2 * g] as f32, dmin * mn[2 * g] as f32);
        let (d2, m2) = (d * sc[2 * g + 1] as f32, dmin * mn[2 * g + 1] as f32);
        let q = &qs[32 * g..32 * g + 32];
        let y = &mut y[64 * g..64 * g + 64];
        for l in 0..32 {
            let h1 = ((qh[l] >> (2 * g)) & 1) << 4;
            let h2 = ((qh[l] >> (2 * g + 1)) & 1) << 4;
            y[l] = d1 * ((q[l] & 0x0F) | h1) as f32 - m1;
            y[l + 32] = d2 * ((q[l] >> 4) | h2) as f32 - m2;
        }
    }
}

/// Q6_K, 256 elements in 210 bytes, 16 sub-blocks of 16:
/// - bytes 0..128: `ql[128]`, low 4 bits, two halves of 64 bytes
/// - bytes 128..192: `qh[64]`, high 2 bits, two halves of 32 bytes
/// - bytes 192..208: `scales[16]`, i8, one per 16 elements (element e uses `scales[e / 16]`)
/// - bytes 208..210: `d`, f16 super-scale
///
/// Element e = 128h + 32k + l (half h in 0..2, quarter k in 0..4, l in 0..32) takes its low
/// 4 bits from `ql[64h + 32(k % 2) + l]` (low nibble for k < 2, high nibble for k >= 2) and
/// its high 2 bits from bits 2k..2k+2 of `qh[32h + l]`.
///
/// `x = (d * sc) * (q - 32)`, q in 0..=63.
pub fn q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for h in 0..2 {
        let ql = &b[64 * h..64 * h + 64];
        let qh = &b[128 + 32 * h..128 + 32 * h + 32];
        let sc = &b[192 + 8 * h..192 + 8 * h + 8];
        let y = &mut y[128 * h..128 * h + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
            let q2 = (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
            let q3 = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            let q4 = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
            y[l] = d * (sc[is] as i8) as f32 * (q1 as i32 - 32) as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * (q2 as i32 - 32) as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * (q3 as i32 - 32) as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * (q4 as i32 - 32) as f32;
        }
    }
}
