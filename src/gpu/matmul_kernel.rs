//! Which matrix-product kernel a device runs ([`MatmulKernel`]), the tile configurations of the
//! workgroup-memory kernel ([`StagedTile`]), and their names as `POCKETTUNE_MATMUL`, `--matmul`
//! and the autotune cache write them (`kernels::matmul_tune` picks one per device).

use crate::error::{Error, Result};

/// The matrix-product kernel in use (see `kernels::matmul`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MatmulKernel {
    /// 4x4 register tile per invocation, no workgroup memory; needs no optional feature.
    Tiled,
    /// Loads of A shared across subgroups of at least 8 lanes by broadcast.
    Subgroup,
    /// The subgroup kernel with A packed into 16 KiB uniform windows first and read from
    /// there, and B, where it is stored row by row, packed into an RGBA32F texture and read a
    /// texel (4 columns) a step (`kernels::matmul`): for drivers where uniform and texel loads
    /// are far cheaper than storage loads (lavapipe).
    SubgroupUniform,
    /// Tiles of A and B staged in workgroup memory, register blocks per invocation
    /// (`shaders/matmul_staged.wgsl`); for GPUs where workgroup memory and barriers are cheap.
    Staged(StagedTile),
}

/// The arithmetic of the forward matrix products (`--precision`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 throughout.
    #[default]
    F32,
    /// The forward products of linear layers (activations times weights, LoRA's included) take
    /// each product in f16 and sum in f32 (`shaders/matmul_mixed.wgsl`, or f16 tiles in a staged
    /// tile, `matmul_staged_mixed`); backward products,
    /// gradients and the optimizer stay f32, so no loss scaling is needed. Needs the adapter's
    /// `shader_f16`.
    Mixed,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Mixed => "mixed",
        })
    }
}

/// Environment variable that forces a matmul kernel (a name from [`MatmulKernel::name`]).
pub const MATMUL_ENV: &str = "POCKETTUNE_MATMUL";

/// One configuration of the staged kernel (its override constants): a workgroup of
/// `wg_m x wg_n` invocations, each computing `tm x tn` elements of C, walks K in steps of `bk`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StagedTile {
    pub wg_m: u32,
    pub wg_n: u32,
    pub tm: u32,
    pub tn: u32,
    pub bk: u32,
}

/// The staged configurations a device is offered (those within its limits). Chosen for the
/// shapes GPUs run well: 128 x 128 blocks with 8 x 8 per invocation (the most arithmetic per
/// workgroup-memory read, for large products), 64 x 64 with 4 x 4 (more workgroups for
/// medium products) and 64 x 64 with 8 x 8 on 64 invocations (GPUs that prefer small groups).
/// Each uses 8 KiB of workgroup memory, half the phone limit.
pub const STAGED_TILES: &[StagedTile] = &[
    StagedTile { wg_m: 16, wg_n: 16, tm: 8, tn: 8, bk: 8 },
    StagedTile { wg_m: 16, wg_n: 16, tm: 4, tn: 4, bk: 16 },
    StagedTile { wg_m: 8, wg_n: 8, tm: 8, tn: 8, bk: 16 },
];

impl StagedTile {
    /// Rows of C one workgroup computes.
    pub fn bm(&self) -> u32 {
        self.wg_m * self.tm
    }
    /// Columns of C one workgroup computes.
    pub fn bn(&self) -> u32 {
        self.wg_n * self.tn
    }
    pub fn invocations(&self) -> u32 {
        self.wg_m * self.wg_n
    }
    /// Workgroup memory of the two slices, in bytes.
    pub fn workgroup_bytes(&self) -> u32 {
        (self.bm() + self.bn()) * self.bk * 4
    }
    /// vec4s of the A and B slices each invocation copies per K step (the shader's load loops).
    pub fn loads_per_step(&self) -> (u32, u32) {
        let per = |rows: u32| (rows * self.bk / 4).div_ceil(self.invocations());
        (per(self.bm()), per(self.bn()))
    }

    /// Refuse a configuration the shader cannot run or the device's `limits` do not allow.
    pub fn check(&self, limits: &wgpu::Limits) -> Result<()> {
        let problem = if ![4, 8].contains(&self.tm) || ![4, 8].contains(&self.tn) {
            Some("register blocks are 4 or 8 rows and columns".to_string())
        } else if self.bk == 0 || !self.bk.is_multiple_of(4) {
            Some("the K step must be a positive multiple of 4".to_string())
        } else if self.wg_m == 0
            || self.wg_n == 0
            || self.invocations() > limits.max_compute_invocations_per_workgroup
            || self.wg_n > limits.max_compute_workgroup_size_x
            || self.wg_m > limits.max_compute_workgroup_size_y
        {
            Some(format!(
                "{} x {} invocations exceed the device's workgroup limits ({} in all)",
                self.wg_m, self.wg_n, limits.max_compute_invocations_per_workgroup
            ))
        } else if self.workgroup_bytes() > limits.max_compute_workgroup_storage_size {
            Some(format!(
                "{} bytes of workgroup memory exceed the device's {}",
                self.workgroup_bytes(),
                limits.max_compute_workgroup_storage_size
            ))
        } else {
            None
        };
        match problem {
            None => Ok(()),
            Some(detail) => Err(Error::InvalidArgument {
                name: format!("matmul tile {}", MatmulKernel::Staged(*self).name()),
                detail,
            }),
        }
    }
}

impl MatmulKernel {
    /// The name users write: `tiled`, `subgroup`, `subgroup-uniform`, or
    /// `staged-BMxBNxBK-TMxTN` (`staged-128x128x8-8x8`).
    pub fn name(&self) -> String {
        match self {
            MatmulKernel::Tiled => "tiled".into(),
            MatmulKernel::Subgroup => "subgroup".into(),
            MatmulKernel::SubgroupUniform => "subgroup-uniform".into(),
            MatmulKernel::Staged(t) => format!("staged-{}x{}x{}-{}x{}", t.bm(), t.bn(), t.bk, t.tm, t.tn),
        }
    }

    /// Parse [`Self::name`]'s form; `staged` alone is the first of [`STAGED_TILES`]. A staged
    /// tile outside the list is accepted if `check` passes it (tuning by hand).
    pub fn parse(text: &str) -> Result<MatmulKernel> {
        let bad = |detail: String| Error::InvalidArgument { name: MATMUL_ENV.into(), detail };
        match text {
            "tiled" => return Ok(MatmulKernel::Tiled),
            "subgroup" => return Ok(MatmulKernel::Subgroup),
            "subgroup-uniform" => return Ok(MatmulKernel::SubgroupUniform),
            "staged" => return Ok(MatmulKernel::Staged(STAGED_TILES[0])),
            _ => {}
        }
        let form =
            "expected tiled, subgroup, subgroup-uniform, staged or staged-BMxBNxBK-TMxTN (e.g. staged-128x128x8-8x8)";
        let rest = text.strip_prefix("staged-").ok_or_else(|| bad(format!("{text:?}: {form}")))?;
        let (block, regs) = rest.split_once('-').ok_or_else(|| bad(format!("{text:?}: {form}")))?;
        let nums = |s: &str| -> Option<Vec<u32>> { s.split('x').map(|v| v.parse().ok()).collect() };
        let (Some(block), Some(regs)) = (nums(block), nums(regs)) else {
            return Err(bad(format!("{text:?}: {form}")));
        };
        let (&[bm, bn, bk], &[tm, tn]) = (&block[..], &regs[..]) else {
            return Err(bad(format!("{text:?}: {form}")));
        };
        if tm == 0 || tn == 0 || bm % tm != 0 || bn % tn != 0 {
            return Err(bad(format!("{text:?}: BM and BN must be multiples of TM and TN")));
        }
        Ok(MatmulKernel::Staged(StagedTile { wg_m: bm / tm, wg_n: bn / tn, tm, tn, bk }))
    }

    /// The kernels a device offers: `tiled`, `subgroup` and `subgroup-uniform` where subgroups
    /// of at least 8 lanes exist (they broadcast from lanes 0..8; the second also needs 9
    /// uniform bindings of 16 KiB and a sampled texture 2,048 texels wide), and every staged
    /// tile within `limits`.
    pub fn available(subgroups_of_8: bool, limits: &wgpu::Limits) -> Vec<MatmulKernel> {
        let mut kernels = vec![MatmulKernel::Tiled];
        if subgroups_of_8 {
            kernels.push(MatmulKernel::Subgroup);
            if limits.max_uniform_buffers_per_shader_stage >= 9
                && limits.max_uniform_buffer_binding_size >= 16384
                && limits.max_sampled_textures_per_shader_stage >= 1
                && limits.max_texture_dimension_2d >= 2048
            {
                kernels.push(MatmulKernel::SubgroupUniform);
            }
        }
        kernels.extend(
            STAGED_TILES.iter().filter(|t| t.check(limits).is_ok()).map(|&t| MatmulKernel::Staged(t)),
        );
        kernels
    }

    /// One kernel per shader, the first staged tile standing for the others and `subgroup` for
    /// `subgroup-uniform` (which runs only the plain products, batches excluded): enough for
    /// the checks of kernels built on matrix products (attention, the quantized products'
    /// scratch path), since a tile configuration changes only the product, which the matmul
    /// checks run with every kernel. Keeps those checks' time from growing with the list.
    pub fn one_per_shader(kernels: &[MatmulKernel]) -> Vec<MatmulKernel> {
        Self::distinct(kernels.iter().copied())
    }

    /// The kernel whose mixed-precision form this one runs under `--precision mixed`: a staged
    /// tile its own (f16 tiles, `matmul_staged_mixed`); the register-tile kernels, tiled and
    /// subgroup, share `matmul_mixed.wgsl`, which the tiled kernel stands for.
    pub fn mixed_form(self) -> MatmulKernel {
        match self {
            MatmulKernel::Staged(_) => self,
            _ => MatmulKernel::Tiled,
        }
    }

    /// [`Self::one_per_shader`] for the mixed-precision shaders: the register tile's and the
    /// first staged tile's.
    pub fn one_per_mixed_shader(kernels: &[MatmulKernel]) -> Vec<MatmulKernel> {
        Self::distinct(kernels.iter().map(|k| k.mixed_form()))
    }

    /// The first kernel of each shader among `kernels`, in order.
    fn distinct(kernels: impl Iterator<Item = MatmulKernel>) -> Vec<MatmulKernel> {
        let shader = |k: &MatmulKernel| match k {
            MatmulKernel::SubgroupUniform => std::mem::discriminant(&MatmulKernel::Subgroup),
            k => std::mem::discriminant(k),
        };
        let mut out: Vec<MatmulKernel> = Vec::new();
        for k in kernels {
            if !out.iter().any(|o| shader(o) == shader(&k)) {
                out.push(k);
            }
        }
        out
    }

    /// The kernel used when nothing forces one and no autotune ran: the subgroup kernel where
    /// it exists (the fastest on lavapipe, docs/perf.md), else the tiled one.
    pub fn default_of(available: &[MatmulKernel]) -> MatmulKernel {
        if available.contains(&MatmulKernel::Subgroup) {
            MatmulKernel::Subgroup
        } else {
            MatmulKernel::Tiled
        }
    }

    /// `POCKETTUNE_MATMUL`'s kernel, if set: one of `available`, or a staged tile that fits
    /// `limits`.
    pub fn from_env(available: &[MatmulKernel], limits: &wgpu::Limits) -> Result<Option<MatmulKernel>> {
        let Ok(text) = std::env::var(MATMUL_ENV) else { return Ok(None) };
        let kernel = Self::parse(text.trim())?;
        Self::check_on(kernel, available, limits)?;
        Ok(Some(kernel))
    }

    /// Whether a device with these kernels and limits can run `kernel`.
    pub fn check_on(kernel: MatmulKernel, available: &[MatmulKernel], limits: &wgpu::Limits) -> Result<()> {
        match kernel {
            MatmulKernel::Staged(t) => t.check(limits),
            k if available.contains(&k) => Ok(()),
            k => Err(Error::InvalidArgument {
                name: MATMUL_ENV.into(),
                detail: format!(
                    "{} needs subgroups of at least 8 lanes, which this device lacks; it offers {}",
                    k.name(),
                    available.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
                ),
            }),
        }
    }
}

impl serde::Serialize for MatmulKernel {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back() {
        let limits = wgpu::Limits::downlevel_defaults();
        for k in MatmulKernel::available(true, &limits) {
            assert_eq!(MatmulKernel::parse(&k.name()).unwrap(), k, "{}", k.name());
        }
        assert_eq!(MatmulKernel::parse("staged").unwrap(), MatmulKernel::Staged(STAGED_TILES[0]));
        for bad in ["", "fast", "staged-", "staged-64x64-4x4", "staged-64x64x16-4", "staged-65x64x16-4x4"] {
            assert!(MatmulKernel::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn every_listed_tile_fits_the_phone_limits() {
        let limits = wgpu::Limits::downlevel_defaults();
        assert_eq!(MatmulKernel::available(false, &limits).len(), 1 + STAGED_TILES.len());
        assert_eq!(MatmulKernel::available(true, &limits).len(), 3 + STAGED_TILES.len());
        for t in STAGED_TILES {
            t.check(&limits).unwrap();
        }
        // 64 x 64 x 32 would need 16,384 bytes, 32 over the phone limit
        let too_big = StagedTile { wg_m: 16, wg_n: 16, tm: 4, tn: 4, bk: 32 };
        assert!(too_big.check(&limits).is_err());
        let too_many = StagedTile { wg_m: 32, wg_n: 16, tm: 4, tn: 4, bk: 4 };
        assert!(too_many.check(&limits).is_err());
    }
}
