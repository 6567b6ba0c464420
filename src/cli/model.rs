//! A trained model loaded for `eval` and `generate` (frozen, with its adapter if given),
//! `eval`'s loss and perplexity or MMLU accuracy, and `init`, which writes a random GPT-2.

use anyhow::{Context, Result};
use serde_json::json;

use super::args::ModelArgs;
use crate::print_json;

/// What `eval` and `generate` load: the model options and the memory options.
pub struct ModelSpec<'a> {
    pub model: &'a ModelArgs,
    pub memory: &'a pockettune::memory::MemoryFlags,
}

/// A model, optionally with a PEFT adapter, with every weight frozen (no gradient buffers,
/// the base stored as `--base-dtype` says), and its tokenizer.
pub fn load_for_inference(
    dev: &pockettune::graph::Device,
    spec: &ModelSpec,
) -> Result<(pockettune::models::Model, pockettune::graph::ParamStore, pockettune::data::Tokenizer)> {
    let tok = pockettune::data::Tokenizer::for_model(&spec.model.model, spec.model.tokenizer.as_deref())?;
    pockettune::memory::validate(spec.memory)?;
    pockettune::memory::apply_budget(dev, spec.memory.memory_budget);
    let stream = spec.memory.memory_budget.is_some();
    let load = pockettune::models::LoadOptions { frozen: true, base_dtype: spec.model.base_dtype, stream };
    let (gpt, mut store) = pockettune::models::Model::load_with(&spec.model.model, dev, &load)?;
    tok.check_model_vocab(gpt.vocab_size())?;
    if let Some(dir) = spec.model.adapter.as_deref() {
        let o = pockettune::lora::load(dir, &gpt, &mut store)?;
        eprintln!("adapter {}: LoRA rank {} on {}", dir.display(), o.rank, o.targets.join(","));
    }
    Ok((gpt, store, tok))
}

pub fn run_eval(
    dev: &pockettune::graph::Device,
    spec: &ModelSpec,
    data: &std::path::Path,
    (batch, seq): (usize, usize),
    max_batches: Option<usize>,
    json: bool,
) -> Result<i32> {
    use pockettune::data::Tokens;
    let (gpt, store, tok) = load_for_inference(dev, spec)?;
    let tokens = Tokens::load(data, &tok)?;
    let (graph, vars) = gpt.graph_with(&store, batch, seq, spec.memory.graph_options())?;
    let windows = tokens.windows(seq);
    let batches = max_batches.unwrap_or(usize::MAX).min(windows / batch);
    if batches == 0 {
        return Err(pockettune::Error::Checkpoint {
            path: data.to_path_buf(),
            detail: format!(
                "{} tokens make {windows} windows of {} tokens, fewer than one batch of {batch}; \
                 add data or lower --batch-size / --seq-len",
                tokens.ids.len(),
                seq + 1
            ),
        }
        .into());
    }
    let loss = pockettune::train::evaluate(&graph, vars.loss, &store, &tokens, batch, seq, batches)?;
    let evaluated = batches * batch * seq;
    eprintln!(
        "{}: loss {loss:.4}, perplexity {:.2} over {evaluated} tokens ({batches} batches of {batch} x {seq}) on {}",
        data.display(),
        loss.exp(),
        dev.name()
    );
    if json {
        print_json(
            &json!({"loss": loss, "perplexity": loss.exp(), "tokens": evaluated, "device": dev.name()}),
        )?;
    }
    Ok(0)
}

/// `eval --mmlu`: accuracy per subject on stderr, the whole report with `--json`.
pub fn run_mmlu(
    dev: &pockettune::graph::Device,
    spec: &ModelSpec,
    dir: &std::path::Path,
    o: &pockettune::mmlu::Options,
    json: bool,
) -> Result<i32> {
    use std::io::IsTerminal;
    let (gpt, store, tok) = load_for_inference(dev, spec)?;
    let r = pockettune::mmlu::evaluate(&gpt, &store, &tok, dir, o, std::io::stderr().is_terminal())?;
    eprintln!(
        "MMLU {} split, {} shots: accuracy {:.4} over {} questions, {:.4} averaged over {} subjects \
         ({} prompts cut to the model's {} positions; {} forward passes in {:.1} s on {})",
        o.split.dir(),
        o.shots,
        r.micro_accuracy,
        r.count,
        r.macro_accuracy,
        r.subjects.len(),
        r.truncated,
        gpt.max_positions(),
        r.forward_passes,
        r.seconds,
        r.device
    );
    if json {
        print_json(&serde_json::to_value(&r)?)?;
    }
    Ok(0)
}

fn preset(name: &str) -> Result<pockettune::models::gpt2::Gpt2Config> {
    use pockettune::models::gpt2::{Gpt2, Gpt2Config};
    Ok(match name {
        "gpt2" => Gpt2Config::small(),
        "gpt2-medium" => Gpt2::medium_config(),
        "tiny" => Gpt2Config { n_layer: 2, n_head: 4, n_embd: 64, n_positions: 256, ..Gpt2Config::small() },
        other => anyhow::bail!("unknown preset {other:?}: gpt2, gpt2-medium or tiny"),
    })
}

pub fn init_model(name: &str, tokenizer: &std::path::Path, out: &std::path::Path, seed: u64) -> Result<i32> {
    use pockettune::checkpoint::write_atomic;
    use pockettune::models::gpt2::Gpt2;
    let tok = pockettune::data::Tokenizer::load(tokenizer)?;
    let mut cfg = preset(name)?;
    cfg.vocab_size = tok.vocab_size();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut config = serde_json::to_value(&cfg)?;
    config["architectures"] = json!(["GPT2LMHeadModel"]);
    config["model_type"] = json!("gpt2");
    config["tie_word_embeddings"] = json!(true);
    write_atomic(&out.join("config.json"), serde_json::to_string_pretty(&config)?.as_bytes())?;
    let weights = Gpt2::random_weights(&cfg, seed);
    let views: Vec<(String, safetensors::tensor::TensorView)> = weights
        .iter()
        .map(|(n, s, d)| {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                s.clone(),
                bytemuck::cast_slice(d),
            );
            (n.clone(), view.expect("shape and data agree"))
        })
        .collect();
    write_atomic(&out.join("model.safetensors"), &safetensors::serialize(views, None)?)?;
    write_atomic(&out.join("tokenizer.json"), &std::fs::read(tokenizer)?)?;
    let params: usize = weights.iter().map(|(_, s, _)| s.iter().product::<usize>()).sum();
    eprintln!(
        "wrote a random {name} ({:.1} M parameters, vocabulary {}) to {}",
        params as f64 / 1e6,
        cfg.vocab_size,
        out.display()
    );
    Ok(0)
}
