//! Activations and gated MLP units (`shaders/activation.wgsl`): GELU (tanh approximation),
//! SiLU, soft-capping `c tanh(x / c)`, SwiGLU = silu(gate) * up, GeGLU = gelu(gate) * up,
//! forward and backward, four elements an invocation (`activation_vec4`) where a piece's
//! length is a multiple of 4. Reference: `kernels_ref::{gelu,silu,softcap,swiglu,geglu}_*`.

use super::elementwise::{same_layout, takes_vec4};
use super::{check_len, u32_of};
use crate::error::{Error, Result};
use crate::gpu::Bind;
use crate::gpu::{Gpu, KernelKey, Tensor};

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    flags: u32,
    cap: f32,
    _pad: u32,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Act {
    /// tanh-approximated GELU (GPT-2 `gelu_new`, Gemma `gelu_pytorch_tanh`)
    Gelu,
    Silu,
    /// `c tanh(x / c)` with cap `c > 0` (Gemma's logit soft-capping)
    Softcap(f32),
}

impl Act {
    /// The shader's `ACT` constant and its `cap` parameter.
    fn code(self) -> (u32, f32) {
        match self {
            Act::Gelu => (0, 0.0),
            Act::Silu => (1, 0.0),
            Act::Softcap(c) => (2, c),
        }
    }
}

const WG: usize = 256;

/// A soft cap must be a positive (finite) number: `c tanh(x / c)` is NaN or meaningless else.
pub fn check_cap(c: f32) -> Result<()> {
    if c > 0.0 && c.is_finite() {
        return Ok(());
    }
    Err(Error::InvalidArgument {
        name: "softcap".into(),
        detail: format!("the cap {c} is not a positive number"),
    })
}

/// One dispatch per chunk: `tensors[i]` is bound at `@binding(i + 1)` (`None` leaves it out);
/// the tensors present must share one chunk layout (the logits that soft-capping reads are
/// chunked above the binding limit).
fn run(gpu: &Gpu, entry: &'static str, act: Act, tensors: &[Option<&Tensor>], acc: bool) -> Result<()> {
    let (code, cap) = act.code();
    if let Act::Softcap(c) = act {
        check_cap(c)?;
    }
    let present: Vec<&Tensor> = tensors.iter().flatten().copied().collect();
    for (bufs, n) in same_layout(entry, &present)? {
        let mut chunk = bufs.into_iter();
        let bufs: Vec<Option<Bind<'_>>> = tensors.iter().map(|t| t.and_then(|_| chunk.next())).collect();
        // four elements an invocation where the piece allows (`elementwise::takes_vec4`)
        let (shader, n) = if takes_vec4(n) { ("activation_vec4", n / 4) } else { ("activation", n) };
        let key = KernelKey::new(shader, entry).with("ACT", code);
        let p = Params { n: u32_of(n, "activation")?, flags: acc as u32, cap, _pad: 0 };
        gpu.dispatch(&key, &bufs, bytemuck::bytes_of(&p), gpu.grid(n, WG))?;
    }
    Ok(())
}

/// `y = act(x)`
pub fn act_forward(gpu: &Gpu, y: &Tensor, x: &Tensor, act: Act) -> Result<()> {
    check_len("act_forward", "y", y.numel(), x.numel())?;
    run(gpu, "act_forward", act, &[Some(x), None, Some(y)], false)
}

/// `dx (+)= act'(x) * dy`
pub fn act_backward(
    gpu: &Gpu,
    dx: &Tensor,
    x: &Tensor,
    dy: &Tensor,
    act: Act,
    accumulate: bool,
) -> Result<()> {
    check_len("act_backward", "dx", dx.numel(), x.numel())?;
    check_len("act_backward", "dy", dy.numel(), x.numel())?;
    run(gpu, "act_backward", act, &[Some(x), Some(dy), Some(dx)], accumulate)
}

/// `dx (+)= dy (1 - (y / cap)^2)` from the output `y = cap tanh(x / cap)` of soft-capping.
pub fn softcap_backward_from_output(
    gpu: &Gpu,
    dx: &Tensor,
    y: &Tensor,
    dy: &Tensor,
    cap: f32,
    accumulate: bool,
) -> Result<()> {
    check_len("softcap_backward_from_output", "dx", dx.numel(), y.numel())?;
    check_len("softcap_backward_from_output", "dy", dy.numel(), y.numel())?;
    let entry = "softcap_backward_from_output";
    run(gpu, entry, Act::Softcap(cap), &[Some(y), Some(dy), Some(dx)], accumulate)
}

/// `y = act(y)` in place.
pub fn act_inplace(gpu: &Gpu, y: &Tensor, act: Act) -> Result<()> {
    run(gpu, "act_inplace", act, &[None, None, Some(y)], false)
}

/// `d = d * act'(x)` in place: the gradient `d` with respect to `act(x)` becomes the gradient
/// with respect to `x`.
pub fn act_grad_mul(gpu: &Gpu, d: &Tensor, x: &Tensor, act: Act) -> Result<()> {
    check_len("act_grad_mul", "d", d.numel(), x.numel())?;
    run(gpu, "act_grad_mul", act, &[Some(x), None, Some(d)], false)
}

/// `y = act(gate) * up` (SwiGLU with `Act::Silu`, GeGLU with `Act::Gelu`)
pub fn glu_forward(gpu: &Gpu, y: &Tensor, gate: &Tensor, up: &Tensor, act: Act) -> Result<()> {
    check_len("glu_forward", "up", up.numel(), gate.numel())?;
    check_len("glu_forward", "y", y.numel(), gate.numel())?;
    run(gpu, "glu_forward", act, &[Some(gate), Some(up), Some(y)], false)
}

/// `dgate (+)= dy * up * act'(gate)`, `dup (+)= dy * act(gate)`, each optional.
pub fn glu_backward(
    gpu: &Gpu,
    dgate: Option<&Tensor>,
    dup: Option<&Tensor>,
    dy: &Tensor,
    gate: &Tensor,
    up: &Tensor,
    act: Act,
    accumulate: bool,
) -> Result<()> {
    let n = gate.numel();
    check_len("glu_backward", "dy", dy.numel(), n)?;
    check_len("glu_backward", "up", up.numel(), n)?;
    if let Some(dgate) = dgate {
        check_len("glu_backward", "dgate", dgate.numel(), n)?;
        run(gpu, "glu_backward_gate", act, &[Some(gate), Some(up), Some(dgate), Some(dy)], accumulate)?;
    }
    if let Some(dup) = dup {
        check_len("glu_backward", "dup", dup.numel(), n)?;
        run(gpu, "glu_backward_up", act, &[Some(gate), Some(dy), Some(dup)], accumulate)?;
    }
    Ok(())
}
