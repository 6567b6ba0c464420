//! Rotary position embedding (RoPE) in the rotate-half layout of Hugging Face Llama/Qwen/Gemma,
//! forward and backward.
//!
//! Math: for a head vector `x` of even length `D` and `i < D/2`, the pair `(x_i, x_{i+D/2})` is
//! rotated by the angle `pos * theta^(-2i/D)`:
//! `y_i = x_i cos - x_{i+D/2} sin`, `y_{i+D/2} = x_{i+D/2} cos + x_i sin`.
//! A rotation's inverse is its transpose, so backward rotates by the opposite angle:
//! `dx_i = dy_i cos + dy_{i+D/2} sin`, `dx_{i+D/2} = dy_{i+D/2} cos - dy_i sin`.

use rayon::prelude::*;

/// `cos (T, D/2)`, `sin (T, D/2)` for `positions (T)`: angle `pos * theta^(-2i/D)`, in f64.
pub fn rope_cos_sin(cos: &mut [f32], sin: &mut [f32], positions: &[u32], head_dim: usize, theta: f64) {
    assert!(head_dim.is_multiple_of(2), "rope_cos_sin: head_dim {head_dim} must be even");
    let half = head_dim / 2;
    assert_eq!(cos.len(), positions.len() * half, "rope_cos_sin: cos must hold T*D/2");
    assert_eq!(sin.len(), positions.len() * half, "rope_cos_sin: sin must hold T*D/2");
    for (t, &pos) in positions.iter().enumerate() {
        for i in 0..half {
            let inv_freq = theta.powf(-((2 * i) as f64) / head_dim as f64);
            let angle = pos as f64 * inv_freq;
            cos[t * half + i] = angle.cos() as f32;
            sin[t * half + i] = angle.sin() as f32;
        }
    }
}

/// Rotates every `(b, t, h)` row of `src` into `dst`; `sign` = 1 rotates forward, -1 back.
#[allow(clippy::too_many_arguments)]
fn rotate(
    name: &str,
    dst: &mut [f32],
    src: &[f32],
    cos: &[f32],
    sin: &[f32],
    b: usize,
    t: usize,
    h: usize,
    d: usize,
    sign: f64,
) {
    assert!(d.is_multiple_of(2), "{name}: head dim {d} must be even");
    let half = d / 2;
    assert_eq!(src.len(), b * t * h * d, "{name}: input must hold B*T*H*D");
    assert_eq!(dst.len(), b * t * h * d, "{name}: output must hold B*T*H*D");
    assert_eq!(cos.len(), t * half, "{name}: cos must hold T*D/2");
    assert_eq!(sin.len(), t * half, "{name}: sin must hold T*D/2");
    if d == 0 {
        return;
    }
    dst.par_chunks_mut(d).enumerate().for_each(|(row, y)| {
        let ti = (row / h) % t;
        let x = &src[row * d..(row + 1) * d];
        for i in 0..half {
            let (c, s) = (cos[ti * half + i] as f64, sign * sin[ti * half + i] as f64);
            let (x0, x1) = (x[i] as f64, x[i + half] as f64);
            y[i] = (x0 * c - x1 * s) as f32;
            y[i + half] = (x1 * c + x0 * s) as f32;
        }
    });
}

/// `y (B,T,H,D)` = `x (B,T,H,D)` rotated by the angles in `cos`, `sin` `(T, D/2)`.
#[allow(clippy::too_many_arguments)]
pub fn rope_forward(
    y: &mut [f32],
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    b: usize,
    t: usize,
    h: usize,
    d: usize,
) {
    rotate("rope_forward", y, x, cos, sin, b, t, h, d, 1.0);
}

/// `dx (B,T,H,D)`, overwritten: `dy` rotated back by the same angles.
#[allow(clippy::too_many_arguments)]
pub fn rope_backward(
    dx: &mut [f32],
    dy: &[f32],
    cos: &[f32],
    sin: &[f32],
    b: usize,
    t: usize,
    h: usize,
    d: usize,
) {
    rotate("rope_backward", dx, dy, cos, sin, b, t, h, d, -1.0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use std::f64::consts::PI;

    #[test]
    fn quarter_turn_by_hand() {
        // Angle pi/2 (cos 0, sin 1) on x = [1, 2, 3, 4], pairs (0, 2) and (1, 3):
        // y0 = 1*0 - 3*1 = -3, y1 = 2*0 - 4*1 = -4, y2 = 3*0 + 1*1 = 1, y3 = 4*0 + 2*1 = 2.
        let mut y = [0.0; 4];
        rope_forward(&mut y, &[1.0, 2.0, 3.0, 4.0], &[0.0, 0.0], &[1.0, 1.0], 1, 1, 1, 4);
        assert_eq!(y, [-3.0, -4.0, 1.0, 2.0]);
        // And back: the transpose undoes it.
        let mut x = [0.0; 4];
        rope_backward(&mut x, &y, &[0.0, 0.0], &[1.0, 1.0], 1, 1, 1, 4);
        assert_eq!(x, [1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn cos_sin_by_hand() {
        // D = 4: inv_freq = [theta^0, theta^(-1/2)]. With theta = 4/pi^2, theta^(-1/2) = pi/2,
        // so position 1 gives angles [1, pi/2] and position 0 gives [0, 0].
        let (mut c, mut s) = ([0.0; 4], [0.0; 4]);
        rope_cos_sin(&mut c, &mut s, &[0, 1], 4, 4.0 / (PI * PI));
        assert_close("cos", &c, &[1.0, 1.0, 1f64.cos(), 0.0], 1e-7);
        assert_close("sin", &s, &[0.0, 0.0, 1f64.sin(), 1.0], 1e-7);
        // theta = 10000, D = 4, position 2: inv_freq = [1, 1/100], angles [2, 0.02].
        let (mut c, mut s) = ([0.0; 2], [0.0; 2]);
        rope_cos_sin(&mut c, &mut s, &[2], 4, 10000.0);
        assert_close("cos", &c, &[2f64.cos(), 0.02f64.cos()], 1e-7);
        assert_close("sin", &s, &[2f64.sin(), 0.02f64.sin()], 1e-7);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = rng(50);
        for (b, t, h, d) in [(1, 1, 1, 2), (2, 3, 5, 4), (1, 7, 3, 6), (3, 5, 1, 8)] {
            let positions: Vec<u32> = (0..t as u32).map(|p| p * 3 + 1).collect();
            let (mut cos, mut sin) = (vec![0.0; t * d / 2], vec![0.0; t * d / 2]);
            rope_cos_sin(&mut cos, &mut sin, &positions, d, 10000.0);
            let n = b * t * h * d;
            let x = uniform(&mut rng, n, -1.0, 1.0);
            let w = uniform(&mut rng, n, -1.0, 1.0);
            let mut dx = vec![f32::NAN; n];
            rope_backward(&mut dx, &w, &cos, &sin, b, t, h, d);
            // L is linear in x (h = 0.5, no truncation error); two outputs of size < 2 move,
            // so f32 rounding costs < 2 * 2 * 6e-8 / 1 < 1e-6.
            check_grad("rope dx", &x, &dx, 0.5, 2e-6, 1e-6, 64, &mut rng, |x| {
                let mut y = vec![0.0; n];
                rope_forward(&mut y, x, &cos, &sin, b, t, h, d);
                weighted_sum(&w, &y)
            });
        }
    }
}
