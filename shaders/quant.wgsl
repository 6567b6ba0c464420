// Products and gathers through a frozen weight W kept in its stored GGUF format (F16, BF16 or a
// ggml block type), dequantized as it is read:
//   qmatmul:    y (M,N)  = x (M,K) . W^T (+ bias) (+ y)      TN columns n, TM rows each
//   qmatmul_dx: dx (M,K) = dy (M,N) . W (+ dx)               TK columns k, TM rows each
//   qgather:    out (n,C) = rows ids of W                    four columns of one row each
//   dequantize: out (R,K) = rows 0..R of W, as f32           one sub-block of one row each
// W is a chunk of whole rows, each row K/QK consecutive blocks of BLOCK_BYTES bytes, exactly the
// bytes of the file, read as array<u32> through byte helpers (rows and blocks need not be
// 4-byte aligned: a Q4_0 block is 18 bytes). The layouts are ggml's (`block_*` in
// ggml-common.h, `dequantize_row_*` in ggml-quants.c); kernels-ref's `quant` module is the
// reference. The storage type is an override constant, so each pipeline holds only its type's
// decoder.
//
// Every type decodes the same way here: an element is scale * q + offset, where q is the integer
// quant (or, for F16/BF16, the value itself with scale 1) and (scale, offset) is shared by the
// SUB consecutive elements of a sub-block (32 for Q4_0..Q8_0, Q4_K and Q5_K; 16 for Q6_K; for
// the float types a group of 4). qmatmul therefore decodes each sub-block's scale once and sums
// q * x and x over the sub-block before scaling. Data-dependent loops (K in qmatmul, N in
// qmatmul_dx) run over one span per dispatch; the host adds the spans (see src/kernels).

struct Params {
    m: u32,        // qmatmul, qmatmul_dx: rows of the output piece; qgather: ids; dequantize: rows of W
    n: u32,        // qmatmul: columns of y; qmatmul_dx: rows of W summed here; qgather: table rows in this chunk
    k: u32,        // qmatmul: K of this span; qmatmul_dx: columns of dx; qgather, dequantize: C (K)
    flags: u32,    // 1 = add bias, 2 = accumulate into the output
    x_off: u32,    // qmatmul: x; qmatmul_dx: dy (element offset and row stride)
    x_ld: u32,
    y_off: u32,    // qmatmul: y; qmatmul_dx: dx; dequantize: out
    y_ld: u32,
    w_off: u32,    // byte offset of the first row of W used (within this chunk)
    w_ld: u32,     // bytes per row of W
    w_k0: u32,     // the column of W (element) where the piece starts
    bias_off: u32,
    row0: u32,     // qgather: the table row this chunk starts at
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// qmatmul: x; qmatmul_dx: dy (both f32, read as their bits); qgather: token ids
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;

// ggml type ids (enum ggml_type)
const F16: u32 = 1u;
const Q4_0: u32 = 2u;
const Q4_1: u32 = 3u;
const Q5_0: u32 = 6u;
const Q5_1: u32 = 7u;
const Q8_0: u32 = 8u;
const Q4_K: u32 = 12u;
const Q5_K: u32 = 13u;
const Q6_K: u32 = 14u;
const BF16: u32 = 30u;

override TYPE: u32 = 8u;          // a ggml type id from the list above
override QK: u32 = 32u;           // elements per block (1 for F16/BF16)
override BLOCK_BYTES: u32 = 34u;
override SUB: u32 = 32u;          // elements per (scale, offset) pair; 4 for F16/BF16
// Types whose elements carry an offset (a min) besides the scale.
override HAS_MIN: bool = TYPE == Q4_1 || TYPE == Q5_1 || TYPE == Q4_K || TYPE == Q5_K;
// The products' input has one row (generation's last position, its logits): the four rows an
// invocation reads are all that row (row_starts clamps), so it is loaded once. Loads set the
// speed on lavapipe; this halves a one-row product's time there.
override ONE_ROW: bool = false;

const WG: u32 = 64u;
const TM: u32 = 4u;  // rows of the output per invocation (qmatmul, qmatmul_dx)
const TN: u32 = 4u;  // columns of y per invocation (qmatmul)
const TK: u32 = 8u;  // columns of dx per invocation (qmatmul_dx)
const LANES = vec4<u32>(0u, 1u, 2u, 3u);

// ---- reading bytes of W ----

// The 32 bits at byte offset o, little-endian, at any alignment.
fn u32_at(o: u32) -> u32 {
    let i = o >> 2u;
    let s = (o & 3u) * 8u;
    if (s == 0u) {
        return w[i];
    }
    return (w[i] >> s) | (w[i + 1u] << (32u - s));
}

// The 16 bits at an even byte offset (every 16-bit field of every block is at one: all block
// sizes are even).
fn u16_at(o: u32) -> u32 {
    return (w[o >> 2u] >> ((o & 2u) * 8u)) & 0xffffu;
}

fn u8_at(o: u32) -> u32 {
    return (w[o >> 2u] >> ((o & 3u) * 8u)) & 0xffu;
}

// The four bytes of a word, lowest first.
fn bytes4(v: u32) -> vec4<u32> {
    return (vec4<u32>(v) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(0xffu);
}

// IEEE half to f32, exact for every finite value (subnormals included), without needing the
// optional f16 feature.
fn half_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if (e == 0u) {
        let v = f32(m) * 5.9604644775390625e-8; // m * 2^-24
        return select(v, -v, sign != 0u);
    }
    if (e == 31u) {
        return bitcast<f32>(sign | 0x7f800000u | (m << 13u));
    }
    return bitcast<f32>(sign | ((e + 112u) << 23u) | (m << 13u));
}

fn half_at(o: u32) -> f32 {
    return half_to_f32(u16_at(o));
}

// ggml's get_scale_min_k4: the 6-bit scale and min of sub-block j (0..8) of a Q4_K/Q5_K block,
// from the 12 bytes at s.
fn scale_min_k4(s: u32, j: u32) -> vec2<f32> {
    if (j < 4u) {
        return vec2<f32>(f32(u8_at(s + j) & 63u), f32(u8_at(s + j + 4u) & 63u));
    }
    let hi = u8_at(s + j + 4u);
    let sc = (hi & 15u) | ((u8_at(s + j - 4u) >> 6u) << 4u);
    let mn = (hi >> 4u) | ((u8_at(s + j) >> 6u) << 4u);
    return vec2<f32>(f32(sc), f32(mn));
}

// (scale, offset) of sub-block `sub` of the block at byte b: element = scale * q + offset.
fn scale_offset(b: u32, sub: u32) -> vec2<f32> {
    switch TYPE {
        case Q4_0, Q5_0, Q8_0: {
            return vec2<f32>(half_at(b), 0.0);
        }
        case Q4_1, Q5_1: {
            return vec2<f32>(half_at(b), half_at(b + 2u));
        }
        case Q4_K, Q5_K: {
            // d, dmin, then the 6-bit scales and mins: y = (d * sc) * q - (dmin * m)
            let sm = scale_min_k4(b + 4u, sub);
            return vec2<f32>(half_at(b) * sm.x, -(half_at(b + 2u) * sm.y));
        }
        case Q6_K: {
            // 16 signed 8-bit scales at 192, d at 208: y = (d * sc) * q
            let sc = f32(bitcast<i32>(u8_at(b + 192u + sub) << 24u) >> 24u);
            return vec2<f32>(half_at(b + 208u) * sc, 0.0);
        }
        default: {
            return vec2<f32>(1.0, 0.0);
        }
    }
}

// The quants of elements e..e+3 (e a multiple of 4) of the block at byte b; for F16/BF16 the
// four values from b on.
fn quants4(b: u32, e: u32) -> vec4<f32> {
    switch TYPE {
        case F16: {
            return vec4<f32>(half_at(b), half_at(b + 2u), half_at(b + 4u), half_at(b + 6u));
        }
        case BF16: {
            return bitcast<vec4<f32>>(vec4<u32>(u16_at(b), u16_at(b + 2u), u16_at(b + 4u), u16_at(b + 6u)) << vec4<u32>(16u));
        }
        case Q4_0, Q4_1: {
            // d (, m), qs[16]: element j is the low nibble of qs[j], element 16 + j its high one
            let qs = select(2u, 4u, TYPE == Q4_1);
            let q = (bytes4(u32_at(b + qs + (e & 15u))) >> vec4<u32>((e >> 4u) * 4u)) & vec4<u32>(15u);
            return vec4<f32>(q) - select(8.0, 0.0, TYPE == Q4_1);
        }
        case Q5_0, Q5_1: {
            // d (, m), qh (32 bits: bit j is the fifth bit of element j), qs[16] as in Q4_0
            let qh = select(2u, 4u, TYPE == Q5_1);
            let lo = (bytes4(u32_at(b + qh + 4u + (e & 15u))) >> vec4<u32>((e >> 4u) * 4u)) & vec4<u32>(15u);
            let hi = (vec4<u32>(u32_at(b + qh)) >> (vec4<u32>(e) + LANES)) & vec4<u32>(1u);
            return vec4<f32>(lo | (hi << vec4<u32>(4u))) - select(16.0, 0.0, TYPE == Q5_1);
        }
        case Q8_0: {
            // d, qs[32] signed bytes
            let v = bitcast<vec4<i32>>(vec4<u32>(u32_at(b + 2u + e)) << vec4<u32>(24u, 16u, 8u, 0u));
            return vec4<f32>(v >> vec4<u32>(24u));
        }
        case Q4_K: {
            // d, dmin, scales[12], qs[128] at 16: element 64j + l is the low nibble of
            // qs[32j + l % 32] for l < 32, the high nibble for l >= 32
            let r = e & 63u;
            let q = (bytes4(u32_at(b + 16u + 32u * (e >> 6u) + (r & 31u))) >> vec4<u32>((r >> 5u) * 4u)) & vec4<u32>(15u);
            return vec4<f32>(q);
        }
        case Q5_K: {
            // d, dmin, scales[12], qh[32] at 16, qs[128] at 48: low 4 bits as in Q4_K; the fifth
            // bit of element 64j + 32h + l is bit 2j + h of qh[l]
            let j = e >> 6u;
            let h = (e >> 5u) & 1u;
            let l = e & 31u;
            let lo = (bytes4(u32_at(b + 48u + 32u * j + l)) >> vec4<u32>(h * 4u)) & vec4<u32>(15u);
            let hi = (bytes4(u32_at(b + 16u + l)) >> vec4<u32>(2u * j + h)) & vec4<u32>(1u);
            return vec4<f32>(lo | (hi << vec4<u32>(4u)));
        }
        case Q6_K: {
            // ql[128], qh[64] at 128, scales at 192, d at 208: element 128h + 32q + l has its low
            // 4 bits in nibble q/2 of ql[64h + 32(q%2) + l] and its high 2 bits in bits 2q, 2q+1
            // of qh[32h + l]; minus 32
            let h = e >> 7u;
            let q = (e >> 5u) & 3u;
            let l = e & 31u;
            let lo = (bytes4(u32_at(b + 64u * h + 32u * (q & 1u) + l)) >> vec4<u32>((q >> 1u) * 4u)) & vec4<u32>(15u);
            let hi = (bytes4(u32_at(b + 128u + 32u * h + l)) >> vec4<u32>(2u * q)) & vec4<u32>(3u);
            return vec4<f32>(lo | (hi << vec4<u32>(4u))) - 32.0;
        }
        default: {
            return vec4<f32>(0.0);
        }
    }
}

// W's elements e..e+3 (e a multiple of 4 for the block types) of the row at byte `row`.
fn weights4(row: u32, e: u32) -> vec4<f32> {
    let b = row + (e / QK) * BLOCK_BYTES;
    let within = e % QK;
    let so = scale_offset(b, within / SUB);
    return so.x * quants4(b, within) + so.y;
}

// Rows r..r+3 of column k of the f32 matrix read through `src` (row starts in `rows`).
fn col4(rows: vec4<u32>, k: u32) -> vec4<f32> {
    if (ONE_ROW) {
        return vec4<f32>(bitcast<f32>(src[rows.x + k]));
    }
    return bitcast<vec4<f32>>(vec4<u32>(src[rows.x + k], src[rows.y + k], src[rows.z + k], src[rows.w + k]));
}

// Element offsets of rows m0..m0+3 of a matrix at (off, ld) with m rows; rows past the end read
// the last row (and are not stored).
fn row_starts(off: u32, ld: u32, m0: u32, m: u32) -> vec4<u32> {
    return vec4<u32>(off) + min(vec4<u32>(m0) + LANES, vec4<u32>(m - 1u)) * ld;
}

fn store(idx: u32, v: f32) {
    if ((p.flags & 2u) != 0u) {
        y[idx] += v;
    } else {
        y[idx] = v;
    }
}

// q[t] * (rows of x at column k + t), summed over t: one column of W against four rows of x.
// The one part that `quant_mixed` (`--precision mixed`, made from this file by src/shaders.rs)
// replaces: there each product q[t] * x is taken in f16 and the sums stay f32. A block type's
// quants are integers of at most 8 bits and an F16 weight is an f16, so only x (and a BF16
// weight) is rounded to f16; the scales and offsets are applied in f32.
// variant begin
fn dot_q(q: vec4<f32>, x0: vec4<f32>, x1: vec4<f32>, x2: vec4<f32>, x3: vec4<f32>) -> vec4<f32> {
    return fma(vec4<f32>(q.x), x0, fma(vec4<f32>(q.y), x1, fma(vec4<f32>(q.z), x2, vec4<f32>(q.w) * x3)));
}
// variant end

// The quants of elements e..e+3 of the W row at byte `row`, `within` block `b`; a float-type row
// whose K is not a multiple of 4 ends inside its last group, whose weights past K (span column
// k) are zero.
fn quants_masked(b: u32, within: u32, k: u32) -> vec4<f32> {
    let q = quants4(b, within);
    if (QK == 1u) {
        return select(vec4<f32>(0.0), q, vec4<u32>(k) + LANES < vec4<u32>(p.k));
    }
    return q;
}

// One invocation: TM rows of y by TN columns n0 + j WG (strided, so that neighbouring
// invocations write neighbouring columns). Each column of x is loaded once for the TN columns,
// each group of 4 weights decoded once for the TM rows.
@compute @workgroup_size(WG)
fn qmatmul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let n0 = wid.x * WG * TN + lid.x;
    if (n0 >= p.n) {
        return;
    }
    let m0 = wid.y * TM;
    let xr = row_starts(p.x_off, p.x_ld, m0, p.m);
    // columns past N decode the last row of W and are not stored
    let rows = vec4<u32>(p.w_off) + min(vec4<u32>(n0) + LANES * WG, vec4<u32>(p.n - 1u)) * p.w_ld;
    // acc_j: rows m0..m0+3 of column n0 + j WG
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    let nsub = (p.k + SUB - 1u) / SUB;
    for (var s = 0u; s < nsub; s++) {
        let e = p.w_k0 + s * SUB;
        let boff = (e / QK) * BLOCK_BYTES;
        let within = e % QK;
        let so0 = scale_offset(rows.x + boff, within / SUB);
        let so1 = scale_offset(rows.y + boff, within / SUB);
        let so2 = scale_offset(rows.z + boff, within / SUB);
        let so3 = scale_offset(rows.w + boff, within / SUB);
        // sums of q * x over the sub-block per column, and of x (for the offset)
        var sq0 = vec4<f32>(0.0);
        var sq1 = vec4<f32>(0.0);
        var sq2 = vec4<f32>(0.0);
        var sq3 = vec4<f32>(0.0);
        var sx = vec4<f32>(0.0);
        for (var i = 0u; i < SUB; i += 4u) {
            let k = s * SUB + i;
            // for float rows, F16 elements k..k+3 lie in four "blocks" of one element
            let bi = (i / QK) * BLOCK_BYTES;
            let wi = within + i % QK;
            let kk = min(vec4<u32>(k) + LANES, vec4<u32>(p.k - 1u));
            let x0 = col4(xr, kk.x);
            let x1 = col4(xr, kk.y);
            let x2 = col4(xr, kk.z);
            let x3 = col4(xr, kk.w);
            sq0 += dot_q(quants_masked(rows.x + boff + bi, wi, k), x0, x1, x2, x3);
            sq1 += dot_q(quants_masked(rows.y + boff + bi, wi, k), x0, x1, x2, x3);
            sq2 += dot_q(quants_masked(rows.z + boff + bi, wi, k), x0, x1, x2, x3);
            sq3 += dot_q(quants_masked(rows.w + boff + bi, wi, k), x0, x1, x2, x3);
            if (HAS_MIN) {
                sx += (x0 + x1) + (x2 + x3);
            }
        }
        acc0 = fma(vec4<f32>(so0.x), sq0, acc0);
        acc1 = fma(vec4<f32>(so1.x), sq1, acc1);
        acc2 = fma(vec4<f32>(so2.x), sq2, acc2);
        acc3 = fma(vec4<f32>(so3.x), sq3, acc3);
        if (HAS_MIN) {
            acc0 = fma(vec4<f32>(so0.y), sx, acc0);
            acc1 = fma(vec4<f32>(so1.y), sx, acc1);
            acc2 = fma(vec4<f32>(so2.y), sx, acc2);
            acc3 = fma(vec4<f32>(so3.y), sx, acc3);
        }
    }
    var acc = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
    for (var j = 0u; j < TN; j++) {
        let n = n0 + j * WG;
        if (n < p.n) {
            var b = 0.0;
            if ((p.flags & 1u) != 0u) {
                b = bias[p.bias_off + n];
            }
            for (var r = 0u; r < TM; r++) {
                if (m0 + r < p.m) {
                    store(p.y_off + (m0 + r) * p.y_ld + n, acc[j][r] + b);
                }
            }
        }
    }
}

// One invocation: TM rows of dx by TK = 8 consecutive columns, which lie in one sub-block of W
// (k is a multiple of 8, SUB of 16 or 32), so each row n of W costs one scale decode.
@compute @workgroup_size(WG)
fn qmatmul_dx(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let k = (wid.x * WG + lid.x) * TK;
    if (k >= p.k) {
        return;
    }
    let m0 = wid.y * TM;
    let dyr = row_starts(p.x_off, p.x_ld, m0, p.m);
    let e = p.w_k0 + k;
    let b0 = (e / QK) * BLOCK_BYTES;
    let b1 = ((e + 4u) / QK) * BLOCK_BYTES;
    let within0 = e % QK;
    let within1 = (e + 4u) % QK;
    // row r of dx over columns k..k+3 (lo) and k+4..k+7 (hi)
    var lo0 = vec4<f32>(0.0);
    var lo1 = vec4<f32>(0.0);
    var lo2 = vec4<f32>(0.0);
    var lo3 = vec4<f32>(0.0);
    var hi0 = vec4<f32>(0.0);
    var hi1 = vec4<f32>(0.0);
    var hi2 = vec4<f32>(0.0);
    var hi3 = vec4<f32>(0.0);
    var row = p.w_off;
    for (var n = 0u; n < p.n; n++) {
        let so = scale_offset(row + b0, within0 / SUB);
        let w0 = fma(vec4<f32>(so.x), quants4(row + b0, within0), vec4<f32>(so.y));
        let w1 = fma(vec4<f32>(so.x), quants4(row + b1, within1), vec4<f32>(so.y));
        let d = col4(dyr, n);
        lo0 = fma(vec4<f32>(d.x), w0, lo0);
        lo1 = fma(vec4<f32>(d.y), w0, lo1);
        lo2 = fma(vec4<f32>(d.z), w0, lo2);
        lo3 = fma(vec4<f32>(d.w), w0, lo3);
        hi0 = fma(vec4<f32>(d.x), w1, hi0);
        hi1 = fma(vec4<f32>(d.y), w1, hi1);
        hi2 = fma(vec4<f32>(d.z), w1, hi2);
        hi3 = fma(vec4<f32>(d.w), w1, hi3);
        row += p.w_ld;
    }
    var lo = array<vec4<f32>, 4>(lo0, lo1, lo2, lo3);
    var hi = array<vec4<f32>, 4>(hi0, hi1, hi2, hi3);
    for (var r = 0u; r < TM; r++) {
        if (m0 + r < p.m) {
            let base = p.y_off + (m0 + r) * p.y_ld + k;
            for (var t = 0u; t < 4u; t++) {
                if (k + t < p.k) {
                    store(base + t, lo[r][t]);
                }
                if (k + 4u + t < p.k) {
                    store(base + 4u + t, hi[r][t]);
                }
            }
        }
    }
}

@compute @workgroup_size(WG)
fn qgather(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wid.y * nwg.x + wid.x) * WG + lid.x;
    let groups = (p.k + 3u) / 4u;
    if (i >= p.m * groups) {
        return;
    }
    let pos = i / groups;
    let k = (i % groups) * 4u;
    let id = src[pos];
    if (id < p.row0 || id >= p.row0 + p.n) {
        return;
    }
    let v = weights4((id - p.row0) * p.w_ld, k);
    for (var t = 0u; t < 4u; t++) {
        if (k + t < p.k) {
            y[pos * p.k + k + t] = v[t];
        }
    }
}

// One invocation: one sub-block (SUB elements; 4 for the float types) of one of the p.m rows of
// W from byte p.w_off, written as f32 to rows of p.y_ld values from p.y_off: the scratch rows
// that the f32 matmul reads in qmatmul's large-M variant. The same arithmetic as qgather
// (scale * q + offset, kernels-ref's dequantize up to the one rounding a fused multiply-add
// saves); the scale is decoded once per sub-block. No loop depends on the data.
@compute @workgroup_size(WG)
fn dequantize(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wid.y * nwg.x + wid.x) * WG + lid.x;
    let subs = (p.k + SUB - 1u) / SUB;
    if (i >= p.m * subs) {
        return;
    }
    let r = i / subs;
    let e = (i % subs) * SUB;
    // the float types' SUB (4) elements are four one-element "blocks" from b on
    let b = p.w_off + r * p.w_ld + (e / QK) * BLOCK_BYTES;
    let within = e % QK;
    let so = scale_offset(b, within / SUB);
    let out = p.y_off + r * p.y_ld + e;
    for (var t = 0u; t < SUB; t += 4u) {
        let v = so.x * quants4(b, within + t) + so.y;
        for (var j = 0u; j < 4u; j++) {
            if (e + t + j < p.k) {
                y[out + t + j] = v[j];
            }
        }
    }
}
