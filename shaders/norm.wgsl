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

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;       // forward: w; backward_dx: g
@group(0) @binding(3) var<storage, read_write> y: array<f32>; // forward: y; backward: dx or dw
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
    let base = r * p.cols;
    let n = f32(p.cols);
    var mean = 0.0;
    if (!RMS) {
        var s = 0.0;
        for (var j = lid.x; j < p.cols; j += WG) {
            s += x[base + j];
        }
        mean = row_sum(lid.x, s) / n;
    }
    var ss = 0.0;
    for (var j = lid.x; j < p.cols; j += WG) {
        let d = x[base + j] - mean;
        ss += d * d;
    }
    let rstd = inverseSqrt(row_sum(lid.x, ss) / n + p.eps);
    for (var j = lid.x; j < p.cols; j += WG) {
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
    let base = r * p.cols;
    let n = f32(p.cols);
    let mean = stats[2u * r];
    let rstd = stats[2u * r + 1u];
    var sg = 0.0;
    var sgx = 0.0;
    for (var j = lid.x; j < p.cols; j += WG) {
        let g = w[base + j];
        sg += g;
        sgx += g * (x[base + j] - mean) * rstd;
    }
    var mean_g = 0.0;
    if (!RMS) {
        mean_g = row_sum(lid.x, sg) / n;
    }
    let mean_gx = row_sum(lid.x, sgx) / n;
    for (var j = lid.x; j < p.cols; j += WG) {
        let xhat = (x[base + j] - mean) * rstd;
        var v = rstd * (w[base + j] - mean_g - xhat * mean_gx);
        if ((p.flags & 1u) != 0u) {
            v += y[base + j];
        }
        y[base + j] = v;
    }
}

// binding 2 holds dy; binding 3 receives dw (cols). One invocation per column, rows row0..row1
// in order.
@compute @workgroup_size(WG)
fn norm_backward_dw(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_id) lid: vec3<u32>) {
    let j = row_of(wid, nwg) * WG + lid.x;
    if (j >= p.cols) {
        return;
    }
    var s = 0.0;
    for (var r = p.row0; r < p.row1; r++) {
        let i = r * p.cols + j;
        s += w[i] * (x[i] - stats[2u * r]) * stats[2u * r + 1u];
    }
    if ((p.flags & 1u) != 0u) {
        s += y[j];
    }
    y[j] = s;
}
