//! LoRA (low-rank adapters) as PEFT defines them: on each targeted projection `y = x W + b`
//! becomes `y + (alpha / r) * dropout(x) A^T B^T`, A (r, in) Kaiming-uniform (bound
//! 1/sqrt(in)), B (out, r) zeros, the base weights frozen (no gradient, no optimizer state;
//! activation gradients still flow through them). Adapters are read and written in PEFT's
//! layout: `adapter_config.json` and `adapter_model.safetensors` with tensors named
//! `base_model.model.<module>.lora_A.weight` / `lora_B.weight`.

use crate::checkpoint::write_atomic;
use crate::error::{Error, Result};
use crate::graph::ParamStore;
use crate::models::{Model, SafetensorsFile};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LoraOptions {
    pub rank: usize,
    pub alpha: f32,
    pub dropout: f32,
    /// module names as Hugging Face uses them (`c_attn`, `q_proj`, ...)
    pub targets: Vec<String>,
}

/// Every projection of the family (attention and MLP), the default targets.
pub fn default_targets(model: &Model) -> Vec<String> {
    let names: &[&str] = match model {
        Model::Gpt2(_) => &["c_attn", "c_proj", "c_fc"],
        Model::Llama(_) | Model::Gemma(_) => {
            &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        }
    };
    names.iter().map(|s| s.to_string()).collect()
}

/// (fan_in, fan_out) of a weight: GPT-2's Conv1D stores (in, out), Linear (out, in).
fn fans(model: &Model, shape: &[usize]) -> (usize, usize) {
    match model {
        Model::Gpt2(_) => (shape[0], shape[1]),
        _ => (shape[1], shape[0]),
    }
}

/// The Hugging Face module path of a stored weight name.
fn module_of(model: &Model, name: &str) -> String {
    let base = name.trim_end_matches(".weight");
    match model {
        Model::Gpt2(_) => format!("transformer.{base}"),
        _ => base.to_string(),
    }
}

fn is_target(name: &str, targets: &[String]) -> bool {
    targets.iter().any(|t| name.ends_with(&format!(".{t}.weight")))
}

fn freeze_all(store: &mut ParamStore) {
    let ids: Vec<_> = store.iter().map(|(id, _)| id).collect();
    for id in ids {
        store.freeze(id);
    }
}

/// Freeze the model and put fresh adapters on every targeted projection; returns how many.
pub fn apply(model: &Model, store: &mut ParamStore, o: &LoraOptions, seed: u64) -> Result<usize> {
    if o.rank == 0 || !(0.0..1.0).contains(&o.dropout) {
        return Err(Error::InvalidArgument {
            name: "--lora-rank / --lora-dropout".into(),
            detail: format!("rank {} must be at least 1 and dropout {} in [0, 1)", o.rank, o.dropout),
        });
    }
    freeze_all(store);
    let bases: Vec<_> = store
        .iter()
        .filter(|(_, p)| is_target(&p.name, &o.targets) && p.shape.len() == 2)
        .map(|(id, p)| (id, p.name.clone(), p.shape.clone()))
        .collect();
    if bases.is_empty() {
        return Err(Error::InvalidArgument {
            name: "--lora-targets".into(),
            detail: format!(
                "no weight matches {:?}; this model's projections are {:?}",
                o.targets,
                default_targets(model)
            ),
        });
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for (id, name, shape) in &bases {
        let (fan_in, fan_out) = fans(model, shape);
        let bound = 1.0 / (fan_in as f32).sqrt();
        let a: Vec<f32> = (0..o.rank * fan_in).map(|_| rng.random_range(-bound..bound)).collect();
        let b = vec![0f32; fan_out * o.rank];
        store.add_lora(
            *id,
            &module_of(model, name),
            (fan_in, fan_out, o.rank),
            &a,
            &b,
            o.alpha,
            o.dropout,
        )?;
    }
    Ok(bases.len())
}

/// Write `adapter_config.json` and `adapter_model.safetensors` into `dir`.
pub fn save(dir: &Path, model: &Model, store: &ParamStore, o: &LoraOptions, base_model: &Path) -> Result<()> {
    let dev = store.device();
    let mut tensors = Vec::new();
    for (_, p) in store.iter().filter(|(_, p)| p.name.starts_with("base_model.model.")) {
        tensors.push((p.name.clone(), p.shape.clone(), p.value.to_host(dev)?));
    }
    let path = dir.join("adapter_model.safetensors");
    write_atomic(&path, &crate::checkpoint::safetensors_bytes(&tensors, &path)?)?;
    // f32 options written as the decimals they were given as (0.1, not 0.10000000149).
    let decimal = |x: f32| x.to_string().parse::<f64>().unwrap_or(x as f64);
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": o.rank,
        "lora_alpha": decimal(o.alpha),
        "lora_dropout": decimal(o.dropout),
        "target_modules": o.targets,
        "bias": "none",
        "fan_in_fan_out": matches!(model, Model::Gpt2(_)),
        "base_model_name_or_path": base_model.display().to_string(),
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "use_rslora": false,
        "use_dora": false,
    });
    write_atomic(
        &dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&config).expect("json").as_bytes(),
    )
}

#[derive(Deserialize)]
struct PeftConfig {
    r: usize,
    lora_alpha: f32,
    #[serde(default)]
    lora_dropout: f32,
    #[serde(default)]
    target_modules: serde_json::Value,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
}

/// Freeze the model and load a PEFT adapter from `dir` onto it.
pub fn load(dir: &Path, model: &Model, store: &mut ParamStore) -> Result<LoraOptions> {
    let cfg_path = dir.join("adapter_config.json");
    let text =
        std::fs::read_to_string(&cfg_path).map_err(|e| Error::Io { path: cfg_path.clone(), cause: e })?;
    let cfg: PeftConfig = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
        path: cfg_path.clone(),
        detail: format!("not a PEFT LoRA config: {e}"),
    })?;
    if cfg.r == 0 || !(0.0..1.0).contains(&cfg.lora_dropout) || !cfg.lora_alpha.is_finite() {
        return Err(Error::Checkpoint {
            path: cfg_path,
            detail: format!(
                "r {} must be at least 1, lora_dropout {} in [0, 1) and lora_alpha {} a finite number",
                cfg.r, cfg.lora_dropout, cfg.lora_alpha
            ),
        });
    }
    if cfg.use_rslora || cfg.use_dora {
        return Err(Error::Checkpoint {
            path: cfg_path,
            detail: "rsLoRA and DoRA adapters are not supported".into(),
        });
    }
    let targets: Vec<String> = match &cfg.target_modules {
        serde_json::Value::Array(v) => v.iter().filter_map(|x| x.as_str().map(str::to_string)).collect(),
        serde_json::Value::String(s) => vec![s.clone()],
        _ => Vec::new(),
    };
    let file = SafetensorsFile::open(&dir.join("adapter_model.safetensors"))?;
    freeze_all(store);
    let bases: Vec<_> = store.iter().map(|(id, p)| (id, p.name.clone(), p.shape.clone())).collect();
    let mut loaded = 0;
    for (id, name, shape) in bases {
        if shape.len() != 2 {
            continue;
        }
        let module = module_of(model, &name);
        let key = |m: &str| format!("base_model.model.{module}.{m}.weight");
        let Some((a_shape, a)) = file.get(&key("lora_A"))? else { continue };
        let (fan_in, fan_out) = fans(model, &shape);
        let b = file.require(&key("lora_B"), &[fan_out, cfg.r])?;
        if a_shape != [cfg.r, fan_in] {
            return Err(Error::Checkpoint {
                path: file.path().to_path_buf(),
                detail: format!(
                    "{} has shape {a_shape:?}; rank {} on a base weight {name} {shape:?} needs [{}, {fan_in}]: the adapter \
                     does not belong to this base model or rank",
                    key("lora_A"),
                    cfg.r,
                    cfg.r
                ),
            });
        }
        store.add_lora(id, &module, (fan_in, fan_out, cfg.r), &a, &b, cfg.lora_alpha, cfg.lora_dropout)?;
        loaded += 1;
    }
    let expected = file.names().iter().filter(|n| n.ends_with("lora_A.weight")).count();
    if loaded == 0 || loaded != expected {
        return Err(Error::Checkpoint {
            path: file.path().to_path_buf(),
            detail: format!(
                "{expected} adapted modules in the file, {loaded} of them found in the base model: the adapter was \
                 made for another base model"
            ),
        });
    }
    Ok(LoraOptions { rank: cfg.r, alpha: cfg.lora_alpha, dropout: cfg.lora_dropout, targets })
}

/// Fold every adapter into its base weight (`W += scale * B A`, transposed for GPT-2's Conv1D)
/// and drop the adapters: the store then holds a plain model, as `export --merge` writes it.
pub fn merge(model: &Model, store: &mut ParamStore) -> Result<()> {
    let dev = store.device().clone();
    let bases: Vec<_> = store.iter().filter_map(|(id, _)| store.lora(id).map(|l| (id, l.clone()))).collect();
    for (id, l) in bases {
        let a = store.get(l.a).value.to_host(&dev)?; // (r, in)
        let b = store.get(l.b).value.to_host(&dev)?; // (out, r)
        let shape = store.get(id).shape.clone();
        let (fan_in, fan_out) = fans(model, &shape);
        let rank = a.len() / fan_in;
        let mut w = store.get(id).value.to_host(&dev)?;
        let conv1d = matches!(model, Model::Gpt2(_));
        for o in 0..fan_out {
            for i in 0..fan_in {
                let delta: f64 = (0..rank).map(|k| b[o * rank + k] as f64 * a[k * fan_in + i] as f64).sum();
                let idx = if conv1d { i * fan_out + o } else { o * fan_in + i };
                w[idx] += (l.scale as f64 * delta) as f32;
            }
        }
        store.set_value(id, &w)?;
    }
    store.drop_lora();
    Ok(())
}

/// Write `store` (adapters merged, see [`merge`]) as a Hugging Face model directory: weights
/// under their checkpoint names in `model.safetensors`, with `config.json` and
/// `tokenizer.json` copied from `base_dir`, or made from a GGUF base's metadata.
pub fn export_merged(out: &Path, base_dir: &Path, model: &Model, store: &ParamStore) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::Io { path: out.to_path_buf(), cause: e })?;
    let dev = store.device();
    let mut tensors = Vec::new();
    for (_, p) in store.iter().filter(|(_, p)| !p.name.starts_with("base_model.model.")) {
        let name = match model {
            Model::Gpt2(_) => format!("transformer.{}", p.name),
            _ => p.name.clone(),
        };
        tensors.push((name, p.shape.clone(), p.value.to_host(dev)?));
    }
    let path = out.join("model.safetensors");
    write_atomic(&path, &crate::checkpoint::safetensors_bytes(&tensors, &path)?)?;
    if crate::weights::is_gguf(base_dir) {
        // a GGUF base carries its config and tokenizer in its metadata
        let (config, source) = crate::models::open_source(base_dir)?;
        let crate::weights::Source::Gguf(file) = &source else { unreachable!("a GGUF path") };
        let text = serde_json::to_string_pretty(&config).expect("a JSON value serializes");
        write_atomic(&out.join("config.json"), text.as_bytes())?;
        match crate::data::Tokenizer::from_gguf(file) {
            Ok(tok) => write_atomic(&out.join("tokenizer.json"), tok.to_json()?.as_bytes())?,
            Err(e) => eprintln!("note: no tokenizer.json written ({e})"),
        }
        return Ok(());
    }
    for f in ["config.json", "tokenizer.json"] {
        let src = base_dir.join(f);
        if src.exists() {
            let bytes = std::fs::read(&src).map_err(|e| Error::Io { path: src.clone(), cause: e })?;
            write_atomic(&out.join(f), &bytes)?;
        }
    }
    Ok(())
}
