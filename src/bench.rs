//! Benchmarks that print GPU figures next to a baseline measured in the same run (these
//! machines are noisy; ratios travel better than absolute numbers).
//!
//! `kernels`: the matrix products of one GPT-2 124M training step at M = B*T = 512 rows, each
//! forward product `Y = X W` with its two backward products `dX = dY W^T`, `dW = X^T dY`, on
//! the GPU and on the fast CPU path (`crate::cpu::matmul`: the `gemm` crate, threaded, the
//! products `--device cpu` runs).
//!
//! `step`: one training step of a preset's shape (or a checkpoint) with the memory options of
//! `crate::memory`, timed, with its memory report (`crate::memory::report`).

use crate::error::Result;
use crate::gpu::{Gpu, Tensor};
use crate::graph::{ParamStore, PendingStep};
use crate::kernels::matmul;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::time::{Duration, Instant};

/// One matrix product (M x K) . (K x N), operands stored transposed where flagged.
#[derive(Clone, Debug, Serialize)]
pub struct MatmulCase {
    pub layer: &'static str,
    pub product: &'static str,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct MatmulResult {
    #[serde(flatten)]
    pub case: MatmulCase,
    pub gpu_gflops: f64,
    pub cpu_gflops: f64,
    /// GPU / CPU
    pub ratio: f64,
}

/// GPT-2 124M linear layers: (name, K, N). The LM head stores its weight (vocab, C): transposed.
const GPT2_LAYERS: &[(&str, usize, usize, bool)] = &[
    ("attn.c_attn 768x2304", 768, 2304, false),
    ("attn.c_proj 768x768", 768, 768, false),
    ("mlp.c_fc 768x3072", 768, 3072, false),
    ("mlp.c_proj 3072x768", 3072, 768, false),
    ("lm_head 768x50257", 768, 50257, true),
];

/// LoRA's matrices (rank 8) on GPT-2's MLP, stored as PEFT stores them ((r, in) and (out, r):
/// transposed): products with 8 columns or 8 rows, or a sum over 8, which the subgroup kernel's
/// narrow tiles are for. Measured only when `bench kernels --layer` names them (`lora`), so the
/// GPT-2 layers' overall figure keeps its meaning.
const LORA_LAYERS: &[(&str, usize, usize, bool)] =
    &[("lora_A mlp.c_fc 768x8", 768, 8, true), ("lora_B mlp.c_fc 8x3072", 8, 3072, true)];

/// The three products of each GPT-2 layer at `m` rows.
pub fn gpt2_cases(m: usize) -> Vec<MatmulCase> {
    cases_of(GPT2_LAYERS, m)
}

/// The three products of each LoRA matrix of [`LORA_LAYERS`] at `m` rows.
pub fn lora_cases(m: usize) -> Vec<MatmulCase> {
    cases_of(LORA_LAYERS, m)
}

fn cases_of(layers: &[(&'static str, usize, usize, bool)], m: usize) -> Vec<MatmulCase> {
    let mut cases = Vec::new();
    for &(layer, k, n, w_trans) in layers {
        // forward  Y (m,n) = X (m,k) . W (k,n)          [W stored (n,k) when w_trans]
        cases.push(MatmulCase { layer, product: "forward X.W", m, n, k, trans_a: false, trans_b: w_trans });
        // backward dX (m,k) = dY (m,n) . W^T (n,k)
        cases.push(MatmulCase {
            layer,
            product: "dX = dY.W^T",
            m,
            n: k,
            k: n,
            trans_a: false,
            trans_b: !w_trans,
        });
        // backward dW (k,n) = X^T (k,m) . dY (m,n)     [dW^T = dY^T X when w_trans]
        if w_trans {
            cases.push(MatmulCase {
                layer,
                product: "dW = dY^T.X",
                m: n,
                n: k,
                k: m,
                trans_a: true,
                trans_b: false,
            });
        } else {
            cases.push(MatmulCase {
                layer,
                product: "dW = X^T.dY",
                m: k,
                n,
                k: m,
                trans_a: true,
                trans_b: false,
            });
        }
    }
    cases
}

/// Run `f` at least once and until `budget` has passed; seconds per run.
fn time_it(budget: Duration, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up: pipeline compilation, first-touch allocation
    let start = Instant::now();
    let mut runs = 0u32;
    while runs == 0 || start.elapsed() < budget {
        f()?;
        runs += 1;
    }
    Ok(start.elapsed().as_secs_f64() / runs as f64)
}

/// GFLOP/s of each case on the GPU and on the CPU path; `budget` of wall time per measurement.
pub fn matmul_bench(
    gpu: &Gpu,
    cases: &[MatmulCase],
    budget: Duration,
    mut progress: impl FnMut(&MatmulResult),
) -> Result<Vec<MatmulResult>> {
    let mut rng = StdRng::seed_from_u64(7);
    let mut results = Vec::new();
    for case in cases {
        let MatmulCase { m, n, k, trans_a, trans_b, .. } = *case;
        let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let sa = if trans_a { [k, m] } else { [m, k] };
        let sb = if trans_b { [n, k] } else { [k, n] };
        let (ga, gb) = (Tensor::from_host(gpu, &a, &sa, "A")?, Tensor::from_host(gpu, &b, &sb, "B")?);
        let gc = Tensor::empty(gpu, &[m, n], "C")?;
        let flops = 2.0 * m as f64 * n as f64 * k as f64;
        let gpu_s = time_it(budget, || {
            matmul::matmul(gpu, &gc, &ga, &gb, None, trans_a, trans_b, false)?;
            gpu.sync()
        })?;
        let mut c = vec![0f32; m * n];
        let cpu_s = time_it(budget, || {
            let d = kernels_ref::MatmulDims { batch: 1, m, n, k, trans_a, trans_b };
            crate::cpu::matmul(&mut c, &a, &b, d, false);
            Ok(())
        })?;
        let r = MatmulResult {
            case: case.clone(),
            gpu_gflops: flops / gpu_s / 1e9,
            cpu_gflops: flops / cpu_s / 1e9,
            ratio: cpu_s / gpu_s,
        };
        progress(&r);
        results.push(r);
    }
    Ok(results)
}

/// Overall GFLOP/s of a set of results: total flops over total seconds.
pub fn overall(results: &[MatmulResult], gflops: impl Fn(&MatmulResult) -> f64) -> f64 {
    let flops = |r: &MatmulResult| 2.0 * (r.case.m * r.case.n * r.case.k) as f64;
    let total: f64 = results.iter().map(flops).sum();
    let secs: f64 = results.iter().map(|r| flops(r) / (gflops(r) * 1e9)).sum();
    total / secs / 1e9
}

/// One full fine-tuning step (forward, backward, AdamW) of a randomly initialised GPT-2.
#[derive(Clone, Debug, Serialize)]
pub struct StepResult {
    pub device: String,
    pub ms_step: f64,
    pub tokens_per_s: f64,
    /// peak resident set size of the process after this device's run (lavapipe's "GPU"
    /// memory lives in the process too)
    pub peak_rss_bytes: Option<u64>,
    /// bytes held in GPU buffers at the peak, live or pooled for reuse (None on the CPU path)
    pub peak_gpu_bytes: Option<u64>,
    /// bytes in GPU buffers in use by a tensor at the peak of a step (None on the CPU path)
    pub peak_live_gpu_bytes: Option<u64>,
    /// bytes of the weights by storage type (`F32`, `Q4_K`, ...), as held on the device
    pub weight_bytes: Vec<(String, u64)>,
    /// peak RSS by kind over this device's run (loading included) and the GPU pool's bytes,
    /// live peaks over the timed steps only
    pub memory: crate::memory::report::MemoryReport,
    /// the smallest --memory-budget this step runs under (planned; None on the CPU path)
    pub smallest_budget: Option<u64>,
    /// the host's side of one timed step, averaged over the timed steps (None on the CPU path)
    pub per_step: Option<PerStep>,
    /// with `profile`: one more step, each op timed alone (`graph::profile`)
    pub profile: Option<StepProfile>,
}

/// One step timed op by op (`bench step --profile`).
#[derive(Clone, Debug, Serialize)]
pub struct StepProfile {
    /// the profiled step's wall time (longer than a plain step's: the device idles between ops)
    pub ms: f64,
    /// the executor's steps, slowest first; the rest of `ms` is outside them (clipping, AdamW,
    /// the step's status)
    pub rows: Vec<crate::graph::profile::ProfileRow>,
}

/// Dispatches, submissions and host time of one step: a GPU step is fast when it is few
/// submissions and little waiting (see `crate::gpu::GpuStats`).
#[derive(Clone, Debug, Serialize)]
pub struct PerStep {
    pub dispatches: f64,
    /// bind groups created (the rest were reused)
    pub bind_groups: f64,
    pub submissions: f64,
    /// blocking calls (polls that wait, read-backs, error-scope pops)
    pub waits: f64,
    /// milliseconds blocked in those calls
    pub host_wait_ms: f64,
    /// milliseconds spent recording dispatches and encoding submissions
    pub record_ms: f64,
    /// the part of `record_ms` inside the queue's submit call (a driver that blocks there
    /// until earlier work is done shows it here)
    pub submit_ms: f64,
}

impl PerStep {
    /// `stats` over `steps` steps.
    pub fn new(stats: &crate::gpu::GpuStats, steps: usize) -> PerStep {
        let n = steps.max(1) as f64;
        PerStep {
            dispatches: stats.dispatches as f64 / n,
            bind_groups: stats.bind_groups as f64 / n,
            submissions: stats.submissions as f64 / n,
            waits: stats.waits as f64 / n,
            host_wait_ms: stats.wait_ns as f64 / 1e6 / n,
            record_ms: stats.record_ns as f64 / 1e6 / n,
            submit_ms: stats.submit_ns as f64 / 1e6 / n,
        }
    }
}

/// The model a step benchmark trains: a preset's shape with random weights, or a checkpoint
/// (a Hugging Face directory or GGUF file) with its base stored as `base`.
#[derive(Clone, Debug)]
pub enum StepModel {
    Preset(String),
    /// A preset's shape written once as a quantized GGUF (`crate::models::write_random_gguf`)
    /// and loaded as a frozen base kept in its stored format (LoRA only).
    PresetGguf(String, crate::models::PresetQuant),
    File(std::path::PathBuf, crate::weights::BaseDtype),
}

impl StepModel {
    /// Where a quantized preset's GGUF is written (once) and read from.
    pub fn preset_gguf_path(name: &str, quant: crate::models::PresetQuant) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("pockettune-preset-{name}-{}.gguf", quant.name()))
    }
}

/// Time `steps` training steps (after one warm-up step) of a random model of `preset` (see
/// `models::preset_config`) at batch `b`, sequence `t`, fully fine-tuned or with LoRA (rank 8,
/// alpha 32, dropout 0.1 on every projection), the graph built with the options of `memory`.
#[allow(clippy::too_many_arguments)]
pub fn step_bench(
    dev: &crate::graph::Device,
    what: &StepModel,
    lora: bool,
    b: usize,
    t: usize,
    steps: usize,
    memory: &crate::memory::MemoryFlags,
    profile: bool,
) -> Result<StepResult> {
    use crate::graph::Device;
    use crate::kernels::optim::AdamW;
    use crate::memory::report::{MemoryReport, RssSampler};
    use crate::models::Model;
    crate::memory::validate(memory)?;
    crate::memory::apply_budget(dev, memory.memory_budget);
    let rss = RssSampler::start();
    let stream = memory.memory_budget.is_some();
    let (model, mut store) = match what {
        // streamed weights come from a file: the preset's random weights are written once
        StepModel::Preset(name) if stream && lora => {
            let dir = std::env::temp_dir().join(format!("pockettune-preset-{name}"));
            if !dir.join("model.safetensors").exists() {
                eprintln!(
                    "writing {name}'s random weights to {} (once) to stream them from disk",
                    dir.display()
                );
                crate::models::write_random(&crate::models::preset_config(name)?, &dir, 1)?;
            }
            let load = crate::models::LoadOptions { frozen: true, stream, ..Default::default() };
            Model::load_with(&dir, dev, &load)?
        }
        StepModel::Preset(name) => Model::random(crate::models::preset_config(name)?, dev, 1)?,
        StepModel::PresetGguf(name, quant) => {
            if !lora {
                return Err(crate::Error::InvalidArgument {
                    name: "--preset-quant".into(),
                    detail: "a quantized base is frozen: use it with --method lora".into(),
                });
            }
            let path = StepModel::preset_gguf_path(name, *quant);
            if !path.exists() {
                eprintln!(
                    "writing {name}'s random weights as {} to {} (once; run again to measure without \
                     the writing)",
                    quant.name(),
                    path.display()
                );
                crate::models::write_random_gguf(&crate::models::preset_config(name)?, &path, 1, *quant)?;
            }
            let base = crate::weights::BaseDtype::Native;
            let load = crate::models::LoadOptions { frozen: true, base_dtype: base, stream };
            Model::load_with(&path, dev, &load)?
        }
        StepModel::File(path, base) => {
            let load = crate::models::LoadOptions { frozen: lora, base_dtype: *base, stream };
            Model::load_with(path, dev, &load)?
        }
    };
    if lora {
        let opts = crate::lora::LoraOptions {
            rank: 8,
            alpha: 32.0,
            dropout: 0.1,
            targets: crate::lora::default_targets(&model),
        };
        crate::lora::apply(&model, &mut store, &opts, 1)?;
    }
    // --optimizer-offload disk: the moments' file goes to the temporary directory
    let moments_file = std::env::temp_dir().join(format!("pockettune-bench-{}.moments", std::process::id()));
    store.set_optimizer_offload(memory.optimizer_offload, &moments_file)?;
    let (graph, vars) = model.graph_with(&store, b, t, memory.graph_options())?;
    let mut rng = StdRng::seed_from_u64(3);
    let vocab = model.vocab_size() as u32;
    let ids: Vec<u32> = (0..b * t).map(|_| rng.random_range(0..vocab)).collect();
    let targets: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    let mut feed = Model::feed(&ids, &targets, b, t);
    feed.dropout_seed = Some(1);
    let smallest_budget =
        crate::memory::smallest_budget(dev, &graph, vars.loss, &mut store, &feed, memory.optimizer_offload)?;
    crate::memory::check_budget(memory.memory_budget, smallest_budget, b, t, memory)?;
    let opt = AdamW { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
    // As the training loop runs a step: the previous step's outcome is read after this step's
    // forward and backward passes are recorded (one step behind), then this step's update.
    let one = |store: &mut ParamStore, behind: Option<PendingStep>| -> Result<PendingStep> {
        let mut step = store.begin_step()?;
        let mut run = graph.forward(store, &feed, &[])?;
        run.backward(store, vars.loss, 1.0)?;
        run.add_loss(vars.loss, &mut step)?;
        drop(run);
        if let Some(behind) = behind {
            store.outcome(behind)?;
        }
        store.update(&mut step, 1.0, opt)?;
        Ok(step)
    };
    let warm = one(&mut store, None)?;
    store.outcome(warm)?; // the timed steps start on an idle GPU
    if let Device::Gpu(g) = dev {
        g.reset_live_peak(); // the timed steps' peaks, not the model's loading
    }
    let stats = |dev: &Device| match dev {
        Device::Gpu(g) => Some(g.stats()),
        Device::Cpu(_) => None,
    };
    let before = stats(dev);
    let start = Instant::now();
    let mut behind = None;
    for _ in 0..steps.max(1) {
        behind = Some(one(&mut store, behind)?);
    }
    if let Some(last) = behind {
        store.outcome(last)?; // the last step is timed to its end
    }
    let secs = start.elapsed().as_secs_f64() / steps.max(1) as f64;
    let per_step = stats(dev).zip(before).map(|(after, before)| PerStep::new(&after.since(&before), steps));
    let profile = if profile {
        let start = Instant::now();
        let (done, rows) = crate::graph::profile::profile(|| -> Result<()> {
            let step = one(&mut store, None)?;
            store.outcome(step).map(|_| ())
        });
        done?;
        Some(StepProfile { ms: start.elapsed().as_secs_f64() * 1e3, rows })
    } else {
        None
    };
    let report = MemoryReport::for_device(&rss, dev);
    let weight_bytes = store.value_bytes().into_iter().map(|(ty, n)| (ty.name().to_string(), n)).collect();
    if memory.optimizer_offload == crate::memory::OptimizerOffload::Disk {
        drop(store); // unmaps the moments' file
        let _ = std::fs::remove_file(&moments_file);
    }
    Ok(StepResult {
        device: dev.name(),
        ms_step: secs * 1e3,
        tokens_per_s: (b * t) as f64 / secs,
        peak_rss_bytes: crate::train::rss().1,
        peak_gpu_bytes: match dev {
            Device::Gpu(g) => Some(g.bytes_allocated().1),
            Device::Cpu(_) => None,
        },
        peak_live_gpu_bytes: match dev {
            Device::Gpu(g) => Some(g.bytes_live().1),
            Device::Cpu(_) => None,
        },
        weight_bytes,
        memory: report,
        smallest_budget,
        per_step,
        profile,
    })
}
