//! Every kernel, forward and backward, on the GPU under the mobile limits profile against
//! `kernels-ref`, through the same checks `pockettune gradcheck` runs.

mod common;

use pockettune::gradcheck;

fn check(kernel: &str) {
    let Some(gpu) = common::gpu() else { return };
    let rows = gradcheck::check_kernel(gpu, kernel, 0x5eed, gradcheck::Tier::Quick)
        .unwrap_or_else(|e| panic!("{kernel}: {e}"));
    assert!(!rows.is_empty(), "{kernel}: no checks ran");
    for r in &rows {
        eprintln!(
            "{:<16} {:<9} {:>3} shapes  max rel err {:.2e} (tol {:.0e})  worst: {}",
            r.kernel,
            r.direction,
            r.shapes.len(),
            r.max_rel_err,
            r.tolerance,
            r.worst_shape
        );
    }
    let failed: Vec<_> = rows.iter().filter(|r| !r.pass).collect();
    assert!(failed.is_empty(), "{kernel} failed: {failed:#?}");
}

#[test]
fn matmul() {
    check("matmul");
}
#[test]
fn matmul_chunked() {
    check("matmul_chunked");
}
#[test]
fn matmul_batched() {
    check("matmul_batched");
}
/// The mixed-precision product (f16 products, f32 sums), on a device with shader_f16 (CI's
/// lavapipe has it; `check_kernel` returns no rows where a device lacks it).
#[test]
fn matmul_mixed() {
    check("matmul_mixed");
}
#[test]
fn softmax() {
    check("softmax");
}
#[test]
fn layernorm() {
    check("layernorm");
}
#[test]
fn rmsnorm() {
    check("rmsnorm");
}
#[test]
fn rmsnorm_gemma() {
    check("rmsnorm_gemma");
}
#[test]
fn gelu() {
    check("gelu");
}
#[test]
fn silu() {
    check("silu");
}
#[test]
fn softcap() {
    check("softcap");
}
#[test]
fn swiglu() {
    check("swiglu");
}
#[test]
fn geglu() {
    check("geglu");
}
#[test]
fn embedding() {
    check("embedding");
}
#[test]
fn rope() {
    check("rope");
}
#[test]
fn attention() {
    check("attention");
}
#[test]
fn flash_attention() {
    check("flash_attention");
}
#[test]
fn cross_entropy() {
    check("cross_entropy");
}
#[test]
fn add() {
    check("add");
}
#[test]
fn dropout() {
    check("dropout");
}
#[test]
fn half_storage() {
    check("half_storage");
}

#[test]
fn reduce() {
    check("reduce");
}
#[test]
fn clip_grad_norm() {
    check("clip_grad_norm");
}
#[test]
fn adamw() {
    check("adamw");
}
#[test]
fn sgd() {
    check("sgd");
}
#[test]
fn qmatmul() {
    check("qmatmul");
}
/// The quantized-weight product with f16 products (`--precision mixed`), as `matmul_mixed`.
#[test]
fn qmatmul_mixed() {
    check("qmatmul_mixed");
}
#[test]
fn qmatmul_dx() {
    check("qmatmul_dx");
}
#[test]
fn qembedding() {
    check("qembedding");
}

#[test]
fn lm_head_loss() {
    check("lm_head_loss");
}

/// Every name the CLI can report has a test above (a new kernel must be added to both).
#[test]
fn every_kernel_has_a_test() {
    let src = include_str!("kernels.rs");
    for k in gradcheck::KERNELS {
        assert!(src.contains(&format!("check(\"{k}\")")), "kernel {k} has no test in tests/kernels.rs");
    }
}
