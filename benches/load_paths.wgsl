// The cost of one load per lane, by the path it takes, for `cargo bench --bench load_paths`.
// Every entry point runs the same loop: per k, 8 loads at addresses that differ across the
// lanes (as the subgroup matmul's loads of A do: lane l reads row l), summed so that none can
// be dropped. The addresses stay inside 4,096 floats (16 KiB: in cache whatever the path), so
// what is timed is the load instruction sequence the driver generates, not memory.

struct Params {
    k: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> s: array<f32>;
@group(0) @binding(3) var<uniform> u: array<vec4<f32>, 1024>;
@group(0) @binding(4) var t: texture_2d<f32>;

const ROWS: u32 = 512u; // 8 rows of 512 floats, one per lane of an 8-lane group

fn base(lid: u32) -> u32 {
    return (lid % 8u) * ROWS;
}

@compute @workgroup_size(64)
fn storage_loads(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let b = base(lid.x);
    var acc = 0.0;
    for (var k = 0u; k < p.k; k++) {
        let i = b + (k % ROWS);
        acc += s[i] + s[(i + 64u) % 4096u] + s[(i + 128u) % 4096u] + s[(i + 192u) % 4096u]
            + s[(i + 256u) % 4096u] + s[(i + 320u) % 4096u] + s[(i + 384u) % 4096u] + s[(i + 448u) % 4096u];
    }
    out[gid.x] = acc;
}

fn ub(i: u32) -> f32 {
    let j = i % 4096u;
    return u[j / 4u][j % 4u];
}

@compute @workgroup_size(64)
fn uniform_loads(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let b = base(lid.x);
    var acc = 0.0;
    for (var k = 0u; k < p.k; k++) {
        let i = b + (k % ROWS);
        acc += ub(i) + ub(i + 64u) + ub(i + 128u) + ub(i + 192u)
            + ub(i + 256u) + ub(i + 320u) + ub(i + 384u) + ub(i + 448u);
    }
    out[gid.x] = acc;
}

fn tx(i: u32) -> f32 {
    let j = i % 4096u;
    return textureLoad(t, vec2<u32>(j % 64u, j / 64u), 0).x;
}

@compute @workgroup_size(64)
fn texture_loads(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let b = base(lid.x);
    var acc = 0.0;
    for (var k = 0u; k < p.k; k++) {
        let i = b + (k % ROWS);
        acc += tx(i) + tx(i + 64u) + tx(i + 128u) + tx(i + 192u)
            + tx(i + 256u) + tx(i + 320u) + tx(i + 384u) + tx(i + 448u);
    }
    out[gid.x] = acc;
}

// The loop and the sums alone: what the three above cost beyond their loads.
@compute @workgroup_size(64)
fn no_loads(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let b = base(lid.x);
    var acc = 0.0;
    for (var k = 0u; k < p.k; k++) {
        let i = b + (k % ROWS);
        acc += f32(i) + f32(i + 64u) + f32(i + 128u) + f32(i + 192u)
            + f32(i + 256u) + f32(i + 320u) + f32(i + 384u) + f32(i + 448u);
    }
    out[gid.x] = acc;
}

@group(0) @binding(5) var<storage, read> s4: array<vec4<f32>>;

// The same 8 floats as two vec4 loads from a storage buffer.
@compute @workgroup_size(64)
fn storage_vec4_loads(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let b = base(lid.x) / 4u;
    var acc = vec4<f32>(0.0);
    for (var k = 0u; k < p.k; k++) {
        let i = b + (k % (ROWS / 4u));
        acc += s4[i] + s4[(i + 16u) % 1024u];
    }
    out[gid.x] = acc.x + acc.y + acc.z + acc.w;
}

// No loads: 8 values handed across an 8-lane group by subgroupBroadcast, as the subgroup
// matmul shares its loads of A.
@compute @workgroup_size(64)
fn broadcasts(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let b = base(lid.x);
    var acc = 0.0;
    for (var k = 0u; k < p.k; k++) {
        let x = f32(b + (k % ROWS));
        acc += subgroupBroadcast(x, 0u) + subgroupBroadcast(x, 1u) + subgroupBroadcast(x, 2u)
            + subgroupBroadcast(x, 3u) + subgroupBroadcast(x, 4u) + subgroupBroadcast(x, 5u)
            + subgroupBroadcast(x, 6u) + subgroupBroadcast(x, 7u);
    }
    out[gid.x] = acc;
}

// Storage loads at an address every lane of the workgroup shares (it depends on the workgroup
// and k alone): a compiler that knows the address is uniform may load once for all lanes.
@compute @workgroup_size(64)
fn storage_shared_address(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let b = (wid.x % 8u) * ROWS;
    var acc = 0.0;
    for (var k = 0u; k < p.k; k++) {
        let i = b + (k % ROWS);
        acc += s[i] + s[(i + 64u) % 4096u] + s[(i + 128u) % 4096u] + s[(i + 192u) % 4096u]
            + s[(i + 256u) % 4096u] + s[(i + 320u) % 4096u] + s[(i + 384u) % 4096u] + s[(i + 448u) % 4096u];
    }
    out[gid.x] = acc + f32(gid.x);
}
