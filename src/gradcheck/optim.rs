//! What a step runs on the flat gradient and parameter buffers: reductions, global-norm
//! clipping, AdamW and SGD.

use super::{rel_err, Probe, GEMMA3_270M_HIDDEN, GEMMA3_VOCAB, ROW_SHAPES};
use crate::error::Result;
use crate::kernels::{optim, reduce};
use kernels_ref as kr;

pub(super) fn check_reduce(p: &mut Probe) -> Result<()> {
    let mut sizes: Vec<Vec<usize>> =
        [1usize, 7, 4096, 4097, 70001, 1 << 20].iter().map(|&n| vec![n]).collect();
    if p.full() {
        sizes.push(vec![GEMMA3_VOCAB, GEMMA3_270M_HIDDEN]);
    }
    for dims in sizes {
        let n: usize = dims.iter().product();
        // Positive inputs: a sum of signed values can cancel to near zero, and the relative
        // error of a cancelled sum says nothing about the kernel.
        let x: Vec<f32> = p.uniform(n).iter().map(|v| v.abs()).collect();
        let gx = p.up(&x, &dims)?;
        let s = reduce::sum(p.gpu, &gx, false)?;
        let ss = reduce::sum(p.gpu, &gx, true)?;
        p.push("forward", &format!("{dims:?}"), "sum", rel_err(&[s], &[kr::sum(&x) as f32]));
        p.push("forward", &format!("{dims:?}"), "sum_squares", rel_err(&[ss], &[kr::sum_squares(&x) as f32]));
    }
    // past 65,535 rows: the column sums run a span of rows per dispatch
    for &(rows, cols) in ROW_SHAPES.iter().chain(&[(70_001, 3)]) {
        let x = p.uniform(rows * cols);
        let (gx, gout) = (p.up(&x, &[rows, cols])?, p.out(&[cols])?);
        reduce::sum_rows(p.gpu, &gout, &gx, false)?;
        let want: Vec<f32> =
            (0..cols).map(|j| (0..rows).map(|r| x[r * cols + j] as f64).sum::<f64>() as f32).collect();
        p.record("forward", &format!("{rows}x{cols}"), "sum_rows", &gout, &want)?;
    }
    Ok(())
}

pub(super) fn check_clip(p: &mut Probe) -> Result<()> {
    let mut cases = vec![(1usize, vec![1usize], 0.1f32), (1000, vec![70001], 1.0), (1000, vec![70001], 1e6)];
    cases.push((7, vec![5000], 3.0));
    if p.full() {
        cases.push((1000, vec![GEMMA3_VOCAB, GEMMA3_270M_HIDDEN], 1.0));
    }
    for (n1, dims2, max_norm) in cases {
        let n2: usize = dims2.iter().product();
        let shape = format!("{n1}+{dims2:?} max_norm {max_norm}");
        let (mut a, mut b) = (p.uniform(n1), p.uniform(n2));
        let (ga, gb) = (p.up(&a, &[n1])?, p.up(&b, &dims2)?);
        let acc = reduce::clip_grad_norm(p.gpu, &[&ga, &gb], max_norm)?;
        let norm = kr::clip_grad_norm(&mut [&mut a, &mut b], max_norm);
        let got = acc.to_host(p.gpu)?;
        p.push("forward", &shape, "norm", rel_err(&[got[0].sqrt()], &[norm]));
        p.record("forward", &shape, "grads", &ga, &a)?;
        p.record("forward", &shape, "grads", &gb, &b)?;
    }
    // The step status's skip flag, which AdamW reads on the GPU: set by a non-finite gradient
    // (NaN or infinite) or loss sum, clear otherwise; the loss sum passes through.
    for (grad, loss) in
        [(1.0, 2.5), (f32::NAN, 2.5), (f32::INFINITY, 2.5), (1.0, f32::NAN), (1.0, f32::INFINITY)]
    {
        let mut a = p.uniform(5000);
        a[4321] = grad;
        let shape = format!("5000, gradient {grad}, loss {loss}");
        let status = reduce::step_status(p.gpu)?;
        reduce::sum_into(p.gpu, &status, reduce::STATUS_LOSS, &p.up(&[loss], &[1])?, false)?;
        reduce::clip_into(p.gpu, &status, &[&p.up(&a, &[5000])?], 1.0)?;
        let got = status.to_host(p.gpu)?;
        let skip = if grad.is_finite() && loss.is_finite() { 0.0 } else { 1.0 };
        p.push("forward", &shape, "skip flag", rel_err(&[got[reduce::STATUS_SKIP]], &[skip]));
        if loss.is_finite() {
            p.push("forward", &shape, "loss sum", rel_err(&[got[reduce::STATUS_LOSS]], &[loss]));
        }
    }
    Ok(())
}

pub(super) fn check_adamw(p: &mut Probe) -> Result<()> {
    let opt = kr::AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
    for dims in p.flat_shapes(Some([GEMMA3_VOCAB, GEMMA3_270M_HIDDEN])) {
        let n: usize = dims.iter().product();
        let mut w = p.uniform(n);
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        let (gw, gm, gv) = (p.up(&w, &dims)?, p.up(&m, &dims)?, p.up(&v, &dims)?);
        for step in 1..=3 {
            let g = p.uniform(n);
            let gg = p.up(&g, &dims)?;
            optim::adamw_step(p.gpu, &gw, &gg, &gm, &gv, opt, step)?;
            kr::adamw_step(&mut w, &g, &mut m, &mut v, opt, step);
        }
        // Each tensor comes back once a stage (at Gemma 3's vocabulary a download is 671 MB):
        // after 3 steps, the values checked and kept; after a skipped step, compared bit for bit.
        let shape = format!("{dims:?}");
        let before = [gw.to_host(p.gpu)?, gm.to_host(p.gpu)?, gv.to_host(p.gpu)?];
        for (got, want, output) in
            [(&before[0], &w, "params after 3 steps"), (&before[1], &m, "m"), (&before[2], &v, "v")]
        {
            p.push("step", &shape, output, rel_err(got, want));
        }
        // Gated by a step status on the GPU: a skip changes nothing, a go is a plain step.
        let g = p.uniform(n);
        let gg = p.up(&g, &dims)?;
        let skip = p.up(&[0.0, 1.0, 0.0, 1.0], &[4])?;
        optim::adamw_step_gated(p.gpu, &gw, &gg, &gm, &gv, opt, 4, Some(&skip))?;
        let after = [gw.to_host(p.gpu)?, gm.to_host(p.gpu)?, gv.to_host(p.gpu)?];
        let same =
            before.iter().zip(&after).all(|(b, a)| b.iter().zip(a).all(|(x, y)| x.to_bits() == y.to_bits()));
        drop(before);
        p.push("step", &shape, "skipped step leaves every bit", if same { 0.0 } else { f64::INFINITY });
        for (got, want, output) in [
            (&after[0], &w, "params after a skipped step"),
            (&after[1], &m, "m after a skipped step"),
            (&after[2], &v, "v after a skipped step"),
        ] {
            p.push("step", &shape, output, rel_err(got, want));
        }
        drop(after);
        let go = p.up(&[0.0, 1.0, 0.0, 0.0], &[4])?;
        optim::adamw_step_gated(p.gpu, &gw, &gg, &gm, &gv, opt, 4, Some(&go))?;
        kr::adamw_step(&mut w, &g, &mut m, &mut v, opt, 4);
        p.record("step", &shape, "params after a gated step", &gw, &w)?;
        p.record("step", &shape, "v after a gated step", &gv, &v)?;
    }
    Ok(())
}

pub(super) fn check_sgd(p: &mut Probe) -> Result<()> {
    for dims in p.flat_shapes(None) {
        let n: usize = dims.iter().product();
        let (mut w, g) = (p.uniform(n), p.uniform(n));
        let (gw, gg) = (p.up(&w, &dims)?, p.up(&g, &dims)?);
        optim::sgd_step(p.gpu, &gw, &gg, 0.1, 0.01)?;
        kr::sgd_step(&mut w, &g, 0.1, 0.01);
        p.record("step", &format!("{dims:?}"), "params", &gw, &w)?;
    }
    Ok(())
}
