//! The kernel self-test: every GPU kernel, forward and backward, against `kernels-ref` on random
//! inputs and awkward shapes (sizes of 1, primes, sizes that are no multiple of any tile or
//! workgroup size, chunked operands). The test suite and `pockettune gradcheck` both run it, so
//! a phone user checks their own driver with exactly the checks CI runs.
//!
//! Error measure, per output: `max |gpu - ref| / max |ref|`. Outputs are poisoned with NaN
//! before each GPU run, so an element the kernel forgot to write fails the check.

use crate::error::Result;
use crate::gpu::{Gpu, MatmulKernel, Precision, Tensor};
use crate::kernels::{
    activation::Act,
    matmul,
    norm::NormKind,
    rows::{self, RowReduce},
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

mod attention;
mod layers;
mod loss;
mod optim;
mod products;
mod quant;
mod storage;
pub use loss::cross_entropy_case;
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

/// (rows, columns) of the row-reducing kernels' checks.
const ROW_SHAPES: &[(usize, usize)] = &[(1, 1), (1, 7), (3, 5), (17, 31), (64, 257), (5, 1000), (130, 64)];

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
        "matmul" => products::check_matmul(p, Precision::F32),
        "matmul_chunked" => products::check_matmul_chunked(p),
        "matmul_batched" => products::check_matmul_batched(p),
        "matmul_mixed" => products::check_matmul(p, Precision::Mixed),
        "softmax" => layers::check_softmax(p),
        "layernorm" => layers::check_norm(p, NormKind::Layer),
        "rmsnorm" => layers::check_norm(p, NormKind::Rms { gemma: false }),
        "rmsnorm_gemma" => layers::check_norm(p, NormKind::Rms { gemma: true }),
        "gelu" => layers::check_act(p, Act::Gelu),
        "silu" => layers::check_act(p, Act::Silu),
        "softcap" => layers::check_act(p, Act::Softcap(1.7)),
        "swiglu" => layers::check_glu(p, Act::Silu),
        "geglu" => layers::check_glu(p, Act::Gelu),
        "embedding" => layers::check_embedding(p),
        "rope" => layers::check_rope(p),
        "attention" => attention::check_attention(p),
        "flash_attention" => attention::check_flash_attention(p),
        "cross_entropy" => loss::check_cross_entropy(p),
        "add" => layers::check_add(p),
        "dropout" => layers::check_dropout(p),
        "half_storage" => storage::check_half_storage(p),
        "reduce" => optim::check_reduce(p),
        "clip_grad_norm" => optim::check_clip(p),
        "adamw" => optim::check_adamw(p),
        "sgd" => optim::check_sgd(p),
        "qmatmul" => quant::check_qmatmul(p, Precision::F32),
        "qmatmul_mixed" => quant::check_qmatmul(p, Precision::Mixed),
        "qmatmul_dx" => quant::check_qmatmul_dx(p),
        "qembedding" => quant::check_qembedding(p),
        "lm_head_loss" => loss::check_lm_head_loss(p),
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
