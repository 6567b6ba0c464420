// A block of a row-major matrix copied transposed, for the subgroup matmul's `subgroup-bt`
// form (`kernels::matmul`): B (rows x cols, element (i, j) at src_off + i * src_ld + j) is
// written column by column, dst[j * rows + i], so that the product then walks each column of B
// along K in consecutive words. Copied as bits: no value is rounded or flushed.
// Reference: the transposed index itself (`kernels_ref::transpose`).

struct Params {
    rows: u32,
    cols: u32,
    src_off: u32,
    src_ld: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;

const WG: u32 = 64u;
// Rows one invocation copies: the lanes of a subgroup read adjacent words of one row, and
// each lane writes RUN consecutive words of its column.
const RUN: u32 = 16u;

@compute @workgroup_size(WG)
fn transpose(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let j = wid.x * WG + lid.x;
    let i0 = wid.y * RUN;
    if (j >= p.cols || i0 >= p.rows) {
        return;
    }
    let n = min(RUN, p.rows - i0);
    var s = p.src_off + i0 * p.src_ld + j;
    let d = j * p.rows + i0;
    for (var r = 0u; r < n; r++) {
        dst[d + r] = src[s];
        s += p.src_ld;
    }
}
