// LayerNorm and RMSNorm over the last dimension, forward and backward. One workgroup per row.
//
// Forward saves stats (rows, 2) = (mean, rstd); RMSNorm stores mean = 0. The LayerNorm bias
// is added afterwards by elementwise::add_row, and the backward takes g = dy * (w + shift)
// precomputed by elementwise::row_mul: a phone allows four storage buffers per dispatch.
//   xhat = (x - mean) * rstd
//   y    = xhat * (w + shift)
//   dx   = rstd * (g - mean(g) - xhat * mean(g * xhat))     (LayerNorm)
//   dx   = rstd * (g - xhat * mean(g * xhat))               (RMSNorm)
//   dw   = sum over rows of dy * xhat

struct Params {
    rows: u32,
    cols: u32,
    flags: u32,   // 1 = accumulate into the output (dx or dw)
    row0: u32,    // backward_dw: the rows row0..row1 are summed (a span per dispatch)
    eps: f32,
    shift: f32,   // 1.0 for Gemma's (1 + w), else 0.0
    row1: u32,
    _pad: u32,
}

// V is the element x, w and y are read and written as, VW floats: f32 here; the `_vec4` variants
// (src/shaders.rs) make it vec4<f32> for rows whose length is a multiple of 4 (on lavapipe a
// storage access is a loop over the lanes: a vec4 access is one loop for four floats). hsum adds
// a V's floats.
// element begin
alias V = f32;
const VW: u32 = 1u;
fn hsum(v: V) -> f32 {
    return v;
}
// element end

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<V>;
@group(0) @binding(2) var<storage, read> w: array<V>;       // forward: w; backward_dx: g
@group(0) @binding(3) var<storage, read_write> y: array<V>; // forward: y; backward: dx or dw
@group(0) @binding(4) var<storage, read_write> stats: array<f32>;

override WG: u32 = 64u;
override RMS: bool = false;
var<workgroup> scratch: array<f32, 256>;

// The row's sum, in every invocation of the workgroup. The `_subgroup` variant
// (src/shaders.rs) replaces this block where the workgroup is one subgroup.
// variant begin
fn row_sum(lid: u32, v: f32) -> f32 {
    scratch[lid] = v;
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        workgroupBarrier();
        if (lid < stride) {
            scratch[lid] += scratch[lid + stride];
        }
    }
    workgroupBarrier();
    let total = scratch[0];
    workgroupBarrier();
    return total;
}
// variant end

fn row_of(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.y * nwg.x + wid.x;
}

@compute @workgroup_size(WG)
fn norm_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = row_of(wid, nwg);
    if (r >= p.rows) {
        return;
    }
    let nv = p.cols / VW;
    let base = r * nv;
    let n = f32(p.cols);
    var mean = 0.0;
    if (!RMS) {
        var s = V(0.0);
        for (var j = lid.x; j < nv; j += WG) {
            s += x[base + j];
        }
        mean = row_sum(lid.x, hsum(s)) / n;
    }
    var ss = V(0.0);
    for (var j = lid.x; j < nv; j += WG) {
        let d = x[base + j] - mean;
        ss += d * d;
    }
    let rstd = inverseSqrt(row_sum(lid.x, hsum(ss)) / n + p.eps);
    for (var j = lid.x; j < nv; j += WG) {
        y[base + j] = (x[base + j] - mean) * rstd * (w[j] + p.shift);
    }
    if (lid.x == 0u) {
        stats[2u * r] = mean;
        stats[2u * r + 1u] = rstd;
    }
}

// binding 2 holds g = dy * (w + shift); binding 3 receives dx.
@compute @workgroup_size(WG)
fn norm_backward_dx(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = row_of(wid, nwg);
    if (r >= p.rows) {
        return;
    }
    let nv = p.cols / VW;
    let base = r * nv;
    let n = f32(p.cols);
    let mean = stats[2u * r];
    let rstd = stats[2u * r + 1u];
    var sg = V(0.0);
    var sgx = V(0.0);
    for (var j = lid.x; j < nv; j += WG) {
        let g = w[base + j];
        sg += g;
        sgx += g * (x[base + j] - mean) * rstd;
    }
    var mean_g = 0.0;
    if (!RMS) {
        mean_g = row_sum(lid.x, hsum(sg)) / n;
    }
    let mean_gx = row_sum(lid.x, hsum(sgx)) / n;
    for (var j = lid.x; j < nv; j += WG) {
        let xhat = (x[base + j] - mean) * rstd;
        var v = rstd * (w[base + j] - mean_g - xhat * mean_gx);
        if ((p.flags & 1u) != 0u) {
            v += y[base + j];
        }
        y[base + j] = v;
    }
}

// binding 2 holds dy; binding 3 receives dw (cols). One invocation per V of columns, rows
// row0..row1 in order.
@compute @workgroup_size(WG)
fn norm_backward_dw(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_id) lid: vec3<u32>) {
    let j = row_of(wid, nwg) * WG + lid.x;
    let nv = p.cols / VW;
    if (j >= nv) {
        return;
    }
    var s = V(0.0);
    for (var r = p.row0; r < p.row1; r++) {
        let i = r * nv + j;
        s += w[i] * (x[i] - stats[2u * r]) * stats[2u * r + 1u];
    }
    if ((p.flags & 1u) != 0u) {
        s += y[j];
    }
    y[j] = s;
}
