//! `--precision mixed`: the forward products of linear layers take each product in f16 and sum
//! in f32, on a GPU with `shader_f16` (lavapipe has it): `shaders/matmul_mixed.wgsl` for the
//! register-tile kernels, `matmul_staged_mixed` (f16 tiles in workgroup memory) for a staged
//! tile, `quant_mixed` through a frozen weight in its stored format. The product checks below
//! run each.
//!
//! - The kernel is the f16 product summed in f32: against an emulation built from `half`'s
//!   rounding and f64 sums, within f32 summation's error (stated below); and against the exact
//!   product within f16's own bound, `3 * 2^-11 * sum_k |a_ik b_kj|` plus f32's. Poisoned
//!   outputs, every transpose, bias, and K past one dispatch's loop span.
//! - Training tracks f32: the same run in both precisions (a 2-layer GPT-2, 12 steps), and with
//!   the kept activations in 16 bits (f16, the default under mixed; bf16 under f32), every
//!   step's loss within 1e-3 relative (measured: 1.3e-5 at most for mixed), and falling.
//! - Mixed precision on a CPU path is refused with a clear error.
//!
//! `pockettune gradcheck` checks the same kernel on the user's device (`matmul_mixed`, tolerance
//! `gradcheck::MIXED_TOL`).

mod common;

use clap::Parser;
use pockettune::gpu::{MatmulKernel, Precision};
use pockettune::graph::Device;
use pockettune::kernels::matmul;
use pockettune::train::{train, TrainOptions};
use pockettune::{Gpu, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The shared GPU, if it has f16 arithmetic (in CI it must).
fn f16_gpu() -> Option<&'static std::sync::Arc<Gpu>> {
    let gpu = common::gpu()?;
    if gpu.has_f16() {
        return Some(gpu);
    }
    assert!(std::env::var_os("CI").is_none(), "CI's GPU ({}) has no shader_f16", gpu.summary());
    eprintln!("skipping: {} has no shader_f16", gpu.summary());
    None
}

/// The f32 kernels whose mixed-precision forms differ: the register tile's shader
/// (`matmul_mixed.wgsl`, which the subgroup kernel shares) and the staged one (its first tile).
fn mixed_kernels(gpu: &Gpu) -> Vec<MatmulKernel> {
    let kernels = MatmulKernel::one_per_mixed_shader(gpu.matmul_kernels());
    assert!(kernels.iter().any(|k| matches!(k, MatmulKernel::Staged(_))), "no staged tile offered");
    kernels
}

/// An f32 rounded to f16 (nearest even) and back, exactly, as f64.
fn h(x: f32) -> f64 {
    half::f16::from_f32(x).to_f32() as f64
}

/// `n` values of magnitude in [lo, 1] with random signs.
fn values(rng: &mut StdRng, n: usize, lo: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..1.0) * if rng.random_bool(0.5) { 1.0 } else { -1.0 }).collect()
}

struct Product {
    /// the kernel's output
    got: Vec<f32>,
    /// per element: the exact sum (f64), the f16 emulation, and sum_k |a_ik b_kj|
    exact: Vec<f64>,
    emulated: Vec<f64>,
    abs: Vec<f64>,
    k: usize,
}

/// `C (m, n) = op(A) op(B) (+ bias)` through the mixed kernel, and its references.
fn product(
    gpu: &Gpu,
    (m, n, k): (usize, usize, usize),
    (ta, tb): (bool, bool),
    bias: bool,
    lo: f32,
) -> Product {
    let mut rng = StdRng::seed_from_u64((m * 31 + n * 7 + k) as u64);
    let (a, b, bv) = (values(&mut rng, m * k, lo), values(&mut rng, k * n, lo), values(&mut rng, n, lo));
    let at = |i: usize, kk: usize| if ta { a[kk * m + i] } else { a[i * k + kk] };
    let bt = |kk: usize, j: usize| if tb { b[j * k + kk] } else { b[kk * n + j] };
    let (sa, sb) = (if ta { [k, m] } else { [m, k] }, if tb { [n, k] } else { [k, n] });
    let ga = Tensor::from_host(gpu, &a, &sa, "a").unwrap();
    let gb = Tensor::from_host(gpu, &b, &sb, "b").unwrap();
    let gbias = Tensor::from_host(gpu, &bv, &[n], "bias").unwrap();
    let gc = Tensor::from_host(gpu, &vec![f32::NAN; m * n], &[m, n], "c").unwrap();
    matmul::with_precision(Precision::Mixed, || {
        matmul::matmul(gpu, &gc, &ga, &gb, bias.then_some(&gbias), ta, tb, false)
    })
    .unwrap();
    let got = gc.to_host(gpu).unwrap();
    let (mut exact, mut emulated, mut abs) = (vec![0f64; m * n], vec![0f64; m * n], vec![0f64; m * n]);
    for i in 0..m {
        for j in 0..n {
            let (mut e, mut f, mut s) = (0f64, 0f64, 0f64);
            for kk in 0..k {
                let (x, y) = (at(i, kk), bt(kk, j));
                e += x as f64 * y as f64;
                f += h((h(x) * h(y)) as f32); // the f16 product of the f16 operands
                s += (x as f64 * y as f64).abs();
            }
            let add = if bias { bv[j] as f64 } else { 0.0 };
            (exact[i * n + j], emulated[i * n + j], abs[i * n + j]) = (e + add, f + add, s + add.abs());
        }
    }
    Product { got, exact, emulated, abs, k }
}

#[test]
fn the_mixed_product_is_the_f16_product_summed_in_f32() {
    let Some(gpu) = f16_gpu() else { return };
    // magnitudes in [1/4, 1]: every f16 product is a normal number, so the emulation is exact
    // whatever the device does with f16 subnormals
    for (kernel, dims) in mixed_kernels(gpu)
        .into_iter()
        .flat_map(|k| [(1, 1, 1), (7, 5, 13), (67, 65, 63), (31, 130, 97)].map(|d| (k, d)))
    {
        for tr in [(false, false), (false, true), (true, false), (true, true)] {
            for bias in [false, true] {
                let p = matmul::with_kernel(kernel, || product(gpu, dims, tr, bias, 0.25));
                // f32 summation of k terms in sequence: within (k + 1) * 2^-24 * sum |terms|
                let u = (p.k + 1) as f64 * 2f64.powi(-24);
                let mut f16_visible = false;
                for i in 0..p.got.len() {
                    let (g, f, e, s) = (p.got[i] as f64, p.emulated[i], p.exact[i], p.abs[i]);
                    assert!(
                        (g - f).abs() <= u * s,
                        "{} {dims:?} {tr:?} bias {bias}: [{i}] {g} vs emulated {f}",
                        kernel.name()
                    );
                    f16_visible |= (g - e).abs() > u * s;
                }
                // the arithmetic really is f16: somewhere the result is off the exact sum by
                // more than f32 could be (unless every operand happened to be an f16 already)
                assert!(
                    f16_visible || dims == (1, 1, 1),
                    "{} {dims:?} {tr:?}: the product looks like f32 arithmetic",
                    kernel.name()
                );
            }
        }
    }
}

#[test]
fn the_mixed_product_is_within_f16_error_of_the_exact_product() {
    let Some(gpu) = f16_gpu() else { return };
    // the whole [-1, 1] range (subnormal f16 products included), and K past one dispatch's span
    let shapes =
        [((64, 96, 128), (false, true)), ((5, 3, 70_000), (false, true)), ((33, 17, 300), (true, false))];
    for (kernel, (dims, tr)) in mixed_kernels(gpu).into_iter().flat_map(|k| shapes.map(|s| (k, s))) {
        let p = matmul::with_kernel(kernel, || product(gpu, dims, tr, true, 0.0));
        let (u16, u32) = (3.0 * 2f64.powi(-11), (p.k + 1) as f64 * 2f64.powi(-24));
        // a product below f16's normal range is off by at most half its smallest step, 2^-25
        let subnormal = p.k as f64 * 2f64.powi(-25);
        let mut worst = 0f64;
        for i in 0..p.got.len() {
            let (g, e, s) = (p.got[i] as f64, p.exact[i], p.abs[i]);
            let bound = (u16 + u32) * s + subnormal;
            assert!(
                (g - e).abs() <= bound,
                "{} {dims:?}: [{i}] {g} vs exact {e} (bound {bound:e})",
                kernel.name()
            );
            worst = worst.max((g - e).abs() / s);
        }
        eprintln!("{} {dims:?}: worst |mixed - exact| / sum |ab| = {worst:.2e}", kernel.name());
    }
}

/// `quant_mixed`, the fused product through a frozen weight in its stored format under
/// `--precision mixed`, is each `q * x` taken in f16 (q: an F16 weight's value, or a Q8_0
/// block's integer quant, exact in f16), summed in f32 and scaled in f32: against that
/// emulation within f32's summation error, and visibly not f32 arithmetic. K past one
/// dispatch's loop span included.
#[test]
fn the_mixed_product_through_a_frozen_weight_is_its_f16_products_summed_in_f32() {
    use kernels_ref::quant::{random_blocks, GgmlType};
    use pockettune::gpu::QTensor;
    use pockettune::kernels::quant::{self, QmatmulVariant};
    let Some(gpu) = f16_gpu() else { return };
    for ty in [GgmlType::F16, GgmlType::Q8_0] {
        // somewhere the result is off the exact sum by more than f32 could be (at K = 70,016
        // f32's own bound is too loose to tell)
        let mut f16_visible = false;
        for (m, n, k) in [(1, 1, 32), (5, 7, 96), (3, 4, 70_016)] {
            let mut rng = StdRng::seed_from_u64((m * 31 + n * 7 + k) as u64);
            let x = values(&mut rng, m * k, 0.25);
            // each weight as (scale, q): F16 (1, value), Q8_0 (the block's d, its i8 quant)
            let (bytes, w): (Vec<u8>, Vec<(f64, f32)>) = match ty {
                GgmlType::F16 => {
                    let w: Vec<half::f16> =
                        values(&mut rng, n * k, 0.25).iter().map(|&v| half::f16::from_f32(v)).collect();
                    let bytes = w.iter().flat_map(|h| h.to_le_bytes()).collect();
                    (bytes, w.iter().map(|h| (1.0, h.to_f32())).collect())
                }
                _ => {
                    let bytes = random_blocks(ty, n * k, rng.random());
                    let w = bytes
                        .chunks(34)
                        .flat_map(|b| {
                            let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32() as f64;
                            b[2..].iter().map(move |&q| (d, q as i8 as f32))
                        })
                        .collect();
                    (bytes, w)
                }
            };
            let gw = QTensor::from_bytes(gpu, ty, &bytes, &[n, k], "w").unwrap();
            let gx = Tensor::from_host(gpu, &x, &[m, k], "x").unwrap();
            let gy = Tensor::from_host(gpu, &vec![f32::NAN; m * n], &[m, n], "y").unwrap();
            matmul::with_precision(Precision::Mixed, || {
                quant::with_variant(QmatmulVariant::Fused, || quant::qmatmul(gpu, &gy, &gx, &gw, None, false))
            })
            .unwrap();
            let got = gy.to_host(gpu).unwrap();
            for i in 0..m {
                for j in 0..n {
                    let (mut emulated, mut exact, mut abs) = (0f64, 0f64, 0f64);
                    for kk in 0..k {
                        let ((d, q), xv) = (w[j * k + kk], x[i * k + kk]);
                        emulated += d * h((h(q) * h(xv)) as f32);
                        exact += d * q as f64 * xv as f64;
                        abs += (d * q as f64 * xv as f64).abs();
                    }
                    let g = got[i * n + j] as f64;
                    let u = (k + 1) as f64 * 2f64.powi(-24) * abs;
                    assert!(
                        (g - emulated).abs() <= u,
                        "{ty} {m}x{n}x{k}: [{i},{j}] {g} vs emulated {emulated}"
                    );
                    f16_visible |= (g - exact).abs() > u;
                }
            }
        }
        assert!(f16_visible, "{ty}: the product looks like f32 arithmetic");
    }
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    o: TrainOptions,
}

#[test]
fn training_in_mixed_precision_tracks_f32() {
    let Some(_) = f16_gpu() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    common::tiny_model_dir(&model, 3);
    let data = tmp.path().join("data.txt");
    let text = "It was the best of times, it was the worst of times, it was the age of wisdom. ";
    std::fs::write(&data, text.repeat(20)).unwrap();
    let run = |precision: &str, activations: &str| {
        let out = tmp.path().join(format!("{precision}-{activations}"));
        let args = [
            "x",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--device",
            "0",
            "--precision",
            precision,
            "--activations",
            activations,
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--steps",
            "12",
            "--lr",
            "3e-3",
            "--save-every",
            "0",
        ];
        train(&Cli::parse_from(args).o, false).unwrap().losses
    };
    let f32_losses = run("f32", "auto");
    // mixed: f16 products, and (auto) the kept activations in f16; then f32 products with the
    // activations in bf16, and mixed products with f32 activations
    for (precision, activations) in [("mixed", "auto"), ("f32", "bf16"), ("mixed", "f32")] {
        let what = format!("--precision {precision} --activations {activations}");
        let losses = run(precision, activations);
        eprintln!("f32:   {f32_losses:?}\n{what}: {losses:?}");
        assert_eq!(f32_losses.len(), losses.len());
        for (i, (a, b)) in f32_losses.iter().zip(&losses).enumerate() {
            let rel = ((a - b) / a).abs();
            assert!(rel <= 1e-3, "{what}, step {}: loss {b} vs f32 {a} (rel {rel:e})", i + 1);
        }
        assert!(losses.last().unwrap() < &(losses[0] * 0.9), "{what}: the run did not learn: {losses:?}");
        // and it did round: the losses are not bit-identical to f32's
        assert_ne!(f32_losses, losses, "{what} gave f32's losses bit for bit");
    }
}

#[test]
fn mixed_precision_on_a_cpu_path_is_refused_with_what_to_do() {
    for dev in [Device::CPU, Device::CPU_REF] {
        let e = pockettune::train::set_precision(&dev, Precision::Mixed).unwrap_err().to_string();
        assert!(e.contains("--precision f32"), "{e}");
        pockettune::train::set_precision(&dev, Precision::F32).unwrap();
    }
}
