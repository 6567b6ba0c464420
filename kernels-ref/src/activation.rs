//! Elementwise activations and gated MLP units, forward and backward; each element is computed
//! in f64 and stored in f32.
//!
//! GELU (tanh approximation, GPT-2 / Gemma `gelu_pytorch_tanh`):
//! `gelu(x) = 0.5 x (1 + tanh u)`, `u = sqrt(2/pi) (x + 0.044715 x^3)`, so
//! `gelu'(x) = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2)`.
//! SiLU: `silu(x) = x sigmoid(x)`, `silu'(x) = sigmoid(x) (1 + x (1 - sigmoid(x)))`.
//! SwiGLU (Llama/Qwen MLP): `y = silu(gate) * up`; GeGLU (Gemma MLP): `y = gelu(gate) * up`;
//! backward `dgate = dy * up * act'(gate)`, `dup = dy * act(gate)`.
//! Soft-capping (Gemma's logit caps): `softcap(x) = c tanh(x / c)`, `softcap'(x) = 1 - tanh^2(x / c)`.

use rayon::prelude::*;

const GELU_K: f64 = 0.044_715;

fn sqrt_2_over_pi() -> f64 {
    (2.0 / std::f64::consts::PI).sqrt()
}

fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + (sqrt_2_over_pi() * (x + GELU_K * x * x * x)).tanh())
}

fn gelu_grad(x: f64) -> f64 {
    let s = sqrt_2_over_pi();
    let t = (s * (x + GELU_K * x * x * x)).tanh();
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * s * (1.0 + 3.0 * GELU_K * x * x)
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn silu(x: f64) -> f64 {
    x * sigmoid(x)
}

fn silu_grad(x: f64) -> f64 {
    let s = sigmoid(x);
    s * (1.0 + x * (1.0 - s))
}

/// `y = f(x)` elementwise.
fn unary(name: &str, y: &mut [f32], x: &[f32], f: impl Fn(f64) -> f64 + Sync) {
    assert_eq!(y.len(), x.len(), "{name}: y and x lengths differ");
    y.par_iter_mut().zip(x.par_iter()).for_each(|(y, &x)| *y = f(x as f64) as f32);
}

/// `dx = dy * f'(x)` elementwise.
fn unary_backward(name: &str, dx: &mut [f32], x: &[f32], dy: &[f32], df: impl Fn(f64) -> f64 + Sync) {
    assert_eq!(dx.len(), x.len(), "{name}: dx and x lengths differ");
    assert_eq!(dy.len(), x.len(), "{name}: dy and x lengths differ");
    dx.par_iter_mut()
        .zip(x.par_iter().zip(dy.par_iter()))
        .for_each(|(dx, (&x, &dy))| *dx = (dy as f64 * df(x as f64)) as f32);
}

/// `y = act(gate) * up` elementwise.
fn gated(name: &str, y: &mut [f32], gate: &[f32], up: &[f32], act: fn(f64) -> f64) {
    assert_eq!(gate.len(), y.len(), "{name}: gate and y lengths differ");
    assert_eq!(up.len(), y.len(), "{name}: up and y lengths differ");
    y.par_iter_mut()
        .zip(gate.par_iter().zip(up.par_iter()))
        .for_each(|(y, (&g, &u))| *y = (act(g as f64) * u as f64) as f32);
}

#[allow(clippy::too_many_arguments)]
fn gated_backward(
    name: &str,
    dgate: &mut [f32],
    dup: &mut [f32],
    dy: &[f32],
    gate: &[f32],
    up: &[f32],
    act: fn(f64) -> f64,
    dact: fn(f64) -> f64,
) {
    let n = dy.len();
    for (what, len) in [("dgate", dgate.len()), ("dup", dup.len()), ("gate", gate.len()), ("up", up.len())] {
        assert_eq!(len, n, "{name}: {what} has {len} elements, dy has {n}");
    }
    dgate.par_iter_mut().zip(dup.par_iter_mut()).enumerate().for_each(|(i, (dg, du))| {
        let (g, u, d) = (gate[i] as f64, up[i] as f64, dy[i] as f64);
        *dg = (d * u * dact(g)) as f32;
        *du = (d * act(g)) as f32;
    });
}

pub fn gelu_forward(y: &mut [f32], x: &[f32]) {
    unary("gelu_forward", y, x, gelu);
}

pub fn gelu_backward(dx: &mut [f32], x: &[f32], dy: &[f32]) {
    unary_backward("gelu_backward", dx, x, dy, gelu_grad);
}

pub fn silu_forward(y: &mut [f32], x: &[f32]) {
    unary("silu_forward", y, x, silu);
}

pub fn silu_backward(dx: &mut [f32], x: &[f32], dy: &[f32]) {
    unary_backward("silu_backward", dx, x, dy, silu_grad);
}

/// `y = cap tanh(x / cap)`.
pub fn softcap_forward(y: &mut [f32], x: &[f32], cap: f32) {
    let c = cap as f64;
    unary("softcap_forward", y, x, |x| c * (x / c).tanh());
}

/// `dx = dy (1 - tanh^2(x / cap))`.
pub fn softcap_backward(dx: &mut [f32], x: &[f32], dy: &[f32], cap: f32) {
    let c = cap as f64;
    unary_backward("softcap_backward", dx, x, dy, |x| 1.0 - (x / c).tanh().powi(2));
}

/// `dx = dy (1 - (y / cap)^2)` from the output `y = cap tanh(x / cap)`: the same derivative
/// as [`softcap_backward`], for a caller that keeps the output instead of the input.
pub fn softcap_backward_from_output(dx: &mut [f32], y: &[f32], dy: &[f32], cap: f32) {
    let c = cap as f64;
    unary_backward("softcap_backward_from_output", dx, y, dy, |y| 1.0 - (y / c).powi(2));
}

/// `y = silu(gate) * up`.
pub fn swiglu_forward(y: &mut [f32], gate: &[f32], up: &[f32]) {
    gated("swiglu_forward", y, gate, up, silu);
}

pub fn swiglu_backward(dgate: &mut [f32], dup: &mut [f32], dy: &[f32], gate: &[f32], up: &[f32]) {
    gated_backward("swiglu_backward", dgate, dup, dy, gate, up, silu, silu_grad);
}

/// `y = gelu_tanh(gate) * up`.
pub fn geglu_forward(y: &mut [f32], gate: &[f32], up: &[f32]) {
    gated("geglu_forward", y, gate, up, gelu);
}

pub fn geglu_backward(dgate: &mut [f32], dup: &mut [f32], dy: &[f32], gate: &[f32], up: &[f32]) {
    gated_backward("geglu_backward", dgate, dup, dy, gate, up, gelu, gelu_grad);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn by_hand() {
        // gelu(0) = 0 and gelu'(0) = 0.5 (1 + tanh 0) = 0.5.
        // gelu(1) = 0.5 (1 + tanh(0.7978845608 * 1.044715)) = 0.5 (1 + tanh 0.8335620) = 0.8411920.
        // gelu(-10) ~ 0 and gelu(10) ~ 10 (tanh saturates).
        let mut y = [0.0; 4];
        gelu_forward(&mut y, &[0.0, 1.0, -10.0, 10.0]);
        assert_close("gelu", &y, &[0.0, 0.841_192, 0.0, 10.0], 1e-6);
        let mut dx = [0.0];
        gelu_backward(&mut dx, &[0.0], &[1.0]);
        assert_close("gelu'(0)", &dx, &[0.5], 0.0);
        // silu(0) = 0, silu(ln 3) = ln 3 * 3/4 = 0.8239592 (sigmoid(ln 3) = 3/(1+3)),
        // silu'(0) = sigmoid(0) = 0.5.
        let mut y = [0.0; 2];
        silu_forward(&mut y, &[0.0, 3f32.ln()]);
        assert_close("silu", &y, &[0.0, 0.75 * 3f64.ln()], 1e-7);
        silu_backward(&mut dx, &[0.0], &[2.0]);
        assert_close("silu'(0) * 2", &dx, &[1.0], 0.0);
        // swiglu(ln 3, 2) = 2 silu(ln 3); geglu(1, -1) = -gelu(1).
        let mut y = [0.0];
        swiglu_forward(&mut y, &[3f32.ln()], &[2.0]);
        assert_close("swiglu", &y, &[1.5 * 3f64.ln()], 1e-6);
        geglu_forward(&mut y, &[1.0], &[-1.0]);
        assert_close("geglu", &y, &[-0.841_192], 1e-6);
        // softcap with cap 2: 2 tanh(0) = 0, 2 tanh(1) = 1.5231883, 2 tanh(-50) = -2 (saturated);
        // softcap'(2) = 1 - tanh^2(1) = 0.4199743, softcap'(0) = 1.
        let mut y = [0.0; 3];
        softcap_forward(&mut y, &[0.0, 2.0, -100.0], 2.0);
        assert_close("softcap", &y, &[0.0, 1.523_188_3, -2.0], 1e-7);
        let mut dx = [0.0; 2];
        softcap_backward(&mut dx, &[2.0, 0.0], &[1.0, 3.0], 2.0);
        assert_close("softcap'", &dx, &[0.419_974_3, 3.0], 1e-7);
        // the same from the outputs 2 tanh(1) and 0
        softcap_backward_from_output(&mut dx, &[1.523_188_3, 0.0], &[1.0, 3.0], 2.0);
        assert_close("softcap' from y", &dx, &[0.419_974_3, 3.0], 1e-6);
    }

    // h = 1e-2 on inputs in [-3, 3]: truncation h^2/6 |f'''| with |f'''| < 2 for gelu and silu
    // (times |up| < 2 for the gated ones) is < 1e-4; one output moves, so f32 rounding adds
    // < 6 * 6e-8 / 2e-2 ~ 2e-5. Hence atol 2e-4 plus 1e-3 relative.
    const H: f32 = 1e-2;
    const ATOL: f64 = 2e-4;
    const RTOL: f64 = 1e-3;

    #[test]
    fn unary_backward_matches_finite_differences() {
        let mut rng = rng(30);
        type Pair = (&'static str, fn(&mut [f32], &[f32]), fn(&mut [f32], &[f32], &[f32]));
        let pairs: [Pair; 3] = [
            ("gelu", gelu_forward, gelu_backward),
            ("silu", silu_forward, silu_backward),
            // cap 1.5: |softcap'''| <= 2 / 1.5^2 < 1, inside the bound below
            ("softcap", |y, x| softcap_forward(y, x, 1.5), |dx, x, dy| softcap_backward(dx, x, dy, 1.5)),
        ];
        for (name, fwd, bwd) in pairs {
            for n in [1, 3, 7, 41] {
                let x = uniform(&mut rng, n, -3.0, 3.0);
                let w = uniform(&mut rng, n, -1.0, 1.0);
                let mut dx = vec![f32::NAN; n];
                bwd(&mut dx, &x, &w);
                check_grad(name, &x, &dx, H, ATOL, RTOL, 64, &mut rng, |x| {
                    let mut y = vec![0.0; n];
                    fwd(&mut y, x);
                    weighted_sum(&w, &y)
                });
            }
        }
    }

    #[test]
    fn gated_backward_matches_finite_differences() {
        let mut rng = rng(31);
        type Fwd = fn(&mut [f32], &[f32], &[f32]);
        type Bwd = fn(&mut [f32], &mut [f32], &[f32], &[f32], &[f32]);
        let pairs: [(&str, Fwd, Bwd); 2] =
            [("swiglu", swiglu_forward, swiglu_backward), ("geglu", geglu_forward, geglu_backward)];
        for (name, fwd, bwd) in pairs {
            for n in [1, 5, 7, 33] {
                let gate = uniform(&mut rng, n, -3.0, 3.0);
                let up = uniform(&mut rng, n, -2.0, 2.0);
                let w = uniform(&mut rng, n, -1.0, 1.0);
                let (mut dg, mut du) = (vec![f32::NAN; n], vec![f32::NAN; n]);
                bwd(&mut dg, &mut du, &w, &gate, &up);
                let loss = |g: &[f32], u: &[f32]| {
                    let mut y = vec![0.0; n];
                    fwd(&mut y, g, u);
                    weighted_sum(&w, &y)
                };
                check_grad(&format!("{name} dgate"), &gate, &dg, H, ATOL, RTOL, 64, &mut rng, |g| {
                    loss(g, &up)
                });
                check_grad(&format!("{name} dup"), &up, &du, H, ATOL, RTOL, 64, &mut rng, |u| loss(&gate, u));
            }
        }
    }
}
