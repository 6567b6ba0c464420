//! Cross-entropy over logits, and the fused LM head + cross-entropy (`lm_head_loss`), up to
//! vocabularies of 262,144 in the full tier.

use super::{rel_err_floor, Probe, GEMMA3_270M_HIDDEN, GEMMA3_VOCAB};
use crate::error::Result;
use crate::gpu::{Gpu, Split, Tensor};
use crate::kernels::{cross_entropy, reduce};
use kernels_ref as kr;
use rand::Rng;

/// Cross-entropy on `(n, v)` logits stored with `split`, checked against the reference.
pub fn cross_entropy_case(
    p_gpu: &Gpu,
    logits: &[f32],
    targets: &[i32],
    n: usize,
    v: usize,
    split: Option<(Split, usize)>,
) -> Result<(f64, f64, f64)> {
    let gl = match split {
        Some((s, per)) => Tensor::from_host_split(p_gpu, logits, &[n, v], s, per, "logits")?,
        None => Tensor::from_host(p_gpu, logits, &[n, v], "logits")?,
    };
    let gt = cross_entropy::Targets::new(p_gpu, targets, v)?;
    let (glosses, gstate) = (Tensor::empty(p_gpu, &[n], "losses")?, Tensor::empty(p_gpu, &[n, 4], "state")?);
    glosses.fill(p_gpu, f32::NAN)?;
    cross_entropy::cross_entropy_forward(p_gpu, &glosses, &gstate, &gl, &gt)?;
    let mut losses = vec![0f32; n];
    let mean = kr::cross_entropy_forward(&mut losses, logits, targets, n, v);
    let gpu_mean = reduce::sum(p_gpu, &glosses, false)? / gt.count().max(1) as f32;
    let loss_err = if gt.count() == 0 {
        // Every target ignored: the reference's mean is 0/0 (NaN, as PyTorch's); the engine
        // reports 0 and gives no gradient.
        if gpu_mean == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else if !(mean.is_finite() && gpu_mean.is_finite()) {
        f64::INFINITY
    } else {
        // A loss near 0 is the log-sum-exp less the target's logit, two terms of the logits'
        // size: its error is measured against 1 nat there, not against itself.
        rel_err_floor(&[gpu_mean], &[mean], 1.0)
    };
    let losses_err = rel_err_floor(&glosses.to_host(p_gpu)?, &losses, 1.0);

    let dloss = 0.7;
    let gdl = Tensor::empty_split(p_gpu, &[n, v], gl.split(), gl.chunks()[0].len, "dlogits")?;
    gdl.fill(p_gpu, f32::NAN)?;
    cross_entropy::cross_entropy_backward(p_gpu, &gdl, &gl, &gstate, &gt, dloss)?;
    let mut dl = vec![0f32; n * v];
    kr::cross_entropy_backward(&mut dl, logits, targets, dloss, n, v);
    // dlogits = dloss / count * (softmax - one-hot): measured against the one-hot's size, which
    // a target's probability near 1 cancels
    let one_hot = dloss as f64 / gt.count().max(1) as f64;
    let grad_err = rel_err_floor(&gdl.to_host(p_gpu)?, &dl, one_hot);
    Ok((loss_err, losses_err, grad_err))
}

pub(super) fn check_cross_entropy(p: &mut Probe) -> Result<()> {
    let cases: &[(usize, usize, Option<(Split, usize)>)] = &[
        (1, 1, None),
        (1, 2, None),
        (5, 7, None),
        (17, 100, None),
        (33, 1000, None),
        (33, 1000, Some((Split::Cols, 300))),
        (33, 1000, Some((Split::Rows, 10))),
        (9, 50257, Some((Split::Cols, 16384))),
    ];
    let mut cases = cases.to_vec();
    cases.extend((0..2).map(|_| (p.size(40), p.size(3000), None)));
    // a row per workgroup past 65,535 rows; Gemma 3's vocabulary
    cases.extend([(70_001, 3, None), (4, GEMMA3_VOCAB, None)]);
    if p.full() {
        // logits above the binding limit, in the column chunks a chunked LM head writes
        cases.push((128, GEMMA3_VOCAB, Some((Split::Cols, 52_428))));
    }
    for &(n, v, split) in &cases {
        let shape = format!("N{n} V{v} {split:?}");
        let logits: Vec<f32> = p.uniform(n * v).iter().map(|x| 10.0 * x).collect();
        let targets: Vec<i32> = (0..n)
            .map(|i| if i % 4 == 3 { kr::IGNORE_INDEX } else { p.rng.random_range(0..v as i32) })
            .collect();
        let (loss_err, losses_err, grad_err) = cross_entropy_case(p.gpu, &logits, &targets, n, v, split)?;
        p.push("forward", &shape, "mean loss", loss_err);
        p.push("forward", &shape, "losses", losses_err);
        p.push("backward", &shape, "dlogits", grad_err);
    }
    Ok(())
}

/// The fused LM head + cross-entropy (`kernels::lm_head_loss`) against
/// `kr::linear_cross_entropy_*`: the mean loss, and dx and dW added to the values already there
/// (as a tied embedding's gradient collects). Ragged shapes in forced ragged vocabulary chunks,
/// both weight layouts, W chunked along either axis, soft-capping, past 65,536 columns in the
/// kernel's own chunks; the full tier adds Gemma 3's head (262,144 x 640, above the binding).
pub(super) fn check_lm_head_loss(p: &mut Probe) -> Result<()> {
    use crate::kernels::lm_head_loss::{self as lh, HeadWeight};
    // (n, C, V, W stored (V, C), soft-cap, W's chunking, vocabulary columns per chunk)
    type Case = (usize, usize, usize, bool, Option<f32>, Option<(Split, usize)>, Option<usize>);
    let mut cases: Vec<Case> = vec![
        (1, 1, 1, true, None, None, None),
        (5, 7, 13, true, None, None, Some(4)),
        (9, 33, 100, false, Some(2.0), None, Some(17)),
        (17, 24, 300, true, Some(1.5), Some((Split::Rows, 37)), Some(64)),
        (6, 40, 129, false, None, Some((Split::Rows, 16)), Some(50)),
        (7, 20, 211, true, None, Some((Split::Cols, 8)), Some(30)),
        (3, 8, 70_001, true, Some(30.0), None, None),
    ];
    cases.push((p.size(40), p.size(80), p.size(3000), true, Some(5.0), None, Some(p.size(500))));
    if p.full() {
        cases.push((4, GEMMA3_270M_HIDDEN, GEMMA3_VOCAB, true, Some(30.0), None, None));
    }
    for (n, c, v, trans_w, softcap, w_split, chunk) in cases {
        let layout = if trans_w { "(V,C)" } else { "(C,V)" };
        let shape = format!("N{n} C{c} V{v} W{layout} cap {softcap:?} {w_split:?} chunk {chunk:?}");
        let (x, w) = (p.uniform(n * c), p.uniform(v * c));
        let targets: Vec<i32> = (0..n)
            .map(|i| if i % 4 == 3 { kr::IGNORE_INDEX } else { p.rng.random_range(0..v as i32) })
            .collect();
        let w_shape = if trans_w { [v, c] } else { [c, v] };
        let (prior_dx, prior_dw) = (p.uniform(n * c), p.uniform(v * c));
        let up = |data: &[f32]| match w_split {
            Some((s, per)) => Tensor::from_host_split(p.gpu, data, &w_shape, s, per, "gradcheck input"),
            None => p.up(data, &w_shape),
        };
        let (gx, gw, gdx, gdw) = (p.up(&x, &[n, c])?, up(&w)?, p.up(&prior_dx, &[n, c])?, up(&prior_dw)?);
        let gt = cross_entropy::Targets::new(p.gpu, &targets, v)?;
        let (loss, state) = (p.out(&[1])?, p.out(&[n, 4])?);
        let hw = HeadWeight::F32 { w: &gw, trans_w };
        let dloss = 0.7;
        let go = || -> Result<()> {
            lh::lm_head_loss_forward(p.gpu, &loss, &state, &gx, hw, &gt, softcap)?;
            let (dx, dw) = (Some((&gdx, true)), Some((&gdw, true)));
            lh::lm_head_loss_backward(p.gpu, dx, dw, &gx, hw, &state, &gt, softcap, dloss)
        };
        match chunk {
            Some(cols) => lh::with_chunk_cols(cols, go)?,
            None => go()?,
        }
        let d = kr::HeadDims { n, c, v, trans_w, softcap };
        let mut losses = vec![0f32; n];
        let want = kr::linear_cross_entropy_forward(&mut losses, &x, &w, &targets, d);
        let (mut dx, mut dw) = (vec![0f32; n * c], vec![0f32; v * c]);
        kr::linear_cross_entropy_backward(Some(&mut dx), Some(&mut dw), &x, &w, &targets, dloss, d);
        let got = loss.to_host(p.gpu)?[0];
        // relative to the loss, absolute below 1 (a vocabulary of 1 has loss 0)
        let loss_err = if got.is_finite() {
            (got - want).abs() as f64 / (want.abs() as f64).max(1.0)
        } else {
            f64::INFINITY
        };
        p.push("forward", &shape, "mean loss", loss_err);
        let plus = |prior: &[f32], g: &[f32]| prior.iter().zip(g).map(|(a, b)| a + b).collect::<Vec<f32>>();
        p.record("backward", &shape, "dx", &gdx, &plus(&prior_dx, &dx))?;
        p.record("backward", &shape, "dW", &gdw, &plus(&prior_dw, &dw))?;
    }
    Ok(())
}
