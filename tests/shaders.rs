//! Every file in `shaders/` parses, validates (subgroup operations and f16 are the optional
//! capabilities allowed), and translates with naga's SPIR-V, MSL, HLSL and
//! GLSL back ends (GLSL only for shaders without f16) (default override constants), and is compiled into the binary. Runs without
//! a GPU.

use naga::back;
use naga::valid::{Capabilities, ValidationFlags, Validator};
use std::path::Path;

fn shader_files() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
        .expect("shaders/ exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "wgsl"))
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).expect("readable shader"))
        })
        .collect();
    files.sort();
    files
}

#[test]
fn every_shader_file_is_compiled_in() {
    let files = shader_files();
    assert!(files.len() >= 10, "expected the kernel families in shaders/, found {}", files.len());
    for (name, src) in &files {
        let embedded = pockettune::shaders::source(name)
            .unwrap_or_else(|| panic!("shaders/{name}.wgsl is not listed in src/shaders.rs"));
        assert_eq!(embedded, src, "shaders/{name}.wgsl differs from the embedded copy");
    }
    assert_eq!(files.len(), pockettune::shaders::SHADERS.len(), "src/shaders.rs lists a file that is gone");
}

/// The files of `shaders/` and the shaders made from them (`pockettune::shaders::DERIVED`).
fn all_shaders() -> Vec<(String, String)> {
    let derived = pockettune::shaders::DERIVED.iter().map(|&(name, ..)| {
        (name.to_string(), pockettune::shaders::source(name).expect("derived shaders are built").to_string())
    });
    shader_files().into_iter().chain(derived).collect()
}

#[test]
fn every_shader_validates_and_translates() {
    for (name, src) in all_shaders() {
        let module = naga::front::wgsl::parse_str(&src)
            .unwrap_or_else(|e| panic!("{name}.wgsl: {}", e.emit_to_string(&src)));
        let info =
            Validator::new(ValidationFlags::all(), Capabilities::SUBGROUP | Capabilities::SHADER_FLOAT16)
                .validate(&module)
                .unwrap_or_else(|e| panic!("{name}.wgsl does not validate: {e:?}"));
        let constants = back::PipelineConstants::default();
        let (module, info) = back::pipeline_constants::process_overrides(&module, &info, None, &constants)
            .unwrap_or_else(|e| panic!("{name}.wgsl overrides: {e:?}"));
        assert!(!module.entry_points.is_empty(), "{name}.wgsl has no entry point");
        // An f16 shader runs only where the device has shader_f16, which wgpu's GLES back end
        // never offers (and naga's GLSL writer has no f16); on D3D12 it needs shader model 6.2.
        let f16 = src.contains("enable f16;");

        for ep in &module.entry_points {
            let spv = back::spv::write_vec(
                &module,
                &info,
                &back::spv::Options::default(),
                Some(&back::spv::PipelineOptions { shader_stage: ep.stage, entry_point: ep.name.clone() }),
            )
            .unwrap_or_else(|e| panic!("{name}::{} to SPIR-V: {e:?}", ep.name));
            assert_eq!(spv[0], 0x0723_0203, "{name}::{}: SPIR-V magic number", ep.name);

            if f16 {
                continue;
            }
            let mut glsl = String::new();
            let options =
                back::glsl::Options { version: back::glsl::Version::new_gles(310), ..Default::default() };
            let pipeline = back::glsl::PipelineOptions {
                shader_stage: ep.stage,
                entry_point: ep.name.clone(),
                multiview: None,
            };
            back::glsl::Writer::new(&mut glsl, &module, &info, &options, &pipeline, Default::default())
                .and_then(|mut w| w.write())
                .unwrap_or_else(|e| panic!("{name}::{} to GLSL: {e:?}", ep.name));
            assert!(glsl.contains("void main()"), "{name}::{}: GLSL has no main", ep.name);
        }

        let (msl, _) = back::msl::write_string(
            &module,
            &info,
            &Default::default(),
            &back::msl::PipelineOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{name}.wgsl to MSL: {e:?}"));
        assert!(msl.contains("kernel"), "{name}.wgsl: MSL has no kernel function");

        let mut hlsl = String::new();
        let mut options = back::hlsl::Options::default();
        if f16 {
            options.shader_model = back::hlsl::ShaderModel::V6_2;
        }
        let pipeline = back::hlsl::PipelineOptions::default();
        back::hlsl::Writer::new(&mut hlsl, &options, &pipeline)
            .write(&module, &info, None)
            .unwrap_or_else(|e| panic!("{name}.wgsl to HLSL: {e:?}"));
        assert!(hlsl.contains("[numthreads("), "{name}.wgsl: HLSL has no compute entry point");
    }
}

/// The matrix-product kernels are filled from one Rust `Params`: the generated subgroup
/// kernel must carry matmul.wgsl's struct and bindings unchanged (regenerate it with
/// `tools/gen_matmul_subgroup.py 64 4` after editing them), and the staged kernel the same
/// struct and binding slots, with A and B read as vec4 arrays.
#[test]
fn matmul_kernels_share_one_interface() {
    let interface = |name: &str| {
        let src = pockettune::shaders::source(name).expect("compiled in");
        let start = src.find("struct Params {").expect("a Params struct");
        let end_marker = "var<storage, read> bias: array<f32>;";
        let end = src.find(end_marker).expect("a bias binding") + end_marker.len();
        src[start..end].to_string()
    };
    assert_eq!(interface("matmul_subgroup"), interface("matmul"));
    // the c4 form binds C as vec4s, the rest unchanged
    let c = "var<storage, read_write> c: array<f32>;";
    let c4 = "var<storage, read_write> c: array<vec4<f32>>;  // C as vec4s: this shader's own (c4)";
    assert_eq!(interface("matmul_subgroup_c4"), interface("matmul").replace(c, c4));
    assert_eq!(interface("matmul_mixed"), interface("matmul"));
    // The mixed kernel is matmul.wgsl with only its inner product changed (f16 products, f32
    // sums) and its entry point renamed: a fix to one must reach the other.
    let body = |name: &str| {
        let src = pockettune::shaders::source(name).expect("compiled in");
        src[src.find("struct Params {").expect("a Params struct")..].trim_end().to_string()
    };
    let plain = "        let bv = vec4<f32>(b[bc.x + bk], b[bc.y + bk], b[bc.z + bk], b[bc.w + bk]);
        acc0 = fma(vec4<f32>(a[ar.x + ak]), bv, acc0);
        acc1 = fma(vec4<f32>(a[ar.y + ak]), bv, acc1);
        acc2 = fma(vec4<f32>(a[ar.z + ak]), bv, acc2);
        acc3 = fma(vec4<f32>(a[ar.w + ak]), bv, acc3);
";
    let mixed =
        "        let bv = vec4<f16>(vec4<f32>(b[bc.x + bk], b[bc.y + bk], b[bc.z + bk], b[bc.w + bk]));
        let av = vec4<f16>(vec4<f32>(a[ar.x + ak], a[ar.y + ak], a[ar.z + ak], a[ar.w + ak]));
        acc0 += vec4<f32>(av.x * bv);
        acc1 += vec4<f32>(av.y * bv);
        acc2 += vec4<f32>(av.z * bv);
        acc3 += vec4<f32>(av.w * bv);
";
    let mixed_src = body("matmul_mixed");
    assert!(mixed_src.contains(mixed), "matmul_mixed.wgsl's inner product changed: update this test");
    let undone = mixed_src.replace(mixed, plain).replace("fn matmul_mixed(", "fn matmul(");
    assert_eq!(undone, body("matmul"), "matmul_mixed.wgsl drifted from matmul.wgsl");
    let vec4_operands = interface("matmul")
        .replace("var<storage, read> a: array<f32>;", "var<storage, read> a: array<vec4<f32>>;")
        .replace("var<storage, read> b: array<f32>;", "var<storage, read> b: array<vec4<f32>>;");
    assert_eq!(interface("matmul_staged"), vec4_operands);
    // The staged kernel's mixed form is made from it (src/shaders.rs): the same interface, f16
    // tiles.
    assert_eq!(interface("matmul_staged_mixed"), vec4_operands);
    let staged_mixed = pockettune::shaders::source("matmul_staged_mixed").expect("derived");
    assert!(staged_mixed.starts_with("enable f16;") && staged_mixed.contains("alias TILE = f16;"));
    assert!(!pockettune::shaders::source("matmul_staged").unwrap().contains("enable f16"));
}

/// The benches' probe shaders (`benches/*.wgsl`, run by `cargo bench`, which CI does not) parse
/// and validate, so that a probe does not rot unseen.
#[test]
fn bench_probe_shaders_validate() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches");
    let mut seen = 0;
    for path in std::fs::read_dir(&dir).expect("benches/ exists").map(|e| e.expect("readable entry").path()) {
        if path.extension().is_none_or(|e| e != "wgsl") {
            continue;
        }
        let src = std::fs::read_to_string(&path).expect("readable shader");
        let module = naga::front::wgsl::parse_str(&src)
            .unwrap_or_else(|e| panic!("{}: {}", path.display(), e.emit_to_string(&src)));
        Validator::new(ValidationFlags::all(), Capabilities::SUBGROUP)
            .validate(&module)
            .unwrap_or_else(|e| panic!("{} does not validate: {e:?}", path.display()));
        seen += 1;
    }
    assert!(seen >= 1, "expected benches/load_paths.wgsl");
}
