//! The kernel self-test: every GPU kernel, forward and backward, against `kernels-ref` on random
//! inputs and awkward shapes (sizes of 1, primes, sizes that are no multiple of any tile or
//! workgroup size, chunked operands). The test suite and `pockettune gradcheck` both run it, so
//! a phone user checks their own driver with exactly the checks CI runs.
//!
//! Error measure, per output: `max |gpu - ref| / max |ref|`. Outputs are poisoned with NaN
//! before each GPU run, so an element the kernel forgot to write fails the check.

use crate::error::Result;
use crate::gpu::{Gpu, MatmulKernel, Precision, Split, Tensor};
use crate::kernels::{
    activation::{self, Act},
    attention::{self, Heads},
    cross_entropy, elementwise, embedding,
    matmul::{self, Dims, View},
    norm::{self, NormKind},
    optim, reduce, rope,
    rows::{self, RowReduce},
    softmax,
};
use kernels_ref as kr;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

mod quant;
pub use quant::{QuantVocab, QUANT_TYPES, VOCAB_TABLES};

/// One line of the report: one kernel in one direction over all the shapes tried.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// The kernel family, or for the quantized-weight kernels the family and storage type
    /// (`qmatmul Q4_K`).
    pub kernel: String,
    pub direction: &'static str,
    pub shapes: Vec<String>,
    pub max_rel_err: f64,
    pub worst_shape: String,
    pub tolerance: f64,
    pub pass: bool,
}

/// Every kernel family the self-test covers, in report order.
pub const KERNELS: &[&str] = &[
    "matmul",
    "matmul_chunked",
    "matmul_batched",
    "matmul_mixed",
    "softmax",
    "layernorm",
    "rmsnorm",
    "rmsnorm_gemma",
    "gelu",
    "silu",
    "softcap",
    "swiglu",
    "geglu",
    "embedding",
    "rope",
    "attention",
    "flash_attention",
    "cross_entropy",
    "add",
    "dropout",
    "half_storage",
    "reduce",
    "clip_grad_norm",
    "adamw",
    "sgd",
    "qmatmul",
    "qmatmul_mixed",
    "qmatmul_dx",
    "qembedding",
    "lm_head_loss",
];

/// The families whose kernels reduce rows (`kernels::rows`): checked with each way.
const ROW_KERNELS: &[&str] =
    &["softmax", "layernorm", "rmsnorm", "rmsnorm_gemma", "flash_attention", "cross_entropy", "lm_head_loss"];

/// How far the self-test goes. Both tiers check every kernel on small, ragged shapes and across
/// every boundary a kernel has (more than 65,535 workgroups in a dimension, rows, columns and
/// inner dimensions past 65,535 loop iterations, K of 262,144 in matmul); `Full` adds the
/// vocabulary-wide kernels at Gemma 3's real size (262,144 x 640 tensors, above the binding
/// limit), which take most of its time and a few GB of memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    #[default]
    Quick,
    Full,
}

/// Gemma 3's vocabulary and hidden size: the largest tensors a supported model trains.
pub const GEMMA3_VOCAB: usize = 262_144;
pub const GEMMA3_270M_HIDDEN: usize = 640;

/// Elementwise kernels run 256 invocations per workgroup: one element more than this needs a
/// second grid dimension.
const PAST_ONE_GRID_DIM: usize = 65_535 * 256 + 1;

/// f32 kernels are held to `max |gpu - ref| <= TOL * max |ref|`.
pub const TOL: f64 = 1e-4;

/// The mixed-precision products (`--precision mixed`: f16 products, f32 sums) against the exact
/// ones, measured against the scale of f16's rounding: `max |gpu - ref| <= MIXED_TOL * max_ij
/// sum_k |a_ik| |b_kj|` (plus |bias|; [`mixed_err`]). An f16 carries 11 significant bits, so
/// each product a * b is off by at most 3 roundings of 2^-11 (a's, b's and the product's), and
/// an output by at most `3 * 2^-11` of its sum of absolute products, whatever cancels in the
/// sum (the largest output itself can be far smaller: one output of a quantized row with
/// offsets, or one that cancels to near 0, would fail a measure against it for no fault). 2^-8
/// covers that bound and the f32 sums' error; an element dropped or misplaced is off by far
/// more.
pub const MIXED_TOL: f64 = 1.0 / 256.0;

/// Error of a mixed-precision product (see [`MIXED_TOL`]): `max |gpu - ref|` over the largest
/// sum of absolute products `abs` (computed like the reference on |A| and |B|); infinite if
/// any value is NaN or infinite.
pub fn mixed_err(gpu: &[f32], reference: &[f32], abs: &[f32]) -> f64 {
    assert!(gpu.len() == reference.len() && gpu.len() == abs.len(), "compared outputs differ in length");
    let (mut diff, mut scale) = (0f64, 0f64);
    for ((&g, &r), &a) in gpu.iter().zip(reference).zip(abs) {
        if !g.is_finite() || !r.is_finite() || !a.is_finite() {
            return f64::INFINITY;
        }
        diff = diff.max((g as f64 - r as f64).abs());
        scale = scale.max(a as f64);
    }
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}

/// The absolute values of `x`.
pub(crate) fn absolute(x: &[f32]) -> Vec<f32> {
    x.iter().map(|v| v.abs()).collect()
}

/// [`rel_err`] against at least `floor`: for values that are small differences of larger
/// terms (a loss near 0, a probability minus its one-hot 1), whose f32 error scales with the
/// terms, not with the difference.
fn rel_err_floor(gpu: &[f32], reference: &[f32], floor: f64) -> f64 {
    if !rel_err(gpu, reference).is_finite() {
        return f64::INFINITY;
    }
    let (diff, scale) = gpu.iter().zip(reference).fold((0f64, floor), |(d, s), (&g, &r)| {
        (d.max((g as f64 - r as f64).abs()), s.max((r as f64).abs()))
    });
    diff / scale
}

/// Relative error of `gpu` against `reference`: infinite if any value of either is NaN or
/// infinite (`f64::max` would drop a NaN and let it pass).
pub fn rel_err(gpu: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(gpu.len(), reference.len(), "compared outputs differ in length");
    let mut diff = 0f64;
    let mut scale = 0f64;
    for (&g, &r) in gpu.iter().zip(reference) {
        if !g.is_finite() || !r.is_finite() {
            return f64::INFINITY;
        }
        diff = diff.max((g as f64 - r as f64).abs());
        scale = scale.max((r as f64).abs());
    }
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}

/// Measurements of one kernel: (direction, shape, error) triples, folded into rows.
struct Probe<'g> {
    gpu: &'g Gpu,
    tier: Tier,
    rng: StdRng,
    /// (direction, shape, output, relative error, row label if not the family's name)
    results: Vec<(&'static str, String, String, f64, Option<String>)>,
    /// The row label results go to when it is not the family's name (the quantized-weight
    /// kernels report one row per storage type).
    label: Option<String>,
}

impl<'g> Probe<'g> {
    /// A size drawn from `1..=max`, for the random shapes tried beside the fixed ones.
    fn size(&mut self, max: usize) -> usize {
        self.rng.random_range(1..=max)
    }
    fn uniform(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.rng.random_range(-1.0f32..1.0)).collect()
    }
    fn up(&self, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        Tensor::from_host(self.gpu, data, shape, "gradcheck input")
    }
    /// An output tensor filled with NaN.
    fn out(&self, shape: &[usize]) -> Result<Tensor> {
        let t = Tensor::empty(self.gpu, shape, "gradcheck output")?;
        t.fill(self.gpu, f32::NAN)?;
        Ok(t)
    }
    fn record(
        &mut self,
        dir: &'static str,
        shape: &str,
        output: &str,
        got: &Tensor,
        want: &[f32],
    ) -> Result<()> {
        let got = got.to_host(self.gpu)?;
        self.push(dir, shape, output, rel_err(&got, want));
        Ok(())
    }
    fn full(&self) -> bool {
        self.tier == Tier::Full
    }
    /// The sizes an elementwise kernel is checked at, as tensor shapes; the full tier adds
    /// `vocab_wide`, the largest tensor the kernel meets in a Gemma 3 model, if it has one.
    fn flat_shapes(&self, vocab_wide: Option<[usize; 2]>) -> Vec<Vec<usize>> {
        let mut shapes: Vec<Vec<usize>> = [1, 7, 256, 1000, 70001].iter().map(|&n| vec![n]).collect();
        shapes.push(vec![PAST_ONE_GRID_DIM]);
        if let Some(dims) = vocab_wide.filter(|_| self.full()) {
            shapes.push(dims.to_vec());
        }
        shapes
    }
    fn push(&mut self, dir: &'static str, shape: &str, output: &str, err: f64) {
        self.results.push((dir, shape.to_string(), output.to_string(), err, self.label.clone()));
    }
}

/// Run the checks of one kernel family (a name from [`KERNELS`]).
pub fn check_kernel(gpu: &Gpu, kernel: &str, seed: u64, tier: Tier) -> Result<Vec<Row>> {
    let (name, tol) = match KERNELS.iter().find(|k| **k == kernel) {
        Some(&("matmul_mixed" | "qmatmul_mixed")) if !gpu.has_f16() => return Ok(Vec::new()), // no f16: not offered
        Some(&k @ ("matmul_mixed" | "qmatmul_mixed")) => (k, MIXED_TOL),
        Some(&k @ "half_storage") => (k, 0.0), // a conversion: bit for bit (see `exact_err`)
        Some(&k) => (k, TOL),
        None => {
            return Err(crate::Error::InvalidArgument {
                name: "kernel".into(),
                detail: format!("unknown kernel {kernel:?}; known: {}", KERNELS.join(", ")),
            })
        }
    };
    let mut p = Probe { gpu, tier, rng: StdRng::seed_from_u64(seed), results: Vec::new(), label: None };
    // Kernels built on matrix products run with several matmul kernels the device offers.
    // (Every tile for the matmul checks themselves; one kernel per shader for attention.)
    let uses_matmul = name.starts_with("matmul") || name.ends_with("attention");
    let variants = if name == "matmul_mixed" {
        MatmulKernel::one_per_mixed_shader(gpu.matmul_kernels())
    } else if name.starts_with("matmul") {
        gpu.matmul_kernels().to_vec()
    } else if uses_matmul {
        MatmulKernel::one_per_shader(gpu.matmul_kernels())
    } else {
        vec![gpu.matmul_kernel()]
    };
    // Kernels that reduce rows run with each way of reducing the device offers (`rows`).
    let reduces_rows = ROW_KERNELS.contains(&name);
    let ways = if reduces_rows { RowReduce::available(gpu) } else { vec![RowReduce::Workgroup] };
    for variant in variants {
        for &way in &ways {
            let first = p.results.len();
            rows::with_row_reduce(way, || matmul::with_kernel(variant, || run_check(&mut p, name)))?;
            let mut tags = Vec::new();
            if uses_matmul {
                tags.push(variant.name());
            }
            if reduces_rows {
                tags.push(format!("{} rows", way.name()));
            }
            if !tags.is_empty() {
                let tag = tags.join(", ");
                for r in &mut p.results[first..] {
                    r.1 = format!("[{tag}] {}", r.1);
                }
            }
        }
    }
    gpu.sync()?;
    let mut rows: Vec<Row> = Vec::new();
    for (dir, shape, output, err, label) in p.results {
        let at = if output.is_empty() { shape.clone() } else { format!("{shape} {output}") };
        let kernel = label.unwrap_or_else(|| name.to_string());
        match rows.iter_mut().find(|r| r.direction == dir && r.kernel == kernel) {
            Some(row) => {
                if !row.shapes.contains(&shape) {
                    row.shapes.push(shape);
                }
                if err.is_nan() || err > row.max_rel_err {
                    row.max_rel_err = err;
                    row.worst_shape = at;
                }
            }
            None => rows.push(Row {
                kernel,
                direction: dir,
                shapes: vec![shape],
                max_rel_err: err,
                worst_shape: at,
                tolerance: tol,
                pass: false,
            }),
        }
    }
    rows.sort_by_key(|r| ["forward", "backward", "step"].iter().position(|d| *d == r.direction));
    for r in &mut rows {
        r.pass = r.max_rel_err <= r.tolerance;
    }
    Ok(rows)
}

fn run_check(p: &mut Probe, name: &str) -> Result<()> {
    match name {
        "matmul" => check_matmul(p, Precision::F32),
        "matmul_chunked" => check_matmul_chunked(p),
        "matmul_batched" => check_matmul_batched(p),
        "matmul_mixed" => check_matmul(p, Precision::Mixed),
        "softmax" => check_softmax(p),
        "layernorm" => check_norm(p, NormKind::Layer),
        "rmsnorm" => check_norm(p, NormKind::Rms { gemma: false }),
        "rmsnorm_gemma" => check_norm(p, NormKind::Rms { gemma: true }),
        "gelu" => check_act(p, Act::Gelu),
        "silu" => check_act(p, Act::Silu),
        "softcap" => check_act(p, Act::Softcap(1.7)),
        "swiglu" => check_glu(p, Act::Silu),
        "geglu" => check_glu(p, Act::Gelu),
        "embedding" => check_embedding(p),
        "rope" => check_rope(p),
        "attention" => check_attention(p),
        "flash_attention" => check_flash_attention(p),
        "cross_entropy" => check_cross_entropy(p),
        "add" => check_add(p),
        "dropout" => check_dropout(p),
        "half_storage" => check_half_storage(p),
        "reduce" => check_reduce(p),
        "clip_grad_norm" => check_clip(p),
        "adamw" => check_adamw(p),
        "sgd" => check_sgd(p),
        "qmatmul" => quant::check_qmatmul(p, Precision::F32),
        "qmatmul_mixed" => quant::check_qmatmul(p, Precision::Mixed),
        "qmatmul_dx" => quant::check_qmatmul_dx(p),
        "qembedding" => quant::check_qembedding(p),
        "lm_head_loss" => check_lm_head_loss(p),
        _ => unreachable!("every name in KERNELS has a check"),
    }
}

/// Every kernel in [`KERNELS`].
pub fn check_all(gpu: &Gpu, seed: u64, tier: Tier) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for k in KERNELS {
        rows.extend(check_kernel(gpu, k, seed, tier)?);
    }
    Ok(rows)
}

/// (M, N, K) of the products checked in every transpose. Besides tiny and ragged ones, they
/// cross the subgroup kernel's choice of tile: N <= 16 takes the narrow-N tile (64 x 8; M
/// ragged against 64 in (129, 7)), else M <= 16 the narrow-M tile (8 x 256; M ragged against 8
/// in (9, 65)), else N <= 128 the mid tile (64 x 64: (17, 65) and (67, 65) just past both, N
/// ragged; (40, 17) just past narrow-N; (70, 128) at its largest N), else the wide one
/// ((31, 130)).
const MATMUL_SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (1, 5, 3),
    (7, 1, 13),
    (13, 17, 29),
    (64, 64, 64),
    (67, 65, 63),
    (31, 130, 97),
    (129, 7, 200),
    (9, 65, 33),
    (16, 300, 40),
    (17, 65, 20),
    (40, 17, 50),
    (70, 128, 33),
];

const ALL_TRANSPOSES: &[(bool, bool)] = &[(false, false), (false, true), (true, false), (true, true)];

/// (M, N, K, transposes) at the kernels' limits: K past one dispatch's loop span (70,000, and
/// Gemma 3's vocabulary as in the LM head's dX), M past it (dB's inner dimension is M), and M
/// or N past 65,535 workgroups of the tiled kernel's 64-wide tile. A workgroup of lavapipe
/// runs on one core, so the long and thin ones are costly there: fewer transposes for those.
type Boundary = (usize, usize, usize, &'static [(bool, bool)]);
const MATMUL_BOUNDARY_SHAPES: &[Boundary] = &[
    (3, 5, 70_000, ALL_TRANSPOSES),
    (2, 4, GEMMA3_VOCAB, &[(false, true)]),
    (70_001, 3, 5, ALL_TRANSPOSES),
    (1, 65_535 * 64 + 1, 1, &[(false, true)]),
    (65_535 * 64 + 1, 1, 1, &[(true, false)]),
    // subgroup-uniform: rows past one packing group (64 blocks of 64), K past one dispatch's
    // 512 steps (600: a full span and a ragged one), N past the mid tile's 128 and ragged
    // against its 256 columns
    (4100, 135, 600, &[(false, false)]),
    // and B read through a texture: N past one texture's 8,192 columns
    (20, 8250, 30, &[(false, false)]),
    // LoRA's up-projection (K = 8): the 64 x 256 tile storing C as vec4s, N (a multiple of 4)
    // ragged against the tile, M past a multiple of 64
    (520, 772, 8, ALL_TRANSPOSES),
];

/// The longest inner dimension a model's product has (Gemma 3's vocabulary, in the LM head's dX).
const MATMUL_LONGEST_SUM: usize = GEMMA3_VOCAB;

/// Products forward and backward in f32, on every shape; under `--precision mixed` the
/// forward product alone (a linear layer's only mixed product) on the same shapes.
fn check_matmul(p: &mut Probe, precision: Precision) -> Result<()> {
    let mut shapes: Vec<Boundary> =
        MATMUL_SHAPES.iter().map(|&(m, n, k)| (m, n, k, ALL_TRANSPOSES)).collect();
    shapes.extend((0..3).map(|_| (p.size(150), p.size(150), p.size(150), ALL_TRANSPOSES)));
    shapes.extend(MATMUL_BOUNDARY_SHAPES);
    if p.full() {
        // past 65,535 workgroups of the subgroup kernel's 256-wide tile
        shapes.push((1, PAST_ONE_GRID_DIM, 1, &[(false, false)]));
    }
    if matmul::current_kernel(p.gpu) == MatmulKernel::SubgroupUniform && precision == Precision::F32 {
        check_pack_a(p)?;
        check_pack_b(p)?;
    }
    for (i, &(m, n, k, transposes)) in shapes.iter().enumerate() {
        for &(ta, tb) in transposes {
            let bias = i % 2 == 1;
            let d = kr::MatmulDims { batch: 1, m, n, k, trans_a: ta, trans_b: tb };
            let shape = format!("{m}x{k}{}.{k}x{n}{}{}", t(ta), t(tb), if bias { "+b" } else { "" });
            let (a, b, bv) = (p.uniform(m * k), p.uniform(k * n), p.uniform(n));
            let sa = if ta { [k, m] } else { [m, k] };
            let sb = if tb { [n, k] } else { [k, n] };
            let (ga, gb, gbias) = (p.up(&a, &sa)?, p.up(&b, &sb)?, p.up(&bv, &[n])?);
            let gc = p.out(&[m, n])?;
            matmul::with_precision(precision, || {
                matmul::matmul(p.gpu, &gc, &ga, &gb, bias.then_some(&gbias), ta, tb, false)
            })?;
            let mut c = vec![0f32; m * n];
            kr::matmul_forward(&mut c, &a, &b, bias.then_some(&bv[..]), d);
            if precision == Precision::Mixed {
                let mut abs = vec![0f32; m * n];
                let (aa, ab, abias) = (absolute(&a), absolute(&b), absolute(&bv));
                kr::matmul_forward(&mut abs, &aa, &ab, bias.then_some(&abias[..]), d);
                let got = gc.to_host(p.gpu)?;
                p.push("forward", &shape, "", mixed_err(&got, &c, &abs));
            } else {
                p.record("forward", &shape, "", &gc, &c)?;
                if k < 64 && n % 4 == 0 {
                    // added into C, as LoRA's up-projection adds into the frozen product
                    matmul::matmul(p.gpu, &gc, &ga, &gb, bias.then_some(&gbias), ta, tb, true)?;
                    let twice: Vec<f32> = c.iter().map(|x| 2.0 * x).collect();
                    p.record("forward", &shape, "accumulated", &gc, &twice)?;
                }
            }
            if m.max(n) > MATMUL_LONGEST_SUM || precision == Precision::Mixed {
                // the backward products would sum millions of terms, which no model does; a
                // mixed-precision step runs its backward products in f32
                continue;
            }

            let dc = p.uniform(m * n);
            let gdc = p.up(&dc, &[m, n])?;
            let (gda, gdb, gdbias) = (p.out(&sa)?, p.out(&sb)?, p.out(&[n])?);
            matmul::matmul_backward(
                p.gpu,
                Some(&gda),
                Some(&gdb),
                Some(&gdbias),
                &gdc,
                &ga,
                &gb,
                ta,
                tb,
                false,
            )?;
            let (mut da, mut db, mut dbias) = (vec![0f32; m * k], vec![0f32; k * n], vec![0f32; n]);
            kr::matmul_backward(Some(&mut da), Some(&mut db), Some(&mut dbias), &dc, &a, &b, d);
            p.record("backward", &shape, "dA", &gda, &da)?;
            p.record("backward", &shape, "dB", &gdb, &db)?;
            p.record("backward", &shape, "dbias", &gdbias, &dbias)?;
        }
    }
    Ok(())
}

/// `subgroup-uniform`'s packing of A, bit for bit against the reference: 100 rows (a full
/// block and a partial one) and 70 steps (a full window and part of the next; the rest zeros)
/// from inside a larger matrix read transposed (rows adjacent), at an offset.
fn check_pack_a(p: &mut Probe) -> Result<()> {
    let (ld, (r0, k0), rows, k) = (130, (7, 3), 100, 70);
    let src = p.uniform(80 * ld);
    let g = p.up(&src, &[80, ld])?;
    let dst = p.out(&[2 * 8 * 4096])?;
    let (gb, db) = (g.single("pack source")?, dst.single("pack output")?);
    // A(i, j) = src[j * ld + i]: M along the stored columns, K along the stored rows
    let view = matmul::View::matrix(gb, k0 * ld + r0, ld, true);
    matmul::pack_a(p.gpu, db, view, rows, k)?;
    let want = kr::pack_a_windows(&src, (1, ld), (r0, rows), (k0, k), 8);
    let shape = format!("A packed in uniform windows, {rows}x{k} at ({r0}, {k0}) of 80x{ld}^T");
    p.push("forward", &shape, "", exact_err(&dst.to_host(p.gpu)?, &want));
    Ok(())
}

/// `subgroup-uniform`'s packing of B for its texture, bit for bit against the reference: 70
/// steps and 100 columns (a partial row of 128) from inside a larger matrix read transposed
/// (steps adjacent), at an offset; the rest of the staging is left as it was.
fn check_pack_b(p: &mut Probe) -> Result<()> {
    let (ld, (k0, n0), k, n, width) = (90, (3, 7), 70, 100, 128);
    let src = p.uniform(120 * ld);
    let g = p.up(&src, &[120, ld])?;
    let dst = p.out(&[k * width])?;
    let (gb, db) = (g.single("pack source")?, dst.single("pack output")?);
    // B(kk, j) = src[j * ld + kk]: K along the stored columns, N along the stored rows
    let view = matmul::View::matrix(gb, n0 * ld + k0, ld, true);
    matmul::pack_b(p.gpu, db, view, k, n, width)?;
    let want = kr::pack_b_texels(&src, (1, ld), (k0, k), (n0, n), width);
    let shape = format!("B packed for a texture, {k}x{n} at ({k0}, {n0}) of 120x{ld}^T");
    p.push("forward", &shape, "", exact_err(&dst.to_host(p.gpu)?, &want));
    Ok(())
}

fn t(trans: bool) -> &'static str {
    if trans {
        "^T"
    } else {
        ""
    }
}

/// The LM head of Gemma 3 270M at its real size, as the model runs it: hidden states (T, 640)
/// times the (262,144 x 640) embedding, transposed, which is above the binding limit and so in
/// chunks; logits, dX (K = 262,144) and dW.
fn check_lm_head(p: &mut Probe, t: usize) -> Result<()> {
    let (m, n, k) = (t, GEMMA3_VOCAB, GEMMA3_270M_HIDDEN);
    let shape = format!("LM head {m}x{k}.({n}x{k})^T");
    let d = kr::MatmulDims { batch: 1, m, n, k, trans_a: false, trans_b: true };
    let (x, w, dy) = (p.uniform(m * k), p.uniform(n * k), p.uniform(m * n));
    let (gx, gw, gdy) = (p.up(&x, &[m, k])?, p.up(&w, &[n, k])?, p.up(&dy, &[m, n])?);
    let gy = p.out(&[m, n])?;
    matmul::matmul(p.gpu, &gy, &gx, &gw, None, false, true, false)?;
    let mut y = vec![0f32; m * n];
    kr::matmul_forward(&mut y, &x, &w, None, d);
    p.record("forward", &shape, "logits", &gy, &y)?;
    drop(y);
    let (gdx, gdw) = (p.out(&[m, k])?, p.out(&[n, k])?);
    matmul::matmul_backward(p.gpu, Some(&gdx), Some(&gdw), None, &gdy, &gx, &gw, false, true, false)?;
    let (mut dx, mut dw) = (vec![0f32; m * k], vec![0f32; n * k]);
    kr::matmul_backward(Some(&mut dx), Some(&mut dw), None, &dy, &x, &w, d);
    p.record("backward", &shape, "dX", &gdx, &dx)?;
    p.record("backward", &shape, "dW", &gdw, &dw)
}

/// Operands split into small chunks, so the chunk walk runs on every shape it must handle.
fn check_matmul_chunked(p: &mut Probe) -> Result<()> {
    // With the device's own kernel only: a workgroup of lavapipe runs on one core and dX has
    // few of them, so this costs half a minute per kernel there; K of 262,144 is checked on
    // every kernel by the boundary shapes of `check_matmul`.
    if p.full() && matmul::current_kernel(p.gpu) == p.gpu.matmul_kernel() {
        check_lm_head(p, 16)?;
    }
    let (m, n, k) = (23, 19, 17);
    let splits = [(Split::Rows, 5), (Split::Cols, 6), (Split::Rows, 100)];
    for (case, (ta, tb)) in
        [(false, false), (false, true), (true, false), (true, true)].into_iter().enumerate()
    {
        let (spa, spb, spc) = (splits[case % 3], splits[(case + 1) % 3], splits[(case + 2) % 3]);
        let d = kr::MatmulDims { batch: 1, m, n, k, trans_a: ta, trans_b: tb };
        let shape = format!(
            "{m}x{k}{}.{k}x{n}{} A:{:?}/{} B:{:?}/{} C:{:?}/{}",
            t(ta),
            t(tb),
            spa.0,
            spa.1,
            spb.0,
            spb.1,
            spc.0,
            spc.1
        );
        let (a, b, bv) = (p.uniform(m * k), p.uniform(k * n), p.uniform(n));
        let sa = if ta { [k, m] } else { [m, k] };
        let sb = if tb { [n, k] } else { [k, n] };
        let ga = Tensor::from_host_split(p.gpu, &a, &sa, spa.0, spa.1, "A")?;
        let gb = Tensor::from_host_split(p.gpu, &b, &sb, spb.0, spb.1, "B")?;
        let gbias = p.up(&bv, &[n])?;
        let gc = Tensor::empty_split(p.gpu, &[m, n], spc.0, spc.1, "C")?;
        gc.fill(p.gpu, f32::NAN)?;
        matmul::matmul(p.gpu, &gc, &ga, &gb, Some(&gbias), ta, tb, false)?;
        let mut c = vec![0f32; m * n];
        kr::matmul_forward(&mut c, &a, &b, Some(&bv), d);
        p.record("forward", &shape, "", &gc, &c)?;

        let dc = p.uniform(m * n);
        let gdc = Tensor::from_host_split(p.gpu, &dc, &[m, n], spc.0, spc.1, "dC")?;
        let gda = Tensor::empty_split(p.gpu, &sa, spa.0, spa.1, "dA")?;
        let gdb = Tensor::empty_split(p.gpu, &sb, spb.0, spb.1, "dB")?;
        let gdbias = p.out(&[n])?;
        for g in [&gda, &gdb] {
            g.fill(p.gpu, f32::NAN)?;
        }
        matmul::matmul_backward(p.gpu, Some(&gda), Some(&gdb), Some(&gdbias), &gdc, &ga, &gb, ta, tb, false)?;
        let (mut da, mut db, mut dbias) = (vec![0f32; m * k], vec![0f32; k * n], vec![0f32; n]);
        kr::matmul_backward(Some(&mut da), Some(&mut db), Some(&mut dbias), &dc, &a, &b, d);
        p.record("backward", &shape, "dA", &gda, &da)?;
        p.record("backward", &shape, "dB", &gdb, &db)?;
        p.record("backward", &shape, "dbias", &gdbias, &dbias)?;

        // Accumulating into existing gradients (gradient accumulation over micro-batches).
        matmul::matmul_backward(p.gpu, Some(&gda), None, None, &gdc, &ga, &gb, ta, tb, true)?;
        let twice: Vec<f32> = da.iter().map(|x| 2.0 * x).collect();
        p.record("backward", &shape, "dA accumulated", &gda, &twice)?;
    }
    Ok(())
}

/// The strided batched product on contiguous batches (attention covers the strided views).
fn check_matmul_batched(p: &mut Probe) -> Result<()> {
    for &(batch, m, n, k) in &[(1, 3, 5, 7), (3, 17, 13, 11), (5, 1, 64, 33)] {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let d = kr::MatmulDims { batch, m, n, k, trans_a: ta, trans_b: tb };
            let (a, b) = (p.uniform(batch * m * k), p.uniform(batch * k * n));
            let (ga, gb, gc) =
                (p.up(&a, &[batch * m * k])?, p.up(&b, &[batch * k * n])?, p.out(&[batch * m * n])?);
            let av = View::matrix(ga.single("A")?, 0, if ta { m } else { k }, ta).batched(m * k, 0);
            let bv = View::matrix(gb.single("B")?, 0, if tb { k } else { n }, tb).batched(k * n, 0);
            let cv = View::matrix(gc.single("C")?, 0, n, false).batched(m * n, 0);
            matmul::matmul_strided(
                p.gpu,
                cv,
                av,
                bv,
                None,
                Dims { m, n, k, nb1: batch, nb2: 1 },
                1.0,
                false,
            )?;
            let mut c = vec![0f32; batch * m * n];
            kr::matmul_forward(&mut c, &a, &b, None, d);
            let shape = format!("{batch}x({m}x{k}{}.{k}x{n}{})", t(ta), t(tb));
            p.record("forward", &shape, "", &gc, &c)?;
        }
    }
    check_matmul_padded(p)
}

/// Sub-matrices of wider rows whose starts are 16-byte aligned (leading dimension 12) and
/// whose extents are ragged: the staged kernel loads these by vec4 and meets a partial group
/// of four at every edge, along M, N and K.
fn check_matmul_padded(p: &mut Probe) -> Result<()> {
    let (batch, m, n, k, ld) = (2, 9, 10, 7, 12);
    // the (rows, cols) block of each batch of a (batch * rows, ld) matrix, packed
    let packed = |full: &[f32], rows: usize, cols: usize| -> Vec<f32> {
        let mut out = Vec::with_capacity(batch * rows * cols);
        for r in 0..batch * rows {
            out.extend_from_slice(&full[r * ld..r * ld + cols]);
        }
        out
    };
    for &(ta, tb) in ALL_TRANSPOSES {
        let (ar, ac) = if ta { (k, m) } else { (m, k) };
        let (br, bc) = if tb { (n, k) } else { (k, n) };
        let (a_full, b_full) = (p.uniform(batch * ar * ld), p.uniform(batch * br * ld));
        let (ga, gb) = (p.up(&a_full, &[a_full.len()])?, p.up(&b_full, &[b_full.len()])?);
        let gc = p.out(&[batch * m * ld])?;
        let av = View::matrix(ga.single("A")?, 0, ld, ta).batched(ar * ld, 0);
        let bv = View::matrix(gb.single("B")?, 0, ld, tb).batched(br * ld, 0);
        let cv = View::matrix(gc.single("C")?, 0, ld, false).batched(m * ld, 0);
        matmul::matmul_strided(p.gpu, cv, av, bv, None, Dims { m, n, k, nb1: batch, nb2: 1 }, 1.0, false)?;
        let d = kr::MatmulDims { batch, m, n, k, trans_a: ta, trans_b: tb };
        let mut c = vec![0f32; batch * m * n];
        kr::matmul_forward(&mut c, &packed(&a_full, ar, ac), &packed(&b_full, br, bc), None, d);
        let got = packed(&gc.to_host(p.gpu)?, m, n);
        let shape = format!("{batch}x({m}x{k}{}.{k}x{n}{}) in rows of {ld}", t(ta), t(tb));
        p.push("forward", &shape, "", rel_err(&got, &c));
    }
    Ok(())
}

const ROW_SHAPES: &[(usize, usize)] = &[(1, 1), (1, 7), (3, 5), (17, 31), (64, 257), (5, 1000), (130, 64)];

fn check_softmax(p: &mut Probe) -> Result<()> {
    let mut shapes = ROW_SHAPES.to_vec();
    shapes.extend((0..2).map(|_| (p.size(100), p.size(600))));
    // one workgroup per row: more than 65,535 rows need a second grid dimension
    shapes.extend([(70_001, 3), (3, GEMMA3_VOCAB)]);
    for &(rows, cols) in &shapes {
        let shape = format!("{rows}x{cols}");
        let x: Vec<f32> = p.uniform(rows * cols).iter().map(|v| 8.0 * v).collect();
        let gx = p.up(&x, &[rows, cols])?;
        let gy = p.out(&[rows, cols])?;
        softmax::softmax_forward(p.gpu, &gy, &gx, softmax::Mask::None, 1.0)?;
        let mut y = vec![0f32; rows * cols];
        kr::softmax_forward(&mut y, &x, rows, cols);
        p.record("forward", &shape, "", &gy, &y)?;
        let dy = p.uniform(rows * cols);
        let (gyr, gdy, gdx) = (p.up(&y, &[rows, cols])?, p.up(&dy, &[rows, cols])?, p.out(&[rows, cols])?);
        softmax::softmax_backward(p.gpu, &gdx, &gyr, &gdy, 1.0)?;
        let mut dx = vec![0f32; rows * cols];
        kr::softmax_backward(&mut dx, &y, &dy, rows, cols);
        p.record("backward", &shape, "", &gdx, &dx)?;
    }
    Ok(())
}

fn check_norm(p: &mut Probe, kind: NormKind) -> Result<()> {
    let eps = 1e-5;
    let mut shapes = vec![(1, 1), (1, 7), (3, 64), (17, 129), (8, 768), (33, 1000)];
    shapes.extend((0..2).map(|_| (p.size(50), p.size(1200))));
    // past 65,535 rows (dw sums over rows; a row per workgroup) and a row of 65,537 values
    shapes.extend([(70_001, 16), (2, 65_537)]);
    for &(rows, cols) in &shapes {
        let shape = format!("{rows}x{cols}");
        let x: Vec<f32> = p.uniform(rows * cols).iter().map(|v| 2.0 * v + 0.5).collect();
        let (w, b, dy) = (p.uniform(cols), p.uniform(cols), p.uniform(rows * cols));
        let (gx, gw, gb, gdy) =
            (p.up(&x, &[rows, cols])?, p.up(&w, &[cols])?, p.up(&b, &[cols])?, p.up(&dy, &[rows, cols])?);
        let (gy, gstats) = (p.out(&[rows, cols])?, p.out(&[rows, 2])?);
        let (gdx, gdw, gdb) = (p.out(&[rows, cols])?, p.out(&[cols])?, p.out(&[cols])?);
        let (mut y, mut mean, mut rstd) = (vec![0f32; rows * cols], vec![0f32; rows], vec![0f32; rows]);
        let (mut dx, mut dw, mut db) = (vec![0f32; rows * cols], vec![0f32; cols], vec![0f32; cols]);
        let layer = kind == NormKind::Layer;
        let (bias, dbias) = if layer { (Some(&gb), Some(&gdb)) } else { (None, None) };
        norm::norm_forward(p.gpu, &gy, &gstats, &gx, &gw, bias, kind, eps)?;
        norm::norm_backward(p.gpu, Some(&gdx), Some(&gdw), dbias, &gdy, &gx, &gw, &gstats, kind, false)?;
        if layer {
            kr::layernorm_forward(&mut y, &mut mean, &mut rstd, &x, &w, &b, rows, cols, eps);
            kr::layernorm_backward(&mut dx, &mut dw, &mut db, &dy, &x, &w, &mean, &rstd, rows, cols);
            p.record("backward", &shape, "db", &gdb, &db)?;
        } else {
            let shift = kind.shift();
            kr::rmsnorm_forward(&mut y, &mut rstd, &x, &w, rows, cols, eps, shift);
            kr::rmsnorm_backward(&mut dx, &mut dw, &dy, &x, &w, &rstd, rows, cols, shift);
        }
        p.record("forward", &shape, "", &gy, &y)?;
        let stats: Vec<f32> = mean.iter().zip(&rstd).flat_map(|(&m, &r)| [m, r]).collect();
        p.record("forward", &shape, "stats", &gstats, &stats)?;
        if kind.is_rms() && cols == 1 {
            // With one column RMSNorm's dx = rstd * g * (1 - xhat^2) = rstd * g * eps * rstd^2:
            // two nearly equal f32 terms cancel, and no f32 kernel can meet 1e-4 of the tiny
            // result. Measure the error against the size of the cancelling terms instead.
            let terms = (0..rows)
                .map(|r| (rstd[r] as f64 * dy[r] as f64 * (w[0] as f64 + kind.shift() as f64)).abs())
                .fold(0f64, f64::max);
            let got = gdx.to_host(p.gpu)?;
            let diff = got.iter().zip(&dx).map(|(g, r)| (*g as f64 - *r as f64).abs()).fold(0f64, f64::max);
            let err = if got.iter().all(|g| g.is_finite()) { diff / terms } else { f64::INFINITY };
            p.push("backward", &shape, "dx (vs |rstd*g|)", err);
        } else {
            p.record("backward", &shape, "dx", &gdx, &dx)?;
        }
        p.record("backward", &shape, "dw", &gdw, &dw)?;
    }
    Ok(())
}

fn check_act(p: &mut Probe, act: Act) -> Result<()> {
    // soft-capping meets Gemma's logits: (tokens, vocabulary), above the binding limit
    let logits = matches!(act, Act::Softcap(_)).then_some([128, GEMMA3_VOCAB]);
    for dims in p.flat_shapes(logits) {
        let n: usize = dims.iter().product();
        let shape = format!("{dims:?}");
        let x: Vec<f32> = p.uniform(n).iter().map(|v| 6.0 * v).collect();
        let dy = p.uniform(n);
        let (gx, gdy, gy, gdx) = (p.up(&x, &dims)?, p.up(&dy, &dims)?, p.out(&dims)?, p.out(&dims)?);
        activation::act_forward(p.gpu, &gy, &gx, act)?;
        activation::act_backward(p.gpu, &gdx, &gx, &gdy, act, false)?;
        // the in-place forms: y = act(y) and d = d * act'(x)
        let (gy2, gdx2) = (p.up(&x, &dims)?, p.up(&dy, &dims)?);
        activation::act_inplace(p.gpu, &gy2, act)?;
        activation::act_grad_mul(p.gpu, &gdx2, &gx, act)?;
        let (mut y, mut dx) = (vec![0f32; n], vec![0f32; n]);
        match act {
            Act::Gelu => {
                kr::gelu_forward(&mut y, &x);
                kr::gelu_backward(&mut dx, &x, &dy);
            }
            Act::Silu => {
                kr::silu_forward(&mut y, &x);
                kr::silu_backward(&mut dx, &x, &dy);
            }
            Act::Softcap(c) => {
                kr::softcap_forward(&mut y, &x, c);
                kr::softcap_backward(&mut dx, &x, &dy, c);
            }
        }
        p.record("forward", &shape, "", &gy, &y)?;
        p.record("backward", &shape, "", &gdx, &dx)?;
        p.record("forward", &shape, "in place", &gy2, &y)?;
        p.record("backward", &shape, "in place", &gdx2, &dx)?;
        if let Act::Softcap(c) = act {
            // from the output y the forward computed, as the graph's backward does
            let gdx3 = p.out(&dims)?;
            activation::softcap_backward_from_output(p.gpu, &gdx3, &gy, &gdy, c, false)?;
            p.record("backward", &shape, "from output", &gdx3, &dx)?;
        }
    }
    Ok(())
}

fn check_glu(p: &mut Probe, act: Act) -> Result<()> {
    for dims in p.flat_shapes(None) {
        let n: usize = dims.iter().product();
        let shape = format!("{dims:?}");
        let gate: Vec<f32> = p.uniform(n).iter().map(|v| 6.0 * v).collect();
        let (up, dy) = (p.uniform(n), p.uniform(n));
        let (gg, gu, gdy) = (p.up(&gate, &dims)?, p.up(&up, &dims)?, p.up(&dy, &dims)?);
        let (gy, gdg, gdu) = (p.out(&dims)?, p.out(&dims)?, p.out(&dims)?);
        activation::glu_forward(p.gpu, &gy, &gg, &gu, act)?;
        activation::glu_backward(p.gpu, Some(&gdg), Some(&gdu), &gdy, &gg, &gu, act, false)?;
        let (mut y, mut dg, mut du) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        match act {
            Act::Silu => {
                kr::swiglu_forward(&mut y, &gate, &up);
                kr::swiglu_backward(&mut dg, &mut du, &dy, &gate, &up);
            }
            Act::Gelu => {
                kr::geglu_forward(&mut y, &gate, &up);
                kr::geglu_backward(&mut dg, &mut du, &dy, &gate, &up);
            }
            Act::Softcap(_) => unreachable!("soft-capping has no gated form"),
        }
        p.record("forward", &shape, "", &gy, &y)?;
        p.record("backward", &shape, "dgate", &gdg, &dg)?;
        p.record("backward", &shape, "dup", &gdu, &du)?;
    }
    Ok(())
}

fn check_embedding(p: &mut Probe) -> Result<()> {
    // (vocab, tokens, dim, rows per table chunk (0: as the binding limit requires), share of
    // the tokens that repeat id 0, in percent)
    let mut cases = vec![
        (1, 1, 1, 1, 0),
        (7, 13, 5, 7, 0),
        (50, 100, 33, 50, 0),
        (50, 100, 33, 7, 0),
        (1000, 257, 64, 300, 0),
        // ids past 65,535; one id at more positions than one dispatch's loop span
        (70_000, 257, 8, 30_000, 0),
        (50, 70_001, 4, 0, 98),
    ];
    for _ in 0..2 {
        let v = p.size(500);
        cases.push((v, p.size(200), p.size(70), p.size(v), 0));
    }
    if p.full() {
        cases.push((GEMMA3_VOCAB, 512, GEMMA3_270M_HIDDEN, 0, 10));
    }
    for &(v, n, c, chunk, repeat) in &cases {
        let shape = format!("V{v} N{n} C{c} chunk{chunk} repeat{repeat}%");
        let ids: Vec<u32> = (0..n)
            .map(|_| if p.rng.random_range(0..100) < repeat { 0 } else { p.rng.random_range(0..v as u32) })
            .collect();
        let table = p.uniform(v * c);
        let split = |p: &Probe, data: &[f32], what| match chunk {
            0 => Tensor::from_host(p.gpu, data, &[v, c], what),
            _ => Tensor::from_host_split(p.gpu, data, &[v, c], Split::Rows, chunk, what),
        };
        let gt = split(p, &table, "table")?;
        let gids = embedding::Ids::new(p.gpu, &ids, v)?;
        let gout = p.out(&[n, c])?;
        embedding::embedding_forward(p.gpu, &gout, &gids, &gt)?;
        let mut out = vec![0f32; n * c];
        kr::embedding_forward(&mut out, &ids, &table, c);
        p.record("forward", &shape, "", &gout, &out)?;

        let dout = p.uniform(n * c);
        let gdout = p.up(&dout, &[n, c])?;
        let gdt = split(p, &vec![0.0; v * c], "dtable")?;
        embedding::embedding_backward(p.gpu, &gdt, &gdout, &gids)?;
        let mut dt = vec![0f32; v * c];
        kr::embedding_backward(&mut dt, &dout, &ids, c);
        p.record("backward", &shape, "", &gdt, &dt)?;
    }
    Ok(())
}

fn check_rope(p: &mut Probe) -> Result<()> {
    let mut cases =
        vec![(1, 1, 1, 2, 10000.0), (2, 5, 3, 8, 10000.0), (1, 17, 4, 64, 1e6), (3, 130, 2, 6, 10000.0)];
    for _ in 0..2 {
        cases.push((p.size(3), p.size(100), p.size(5), 2 * p.size(40), 10000.0));
    }
    for &(b, t, h, d, theta) in &cases {
        let shape = format!("B{b} T{t} H{h} D{d} theta{theta}");
        let positions: Vec<u32> = (0..t as u32).collect();
        let table = rope::RopeTable::new(p.gpu, &positions, d, theta)?;
        let (mut cos, mut sin) = (vec![0f32; t * d / 2], vec![0f32; t * d / 2]);
        kr::rope_cos_sin(&mut cos, &mut sin, &positions, d, theta);
        let n = b * t * h * d;
        let (x, dy) = (p.uniform(n), p.uniform(n));
        let (gx, gdy, gy, gdx) = (p.up(&x, &[n])?, p.up(&dy, &[n])?, p.out(&[n])?, p.out(&[n])?);
        rope::rope_forward(p.gpu, &gy, &gx, &table, b, h)?;
        rope::rope_backward(p.gpu, &gdx, &gdy, &table, b, h)?;
        let (mut y, mut dx) = (vec![0f32; n], vec![0f32; n]);
        kr::rope_forward(&mut y, &x, &cos, &sin, b, t, h, d);
        kr::rope_backward(&mut dx, &dy, &cos, &sin, b, t, h, d);
        p.record("forward", &shape, "", &gy, &y)?;
        p.record("backward", &shape, "", &gdx, &dx)?;
    }
    Ok(())
}

fn check_attention(p: &mut Probe) -> Result<()> {
    // (B, T, H, KVH, D, window, soft cap); the caps are of the order of the scores, so tanh bends
    type Case = (usize, usize, usize, usize, usize, Option<usize>, Option<f32>);
    let cases: &[Case] = &[
        (1, 1, 1, 1, 1, None, None),
        (2, 7, 4, 2, 8, None, None),
        (2, 7, 4, 2, 8, None, Some(0.5)),
        (1, 13, 6, 2, 5, Some(4), None),
        (1, 13, 6, 2, 5, Some(4), Some(1.0)),
        (2, 33, 3, 3, 16, None, None),
        (1, 64, 4, 1, 32, Some(16), None),
        (1, 70, 2, 1, 64, None, None),
    ];
    let mut cases = cases.to_vec();
    for _ in 0..2 {
        let kv_h = p.size(3);
        let (b, t, h, d) = (p.size(2), p.size(40), kv_h * p.size(3), p.size(40));
        let window = if p.rng.random_range(0..2) == 0 { None } else { Some(p.size(t)) };
        let softcap = if p.rng.random_range(0..2) == 0 { None } else { Some(0.7) };
        cases.push((b, t, h, kv_h, d, window, softcap));
    }
    for &(b, t, h, kv_h, d, window, softcap) in &cases {
        let shape = format!("B{b} T{t} H{h} KV{kv_h} D{d} window {window:?} softcap {softcap:?}");
        let scale = 1.0 / (d as f32).sqrt();
        let dims = attention::AttnDims { b, t, h, kv_h, d, window, scale, softcap };
        let (nq, nk, np) = (b * t * h * d, b * t * kv_h * d, b * h * t * t);
        let (q, k, v, dout) = (p.uniform(nq), p.uniform(nk), p.uniform(nk), p.uniform(nq));
        let (gq, gk, gv, gdo) = (p.up(&q, &[nq])?, p.up(&k, &[nk])?, p.up(&v, &[nk])?, p.up(&dout, &[nq])?);
        let (gout, gprobs) = (p.out(&[nq])?, p.out(&[b * h * t, t])?);
        let dense = |x, heads| Heads::dense(x, heads, d);
        attention::attention_forward(
            p.gpu,
            dense(&gout, h),
            &gprobs,
            dense(&gq, h),
            dense(&gk, kv_h),
            dense(&gv, kv_h),
            dims,
        )?;
        let (mut out, mut probs) = (vec![0f32; nq], vec![0f32; np]);
        kr::attention_forward(&mut out, &mut probs, &q, &k, &v, dims);
        p.record("forward", &shape, "", &gout, &out)?;
        p.record("forward", &shape, "probs", &gprobs, &probs)?;

        let (gdq, gdk, gdv) = (p.out(&[nq])?, p.out(&[nk])?, p.out(&[nk])?);
        let (qs, ks) = (dense(&gq, h), dense(&gk, kv_h));
        let grads = (dense(&gdq, h), dense(&gdk, kv_h), dense(&gdv, kv_h));
        attention::attention_backward(
            p.gpu,
            grads.0,
            grads.1,
            grads.2,
            dense(&gdo, h),
            qs,
            ks,
            dense(&gv, kv_h),
            &gprobs,
            dims,
            false,
        )?;
        let (mut dq, mut dk, mut dv) = (vec![0f32; nq], vec![0f32; nk], vec![0f32; nk]);
        kr::attention_backward(&mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &probs, dims);
        p.record("backward", &shape, "dq", &gdq, &dq)?;
        p.record("backward", &shape, "dk", &gdk, &dk)?;
        p.record("backward", &shape, "dv", &gdv, &dv)?;

        // The same with q, k, v packed in one (B*T, (H + 2 KVH) D) tensor, as GPT-2's c_attn
        // produces them, and the gradients written into one packed tensor.
        let (qw, kw) = (h * d, kv_h * d);
        let width = qw + 2 * kw;
        let pack = |q: &[f32], k: &[f32], v: &[f32]| -> Vec<f32> {
            (0..b * t)
                .flat_map(|r| {
                    [&q[r * qw..(r + 1) * qw], &k[r * kw..(r + 1) * kw], &v[r * kw..(r + 1) * kw]].concat()
                })
                .collect()
        };
        let gqkv = p.up(&pack(&q, &k, &v), &[b * t, width])?;
        let views =
            |x| (Heads::packed(x, 0, width), Heads::packed(x, qw, width), Heads::packed(x, qw + kw, width));
        let (pq, pk, pv) = views(&gqkv);
        let (gout2, gprobs2) = (p.out(&[nq])?, p.out(&[b * h * t, t])?);
        attention::attention_forward(p.gpu, dense(&gout2, h), &gprobs2, pq, pk, pv, dims)?;
        p.record("forward", &shape, "packed", &gout2, &out)?;
        let gdqkv = p.out(&[b * t, width])?;
        let (dq2, dk2, dv2) = views(&gdqkv);
        attention::attention_backward(
            p.gpu,
            dq2,
            dk2,
            dv2,
            dense(&gdo, h),
            pq,
            pk,
            pv,
            &gprobs2,
            dims,
            false,
        )?;
        p.record("backward", &shape, "packed dqkv", &gdqkv, &pack(&dq, &dk, &dv))?;
    }
    Ok(())
}

/// Flash attention (`kernels::flash_attention`) against the reference: the output and
/// gradients against `kr::attention_forward` / `_backward`, the log-sum-exp against
/// `kr::attention_forward_lse`. Each shape runs with the default query block and with blocks of
/// 5 rows (several ragged blocks, windows cutting them), dense and with GPT-2's packed views.
fn check_flash_attention(p: &mut Probe) -> Result<()> {
    use crate::kernels::flash_attention as fa;
    // (B, T, H, KVH, D, window, soft cap)
    type Case = (usize, usize, usize, usize, usize, Option<usize>, Option<f32>);
    let mut cases: Vec<Case> = vec![
        (1, 1, 1, 1, 1, None, None),
        (2, 7, 4, 2, 8, None, Some(0.5)),
        (1, 13, 6, 2, 5, Some(4), None),
        (1, 13, 6, 2, 5, Some(4), Some(1.0)),
        (2, 33, 3, 3, 16, None, None),
        (1, 70, 2, 1, 64, Some(16), None),
    ];
    for _ in 0..2 {
        let kv_h = p.size(3);
        let (b, t, h, d) = (p.size(2), p.size(40), kv_h * p.size(3), p.size(40));
        let window = if p.rng.random_range(0..2) == 0 { None } else { Some(p.size(t)) };
        let softcap = if p.rng.random_range(0..2) == 0 { None } else { Some(0.7) };
        cases.push((b, t, h, kv_h, d, window, softcap));
    }
    for &(b, t, h, kv_h, d, window, softcap) in &cases {
        let scale = 1.0 / (d as f32).sqrt();
        let dims = attention::AttnDims { b, t, h, kv_h, d, window, scale, softcap };
        let (nq, nk, np) = (b * t * h * d, b * t * kv_h * d, b * h * t * t);
        let (q, k, v, dout) = (p.uniform(nq), p.uniform(nk), p.uniform(nk), p.uniform(nq));
        let (mut out, mut probs, mut lse) = (vec![0f32; nq], vec![0f32; np], vec![0f32; b * h * t]);
        kr::attention_forward(&mut out, &mut probs, &q, &k, &v, dims);
        let mut out_lse = vec![0f32; nq];
        kr::attention_forward_lse(&mut out_lse, &mut lse, &q, &k, &v, dims);
        let (mut dq, mut dk, mut dv) = (vec![0f32; nq], vec![0f32; nk], vec![0f32; nk]);
        kr::attention_backward(&mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &probs, dims);
        let (qw, kw) = (h * d, kv_h * d);
        let width = qw + 2 * kw;
        let pack = |q: &[f32], k: &[f32], v: &[f32]| -> Vec<f32> {
            (0..b * t)
                .flat_map(|r| {
                    [&q[r * qw..(r + 1) * qw], &k[r * kw..(r + 1) * kw], &v[r * kw..(r + 1) * kw]].concat()
                })
                .collect()
        };
        let (gq, gk, gv, gdo) = (p.up(&q, &[nq])?, p.up(&k, &[nk])?, p.up(&v, &[nk])?, p.up(&dout, &[nq])?);
        let gqkv = p.up(&pack(&q, &k, &v), &[b * t, width])?;
        for block in [None, Some(5)] {
            let shape = format!(
                "B{b} T{t} H{h} KV{kv_h} D{d} window {window:?} softcap {softcap:?} block {}",
                block.map_or("auto".to_string(), |r| r.to_string())
            );
            let dense = |x, heads| Heads::dense(x, heads, d);
            let views = |x| {
                (Heads::packed(x, 0, width), Heads::packed(x, qw, width), Heads::packed(x, qw + kw, width))
            };
            let rows = block.unwrap_or_else(|| fa::block_rows(&dims));
            let (gout, glse) = (p.out(&[nq])?, p.out(&[b * h, t])?);
            let (gdq, gdk, gdv) = (p.out(&[nq])?, p.out(&[nk])?, p.out(&[nk])?);
            let (gout2, glse2, gdqkv) = (p.out(&[nq])?, p.out(&[b * h, t])?, p.out(&[b * t, width])?);
            fa::with_block_rows(rows, || -> Result<()> {
                let (q, k, v) = (dense(&gq, h), dense(&gk, kv_h), dense(&gv, kv_h));
                fa::flash_attention_forward(p.gpu, dense(&gout, h), &glse, q, k, v, dims)?;
                let grads = (dense(&gdq, h), dense(&gdk, kv_h), dense(&gdv, kv_h));
                let dout = dense(&gdo, h);
                fa::flash_attention_backward(
                    p.gpu, grads.0, grads.1, grads.2, dout, q, k, v, &glse, dims, false,
                )?;
                let (pq, pk, pv) = views(&gqkv);
                fa::flash_attention_forward(p.gpu, dense(&gout2, h), &glse2, pq, pk, pv, dims)?;
                let (dq2, dk2, dv2) = views(&gdqkv);
                fa::flash_attention_backward(p.gpu, dq2, dk2, dv2, dout, pq, pk, pv, &glse2, dims, false)
            })?;
            p.record("forward", &shape, "", &gout, &out)?;
            p.record("forward", &shape, "lse", &glse, &lse)?;
            p.record("forward", &shape, "packed", &gout2, &out)?;
            p.record("backward", &shape, "dq", &gdq, &dq)?;
            p.record("backward", &shape, "dk", &gdk, &dk)?;
            p.record("backward", &shape, "dv", &gdv, &dv)?;
            p.record("backward", &shape, "packed dqkv", &gdqkv, &pack(&dq, &dk, &dv))?;
        }
    }
    Ok(())
}

/// Cross-entropy on `(n, v)` logits stored with `split`, checked against the reference.
pub fn cross_entropy_case(
    p_gpu: &Gpu,
    logits: &[f32],
    targets: &[i32],
    n: usize,
    v: usize,
    split: Option<(Split, usize)>,
) -> Result<(f64, f64, f64)> {
    let gl = match split {
        Some((s, per)) => Tensor::from_host_split(p_gpu, logits, &[n, v], s, per, "logits")?,
        None => Tensor::from_host(p_gpu, logits, &[n, v], "logits")?,
    };
    let gt = cross_entropy::Targets::new(p_gpu, targets, v)?;
    let (glosses, gstate) = (Tensor::empty(p_gpu, &[n], "losses")?, Tensor::empty(p_gpu, &[n, 4], "state")?);
    glosses.fill(p_gpu, f32::NAN)?;
    cross_entropy::cross_entropy_forward(p_gpu, &glosses, &gstate, &gl, &gt)?;
    let mut losses = vec![0f32; n];
    let mean = kr::cross_entropy_forward(&mut losses, logits, targets, n, v);
    let gpu_mean = reduce::sum(p_gpu, &glosses, false)? / gt.count().max(1) as f32;
    let loss_err = if gt.count() == 0 {
        // Every target ignored: the reference's mean is 0/0 (NaN, as PyTorch's); the engine
        // reports 0 and gives no gradient.
        if gpu_mean == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else if !(mean.is_finite() && gpu_mean.is_finite()) {
        f64::INFINITY
    } else {
        // A loss near 0 is the log-sum-exp less the target's logit, two terms of the logits'
        // size: its error is measured against 1 nat there, not against itself.
        rel_err_floor(&[gpu_mean], &[mean], 1.0)
    };
    let losses_err = rel_err_floor(&glosses.to_host(p_gpu)?, &losses, 1.0);

    let dloss = 0.7;
    let gdl = Tensor::empty_split(p_gpu, &[n, v], gl.split(), gl.chunks()[0].len, "dlogits")?;
    gdl.fill(p_gpu, f32::NAN)?;
    cross_entropy::cross_entropy_backward(p_gpu, &gdl, &gl, &gstate, &gt, dloss)?;
    let mut dl = vec![0f32; n * v];
    kr::cross_entropy_backward(&mut dl, logits, targets, dloss, n, v);
    // dlogits = dloss / count * (softmax - one-hot): measured against the one-hot's size, which
    // a target's probability near 1 cancels
    let one_hot = dloss as f64 / gt.count().max(1) as f64;
    let grad_err = rel_err_floor(&gdl.to_host(p_gpu)?, &dl, one_hot);
    Ok((loss_err, losses_err, grad_err))
}

fn check_cross_entropy(p: &mut Probe) -> Result<()> {
    let cases: &[(usize, usize, Option<(Split, usize)>)] = &[
        (1, 1, None),
        (1, 2, None),
        (5, 7, None),
        (17, 100, None),
        (33, 1000, None),
        (33, 1000, Some((Split::Cols, 300))),
        (33, 1000, Some((Split::Rows, 10))),
        (9, 50257, Some((Split::Cols, 16384))),
    ];
    let mut cases = cases.to_vec();
    cases.extend((0..2).map(|_| (p.size(40), p.size(3000), None)));
    // a row per workgroup past 65,535 rows; Gemma 3's vocabulary
    cases.extend([(70_001, 3, None), (4, GEMMA3_VOCAB, None)]);
    if p.full() {
        // logits above the binding limit, in the column chunks a chunked LM head writes
        cases.push((128, GEMMA3_VOCAB, Some((Split::Cols, 52_428))));
    }
    for &(n, v, split) in &cases {
        let shape = format!("N{n} V{v} {split:?}");
        let logits: Vec<f32> = p.uniform(n * v).iter().map(|x| 10.0 * x).collect();
        let targets: Vec<i32> = (0..n)
            .map(|i| if i % 4 == 3 { kr::IGNORE_INDEX } else { p.rng.random_range(0..v as i32) })
            .collect();
        let (loss_err, losses_err, grad_err) = cross_entropy_case(p.gpu, &logits, &targets, n, v, split)?;
        p.push("forward", &shape, "mean loss", loss_err);
        p.push("forward", &shape, "losses", losses_err);
        p.push("backward", &shape, "dlogits", grad_err);
    }
    Ok(())
}

/// The fused LM head + cross-entropy (`kernels::lm_head_loss`) against
/// `kr::linear_cross_entropy_*`: the mean loss, and dx and dW added to the values already there
/// (as a tied embedding's gradient collects). Ragged shapes in forced ragged vocabulary chunks,
/// both weight layouts, W chunked along either axis, soft-capping, past 65,536 columns in the
/// kernel's own chunks; the full tier adds Gemma 3's head (262,144 x 640, above the binding).
fn check_lm_head_loss(p: &mut Probe) -> Result<()> {
    use crate::kernels::lm_head_loss::{self as lh, HeadWeight};
    // (n, C, V, W stored (V, C), soft-cap, W's chunking, vocabulary columns per chunk)
    type Case = (usize, usize, usize, bool, Option<f32>, Option<(Split, usize)>, Option<usize>);
    let mut cases: Vec<Case> = vec![
        (1, 1, 1, true, None, None, None),
        (5, 7, 13, true, None, None, Some(4)),
        (9, 33, 100, false, Some(2.0), None, Some(17)),
        (17, 24, 300, true, Some(1.5), Some((Split::Rows, 37)), Some(64)),
        (6, 40, 129, false, None, Some((Split::Rows, 16)), Some(50)),
        (7, 20, 211, true, None, Some((Split::Cols, 8)), Some(30)),
        (3, 8, 70_001, true, Some(30.0), None, None),
    ];
    cases.push((p.size(40), p.size(80), p.size(3000), true, Some(5.0), None, Some(p.size(500))));
    if p.full() {
        cases.push((4, GEMMA3_270M_HIDDEN, GEMMA3_VOCAB, true, Some(30.0), None, None));
    }
    for (n, c, v, trans_w, softcap, w_split, chunk) in cases {
        let layout = if trans_w { "(V,C)" } else { "(C,V)" };
        let shape = format!("N{n} C{c} V{v} W{layout} cap {softcap:?} {w_split:?} chunk {chunk:?}");
        let (x, w) = (p.uniform(n * c), p.uniform(v * c));
        let targets: Vec<i32> = (0..n)
            .map(|i| if i % 4 == 3 { kr::IGNORE_INDEX } else { p.rng.random_range(0..v as i32) })
            .collect();
        let w_shape = if trans_w { [v, c] } else { [c, v] };
        let (prior_dx, prior_dw) = (p.uniform(n * c), p.uniform(v * c));
        let up = |data: &[f32]| match w_split {
            Some((s, per)) => Tensor::from_host_split(p.gpu, data, &w_shape, s, per, "gradcheck input"),
            None => p.up(data, &w_shape),
        };
        let (gx, gw, gdx, gdw) = (p.up(&x, &[n, c])?, up(&w)?, p.up(&prior_dx, &[n, c])?, up(&prior_dw)?);
        let gt = cross_entropy::Targets::new(p.gpu, &targets, v)?;
        let (loss, state) = (p.out(&[1])?, p.out(&[n, 4])?);
        let hw = HeadWeight::F32 { w: &gw, trans_w };
        let dloss = 0.7;
        let go = || -> Result<()> {
            lh::lm_head_loss_forward(p.gpu, &loss, &state, &gx, hw, &gt, softcap)?;
            let (dx, dw) = (Some((&gdx, true)), Some((&gdw, true)));
            lh::lm_head_loss_backward(p.gpu, dx, dw, &gx, hw, &state, &gt, softcap, dloss)
        };
        match chunk {
            Some(cols) => lh::with_chunk_cols(cols, go)?,
            None => go()?,
        }
        let d = kr::HeadDims { n, c, v, trans_w, softcap };
        let mut losses = vec![0f32; n];
        let want = kr::linear_cross_entropy_forward(&mut losses, &x, &w, &targets, d);
        let (mut dx, mut dw) = (vec![0f32; n * c], vec![0f32; v * c]);
        kr::linear_cross_entropy_backward(Some(&mut dx), Some(&mut dw), &x, &w, &targets, dloss, d);
        let got = loss.to_host(p.gpu)?[0];
        // relative to the loss, absolute below 1 (a vocabulary of 1 has loss 0)
        let loss_err = if got.is_finite() {
            (got - want).abs() as f64 / (want.abs() as f64).max(1.0)
        } else {
            f64::INFINITY
        };
        p.push("forward", &shape, "mean loss", loss_err);
        let plus = |prior: &[f32], g: &[f32]| prior.iter().zip(g).map(|(a, b)| a + b).collect::<Vec<f32>>();
        p.record("backward", &shape, "dx", &gdx, &plus(&prior_dx, &dx))?;
        p.record("backward", &shape, "dW", &gdw, &plus(&prior_dw, &dw))?;
    }
    Ok(())
}

fn check_add(p: &mut Probe) -> Result<()> {
    for dims in p.flat_shapes(None) {
        let n: usize = dims.iter().product();
        let (a, b) = (p.uniform(n), p.uniform(n));
        let (ga, gb, gout) = (p.up(&a, &dims)?, p.up(&b, &dims)?, p.out(&dims)?);
        elementwise::add(p.gpu, &gout, &ga, &gb, 1.0, 1.0)?;
        let mut out = vec![0f32; n];
        kr::add(&mut out, &a, &b);
        p.record("forward", &format!("{dims:?}"), "add", &gout, &out)?;
        let gs = p.out(&dims)?;
        elementwise::axpby(p.gpu, &gs, &ga, 0.37, 0.0)?;
        kr::scale(&mut out, &a, 0.37);
        p.record("forward", &format!("{dims:?}"), "scale", &gs, &out)?;
        // out = a + out (a gradient collected), and a fill
        let gacc = p.up(&b, &dims)?;
        elementwise::axpby(p.gpu, &gacc, &ga, 1.0, 1.0)?;
        kr::add(&mut out, &a, &b);
        p.record("forward", &format!("{dims:?}"), "accumulate", &gacc, &out)?;
        elementwise::fill(p.gpu, &gs, 0.25)?;
        p.record("forward", &format!("{dims:?}"), "fill", &gs, &vec![0.25; n])?;
        // Backward of out = a + b is the identity into both inputs; of scale, scaling dy.
        let dy = p.uniform(n);
        let gdy = p.up(&dy, &dims)?;
        let gda = p.out(&dims)?;
        elementwise::axpby(p.gpu, &gda, &gdy, 0.37, 0.0)?;
        kr::scale(&mut out, &dy, 0.37);
        p.record("backward", &format!("{dims:?}"), "d scale", &gda, &out)?;
    }
    Ok(())
}

fn check_dropout(p: &mut Probe) -> Result<()> {
    // lengths a multiple of 4 take the vec4 kernel (elementwise_vec4.wgsl), the others not
    let cases = [(1usize, 0.5f32, 1u32), (1000, 0.1, 2), (70001, 0.3, 3), (4097, 0.0, 4), (65_536, 0.3, 5)];
    for &(n, prob, seed) in &cases {
        let shape = format!("{n} p {prob}");
        let (x, dy) = (p.uniform(n), p.uniform(n));
        let (gx, gdy, gy, gdx) = (p.up(&x, &[n])?, p.up(&dy, &[n])?, p.out(&[n])?, p.out(&[n])?);
        elementwise::dropout(p.gpu, &gy, &gx, prob, seed)?;
        elementwise::dropout(p.gpu, &gdx, &gdy, prob, seed)?;
        let (mut y, mut dx) = (vec![0f32; n], vec![0f32; n]);
        kr::dropout(&mut y, &x, prob, seed);
        kr::dropout(&mut dx, &dy, prob, seed);
        p.record("forward", &shape, "", &gy, &y)?;
        p.record("backward", &shape, "", &gdx, &dx)?;
    }
    Ok(())
}

/// Error of values that must equal the reference exactly (a conversion): 0 if every value is
/// the reference's (NaN where it is NaN), else the largest `|gpu - ref| / |ref|` (infinite where
/// one is not finite or the reference is 0), so that any one misrounded value fails.
pub fn exact_err(gpu: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(gpu.len(), reference.len(), "compared outputs differ in length");
    let mut worst = 0f64;
    for (&g, &r) in gpu.iter().zip(reference) {
        if g == r || (g.is_nan() && r.is_nan()) {
            continue;
        }
        let rel = (g as f64 - r as f64).abs() / (r as f64).abs();
        worst = worst.max(if rel.is_finite() { rel } else { f64::INFINITY });
    }
    worst
}

/// Values over f16's and bf16's whole range: magnitudes 2^-30 to 2^20 (f16 subnormals and
/// overflow included), and at the front (where they fit) the edge cases: ties, the saturation
/// bound, infinities, NaN, signed zeros, an f32 subnormal.
fn wide_values(p: &mut Probe, n: usize) -> Vec<f32> {
    let mut x: Vec<f32> = (0..n)
        .map(|_| {
            let m = p.rng.random_range(1.0f32..2.0) * 2f32.powi(p.rng.random_range(-30..=20));
            if p.rng.random::<bool>() {
                m
            } else {
                -m
            }
        })
        .collect();
    let edges = [
        0.0,
        -0.0,
        1.0 + 2f32.powi(-11),       // f16 tie, to even (1)
        1.0 + 3.0 * 2f32.powi(-11), // f16 tie, to even (up)
        1.0 + 2f32.powi(-8),        // bf16 tie
        65504.0,
        65519.99,
        65520.0,
        -1e6,
        f32::MAX,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        2f32.powi(-24),
        2f32.powi(-25),
        1.5 * 2f32.powi(-24),
        2f32.powi(-14) * (1.0 - 2f32.powi(-12)), // rounds up to f16's smallest normal
        1e-40,
    ];
    for (v, e) in x.iter_mut().zip(edges) {
        *v = e;
    }
    x
}

/// `kernels::half`: activations packed to f16 or bf16 and unpacked, against `half`'s
/// conversions (`kernels_ref::half_round`), exactly; tensors chunked by rows and by columns.
fn check_half_storage(p: &mut Probe) -> Result<()> {
    use crate::kernels::half::{self, HalfFormat};
    for format in [HalfFormat::F16, HalfFormat::Bf16] {
        p.label = Some(format!("half_storage {format:?}").to_lowercase());
        // (shape, chunking): odd lengths leave half a word; a real activation (GPT-2's MLP,
        // batch 4 x 128); a tensor in row chunks and one in column chunks (as logits are)
        let mut cases: Vec<(Vec<usize>, Option<(Split, usize)>)> =
            p.flat_shapes(Some([GEMMA3_VOCAB, GEMMA3_270M_HIDDEN])).into_iter().map(|d| (d, None)).collect();
        cases.push((vec![512, 3072], None));
        cases.push((vec![7, 33], Some((Split::Rows, 3))));
        cases.push((vec![5, 1001], Some((Split::Cols, 333))));
        for (dims, split) in cases {
            let n: usize = dims.iter().product();
            let x = wide_values(p, n);
            let gx = match split {
                Some((s, per)) => Tensor::from_host_split(p.gpu, &x, &dims, s, per, "gradcheck input")?,
                None => p.up(&x, &dims)?,
            };
            let h = half::pack(p.gpu, &gx, format)?;
            drop(gx);
            let back = half::unpack(p.gpu, &h)?;
            let mut want = vec![0f32; n];
            kr::half_round(&mut want, &x, format);
            let chunks = back.chunks().len();
            let shape = match split {
                Some((s, per)) => format!("{dims:?} {s:?}/{per}"),
                None if chunks > 1 => format!("{dims:?} in {chunks} chunks"),
                None => format!("{dims:?}"),
            };
            p.push("forward", &shape, "round trip", exact_err(&back.to_host(p.gpu)?, &want));
        }
    }
    p.label = None;
    Ok(())
}

fn check_reduce(p: &mut Probe) -> Result<()> {
    let mut sizes: Vec<Vec<usize>> =
        [1usize, 7, 4096, 4097, 70001, 1 << 20].iter().map(|&n| vec![n]).collect();
    if p.full() {
        sizes.push(vec![GEMMA3_VOCAB, GEMMA3_270M_HIDDEN]);
    }
    for dims in sizes {
        let n: usize = dims.iter().product();
        // Positive inputs: a sum of signed values can cancel to near zero, and the relative
        // error of a cancelled sum says nothing about the kernel.
        let x: Vec<f32> = p.uniform(n).iter().map(|v| v.abs()).collect();
        let gx = p.up(&x, &dims)?;
        let s = reduce::sum(p.gpu, &gx, false)?;
        let ss = reduce::sum(p.gpu, &gx, true)?;
        p.push("forward", &format!("{dims:?}"), "sum", rel_err(&[s], &[kr::sum(&x) as f32]));
        p.push("forward", &format!("{dims:?}"), "sum_squares", rel_err(&[ss], &[kr::sum_squares(&x) as f32]));
    }
    // past 65,535 rows: the column sums run a span of rows per dispatch
    for &(rows, cols) in ROW_SHAPES.iter().chain(&[(70_001, 3)]) {
        let x = p.uniform(rows * cols);
        let (gx, gout) = (p.up(&x, &[rows, cols])?, p.out(&[cols])?);
        reduce::sum_rows(p.gpu, &gout, &gx, false)?;
        let want: Vec<f32> =
            (0..cols).map(|j| (0..rows).map(|r| x[r * cols + j] as f64).sum::<f64>() as f32).collect();
        p.record("forward", &format!("{rows}x{cols}"), "sum_rows", &gout, &want)?;
    }
    Ok(())
}

fn check_clip(p: &mut Probe) -> Result<()> {
    let mut cases = vec![(1usize, vec![1usize], 0.1f32), (1000, vec![70001], 1.0), (1000, vec![70001], 1e6)];
    cases.push((7, vec![5000], 3.0));
    if p.full() {
        cases.push((1000, vec![GEMMA3_VOCAB, GEMMA3_270M_HIDDEN], 1.0));
    }
    for (n1, dims2, max_norm) in cases {
        let n2: usize = dims2.iter().product();
        let shape = format!("{n1}+{dims2:?} max_norm {max_norm}");
        let (mut a, mut b) = (p.uniform(n1), p.uniform(n2));
        let (ga, gb) = (p.up(&a, &[n1])?, p.up(&b, &dims2)?);
        let acc = reduce::clip_grad_norm(p.gpu, &[&ga, &gb], max_norm)?;
        let norm = kr::clip_grad_norm(&mut [&mut a, &mut b], max_norm);
        let got = acc.to_host(p.gpu)?;
        p.push("forward", &shape, "norm", rel_err(&[got[0].sqrt()], &[norm]));
        p.record("forward", &shape, "grads", &ga, &a)?;
        p.record("forward", &shape, "grads", &gb, &b)?;
    }
    // The step status's skip flag, which AdamW reads on the GPU: set by a non-finite gradient
    // (NaN or infinite) or loss sum, clear otherwise; the loss sum passes through.
    for (grad, loss) in
        [(1.0, 2.5), (f32::NAN, 2.5), (f32::INFINITY, 2.5), (1.0, f32::NAN), (1.0, f32::INFINITY)]
    {
        let mut a = p.uniform(5000);
        a[4321] = grad;
        let shape = format!("5000, gradient {grad}, loss {loss}");
        let status = reduce::step_status(p.gpu)?;
        reduce::sum_into(p.gpu, &status, reduce::STATUS_LOSS, &p.up(&[loss], &[1])?, false)?;
        reduce::clip_into(p.gpu, &status, &[&p.up(&a, &[5000])?], 1.0)?;
        let got = status.to_host(p.gpu)?;
        let skip = if grad.is_finite() && loss.is_finite() { 0.0 } else { 1.0 };
        p.push("forward", &shape, "skip flag", rel_err(&[got[reduce::STATUS_SKIP]], &[skip]));
        if loss.is_finite() {
            p.push("forward", &shape, "loss sum", rel_err(&[got[reduce::STATUS_LOSS]], &[loss]));
        }
    }
    Ok(())
}

fn check_adamw(p: &mut Probe) -> Result<()> {
    let opt = kr::AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
    for dims in p.flat_shapes(Some([GEMMA3_VOCAB, GEMMA3_270M_HIDDEN])) {
        let n: usize = dims.iter().product();
        let mut w = p.uniform(n);
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        let (gw, gm, gv) = (p.up(&w, &dims)?, p.up(&m, &dims)?, p.up(&v, &dims)?);
        for step in 1..=3 {
            let g = p.uniform(n);
            let gg = p.up(&g, &dims)?;
            optim::adamw_step(p.gpu, &gw, &gg, &gm, &gv, opt, step)?;
            kr::adamw_step(&mut w, &g, &mut m, &mut v, opt, step);
        }
        // Each tensor comes back once a stage (at Gemma 3's vocabulary a download is 671 MB):
        // after 3 steps, the values checked and kept; after a skipped step, compared bit for bit.
        let shape = format!("{dims:?}");
        let before = [gw.to_host(p.gpu)?, gm.to_host(p.gpu)?, gv.to_host(p.gpu)?];
        for (got, want, output) in
            [(&before[0], &w, "params after 3 steps"), (&before[1], &m, "m"), (&before[2], &v, "v")]
        {
            p.push("step", &shape, output, rel_err(got, want));
        }
        // Gated by a step status on the GPU: a skip changes nothing, a go is a plain step.
        let g = p.uniform(n);
        let gg = p.up(&g, &dims)?;
        let skip = p.up(&[0.0, 1.0, 0.0, 1.0], &[4])?;
        optim::adamw_step_gated(p.gpu, &gw, &gg, &gm, &gv, opt, 4, Some(&skip))?;
        let after = [gw.to_host(p.gpu)?, gm.to_host(p.gpu)?, gv.to_host(p.gpu)?];
        let same =
            before.iter().zip(&after).all(|(b, a)| b.iter().zip(a).all(|(x, y)| x.to_bits() == y.to_bits()));
        drop(before);
        p.push("step", &shape, "skipped step leaves every bit", if same { 0.0 } else { f64::INFINITY });
        for (got, want, output) in [
            (&after[0], &w, "params after a skipped step"),
            (&after[1], &m, "m after a skipped step"),
            (&after[2], &v, "v after a skipped step"),
        ] {
            p.push("step", &shape, output, rel_err(got, want));
        }
        drop(after);
        let go = p.up(&[0.0, 1.0, 0.0, 0.0], &[4])?;
        optim::adamw_step_gated(p.gpu, &gw, &gg, &gm, &gv, opt, 4, Some(&go))?;
        kr::adamw_step(&mut w, &g, &mut m, &mut v, opt, 4);
        p.record("step", &shape, "params after a gated step", &gw, &w)?;
        p.record("step", &shape, "v after a gated step", &gv, &v)?;
    }
    Ok(())
}

fn check_sgd(p: &mut Probe) -> Result<()> {
    for dims in p.flat_shapes(None) {
        let n: usize = dims.iter().product();
        let (mut w, g) = (p.uniform(n), p.uniform(n));
        let (gw, gg) = (p.up(&w, &dims)?, p.up(&g, &dims)?);
        optim::sgd_step(p.gpu, &gw, &gg, 0.1, 0.01)?;
        kr::sgd_step(&mut w, &g, 0.1, 0.01);
        p.record("step", &format!("{dims:?}"), "params", &gw, &w)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::rel_err;

    /// Regression: `f64::max` drops NaN, so a NaN in the reference output used to pass.
    #[test]
    fn nan_or_inf_on_either_side_fails() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            assert_eq!(rel_err(&[1.0, bad], &[1.0, 2.0]), f64::INFINITY, "{bad} in the GPU output");
            assert_eq!(rel_err(&[1.0, 2.0], &[1.0, bad]), f64::INFINITY, "{bad} in the reference");
        }
        assert_eq!(rel_err(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((rel_err(&[1.0, 2.1], &[1.0, 2.0]) - 0.05).abs() < 1e-6);
    }
}
