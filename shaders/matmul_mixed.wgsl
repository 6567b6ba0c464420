// The mixed-precision matrix product (`--precision mixed`): matmul.wgsl's product, with each
// element of A and B rounded to f16 as it is read and each product a * b taken in f16, the
// sum kept in f32. Operands stay f32 in memory; what changes is the arithmetic, which phone
// GPUs (Adreno, Mali) run at twice the f32 rate. Products of two f16 values are exact in f32
// but rounded to f16 here (relative error at most 2^-11 each, plus 2^-11 for each operand's
// own rounding), so C is within about 3 * 2^-11 * sum_k |a_ik b_kj| of the exact product;
// tests/mixed_precision.rs holds it to that bound.
//
// Same Params, bindings and tile as matmul.wgsl (a 4 x 4 register tile per invocation, strided
// by the workgroup, no workgroup memory); needs the `shader_f16` feature.

enable f16;

struct Params {
    m: u32, n: u32, k: u32, flags: u32,        // flags: 1 = add bias, 2 = accumulate into C
    a_off: u32, a_sm: u32, a_sk: u32, a_b1: u32,
    a_b2: u32, b_off: u32, b_sk: u32, b_sn: u32,
    b_b1: u32, b_b2: u32, c_off: u32, c_sm: u32,
    c_b1: u32, c_b2: u32, nb2: u32, bias_off: u32,
    alpha: f32, _pad0: u32, _pad1: u32, _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;

override WG_M: u32 = 16u;
override WG_N: u32 = 16u;

@compute @workgroup_size(WG_N, WG_M, 1)
fn matmul_mixed(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let b1 = wid.z / p.nb2;
    let b2 = wid.z % p.nb2;
    let a_base = p.a_off + b1 * p.a_b1 + b2 * p.a_b2;
    let b_base = p.b_off + b1 * p.b_b1 + b2 * p.b_b2;
    let c_base = p.c_off + b1 * p.c_b1 + b2 * p.c_b2;
    let m0 = wid.y * WG_M * 4u + lid.y;
    let n0 = wid.x * WG_N * 4u + lid.x;

    // Out-of-range rows and columns read a valid element (clamped) and are not stored.
    let last_m = p.m - 1u;
    let last_n = p.n - 1u;
    let ar = vec4<u32>(
        a_base + min(m0, last_m) * p.a_sm,
        a_base + min(m0 + WG_M, last_m) * p.a_sm,
        a_base + min(m0 + 2u * WG_M, last_m) * p.a_sm,
        a_base + min(m0 + 3u * WG_M, last_m) * p.a_sm);
    let bc = vec4<u32>(
        b_base + min(n0, last_n) * p.b_sn,
        b_base + min(n0 + WG_N, last_n) * p.b_sn,
        b_base + min(n0 + 2u * WG_N, last_n) * p.b_sn,
        b_base + min(n0 + 3u * WG_N, last_n) * p.b_sn);

    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    var ak = 0u;
    var bk = 0u;
    for (var kk = 0u; kk < p.k; kk++) {
        let bv = vec4<f16>(vec4<f32>(b[bc.x + bk], b[bc.y + bk], b[bc.z + bk], b[bc.w + bk]));
        let av = vec4<f16>(vec4<f32>(a[ar.x + ak], a[ar.y + ak], a[ar.z + ak], a[ar.w + ak]));
        acc0 += vec4<f32>(av.x * bv);
        acc1 += vec4<f32>(av.y * bv);
        acc2 += vec4<f32>(av.z * bv);
        acc3 += vec4<f32>(av.w * bv);
        ak += p.a_sk;
        bk += p.b_sk;
    }
    store_row(c_base, m0, n0, acc0);
    store_row(c_base, m0 + WG_M, n0, acc1);
    store_row(c_base, m0 + 2u * WG_M, n0, acc2);
    store_row(c_base, m0 + 3u * WG_M, n0, acc3);
}

fn store_row(c_base: u32, m: u32, n0: u32, acc: vec4<f32>) {
    if (m >= p.m) {
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        let n = n0 + j * WG_N;
        if (n < p.n) {
            var v = p.alpha * acc[j];
            if ((p.flags & 1u) != 0u) {
                v += bias[p.bias_off + n];
            }
            let idx = c_base + m * p.c_sm + n;
            if ((p.flags & 2u) != 0u) {
                v += c[idx];
            }
            c[idx] = v;
        }
    }
}
