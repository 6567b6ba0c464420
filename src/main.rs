//! The `pockettune` command line. Every subcommand that reports results accepts `--json`: one
//! JSON document then goes to stdout and the human-readable text to stderr.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use pockettune::gpu::{adapter, AdapterSummary};
use pockettune::{bench, gradcheck, Gpu, GpuOptions, MatmulKernel, Profile};
use serde_json::json;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "pockettune",
    version,
    args_override_self = true,
    about = "Fine-tune language models on phone and desktop GPUs through Vulkan compute",
    long_about = "Fine-tune language models on phone and desktop GPUs through Vulkan compute.\n\n\
                  Start with `pockettune info` (which GPU is used, with which limits) and \
                  `pockettune gradcheck` (do this device's kernels compute right?)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct DeviceArgs {
    /// GPU adapter: index (as `info` lists them), type (discrete, integrated, virtual,
    /// software) or part of its name. Default: the first discrete, then integrated GPU.
    #[arg(long, env = "POCKETTUNE_DEVICE")]
    device: Option<String>,
    /// Limits the device is opened with: `mobile` holds every kernel to a phone GPU's limits
    /// (wgpu's downlevel defaults: 4 storage buffers per shader, 128 MiB bindings, 16 KiB
    /// workgroup memory); `adapter` allows all the adapter offers.
    #[arg(long, value_enum, default_value_t = Profile::Mobile)]
    limits: Profile,
}

impl DeviceArgs {
    fn open(&self) -> Result<Gpu> {
        let gpu = Gpu::new(&GpuOptions { device: self.device.clone(), profile: self.limits })?;
        eprintln!("device: {} ({} limits)", gpu.summary(), gpu.profile());
        Ok(gpu)
    }
}

#[derive(Subcommand)]
enum Command {
    /// List GPU adapters, the chosen one, its limits and optional features.
    Info {
        #[command(flatten)]
        device: DeviceArgs,
        /// Print one JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Check every kernel, forward and backward, on this device against the CPU reference.
    /// Exits with status 1 if any kernel is outside its tolerance.
    Gradcheck {
        #[command(flatten)]
        device: DeviceArgs,
        /// Print one JSON document on stdout.
        #[arg(long)]
        json: bool,
        /// Seed of the random inputs.
        #[arg(long, default_value_t = 0x5eed)]
        seed: u64,
        /// Check only these kernels (repeatable). Known: see `--kernel list`.
        #[arg(long)]
        kernel: Vec<String>,
    },
    /// Fine-tune a model (GPT-2 family) on text or JSONL data. Every option can also come from
    /// `--config run.toml` (keys as the long option names; command-line options win).
    Train {
        #[command(flatten)]
        opts: Box<pockettune::train::TrainOptions>,
        /// TOML file of options, e.g. `lr = 3e-4` and `seq_len = 256`.
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        /// Print the summary as one JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Benchmarks, each with a baseline measured in the same run.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// GFLOP/s of GPT-2 124M's training matmuls on the GPU next to the CPU path.
    Kernels {
        #[command(flatten)]
        device: DeviceArgs,
        /// Print one JSON document on stdout.
        #[arg(long)]
        json: bool,
        /// Rows of activations (batch x sequence).
        #[arg(long, default_value_t = 512)]
        rows: usize,
        /// Minimum wall time per measurement, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        budget_ms: u64,
        /// Only layers whose name contains this text (e.g. `c_fc`, `lm_head`).
        #[arg(long)]
        layer: Option<String>,
        /// Matmul kernel to measure: the device's default, `tiled`, `subgroup`, or `all` (one
        /// column each). `POCKETTUNE_MATMUL` sets the default.
        #[arg(long)]
        matmul: Option<String>,
    },
}

/// `train --config FILE`: the file's options go first on the command line, so that options
/// given explicitly (later) override them.
fn with_config_file(args: Vec<String>) -> Result<Vec<String>> {
    let Some(pos) = args.iter().position(|a| a == "--config") else { return Ok(args) };
    let path = args.get(pos + 1).context("--config needs a file name")?;
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let table: toml::Table = toml::from_str(&text).with_context(|| format!("{path} is not valid TOML"))?;
    let mut from_file = Vec::new();
    for (key, value) in table {
        let flag = format!("--{}", key.replace('_', "-"));
        match value {
            toml::Value::Boolean(true) => from_file.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::String(s) => from_file.extend([flag, s]),
            toml::Value::Integer(_) | toml::Value::Float(_) => from_file.extend([flag, value.to_string()]),
            other => anyhow::bail!("{path}: option {key} = {other} is not a string, number or boolean"),
        }
    }
    let sub = args.iter().position(|a| a == "train").context("--config applies to `train`")?;
    let mut merged = args[..=sub].to_vec();
    merged.extend(from_file);
    merged.extend(args[sub + 1..].iter().cloned());
    Ok(merged)
}

fn main() {
    let args = match with_config_file(std::env::args().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    let cli = Cli::parse_from(args);
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            2
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Info { device, json } => info(&device, json),
        Command::Train { opts, json, .. } => run_train(&opts, json),
        Command::Gradcheck { device, json, seed, kernel } => run_gradcheck(&device, json, seed, &kernel),
        Command::Bench { what: BenchCommand::Kernels { device, json, rows, budget_ms, layer, matmul } } => {
            bench_kernels(
                &device,
                json,
                rows,
                Duration::from_millis(budget_ms),
                layer.as_deref(),
                matmul.as_deref(),
            )
        }
    }
}

fn print_json(value: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn features_line(a: &AdapterSummary) -> String {
    let yes = |b: bool| if b { "yes" } else { "no" };
    format!(
        "shader_f16 {}, subgroups {} (size {}..{}), timestamp_query {}, cooperative_matrix {}",
        yes(a.shader_f16),
        yes(a.subgroups),
        a.subgroup_size[0],
        a.subgroup_size[1],
        yes(a.timestamp_query),
        yes(a.cooperative_matrix)
    )
}

fn kernel_name(k: MatmulKernel) -> String {
    format!("{k:?}").to_lowercase()
}

fn kernel_list(gpu: &Gpu) -> String {
    gpu.matmul_kernels().iter().map(|&k| kernel_name(k)).collect::<Vec<_>>().join(", ")
}

fn info(dev: &DeviceArgs, json: bool) -> Result<i32> {
    let instance = adapter::instance();
    let adapters = adapter::enumerate(&instance);
    let summaries = adapter::summaries(&adapters);
    eprintln!("adapters:");
    if summaries.is_empty() {
        eprintln!("  (none)");
    }
    for a in &summaries {
        eprintln!("  {a}");
    }
    let gpu = dev.open().context("opening the chosen adapter")?;
    let chosen = gpu.summary();
    let profile_limits = adapter::limit_rows(gpu.limits());
    let adapter_limits = adapter::limit_rows(gpu.adapter_limits());
    eprintln!("chosen:   {chosen}");
    eprintln!(
        "profile:  {} ({})",
        gpu.profile(),
        match gpu.profile() {
            Profile::Mobile => "wgpu::Limits::downlevel_defaults(), the phone GPU budget",
            Profile::Adapter => "everything the adapter offers",
        }
    );
    eprintln!("features: {}", features_line(chosen));
    eprintln!("matmul:   {} (available: {})", kernel_name(gpu.matmul_kernel()), kernel_list(&gpu));
    eprintln!("limits:   {:<40} {:>12} {:>12}", "", "in use", "adapter");
    for ((name, used), (_, offered)) in profile_limits.iter().zip(&adapter_limits) {
        eprintln!("          {name:<40} {used:>12} {offered:>12}");
    }
    if json {
        let limits: serde_json::Map<String, serde_json::Value> = profile_limits
            .iter()
            .zip(&adapter_limits)
            .map(|((name, used), (_, offered))| {
                (name.to_string(), json!({"in_use": used, "adapter": offered}))
            })
            .collect();
        print_json(&json!({
            "adapters": summaries,
            "chosen": chosen,
            "profile": gpu.profile(),
            "limits": limits,
            "matmul_kernel": gpu.matmul_kernel(),
            "matmul_kernels": gpu.matmul_kernels(),
        }))?;
    }
    Ok(0)
}

fn run_gradcheck(dev: &DeviceArgs, json: bool, seed: u64, only: &[String]) -> Result<i32> {
    if only.iter().any(|k| k == "list") {
        println!("{}", gradcheck::KERNELS.join("\n"));
        return Ok(0);
    }
    if let Some(bad) = only.iter().find(|k| !gradcheck::KERNELS.contains(&k.as_str())) {
        anyhow::bail!("unknown kernel {bad:?}; known: {} (or `list`)", gradcheck::KERNELS.join(", "));
    }
    let kernels: Vec<&str> =
        if only.is_empty() { gradcheck::KERNELS.to_vec() } else { only.iter().map(String::as_str).collect() };
    let gpu = dev.open()?;
    let start = Instant::now();
    eprintln!(
        "{:<16} {:<9} {:>6} {:>12} {:>9}  result",
        "kernel", "direction", "shapes", "max rel err", "tolerance"
    );
    let mut rows = Vec::new();
    for k in kernels {
        for r in gradcheck::check_kernel(&gpu, k, seed)? {
            eprintln!(
                "{:<16} {:<9} {:>6} {:>12.2e} {:>9.0e}  {}",
                r.kernel,
                r.direction,
                r.shapes.len(),
                r.max_rel_err,
                r.tolerance,
                if r.pass { "pass".to_string() } else { format!("FAIL (worst at {})", r.worst_shape) }
            );
            rows.push(r);
        }
    }
    let failed = rows.iter().filter(|r| !r.pass).count();
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{} of {} checks passed in {secs:.1} s on {} ({} limits; matmul kernels checked: {})",
        rows.len() - failed,
        rows.len(),
        gpu.summary().name,
        gpu.profile(),
        kernel_list(&gpu)
    );
    if failed > 0 {
        eprintln!(
            "This device computes some kernels wrongly. Please report the rows above together \
             with the output of `pockettune info`."
        );
    }
    if json {
        print_json(&json!({
            "device": gpu.summary(),
            "profile": gpu.profile(),
            "seed": seed,
            "seconds": secs,
            "passed": failed == 0,
            "rows": rows,
        }))?;
    }
    Ok(if failed == 0 { 0 } else { 1 })
}

fn bench_kernels(
    dev: &DeviceArgs,
    json: bool,
    rows: usize,
    budget: Duration,
    layer: Option<&str>,
    matmul: Option<&str>,
) -> Result<i32> {
    let gpu = dev.open()?;
    let kernels: Vec<MatmulKernel> = match matmul {
        None => vec![gpu.matmul_kernel()],
        Some("all") => gpu.matmul_kernels().to_vec(),
        Some(name) => match gpu.matmul_kernels().iter().find(|&&k| kernel_name(k) == name) {
            Some(&k) => vec![k],
            None => anyhow::bail!("--matmul {name}: this device offers {} (or `all`)", kernel_list(&gpu)),
        },
    };
    let cases: Vec<_> =
        bench::gpt2_cases(rows).into_iter().filter(|c| layer.is_none_or(|l| c.layer.contains(l))).collect();
    if cases.is_empty() {
        anyhow::bail!("no GPT-2 layer matches --layer {:?}", layer.unwrap_or_default());
    }
    let threads = rayon::current_num_threads();
    eprintln!(
        "GPT-2 124M training matmuls, M = {rows} rows; CPU path: matrixmultiply sgemm on {threads} threads"
    );
    let mut all = serde_json::Map::new();
    for kernel in kernels {
        gpu.set_matmul_kernel(kernel)?;
        eprintln!("GPU matmul kernel: {}", kernel_name(kernel));
        eprintln!(
            "{:<22} {:<13} {:>6} {:>6} {:>6} {:>10} {:>10} {:>9}",
            "layer", "product", "M", "N", "K", "GPU GF/s", "CPU GF/s", "GPU/CPU"
        );
        let results = bench::matmul_bench(&gpu, &cases, budget, |r| {
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
            kernel_name(kernel),
            json!({"results": results, "total": {"gpu_gflops": g, "cpu_gflops": c, "ratio": g / c}}),
        );
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

fn run_train(opts: &pockettune::train::TrainOptions, json: bool) -> Result<i32> {
    use std::io::IsTerminal;
    eprintln!(
        "training {} on {} ({} method, batch {} x {} tokens, grad accum {})",
        opts.model.display(),
        opts.data.display(),
        format!("{:?}", opts.method).to_lowercase(),
        opts.batch_size,
        opts.seq_len,
        opts.grad_accum
    );
    let summary = pockettune::train::train(opts, std::io::stderr().is_terminal())?;
    let first = summary.losses.first().copied().unwrap_or(f32::NAN);
    let last = summary.losses.last().copied().unwrap_or(f32::NAN);
    eprintln!(
        "{} steps in {:.1} s, loss {first:.4} -> {last:.4}{}; checkpoint {}",
        summary.steps,
        summary.seconds,
        summary.final_eval_loss.map_or(String::new(), |l| format!(", eval loss {l:.4}")),
        summary.checkpoint.as_ref().map_or("none".into(), |p| p.display().to_string())
    );
    if json {
        print_json(&serde_json::to_value(&summary)?)?;
    }
    Ok(0)
}
