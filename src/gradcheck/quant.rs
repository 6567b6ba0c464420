//! The self-test of the quantized-weight kernels (`kernels::quant`): `qmatmul`, `qmatmul_dx` and
//! `qembedding` for every storage type a frozen base can have, one report row per kernel and
//! type (`qmatmul Q4_K`); the products run by both variants, the fused kernels (`qmatmul Q4_K`)
//! and the scratch one with one matmul kernel per shader (`qmatmul scratch Q4_K`). The reference is
//! kernels-ref's ggml dequantizer followed by its f64 matrix product or a row copy.
//!
//! `qmatmul_mixed` runs the same products with f16 products (`--precision mixed`), held to
//! [`MIXED_TOL`](super::MIXED_TOL) of the sums of absolute products.
//!
//! Tolerance: the crate's [`TOL`](super::TOL), `1e-4` of the largest reference value. The kernel
//! sums `q * x` over a sub-block in f32 and scales once, so it differs from the reference by f32
//! rounding alone, which grows like `sqrt(K)`: about `eps * sqrt(K) / 8` of the largest output for
//! random data (eps = 2^-23: 1e-7 at K = 32, 8e-6 at K = 262,144, the longest sum a model has).
//! A decoding mistake (one wrong bit of one field) moves values by far more than 1e-4. The
//! gather (and the scratch variant's dequantizer) decodes exactly as the reference does, up to
//! the one rounding a fused multiply-add saves; the scratch variant's f32 product rounds like
//! the f32 matmul.

use super::{absolute, rel_err, Probe};
use crate::error::Result;
use crate::gpu::{Gpu, MatmulKernel, Precision, QTensor, Split, Tensor};
use crate::kernels::quant::QmatmulVariant;
use crate::kernels::{embedding, matmul, quant, LOOP_SPAN};
use kernels_ref as kr;
use kernels_ref::quant::{dequantize, random_blocks, GgmlType};
use rand::Rng;

/// Every storage type of a frozen weight that the kernels read (all but F32, which is a
/// plain [`Tensor`]).
pub const QUANT_TYPES: [GgmlType; 10] = [
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

/// The full tier's tables above the binding limit, as tied embedding and LM head: (type, rows,
/// columns). Gemma 3's 262,144 x 640 embedding in Q8_0; the K-quants need rows of a multiple of
/// 256, so Q6_K gets Llama 3.2 1B's 128,256 x 2048 table. (tests/quant.rs adds F16 and Q4_K.)
pub const VOCAB_TABLES: [(GgmlType, usize, usize); 2] =
    [(GgmlType::Q8_0, super::GEMMA3_VOCAB, super::GEMMA3_270M_HIDDEN), (GgmlType::Q6_K, 128_256, 2048)];

/// A random weight of `ty` on the GPU in chunks of at most `chunk` rows, and its values.
fn weight(
    p: &mut Probe,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    chunk: usize,
) -> Result<(QTensor, Vec<f32>, Vec<u8>)> {
    let bytes = random_blocks(ty, rows * cols, p.rng.random());
    let mut w = vec![0f32; rows * cols];
    dequantize(ty, &bytes, &mut w);
    let q = QTensor::from_bytes_split(p.gpu, ty, &bytes, &[rows, cols], chunk, "gradcheck weight")?;
    Ok((q, w, bytes))
}

/// |scale * q| of every weight: `bytes` dequantized with each block's offset (Q4_1's and Q5_1's
/// m, Q4_K's and Q5_K's dmin: the f16 at bytes 2..4 of every block of these types) set to 0.
/// `quant_mixed` takes the products `q * x` in f16 and applies the offsets in f32, so the
/// sums of these times |x| are the scale of its rounding (`super::MIXED_TOL`).
fn scaled_quants_abs(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut bytes = bytes.to_vec();
    if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K) {
        for block in bytes.chunks_mut(ty.block_bytes()) {
            block[2..4].fill(0);
        }
    }
    let mut w = vec![0f32; n];
    dequantize(ty, &bytes, &mut w);
    absolute(&w)
}

/// Row lengths checked for `ty`: whole blocks, and ragged ones for the float types.
fn widths(ty: GgmlType) -> [usize; 4] {
    match ty.block_elems() {
        1 => [1, 7, 13, 97],
        qk => [qk, 2 * qk, 3 * qk, 5 * qk],
    }
}

/// A tensor of `data` stored with `split` (at most `per` rows or columns a chunk), or unchunked.
fn upload(p: &Probe, data: &[f32], shape: &[usize], split: Option<(Split, usize)>) -> Result<Tensor> {
    match split {
        Some((s, per)) => Tensor::from_host_split(p.gpu, data, shape, s, per, "gradcheck input"),
        None => p.up(data, shape),
    }
}

fn out(p: &Probe, shape: &[usize], split: Option<(Split, usize)>) -> Result<Tensor> {
    let t = match split {
        Some((s, per)) => Tensor::empty_split(p.gpu, shape, s, per, "gradcheck output")?,
        None => Tensor::empty(p.gpu, shape, "gradcheck output")?,
    };
    t.fill(p.gpu, f32::NAN)?;
    Ok(t)
}

/// One product's shapes: sizes, W rows per chunk, bias, how the f32 operands are chunked (the
/// input, then the output), and the rows of W the scratch variant may hold at a time.
struct Case {
    m: usize,
    n: usize,
    k: usize,
    w_chunk: usize,
    bias: bool,
    a_split: Option<(Split, usize)>,
    c_split: Option<(Split, usize)>,
    scratch_rows: Option<usize>,
}

/// `MxK.(NxK TYPE)^T` for a product with W^T, `MxN.(NxK TYPE)` for one with W, then the
/// chunking of W, the input and the output.
fn shape(c: &Case, ty: GgmlType, dx: bool) -> String {
    let chunked = |s: Option<(Split, usize)>| s.map(|(s, n)| format!(" {s:?}/{n}")).unwrap_or_default();
    let w = if c.w_chunk == usize::MAX { String::new() } else { format!(" W rows/{}", c.w_chunk) };
    let (m, n, k) = (c.m, c.n, c.k);
    let product = if dx { format!("{m}x{n}.({n}x{k} {ty})") } else { format!("{m}x{k}.({n}x{k} {ty})^T") };
    let bias = if c.bias && !dx { "+b" } else { "" };
    format!("{product}{bias}{w}{}{}", chunked(c.a_split), chunked(c.c_split))
}

/// Shapes of `qmatmul`/`qmatmul_dx` for `ty`: tiny and ragged, every operand chunked, a random
/// one, and the summed dimension past one dispatch's loop span.
fn cases(p: &mut Probe, ty: GgmlType, dx: bool) -> Vec<Case> {
    let [k0, k1, k2, k3] = widths(ty);
    let qk = ty.block_elems();
    let plain = |m, n, k, bias| Case {
        m,
        n,
        k,
        w_chunk: usize::MAX,
        bias,
        a_split: None,
        c_split: None,
        scratch_rows: None,
    };
    let mut cases = vec![plain(1, 1, k0, false), plain(3, 5, k1, true)];
    // W in chunks of 10 rows, the input by rows and the output by columns, and the other way;
    // the scratch variant's row blocks of 7 end inside W's chunks and the output's.
    cases.push(Case {
        w_chunk: 10,
        scratch_rows: Some(7),
        a_split: Some((Split::Rows, 3)),
        // (dx's column chunks start at multiples of 8 for a block type, anywhere for a float)
        c_split: Some((Split::Cols, if qk == 1 { 5 } else { 16 })),
        ..plain(7, 33, k2, true)
    });
    // a column chunk of x holds whole blocks of W
    let cols = qk.max(16);
    cases.push(Case {
        a_split: Some((Split::Cols, cols)),
        c_split: Some((Split::Rows, 5)),
        ..plain(17, 70, k3, false)
    });
    let k = if qk == 1 { p.size(100) } else { qk * p.size(4) };
    cases.push(plain(p.size(20), p.size(80), k, true));
    if dx {
        // N is dx's sum: past the loop span, and over W's chunks and dy's column chunks (and
        // the scratch variant's row blocks: 0, 7000, 14000, 20000, 27000, with dy's at 30000)
        cases.push(Case {
            w_chunk: 20_000,
            scratch_rows: Some(7000),
            a_split: Some((Split::Cols, 30_000)),
            ..plain(2, LOOP_SPAN + 100, qk.max(5), false)
        });
    } else {
        // K past the loop span
        let k = if qk == 1 { LOOP_SPAN + 3 } else { LOOP_SPAN + 256 };
        cases.push(plain(2, 3, k, true));
    }
    cases
}

/// How the products are run: the fused kernels (rows `qmatmul Q4_K`), and the scratch variant
/// with one matmul kernel per shader (rows `qmatmul scratch Q4_K`, shapes tagged with
/// the matmul kernel).
fn variants(gpu: &Gpu) -> Vec<(QmatmulVariant, Option<MatmulKernel>)> {
    let mut v = vec![(QmatmulVariant::Fused, None)];
    let kernels = MatmulKernel::one_per_shader(gpu.matmul_kernels());
    v.extend(kernels.into_iter().map(|k| (QmatmulVariant::Scratch, Some(k))));
    v
}

fn label(op: &str, variant: QmatmulVariant, ty: GgmlType) -> String {
    match variant {
        QmatmulVariant::Scratch => format!("{op} scratch {ty}"),
        _ => format!("{op} {ty}"),
    }
}

/// `f` under `variant` (and the matmul `kernel`), the scratch held to the case's rows of W.
fn run<R>(variant: QmatmulVariant, kernel: Option<MatmulKernel>, c: &Case, f: impl FnOnce() -> R) -> R {
    let limited = || match c.scratch_rows {
        None => f(),
        Some(rows) => quant::with_scratch_limit(rows * c.k * 4, f),
    };
    quant::with_variant(variant, || match kernel {
        Some(k) => matmul::with_kernel(k, limited),
        None => limited(),
    })
}

/// The shape, tagged with the matmul kernel the scratch variant ran.
fn tagged(shape: String, kernel: Option<MatmulKernel>) -> String {
    match kernel {
        Some(k) => format!("[{}] {shape}", k.name()),
        None => shape,
    }
}

/// `qmatmul` in f32, or (`qmatmul_mixed`, [`MIXED_TOL`](super::MIXED_TOL)) with its products in
/// f16 as `--precision mixed` runs a linear layer's forward product on a frozen weight: the
/// fused kernel's `quant_mixed` form, and the scratch variant's mixed matmul.
pub(super) fn check_qmatmul(p: &mut Probe, precision: Precision) -> Result<()> {
    let op = match precision {
        Precision::F32 => "qmatmul",
        Precision::Mixed => "qmatmul_mixed",
    };
    for ty in QUANT_TYPES {
        for (variant, kernel) in variants(p.gpu) {
            if precision == Precision::Mixed && kernel.is_some_and(|k| k.mixed_form() != k) {
                continue; // its mixed form is another kernel's, checked already
            }
            p.label = Some(label(op, variant, ty));
            for (i, c) in cases(p, ty, false).into_iter().enumerate() {
                let shape = tagged(shape(&c, ty, false), kernel);
                let (w, wv, bytes) = weight(p, ty, c.n, c.k, c.w_chunk)?;
                let (x, bias) = (p.uniform(c.m * c.k), p.uniform(c.n));
                let (gx, gbias) = (upload(p, &x, &[c.m, c.k], c.a_split)?, p.up(&bias, &[c.n])?);
                let gy = out(p, &[c.m, c.n], c.c_split)?;
                let b = c.bias.then_some(&gbias);
                let gpu = p.gpu;
                let product =
                    |acc| matmul::with_precision(precision, || quant::qmatmul(gpu, &gy, &gx, &w, b, acc));
                run(variant, kernel, &c, || product(false))?;
                let d = kr::MatmulDims { batch: 1, m: c.m, n: c.n, k: c.k, trans_a: false, trans_b: true };
                let mut y = vec![0f32; c.m * c.n];
                kr::matmul_forward(&mut y, &x, &wv, c.bias.then_some(&bias[..]), d);
                // the scale of the error: f32's is the largest output, f16 products' the sums
                // of absolute products (for the scratch variant, of |W| itself)
                let abs = (precision == Precision::Mixed).then(|| {
                    let wa = match variant {
                        QmatmulVariant::Scratch => absolute(&wv),
                        _ => scaled_quants_abs(ty, &bytes, wv.len()),
                    };
                    let (xa, ba) = (absolute(&x), absolute(&bias));
                    let mut abs = vec![0f32; c.m * c.n];
                    kr::matmul_forward(&mut abs, &xa, &wa, c.bias.then_some(&ba[..]), d);
                    abs
                });
                let record = |p: &mut Probe, what: &str, want: &[f32], times: f32| match &abs {
                    Some(abs) => {
                        let abs: Vec<f32> = abs.iter().map(|v| times * v).collect();
                        let got = gy.to_host(p.gpu)?;
                        p.push("forward", &shape, what, super::mixed_err(&got, want, &abs));
                        Ok(())
                    }
                    None => p.record("forward", &shape, what, &gy, want),
                };
                record(p, "", &y, 1.0)?;
                if i == 2 {
                    // adding into y (the LoRA branch's output is added this way)
                    run(variant, kernel, &c, || product(true))?;
                    let twice: Vec<f32> = y.iter().map(|v| 2.0 * v).collect();
                    record(p, "accumulated", &twice, 2.0)?;
                }
            }
            // the LM head at real vocabularies, by the fused kernel and by the scratch variant
            // with the device's own matmul kernel (its mixed form under mixed precision)
            let device = match precision {
                Precision::F32 => p.gpu.matmul_kernel(),
                Precision::Mixed => p.gpu.matmul_kernel().mixed_form(),
            };
            if p.full() && kernel.is_none_or(|k| k == device) {
                for &(t, v, c) in VOCAB_TABLES.iter().filter(|t| t.0 == ty) {
                    let table = QuantVocab::new(p.gpu, t, v, c, p.rng.random())?;
                    let seed = p.rng.random();
                    let err = quant::with_variant(variant, || table.logits_err(p.gpu, 3, seed, precision))?;
                    p.push("forward", &format!("LM head 3x{c}.({v}x{c} {t})^T"), "logits", err);
                }
            }
        }
    }
    p.label = None;
    Ok(())
}

pub(super) fn check_qmatmul_dx(p: &mut Probe) -> Result<()> {
    for ty in QUANT_TYPES {
        for (variant, kernel) in variants(p.gpu) {
            p.label = Some(label("qmatmul_dx", variant, ty));
            for (i, c) in cases(p, ty, true).into_iter().enumerate() {
                let shape = tagged(shape(&c, ty, true), kernel);
                let (w, wv, _) = weight(p, ty, c.n, c.k, c.w_chunk)?;
                let dy = p.uniform(c.m * c.n);
                let gdy = upload(p, &dy, &[c.m, c.n], c.a_split)?;
                let gdx = out(p, &[c.m, c.k], c.c_split)?;
                run(variant, kernel, &c, || quant::qmatmul_dx(p.gpu, &gdx, &gdy, &w, false))?;
                let d = kr::MatmulDims { batch: 1, m: c.m, n: c.k, k: c.n, trans_a: false, trans_b: false };
                let mut dx = vec![0f32; c.m * c.k];
                kr::matmul_forward(&mut dx, &dy, &wv, None, d);
                p.record("backward", &shape, "dX", &gdx, &dx)?;
                if i == 2 {
                    // gradient accumulation over micro-batches
                    run(variant, kernel, &c, || quant::qmatmul_dx(p.gpu, &gdx, &gdy, &w, true))?;
                    let twice: Vec<f32> = dx.iter().map(|v| 2.0 * v).collect();
                    p.record("backward", &shape, "dX accumulated", &gdx, &twice)?;
                }
            }
            if p.full() && kernel.is_none_or(|k| k == p.gpu.matmul_kernel()) {
                for &(t, v, c) in VOCAB_TABLES.iter().filter(|t| t.0 == ty) {
                    let table = QuantVocab::new(p.gpu, t, v, c, p.rng.random())?;
                    let seed = p.rng.random();
                    let err = quant::with_variant(variant, || table.dx_err(p.gpu, 3, seed))?;
                    p.push("backward", &format!("LM head dX 3x{v}.({v}x{c} {t})"), "dX", err);
                }
            }
        }
    }
    p.label = None;
    Ok(())
}

pub(super) fn check_qembedding(p: &mut Probe) -> Result<()> {
    for ty in QUANT_TYPES {
        p.label = Some(format!("qembedding {ty}"));
        let [c0, c1, c2, _] = widths(ty);
        // (vocabulary, tokens, width, table rows per chunk); the last passes 65,535
        // workgroups of one grid dimension
        let mut cases = vec![(1, 1, c0, usize::MAX), (7, 13, c1, usize::MAX), (50, 100, c2, 7)];
        let v = p.size(300);
        cases.push((v, p.size(200), widths(ty)[p.rng.random_range(0..4)], p.size(v)));
        if matches!(ty, GgmlType::F16 | GgmlType::Q4_0 | GgmlType::Q4_K) {
            // ids x columns past 65,535 workgroups in one grid dimension (one type of each
            // kind: the grid is the same for all)
            cases.push((50, 70_001, 256, 20));
        }
        for (v, n, c, chunk) in cases {
            let rows = if chunk == usize::MAX { String::new() } else { format!(" rows/{chunk}") };
            let shape = format!("V{v} N{n} C{c} {ty}{rows}");
            let (table, tv, _) = weight(p, ty, v, c, chunk)?;
            let ids: Vec<u32> = (0..n).map(|_| p.rng.random_range(0..v as u32)).collect();
            let gids = embedding::Ids::new(p.gpu, &ids, v)?;
            let gout = p.out(&[n, c])?;
            quant::qembedding_forward(p.gpu, &gout, &gids, &table)?;
            let mut want = vec![0f32; n * c];
            kr::embedding_forward(&mut want, &ids, &tv, c);
            p.record("forward", &shape, "", &gout, &want)?;
        }
        if p.full() {
            for &(t, v, c) in VOCAB_TABLES.iter().filter(|t| t.0 == ty) {
                let table = QuantVocab::new(p.gpu, t, v, c, p.rng.random())?;
                let err = table.gather_err(p.gpu, 512, p.rng.random())?;
                p.push("forward", &format!("V{v} N512 C{c} {t}"), "", err);
            }
        }
    }
    p.label = None;
    Ok(())
}

/// A random table of a real vocabulary on the GPU, as a tied embedding and LM head, with its
/// bytes for the reference. The reference dequantizes it a slab of rows at a time, so the f32
/// copy of the whole table (up to 1 GB) is never held.
pub struct QuantVocab {
    pub table: QTensor,
    bytes: Vec<u8>,
}

/// Table rows the reference dequantizes at a time.
const SLAB: usize = 8192;

impl QuantVocab {
    pub fn new(gpu: &Gpu, ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Result<QuantVocab> {
        let bytes = random_blocks(ty, rows * cols, seed);
        let table = QTensor::from_bytes(gpu, ty, &bytes, &[rows, cols], "vocabulary table")?;
        Ok(QuantVocab { table, bytes })
    }

    fn dims(&self) -> (usize, usize) {
        (self.table.rows(), self.table.cols())
    }

    /// Rows `r0..r1` dequantized by the reference.
    fn rows(&self, r0: usize, r1: usize) -> Vec<f32> {
        let rb = self.table.row_bytes();
        let mut out = vec![0f32; (r1 - r0) * self.table.cols()];
        dequantize(self.table.ty(), &self.bytes[r0 * rb..r1 * rb], &mut out);
        out
    }

    /// Error of gathering `n` rows: the first and last row of every chunk, the rest random.
    pub fn gather_err(&self, gpu: &Gpu, n: usize, seed: u64) -> Result<f64> {
        let (v, c) = self.dims();
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
        let mut ids: Vec<u32> = self
            .table
            .chunks()
            .iter()
            .flat_map(|ch| [ch.start, ch.start + ch.len - 1])
            .map(|r| r as u32)
            .collect();
        while ids.len() < n {
            ids.push(rng.random_range(0..v as u32));
        }
        let gids = embedding::Ids::new(gpu, &ids, v)?;
        let gout = Tensor::empty(gpu, &[ids.len(), c], "gathered rows")?;
        gout.fill(gpu, f32::NAN)?;
        quant::qembedding_forward(gpu, &gout, &gids, &self.table)?;
        let want: Vec<f32> = ids.iter().flat_map(|&id| self.rows(id as usize, id as usize + 1)).collect();
        Ok(rel_err(&gout.to_host(gpu)?, &want))
    }

    /// Error of the logits `x (m, C) . table^T`, written in the column chunks of a chunked
    /// LM head's output, with the products in f32 or (`Precision::Mixed`, as `--precision mixed`
    /// runs a frozen LM head) in f16. An f32 product's error is against the largest logit; a
    /// mixed one's against the largest sum of absolute products ([`super::mixed_err`]), made
    /// as [`check_qmatmul`] makes it for the variant that runs (the fused kernel's scaled
    /// quants, the scratch variant's dequantized weights).
    pub fn logits_err(&self, gpu: &Gpu, m: usize, seed: u64, precision: Precision) -> Result<f64> {
        let (v, c) = self.dims();
        let ty = self.table.ty();
        let x = uniform(m * c, seed);
        let gx = Tensor::from_host(gpu, &x, &[m, c], "hidden states")?;
        let gy = Tensor::empty_split(gpu, &[m, v], Split::Cols, 52_428, "logits")?;
        gy.fill(gpu, f32::NAN)?;
        matmul::with_precision(precision, || quant::qmatmul(gpu, &gy, &gx, &self.table, None, false))?;
        let mixed = precision == Precision::Mixed;
        let scratch = quant::use_scratch(m)?;
        let xa = absolute(&x);
        let (mut want, mut abs) = (vec![0f32; m * v], vec![0f32; if mixed { m * v } else { 0 }]);
        for r0 in (0..v).step_by(SLAB) {
            let r1 = (r0 + SLAB).min(v);
            let w = self.rows(r0, r1);
            let d = kr::MatmulDims { batch: 1, m, n: r1 - r0, k: c, trans_a: false, trans_b: true };
            let slab = |out: &mut [f32], x: &[f32], w: &[f32]| {
                let mut y = vec![0f32; m * (r1 - r0)];
                kr::matmul_forward(&mut y, x, w, None, d);
                for i in 0..m {
                    out[i * v + r0..i * v + r1].copy_from_slice(&y[i * (r1 - r0)..(i + 1) * (r1 - r0)]);
                }
            };
            slab(&mut want, &x, &w);
            if mixed {
                let wa = if scratch {
                    absolute(&w)
                } else {
                    let rb = self.table.row_bytes();
                    scaled_quants_abs(ty, &self.bytes[r0 * rb..r1 * rb], w.len())
                };
                slab(&mut abs, &xa, &wa);
            }
        }
        let got = gy.to_host(gpu)?;
        Ok(if mixed { super::mixed_err(&got, &want, &abs) } else { rel_err(&got, &want) })
    }

    /// Error of the LM head's `dx (m, C) = dlogits (m, V) . table`, dlogits in column chunks.
    /// The reference adds the slabs' f64-accumulated products in f64.
    pub fn dx_err(&self, gpu: &Gpu, m: usize, seed: u64) -> Result<f64> {
        let (v, c) = self.dims();
        let dy = uniform(m * v, seed);
        let gdy = Tensor::from_host_split(gpu, &dy, &[m, v], Split::Cols, 52_428, "dlogits")?;
        let gdx = Tensor::empty(gpu, &[m, c], "dx")?;
        gdx.fill(gpu, f32::NAN)?;
        quant::qmatmul_dx(gpu, &gdx, &gdy, &self.table, false)?;
        let mut acc = vec![0f64; m * c];
        for r0 in (0..v).step_by(SLAB) {
            let r1 = (r0 + SLAB).min(v);
            let w = self.rows(r0, r1);
            let dys: Vec<f32> = (0..m).flat_map(|i| dy[i * v + r0..i * v + r1].iter().copied()).collect();
            let mut part = vec![0f32; m * c];
            let d = kr::MatmulDims { batch: 1, m, n: c, k: r1 - r0, trans_a: false, trans_b: false };
            kr::matmul_forward(&mut part, &dys, &w, None, d);
            acc.iter_mut().zip(&part).for_each(|(a, &p)| *a += p as f64);
        }
        let want: Vec<f32> = acc.iter().map(|&a| a as f32).collect();
        Ok(rel_err(&gdx.to_host(gpu)?, &want))
    }
}

fn uniform(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}
