//! Activations held in 16 bits between the passes (`--activations f16|bf16`, the default under
//! `--precision mixed`; `kernels::half`, the graph executor's `narrow_inputs` / `widen`).
//!
//! - The step is the reference's step with the same roundings: for every architecture, full
//!   fine-tuning and LoRA (with dropout), in f16 and in bf16, plain, with flash attention and
//!   with flash attention and checkpointing, the CPU reference path holds the
//!   same values in host memory through the `half` crate's conversions (`cpu::half`), and the
//!   GPU and the fast CPU path are held to it. The forward pass reads f32
//!   values only, so the loss equals f32's bit for bit; the gradients move by the rounding
//!   (1.4e-4 to 4.5e-4 of their norm in f16, 1.1e-3 to 3.7e-3 in bf16, against f32's own GPU
//!   vs reference noise of 2e-7 to 2e-6), and the device's land on the reference's: at most
//!   half as far from them as the rounding moves them (measured on the GPU: 0.003 to 0.09 of
//!   it, 0.23 for Gemma 2 LoRA in bf16). Not equal: where a device's f32 value and the
//!   reference's lie on either side of a rounding boundary (about one value in a thousand for
//!   f16), they round one 16-bit step apart.
//! - At a real size (GPT-2 124M, batch 4 x 128, planned: every buffer counted, no kernel run),
//!   what the forward pass leaves for the backward pass takes half the bytes, and the smallest
//!   memory budget of the step falls.
//! - `bench step` takes the choice and reports it; an unknown one is refused with the choices.
//!
//! The conversion kernel itself is checked bit for bit by gradcheck (`half_storage`,
//! tests/kernels.rs).

mod common;

use pockettune::gpu::Category;
use pockettune::graph::Device;
use pockettune::memory::{smallest_budget, ActivationStore, GraphOptions, OptimizerOffload};
use pockettune::models::{preset_config, Model};

fn options(activations: ActivationStore) -> GraphOptions {
    GraphOptions { activations, ..GraphOptions::default() }
}

/// `|a - b| / |b|` over every gradient entry together (Euclidean norms).
fn distance(a: &common::Step, b: &common::Step) -> f64 {
    let (mut d, mut n) = (0f64, 0f64);
    for ((_, x), (_, y)) in a.1.iter().zip(&b.1) {
        for (&p, &q) in x.iter().zip(y) {
            d += (p as f64 - q as f64).powi(2);
            n += (q as f64).powi(2);
        }
    }
    (d / n).sqrt()
}

#[test]
fn sixteen_bit_activations_give_the_reference_step_with_the_same_rounding() {
    let gpu = common::gpu_device();
    let bt = (2, 7);
    for (family, config) in common::family_configs() {
        for lora in [false, true] {
            // (flash attention, checkpointing: a layer's input is held in 16 bits too, and its
            // recomputation unpacks it)
            for (flash, checkpoint) in [(false, false), (true, false), (true, true)] {
                // the fast CPU path's attention always keeps the log-sum-exp and recomputes
                // the probabilities from q and k (held rounded): flash attention's backward
                let mut devices: Vec<&Device> = gpu.iter().collect();
                if flash {
                    devices.push(&Device::CPU);
                }
                let method = if lora { "lora" } else { "full" };
                let step = |dev: &Device, store| {
                    let o = GraphOptions {
                        flash_attention: flash,
                        checkpoint_activations: checkpoint,
                        ..options(store)
                    };
                    common::model_step(&config, dev, lora, o, bt)
                };
                let ref32 = step(&Device::CPU_REF, ActivationStore::F32);
                for store in [ActivationStore::F16, ActivationStore::Bf16] {
                    let opts = match (flash, checkpoint) {
                        (false, _) => "",
                        (true, false) => " flash",
                        (true, true) => " flash checkpointed",
                    };
                    let what = format!("{family} {method}{opts} {store:?}");
                    let reference = step(&Device::CPU_REF, store);
                    // the forward pass reads f32 values only: the loss is f32's bit for bit
                    assert_eq!(reference.0, ref32.0, "{what}: the reference's loss moved");
                    let rounding = distance(&reference, &ref32);
                    for dev in &devices {
                        let (held, dev32) = (step(dev, store), step(dev, ActivationStore::F32));
                        let (emul, f32s) = (distance(&held, &reference), distance(&dev32, &ref32));
                        let what = format!("{what} on {}", dev.name());
                        eprintln!(
                            "{what}: vs the reference's rounding {emul:.2e}, the rounding's effect \
                             {rounding:.2e} (f32: vs the reference {f32s:.2e})"
                        );
                        assert_eq!(held.0, dev32.0, "{what}: the loss moved");
                        // the gradients see the rounding, and the device's see the reference's:
                        // a device that rounded nothing, or other values, would be as far from
                        // the reference's as the rounding moves it (ratio ~1)
                        assert!(
                            rounding > 10.0 * f32s,
                            "{what}: the rounding is not visible above f32's noise"
                        );
                        assert!(
                            emul <= 0.5 * rounding,
                            "{what}: {emul:e} from the reference, rounding {rounding:e}"
                        );
                    }
                }
            }
        }
    }
}

/// Bytes of the activations category now.
fn activation_bytes(dev: &Device) -> u64 {
    let Device::Gpu(g) = dev else { unreachable!() };
    g.bytes_by_category().into_iter().find(|c| c.0 == Category::Activations).map(|c| c.1).unwrap()
}

#[test]
fn at_gpt2_size_the_kept_activations_take_half_the_bytes() {
    let Some(dev) = common::own_gpu_device() else { return };
    let Device::Gpu(gpu) = &dev else { unreachable!() };
    let (b, t) = (4, 128);
    let (model, mut store) = Model::random(preset_config("gpt2").unwrap(), &dev, 1).unwrap();
    let ids: Vec<u32> = (0..(b * t) as u32).map(|i| i * 97 % 50_257).collect();
    let targets: Vec<i32> = ids.iter().map(|&i| (i as i32 + 1) % 50_257).collect();
    let feed = Model::feed(&ids, &targets, b, t);
    // (activation bytes the forward pass leaves, the step's smallest budget), both planned
    let mut measure = |store_as: ActivationStore| {
        // flash attention: its saved state (log-sum-exp, 0.3 MiB) is not a value and stays f32
        let o = GraphOptions { flash_attention: true, ..options(store_as) };
        let (graph, vars) = model.graph_with(&store, b, t, o).unwrap();
        let (kept, _) = gpu
            .plan(|| {
                let before = activation_bytes(&dev);
                let _run = graph.forward(&store, &feed, &[])?;
                Ok(activation_bytes(&dev) - before)
            })
            .unwrap();
        let budget = smallest_budget(&dev, &graph, vars.loss, &mut store, &feed, OptimizerOffload::None);
        (kept, budget.unwrap().unwrap())
    };
    let (f32_kept, f32_budget) = measure(ActivationStore::F32);
    let (f16_kept, f16_budget) = measure(ActivationStore::F16);
    let (bf16_kept, _) = measure(ActivationStore::Bf16);
    let mib = |x: u64| x as f64 / (1u64 << 20) as f64;
    eprintln!(
        "GPT-2 124M, 4 x 128: kept activations f32 {:.1} MiB, f16 {:.1} MiB, bf16 {:.1} MiB; \
         smallest budget {:.1} -> {:.1} MiB",
        mib(f32_kept),
        mib(f16_kept),
        mib(bf16_kept),
        mib(f32_budget),
        mib(f16_budget)
    );
    assert!(f32_kept > 100 << 20, "the f32 step keeps {f32_kept} bytes of activations: too few to measure");
    // every kept activation is packed (the loss, which nothing reads in the forward pass, is
    // not counted here), so half the bytes, up to the pool's rounding of each buffer
    assert_eq!(f16_kept, bf16_kept, "the two 16-bit formats take the same bytes");
    let half = f32_kept as f64 / 2.0;
    assert!(
        (f16_kept as f64 - half).abs() <= 0.01 * half,
        "{f16_kept} bytes kept in 16 bits, f32 {f32_kept}"
    );
    assert!(f16_budget < f32_budget, "the step's smallest budget did not fall: {f16_budget} vs {f32_budget}");
}

#[test]
fn bench_step_takes_the_choice_and_reports_it() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pockettune"))
        .env("POCKETTUNE_MATMUL_AUTOTUNE", "off")
        .args(["bench", "step", "--preset", "tiny", "--method", "lora", "--steps", "1", "--device", "cpu"])
        .args(["--activations", "bf16"])
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    let said = format!("{stdout}{stderr}");
    assert!(said.contains("\"activations\":\"bf16\""), "{said}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pockettune"))
        .args(["bench", "step", "--activations", "f8"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("auto, f32, f16, bf16"), "{stderr}");
}
