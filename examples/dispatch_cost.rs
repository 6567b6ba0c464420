//! The host's cost of one dispatch: records the same 1,024 small dispatches (`axpby` on 512
//! pairs of 256-element tensors, parameters changing every step as AdamW's do) for a number
//! of steps and prints the median microseconds per dispatch spent recording them and
//! submitting them, the GPU's own time left out (each step is waited for before the next is
//! timed). The kernels do almost nothing, so the figure is the host's, even on a software GPU.
//!
//! `cargo run --example dispatch_cost [steps]`

use pockettune::kernels::elementwise;
use pockettune::{Gpu, GpuOptions, Profile, Tensor};
use std::time::Instant;

fn main() -> pockettune::Result<()> {
    let steps: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(30);
    let gpu = Gpu::new(&GpuOptions { device: None, profile: Profile::Mobile })?;
    eprintln!("{}", gpu.summary());
    let pairs = 512;
    let x: Vec<Tensor> = (0..pairs)
        .map(|i| Tensor::from_host(&gpu, &[i as f32; 256], &[256], "x"))
        .collect::<Result<_, _>>()?;
    let y: Vec<Tensor> =
        (0..pairs).map(|_| Tensor::from_host(&gpu, &[0.0; 256], &[256], "y")).collect::<Result<_, _>>()?;
    let (mut record, mut submit) = (Vec::new(), Vec::new());
    for step in 0..steps {
        let alpha = 1.0 / (step + 1) as f32;
        let start = Instant::now();
        for (x, y) in x.iter().zip(&y) {
            elementwise::axpby(&gpu, y, x, alpha, 1.0)?;
            elementwise::axpby(&gpu, y, x, -alpha, 1.0)?;
        }
        let recorded = Instant::now();
        gpu.flush()?;
        let submitted = Instant::now();
        gpu.sync()?;
        record.push((recorded - start).as_secs_f64());
        submit.push((submitted - recorded).as_secs_f64());
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2] * 1e6 / (2 * pairs) as f64
    };
    println!(
        "{} dispatches a step, {steps} steps: recording {:.1} us, submitting {:.1} us per dispatch (medians)",
        2 * pairs,
        median(&mut record),
        median(&mut submit)
    );
    assert_eq!(y[7].to_host(&gpu)?[0], 0.0, "each step adds and takes away the same");
    Ok(())
}
