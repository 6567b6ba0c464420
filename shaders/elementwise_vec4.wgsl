// The hottest kernels of elementwise.wgsl four elements to an invocation, through vec4 loads
// and stores: for pieces whose length is a multiple of 4 (their bindings start 256-byte
// aligned, as every storage binding does). Same Params and bindings; n counts vec4s. On
// lavapipe a storage access is a loop over the lanes, so a vec4 access costs one loop for four
// elements: `add` 6.7-7.4 -> 2.7-3.5 ns an element (docs/perf.md).

struct Params {
    n: u32,       // vec4s to process
    cols: u32,
    out_off: u32,
    a_off: u32,
    b_off: u32,
    alpha: f32,
    beta: f32,
    shift: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> a: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> b: array<vec4<f32>>;

const WG: u32 = 256u;

fn index(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wid.y * nwg.x + wid.x) * WG + lid.x;
}

// out = alpha * a + beta * b
@compute @workgroup_size(WG)
fn add(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
       @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i < p.n) {
        out[i] = p.alpha * a[i] + p.beta * b[i];
    }
}

// out = alpha * a + beta * out  (scale, copy, accumulate)
@compute @workgroup_size(WG)
fn axpby(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i < p.n) {
        var v = p.alpha * a[i];
        if (p.beta != 0.0) {
            v += p.beta * out[i];
        }
        out[i] = v;
    }
}

// out = alpha
@compute @workgroup_size(WG)
fn fill(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i < p.n) {
        out[i] = vec4<f32>(p.alpha);
    }
}

// out[r, j] = a[r, j] * (b[j] + shift)   (cols: a row's vec4s)
@compute @workgroup_size(WG)
fn row_mul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i < p.n) {
        out[i] = a[i] * (b[i % p.cols] + p.shift);
    }
}

// out[r, j] += a[j]   (bias added to every row; cols: a row's vec4s)
@compute @workgroup_size(WG)
fn add_row(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i < p.n) {
        out[i] += a[i % p.cols];
    }
}

fn hash32(v: u32) -> u32 {
    var x = v;
    x ^= x >> 16u;
    x *= 0x7feb352du;
    x ^= x >> 15u;
    x *= 0x846ca68bu;
    x ^= x >> 16u;
    return x;
}

// elementwise.wgsl's dropout: element e = 4 i + c kept where hash32(e ^ hash32(seed)) passes.
@compute @workgroup_size(WG)
fn dropout(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i < p.n) {
        let k = hash32(p.cols);
        let e = 4u * i;
        let h = vec4<u32>(hash32(e ^ k), hash32((e + 1u) ^ k), hash32((e + 2u) ^ k), hash32((e + 3u) ^ k));
        out[i] = select(vec4<f32>(0.0), a[i] * p.alpha, h >= vec4<u32>(p.b_off));
    }
}
