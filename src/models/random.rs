//! A randomly initialised model written to disk as a Hugging Face directory (config.json and
//! model.safetensors), one tensor at a time, so that a model larger than host memory can be
//! made: what the streaming benchmarks (`bench step --memory-budget` with a preset) and tests
//! load back through the memory map. Values as [`super::Model::random`] draws them (normal with
//! std 0.02, norms at their identity, biases 0), each tensor from its own seeded generator.

use super::load::Parsed;
use super::{gemma, gpt2, llama};
use crate::error::{Error, Result};
use safetensors::tensor::View;
use safetensors::Dtype;
use std::borrow::Cow;
use std::path::Path;

/// One tensor whose values are drawn when the writer asks for its bytes.
struct Lazy {
    shape: Vec<usize>,
    seed: u64,
    /// Some(v): every value is v (norms and biases)
    constant: Option<f32>,
}

impl View for &Lazy {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        use rand::SeedableRng;
        use rand_distr::{Distribution, Normal};
        let n: usize = self.shape.iter().product();
        let values: Vec<f32> = match self.constant {
            Some(v) => vec![v; n],
            None => {
                let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed);
                let normal = Normal::new(0.0f32, 0.02).expect("a valid standard deviation");
                (0..n).map(|_| normal.sample(&mut rng)).collect()
            }
        };
        Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        4 * self.shape.iter().product::<usize>()
    }
}

/// Write a random model of `config` into `dir` (created if needed).
pub fn write_random(config: &serde_json::Value, dir: &Path, seed: u64) -> Result<()> {
    let parsed = Parsed::from_json(config.clone())
        .map_err(|detail| Error::InvalidArgument { name: "config".into(), detail })?;
    let (shapes, norm_value) = match &parsed {
        Parsed::Gpt2(c) => (gpt2::Gpt2::param_shapes(c), 1.0),
        Parsed::Llama(c) => (llama::Llama::param_shapes(c), 1.0),
        Parsed::Gemma(c) => (gemma::Gemma::param_shapes(c), 0.0),
    };
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e| Error::Io { path, cause: e }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tensors: Vec<(String, Lazy)> = shapes
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let is_norm = shape.len() == 1 && (name.contains("norm") || name.contains("ln_"));
            let constant = match (is_norm && name.ends_with(".weight"), shape.len()) {
                (true, _) => Some(norm_value),
                (false, 1) => Some(0.0),
                _ => None,
            };
            (name, Lazy { shape, seed: seed.wrapping_mul(1_000_003).wrapping_add(i as u64), constant })
        })
        .collect();
    let file = dir.join("model.safetensors");
    safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (n.as_str(), t)), None, &file).map_err(
        |e| Error::Checkpoint { path: file.clone(), detail: format!("writing random weights: {e}") },
    )?;
    let config_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(config).expect("a JSON value serializes");
    std::fs::write(&config_path, text).map_err(io(&config_path))
}
