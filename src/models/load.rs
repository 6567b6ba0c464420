//! Loading a model from any weight source (a Hugging Face directory with one or several
//! safetensors files, or a GGUF file): the config from `config.json` or the GGUF metadata, then
//! every tensor the family names, checked against the shape the config implies, and stored as
//! the run needs it: f32 and trainable for full fine-tuning, or frozen and (on the GPU) packed in
//! its stored format for LoRA, `eval` and `generate` (`--base-dtype`).

use super::{gemma, gguf, gpt2, llama, Model};
use crate::error::{Error, Result};
use crate::graph::stream::{DeviceForm, StreamedWeight};
use crate::graph::{Device, ParamStore};
use crate::weights::{self, BaseDtype, GgufFile, Safetensors, Source, Stored};
use kernels_ref::quant::GgmlType;
use std::path::Path;
use std::sync::Arc;

/// How a model's weights are loaded.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadOptions {
    /// Frozen base (LoRA, eval, generate): no weight is trainable, and matrices may stay packed.
    pub frozen: bool,
    /// Storage of frozen matrices on the GPU (f32 whenever weights are trained).
    pub base_dtype: BaseDtype,
    /// Leave frozen matrices in the memory-mapped checkpoint, and keep trained weights in host
    /// memory, to be uploaded by the executor just before the layer that reads them
    /// (`--memory-budget`; GPU only).
    pub stream: bool,
}

/// A family's parsed config.
pub(super) enum Parsed {
    Gpt2(gpt2::Gpt2Config),
    Llama(llama::LlamaConfig),
    Gemma(gemma::GemmaConfig),
}

impl Parsed {
    /// Parse and check a `config.json` document; errors are the detail text.
    pub(super) fn from_json(config: serde_json::Value) -> std::result::Result<Parsed, String> {
        fn parse<T: serde::de::DeserializeOwned>(
            config: serde_json::Value,
        ) -> std::result::Result<T, String> {
            serde_json::from_value(config).map_err(|e| format!("config does not parse: {e}"))
        }
        let kind = config["model_type"].as_str().unwrap_or_default().to_string();
        let parsed = match super::Family::of(&kind) {
            Some(super::Family::Gpt2) => Parsed::Gpt2(parse(config)?),
            Some(super::Family::Llama) => Parsed::Llama(parse(config)?),
            Some(super::Family::Gemma) => Parsed::Gemma(parse(config)?),
            None => {
                return Err(format!(
                    "unsupported architecture (model_type {kind:?}, architectures {}); supported: {}",
                    config["architectures"],
                    super::SUPPORTED
                ))
            }
        };
        match &parsed {
            Parsed::Gpt2(c) => c.check(),
            Parsed::Llama(c) => c.check(),
            Parsed::Gemma(c) => c.check(),
        }?;
        Ok(parsed)
    }

    pub(super) fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        match self {
            Parsed::Gpt2(c) => gpt2::Gpt2::param_shapes(c),
            Parsed::Llama(c) => llama::Llama::param_shapes(c),
            Parsed::Gemma(c) => gemma::Gemma::param_shapes(c),
        }
    }

    pub(super) fn build(self, store: &ParamStore) -> Result<Model> {
        Ok(match self {
            Parsed::Gpt2(c) => Model::Gpt2(gpt2::Gpt2::from_store(c, store)?),
            Parsed::Llama(c) => Model::Llama(llama::Llama::from_store(c, store)?),
            Parsed::Gemma(c) => Model::Gemma(gemma::Gemma::from_store(c, store)?),
        })
    }
}

/// The config document of a model path: `config.json` of a directory, or built from a GGUF
/// file's metadata. Also returns the opened source.
pub fn open_source(path: &Path) -> Result<(serde_json::Value, Source)> {
    if weights::is_gguf(path) {
        let file = GgufFile::open(path)?;
        let config = gguf::config(&file)?;
        return Ok((config, Source::Gguf(file)));
    }
    if !path.is_dir() {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            detail: "not a model: give a Hugging Face model directory (config.json, *.safetensors) or a .gguf file"
                .into(),
        });
    }
    let config: serde_json::Value = super::read_config(path)?;
    // a config that describes no model is reported before the weights are opened
    Parsed::from_json(config.clone()).map_err(|detail| super::config_error(path, detail))?;
    Ok((config, Source::Safetensors(Safetensors::open_dir(path)?)))
}

impl Model {
    /// Load a model directory or GGUF file with every weight f32 and trainable.
    pub fn load(path: &Path, dev: &Device) -> Result<(Model, ParamStore)> {
        Self::load_with(path, dev, &LoadOptions::default())
    }

    /// Load a model directory or GGUF file as `opts` says.
    pub fn load_with(path: &Path, dev: &Device, opts: &LoadOptions) -> Result<(Model, ParamStore)> {
        let (config, source) = open_source(path)?;
        let parsed = Parsed::from_json(config.clone()).map_err(|detail| match &source {
            Source::Gguf(_) => Error::Checkpoint {
                path: path.to_path_buf(),
                detail: format!("{detail} (the model config built from the GGUF metadata)"),
            },
            Source::Safetensors(_) => super::config_error(path, detail),
        })?;
        if let (Parsed::Gemma(c), Source::Safetensors(_)) = (&parsed, &source) {
            c.note_ignored_softcap(path);
        }
        let gpt2_prefix = match &source {
            Source::Safetensors(s) => {
                matches!(parsed, Parsed::Gpt2(_)) && s.names().any(|n| n.starts_with("transformer."))
            }
            Source::Gguf(_) => false,
        };
        let mut store = ParamStore::new(dev.clone());
        let source = Arc::new(source);
        let config = Arc::new(config);
        for (name, shape) in parsed.param_shapes() {
            let stored = stored_tensor(&source, &config, &name, gpt2_prefix)?;
            let Some(stored) = stored else {
                return Err(Error::Checkpoint {
                    path: source.path(),
                    detail: format!("tensor {name} is missing (the checkpoint does not match its config)"),
                });
            };
            if stored.shape != shape {
                return Err(Error::Checkpoint {
                    path: source.path(),
                    detail: format!(
                        "tensor {name} has shape {:?}, the config implies {shape:?}",
                        stored.shape
                    ),
                });
            }
            let packable = opts.frozen && shape.len() == 2 && !matches!(parsed, Parsed::Gpt2(_));
            let ty = storage(&stored, packable, opts.base_dtype);
            if opts.stream && opts.frozen && shape.len() == 2 && matches!(dev, Device::Gpu(_)) {
                let (source, config, n) = (source.clone(), config.clone(), name.clone());
                let base = opts.base_dtype;
                let fetch = move |visit: crate::graph::stream::Visit| {
                    let stored = stored_tensor(&source, &config, &n, gpt2_prefix)?
                        .expect("a tensor found at load is found again");
                    let value =
                        visit(&stored, storage(&stored, packable, base), &|b| source.release_pages(b));
                    source.release_pages(&stored.bytes);
                    value
                };
                let w = StreamedWeight::new(&name, &shape, ty.unwrap_or(GgmlType::F32), fetch);
                store.add_streamed(w)?;
                continue;
            }
            match device_form(&stored, ty) {
                // full fine-tuning under a budget: trained weights live on the host
                DeviceForm::F32(values) if opts.stream && !opts.frozen => {
                    store.add_host(&name, &shape, values)?;
                }
                DeviceForm::F32(values) => {
                    store.add(&name, &shape, &values, !opts.frozen)?;
                }
                DeviceForm::Packed(ty, bytes) => {
                    store.add_packed(&name, &shape, ty, &bytes)?;
                }
            }
        }
        Ok((parsed.build(&store)?, store))
    }
}

/// Tensor `name` (as Hugging Face names it) of a source, converted to that layout.
fn stored_tensor<'s>(
    source: &'s Source,
    config: &serde_json::Value,
    name: &str,
    gpt2_prefix: bool,
) -> Result<Option<Stored<'s>>> {
    match source {
        Source::Safetensors(s) => {
            s.get(&if gpt2_prefix { format!("transformer.{name}") } else { name.to_string() })
        }
        Source::Gguf(g) => gguf::tensor(g, config, name),
    }
}

/// A stored tensor as the device keeps it: f32, or packed as `ty` (converting to f16 where
/// asked; other packed types are the file's own).
pub fn device_form(stored: &Stored, ty: Option<GgmlType>) -> DeviceForm {
    match ty {
        Some(GgmlType::F32) | None => DeviceForm::F32(stored.to_f32()),
        Some(ty) if ty == stored.ty => DeviceForm::Packed(ty, stored.bytes.to_vec()),
        Some(ty) => {
            let values = stored.to_f32();
            let bytes: Vec<u8> = match ty {
                GgmlType::F16 => values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
                _ => unreachable!("storage() converts only to f16"),
            };
            DeviceForm::Packed(ty, bytes)
        }
    }
}

/// The device storage of a weight stored as `stored.ty`: None for f32; packed types only for
/// frozen matrices (`packable`).
fn storage(stored: &Stored, packable: bool, base: BaseDtype) -> Option<GgmlType> {
    if !packable {
        return None;
    }
    match (base, stored.ty) {
        (BaseDtype::F32, _) | (BaseDtype::Native, GgmlType::F32) => None,
        (BaseDtype::Native, ty) => Some(ty),
        (BaseDtype::F16, GgmlType::BF16) => Some(GgmlType::BF16),
        (BaseDtype::F16, _) => Some(GgmlType::F16),
    }
}
