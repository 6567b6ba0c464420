//! Tests of the matmul reference against a triple loop, finite differences and `sgemm`.

use super::*;
use crate::testutil::*;

const TRANS: [(bool, bool); 4] = [(false, false), (true, false), (false, true), (true, true)];

/// Stores a row-major `(rows, cols)` matrix as `op` expects it: transposed when `trans`.
fn store(x: &[f32], rows: usize, cols: usize, trans: bool) -> Vec<f32> {
    if !trans {
        return x.to_vec();
    }
    let mut t = vec![0.0; x.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = x[i * cols + j];
        }
    }
    t
}

/// The textbook triple loop, f64 throughout.
fn naive(a: &[f32], b: &[f32], bias: Option<&[f32]>, d: MatmulDims) -> Vec<f64> {
    let MatmulDims { batch, m, n, k, trans_a, trans_b } = d;
    let mut c = vec![0.0f64; batch * m * n];
    for bi in 0..batch {
        let (a, b) = (&a[bi * m * k..], &b[bi * k * n..]);
        for i in 0..m {
            for j in 0..n {
                let mut s = bias.map_or(0.0, |bias| bias[j] as f64);
                for p in 0..k {
                    let x = if trans_a { a[p * m + i] } else { a[i * k + p] };
                    let y = if trans_b { b[j * k + p] } else { b[p * n + j] };
                    s += x as f64 * y as f64;
                }
                c[bi * m * n + i * n + j] = s;
            }
        }
    }
    c
}

#[test]
fn two_by_two_by_hand() {
    // [[1,2],[3,4]] · [[5,6],[7,8]] = [[1*5+2*7, 1*6+2*8], [3*5+4*7, 3*6+4*8]]
    //                               = [[19, 22], [43, 50]]; bias [1, -1] gives [[20,21],[44,49]].
    let a = [1.0, 2.0, 3.0, 4.0];
    let b = [5.0, 6.0, 7.0, 8.0];
    for (ta, tb) in TRANS {
        let d = MatmulDims { batch: 1, m: 2, n: 2, k: 2, trans_a: ta, trans_b: tb };
        let (sa, sb) = (store(&a, 2, 2, ta), store(&b, 2, 2, tb));
        let mut c = [0.0f32; 4];
        matmul_forward(&mut c, &sa, &sb, None, d);
        assert_eq!(c, [19.0, 22.0, 43.0, 50.0], "trans {ta} {tb}");
        matmul_forward(&mut c, &sa, &sb, Some(&[1.0, -1.0]), d);
        assert_eq!(c, [20.0, 21.0, 44.0, 49.0], "trans {ta} {tb} with bias");
    }
}

#[test]
fn forward_matches_triple_loop() {
    let mut rng = rng(1);
    // Ragged shapes, and shapes that cross the 512 scratch blocks in each dimension.
    let shapes = [
        (1, 1, 1, 1),
        (3, 5, 7, 3),
        (2, 7, 1, 5),
        (1, 1, 9, 13),
        (1, 513, 5, 3),
        (1, 5, 515, 7),
        (1, 3, 7, 517),
    ];
    for (batch, m, n, k) in shapes {
        for (ta, tb) in TRANS {
            let d = MatmulDims { batch, m, n, k, trans_a: ta, trans_b: tb };
            let a = uniform(&mut rng, batch * m * k, -1.0, 1.0);
            let b = uniform(&mut rng, batch * k * n, -1.0, 1.0);
            let bias = uniform(&mut rng, n, -1.0, 1.0);
            for bias in [None, Some(&bias[..])] {
                let mut c = vec![f32::NAN; batch * m * n];
                matmul_forward(&mut c, &a, &b, bias, d);
                // One f64 sum rounded once to f32: within half an f32 ulp of |C| <= k+1.
                let tol = (k + 1) as f64 * 6e-8;
                assert_close(&format!("{d:?}"), &c, &naive(&a, &b, bias, d), tol);
            }
        }
    }
}

#[test]
fn backward_matches_finite_differences() {
    let mut rng = rng(2);
    for (batch, m, n, k) in [(1, 1, 1, 1), (2, 3, 5, 7), (1, 5, 3, 1), (3, 1, 7, 5)] {
        for (ta, tb) in TRANS {
            let d = MatmulDims { batch, m, n, k, trans_a: ta, trans_b: tb };
            let a = uniform(&mut rng, batch * m * k, -1.0, 1.0);
            let b = uniform(&mut rng, batch * k * n, -1.0, 1.0);
            let bias = uniform(&mut rng, n, -1.0, 1.0);
            let w = uniform(&mut rng, batch * m * n, -1.0, 1.0);
            let loss = |a: &[f32], b: &[f32], bias: &[f32]| {
                let mut c = vec![0.0; batch * m * n];
                matmul_forward(&mut c, a, b, Some(bias), d);
                weighted_sum(&w, &c)
            };
            let (mut da, mut db, mut dbias) =
                (vec![f32::NAN; a.len()], vec![f32::NAN; b.len()], vec![f32::NAN; n]);
            matmul_backward(Some(&mut da), Some(&mut db), Some(&mut dbias), &w, &a, &b, d);
            // L is linear in each input, so a central difference has no truncation error
            // and h can be large (0.5): what is left is the f32 rounding of the <= 7
            // outputs that move, each |C| < 9, i.e. 7 * 9 * 6e-8 / (2 * 0.5) < 4e-6.
            let (h, atol, rtol) = (0.5, 1e-5, 1e-6);
            let what = format!("{d:?}");
            check_grad(&format!("dA {what}"), &a, &da, h, atol, rtol, 64, &mut rng, |x| loss(x, &b, &bias));
            check_grad(&format!("dB {what}"), &b, &db, h, atol, rtol, 64, &mut rng, |x| loss(&a, x, &bias));
            check_grad(&format!("dbias {what}"), &bias, &dbias, h, atol, rtol, 64, &mut rng, |x| {
                loss(&a, &b, x)
            });
        }
    }
}

#[test]
fn backward_outputs_are_optional_and_overwritten() {
    let mut rng = rng(3);
    let d = MatmulDims { batch: 2, m: 3, n: 5, k: 4, trans_a: false, trans_b: true };
    let a = uniform(&mut rng, 24, -1.0, 1.0);
    let b = uniform(&mut rng, 40, -1.0, 1.0);
    let dc = uniform(&mut rng, 30, -1.0, 1.0);
    let mut db_alone = vec![0.0; 40];
    matmul_backward(None, Some(&mut db_alone), None, &dc, &a, &b, d);
    let mut db_stale = vec![123.0; 40];
    let mut dbias = vec![123.0; 5];
    matmul_backward(None, Some(&mut db_stale), Some(&mut dbias), &dc, &a, &b, d);
    assert_eq!(db_alone, db_stale);
    let col0: f64 = (0..6).map(|r| dc[r * 5] as f64).sum();
    assert!((dbias[0] as f64 - col0).abs() < 1e-6, "dbias[0] {} vs {col0}", dbias[0]);
}

#[test]
fn sgemm_agrees_with_reference() {
    let mut rng = rng(4);
    for (m, n, k) in [(1, 1, 1), (3, 5, 7), (17, 9, 33), (64, 65, 63), (5, 3, 0), (0, 4, 3)] {
        for (ta, tb) in TRANS {
            let d = MatmulDims { batch: 1, m, n, k, trans_a: ta, trans_b: tb };
            let a = uniform(&mut rng, m * k, -1.0, 1.0);
            let b = uniform(&mut rng, k * n, -1.0, 1.0);
            let mut want = vec![0.0; m * n];
            matmul_forward(&mut want, &a, &b, None, d);
            let mut got = vec![f32::NAN; m * n];
            sgemm(&mut got, &a, &b, m, n, k, ta, tb);
            // f32 accumulation of k terms each |a*b| < 1: error below k * 2^-24 * k.
            let tol = 1e-7 * (k * k + 1) as f64;
            let err = max_abs_diff(&got, &want);
            assert!(err <= tol, "sgemm {d:?}: error {err} > {tol}");
        }
    }
}

/// GPT-2's LM head at T = 512 (about 40 GFLOP): about 1 s on 2 cores; the bound leaves room
/// for a busy machine.
#[test]
fn lm_head_size_is_fast_enough() {
    let (m, k, n) = (512, 768, 50257);
    let mut rng = rng(5);
    let a = uniform(&mut rng, m * k, -1.0, 1.0);
    let b = uniform(&mut rng, n * k, -1.0, 1.0);
    let d = MatmulDims { batch: 1, m, n, k, trans_a: false, trans_b: true };
    let mut c = vec![0.0; m * n];
    let t0 = std::time::Instant::now();
    matmul_forward(&mut c, &a, &b, None, d);
    let secs = t0.elapsed().as_secs_f64();
    eprintln!("matmul_forward {m}x{k}x{n}: {secs:.2} s");
    for (i, j) in [(0, 0), (511, 50256), (100, 31337)] {
        let s: f64 = (0..k).map(|p| a[i * k + p] as f64 * b[j * k + p] as f64).sum();
        assert!((c[i * n + j] as f64 - s).abs() < 1e-4, "C[{i},{j}]");
    }
    assert!(secs < 30.0, "took {secs} s");
}
