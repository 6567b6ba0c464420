// Batched strided matrix product staged through workgroup memory, for GPUs where that memory
// is fast (desktop and phone GPUs): C = alpha * op(A) op(B) (+ bias) (+ C when accumulating).
// Same Params and operand meaning as matmul.wgsl; A and B are bound as arrays of vec4 (one
// binding each, as the phone limit of four storage buffers allows) so that an aligned, unit-
// stride run of four elements is one load, and any single element is still reachable as
// `a[e / 4][e % 4]` (pool buffers are whole multiples of 256 bytes, so no element is cut off).
//
// A workgroup of WG_M x WG_N invocations computes a BM x BN block of C (BM = WG_M * TM,
// BN = WG_N * TN) and walks K in steps of BK: it copies the BM x BK slice of A and the BK x BN
// slice of B into workgroup memory (K-major, four rows or columns per vec4), waits, and every
// invocation multiplies its TM x TN register block from there. An invocation's rows are TM / 4
// groups of four adjacent rows, the groups WG_M * 4 rows apart (columns likewise), so each
// read of workgroup memory is one vec4 and neighbouring invocations read neighbouring vec4s.
//
// How a slice is copied depends on the strides, decided once per dispatch (uniform branches):
// four elements adjacent in memory and 16-byte aligned are one vec4 load; otherwise (odd
// strides, unaligned offsets of views and chunks, ragged edges) element by element. Elements
// past M, N or K are copied as 0, so a partial tile needs no special case in the product.
//
// Loop trips per invocation (llvmpipe stops every loop once one invocation has run 65,535
// iterations in all): the Rust side cuts K so that the K steps of one dispatch, with the fixed
// loops inside each, stay under that (`kernels::matmul::staged_k_span`).

struct Params {
    m: u32, n: u32, k: u32, flags: u32,        // flags: 1 = add bias, 2 = accumulate into C
    a_off: u32, a_sm: u32, a_sk: u32, a_b1: u32,
    a_b2: u32, b_off: u32, b_sk: u32, b_sn: u32,
    b_b1: u32, b_b2: u32, c_off: u32, c_sm: u32,
    c_b1: u32, c_b2: u32, nb2: u32, bias_off: u32,
    alpha: f32, _pad0: u32, _pad1: u32, _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> b: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;

override WG_M: u32 = 16u;   // invocations along M
override WG_N: u32 = 16u;   // invocations along N
override TM: u32 = 4u;      // rows of C per invocation: 4 or 8
override TN: u32 = 4u;      // columns of C per invocation: 4 or 8
override BK: u32 = 16u;     // K step, a multiple of 4

// The arithmetic of the tiles: the one part that `matmul_staged_mixed` (`--precision mixed`,
// made from this file by src/shaders.rs) replaces. There the tiles hold f16 (half the
// workgroup memory and its bandwidth) and each product is taken in f16, the sums in f32, as in
// matmul_mixed.wgsl.
// variant begin
alias TILE = f32;
fn madd(x: TILE, y: vec4<TILE>, acc: vec4<f32>) -> vec4<f32> {
    return fma(vec4<f32>(x), y, acc);
}
// variant end

// Workgroup memory, K-major: sa[kk * BM / 4 + i / 4][i % 4] = A(m0 + i, k0 + kk).
var<workgroup> sa: array<vec4<TILE>, WG_M * TM * BK / 4u>;
var<workgroup> sb: array<vec4<TILE>, WG_N * TN * BK / 4u>;

// Register blocks of up to 8 x 8 (16 vec4); configurations use TM * TN / 4 of them.
const MAX_ACC: u32 = 16u;

fn a_at(e: u32) -> f32 {
    return a[e >> 2u][e & 3u];
}

fn b_at(e: u32) -> f32 {
    return b[e >> 2u][e & 3u];
}

// Four elements of A from element `e` on, `step` apart, the first `valid` of them real.
fn a_four(e: u32, step: u32, valid: u32, vec: bool) -> vec4<f32> {
    if (valid >= 4u && vec) {
        return a[e >> 2u];
    }
    var v = vec4<f32>(0.0);
    for (var j = 0u; j < min(valid, 4u); j++) {
        v[j] = a_at(e + j * step);
    }
    return v;
}

fn b_four(e: u32, step: u32, valid: u32, vec: bool) -> vec4<f32> {
    if (valid >= 4u && vec) {
        return b[e >> 2u];
    }
    var v = vec4<f32>(0.0);
    for (var j = 0u; j < min(valid, 4u); j++) {
        v[j] = b_at(e + j * step);
    }
    return v;
}

fn aligned(x: u32) -> bool {
    return (x & 3u) == 0u;
}

@compute @workgroup_size(WG_N, WG_M, 1)
fn matmul_staged(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
                @builtin(local_invocation_index) li: u32) {
    let bm = WG_M * TM;
    let bn = WG_N * TN;
    let bm4 = bm / 4u;
    let bn4 = bn / 4u;
    let bk4 = BK / 4u;
    let threads = WG_M * WG_N;
    let b1 = wid.z / p.nb2;
    let b2 = wid.z % p.nb2;
    let a_base = p.a_off + b1 * p.a_b1 + b2 * p.a_b2;
    let b_base = p.b_off + b1 * p.b_b1 + b2 * p.b_b2;
    let c_base = p.c_off + b1 * p.c_b1 + b2 * p.c_b2;
    let m0 = wid.y * bm;
    let n0 = wid.x * bn;

    // Which way four elements of a slice are adjacent and 16-byte aligned (uniform).
    let a_bases_aligned = aligned(p.a_off) && aligned(p.a_b1) && aligned(p.a_b2);
    let a_by_k = p.a_sk == 1u && a_bases_aligned && aligned(p.a_sm);
    let a_by_m = !a_by_k && p.a_sm == 1u && a_bases_aligned && aligned(p.a_sk);
    let b_bases_aligned = aligned(p.b_off) && aligned(p.b_b1) && aligned(p.b_b2);
    let b_by_n = p.b_sn == 1u && b_bases_aligned && aligned(p.b_sk);
    let b_by_k = !b_by_n && p.b_sk == 1u && b_bases_aligned && aligned(p.b_sn);

    var acc: array<vec4<f32>, MAX_ACC>;
    for (var i = 0u; i < TM * TN / 4u; i++) {
        acc[i] = vec4<f32>(0.0);
    }

    let steps = (p.k + BK - 1u) / BK;
    for (var s = 0u; s < steps; s++) {
        let k0 = s * BK;
        // A slice (BM x BK): BM * BK / 4 vec4s, the same number for every invocation.
        for (var u = li; u < bm4 * BK; u += threads) {
            if (a_by_k) {
                // four adjacent k of one row, spread over four vec4s of workgroup memory
                let i = u / bk4;
                let kk = (u % bk4) * 4u;
                var v = vec4<f32>(0.0);
                if (m0 + i < p.m && k0 + kk < p.k) {
                    v = a_four(a_base + (m0 + i) * p.a_sm + k0 + kk, 1u, p.k - k0 - kk, true);
                }
                for (var j = 0u; j < 4u; j++) {
                    sa[(kk + j) * bm4 + i / 4u][i % 4u] = TILE(v[j]);
                }
            } else {
                // four adjacent rows of one k (one vec4 when they are adjacent in memory)
                let kk = u / bm4;
                let i = (u % bm4) * 4u;
                var v = vec4<f32>(0.0);
                if (m0 + i < p.m && k0 + kk < p.k) {
                    v = a_four(a_base + (m0 + i) * p.a_sm + (k0 + kk) * p.a_sk, p.a_sm, p.m - m0 - i, a_by_m);
                }
                sa[kk * bm4 + i / 4u] = vec4<TILE>(v);
            }
        }
        // B slice (BK x BN)
        for (var u = li; u < bn4 * BK; u += threads) {
            if (b_by_k) {
                let jn = u / bk4;
                let kk = (u % bk4) * 4u;
                var v = vec4<f32>(0.0);
                if (n0 + jn < p.n && k0 + kk < p.k) {
                    v = b_four(b_base + (n0 + jn) * p.b_sn + k0 + kk, 1u, p.k - k0 - kk, true);
                }
                for (var j = 0u; j < 4u; j++) {
                    sb[(kk + j) * bn4 + jn / 4u][jn % 4u] = TILE(v[j]);
                }
            } else {
                let kk = u / bn4;
                let jn = (u % bn4) * 4u;
                var v = vec4<f32>(0.0);
                if (n0 + jn < p.n && k0 + kk < p.k) {
                    v = b_four(b_base + (k0 + kk) * p.b_sk + (n0 + jn) * p.b_sn, p.b_sn, p.n - n0 - jn, b_by_n);
                }
                sb[kk * bn4 + jn / 4u] = vec4<TILE>(v);
            }
        }
        workgroupBarrier();

        for (var kk = 0u; kk < BK; kk++) {
            var ra: array<vec4<TILE>, 2>;
            var rb: array<vec4<TILE>, 2>;
            for (var g = 0u; g < TM / 4u; g++) {
                ra[g] = sa[kk * bm4 + g * WG_M + lid.y];
            }
            for (var h = 0u; h < TN / 4u; h++) {
                rb[h] = sb[kk * bn4 + h * WG_N + lid.x];
            }
            for (var g = 0u; g < TM / 4u; g++) {
                let r = g * 4u * (TN / 4u);
                for (var h = 0u; h < TN / 4u; h++) {
                    let bv = rb[h];
                    acc[r + h] = madd(ra[g].x, bv, acc[r + h]);
                    acc[r + TN / 4u + h] = madd(ra[g].y, bv, acc[r + TN / 4u + h]);
                    acc[r + 2u * (TN / 4u) + h] = madd(ra[g].z, bv, acc[r + 2u * (TN / 4u) + h]);
                    acc[r + 3u * (TN / 4u) + h] = madd(ra[g].w, bv, acc[r + 3u * (TN / 4u) + h]);
                }
            }
        }
        workgroupBarrier();
    }

    // Row r of the block is row (r / 4 * WG_M + lid.y) * 4 + r % 4 of the tile; columns alike.
    for (var r = 0u; r < TM; r++) {
        let m = m0 + ((r / 4u) * WG_M + lid.y) * 4u + r % 4u;
        if (m >= p.m) {
            continue;
        }
        for (var h = 0u; h < TN / 4u; h++) {
            let n = n0 + (h * WG_N + lid.x) * 4u;
            store4(c_base + m * p.c_sm, n, acc[r * (TN / 4u) + h]);
        }
    }
}

fn store4(row: u32, n: u32, v: vec4<f32>) {
    for (var j = 0u; j < 4u; j++) {
        if (n + j < p.n) {
            var x = p.alpha * v[j];
            if ((p.flags & 1u) != 0u) {
                x += bias[p.bias_off + n + j];
            }
            let idx = row + n + j;
            if ((p.flags & 2u) != 0u) {
                x += c[idx];
            }
            c[idx] = x;
        }
    }
}
