//! Elementwise and row-broadcast kernels (`shaders/elementwise.wgsl`). Reference:
//! `kernels_ref::add`, `kernels_ref::scale`. Tensors may be chunked as long as all operands
//! share one chunk layout (gradients are allocated like their parameters, so they do).

use super::{check_len, u32_of};
use crate::error::{Error, Result};
use crate::gpu::Bind;
use crate::gpu::{Gpu, KernelKey, Tensor};

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    cols: u32,
    out_off: u32,
    a_off: u32,
    b_off: u32,
    alpha: f32,
    beta: f32,
    shift: f32,
}

const WG: usize = 256;

/// Chunk-by-chunk buffers and element counts of tensors that share one layout.
pub(crate) fn same_layout<'t>(op: &str, ts: &[&'t Tensor]) -> Result<Vec<(Vec<Bind<'t>>, usize)>> {
    let first = ts[0];
    for t in &ts[1..] {
        let same = t.numel() == first.numel()
            && t.chunks().len() == first.chunks().len()
            && (first.chunks().len() == 1
                || (t.split() == first.split()
                    && t.shape() == first.shape()
                    && t.chunks()
                        .iter()
                        .zip(first.chunks())
                        .all(|(a, b)| a.start == b.start && a.len == b.len)));
        if !same {
            return Err(Error::shape(
                op,
                format!("operands {:?} and {:?} differ in size or chunk layout", first.shape(), t.shape()),
            ));
        }
    }
    let per_chunk = |i: usize| first.chunks()[i].bytes() as usize / 4;
    Ok((0..first.chunks().len())
        .map(|i| (ts.iter().map(|t| t.chunks()[i].bind()).collect(), per_chunk(i)))
        .collect())
}

fn run(gpu: &Gpu, entry: &'static str, bufs: &[Option<Bind<'_>>], p: Params) -> Result<()> {
    gpu.dispatch(
        &KernelKey::new("elementwise", entry),
        bufs,
        bytemuck::bytes_of(&p),
        gpu.grid(p.n as usize, WG),
    )
}

/// [`run`] of an entry that `elementwise_vec4.wgsl` has too (`add`, `axpby`, `fill`,
/// `dropout`, `row_mul`, `add_row`, whose Params carry no offsets): four elements an invocation
/// where the piece's length is a multiple of 4 (its bindings start aligned, as every storage
/// binding does) and, for the row entries (`rows`: `p.cols` a row's length), so is a row's.
fn run_vec4(gpu: &Gpu, entry: &'static str, bufs: &[Option<Bind<'_>>], p: Params, rows: bool) -> Result<()> {
    if !takes_vec4(p.n as usize) || (rows && !p.cols.is_multiple_of(4)) {
        return run(gpu, entry, bufs, p);
    }
    let cols = if rows { p.cols / 4 } else { p.cols };
    let p = Params { n: p.n / 4, cols, ..p };
    let key = KernelKey::new("elementwise_vec4", entry);
    gpu.dispatch(&key, bufs, bytemuck::bytes_of(&p), gpu.grid(p.n as usize, WG))
}

thread_local! {
    static VEC4: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Whether a piece of `n` elements runs four elements an invocation: `n` a multiple of 4 and
/// [`with_vec4`] not off on this thread.
pub(crate) fn takes_vec4(n: usize) -> bool {
    n > 0 && n.is_multiple_of(4) && VEC4.with(|v| v.get()).unwrap_or(true)
}

/// Run `f` with the vec4 kernels of this module, of `activation` and of `norm` on this thread
/// used where they apply (`true`, the default) or not (`cargo bench --bench elementwise`
/// compares the two).
pub fn with_vec4<R>(on: bool, f: impl FnOnce() -> R) -> R {
    super::with_override(&VEC4, on, f)
}

/// `out = alpha * a + beta * b`
pub fn add(gpu: &Gpu, out: &Tensor, a: &Tensor, b: &Tensor, alpha: f32, beta: f32) -> Result<()> {
    for (bufs, n) in same_layout("add", &[out, a, b])? {
        let p = Params { n: u32_of(n, "add")?, alpha, beta, ..Default::default() };
        run_vec4(gpu, "add", &[Some(bufs[0]), Some(bufs[1]), Some(bufs[2])], p, false)?;
    }
    Ok(())
}

/// `out = alpha * a + beta * out` (scale with beta = 0, accumulate with alpha = beta = 1).
pub fn axpby(gpu: &Gpu, out: &Tensor, a: &Tensor, alpha: f32, beta: f32) -> Result<()> {
    for (bufs, n) in same_layout("axpby", &[out, a])? {
        let p = Params { n: u32_of(n, "axpby")?, alpha, beta, ..Default::default() };
        run_vec4(gpu, "axpby", &[Some(bufs[0]), Some(bufs[1])], p, false)?;
    }
    Ok(())
}

/// `out = value` everywhere (zeroing gradients, poisoning outputs in tests).
pub fn fill(gpu: &Gpu, out: &Tensor, value: f32) -> Result<()> {
    for (bufs, n) in same_layout("fill", &[out])? {
        let p = Params { n: u32_of(n, "fill")?, alpha: value, ..Default::default() };
        run_vec4(gpu, "fill", &[Some(bufs[0])], p, false)?;
    }
    Ok(())
}

/// `out[r, j] = a[r, j] * (w[j] + shift)`, rows of `w.numel()` values
pub fn row_mul(gpu: &Gpu, out: &Tensor, a: &Tensor, w: &Tensor, shift: f32) -> Result<()> {
    check_len("row_mul", "out", out.numel(), a.numel())?;
    if w.numel() == 0 || !a.numel().is_multiple_of(w.numel()) {
        return Err(crate::Error::shape(
            "row_mul",
            format!("{} values are not rows of {}", a.numel(), w.numel()),
        ));
    }
    let p = Params {
        n: u32_of(a.numel(), "row_mul")?,
        cols: u32_of(w.numel(), "row_mul")?,
        shift,
        ..Default::default()
    };
    let bufs = [Some(out.single("row_mul")?), Some(a.single("row_mul")?), Some(w.single("row_mul")?)];
    run_vec4(gpu, "row_mul", &bufs, p, true)
}

/// `out[r, j] += bias[j]`
pub fn add_row(gpu: &Gpu, out: &Tensor, bias: &Tensor) -> Result<()> {
    check_len("add_row", "bias", bias.numel(), out.cols())?;
    let p = Params {
        n: u32_of(out.numel(), "add_row")?,
        cols: u32_of(out.cols(), "add_row")?,
        ..Default::default()
    };
    run_vec4(gpu, "add_row", &[Some(out.single("add_row")?), Some(bias.single("add_row")?)], p, true)
}

/// `out *= s[index]`, with the scale read on the GPU (no read-back).
pub fn scale_by(gpu: &Gpu, out: &Tensor, s: &Tensor, index: usize) -> Result<()> {
    let sbuf = s.single("scale_by")?;
    for (bufs, n) in same_layout("scale_by", &[out])? {
        let p = Params { n: u32_of(n, "scale_by")?, a_off: u32_of(index, "scale_by")?, ..Default::default() };
        run(gpu, "scale_by", &[Some(bufs[0]), Some(sbuf)], p)?;
    }
    Ok(())
}

/// Inverted dropout, the mask hashed from (`seed`, element index) as `kernels_ref::dropout`
/// does; the backward is the same call on the output gradient.
pub fn dropout(gpu: &Gpu, out: &Tensor, a: &Tensor, p: f32, seed: u32) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::InvalidArgument {
            name: "dropout".into(),
            detail: format!("probability {p} is not in [0, 1)"),
        });
    }
    let threshold = (p as f64 * 4294967296.0).min(4294967295.0) as u32;
    let bufs = [Some(out.single("dropout")?), Some(a.single("dropout")?)];
    check_len("dropout", "out", out.numel(), a.numel())?;
    let params = Params {
        n: u32_of(a.numel(), "dropout")?,
        cols: seed,
        b_off: threshold,
        alpha: (1.0 / (1.0 - p as f64)) as f32,
        ..Default::default()
    };
    run_vec4(gpu, "dropout", &bufs, params, false)
}
