//! Checkpoints, written so that a crash, a full disk or a lost device never destroys one that
//! was already written. Each checkpoint is a directory `OUT/step-NNNNNN/`:
//!
//! - `model.safetensors`, `config.json`, `tokenizer.json`: a Hugging Face model directory (load
//!   it with `--model`, or with transformers); for LoRA runs `adapter_config.json` and
//!   `adapter_model.safetensors` instead of the weights (a PEFT adapter on the base `--model`)
//! - `optimizer.safetensors`: AdamW moments `m.<name>` and `v.<name>`
//! - `state.json`: step, optimizer step, data position, seed
//!
//! Every file is written to a temporary name, fsynced and renamed; `OUT/latest` (the name of
//! the newest complete checkpoint) is replaced the same way, last. A checkpoint is therefore
//! either complete and named by `latest`, or ignored.

use crate::error::{Error, Result};
use crate::graph::ParamStore;
use crate::models::SafetensorsFile;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// optimizer steps taken
    pub step: usize,
    pub adam_step: u32,
    pub epoch: usize,
    /// next batch within the epoch
    pub batch_index: usize,
    pub seed: u64,
    pub tokens_seen: u64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// Write `bytes` to `path` atomically: temporary file, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("file")));
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

pub(crate) fn safetensors_bytes(tensors: &[(String, Vec<usize>, Vec<f32>)], path: &Path) -> Result<Vec<u8>> {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(name, shape, data)| {
            let view = TensorView::new(Dtype::F32, shape.clone(), bytemuck::cast_slice(data))
                .expect("shape and data agree by construction");
            (name.clone(), view)
        })
        .collect();
    safetensors::serialize(views, None)
        .map_err(|e| Error::Checkpoint { path: path.to_path_buf(), detail: format!("serialising: {e}") })
}

/// The directory of the newest complete checkpoint under `out`, if any.
pub fn latest(out: &Path) -> Result<Option<PathBuf>> {
    let marker = out.join("latest");
    match std::fs::read_to_string(&marker) {
        Ok(name) => {
            let dir = out.join(name.trim());
            if !dir.join("state.json").exists() {
                return Err(Error::Checkpoint {
                    path: marker,
                    detail: format!("names {} which is not a complete checkpoint", dir.display()),
                });
            }
            Ok(Some(dir))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Io { path: marker, source: e }),
    }
}

/// Write a checkpoint of `store` and `state` under `out`; returns its directory.
/// `model_dir` provides config.json and tokenizer.json to copy beside the weights.
/// With `lora`, only the adapter is written (PEFT files), not the frozen base weights.
pub fn save(
    out: &Path,
    model_dir: &Path,
    store: &ParamStore,
    state: &TrainState,
    lora: Option<(&crate::models::Model, &crate::lora::LoraOptions)>,
) -> Result<PathBuf> {
    let name = format!("step-{:06}", state.step);
    let dir = out.join(&name);
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let dev = store.device();
    let mut weights = Vec::new();
    let mut moments = Vec::new();
    for (_, p) in store.iter() {
        if lora.is_none() {
            weights.push((p.name.clone(), p.shape.clone(), p.value.to_host(dev)?));
        }
        if let Some((m, v)) = p.moments() {
            moments.push((format!("m.{}", p.name), p.shape.clone(), m.to_host(dev)?));
            moments.push((format!("v.{}", p.name), p.shape.clone(), v.to_host(dev)?));
        }
    }
    match lora {
        Some((model, opts)) => crate::lora::save(&dir, model, store, opts, model_dir)?,
        None => {
            let path = dir.join("model.safetensors");
            write_atomic(&path, &safetensors_bytes(&weights, &path)?)?;
        }
    }
    let path = dir.join("optimizer.safetensors");
    write_atomic(&path, &safetensors_bytes(&moments, &path)?)?;
    for f in ["config.json", "tokenizer.json"] {
        let src = model_dir.join(f);
        if src.exists() {
            let bytes = std::fs::read(&src).map_err(io(&src))?;
            write_atomic(&dir.join(f), &bytes)?;
        }
    }
    let json = serde_json::to_vec_pretty(state).expect("state serialises");
    write_atomic(&dir.join("state.json"), &json)?;
    write_atomic(&out.join("latest"), name.as_bytes())?;
    Ok(dir)
}

/// Restore optimizer moments and the training state from checkpoint `dir` into `store` (whose
/// weights were loaded from the same directory).
pub fn restore(dir: &Path, store: &mut ParamStore) -> Result<TrainState> {
    let path = dir.join("state.json");
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let state: TrainState = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
        path: path.clone(),
        detail: format!("state.json does not parse: {e}"),
    })?;
    let opt = SafetensorsFile::open(&dir.join("optimizer.safetensors"))?;
    let ids: Vec<_> = store
        .iter()
        .filter(|(_, p)| p.trainable)
        .map(|(id, p)| (id, p.name.clone(), p.shape.clone()))
        .collect();
    for (id, name, shape) in ids {
        if state.adam_step == 0 {
            break;
        }
        let m = opt.require(&format!("m.{name}"), &shape)?;
        let v = opt.require(&format!("v.{name}"), &shape)?;
        store.set_moments(id, &m, &v)?;
    }
    store.set_adam_step(state.adam_step);
    Ok(state)
}

/// Delete all but the newest `keep` complete checkpoints under `out` (0 keeps all). The one
/// `latest` names is never deleted.
pub fn prune(out: &Path, keep: usize) -> Result<()> {
    if keep == 0 {
        return Ok(());
    }
    let current = latest(out)?;
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(out)
        .map_err(io(out))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir() && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("step-"))
        })
        .collect();
    dirs.sort();
    let excess = dirs.len().saturating_sub(keep);
    for dir in dirs.into_iter().take(excess) {
        if Some(&dir) != current.as_ref() {
            std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        }
    }
    Ok(())
}
