//! `bench kernels` (GPT-2's products on the GPU beside the fast CPU path's gemm) and `bench
//! step` (whole training steps on each device, with `--profile`'s table).

use anyhow::{Context, Result};
use serde_json::json;
use std::time::Duration;

use super::args::DeviceArgs;
use super::device::{kernel_list, kernel_name};
use crate::print_json;
use pockettune::{bench, MatmulKernel};

pub fn bench_kernels(
    dev: &DeviceArgs,
    json: bool,
    rows: usize,
    budget: Duration,
    layer: Option<&str>,
    (matmul, precision): (Option<&str>, pockettune::gpu::Precision),
) -> Result<i32> {
    use pockettune::gpu::Precision;
    let gpu = dev.open()?;
    gpu.set_precision(precision)?; // mixed without shader_f16: the error says so, before any run
    let kernels: Vec<MatmulKernel> = match matmul {
        None => vec![pockettune::kernels::matmul_tune::tune_and_report(&gpu)?],
        Some("all") => gpu.matmul_kernels().to_vec(),
        Some(name) => {
            let kernel = MatmulKernel::parse(name)
                .with_context(|| format!("--matmul: this device offers {} (or `all`)", kernel_list(&gpu)))?;
            gpu.set_matmul_kernel(kernel).context("--matmul")?;
            vec![kernel]
        }
    };
    let cases: Vec<_> = match layer {
        Some(l) if l.contains("lora") => bench::lora_cases(rows),
        _ => bench::gpt2_cases(rows),
    }
    .into_iter()
    .filter(|c| layer.is_none_or(|l| c.layer.contains(l)))
    .collect();
    if cases.is_empty() {
        anyhow::bail!("no GPT-2 layer matches --layer {:?}", layer.unwrap_or_default());
    }
    let threads = rayon::current_num_threads();
    eprintln!(
        "GPT-2 124M training matmuls, M = {rows} rows; CPU: the fast CPU path's gemm on {threads} threads"
    );
    let mut all = serde_json::Map::new();
    let mut totals = Vec::new();
    // the f32 kernels, then (with --precision mixed) their mixed-precision forms: one for the
    // register-tile kernels (they share matmul_mixed.wgsl), one per staged tile
    let mut runs: Vec<_> = kernels.iter().map(|&k| (k, Precision::F32)).collect();
    if precision == Precision::Mixed {
        for &k in &kernels {
            if !runs.contains(&(k.mixed_form(), precision)) {
                runs.push((k.mixed_form(), precision));
            }
        }
    }
    for (kernel, p) in runs {
        gpu.set_matmul_kernel(kernel)?;
        let name = match (p, kernel) {
            (Precision::F32, _) => kernel_name(kernel),
            (Precision::Mixed, MatmulKernel::Staged(_)) => format!("mixed {} (f16 tiles)", kernel.name()),
            (Precision::Mixed, _) => "mixed (f16 products, f32 sums)".to_string(),
        };
        eprintln!("GPU matmul kernel: {name}");
        eprintln!(
            "{:<22} {:<13} {:>6} {:>6} {:>6} {:>10} {:>10} {:>9}",
            "layer", "product", "M", "N", "K", "GPU GF/s", "CPU GF/s", "GPU/CPU"
        );
        let results = pockettune::kernels::matmul::with_precision(p, || {
            bench::matmul_bench(&gpu, &cases, budget, |r| {
                eprintln!(
                    "{:<22} {:<13} {:>6} {:>6} {:>6} {:>10.2} {:>10.2} {:>9.3}",
                    r.case.layer,
                    r.case.product,
                    r.case.m,
                    r.case.n,
                    r.case.k,
                    r.gpu_gflops,
                    r.cpu_gflops,
                    r.ratio
                );
            })
        })?;
        let (g, c) = (bench::overall(&results, |r| r.gpu_gflops), bench::overall(&results, |r| r.cpu_gflops));
        eprintln!(
            "{:<22} {:<13} {:>20} {:>10.2} {:>10.2} {:>9.3}",
            "all (time-weighted)",
            "",
            "",
            g,
            c,
            g / c
        );
        all.insert(
            name.clone(),
            json!({"results": results, "total": {"gpu_gflops": g, "cpu_gflops": c, "ratio": g / c}}),
        );
        totals.push((name, g, c));
    }
    if totals.len() > 1 {
        // the CPU path was measured beside each kernel: the spread of its figures is the noise
        eprintln!("side by side (time-weighted over the products):");
        let w = totals.iter().map(|t| t.0.len()).max().unwrap_or(0).max(10);
        eprintln!("{:<w$} {:>10} {:>10} {:>9}", "GPU kernel", "GPU GF/s", "CPU GF/s", "GPU/CPU");
        for (name, g, c) in totals {
            eprintln!("{:<w$} {:>10.2} {:>10.2} {:>9.3}", name, g, c, g / c);
        }
    }
    if json {
        print_json(&json!({
            "device": gpu.summary(),
            "profile": gpu.profile(),
            "rows": rows,
            "cpu_threads": threads,
            "kernels": all,
        }))?;
    }
    Ok(0)
}

/// `bench step --profile`'s table: the slowest rows, the rest summed, and what lies outside
/// the executor's steps.
fn print_profile(device: &str, p: &pockettune::bench::StepProfile) {
    const SHOWN: usize = 30;
    eprintln!(
        "profile ({device}): one more step, each op timed alone with the device idle around it: {:.0} ms",
        p.ms
    );
    eprintln!("{:>10} {:>7} {:>7}  step", "ms", "share", "calls");
    let row = |ms: f64, calls: String, what: &str| {
        eprintln!("{ms:>10.1} {:>6.1}% {calls:>7}  {what}", 100.0 * ms / p.ms.max(1e-9));
    };
    for r in p.rows.iter().take(SHOWN) {
        row(r.ms, r.calls.to_string(), &r.what);
    }
    let rest = &p.rows[SHOWN.min(p.rows.len())..];
    if !rest.is_empty() {
        let calls: u64 = rest.iter().map(|r| r.calls).sum();
        row(
            rest.iter().map(|r| r.ms).sum(),
            calls.to_string(),
            &format!("the other {} kinds of step", rest.len()),
        );
    }
    let inside: f64 = p.rows.iter().map(|r| r.ms).sum();
    row(p.ms - inside, "-".into(), "outside the ops: clipping, AdamW, the step's status, host work");
}

pub fn bench_step(
    dev: &DeviceArgs,
    json: bool,
    what: &pockettune::bench::StepModel,
    (lora, precision): (bool, pockettune::gpu::Precision),
    (b, t): (usize, usize),
    steps: usize,
    (no_cpu, plan, profile): (bool, bool, bool),
    memory: &pockettune::memory::MemoryFlags,
) -> Result<i32> {
    use pockettune::bench::StepModel;
    use pockettune::graph::Device;
    let (name, weights) = match what {
        StepModel::Preset(name) => {
            pockettune::models::preset_config(name)?;
            (name.clone(), "random weights".to_string())
        }
        StepModel::PresetGguf(name, quant) => {
            pockettune::models::preset_config(name)?;
            (name.clone(), format!("random weights, base {} (GGUF)", quant.name()))
        }
        StepModel::File(path, base) => {
            let base = if lora { format!("base {base:?}").to_lowercase() } else { "f32 weights".into() };
            (path.display().to_string(), base)
        }
    };
    let on_cpu = matches!(dev.device.as_deref(), Some("cpu" | "cpu-ref"));
    if precision == pockettune::gpu::Precision::Mixed && !no_cpu && !plan && !on_cpu {
        eprintln!("note: --precision mixed applies to the GPU; the fast CPU path after it runs f32");
    }
    let devices = match dev.device.as_deref() {
        Some("cpu") if !plan => vec![Device::CPU],
        Some("cpu-ref") if !plan => vec![Device::CPU_REF],
        Some("cpu" | "cpu-ref") => anyhow::bail!("--plan counts GPU buffers; it needs a GPU device"),
        _ => {
            let gpu = std::sync::Arc::new(dev.open()?);
            pockettune::train::set_precision(&Device::Gpu(gpu.clone()), precision)?;
            if plan {
                eprintln!(
                    "planning the step (no kernel runs): GPU bytes are the step's, time and RSS are not"
                );
                gpu.set_planning(true);
            } else {
                pockettune::kernels::matmul_tune::tune_and_report(&gpu)?;
            }
            let mut devices = vec![Device::Gpu(gpu)];
            if !no_cpu && !plan {
                devices.push(Device::CPU);
            }
            devices
        }
    };
    if let [d @ Device::Cpu(_)] = devices.as_slice() {
        pockettune::train::set_precision(d, precision)?; // mixed on a CPU path: a clear error
    }
    let method = if lora { "LoRA (rank 8, every projection)" } else { "full" };
    eprintln!("{name} {method} fine-tuning step, batch {b} x {t} tokens, {weights}");
    eprintln!("memory options: {}", serde_json::to_string(memory)?);
    eprintln!(
        "{:<44} {:>10} {:>10} {:>14} {:>14} {:>14}",
        "device", "ms/step", "tokens/s", "peak RSS MiB", "GPU held MiB", "GPU live MiB"
    );
    let mut results = Vec::new();
    for d in devices {
        if matches!(d, Device::Cpu(pockettune::graph::CpuPath::Fast)) {
            pockettune::cpu::keep_freed_memory();
        }
        let r = pockettune::bench::step_bench(&d, what, lora, b, t, steps, memory, profile)?;
        let mib = |x: Option<u64>| x.map_or("-".into(), |v| format!("{:.0}", v as f64 / (1 << 20) as f64));
        eprintln!(
            "{:<44} {:>10.0} {:>10.1} {:>14} {:>14} {:>14}",
            r.device,
            r.ms_step,
            r.tokens_per_s,
            mib(r.peak_rss_bytes),
            mib(r.peak_gpu_bytes),
            mib(r.peak_live_gpu_bytes)
        );
        let held: Vec<String> = r
            .weight_bytes
            .iter()
            .map(|(ty, n)| format!("{ty} {:.0} MiB", *n as f64 / (1 << 20) as f64))
            .collect();
        eprintln!("{:<44} weights held: {}", "", held.join(", "));
        if let Some(p) = &r.per_step {
            eprintln!(
                "{:<44} per step: {:.0} dispatches ({:.0} new bind groups), {:.1} submissions, {:.1} waits, host wait {:.1} ms, \
                 recording {:.1} ms (in the driver's submit {:.1} ms)",
                "", p.dispatches, p.bind_groups, p.submissions, p.waits, p.host_wait_ms, p.record_ms, p.submit_ms
            );
        }
        if let Some(n) = r.smallest_budget {
            eprintln!("{:<44} smallest --memory-budget for this step (planned): {}", "", mib(Some(n)));
        }
        eprintln!("memory ({}):\n{}", r.device, r.memory);
        if let Some(p) = &r.profile {
            print_profile(&r.device, p);
        }
        results.push(r);
    }
    if results.len() == 2 {
        eprintln!("GPU / CPU speed: {:.2}x", results[1].ms_step / results[0].ms_step);
    }
    if json {
        print_json(&json!({"model": name, "weights": weights, "lora": lora, "batch_size": b, "seq_len": t,
                "options": memory, "results": results}))?;
    }
    Ok(0)
}
