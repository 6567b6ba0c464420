//! `cargo bench --bench kernels`: the GPT-2 124M training matmuls on the default GPU with every
//! matmul kernel it offers, next to the CPU path, as `pockettune bench kernels --matmul all`
//! prints them. Set `POCKETTUNE_DEVICE` to pick the adapter.

use pockettune::{bench, Gpu, GpuOptions};
use std::time::Duration;

fn main() -> pockettune::Result<()> {
    let gpu = Gpu::new(&GpuOptions::default())?;
    eprintln!("device: {}", gpu.summary());
    for &kernel in gpu.matmul_kernels() {
        gpu.set_matmul_kernel(kernel)?;
        println!("matmul kernel {}", kernel.name());
        println!("{:<22} {:<13} {:>10} {:>10} {:>8}", "layer", "product", "GPU GF/s", "CPU GF/s", "GPU/CPU");
        let results = bench::matmul_bench(&gpu, &bench::gpt2_cases(512), Duration::from_millis(500), |r| {
            println!(
                "{:<22} {:<13} {:>10.2} {:>10.2} {:>8.3}",
                r.case.layer, r.case.product, r.gpu_gflops, r.cpu_gflops, r.ratio
            )
        })?;
        let (g, c) = (bench::overall(&results, |r| r.gpu_gflops), bench::overall(&results, |r| r.cpu_gflops));
        println!("overall: GPU {g:.2} GF/s, CPU {c:.2} GF/s, ratio {:.3}", g / c);
    }
    Ok(())
}
