//! `cargo bench --bench elementwise`: the GPT-2 124M step's elementwise and row kernels at their
//! real shapes (512 rows of 768 or 3,072), each timed with its vec4 form (the default where a
//! length is a multiple of 4) and with one float an invocation, alternating in one run (these
//! machines are noisy); prints the median of the rounds and the ratio. Set `POCKETTUNE_DEVICE`
//! to pick the adapter.

use pockettune::kernels::activation::{self, Act};
use pockettune::kernels::elementwise;
use pockettune::kernels::norm::{self, NormKind};
use pockettune::{Gpu, GpuOptions, Tensor};
use std::time::Instant;

const ROUNDS: usize = 7;
/// Calls of an op a timing: enough that one submission's fixed cost does not show.
const CALLS: usize = 10;

fn main() -> pockettune::Result<()> {
    let gpu = Gpu::new(&GpuOptions::default())?;
    eprintln!("device: {}", gpu.summary());
    let (rows, c, f) = (512, 768, 3072);
    let values = |n: usize| (0..n).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect::<Vec<f32>>();
    let up = |n: usize, shape: &[usize]| Tensor::from_host(&gpu, &values(n), shape, "bench input");
    let (x, dy) = (up(rows * c, &[rows, c])?, up(rows * c, &[rows, c])?);
    let (w, b) = (up(c, &[c])?, up(c, &[c])?);
    let (y, dx) = (Tensor::empty(&gpu, &[rows, c], "y")?, Tensor::empty(&gpu, &[rows, c], "dx")?);
    let (dw, db) = (Tensor::empty(&gpu, &[c], "dw")?, Tensor::empty(&gpu, &[c], "db")?);
    let stats = Tensor::empty(&gpu, &[rows, 2], "stats")?;
    let (h, dh) = (up(rows * f, &[rows, f])?, up(rows * f, &[rows, f])?);
    let (gh, dgh) = (Tensor::empty(&gpu, &[rows, f], "gelu")?, Tensor::empty(&gpu, &[rows, f], "d gelu")?);

    type Op<'a> = Box<dyn Fn() -> pockettune::Result<()> + 'a>;
    let ops: Vec<(&str, usize, Op)> = vec![
        (
            "layernorm forward [512, 768]",
            rows * c,
            Box::new(|| norm::norm_forward(&gpu, &y, &stats, &x, &w, Some(&b), NormKind::Layer, 1e-5)),
        ),
        (
            "layernorm backward [512, 768]",
            rows * c,
            Box::new(|| {
                let (dx, dw, db) = (Some(&dx), Some(&dw), Some(&db));
                norm::norm_backward(&gpu, dx, dw, db, &dy, &x, &w, &stats, NormKind::Layer, false)
            }),
        ),
        (
            "gelu forward [512, 3072]",
            rows * f,
            Box::new(|| activation::act_forward(&gpu, &gh, &h, Act::Gelu)),
        ),
        (
            "gelu backward [512, 3072]",
            rows * f,
            Box::new(|| activation::act_backward(&gpu, &dgh, &h, &dh, Act::Gelu, false)),
        ),
        ("add [512, 768]", rows * c, Box::new(|| elementwise::add(&gpu, &y, &x, &dy, 1.0, 1.0))),
    ];
    let time = |op: &Op, vec4: bool| -> pockettune::Result<f64> {
        elementwise::with_vec4(vec4, || {
            let start = Instant::now();
            for _ in 0..CALLS {
                op()?;
            }
            gpu.sync()?;
            Ok(start.elapsed().as_secs_f64() * 1e3 / CALLS as f64)
        })
    };
    println!("median of {ROUNDS} alternating rounds, {CALLS} calls each, ms a call:");
    println!("{:<32} {:>10} {:>10} {:>8} {:>14}", "op", "vec4", "scalar", "ratio", "ns/elem vec4");
    for (name, n, op) in &ops {
        let (_, _) = (time(op, true)?, time(op, false)?); // compiles both
        let (mut v4, mut v1) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            v4.push(time(op, true)?);
            v1.push(time(op, false)?);
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (a, s) = (median(&mut v4), median(&mut v1));
        println!("{name:<32} {a:>10.2} {s:>10.2} {:>8.2} {:>14.2}", s / a, a * 1e6 / *n as f64);
    }
    Ok(())
}
