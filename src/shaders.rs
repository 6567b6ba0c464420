//! The WGSL sources, compiled into the binary so that a phone needs no shader files beside it.
//! One file per kernel family in `shaders/`; `tests/shaders.rs` checks that every file there is
//! listed here and passes naga's validation and every back end.

/// (name, source) of every shader.
pub const SHADERS: &[(&str, &str)] = &[
    ("activation", include_str!("../shaders/activation.wgsl")),
    ("adamw", include_str!("../shaders/adamw.wgsl")),
    ("cross_entropy", include_str!("../shaders/cross_entropy.wgsl")),
    ("elementwise", include_str!("../shaders/elementwise.wgsl")),
    ("embedding", include_str!("../shaders/embedding.wgsl")),
    ("flash_attention", include_str!("../shaders/flash_attention.wgsl")),
    ("lm_head_loss", include_str!("../shaders/lm_head_loss.wgsl")),
    ("matmul", include_str!("../shaders/matmul.wgsl")),
    ("matmul_mixed", include_str!("../shaders/matmul_mixed.wgsl")),
    ("matmul_staged", include_str!("../shaders/matmul_staged.wgsl")),
    ("matmul_subgroup", include_str!("../shaders/matmul_subgroup.wgsl")),
    ("norm", include_str!("../shaders/norm.wgsl")),
    ("quant", include_str!("../shaders/quant.wgsl")),
    ("reduce", include_str!("../shaders/reduce.wgsl")),
    ("rope", include_str!("../shaders/rope.wgsl")),
    ("softmax", include_str!("../shaders/softmax.wgsl")),
];

pub fn source(name: &str) -> Option<&'static str> {
    SHADERS.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}
