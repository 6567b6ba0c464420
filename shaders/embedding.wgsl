// Embedding gather and its backward, for one chunk of the table (rows start..start+len).
//   gather:      out[i, :] = table[ids[i] - start, :]            for ids in this chunk
//   scatter_add: dtable[id - start, :] += sum of dout[pos, :] over the positions of id
// The backward is deterministic: the host sorts the batch's ids into a list per id
// (`csr` = offsets then positions), and each invocation sums one (id, column) in position order,
// a span of positions per dispatch (loops stay short: see the loop limit in src/kernels).
// csr layout (u32): [n_unique + 1 offsets][n_unique ids][N positions].

struct Params {
    n: u32,          // gather: N * C; scatter: (u1 - u0) * C
    dim: u32,        // C
    start: u32,      // first table row in this chunk
    len: u32,        // rows in this chunk
    u0: u32,         // scatter: first unique id index in this chunk
    n_unique: u32,
    k0: u32,         // scatter: this dispatch sums the positions k0..k1 of each id's list
    k1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;      // gather: ids; scatter: csr
@group(0) @binding(2) var<storage, read> src: array<f32>;      // gather: table; scatter: dout
@group(0) @binding(3) var<storage, read_write> dst: array<f32>;// gather: out; scatter: dtable

const WG: u32 = 256u;

@compute @workgroup_size(WG)
fn gather(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wid.y * nwg.x + wid.x) * WG + lid.x;
    if (i >= p.n) {
        return;
    }
    let row = i / p.dim;
    let col = i % p.dim;
    let id = ids[row];
    if (id >= p.start && id < p.start + p.len) {
        dst[i] = src[(id - p.start) * p.dim + col];
    }
}

@compute @workgroup_size(WG)
fn scatter_add(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wid.y * nwg.x + wid.x) * WG + lid.x;
    if (i >= p.n) {
        return;
    }
    let u = p.u0 + i / p.dim;
    let col = i % p.dim;
    let first = ids[u];
    let last = ids[u + 1u];
    let id = ids[p.n_unique + 1u + u];
    let positions = 2u * p.n_unique + 1u;
    var s = 0.0;
    for (var k = first + p.k0; k < min(last, first + p.k1); k++) {
        s += src[ids[positions + k] * p.dim + col];
    }
    let o = (id - p.start) * p.dim + col;
    dst[o] += s;
}
