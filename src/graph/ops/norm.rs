//! `Op::LayerNorm` (x, weight, bias) and `Op::RmsNorm` (x, weight; Gemma scales by 1 + w):
//! the forward saves each row's statistics (mean and rstd, or rstd), the backward reads them.
//! The fast CPU path runs `cpu::norm` (f32), the reference path `kernels_ref::norm` (f64).

use super::{wanted, Bwd, CpuPath, Device, Fwd, Grads, Value};
use crate::cpu::{norm as fast, pool};
use crate::error::Result;
use crate::gpu::Tensor;
use crate::kernels::norm::{self, NormKind};
use kernels_ref as kr;

pub(super) fn layernorm_forward(cx: &Fwd, out: &mut Value, eps: f32) -> Result<Option<Value>> {
    let (rows, cols) = (cx.shape[0], cx.shape[1]);
    Ok(Some(match cx.dev {
        Device::Gpu(g) => {
            let stats = Tensor::empty(g, &[rows, 2], "layernorm stats")?;
            let (x, w, b) = (cx.x(0).gpu(), cx.x(1).gpu(), cx.x(2).gpu());
            norm::norm_forward(g, out.gpu(), &stats, x, w, Some(b), NormKind::Layer, eps)?;
            Value::Gpu(stats)
        }
        Device::Cpu(CpuPath::Fast) => {
            let mut stats = vec![0f32; 2 * rows];
            let (mean, rstd) = stats.split_at_mut(rows);
            let (x, w, b) = (cx.x(0).cpu(), cx.x(1).cpu(), cx.x(2).cpu());
            fast::layernorm_forward(out.cpu_mut(), mean, rstd, x, w, b, cols, eps);
            Value::Cpu(stats)
        }
        Device::Cpu(CpuPath::Reference) => {
            let (mut mean, mut rstd) = (vec![0f32; rows], vec![0f32; rows]);
            let (x, w, b) = (cx.x(0).cpu(), cx.x(1).cpu(), cx.x(2).cpu());
            kr::layernorm_forward(out.cpu_mut(), &mut mean, &mut rstd, x, w, b, rows, cols, eps);
            mean.extend(rstd);
            Value::Cpu(mean)
        }
    }))
}

pub(super) fn layernorm_backward(cx: &Bwd, grads: &mut Grads) -> Result<()> {
    let stats = cx.saved("layernorm's statistics");
    match cx.f.dev {
        Device::Gpu(gpu) => {
            let (x, w) = (cx.f.x(0).gpu(), cx.f.x(1).gpu());
            for (j, g) in wanted(grads) {
                let t = Some(g.value.gpu());
                let (dx, dw, db) = match j {
                    0 => (t, None, None),
                    1 => (None, t, None),
                    _ => (None, None, t),
                };
                let stats = stats.gpu();
                norm::norm_backward(gpu, dx, dw, db, cx.dy().gpu(), x, w, stats, NormKind::Layer, g.acc)?;
            }
        }
        Device::Cpu(CpuPath::Fast) => {
            let (rows, cols) = (cx.f.shape[0], cx.f.shape[1]);
            let (mean, rstd) = stats.cpu().split_at(rows);
            let (x, w) = (cx.f.x(0).cpu(), cx.f.x(1).cpu());
            let want: Vec<usize> = wanted(grads).map(|(j, _)| j).collect();
            let mut dx = want.contains(&0).then(|| pool::take(rows * cols));
            let mut dwb =
                (want.contains(&1) || want.contains(&2)).then(|| (vec![0f32; cols], vec![0f32; cols]));
            let dwb_mut = dwb.as_mut().map(|(w, b)| (w.as_mut_slice(), b.as_mut_slice()));
            fast::layernorm_backward(dx.as_deref_mut(), dwb_mut, cx.dy().cpu(), x, w, mean, rstd, cols);
            let (dw, db) = dwb.unzip();
            let mut fresh = [dx, dw, db];
            for (j, g) in wanted(grads) {
                g.put_cpu(fresh[j].take().expect("computed above"));
            }
        }
        Device::Cpu(CpuPath::Reference) => {
            let (rows, cols) = (cx.f.shape[0], cx.f.shape[1]);
            let (mean, rstd) = stats.cpu().split_at(rows);
            let (mut dx, mut dw, mut db) = (vec![0f32; rows * cols], vec![0f32; cols], vec![0f32; cols]);
            let (x, w) = (cx.f.x(0).cpu(), cx.f.x(1).cpu());
            kr::layernorm_backward(&mut dx, &mut dw, &mut db, cx.dy().cpu(), x, w, mean, rstd, rows, cols);
            let mut fresh = [Some(dx), Some(dw), Some(db)];
            for (j, g) in wanted(grads) {
                g.put_cpu(fresh[j].take().expect("one gradient per input"));
            }
        }
    }
    Ok(())
}

pub(super) fn rmsnorm_forward(cx: &Fwd, out: &mut Value, eps: f32, shift: f32) -> Result<Option<Value>> {
    let cols = cx.in_shape(1)[0];
    let rows = cx.shape.iter().product::<usize>() / cols;
    Ok(Some(match cx.dev {
        Device::Gpu(g) => {
            let stats = Tensor::empty(g, &[rows, 2], "rmsnorm stats")?;
            let kind = NormKind::Rms { gemma: shift != 0.0 };
            norm::norm_forward(g, out.gpu(), &stats, cx.x(0).gpu(), cx.x(1).gpu(), None, kind, eps)?;
            Value::Gpu(stats)
        }
        Device::Cpu(CpuPath::Fast) => {
            let mut rstd = vec![0f32; rows];
            fast::rmsnorm_forward(out.cpu_mut(), &mut rstd, cx.x(0).cpu(), cx.x(1).cpu(), cols, eps, shift);
            Value::Cpu(rstd)
        }
        Device::Cpu(CpuPath::Reference) => {
            let mut rstd = vec![0f32; rows];
            kr::rmsnorm_forward(
                out.cpu_mut(),
                &mut rstd,
                cx.x(0).cpu(),
                cx.x(1).cpu(),
                rows,
                cols,
                eps,
                shift,
            );
            Value::Cpu(rstd)
        }
    }))
}

pub(super) fn rmsnorm_backward(cx: &Bwd, grads: &mut Grads, shift: f32) -> Result<()> {
    let stats = cx.saved("rmsnorm's statistics");
    match cx.f.dev {
        Device::Gpu(gpu) => {
            let kind = NormKind::Rms { gemma: shift != 0.0 };
            let (x, w) = (cx.f.x(0).gpu(), cx.f.x(1).gpu());
            for (j, g) in wanted(grads) {
                let (dx, dw) = if j == 0 { (Some(g.value.gpu()), None) } else { (None, Some(g.value.gpu())) };
                norm::norm_backward(gpu, dx, dw, None, cx.dy().gpu(), x, w, stats.gpu(), kind, g.acc)?;
            }
        }
        Device::Cpu(CpuPath::Fast) => {
            let cols = cx.f.in_shape(1)[0];
            let rows = cx.f.shape.iter().product::<usize>() / cols;
            let (x, w) = (cx.f.x(0).cpu(), cx.f.x(1).cpu());
            let want: Vec<usize> = wanted(grads).map(|(j, _)| j).collect();
            let mut dx = want.contains(&0).then(|| pool::take(rows * cols));
            let mut dw = want.contains(&1).then(|| vec![0f32; cols]);
            fast::rmsnorm_backward(
                dx.as_deref_mut(),
                dw.as_deref_mut(),
                cx.dy().cpu(),
                x,
                w,
                stats.cpu(),
                cols,
                shift,
            );
            let mut fresh = [dx, dw];
            for (j, g) in wanted(grads) {
                g.put_cpu(fresh[j].take().expect("computed above"));
            }
        }
        Device::Cpu(CpuPath::Reference) => {
            let cols = cx.f.in_shape(1)[0];
            let rows = cx.f.shape.iter().product::<usize>() / cols;
            let (mut dx, mut dw) = (vec![0f32; rows * cols], vec![0f32; cols]);
            let (x, w) = (cx.f.x(0).cpu(), cx.f.x(1).cpu());
            kr::rmsnorm_backward(&mut dx, &mut dw, cx.dy().cpu(), x, w, stats.cpu(), rows, cols, shift);
            let mut fresh = [Some(dx), Some(dw)];
            for (j, g) in wanted(grads) {
                g.put_cpu(fresh[j].take().expect("one gradient per input"));
            }
        }
    }
    Ok(())
}
