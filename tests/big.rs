//! Tensors above a phone's 128 MiB storage-binding limit: GPT-2's LM head (50257 x 768 f32 =
//! 147 MiB) through the chunked matmul, logits of 700 x 50257 (134.7 MiB) through the chunked
//! cross-entropy and soft-capping, and an elementwise op over more than 65535 workgroups. Mobile
//! limits.

mod common;

use kernels_ref as kr;
use pockettune::gpu::Split;
use pockettune::kernels::{activation, elementwise, matmul};
use pockettune::{gradcheck, Tensor};
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
