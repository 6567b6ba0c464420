//! Checkpoints, written so that a crash, a kill, a full disk or a lost device never destroys one
//! that was already written. Each checkpoint is a directory `OUT/step-NNNNNN/`:
//!
//! - `model.safetensors`, `config.json`, `tokenizer.json`: a Hugging Face model directory (load
//!   it with `--model`, or with transformers); for LoRA runs `adapter_config.json` and
//!   `adapter_model.safetensors` instead of the weights (a PEFT adapter on the base `--model`)
//! - `optimizer.safetensors`: AdamW moments `m.<name>` and `v.<name>`
//! - `state.json`: step, optimizer step, data position, seed, steps skipped
//!
//! Every file is written and fsynced into a temporary directory `OUT/.step-NNNNNN.tmp/`, which is
//! then renamed to `step-NNNNNN`; `OUT/latest` (the name of the newest complete checkpoint) is
//! replaced the same way, last. A `step-NNNNNN` directory is therefore always complete, and
//! `latest` always names one; what an interrupted write leaves behind is a `.tmp` directory, which
//! the next save clears (`tests/kill_resume.rs` kills training runs at random moments, inside
//! checkpoint writes too, and checks this).
//!
//! A checkpoint is never written from a state with a non-finite weight or moment: `save` refuses
//! with [`Error::NonFinite`], so the last good checkpoint stays the one `latest` names.
//!
//! Test hook: `POCKETTUNE_TEST_SLOW_CHECKPOINT_MS=N` sleeps N ms after each file of a checkpoint,
//! so that a test can kill the process while a checkpoint is half written.

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
    /// optimizer steps skipped for a non-finite loss or gradient norm (`--on-nan skip`)
    #[serde(default)]
    pub skipped_nan: usize,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |cause| Error::Io { path: path.to_path_buf(), cause }
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
        Err(e) => Err(Error::Io { path: marker, cause: e }),
    }
}

/// The directory name of the checkpoint after `step` optimizer steps.
pub fn dir_name(step: usize) -> String {
    format!("step-{step:06}")
}

/// Write a checkpoint of `store` and `state` under `out`; returns its directory.
/// `model_dir` provides config.json and tokenizer.json to copy beside the weights.
/// With `lora`, only the adapter is written (PEFT files), not the frozen base weights.
/// Refuses (writing nothing) when a trained weight or a moment is not finite.
pub fn save(
    out: &Path,
    model_dir: &Path,
    store: &ParamStore,
    state: &TrainState,
    lora: Option<(&crate::models::Model, &crate::lora::LoraOptions)>,
) -> Result<PathBuf> {
    let name = dir_name(state.step);
    let dir = out.join(&name);
    let dev = store.device();
    let mut weights = Vec::new();
    let mut moments = Vec::new();
    for (id, p) in store.iter() {
        if lora.is_none() || p.trainable {
            let w = p.value.to_host(dev)?;
            check_finite(state, &format!("weight {}", p.name), &w)?;
            if lora.is_none() {
                weights.push((p.name.clone(), p.shape.clone(), w));
            }
        }
        // on the GPU or offloaded (`--optimizer-offload`), the same tensors in the file
        if let Some((m, v)) = store.moments_to_host(id)? {
            check_finite(state, &format!("AdamW moment of {}", p.name), &m)?;
            check_finite(state, &format!("AdamW moment of {}", p.name), &v)?;
            moments.push((format!("m.{}", p.name), p.shape.clone(), m));
            moments.push((format!("v.{}", p.name), p.shape.clone(), v));
        }
    }

    // Debris of an interrupted write of this step is cleared first.
    let tmp = out.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let pause = test_pause();
    match lora {
        Some((model, opts)) => crate::lora::save(&tmp, model, store, opts, model_dir)?,
        None => {
            let path = tmp.join("model.safetensors");
            write_synced(&path, &safetensors_bytes(&weights, &path)?)?;
        }
    }
    pause();
    drop(weights);
    let path = tmp.join("optimizer.safetensors");
    write_synced(&path, &safetensors_bytes(&moments, &path)?)?;
    pause();
    for f in ["config.json", "tokenizer.json"] {
        let src = model_dir.join(f);
        if src.exists() {
            let bytes = std::fs::read(&src).map_err(io(&src))?;
            write_synced(&tmp.join(f), &bytes)?;
            pause();
        }
    }
    let json = serde_json::to_vec_pretty(state).expect("state serialises");
    write_synced(&tmp.join("state.json"), &json)?;
    sync_dir(&tmp);
    pause();
    // An older checkpoint of the same step (from a run resumed before it) is replaced; `latest`
    // never names it here, since a run saves only steps after the one it resumed from.
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
    sync_dir(out);
    pause();
    write_atomic(&out.join("latest"), name.as_bytes())?;
    Ok(dir)
}

fn check_finite(state: &TrainState, what: &str, values: &[f32]) -> Result<()> {
    match values.iter().find(|x| !x.is_finite()) {
        None => Ok(()),
        Some(&value) => Err(Error::NonFinite {
            step: state.step,
            what: what.to_string(),
            value,
            detail: "so no checkpoint was written from this state".into(),
        }),
    }
}

/// Create `path` with `bytes` and fsync it (inside a temporary directory renamed as a whole).
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn sync_dir(dir: &Path) {
    // Not every platform can open a directory to fsync it; the rename is still atomic there.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The `POCKETTUNE_TEST_SLOW_CHECKPOINT_MS` pause between the files of a checkpoint.
fn test_pause() -> impl Fn() {
    let ms = std::env::var("POCKETTUNE_TEST_SLOW_CHECKPOINT_MS").ok().and_then(|v| v.parse::<u64>().ok());
    move || {
        if let Some(ms) = ms {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
    }
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

/// `step-NNNNNN`, as [`dir_name`] writes it (a directory the user named `step-notes` is not one).
fn is_step_name(name: &str) -> bool {
    name.strip_prefix("step-").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Delete all but the newest `keep` complete checkpoints under `out` (0 keeps all), and what
/// interrupted writes or deletions left behind (`.step-NNNNNN.tmp` and `.step-NNNNNN.old`
/// directories, a `step-NNNNNN` without its `state.json`). The one `latest` names is never
/// deleted. A checkpoint is renamed to `.step-NNNNNN.old` before its files go, so that a kill
/// in the middle leaves debris this clears next time, never a half-deleted `step-NNNNNN`.
pub fn prune(out: &Path, keep: usize) -> Result<()> {
    let current = latest(out)?;
    let mut complete = Vec::new();
    for entry in std::fs::read_dir(out).map_err(io(out))? {
        let path = entry.map_err(io(out))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        if !path.is_dir() {
            continue;
        }
        let debris = name.starts_with(".step-") && (name.ends_with(".tmp") || name.ends_with(".old"));
        if name.starts_with("step-") && path.join("state.json").exists() {
            complete.push(path);
        } else if debris || (is_step_name(name) && Some(&path) != current.as_ref()) {
            std::fs::remove_dir_all(&path).map_err(io(&path))?;
        }
    }
    if keep == 0 {
        return Ok(());
    }
    complete.sort();
    let excess = complete.len().saturating_sub(keep);
    for dir in complete.into_iter().take(excess) {
        if Some(&dir) != current.as_ref() {
            let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let doomed = out.join(format!(".{name}.old"));
            std::fs::rename(&dir, &doomed).map_err(io(&dir))?;
            std::fs::remove_dir_all(&doomed).map_err(io(&doomed))?;
        }
    }
    Ok(())
}
