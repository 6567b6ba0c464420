//! The commands about the device: `info` (adapters, limits, features, the matmul kernel),
//! `power` (one reading of the power source) and `gradcheck` (the kernel self-test).

use anyhow::{Context, Result};
use serde_json::json;
use std::time::Instant;

use super::args::DeviceArgs;
use crate::print_json;
use pockettune::gpu::{adapter, AdapterSummary};
use pockettune::{gradcheck, Gpu, MatmulKernel, Profile};

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

pub fn kernel_name(k: MatmulKernel) -> String {
    k.name()
}

pub fn kernel_list(gpu: &Gpu) -> String {
    gpu.matmul_kernels().iter().map(|&k| kernel_name(k)).collect::<Vec<_>>().join(", ")
}

pub fn info(dev: &DeviceArgs, json: bool) -> Result<i32> {
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
    // the kernel `train` would use: the cached autotune choice if there is one
    let (_, matmul_source) = pockettune::kernels::matmul_tune::tune(
        &gpu,
        pockettune::kernels::matmul_tune::Mode::from_env()?,
        pockettune::kernels::matmul_tune::default_cache_path().as_deref(),
    )?;
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
    eprintln!(
        "matmul:   {} ({}; available: {})",
        kernel_name(gpu.matmul_kernel()),
        pockettune::kernels::matmul_tune::describe(&matmul_source),
        kernel_list(&gpu)
    );
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

/// `pockettune power`: one reading of the source, with where each value came from.
pub fn power(spec: &str, step: u64, json: bool) -> Result<i32> {
    use pockettune::power::SourceSpec;
    let mut source = SourceSpec::parse(spec)?.open()?;
    let r = source.read(step)?;
    let show = |field: &str, value: Option<String>| {
        let origin = r.origin(field).map(|o| format!("  from {o}")).unwrap_or_default();
        let label = format!("{field}:");
        let line = format!("{label:<9} {:<10}{origin}", value.unwrap_or_else(|| "unknown".into()));
        eprintln!("{}", line.trim_end());
    };
    eprintln!("source:   {}", source.describe());
    show("percent", r.percent.map(|p| format!("{p} %")));
    show("charging", r.charging.map(|c| if c { "yes" } else { "no" }.to_string()));
    show("temp_c", r.temp_c.map(|t| format!("{t} °C")));
    show("power_w", r.power_w.map(|w| format!("{w:.2} W")));
    if json {
        let mut doc = serde_json::to_value(&r)?;
        doc["source"] = json!(source.describe());
        print_json(&doc)?;
    }
    Ok(0)
}

pub fn run_gradcheck(
    dev: &DeviceArgs,
    json: bool,
    seed: u64,
    only: &[String],
    tier: gradcheck::Tier,
) -> Result<i32> {
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
        for r in gradcheck::check_kernel(&gpu, k, seed, tier)? {
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
            "tier": tier,
            "seconds": secs,
            "passed": failed == 0,
            "rows": rows,
        }))?;
    }
    Ok(if failed == 0 { 0 } else { 1 })
}
