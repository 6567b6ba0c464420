//! Prints, as one JSON document, the token ids that `pockettune eval --model MODEL --data DATA`
//! feeds the model (the same tokenizer and document convention: `data::Tokens::load`), so that
//! another implementation can be run on exactly these ids (tools/check_gguf_lora.py runs
//! llama.cpp on them).
//!
//! `cargo run --example token_ids -- MODEL DATA` prints `{"ids": [...], "counts": [...]}`.

fn main() -> anyhow::Result<()> {
    let args: Vec<std::path::PathBuf> = std::env::args_os().skip(1).map(Into::into).collect();
    let [model, data] = &args[..] else {
        anyhow::bail!(
            "usage: token_ids MODEL DATA (a model directory or .gguf file, and a text or JSONL file)"
        );
    };
    let tok = pockettune::data::Tokenizer::for_model(model, None)?;
    let tokens = pockettune::data::Tokens::load(data, &tok)?;
    println!("{}", serde_json::json!({"ids": tokens.ids, "counts": tokens.counts}));
    Ok(())
}
