//! Slower tier (`cargo test --release --test gpt2_124m -- --ignored`, about a minute on 2
//! cores): GPT-2 124M at its real shape (random weights, batch 1 x 8 tokens), GPU path against
//! the CPU reference path, which the PyTorch fixture of tests/gpt2.rs checks at a small shape.
//! The 147 MiB embedding is chunked on the GPU under the mobile limits, so this also covers the
//! chunked LM head and its gradient inside a whole model.

mod common;

use pockettune::gradcheck::rel_err;
use pockettune::graph::Device;
use pockettune::models::gpt2::{Gpt2, Gpt2Config};

#[test]
#[ignore = "slow tier: run with --ignored"]
fn gpt2_124m_gpu_matches_cpu_reference() {
    let Some(gpu) = common::gpu() else { return };
    let (b, t) = (1, 8);
    let ids: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 6151) % 50257).collect();
    let mut targets: Vec<i32> = ids.iter().skip(1).map(|&i| i as i32).collect();
    targets.push(-100);
    let feed = Gpt2::feed(&ids, &targets, b, t);
    let mut results = Vec::new();
    for dev in [Device::Gpu(gpu.clone()), Device::Cpu] {
        let (model, mut store) = Gpt2::random(Gpt2Config::small(), &dev, 5).unwrap();
        let (graph, vars) = model.graph(&store, b, t).unwrap();
        let mut run = graph.forward(&store, &feed, &[vars.logits]).unwrap();
        let logits = run.read(vars.logits).unwrap();
        let loss = run.loss(vars.loss).unwrap();
        run.backward(&mut store, vars.loss, 1.0).unwrap();
        let grads: Vec<(String, Vec<f32>)> = store
            .iter()
            .map(|(_, p)| (p.name.clone(), p.grad.as_ref().unwrap().to_host(&dev).unwrap()))
            .collect();
        results.push((loss, logits, grads));
    }
    let (gpu_r, cpu_r) = (&results[0], &results[1]);
    assert!(((gpu_r.0 - cpu_r.0) / cpu_r.0).abs() <= 1e-5, "loss {} vs {}", gpu_r.0, cpu_r.0);
    let e = rel_err(&gpu_r.1, &cpu_r.1);
    assert!(e <= 1e-4, "logits rel err {e:e}");
    for ((name, g), (_, c)) in gpu_r.2.iter().zip(&cpu_r.2) {
        let e = rel_err(g, c);
        assert!(e <= 1e-4, "gradient of {name}: rel err {e:e}");
    }
}
