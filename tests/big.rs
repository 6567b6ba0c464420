//! Tensors above a phone's 128 MiB storage-binding limit: GPT-2's LM head (50257 x 768 f32 =
//! 147 MiB) through the chunked matmul, logits of 700 x 50257 (134.7 MiB) through the chunked
//! cross-entropy and soft-capping, and an elementwise op over more than 65535 workgroups. Mobile
//! limits.

mod common;

use kernels_ref as kr;
use pockettune::gpu::Split;
use pockettune::kernels::{activation, elementwise, embedding, matmul, norm, reduce};
use pockettune::{gradcheck, MatmulKernel, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn uniform(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

#[test]
fn lm_head_matmul_above_binding_limit() {
    let Some(gpu) = common::gpu() else { return };
    let (m, k, n) = (4, 768, 50257);
    let mut rng = StdRng::seed_from_u64(1);
    let (x, w, dc) = (uniform(&mut rng, m * k), uniform(&mut rng, n * k), uniform(&mut rng, m * n));
    assert!((n * k * 4) as u64 > gpu.max_binding(), "the test must exceed the binding limit");

    let gx = Tensor::from_host(gpu, &x, &[m, k], "x").unwrap();
    let gw = Tensor::from_host(gpu, &w, &[n, k], "wte").unwrap();
    assert!(gw.is_chunked(), "a 147 MiB tensor must be stored in chunks under the mobile profile");
    let gc = Tensor::empty(gpu, &[m, n], "logits").unwrap();
    gc.fill(gpu, f32::NAN).unwrap();
    matmul::matmul(gpu, &gc, &gx, &gw, None, false, true, false).unwrap();
    let d = kr::MatmulDims { batch: 1, m, n, k, trans_a: false, trans_b: true };
    let mut c = vec![0f32; m * n];
    kr::matmul_forward(&mut c, &x, &w, None, d);
    let err = gradcheck::rel_err(&gc.to_host(gpu).unwrap(), &c);
    assert!(err <= gradcheck::TOL, "forward rel err {err:e}");

    let gdc = Tensor::from_host(gpu, &dc, &[m, n], "dlogits").unwrap();
    let gdx = Tensor::empty(gpu, &[m, k], "dx").unwrap();
    let gdw = Tensor::empty(gpu, &[n, k], "dwte").unwrap();
    assert!(gdw.is_chunked());
    gdx.fill(gpu, f32::NAN).unwrap();
    gdw.fill(gpu, f32::NAN).unwrap();
    matmul::matmul_backward(gpu, Some(&gdx), Some(&gdw), None, &gdc, &gx, &gw, false, true, false).unwrap();
    let (mut dx, mut dw) = (vec![0f32; m * k], vec![0f32; n * k]);
    kr::matmul_backward(Some(&mut dx), Some(&mut dw), None, &dc, &x, &w, d);
    let err_dx = gradcheck::rel_err(&gdx.to_host(gpu).unwrap(), &dx);
    let err_dw = gradcheck::rel_err(&gdw.to_host(gpu).unwrap(), &dw);
    assert!(err_dx <= gradcheck::TOL, "dx rel err {err_dx:e}");
    assert!(err_dw <= gradcheck::TOL, "dW rel err {err_dw:e}");
}

#[test]
fn cross_entropy_above_binding_limit() {
    let Some(gpu) = common::gpu() else { return };
    let (n, v) = (700, 50257);
    assert!((n * v * 4) as u64 > gpu.max_binding(), "the test must exceed the binding limit");
    let mut rng = StdRng::seed_from_u64(2);
    let logits: Vec<f32> = uniform(&mut rng, n * v).iter().map(|x| 8.0 * x).collect();
    let targets: Vec<i32> =
        (0..n).map(|i| if i % 7 == 0 { kr::IGNORE_INDEX } else { rng.random_range(0..v as i32) }).collect();
    // Split by rows where one binding cannot hold the whole (as `Tensor::from_host` does),
    // and by vocabulary chunks (as a chunked LM head produces them).
    for split in [None, Some((Split::Cols, 20000))] {
        let (loss, losses, grad) =
            gradcheck::cross_entropy_case(gpu, &logits, &targets, n, v, split).unwrap();
        for (what, err) in [("mean loss", loss), ("losses", losses), ("dlogits", grad)] {
            assert!(err <= gradcheck::TOL, "{split:?} {what}: rel err {err:e}");
        }
    }
}

#[test]
fn elementwise_over_more_than_65535_workgroups() {
    let Some(gpu) = common::gpu() else { return };
    let n = 65535 * 256 + 1000;
    let mut rng = StdRng::seed_from_u64(3);
    let (a, b) = (uniform(&mut rng, n), uniform(&mut rng, n));
    let (ga, gb) =
        (Tensor::from_host(gpu, &a, &[n], "a").unwrap(), Tensor::from_host(gpu, &b, &[n], "b").unwrap());
    let out = Tensor::empty(gpu, &[n], "out").unwrap();
    out.fill(gpu, f32::NAN).unwrap();
    elementwise::add(gpu, &out, &ga, &gb, 1.0, 1.0).unwrap();
    let mut want = vec![0f32; n];
    kr::add(&mut want, &a, &b);
    assert_eq!(out.to_host(gpu).unwrap(), want);
}

/// Soft-capping of chunked logits (Gemma 2's final cap on 700 x 50257 logits, 134.7 MiB), all
/// four entry points, against the reference.
#[test]
fn softcap_above_binding_limit() {
    let Some(gpu) = common::gpu() else { return };
    let (n, v, cap) = (700, 50257, 3.0);
    let mut rng = StdRng::seed_from_u64(4);
    let x: Vec<f32> = uniform(&mut rng, n * v).iter().map(|x| 8.0 * x).collect();
    let dy = uniform(&mut rng, n * v);
    let (gx, gdy) = (
        Tensor::from_host(gpu, &x, &[n, v], "logits").unwrap(),
        Tensor::from_host(gpu, &dy, &[n, v], "dy").unwrap(),
    );
    assert!(gx.is_chunked(), "the logits must be stored in chunks under the mobile profile");
    let (gy, gdx) = (Tensor::empty(gpu, &[n, v], "y").unwrap(), Tensor::empty(gpu, &[n, v], "dx").unwrap());
    gy.fill(gpu, f32::NAN).unwrap();
    gdx.fill(gpu, f32::NAN).unwrap();
    let act = activation::Act::Softcap(cap);
    activation::act_forward(gpu, &gy, &gx, act).unwrap();
    activation::act_backward(gpu, &gdx, &gx, &gdy, act, false).unwrap();
    let (mut y, mut dx) = (vec![0f32; n * v], vec![0f32; n * v]);
    kr::softcap_forward(&mut y, &x, cap);
    kr::softcap_backward(&mut dx, &x, &dy, cap);
    let err_y = gradcheck::rel_err(&gy.to_host(gpu).unwrap(), &y);
    let err_dx = gradcheck::rel_err(&gdx.to_host(gpu).unwrap(), &dx);
    assert!(
        err_y <= gradcheck::TOL && err_dx <= gradcheck::TOL,
        "y rel err {err_y:e}, dx rel err {err_dx:e}"
    );
    // in place: x becomes y, dy becomes dx
    activation::act_grad_mul(gpu, &gdy, &gx, act).unwrap();
    activation::act_inplace(gpu, &gx, act).unwrap();
    let err_y = gradcheck::rel_err(&gx.to_host(gpu).unwrap(), &y);
    let err_dx = gradcheck::rel_err(&gdy.to_host(gpu).unwrap(), &dx);
    assert!(err_y <= gradcheck::TOL && err_dx <= gradcheck::TOL, "in place: y {err_y:e}, dx {err_dx:e}");
}

/// Regression: lavapipe (llvmpipe) ends every shader loop after 65,535 iterations in total per
/// invocation, silently, so a matrix product whose inner dimension K passed 65,535 kept only
/// the first 65,535 terms. The LM head's dX product (K = vocabulary) was wrong for every
/// vocabulary above 65,535 (relative error 0.81 at Qwen2.5's 151,665), on both matmul kernels.
#[test]
fn lm_head_dx_lost_every_term_past_65535() {
    let Some(gpu) = common::gpu() else { return };
    let (m, c) = (32, 64);
    for v in [65_535, 65_536, 70_000, 151_665, 262_144] {
        let mut rng = StdRng::seed_from_u64(v as u64);
        let (w, dy) = (uniform(&mut rng, v * c), uniform(&mut rng, m * v));
        let x = uniform(&mut rng, m * c);
        let (gw, gdy, gx) = (
            Tensor::from_host(gpu, &w, &[v, c], "lm head").unwrap(),
            Tensor::from_host(gpu, &dy, &[m, v], "dlogits").unwrap(),
            Tensor::from_host(gpu, &x, &[m, c], "x").unwrap(),
        );
        let d = kr::MatmulDims { batch: 1, m, n: v, k: c, trans_a: false, trans_b: true };
        let mut want = vec![0f32; m * c];
        kr::matmul_backward(Some(&mut want), None, None, &dy, &x, &w, d);
        // subgroup-uniform left out: at 64 columns it runs the subgroup kernel's narrow tile,
        // already checked here under its own name
        for &kernel in gpu.matmul_kernels().iter().filter(|&&k| k != MatmulKernel::SubgroupUniform) {
            let gdx = Tensor::empty(gpu, &[m, c], "dx").unwrap();
            gdx.fill(gpu, f32::NAN).unwrap();
            matmul::with_kernel(kernel, || {
                matmul::matmul_backward(gpu, Some(&gdx), None, None, &gdy, &gx, &gw, false, true, false)
            })
            .unwrap();
            let err = gradcheck::rel_err(&gdx.to_host(gpu).unwrap(), &want);
            assert!(err <= gradcheck::TOL, "{kernel:?} vocabulary {v}: dX rel err {err:e}");
        }
    }
}

/// Regression (the same loop limit): sums over rows ran one loop iteration per row, so bias and
/// norm-weight gradients over more than 65,535 rows (Gemma's q/k norms see batch x sequence x
/// heads rows: 8 x 2048 x 4 = 65,536) kept only the first 65,535.
#[test]
fn column_sums_lost_rows_past_65535() {
    let Some(gpu) = common::gpu() else { return };
    let (rows, cols) = (70_001, 16);
    let mut rng = StdRng::seed_from_u64(5);
    let (x, w, dy) =
        (uniform(&mut rng, rows * cols), uniform(&mut rng, cols), uniform(&mut rng, rows * cols));
    let (gx, gw, gdy) = (
        Tensor::from_host(gpu, &x, &[rows, cols], "x").unwrap(),
        Tensor::from_host(gpu, &w, &[cols], "w").unwrap(),
        Tensor::from_host(gpu, &dy, &[rows, cols], "dy").unwrap(),
    );
    let gsum = Tensor::empty(gpu, &[cols], "sum").unwrap();
    gsum.fill(gpu, f32::NAN).unwrap();
    reduce::sum_rows(gpu, &gsum, &gdy, false).unwrap();
    let want: Vec<f32> =
        (0..cols).map(|j| (0..rows).map(|r| dy[r * cols + j] as f64).sum::<f64>() as f32).collect();
    let err = gradcheck::rel_err(&gsum.to_host(gpu).unwrap(), &want);
    assert!(err <= gradcheck::TOL, "sum_rows rel err {err:e}");

    let kind = norm::NormKind::Rms { gemma: true };
    let (gy, gstats, gdw) = (
        Tensor::empty(gpu, &[rows, cols], "y").unwrap(),
        Tensor::empty(gpu, &[rows, 2], "stats").unwrap(),
        Tensor::empty(gpu, &[cols], "dw").unwrap(),
    );
    gdw.fill(gpu, f32::NAN).unwrap();
    norm::norm_forward(gpu, &gy, &gstats, &gx, &gw, None, kind, 1e-6).unwrap();
    norm::norm_backward(gpu, None, Some(&gdw), None, &gdy, &gx, &gw, &gstats, kind, false).unwrap();
    let (mut y, mut rstd) = (vec![0f32; rows * cols], vec![0f32; rows]);
    let (mut dx, mut dw) = (vec![0f32; rows * cols], vec![0f32; cols]);
    kr::rmsnorm_forward(&mut y, &mut rstd, &x, &w, rows, cols, 1e-6, 1.0);
    kr::rmsnorm_backward(&mut dx, &mut dw, &dy, &x, &w, &rstd, rows, cols, 1.0);
    let err = gradcheck::rel_err(&gdw.to_host(gpu).unwrap(), &dw);
    assert!(err <= gradcheck::TOL, "rmsnorm dw rel err {err:e}");
}

/// Regression (the same loop limit): the embedding backward summed all positions of one token
/// id in one loop, so an id repeated more than 65,535 times in a batch (padding) lost the rest.
#[test]
fn embedding_grad_lost_positions_past_65535() {
    let Some(gpu) = common::gpu() else { return };
    let (n, vocab, dim) = (70_000, 50, 8);
    let mut rng = StdRng::seed_from_u64(6);
    let ids: Vec<u32> =
        (0..n).map(|i| if i % 50 == 0 { rng.random_range(0..vocab as u32) } else { 0 }).collect();
    let dout = uniform(&mut rng, n * dim);
    let gids = embedding::Ids::new(gpu, &ids, vocab).unwrap();
    let gdout = Tensor::from_host(gpu, &dout, &[n, dim], "dout").unwrap();
    let gdt = Tensor::empty(gpu, &[vocab, dim], "dtable").unwrap();
    gdt.fill(gpu, 0.0).unwrap();
    embedding::embedding_backward(gpu, &gdt, &gdout, &gids).unwrap();
    let mut want = vec![0f32; vocab * dim];
    kr::embedding_backward(&mut want, &dout, &ids, dim);
    let err = gradcheck::rel_err(&gdt.to_host(gpu).unwrap(), &want);
    assert!(err <= gradcheck::TOL, "embedding backward rel err {err:e}");
}

/// The full tier of the self-test (`pockettune gradcheck --full`) on the kernels that walk the
/// whole vocabulary, at Gemma 3's real size: the LM head in all three products, cross-entropy,
/// soft-capping, embedding gather and scatter, AdamW, reductions and clipping over 262,144 x
/// 640 tensors, above the binding limit.
#[test]
fn vocabulary_wide_kernels_at_gemma3_size() {
    let Some(gpu) = common::gpu() else { return };
    for kernel in
        ["matmul_chunked", "cross_entropy", "softcap", "embedding", "adamw", "reduce", "clip_grad_norm"]
    {
        let rows = gradcheck::check_kernel(gpu, kernel, 0x5eed, gradcheck::Tier::Full).unwrap();
        assert!(
            rows.iter().any(|r| r.shapes.iter().any(|s| s.contains("262144"))),
            "{kernel}: no shape at the vocabulary"
        );
        let failed: Vec<_> = rows.iter().filter(|r| !r.pass).collect();
        assert!(failed.is_empty(), "{kernel} failed: {failed:#?}");
    }
}
