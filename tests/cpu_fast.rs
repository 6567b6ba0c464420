//! The fast CPU path's own functions (`pockettune::cpu`) against their `kernels-ref` twins, on
//! ragged shapes and across the sizes where kernels break: an inner dimension and a vocabulary
//! past 65,536, more rows than one block of the fused loss walks. Whole models on the fast path
//! are held to PyTorch in tests/parity.rs.
//!
//! Tolerance: the fast path accumulates in f32 (the reference in f64), so each result is
//! compared relative to the largest reference value of its tensor: 1e-5 for the matrix
//! products and attention (sums of at most a few hundred terms between roundings inside gemm's
//! blocks) and for the elementwise functions (f32 exp and tanh, a few ulps each, 1e-6 to 2e-6
//! measured), for the norms (f32 row sums in eight partial sums, rows of at most a few
//! thousand), 1e-4 where a sum runs over a whole vocabulary (the loss, dx and dW of the head).
//! The fast path's own `exp` is held to libm's (f64) within 4e-7 relative.

use kernels_ref as kr;
use kernels_ref::{AttnDims, HeadDims, MatmulDims};
use pockettune::cpu;
use pockettune::cpu::attention::Rows;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn uniform(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Largest |got - want| over the largest |want|, or over 1e-3 when every |want| is below it: a
/// gradient that is exactly zero (attention over one position) comes out of the reference as
/// rounding noise near 1e-8, from the f32 log-sum-exp it reads back.
fn rel(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let scale = want.iter().fold(0f64, |m, &w| m.max((w as f64).abs())).max(1e-3);
    got.iter().zip(want).map(|(&g, &w)| (g as f64 - w as f64).abs()).fold(0.0, f64::max) / scale
}

fn check(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel(got, want);
    eprintln!("{what}: rel err {e:.2e} (tol {tol:e})");
    assert!(e <= tol, "{what}: rel err {e:e} above {tol:e}");
}

#[test]
fn matmul_matches_the_reference_in_every_layout_and_accumulates() {
    let mut rng = StdRng::seed_from_u64(1);
    for (m, n, k) in [(37, 53, 71), (1, 5, 3), (64, 96, 128), (3, 1, 513)] {
        for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
            let d = MatmulDims { batch: 1, m, n, k, trans_a, trans_b };
            let (a, b) = (uniform(&mut rng, m * k), uniform(&mut rng, k * n));
            let mut want = vec![0f32; m * n];
            kr::matmul_forward(&mut want, &a, &b, None, d);
            let mut got = vec![f32::NAN; m * n];
            cpu::matmul(&mut got, &a, &b, d, false);
            check(&format!("matmul {m}x{n}x{k} ta={trans_a} tb={trans_b}"), &got, &want, 1e-5);
            // accumulate: C + AB
            let c0 = uniform(&mut rng, m * n);
            let mut got = c0.clone();
            cpu::matmul(&mut got, &a, &b, d, true);
            let want: Vec<f32> = want.iter().zip(&c0).map(|(w, c)| w + c).collect();
            check(&format!("matmul {m}x{n}x{k} accumulated"), &got, &want, 1e-5);
        }
    }
}

/// The inner dimension of the LM head's dx product is the vocabulary: every term past 65,536
/// must count (the GPU lost them once).
#[test]
fn matmul_sums_an_inner_dimension_of_262144() {
    let mut rng = StdRng::seed_from_u64(2);
    let (m, n, k) = (4, 8, 262_144);
    let d = MatmulDims { batch: 1, m, n, k, trans_a: false, trans_b: true };
    let (a, b) = (uniform(&mut rng, m * k), uniform(&mut rng, k * n));
    let mut want = vec![0f32; m * n];
    kr::matmul_forward(&mut want, &a, &b, None, d);
    let mut got = vec![0f32; m * n];
    cpu::matmul(&mut got, &a, &b, d, false);
    check("matmul k=262144", &got, &want, 1e-5);
}

#[test]
fn bias_rows_and_column_sums() {
    let mut rng = StdRng::seed_from_u64(3);
    let (m, n) = (13, 7);
    let (x, bias) = (uniform(&mut rng, m * n), uniform(&mut rng, n));
    let mut got = x.clone();
    cpu::add_rows(&mut got, &bias);
    let want: Vec<f32> = x.iter().enumerate().map(|(i, v)| v + bias[i % n]).collect();
    check("add_rows", &got, &want, 1e-7);
    let mut sums = vec![1f32; n];
    cpu::sum_rows(&mut sums, &x, true);
    let want: Vec<f32> = (0..n).map(|j| 1.0 + (0..m).map(|r| x[r * n + j]).sum::<f32>()).collect();
    check("sum_rows accumulated", &sums, &want, 1e-6);
}

fn attention_case(d: AttnDims, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (qw, kw) = (d.h * d.d, d.kv_h * d.d);
    let rows = d.b * d.t;
    let (q, k, v) =
        (uniform(&mut rng, rows * qw), uniform(&mut rng, rows * kw), uniform(&mut rng, rows * kw));
    let dout = uniform(&mut rng, rows * qw);
    let (mut out_r, mut lse_r) = (vec![0f32; rows * qw], vec![0f32; d.b * d.h * d.t]);
    kr::attention_forward_lse(&mut out_r, &mut lse_r, &q, &k, &v, d);
    let (mut dq_r, mut dk_r, mut dv_r) = (vec![0f32; q.len()], vec![0f32; k.len()], vec![0f32; v.len()]);
    kr::attention_backward_lse(&mut dq_r, &mut dk_r, &mut dv_r, &dout, &q, &k, &v, &lse_r, d);
    let what = format!("attention {d:?}");

    // dense inputs
    let rows_of = |data, width| Rows { data, width, offset: 0 };
    let (mut out, mut lse) = (vec![0f32; rows * qw], vec![0f32; d.b * d.h * d.t]);
    cpu::attention::forward(&mut out, &mut lse, rows_of(&q, qw), rows_of(&k, kw), rows_of(&v, kw), d);
    check(&format!("{what}: out"), &out, &out_r, 1e-5);
    check(&format!("{what}: lse"), &lse, &lse_r, 1e-5);
    let [dq, dk, dv] =
        cpu::attention::backward(&dout, [rows_of(&q, qw), rows_of(&k, kw), rows_of(&v, kw)], &lse, d);
    check(&format!("{what}: dq"), &dq, &dq_r, 1e-5);
    check(&format!("{what}: dk"), &dk, &dk_r, 1e-5);
    check(&format!("{what}: dv"), &dv, &dv_r, 1e-5);

    // the same read from packed [q | k | v] rows
    let width = qw + 2 * kw;
    let packed: Vec<f32> = (0..rows)
        .flat_map(|r| [&q[r * qw..(r + 1) * qw], &k[r * kw..(r + 1) * kw], &v[r * kw..(r + 1) * kw]].concat())
        .collect();
    let parts = [
        Rows { data: &packed, width, offset: 0 },
        Rows { data: &packed, width, offset: qw },
        Rows { data: &packed, width, offset: qw + kw },
    ];
    let mut out_p = vec![0f32; rows * qw];
    cpu::attention::forward(&mut out_p, &mut lse, parts[0], parts[1], parts[2], d);
    check(&format!("{what}: out from packed rows"), &out_p, &out_r, 1e-5);
    let [dq_p, ..] = cpu::attention::backward(&dout, parts, &lse, d);
    check(&format!("{what}: dq from packed rows"), &dq_p, &dq_r, 1e-5);
}

#[test]
fn attention_matches_the_reference_with_groups_windows_and_soft_caps() {
    let base = AttnDims { b: 2, t: 17, h: 4, kv_h: 4, d: 8, window: None, scale: 0.35, softcap: None };
    attention_case(base, 10);
    attention_case(AttnDims { kv_h: 2, ..base }, 11);
    attention_case(AttnDims { kv_h: 1, window: Some(5), ..base }, 12);
    attention_case(AttnDims { kv_h: 2, softcap: Some(1.5), ..base }, 13);
    attention_case(AttnDims { b: 1, t: 1, h: 2, kv_h: 1, d: 3, ..base }, 14);
    // GPT-2 124M's head shape at a sequence of 128
    attention_case(AttnDims { b: 1, t: 128, h: 2, kv_h: 2, d: 64, scale: 0.125, ..base }, 15);
}

fn head_loss_case(n: usize, c: usize, v: usize, trans_w: bool, softcap: Option<f32>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let d = HeadDims { n, c, v, trans_w, softcap };
    let x = uniform(&mut rng, n * c);
    let w = uniform(&mut rng, v * c);
    // every fifth row ignored, targets across the whole vocabulary (the last row included)
    let targets: Vec<i32> = (0..n)
        .map(|i| {
            if i % 5 == 3 {
                kr::IGNORE_INDEX
            } else if i == 0 {
                v as i32 - 1
            } else {
                rng.random_range(0..v as i32)
            }
        })
        .collect();
    let what = format!("head loss n={n} c={c} v={v} trans_w={trans_w} softcap={softcap:?}");
    let mut losses = vec![0f32; n];
    let want = kr::linear_cross_entropy_forward(&mut losses, &x, &w, &targets, d);
    let mut lse = vec![0f32; n];
    let got = cpu::head_loss::forward(&mut lse, &x, &w, &targets, d);
    check(&format!("{what}: loss"), &[got], &[want], 1e-5);

    let dloss = 0.7;
    let (mut dx_r, mut dw_r) = (vec![0f32; n * c], vec![0f32; v * c]);
    kr::linear_cross_entropy_backward(Some(&mut dx_r), Some(&mut dw_r), &x, &w, &targets, dloss, d);
    // added to what the buffers hold
    let (dx0, dw0) = (uniform(&mut rng, n * c), uniform(&mut rng, v * c));
    let (mut dx, mut dw) = (dx0.clone(), dw0.clone());
    cpu::head_loss::backward(Some((&mut dx, true)), Some((&mut dw, true)), &x, &w, &lse, &targets, dloss, d);
    let sub = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x - y).collect::<Vec<f32>>();
    check(&format!("{what}: dx"), &sub(&dx, &dx0), &dx_r, 1e-4);
    check(&format!("{what}: dW"), &sub(&dw, &dw0), &dw_r, 1e-4);
    // written over garbage
    let mut dx = vec![f32::NAN; n * c];
    cpu::head_loss::backward(Some((&mut dx, false)), None, &x, &w, &lse, &targets, dloss, d);
    check(&format!("{what}: dx written"), &dx, &dx_r, 1e-4);
}

#[test]
fn fused_head_loss_matches_the_reference() {
    head_loss_case(13, 24, 300, true, None, 20);
    head_loss_case(13, 24, 300, false, Some(3.0), 21);
    head_loss_case(1, 5, 7, false, None, 22);
}

/// Vocabularies past 65,536, with more rows than one 32 MiB block of logits holds (119 rows of
/// 70,000; 32 of Gemma's 262,144), so the walk crosses blocks.
#[test]
fn fused_head_loss_at_real_vocabularies_and_several_blocks() {
    head_loss_case(130, 8, 70_000, true, None, 30);
    head_loss_case(40, 4, 262_144, true, Some(30.0), 31);
}

#[test]
fn an_all_ignored_batch_gives_nan_as_pytorch_does() {
    let d = HeadDims { n: 2, c: 3, v: 5, trans_w: true, softcap: None };
    let mut lse = vec![0f32; 2];
    let loss = cpu::head_loss::forward(&mut lse, &[0.5; 6], &[0.1; 15], &[kr::IGNORE_INDEX; 2], d);
    assert!(loss.is_nan(), "got {loss}");
}

#[test]
fn activations_gated_units_and_dropout_match_the_reference() {
    use pockettune::cpu::elementwise::{self as fast, Unary};
    let mut rng = StdRng::seed_from_u64(40);
    // past one block of CHUNK elements, ragged
    let n = fast::CHUNK * 2 + 77;
    let (x, up, dy) = (uniform(&mut rng, n), uniform(&mut rng, n), uniform(&mut rng, n));
    let x: Vec<f32> = x.iter().map(|v| v * 6.0).collect(); // GELU's and SiLU's curved range
    for (act, fwd, bwd) in [
        (
            Unary::Gelu,
            kr::gelu_forward as fn(&mut [f32], &[f32]),
            kr::gelu_backward as fn(&mut [f32], &[f32], &[f32]),
        ),
        (Unary::Silu, kr::silu_forward, kr::silu_backward),
    ] {
        let (mut want, mut got) = (vec![0f32; n], vec![0f32; n]);
        fwd(&mut want, &x);
        fast::act_forward(&mut got, &x, act);
        check(&format!("{act:?} forward"), &got, &want, 1e-5);
        bwd(&mut want, &x, &dy);
        let mut got = vec![0.5f32; n];
        fast::act_backward(&mut got, &x, &dy, act, true);
        let want_acc: Vec<f32> = want.iter().map(|w| w + 0.5).collect();
        check(&format!("{act:?} backward, accumulated"), &got, &want_acc, 1e-5);
    }
    let (mut want, mut got) = (vec![0f32; n], vec![0f32; n]);
    kr::geglu_forward(&mut want, &x, &up);
    fast::glu_forward(&mut got, &x, &up, Unary::Gelu);
    check("GeGLU forward", &got, &want, 1e-5);
    let (mut dg_r, mut du_r) = (vec![0f32; n], vec![0f32; n]);
    kr::swiglu_backward(&mut dg_r, &mut du_r, &dy, &x, &up);
    let (mut dg, mut du) = (vec![f32::NAN; n], vec![f32::NAN; n]);
    fast::glu_backward(Some((&mut dg, false)), Some((&mut du, false)), &dy, &x, &up, Unary::Silu);
    check("SwiGLU dgate", &dg, &dg_r, 1e-5);
    check("SwiGLU dup", &du, &du_r, 1e-5);
    // the same mask as the reference (and so as the GPU)
    kr::dropout(&mut want, &x, 0.1, 1234);
    fast::dropout(&mut got, &x, 0.1, 1234, false);
    check("dropout", &got, &want, 1e-5);
    let masks_agree = got.iter().zip(&want).all(|(a, b)| (*a == 0.0) == (*b == 0.0));
    assert!(masks_agree, "the fast path dropped other elements than the reference");
}

#[test]
fn cross_entropy_matches_the_reference_at_a_real_vocabulary() {
    use pockettune::cpu::elementwise as fast;
    let mut rng = StdRng::seed_from_u64(41);
    let (n, v) = (6, 151_936);
    let logits: Vec<f32> = uniform(&mut rng, n * v).iter().map(|x| x * 8.0).collect();
    let targets = vec![0, kr::IGNORE_INDEX, v as i32 - 1, 70_000, 131_072, 5];
    let mut losses = vec![0f32; n];
    let want = kr::cross_entropy_forward(&mut losses, &logits, &targets, n, v);
    let mut lse = vec![0f32; n];
    let got = fast::cross_entropy_forward(&mut lse, &logits, &targets, v);
    check("cross-entropy loss", &[got], &[want], 1e-5);
    let mut want = vec![0f32; n * v];
    kr::cross_entropy_backward(&mut want, &logits, &targets, 0.5, n, v);
    let mut got = vec![f32::NAN; n * v];
    fast::cross_entropy_backward(&mut got, &logits, &lse, &targets, 0.5, false);
    check("cross-entropy dlogits", &got, &want, 1e-5);
}

#[test]
fn embedding_backward_scatters_repeated_ids_and_accumulates() {
    let mut rng = StdRng::seed_from_u64(43);
    let (v, c) = (70_000, 6);
    let ids: Vec<u32> = vec![5, 69_999, 5, 0, 65_536, 5, 12];
    let dout = uniform(&mut rng, ids.len() * c);
    let mut want = vec![0f32; v * c];
    kr::embedding_backward(&mut want, &dout, &ids, c);
    let mut got = vec![f32::NAN; v * c];
    cpu::embedding_backward(&mut got, &dout, &ids, c, false);
    check("embedding backward", &got, &want, 1e-6);
    let start = uniform(&mut rng, v * c);
    let mut got = start.clone();
    cpu::embedding_backward(&mut got, &dout, &ids, c, true);
    let want: Vec<f32> = want.iter().zip(&start).map(|(w, s)| w + s).collect();
    check("embedding backward, accumulated", &got, &want, 1e-6);
}

/// The fast path's host buffer pool hands a given-back buffer to the next request of its
/// length (contents and all: the kernels overwrite them), and leaves small ones alone.
#[test]
fn the_pool_recycles_buffers_by_length() {
    use pockettune::cpu::pool;
    let n = 12_345;
    let v = vec![1.5f32; n];
    let at = v.as_ptr();
    pool::give(v);
    let w = pool::take(n);
    assert_eq!((w.as_ptr(), w.len()), (at, n), "the same buffer comes back");
    assert!(w.iter().all(|&x| x == 1.5), "with its contents");
    assert_eq!(pool::take(n + 1), vec![0.0; n + 1], "another length gets fresh zeros");
    let small = vec![2.0f32; 8];
    pool::give(small);
    assert_eq!(pool::take(8), vec![0.0; 8], "small buffers are left to the allocator");
}

#[test]
fn exp_is_within_a_few_ulps_of_libm_over_the_whole_range() {
    use pockettune::cpu::simd::exp;
    let mut worst = 0f64;
    // every 1/1024 from -87 to 88, and the ends of the range
    for i in -87 * 1024..=88 * 1024 {
        let x = i as f32 / 1024.0;
        let (got, want) = (exp(x) as f64, (x as f64).exp());
        worst = worst.max((got - want).abs() / want);
    }
    eprintln!("exp: worst relative error {worst:.2e}");
    assert!(worst <= 4e-7, "exp: relative error {worst:e} above 4e-7");
    assert!(exp(f32::NAN).is_nan(), "exp(NaN) must stay NaN");
    assert_eq!(exp(f32::INFINITY), f32::INFINITY);
    assert_eq!(exp(0.0), 1.0);
    assert!(exp(88.7) < f32::INFINITY && exp(88.7) > 3.3e38, "exp near the top of f32's range");
    // below the normal range: 0, as for -inf (a masked attention score)
    assert_eq!((exp(f32::NEG_INFINITY), exp(-200.0), exp(-87.4)), (0.0, 0.0, 0.0));
}

#[test]
fn norms_match_the_reference_on_ragged_rows_with_and_without_weight_gradients() {
    use pockettune::cpu::norm as fast;
    let mut rng = StdRng::seed_from_u64(42);
    // more rows than one block of the weight gradients' sums (32), a row that is not a
    // multiple of 8, GPT-2's, and Gemma 3 1B's width with its 1 + w scale
    for (rows, cols, shift) in [(70, 771, 0.0), (512, 768, 0.0), (33, 1152, 1.0), (1, 5, 0.0)] {
        let (x, dy) = (uniform(&mut rng, rows * cols), uniform(&mut rng, rows * cols));
        let x: Vec<f32> = x.iter().map(|v| v * 3.0 + 0.5).collect();
        let (w, b) = (uniform(&mut rng, cols), uniform(&mut rng, cols));
        let what = format!("{rows}x{cols}");

        let (mut y, mut mean, mut rstd) = (vec![0f32; rows * cols], vec![0f32; rows], vec![0f32; rows]);
        kr::layernorm_forward(&mut y, &mut mean, &mut rstd, &x, &w, &b, rows, cols, 1e-5);
        let (mut gy, mut gmean, mut grstd) =
            (vec![f32::NAN; rows * cols], vec![0f32; rows], vec![0f32; rows]);
        fast::layernorm_forward(&mut gy, &mut gmean, &mut grstd, &x, &w, &b, cols, 1e-5);
        check(&format!("layernorm {what}"), &gy, &y, 1e-5);
        check(&format!("layernorm {what} rstd"), &grstd, &rstd, 1e-5);
        let (mut dx, mut dw, mut db) = (vec![0f32; rows * cols], vec![0f32; cols], vec![0f32; cols]);
        kr::layernorm_backward(&mut dx, &mut dw, &mut db, &dy, &x, &w, &mean, &rstd, rows, cols);
        let (mut gdx, mut gdw, mut gdb) =
            (vec![f32::NAN; rows * cols], vec![f32::NAN; cols], vec![f32::NAN; cols]);
        fast::layernorm_backward(
            Some(&mut gdx),
            Some((&mut gdw, &mut gdb)),
            &dy,
            &x,
            &w,
            &gmean,
            &grstd,
            cols,
        );
        check(&format!("layernorm {what} dx"), &gdx, &dx, 1e-5);
        check(&format!("layernorm {what} dw"), &gdw, &dw, 1e-5);
        check(&format!("layernorm {what} db"), &gdb, &db, 1e-5);
        let mut only_dx = vec![f32::NAN; rows * cols];
        fast::layernorm_backward(Some(&mut only_dx), None, &dy, &x, &w, &gmean, &grstd, cols);
        assert_eq!(only_dx, gdx, "layernorm {what}: dx alone differs from dx with dw, db");

        let (mut y, mut rstd) = (vec![0f32; rows * cols], vec![0f32; rows]);
        kr::rmsnorm_forward(&mut y, &mut rstd, &x, &w, rows, cols, 1e-6, shift);
        let (mut gy, mut grstd) = (vec![f32::NAN; rows * cols], vec![0f32; rows]);
        fast::rmsnorm_forward(&mut gy, &mut grstd, &x, &w, cols, 1e-6, shift);
        check(&format!("rmsnorm {what}"), &gy, &y, 1e-5);
        let (mut dx, mut dw) = (vec![0f32; rows * cols], vec![0f32; cols]);
        kr::rmsnorm_backward(&mut dx, &mut dw, &dy, &x, &w, &rstd, rows, cols, shift);
        let (mut gdx, mut gdw) = (vec![f32::NAN; rows * cols], vec![f32::NAN; cols]);
        fast::rmsnorm_backward(Some(&mut gdx), Some(&mut gdw), &dy, &x, &w, &grstd, cols, shift);
        check(&format!("rmsnorm {what} dx"), &gdx, &dx, 1e-5);
        check(&format!("rmsnorm {what} dw"), &gdw, &dw, 1e-5);
    }
}
