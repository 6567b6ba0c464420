// The cross-entropy half of the fused LM head + loss (src/kernels/lm_head_loss.rs): one chunk of
// vocabulary columns of the logits at a time, each chunk computed by the matmul into a scratch
// buffer and consumed here, so the (rows x vocabulary) logits never exist whole.
// Same running state and ignore_index (-100) as cross_entropy.wgsl, with Gemma's final
// soft-cap applied as the chunk is read (cap = 0: none):
//   y = cap tanh(z / cap)
//   state[r] = (m, s, target_logit, _), s = sum exp(y - m) over the chunks seen so far
//   loss[r]  = m + log(s) - target_logit                              (0 for ignored rows)
//   dz       = (exp(y - m) / s - onehot(target)) * grad_scale * (1 - (y / cap)^2), in place
// One workgroup per row for the statistics and the gradient.

struct Params {
    rows: u32,
    ld: u32,       // row stride of the chunk
    col0: u32,     // first vocabulary index of the chunk
    ncols: u32,    // vocabulary entries in the chunk
    first: u32,    // 1 = first chunk: initialise the state
    grad_scale: f32,
    cap: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> chunk: array<f32>;    // (rows, ld) logits z; head_grad: -> dz
@group(0) @binding(2) var<storage, read> targets: array<i32>;
@group(0) @binding(3) var<storage, read_write> state: array<f32>;    // (rows, 4)
@group(0) @binding(4) var<storage, read_write> losses: array<f32>;   // (rows)

override WG: u32 = 64u;
var<workgroup> scratch: array<f32, 256>;

// tanh through exp of a clamped argument (as activation.wgsl: some mobile drivers return NaN
// for large |x|), so that the capped logits equal the composed soft-cap kernel's.
fn safe_tanh(z: f32) -> f32 {
    let e = exp(-2.0 * clamp(abs(z), 0.0, 20.0));
    return sign(z) * (1.0 - e) / (1.0 + e);
}

fn capped(z: f32) -> f32 {
    if (p.cap > 0.0) {
        return p.cap * safe_tanh(z / p.cap);
    }
    return z;
}

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
fn head_stats(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = wid.y * nwg.x + wid.x;
    if (r >= p.rows) {
        return;
    }
    let base = r * p.ld;
    var m = -3.0e38;
    for (var j = lid.x; j < p.ncols; j += WG) {
        m = max(m, capped(chunk[base + j]));
    }
    m = reduce(lid.x, m, true);
    var s = 0.0;
    for (var j = lid.x; j < p.ncols; j += WG) {
        s += exp(capped(chunk[base + j]) - m);
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
            tl = capped(chunk[base + u32(t) - p.col0]);
        }
        state[4u * r + 2u] = tl;
        state[4u * r + 3u] = 0.0;
    }
}

// One invocation per row: the per-row losses from the final state.
@compute @workgroup_size(WG)
fn head_loss(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = (wid.y * nwg.x + wid.x) * WG + lid.x;
    if (r >= p.rows) {
        return;
    }
    var loss = 0.0;
    if (targets[r] >= 0) {
        loss = state[4u * r] + log(state[4u * r + 1u]) - state[4u * r + 2u];
    }
    losses[r] = loss;
}

@compute @workgroup_size(WG)
fn head_grad(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = wid.y * nwg.x + wid.x;
    if (r >= p.rows) {
        return;
    }
    let base = r * p.ld;
    let t = targets[r];
    let m = state[4u * r];
    let inv_s = 1.0 / state[4u * r + 1u];
    for (var j = lid.x; j < p.ncols; j += WG) {
        var g = 0.0;
        if (t >= 0) {
            let y = capped(chunk[base + j]);
            g = exp(y - m) * inv_s;
            if (u32(t) == p.col0 + j) {
                g -= 1.0;
            }
            g *= p.grad_scale;
            if (p.cap > 0.0) {
                let u = y / p.cap;
                g *= 1.0 - u * u;
            }
        }
        chunk[base + j] = g;
    }
}
