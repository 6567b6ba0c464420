//! Matrix products (`shaders/matmul.wgsl`): C = op(A) op(B) + bias and its backward, for plain,
//! batched-strided and chunked operands. Reference: `kernels_ref::matmul_forward`/`_backward`.
//!
//! A tensor larger than one binding is stored in chunks ([`Split`]). The product is cut along
//! M, N and K at every chunk boundary of every operand; each piece is one dispatch on views
//! into single buffers, and pieces after the first along K accumulate into C. The caller sees
//! one matrix product.
//!
//! Three kernels compute each piece ([`MatmulKernel`], chosen per device, see `matmul_tune`):
//! `matmul.wgsl`, a 4x4 register tile per invocation that needs nothing optional,
//! `matmul_subgroup.wgsl`, which shares loads of A across a subgroup by broadcast (4x faster on
//! lavapipe; see docs/perf.md), and `matmul_staged.wgsl`, which stages tiles of A and B in
//! workgroup memory with register blocks per invocation, in several tile configurations
//! ([`StagedTile`]): the classic GPU matrix product, for GPUs where barriers are cheap.
//!
//! The subgroup kernel has a second form, `subgroup-uniform` ([`MatmulKernel::SubgroupUniform`],
//! `matmul_subgroup_uniform.wgsl`): A is first packed (`matmul_pack_a.wgsl`) into 16 KiB
//! windows, 64 rows by 64 k steps each, and the product reads A through 8 uniform bindings of
//! those windows, one dispatch per block of 64 rows and 512 steps of K (the blocks after the
//! first along K adding into C). B's piece for a dispatch is packed too
//! (`matmul_pack_b.wgsl`, then copied) into an RGBA32F texture whose texel (x, k) holds 4
//! adjacent columns of step k, so that a lane's 4 columns a step are one texel load (where B
//! is stored row by row; stored transposed, it is read from storage as before). On
//! lavapipe a uniform or texel load is a vector gather and a storage load a loop over the
//! lanes with a branch each (`cargo bench --bench load_paths`), so the GPT-2 products run
//! faster there (docs/perf.md); on a GPU, reading a uniform buffer at a different index in
//! every lane is often the slow path, so the autotune decides.

use super::u32_of;
use crate::error::{Error, Result};
use crate::gpu::Bind;
use crate::gpu::{Gpu, KernelKey, MatmulKernel, Precision, Split, StagedTile, Tensor};

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    flags: u32,
    a_off: u32,
    a_sm: u32,
    a_sk: u32,
    a_b1: u32,
    a_b2: u32,
    b_off: u32,
    b_sk: u32,
    b_sn: u32,
    b_b1: u32,
    b_b2: u32,
    c_off: u32,
    c_sm: u32,
    c_b1: u32,
    c_b2: u32,
    nb2: u32,
    bias_off: u32,
    alpha: f32,
    _pad: [u32; 3],
}

const TILE: usize = 64; // WG (16) x register tile (4), along M and along N
/// Tile of `shaders/matmul_subgroup.wgsl` (see `tools/gen_matmul_subgroup.py`).
const SG_ROWS: usize = 64;
const SG_COLS: usize = 64 * 4;
/// The subgroup kernel's narrow tiles, for products whose C has few columns (LoRA's rank:
/// `x A^T`, and `dy B` in the backward pass) or few rows (`dA = dh^T x`): 64 x 8
/// (`matmul_subgroup_narrow_n`, 8 invocations, one column each) and 8 x 256
/// (`matmul_subgroup_narrow_m`, one row of A per lane). A tile computes all of itself whatever
/// the shape, so the 64 x 256 tile at N = 8 spends 32 times the loads the product needs. By
/// loads per useful multiply-add (lavapipe's cost, see docs/perf.md), with a workgroup of W
/// invocations of 4 columns: 12 W / (64 min(N, 4 W)) for the wide tile (W = 64) and the mid
/// one (`matmul_subgroup` with W = 16: 64 x 64, for attention's products over the head size
/// and GPT-2's 128 positions), 9 / 64 for the narrow-N one. So narrow-N up to N = 16 (the
/// crossover with the mid tile is 21), the mid tile up to 128, the wide one past it;
/// narrow-M has 5 loads per 32 against the wide tile's 12 per 4 M.
const SG_NARROW_N: (usize, usize) = (64, 8);
const SG_NARROW_M: (usize, usize) = (8, 256);
const SG_MID_WG: u32 = 16;
const SG_MID: (usize, usize) = (64, SG_MID_WG as usize * 4);
/// Largest N (M) that takes a narrow tile, largest N that takes the mid tile.
const NARROW_N_MAX: usize = 16;
const NARROW_M_MAX: usize = 16;
const MID_N_MAX: usize = 128;
/// `subgroup-uniform`: values in one window of A (16 KiB, the phone limit on a uniform
/// binding), the windows a dispatch reads, the rows and k steps of a window, and the columns of
/// C one workgroup computes (64 invocations x 4).
const WINDOW: usize = 4096;
const WINDOWS: usize = 8;
const WINDOW_ROWS: usize = 64;
const WINDOW_STEPS: usize = 64;
// (A product with fewer K steps than one window, LoRA's up-projection and its dX at rank 8,
// takes the plain subgroup kernel: packing a window and a texture for 8 steps cost more than
// the product, 0.99-1.36 against 1.50-2.46 GFLOP/s.)
const UNIFORM_COLS: usize = 256;
/// Blocks of 64 rows packed at a time: 8 MiB of windows.
const PACK_BLOCKS: usize = 64;
/// Columns of B one texture holds: 2,048 texels, the phone limit on a texture's width.
const TEXTURE_COLS: usize = 2048 * 4;
/// A packed row of B is a whole number of 64 floats (256 bytes: a texture copy's row pitch).
const TEXTURE_ROW_ALIGN: usize = 64;

thread_local! {
    static OVERRIDE: std::cell::Cell<Option<MatmulKernel>> = const { std::cell::Cell::new(None) };
    static PRECISION: std::cell::Cell<Option<Precision>> = const { std::cell::Cell::new(None) };
}

/// Run `f` with the matrix products on this thread in `precision` (a linear layer's forward
/// product runs in the device's [`Gpu::precision`] this way; every other product is f32).
pub fn with_precision<R>(precision: Precision, f: impl FnOnce() -> R) -> R {
    super::with_override(&PRECISION, precision, f)
}

/// The arithmetic of the products on this thread ([`with_precision`]'s, else f32).
pub fn precision() -> Precision {
    PRECISION.with(|p| p.get()).unwrap_or_default()
}

/// The kernel of the products on this thread: [`current_kernel`], in f32 or, under
/// [`with_precision`]`(Mixed)`, in its mixed-precision form.
fn current(gpu: &Gpu) -> Choice {
    let kernel = current_kernel(gpu);
    match precision() {
        Precision::Mixed => Choice::Mixed(kernel),
        Precision::F32 => Choice::F32(kernel),
    }
}

/// Which shader a product runs. A mixed-precision product follows the f32 kernel chosen for
/// the device: a staged tile runs `matmul_staged_mixed` (the same tile, f16 in workgroup
/// memory), the register-tile kernels `matmul_mixed.wgsl`.
#[derive(Clone, Copy)]
enum Choice {
    F32(MatmulKernel),
    Mixed(MatmulKernel),
}

/// Run `f` with every matrix product on this thread using `kernel` (gradcheck checks each
/// kernel the device offers this way without disturbing other threads).
pub fn with_kernel<R>(kernel: MatmulKernel, f: impl FnOnce() -> R) -> R {
    super::with_override(&OVERRIDE, kernel, f)
}

/// The kernel the matrix products on this thread use now ([`with_kernel`]'s, else the device's).
pub fn current_kernel(gpu: &Gpu) -> MatmulKernel {
    OVERRIDE.with(|o| o.get()).unwrap_or_else(|| gpu.matmul_kernel())
}

/// A matrix inside one buffer: element `(i, j)` of batch `(b1, b2)` sits at
/// `off + i * s_i + j * s_j + b1 * s_b1 + b2 * s_b2`.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    pub buf: Bind<'a>,
    pub off: usize,
    pub s_i: usize,
    pub s_j: usize,
    pub s_b1: usize,
    pub s_b2: usize,
}

impl<'a> View<'a> {
    /// A row-major (rows, ld) matrix, transposed when `trans`.
    pub fn matrix(buf: Bind<'a>, off: usize, ld: usize, trans: bool) -> Self {
        let (s_i, s_j) = if trans { (1, ld) } else { (ld, 1) };
        View { buf, off, s_i, s_j, s_b1: 0, s_b2: 0 }
    }
    pub fn batched(mut self, s_b1: usize, s_b2: usize) -> Self {
        self.s_b1 = s_b1;
        self.s_b2 = s_b2;
        self
    }
}

/// Sizes of one strided product: `nb1 * nb2` products of (m, k) x (k, n).
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub nb1: usize,
    pub nb2: usize,
}

/// `C = alpha * A B (+ bias) (+ C if accumulate)` on views (`c.s_j` must be 1). One dispatch per
/// [`k_span`] of K (the kernels' only data-dependent loop; see the loop limit in `kernels`), the
/// pieces after the first adding into C; M and N are cut where the grid would pass the device's
/// workgroups per dimension.
pub fn matmul_strided(
    gpu: &Gpu,
    c: View,
    a: View,
    b: View,
    bias: Option<(Bind<'_>, usize)>,
    d: Dims,
    alpha: f32,
    accumulate: bool,
) -> Result<()> {
    if c.s_j != 1 {
        return Err(Error::shape("matmul", "C must have unit column stride"));
    }
    if d.m == 0 || d.n == 0 || d.nb1 == 0 || d.nb2 == 0 {
        return Ok(());
    }
    if d.k == 0 {
        // An empty sum: C = bias (+ C). Not needed by any model; refuse rather than guess.
        return Err(Error::shape("matmul", "inner dimension K is 0"));
    }
    let kernel = current(gpu);
    if matches!(kernel, Choice::F32(MatmulKernel::SubgroupUniform))
        && d.nb1 == 1
        && d.nb2 == 1
        && d.n > MID_N_MAX
        && d.m > NARROW_M_MAX
        && d.k >= WINDOW_STEPS
    {
        return matmul_uniform(gpu, c, a, b, bias, d, alpha, accumulate);
    }
    // C's rows as vec4s where every piece's C starts and steps on a multiple of 4 floats
    let c4 = [d.n, c.off, c.s_i, c.s_b1, c.s_b2].iter().all(|v| v.is_multiple_of(4));
    let (key, tile_m, tile_n) = entry(kernel, d.m, d.n, c4);
    let max = gpu.max_workgroups() as usize;
    if d.nb1 * d.nb2 > max {
        return Err(Error::shape(
            "matmul",
            format!("{} x {} batched products exceed {max} workgroups per dimension", d.nb1, d.nb2),
        ));
    }
    for (m0, ml) in super::spans(d.m, max * tile_m) {
        for (n0, nl) in super::spans(d.n, max * tile_n) {
            let span = match kernel {
                Choice::F32(k) | Choice::Mixed(k @ MatmulKernel::Staged(_)) => k_span(k),
                Choice::Mixed(_) => super::LOOP_SPAN,
            };
            for (k0, kl) in super::spans(d.k, span) {
                let a = View { off: a.off + m0 * a.s_i + k0 * a.s_j, ..a };
                let b = View { off: b.off + k0 * b.s_i + n0 * b.s_j, ..b };
                let c = View { off: c.off + m0 * c.s_i + n0, ..c };
                let first = k0 == 0;
                let bias = bias.filter(|_| first).map(|(buf, off)| (buf, off + n0));
                let piece = Dims { m: ml, n: nl, k: kl, ..d };
                let tile = (&key, tile_m, tile_n);
                dispatch_piece(gpu, tile, c, a, b, bias, piece, alpha, accumulate || !first)?;
            }
        }
    }
    Ok(())
}

/// [`matmul_strided`] by `subgroup-uniform` (module comment): for each span of K
/// (`WINDOWS x 64` steps) and of N, where B is stored row by row its piece is packed into a
/// staging buffer and copied into a texture (spans of N at most [`TEXTURE_COLS`]); then for
/// each group of row blocks A's rows are packed into a scratch of windows, and one dispatch per
/// block of 64 rows binds that block's windows (and the texture) and computes its rows of C
/// across the span of N. Where B is stored transposed the product reads it from storage
/// (`matmul_subgroup_uniform.wgsl`): each lane then walks its own columns along k, which
/// measured faster than the texture with its packing (docs/perf.md). The scratches are pooled
/// tensors (at most 8 MiB for A, 16 MiB for B) reused by every span, and the texture is the
/// device's one scratch texture (as large as B's staging); the GPU runs the packing, the copies
/// and the products in the order recorded.
fn matmul_uniform(
    gpu: &Gpu,
    c: View,
    a: View,
    b: View,
    bias: Option<(Bind<'_>, usize)>,
    d: Dims,
    alpha: f32,
    accumulate: bool,
) -> Result<()> {
    let blocks = d.m.div_ceil(WINDOW_ROWS);
    let span_k = WINDOWS * WINDOW_STEPS;
    let textured = b.s_j == 1;
    let span_n = if textured { TEXTURE_COLS } else { gpu.max_workgroups() as usize * UNIFORM_COLS };
    let width = d.n.min(TEXTURE_COLS).next_multiple_of(TEXTURE_ROW_ALIGN); // floats a packed row
    let height = d.k.min(span_k);
    let (scratch, staging) = {
        let _c = crate::gpu::Category::Staging.enter(); // memory report: matmul scratch
        let a =
            Tensor::empty(gpu, &[blocks.min(PACK_BLOCKS) * WINDOWS * WINDOW], "matmul A in uniform windows")?;
        let b = textured.then(|| Tensor::empty(gpu, &[width * height], "matmul B packed for a texture"));
        (a, b.transpose()?)
    };
    let sb = scratch.single("matmul A in uniform windows")?;
    let texture = match &staging {
        Some(staging) => {
            let staged = staging.single("matmul B packed for a texture")?;
            let Some((t, view)) = gpu.scratch_texture((width / 4) as u32, height as u32) else {
                return Ok(()); // planning: the scratches above are what the product holds
            };
            Some((staged, t, view))
        }
        None => None,
    };
    let shader = if textured { "matmul_subgroup_uniform_texture" } else { "matmul_subgroup_uniform" };
    let key = KernelKey::new(shader, "matmul_subgroup");
    let window_bytes = (WINDOW * 4) as u64;
    for (k0, kl) in super::spans(d.k, span_k) {
        let first_k = k0 == 0;
        for (n0, nl) in super::spans(d.n, span_n) {
            let b = View { off: b.off + k0 * b.s_i + n0 * b.s_j, ..b };
            if let Some((staged, t, _)) = &texture {
                let texels = nl.next_multiple_of(TEXTURE_ROW_ALIGN) / 4;
                pack_b(gpu, *staged, b, kl, nl, texels * 4)?;
                gpu.copy_to_texture(*staged, t, texels as u32, kl as u32);
            }
            for (g0, gl) in super::spans(blocks, PACK_BLOCKS) {
                let r0 = g0 * WINDOW_ROWS;
                let rows = (gl * WINDOW_ROWS).min(d.m - r0);
                pack_a(gpu, sb, View { off: a.off + r0 * a.s_i + k0 * a.s_j, ..a }, rows, kl)?;
                for i in 0..gl {
                    let m0 = r0 + i * WINDOW_ROWS;
                    let piece = Dims { m: WINDOW_ROWS.min(d.m - m0), n: nl, k: kl, ..d };
                    let c = View { off: c.off + m0 * c.s_i + n0, ..c };
                    let bias = bias.filter(|_| first_k).map(|(buf, off)| (buf, off + n0));
                    let params = params(c, a, b, bias, piece, alpha, accumulate || !first_k)?;
                    // A's binding is left out (the windows replace it), and B's where the
                    // texture does
                    let b_buf = texture.is_none().then_some(b.buf);
                    let mut bindings =
                        vec![None, b_buf, Some(c.buf), Some(bias.map_or(gpu.placeholder(), |b| b.0))];
                    let start = sb.offset + (i * WINDOWS) as u64 * window_bytes;
                    bindings.extend((0..WINDOWS as u64).map(|w| {
                        Some(Bind { buffer: sb.buffer, offset: start + w * window_bytes, size: window_bytes })
                    }));
                    let (params, groups) =
                        (bytemuck::bytes_of(&params), [nl.div_ceil(UNIFORM_COLS) as u32, 1, 1]);
                    match &texture {
                        Some((_, _, view)) => {
                            gpu.dispatch_with_texture(&key, &bindings, view, params, groups)?
                        }
                        None => gpu.dispatch(&key, &bindings, params, groups)?,
                    }
                }
            }
        }
    }
    Ok(())
}

/// `k` steps and `n` columns of B (the view's logical (K, N) strides) packed into `dst` row by
/// row, `width` floats a row, as `subgroup-uniform`'s texture holds them
/// (`shaders/matmul_pack_b.wgsl`; reference `kernels_ref::pack_b_texels`). Public for its own
/// check.
pub fn pack_b(gpu: &Gpu, dst: Bind<'_>, b: View, k: usize, n: usize, width: usize) -> Result<()> {
    pack(gpu, "matmul_pack_b", dst, b, [n, k, width], [width.div_ceil(64), k.div_ceil(64)])
}

/// `rows` rows and `k` steps of A (the view's logical (M, K) strides) packed into `dst` as
/// `subgroup-uniform` reads them (`shaders/matmul_pack_a.wgsl`; reference
/// `kernels_ref::pack_a_windows`). Public for its own check.
pub fn pack_a(gpu: &Gpu, dst: Bind<'_>, a: View, rows: usize, k: usize) -> Result<()> {
    pack(gpu, "matmul_pack_a", dst, a, [rows, k, WINDOWS], [rows.div_ceil(WINDOW_ROWS) * WINDOWS, 1])
}

/// The uniform of both packing shaders: `count` (A's rows, B's columns), `k` steps, the
/// source's offset and its two logical strides (the view's `s_i`, `s_j`), and `last` (A's
/// windows per block, B's floats a packed row).
#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct PackParams {
    count: u32,
    k: u32,
    off: u32,
    s_i: u32,
    s_j: u32,
    last: u32,
    _pad: [u32; 2],
}

/// One dispatch of `shader` (entry point: its name past `matmul_`) packing `src` into `dst`;
/// `[count, k, last]` as [`PackParams`] says, `groups` its workgroups along x and y.
fn pack(
    gpu: &Gpu,
    shader: &'static str,
    dst: Bind<'_>,
    src: View,
    [count, k, last]: [usize; 3],
    groups: [usize; 2],
) -> Result<()> {
    let u = |v: usize| u32_of(v, shader);
    let p = PackParams {
        count: u(count)?,
        k: u(k)?,
        off: u(src.off)?,
        s_i: u(src.s_i)?,
        s_j: u(src.s_j)?,
        last: u(last)?,
        _pad: [0; 2],
    };
    let key = KernelKey::new(shader, shader.trim_start_matches("matmul_"));
    gpu.dispatch(&key, &[Some(src.buf), Some(dst)], bytemuck::bytes_of(&p), [u(groups[0])?, u(groups[1])?, 1])
}

/// A kernel's entry point and the (rows, columns) of C one workgroup computes, for a product
/// of `m` x `n` (the subgroup kernel takes a narrow tile for few rows or columns, and stores C
/// as vec4s where `c4`: N, C's offset and its strides multiples of 4).
fn entry(kernel: Choice, m: usize, n: usize, c4: bool) -> (KernelKey, usize, usize) {
    let (kernel, staged) = match kernel {
        Choice::F32(k) => (k, "matmul_staged"),
        Choice::Mixed(k @ MatmulKernel::Staged(_)) => (k, "matmul_staged_mixed"),
        Choice::Mixed(_) => return (KernelKey::new("matmul_mixed", "matmul_mixed"), TILE, TILE),
    };
    match kernel {
        MatmulKernel::Tiled => (KernelKey::new("matmul", "matmul"), TILE, TILE),
        MatmulKernel::Subgroup | MatmulKernel::SubgroupUniform => {
            let (shader, (rows, cols)) = if n <= NARROW_N_MAX {
                ("matmul_subgroup_narrow_n", SG_NARROW_N)
            } else if m <= NARROW_M_MAX {
                ("matmul_subgroup_narrow_m", SG_NARROW_M)
            } else {
                // the 64 x 64 tile up to 128 columns, the 64 x 256 past them; C's loads and
                // stores bound short sums (LoRA's rank 8: K = 8), four a vec4 where allowed
                let shader = if c4 { "matmul_subgroup_c4" } else { "matmul_subgroup" };
                let key = KernelKey::new(shader, "matmul_subgroup");
                return if n <= MID_N_MAX {
                    (key.with("WG", SG_MID_WG), SG_MID.0, SG_MID.1)
                } else {
                    (key, SG_ROWS, SG_COLS)
                };
            };
            (KernelKey::new(shader, "matmul_subgroup"), rows, cols)
        }
        MatmulKernel::Staged(t) => (
            KernelKey::new(staged, "matmul_staged")
                .with("WG_M", t.wg_m)
                .with("WG_N", t.wg_n)
                .with("TM", t.tm)
                .with("TN", t.tn)
                .with("BK", t.bk),
            t.bm() as usize,
            t.bn() as usize,
        ),
    }
}

/// Most of K one dispatch of `kernel` sums over. The register-tile kernels loop once per k:
/// [`LOOP_SPAN`](super::LOOP_SPAN). The staged kernel loops once per K step of `bk`, and inside
/// each step over its loads and its register block; every one of those loops is counted
/// (a driver that unrolls them counts fewer), with the loops before and after the K steps.
pub fn k_span(kernel: MatmulKernel) -> usize {
    match kernel {
        MatmulKernel::Tiled | MatmulKernel::Subgroup | MatmulKernel::SubgroupUniform => super::LOOP_SPAN,
        MatmulKernel::Staged(t) => {
            let steps = (super::MAX_LOOP_TRIPS - staged_fixed_trips(t)) / staged_step_trips(t);
            steps * t.bk as usize
        }
    }
}

/// Loop trips of one K step of the staged kernel: the step itself; per vec4 copied, the copy
/// loop, up to 4 element loads and 4 scattered stores; per k, the k loop, the loads of the
/// register rows and columns and the product's two nested loops.
fn staged_step_trips(t: StagedTile) -> usize {
    let (la, lb) = t.loads_per_step();
    let (g, h) = ((t.tm / 4) as usize, (t.tn / 4) as usize);
    1 + 9 * (la + lb) as usize + t.bk as usize * (1 + g + h + g * (1 + h))
}

/// Loop trips outside the K steps: zeroing the accumulators, storing the block (per row, its
/// vec4s, 4 elements each).
fn staged_fixed_trips(t: StagedTile) -> usize {
    let (tm, h) = (t.tm as usize, (t.tn / 4) as usize);
    tm * h + tm * (1 + h * (1 + 4))
}

/// One dispatch of [`matmul_strided`]: K at most `LOOP_SPAN`, M and N within one grid.
fn dispatch_piece(
    gpu: &Gpu,
    (key, tile_m, tile_n): (&KernelKey, usize, usize),
    c: View,
    a: View,
    b: View,
    bias: Option<(Bind<'_>, usize)>,
    d: Dims,
    alpha: f32,
    accumulate: bool,
) -> Result<()> {
    let params = params(c, a, b, bias, d, alpha, accumulate)?;
    let groups = [d.n.div_ceil(tile_n), d.m.div_ceil(tile_m), d.nb1 * d.nb2].map(|g| g as u32);
    let buffers = [Some(a.buf), Some(b.buf), Some(c.buf), Some(bias.map_or(gpu.placeholder(), |b| b.0))];
    gpu.dispatch(key, &buffers, bytemuck::bytes_of(&params), groups)
}

/// The uniform every matmul shader reads, for one piece.
fn params(
    c: View,
    a: View,
    b: View,
    bias: Option<(Bind<'_>, usize)>,
    d: Dims,
    alpha: f32,
    accumulate: bool,
) -> Result<Params> {
    let u = |v: usize| u32_of(v, "matmul");
    Ok(Params {
        m: u(d.m)?,
        n: u(d.n)?,
        k: u(d.k)?,
        flags: bias.is_some() as u32 | ((accumulate as u32) << 1),
        a_off: u(a.off)?,
        a_sm: u(a.s_i)?,
        a_sk: u(a.s_j)?,
        a_b1: u(a.s_b1)?,
        a_b2: u(a.s_b2)?,
        b_off: u(b.off)?,
        b_sk: u(b.s_i)?,
        b_sn: u(b.s_j)?,
        b_b1: u(b.s_b1)?,
        b_b2: u(b.s_b2)?,
        c_off: u(c.off)?,
        c_sm: u(c.s_i)?,
        c_b1: u(c.s_b1)?,
        c_b2: u(c.s_b2)?,
        nb2: u(d.nb2)?,
        bias_off: u(bias.map_or(0, |b| b.1))?,
        alpha,
        _pad: [0; 3],
    })
}

/// The logical dimensions that a tensor's stored rows and columns stand for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Axis {
    M,
    N,
    K,
}

struct Operand<'t> {
    t: &'t Tensor,
    rows: Axis,
    cols: Axis,
}

impl Operand<'_> {
    fn split_axis(&self) -> Axis {
        match self.t.split() {
            Split::Rows => self.rows,
            Split::Cols => self.cols,
        }
    }

    /// The view that holds logical element (i0 along `rows`, j0 along `cols`), from the chunk
    /// that contains it. `at` gives the piece's start along M, N and K.
    fn view(&self, at: impl Fn(Axis) -> usize) -> View<'_> {
        let (r0, c0) = (at(self.rows), at(self.cols));
        let cols = self.t.cols();
        let along = match self.t.split() {
            Split::Rows => r0,
            Split::Cols => c0,
        };
        let chunk = self
            .t
            .chunks()
            .iter()
            .find(|ch| along >= ch.start && along < ch.start + ch.len)
            .expect("piece boundaries include every chunk boundary");
        let (off, ld) = match self.t.split() {
            Split::Rows => ((r0 - chunk.start) * cols + c0, cols),
            Split::Cols => (r0 * chunk.len + (c0 - chunk.start), chunk.len),
        };
        View::matrix(chunk.bind(), off, ld, false)
    }
}

/// `C (M,N) = op(A) (M,K) . op(B) (K,N) (+ bias (N)) (+ C if accumulate)` on 2-D tensors (all
/// dimensions but the last are rows). Any operand may be chunked.
pub fn matmul(
    gpu: &Gpu,
    c: &Tensor,
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
) -> Result<()> {
    let (m, k) = if trans_a { (a.cols(), a.rows()) } else { (a.rows(), a.cols()) };
    let (kb, n) = if trans_b { (b.cols(), b.rows()) } else { (b.rows(), b.cols()) };
    if k != kb || c.rows() != m || c.cols() != n {
        return Err(Error::shape(
            "matmul",
            format!(
                "op(A) is {m}x{k}, op(B) is {kb}x{n}, C is {}x{} (A {:?}{}, B {:?}{})",
                c.rows(),
                c.cols(),
                a.shape(),
                if trans_a { " transposed" } else { "" },
                b.shape(),
                if trans_b { " transposed" } else { "" },
            ),
        ));
    }
    let bias_buf = match bias {
        Some(t) if t.numel() != n => {
            return Err(Error::shape("matmul", format!("bias has {} elements, N is {n}", t.numel())))
        }
        Some(t) => Some(t.single("matmul bias")?),
        None => None,
    };
    let ops = [
        Operand {
            t: a,
            rows: if trans_a { Axis::K } else { Axis::M },
            cols: if trans_a { Axis::M } else { Axis::K },
        },
        Operand {
            t: b,
            rows: if trans_b { Axis::N } else { Axis::K },
            cols: if trans_b { Axis::K } else { Axis::N },
        },
        Operand { t: c, rows: Axis::M, cols: Axis::N },
    ];
    let cuts = |axis: Axis, extent: usize| -> Vec<(usize, usize)> {
        let mut points = vec![0, extent];
        for op in ops.iter().filter(|o| o.split_axis() == axis) {
            points.extend(op.t.chunks().iter().map(|ch| ch.start));
        }
        points.sort_unstable();
        points.dedup();
        points.windows(2).map(|w| (w[0], w[1] - w[0])).filter(|&(_, len)| len > 0).collect()
    };
    let (ms, ns, ks) = (cuts(Axis::M, m), cuts(Axis::N, n), cuts(Axis::K, k));
    for &(m0, ml) in &ms {
        for &(n0, nl) in &ns {
            for (ki, &(k0, kl)) in ks.iter().enumerate() {
                let at = |axis: Axis| match axis {
                    Axis::M => m0,
                    Axis::N => n0,
                    Axis::K => k0,
                };
                // Views are built in stored (row, col) order; the logical strides follow.
                let av = ops[0].view(at);
                let bv = ops[1].view(at);
                let cv = ops[2].view(at);
                let av = if trans_a { View { s_i: av.s_j, s_j: av.s_i, ..av } } else { av };
                let bv = if trans_b { View { s_i: bv.s_j, s_j: bv.s_i, ..bv } } else { bv };
                matmul_strided(
                    gpu,
                    cv,
                    av,
                    bv,
                    if ki == 0 { bias_buf.map(|buf| (buf, n0)) } else { None },
                    Dims { m: ml, n: nl, k: kl, nb1: 1, nb2: 1 },
                    1.0,
                    accumulate || ki > 0,
                )?;
            }
        }
    }
    Ok(())
}

/// Gradients of [`matmul`]: `dA`, `dB` (stored like A and B) and `dbias = sum_rows(dC)`, each
/// optional; written, or added to when `accumulate`.
pub fn matmul_backward(
    gpu: &Gpu,
    da: Option<&Tensor>,
    db: Option<&Tensor>,
    dbias: Option<&Tensor>,
    dc: &Tensor,
    a: &Tensor,
    b: &Tensor,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
) -> Result<()> {
    if let Some(da) = da {
        if trans_a {
            matmul(gpu, da, b, dc, None, trans_b, true, accumulate)?;
        } else {
            matmul(gpu, da, dc, b, None, false, !trans_b, accumulate)?;
        }
    }
    if let Some(db) = db {
        if trans_b {
            matmul(gpu, db, dc, a, None, true, trans_a, accumulate)?;
        } else {
            matmul(gpu, db, a, dc, None, !trans_a, false, accumulate)?;
        }
    }
    if let Some(dbias) = dbias {
        super::reduce::sum_rows(gpu, dbias, dc, accumulate)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::STAGED_TILES;

    /// Every staged tile's K span keeps an invocation under the loop limit, counting every
    /// loop, and cuts K at multiples of 4 (the next piece's operands stay 16-byte aligned).
    #[test]
    fn staged_k_spans_stay_under_the_loop_limit() {
        for &t in STAGED_TILES {
            let span = k_span(MatmulKernel::Staged(t));
            let steps = span / t.bk as usize;
            assert_eq!(span % t.bk as usize, 0);
            assert_eq!(span % 4, 0);
            assert!(steps * staged_step_trips(t) + staged_fixed_trips(t) <= crate::kernels::MAX_LOOP_TRIPS);
            assert!(span >= 1024, "{t:?}: a span of {span} would cut GPT-2's products into many dispatches");
        }
    }
}
