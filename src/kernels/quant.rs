//! Products and gathers through a frozen weight stored as F16, BF16 or a ggml block type
//! ([`QTensor`]), dequantized in the shader as it is read (`shaders/quant.wgsl`): the LoRA base
//! and the `eval`/`generate` model stay in their file's format on the GPU.
//!
//! - [`qmatmul`]: `y = x . W^T (+ bias)`, a linear layer's forward and a tied LM head.
//! - [`qmatmul_dx`]: `dx = dy . W`, the gradient that flows back through the frozen weight
//!   (W itself gets none).
//! - [`qembedding_forward`]: rows of a packed embedding table.
//!
//! Reference: `kernels_ref::quant::dequantize` followed by `kernels_ref::matmul_forward` /
//! `embedding_forward` (f64 accumulation). As in `matmul`, every operand may be chunked: the
//! products are cut at every chunk boundary of x, y (dx, dy) and W, then into spans of at most
//! [`LOOP_SPAN`](super::LOOP_SPAN) along the summed dimension (K for `qmatmul`, N for
//! `qmatmul_dx`), one dispatch each, the later ones adding into the output, and into grids that
//! fit the device's workgroups per dimension.

use super::embedding::Ids;
use super::u32_of;
use crate::error::{Error, Result};
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
/// constants, so the compiler keeps only that type's code.
fn key(entry: &'static str, ty: GgmlType) -> KernelKey {
    // elements that share one (scale, offset): a block's sub-block, or a group of 4 floats
    let sub = match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 4,
        GgmlType::Q6_K => 16,
        _ => 32,
    };
    KernelKey::new("quant", entry)
        .with("TYPE", ty.id())
        .with("QK", ty.block_elems() as u32)
        .with("BLOCK_BYTES", ty.block_bytes() as u32)
        .with("SUB", sub)
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
fn locate(t: &Tensor, r0: usize, c0: usize) -> (&wgpu::Buffer, usize, usize) {
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
        Split::Rows => (ch.buf.raw(), (r0 - ch.start) * t.cols() + c0, t.cols()),
        Split::Cols => (ch.buf.raw(), r0 * ch.len + (c0 - ch.start), ch.len),
    }
}

/// The chunk of W holding row `n0`: its buffer and the byte offset of that row.
fn w_row(w: &QTensor, n0: usize) -> (&wgpu::Buffer, usize) {
    let ch = w
        .chunks()
        .iter()
        .find(|ch| n0 >= ch.start && n0 < ch.start + ch.len)
        .expect("piece boundaries include every chunk boundary of W");
    (ch.buf.raw(), (n0 - ch.start) * w.row_bytes())
}

fn chunk_starts(w: &QTensor) -> Vec<usize> {
    w.chunks().iter().map(|c| c.start).collect()
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
    if m == 0 {
        return Ok(());
    }
    let qk = w.ty().block_elems();
    let max = gpu.max_workgroups() as usize;
    let ms = cuts(m, &[starts(x, Split::Rows), starts(y, Split::Rows)].concat(), max * TM);
    let ns = cuts(n, &[starts(y, Split::Cols), chunk_starts(w)].concat(), max * WG * TN);
    let ks = cuts(k, &starts(x, Split::Cols), super::LOOP_SPAN);
    if let Some(&(k0, _)) = ks.iter().find(|&&(k0, _)| k0 % qk != 0) {
        return Err(Error::shape(
            "qmatmul",
            format!(
                "x is split by columns at column {k0}, inside a {} block of {qk} values of W; \
                 store x by rows",
                w.ty()
            ),
        ));
    }
    let key = key("qmatmul", w.ty());
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
    if m == 0 {
        return Ok(());
    }
    let max = gpu.max_workgroups() as usize;
    let ms = cuts(m, &[starts(dx, Split::Rows), starts(dy, Split::Rows)].concat(), max * TM);
    let ks = cuts(k, &starts(dx, Split::Cols), max * WG * TK);
    let ns = cuts(n, &[starts(dy, Split::Cols), chunk_starts(w)].concat(), super::LOOP_SPAN);
    if w.ty().is_quantized() {
        if let Some(&(k0, _)) = ks.iter().find(|&&(k0, _)| k0 % TK != 0) {
            return Err(Error::shape(
                "qmatmul_dx",
                format!("dx is split by columns at column {k0}, not a multiple of {TK}; store dx by rows"),
            ));
        }
    }
    let key = key("qmatmul_dx", w.ty());
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
        let bufs = [Some(idb.raw()), Some(ch.buf.raw()), Some(ob), None];
        gpu.dispatch(&key, &bufs, bytemuck::bytes_of(&p), gpu.grid(items, WG))?;
    }
    Ok(())
}
