//! Activations stored in 16 bits between the forward and the backward pass: what a value is
//! after a round trip through f16 or bf16 storage (`shaders/half.wgsl`). The conversions are
//! the `half` crate's (round to nearest, ties to even), with one rule of the kernel's own:
//! a finite value beyond f16's range saturates to +-65504 instead of becoming infinite.

use half::{bf16, f16};
use rayon::prelude::*;

/// A 16-bit storage format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HalfFormat {
    /// IEEE binary16: 11 significant bits, finite up to 65504.
    F16,
    /// bfloat16: f32's exponent range, 8 significant bits.
    Bf16,
}

/// `x` stored in `format` and read back as f32.
pub fn half_round_one(x: f32, format: HalfFormat) -> f32 {
    match format {
        HalfFormat::F16 => {
            let max = f16::MAX.to_f32();
            let x = if x.is_finite() { x.clamp(-max, max) } else { x };
            f16::from_f32(x).to_f32()
        }
        HalfFormat::Bf16 => bf16::from_f32(x).to_f32(),
    }
}

/// `out = x` stored in `format` and read back, elementwise.
pub fn half_round(out: &mut [f32], x: &[f32], format: HalfFormat) {
    assert_eq!(x.len(), out.len(), "half_round: x and out lengths differ");
    out.par_iter_mut().zip(x.par_iter()).for_each(|(o, &x)| *o = half_round_one(x, format));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_saturation_and_specials() {
        use HalfFormat::*;
        // ties to even: 1 + 2^-11 lies halfway between 1 and 1 + 2^-10
        assert_eq!(half_round_one(1.0 + 2f32.powi(-11), F16), 1.0);
        assert_eq!(half_round_one(1.0 + 3.0 * 2f32.powi(-11), F16), 1.0 + 2.0 * 2f32.powi(-10));
        assert_eq!(half_round_one(1.0 + 2f32.powi(-8), Bf16), 1.0);
        // f16's overflow saturates, bf16 keeps f32's range
        assert_eq!(half_round_one(1e6, F16), 65504.0);
        assert_eq!(half_round_one(-1e30, F16), -65504.0);
        assert_eq!(half_round_one(1e30, Bf16), bf16::from_f32(1e30).to_f32());
        assert_eq!(half_round_one(f32::INFINITY, F16), f32::INFINITY);
        assert!(half_round_one(f32::NAN, F16).is_nan() && half_round_one(f32::NAN, Bf16).is_nan());
        // f16 subnormals: 2^-24 is kept, 2^-25 (a tie) goes to 0, a bit more rounds up
        assert_eq!(half_round_one(2f32.powi(-24), F16), 2f32.powi(-24));
        assert_eq!(half_round_one(2f32.powi(-25), F16), 0.0);
        assert_eq!(half_round_one(2f32.powi(-25) * 1.0001, F16), 2f32.powi(-24));
    }
}
