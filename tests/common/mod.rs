//! Shared by the GPU test files: one device per test binary, opened under the mobile profile.
//! Without an adapter the GPU tests fail in CI (`CI` set) and say why they skip elsewhere.

use pockettune::{Gpu, GpuOptions, Profile};
use std::sync::{Arc, OnceLock};

pub fn gpu() -> Option<&'static Arc<Gpu>> {
    static GPU: OnceLock<Option<Arc<Gpu>>> = OnceLock::new();
    GPU.get_or_init(|| {
        let opts = GpuOptions { device: None, profile: Profile::Mobile };
        match Gpu::new(&opts) {
            Ok(g) => {
                eprintln!("GPU tests on {} (mobile limits)", g.summary());
                Some(Arc::new(g))
            }
            Err(e) if std::env::var_os("CI").is_some() => {
                panic!("CI is set and no GPU adapter could be opened: {e}")
            }
            Err(e) => {
                eprintln!("skipping GPU test: {e}");
                None
            }
        }
    })
    .as_ref()
}
