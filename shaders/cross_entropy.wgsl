// Cross-entropy over the vocabulary fused with log-softmax, with PyTorch's ignore_index (-100).
// Logits may come in vocabulary chunks: xent_stats runs once per chunk and keeps a running
// (max, sum of exp, target logit) per row, so no chunk needs another in memory.
//   state[r] = (m, s, target_logit, _), s = sum exp(x - m) over the chunks seen so far
//   loss[r]  = m + log(s) - target_logit                        (0 for ignored rows)
//   dlogits  = (exp(x - m) / s - onehot(target)) * grad_scale   (0 for ignored rows)
// One workgroup per row for the statistics and the backward.

struct Params {
    rows: u32,
    ld: u32,       // row stride of this chunk's logits
    col0: u32,     // first vocabulary index in this chunk
    ncols: u32,    // vocabulary entries in this chunk
    row0: u32,     // first row in this chunk (row-split logits)
    first: u32,    // 1 = first chunk: initialise the state
    grad_scale: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<i32>;
@group(0) @binding(3) var<storage, read_write> state: array<f32>;   // (N, 4); finish: losses
@group(0) @binding(4) var<storage, read_write> dlogits: array<f32>;

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

@compute @workgroup_size(WG)
fn xent_stats(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_id) lid: vec3<u32>) {
    let lr = wid.y * nwg.x + wid.x;    // row within the chunk
    if (lr >= p.rows) {
        return;
    }
    let r = p.row0 + lr;
    let base = lr * p.ld;
    var m = -3.0e38;
    for (var j = lid.x; j < p.ncols; j += WG) {
        m = max(m, logits[base + j]);
    }
    m = reduce(lid.x, m, true);
    var s = 0.0;
    for (var j = lid.x; j < p.ncols; j += WG) {
        s += exp(logits[base + j] - m);
    }
    s = reduce(lid.x, s, false);
    if (lid.x == 0u) {
        var old_m = -3.0e38;
        var old_s = 0.0;
        var tl = 0.0;
        if (p.first == 0u) {
            old_m = state[4u * r];
            old_s = state[4u * r + 1u];
            tl = state[4u * r + 2u];
        }
        let new_m = max(old_m, m);
        state[4u * r] = new_m;
        state[4u * r + 1u] = old_s * exp(old_m - new_m) + s * exp(m - new_m);
        let t = targets[r];
        if (t >= 0 && u32(t) >= p.col0 && u32(t) < p.col0 + p.ncols) {
            tl = logits[base + u32(t) - p.col0];
        }
        state[4u * r + 2u] = tl;
    }
}

// binding 3 holds the state, binding 4 receives the per-row losses. One invocation per row.
@compute @workgroup_size(WG)
fn xent_loss(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = (wid.y * nwg.x + wid.x) * WG + lid.x;
    if (r >= p.rows) {
        return;
    }
    var loss = 0.0;
    if (targets[r] >= 0) {
        loss = state[4u * r] + log(state[4u * r + 1u]) - state[4u * r + 2u];
    }
    dlogits[r] = loss;
}

@compute @workgroup_size(WG)
fn xent_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_id) lid: vec3<u32>) {
    let lr = wid.y * nwg.x + wid.x;
    if (lr >= p.rows) {
        return;
    }
    let r = p.row0 + lr;
    let base = lr * p.ld;
    let t = targets[r];
    let m = state[4u * r];
    let inv_s = 1.0 / state[4u * r + 1u];
    for (var j = lid.x; j < p.ncols; j += WG) {
        var g = 0.0;
        if (t >= 0) {
            g = exp(logits[base + j] - m) * inv_s;
            if (u32(t) == p.col0 + j) {
                g -= 1.0;
            }
            g *= p.grad_scale;
        }
        dlogits[base + j] = g;
    }
}
