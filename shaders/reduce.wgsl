// Reductions. Every sum is taken in a fixed order, so results are the same on every run.
//
// sum_rows:      out[j] (+)= sum over rows r of x[r, j]          (bias and LayerNorm-beta grads)
// partial_sums:  partial[g] = sum (or sum of squares) of x over workgroup g's 4096 elements
// finish_sum:    acc[slot] += sum of partial[0..count]           (one workgroup)
// clip_coef:     a step's status acc = [sum of squares of the gradients, clip coefficient,
//                sum of the losses, skip]: acc[1] = min(1, max_norm / (sqrt(acc[0]) + 1e-6))
//                (PyTorch clip_grad_norm_; 1 when max_norm is 0), acc[3] = 1 when acc[0] or
//                acc[2] is not finite (the update is skipped: adamw.wgsl's `skip`), else 0

struct Params {
    rows: u32,
    cols: u32,
    n: u32,
    flags: u32,     // sum_rows: 1 = accumulate; partial_sums: 1 = square
    x_off: u32,
    slot: u32,
    max_norm: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;

const WG: u32 = 256u;
const PER_THREAD: u32 = 16u;
var<workgroup> scratch: array<f32, WG>;

@compute @workgroup_size(WG)
fn sum_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_id) lid: vec3<u32>) {
    let j = (wid.y * nwg.x + wid.x) * WG + lid.x;
    if (j >= p.cols) {
        return;
    }
    var s = 0.0;
    for (var r = 0u; r < p.rows; r++) {
        s += x[p.x_off + r * p.cols + j];
    }
    if ((p.flags & 1u) != 0u) {
        s += out[j];
    }
    out[j] = s;
}

fn tree_sum(lid: u32) {
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        workgroupBarrier();
        if (lid < stride) {
            scratch[lid] += scratch[lid + stride];
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(WG)
fn partial_sums(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_id) lid: vec3<u32>) {
    let g = wid.y * nwg.x + wid.x;
    let base = g * WG * PER_THREAD;
    var s = 0.0;
    for (var t = 0u; t < PER_THREAD; t++) {
        let i = base + t * WG + lid.x;
        if (i < p.n) {
            let v = x[p.x_off + i];
            if ((p.flags & 1u) != 0u) {
                s += v * v;
            } else {
                s += v;
            }
        }
    }
    scratch[lid.x] = s;
    tree_sum(lid.x);
    if (lid.x == 0u) {
        out[g] = scratch[0];
    }
}

// `x` holds `n` partial sums; the result is added into out[slot].
@compute @workgroup_size(WG)
fn finish_sum(@builtin(local_invocation_id) lid: vec3<u32>) {
    var s = 0.0;
    for (var i = lid.x; i < p.n; i += WG) {
        s += x[i];
    }
    scratch[lid.x] = s;
    tree_sum(lid.x);
    if (lid.x == 0u) {
        out[p.slot] += scratch[0];
    }
}

fn finite(x: f32) -> bool {
    // By the exponent's bits: a compiler may assume `x == x` of every float.
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

// The step's status (see the header): the clip coefficient (1 with no clipping), and whether
// the update is skipped: a non-finite sum of squares or loss sum.
@compute @workgroup_size(1)
fn clip_coef() {
    let norm = sqrt(out[0]);
    if (p.max_norm > 0.0) {
        out[1] = min(1.0, p.max_norm / (norm + 1e-6));
    } else {
        out[1] = 1.0;
    }
    out[3] = select(1.0, 0.0, finite(out[0]) && finite(out[2]));
}
