//! The WGSL sources, compiled into the binary so that a phone needs no shader files beside it.
//! One file per kernel family in `shaders/`; `tests/shaders.rs` checks that every file there is
//! listed here and passes naga's validation and every back end.

/// (name, source) of every shader.
pub const SHADERS: &[(&str, &str)] = &[
    ("activation", include_str!("../shaders/activation.wgsl")),
    ("adamw", include_str!("../shaders/adamw.wgsl")),
    ("cross_entropy", include_str!("../shaders/cross_entropy.wgsl")),
    ("elementwise", include_str!("../shaders/elementwise.wgsl")),
    ("elementwise_vec4", include_str!("../shaders/elementwise_vec4.wgsl")),
    ("embedding", include_str!("../shaders/embedding.wgsl")),
    ("flash_attention", include_str!("../shaders/flash_attention.wgsl")),
    ("half", include_str!("../shaders/half.wgsl")),
    ("lm_head_loss", include_str!("../shaders/lm_head_loss.wgsl")),
    ("matmul", include_str!("../shaders/matmul.wgsl")),
    ("matmul_mixed", include_str!("../shaders/matmul_mixed.wgsl")),
    ("matmul_pack_a", include_str!("../shaders/matmul_pack_a.wgsl")),
    ("matmul_pack_b", include_str!("../shaders/matmul_pack_b.wgsl")),
    ("matmul_staged", include_str!("../shaders/matmul_staged.wgsl")),
    ("matmul_subgroup", include_str!("../shaders/matmul_subgroup.wgsl")),
    ("matmul_subgroup_c4", include_str!("../shaders/matmul_subgroup_c4.wgsl")),
    ("matmul_subgroup_narrow_m", include_str!("../shaders/matmul_subgroup_narrow_m.wgsl")),
    ("matmul_subgroup_narrow_n", include_str!("../shaders/matmul_subgroup_narrow_n.wgsl")),
    ("matmul_subgroup_uniform", include_str!("../shaders/matmul_subgroup_uniform.wgsl")),
    ("matmul_subgroup_uniform_texture", include_str!("../shaders/matmul_subgroup_uniform_texture.wgsl")),
    ("norm", include_str!("../shaders/norm.wgsl")),
    ("quant", include_str!("../shaders/quant.wgsl")),
    ("reduce", include_str!("../shaders/reduce.wgsl")),
    ("rope", include_str!("../shaders/rope.wgsl")),
    ("softmax", include_str!("../shaders/softmax.wgsl")),
];

/// The row kernels' reduction where a workgroup is one subgroup (`kernels::RowReduce`): no
/// workgroup memory and no barrier (lavapipe runs each barrier as a switch between the
/// workgroup's subgroups).
const SUBGROUP_REDUCE: &str = "fn reduce(lid: u32, v: f32, is_max: bool) -> f32 {
    if (is_max) {
        return subgroupMax(v);
    }
    return subgroupAdd(v);
}
";

/// Rows of vec4s for the norms: `V` four floats, `hsum` adding them.
const NORM_VEC4: &str = "alias V = vec4<f32>;
const VW: u32 = 4u;
fn hsum(v: V) -> f32 {
    return v.x + v.y + v.z + v.w;
}
";

/// Shaders made from another one: (name, the shader it is made from, a marker, what replaces
/// the lines between the base's `// MARKER begin` and `// MARKER end` lines). Markers in use:
/// `variant` (how a row is reduced, the inner product of a mixed kernel) and `element` (the
/// type a kernel reads and writes its elements as). A base may itself be derived (listed
/// before). A variant that needs f16 gets the `enable f16;` directive in front. One source for
/// all keeps a fix to one in the others.
pub const DERIVED: &[(&str, &str, &str, &str)] = &[
    ("softmax_subgroup", "softmax", "variant", SUBGROUP_REDUCE),
    ("activation_vec4", "activation", "element", "alias V = vec4<f32>;\n"),
    ("cross_entropy_subgroup", "cross_entropy", "variant", SUBGROUP_REDUCE),
    ("lm_head_loss_subgroup", "lm_head_loss", "variant", SUBGROUP_REDUCE),
    ("flash_attention_subgroup", "flash_attention", "variant", SUBGROUP_REDUCE),
    (
        "norm_subgroup",
        "norm",
        "variant",
        "fn row_sum(lid: u32, v: f32) -> f32 {
    return subgroupAdd(v);
}
",
    ),
    ("norm_vec4", "norm", "element", NORM_VEC4),
    ("norm_subgroup_vec4", "norm_subgroup", "element", NORM_VEC4),
    (
        "matmul_staged_mixed",
        "matmul_staged",
        "variant",
        "alias TILE = f16;
fn madd(x: TILE, y: vec4<TILE>, acc: vec4<f32>) -> vec4<f32> {
    return acc + vec4<f32>(x * y);
}
",
    ),
    (
        "quant_mixed",
        "quant",
        "variant",
        "fn dot_q(q: vec4<f32>, x0: vec4<f32>, x1: vec4<f32>, x2: vec4<f32>, x3: vec4<f32>) -> vec4<f32> {
    let h = vec4<f16>(q);
    return vec4<f32>(h.x * vec4<f16>(x0)) + vec4<f32>(h.y * vec4<f16>(x1))
        + vec4<f32>(h.z * vec4<f16>(x2)) + vec4<f32>(h.w * vec4<f16>(x3));
}
",
    ),
];

static DERIVED_SOURCES: std::sync::LazyLock<Vec<(&'static str, String)>> = std::sync::LazyLock::new(|| {
    let mut made: Vec<(&'static str, String)> = Vec::new();
    for &(name, base, marker, block) in DERIVED {
        let src = match SHADERS.iter().find(|(n, _)| *n == base) {
            Some((_, s)) => s.to_string(),
            None => made
                .iter()
                .find(|(n, _)| *n == base)
                .expect("a derived shader's base is listed before it")
                .1
                .clone(),
        };
        made.push((name, derive(&src, marker, block)));
    }
    made
});

/// `src` with the lines between its `// MARKER begin` and `// MARKER end` replaced by `block`.
fn derive(src: &str, marker: &str, block: &str) -> String {
    let (begin, end) = (format!("// {marker} begin\n"), format!("// {marker} end\n"));
    let from = src.find(&begin).expect("the base marks its block") + begin.len();
    let to = src.find(&end).expect("the base marks the end of its block");
    let prefix = if block.contains("f16") && !src.starts_with("enable f16;") { "enable f16;\n" } else { "" };
    format!("{prefix}{}{block}{}", &src[..from], &src[to..])
}

/// The WGSL of the shader `name` (a file of `shaders/` or one of [`DERIVED`]).
pub fn source(name: &str) -> Option<&'static str> {
    SHADERS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
        .or_else(|| DERIVED_SOURCES.iter().find(|(n, _)| *n == name).map(|(_, s)| s.as_str()))
}
