// The row step of query-block attention (src/kernels/flash_attention.rs): one block of query
// rows i0..i0+bq against the keys k0..k0+cols that any of them can see. One workgroup per row
// r of the (B*H*bq, cols) score block; global query i = i0 + r % bq, global key j = k0 + c.
// Key j is visible iff j <= i and i - j < window (window 0 = unlimited).
//
// Forward (attn_block_forward), from raw scaled scores u = scale q.k:
//   z = u, or cap * tanh(u / cap) with a soft cap;  lse_i = log sum_j exp(z_ij) over visible j
//   s[r, c] <- p = exp(z - lse) (0 where masked);   lse[(b*H + h) * T + i] <- lse_i
// Backward (attn_block_backward), from u (recomputed), dp = dout.v and the saved lse:
//   p = exp(z - lse);  D_i = sum_j p_ij dp_ij;  ds = p (dp - D_i) z'(u),  z'(u) = 1 - (z / cap)^2
//   s[r, c] <- p;  dp[r, c] <- ds   (both 0 where masked)
// No (B,H,T,T) tensor exists: the block is scratch, and lse is all the backward keeps.

struct Params {
    rows: u32,    // B * H * bq
    cols: u32,    // keys in the block
    bq: u32,      // query rows per (batch, head) in the block
    t: u32,       // sequence length (row stride of lse per (batch, head))
    i0: u32,      // first query row of the block
    k0: u32,      // first key of the block
    window: u32,  // 0 = unlimited
    cap: f32,     // 0 = no soft cap
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> s: array<f32>;    // u in, p out
@group(0) @binding(2) var<storage, read_write> dp: array<f32>;   // backward: dp in, ds out
@group(0) @binding(3) var<storage, read_write> lse: array<f32>;  // (B, H, T)

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

fn capped(u: f32) -> f32 {
    if (p.cap == 0.0) {
        return u;
    }
    return p.cap * tanh(u / p.cap);
}

// Global query index of row r, and the visible local columns [lo, hi) of that row.
fn row_span(r: u32) -> vec3<u32> {
    let i = p.i0 + r % p.bq;
    var first = 0u;
    if (p.window != 0u && i + 1u > p.window) {
        first = i + 1u - p.window;
    }
    let lo = max(first, p.k0) - p.k0;
    let hi = min(i + 1u - p.k0, p.cols);
    return vec3<u32>(i, lo, hi);
}

fn lse_index(r: u32, i: u32) -> u32 {
    return (r / p.bq) * p.t + i;
}

@compute @workgroup_size(WG)
fn attn_block_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = wid.y * nwg.x + wid.x;
    if (r >= p.rows) {
        return;
    }
    let span = row_span(r);
    let base = r * p.cols;
    // Each invocation stores z over the elements it alone reads again below: no barrier needed.
    var m = -3.0e38;
    for (var c = span.y + lid.x; c < span.z; c += WG) {
        let z = capped(s[base + c]);
        s[base + c] = z;
        m = max(m, z);
    }
    m = reduce(lid.x, m, true);
    var sum = 0.0;
    for (var c = span.y + lid.x; c < span.z; c += WG) {
        sum += exp(s[base + c] - m);
    }
    let l = m + log(reduce(lid.x, sum, false));
    for (var c = lid.x; c < p.cols; c += WG) {
        var v = 0.0;
        if (c >= span.y && c < span.z) {
            v = exp(s[base + c] - l);
        }
        s[base + c] = v;
    }
    if (lid.x == 0u) {
        lse[lse_index(r, span.x)] = l;
    }
}

@compute @workgroup_size(WG)
fn attn_block_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = wid.y * nwg.x + wid.x;
    if (r >= p.rows) {
        return;
    }
    let span = row_span(r);
    let base = r * p.cols;
    let l = lse[lse_index(r, span.x)];
    var acc = 0.0;
    for (var c = span.y + lid.x; c < span.z; c += WG) {
        acc += exp(capped(s[base + c]) - l) * dp[base + c];
    }
    let dsum = reduce(lid.x, acc, false);
    for (var c = lid.x; c < p.cols; c += WG) {
        var pv = 0.0;
        var ds = 0.0;
        if (c >= span.y && c < span.z) {
            let z = capped(s[base + c]);
            pv = exp(z - l);
            ds = pv * (dp[base + c] - dsum);
            if (p.cap != 0.0) {
                let tz = z / p.cap;
                ds *= 1.0 - tz * tz;
            }
        }
        s[base + c] = pv;
        dp[base + c] = ds;
    }
}
