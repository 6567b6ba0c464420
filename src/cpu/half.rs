//! Activations held in 16 bits in host memory between the passes (`--activations f16|bf16` on
//! the CPU paths): the same values as the GPU's `shaders/half.wgsl` keeps, by the `half` crate's
//! slice conversions (hardware ones where the CPU has them), with the kernel's one rule of its
//! own: a finite value beyond f16's range saturates to +-65504 (`kernels_ref::half_round_one`).

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};
use kernels_ref::HalfFormat;
use rayon::prelude::*;

/// Values per task (and per f16 saturation buffer).
const BLOCK: usize = 4096;

/// `x` in 16 bits of `format`.
pub fn narrow(x: &[f32], format: HalfFormat) -> Vec<u16> {
    let mut out = vec![0u16; x.len()];
    out.par_chunks_mut(BLOCK).zip(x.par_chunks(BLOCK)).for_each(|(o, x)| match format {
        HalfFormat::F16 => {
            let max = f16::MAX.to_f32();
            let mut buf = [0f32; BLOCK];
            let buf = &mut buf[..x.len()];
            for (b, &v) in buf.iter_mut().zip(x) {
                *b = if v.is_finite() { v.clamp(-max, max) } else { v };
            }
            o.reinterpret_cast_mut::<f16>().convert_from_f32_slice(buf);
        }
        HalfFormat::Bf16 => o.reinterpret_cast_mut::<bf16>().convert_from_f32_slice(x),
    });
    out
}

/// The f32 values of `bits` (16-bit `format`), into `out`.
pub fn widen(out: &mut [f32], bits: &[u16], format: HalfFormat) {
    assert_eq!(out.len(), bits.len(), "widen: lengths differ");
    out.par_chunks_mut(BLOCK).zip(bits.par_chunks(BLOCK)).for_each(|(o, b)| match format {
        HalfFormat::F16 => b.reinterpret_cast::<f16>().convert_to_f32_slice(o),
        HalfFormat::Bf16 => b.reinterpret_cast::<bf16>().convert_to_f32_slice(o),
    });
}
