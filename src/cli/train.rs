//! `train`, and `report`, which draws a run's metrics.

use anyhow::Result;

use crate::print_json;

pub fn run_train(opts: &pockettune::train::TrainOptions, json: bool) -> Result<i32> {
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
    let summary = match pockettune::train::train(opts, std::io::stderr().is_terminal()) {
        Ok(s) => s,
        // --on-critical stop: a checkpoint is written; status 3 tells a script to resume later
        Err(e @ pockettune::Error::PowerStop { .. }) => {
            eprintln!("error: {e}");
            return Ok(3);
        }
        Err(e) => return Err(e.into()),
    };
    let first = summary.losses.first().copied().unwrap_or(f32::NAN);
    let last = summary.losses.last().copied().unwrap_or(f32::NAN);
    eprintln!(
        "{} steps in {:.1} s, loss {first:.4} -> {last:.4}{}; checkpoint {}",
        summary.steps,
        summary.seconds,
        summary.final_eval_loss.map_or(String::new(), |l| format!(", eval loss {l:.4}")),
        summary.checkpoint.as_ref().map_or("none".into(), |p| p.display().to_string())
    );
    eprintln!("memory:\n{}", summary.memory);
    let p = &summary.power;
    if p.source != "none" {
        let opt = |x: Option<f64>, unit: &str| x.map_or("unknown".to_string(), |v| format!("{v:.1} {unit}"));
        eprintln!(
            "power ({}): energy {}, {} per 1,000 tokens; battery {} used; throttled {:.1} s over {} steps, \
             paused {:.1} s ({} pauses){}",
            p.source,
            opt(p.energy_j, "J"),
            opt(p.energy_j_per_1k_tokens, "J"),
            opt(p.battery_pct_used.map(f64::from), "%"),
            p.throttled_s,
            p.steps_throttled,
            p.paused_s,
            p.pauses,
            p.fell_back.as_ref().map_or(String::new(), |w| format!("; source dropped mid-run: {w}"))
        );
    }
    if json {
        print_json(&serde_json::to_value(&summary)?)?;
    }
    Ok(0)
}

/// `pockettune report`: paths on stdout (or the JSON summary), notes and figures on stderr.
pub fn report(
    run: &std::path::Path,
    out: Option<std::path::PathBuf>,
    format: pockettune::report::Format,
    json: bool,
) -> Result<i32> {
    let metrics = pockettune::report::metrics_path(run)?;
    let out = out.unwrap_or_else(|| metrics.parent().unwrap_or(std::path::Path::new(".")).join("report"));
    let summary = pockettune::report::draw(&metrics, &out, format)?;
    for note in &summary.notes {
        eprintln!("note: {note}");
    }
    let opt = |v: Option<f64>, unit: &str| v.map_or("-".to_string(), |v| format!("{v:.2}{unit}"));
    eprintln!(
        "{} steps ({}..{}), {:.0} s; final loss {}, best eval loss {}; throttled {}, paused {}, battery used {}, energy {}",
        summary.steps,
        summary.first_step,
        summary.last_step,
        summary.duration_s,
        opt(summary.final_loss, ""),
        opt(summary.best_eval_loss, ""),
        opt(summary.throttled_s, " s"),
        opt(summary.paused_s, " s"),
        opt(summary.battery_used_pct, " %"),
        opt(summary.energy_j, " J"),
    );
    if json {
        print_json(&serde_json::to_value(&summary)?)?;
    } else {
        for file in &summary.files {
            println!("{}", file.display());
        }
    }
    Ok(0)
}
