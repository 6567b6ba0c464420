//! Matrix products: every kernel and tile the device offers, forward and backward, on tiny,
//! ragged and boundary shapes, with `subgroup-uniform`'s packing bit for bit; the chunked,
//! batched and padded forms and the LM head's shapes.

use super::{
    absolute, exact_err, mixed_err, rel_err, Probe, GEMMA3_270M_HIDDEN, GEMMA3_VOCAB, PAST_ONE_GRID_DIM,
};
use crate::error::Result;
use crate::gpu::{MatmulKernel, Precision, Split, Tensor};
use crate::kernels::matmul::{self, Dims, View};
use kernels_ref as kr;

/// (M, N, K) of the products checked in every transpose. Besides tiny and ragged ones, they
/// cross the subgroup kernel's choice of tile: N <= 16 takes the narrow-N tile (64 x 8; M
/// ragged against 64 in (129, 7)), else M <= 16 the narrow-M tile (8 x 256; M ragged against 8
/// in (9, 65)), else N <= 128 the mid tile (64 x 64: (17, 65) and (67, 65) just past both, N
/// ragged; (40, 17) just past narrow-N; (70, 128) at its largest N), else the wide one
/// ((31, 130)).
const MATMUL_SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (1, 5, 3),
    (7, 1, 13),
    (13, 17, 29),
    (64, 64, 64),
    (67, 65, 63),
    (31, 130, 97),
    (129, 7, 200),
    (9, 65, 33),
    (16, 300, 40),
    (17, 65, 20),
    (40, 17, 50),
    (70, 128, 33),
];

const ALL_TRANSPOSES: &[(bool, bool)] = &[(false, false), (false, true), (true, false), (true, true)];

/// (M, N, K, transposes) at the kernels' limits: K past one dispatch's loop span (70,000, and
/// Gemma 3's vocabulary as in the LM head's dX), M past it (dB's inner dimension is M), and M
/// or N past 65,535 workgroups of the tiled kernel's 64-wide tile. A workgroup of lavapipe
/// runs on one core, so the long and thin ones are costly there: fewer transposes for those.
type Boundary = (usize, usize, usize, &'static [(bool, bool)]);
const MATMUL_BOUNDARY_SHAPES: &[Boundary] = &[
    (3, 5, 70_000, ALL_TRANSPOSES),
    (2, 4, GEMMA3_VOCAB, &[(false, true)]),
    (70_001, 3, 5, ALL_TRANSPOSES),
    (1, 65_535 * 64 + 1, 1, &[(false, true)]),
    (65_535 * 64 + 1, 1, 1, &[(true, false)]),
    // subgroup-uniform: rows past one packing group (64 blocks of 64), K past one dispatch's
    // 512 steps (600: a full span and a ragged one), N past the mid tile's 128 and ragged
    // against its 256 columns
    (4100, 135, 600, &[(false, false)]),
    // and B read through a texture: N past one texture's 8,192 columns
    (20, 8250, 30, &[(false, false)]),
    // LoRA's up-projection (K = 8): the 64 x 256 tile storing C as vec4s, N (a multiple of 4)
    // ragged against the tile, M past a multiple of 64
    (520, 772, 8, ALL_TRANSPOSES),
];

/// The longest inner dimension a model's product has (Gemma 3's vocabulary, in the LM head's dX).
const MATMUL_LONGEST_SUM: usize = GEMMA3_VOCAB;

/// Products forward and backward in f32, on every shape; under `--precision mixed` the
/// forward product alone (a linear layer's only mixed product) on the same shapes.
pub(super) fn check_matmul(p: &mut Probe, precision: Precision) -> Result<()> {
    let mut shapes: Vec<Boundary> =
        MATMUL_SHAPES.iter().map(|&(m, n, k)| (m, n, k, ALL_TRANSPOSES)).collect();
    shapes.extend((0..3).map(|_| (p.size(150), p.size(150), p.size(150), ALL_TRANSPOSES)));
    shapes.extend(MATMUL_BOUNDARY_SHAPES);
    if p.full() {
        // past 65,535 workgroups of the subgroup kernel's 256-wide tile
        shapes.push((1, PAST_ONE_GRID_DIM, 1, &[(false, false)]));
    }
    if matmul::current_kernel(p.gpu) == MatmulKernel::SubgroupUniform && precision == Precision::F32 {
        check_pack_a(p)?;
        check_pack_b(p)?;
    }
    for (i, &(m, n, k, transposes)) in shapes.iter().enumerate() {
        for &(ta, tb) in transposes {
            let bias = i % 2 == 1;
            let d = kr::MatmulDims { batch: 1, m, n, k, trans_a: ta, trans_b: tb };
            let shape = format!("{m}x{k}{}.{k}x{n}{}{}", t(ta), t(tb), if bias { "+b" } else { "" });
            let (a, b, bv) = (p.uniform(m * k), p.uniform(k * n), p.uniform(n));
            let sa = if ta { [k, m] } else { [m, k] };
            let sb = if tb { [n, k] } else { [k, n] };
            let (ga, gb, gbias) = (p.up(&a, &sa)?, p.up(&b, &sb)?, p.up(&bv, &[n])?);
            let gc = p.out(&[m, n])?;
            matmul::with_precision(precision, || {
                matmul::matmul(p.gpu, &gc, &ga, &gb, bias.then_some(&gbias), ta, tb, false)
            })?;
            let mut c = vec![0f32; m * n];
            kr::matmul_forward(&mut c, &a, &b, bias.then_some(&bv[..]), d);
            if precision == Precision::Mixed {
                let mut abs = vec![0f32; m * n];
                let (aa, ab, abias) = (absolute(&a), absolute(&b), absolute(&bv));
                kr::matmul_forward(&mut abs, &aa, &ab, bias.then_some(&abias[..]), d);
                let got = gc.to_host(p.gpu)?;
                p.push("forward", &shape, "", mixed_err(&got, &c, &abs));
            } else {
                p.record("forward", &shape, "", &gc, &c)?;
                if k < 64 && n % 4 == 0 {
                    // added into C, as LoRA's up-projection adds into the frozen product
                    matmul::matmul(p.gpu, &gc, &ga, &gb, bias.then_some(&gbias), ta, tb, true)?;
                    let twice: Vec<f32> = c.iter().map(|x| 2.0 * x).collect();
                    p.record("forward", &shape, "accumulated", &gc, &twice)?;
                }
            }
            if m.max(n) > MATMUL_LONGEST_SUM || precision == Precision::Mixed {
                // the backward products would sum millions of terms, which no model does; a
                // mixed-precision step runs its backward products in f32
                continue;
            }

            let dc = p.uniform(m * n);
            let gdc = p.up(&dc, &[m, n])?;
            let (gda, gdb, gdbias) = (p.out(&sa)?, p.out(&sb)?, p.out(&[n])?);
            matmul::matmul_backward(
                p.gpu,
                Some(&gda),
                Some(&gdb),
                Some(&gdbias),
                &gdc,
                &ga,
                &gb,
                ta,
                tb,
                false,
            )?;
            let (mut da, mut db, mut dbias) = (vec![0f32; m * k], vec![0f32; k * n], vec![0f32; n]);
            kr::matmul_backward(Some(&mut da), Some(&mut db), Some(&mut dbias), &dc, &a, &b, d);
            p.record("backward", &shape, "dA", &gda, &da)?;
            p.record("backward", &shape, "dB", &gdb, &db)?;
            p.record("backward", &shape, "dbias", &gdbias, &dbias)?;
        }
    }
    Ok(())
}

/// `subgroup-uniform`'s packing of A, bit for bit against the reference: 100 rows (a full
/// block and a partial one) and 70 steps (a full window and part of the next; the rest zeros)
/// from inside a larger matrix read transposed (rows adjacent), at an offset.
fn check_pack_a(p: &mut Probe) -> Result<()> {
    let (ld, (r0, k0), rows, k) = (130, (7, 3), 100, 70);
    let src = p.uniform(80 * ld);
    let g = p.up(&src, &[80, ld])?;
    let dst = p.out(&[2 * 8 * 4096])?;
    let (gb, db) = (g.single("pack source")?, dst.single("pack output")?);
    // A(i, j) = src[j * ld + i]: M along the stored columns, K along the stored rows
    let view = matmul::View::matrix(gb, k0 * ld + r0, ld, true);
    matmul::pack_a(p.gpu, db, view, rows, k)?;
    let want = kr::pack_a_windows(&src, (1, ld), (r0, rows), (k0, k), 8);
    let shape = format!("A packed in uniform windows, {rows}x{k} at ({r0}, {k0}) of 80x{ld}^T");
    p.push("forward", &shape, "", exact_err(&dst.to_host(p.gpu)?, &want));
    Ok(())
}

/// `subgroup-uniform`'s packing of B for its texture, bit for bit against the reference: 70
/// steps and 100 columns (a partial row of 128) from inside a larger matrix read transposed
/// (steps adjacent), at an offset; the rest of the staging is left as it was.
fn check_pack_b(p: &mut Probe) -> Result<()> {
    let (ld, (k0, n0), k, n, width) = (90, (3, 7), 70, 100, 128);
    let src = p.uniform(120 * ld);
    let g = p.up(&src, &[120, ld])?;
    let dst = p.out(&[k * width])?;
    let (gb, db) = (g.single("pack source")?, dst.single("pack output")?);
    // B(kk, j) = src[j * ld + kk]: K along the stored columns, N along the stored rows
    let view = matmul::View::matrix(gb, n0 * ld + k0, ld, true);
    matmul::pack_b(p.gpu, db, view, k, n, width)?;
    let want = kr::pack_b_texels(&src, (1, ld), (k0, k), (n0, n), width);
    let shape = format!("B packed for a texture, {k}x{n} at ({k0}, {n0}) of 120x{ld}^T");
    p.push("forward", &shape, "", exact_err(&dst.to_host(p.gpu)?, &want));
    Ok(())
}

fn t(trans: bool) -> &'static str {
    if trans {
        "^T"
    } else {
        ""
    }
}

/// The LM head of Gemma 3 270M at its real size, as the model runs it: hidden states (T, 640)
/// times the (262,144 x 640) embedding, transposed, which is above the binding limit and so in
/// chunks; logits, dX (K = 262,144) and dW.
fn check_lm_head(p: &mut Probe, t: usize) -> Result<()> {
    let (m, n, k) = (t, GEMMA3_VOCAB, GEMMA3_270M_HIDDEN);
    let shape = format!("LM head {m}x{k}.({n}x{k})^T");
    let d = kr::MatmulDims { batch: 1, m, n, k, trans_a: false, trans_b: true };
    let (x, w, dy) = (p.uniform(m * k), p.uniform(n * k), p.uniform(m * n));
    let (gx, gw, gdy) = (p.up(&x, &[m, k])?, p.up(&w, &[n, k])?, p.up(&dy, &[m, n])?);
    let gy = p.out(&[m, n])?;
    matmul::matmul(p.gpu, &gy, &gx, &gw, None, false, true, false)?;
    let mut y = vec![0f32; m * n];
    kr::matmul_forward(&mut y, &x, &w, None, d);
    p.record("forward", &shape, "logits", &gy, &y)?;
    drop(y);
    let (gdx, gdw) = (p.out(&[m, k])?, p.out(&[n, k])?);
    matmul::matmul_backward(p.gpu, Some(&gdx), Some(&gdw), None, &gdy, &gx, &gw, false, true, false)?;
    let (mut dx, mut dw) = (vec![0f32; m * k], vec![0f32; n * k]);
    kr::matmul_backward(Some(&mut dx), Some(&mut dw), None, &dy, &x, &w, d);
    p.record("backward", &shape, "dX", &gdx, &dx)?;
    p.record("backward", &shape, "dW", &gdw, &dw)
}

/// Operands split into small chunks, so the chunk walk runs on every shape it must handle.
pub(super) fn check_matmul_chunked(p: &mut Probe) -> Result<()> {
    // With the device's own kernel only: a workgroup of lavapipe runs on one core and dX has
    // few of them, so this costs half a minute per kernel there; K of 262,144 is checked on
    // every kernel by the boundary shapes of `check_matmul`.
    if p.full() && matmul::current_kernel(p.gpu) == p.gpu.matmul_kernel() {
        check_lm_head(p, 16)?;
    }
    let (m, n, k) = (23, 19, 17);
    let splits = [(Split::Rows, 5), (Split::Cols, 6), (Split::Rows, 100)];
    for (case, (ta, tb)) in
        [(false, false), (false, true), (true, false), (true, true)].into_iter().enumerate()
    {
        let (spa, spb, spc) = (splits[case % 3], splits[(case + 1) % 3], splits[(case + 2) % 3]);
        let d = kr::MatmulDims { batch: 1, m, n, k, trans_a: ta, trans_b: tb };
        let shape = format!(
            "{m}x{k}{}.{k}x{n}{} A:{:?}/{} B:{:?}/{} C:{:?}/{}",
            t(ta),
            t(tb),
            spa.0,
            spa.1,
            spb.0,
            spb.1,
            spc.0,
            spc.1
        );
        let (a, b, bv) = (p.uniform(m * k), p.uniform(k * n), p.uniform(n));
        let sa = if ta { [k, m] } else { [m, k] };
        let sb = if tb { [n, k] } else { [k, n] };
        let ga = Tensor::from_host_split(p.gpu, &a, &sa, spa.0, spa.1, "A")?;
        let gb = Tensor::from_host_split(p.gpu, &b, &sb, spb.0, spb.1, "B")?;
        let gbias = p.up(&bv, &[n])?;
        let gc = Tensor::empty_split(p.gpu, &[m, n], spc.0, spc.1, "C")?;
        gc.fill(p.gpu, f32::NAN)?;
        matmul::matmul(p.gpu, &gc, &ga, &gb, Some(&gbias), ta, tb, false)?;
        let mut c = vec![0f32; m * n];
        kr::matmul_forward(&mut c, &a, &b, Some(&bv), d);
        p.record("forward", &shape, "", &gc, &c)?;

        let dc = p.uniform(m * n);
        let gdc = Tensor::from_host_split(p.gpu, &dc, &[m, n], spc.0, spc.1, "dC")?;
        let gda = Tensor::empty_split(p.gpu, &sa, spa.0, spa.1, "dA")?;
        let gdb = Tensor::empty_split(p.gpu, &sb, spb.0, spb.1, "dB")?;
        let gdbias = p.out(&[n])?;
        for g in [&gda, &gdb] {
            g.fill(p.gpu, f32::NAN)?;
        }
        matmul::matmul_backward(p.gpu, Some(&gda), Some(&gdb), Some(&gdbias), &gdc, &ga, &gb, ta, tb, false)?;
        let (mut da, mut db, mut dbias) = (vec![0f32; m * k], vec![0f32; k * n], vec![0f32; n]);
        kr::matmul_backward(Some(&mut da), Some(&mut db), Some(&mut dbias), &dc, &a, &b, d);
        p.record("backward", &shape, "dA", &gda, &da)?;
        p.record("backward", &shape, "dB", &gdb, &db)?;
        p.record("backward", &shape, "dbias", &gdbias, &dbias)?;

        // Accumulating into existing gradients (gradient accumulation over micro-batches).
        matmul::matmul_backward(p.gpu, Some(&gda), None, None, &gdc, &ga, &gb, ta, tb, true)?;
        let twice: Vec<f32> = da.iter().map(|x| 2.0 * x).collect();
        p.record("backward", &shape, "dA accumulated", &gda, &twice)?;
    }
    Ok(())
}

/// The strided batched product on contiguous batches (attention covers the strided views).
pub(super) fn check_matmul_batched(p: &mut Probe) -> Result<()> {
    for &(batch, m, n, k) in &[(1, 3, 5, 7), (3, 17, 13, 11), (5, 1, 64, 33)] {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let d = kr::MatmulDims { batch, m, n, k, trans_a: ta, trans_b: tb };
            let (a, b) = (p.uniform(batch * m * k), p.uniform(batch * k * n));
            let (ga, gb, gc) =
                (p.up(&a, &[batch * m * k])?, p.up(&b, &[batch * k * n])?, p.out(&[batch * m * n])?);
            let av = View::matrix(ga.single("A")?, 0, if ta { m } else { k }, ta).batched(m * k, 0);
            let bv = View::matrix(gb.single("B")?, 0, if tb { k } else { n }, tb).batched(k * n, 0);
            let cv = View::matrix(gc.single("C")?, 0, n, false).batched(m * n, 0);
            matmul::matmul_strided(
                p.gpu,
                cv,
                av,
                bv,
                None,
                Dims { m, n, k, nb1: batch, nb2: 1 },
                1.0,
                false,
            )?;
            let mut c = vec![0f32; batch * m * n];
            kr::matmul_forward(&mut c, &a, &b, None, d);
            let shape = format!("{batch}x({m}x{k}{}.{k}x{n}{})", t(ta), t(tb));
            p.record("forward", &shape, "", &gc, &c)?;
        }
    }
    check_matmul_padded(p)
}

/// Sub-matrices of wider rows whose starts are 16-byte aligned (leading dimension 12) and
/// whose extents are ragged: the staged kernel loads these by vec4 and meets a partial group
/// of four at every edge, along M, N and K.
fn check_matmul_padded(p: &mut Probe) -> Result<()> {
    let (batch, m, n, k, ld) = (2, 9, 10, 7, 12);
    // the (rows, cols) block of each batch of a (batch * rows, ld) matrix, packed
    let packed = |full: &[f32], rows: usize, cols: usize| -> Vec<f32> {
        let mut out = Vec::with_capacity(batch * rows * cols);
        for r in 0..batch * rows {
            out.extend_from_slice(&full[r * ld..r * ld + cols]);
        }
        out
    };
    for &(ta, tb) in ALL_TRANSPOSES {
        let (ar, ac) = if ta { (k, m) } else { (m, k) };
        let (br, bc) = if tb { (n, k) } else { (k, n) };
        let (a_full, b_full) = (p.uniform(batch * ar * ld), p.uniform(batch * br * ld));
        let (ga, gb) = (p.up(&a_full, &[a_full.len()])?, p.up(&b_full, &[b_full.len()])?);
        let gc = p.out(&[batch * m * ld])?;
        let av = View::matrix(ga.single("A")?, 0, ld, ta).batched(ar * ld, 0);
        let bv = View::matrix(gb.single("B")?, 0, ld, tb).batched(br * ld, 0);
        let cv = View::matrix(gc.single("C")?, 0, ld, false).batched(m * ld, 0);
        matmul::matmul_strided(p.gpu, cv, av, bv, None, Dims { m, n, k, nb1: batch, nb2: 1 }, 1.0, false)?;
        let d = kr::MatmulDims { batch, m, n, k, trans_a: ta, trans_b: tb };
        let mut c = vec![0f32; batch * m * n];
        kr::matmul_forward(&mut c, &packed(&a_full, ar, ac), &packed(&b_full, br, bc), None, d);
        let got = packed(&gc.to_host(p.gpu)?, m, n);
        let shape = format!("{batch}x({m}x{k}{}.{k}x{n}{}) in rows of {ld}", t(ta), t(tb));
        p.push("forward", &shape, "", rel_err(&got, &c));
    }
    Ok(())
}
