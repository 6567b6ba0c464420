//! The row and elementwise kernels of a layer: softmax, the norms, activations and gated
//! units, the embedding gather, RoPE, residual adds and dropout.

use super::{Probe, GEMMA3_270M_HIDDEN, GEMMA3_VOCAB, ROW_SHAPES};
use crate::error::Result;
use crate::gpu::{Split, Tensor};
use crate::kernels::{
    activation::{self, Act},
    elementwise, embedding,
    norm::{self, NormKind},
    rope, softmax,
};
use kernels_ref as kr;
use rand::Rng;

pub(super) fn check_softmax(p: &mut Probe) -> Result<()> {
    let mut shapes = ROW_SHAPES.to_vec();
    shapes.extend((0..2).map(|_| (p.size(100), p.size(600))));
    // one workgroup per row: more than 65,535 rows need a second grid dimension
    shapes.extend([(70_001, 3), (3, GEMMA3_VOCAB)]);
    for &(rows, cols) in &shapes {
        let shape = format!("{rows}x{cols}");
        let x: Vec<f32> = p.uniform(rows * cols).iter().map(|v| 8.0 * v).collect();
        let gx = p.up(&x, &[rows, cols])?;
        let gy = p.out(&[rows, cols])?;
        softmax::softmax_forward(p.gpu, &gy, &gx, softmax::Mask::None, 1.0)?;
        let mut y = vec![0f32; rows * cols];
        kr::softmax_forward(&mut y, &x, rows, cols);
        p.record("forward", &shape, "", &gy, &y)?;
        let dy = p.uniform(rows * cols);
        let (gyr, gdy, gdx) = (p.up(&y, &[rows, cols])?, p.up(&dy, &[rows, cols])?, p.out(&[rows, cols])?);
        softmax::softmax_backward(p.gpu, &gdx, &gyr, &gdy, 1.0)?;
        let mut dx = vec![0f32; rows * cols];
        kr::softmax_backward(&mut dx, &y, &dy, rows, cols);
        p.record("backward", &shape, "", &gdx, &dx)?;
    }
    Ok(())
}

pub(super) fn check_norm(p: &mut Probe, kind: NormKind) -> Result<()> {
    let eps = 1e-5;
    let mut shapes = vec![(1, 1), (1, 7), (3, 64), (17, 129), (8, 768), (33, 1000)];
    shapes.extend((0..2).map(|_| (p.size(50), p.size(1200))));
    // past 65,535 rows (dw sums over rows; a row per workgroup) and a row of 65,537 values
    shapes.extend([(70_001, 16), (2, 65_537)]);
    for &(rows, cols) in &shapes {
        let shape = format!("{rows}x{cols}");
        let x: Vec<f32> = p.uniform(rows * cols).iter().map(|v| 2.0 * v + 0.5).collect();
        let (w, b, dy) = (p.uniform(cols), p.uniform(cols), p.uniform(rows * cols));
        let (gx, gw, gb, gdy) =
            (p.up(&x, &[rows, cols])?, p.up(&w, &[cols])?, p.up(&b, &[cols])?, p.up(&dy, &[rows, cols])?);
        let (gy, gstats) = (p.out(&[rows, cols])?, p.out(&[rows, 2])?);
        let (gdx, gdw, gdb) = (p.out(&[rows, cols])?, p.out(&[cols])?, p.out(&[cols])?);
        let (mut y, mut mean, mut rstd) = (vec![0f32; rows * cols], vec![0f32; rows], vec![0f32; rows]);
        let (mut dx, mut dw, mut db) = (vec![0f32; rows * cols], vec![0f32; cols], vec![0f32; cols]);
        let layer = kind == NormKind::Layer;
        let (bias, dbias) = if layer { (Some(&gb), Some(&gdb)) } else { (None, None) };
        norm::norm_forward(p.gpu, &gy, &gstats, &gx, &gw, bias, kind, eps)?;
        norm::norm_backward(p.gpu, Some(&gdx), Some(&gdw), dbias, &gdy, &gx, &gw, &gstats, kind, false)?;
        if layer {
            kr::layernorm_forward(&mut y, &mut mean, &mut rstd, &x, &w, &b, rows, cols, eps);
            kr::layernorm_backward(&mut dx, &mut dw, &mut db, &dy, &x, &w, &mean, &rstd, rows, cols);
            p.record("backward", &shape, "db", &gdb, &db)?;
        } else {
            let shift = kind.shift();
            kr::rmsnorm_forward(&mut y, &mut rstd, &x, &w, rows, cols, eps, shift);
            kr::rmsnorm_backward(&mut dx, &mut dw, &dy, &x, &w, &rstd, rows, cols, shift);
        }
        p.record("forward", &shape, "", &gy, &y)?;
        let stats: Vec<f32> = mean.iter().zip(&rstd).flat_map(|(&m, &r)| [m, r]).collect();
        p.record("forward", &shape, "stats", &gstats, &stats)?;
        if kind.is_rms() && cols == 1 {
            // With one column RMSNorm's dx = rstd * g * (1 - xhat^2) = rstd * g * eps * rstd^2:
            // two nearly equal f32 terms cancel, and no f32 kernel can meet 1e-4 of the tiny
            // result. Measure the error against the size of the cancelling terms instead.
            let terms = (0..rows)
                .map(|r| (rstd[r] as f64 * dy[r] as f64 * (w[0] as f64 + kind.shift() as f64)).abs())
                .fold(0f64, f64::max);
            let got = gdx.to_host(p.gpu)?;
            let diff = got.iter().zip(&dx).map(|(g, r)| (*g as f64 - *r as f64).abs()).fold(0f64, f64::max);
            let err = if got.iter().all(|g| g.is_finite()) { diff / terms } else { f64::INFINITY };
            p.push("backward", &shape, "dx (vs |rstd*g|)", err);
        } else {
            p.record("backward", &shape, "dx", &gdx, &dx)?;
        }
        p.record("backward", &shape, "dw", &gdw, &dw)?;
    }
    Ok(())
}

pub(super) fn check_act(p: &mut Probe, act: Act) -> Result<()> {
    // soft-capping meets Gemma's logits: (tokens, vocabulary), above the binding limit
    let logits = matches!(act, Act::Softcap(_)).then_some([128, GEMMA3_VOCAB]);
    for dims in p.flat_shapes(logits) {
        let n: usize = dims.iter().product();
        let shape = format!("{dims:?}");
        let x: Vec<f32> = p.uniform(n).iter().map(|v| 6.0 * v).collect();
        let dy = p.uniform(n);
        let (gx, gdy, gy, gdx) = (p.up(&x, &dims)?, p.up(&dy, &dims)?, p.out(&dims)?, p.out(&dims)?);
        activation::act_forward(p.gpu, &gy, &gx, act)?;
        activation::act_backward(p.gpu, &gdx, &gx, &gdy, act, false)?;
        // the in-place forms: y = act(y) and d = d * act'(x)
        let (gy2, gdx2) = (p.up(&x, &dims)?, p.up(&dy, &dims)?);
        activation::act_inplace(p.gpu, &gy2, act)?;
        activation::act_grad_mul(p.gpu, &gdx2, &gx, act)?;
        let (mut y, mut dx) = (vec![0f32; n], vec![0f32; n]);
        match act {
            Act::Gelu => {
                kr::gelu_forward(&mut y, &x);
                kr::gelu_backward(&mut dx, &x, &dy);
            }
            Act::Silu => {
                kr::silu_forward(&mut y, &x);
                kr::silu_backward(&mut dx, &x, &dy);
            }
            Act::Softcap(c) => {
                kr::softcap_forward(&mut y, &x, c);
                kr::softcap_backward(&mut dx, &x, &dy, c);
            }
        }
        p.record("forward", &shape, "", &gy, &y)?;
        p.record("backward", &shape, "", &gdx, &dx)?;
        p.record("forward", &shape, "in place", &gy2, &y)?;
        p.record("backward", &shape, "in place", &gdx2, &dx)?;
        if let Act::Softcap(c) = act {
            // from the output y the forward computed, as the graph's backward does
            let gdx3 = p.out(&dims)?;
            activation::softcap_backward_from_output(p.gpu, &gdx3, &gy, &gdy, c, false)?;
            p.record("backward", &shape, "from output", &gdx3, &dx)?;
        }
    }
    Ok(())
}

pub(super) fn check_glu(p: &mut Probe, act: Act) -> Result<()> {
    for dims in p.flat_shapes(None) {
        let n: usize = dims.iter().product();
        let shape = format!("{dims:?}");
        let gate: Vec<f32> = p.uniform(n).iter().map(|v| 6.0 * v).collect();
        let (up, dy) = (p.uniform(n), p.uniform(n));
        let (gg, gu, gdy) = (p.up(&gate, &dims)?, p.up(&up, &dims)?, p.up(&dy, &dims)?);
        let (gy, gdg, gdu) = (p.out(&dims)?, p.out(&dims)?, p.out(&dims)?);
        activation::glu_forward(p.gpu, &gy, &gg, &gu, act)?;
        activation::glu_backward(p.gpu, Some(&gdg), Some(&gdu), &gdy, &gg, &gu, act, false)?;
        let (mut y, mut dg, mut du) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        match act {
            Act::Silu => {
                kr::swiglu_forward(&mut y, &gate, &up);
                kr::swiglu_backward(&mut dg, &mut du, &dy, &gate, &up);
            }
            Act::Gelu => {
                kr::geglu_forward(&mut y, &gate, &up);
                kr::geglu_backward(&mut dg, &mut du, &dy, &gate, &up);
            }
            Act::Softcap(_) => unreachable!("soft-capping has no gated form"),
        }
        p.record("forward", &shape, "", &gy, &y)?;
        p.record("backward", &shape, "dgate", &gdg, &dg)?;
        p.record("backward", &shape, "dup", &gdu, &du)?;
    }
    Ok(())
}

pub(super) fn check_embedding(p: &mut Probe) -> Result<()> {
    // (vocab, tokens, dim, rows per table chunk (0: as the binding limit requires), share of
    // the tokens that repeat id 0, in percent)
    let mut cases = vec![
        (1, 1, 1, 1, 0),
        (7, 13, 5, 7, 0),
        (50, 100, 33, 50, 0),
        (50, 100, 33, 7, 0),
        (1000, 257, 64, 300, 0),
        // ids past 65,535; one id at more positions than one dispatch's loop span
        (70_000, 257, 8, 30_000, 0),
        (50, 70_001, 4, 0, 98),
    ];
    for _ in 0..2 {
        let v = p.size(500);
        cases.push((v, p.size(200), p.size(70), p.size(v), 0));
    }
    if p.full() {
        cases.push((GEMMA3_VOCAB, 512, GEMMA3_270M_HIDDEN, 0, 10));
    }
    for &(v, n, c, chunk, repeat) in &cases {
        let shape = format!("V{v} N{n} C{c} chunk{chunk} repeat{repeat}%");
        let ids: Vec<u32> = (0..n)
            .map(|_| if p.rng.random_range(0..100) < repeat { 0 } else { p.rng.random_range(0..v as u32) })
            .collect();
        let table = p.uniform(v * c);
        let split = |p: &Probe, data: &[f32], what| match chunk {
            0 => Tensor::from_host(p.gpu, data, &[v, c], what),
            _ => Tensor::from_host_split(p.gpu, data, &[v, c], Split::Rows, chunk, what),
        };
        let gt = split(p, &table, "table")?;
        let gids = embedding::Ids::new(p.gpu, &ids, v)?;
        let gout = p.out(&[n, c])?;
        embedding::embedding_forward(p.gpu, &gout, &gids, &gt)?;
        let mut out = vec![0f32; n * c];
        kr::embedding_forward(&mut out, &ids, &table, c);
        p.record("forward", &shape, "", &gout, &out)?;

        let dout = p.uniform(n * c);
        let gdout = p.up(&dout, &[n, c])?;
        let gdt = split(p, &vec![0.0; v * c], "dtable")?;
        embedding::embedding_backward(p.gpu, &gdt, &gdout, &gids)?;
        let mut dt = vec![0f32; v * c];
        kr::embedding_backward(&mut dt, &dout, &ids, c);
        p.record("backward", &shape, "", &gdt, &dt)?;
    }
    Ok(())
}

pub(super) fn check_rope(p: &mut Probe) -> Result<()> {
    let mut cases =
        vec![(1, 1, 1, 2, 10000.0), (2, 5, 3, 8, 10000.0), (1, 17, 4, 64, 1e6), (3, 130, 2, 6, 10000.0)];
    for _ in 0..2 {
        cases.push((p.size(3), p.size(100), p.size(5), 2 * p.size(40), 10000.0));
    }
    for &(b, t, h, d, theta) in &cases {
        let shape = format!("B{b} T{t} H{h} D{d} theta{theta}");
        let positions: Vec<u32> = (0..t as u32).collect();
        let table = rope::RopeTable::new(p.gpu, &positions, d, theta)?;
        let (mut cos, mut sin) = (vec![0f32; t * d / 2], vec![0f32; t * d / 2]);
        kr::rope_cos_sin(&mut cos, &mut sin, &positions, d, theta);
        let n = b * t * h * d;
        let (x, dy) = (p.uniform(n), p.uniform(n));
        let (gx, gdy, gy, gdx) = (p.up(&x, &[n])?, p.up(&dy, &[n])?, p.out(&[n])?, p.out(&[n])?);
        rope::rope_forward(p.gpu, &gy, &gx, &table, b, h)?;
        rope::rope_backward(p.gpu, &gdx, &gdy, &table, b, h)?;
        let (mut y, mut dx) = (vec![0f32; n], vec![0f32; n]);
        kr::rope_forward(&mut y, &x, &cos, &sin, b, t, h, d);
        kr::rope_backward(&mut dx, &dy, &cos, &sin, b, t, h, d);
        p.record("forward", &shape, "", &gy, &y)?;
        p.record("backward", &shape, "", &gdx, &dx)?;
    }
    Ok(())
}

pub(super) fn check_add(p: &mut Probe) -> Result<()> {
    for dims in p.flat_shapes(None) {
        let n: usize = dims.iter().product();
        let (a, b) = (p.uniform(n), p.uniform(n));
        let (ga, gb, gout) = (p.up(&a, &dims)?, p.up(&b, &dims)?, p.out(&dims)?);
        elementwise::add(p.gpu, &gout, &ga, &gb, 1.0, 1.0)?;
        let mut out = vec![0f32; n];
        kr::add(&mut out, &a, &b);
        p.record("forward", &format!("{dims:?}"), "add", &gout, &out)?;
        let gs = p.out(&dims)?;
        elementwise::axpby(p.gpu, &gs, &ga, 0.37, 0.0)?;
        kr::scale(&mut out, &a, 0.37);
        p.record("forward", &format!("{dims:?}"), "scale", &gs, &out)?;
        // out = a + out (a gradient collected), and a fill
        let gacc = p.up(&b, &dims)?;
        elementwise::axpby(p.gpu, &gacc, &ga, 1.0, 1.0)?;
        kr::add(&mut out, &a, &b);
        p.record("forward", &format!("{dims:?}"), "accumulate", &gacc, &out)?;
        elementwise::fill(p.gpu, &gs, 0.25)?;
        p.record("forward", &format!("{dims:?}"), "fill", &gs, &vec![0.25; n])?;
        // Backward of out = a + b is the identity into both inputs; of scale, scaling dy.
        let dy = p.uniform(n);
        let gdy = p.up(&dy, &dims)?;
        let gda = p.out(&dims)?;
        elementwise::axpby(p.gpu, &gda, &gdy, 0.37, 0.0)?;
        kr::scale(&mut out, &dy, 0.37);
        p.record("backward", &format!("{dims:?}"), "d scale", &gda, &out)?;
    }
    Ok(())
}

pub(super) fn check_dropout(p: &mut Probe) -> Result<()> {
    // lengths a multiple of 4 take the vec4 kernel (elementwise_vec4.wgsl), the others not
    let cases = [(1usize, 0.5f32, 1u32), (1000, 0.1, 2), (70001, 0.3, 3), (4097, 0.0, 4), (65_536, 0.3, 5)];
    for &(n, prob, seed) in &cases {
        let shape = format!("{n} p {prob}");
        let (x, dy) = (p.uniform(n), p.uniform(n));
        let (gx, gdy, gy, gdx) = (p.up(&x, &[n])?, p.up(&dy, &[n])?, p.out(&[n])?, p.out(&[n])?);
        elementwise::dropout(p.gpu, &gy, &gx, prob, seed)?;
        elementwise::dropout(p.gpu, &gdx, &gdy, prob, seed)?;
        let (mut y, mut dx) = (vec![0f32; n], vec![0f32; n]);
        kr::dropout(&mut y, &x, prob, seed);
        kr::dropout(&mut dx, &dy, prob, seed);
        p.record("forward", &shape, "", &gy, &y)?;
        p.record("backward", &shape, "", &gdx, &dx)?;
    }
    Ok(())
}
