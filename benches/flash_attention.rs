//! `cargo bench --bench flash_attention`: Gemma 3 270M's attention (H 4, KVH 1, D 256) at the
//! paper's batch 8 x 128 and at one 2,048-token sequence, sliding (window 512) and global, the
//! composed attention (`kernels::attention`, saves the (B,H,T,T) probabilities) against flash
//! attention (`kernels::flash_attention`, saves the (B,H,T) log-sum-exp): time of forward +
//! backward, bytes saved for the backward, and the peak of live GPU bytes during the op (inputs
//! and outputs included). Runs under the mobile limits; `POCKETTUNE_DEVICE` picks the adapter.

use pockettune::kernels::attention::{self, AttnDims, Heads};
use pockettune::kernels::flash_attention as fa;
use pockettune::{Gpu, GpuOptions, Profile, Tensor};
use std::time::Instant;

fn main() -> pockettune::Result<()> {
    let gpu = Gpu::new(&GpuOptions { device: None, profile: Profile::Mobile })?;
    eprintln!("device: {}", gpu.summary());
    println!(
        "{:<7} {:<5} {:<7} {:<9} {:>12} {:>14} {:>14}",
        "B x T", "", "window", "kernel", "fwd+bwd ms", "saved bytes", "peak live MiB"
    );
    for (b, t) in [(8, 128), (1, 2048)] {
        for window in [Some(512), None] {
            let d = AttnDims { b, t, h: 4, kv_h: 1, d: 256, window, scale: 1.0 / 16.0, softcap: None };
            for flash in [false, true] {
                let (ms, saved, peak) = measure(&gpu, d, flash)?;
                println!(
                    "{:<7} {:<5} {:<7} {:<9} {:>12.1} {:>14} {:>14.1}",
                    format!("{b}x{t}"),
                    "",
                    window.map_or("global".into(), |w| w.to_string()),
                    if flash { "flash" } else { "composed" },
                    ms,
                    saved,
                    peak as f64 / (1 << 20) as f64
                );
            }
        }
    }
    Ok(())
}

/// (best of 3 forward + backward in ms, bytes saved for the backward, peak live bytes).
fn measure(gpu: &Gpu, d: AttnDims, flash: bool) -> pockettune::Result<(f64, usize, u64)> {
    let (nq, nk) = (d.b * d.t * d.h * d.d, d.b * d.t * d.kv_h * d.d);
    let fill = |n: usize, s: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * s).sin()).collect() };
    let up = |x: Vec<f32>| Tensor::from_host(gpu, &x, &[x.len()], "bench input");
    let (q, k, v, dout) =
        (up(fill(nq, 0.37))?, up(fill(nk, 0.11))?, up(fill(nk, 0.23))?, up(fill(nq, 0.05))?);
    let (out, dq, dk, dv) = (
        Tensor::empty(gpu, &[nq], "out")?,
        Tensor::empty(gpu, &[nq], "dq")?,
        Tensor::empty(gpu, &[nk], "dk")?,
        Tensor::empty(gpu, &[nk], "dv")?,
    );
    let dense = |t, heads| Heads::dense(t, heads, d.d);
    let saved_len = if flash { d.b * d.h * d.t } else { d.b * d.h * d.t * d.t };
    let mut best = f64::INFINITY;
    let mut peak = 0;
    for _ in 0..4 {
        gpu.sync()?;
        gpu.reset_live_peak();
        let start = Instant::now();
        let saved = Tensor::empty(gpu, &[saved_len / d.t, d.t], "saved")?;
        let (qs, ks, vs) = (dense(&q, d.h), dense(&k, d.kv_h), dense(&v, d.kv_h));
        let grads = (dense(&dq, d.h), dense(&dk, d.kv_h), dense(&dv, d.kv_h));
        if flash {
            fa::flash_attention_forward(gpu, dense(&out, d.h), &saved, qs, ks, vs, d)?;
            let dout = dense(&dout, d.h);
            fa::flash_attention_backward(gpu, grads.0, grads.1, grads.2, dout, qs, ks, vs, &saved, d, false)?;
        } else {
            attention::attention_forward(gpu, dense(&out, d.h), &saved, qs, ks, vs, d)?;
            let dout = dense(&dout, d.h);
            attention::attention_backward(
                gpu, grads.0, grads.1, grads.2, dout, qs, ks, vs, &saved, d, false,
            )?;
        }
        gpu.sync()?;
        best = best.min(start.elapsed().as_secs_f64() * 1e3);
        peak = peak.max(gpu.bytes_live().1);
        if d.t >= 2048 && best > 20_000.0 {
            break; // one measurement is enough for the slow ones
        }
    }
    Ok((best, saved_len * 4, peak))
}
