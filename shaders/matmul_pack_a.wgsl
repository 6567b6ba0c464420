// A's rows packed into the 16 KiB uniform windows that `matmul_subgroup_uniform.wgsl` reads
// (`kernels::matmul`, the `subgroup-uniform` kernel): for a block of up to 64 rows, window w
// holds k steps 64w..64w + 64, k-major (row r of step kk at kk * 64 + r); each block has
// `windows` windows, one after another. Rows past `rows` and steps past `k` are written as 0.
// Copied as bits: no value is rounded or flushed. Reference: `kernels_ref::pack_a_windows`.

struct Params {
    rows: u32,    // rows of A packed (the blocks' rows; the last block may be partial)
    k: u32,       // k steps packed (at most windows x 64)
    a_off: u32,   // A's (row 0, step 0)
    a_sm: u32,    // A's stride from row to row
    a_sk: u32,    // A's stride from step to step
    windows: u32, // windows per block of 64 rows
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;

// One workgroup per window (x: block * windows + window), one invocation per row of it; each
// walks the window's 64 steps.
@compute @workgroup_size(64)
fn pack_a(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let block = wid.x / p.windows;
    let win = wid.x % p.windows;
    let r = block * 64u + lid.x;
    let k0 = win * 64u;
    let out = wid.x * 4096u + lid.x;
    let inside = r < p.rows;
    var src = p.a_off + min(r, p.rows - 1u) * p.a_sm + k0 * p.a_sk;
    for (var kk = 0u; kk < 64u; kk++) {
        var v = 0u;
        if (inside && k0 + kk < p.k) {
            v = a[src];
        }
        dst[out + kk * 64u] = v;
        src += p.a_sk;
    }
}
