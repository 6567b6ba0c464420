// Activations and gated MLP units, elementwise, forward and backward.
//   gelu(x)  = 0.5 x (1 + tanh(c (x + 0.044715 x^3))), c = sqrt(2/pi)   (GPT-2's "gelu_new")
//   silu(x)  = x sigmoid(x)
//   softcap(x) = c tanh(x / c)   (Gemma's logit soft-capping; c = p.cap)
//   swiglu   = silu(gate) * up,   geglu = gelu(gate) * up
// ACT selects the function: 0 = GELU (tanh), 1 = SiLU, 2 = softcap. The gated backward is split
// in two entry points (d gate, d up) to stay within four storage buffers. Two in-place entry
// points serve attention's capped scores, which have no spare buffer to write into.
// V is the element type: f32 here; `activation_vec4` (src/shaders.rs) makes it vec4<f32>, four
// elements an invocation, for pieces whose length is a multiple of 4 (p.n then counts vec4s).
// On lavapipe a storage access is a loop over the lanes; a vec4 access is one loop for four.

// element begin
alias V = f32;
// element end

struct Params {
    n: u32,
    flags: u32,   // 1 = accumulate into the output
    cap: f32,     // softcap's c
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<V>;        // x or gate
@group(0) @binding(2) var<storage, read> u: array<V>;        // dy (plain) or up (gated)
@group(0) @binding(3) var<storage, read_write> out: array<V>;
@group(0) @binding(4) var<storage, read> dy: array<V>;       // dy (gated backward)

override ACT: u32 = 0u;
const WG: u32 = 256u;
const SQRT_2_OVER_PI: f32 = 0.7978845608028654;

fn index(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wid.y * nwg.x + wid.x) * WG + lid.x;
}

// tanh through exp of a clamped argument: some mobile drivers return NaN for large |x|.
fn safe_tanh(z: V) -> V {
    let e = exp(-2.0 * clamp(abs(z), V(0.0), V(20.0)));
    return sign(z) * (1.0 - e) / (1.0 + e);
}

fn sigmoid(z: V) -> V {
    return 1.0 / (1.0 + exp(-clamp(z, V(-80.0), V(80.0))));
}

fn act(z: V) -> V {
    if (ACT == 0u) {
        return 0.5 * z * (1.0 + safe_tanh(SQRT_2_OVER_PI * (z + 0.044715 * z * z * z)));
    }
    if (ACT == 2u) {
        return p.cap * safe_tanh(z / p.cap);
    }
    return z * sigmoid(z);
}

fn act_grad(z: V) -> V {
    if (ACT == 2u) {
        let t = safe_tanh(z / p.cap);
        return 1.0 - t * t;
    }
    if (ACT == 0u) {
        let t = safe_tanh(SQRT_2_OVER_PI * (z + 0.044715 * z * z * z));
        let dt = SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * z * z);
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * dt;
    }
    let s = sigmoid(z);
    return s * (1.0 + z * (1.0 - s));
}

fn put(i: u32, v: V) {
    if ((p.flags & 1u) != 0u) {
        out[i] += v;
    } else {
        out[i] = v;
    }
}

@compute @workgroup_size(WG)
fn act_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i < p.n) {
        put(i, act(x[i]));
    }
}

// binding 2 holds dy
@compute @workgroup_size(WG)
fn act_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i < p.n) {
        put(i, act_grad(x[i]) * u[i]);
    }
}

// softcap only: dx (+)= dy * (1 - (y / c)^2) from the output y = c tanh(x / c) (binding 1
// holds y, binding 2 dy), so the input x need not be kept for the backward pass
@compute @workgroup_size(WG)
fn softcap_backward_from_output(@builtin(workgroup_id) wid: vec3<u32>,
                                @builtin(num_workgroups) nwg: vec3<u32>,
                                @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i < p.n) {
        let t = x[i] / p.cap;
        put(i, u[i] * (1.0 - t * t));
    }
}

// out = act(out)
@compute @workgroup_size(WG)
fn act_inplace(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i < p.n) {
        out[i] = act(out[i]);
    }
}

// out = out * act'(x): the chain rule through act, applied to a gradient in place
@compute @workgroup_size(WG)
fn act_grad_mul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i < p.n) {
        out[i] = out[i] * act_grad(x[i]);
    }
}

@compute @workgroup_size(WG)
fn glu_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i < p.n) {
        put(i, act(x[i]) * u[i]);
    }
}

// d gate = dy * up * act'(gate)
@compute @workgroup_size(WG)
fn glu_backward_gate(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i < p.n) {
        put(i, dy[i] * u[i] * act_grad(x[i]));
    }
}

// d up = dy * act(gate); binding 2 holds dy
@compute @workgroup_size(WG)
fn glu_backward_up(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i < p.n) {
        put(i, u[i] * act(x[i]));
    }
}
