//! `cargo bench --bench quant`: the products through a frozen quantized weight at Gemma 3
//! 270M's shapes and storage types (its Q4_K_M file: Q5_0 gate/up/q, Q4_K and Q6_K down, Q4_K
//! o_proj, Q8_0 tied LM head), side by side in one run: the f32 matmul on the weight
//! dequantized (what `--base-dtype f32` runs), the fused kernels and the scratch variant
//! (`kernels::quant`), forward `y = x W^T` and backward `dx = dy W`, in GMAC/s.
//!
//! Options (after `--`): `--rows 128,1024` (rows of x), `--sweep` (instead: fused against
//! scratch at 1..64 rows, where the automatic choice switches), `--big` (also the fused
//! kernels on the LM head at 1,024 rows, several minutes each on lavapipe), `--dequant` (instead:
//! the scratch variant's dequantizer alone, values per second), `--budget-ms N`
//! (least wall time per measurement after a one-row warm-up, default 300).
//! `POCKETTUNE_DEVICE` picks the adapter.

use kernels_ref::quant::{dequantize, random_blocks, GgmlType};
use pockettune::gpu::QTensor;
use pockettune::kernels::matmul;
use pockettune::kernels::quant::{self, QmatmulVariant};
use pockettune::{Gpu, GpuOptions, Tensor};
use std::time::{Duration, Instant};

/// (layer, N, K, type) as in gemma-3-270m-Q4_K_M.gguf.
const SHAPES: &[(&str, usize, usize, GgmlType)] = &[
    ("gate/up 2048x640", 2048, 640, GgmlType::Q5_0),
    ("down 640x2048", 640, 2048, GgmlType::Q4_K),
    ("down 640x2048", 640, 2048, GgmlType::Q6_K),
    ("q_proj 1024x640", 1024, 640, GgmlType::Q5_0),
    ("o_proj 640x1024", 640, 1024, GgmlType::Q4_K),
    ("lm_head 262144x640", 262_144, 640, GgmlType::Q8_0),
];

/// Fused kernels are skipped past this many multiply-adds unless `--big` (minutes each).
const BIG_MACS: f64 = 50e9;

struct Opts {
    rows: Vec<usize>,
    sweep: bool,
    dequant: bool,
    big: bool,
    budget: Duration,
}

fn opts() -> Opts {
    let mut o = Opts {
        rows: vec![128, 1024],
        sweep: false,
        dequant: false,
        big: false,
        budget: Duration::from_millis(300),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--rows" => {
                i += 1;
                o.rows = args[i].split(',').map(|s| s.parse().expect("--rows takes numbers")).collect();
            }
            "--budget-ms" => {
                i += 1;
                o.budget = Duration::from_millis(args[i].parse().expect("--budget-ms takes a number"));
            }
            "--sweep" => o.sweep = true,
            "--dequant" => o.dequant = true,
            "--big" => o.big = true,
            _ => {} // cargo bench passes --bench
        }
        i += 1;
    }
    o
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Seconds per run of `f` after `warm` (the same pipelines on one row: compiled and pooled
/// before the clock starts), at least once and until `budget` has passed.
fn time(
    gpu: &Gpu,
    budget: Duration,
    warm: impl Fn() -> pockettune::Result<()>,
    f: impl Fn() -> pockettune::Result<()>,
) -> f64 {
    warm().unwrap();
    gpu.sync().unwrap();
    let start = Instant::now();
    let mut runs = 0u32;
    while runs == 0 || start.elapsed() < budget {
        f().unwrap();
        gpu.sync().unwrap();
        runs += 1;
    }
    start.elapsed().as_secs_f64() / runs as f64
}

struct Weight {
    q: QTensor,
    f: Tensor,
}

fn weight(gpu: &Gpu, n: usize, k: usize, ty: GgmlType) -> Weight {
    let bytes = random_blocks(ty, n * k, 7);
    let mut w = vec![0f32; n * k];
    dequantize(ty, &bytes, &mut w);
    let q = QTensor::from_bytes(gpu, ty, &bytes, &[n, k], "W").unwrap();
    let f = Tensor::from_host(gpu, &w, &[n, k], "W f32").unwrap();
    Weight { q, f }
}

fn filled(gpu: &Gpu, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0).collect();
    Tensor::from_host(gpu, &v, shape, "input").unwrap()
}

/// GMAC/s of the forward and dX products with `m` rows by the f32 matmul (None: not asked) and
/// by each variant in `variants`, in that order.
fn measure(
    gpu: &Gpu,
    w: &Weight,
    m: usize,
    f32_too: bool,
    variants: &[Option<QmatmulVariant>],
    budget: Duration,
) -> (Vec<Option<f64>>, Vec<Option<f64>>) {
    let (n, k) = (w.q.rows(), w.q.cols());
    let (x, dy) = (filled(gpu, &[m, k]), filled(gpu, &[m, n]));
    let (x1, dy1) = (filled(gpu, &[1, k]), filled(gpu, &[1, n]));
    let (y, dx) = (Tensor::empty(gpu, &[m, n], "y").unwrap(), Tensor::empty(gpu, &[m, k], "dx").unwrap());
    let (y1, dx1) = (Tensor::empty(gpu, &[1, n], "y").unwrap(), Tensor::empty(gpu, &[1, k], "dx").unwrap());
    let gmacs = |s: f64| (m * n * k) as f64 / s / 1e9;
    let mut fwd = Vec::new();
    let mut bwd = Vec::new();
    if f32_too {
        fwd.push(Some(gmacs(time(
            gpu,
            budget,
            || matmul::matmul(gpu, &y1, &x1, &w.f, None, false, true, false),
            || matmul::matmul(gpu, &y, &x, &w.f, None, false, true, false),
        ))));
        bwd.push(Some(gmacs(time(
            gpu,
            budget,
            || matmul::matmul(gpu, &dx1, &dy1, &w.f, None, false, false, false),
            || matmul::matmul(gpu, &dx, &dy, &w.f, None, false, false, false),
        ))));
    }
    for v in variants {
        let Some(v) = *v else {
            fwd.push(None);
            bwd.push(None);
            continue;
        };
        quant::with_variant(v, || {
            fwd.push(Some(gmacs(time(
                gpu,
                budget,
                || quant::qmatmul(gpu, &y1, &x1, &w.q, None, false),
                || quant::qmatmul(gpu, &y, &x, &w.q, None, false),
            ))));
            bwd.push(Some(gmacs(time(
                gpu,
                budget,
                || quant::qmatmul_dx(gpu, &dx1, &dy1, &w.q, false),
                || quant::qmatmul_dx(gpu, &dx, &dy, &w.q, false),
            ))));
        });
    }
    (fwd, bwd)
}

fn cell(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into())
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}", a / b),
        _ => "-".into(),
    }
}

fn main() {
    let o = opts();
    let gpu = Gpu::new(&GpuOptions::default()).unwrap();
    eprintln!("device: {}; matmul kernel {}", gpu.summary(), gpu.matmul_kernel().name());
    println!("load average at start: {}", load());
    if o.dequant {
        println!("dequantize (qdequantize) the whole weight into f32, M values/s");
        for &(layer, n, k, ty) in SHAPES {
            let w = weight(&gpu, n, k, ty);
            let per = ((32 << 20) / (4 * k)).min(n);
            let out = Tensor::empty(&gpu, &[per, k], "rows").unwrap();
            let all = || (0..n / per).try_for_each(|b| quant::qdequantize(&gpu, &out, &w.q, b * per));
            let s = time(&gpu, o.budget, all, all);
            println!("{layer:<20} {:<5} {:>10.1}", ty.name(), (n / per * per * k) as f64 / s / 1e6);
        }
        println!("load average at end: {}", load());
        return;
    }
    if o.sweep {
        println!("fused against scratch by rows of x, GMAC/s (scratch/fused > 1: scratch faster)");
        println!(
            "{:<20} {:<5} {:>5} {:>8} {:>8} {:>6} {:>8} {:>8} {:>6}",
            "layer", "type", "M", "fwd fus", "fwd scr", "s/f", "dX fus", "dX scr", "s/f"
        );
        for &(layer, n, k, ty) in SHAPES.iter().filter(|s| s.1 <= 2048) {
            let w = weight(&gpu, n, k, ty);
            for m in [1, 2, 4, 8, 12, 16, 24, 32, 64] {
                let vs = [Some(QmatmulVariant::Fused), Some(QmatmulVariant::Scratch)];
                let (f, b) = measure(&gpu, &w, m, false, &vs, o.budget);
                println!(
                    "{layer:<20} {:<5} {m:>5} {:>8} {:>8} {:>6} {:>8} {:>8} {:>6}",
                    ty.name(),
                    cell(f[0]),
                    cell(f[1]),
                    ratio(f[1], f[0]),
                    cell(b[0]),
                    cell(b[1]),
                    ratio(b[1], b[0])
                );
            }
        }
    } else {
        println!("GMAC/s; f32 = the f32 matmul on the dequantized weight (--base-dtype f32)");
        println!(
            "{:<20} {:<5} {:>5} | {:>7} {:>7} {:>7} {:>6} {:>6} | {:>7} {:>7} {:>7} {:>6} {:>6}",
            "layer",
            "type",
            "M",
            "fwd f32",
            "fused",
            "scratch",
            "s/fus",
            "s/f32",
            "dX f32",
            "fused",
            "scratch",
            "s/fus",
            "s/f32"
        );
        for &(layer, n, k, ty) in SHAPES {
            let w = weight(&gpu, n, k, ty);
            for &m in &o.rows {
                let big = (m * n * k) as f64 > BIG_MACS && !o.big;
                let vs = [(!big).then_some(QmatmulVariant::Fused), Some(QmatmulVariant::Scratch)];
                let (f, b) = measure(&gpu, &w, m, true, &vs, o.budget);
                println!(
                    "{layer:<20} {:<5} {m:>5} | {:>7} {:>7} {:>7} {:>6} {:>6} | {:>7} {:>7} {:>7} {:>6} {:>6}",
                    ty.name(),
                    cell(f[0]),
                    cell(f[1]),
                    cell(f[2]),
                    ratio(f[2], f[1]),
                    ratio(f[2], f[0]),
                    cell(b[0]),
                    cell(b[1]),
                    cell(b[2]),
                    ratio(b[2], b[1]),
                    ratio(b[2], b[0])
                );
            }
        }
    }
    println!("load average at end: {}", load());
}
