// Row-wise softmax (max-subtracted) and its backward, with the causal / sliding-window mask of
// attention built in. One workgroup per row.
//   y[j]  = exp(scale * x[j] - max) / sum   for visible j, 0 for masked j
//   dx[j] = scale * y[j] * (dy[j] - sum_k dy[k] * y[k])
// With the mask on, rows are (batch, head, query i) of a (.., T, T) score tensor:
// i = row % T, and key j is visible iff j <= i and i - j < window.

struct Params {
    rows: u32,
    cols: u32,
    causal: u32,
    window: u32,   // 0 = unlimited
    scale: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;        // forward: x; backward: y
@group(0) @binding(2) var<storage, read_write> y: array<f32>;  // forward: y; backward: dx
@group(0) @binding(3) var<storage, read> dy: array<f32>;

override WG: u32 = 64u;
var<workgroup> scratch: array<f32, 256>;

// The row's sum or max, in every invocation of the workgroup. The `_subgroup` variant
// (src/shaders.rs) replaces this block where the workgroup is one subgroup.
// variant begin
fn reduce(lid: u32, v: f32, is_max: bool) -> f32 {
    scratch[lid] = v;
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        workgroupBarrier();
        if (lid < stride) {
            if (is_max) {
                scratch[lid] = max(scratch[lid], scratch[lid + stride]);
            } else {
                scratch[lid] += scratch[lid + stride];
            }
        }
    }
    workgroupBarrier();
    let total = scratch[0];
    workgroupBarrier();
    return total;
}
// variant end

// Number of leading visible columns and first visible column of row r.
fn visible(r: u32) -> vec2<u32> {
    if (p.causal == 0u) {
        return vec2<u32>(0u, p.cols);
    }
    let i = r % p.cols;
    var lo = 0u;
    if (p.window != 0u && i + 1u > p.window) {
        lo = i + 1u - p.window;
    }
    return vec2<u32>(lo, i + 1u);
}

@compute @workgroup_size(WG)
fn softmax_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = wid.y * nwg.x + wid.x;
    if (r >= p.rows) {
        return;
    }
    let base = r * p.cols;
    let vis = visible(r);
    var m = -3.0e38;
    for (var j = vis.x + lid.x; j < vis.y; j += WG) {
        m = max(m, p.scale * x[base + j]);
    }
    m = reduce(lid.x, m, true);
    var s = 0.0;
    for (var j = vis.x + lid.x; j < vis.y; j += WG) {
        s += exp(p.scale * x[base + j] - m);
    }
    let inv = 1.0 / reduce(lid.x, s, false);
    for (var j = lid.x; j < p.cols; j += WG) {
        var v = 0.0;
        if (j >= vis.x && j < vis.y) {
            v = exp(p.scale * x[base + j] - m) * inv;
        }
        y[base + j] = v;
    }
}

@compute @workgroup_size(WG)
fn softmax_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = wid.y * nwg.x + wid.x;
    if (r >= p.rows) {
        return;
    }
    let base = r * p.cols;
    var s = 0.0;
    for (var j = lid.x; j < p.cols; j += WG) {
        s += dy[base + j] * x[base + j];
    }
    s = reduce(lid.x, s, false);
    for (var j = lid.x; j < p.cols; j += WG) {
        y[base + j] = p.scale * x[base + j] * (dy[base + j] - s);
    }
}
