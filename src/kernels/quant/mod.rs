//! Products and gathers through a frozen weight stored as F16, BF16 or a ggml block type
//! ([`QTensor`]): the LoRA base and the `eval`/`generate` model stay in their file's format on
//! the GPU (`shaders/quant.wgsl` decodes them).
//!
//! - [`qmatmul`]: `y = x . W^T (+ bias)`, a linear layer's forward and a tied LM head.
//! - [`qmatmul_dx`]: `dx = dy . W`, the gradient that flows back through the frozen weight
//!   (W itself gets none).
//! - [`qembedding_forward`]: rows of a packed embedding table.
//! - [`qdequantize`]: rows of W as f32.
//!
//! The two products have two variants ([`QmatmulVariant`]). *Fused* kernels decode W inside
//! the product; they need no memory beyond the packed weight and win for a few rows of x
//! (generation, one position's logits). *Scratch* (module `scratch`) dequantizes a block of
//! W's rows into a bounded f32 buffer and runs the f32 [`matmul`](super::matmul) on it, whichever
//! kernel that picks; for training batches and eval it is several times faster on lavapipe,
//! where the fused kernels' many byte loads per weight, repeated for every 4 rows of x, cost
//! more than one decode per weight and an f32 product (docs/perf.md, "Quantized base on
//! lavapipe"). [`QmatmulVariant::Auto`] picks by the rows of x: scratch from
//! [`SCRATCH_MIN_ROWS`] on. `POCKETTUNE_QMATMUL=fused|scratch|auto` forces a choice for the
//! process, [`with_variant`] for one thread (tests, gradcheck, benches).
//!
//! Reference: `kernels_ref::quant::dequantize` followed by `kernels_ref::matmul_forward` /
//! `embedding_forward` (f64 accumulation). As in `matmul`, every operand may be chunked: the
//! fused products are cut at every chunk boundary of x, y (dx, dy) and W, then into spans of at
//! most [`LOOP_SPAN`](super::LOOP_SPAN) along the summed dimension (K for `qmatmul`, N for
//! `qmatmul_dx`), one dispatch each, the later ones adding into the output, and into grids that
//! fit the device's workgroups per dimension.

mod scratch;

use super::embedding::Ids;
use super::u32_of;
use crate::error::{Error, Result};
use crate::gpu::Bind;
use crate::gpu::{Gpu, KernelKey, QTensor, Split, Tensor};
use kernels_ref::quant::GgmlType;

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    flags: u32,
    x_off: u32,
    x_ld: u32,
    y_off: u32,
    y_ld: u32,
    w_off: u32,
    w_ld: u32,
    w_k0: u32,
    bias_off: u32,
    row0: u32,
    _pad: [u32; 3],
}

/// Invocations per workgroup; rows of the output one invocation computes (both products);
/// columns of y (`qmatmul`), of dx (`qmatmul_dx`) and of an embedding row (`qgather`) it
/// computes.
const WG: usize = 64;
const TM: usize = 4;
const TN: usize = 4;
const TK: usize = 8;
const TC: usize = 4;

/// The pipeline of `entry` for weights stored as `ty`: the decoder is chosen by override
/// constants, so the compiler keeps only that type's code. The product `qmatmul` under
/// [`matmul::with_precision`]`(Mixed)` takes its products in f16 (`quant_mixed`).
fn key(entry: &'static str, ty: GgmlType) -> KernelKey {
    let mixed = entry == "qmatmul" && super::matmul::precision() == crate::gpu::Precision::Mixed;
    KernelKey::new(if mixed { "quant_mixed" } else { "quant" }, entry)
        .with("TYPE", ty.id())
        .with("QK", ty.block_elems() as u32)
        .with("BLOCK_BYTES", ty.block_bytes() as u32)
        .with("SUB", sub_elems(ty) as u32)
}

/// Elements that share one (scale, offset): a block's sub-block, or a group of 4 floats.
fn sub_elems(ty: GgmlType) -> usize {
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 4,
        GgmlType::Q6_K => 16,
        _ => 32,
    }
}

/// `0..extent` cut at the chunk starts of the tensors (and every `grid` elements after each
/// cut), as (start, len) pieces.
fn cuts(extent: usize, starts: &[usize], grid: usize) -> Vec<(usize, usize)> {
    let mut points: Vec<usize> = starts.iter().copied().filter(|&s| s < extent).collect();
    points.extend([0, extent]);
    points.sort_unstable();
    points.dedup();
    points
        .windows(2)
        .flat_map(|w| super::spans(w[1] - w[0], grid).map(move |(s, l)| (w[0] + s, l)))
        .filter(|&(_, len)| len > 0)
        .collect()
}

/// Chunk starts of `t` along its rows (`Split::Rows`) or its columns (`Split::Cols`).
fn starts(t: &Tensor, along: Split) -> Vec<usize> {
    if t.split() == along {
        t.chunks().iter().map(|c| c.start).collect()
    } else {
        Vec::new()
    }
}

/// The buffer, element offset and row stride of element (r0, c0) of `t`, in the chunk that
/// holds it (piece boundaries include every chunk boundary, so the piece stays in it).
fn locate(t: &Tensor, r0: usize, c0: usize) -> (Bind<'_>, usize, usize) {
    let along = match t.split() {
        Split::Rows => r0,
        Split::Cols => c0,
    };
    let ch = t
        .chunks()
        .iter()
        .find(|ch| along >= ch.start && along < ch.start + ch.len)
        .expect("piece boundaries include every chunk boundary");
    match t.split() {
        Split::Rows => (ch.bind(), (r0 - ch.start) * t.cols() + c0, t.cols()),
        Split::Cols => (ch.bind(), r0 * ch.len + (c0 - ch.start), ch.len),
    }
}

/// The chunk of W holding row `n0`: its buffer and the byte offset of that row.
fn w_row(w: &QTensor, n0: usize) -> (Bind<'_>, usize) {
    let ch = w
        .chunks()
        .iter()
        .find(|ch| n0 >= ch.start && n0 < ch.start + ch.len)
        .expect("piece boundaries include every chunk boundary of W");
    (ch.bind(), (n0 - ch.start) * w.row_bytes())
}

fn chunk_starts(w: &QTensor) -> Vec<usize> {
    w.chunks().iter().map(|c| c.start).collect()
}

/// How [`qmatmul`] and [`qmatmul_dx`] compute (module comment).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QmatmulVariant {
    /// Decode W inside the product (`quant.wgsl`'s `qmatmul` / `qmatmul_dx`).
    Fused,
    /// Dequantize blocks of W's rows into an f32 scratch buffer of at most [`SCRATCH_BYTES`]
    /// and run the f32 matmul on it.
    Scratch,
    /// Fused below [`SCRATCH_MIN_ROWS`] rows of x (of dy for `qmatmul_dx`), scratch from there.
    Auto,
}

impl QmatmulVariant {
    pub const ALL: [QmatmulVariant; 3] =
        [QmatmulVariant::Fused, QmatmulVariant::Scratch, QmatmulVariant::Auto];

    pub fn name(self) -> &'static str {
        match self {
            QmatmulVariant::Fused => "fused",
            QmatmulVariant::Scratch => "scratch",
            QmatmulVariant::Auto => "auto",
        }
    }

    /// The variant named `name` (`fused`, `scratch` or `auto`).
    pub fn parse(name: &str) -> Result<QmatmulVariant> {
        Self::ALL.into_iter().find(|v| v.name() == name).ok_or_else(|| Error::InvalidArgument {
            name: QMATMUL_ENV.into(),
            detail: format!("{name:?} is not a quantized-matmul variant: use fused, scratch or auto"),
        })
    }
}

/// Environment variable that forces a [`QmatmulVariant`] for the whole process.
pub const QMATMUL_ENV: &str = "POCKETTUNE_QMATMUL";

/// From this many rows of x (dy) on, [`QmatmulVariant::Auto`] takes the scratch variant.
/// Measured on lavapipe at Gemma 3 270M's shapes and types (`cargo bench --bench quant --
/// --sweep`, docs/perf.md): the fused kernels cost the same per row of x from 4 rows on (one
/// invocation computes 4), while the scratch variant pays one decode of W and a 64-row tile of
/// the f32 matmul whatever the rows, so its speed grows with M up to 64. At 16 rows fused was
/// still faster or even in 9 of 10 products; from 24 scratch was faster in all (1.0-2.3x), at
/// 64 rows 2.6-4x.
pub const SCRATCH_MIN_ROWS: usize = 24;

/// Largest f32 scratch the scratch variant holds for a block of W's rows (also held below
/// the device's binding limit): 32 MiB is 13,107 rows of Gemma 3's 640-wide LM head, a
/// twentieth of it.
pub const SCRATCH_BYTES: usize = 32 << 20;

thread_local! {
    static VARIANT: std::cell::Cell<Option<QmatmulVariant>> = const { std::cell::Cell::new(None) };
    static SCRATCH_LIMIT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Run `f` with the quantized products on this thread computed by `variant` (tests, gradcheck
/// and benches compare the variants this way without disturbing other threads).
pub fn with_variant<R>(variant: QmatmulVariant, f: impl FnOnce() -> R) -> R {
    super::with_override(&VARIANT, variant, f)
}

/// Run `f` with the scratch variant's buffer on this thread held to `bytes` (at least one row
/// of W), so that tests walk W in several row blocks on small weights.
pub fn with_scratch_limit<R>(bytes: usize, f: impl FnOnce() -> R) -> R {
    super::with_override(&SCRATCH_LIMIT, bytes, f)
}

/// The variant in force on this thread: [`with_variant`]'s, else `POCKETTUNE_QMATMUL`'s, else
/// [`QmatmulVariant::Auto`].
pub fn current_variant() -> Result<QmatmulVariant> {
    static ENV: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if let Some(v) = VARIANT.with(|v| v.get()) {
        return Ok(v);
    }
    match ENV.get_or_init(|| std::env::var(QMATMUL_ENV).ok()) {
        Some(name) => QmatmulVariant::parse(name),
        None => Ok(QmatmulVariant::Auto),
    }
}

/// Whether a product with `m` rows of x (dy) runs the scratch variant.
pub fn use_scratch(m: usize) -> Result<bool> {
    Ok(match current_variant()? {
        QmatmulVariant::Fused => false,
        QmatmulVariant::Scratch => true,
        QmatmulVariant::Auto => m >= SCRATCH_MIN_ROWS,
    })
}

/// `y (M,N) = x (M,K) . W^T (+ bias (N)) (+ y if accumulate)`, W a [`QTensor`] (N,K). x and y
/// may be chunked by rows or columns (logits at a real vocabulary are); a column chunk of x
/// must start on a block boundary of W.
pub fn qmatmul(
    gpu: &Gpu,
    y: &Tensor,
    x: &Tensor,
    w: &QTensor,
    bias: Option<&Tensor>,
    accumulate: bool,
) -> Result<()> {
    let (m, k, n) = (x.rows(), x.cols(), w.rows());
    if w.cols() != k || y.rows() != m || y.cols() != n {
        return Err(Error::shape(
            "qmatmul",
            format!(
                "x is {m}x{k}, W ({}) is {n}x{}, y is {}x{}: need x (M,K), W (N,K), y (M,N)",
                w.ty(),
                w.cols(),
                y.rows(),
                y.cols()
            ),
        ));
    }
    let bias_buf = match bias {
        Some(t) if t.numel() != n => {
            return Err(Error::shape("qmatmul", format!("bias has {} elements, N is {n}", t.numel())))
        }
        Some(t) => Some(t.single("qmatmul bias")?),
        None => None,
    };
    // Both variants hold x's column chunks to W's blocks (the scratch one could do without),
    // so that a layout works or fails the same whichever runs.
    let qk = w.ty().block_elems();
    if let Some(k0) = starts(x, Split::Cols).into_iter().find(|&k0| k0 % qk != 0) {
        return Err(Error::shape(
            "qmatmul",
            format!(
                "x is split by columns at column {k0}, inside a {} block of {qk} values of W; \
                 store x by rows",
                w.ty()
            ),
        ));
    }
    if m == 0 {
        return Ok(());
    }
    if use_scratch(m)? {
        scratch::qmatmul(gpu, y, x, w, bias_buf, accumulate)
    } else {
        qmatmul_fused(gpu, y, x, w, bias_buf, accumulate)
    }
}

/// [`qmatmul`] by `quant.wgsl`'s fused kernel, the arguments checked.
fn qmatmul_fused(
    gpu: &Gpu,
    y: &Tensor,
    x: &Tensor,
    w: &QTensor,
    bias_buf: Option<Bind<'_>>,
    accumulate: bool,
) -> Result<()> {
    let (m, k, n) = (x.rows(), x.cols(), w.rows());
    let max = gpu.max_workgroups() as usize;
    let ms = cuts(m, &[starts(x, Split::Rows), starts(y, Split::Rows)].concat(), max * TM);
    let ns = cuts(n, &[starts(y, Split::Cols), chunk_starts(w)].concat(), max * WG * TN);
    let ks = cuts(k, &starts(x, Split::Cols), super::LOOP_SPAN);
    let key = key("qmatmul", w.ty()).with("ONE_ROW", (m == 1) as u32);
    let u = |v: usize| u32_of(v, "qmatmul");
    for &(m0, ml) in &ms {
        for &(n0, nl) in &ns {
            let (wb, w_off) = w_row(w, n0);
            for &(k0, kl) in &ks {
                let (xb, x_off, x_ld) = locate(x, m0, k0);
                let (yb, y_off, y_ld) = locate(y, m0, n0);
                let first = k0 == 0;
                let add_bias = bias_buf.is_some() && first;
                let p = Params {
                    m: u(ml)?,
                    n: u(nl)?,
                    k: u(kl)?,
                    flags: add_bias as u32 | (((accumulate || !first) as u32) << 1),
                    x_off: u(x_off)?,
                    x_ld: u(x_ld)?,
                    y_off: u(y_off)?,
                    y_ld: u(y_ld)?,
                    w_off: u(w_off)?,
                    w_ld: u(w.row_bytes())?,
                    w_k0: u(k0)?,
                    bias_off: u(n0)?,
                    ..Default::default()
                };
                let bias = bias_buf.unwrap_or(gpu.placeholder());
                let groups = [nl.div_ceil(WG * TN), ml.div_ceil(TM), 1].map(|g| g as u32);
                gpu.dispatch(
                    &key,
                    &[Some(xb), Some(wb), Some(yb), Some(bias)],
                    bytemuck::bytes_of(&p),
                    groups,
                )?;
            }
        }
    }
    Ok(())
}

/// `dx (M,K) = dy (M,N) . W (+ dx if accumulate)`: the backward dX product of [`qmatmul`]
/// through the frozen weight. dy and dx may be chunked; for a block type a column chunk of dx
/// must start at a multiple of 8.
pub fn qmatmul_dx(gpu: &Gpu, dx: &Tensor, dy: &Tensor, w: &QTensor, accumulate: bool) -> Result<()> {
    let (m, n, k) = (dy.rows(), dy.cols(), w.cols());
    if w.rows() != n || dx.rows() != m || dx.cols() != k {
        return Err(Error::shape(
            "qmatmul_dx",
            format!(
                "dy is {m}x{n}, W ({}) is {}x{k}, dx is {}x{}: need dy (M,N), W (N,K), dx (M,K)",
                w.ty(),
                w.rows(),
                dx.rows(),
                dx.cols()
            ),
        ));
    }
    // (as in qmatmul, both variants hold dx to the fused kernel's layout rule)
    if w.ty().is_quantized() {
        if let Some(k0) = starts(dx, Split::Cols).into_iter().find(|&k0| k0 % TK != 0) {
            return Err(Error::shape(
                "qmatmul_dx",
                format!("dx is split by columns at column {k0}, not a multiple of {TK}; store dx by rows"),
            ));
        }
    }
    if m == 0 {
        return Ok(());
    }
    if use_scratch(m)? {
        scratch::qmatmul_dx(gpu, dx, dy, w, accumulate)
    } else {
        qmatmul_dx_fused(gpu, dx, dy, w, accumulate)
    }
}

/// [`qmatmul_dx`] by `quant.wgsl`'s fused kernel, the arguments checked.
fn qmatmul_dx_fused(gpu: &Gpu, dx: &Tensor, dy: &Tensor, w: &QTensor, accumulate: bool) -> Result<()> {
    let (m, n, k) = (dy.rows(), dy.cols(), w.cols());
    let max = gpu.max_workgroups() as usize;
    let ms = cuts(m, &[starts(dx, Split::Rows), starts(dy, Split::Rows)].concat(), max * TM);
    let ks = cuts(k, &starts(dx, Split::Cols), max * WG * TK);
    let ns = cuts(n, &[starts(dy, Split::Cols), chunk_starts(w)].concat(), super::LOOP_SPAN);
    let key = key("qmatmul_dx", w.ty()).with("ONE_ROW", (m == 1) as u32);
    let u = |v: usize| u32_of(v, "qmatmul_dx");
    for &(m0, ml) in &ms {
        for &(k0, kl) in &ks {
            let (dxb, dx_off, dx_ld) = locate(dx, m0, k0);
            for (i, &(n0, nl)) in ns.iter().enumerate() {
                let (dyb, dy_off, dy_ld) = locate(dy, m0, n0);
                let (wb, w_off) = w_row(w, n0);
                let p = Params {
                    m: u(ml)?,
                    n: u(nl)?,
                    k: u(kl)?,
                    flags: ((accumulate || i > 0) as u32) << 1,
                    x_off: u(dy_off)?,
                    x_ld: u(dy_ld)?,
                    y_off: u(dx_off)?,
                    y_ld: u(dx_ld)?,
                    w_off: u(w_off)?,
                    w_ld: u(w.row_bytes())?,
                    w_k0: u(k0)?,
                    ..Default::default()
                };
                let groups = [kl.div_ceil(TK).div_ceil(WG), ml.div_ceil(TM), 1].map(|g| g as u32);
                gpu.dispatch(&key, &[Some(dyb), Some(wb), Some(dxb), None], bytemuck::bytes_of(&p), groups)?;
            }
        }
    }
    Ok(())
}

/// `out (R, K)` = rows `row0..row0 + R` of W dequantized to f32 (`kernels_ref::quant::
/// dequantize`'s values, up to the one rounding a fused multiply-add may save); `out` is one
/// buffer. The scratch variant's decoder, public for its own test.
pub fn qdequantize(gpu: &Gpu, out: &Tensor, w: &QTensor, row0: usize) -> Result<()> {
    let (rows, k) = (out.rows(), w.cols());
    if out.cols() != k || row0 + rows > w.rows() {
        return Err(Error::shape(
            "qdequantize",
            format!(
                "out is {rows}x{}, W ({}) is {}x{k}: rows {row0}..{} are not all in W, or the \
                 widths differ",
                out.cols(),
                w.ty(),
                w.rows(),
                row0 + rows
            ),
        ));
    }
    dequantize_rows(gpu, out.single("qdequantize")?, 0, w, row0, rows)
}

/// Rows `row0..row0 + rows` of W as f32 into `out` from element `out_off` (rows of K values),
/// one dispatch per chunk of W they touch.
fn dequantize_rows(
    gpu: &Gpu,
    out: Bind<'_>,
    out_off: usize,
    w: &QTensor,
    row0: usize,
    rows: usize,
) -> Result<()> {
    let k = w.cols();
    let key = key("dequantize", w.ty());
    let u = |v: usize| u32_of(v, "qdequantize");
    let points = [chunk_starts(w), vec![row0]].concat();
    for (r0, rl) in cuts(row0 + rows, &points, usize::MAX).into_iter().filter(|&(r0, _)| r0 >= row0) {
        let (wb, w_off) = w_row(w, r0);
        let items = rl * k.div_ceil(sub_elems(w.ty()));
        u(items)?;
        let p = Params {
            m: u(rl)?,
            k: u(k)?,
            y_off: u(out_off + (r0 - row0) * k)?,
            y_ld: u(k)?,
            w_off: u(w_off)?,
            w_ld: u(w.row_bytes())?,
            ..Default::default()
        };
        gpu.dispatch(&key, &[None, Some(wb), Some(out), None], bytemuck::bytes_of(&p), gpu.grid(items, WG))?;
    }
    Ok(())
}

/// `out (n, C) = table[ids]`, the rows of a packed (V, C) embedding table, dequantized.
pub fn qembedding_forward(gpu: &Gpu, out: &Tensor, ids: &Ids, table: &QTensor) -> Result<()> {
    let (v, c) = (table.rows(), table.cols());
    super::check_len("qembedding_forward", "out", out.numel(), ids.len() * c)?;
    if let Some((pos, &bad)) = ids.host().iter().enumerate().find(|(_, &id)| id as usize >= v) {
        return Err(Error::InvalidArgument {
            name: "token ids".into(),
            detail: format!("id {bad} at position {pos} is outside the embedding table's {v} rows"),
        });
    }
    if ids.is_empty() {
        return Ok(());
    }
    let ob = out.single("qembedding_forward")?;
    // `Ids` keeps its GPU copy to itself; the ids are few (one per token), so upload them again.
    let idb = gpu.alloc((ids.len() * 4) as u64, "token ids")?;
    gpu.write(idb.raw(), 0, bytemuck::cast_slice(ids.host()))?;
    let key = key("qgather", table.ty());
    let u = |v: usize| u32_of(v, "qembedding_forward");
    let items = ids.len() * c.div_ceil(TC);
    u(items)?;
    for ch in table.chunks() {
        let p = Params {
            m: u(ids.len())?,
            n: u(ch.len)?,
            k: u(c)?,
            w_ld: u(table.row_bytes())?,
            row0: u(ch.start)?,
            ..Default::default()
        };
        let bufs = [Some(idb.bind()), Some(ch.bind()), Some(ob), None];
        gpu.dispatch(&key, &bufs, bytemuck::bytes_of(&p), gpu.grid(items, WG))?;
    }
    Ok(())
}
