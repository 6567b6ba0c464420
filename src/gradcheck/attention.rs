//! Attention, composed from products and a masked softmax, and flash attention, which walks
//! key blocks with a running maximum and sum.

use super::Probe;
use crate::error::Result;
use crate::kernels::attention::{self, Heads};
use kernels_ref as kr;
use rand::Rng;

/// (B, T, H, KVH, D, window, soft cap) of one attention shape checked.
type Case = (usize, usize, usize, usize, usize, Option<usize>, Option<f32>);

/// A random shape beside the fixed ones: grouped heads, and half the time a window and a cap.
fn random_case(p: &mut Probe) -> Case {
    let kv_h = p.size(3);
    let (b, t, h, d) = (p.size(2), p.size(40), kv_h * p.size(3), p.size(40));
    let window = if p.rng.random_range(0..2) == 0 { None } else { Some(p.size(t)) };
    let softcap = if p.rng.random_range(0..2) == 0 { None } else { Some(0.7) };
    (b, t, h, kv_h, d, window, softcap)
}

/// q, k and v of `q.len() / qw` rows side by side in one row each, as GPT-2's c_attn
/// produces them: `qw` floats of q, then `kw` of k and of v.
fn pack_qkv(q: &[f32], k: &[f32], v: &[f32], qw: usize, kw: usize) -> Vec<f32> {
    (0..q.len() / qw)
        .flat_map(|r| [&q[r * qw..(r + 1) * qw], &k[r * kw..(r + 1) * kw], &v[r * kw..(r + 1) * kw]].concat())
        .collect()
}

pub(super) fn check_attention(p: &mut Probe) -> Result<()> {
    // the caps are of the order of the scores, so tanh bends
    let cases: &[Case] = &[
        (1, 1, 1, 1, 1, None, None),
        (2, 7, 4, 2, 8, None, None),
        (2, 7, 4, 2, 8, None, Some(0.5)),
        (1, 13, 6, 2, 5, Some(4), None),
        (1, 13, 6, 2, 5, Some(4), Some(1.0)),
        (2, 33, 3, 3, 16, None, None),
        (1, 64, 4, 1, 32, Some(16), None),
        (1, 70, 2, 1, 64, None, None),
    ];
    let mut cases = cases.to_vec();
    cases.extend((0..2).map(|_| random_case(p)));
    for &(b, t, h, kv_h, d, window, softcap) in &cases {
        let shape = format!("B{b} T{t} H{h} KV{kv_h} D{d} window {window:?} softcap {softcap:?}");
        let scale = 1.0 / (d as f32).sqrt();
        let dims = attention::AttnDims { b, t, h, kv_h, d, window, scale, softcap };
        let (nq, nk, np) = (b * t * h * d, b * t * kv_h * d, b * h * t * t);
        let (q, k, v, dout) = (p.uniform(nq), p.uniform(nk), p.uniform(nk), p.uniform(nq));
        let (gq, gk, gv, gdo) = (p.up(&q, &[nq])?, p.up(&k, &[nk])?, p.up(&v, &[nk])?, p.up(&dout, &[nq])?);
        let (gout, gprobs) = (p.out(&[nq])?, p.out(&[b * h * t, t])?);
        let dense = |x, heads| Heads::dense(x, heads, d);
        attention::attention_forward(
            p.gpu,
            dense(&gout, h),
            &gprobs,
            dense(&gq, h),
            dense(&gk, kv_h),
            dense(&gv, kv_h),
            dims,
        )?;
        let (mut out, mut probs) = (vec![0f32; nq], vec![0f32; np]);
        kr::attention_forward(&mut out, &mut probs, &q, &k, &v, dims);
        p.record("forward", &shape, "", &gout, &out)?;
        p.record("forward", &shape, "probs", &gprobs, &probs)?;

        let (gdq, gdk, gdv) = (p.out(&[nq])?, p.out(&[nk])?, p.out(&[nk])?);
        let (qs, ks) = (dense(&gq, h), dense(&gk, kv_h));
        let grads = (dense(&gdq, h), dense(&gdk, kv_h), dense(&gdv, kv_h));
        attention::attention_backward(
            p.gpu,
            grads.0,
            grads.1,
            grads.2,
            dense(&gdo, h),
            qs,
            ks,
            dense(&gv, kv_h),
            &gprobs,
            dims,
            false,
        )?;
        let (mut dq, mut dk, mut dv) = (vec![0f32; nq], vec![0f32; nk], vec![0f32; nk]);
        kr::attention_backward(&mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &probs, dims);
        p.record("backward", &shape, "dq", &gdq, &dq)?;
        p.record("backward", &shape, "dk", &gdk, &dk)?;
        p.record("backward", &shape, "dv", &gdv, &dv)?;

        // The same with q, k, v packed in one (B*T, (H + 2 KVH) D) tensor, as GPT-2's c_attn
        // produces them, and the gradients written into one packed tensor.
        let (qw, kw) = (h * d, kv_h * d);
        let width = qw + 2 * kw;
        let pack = |q: &[f32], k: &[f32], v: &[f32]| pack_qkv(q, k, v, qw, kw);
        let gqkv = p.up(&pack(&q, &k, &v), &[b * t, width])?;
        let views =
            |x| (Heads::packed(x, 0, width), Heads::packed(x, qw, width), Heads::packed(x, qw + kw, width));
        let (pq, pk, pv) = views(&gqkv);
        let (gout2, gprobs2) = (p.out(&[nq])?, p.out(&[b * h * t, t])?);
        attention::attention_forward(p.gpu, dense(&gout2, h), &gprobs2, pq, pk, pv, dims)?;
        p.record("forward", &shape, "packed", &gout2, &out)?;
        let gdqkv = p.out(&[b * t, width])?;
        let (dq2, dk2, dv2) = views(&gdqkv);
        attention::attention_backward(
            p.gpu,
            dq2,
            dk2,
            dv2,
            dense(&gdo, h),
            pq,
            pk,
            pv,
            &gprobs2,
            dims,
            false,
        )?;
        p.record("backward", &shape, "packed dqkv", &gdqkv, &pack(&dq, &dk, &dv))?;
    }
    Ok(())
}

/// Flash attention (`kernels::flash_attention`) against the reference: the output and
/// gradients against `kr::attention_forward` / `_backward`, the log-sum-exp against
/// `kr::attention_forward_lse`. Each shape runs with the default query block and with blocks of
/// 5 rows (several ragged blocks, windows cutting them), dense and with GPT-2's packed views.
pub(super) fn check_flash_attention(p: &mut Probe) -> Result<()> {
    use crate::kernels::flash_attention as fa;
    let mut cases: Vec<Case> = vec![
        (1, 1, 1, 1, 1, None, None),
        (2, 7, 4, 2, 8, None, Some(0.5)),
        (1, 13, 6, 2, 5, Some(4), None),
        (1, 13, 6, 2, 5, Some(4), Some(1.0)),
        (2, 33, 3, 3, 16, None, None),
        (1, 70, 2, 1, 64, Some(16), None),
    ];
    cases.extend((0..2).map(|_| random_case(p)));
    for &(b, t, h, kv_h, d, window, softcap) in &cases {
        let scale = 1.0 / (d as f32).sqrt();
        let dims = attention::AttnDims { b, t, h, kv_h, d, window, scale, softcap };
        let (nq, nk, np) = (b * t * h * d, b * t * kv_h * d, b * h * t * t);
        let (q, k, v, dout) = (p.uniform(nq), p.uniform(nk), p.uniform(nk), p.uniform(nq));
        let (mut out, mut probs, mut lse) = (vec![0f32; nq], vec![0f32; np], vec![0f32; b * h * t]);
        kr::attention_forward(&mut out, &mut probs, &q, &k, &v, dims);
        let mut out_lse = vec![0f32; nq];
        kr::attention_forward_lse(&mut out_lse, &mut lse, &q, &k, &v, dims);
        let (mut dq, mut dk, mut dv) = (vec![0f32; nq], vec![0f32; nk], vec![0f32; nk]);
        kr::attention_backward(&mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &probs, dims);
        let (qw, kw) = (h * d, kv_h * d);
        let width = qw + 2 * kw;
        let pack = |q: &[f32], k: &[f32], v: &[f32]| pack_qkv(q, k, v, qw, kw);
        let (gq, gk, gv, gdo) = (p.up(&q, &[nq])?, p.up(&k, &[nk])?, p.up(&v, &[nk])?, p.up(&dout, &[nq])?);
        let gqkv = p.up(&pack(&q, &k, &v), &[b * t, width])?;
        for block in [None, Some(5)] {
            let shape = format!(
                "B{b} T{t} H{h} KV{kv_h} D{d} window {window:?} softcap {softcap:?} block {}",
                block.map_or("auto".to_string(), |r| r.to_string())
            );
            let dense = |x, heads| Heads::dense(x, heads, d);
            let views = |x| {
                (Heads::packed(x, 0, width), Heads::packed(x, qw, width), Heads::packed(x, qw + kw, width))
            };
            let rows = block.unwrap_or_else(|| fa::block_rows(&dims));
            let (gout, glse) = (p.out(&[nq])?, p.out(&[b * h, t])?);
            let (gdq, gdk, gdv) = (p.out(&[nq])?, p.out(&[nk])?, p.out(&[nk])?);
            let (gout2, glse2, gdqkv) = (p.out(&[nq])?, p.out(&[b * h, t])?, p.out(&[b * t, width])?);
            fa::with_block_rows(rows, || -> Result<()> {
                let (q, k, v) = (dense(&gq, h), dense(&gk, kv_h), dense(&gv, kv_h));
                fa::flash_attention_forward(p.gpu, dense(&gout, h), &glse, q, k, v, dims)?;
                let grads = (dense(&gdq, h), dense(&gdk, kv_h), dense(&gdv, kv_h));
                let dout = dense(&gdo, h);
                fa::flash_attention_backward(
                    p.gpu, grads.0, grads.1, grads.2, dout, q, k, v, &glse, dims, false,
                )?;
                let (pq, pk, pv) = views(&gqkv);
                fa::flash_attention_forward(p.gpu, dense(&gout2, h), &glse2, pq, pk, pv, dims)?;
                let (dq2, dk2, dv2) = views(&gdqkv);
                fa::flash_attention_backward(p.gpu, dq2, dk2, dv2, dout, pq, pk, pv, &glse2, dims, false)
            })?;
            p.record("forward", &shape, "", &gout, &out)?;
            p.record("forward", &shape, "lse", &glse, &lse)?;
            p.record("forward", &shape, "packed", &gout2, &out)?;
            p.record("backward", &shape, "dq", &gdq, &dq)?;
            p.record("backward", &shape, "dk", &gdk, &dk)?;
            p.record("backward", &shape, "dv", &gdv, &dv)?;
            p.record("backward", &shape, "packed dqkv", &gdqkv, &pack(&dq, &dk, &dv))?;
        }
    }
    Ok(())
}
