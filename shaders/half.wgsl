// Activations held in 16 bits between the forward and the backward pass (`kernels::half`):
// f32 values packed two to a u32 word (element 2i in the low half), as IEEE f16 or as bf16,
// and unpacked back to f32. The conversions are integer arithmetic on the bits, so every
// device rounds alike (round to nearest, ties to even) and none needs shader_f16:
// - f16: finite values beyond f16's range saturate to +-65504 (an activation that large is
//   kept as large as f16 can say, not turned into an infinity); subnormals are kept;
//   infinities stay infinite, NaN stays NaN.
// - bf16: f32's exponent range, 8 significant bits; NaN stays NaN.
// Reference: `kernels_ref::half_round`.

struct Params {
    n: u32,      // f32 elements (words: ceil(n / 2))
    format: u32, // 0: f16, 1: bf16
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// pack: src holds f32 bits, dst words; unpack: src words, dst f32 bits. (Read and written as
// bits: no float load or store may flush a subnormal.)
@group(0) @binding(1) var<storage, read_write> dst: array<u32>;
@group(0) @binding(2) var<storage, read> src: array<u32>;

const WG: u32 = 256u;

fn index(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wid.y * nwg.x + wid.x) * WG + lid.x;
}

// `v` shifted right by `s` bits (1..=24), rounded to nearest, ties to even
fn shift_round(v: u32, s: u32) -> u32 {
    let kept = v >> s;
    let rest = v & ((1u << s) - 1u);
    let half = 1u << (s - 1u);
    if (rest > half || (rest == half && (kept & 1u) == 1u)) {
        return kept + 1u;
    }
    return kept;
}

fn to_f16(u: u32) -> u32 {
    let sign = (u >> 16u) & 0x8000u;
    let a = u & 0x7fffffffu;
    if (a > 0x7f800000u) {
        return sign | 0x7e00u; // NaN
    }
    if (a == 0x7f800000u) {
        return sign | 0x7c00u; // infinity
    }
    if (a >= 0x477ff000u) {
        return sign | 0x7bffu; // 65520 and up would round to infinity: saturate at 65504
    }
    if (a >= 0x38800000u) {
        // normal: rebias the exponent (127 -> 15), round the 13 dropped bits (a carry into
        // the exponent is the right answer)
        return sign | shift_round(a - 0x38000000u, 13u);
    }
    if (a <= 0x33000000u) {
        return sign; // at most 2^-25: rounds to zero (2^-25 itself is a tie, to even)
    }
    // subnormal f16: units of 2^-24; the f32 significand with its leading 1 times
    // 2^(e - 150) is that many units shifted right by 126 - e (14..24)
    let m = (a & 0x7fffffu) | 0x800000u;
    let e = a >> 23u;
    return sign | shift_round(m, 126u - e);
}

// the f32 bits of an f16
fn from_f16(h: u32) -> u32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if (e == 0u) {
        // zero or subnormal: m units of 2^-24, exact in f32 (a normal f32)
        return sign | bitcast<u32>(f32(m) * 5.9604644775390625e-8);
    }
    if (e == 31u) {
        return sign | 0x7f800000u | (m << 13u);
    }
    return sign | ((e + 112u) << 23u) | (m << 13u);
}

fn to_bf16(u: u32) -> u32 {
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (u >> 16u) | 0x40u; // NaN, kept quiet
    }
    return (u + 0x7fffu + ((u >> 16u) & 1u)) >> 16u;
}

fn from_bf16(h: u32) -> u32 {
    return h << 16u;
}

// the 16-bit form of the f32 with bits `x`
fn narrow(x: u32) -> u32 {
    if (p.format == 0u) {
        return to_f16(x);
    }
    return to_bf16(x);
}

// the f32 bits of a 16-bit form
fn widen(h: u32) -> u32 {
    if (p.format == 0u) {
        return from_f16(h);
    }
    return from_bf16(h);
}

// dst[w] = the 16-bit forms of src[2w] (low half) and src[2w + 1] (high; 0 past n)
@compute @workgroup_size(WG)
fn pack(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
    let w = index(wid, nwg, lid);
    let i = 2u * w;
    if (i >= p.n) {
        return;
    }
    var hi = 0u;
    if (i + 1u < p.n) {
        hi = narrow(src[i + 1u]);
    }
    dst[w] = narrow(src[i]) | (hi << 16u);
}

// dst[2w], dst[2w + 1] = the values of src[w]'s halves (the second only below n)
@compute @workgroup_size(WG)
fn unpack(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>) {
    let w = index(wid, nwg, lid);
    let i = 2u * w;
    if (i >= p.n) {
        return;
    }
    let word = src[w];
    dst[i] = widen(word & 0xffffu);
    if (i + 1u < p.n) {
        dst[i + 1u] = widen(word >> 16u);
    }
}
