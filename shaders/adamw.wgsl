// Optimizer steps over a flat parameter buffer, one invocation per element.
// AdamW exactly as torch.optim.AdamW (decoupled weight decay, bias correction):
//   p -= lr * wd * p
//   m  = b1 m + (1 - b1) g ;  v = b2 v + (1 - b2) g^2
//   p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps),  bc1 = 1 - b1^t, bc2 = 1 - b2^t
// SGD: p -= lr * (g + wd * p)
// `skip` (AdamW only): no change at all, decided on the GPU (see Params).

struct Params {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    step_size: f32,      // lr / bc1
    sqrt_bc2: f32,
    // Nonzero: leave param, m and v as they are (a step with a non-finite loss or gradient
    // norm). Written by the host as 0, or copied on the GPU from a step's status
    // (reduce.wgsl's clip_coef) into this uniform before the dispatch runs.
    skip: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> param: array<f32>;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;

const WG: u32 = 256u;

@compute @workgroup_size(WG)
fn adamw(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wid.y * nwg.x + wid.x) * WG + lid.x;
    if (i >= p.n || p.skip != 0.0) {
        return;
    }
    let g = grad[i];
    var w = param[i] * (1.0 - p.lr * p.weight_decay);
    let mi = p.beta1 * m[i] + (1.0 - p.beta1) * g;
    let vi = p.beta2 * v[i] + (1.0 - p.beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    w -= p.step_size * mi / (sqrt(vi) / p.sqrt_bc2 + p.eps);
    param[i] = w;
}

@compute @workgroup_size(WG)
fn sgd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
       @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wid.y * nwg.x + wid.x) * WG + lid.x;
    if (i >= p.n) {
        return;
    }
    param[i] -= p.lr * (grad[i] + p.weight_decay * param[i]);
}
