// B's steps packed row by row for the RGBA32F texture that `matmul_subgroup_uniform.wgsl` reads
// (`kernels::matmul`, the `subgroup-uniform` kernel): float 4x + j of row kk is B's column
// 4x + j at step kk, each row `width` floats (N rounded up to whole 64s, so that a row is a
// whole number of 256-byte texture rows), zeros past N (rows past `k` are not written). The buffer is then copied
// into the texture, one row of texels per step. Copied as bits: no value is rounded or flushed.
// Reference: `kernels_ref::pack_b_texels`.

struct Params {
    n: u32,      // columns of B packed
    k: u32,      // steps of B packed (rows of the texture)
    b_off: u32,  // B's (step 0, column 0)
    b_sk: u32,   // B's stride from step to step
    b_sn: u32,   // B's stride from column to column
    width: u32,  // floats a packed row holds (a multiple of 64, at least n)
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> b: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;

// One workgroup per 64 columns (x) and 64 steps (y), one invocation per column, each walking
// its 64 steps: where B is stored transposed (steps adjacent, as W^T in the LM head's forward
// product) each lane reads along its own row; where it is stored row by row, the lanes of a
// step read adjacent floats. (One invocation per float, lanes across columns, read 64 rows
// 3 KiB apart a workgroup in the transposed case and ran at cache-miss speed.)
@compute @workgroup_size(64)
fn pack_b(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let col = wid.x * 64u + lid.x;
    let k0 = wid.y * 64u;
    let inside = col < p.n;
    var src = p.b_off + k0 * p.b_sk + min(col, p.n - 1u) * p.b_sn;
    let steps = min(64u, p.k - k0);
    for (var kk = 0u; kk < steps; kk++) {
        var v = 0u;
        if (inside) {
            v = b[src];
        }
        dst[(k0 + kk) * p.width + col] = v;
        src += p.b_sk;
    }
}
