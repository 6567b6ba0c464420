//! `cargo bench --bench load_paths`: what one load per lane costs on the default adapter, by
//! the path it takes: a storage buffer (every kernel's loads today), a uniform buffer and a
//! sampled texture (`textureLoad`), next to the same loop without loads, in one run
//! (`benches/load_paths.wgsl`). On lavapipe a storage load becomes a loop over the lanes with a
//! bounds check and a branch each, while uniform and texel loads are built as vector gathers;
//! this measures by how much, to decide whether a matmul reading its operands through textures
//! could pay for the copies into them (docs/perf.md). `-- --tile-costs` instead times where a
//! k step of `subgroup-uniform`'s texture kernel goes ([`tile_costs`]), and `-- --constant-b`
//! times a layout with lanes on rows and B at constant addresses against it ([`constant_b`];
//! `POCKETTUNE_PROBE_TILES="2x8 1x16"` picks its tiles). Set `POCKETTUNE_DEVICE` to pick the
//! adapter.

use pockettune::gpu::{adapter, rgba_texture};
use std::time::Instant;

const K: u32 = 2048;
const GROUPS: u32 = 512;

fn main() {
    let instance = adapter::instance();
    let adapters = adapter::enumerate(&instance);
    let spec = std::env::var(pockettune::gpu::DEVICE_ENV).ok();
    let (index, summary) = adapter::select(&adapters, spec.as_deref()).expect("a GPU adapter");
    let adapter = &adapters[index];
    println!("device: {summary}");
    let desc = wgpu::DeviceDescriptor {
        label: Some("load_paths"),
        required_features: adapter.features() & wgpu::Features::SUBGROUP,
        required_limits: wgpu::Limits::downlevel_defaults(),
        ..Default::default()
    };
    let (device, queue) = pollster::block_on(adapter.request_device(&desc)).expect("a device");
    if std::env::args().any(|a| a == "--tile-costs") {
        return tile_costs(&device, &queue);
    }
    if std::env::args().any(|a| a == "--constant-b") {
        return constant_b(&device, &queue);
    }

    let data: Vec<f32> = (0..4096).map(|i| (i % 7) as f32 * 0.25).collect();
    let bytes: &[u8] = bytemuck::cast_slice(&data);
    let buffer = |usage: wgpu::BufferUsages, contents: &[u8]| {
        let b = device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: contents.len() as u64,
            usage: usage | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        queue.write_buffer(&b, 0, contents);
        b
    };
    let params = buffer(wgpu::BufferUsages::UNIFORM, bytemuck::cast_slice(&[K, 0, 0, 0]));
    let out = buffer(wgpu::BufferUsages::STORAGE, &vec![0u8; (GROUPS * 64 * 4) as usize]);
    let storage = buffer(wgpu::BufferUsages::STORAGE, bytes);
    let uniform = buffer(wgpu::BufferUsages::UNIFORM, bytes);
    let size = wgpu::Extent3d { width: 64, height: 64, depth_or_array_layers: 1 };
    let texture = device.create_texture(&wgpu::TextureDescriptor {
        label: None,
        size,
        mip_level_count: 1,
        sample_count: 1,
        dimension: wgpu::TextureDimension::D2,
        format: wgpu::TextureFormat::R32Float,
        usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
        view_formats: &[],
    });
    queue.write_texture(
        wgpu::TexelCopyTextureInfo {
            texture: &texture,
            mip_level: 0,
            origin: wgpu::Origin3d::ZERO,
            aspect: wgpu::TextureAspect::All,
        },
        bytes,
        wgpu::TexelCopyBufferLayout { offset: 0, bytes_per_row: Some(256), rows_per_image: Some(64) },
        size,
    );
    let view = texture.create_view(&Default::default());

    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("load_paths"),
        source: wgpu::ShaderSource::Wgsl(include_str!("load_paths.wgsl").into()),
    });
    let loads = (GROUPS * 64) as f64 * K as f64 * 8.0;
    let mut baseline = None;
    let entries = [
        "no_loads",
        "storage_loads",
        "storage_vec4_loads",
        "storage_shared_address",
        "uniform_loads",
        "texture_loads",
        "broadcasts",
    ];
    for entry in entries {
        if entry == "broadcasts" && !device.features().contains(wgpu::Features::SUBGROUP) {
            println!("{entry:<18} (no subgroups on this device)");
            continue;
        }
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        });
        let source = match entry {
            "storage_loads" | "storage_shared_address" => Some((2, storage.as_entire_binding())),
            "storage_vec4_loads" => Some((5, storage.as_entire_binding())),
            "uniform_loads" => Some((3, uniform.as_entire_binding())),
            "texture_loads" => Some((4, wgpu::BindingResource::TextureView(&view))),
            _ => None,
        };
        let mut entries = vec![
            wgpu::BindGroupEntry { binding: 0, resource: params.as_entire_binding() },
            wgpu::BindGroupEntry { binding: 1, resource: out.as_entire_binding() },
        ];
        entries.extend(source.map(|(binding, resource)| wgpu::BindGroupEntry { binding, resource }));
        let group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        let run = || {
            let mut encoder = device.create_command_encoder(&Default::default());
            {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                pass.set_pipeline(&pipeline);
                pass.set_bind_group(0, &group, &[]);
                pass.dispatch_workgroups(GROUPS, 1, 1);
            }
            queue.submit([encoder.finish()]);
            device.poll(wgpu::PollType::wait_indefinitely()).expect("the device");
        };
        run(); // compiles the pipeline
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let start = Instant::now();
            run();
            best = best.min(start.elapsed().as_secs_f64());
        }
        let ns = best * 1e9 / loads; // 8 floats a lane per k on every path (broadcasts: 8 values)
        let extra =
            baseline.map_or(String::new(), |b: f64| format!("   {:>6.3} ns a load beyond the loop", ns - b));
        println!("{entry:<18} {:>8.1} ms   {ns:>6.3} ns a lane-load{extra}", best * 1e3);
        if entry == "no_loads" {
            baseline = Some(ns);
        }
    }

    matmul_probe(&device, &queue);
}

/// The subgroup matmul (`shaders/matmul_subgroup.wgsl`) on GPT-2's `mlp.c_fc` forward product
/// (512 x 768 . 768 x 3072), as shipped and with its loads of A (or of A and B) taken from a
/// 16 KiB uniform window instead (the phone limit on a uniform binding). The window variants
/// read the wrong values (indices wrap inside the window): they time what the product would
/// cost if its operands came through uniform loads, they do not compute it.
fn matmul_probe(device: &wgpu::Device, queue: &wgpu::Queue) {
    let shipped = include_str!("../shaders/matmul_subgroup.wgsl");
    let window = "@group(0) @binding(5) var<uniform> win: array<vec4<f32>, 1024>;
fn w(i: u32) -> f32 {
    let j = i % 4096u;
    return win[j / 4u][j % 4u];
}
";
    // A's eight loads a k step, then B's four, rewritten to read the window
    let mut a_uniform = shipped.replace("@compute", &format!("{window}\n@compute"));
    for r in 0..8 {
        a_uniform = a_uniform.replace(&format!("a[ra{r} + ak]"), &format!("w(ra{r} + ak)"));
    }
    // B's four scalar loads a step as one load of 4 adjacent columns: a vec4 from storage, or
    // an RGBA32F texel (texel (n / 4, k) holds B's row k, columns n..n + 3: B itself)
    let bv = "vec4<f32>(b[cb0 + bk], b[cb1 + bk], b[cb2 + bk], b[cb3 + bk])";
    let b_vec4 = a_uniform
        .replace("@compute", "@group(0) @binding(6) var<storage, read> b4: array<vec4<f32>>;\n@compute")
        .replace(bv, "b4[(cb0 + bk) / 4u]");
    let b_texel = a_uniform
        .replace("@compute", "@group(0) @binding(7) var bt: texture_2d<f32>;\n@compute")
        .replace(bv, "textureLoad(bt, vec2<u32>(cb0 / 4u, kk), 0)");
    assert_eq!(b_texel.matches("textureLoad").count(), 1, "the shipped kernel's loads of B changed");
    let mut both = a_uniform.clone();
    for c in 0..4 {
        both = both.replace(&format!("b[cb{c} + bk]"), &format!("w(cb{c} + bk)"));
    }
    assert_eq!(
        a_uniform.matches("w(ra").count(),
        8,
        "the shipped kernel's loads of A changed: update the probe"
    );
    assert_eq!(both.matches("w(cb").count(), 4, "the shipped kernel's loads of B changed: update the probe");
    let (m, n, k) = (512u32, 3072u32, 768u32);
    let buffer = |usage, len: usize| buffer(device, usage, len as u32);
    let p = params(device, queue, m, n, k);
    let storage = wgpu::BufferUsages::STORAGE;
    let (a, b, c, bias) = (
        buffer(storage, (m * k) as usize),
        buffer(storage, (k * n) as usize),
        buffer(storage, (m * n) as usize),
        buffer(storage, n as usize),
    );
    let win = buffer(wgpu::BufferUsages::UNIFORM, 4096);
    let b_texture = rgba_texture(device, n / 4, k, "B");
    let b_view = b_texture.create_view(&Default::default());
    println!("subgroup matmul, mlp.c_fc forward {m}x{k}.{k}x{n}:");
    for (name, source) in [
        ("shipped (storage loads)", shipped.to_string()),
        ("A from a uniform window", a_uniform),
        ("A uniform, B vec4 storage", b_vec4),
        ("A uniform, B RGBA32F texels", b_texel),
        ("A and B from uniform windows", both),
    ] {
        let pipeline = pipeline(device, name, &source, "matmul_subgroup");
        let mut entries = vec![(0, &p), (2, &b), (3, &c), (4, &bias)];
        if name.starts_with("shipped") {
            entries.push((1, &a));
        } else {
            entries.push((5, &win));
        }
        if name.contains("and B") || name.contains(", B") {
            entries.retain(|e| e.0 != 2);
        }
        if name.contains("vec4") {
            entries.push((6, &b));
        }
        let mut entries: Vec<_> = entries
            .into_iter()
            .map(|(binding, buf)| wgpu::BindGroupEntry { binding, resource: buf.as_entire_binding() })
            .collect();
        if name.contains("texels") {
            entries.push(wgpu::BindGroupEntry {
                binding: 7,
                resource: wgpu::BindingResource::TextureView(&b_view),
            });
        }
        let group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        let run = || {
            let mut encoder = device.create_command_encoder(&Default::default());
            {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                pass.set_pipeline(&pipeline);
                pass.set_bind_group(0, &group, &[]);
                pass.dispatch_workgroups(n / 256, m / 64, 1);
            }
            queue.submit([encoder.finish()]);
            device.poll(wgpu::PollType::wait_indefinitely()).expect("the device");
        };
        run();
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let start = Instant::now();
            run();
            best = best.min(start.elapsed().as_secs_f64());
        }
        let gflops = 2.0 * (m * n) as f64 * k as f64 / best / 1e9;
        println!("  {name:<30} {:>8.1} ms {gflops:>8.2} GFLOP/s", best * 1e3);
    }
}

/// Where a k step of `subgroup-uniform`'s texture kernel goes (`--tile-costs`, alone): the
/// shipped shader on one dispatch's piece of `mlp.c_fc`'s forward (64 rows, 512 steps, 3,072
/// columns, 8 dispatches a run) next to textual variants of it that drop one cost each. The
/// variants compute wrong values; they time what is left without that cost. Rounds alternate
/// the variants; the median of each is printed.
fn tile_costs(device: &wgpu::Device, queue: &wgpu::Queue) {
    let shipped = include_str!("../shaders/matmul_subgroup_uniform_texture.wgsl");
    let no_b = |s: &str| {
        (0..8).fold(s.to_string(), |s, w| {
            s.replace(&format!("textureLoad(bt, vec2<u32>(tx, {}u + kk), 0)", 64 * w), "x0 * 1.0001")
        })
    };
    let no_broadcast = |s: &str| {
        (0..16).fold(s.to_string(), |s, i| {
            s.replace(
                &format!("subgroupBroadcast(x{}, {}u)", i / 8, i % 8),
                &format!("(x{} + vec4<f32>({i}.0))", i / 8),
            )
        })
    };
    let free_a = |s: &str| {
        (0..8).fold(s.to_string(), |s, w| {
            s.replace(&format!("aw{w}[kk * 16u + lane]"), &format!("(aw{w}[3u] + vec4<f32>(f32(kk)))"))
                .replace(
                    &format!("aw{w}[kk * 16u + 8u + lane]"),
                    &format!("(aw{w}[5u] + vec4<f32>(f32(kk)))"),
                )
        })
    };
    // each lane loads all 16 vec4s of A's step from the window (one address for every lane)
    // instead of 2 and 16 broadcasts: the same values
    let a_loads = |s: &str| {
        let mut window = 0;
        let lines = s.lines().map(|line| {
            if let Some(w) = (0..8).find(|w| line.contains(&format!("aw{w}[kk * 16u + lane]"))) {
                window = w;
            }
            match (0..16).find(|i| line.contains(&format!("subgroupBroadcast(x{}, {}u)", i / 8, i % 8))) {
                Some(i) => format!("        let y{i} = aw{window}[kk * 16u + {i}u];"),
                None => line.to_string(),
            }
        });
        lines.collect::<Vec<_>>().join("\n")
    };
    let variants = [
        ("shipped", shipped.to_string()),
        ("A 16 loads, no broadcasts", a_loads(shipped)),
        ("no B texel loads", no_b(shipped)),
        ("no broadcasts", no_broadcast(shipped)),
        ("neither", no_broadcast(&no_b(shipped))),
        ("A at a fixed address", free_a(shipped)),
    ];
    for (name, source) in &variants[1..] {
        assert_ne!(source, shipped, "{name}: the shipped kernel changed; update the probe");
    }
    let (m, n, k) = TEXTURE_PIECE;
    let runs = texture_kernel_runs(device, queue, &variants);
    println!(
        "subgroup-uniform's texture kernel, 8 x (64 x 512 . 512 x 3072), median of 7 alternating rounds:"
    );
    for ((name, _), ms) in variants.iter().zip(medians(&runs, 7)) {
        let gflops = 2.0 * 8.0 * (m * n * k) as f64 / ms / 1e6;
        println!("  {name:<22} {ms:>7.1} ms {gflops:>7.2} GFLOP/s");
    }
}

/// One dispatch's piece of `mlp.c_fc`'s forward for the texture kernel: 64 rows, 3,072
/// columns, 512 steps (M, N, K).
const TEXTURE_PIECE: (u32, u32, u32) = (64, 3072, 512);

/// A run of each of `variants` (name, WGSL source) of `subgroup-uniform`'s texture kernel:
/// [`TEXTURE_PIECE`] 8 times, on unwritten operands; the first run of each compiles it.
fn texture_kernel_runs(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    variants: &[(&str, String)],
) -> Vec<Box<dyn Fn()>> {
    let (m, n, k) = TEXTURE_PIECE;
    let buffer = |usage, len: u32| buffer(device, usage, len);
    let p = params(device, queue, m, n, k);
    let (c, bias) = (buffer(wgpu::BufferUsages::STORAGE, m * n), buffer(wgpu::BufferUsages::STORAGE, n));
    let windows: Vec<_> = (0..8).map(|_| buffer(wgpu::BufferUsages::UNIFORM, 4096)).collect();
    let texture = rgba_texture(device, n / 4, k, "B");
    let view = texture.create_view(&Default::default());
    let runs: Vec<Box<dyn Fn()>> = variants
        .iter()
        .map(|(name, source)| {
            let pipeline = pipeline(device, name, source, "matmul_subgroup");
            // bindings a variant no longer reads are gone from its layout
            let mut entries = vec![
                wgpu::BindGroupEntry { binding: 0, resource: p.as_entire_binding() },
                wgpu::BindGroupEntry { binding: 3, resource: c.as_entire_binding() },
                wgpu::BindGroupEntry { binding: 4, resource: bias.as_entire_binding() },
            ];
            for (w, window) in windows.iter().enumerate() {
                if source.contains(&format!("aw{w}[")) {
                    entries.push(wgpu::BindGroupEntry {
                        binding: 5 + w as u32,
                        resource: window.as_entire_binding(),
                    });
                }
            }
            if source.contains("textureLoad") {
                entries.push(wgpu::BindGroupEntry {
                    binding: 13,
                    resource: wgpu::BindingResource::TextureView(&view),
                });
            }
            let group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &pipeline.get_bind_group_layout(0),
                entries: &entries,
            });
            let run: Box<dyn Fn()> = Box::new(dispatcher(device, queue, pipeline, group, 8, n / 256));
            run();
            run
        })
        .collect();
    runs
}

/// Records `count` dispatches of `groups` workgroups, submits them and waits.
fn dispatcher(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    pipeline: wgpu::ComputePipeline,
    group: wgpu::BindGroup,
    count: usize,
    groups: u32,
) -> impl Fn() {
    let (device, queue) = (device.clone(), queue.clone());
    move || {
        let mut encoder = device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &group, &[]);
            for _ in 0..count {
                pass.dispatch_workgroups(groups, 1, 1);
            }
        }
        queue.submit([encoder.finish()]);
        device.poll(wgpu::PollType::wait_indefinitely()).expect("the device");
    }
}

/// Median milliseconds of each of `runs` over `rounds` rounds, the runs alternating in a round.
fn medians(runs: &[Box<dyn Fn()>], rounds: usize) -> Vec<f64> {
    let mut times = vec![Vec::new(); runs.len()];
    for _ in 0..rounds {
        for (run, t) in runs.iter().zip(&mut times) {
            let start = Instant::now();
            run();
            t.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[rounds / 2]
        })
        .collect()
}

/// A compute pipeline of `entry` in the WGSL `source`, its layout derived from the shader.
fn pipeline(device: &wgpu::Device, label: &str, source: &str, entry: &str) -> wgpu::ComputePipeline {
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(label),
        source: wgpu::ShaderSource::Wgsl(source.into()),
    });
    device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(label),
        layout: None,
        module: &module,
        entry_point: Some(entry),
        compilation_options: Default::default(),
        cache: None,
    })
}

/// The product with lanes on rows: each lane owns `r` rows of C and `nb` columns, A comes
/// through an RGBA32F texture (texel (k / 4, row) holds 4 steps of a row: one gather a lane per
/// 4 steps) and B through a uniform window read at constant addresses (every k step unrolled, so
/// llvmpipe loads each of B's values once for the subgroup instead of gathering it). One dispatch
/// covers all rows, `nb` columns and `ku` steps (`nb * ku` = one 16 KiB window). Timing only:
/// every dispatch reads the same window and adds into the same columns.
fn constant_b_source(r: usize, nb: usize, ku: usize) -> String {
    use std::fmt::Write;
    let mut s = String::from(
        "struct P { m: u32, n: u32, n0: u32, k4: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var at: texture_2d<f32>;
@group(0) @binding(2) var<uniform> bw: array<vec4<f32>, 1024>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
",
    );
    writeln!(s, "    let row0 = gid.x * {r}u;").unwrap();
    for i in 0..r {
        for j in 0..nb {
            writeln!(s, "    var c{i}_{j} = 0.0;").unwrap();
        }
    }
    for q in 0..ku / 4 {
        for i in 0..r {
            writeln!(s, "    let a{i}_{q} = textureLoad(at, vec2<u32>(p.k4 + {q}u, row0 + {i}u), 0);")
                .unwrap();
        }
        for t in 0..4 {
            let kk = 4 * q + t;
            for j in 0..nb {
                let e = kk * nb + j;
                writeln!(s, "    let b{kk}_{j} = bw[{}][{}];", e / 4, e % 4).unwrap();
                for i in 0..r {
                    writeln!(s, "    c{i}_{j} = fma(a{i}_{q}[{t}], b{kk}_{j}, c{i}_{j});").unwrap();
                }
            }
        }
    }
    for i in 0..r {
        for j in 0..nb {
            writeln!(s, "    c[(row0 + {i}u) * p.n + p.n0 + {j}u] += c{i}_{j};").unwrap();
        }
    }
    s.push_str("}\n");
    s
}

/// `--constant-b`: [`constant_b_source`]'s layouts against the shipped texture kernel on the same
/// FLOPs (512 x 512 . 512 x 3072), rounds alternating, medians printed.
fn constant_b(device: &wgpu::Device, queue: &wgpu::Queue) {
    let (m, n, k) = (512u32, 3072u32, 512u32);
    let flops = 2.0 * (m * n) as f64 * k as f64;
    let shipped = include_str!("../shaders/matmul_subgroup_uniform_texture.wgsl");
    // the shipped kernel on the same FLOPs: 8 pieces of 64 rows, as in --tile-costs
    assert_eq!((TEXTURE_PIECE.0 * 8, TEXTURE_PIECE.1, TEXTURE_PIECE.2), (m, n, k));
    let mut names = vec!["shipped texture kernel".to_string()];
    let mut runs = texture_kernel_runs(device, queue, &[("shipped", shipped.to_string())]);
    // rows x columns a lane; each takes about a minute to compile on lavapipe
    let configs: Vec<(usize, usize)> = std::env::var("POCKETTUNE_PROBE_TILES")
        .unwrap_or_else(|_| "2x8".into())
        .split_whitespace()
        .map(|c| {
            let (r, nb) = c.split_once('x').expect("POCKETTUNE_PROBE_TILES: tiles as RxN, e.g. 2x8");
            (r.parse().expect("rows"), nb.parse().expect("columns"))
        })
        .collect();
    for (r, nb) in configs {
        let ku = (4096 / nb) / 4 * 4;
        let start = Instant::now();
        let pipeline = pipeline(device, "constant b", &constant_b_source(r, nb, ku), "main");
        let p = buffer(device, wgpu::BufferUsages::UNIFORM, 4);
        queue.write_buffer(&p, 0, bytemuck::cast_slice(&[m, n, 0, 0]));
        let c = buffer(device, wgpu::BufferUsages::STORAGE, m * n);
        let window = buffer(device, wgpu::BufferUsages::UNIFORM, 4096);
        let texture = rgba_texture(device, k / 4, m, "A");
        let view = texture.create_view(&Default::default());
        let entries = [
            wgpu::BindGroupEntry { binding: 0, resource: p.as_entire_binding() },
            wgpu::BindGroupEntry { binding: 1, resource: wgpu::BindingResource::TextureView(&view) },
            wgpu::BindGroupEntry { binding: 2, resource: window.as_entire_binding() },
            wgpu::BindGroupEntry { binding: 3, resource: c.as_entire_binding() },
        ];
        let group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        let dispatches = (n as usize / nb) * (k as usize).div_ceil(ku);
        let run = dispatcher(device, queue, pipeline, group, dispatches, m / 64 / r as u32);
        run();
        println!(
            "{r} rows x {nb} columns a lane, {ku} steps a dispatch: {dispatches} dispatches, \
             compiled and run once in {:.1} s",
            start.elapsed().as_secs_f64()
        );
        names.push(format!("lanes on rows, {r} x {nb}"));
        runs.push(Box::new(run));
    }
    println!("512 x 512 . 512 x 3072, median of 5 alternating rounds:");
    for (name, ms) in names.iter().zip(medians(&runs, 5)) {
        println!("  {name:<28} {ms:>8.1} ms {:>7.2} GFLOP/s", flops / ms / 1e6);
    }
}

/// A buffer of `len` floats.
fn buffer(device: &wgpu::Device, usage: wgpu::BufferUsages, len: u32) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: len as u64 * 4,
        usage: usage | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}

/// The matmul Params (`shaders/matmul.wgsl`) of a dense row-major (m, k) x (k, n) product.
fn params(device: &wgpu::Device, queue: &wgpu::Queue, m: u32, n: u32, k: u32) -> wgpu::Buffer {
    let mut params = [0u32; 24];
    params[..3].copy_from_slice(&[m, n, k]);
    params[5] = k; // a_sm
    params[6] = 1; // a_sk
    params[10] = n; // b_sk
    params[11] = 1; // b_sn
    params[15] = n; // c_sm
    params[18] = 1; // nb2
    params[20] = 1f32.to_bits(); // alpha
    let p = buffer(device, wgpu::BufferUsages::UNIFORM, 24);
    queue.write_buffer(&p, 0, bytemuck::cast_slice(&params));
    p
}
