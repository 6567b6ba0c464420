//! Tests of the ggml storage types: hand-made blocks with values worked out by hand, the
//! fixtures of `tools/make_quant_fixtures.py` (the `gguf` package's numpy dequantizer, compared
//! bit for bit), the type table, and `random_blocks`.

use super::*;

/// f16 bit patterns used by the hand-made blocks.
const H_1: [u8; 2] = [0x00, 0x3C]; // 1.0
const H_HALF: [u8; 2] = [0x00, 0x38]; // 0.5
const H_QUARTER: [u8; 2] = [0x00, 0x34]; // 0.25
const H_MINUS_1: [u8; 2] = [0x00, 0xBC]; // -1.0

fn deq(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
    let n = bytes.len() / ty.block_bytes() * ty.block_elems();
    let mut out = vec![f32::NAN; n];
    dequantize(ty, bytes, &mut out);
    out
}

#[test]
fn float_types_by_hand() {
    // F16: 1.0, -2.0, the smallest subnormal 2^-24, the largest finite 65504.
    let b = [0x00, 0x3C, 0x00, 0xC0, 0x01, 0x00, 0xFF, 0x7B];
    assert_eq!(deq(GgmlType::F16, &b), [1.0, -2.0, 2f32.powi(-24), 65504.0]);
    // BF16 is the top half of an f32: 0x3F80 -> 1.0, 0xC040 -> -3.0, 0x3E00 -> 0.125.
    let b = [0x80, 0x3F, 0x40, 0xC0, 0x00, 0x3E];
    assert_eq!(deq(GgmlType::BF16, &b), [1.0, -3.0, 0.125]);
    let b: Vec<u8> = [1.5f32, -0.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let y = deq(GgmlType::F32, &b);
    assert_eq!((y[0], y[1].to_bits()), (1.5, (-0.0f32).to_bits()));
}

#[test]
fn q4_0_by_hand() {
    // d = 0.5; byte j = j | (15 - j) << 4, so element j = (j - 8) * 0.5 and element j + 16
    // = ((15 - j) - 8) * 0.5 = (7 - j) * 0.5: y[0] = -4, y[8] = 0, y[15] = 3.5, y[16] = 3.5,
    // y[31] = -4.
    let mut b = H_HALF.to_vec();
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let y = deq(GgmlType::Q4_0, &b);
    let want: Vec<f32> =
        (0..32).map(|i| if i < 16 { (i - 8) as f32 * 0.5 } else { (7 - (i - 16)) as f32 * 0.5 }).collect();
    assert_eq!(y, want);
    assert_eq!((y[0], y[8], y[15], y[16], y[31]), (-4.0, 0.0, 3.5, 3.5, -4.0));
}

#[test]
fn q4_1_by_hand() {
    // d = 0.25, m = -1; every byte 0x3A: low nibble 10 -> 10 * 0.25 - 1 = 1.5 (elements 0..16),
    // high nibble 3 -> 3 * 0.25 - 1 = -0.25 (elements 16..32).
    let mut b = [H_QUARTER, H_MINUS_1].concat();
    b.extend([0x3A; 16]);
    let y = deq(GgmlType::Q4_1, &b);
    assert!(y[..16].iter().all(|&v| v == 1.5) && y[16..].iter().all(|&v| v == -0.25), "{y:?}");
}

#[test]
fn q5_0_by_hand() {
    // d = 1; qh = bytes 01 00 01 80 = bits 0, 16 and 31 (a little-endian u32); qs[0] = 0x21.
    // element 0: low nibble 1 | 16 = 17 -> 1; element 16: high nibble 2 | 16 = 18 -> 2;
    // element 31: qs[15] high 0 | 16 = 16 -> 0; every other element: 0 - 16 = -16.
    let mut b = [&H_1[..], &[0x01, 0x00, 0x01, 0x80]].concat();
    b.extend([0u8; 16]);
    b[6] = 0x21;
    let y = deq(GgmlType::Q5_0, &b);
    let mut want = [-16.0f32; 32];
    (want[0], want[16], want[31]) = (1.0, 2.0, 0.0);
    assert_eq!(y, want);
}

#[test]
fn q5_1_by_hand() {
    // d = 0.5, m = 0.25; qh bit 31 only (byte 3 = 0x80); qs[15] = 0xF0.
    // element 15: low nibble 0 -> 0 * 0.5 + 0.25 = 0.25; element 31: 15 | 16 = 31 -> 15.75;
    // all others q = 0 -> 0.25.
    let mut b = [H_HALF, H_QUARTER].concat();
    b.extend([0x00, 0x00, 0x00, 0x80]);
    b.extend([0u8; 16]);
    b[8 + 15] = 0xF0;
    let y = deq(GgmlType::Q5_1, &b);
    let mut want = [0.25f32; 32];
    want[31] = 15.75;
    assert_eq!(y, want);
}

#[test]
fn q8_0_by_hand() {
    // d = 0.5; qs = 0x80 (-128), 0x7F (127), 0xFF (-1), then zeros: -64, 63.5, -0.5, 0, ...
    let mut b = H_HALF.to_vec();
    b.extend([0x80, 0x7F, 0xFF]);
    b.extend([0u8; 29]);
    let y = deq(GgmlType::Q8_0, &b);
    assert_eq!(&y[..4], &[-64.0, 63.5, -0.5, 0.0]);
    assert!(y[3..].iter().all(|&v| v == 0.0));
}

/// The 12 scale bytes of a Q4_K/Q5_K block packed by hand from
/// scales [1, 2, 3, 4, 33, 34, 35, 63] and mins [0, 1, 2, 3, 24, 41, 10, 63]; the top bits of
/// the high mins (1, 2, 0, 3) differ from the high scales' (2, 2, 2, 3), so swapping them fails.
/// 33 = 0b10_0001, 34 = 0b10_0010, 35 = 0b10_0011, 63 = 0b11_1111 (top 2 bits | low nibble);
/// 24 = 0b01_1000, 41 = 0b10_1001, 10 = 0b00_1010.
/// bytes 0..4: scale i | (top bits of scale i+4) << 6 = 1|2<<6, 2|2<<6, 3|2<<6, 4|3<<6
/// bytes 4..8: min i | (top bits of min i+4) << 6 = 0|1<<6, 1|2<<6, 2|0<<6, 3|3<<6
/// bytes 8..12: low nibble of scale i+4 | low nibble of min i+4 << 4 = 1|8<<4, 2|9<<4, 3|10<<4,
/// 15|15<<4
const K4_SCALES: [u8; 12] = [0x81, 0x82, 0x83, 0xC4, 0x40, 0x81, 0x02, 0xC3, 0x81, 0x92, 0xA3, 0xFF];
const K4_SC: [f32; 8] = [1.0, 2.0, 3.0, 4.0, 33.0, 34.0, 35.0, 63.0];
const K4_MN: [f32; 8] = [0.0, 1.0, 2.0, 3.0, 24.0, 41.0, 10.0, 63.0];

#[test]
fn k4_scale_packing_by_hand() {
    let (sc, mn) = blocks::scales_mins_k4(&K4_SCALES);
    assert_eq!(sc, [1, 2, 3, 4, 33, 34, 35, 63]);
    assert_eq!(mn, [0, 1, 2, 3, 24, 41, 10, 63]);
}

#[test]
fn q4_k_by_hand() {
    // d = 1, dmin = 0.5, scales/mins K4_SC/K4_MN; every qs byte 0x52 (low 2 -> sub-block 2g,
    // high 5 -> sub-block 2g+1), except qs[0] = 0xF0 and qs[127] = 0x0F.
    // sub-block i value = sc_i * q - 0.5 * mn_i:
    //   i0: 1*2 - 0 = 2      i1: 2*5 - 0.5 = 9.5    i2: 3*2 - 1 = 5      i3: 4*5 - 1.5 = 18.5
    //   i4: 33*2 - 12 = 54   i5: 34*5 - 20.5 = 149.5 i6: 35*2 - 5 = 65   i7: 63*5 - 31.5 = 283.5
    // qs[0] (group 0, l 0): element 0 q = 0 -> 0; element 32 q = 15 -> 2*15 - 0.5 = 29.5.
    // qs[127] (group 3, l 31): element 223 q = 15 -> 35*15 - 5 = 520; element 255 q = 0 -> -31.5.
    let mut b = [H_1, H_HALF].concat();
    b.extend(K4_SCALES);
    b.extend([0x52; 128]);
    b[16] = 0xF0;
    b[16 + 127] = 0x0F;
    let y = deq(GgmlType::Q4_K, &b);
    let per_sub = [2.0, 9.5, 5.0, 18.5, 54.0, 149.5, 65.0, 283.5];
    let mut want: Vec<f32> = (0..256).map(|e| per_sub[e / 32]).collect();
    (want[0], want[32], want[223], want[255]) = (0.0, 29.5, 520.0, -31.5);
    assert_eq!(y, want);
}

#[test]
fn q5_k_by_hand() {
    // d = 1, dmin = 0.5, scales/mins K4_SC/K4_MN, qs all 0 except qs[127] = 0x0F.
    // qh[0] = 0b101: element 0 (sub 0) q = 16 -> 1*16 - 0 = 16; element 64 (sub 2) -> 3*16 - 1
    // = 47. qh[31] = 0x80: element 7*32 + 31 = 255 (sub 7) q = 16 -> 63*16 - 31.5 = 976.5.
    // qs[127] low 15: element 223 (sub 6) q = 15 -> 35*15 - 5 = 520.
    // every other element q = 0 -> -0.5 * mn_i.
    let mut b = [H_1, H_HALF].concat();
    b.extend(K4_SCALES);
    let mut qh = [0u8; 32];
    (qh[0], qh[31]) = (0b101, 0x80);
    b.extend(qh);
    b.extend([0u8; 128]);
    b[48 + 127] = 0x0F;
    let y = deq(GgmlType::Q5_K, &b);
    let mut want: Vec<f32> = (0..256).map(|e| -0.5 * K4_MN[e / 32]).collect();
    (want[0], want[64], want[255], want[223]) = (16.0, 47.0, 976.5, 520.0);
    assert_eq!(y, want);
    assert_eq!(K4_SC[2] * 16.0 - 0.5 * K4_MN[2], 47.0);
}

#[test]
fn q6_k_by_hand() {
    // d = 0.5 (bytes 208..210); scales[i] = i - 8 except scales[15] = -128 (0x80).
    // ql, qh zero -> q = -32, so element e = 0.5 * sc[e/16] * -32 = -16 * sc[e/16].
    // ql[0] = 0x21, qh[0] = 0b11_10_01_00:
    //   element 0  (half 0, k 0): ql[0] low 1,  qh bits 0-1 = 0 -> q 1-32 = -31, sc[0] = -8
    //     -> 0.5 * -8 * -31 = 124
    //   element 32 (k 1): ql[32] low 0, bits 2-3 = 1 -> 16-32 = -16, sc[2] = -6 -> 48
    //   element 64 (k 2): ql[0] high 2, bits 4-5 = 2 -> 34-32 = 2, sc[4] = -4 -> -4
    //   element 96 (k 3): ql[32] high 0, bits 6-7 = 3 -> 48-32 = 16, sc[6] = -2 -> -16
    // ql[97] = 0xF0 (half 1, offset 33 = 32 + l 1), qh[33] = 0xC0 (half 1, l 1):
    //   element 161 (k 1, low 0, bits 2-3 = 0) -> -32, sc[10] = 2 -> -32
    //   element 225 (k 3, high 15, bits 6-7 = 3) -> 63-32 = 31, sc[14] = 6 -> 93
    // elements 240..256: sc[15] = -128 -> 0.5 * -128 * -32 = 2048.
    let mut b = vec![0u8; 210];
    b[0] = 0x21;
    b[128] = 0b1110_0100;
    b[97] = 0xF0;
    b[128 + 33] = 0xC0;
    for i in 0..16 {
        b[192 + i] = (i as i8 - 8) as u8;
    }
    b[192 + 15] = 0x80;
    b[208..210].copy_from_slice(&H_HALF);
    let y = deq(GgmlType::Q6_K, &b);
    let sc = |e: usize| if e >= 240 { -128.0 } else { (e / 16) as f32 - 8.0 };
    let mut want: Vec<f32> = (0..256).map(|e| -16.0 * sc(e)).collect();
    (want[0], want[32], want[64], want[96], want[161], want[225]) = (124.0, 48.0, -4.0, -16.0, -32.0, 93.0);
    assert_eq!(want[250], 2048.0);
    assert_eq!(y, want);
}

/// One fixture of tools/make_quant_fixtures.py: "PTQF", u32 type id, u32 n, storage, n f32.
fn read_fixture(ty: GgmlType) -> (Vec<u8>, Vec<f32>) {
    let path = format!("{}/../tests/fixtures/quant/{}.bin", env!("CARGO_MANIFEST_DIR"), ty.name());
    let f = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e} (run tools/make_quant_fixtures.py)"));
    assert_eq!(&f[..4], b"PTQF", "{path}: bad magic");
    let id = u32::from_le_bytes(f[4..8].try_into().unwrap());
    let n = u32::from_le_bytes(f[8..12].try_into().unwrap()) as usize;
    assert_eq!(id, ty.id(), "{path}: type id");
    let nb = ty.bytes_for(n).expect("whole blocks");
    assert_eq!(f.len(), 12 + nb + 4 * n, "{path}: length");
    let want = f[12 + nb..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    (f[12..12 + nb].to_vec(), want)
}

/// numpy computes each value with the same f32 operations in the same order as ggml (and as
/// `blocks`), one rounding each, so the values must agree bit for bit (signed zeros included).
#[test]
fn matches_gguf_numpy_fixtures_bitwise() {
    for ty in GgmlType::ALL {
        let (bytes, want) = read_fixture(ty);
        let got = deq(ty, &bytes);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{ty} element {i} (block {}): {g} != {w}",
                i / ty.block_elems()
            );
        }
    }
}

#[test]
fn type_table() {
    let ids = [0, 1, 30, 2, 3, 6, 7, 8, 12, 13, 14];
    let bytes = [4, 2, 2, 18, 20, 22, 24, 34, 144, 176, 210];
    let elems = [1, 1, 1, 32, 32, 32, 32, 32, 256, 256, 256];
    let names = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"];
    for (i, ty) in GgmlType::ALL.into_iter().enumerate() {
        assert_eq!(
            (ty.id(), ty.block_bytes(), ty.block_elems(), ty.name()),
            (ids[i], bytes[i], elems[i], names[i])
        );
        assert_eq!(GgmlType::from_id(ty.id()), Some(ty));
        assert_eq!(ty.is_quantized(), i >= 3);
        assert_eq!(format!("{ty}"), names[i]);
    }
    // Q8_1, Q2_K, Q3_K, Q8_K, the IQ and integer types, and unassigned ids are not supported.
    for id in (0..64).filter(|id| !ids.contains(id)) {
        assert_eq!(GgmlType::from_id(id), None, "id {id}");
    }
    assert_eq!(GgmlType::from_id(u32::MAX), None);
}

#[test]
fn bytes_for_whole_blocks_only() {
    assert_eq!(GgmlType::Q4_K.bytes_for(0), Some(0));
    assert_eq!(GgmlType::Q4_K.bytes_for(512), Some(288));
    assert_eq!(GgmlType::Q4_K.bytes_for(255), None);
    assert_eq!(GgmlType::Q8_0.bytes_for(96), Some(102));
    assert_eq!(GgmlType::Q8_0.bytes_for(33), None);
    assert_eq!(GgmlType::BF16.bytes_for(7), Some(14));
    // overflow: usize::MAX f32 elements, and usize::MAX / 32 Q8_0 blocks of 34 bytes
    assert_eq!(GgmlType::F32.bytes_for(usize::MAX), None);
    assert_eq!(GgmlType::Q8_0.bytes_for(usize::MAX / 32 * 32), None);
    for ty in GgmlType::ALL {
        assert_eq!(ty.bytes_for(3 * ty.block_elems()), Some(3 * ty.block_bytes()));
    }
}

#[test]
#[should_panic(expected = "take 36 bytes")]
fn dequantize_rejects_wrong_byte_count() {
    dequantize(GgmlType::Q4_0, &[0u8; 35], &mut [0.0; 64]);
}

#[test]
#[should_panic(expected = "not a whole number")]
fn dequantize_rejects_partial_block() {
    dequantize(GgmlType::Q4_K, &[0u8; 144], &mut [0.0; 200]);
}

#[test]
fn random_blocks_finite_realistic_deterministic() {
    for ty in GgmlType::ALL {
        let n = 12 * QK_K;
        for seed in 0..4 {
            let b = random_blocks(ty, n, seed);
            assert_eq!(b.len(), ty.bytes_for(n).unwrap());
            assert_eq!(b, random_blocks(ty, n, seed), "{ty}: not deterministic");
            let y = deq(ty, &b);
            assert!(y.iter().all(|v| v.is_finite()), "{ty} seed {seed}: non-finite value");
            let max = y.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert!(max > 1e-3 && max <= 2.0, "{ty} seed {seed}: max |x| = {max}");
            // values spread out: many distinct values, not one repeated scale
            let mut distinct: Vec<u32> = y.iter().map(|v| v.to_bits()).collect();
            distinct.sort_unstable();
            distinct.dedup();
            assert!(distinct.len() > n / 16, "{ty}: only {} distinct values", distinct.len());
        }
        assert_ne!(random_blocks(ty, 256, 1), random_blocks(ty, 256, 2), "{ty}: seed ignored");
    }
}

/// The parallel split of `dequantize` (runs of 4096 blocks) must not change the result: a row
/// crossing several runs equals its blocks decoded one at a time.
#[test]
fn dequantize_split_matches_block_by_block() {
    for ty in [GgmlType::Q4_0, GgmlType::Q6_K, GgmlType::F16] {
        let n = (2 * 4096 * 32 / ty.block_elems() + 3) * ty.block_elems().max(16);
        let b = random_blocks(ty, n, 7);
        let whole = deq(ty, &b);
        let mut one = vec![0.0f32; ty.block_elems()];
        for (i, blk) in b.chunks_exact(ty.block_bytes()).enumerate() {
            dequantize(ty, blk, &mut one);
            assert_eq!(&whole[i * ty.block_elems()..(i + 1) * ty.block_elems()], &one[..], "{ty} block {i}");
        }
    }
}
