//! Parity on the REAL pretrained weights (issue 9 point 4): Gemma 3 270M (GGUF Q4_K_M) and
//! SmolLM2-135M-Instruct (GGUF Q4_1), as `tools/fetch_assets.sh` fetches them, against what
//! transformers computes from the same files (`tools/make_real_fixtures.py`: the `gguf` package
//! dequantizes every block to f32 as ggml defines it, torch runs in f32; fixtures in
//! `tests/fixtures/real-*/`, what each holds is listed at the top of the script).
//!
//! On one text (Antony's funeral speech, public domain, `text.txt`), in windows of 1 x 128
//! tokens:
//! - the ids: pockettune's tokenizer built from the GGUF metadata and its data windows
//!   (`Tokens::load`, `Batches`, BOS first for Gemma only) give transformers' ids;
//! - the base model, frozen, on the GPU with its matrices kept quantized (`BaseDtype::Native`,
//!   mobile limits) and on the CPU path (dequantized to f32, f64 accumulation): window 0's loss,
//!   the full logits at two positions, and at every position the log-sum-exp over the
//!   vocabulary, the target's log-probability, the sum of squared logits and the 16 largest
//!   logits with their ids;
//! - 5 LoRA steps from the same PEFT adapter (r 8, alpha 16, every projection, B non-zero),
//!   batch 1 x 128 on windows 0..4, as `train --method lora --adapter DIR` takes them (gradient
//!   clipped to global norm 1, AdamW lr 2e-4 constant, weight decay 0.01): the loss and the
//!   gradient norm of each step and window 0's loss after the last update.
//!
//! Tolerances. Each figure is also recorded with torch in float64 (same weights, same adapter),
//! so every run is held to the exact answer as well as to transformers' float32 one. float32
//! rounding alone, in a different order, moves transformers' own figures from float64's by
//! (Gemma 3 / SmolLM2): loss 1.8e-5 / 4.8e-6, per-position figures 7.8e-5 / 7.5e-5, LoRA losses
//! 4.3e-5 / 1.6e-5 and gradient norms 2.0e-4 / 1.2e-5 relative. pockettune's GPU path rounds as
//! much in its own order, so against float32 the two errors add up; the tolerances are about
//! 2 to 5 times the largest error measured (lavapipe, 2 cores):
//!
//! | figure (window 0 / LoRA)               | tolerance | measured, GPU vs float32 | CPU path vs float64 (its tolerance) |
//! |----------------------------------------|-----------|--------------------------|-------------------------------------|
//! | base loss, absolute                    | 1e-4      | 1.4e-5 / 2.6e-6          | 1.2e-6 / 9.5e-7 (1e-5)              |
//! | per position: log-sum-exp, log-prob of the target, top-16 logits, absolute | 5e-4 | 1.5e-4 / 2.2e-4 | 4.2e-5 / 3.2e-5 (1e-4) |
//! | two full logit rows, max diff / max     | 2e-5      | 2.2e-6 / 5.0e-6          | -                                   |
//! | per-position sum of squared logits, relative | 1e-4 | 1.1e-5 / 2.9e-5         | -                                   |
//! | LoRA losses and the loss after, absolute | 2e-4    | 4.6e-5 / 3.2e-5          | 1.4e-6 / 4.8e-7 (1e-5)              |
//! | LoRA gradient norms, relative          | 1e-3      | 3.0e-4 / 4.8e-5          | 2.1e-5 / 9.0e-7 (1e-4)              |
//!
//! The GPU is held to float64 with the float32 tolerances (measured: loss 3.8e-6 / 2.2e-6, per
//! position 1.2e-4 / 1.4e-4, LoRA 1.1e-5 / 1.6e-5 and 1.1e-4 / 3.7e-5); the CPU path (f64
//! accumulation, f32 storage between kernels) to float64 with the tighter ones in brackets. Each
//! test first asserts that the fixture's own float32-float64 gap is at most half the tolerance
//! (else the figure is too ill-conditioned to check: at lr 1e-3 Gemma's LoRA steps were, see
//! tools/make_real_fixtures.py), and that the LoRA steps move window 0's loss by more than 100
//! tolerances (0.54 and 0.49). The model errors this tier is for move window 0's loss by far
//! more (measured with transformers): Gemma's norms with the stored +1 kept, 3.39 -> 19.6;
//! Gemma without BOS, 3.39 -> 4.65; SmolLM2's Q/K rows left in llama.cpp's order, 3.38 -> 4.98.
//!
//! Every test is `#[ignore]`d (slow tier, needs the real files): `bash tools/fetch_assets.sh`,
//! then `cargo test --release --test real_weights -- --ignored`. `POCKETTUNE_ASSETS` points at
//! another assets folder.

mod common;

use pockettune::data::{Batches, Tokenizer, Tokens};
use pockettune::gradcheck::rel_err;
use pockettune::graph::{Device, ParamStore};
use pockettune::kernels::optim::AdamW;
use pockettune::models::{LoadOptions, Model, SafetensorsFile};
use pockettune::weights::BaseDtype;
use serde_json::Value;
use std::path::PathBuf;
use std::time::Instant;

const GEMMA: (&str, &str) = ("gemma3-270m", "gemma-3-270m-Q4_K_M.gguf");
const SMOLLM2: (&str, &str) = ("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf");

/// The transformers side of one model: its fixture directory and files, and the GGUF file.
struct Fixture {
    name: &'static str,
    dir: PathBuf,
    gguf: PathBuf,
    file: SafetensorsFile,
    meta: Value,
    tokens: Vec<u32>,
    t: usize,
}

impl Fixture {
    fn load((name, gguf): (&'static str, &str)) -> Fixture {
        let dir =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(format!("real-{name}"));
        let assets = std::env::var_os("POCKETTUNE_ASSETS")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets"));
        let gguf = assets.join(name).join(gguf);
        assert!(gguf.is_file(), "{} is missing: fetch it with `bash tools/fetch_assets.sh`", gguf.display());
        let file = SafetensorsFile::open(&dir.join("expected.safetensors")).unwrap();
        let meta: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
        let tokens = file.get("tokens").unwrap().unwrap().1.iter().map(|&x| x as u32).collect();
        let t = meta["seq_len"].as_u64().unwrap() as usize;
        Fixture { name, dir, gguf, file, meta, tokens, t }
    }

    fn tensor(&self, name: &str) -> Vec<f32> {
        self.file.get(name).unwrap().unwrap_or_else(|| panic!("{}: the fixture has no {name}", self.name)).1
    }

    /// Window `w` as the script cut it: inputs tokens[w T .. w T + T], targets one further.
    fn window(&self, w: usize) -> (Vec<u32>, Vec<i32>) {
        let s = &self.tokens[w * self.t..w * self.t + self.t + 1];
        (s[..self.t].to_vec(), s[1..].iter().map(|&x| x as i32).collect())
    }

    /// The base model frozen, its matrices kept in their stored formats on the GPU (on the CPU
    /// path `add_packed` dequantizes them to f32).
    fn base(&self, dev: &Device) -> (Model, ParamStore) {
        let opts = LoadOptions { frozen: true, base_dtype: BaseDtype::Native, stream: false };
        Model::load_with(&self.gguf, dev, &opts).unwrap()
    }

    /// The fixture's windows through pockettune's own tokenizer and data path, as `train` reads
    /// `--data text.txt` (file order, batch 1).
    fn pockettune_batches(&self, n: usize) -> Vec<(Vec<u32>, Vec<i32>)> {
        let text = self.dir.join("text.txt");
        let tok = Tokenizer::for_model(&self.gguf, None).unwrap();
        let tokens = Tokens::load(&text, &tok).unwrap();
        assert_eq!(
            tokens.ids, self.tokens,
            "{}: pockettune's ids of text.txt differ from transformers'",
            self.name
        );
        let mut batches = Batches::new(&tokens, 1, self.t, false, 0, &text).unwrap();
        (0..n).map(|_| batches.next(&tokens)).collect()
    }
}

fn gpu() -> Device {
    let g = common::gpu().expect("the real-weights tier needs a GPU adapter (lavapipe will do)");
    Device::Gpu(g.clone())
}

/// Window 0's figures through the base model, per position where they have one: the loss, the
/// log-sum-exp over the vocabulary, the target's logit and the logits at the fixture's top-16
/// ids (float32's, for every run).
struct Window0 {
    loss: f64,
    logsumexp: Vec<f64>,
    target_logit: Vec<f64>,
    top: Vec<f64>,
}

impl Window0 {
    /// The fixture's (prefix "": transformers in float32) or its float64 run's ("f64.").
    fn of(fx: &Fixture, prefix: &str) -> Window0 {
        let t = |n: &str| fx.tensor(&format!("{prefix}{n}")).into_iter().map(f64::from).collect::<Vec<f64>>();
        Window0 {
            loss: t("loss")[0],
            logsumexp: t("logsumexp"),
            target_logit: t("target_logit"),
            top: t("top_logits"),
        }
    }

    /// |loss difference| and the largest |difference| of the per-position figures (the
    /// log-probability of the target, target_logit - logsumexp, counted as one).
    fn gaps(&self, other: &Window0) -> (f64, f64) {
        let max = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f64, f64::max);
        let logprob =
            |w: &Window0| w.target_logit.iter().zip(&w.logsumexp).map(|(t, l)| t - l).collect::<Vec<_>>();
        let per_position = max(&self.logsumexp, &other.logsumexp)
            .max(max(&logprob(self), &logprob(other)))
            .max(max(&self.top, &other.top));
        ((self.loss - other.loss).abs(), per_position)
    }
}

/// Window 0 through the frozen base model on `dev`: its figures, and against transformers'
/// float32 logits the relative error of the two full rows (largest difference over the largest
/// |logit|) and the largest relative error of the per-position sums of squares.
fn window0(fx: &Fixture, dev: &Device) -> (Window0, f64, f64) {
    let start = Instant::now();
    let (model, store) = fx.base(dev);
    let load_s = start.elapsed().as_secs_f64();
    let (ids, targets) = fx.window(0);
    let want_ids: Vec<u32> = fx.tensor("input_ids").iter().map(|&x| x as u32).collect();
    assert_eq!(ids, want_ids, "{}: window 0 is the fixture's input_ids", fx.name);
    let (graph, vars) = model.graph(&store, 1, fx.t).unwrap();
    let run = graph.forward(&store, &Model::feed(&ids, &targets, 1, fx.t), vars.logits.as_slice()).unwrap();
    let loss = run.loss(vars.loss).unwrap() as f64;
    let logits = run.read(vars.logits.unwrap()).unwrap();
    let v = model.vocab_size();
    assert_eq!(logits.len(), fx.t * v);
    let row = |p: usize| &logits[p * v..(p + 1) * v];

    let positions: Vec<usize> = fx.tensor("logit_positions").iter().map(|&p| p as usize).collect();
    let rows: Vec<f32> = positions.iter().flat_map(|&p| row(p).iter().copied()).collect();
    let rows_err = rel_err(&rows, &fx.tensor("logit_rows"));
    let (sumsq, top_ids) = (fx.tensor("sumsq"), fx.tensor("top_ids"));
    let k = top_ids.len() / fx.t;
    let mut ours = Window0 { loss, logsumexp: vec![], target_logit: vec![], top: vec![] };
    let mut sumsq_err = 0f64;
    for p in 0..fx.t {
        let r = row(p);
        let max = r.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
        ours.logsumexp.push(max + r.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln());
        ours.target_logit.push(r[targets[p] as usize] as f64);
        ours.top.extend(top_ids[p * k..(p + 1) * k].iter().map(|&id| r[id as usize] as f64));
        let ss: f64 = r.iter().map(|&x| x as f64 * x as f64).sum();
        sumsq_err = sumsq_err.max(((ss - sumsq[p] as f64) / sumsq[p] as f64).abs());
    }
    eprintln!(
        "{} on {}: loss {loss} (transformers float32 {}, float64 {}); load {load_s:.1} s, forward {:.1} s",
        fx.name,
        dev.name(),
        fx.tensor("loss")[0],
        fx.tensor("f64.loss")[0],
        start.elapsed().as_secs_f64() - load_s
    );
    (ours, rows_err, sumsq_err)
}

const LOSS_TOL: f64 = 1e-4;
const POSITION_TOL: f64 = 5e-4;
const ROWS_TOL: f64 = 2e-5;
const SUMSQ_TOL: f64 = 1e-4;
const CPU_LOSS_TOL: f64 = 1e-5;
const CPU_POSITION_TOL: f64 = 1e-4;

fn check_logits(fx: &Fixture, dev: &Device) {
    let (f32_run, f64_run) = (Window0::of(fx, ""), Window0::of(fx, "f64."));
    let (ours, rows, sumsq) = window0(fx, dev);
    let on = format!("{} on {}", fx.name, dev.name());
    let (loss, pos) = ours.gaps(&f32_run);
    let (loss64, pos64) = ours.gaps(&f64_run);
    let (loss_torch, pos_torch) = f32_run.gaps(&f64_run);
    eprintln!(
        "{on}: against transformers float32: loss {loss:.2e}, per position {pos:.2e}, full rows {rows:.2e} \
         rel, sums of squares {sumsq:.2e} rel; against float64: loss {loss64:.2e}, per position {pos64:.2e}; \
         transformers float32 against float64: loss {loss_torch:.2e}, per position {pos_torch:.2e}"
    );
    assert!(
        loss_torch <= LOSS_TOL / 2.0 && pos_torch <= POSITION_TOL / 2.0,
        "{}: the fixture's float32 and float64 runs differ by {loss_torch:e} (loss), {pos_torch:e} (per \
         position): too ill-conditioned for these tolerances",
        fx.name
    );
    assert!(loss <= LOSS_TOL, "{on}: loss {} vs transformers {}", ours.loss, f32_run.loss);
    assert!(pos <= POSITION_TOL, "{on}: per-position figures differ from transformers' by {pos:e}");
    assert!(rows <= ROWS_TOL, "{on}: full logit rows rel err {rows:e}");
    assert!(sumsq <= SUMSQ_TOL, "{on}: per-position sums of squared logits rel err {sumsq:e}");
    let (loss_tol, pos_tol) = match dev {
        Device::Cpu(_) => (CPU_LOSS_TOL, CPU_POSITION_TOL),
        Device::Gpu(_) => (LOSS_TOL, POSITION_TOL),
    };
    assert!(loss64 <= loss_tol, "{on}: loss {} vs float64 {}", ours.loss, f64_run.loss);
    assert!(pos64 <= pos_tol, "{on}: per-position figures differ from float64's by {pos64:e}");
}

/// What the LoRA steps give: each step's loss (before its update) and gradient norm (before
/// clipping), and window 0's loss after the last update.
#[derive(Debug)]
struct Trajectory {
    losses: Vec<f32>,
    norms: Vec<f32>,
    after: f32,
}

impl Trajectory {
    /// The fixture's (prefix "") or its float64 run's (prefix "f64.").
    fn of(fx: &Fixture, prefix: &str) -> Trajectory {
        let t = |n: &str| fx.tensor(&format!("{prefix}{n}"));
        Trajectory { losses: t("lora_losses"), norms: t("lora_grad_norms"), after: t("lora_loss_after")[0] }
    }

    /// The largest |difference| of the losses (the loss after included) and the largest
    /// relative difference of the gradient norms.
    fn gaps(&self, other: &Trajectory) -> (f64, f64) {
        assert_eq!(self.losses.len(), other.losses.len());
        let loss = self
            .losses
            .iter()
            .chain([&self.after])
            .zip(other.losses.iter().chain([&other.after]))
            .map(|(&a, &b)| (a as f64 - b as f64).abs())
            .fold(0f64, f64::max);
        let norm = self
            .norms
            .iter()
            .zip(&other.norms)
            .map(|(&a, &b)| ((a as f64 - b as f64) / b as f64).abs())
            .fold(0f64, f64::max);
        (loss, norm)
    }
}

/// The LoRA steps on `dev` from the fixture's PEFT adapter, as `train --method lora --adapter`
/// takes them: the batches from pockettune's own tokenizer and data windows, the base frozen
/// and kept quantized, gradients clipped (`ParamStore::clip_grad_norm`, which `train` also
/// calls), then `ParamStore::adamw_step` at the fixture's settings.
fn lora_steps(fx: &Fixture, dev: &Device) -> Trajectory {
    let start = Instant::now();
    let steps = fx.meta["steps"].as_u64().unwrap() as usize;
    let batches = fx.pockettune_batches(steps);
    for (w, b) in batches.iter().enumerate() {
        assert_eq!(b, &fx.window(w), "{}: batch {w} differs from the one PEFT trained on", fx.name);
    }
    let (model, mut store) = fx.base(dev);
    let opts = pockettune::lora::load(&fx.dir.join("adapter"), &model, &mut store).unwrap();
    let lora = &fx.meta["lora"];
    assert_eq!(opts.rank as u64, lora["r"].as_u64().unwrap());
    assert_eq!(opts.alpha as f64, lora["lora_alpha"].as_f64().unwrap());
    assert_eq!(opts.dropout, 0.0);
    assert_eq!(opts.targets.len(), 7, "{}: every projection adapted", fx.name);
    let a = &fx.meta["adamw"];
    let f = |v: &Value| v.as_f64().unwrap() as f32;
    let opt = AdamW {
        lr: f(&a["lr"]),
        beta1: f(&a["betas"][0]),
        beta2: f(&a["betas"][1]),
        eps: f(&a["eps"]),
        weight_decay: f(&a["weight_decay"]),
    };
    let max_norm = f(&fx.meta["max_grad_norm"]);
    let (graph, vars) = model.graph(&store, 1, fx.t).unwrap();
    let (mut losses, mut norms) = (Vec::new(), Vec::new());
    for (ids, targets) in &batches {
        store.zero_grads().unwrap();
        let mut run = graph.forward(&store, &Model::feed(ids, targets, 1, fx.t), &[]).unwrap();
        run.backward(&mut store, vars.loss, 1.0).unwrap();
        losses.push(run.loss(vars.loss).unwrap());
        let mut squares = 0f64;
        for (_, p) in store.iter() {
            if let Some(g) = &p.grad {
                squares += g.to_host(dev).unwrap().iter().map(|&x| x as f64 * x as f64).sum::<f64>();
            }
        }
        norms.push(squares.sqrt() as f32);
        store.clip_grad_norm(max_norm).unwrap();
        store.adamw_step(opt).unwrap();
    }
    let (ids, targets) = &batches[0];
    let run = graph.forward(&store, &Model::feed(ids, targets, 1, fx.t), &[]).unwrap();
    let ours = Trajectory { losses, norms, after: run.loss(vars.loss).unwrap() };
    eprintln!(
        "{} LoRA on {}: {ours:?}\n  PEFT float32 {:?}\n  PEFT float64 {:?}\n  {:.1} s",
        fx.name,
        dev.name(),
        Trajectory::of(fx, ""),
        Trajectory::of(fx, "f64."),
        start.elapsed().as_secs_f64()
    );
    ours
}

const LORA_LOSS_TOL: f64 = 2e-4;
const LORA_NORM_TOL: f64 = 1e-3;
const CPU_LORA_LOSS_TOL: f64 = 1e-5;
const CPU_LORA_NORM_TOL: f64 = 1e-4;

fn check_lora(fx: &Fixture, dev: &Device) {
    let (f32_run, f64_run) = (Trajectory::of(fx, ""), Trajectory::of(fx, "f64."));
    let (loss_torch, norm_torch) = f32_run.gaps(&f64_run);
    assert!(
        loss_torch <= LORA_LOSS_TOL / 2.0 && norm_torch <= LORA_NORM_TOL / 2.0,
        "{}: the fixture's float32 and float64 LoRA runs differ by {loss_torch:e} (losses), {norm_torch:e} \
         (gradient norms): too ill-conditioned for these tolerances",
        fx.name
    );
    assert!(
        (f32_run.losses[0] - f32_run.after) as f64 > 100.0 * LORA_LOSS_TOL,
        "{}: the steps barely move window 0's loss ({} -> {}): they would check nothing",
        fx.name,
        f32_run.losses[0],
        f32_run.after
    );
    let ours = lora_steps(fx, dev);
    let on = format!("{} LoRA on {}", fx.name, dev.name());
    let (loss, norm) = ours.gaps(&f32_run);
    let (loss64, norm64) = ours.gaps(&f64_run);
    eprintln!(
        "{on}: against PEFT float32: losses {loss:.2e}, grad norms {norm:.2e} rel; against float64: \
         {loss64:.2e}, {norm64:.2e}; PEFT float32 against float64: {loss_torch:.2e}, {norm_torch:.2e}"
    );
    assert!(loss <= LORA_LOSS_TOL, "{on}: losses {:?} vs PEFT {:?}", ours.losses, f32_run.losses);
    assert!(norm <= LORA_NORM_TOL, "{on}: gradient norms {:?} vs PEFT {:?}", ours.norms, f32_run.norms);
    let (loss_tol, norm_tol) = match dev {
        Device::Cpu(_) => (CPU_LORA_LOSS_TOL, CPU_LORA_NORM_TOL),
        Device::Gpu(_) => (LORA_LOSS_TOL, LORA_NORM_TOL),
    };
    assert!(loss64 <= loss_tol, "{on}: losses {:?} vs float64 {:?}", ours.losses, f64_run.losses);
    assert!(norm64 <= norm_tol, "{on}: gradient norms {:?} vs float64 {:?}", ours.norms, f64_run.norms);
}

#[test]
#[ignore = "needs the real GGUF files: bash tools/fetch_assets.sh"]
fn gemma3_270m_tokens_and_windows_match_transformers() {
    let fx = Fixture::load(GEMMA);
    assert_eq!(fx.tokens[0], 2, "Gemma's documents start with BOS");
    fx.pockettune_batches(fx.meta["steps"].as_u64().unwrap() as usize);
}

#[test]
#[ignore = "needs the real GGUF files: bash tools/fetch_assets.sh"]
fn smollm2_135m_tokens_and_windows_match_transformers() {
    let fx = Fixture::load(SMOLLM2);
    assert_eq!(fx.meta["bos_prefix"], serde_json::json!([]), "SmolLM2's tokenizer adds no BOS");
    fx.pockettune_batches(fx.meta["steps"].as_u64().unwrap() as usize);
}

#[test]
#[ignore = "needs the real GGUF files: bash tools/fetch_assets.sh"]
fn gemma3_270m_logits_on_the_gpu_quantized_match_transformers() {
    check_logits(&Fixture::load(GEMMA), &gpu());
}

#[test]
#[ignore = "needs the real GGUF files: bash tools/fetch_assets.sh"]
fn gemma3_270m_logits_on_the_cpu_path_match_transformers() {
    check_logits(&Fixture::load(GEMMA), &Device::CPU_REF);
}

#[test]
#[ignore = "needs the real GGUF files: bash tools/fetch_assets.sh"]
fn smollm2_135m_logits_on_the_gpu_quantized_match_transformers() {
    check_logits(&Fixture::load(SMOLLM2), &gpu());
}

#[test]
#[ignore = "needs the real GGUF files: bash tools/fetch_assets.sh"]
fn smollm2_135m_logits_on_the_cpu_path_match_transformers() {
    check_logits(&Fixture::load(SMOLLM2), &Device::CPU_REF);
}

#[test]
#[ignore = "needs the real GGUF files: bash tools/fetch_assets.sh"]
fn gemma3_270m_lora_steps_on_the_gpu_quantized_match_peft() {
    check_lora(&Fixture::load(GEMMA), &gpu());
}

#[test]
#[ignore = "needs the real GGUF files: bash tools/fetch_assets.sh"]
fn smollm2_135m_lora_steps_on_the_gpu_quantized_match_peft() {
    check_lora(&Fixture::load(SMOLLM2), &gpu());
}

#[test]
#[ignore = "needs the real GGUF files: bash tools/fetch_assets.sh"]
fn gemma3_270m_lora_steps_on_the_cpu_path_match_peft() {
    check_lora(&Fixture::load(GEMMA), &Device::CPU_REF);
}

#[test]
#[ignore = "needs the real GGUF files: bash tools/fetch_assets.sh"]
fn smollm2_135m_lora_steps_on_the_cpu_path_match_peft() {
    check_lora(&Fixture::load(SMOLLM2), &Device::CPU_REF);
}
