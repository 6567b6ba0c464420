//! Rotary position embedding in the rotate-half layout (`shaders/rope.wgsl`), forward and
//! backward, on (B, T, H, D) tensors. Reference: `kernels_ref::rope_*`. The cos/sin table is
//! built on the host in f64 by `kernels_ref::rope_cos_sin` (one source of truth for angles;
//! f32 angles lose accuracy at long positions) and uploaded once per sequence length.

use super::{check_len, u32_of};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, KernelKey, Tensor};

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    t: u32,
    h: u32,
    half: u32,
    sign: f32,
    _pad: [u32; 3],
}

/// cos then sin, each (T, D/2), for positions `0..t` (or the given positions).
pub struct RopeTable {
    table: Tensor,
    t: usize,
    head_dim: usize,
}

impl RopeTable {
    /// The table for positions `0..t`, uploaded once per device and (t, head_dim, theta).
    pub fn for_sequence(
        gpu: &Gpu,
        t: usize,
        head_dim: usize,
        theta: f64,
    ) -> Result<std::sync::Arc<RopeTable>> {
        gpu.constant(&format!("rope table t={t} head_dim={head_dim} theta={theta:e}"), || {
            let positions: Vec<u32> = (0..t as u32).collect();
            RopeTable::new(gpu, &positions, head_dim, theta)
        })
    }

    pub fn new(gpu: &Gpu, positions: &[u32], head_dim: usize, theta: f64) -> Result<RopeTable> {
        if !head_dim.is_multiple_of(2) {
            return Err(Error::shape("rope", format!("head_dim {head_dim} is odd")));
        }
        let half = head_dim / 2;
        let mut cos = vec![0f32; positions.len() * half];
        let mut sin = vec![0f32; positions.len() * half];
        kernels_ref::rope_cos_sin(&mut cos, &mut sin, positions, head_dim, theta);
        cos.extend_from_slice(&sin);
        let table = Tensor::from_host(gpu, &cos, &[2, positions.len(), half], "rope table")?;
        Ok(RopeTable { table, t: positions.len(), head_dim })
    }
}

fn run(gpu: &Gpu, y: &Tensor, x: &Tensor, table: &RopeTable, b: usize, h: usize, sign: f32) -> Result<()> {
    let (t, d) = (table.t, table.head_dim);
    check_len("rope", "x", x.numel(), b * t * h * d)?;
    check_len("rope", "y", y.numel(), x.numel())?;
    let n = b * t * h * d / 2;
    let p = Params {
        n: u32_of(n, "rope")?,
        t: u32_of(t, "rope")?,
        h: u32_of(h, "rope")?,
        half: u32_of(d / 2, "rope")?,
        sign,
        _pad: [0; 3],
    };
    let bufs = [Some(x.single("rope")?), Some(table.table.single("rope")?), Some(y.single("rope")?)];
    gpu.dispatch(&KernelKey::new("rope", "rope"), &bufs, bytemuck::bytes_of(&p), gpu.grid(n, 256))
}

/// `y = rope(x)` for x (B, T, H, D).
pub fn rope_forward(gpu: &Gpu, y: &Tensor, x: &Tensor, table: &RopeTable, b: usize, h: usize) -> Result<()> {
    run(gpu, y, x, table, b, h, 1.0)
}

/// `dx = rope^-1(dy)`: the inverse rotation.
pub fn rope_backward(
    gpu: &Gpu,
    dx: &Tensor,
    dy: &Tensor,
    table: &RopeTable,
    b: usize,
    h: usize,
) -> Result<()> {
    run(gpu, dx, dy, table, b, h, -1.0)
}
