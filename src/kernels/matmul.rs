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
/// (`matmul_subgroup_narrow_m`, one row of A per lane). The 64 x 256 tile computes a whole
/// tile whatever the shape, so at N = 8 it spends 32 times the loads the product needs. By
/// loads per useful multiply-add (lavapipe's cost, see docs/perf.md): 12 / min(N, 256) for the
/// wide tile, 9 / 64 for the narrow-N one, so narrow-N from N < 86 down; narrow-M has 5 loads
/// per 32 against the wide tile's 12 per 4 M.
const SG_NARROW_N: (usize, usize) = (64, 8);
const SG_NARROW_M: (usize, usize) = (8, 256);
/// Largest N (M) that takes a narrow tile.
const NARROW_N_MAX: usize = 64;
const NARROW_M_MAX: usize = 16;

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
    let (key, tile_m, tile_n) = entry(kernel, d.m, d.n);
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

/// A kernel's entry point and the (rows, columns) of C one workgroup computes, for a product
/// of `m` x `n` (the subgroup kernel takes a narrow tile for few rows or columns).
fn entry(kernel: Choice, m: usize, n: usize) -> (KernelKey, usize, usize) {
    let (kernel, staged) = match kernel {
        Choice::F32(k) => (k, "matmul_staged"),
        Choice::Mixed(k @ MatmulKernel::Staged(_)) => (k, "matmul_staged_mixed"),
        Choice::Mixed(_) => return (KernelKey::new("matmul_mixed", "matmul_mixed"), TILE, TILE),
    };
    match kernel {
        MatmulKernel::Tiled => (KernelKey::new("matmul", "matmul"), TILE, TILE),
        MatmulKernel::Subgroup => {
            let (shader, (rows, cols)) = if n <= NARROW_N_MAX {
                ("matmul_subgroup_narrow_n", SG_NARROW_N)
            } else if m <= NARROW_M_MAX {
                ("matmul_subgroup_narrow_m", SG_NARROW_M)
            } else {
                ("matmul_subgroup", (SG_ROWS, SG_COLS))
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
        MatmulKernel::Tiled | MatmulKernel::Subgroup => super::LOOP_SPAN,
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
    let u = |v: usize| u32_of(v, "matmul");
    let params = Params {
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
    };
    let groups = [d.n.div_ceil(tile_n), d.m.div_ceil(tile_m), d.nb1 * d.nb2].map(|g| g as u32);
    gpu.dispatch(
        key,
        &[Some(a.buf), Some(b.buf), Some(c.buf), Some(bias.map_or(gpu.placeholder(), |b| b.0))],
        bytemuck::bytes_of(&params),
        groups,
    )
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
