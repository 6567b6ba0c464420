//! The training loop: batches from `data`, forward and backward through the graph executor,
//! gradient accumulation and clipping, AdamW with a warmup + cosine schedule, held-out
//! evaluation, atomic checkpoints, `--resume`, a metrics JSONL line per optimizer step and a
//! progress bar (quiet when stderr is not a terminal).
//!
//! Resuming is exact: a run killed at any moment and continued with `--resume` gives the losses
//! of an uninterrupted run step for step, on the same device with the same seed (the checkpoint
//! holds weights, AdamW moments and the data position; `tests/kill_resume.rs` checks it with
//! SIGKILL). A non-finite loss or gradient norm stops the run naming the step, or with
//! `--on-nan skip` skips the update; no checkpoint is ever written from a non-finite state.

use crate::checkpoint::{self, TrainState};
use crate::data::{Batches, Tokenizer, Tokens};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, GpuOptions, Precision, Profile};
use crate::graph::{Device, ParamStore, StepOutcome};
use crate::kernels::optim::AdamW;
use crate::memory::ActivationStore;
use crate::models::{LoadOptions, Model};
use crate::weights::BaseDtype;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Full fine-tuning: every weight is trained.
    Full,
    /// LoRA: low-rank adapters on the projections, base weights frozen.
    Lora,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    /// Linear warmup, then cosine decay to 0 at the last step.
    Cosine,
}

/// What a step with a non-finite (NaN or infinite) loss or gradient norm does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnNan {
    /// Stop the run with an error naming the step; `latest` keeps naming the last good
    /// checkpoint.
    Stop,
    /// Skip the update (weights and moments untouched, the batch consumed) and go on; skipped
    /// steps are counted (`skipped_nan` in the metrics and the summary).
    Skip,
}

/// Every option of `pockettune train` (each can also come from `--config run.toml`).
#[derive(clap::Args, Clone, Debug, Serialize, Deserialize)]
pub struct TrainOptions {
    /// The model: a Hugging Face directory (config.json, model.safetensors or sharded
    /// safetensors with model.safetensors.index.json, tokenizer.json) or a GGUF file (it carries
    /// its config and tokenizer), of a GPT-2, Qwen2, Llama-family, Gemma 3 or Gemma 2 model.
    /// Full fine-tuning of a quantized GGUF trains f32 weights dequantized from it; LoRA keeps
    /// the base as stored (see --base-dtype).
    #[arg(long)]
    pub model: PathBuf,
    /// Storage of the frozen base weights on the GPU with --method lora: `native` keeps them as
    /// the file stores them (a Q4_K_M GGUF stays 4-5 bits per weight; kernels dequantize as they
    /// read), `f16` stores 16-bit floats (halves an f32 checkpoint), `f32` dequantizes all.
    /// Full fine-tuning always trains f32 weights.
    #[arg(long, value_enum, default_value_t = BaseDtype::Native)]
    #[serde(default)]
    pub base_dtype: BaseDtype,
    /// Arithmetic on the GPU: `f32` throughout, or `mixed`: the forward products of the linear
    /// layers multiply in f16 and sum in f32 (twice the f32 rate on phone GPUs); gradients,
    /// the backward products and AdamW stay f32. Needs the adapter's shader_f16 (`pockettune
    /// info`); on the CPU paths it must stay f32.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    #[serde(default)]
    pub precision: Precision,
    /// With --method lora: continue training this adapter (a PEFT adapter directory, or one
    /// `pockettune train` wrote) instead of starting a new one; its rank, alpha, dropout and
    /// targets come from its adapter_config.json.
    #[arg(long)]
    #[serde(default)]
    pub adapter: Option<PathBuf>,
    /// Tokenizer to use instead of the model's (a tokenizer.json, or a GGUF file whose tokenizer
    /// to take); by default `MODEL/tokenizer.json`, or the tokenizer a .gguf model carries.
    #[arg(long)]
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Training text: a file, a directory of .txt/.md/.jsonl files, or JSONL with
    /// {"text": ...} or {"prompt": ..., "completion": ...} lines.
    #[arg(long)]
    pub data: PathBuf,
    /// Held-out data for evaluation (else --eval-fraction of --data).
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Fraction of the training windows held out for evaluation when --eval-data is absent.
    #[arg(long, default_value_t = 0.0)]
    pub eval_fraction: f64,
    /// Fine-tuning method.
    #[arg(long, value_enum, default_value_t = Method::Full)]
    pub method: Method,
    /// Peak learning rate (default 1e-4 for full fine-tuning, 2e-4 for LoRA).
    #[arg(long)]
    pub lr: Option<f32>,
    /// LoRA rank r.
    #[arg(long, default_value_t = 8)]
    pub lora_rank: usize,
    /// LoRA alpha (the adapter's output is scaled by alpha / r).
    #[arg(long, default_value_t = 32.0)]
    pub lora_alpha: f32,
    /// Dropout on the adapter's input.
    #[arg(long, default_value_t = 0.1)]
    pub lora_dropout: f32,
    /// Modules to adapt, comma-separated, as Hugging Face names them (default: every attention
    /// and MLP projection: c_attn,c_proj,c_fc for GPT-2; q_proj,k_proj,v_proj,o_proj,gate_proj,
    /// up_proj,down_proj for Qwen2/Llama/Gemma 3).
    #[arg(long, value_delimiter = ',')]
    pub lora_targets: Vec<String>,
    /// Decoupled weight decay (AdamW), applied to every trained weight.
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f32,
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f32,
    #[arg(long, default_value_t = 0.999)]
    pub beta2: f32,
    #[arg(long, default_value_t = 1e-8)]
    pub eps: f32,
    /// Learning-rate schedule.
    #[arg(long, value_enum, default_value_t = Schedule::Cosine)]
    pub schedule: Schedule,
    /// Warmup steps (learning rate rising linearly from 0).
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// Micro-batches per optimizer step (their gradients are averaged).
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Clip gradients to this global L2 norm (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f32,
    /// A NaN or infinite loss or gradient norm: stop the run, or skip the step.
    #[arg(long, value_enum, default_value_t = OnNan::Stop)]
    #[serde(default = "on_nan_default")]
    pub on_nan: OnNan,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// Optimizer steps (default: one epoch, or --epochs).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Epochs over the training data (used when --steps is absent).
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Seed of the data order (with --shuffle).
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    /// Shuffle the windows each epoch (else file order).
    #[arg(long)]
    pub shuffle: bool,
    /// Evaluate on held-out data every N steps (0 = only at the end, if there is eval data).
    #[arg(long, default_value_t = 0)]
    pub eval_every: usize,
    /// Held-out batches per evaluation.
    #[arg(long, default_value_t = 8)]
    pub eval_batches: usize,
    /// Write a checkpoint every N steps (0 = only at the end).
    #[arg(long, default_value_t = 0)]
    pub save_every: usize,
    /// Checkpoints to keep (older ones are deleted after a newer one is complete; 0 = all).
    #[arg(long, default_value_t = 2)]
    pub keep_checkpoints: usize,
    /// Output directory: checkpoints (step-NNNNNN/, latest) and metrics.
    #[arg(long, default_value = "runs/pockettune")]
    pub out: PathBuf,
    /// Continue from the newest checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    /// Metrics JSONL file (default: OUT/metrics.jsonl).
    #[arg(long)]
    pub metrics_out: Option<PathBuf>,
    /// `cpu` for the fast CPU path (f32, every core), `cpu-ref` for the CPU reference path
    /// (f64 accumulation, slow; for checking), else a GPU adapter (index, type or name).
    #[arg(long, env = "POCKETTUNE_DEVICE")]
    pub device: Option<String>,
    /// GPU limits profile.
    #[arg(long, value_enum, default_value_t = Profile::Mobile)]
    pub limits: Profile,
    #[command(flatten)]
    #[serde(flatten)]
    pub memory: crate::memory::MemoryFlags,
    /// The power source and policies (battery threshold, heat, critical battery, charging only).
    #[command(flatten)]
    #[serde(flatten)]
    pub power: crate::power::PowerFlags,
}

/// What `train` reports at the end.
#[derive(Clone, Debug, Serialize)]
pub struct TrainSummary {
    pub steps: usize,
    pub losses: Vec<f32>,
    pub final_eval_loss: Option<f32>,
    pub checkpoint: Option<PathBuf>,
    pub tokens_seen: u64,
    pub seconds: f64,
    /// steps skipped for a non-finite loss or gradient norm (`--on-nan skip`), resumed runs
    /// included
    pub skipped_nan: usize,
    /// peak RSS (anonymous, file-backed) and GPU bytes of the run
    pub memory: crate::memory::report::MemoryReport,
    /// energy, battery and the time throttled or paused (`--power-source`)
    pub power: crate::power::PowerTotals,
}

fn on_nan_default() -> OnNan {
    OnNan::Stop
}

fn invalid(name: &str, detail: impl Into<String>) -> Error {
    Error::InvalidArgument { name: name.into(), detail: detail.into() }
}

/// Open the device `--device` names: `cpu` (the fast CPU path), `cpu-ref` (the CPU reference),
/// or a GPU (an adapter index or a part of its name; the best one when `None`).
pub fn open_device(spec: Option<&str>, limits: Profile) -> Result<Device> {
    match spec {
        Some("cpu") => {
            crate::cpu::keep_freed_memory();
            return Ok(Device::CPU);
        }
        Some("cpu-ref") => return Ok(Device::CPU_REF),
        _ => {}
    }
    let gpu = Gpu::new(&GpuOptions { device: spec.map(str::to_string), profile: limits })?;
    Ok(Device::Gpu(Arc::new(gpu)))
}

/// Run `dev`'s products in `precision` (`--precision`): mixed needs a GPU with shader_f16.
pub fn set_precision(dev: &Device, precision: Precision) -> Result<()> {
    match dev {
        Device::Gpu(g) => {
            g.set_precision(precision)?;
            if precision == Precision::Mixed && g.summary().device_type == "software" {
                eprintln!(
                    "note: {} emulates f16 arithmetic on the CPU, so --precision mixed runs slower than \
                     f32 there (3x for a GPT-2 step); it is meant for GPUs with f16 units",
                    g.summary().name
                );
            }
            Ok(())
        }
        Device::Cpu(_) if precision == Precision::Mixed => Err(Error::InvalidArgument {
            name: "--precision".into(),
            detail: "mixed precision runs f16 products on a GPU; the CPU paths compute in f32 (fast) \
                     or f64 (reference): use --precision f32, or a GPU --device"
                .into(),
        }),
        Device::Cpu(_) => Ok(()),
    }
}

/// The learning rate at optimizer step `step` (0-based) of `total`.
pub fn learning_rate(o: &TrainOptions, step: usize, total: usize) -> f32 {
    let lr = o.peak_lr();
    if step < o.warmup {
        return lr * (step + 1) as f32 / o.warmup as f32;
    }
    match o.schedule {
        Schedule::Constant => lr,
        Schedule::Cosine => {
            let span = total.saturating_sub(o.warmup).max(1) as f64;
            let progress = (step - o.warmup) as f64 / span;
            (lr as f64 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())) as f32
        }
    }
}

impl TrainOptions {
    /// `--lr`, or the method's default (1e-4 full, 2e-4 LoRA as in the paper).
    pub fn peak_lr(&self) -> f32 {
        self.lr.unwrap_or(match self.method {
            Method::Full => 1e-4,
            Method::Lora => 2e-4,
        })
    }
}

/// Resident set size now and at its peak, from /proc (None elsewhere).
pub fn rss() -> (Option<u64>, Option<u64>) {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return (None, None) };
    let field = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn validate(o: &TrainOptions) -> Result<()> {
    if o.batch_size == 0 || o.seq_len == 0 || o.grad_accum == 0 {
        return Err(invalid("--batch-size/--seq-len/--grad-accum", "must be at least 1"));
    }
    if o.adapter.is_some() && o.method != Method::Lora {
        return Err(invalid("--adapter", "continues a LoRA adapter: use it with --method lora"));
    }
    if !(o.peak_lr().is_finite() && o.peak_lr() > 0.0) {
        return Err(invalid("--lr", format!("{} is not a positive learning rate", o.peak_lr())));
    }
    if !(0.0..1.0).contains(&o.eval_fraction) {
        return Err(invalid("--eval-fraction", "must be in [0, 1)"));
    }
    check_paths(&[
        ("--model", Some(&o.model)),
        ("--data", Some(&o.data)),
        ("--eval-data", o.eval_data.as_deref()),
        ("--adapter", o.adapter.as_deref()),
        ("--tokenizer", o.tokenizer.as_deref()),
    ])?;
    crate::memory::validate(&o.memory)
}

/// Refuse a path option that names nothing, saying which option gave it; commands call this
/// before opening the device and timing its kernels, so that a mistyped path fails at once.
pub fn check_paths(paths: &[(&str, Option<&std::path::Path>)]) -> Result<()> {
    for &(flag, path) in paths {
        if let Some(path) = path.filter(|p| !p.exists()) {
            let detail = format!("no such file or directory (given as {flag})");
            return Err(Error::Checkpoint { path: path.to_path_buf(), detail });
        }
    }
    Ok(())
}

/// A device's memory ran out, or the device was lost, during step `step`: say which
/// checkpoint is intact and how to continue from it.
fn note_checkpoint(e: Error, step: usize, last: &Option<std::path::PathBuf>) -> Error {
    let note = match last {
        Some(dir) => format!(
            " (at step {step}; the last checkpoint, {}, is intact: continue from it with --resume)",
            dir.display()
        ),
        None => format!(" (at step {step}; no checkpoint had been written yet)"),
    };
    match e {
        Error::MemoryBudget { budget_mib, needed_mib, detail, hint } => {
            Error::MemoryBudget { budget_mib, needed_mib, detail: detail + &note, hint }
        }
        Error::OutOfMemory { context } => Error::OutOfMemory { context: context + &note },
        Error::DeviceLost { reason, message } => Error::DeviceLost { reason, message: message + &note },
        other => other,
    }
}

/// `POCKETTUNE_TEST_BUDGET_AT_STEP=N:BYTES` (tests only): before step N + 1, hold the device to
/// BYTES, so that a run can be made to run out of memory in the middle.
fn test_budget_hook(dev: &Device, step: usize) {
    let Ok(spec) = std::env::var("POCKETTUNE_TEST_BUDGET_AT_STEP") else { return };
    let parsed =
        spec.split_once(':').and_then(|(n, b)| Some((n.parse::<usize>().ok()?, b.parse::<u64>().ok()?)));
    if let (Some((n, bytes)), Device::Gpu(g)) = (parsed, dev) {
        if n == step {
            g.set_memory_budget(Some(bytes));
            g.trim(); // pooled buffers go, so the step must ask for new ones
        }
    }
}

/// Under `--memory-budget`, refuse before the first step a budget the step cannot run in,
/// naming the smallest one that works; else say how much of it the step uses.
fn plan_budget(
    o: &TrainOptions,
    dev: &Device,
    graph: &crate::graph::Graph,
    loss: crate::graph::Var,
    store: &mut crate::graph::ParamStore,
) -> Result<()> {
    let Some(budget) = o.memory.memory_budget else { return Ok(()) };
    let n = o.batch_size * o.seq_len;
    let feed = Model::feed(&vec![0; n], &vec![0; n], o.batch_size, o.seq_len);
    let needed = crate::memory::smallest_budget(dev, graph, loss, store, &feed, o.memory.optimizer_offload)?;
    let mut flags = o.memory.clone();
    if store.has_host_params() && flags.optimizer_offload == crate::memory::OptimizerOffload::None {
        // trained weights on the host keep their moments there whatever the flag says
        flags.optimizer_offload = crate::memory::OptimizerOffload::Host;
    }
    crate::memory::check_budget(Some(budget), needed, o.batch_size, o.seq_len, &flags)?;
    if let Some(needed) = needed {
        let how = if store.has_host_params() {
            "trained weights stream from host memory; gradients and the AdamW update are gathered there"
        } else {
            "frozen weights stream from the checkpoint"
        };
        eprintln!(
            "memory budget {}: a step holds at most {} (planned; {how})",
            crate::memory::mib(budget),
            crate::memory::mib(needed)
        );
    }
    Ok(())
}

/// Fine-tune; `progress` draws a progress bar on stderr (hidden when it is not a terminal).
pub fn train(o: &TrainOptions, progress: bool) -> Result<TrainSummary> {
    validate(o)?;
    // every power misconfiguration and an unreadable source fail here, before loading
    let mut power = crate::power::PowerMonitor::new(&o.power)?;
    let rss_sampler = crate::memory::report::RssSampler::start(); // peak RSS by kind, for the report
    let dev = open_device(o.device.as_deref(), o.limits)?;
    set_precision(&dev, o.precision)?;
    if let Device::Gpu(gpu) = &dev {
        crate::kernels::matmul_tune::tune_and_report(gpu)?;
    }
    crate::memory::apply_budget(&dev, o.memory.memory_budget);
    if let (ActivationStore::Auto, Some(f)) = (o.memory.activations, o.memory.activations.format(&dev)) {
        let f = format!("{f:?}").to_lowercase();
        eprintln!(
            "note: under --precision mixed the activations the backward pass reads are kept in {f} \
             (--activations f32 keeps them in f32, bf16 suits activations past 65,504)"
        );
    }
    let tok = Tokenizer::for_model(&o.model, o.tokenizer.as_deref())?;
    let resume_dir = if o.resume { checkpoint::latest(&o.out)? } else { None };
    if o.resume && resume_dir.is_none() {
        return Err(invalid("--resume", format!("no checkpoint in {} (no `latest` file)", o.out.display())));
    }
    // Full fine-tuning resumes from the checkpoint's weights; LoRA from the base model plus the
    // checkpoint's adapter.
    let weights_dir = match (&resume_dir, o.method) {
        (Some(dir), Method::Full) => dir.clone(),
        _ => o.model.clone(),
    };
    let load = LoadOptions {
        frozen: o.method == Method::Lora,
        base_dtype: o.base_dtype,
        stream: o.memory.memory_budget.is_some(),
    };
    let (model, mut store) = Model::load_with(&weights_dir, &dev, &load)?;
    tok.check_model_vocab(model.vocab_size())?;
    let lora_opts = match o.method {
        Method::Full => None,
        Method::Lora => Some(match resume_dir.as_ref().or(o.adapter.as_ref()) {
            Some(dir) => {
                let opts = crate::lora::load(dir, &model, &mut store)?;
                if resume_dir.is_none() {
                    eprintln!(
                        "continuing adapter {}: LoRA rank {} on {}: {} trainable values",
                        dir.display(),
                        opts.rank,
                        opts.targets.join(","),
                        store.trainable_numel()
                    );
                }
                opts
            }
            None => {
                let targets = if o.lora_targets.is_empty() {
                    crate::lora::default_targets(&model)
                } else {
                    o.lora_targets.clone()
                };
                let opts = crate::lora::LoraOptions {
                    rank: o.lora_rank,
                    alpha: o.lora_alpha,
                    dropout: o.lora_dropout,
                    targets,
                };
                let n = crate::lora::apply(&model, &mut store, &opts, o.seed)?;
                eprintln!(
                    "LoRA rank {} on {n} projections ({}): {} trainable values",
                    opts.rank,
                    opts.targets.join(","),
                    store.trainable_numel()
                );
                opts
            }
        }),
    };

    let data = Tokens::load(&o.data, &tok)?;
    let (data, eval) = match (&o.eval_data, o.eval_fraction > 0.0) {
        (Some(p), _) => (data, Some(Tokens::load(p, &tok)?)),
        (None, true) => {
            let (t, e) = data.split_eval(o.eval_fraction, o.seq_len);
            (t, Some(e))
        }
        (None, false) => (data, None),
    };
    let mut batches = Batches::new(&data, o.batch_size, o.seq_len, o.shuffle, o.seed, &o.data)?;
    let total = o.steps.unwrap_or_else(|| (o.epochs * batches.per_epoch() / o.grad_accum).max(1));

    let mut state = TrainState {
        step: 0,
        adam_step: 0,
        epoch: 0,
        batch_index: 0,
        seed: o.seed,
        tokens_seen: 0,
        skipped_nan: 0,
    };
    store.set_optimizer_offload(o.memory.optimizer_offload, &o.out.join("optimizer-state.bin"))?;
    if let Some(dir) = &resume_dir {
        state = checkpoint::restore(dir, &mut store)?;
        batches.seek(state.epoch, state.batch_index);
        eprintln!("resuming from {} at step {}", dir.display(), state.step);
        // A kill between a checkpoint's `latest` and the pruning after it leaves one too many
        // (and perhaps a `.tmp` directory): finish that pruning now, since a run resumed at its
        // last step writes no checkpoint that would.
        checkpoint::prune(&o.out, o.keep_checkpoints)?;
    }
    let (graph, vars) = model.graph_with(&store, o.batch_size, o.seq_len, o.memory.graph_options())?;
    plan_budget(o, &dev, &graph, vars.loss, &mut store)?;
    std::fs::create_dir_all(&o.out).map_err(|e| Error::Io { path: o.out.clone(), cause: e })?;
    let metrics_path = o.metrics_out.clone().unwrap_or_else(|| o.out.join("metrics.jsonl"));
    let metrics = Metrics::open(&metrics_path, resume_dir.as_ref().map(|_| state.step))?;

    let bar =
        if progress { indicatif::ProgressBar::new(total as u64) } else { indicatif::ProgressBar::hidden() };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  eta {eta}")
            .expect("valid template"),
    );
    bar.set_position(state.step as u64);
    let say = |line: String| {
        if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    };
    let start = Instant::now();
    let mut last_checkpoint = resume_dir;
    let mut eval_loss = None;
    let eval_tokens = eval.as_ref();
    let tokens_per_step = (o.batch_size * o.seq_len * o.grad_accum) as u64;
    if power.source_name() != "none" {
        say(format!("power: {}", power.source_name()));
    }
    // A step's outcome (loss, norm, skipped) is read one step behind where nothing waits on
    // it: the next step's forward and backward passes are recorded and submitted first, so the
    // GPU runs this step's tail while the host records the next (`ParamStore::update`). A
    // step that ends the run, is evaluated or checkpointed, or runs under a power policy is
    // read at once.
    let mut log = StepLog { losses: Vec::new(), metrics, start, tokens_per_step, last_settled: None };
    let mut behind: Option<Recorded> = None;
    while state.step < total {
        // The power policy: run (perhaps throttled), or checkpoint and pause or stop.
        let save = |state: &TrainState| {
            let lora = lora_opts.as_ref().map(|l| (&model, l));
            checkpoint::save(&o.out, &o.model, &store, state, lora)
        };
        let paused_ms = power_before_step(&mut power, &state, &mut last_checkpoint, save, &say, &bar)?;
        if let Device::Gpu(g) = &dev {
            g.set_submit_gate(power.gate_for_step());
        }
        let t0 = Instant::now();
        test_budget_hook(&dev, state.step);
        let mut pending =
            store.begin_step().map_err(|e| note_checkpoint(e, state.step + 1, &last_checkpoint))?;
        for micro in 0..o.grad_accum {
            let (ids, targets) = batches.next(&data);
            let mut feed = Model::feed(&ids, &targets, o.batch_size, o.seq_len);
            let salt = (state.step * o.grad_accum + micro) as u64;
            feed.dropout_seed = Some(kernels_ref::hash32((o.seed ^ salt.wrapping_mul(0x9e37_79b9)) as u32));
            let at = |e| note_checkpoint(e, state.step + 1, &last_checkpoint);
            let mut run = graph.forward(&store, &feed, &[]).map_err(at)?;
            run.backward(&mut store, vars.loss, 1.0 / o.grad_accum as f32).map_err(at)?;
            run.add_loss(vars.loss, &mut pending).map_err(at)?;
        }
        if let Some(r) = behind.take() {
            settle(&mut store, r, o, &mut state, &mut log, &mut power, &dev, &last_checkpoint, &say, &bar)?;
        }
        let at = |e| note_checkpoint(e, state.step + 1, &last_checkpoint);
        let lr = learning_rate(o, state.step, total);
        // The update is recorded at once, skipped (on the GPU, by the GPU) if the loss or the
        // norm is not finite.
        let opt = AdamW { lr, beta1: o.beta1, beta2: o.beta2, eps: o.eps, weight_decay: o.weight_decay };
        store.update(&mut pending, o.max_grad_norm, opt).map_err(at)?;
        state.step += 1;
        state.epoch = batches.epoch;
        state.batch_index = batches.index;
        state.tokens_seen += tokens_per_step;
        let recorded =
            Recorded { pending, number: state.step, tokens_seen: state.tokens_seen, lr, paused_ms, t0 };

        let last = state.step == total;
        let eval_now =
            eval_tokens.is_some() && ((o.eval_every > 0 && state.step.is_multiple_of(o.eval_every)) || last);
        let save_now = (o.save_every > 0 && state.step.is_multiple_of(o.save_every)) || last;
        if !(last || eval_now || save_now || power.source_name() != "none") {
            behind = Some(recorded);
            continue;
        }
        settle(
            &mut store,
            recorded,
            o,
            &mut state,
            &mut log,
            &mut power,
            &dev,
            &last_checkpoint,
            &say,
            &bar,
        )?;
        if let (Some(ev), true) = (eval_tokens, eval_now) {
            let l = evaluate(&graph, vars.loss, &store, ev, o.batch_size, o.seq_len, o.eval_batches)?;
            log.metrics
                .log(serde_json::json!({"step": state.step, "eval_loss": l, "perplexity": l.exp()}))?;
            say(format!("step {}: eval loss {l:.4}, perplexity {:.2}", state.step, l.exp()));
            eval_loss = Some(l);
        }
        if save_now {
            let lora = lora_opts.as_ref().map(|l| (&model, l));
            last_checkpoint = Some(checkpoint::save(&o.out, &o.model, &store, &state, lora)?);
            checkpoint::prune(&o.out, o.keep_checkpoints)?;
        }
    }
    if let Some(r) = behind.take() {
        settle(&mut store, r, o, &mut state, &mut log, &mut power, &dev, &last_checkpoint, &say, &bar)?;
    }
    let losses = log.losses;
    bar.finish_and_clear();
    if state.skipped_nan > 0 {
        eprintln!(
            "{} of {} steps skipped for a non-finite loss or gradient norm (--on-nan skip)",
            state.skipped_nan, state.step
        );
    }
    Ok(TrainSummary {
        steps: state.step,
        losses,
        final_eval_loss: eval_loss,
        checkpoint: last_checkpoint,
        tokens_seen: state.tokens_seen,
        seconds: start.elapsed().as_secs_f64(),
        skipped_nan: state.skipped_nan,
        memory: crate::memory::report::MemoryReport::for_device(&rss_sampler, &dev),
        power: power.totals(),
    })
}

/// A step whose update is recorded and whose outcome is not read yet (the training loop).
struct Recorded {
    pending: crate::graph::PendingStep,
    /// the step's number, from 1
    number: usize,
    tokens_seen: u64,
    lr: f32,
    paused_ms: f64,
    t0: Instant,
}

/// What the training loop keeps of the steps it has settled.
struct StepLog {
    losses: Vec<f32>,
    metrics: Metrics,
    start: Instant,
    tokens_per_step: u64,
    /// when the last step was settled: a step read one behind is timed from there
    last_settled: Option<Instant>,
}

/// Read a recorded step's outcome and account for it: `--on-nan` (its update was skipped
/// already), the metrics line, the progress bar. A step read one behind is timed from the
/// previous step's settling (in a steady run, one step's time).
#[allow(clippy::too_many_arguments)]
fn settle(
    store: &mut ParamStore,
    r: Recorded,
    o: &TrainOptions,
    state: &mut TrainState,
    log: &mut StepLog,
    power: &mut crate::power::PowerMonitor,
    dev: &Device,
    last_checkpoint: &Option<PathBuf>,
    say: &impl Fn(String),
    bar: &indicatif::ProgressBar,
) -> Result<()> {
    let at = |e| note_checkpoint(e, r.number, last_checkpoint);
    let StepOutcome { loss, grad_norm, .. } = store.outcome(r.pending).map_err(at)?;
    state.adam_step = store.adam_step();
    let bad = [("loss", loss), ("gradient norm", grad_norm)].into_iter().find(|(_, x)| !x.is_finite());
    match (bad, o.on_nan) {
        (None, _) => {}
        (Some((what, value)), OnNan::Stop) => {
            bar.abandon();
            let detail = match last_checkpoint {
                Some(dir) => format!(
                    "so no checkpoint was written from it; the last good checkpoint is {} (named by {}; \
                     continue from it with --resume)",
                    dir.display(),
                    o.out.join("latest").display()
                ),
                None => "and no checkpoint had been written yet".to_string(),
            };
            return Err(Error::NonFinite { step: r.number, what: what.into(), value, detail });
        }
        (Some((what, value)), OnNan::Skip) => {
            state.skipped_nan += 1;
            say(format!(
                "step {}: the {what} is {value}; update skipped (--on-nan skip, {} so far)",
                r.number, state.skipped_nan
            ));
        }
    }
    log.losses.push(loss);
    power.sleep_between_steps(); // the rest of a throttled step's duty cycle
    let now = Instant::now();
    let from = log.last_settled.map_or(r.t0, |t| t.max(r.t0));
    log.last_settled = Some(now);
    let secs = (now - from).as_secs_f64();
    let tokens = log.tokens_per_step;
    let p = power.after_step(r.number as u64, secs, tokens);
    let (rss, peak) = rss();
    let gpu_bytes = match dev {
        Device::Gpu(g) => Some(g.bytes_allocated().0),
        Device::Cpu(_) => None,
    };
    log.metrics.log(serde_json::json!({
        "step": r.number, "loss": loss, "lr": r.lr, "tokens": r.tokens_seen,
        "ms_step": secs * 1e3, "tokens_per_s": tokens as f64 / secs,
        "rss_bytes": rss, "peak_rss_bytes": peak, "gpu_bytes": gpu_bytes,
        "battery_pct": p.battery_pct, "charging": p.charging, "temp_c": p.temp_c, "power_w": p.power_w,
        "energy_j": p.energy_j, "throttle_ms": p.throttle_ms, "duty": p.duty, "paused_ms": r.paused_ms,
        "elapsed_s": log.start.elapsed().as_secs_f64(),
        "grad_norm": grad_norm, "skipped_nan": state.skipped_nan,
    }))?;
    bar.set_message(format!("loss {loss:.4}  {:.0} tok/s", tokens as f64 / secs));
    bar.set_position(r.number as u64);
    Ok(())
}

/// Ask the power policy whether the next step may run (`crate::power`). On a pause or a stop a
/// checkpoint of the steps so far is written first (unless the last one holds them already),
/// so that a run killed while it waits, or stopped, loses nothing; a pause then waits, polling
/// the source, until the policy lets the step run. Returns the milliseconds paused.
fn power_before_step(
    power: &mut crate::power::PowerMonitor,
    state: &TrainState,
    last_checkpoint: &mut Option<PathBuf>,
    save: impl Fn(&TrainState) -> Result<PathBuf>,
    say: &impl Fn(String),
    bar: &indicatif::ProgressBar,
) -> Result<f64> {
    use crate::power::Decision;
    let step = state.step as u64 + 1;
    let mut decision = power.before_step(step);
    let checkpoint = |last: &mut Option<PathBuf>| -> Result<PathBuf> {
        let holds_this_step = last.as_ref().is_some_and(|d| d.ends_with(checkpoint::dir_name(state.step)));
        if state.step > 0 && !holds_this_step {
            *last = Some(save(state)?);
        }
        Ok(last.clone().unwrap_or_default())
    };
    let mut paused_ms = 0.0;
    if let Decision::Pause { reason } = &decision {
        let dir = checkpoint(last_checkpoint)?;
        let saved =
            if state.step > 0 { format!("checkpoint {} written; ", dir.display()) } else { String::new() };
        say(format!("step {step}: paused: {reason} ({saved}waiting, reading the power source)"));
        let t0 = Instant::now();
        decision = power.wait_while_paused(step, |r, waited| {
            bar.set_message(format!(
                "paused {:.0} s: battery {}, charging {}",
                waited.as_secs_f64(),
                r.percent.map_or("?".into(), |p| format!("{p:.0} %")),
                r.charging.map_or("?".into(), |c| c.to_string())
            ))
        });
        paused_ms = t0.elapsed().as_secs_f64() * 1e3;
        say(format!("step {step}: resumed after {:.1} s", paused_ms / 1e3));
    }
    if let Some(line) = power.take_notice() {
        say(format!("step {step}: {line}"));
    }
    if let Decision::Stop { reason } = decision {
        bar.abandon();
        let dir = checkpoint(last_checkpoint)?;
        return Err(Error::PowerStop { step, reason, checkpoint: dir });
    }
    Ok(paused_ms)
}

/// The metrics JSONL file: one line per optimizer step and per evaluation. It holds the history
/// of the run whose checkpoints are in OUT: a fresh run starts it empty; a resumed run drops the
/// lines after its checkpoint's step (they were written before an interruption and are written
/// again) and a last line cut short by a kill. Each line goes out in one write.
struct Metrics {
    path: PathBuf,
    file: std::fs::File,
}

impl Metrics {
    fn open(path: &Path, resumed_at: Option<usize>) -> Result<Metrics> {
        let err = |e| Error::Io { path: path.to_path_buf(), cause: e };
        let file = match resumed_at {
            None => std::fs::File::create(path).map_err(err)?,
            Some(step) => {
                // Only a regular file is rewritten (not, say, --metrics-out /dev/stdout).
                if path.is_file() {
                    let text = String::from_utf8_lossy(&std::fs::read(path).map_err(err)?).into_owned();
                    let kept: String = text
                        .split_inclusive('\n')
                        .filter(|line| {
                            line.ends_with('\n')
                                && serde_json::from_str::<serde_json::Value>(line)
                                    .ok()
                                    .and_then(|v| v.get("step")?.as_u64())
                                    .is_some_and(|s| s <= step as u64)
                        })
                        .collect();
                    if kept.len() != text.len() {
                        checkpoint::write_atomic(path, kept.as_bytes())?;
                    }
                }
                std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(err)?
            }
        };
        Ok(Metrics { path: path.to_path_buf(), file })
    }

    fn log(&mut self, value: serde_json::Value) -> Result<()> {
        let line = format!("{value}\n");
        self.file.write_all(line.as_bytes()).map_err(|e| Error::Io { path: self.path.clone(), cause: e })
    }
}

/// Mean loss over up to `max_batches` batches of `tokens` in order (forward only).
pub fn evaluate(
    graph: &crate::graph::Graph,
    loss: crate::graph::Var,
    store: &ParamStore,
    tokens: &Tokens,
    batch: usize,
    seq: usize,
    max_batches: usize,
) -> Result<f32> {
    let mut batches = Batches::new(tokens, batch, seq, false, 0, Path::new("eval data"))?;
    let n = batches.per_epoch().min(max_batches.max(1));
    let mut sum = 0.0;
    for _ in 0..n {
        let (ids, targets) = batches.next(tokens);
        sum += graph.forward(store, &Model::feed(&ids, &targets, batch, seq), &[])?.loss(loss)?;
    }
    Ok(sum / n as f32)
}
