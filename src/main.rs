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
                  `pockettune gradcheck` (do this device's kernels compute right?).",
    after_long_help = "Matrix-product kernel: `train` and `bench` time the kernels the device offers \
                       (`info` lists them) at first use and cache the fastest per adapter and \
                       driver in matmul.json under $POCKETTUNE_CACHE_DIR, else \
                       $XDG_CACHE_HOME/pockettune, else ~/.cache/pockettune; `eval` and \
                       `generate` use the cached choice. POCKETTUNE_MATMUL=NAME forces a kernel \
                       (tiled, subgroup, subgroup-uniform, staged or staged-BMxBNxBK-TMxTN); \
                       POCKETTUNE_MATMUL_AUTOTUNE=off keeps the device default, =fresh measures \
                       again."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct DeviceArgs {
    /// GPU adapter: index (as `info` lists them), type (discrete, integrated, virtual,
    /// software) or part of its name. Default: the first discrete, then integrated GPU.
    /// `bench step` also takes `cpu` (the fast CPU path) and `cpu-ref` (the CPU reference).
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

/// What `export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ExportFormat {
    /// Merged Hugging Face model directory.
    Hf,
    /// llama.cpp LoRA adapter file.
    GgufLora,
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
        /// Also check the vocabulary-wide kernels at Gemma 3's real size (262,144 x 640
        /// tensors above the binding limit; about 7.5 GB of memory). Without it the
        /// check still crosses every size limit the kernels have, on smaller tensors.
        #[arg(long)]
        full: bool,
    },
    /// Fine-tune a model (GPT-2, Qwen2, Llama family, Gemma 3 or Gemma 2) on text or JSONL data.
    /// Every option can also come from `--config run.toml` (keys as the long option names;
    /// command-line options win).
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
    /// Loss and perplexity of a model on a text or JSONL data set, or its MMLU accuracy (--mmlu).
    #[command(group = clap::ArgGroup::new("eval_set").required(true).args(["data", "mmlu"]))]
    Eval {
        /// Hugging Face model directory, a checkpoint directory written by `train`, or a GGUF
        /// file (it carries its config and tokenizer).
        #[arg(long)]
        model: std::path::PathBuf,
        /// Tokenizer to use instead of the model's (a tokenizer.json, or a GGUF file whose
        /// tokenizer to take); by default `MODEL/tokenizer.json`, or the one a .gguf model carries.
        #[arg(long)]
        tokenizer: Option<std::path::PathBuf>,
        /// PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors) to apply.
        #[arg(long)]
        adapter: Option<std::path::PathBuf>,
        /// Storage of the frozen base weights on the GPU: `native` as the file stores them (a
        /// quantized GGUF stays quantized; kernels dequantize as they read), `f16`, or `f32`.
        #[arg(long, value_enum, default_value_t = pockettune::weights::BaseDtype::Native)]
        base_dtype: pockettune::weights::BaseDtype,
        /// Text file, directory or JSONL (the same conventions as `train --data`): loss and
        /// perplexity. Either this or --mmlu.
        #[arg(long)]
        data: Option<std::path::PathBuf>,
        /// MMLU accuracy instead, on the folder `tools/fetch_assets.sh` fetches (assets/mmlu:
        /// <subject>/{dev,validation,test}/*.arrow), by lm-evaluation-harness's `mmlu` protocol:
        /// its prompt, the first dev questions as examples, the answer letter of the highest
        /// log-likelihood. Prompts longer than the model's positions lose their start, as in
        /// lm-eval. With --json: per-subject and per-question results.
        #[arg(long)]
        mmlu: Option<std::path::PathBuf>,
        /// MMLU: examples before each question, the first of the subject's dev split (at most 5;
        /// default 5).
        #[arg(long)]
        mmlu_shots: Option<usize>,
        /// MMLU: only these subjects, comma-separated (default: every one in the folder).
        #[arg(long, value_delimiter = ',')]
        mmlu_subjects: Option<Vec<String>>,
        /// MMLU: the split whose questions are scored (default: test).
        #[arg(long, value_enum)]
        mmlu_split: Option<pockettune::mmlu::Split>,
        /// MMLU: at most this many questions per subject (the first ones).
        #[arg(long)]
        limit: Option<usize>,
        /// Sequences per forward pass (MMLU: prompts; fewer when their logits would pass 1 GiB).
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        #[arg(long, default_value_t = 128)]
        seq_len: usize,
        /// Evaluate at most this many batches (default: all).
        #[arg(long)]
        max_batches: Option<usize>,
        /// `cpu` for the fast CPU path (f32, every core), `cpu-ref` for the CPU reference
        /// (f64 accumulation, slow; for checking), else a GPU adapter (index, type or name).
        #[arg(long, env = "POCKETTUNE_DEVICE")]
        device: Option<String>,
        #[arg(long, value_enum, default_value_t = Profile::Mobile)]
        limits: Profile,
        /// --memory-budget streams the frozen weights from the checkpoint; --fused-loss and
        /// --flash-attention apply to the loss of --data.
        #[command(flatten)]
        memory: pockettune::memory::MemoryFlags,
        /// Print one JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Continue a prompt with a model, to see what fine-tuning did.
    Generate {
        /// Hugging Face model directory, a checkpoint directory written by `train`, or a GGUF
        /// file (it carries its config and tokenizer).
        #[arg(long)]
        model: std::path::PathBuf,
        /// Tokenizer to use instead of the model's (a tokenizer.json, or a GGUF file whose
        /// tokenizer to take); by default `MODEL/tokenizer.json`, or the one a .gguf model carries.
        #[arg(long)]
        tokenizer: Option<std::path::PathBuf>,
        /// PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors) to apply.
        #[arg(long)]
        adapter: Option<std::path::PathBuf>,
        /// Storage of the frozen base weights on the GPU: `native` as the file stores them (a
        /// quantized GGUF stays quantized; kernels dequantize as they read), `f16`, or `f32`.
        #[arg(long, value_enum, default_value_t = pockettune::weights::BaseDtype::Native)]
        base_dtype: pockettune::weights::BaseDtype,
        #[arg(long)]
        prompt: String,
        /// Tokens to generate at most (stops early at end-of-text).
        #[arg(long, default_value_t = 100)]
        max_tokens: usize,
        /// Sampling temperature; 0 = greedy.
        #[arg(long, default_value_t = 0.8)]
        temperature: f32,
        /// Sample among the k most likely tokens (0 = all).
        #[arg(long, default_value_t = 40)]
        top_k: usize,
        /// Sample among the most likely tokens whose probabilities sum to p.
        #[arg(long, default_value_t = 0.95)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// `cpu` for the fast CPU path (f32, every core), `cpu-ref` for the CPU reference
        /// (f64 accumulation, slow; for checking), else a GPU adapter (index, type or name).
        #[arg(long, env = "POCKETTUNE_DEVICE")]
        device: Option<String>,
        #[arg(long, value_enum, default_value_t = Profile::Mobile)]
        limits: Profile,
        /// --memory-budget streams the frozen weights from the checkpoint.
        #[command(flatten)]
        memory: pockettune::memory::MemoryFlags,
    },
    /// Export a LoRA adapter: merged into its base model as a Hugging Face model directory
    /// (`--format hf`), or as a GGUF LoRA file that llama.cpp applies over the base GGUF
    /// (`--format gguf-lora`; then `llama-cli -m BASE.gguf --lora OUT.gguf`).
    Export {
        /// Base model: a Hugging Face directory or a .gguf file (hf); the .gguf file llama.cpp
        /// will load (gguf-lora: its architecture and tensor names go into the adapter file).
        #[arg(long)]
        model: std::path::PathBuf,
        /// PEFT LoRA adapter directory (e.g. a checkpoint of a `train --method lora` run).
        #[arg(long)]
        adapter: std::path::PathBuf,
        /// `hf`: the adapter folded into the base weights (W + alpha/r B A), a Hugging Face
        /// model directory. `gguf-lora`: the adapter alone, unmerged, as llama.cpp's LoRA GGUF
        /// (F32 factors, Llama Q/K rows permuted as llama.cpp stores them).
        #[arg(long, value_enum, default_value_t = ExportFormat::Hf)]
        format: ExportFormat,
        /// Kept for older scripts: `--format hf` always merges (not valid with gguf-lora).
        #[arg(long)]
        merge: bool,
        /// hf: output directory (config.json, model.safetensors, tokenizer.json);
        /// gguf-lora: the .gguf file to write.
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Write a randomly initialised GPT-2 as a Hugging Face model directory (no pretrained
    /// weights are needed to try the pipeline or measure it).
    Init {
        /// gpt2 (124M), gpt2-medium (355M) or tiny (2 layers of 64).
        #[arg(long, default_value = "gpt2")]
        preset: String,
        /// tokenizer.json to put beside the weights (its vocabulary sets the model's).
        #[arg(long)]
        tokenizer: std::path::PathBuf,
        #[arg(long)]
        out: std::path::PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// What the power source reads now: battery percent, charging, temperature and power, and
    /// which files (or other origin) each came from.
    Power {
        /// auto (sysfs where a battery exists, else none), sysfs[:ROOT], trace:FILE,
        /// simulate[:PARAMS] or none, as `train --power-source`.
        #[arg(long, default_value = "auto")]
        power_source: String,
        /// The optimizer step to read at (a trace's rows depend on it).
        #[arg(long, default_value_t = 1)]
        step: u64,
        /// Print one JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Benchmarks, each with a baseline measured in the same run.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Draw a run's metrics as pictures: loss and eval loss, tokens/s, battery, temperature,
    /// throttled and paused time, power; each over steps and over wall time. Writes one file
    /// per panel and overview.svg (or .png); panels with no data are left out. Prints the
    /// paths written.
    Report {
        /// The run's --out directory (its metrics.jsonl is read), or a metrics JSONL file.
        run: std::path::PathBuf,
        /// Directory for the pictures (default: report/ beside the metrics file).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// svg (text as <text>, any viewer) or png (rasterised with the embedded DejaVu Sans).
        #[arg(long, value_enum, default_value_t = pockettune::report::Format::Svg)]
        format: pockettune::report::Format,
        /// Print one JSON document on stdout: the files and the run's summary figures.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Time a fine-tuning step (full or LoRA) of a random model of a preset shape on the GPU and on
    /// the fast CPU path, with peak memory.
    Step {
        #[command(flatten)]
        device: DeviceArgs,
        /// Print one JSON document on stdout.
        #[arg(long)]
        json: bool,
        /// Model: gpt2 (124M), gpt2-medium (355M), tiny (2 layers), qwen2.5-0.5b, gemma3-270m,
        /// gemma3-1b or smollm2-135m (random weights of those shapes).
        #[arg(long, default_value = "gpt2")]
        preset: String,
        /// With --method lora: the preset's base quantized (q4_k_m: llama.cpp's Q4_K_M mix, Q5_0
        /// and Q8_0 where rows are not whole 256-blocks), written once as a GGUF file to the
        /// temporary directory and kept quantized on the GPU (streamed under --memory-budget).
        #[arg(long, value_enum, conflicts_with = "model")]
        preset_quant: Option<pockettune::models::PresetQuant>,
        /// A real model instead of a preset: a Hugging Face directory or a GGUF file.
        #[arg(long)]
        model: Option<std::path::PathBuf>,
        /// With --model and --method lora: storage of the frozen base on the GPU (native keeps
        /// a quantized GGUF quantized).
        #[arg(long, value_enum, default_value_t = pockettune::weights::BaseDtype::Native)]
        base_dtype: pockettune::weights::BaseDtype,
        /// Full fine-tuning, or LoRA (rank 8, alpha 32, every projection).
        #[arg(long, value_enum, default_value_t = pockettune::train::Method::Full)]
        method: pockettune::train::Method,
        /// The GPU's arithmetic, as `train --precision` (the CPU path after it stays f32).
        #[arg(long, value_enum, default_value_t = pockettune::gpu::Precision::F32)]
        precision: pockettune::gpu::Precision,
        #[arg(long, default_value_t = 4)]
        batch_size: usize,
        #[arg(long, default_value_t = 128)]
        seq_len: usize,
        /// Timed steps after one warm-up step.
        #[arg(long, default_value_t = 1)]
        steps: usize,
        /// Skip the fast CPU path that runs after the GPU (`--device cpu` runs the CPU path
        /// alone, with no GPU; `--device cpu-ref` the CPU reference).
        #[arg(long)]
        no_cpu: bool,
        /// Plan the step instead of running it: every GPU buffer is counted and none is made,
        /// no kernel runs; the memory report is the step's (instant, and exact for the engine's
        /// buffers; RSS and time are then meaningless). GPU only.
        #[arg(long)]
        plan: bool,
        /// After the timed steps, run one more with each op timed alone (the device idle
        /// before and after each) and print where its time goes, slowest first.
        #[arg(long, conflicts_with = "plan")]
        profile: bool,
        #[command(flatten)]
        memory: pockettune::memory::MemoryFlags,
    },
    /// GFLOP/s of GPT-2 124M's training matmuls on the GPU next to the fast CPU path's.
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
        /// Only layers whose name contains this text (e.g. `c_fc`, `lm_head`; `lora` measures
        /// LoRA's rank-8 matrices on the MLP instead, `lora_A` or `lora_B` one of them).
        #[arg(long)]
        layer: Option<String>,
        /// Matmul kernel to measure: the device's choice (`POCKETTUNE_MATMUL`, else the
        /// autotune's), `tiled`, `subgroup`, `subgroup-uniform`, `staged` (its first tile), a staged tile as
        /// `staged-BMxBNxBK-TMxTN` (e.g. `staged-128x128x8-8x8`; `info` lists the offered
        /// ones), or `all` (one table each, then a summary side by side).
        #[arg(long)]
        matmul: Option<String>,
        /// `mixed` also measures the mixed-precision form of each kernel measured (`train
        /// --precision mixed`: f16 products, f32 sums; a staged tile keeps its tiles in f16)
        /// after the f32 kernels, in the same run (needs shader_f16).
        #[arg(long, value_enum, default_value_t = pockettune::gpu::Precision::F32)]
        precision: pockettune::gpu::Precision,
    },
}

/// `train --config FILE` (or `--config=FILE`): the file's options go first on the command
/// line, so that options given explicitly (later) override them. Each is passed as
/// `--key=value`, so that a value starting with `-` stays a value.
fn with_config_file(args: Vec<String>) -> Result<Vec<String>> {
    // Only `train` takes --config, right after the program name; anywhere else clap refuses it.
    if args.get(1).map(String::as_str) != Some("train") {
        return Ok(args);
    }
    let mut path = None;
    for (i, a) in args.iter().enumerate().skip(2) {
        if a == "--" {
            break;
        }
        if a == "--config" {
            path = Some(args.get(i + 1).context("--config needs a file name")?.clone());
        } else if let Some(p) = a.strip_prefix("--config=") {
            anyhow::ensure!(!p.is_empty(), "--config= needs a file name");
            path = Some(p.to_string());
        }
    }
    let Some(path) = path else { return Ok(args) };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let table: toml::Table = toml::from_str(&text).with_context(|| format!("{path} is not valid TOML"))?;
    let mut from_file = Vec::new();
    for (key, value) in table {
        let flag = format!("--{}", key.replace('_', "-"));
        match value {
            toml::Value::Boolean(true) => from_file.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::String(s) => from_file.push(format!("{flag}={s}")),
            toml::Value::Integer(_) | toml::Value::Float(_) => from_file.push(format!("{flag}={value}")),
            other => anyhow::bail!("{path}: option {key} = {other} is not a string, number or boolean"),
        }
    }
    let mut merged = args[..2].to_vec();
    merged.extend(from_file);
    merged.extend(args[2..].iter().cloned());
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
            tokenizer,
            adapter,
            base_dtype,
            data,
            mmlu,
            mmlu_shots,
            mmlu_subjects,
            mmlu_split,
            limit,
            batch_size,
            seq_len,
            max_batches,
            device,
            limits,
            json,
            memory,
        } => {
            at_least_one(&[
                ("--batch-size", batch_size),
                ("--seq-len", seq_len),
                ("--max-batches", max_batches.unwrap_or(1)),
                ("--limit", limit.unwrap_or(1)),
            ])?;
            pockettune::train::check_paths(&[
                ("--model", Some(&model)),
                ("--tokenizer", tokenizer.as_deref()),
                ("--adapter", adapter.as_deref()),
                ("--data", data.as_deref()),
                ("--mmlu", mmlu.as_deref()),
            ])?;
            let dev = pockettune::train::open_device(device.as_deref(), limits)?;
            if let pockettune::graph::Device::Gpu(gpu) = &dev {
                pockettune::kernels::matmul_tune::tune_and_report(gpu)?;
            }
            if let Some(dir) = mmlu {
                let o = pockettune::mmlu::Options {
                    shots: mmlu_shots.unwrap_or(5),
                    subjects: mmlu_subjects,
                    split: mmlu_split.unwrap_or(pockettune::mmlu::Split::Test),
                    limit,
                    batch_size,
                };
                let spec = ModelSpec {
                    model: &model,
                    tokenizer: tokenizer.as_deref(),
                    adapter: adapter.as_deref(),
                    base_dtype,
                    memory: &memory,
                };
                return run_mmlu(&dev, &spec, &dir, &o, json);
            }
            let mmlu_only =
                mmlu_shots.is_some() || mmlu_subjects.is_some() || mmlu_split.is_some() || limit.is_some();
            anyhow::ensure!(
                !mmlu_only,
                "--mmlu-shots, --mmlu-subjects, --mmlu-split and --limit go with --mmlu"
            );
            let data = data.context("--data or --mmlu is needed")?;
            let spec = ModelSpec {
                model: &model,
                tokenizer: tokenizer.as_deref(),
                adapter: adapter.as_deref(),
                base_dtype,
                memory: &memory,
            };
            run_eval(&dev, &spec, &data, (batch_size, seq_len), max_batches, json)
        }
        Command::Generate {
            model,
            tokenizer,
            adapter,
            base_dtype,
            prompt,
            max_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            device,
            limits,
            memory,
        } => {
            let s = pockettune::generate::Sampling { temperature, top_k, top_p, seed };
            s.check()?;
            at_least_one(&[("--max-tokens", max_tokens)])?;
            pockettune::train::check_paths(&[
                ("--model", Some(&model)),
                ("--tokenizer", tokenizer.as_deref()),
                ("--adapter", adapter.as_deref()),
            ])?;
            let dev = pockettune::train::open_device(device.as_deref(), limits)?;
            if let pockettune::graph::Device::Gpu(gpu) = &dev {
                pockettune::kernels::matmul_tune::tune_and_report(gpu)?;
            }
            let spec = ModelSpec {
                model: &model,
                tokenizer: tokenizer.as_deref(),
                adapter: adapter.as_deref(),
                base_dtype,
                memory: &memory,
            };
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

/// `pockettune report`: paths on stdout (or the JSON summary), notes and figures on stderr.
fn report(
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
    k.name()
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
fn power(spec: &str, step: u64, json: bool) -> Result<i32> {
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

fn run_gradcheck(
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

fn bench_kernels(
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

/// The model options of `eval` and `generate`.
struct ModelSpec<'a> {
    model: &'a std::path::Path,
    tokenizer: Option<&'a std::path::Path>,
    adapter: Option<&'a std::path::Path>,
    base_dtype: pockettune::weights::BaseDtype,
    memory: &'a pockettune::memory::MemoryFlags,
}

/// A model, optionally with a PEFT adapter, with every weight frozen (no gradient buffers,
/// the base stored as `--base-dtype` says), and its tokenizer.
fn load_for_inference(
    dev: &pockettune::graph::Device,
    spec: &ModelSpec,
) -> Result<(pockettune::models::Model, pockettune::graph::ParamStore, pockettune::data::Tokenizer)> {
    let tok = pockettune::data::Tokenizer::for_model(spec.model, spec.tokenizer)?;
    pockettune::memory::validate(spec.memory)?;
    pockettune::memory::apply_budget(dev, spec.memory.memory_budget);
    let stream = spec.memory.memory_budget.is_some();
    let load = pockettune::models::LoadOptions { frozen: true, base_dtype: spec.base_dtype, stream };
    let (gpt, mut store) = pockettune::models::Model::load_with(spec.model, dev, &load)?;
    tok.check_model_vocab(gpt.vocab_size())?;
    if let Some(dir) = spec.adapter {
        let o = pockettune::lora::load(dir, &gpt, &mut store)?;
        eprintln!("adapter {}: LoRA rank {} on {}", dir.display(), o.rank, o.targets.join(","));
    }
    Ok((gpt, store, tok))
}

fn run_eval(
    dev: &pockettune::graph::Device,
    spec: &ModelSpec,
    data: &std::path::Path,
    (batch, seq): (usize, usize),
    max_batches: Option<usize>,
    json: bool,
) -> Result<i32> {
    use pockettune::data::Tokens;
    let (gpt, store, tok) = load_for_inference(dev, spec)?;
    let tokens = Tokens::load(data, &tok)?;
    let (graph, vars) = gpt.graph_with(&store, batch, seq, spec.memory.graph_options())?;
    let windows = tokens.windows(seq);
    let batches = max_batches.unwrap_or(usize::MAX).min(windows / batch);
    if batches == 0 {
        return Err(pockettune::Error::Checkpoint {
            path: data.to_path_buf(),
            detail: format!(
                "{} tokens make {windows} windows of {} tokens, fewer than one batch of {batch}; \
                 add data or lower --batch-size / --seq-len",
                tokens.ids.len(),
                seq + 1
            ),
        }
        .into());
    }
    let loss = pockettune::train::evaluate(&graph, vars.loss, &store, &tokens, batch, seq, batches)?;
    let evaluated = batches * batch * seq;
    eprintln!(
        "{}: loss {loss:.4}, perplexity {:.2} over {evaluated} tokens ({batches} batches of {batch} x {seq}) on {}",
        data.display(),
        loss.exp(),
        dev.name()
    );
    if json {
        print_json(
            &json!({"loss": loss, "perplexity": loss.exp(), "tokens": evaluated, "device": dev.name()}),
        )?;
    }
    Ok(0)
}

/// `eval --mmlu`: accuracy per subject on stderr, the whole report with `--json`.
fn run_mmlu(
    dev: &pockettune::graph::Device,
    spec: &ModelSpec,
    dir: &std::path::Path,
    o: &pockettune::mmlu::Options,
    json: bool,
) -> Result<i32> {
    use std::io::IsTerminal;
    let (gpt, store, tok) = load_for_inference(dev, spec)?;
    let r = pockettune::mmlu::evaluate(&gpt, &store, &tok, dir, o, std::io::stderr().is_terminal())?;
    eprintln!(
        "MMLU {} split, {} shots: accuracy {:.4} over {} questions, {:.4} averaged over {} subjects \
         ({} prompts cut to the model's {} positions; {} forward passes in {:.1} s on {})",
        o.split.dir(),
        o.shots,
        r.micro_accuracy,
        r.count,
        r.macro_accuracy,
        r.subjects.len(),
        r.truncated,
        gpt.max_positions(),
        r.forward_passes,
        r.seconds,
        r.device
    );
    if json {
        print_json(&serde_json::to_value(&r)?)?;
    }
    Ok(0)
}

fn preset(name: &str) -> Result<pockettune::models::gpt2::Gpt2Config> {
    use pockettune::models::gpt2::{Gpt2, Gpt2Config};
    Ok(match name {
        "gpt2" => Gpt2Config::small(),
        "gpt2-medium" => Gpt2::medium_config(),
        "tiny" => Gpt2Config { n_layer: 2, n_head: 4, n_embd: 64, n_positions: 256, ..Gpt2Config::small() },
        other => anyhow::bail!("unknown preset {other:?}: gpt2, gpt2-medium or tiny"),
    })
}

fn init_model(name: &str, tokenizer: &std::path::Path, out: &std::path::Path, seed: u64) -> Result<i32> {
    use pockettune::checkpoint::write_atomic;
    use pockettune::models::gpt2::Gpt2;
    let tok = pockettune::data::Tokenizer::load(tokenizer)?;
    let mut cfg = preset(name)?;
    cfg.vocab_size = tok.vocab_size();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut config = serde_json::to_value(&cfg)?;
    config["architectures"] = json!(["GPT2LMHeadModel"]);
    config["model_type"] = json!("gpt2");
    config["tie_word_embeddings"] = json!(true);
    write_atomic(&out.join("config.json"), serde_json::to_string_pretty(&config)?.as_bytes())?;
    let weights = Gpt2::random_weights(&cfg, seed);
    let views: Vec<(String, safetensors::tensor::TensorView)> = weights
        .iter()
        .map(|(n, s, d)| {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                s.clone(),
                bytemuck::cast_slice(d),
            );
            (n.clone(), view.expect("shape and data agree"))
        })
        .collect();
    write_atomic(&out.join("model.safetensors"), &safetensors::serialize(views, None)?)?;
    write_atomic(&out.join("tokenizer.json"), &std::fs::read(tokenizer)?)?;
    let params: usize = weights.iter().map(|(_, s, _)| s.iter().product::<usize>()).sum();
    eprintln!(
        "wrote a random {name} ({:.1} M parameters, vocabulary {}) to {}",
        params as f64 / 1e6,
        cfg.vocab_size,
        out.display()
    );
    Ok(0)
}

#[allow(clippy::too_many_arguments)]
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

fn bench_step(
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
