//! The fused LM head + cross-entropy (`--fused-loss`, `kernels::lm_head_loss`): the vocabulary
//! walked in chunks gives the loss and gradients of the composed `Linear -> [softcap] ->
//! CrossEntropy`, on the GPU and on the CPU path.
//!
//! - Kernel level, GPU against `kernels_ref::linear_cross_entropy_*` (f64): ragged shapes,
//!   forced ragged vocabulary chunks, W chunked along either axis in either layout, x chunked by
//!   rows, ignored targets, soft-capping, accumulation into existing gradients, a packed weight,
//!   a vocabulary past 65,536, and Gemma 3's real head (262,144 x 640, above the binding limit).
//!   Tolerance: `gradcheck::TOL` (1e-4 of the largest reference value), the bound every f32
//!   kernel is held to; the fused sums differ from the reference only by f32 rounding of sums of
//!   at most a few hundred thousand terms.
//! - Graph level: `Graph::fuse_linear_cross_entropy` against the composed graph, tied and untied
//!   heads, with and without soft-cap, on both devices, and whole models built by
//!   `Model::graph_with(.., fused_loss)`: GPT-2, Qwen2 (tied), Llama (untied) and Gemma 3 (soft-
//!   capped), full fine-tuning and LoRA. Tolerance: 2e-5 relative on the loss and 1e-4 of each
//!   gradient's largest entry (float32 reassociation over the chunks; on the CPU path both sides
//!   accumulate in f64 and agree much closer).

mod common;

use kernels_ref as kr;
use kernels_ref::quant::GgmlType;
use pockettune::gpu::{QTensor, Split};
use pockettune::graph::{Device, Feed, Graph, ParamStore};
use pockettune::kernels::cross_entropy::Targets;
use pockettune::kernels::lm_head_loss::{self, HeadWeight};
use pockettune::memory::GraphOptions;
use pockettune::{gradcheck, Gpu, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn uniform(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| scale * rng.random_range(-1.0f32..1.0)).collect()
}

/// Random targets in 0..v with every fourth row ignored.
fn targets(rng: &mut StdRng, n: usize, v: usize) -> Vec<i32> {
    (0..n).map(|i| if i % 4 == 3 { kr::IGNORE_INDEX } else { rng.random_range(0..v as i32) }).collect()
}

fn upload(gpu: &Gpu, data: &[f32], shape: &[usize], split: Option<(Split, usize)>) -> Tensor {
    match split {
        Some((s, per)) => Tensor::from_host_split(gpu, data, shape, s, per, "test").unwrap(),
        None => Tensor::from_host(gpu, data, shape, "test").unwrap(),
    }
}

/// One kernel-level case.
#[derive(Clone, Copy, Debug)]
struct Case {
    n: usize,
    c: usize,
    v: usize,
    trans_w: bool,
    softcap: Option<f32>,
    w_split: Option<(Split, usize)>,
    x_rows: Option<usize>,
    /// forced vocabulary columns per chunk (None: the kernel's own rule)
    chunk: Option<usize>,
}

/// (loss error, dx error, dW error) of the GPU against the reference; dx and dW are added to
/// random values already there (accumulation), checked as those values plus the reference.
fn run_case(gpu: &Gpu, case: Case, seed: u64) -> (f64, f64, f64) {
    let Case { n, c, v, trans_w, softcap, w_split, x_rows, chunk } = case;
    let mut rng = StdRng::seed_from_u64(seed);
    let x = uniform(&mut rng, n * c, 1.0);
    let w = uniform(&mut rng, v * c, 1.0);
    let t = targets(&mut rng, n, v);
    let d = kr::HeadDims { n, c, v, trans_w, softcap };
    let w_shape = if trans_w { [v, c] } else { [c, v] };
    let (gx, gw) =
        (upload(gpu, &x, &[n, c], x_rows.map(|r| (Split::Rows, r))), upload(gpu, &w, &w_shape, w_split));
    let gt = Targets::new(gpu, &t, v).unwrap();
    let (loss, state) =
        (Tensor::empty(gpu, &[1], "loss").unwrap(), Tensor::empty(gpu, &[n, 4], "state").unwrap());
    loss.fill(gpu, f32::NAN).unwrap();
    let hw = HeadWeight::F32 { w: &gw, trans_w };
    let (prior_dx, prior_dw) = (uniform(&mut rng, n * c, 0.01), uniform(&mut rng, v * c, 0.01));
    let gdx = upload(gpu, &prior_dx, &[n, c], x_rows.map(|r| (Split::Rows, r)));
    let gdw = upload(gpu, &prior_dw, &w_shape, w_split);
    let dloss = 0.7;
    let go = || {
        lm_head_loss::lm_head_loss_forward(gpu, &loss, &state, &gx, hw, &gt, softcap)?;
        lm_head_loss::lm_head_loss_backward(
            gpu,
            Some((&gdx, true)),
            Some((&gdw, true)),
            &gx,
            hw,
            &state,
            &gt,
            softcap,
            dloss,
        )
    };
    match chunk {
        Some(cols) => lm_head_loss::with_chunk_cols(cols, go),
        None => go(),
    }
    .unwrap();
    let mut losses = vec![0f32; n];
    let want = kr::linear_cross_entropy_forward(&mut losses, &x, &w, &t, d);
    let (mut dx, mut dw) = (vec![0f32; n * c], vec![0f32; v * c]);
    kr::linear_cross_entropy_backward(Some(&mut dx), Some(&mut dw), &x, &w, &t, dloss, d);
    let got = loss.to_host(gpu).unwrap()[0];
    // relative, absolute below 1 (a vocabulary of 1 has loss 0)
    let loss_err = (got - want).abs() as f64 / (want.abs() as f64).max(1.0);
    let plus = |prior: &[f32], g: &[f32]| prior.iter().zip(g).map(|(a, b)| a + b).collect::<Vec<f32>>();
    let dx_err = gradcheck::rel_err(&gdx.to_host(gpu).unwrap(), &plus(&prior_dx, &dx));
    let dw_err = gradcheck::rel_err(&gdw.to_host(gpu).unwrap(), &plus(&prior_dw, &dw));
    (loss_err, dx_err, dw_err)
}

fn case(n: usize, c: usize, v: usize, trans_w: bool, softcap: Option<f32>, chunk: Option<usize>) -> Case {
    Case { n, c, v, trans_w, softcap, w_split: None, x_rows: None, chunk }
}

#[test]
fn gpu_equals_the_reference_on_ragged_shapes_and_chunkings() {
    let Some(gpu) = common::gpu() else { return };
    let cases = [
        case(1, 1, 1, true, None, None),
        case(5, 7, 13, true, None, Some(4)),
        case(9, 33, 100, false, Some(2.0), Some(17)),
        case(13, 70, 257, true, Some(1.5), Some(256)),
        // W (V, C) by rows (the vocabulary axis, as a big tied embedding is), x by rows
        Case {
            w_split: Some((Split::Rows, 37)),
            x_rows: Some(5),
            ..case(17, 24, 300, true, Some(1.5), Some(64))
        },
        // W (C, V) by rows: the hidden axis, so each chunk's product sums over W's chunks
        Case { w_split: Some((Split::Rows, 16)), ..case(6, 40, 129, false, None, Some(50)) },
        // W (V, C) by columns (the hidden axis) and (C, V) by columns (the vocabulary axis)
        Case { w_split: Some((Split::Cols, 8)), ..case(7, 20, 211, true, None, Some(30)) },
        Case { w_split: Some((Split::Cols, 25)), ..case(4, 16, 90, false, Some(3.0), Some(40)) },
        // past 65,536 columns, in the kernel's own chunks (16,384, the last one ragged)
        case(3, 8, 70_001, true, Some(30.0), None),
    ];
    for (i, case) in cases.into_iter().enumerate() {
        let (loss, dx, dw) = run_case(gpu, case, 100 + i as u64);
        eprintln!("{case:?}: loss {loss:.1e}, dx {dx:.1e}, dW {dw:.1e}");
        assert!(loss <= gradcheck::TOL, "{case:?}: loss rel err {loss:e}");
        assert!(dx <= gradcheck::TOL, "{case:?}: dx rel err {dx:e}");
        assert!(dw <= gradcheck::TOL, "{case:?}: dW rel err {dw:e}");
    }
}

#[test]
fn every_target_ignored_gives_nan_loss_and_zero_gradient() {
    // As the composed cross-entropy (and PyTorch): the mean over no rows is 0/0.
    let Some(gpu) = common::gpu() else { return };
    let (n, c, v) = (3, 5, 11);
    let mut rng = StdRng::seed_from_u64(7);
    let gx = Tensor::from_host(gpu, &uniform(&mut rng, n * c, 1.0), &[n, c], "x").unwrap();
    let gw = Tensor::from_host(gpu, &uniform(&mut rng, v * c, 1.0), &[v, c], "w").unwrap();
    let gt = Targets::new(gpu, &[kr::IGNORE_INDEX; 3], v).unwrap();
    let (loss, state, gdx) = (
        Tensor::empty(gpu, &[1], "loss").unwrap(),
        Tensor::empty(gpu, &[n, 4], "state").unwrap(),
        Tensor::empty(gpu, &[n, c], "dx").unwrap(),
    );
    gdx.fill(gpu, f32::NAN).unwrap();
    let hw = HeadWeight::F32 { w: &gw, trans_w: true };
    lm_head_loss::lm_head_loss_forward(gpu, &loss, &state, &gx, hw, &gt, None).unwrap();
    lm_head_loss::lm_head_loss_backward(gpu, Some((&gdx, false)), None, &gx, hw, &state, &gt, None, 1.0)
        .unwrap();
    assert!(loss.to_host(gpu).unwrap()[0].is_nan());
    assert_eq!(gdx.to_host(gpu).unwrap(), vec![0.0; n * c]);
}

#[test]
fn packed_head_weight_gives_dx_of_its_dequantized_values() {
    // LoRA on a GGUF base: W stays packed and frozen; only dx flows. The reference reads the
    // weight's dequantized values, so the packing's own rounding does not count.
    let Some(gpu) = common::gpu() else { return };
    // (type, n, C, V, soft-cap, W's rows per chunk)
    for (ty, n, c, v, softcap, per) in
        [(GgmlType::F16, 6, 24, 300, None, 300), (GgmlType::Q6_K, 9, 256, 517, Some(2.0), 77)]
    {
        let mut rng = StdRng::seed_from_u64(11);
        let x = uniform(&mut rng, n * c, 1.0);
        let bytes = kr::quant::random_blocks(ty, v * c, 3);
        let q = QTensor::from_bytes_split(gpu, ty, &bytes, &[v, c], per, "w").unwrap();
        let w = q.to_host(gpu).unwrap();
        let t = targets(&mut rng, n, v);
        let gx = Tensor::from_host(gpu, &x, &[n, c], "x").unwrap();
        let gt = Targets::new(gpu, &t, v).unwrap();
        let (loss, state, gdx) = (
            Tensor::empty(gpu, &[1], "loss").unwrap(),
            Tensor::empty(gpu, &[n, 4], "state").unwrap(),
            Tensor::empty(gpu, &[n, c], "dx").unwrap(),
        );
        gdx.fill(gpu, f32::NAN).unwrap();
        lm_head_loss::with_chunk_cols(128, || {
            let hw = HeadWeight::Packed(&q);
            lm_head_loss::lm_head_loss_forward(gpu, &loss, &state, &gx, hw, &gt, softcap)?;
            lm_head_loss::lm_head_loss_backward(
                gpu,
                Some((&gdx, false)),
                None,
                &gx,
                hw,
                &state,
                &gt,
                softcap,
                1.0,
            )
        })
        .unwrap();
        let d = kr::HeadDims { n, c, v, trans_w: true, softcap };
        let mut losses = vec![0f32; n];
        let want = kr::linear_cross_entropy_forward(&mut losses, &x, &w, &t, d);
        let mut dx = vec![0f32; n * c];
        kr::linear_cross_entropy_backward(Some(&mut dx), None, &x, &w, &t, 1.0, d);
        let loss_err = ((loss.to_host(gpu).unwrap()[0] - want) / want).abs() as f64; // ln 517 > 1
        let dx_err = gradcheck::rel_err(&gdx.to_host(gpu).unwrap(), &dx);
        assert!(
            loss_err <= gradcheck::TOL && dx_err <= gradcheck::TOL,
            "{ty}: loss {loss_err:e}, dx {dx_err:e}"
        );
    }
}

#[test]
fn gemma3_real_head_above_the_binding_limit() {
    // 262,144 x 640 f32 = 640 MiB: five row chunks of W under the mobile profile; a few rows, the
    // soft-cap of Gemma 3 (30), dx and dW (full fine-tuning of the tied embedding).
    let Some(gpu) = common::gpu() else { return };
    let case = case(3, gradcheck::GEMMA3_270M_HIDDEN, gradcheck::GEMMA3_VOCAB, true, Some(30.0), None);
    assert!((case.v * case.c * 4) as u64 > gpu.max_binding(), "W must exceed one binding");
    let (loss, dx, dw) = run_case(gpu, case, 5);
    eprintln!("Gemma 3 head: loss {loss:.1e}, dx {dx:.1e}, dW {dw:.1e}");
    assert!(loss <= gradcheck::TOL && dx <= gradcheck::TOL && dw <= gradcheck::TOL);
}

/// Loss and the gradients of every trainable parameter (by name) of a small head graph, fused
/// or composed. `tied`: the hidden state is `x + W[ids]` and the head is that same W, so W's
/// gradient collects from the embedding and from the head.
fn head_graph_step(
    dev: &Device,
    (n, c, v, trans_w, softcap, tied): (usize, usize, usize, bool, Option<f32>, bool),
    fused: bool,
) -> (f32, Vec<(String, Vec<f32>)>) {
    let mut rng = StdRng::seed_from_u64(31);
    let mut store = ParamStore::new(dev.clone());
    let x = store.add("x", &[n, c], &uniform(&mut rng, n * c, 1.0), true).unwrap();
    let w_shape = if trans_w { vec![v, c] } else { vec![c, v] };
    let w = store.add("w", &w_shape, &uniform(&mut rng, v * c, 1.0), true).unwrap();
    let mut g = Graph::new();
    let ids = g.id_list(v);
    let xv = g.param(&store, x);
    let hidden = if tied {
        let table = g.param(&store, w);
        let e = g.embedding(table, ids, n).unwrap();
        g.add(xv, e).unwrap()
    } else {
        xv
    };
    let wv = g.param(&store, w);
    let logits = g.linear(hidden, wv, None, trans_w).unwrap();
    let logits = match softcap {
        Some(cap) => g.softcap(logits, cap).unwrap(),
        None => logits,
    };
    let list = g.target_list(v);
    let loss = if fused {
        g.fuse_linear_cross_entropy(logits, list).unwrap()
    } else {
        g.cross_entropy(logits, list).unwrap()
    };
    let feed = Feed {
        ids: vec![(0..n).map(|_| rng.random_range(0..v as u32)).collect()],
        targets: vec![targets(&mut rng, n, v)],
        dropout_seed: None,
    };
    store.zero_grads().unwrap();
    let mut run = g.forward(&store, &feed, &[]).unwrap();
    run.backward(&mut store, loss, 0.9).unwrap();
    let l = run.loss(loss).unwrap();
    drop(run);
    let grads =
        store.iter().map(|(_, p)| (p.name.clone(), p.grad.as_ref().unwrap().to_host(dev).unwrap())).collect();
    (l, grads)
}

fn check_head_graphs(dev: &Device, label: &str) {
    let shapes = [
        (5, 8, 37, true, None, false),
        (7, 12, 53, false, Some(2.5), false),
        (6, 16, 61, true, Some(3.0), true),
        (4, 9, 29, true, None, true),
    ];
    for shape in shapes {
        let plain = head_graph_step(dev, shape, false);
        // ragged chunks of 10 columns (the GPU; the CPU path ignores the chunking)
        let fused = lm_head_loss::with_chunk_cols(10, || head_graph_step(dev, shape, true));
        common::compare_steps(&format!("{label} {shape:?}"), &plain, &fused, false);
    }
}

#[test]
fn fused_graph_equals_the_composed_head_and_loss_on_the_cpu_path() {
    check_head_graphs(&Device::CPU_REF, "cpu");
}

#[test]
fn fused_graph_equals_the_composed_head_and_loss_on_the_gpu() {
    let Some(gpu) = common::gpu() else { return };
    check_head_graphs(&Device::Gpu(gpu.clone()), "gpu");
}

#[test]
fn fusing_refuses_a_tail_that_is_not_a_head() {
    let mut store = ParamStore::new(Device::CPU_REF);
    let table = store.add("t", &[10, 10], &[0.0; 100], true).unwrap();
    let mut g = Graph::new();
    let ids = g.id_list(10);
    let list = g.target_list(10);
    let tv = g.param(&store, table);
    let e = g.embedding(tv, ids, 3).unwrap();
    let logits = g.scale(e, 2.0);
    let err = g.fuse_linear_cross_entropy(logits, list).unwrap_err().to_string();
    assert!(err.contains("linear LM head"), "{err}");
}

fn check_models(dev: &Device, label: &str) {
    let fused = GraphOptions { fused_loss: true, ..GraphOptions::default() };
    for (family, config) in common::family_configs() {
        for lora in [false, true] {
            let step = |o| common::model_step(&config, dev, lora, o, (2, 5));
            let plain = step(GraphOptions::default());
            let with = lm_head_loss::with_chunk_cols(16, || step(fused));
            common::compare_steps(&format!("{label} {family} lora={lora}"), &plain, &with, false);
        }
    }
}

#[test]
fn fused_models_equal_plain_models_on_the_cpu_path() {
    check_models(&Device::CPU_REF, "cpu");
}

#[test]
fn fused_models_equal_plain_models_on_the_gpu() {
    let Some(gpu) = common::gpu() else { return };
    check_models(&Device::Gpu(gpu.clone()), "gpu");
}
