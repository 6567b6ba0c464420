// Rotary position embedding, rotate-half layout (Hugging Face Llama/Qwen/Gemma), on (B,T,H,D).
// For i < D/2, with c = cos(t, i) and s = sin(t, i) from a host-built table:
//   y[i]       = x[i] c - x[i + D/2] s
//   y[i + D/2] = x[i + D/2] c + x[i] s
// The backward is the inverse rotation: the same kernel with s negated (sign = -1).
// cs layout: cos (T, D/2) followed by sin (T, D/2).

struct Params {
    n: u32,      // B * T * H * D/2 pairs
    t: u32,
    h: u32,
    half: u32,   // D/2
    sign: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> cs: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

const WG: u32 = 256u;

@compute @workgroup_size(WG)
fn rope(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
    let q = (wid.y * nwg.x + wid.x) * WG + lid.x;
    if (q >= p.n) {
        return;
    }
    let i = q % p.half;
    let head = q / p.half;           // (b, t, h) flattened
    let t = (head / p.h) % p.t;
    let base = head * 2u * p.half;
    let c = cs[t * p.half + i];
    let s = p.sign * cs[p.t * p.half + t * p.half + i];
    let x1 = x[base + i];
    let x2 = x[base + i + p.half];
    y[base + i] = x1 * c - x2 * s;
    y[base + i + p.half] = x2 * c + x1 * s;
}
