//! Every memory option of issue 10 is an exact rewrite of the training step: for every
//! architecture, on the GPU and on the CPU path, full fine-tuning and LoRA (with dropout), the
//! loss and every parameter gradient with an option on equal those with it off.
//!
//! - Activation checkpointing recomputes the same kernels on the same inputs (dropout masks are
//!   hashed from the step's seed and the node), so it must agree bit for bit.
//! - The fused loss and flash attention reorder sums (over vocabulary chunks, over key blocks):
//!   they agree within float32 reassociation, 2e-5 relative on the loss and 1e-4 of the largest
//!   gradient entry of each tensor (the products here sum at most a few hundred terms).

mod common;

use pockettune::graph::Device;
use pockettune::memory::GraphOptions;
use pockettune::models::Model;

fn check_device(dev: &Device, label: &str) {
    let checkpoint = GraphOptions { checkpoint_activations: true, ..GraphOptions::default() };
    let fused = GraphOptions { fused_loss: true, ..GraphOptions::default() };
    let flash = GraphOptions { flash_attention: true, ..GraphOptions::default() };
    let all = GraphOptions {
        fused_loss: true,
        flash_attention: true,
        checkpoint_activations: true,
        ..Default::default()
    };
    let bt = (2, 7);
    for (family, config) in common::family_configs() {
        for lora in [false, true] {
            let what = |o: &str| format!("{label} {family} {} {o}", if lora { "lora" } else { "full" });
            let step = |o| common::model_step(&config, dev, lora, o, bt);
            let plain = step(GraphOptions::default());
            common::compare_steps(&what("checkpointing"), &plain, &step(checkpoint), true);
            common::compare_steps(&what("fused loss"), &plain, &step(fused), false);
            common::compare_steps(&what("flash attention"), &plain, &step(flash), false);
            common::compare_steps(&what("all options"), &plain, &step(all), false);
        }
    }
}

#[test]
fn every_memory_option_is_an_exact_rewrite_on_the_cpu_path() {
    check_device(&Device::CPU_REF, "cpu");
}

#[test]
fn every_memory_option_is_an_exact_rewrite_on_the_gpu() {
    let Some(gpu) = common::gpu() else { return };
    check_device(&Device::Gpu(gpu.clone()), "gpu");
}

/// Checkpointing keeps fewer values alive after the forward pass: the layer inputs, not
/// every activation and attention probability.
#[test]
fn checkpointing_keeps_fewer_values_after_the_forward_pass() {
    let (_, config) = &common::family_configs()[3];
    let (model, store) = Model::random(config.clone(), &Device::CPU_REF, 3).unwrap();
    let (b, t) = (1, 5);
    let ids = vec![1u32; b * t];
    let targets = vec![2i32; b * t];
    let feed = Model::feed(&ids, &targets, b, t);
    let live = |o: GraphOptions| {
        let (graph, _) = model.graph_with(&store, b, t, o).unwrap();
        graph.forward(&store, &feed, &[]).unwrap().live_values()
    };
    let plain = live(GraphOptions::default());
    let checkpointed = live(GraphOptions { checkpoint_activations: true, ..GraphOptions::default() });
    assert!(checkpointed * 3 < plain, "{checkpointed} values kept with checkpointing, {plain} without");
}
