// Elementwise and broadcast kernels over flat f32 buffers. One invocation per element; the
// grid may use two dimensions when a tensor has more than 65535 workgroups' worth of elements.

struct Params {
    n: u32,       // elements to process
    cols: u32,    // row length, for the row-broadcast kernels
    out_off: u32,
    a_off: u32,
    b_off: u32,
    alpha: f32,
    beta: f32,
    shift: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> a: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;

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
        out[p.out_off + i] = p.alpha * a[p.a_off + i] + p.beta * b[p.b_off + i];
    }
}

// out = alpha * a + beta * out  (scale, copy, accumulate)
@compute @workgroup_size(WG)
fn axpby(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i < p.n) {
        let o = p.out_off + i;
        var v = p.alpha * a[p.a_off + i];
        if (p.beta != 0.0) {
            v += p.beta * out[o];
        }
        out[o] = v;
    }
}

// out = alpha
@compute @workgroup_size(WG)
fn fill(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i < p.n) {
        out[p.out_off + i] = p.alpha;
    }
}

// out[r, j] = a[r, j] * (b[j] + shift)   (b is a row vector of `cols` elements)
@compute @workgroup_size(WG)
fn row_mul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i < p.n) {
        out[p.out_off + i] = a[p.a_off + i] * (b[p.b_off + i % p.cols] + p.shift);
    }
}

// out[r, j] += a[j]   (bias added to every row)
@compute @workgroup_size(WG)
fn add_row(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i < p.n) {
        out[p.out_off + i] += a[p.a_off + i % p.cols];
    }
}

// out *= a[a_off]   (a scale computed on the GPU, e.g. the gradient-clipping coefficient)
@compute @workgroup_size(WG)
fn scale_by(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i < p.n) {
        out[p.out_off + i] *= a[p.a_off];
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

// Inverted dropout with a mask hashed from (seed, index): out = a / (1 - p) where kept, else 0.
// `cols` holds the seed and `b_off` the drop threshold p * 2^32; `alpha` is 1 / (1 - p).
@compute @workgroup_size(WG)
fn dropout(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i < p.n) {
        var v = 0.0;
        if (hash32(i ^ hash32(p.cols)) >= p.b_off) {
            v = a[p.a_off + i] * p.alpha;
        }
        out[p.out_off + i] = v;
    }
}
