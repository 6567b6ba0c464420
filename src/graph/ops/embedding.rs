//! `Op::Embedding`: rows of a table (input 0) picked by a list of token ids. Backward adds each
//! output row's gradient to its id's row (ids that repeat collect every occurrence).

use super::{Bwd, Fwd, Grads, Value};
use crate::error::Result;
use crate::kernels::{embedding, quant};
use kernels_ref as kr;

pub(super) fn forward(cx: &Fwd, out: &mut Value, ids: usize) -> Result<Option<Value>> {
    match cx.dev {
        super::Device::Gpu(g) => {
            let fed = cx.fed.gpu_ids(ids);
            match cx.x(0) {
                Value::Packed(table) => quant::qembedding_forward(g, out.gpu(), fed, table)?,
                // a streamed table: only the looked-up rows are read, on the host
                Value::Streamed(table) => out.gpu().write(g, &table.gather_rows(fed.host())?)?,
                table => embedding::embedding_forward(g, out.gpu(), fed, table.gpu())?,
            }
        }
        // a gather: the reference is as fast as it gets
        super::Device::Cpu(_) => {
            kr::embedding_forward(out.cpu_mut(), cx.fed.cpu_ids(ids), cx.x(0).cpu(), cx.shape[1])
        }
    }
    Ok(None)
}

pub(super) fn backward(cx: &Bwd, grads: &mut Grads, ids: usize) -> Result<()> {
    let Some(g) = grads[0].as_mut() else { return Ok(()) };
    let in_shape = cx.f.in_shape(0);
    match cx.f.dev {
        super::Device::Gpu(gpu) => {
            if !g.acc {
                g.value.fill(cx.f.dev, 0.0)?;
            }
            embedding::embedding_backward(gpu, g.value.gpu(), cx.dy().gpu(), cx.f.fed.gpu_ids(ids))?;
        }
        super::Device::Cpu(super::CpuPath::Fast) => {
            let (table, fed) = (g.value.cpu_mut(), cx.f.fed.cpu_ids(ids));
            crate::cpu::embedding_backward(table, cx.dy().cpu(), fed, in_shape[1], g.acc);
        }
        super::Device::Cpu(super::CpuPath::Reference) => {
            let mut d = vec![0f32; in_shape.iter().product()];
            kr::embedding_backward(&mut d, cx.dy().cpu(), cx.f.fed.cpu_ids(ids), in_shape[1]);
            g.put_cpu(d);
        }
    }
    Ok(())
}
