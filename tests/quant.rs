//! A frozen weight kept on the GPU in its GGUF storage type (`QTensor`) and the kernels that
//! dequantize it as they read (`kernels::quant`), under the mobile limits: hand-checked blocks,
//! every type against kernels-ref on a layer-sized product (both variants of the products: fused
//! and scratch, the latter also walking W in several row blocks), the dequantizing kernel, the
//! automatic choice between the variants, the tables of real vocabularies above
//! the 128 MiB binding limit (Gemma 3's 262,144 x 640 in Q8_0 and F16; Q5_0's 110 MiB fit one
//! binding; Llama 3.2 1B's 128,256 x 2048 in Q4_K and Q6_K, since K-quant rows are multiples of
//! 256), and the errors a bad weight gets.
//!
//! Tolerances (relative to the largest reference value): the products sum in f32 against an f64
//! reference, an error that grows like sqrt(K) and is about `eps * sqrt(K) / 8` for random data
//! (measured 1e-6 .. 5e-6 at K = 33,000); they are held to `eps * sqrt(K)`, eight times that.
//! The gather decodes exactly as the reference does: held to `eps` (a fused multiply-add may
//! round once where ggml rounds twice).

mod common;

use kernels_ref as kr;
use kernels_ref::quant::{dequantize, random_blocks, GgmlType};
use pockettune::gpu::{Precision, QTensor, Split};
use pockettune::gradcheck::{rel_err, QuantVocab, MIXED_TOL, QUANT_TYPES};
use pockettune::kernels::quant::{QmatmulVariant, SCRATCH_MIN_ROWS};
use pockettune::kernels::{embedding, quant};
use pockettune::{Error, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// `eps * sqrt(K)`: eight times the expected error of an f32 sum of K products (module comment).
fn tol(k: usize) -> f64 {
    f32::EPSILON as f64 * (k as f64).sqrt()
}

fn uniform(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn f16_bytes(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_le_bytes()
}

/// One Q4_K block written by hand: d = 1, dmin = 0.5, sub-block j with scale sc_j and min m_j,
/// its quants alternating 1 (even j: low nibbles) and 2 (odd j: high nibbles). Sub-blocks 4..8
/// take the upper two bits of their scale and min from bytes 0..8 (ggml's get_scale_min_k4):
/// sc_4 = 5 + 16 and m_4 = 4 + 32. Element values: sc_j * q_j - 0.5 * m_j.
fn hand_q4_k() -> (Vec<u8>, Vec<f32>) {
    let mut b = Vec::new();
    b.extend(f16_bytes(1.0));
    b.extend(f16_bytes(0.5));
    // scales[0..4]: sc_0..3 = 1..4 (sc_0 carries sc_4's upper bits 01 in bits 6-7);
    // scales[4..8]: m_0..3 = 0..3 (m_0 carries m_4's upper bits 10);
    // scales[8..12]: low 4 bits sc_4..7 = 5..8, high 4 bits m_4..7 = 4..7
    b.extend([1 | (1 << 6), 2, 3, 4]);
    b.extend([2 << 6, 1, 2, 3]);
    b.extend((4..8u8).map(|j| (j + 1) | (j << 4)));
    b.extend([0x21u8; 128]); // low nibble 1, high nibble 2
    assert_eq!(b.len(), 144);
    let sc = [1.0, 2.0, 3.0, 4.0, 21.0, 6.0, 7.0, 8.0];
    let mins = [0.0, 1.0, 2.0, 3.0, 36.0, 5.0, 6.0, 7.0];
    let values = (0..8).flat_map(|j| {
        let q = if j % 2 == 0 { 1.0 } else { 2.0 };
        [sc[j] * q - 0.5 * mins[j]; 32]
    });
    (b, values.collect())
}

/// Three Q4_0 rows of one block each (18 bytes: every row after the first starts off a 4-byte
/// boundary), scale d_r; element j < 16 is (j - 8) d, element 16 + j is (7 - j) d.
fn hand_q4_0() -> (Vec<u8>, Vec<f32>) {
    let mut bytes = Vec::new();
    let mut values = Vec::new();
    for d in [-0.5f32, 1.0, 2.0] {
        bytes.extend(f16_bytes(d));
        bytes.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        values.extend((0..16).map(|j| (j as f32 - 8.0) * d));
        values.extend((0..16).map(|j| (7.0 - j as f32) * d));
    }
    (bytes, values)
}

#[test]
fn hand_made_blocks_decode_as_ggml_defines() {
    let Some(gpu) = common::gpu() else { return };
    for (ty, (bytes, want), rows, cols) in
        [(GgmlType::Q4_K, hand_q4_k(), 1, 256), (GgmlType::Q4_0, hand_q4_0(), 3, 32)]
    {
        // the reference agrees with the hand-computed values
        let mut reference = vec![0f32; want.len()];
        dequantize(ty, &bytes, &mut reference);
        assert_eq!(reference, want, "{ty}: kernels-ref against the hand-computed values");

        let w = QTensor::from_bytes(gpu, ty, &bytes, &[rows, cols], "hand-made").unwrap();
        assert_eq!(w.to_host(gpu).unwrap(), want, "{ty}: bytes read back");
        // every row, gathered (the last first)
        let ids: Vec<u32> = (0..rows as u32).rev().collect();
        let gids = embedding::Ids::new(gpu, &ids, rows).unwrap();
        let out = Tensor::empty(gpu, &[rows, cols], "rows").unwrap();
        quant::qembedding_forward(gpu, &out, &gids, &w).unwrap();
        let gathered: Vec<f32> =
            ids.iter().flat_map(|&r| want[r as usize * cols..][..cols].to_vec()).collect();
        assert_eq!(out.to_host(gpu).unwrap(), gathered, "{ty}: gathered rows");
        // every row dequantized
        let all = Tensor::empty(gpu, &[rows, cols], "rows").unwrap();
        quant::qdequantize(gpu, &all, &w, 0).unwrap();
        assert_eq!(all.to_host(gpu).unwrap(), want, "{ty}: dequantized rows");
        // y = ones . W^T is each row's sum; dx = 2 . W (one row of dy) is twice the rows' sum
        // (small multiples of 1/2: exact in any order of summation)
        for variant in [QmatmulVariant::Fused, QmatmulVariant::Scratch] {
            quant::with_variant(variant, || {
                let ones = Tensor::from_host(gpu, &vec![1.0; cols], &[1, cols], "ones").unwrap();
                let y = Tensor::empty(gpu, &[1, rows], "y").unwrap();
                quant::qmatmul(gpu, &y, &ones, &w, None, false).unwrap();
                let sums: Vec<f32> = want.chunks(cols).map(|r| r.iter().sum()).collect();
                assert_eq!(y.to_host(gpu).unwrap(), sums, "{ty} {variant:?}: row sums");
                let twos = Tensor::from_host(gpu, &vec![2.0; rows], &[1, rows], "dy").unwrap();
                let dx = Tensor::empty(gpu, &[1, cols], "dx").unwrap();
                quant::qmatmul_dx(gpu, &dx, &twos, &w, false).unwrap();
                let cols_sum: Vec<f32> =
                    (0..cols).map(|j| (0..rows).map(|r| 2.0 * want[r * cols + j]).sum()).collect();
                assert_eq!(dx.to_host(gpu).unwrap(), cols_sum, "{ty} {variant:?}: dx");
            });
        }
    }
    // the sums the hand-made Q4_K block gives: 32 * (1 + 3.5 + 2 + 6.5 + 3 + 9.5 + 4 + 12.5)
    assert_eq!(hand_q4_k().1.iter().sum::<f32>(), 1344.0);
}

/// The ways the products are checked: each variant, and the scratch one with room for only 17
/// of W's rows at a time (blocks that end inside W's chunks and the output's column chunks).
fn variants(k: usize) -> [(QmatmulVariant, Option<usize>); 3] {
    [
        (QmatmulVariant::Fused, None),
        (QmatmulVariant::Scratch, None),
        (QmatmulVariant::Scratch, Some(17 * k * 4)),
    ]
}

/// `f` under `variant`, with the scratch limited to `limit` bytes if given.
fn under<R>(variant: QmatmulVariant, limit: Option<usize>, f: impl FnOnce() -> R) -> R {
    quant::with_variant(variant, || match limit {
        Some(bytes) => quant::with_scratch_limit(bytes, f),
        None => f(),
    })
}

/// Every storage type on a layer-sized product (37 tokens, 96 outputs, K = 768), W in three
/// chunks, the logits-like output in column chunks: forward (then added into), dX (then
/// added into) under both variants, the dequantized rows, and the gather.
#[test]
fn every_type_against_the_reference() {
    let Some(gpu) = common::gpu() else { return };
    let (m, n, k) = (37, 96, 768);
    let mut rng = StdRng::seed_from_u64(9);
    let mut failures = Vec::new();
    for ty in QUANT_TYPES {
        let bytes = random_blocks(ty, n * k, rng.random());
        let mut wv = vec![0f32; n * k];
        dequantize(ty, &bytes, &mut wv);
        let w = QTensor::from_bytes_split(gpu, ty, &bytes, &[n, k], 40, "W").unwrap();
        assert_eq!(w.chunks().len(), 3);
        assert_eq!(w.gpu_bytes(), ty.bytes_for(n * k).unwrap() as u64);

        let (x, bias, dy) = (uniform(&mut rng, m * k), uniform(&mut rng, n), uniform(&mut rng, m * n));
        let gx = Tensor::from_host(gpu, &x, &[m, k], "x").unwrap();
        let gbias = Tensor::from_host(gpu, &bias, &[n], "bias").unwrap();
        let gdy = Tensor::from_host_split(gpu, &dy, &[m, n], Split::Cols, 50, "dy").unwrap();
        let mut y = vec![0f32; m * n];
        let d = kr::MatmulDims { batch: 1, m, n, k, trans_a: false, trans_b: true };
        kr::matmul_forward(&mut y, &x, &wv, Some(&bias), d);
        let mut dx = vec![0f32; m * k];
        let d = kr::MatmulDims { batch: 1, m, n: k, k: n, trans_a: false, trans_b: false };
        kr::matmul_forward(&mut dx, &dy, &wv, None, d);
        let twice = |v: &[f32]| v.iter().map(|a| 2.0 * a).collect::<Vec<f32>>();

        for (variant, limit) in variants(k) {
            let name = format!("{ty} {variant:?}{}", limit.map(|_| " 17-row blocks").unwrap_or_default());
            let mut check = |what: &str, got: &Tensor, want: &[f32], tol: f64| {
                let err = rel_err(&got.to_host(gpu).unwrap(), want);
                if err > tol {
                    failures.push(format!("{what} {name}: {err:e} > {tol:e}"));
                }
            };
            under(variant, limit, || {
                let gy = Tensor::empty_split(gpu, &[m, n], Split::Cols, 50, "y").unwrap();
                gy.fill(gpu, f32::NAN).unwrap();
                quant::qmatmul(gpu, &gy, &gx, &w, Some(&gbias), false).unwrap();
                check("qmatmul", &gy, &y, tol(k));
                quant::qmatmul(gpu, &gy, &gx, &w, Some(&gbias), true).unwrap();
                check("qmatmul accumulated", &gy, &twice(&y), tol(k));

                let gdx = Tensor::empty(gpu, &[m, k], "dx").unwrap();
                gdx.fill(gpu, f32::NAN).unwrap();
                quant::qmatmul_dx(gpu, &gdx, &gdy, &w, false).unwrap();
                check("qmatmul_dx", &gdx, &dx, tol(n));
                quant::qmatmul_dx(gpu, &gdx, &gdy, &w, true).unwrap();
                check("qmatmul_dx accumulated", &gdx, &twice(&dx), tol(n));
            });
        }

        // rows 30..75 dequantized (across two chunk boundaries), as the reference decodes them
        let rows = Tensor::empty(gpu, &[45, k], "rows").unwrap();
        rows.fill(gpu, f32::NAN).unwrap();
        quant::qdequantize(gpu, &rows, &w, 30).unwrap();
        let err = rel_err(&rows.to_host(gpu).unwrap(), &wv[30 * k..75 * k]);
        if err > f32::EPSILON as f64 {
            failures.push(format!("qdequantize {ty}: {err:e} > {:e}", f32::EPSILON));
        }

        let ids: Vec<u32> = (0..64).map(|_| rng.random_range(0..n as u32)).collect();
        let gids = embedding::Ids::new(gpu, &ids, n).unwrap();
        let gout = Tensor::empty(gpu, &[ids.len(), k], "rows").unwrap();
        gout.fill(gpu, f32::NAN).unwrap();
        quant::qembedding_forward(gpu, &gout, &gids, &w).unwrap();
        let mut want = vec![0f32; ids.len() * k];
        kr::embedding_forward(&mut want, &ids, &wv, k);
        let err = rel_err(&gout.to_host(gpu).unwrap(), &want);
        if err > f32::EPSILON as f64 {
            failures.push(format!("qembedding {ty}: {err:e} > {:e}", f32::EPSILON));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// `Auto` runs the fused kernels below `SCRATCH_MIN_ROWS` rows of x and the scratch variant
/// from there: its outputs equal, bit for bit, those of the variant it should have picked
/// (the two sum in different orders, so they differ from each other in the last bits).
/// Also: a bad `POCKETTUNE_QMATMUL` value is refused with the accepted ones.
#[test]
fn auto_picks_fused_for_few_rows_and_scratch_for_many() {
    let Some(gpu) = common::gpu() else { return };
    let (n, k) = (64, 512);
    let mut rng = StdRng::seed_from_u64(11);
    let bytes = random_blocks(GgmlType::Q4_K, n * k, 5);
    let w = QTensor::from_bytes(gpu, GgmlType::Q4_K, &bytes, &[n, k], "W").unwrap();
    for m in [SCRATCH_MIN_ROWS - 1, SCRATCH_MIN_ROWS] {
        let x = Tensor::from_host(gpu, &uniform(&mut rng, m * k), &[m, k], "x").unwrap();
        let dy = Tensor::from_host(gpu, &uniform(&mut rng, m * n), &[m, n], "dy").unwrap();
        // (the scratch in blocks of 5 rows of W: dx's sum then adds partial sums, which the
        // fused kernel does not, so that dx too tells the variants apart)
        let run = |variant| {
            under(variant, Some(5 * k * 4), || {
                let y = Tensor::empty(gpu, &[m, n], "y").unwrap();
                quant::qmatmul(gpu, &y, &x, &w, None, false).unwrap();
                let dx = Tensor::empty(gpu, &[m, k], "dx").unwrap();
                quant::qmatmul_dx(gpu, &dx, &dy, &w, false).unwrap();
                (y.to_host(gpu).unwrap(), dx.to_host(gpu).unwrap())
            })
        };
        let (fused, scratch, auto) =
            (run(QmatmulVariant::Fused), run(QmatmulVariant::Scratch), run(QmatmulVariant::Auto));
        assert!(fused.0 != scratch.0, "y: the variants must be told apart by their rounding");
        assert!(fused.1 != scratch.1, "dx: the variants must be told apart by their rounding");
        let want = if m < SCRATCH_MIN_ROWS { &fused } else { &scratch };
        assert!(auto == *want, "auto at {m} rows is not the variant it should pick");
    }
    let err = QmatmulVariant::parse("fast").unwrap_err().to_string();
    assert!(err.contains("POCKETTUNE_QMATMUL") && err.contains("fused, scratch or auto"), "{err}");
}

/// A tied embedding and LM head of a real vocabulary, above the binding limit: rows gathered
/// from every chunk, logits `x (3, C) . E^T` in column chunks, and their dX
/// `dlogits (3, V) . E` (a sum over the whole vocabulary), by the fused kernels and by the
/// scratch variant (W in blocks of 32 MiB of f32 that end inside the chunks of E and of the
/// logits).
fn vocab_table(ty: GgmlType, rows: usize, cols: usize) {
    let Some(gpu) = common::gpu() else { return };
    let t = QuantVocab::new(gpu, ty, rows, cols, 0x9e3).unwrap();
    let bytes = ty.bytes_for(rows * cols).unwrap() as u64;
    assert!(bytes > gpu.max_binding(), "{ty}: {bytes} bytes must pass the binding limit");
    let rows_per_chunk = gpu.max_binding() as usize / t.table.row_bytes();
    assert_eq!(t.table.chunks().len(), rows.div_ceil(rows_per_chunk), "{ty}: chunks of whole rows");
    let gather = t.gather_err(gpu, 256, 1).unwrap();
    assert!(gather <= f32::EPSILON as f64, "{ty} gather rel err {gather:e}");
    for variant in [QmatmulVariant::Fused, QmatmulVariant::Scratch] {
        let (logits, dx) = quant::with_variant(variant, || {
            (t.logits_err(gpu, 3, 2, Precision::F32).unwrap(), t.dx_err(gpu, 3, 3).unwrap())
        });
        eprintln!(
            "{ty} {rows}x{cols} in {} chunks, {variant:?}: gather {gather:.1e}, logits {logits:.1e}, dX {dx:.1e}",
            t.table.chunks().len()
        );
        assert!(logits <= tol(cols), "{ty} {variant:?} logits rel err {logits:e} > {:e}", tol(cols));
        assert!(dx <= tol(rows), "{ty} {variant:?} dX rel err {dx:e} > {:e}", tol(rows));
        // the logits with f16 products (`--precision mixed` on a frozen LM head), held to
        // MIXED_TOL of the largest sum of absolute products
        assert!(gpu.has_f16() || std::env::var_os("CI").is_none(), "CI's GPU has no shader_f16");
        if gpu.has_f16() {
            let mixed = quant::with_variant(variant, || t.logits_err(gpu, 3, 4, Precision::Mixed).unwrap());
            eprintln!("{ty} {variant:?} mixed: logits {mixed:.1e} of the sums of |products|");
            assert!(mixed <= MIXED_TOL, "{ty} {variant:?} mixed logits err {mixed:e} > {MIXED_TOL:e}");
        }
    }
}

#[test]
fn gemma3_embedding_q8_0_above_the_binding_limit() {
    vocab_table(GgmlType::Q8_0, 262_144, 640);
}

#[test]
fn gemma3_embedding_f16_above_the_binding_limit() {
    vocab_table(GgmlType::F16, 262_144, 640);
}

#[test]
fn k_quant_table_q4_k_above_the_binding_limit() {
    vocab_table(GgmlType::Q4_K, 128_256, 2048);
}

#[test]
fn k_quant_table_q6_k_above_the_binding_limit() {
    vocab_table(GgmlType::Q6_K, 128_256, 2048);
}

/// `--base-dtype f16` on a safetensors weight: values rounded to nearest-even half precision.
#[test]
fn from_f32_rounds_to_the_half_type() {
    let Some(gpu) = common::gpu() else { return };
    let mut rng = StdRng::seed_from_u64(4);
    let data = uniform(&mut rng, 5 * 7);
    for ty in [GgmlType::F16, GgmlType::BF16] {
        let w = QTensor::from_f32(gpu, ty, &data, &[5, 7], "w").unwrap();
        let want: Vec<f32> = match ty {
            GgmlType::F16 => data.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
            _ => data.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect(),
        };
        assert_eq!(w.to_host(gpu).unwrap(), want, "{ty}");
        assert_eq!(w.gpu_bytes(), 72, "{ty}: 70 bytes, padded to 4");
    }
    let err = QTensor::from_f32(gpu, GgmlType::Q4_0, &data, &[5, 7], "w").unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
}

#[test]
fn bad_weights_get_clear_errors() {
    let Some(gpu) = common::gpu() else { return };
    let bytes = random_blocks(GgmlType::Q4_K, 2 * 256, 1);
    let shape_err = |r: pockettune::Result<QTensor>| match r {
        Err(Error::Shape { op, detail }) => format!("{op}: {detail}"),
        other => panic!("expected a shape error, got {other:?}"),
    };
    let e =
        shape_err(QTensor::from_bytes(gpu, GgmlType::Q4_K, &bytes[..200], &[2, 256], "blk.0.ffn_up.weight"));
    assert!(e.contains("blk.0.ffn_up.weight") && e.contains("288 bytes, got 200"), "{e}");
    let e = shape_err(QTensor::from_bytes(gpu, GgmlType::Q4_K, &bytes, &[4, 128], "token_embd.weight"));
    assert!(e.contains("token_embd.weight") && e.contains("not a whole number of Q4_K blocks"), "{e}");
    let e = shape_err(QTensor::from_bytes(gpu, GgmlType::F32, &bytes, &[2, 72], "output.weight"));
    assert!(e.contains("F32"), "{e}");

    let w = QTensor::from_bytes(gpu, GgmlType::Q4_K, &bytes, &[2, 256], "w").unwrap();
    for variant in [QmatmulVariant::Fused, QmatmulVariant::Scratch] {
        quant::with_variant(variant, || {
            let x = Tensor::from_host(gpu, &[0.0; 3 * 255], &[3, 255], "x").unwrap();
            let y = Tensor::empty(gpu, &[3, 2], "y").unwrap();
            let err = quant::qmatmul(gpu, &y, &x, &w, None, false).unwrap_err();
            assert!(matches!(err, Error::Shape { .. }), "{variant:?}: {err}");
            // x split by columns inside a block of W
            let x = Tensor::from_host_split(gpu, &[0.0; 3 * 256], &[3, 256], Split::Cols, 100, "x").unwrap();
            let err = quant::qmatmul(gpu, &y, &x, &w, None, false).unwrap_err();
            assert!(err.to_string().contains("inside a Q4_K block"), "{variant:?}: {err}");
            // dx split by columns off a multiple of 8
            let dy = Tensor::from_host(gpu, &[0.0; 3 * 2], &[3, 2], "dy").unwrap();
            let dx = Tensor::empty_split(gpu, &[3, 256], Split::Cols, 100, "dx").unwrap();
            let err = quant::qmatmul_dx(gpu, &dx, &dy, &w, false).unwrap_err();
            assert!(err.to_string().contains("not a multiple of 8"), "{variant:?}: {err}");
        });
    }
    // rows past W
    let out = Tensor::empty(gpu, &[2, 256], "rows").unwrap();
    let err = quant::qdequantize(gpu, &out, &w, 1).unwrap_err();
    assert!(matches!(err, Error::Shape { .. }) && err.to_string().contains("rows 1..3"), "{err}");
    // an id past the table (the ids were checked against a larger vocabulary)
    let ids = embedding::Ids::new(gpu, &[0, 5], 10).unwrap();
    let out = Tensor::empty(gpu, &[2, 256], "out").unwrap();
    let err = quant::qembedding_forward(gpu, &out, &ids, &w).unwrap_err();
    assert!(err.to_string().contains("id 5 at position 1"), "{err}");
}
