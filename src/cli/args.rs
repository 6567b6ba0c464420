//! The command line's shape: every subcommand and option as clap derives them (their doc
//! comments are the `--help` text), and `train --config FILE`.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use pockettune::{Gpu, GpuOptions, Profile};

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
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Clone)]
pub struct DeviceArgs {
    /// GPU adapter: index (as `info` lists them), type (discrete, integrated, virtual,
    /// software) or part of its name. Default: the first discrete, then integrated GPU.
    /// `bench step` also takes `cpu` (the fast CPU path) and `cpu-ref` (the CPU reference).
    #[arg(long, env = "POCKETTUNE_DEVICE")]
    pub device: Option<String>,
    /// Limits the device is opened with: `mobile` holds every kernel to a phone GPU's limits
    /// (wgpu's downlevel defaults: 4 storage buffers per shader, 128 MiB bindings, 16 KiB
    /// workgroup memory); `adapter` allows all the adapter offers.
    #[arg(long, value_enum, default_value_t = Profile::Mobile)]
    pub limits: Profile,
}

impl DeviceArgs {
    pub fn open(&self) -> Result<Gpu> {
        let gpu = Gpu::new(&GpuOptions { device: self.device.clone(), profile: self.limits })?;
        eprintln!("device: {} ({} limits)", gpu.summary(), gpu.profile());
        Ok(gpu)
    }
}

/// The model options of `eval` and `generate`.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Hugging Face model directory, a checkpoint directory written by `train`, or a GGUF
    /// file (it carries its config and tokenizer).
    #[arg(long)]
    pub model: std::path::PathBuf,
    /// Tokenizer to use instead of the model's (a tokenizer.json, or a GGUF file whose
    /// tokenizer to take); by default `MODEL/tokenizer.json`, or the one a .gguf model carries.
    #[arg(long)]
    pub tokenizer: Option<std::path::PathBuf>,
    /// PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors) to apply.
    #[arg(long)]
    pub adapter: Option<std::path::PathBuf>,
    /// Storage of the frozen base weights on the GPU: `native` as the file stores them (a
    /// quantized GGUF stays quantized; kernels dequantize as they read), `f16`, or `f32`.
    #[arg(long, value_enum, default_value_t = pockettune::weights::BaseDtype::Native)]
    pub base_dtype: pockettune::weights::BaseDtype,
}

impl ModelArgs {
    /// The paths given, for `train::check_paths`.
    pub fn paths(&self) -> Vec<(&'static str, Option<&std::path::Path>)> {
        vec![
            ("--model", Some(&self.model)),
            ("--tokenizer", self.tokenizer.as_deref()),
            ("--adapter", self.adapter.as_deref()),
        ]
    }
}

/// Where `eval` and `generate` run: a GPU, the fast CPU path or the CPU reference.
#[derive(Args, Clone)]
pub struct ComputeArgs {
    /// `cpu` for the fast CPU path (f32, every core), `cpu-ref` for the CPU reference
    /// (f64 accumulation, slow; for checking), else a GPU adapter (index, type or name).
    #[arg(long, env = "POCKETTUNE_DEVICE")]
    pub device: Option<String>,
    #[arg(long, value_enum, default_value_t = Profile::Mobile)]
    pub limits: Profile,
}

impl ComputeArgs {
    /// The device, with a GPU's matmul kernel chosen (the cached autotune choice).
    pub fn open(&self) -> Result<pockettune::graph::Device> {
        let dev = pockettune::train::open_device(self.device.as_deref(), self.limits)?;
        if let pockettune::graph::Device::Gpu(gpu) = &dev {
            pockettune::kernels::matmul_tune::tune_and_report(gpu)?;
        }
        Ok(dev)
    }
}

/// What `export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// Merged Hugging Face model directory.
    Hf,
    /// llama.cpp LoRA adapter file.
    GgufLora,
}

#[derive(Subcommand)]
pub enum Command {
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
        #[command(flatten)]
        model: ModelArgs,
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
        #[command(flatten)]
        on: ComputeArgs,
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
        #[command(flatten)]
        model: ModelArgs,
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
        #[command(flatten)]
        on: ComputeArgs,
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
pub enum BenchCommand {
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
pub fn with_config_file(args: Vec<String>) -> Result<Vec<String>> {
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
