//! Memory: the options that trade compute or host memory for device memory, and (in
//! `report`) what a step holds. Every option here is an exact rewrite of the step: with it on,
//! the losses equal those with it off up to floating-point reassociation.
//!
//! - `--fused-loss`: the LM head and the cross-entropy walk the vocabulary in chunks, so the
//!   (rows x vocabulary) logits and their gradient never exist whole (Cut Cross-Entropy's idea).
//! - `--flash-attention`: attention that never stores the (B, H, T, T) probabilities and skips
//!   blocks the causal or sliding-window mask hides (FlashAttention's idea).
//! - `--checkpoint-activations`: each layer keeps its input only and is recomputed in the
//!   backward pass.
//! - `--memory-budget SIZE`: the GPU bytes the engine may hold.
//! - `--optimizer-offload host|disk`: the AdamW moments live off the GPU.
//!
//! One option here is not exact: `--activations f16|bf16` (the default under `--precision
//! mixed`) keeps the activations the backward pass reads in 16 bits, so its gradients see
//! them rounded (`kernels::half`).

pub mod offload;
pub mod report;

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// The options the graph executor reads (all off: the plain step).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphOptions {
    pub fused_loss: bool,
    pub flash_attention: bool,
    pub checkpoint_activations: bool,
    #[serde(default)]
    pub activations: ActivationStore,
}

/// How the activations that the backward pass reads are held between the two passes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ActivationStore {
    /// f16 on a GPU under `--precision mixed`, f32 otherwise.
    #[default]
    Auto,
    /// As computed.
    F32,
    /// IEEE half precision (11 significant bits; beyond +-65504 saturates).
    F16,
    /// bfloat16 (8 significant bits, f32's range: for activations that grow large).
    Bf16,
}

impl ActivationStore {
    /// The 16-bit format the activations are held in on `dev`, if any (a CPU path holds them in
    /// host memory).
    pub fn format(self, dev: &crate::graph::Device) -> Option<crate::kernels::half::HalfFormat> {
        use crate::kernels::half::HalfFormat;
        match (self, dev) {
            (ActivationStore::Auto, crate::graph::Device::Gpu(g)) => {
                (g.precision() == crate::gpu::Precision::Mixed).then_some(HalfFormat::F16)
            }
            (ActivationStore::Auto | ActivationStore::F32, _) => None,
            (ActivationStore::F16, _) => Some(HalfFormat::F16),
            (ActivationStore::Bf16, _) => Some(HalfFormat::Bf16),
        }
    }
}

/// Where the AdamW moments live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerOffload {
    /// On the GPU, next to the weights (the default).
    #[default]
    None,
    /// In host memory; the update runs on the CPU threads.
    Host,
    /// In a memory-mapped file in the output directory; the update runs on the CPU threads.
    Disk,
}

/// The memory flags that `train`, `eval`, `generate` and `bench step` share.
#[derive(clap::Args, Clone, Debug, Default, Serialize, Deserialize)]
pub struct MemoryFlags {
    /// GPU bytes the engine may hold (e.g. 800M, 1.5G, 2GiB; plain numbers are bytes). Weights
    /// are then uploaded just before their layer runs: frozen ones (LoRA's base, eval, generate)
    /// from the memory-mapped checkpoint; in full fine-tuning, trained ones from host memory,
    /// with their gradients gathered and the AdamW update done on the host. A budget below what
    /// a step needs is refused before training with the smallest one that works.
    #[arg(long, value_parser = parse_size)]
    #[serde(default)]
    pub memory_budget: Option<u64>,
    /// Keep the AdamW moments off the GPU: in host memory, or in a memory-mapped file.
    #[arg(long, value_enum, default_value_t = OptimizerOffload::None)]
    #[serde(default)]
    pub optimizer_offload: OptimizerOffload,
    /// Keep each layer's input only and recompute the layer during the backward pass.
    #[arg(long)]
    #[serde(default)]
    pub checkpoint_activations: bool,
    /// Fuse the LM head with the cross-entropy: the logits never exist whole.
    #[arg(long)]
    #[serde(default)]
    pub fused_loss: bool,
    /// Flash-style attention: no (B, H, T, T) probabilities are stored.
    #[arg(long)]
    #[serde(default)]
    pub flash_attention: bool,
    /// How the activations the backward pass reads are kept between the passes: in 16 bits
    /// (f16, or bf16 for models whose activations pass 65,504) they take half the memory and
    /// the gradients see them rounded. `auto`: f16 on a GPU under --precision mixed, else f32.
    #[arg(long, value_enum, default_value_t = ActivationStore::Auto)]
    #[serde(default)]
    pub activations: ActivationStore,
}

impl MemoryFlags {
    pub fn graph_options(&self) -> GraphOptions {
        GraphOptions {
            fused_loss: self.fused_loss,
            flash_attention: self.flash_attention,
            checkpoint_activations: self.checkpoint_activations,
            activations: self.activations,
        }
    }
}

/// A size in bytes: `1234`, `800K`, `800M`, `1.5G`, `2GiB`, `512MB` (powers of 1024).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let x: f64 = num.parse().map_err(|_| format!("{s:?} is not a size (e.g. 800M, 1.5G, 2GiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("{s:?}: unknown unit {other:?} (use K, M, G or T)")),
    };
    let bytes = x * mult as f64;
    if !bytes.is_finite() || bytes < 1.0 {
        return Err(format!("{s:?} is not a positive size"));
    }
    Ok(bytes as u64)
}

/// `bytes` as MiB with one decimal, for messages.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

pub(crate) fn invalid(name: &str, detail: impl Into<String>) -> Error {
    Error::InvalidArgument { name: name.into(), detail: detail.into() }
}

/// Hold the device to `budget` bytes (GPU only: the CPU path keeps everything in host memory,
/// and says so).
pub fn apply_budget(dev: &crate::graph::Device, budget: Option<u64>) {
    match (dev, budget) {
        (crate::graph::Device::Gpu(g), b) => g.set_memory_budget(b),
        (crate::graph::Device::Cpu(_), Some(_)) => {
            eprintln!(
                "note: --memory-budget limits GPU memory; the CPU path keeps its weights in host memory"
            )
        }
        (crate::graph::Device::Cpu(_), None) => {}
    }
}

/// The smallest `--memory-budget` under which training steps of `graph` run on `dev` (None on
/// the CPU path), found by planning (`Gpu::plan`): the executor runs two steps' forward and
/// backward passes and the clipping with every buffer counted and none created, and the AdamW
/// moments that the first update makes are added to the second step's peak. Exact for the
/// executor's own buffers, which are the ones the budget counts. Call it before the first step
/// (no gradient buffer may exist yet: those of the plan are released).
pub fn smallest_budget(
    dev: &crate::graph::Device,
    graph: &crate::graph::Graph,
    loss: crate::graph::Var,
    store: &mut crate::graph::ParamStore,
    feed: &crate::graph::Feed,
    offload: OptimizerOffload,
) -> Result<Option<u64>> {
    let crate::graph::Device::Gpu(gpu) = dev else { return Ok(None) };
    if store.has_grads() {
        return Err(invalid("memory plan", "plan before the first step, while no gradient exists"));
    }
    let moments: u64 = store
        .iter()
        .filter(|(_, p)| p.trainable && !p.on_host() && p.moments().is_none())
        .map(|(_, p)| 8 * p.shape.iter().product::<usize>() as u64)
        .sum();
    let moments = if offload == OptimizerOffload::None { moments } else { 0 };
    // Two steps: the first makes the gradient buffers as its backward pass reaches them; from
    // the second on they exist for the whole step, and so do the moments the first update made.
    let planned = gpu.plan(|| {
        let step = |store: &mut crate::graph::ParamStore| -> Result<()> {
            let mut run = graph.forward(store, feed, &[])?;
            run.backward(store, loss, 1.0)?;
            drop(run);
            store.clip_grad_norm(1.0).map(|_| ())
        };
        step(store)?;
        let first = gpu.bytes_live().1;
        gpu.reset_live_peak();
        step(store)?;
        Ok((first, gpu.bytes_live().1))
    });
    store.clear_grads();
    let ((first, later), _) = planned?;
    Ok(Some(first.max(later + moments)))
}

/// Refuse a budget below what the step needs, before it runs, naming the smallest that works
/// and the options that would lower it.
pub fn check_budget(
    budget: Option<u64>,
    needed: Option<u64>,
    b: usize,
    t: usize,
    flags: &MemoryFlags,
) -> Result<()> {
    let (Some(budget), Some(needed)) = (budget, needed) else { return Ok(()) };
    if needed <= budget {
        return Ok(());
    }
    let off: Vec<&str> = [
        (flags.fused_loss, "--fused-loss"),
        (flags.flash_attention, "--flash-attention"),
        (flags.checkpoint_activations, "--checkpoint-activations"),
        (flags.optimizer_offload != OptimizerOffload::None, "--optimizer-offload host"),
    ]
    .iter()
    .filter(|(on, _)| !on)
    .map(|(_, f)| *f)
    .collect();
    let lower = if off.is_empty() { String::new() } else { format!(", or add {}", off.join(" ")) };
    Err(Error::MemoryBudget {
        budget_mib: mib(budget),
        needed_mib: mib(needed),
        detail: format!(
            "one training step at batch {b} x sequence {t} holds {} at its peak (planned: weights streamed \
             a layer ahead, activations, gradients, optimizer state)",
            mib(needed)
        ),
        hint: format!(
            "The smallest budget that works for this model, batch and sequence is {}; give at least that, \
             or lower the batch size or sequence length{lower}",
            mib(needed)
        ),
    })
}

/// Checked before a run starts.
pub fn validate(flags: &MemoryFlags) -> Result<()> {
    if flags.memory_budget == Some(0) {
        return Err(invalid("--memory-budget", "must be a positive size"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_in_powers_of_1024() {
        assert_eq!(parse_size("1234"), Ok(1234));
        assert_eq!(parse_size("800M"), Ok(800 << 20));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("64 kb"), Ok(64 << 10));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5X").is_err());
        assert!(parse_size("0").is_err());
    }
}
