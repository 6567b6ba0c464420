//! 16-bit storage of activations: f32 -> f16 / bf16 -> f32 conversions, checked bit for bit.

use super::{exact_err, Probe, GEMMA3_270M_HIDDEN, GEMMA3_VOCAB};
use crate::error::Result;
use crate::gpu::{Split, Tensor};
use kernels_ref as kr;
use rand::Rng;

/// Values over f16's and bf16's whole range: magnitudes 2^-30 to 2^20 (f16 subnormals and
/// overflow included), and at the front (where they fit) the edge cases: ties, the saturation
/// bound, infinities, NaN, signed zeros, an f32 subnormal.
fn wide_values(p: &mut Probe, n: usize) -> Vec<f32> {
    let mut x: Vec<f32> = (0..n)
        .map(|_| {
            let m = p.rng.random_range(1.0f32..2.0) * 2f32.powi(p.rng.random_range(-30..=20));
            if p.rng.random::<bool>() {
                m
            } else {
                -m
            }
        })
        .collect();
    let edges = [
        0.0,
        -0.0,
        1.0 + 2f32.powi(-11),       // f16 tie, to even (1)
        1.0 + 3.0 * 2f32.powi(-11), // f16 tie, to even (up)
        1.0 + 2f32.powi(-8),        // bf16 tie
        65504.0,
        65519.99,
        65520.0,
        -1e6,
        f32::MAX,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        2f32.powi(-24),
        2f32.powi(-25),
        1.5 * 2f32.powi(-24),
        2f32.powi(-14) * (1.0 - 2f32.powi(-12)), // rounds up to f16's smallest normal
        1e-40,
    ];
    for (v, e) in x.iter_mut().zip(edges) {
        *v = e;
    }
    x
}

/// `kernels::half`: activations packed to f16 or bf16 and unpacked, against `half`'s
/// conversions (`kernels_ref::half_round`), exactly; tensors chunked by rows and by columns.
pub(super) fn check_half_storage(p: &mut Probe) -> Result<()> {
    use crate::kernels::half::{self, HalfFormat};
    for format in [HalfFormat::F16, HalfFormat::Bf16] {
        p.label = Some(format!("half_storage {format:?}").to_lowercase());
        // (shape, chunking): odd lengths leave half a word; a real activation (GPT-2's MLP,
        // batch 4 x 128); a tensor in row chunks and one in column chunks (as logits are)
        let mut cases: Vec<(Vec<usize>, Option<(Split, usize)>)> =
            p.flat_shapes(Some([GEMMA3_VOCAB, GEMMA3_270M_HIDDEN])).into_iter().map(|d| (d, None)).collect();
        cases.push((vec![512, 3072], None));
        cases.push((vec![7, 33], Some((Split::Rows, 3))));
        cases.push((vec![5, 1001], Some((Split::Cols, 333))));
        for (dims, split) in cases {
            let n: usize = dims.iter().product();
            let x = wide_values(p, n);
            let gx = match split {
                Some((s, per)) => Tensor::from_host_split(p.gpu, &x, &dims, s, per, "gradcheck input")?,
                None => p.up(&x, &dims)?,
            };
            let h = half::pack(p.gpu, &gx, format)?;
            drop(gx);
            let back = half::unpack(p.gpu, &h)?;
            let mut want = vec![0f32; n];
            kr::half_round(&mut want, &x, format);
            let chunks = back.chunks().len();
            let shape = match split {
                Some((s, per)) => format!("{dims:?} {s:?}/{per}"),
                None if chunks > 1 => format!("{dims:?} in {chunks} chunks"),
                None => format!("{dims:?}"),
            };
            p.push("forward", &shape, "round trip", exact_err(&back.to_host(p.gpu)?, &want));
        }
    }
    p.label = None;
    Ok(())
}
