//! The `pockettune` command line. Every subcommand that reports results accepts `--json`: one
//! JSON document then goes to stdout and the human-readable text to stderr.

use anyhow::{Context, Result};
use clap::Parser;
use pockettune::gradcheck;
use std::time::Duration;

mod cli;

use cli::args::{with_config_file, BenchCommand, Cli, Command, ExportFormat};
use cli::bench::{bench_kernels, bench_step};
use cli::device::{info, power, run_gradcheck};
use cli::model::{init_model, load_for_inference, run_eval, run_mmlu, ModelSpec};
use cli::train::{report, run_train};

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
    // The commands that run real work pick their matmul kernel by autotune (see
    // `kernels::matmul_tune`; POCKETTUNE_MATMUL_AUTOTUNE=off switches it off).
    use pockettune::kernels::matmul_tune::{set_default, Mode};
    match cli.command {
        Command::Train { .. } | Command::Bench { .. } => set_default(Mode::On),
        Command::Info { .. } | Command::Eval { .. } | Command::Generate { .. } => set_default(Mode::Cached),
        _ => {}
    }
    match cli.command {
        Command::Info { device, json } => info(&device, json),
        Command::Power { power_source, step, json } => power(&power_source, step, json),
        Command::Report { run, out, format, json } => report(&run, out, format, json),
        Command::Train { opts, json, .. } => run_train(&opts, json),
        Command::Eval {
            model,
            data,
            mmlu,
            mmlu_shots,
            mmlu_subjects,
            mmlu_split,
            limit,
            batch_size,
            seq_len,
            max_batches,
            on,
            json,
            memory,
        } => {
            at_least_one(&[
                ("--batch-size", batch_size),
                ("--seq-len", seq_len),
                ("--max-batches", max_batches.unwrap_or(1)),
                ("--limit", limit.unwrap_or(1)),
            ])?;
            let mmlu_only =
                mmlu_shots.is_some() || mmlu_subjects.is_some() || mmlu_split.is_some() || limit.is_some();
            anyhow::ensure!(
                mmlu.is_some() || !mmlu_only,
                "--mmlu-shots, --mmlu-subjects, --mmlu-split and --limit go with --mmlu"
            );
            let mut paths = model.paths();
            paths.extend([("--data", data.as_deref()), ("--mmlu", mmlu.as_deref())]);
            pockettune::train::check_paths(&paths)?;
            let dev = on.open()?;
            let spec = ModelSpec { model: &model, memory: &memory };
            if let Some(dir) = mmlu {
                let o = pockettune::mmlu::Options {
                    shots: mmlu_shots.unwrap_or(5),
                    subjects: mmlu_subjects,
                    split: mmlu_split.unwrap_or(pockettune::mmlu::Split::Test),
                    limit,
                    batch_size,
                };
                return run_mmlu(&dev, &spec, &dir, &o, json);
            }
            let data = data.context("--data or --mmlu is needed")?;
            run_eval(&dev, &spec, &data, (batch_size, seq_len), max_batches, json)
        }
        Command::Generate { model, prompt, max_tokens, temperature, top_k, top_p, seed, on, memory } => {
            let s = pockettune::generate::Sampling { temperature, top_k, top_p, seed };
            s.check()?;
            at_least_one(&[("--max-tokens", max_tokens)])?;
            pockettune::train::check_paths(&model.paths())?;
            let dev = on.open()?;
            let spec = ModelSpec { model: &model, memory: &memory };
            let (gpt, store, tok) = load_for_inference(&dev, &spec)?;
            let text = pockettune::generate::generate(&gpt, &store, &tok, &prompt, max_tokens, &s)?;
            println!("{prompt}{text}");
            Ok(0)
        }
        Command::Gradcheck { device, json, seed, kernel, full } => {
            let tier = if full { gradcheck::Tier::Full } else { gradcheck::Tier::Quick };
            run_gradcheck(&device, json, seed, &kernel, tier)
        }
        Command::Init { preset, tokenizer, out, seed } => init_model(&preset, &tokenizer, &out, seed),
        Command::Export { model, adapter, format: ExportFormat::GgufLora, merge, out } => {
            anyhow::ensure!(!merge, "--format gguf-lora writes the adapter unmerged: drop --merge");
            let s = pockettune::lora_gguf::export(&model, &adapter, &out)?;
            eprintln!(
                "wrote {}: {} LoRA, {} adapted tensors, rank {}{}, alpha {} (llama.cpp: -m {} --lora {})",
                out.display(),
                s.architecture,
                s.modules,
                s.ranks.0,
                if s.ranks.0 == s.ranks.1 { String::new() } else { format!("..{}", s.ranks.1) },
                s.alpha,
                model.display(),
                out.display()
            );
            Ok(0)
        }
        Command::Export { model, adapter, format: ExportFormat::Hf, merge: _, out } => {
            let dev = pockettune::graph::Device::CPU;
            let (m, mut store) = pockettune::models::Model::load(&model, &dev)?;
            let o = pockettune::lora::load(&adapter, &m, &mut store)?;
            pockettune::lora::merge(&m, &mut store)?;
            pockettune::lora::export_merged(&out, &model, &m, &store)?;
            eprintln!(
                "merged LoRA rank {} ({}) into {} -> {}",
                o.rank,
                o.targets.join(","),
                model.display(),
                out.display()
            );
            Ok(0)
        }
        Command::Bench {
            what:
                BenchCommand::Step {
                    device,
                    json,
                    preset,
                    preset_quant,
                    model,
                    base_dtype,
                    method,
                    precision,
                    batch_size,
                    seq_len,
                    steps,
                    no_cpu,
                    memory,
                    plan,
                    profile,
                },
        } => {
            at_least_one(&[("--batch-size", batch_size), ("--seq-len", seq_len), ("--steps", steps)])?;
            let lora = method == pockettune::train::Method::Lora;
            let what = match (model, preset_quant) {
                (Some(path), _) => pockettune::bench::StepModel::File(path, base_dtype),
                (None, Some(quant)) => pockettune::bench::StepModel::PresetGguf(preset, quant),
                (None, None) => pockettune::bench::StepModel::Preset(preset),
            };
            let shape = (batch_size, seq_len);
            bench_step(
                &device,
                json,
                &what,
                (lora, precision),
                shape,
                steps,
                (no_cpu, plan, profile),
                &memory,
            )
        }
        Command::Bench {
            what: BenchCommand::Kernels { device, json, rows, budget_ms, layer, matmul, precision },
        } => {
            at_least_one(&[("--rows", rows)])?;
            bench_kernels(
                &device,
                json,
                rows,
                Duration::from_millis(budget_ms),
                layer.as_deref(),
                (matmul.as_deref(), precision),
            )
        }
    }
}

/// Options that must be at least 1 (a 0 divided by zero or made empty tensors).
fn at_least_one(options: &[(&str, usize)]) -> pockettune::Result<()> {
    match options.iter().find(|(_, v)| *v == 0) {
        Some((name, _)) => Err(pockettune::Error::InvalidArgument {
            name: name.to_string(),
            detail: "0; it must be at least 1".into(),
        }),
        None => Ok(()),
    }
}

fn print_json(value: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
