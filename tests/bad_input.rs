//! Input a user can get wrong, found by reading the code (issue 8): each case once panicked or
//! was taken silently, and is now an error that names the file and the field.

use pockettune::graph::Device;
use pockettune::models::Model;
use pockettune::Error;
use serde_json::{json, Value};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn fixture_config(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("config.json")).unwrap()).unwrap()
}

/// `config.json` of fixture `base` with `field` set to `value` (a `/`-path into nested objects).
fn spoiled(base: &str, field: &str, value: Value) -> Value {
    let mut config = fixture_config(base);
    let pointer = format!("/{field}");
    match config.pointer_mut(&pointer) {
        Some(v) => *v = value,
        None => {
            config[field] = value;
        }
    }
    config
}

/// Regression: a `config.json` with `num_attention_heads: 0` divided by zero (Llama family), and
/// zero or inconsistent sizes in every family were taken as given, to panic later (Gemma's
/// `sliding_window: 0` in the CPU attention, `sliding_window_pattern: 0` in a remainder) or to
/// make empty tensors. Each is refused by `load`, naming config.json and the field, and by
/// `Model::random` (bench presets), naming the field.
#[test]
fn config_json_with_zero_or_inconsistent_sizes_is_refused_naming_the_field() {
    let cases: Vec<(&str, &str, Value, &str)> = vec![
        ("gpt2-tiny", "n_head", json!(0), "n_head is 0"),
        ("gpt2-tiny", "n_embd", json!(0), "n_embd is 0"),
        ("gpt2-tiny", "n_embd", json!(63), "n_embd 63 is not a multiple of n_head"),
        ("gpt2-tiny", "vocab_size", json!(0), "vocab_size is 0"),
        ("gpt2-tiny", "n_positions", json!(0), "n_positions is 0"),
        ("gpt2-tiny", "n_inner", json!(0), "n_inner is 0"),
        ("gpt2-tiny", "layer_norm_epsilon", json!(-1.0), "layer_norm_epsilon is -1"),
        ("qwen2-tiny", "num_attention_heads", json!(0), "num_attention_heads is 0"),
        ("llama-tiny", "num_attention_heads", json!(0), "num_attention_heads is 0"),
        ("qwen2-tiny", "num_key_value_heads", json!(0), "num_key_value_heads is 0"),
        ("qwen2-tiny", "num_key_value_heads", json!(3), "not a multiple of num_key_value_heads 3"),
        ("qwen2-tiny", "hidden_size", json!(66), "hidden_size 66 is not a multiple of num_attention_heads"),
        ("qwen2-tiny", "hidden_size", json!(0), "hidden_size is 0"),
        ("qwen2-tiny", "intermediate_size", json!(0), "intermediate_size is 0"),
        ("qwen2-tiny", "head_dim", json!(0), "head_dim 0 must be even"),
        ("llama-tiny", "head_dim", json!(7), "head_dim 7 must be even"),
        ("qwen2-tiny", "vocab_size", json!(0), "vocab_size is 0"),
        ("qwen2-tiny", "max_position_embeddings", json!(0), "max_position_embeddings is 0"),
        ("qwen2-tiny", "rope_parameters/rope_theta", json!(0.0), "rope_theta is 0"),
        ("qwen2-tiny", "rms_norm_eps", json!(-1.0), "rms_norm_eps is -1"),
        ("gemma3-tiny", "sliding_window", json!(0), "sliding_window is 0"),
        ("gemma2-tiny", "sliding_window", json!(0), "sliding_window is 0"),
        ("gemma3-tiny", "sliding_window_pattern", json!(0), "sliding_window_pattern is 0"),
        ("gemma3-tiny", "num_attention_heads", json!(0), "num_attention_heads is 0"),
        ("gemma3-tiny", "num_key_value_heads", json!(0), "num_key_value_heads is 0"),
        ("gemma3-tiny", "num_key_value_heads", json!(3), "not a multiple of num_key_value_heads 3"),
        ("gemma3-tiny", "head_dim", json!(0), "head_dim 0 must be even"),
        ("gemma2-tiny", "head_dim", json!(5), "head_dim 5 must be even"),
        ("gemma3-tiny", "hidden_size", json!(0), "hidden_size is 0"),
        ("gemma3-tiny", "vocab_size", json!(0), "vocab_size is 0"),
        ("gemma3-tiny", "query_pre_attn_scalar", json!(0), "query_pre_attn_scalar is 0"),
        (
            "gemma3-tiny",
            "layer_types",
            json!(["sliding_attention", "global", "full_attention"]),
            "\"global\"",
        ),
        ("gemma3-tiny", "layer_types", json!(["full_attention"]), "layer_types has 1 entries"),
        ("gemma3-tiny", "rope_parameters/full_attention/rope_theta", json!(-1.0), "rope_theta is -1"),
        ("gemma3-tiny", "rope_parameters/sliding_attention/rope_theta", json!(0.0), "rope_local_base_freq"),
    ];
    for (base, field, value, want) in cases {
        let config = spoiled(base, field, value.clone());
        let what = format!("{base} with {field} = {value}");

        let tmp = tempfile::tempdir().unwrap();
        std::fs::copy(fixture(base).join("model.safetensors"), tmp.path().join("model.safetensors")).unwrap();
        std::fs::write(tmp.path().join("config.json"), config.to_string()).unwrap();
        match Model::load(tmp.path(), &Device::CPU_REF) {
            Err(Error::Checkpoint { path, detail }) => {
                assert_eq!(path, tmp.path().join("config.json"), "{what}: {detail}");
                assert!(detail.contains(want), "{what}: {detail}");
            }
            Err(e) => panic!("{what}: expected a config.json error containing {want:?}, got: {e}"),
            Ok(_) => panic!("{what}: loaded"),
        }

        match Model::random(config, &Device::CPU_REF, 0) {
            Err(Error::InvalidArgument { detail, .. }) => assert!(detail.contains(want), "{what}: {detail}"),
            Err(e) => panic!("{what}: expected an invalid-config error containing {want:?}, got: {e}"),
            Ok(_) => panic!("{what}: a random model was made"),
        }
    }
    // The unspoiled fixtures are valid, so what is refused above is the spoiled field.
    for base in ["gpt2-tiny", "qwen2-tiny", "llama-tiny", "gemma3-tiny", "gemma2-tiny"] {
        Model::load(&fixture(base), &Device::CPU_REF).unwrap_or_else(|e| panic!("{base}: {e}"));
    }
}

/// Regression: Gemma's `sliding_window: 0` reached the CPU attention, which panics on a window
/// of no token; now the model is refused before any graph is built.
#[test]
fn gemma_sliding_window_zero_is_refused_before_the_cpu_path_runs() {
    let config = spoiled("gemma3-tiny", "sliding_window", json!(0));
    let err = Model::random(config, &Device::CPU_REF, 0).err().expect("refused");
    assert!(err.to_string().contains("sliding_window is 0; it must be at least 1"), "{err}");
}

/// Regression (found by `tests/fuzz_readers.rs`): sizes far beyond any model overflowed in
/// shape arithmetic (GPT-2's `4 * n_embd`, `3 * n_embd`; Llama's heads times head_dim) or listed
/// tensors for billions of layers before the weights were opened.
#[test]
fn config_json_with_sizes_beyond_any_model_is_refused_naming_the_field() {
    let huge = json!(u64::MAX);
    let cases: Vec<(&str, &str, Value, &str)> = vec![
        ("gpt2-tiny", "n_embd", huge.clone(), "n_embd is 18446744073709551615"),
        ("gpt2-tiny", "n_inner", huge.clone(), "n_inner is 18446744073709551615"),
        ("gpt2-tiny", "n_layer", json!(1u64 << 40), "n_layer is 1099511627776"),
        ("gpt2-tiny", "n_positions", huge.clone(), "n_positions is"),
        ("qwen2-tiny", "head_dim", json!(1u64 << 62), "head_dim is 4611686018427387904"),
        ("qwen2-tiny", "num_hidden_layers", huge.clone(), "num_hidden_layers is"),
        ("llama-tiny", "intermediate_size", huge.clone(), "intermediate_size is"),
        ("gemma3-tiny", "head_dim", json!(1u64 << 62), "head_dim is 4611686018427387904"),
        ("gemma2-tiny", "vocab_size", huge.clone(), "vocab_size is"),
        ("gemma3-tiny", "num_hidden_layers", json!(1u64 << 40), "num_hidden_layers is"),
    ];
    for (base, field, value, want) in cases {
        let what = format!("{base} with {field} = {value}");
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("config.json"), spoiled(base, field, value).to_string()).unwrap();
        match Model::load(tmp.path(), &Device::CPU_REF) {
            Err(Error::Checkpoint { path, detail }) => {
                assert_eq!(path, tmp.path().join("config.json"), "{what}: {detail}");
                assert!(
                    detail.contains(want) && detail.contains("more than any model has"),
                    "{what}: {detail}"
                );
            }
            Err(e) => panic!("{what}: expected a config.json error containing {want:?}, got: {e}"),
            Ok(_) => panic!("{what}: loaded"),
        }
    }
}

/// Regression (found by `tests/fuzz_readers.rs`): tokenizers 0.22 panics ("Helper") on a JSON
/// syntax error inside `decoder`, and ("Precompiled") on a Precompiled normalizer whose
/// charsmap does not decode; both are now errors naming the file.
#[test]
fn damaged_tokenizer_json_is_an_error_naming_the_file_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tokenizer.json");
    let cases = [
        r#"{"added_tokens": [], "decoder": {"type": "ByteLevel", "trim"#.to_string()
            + r#"null, "model": {"type": "BPE", "vocab": {}, "merges": []}}"#,
        r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": {"type": "Precompiled", "precompiled_charsmap": "!not base64!"},
            "pre_tokenizer": null, "post_processor": null, "decoder": null,
            "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}"#
            .to_string(),
    ];
    for text in cases {
        std::fs::write(&path, &text).unwrap();
        match pockettune::data::Tokenizer::load(&path) {
            Err(Error::Checkpoint { path: p, detail }) => {
                assert_eq!(p, path, "{detail}");
                assert!(detail.contains("not a readable tokenizer.json"), "{detail}");
            }
            Err(e) => panic!("{text}: expected an error about the tokenizer.json, got: {e}"),
            Ok(_) => panic!("{text}: loaded"),
        }
    }
}

/// Regression: an adapter_config.json with `r: 0`, a dropout outside [0, 1) or an infinite
/// alpha was taken as given (rank 0 gave an infinite scale alpha / r).
#[test]
fn adapter_config_with_rank_zero_or_bad_dropout_is_refused_naming_the_file() {
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("gpt2-tiny-lora").join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    for (field, value) in [("r", json!(0)), ("lora_dropout", json!(1.0)), ("lora_alpha", json!(1e39))] {
        let tmp = tempfile::tempdir().unwrap();
        let mut spoilt = config.clone();
        spoilt[field] = value.clone();
        std::fs::write(tmp.path().join("adapter_config.json"), spoilt.to_string()).unwrap();
        let weights = "adapter_model.safetensors";
        std::fs::copy(fixture("gpt2-tiny-lora").join(weights), tmp.path().join(weights)).unwrap();
        let (model, mut store) = Model::load(&fixture("gpt2-tiny"), &Device::CPU_REF).unwrap();
        match pockettune::lora::load(tmp.path(), &model, &mut store) {
            Err(Error::Checkpoint { path, detail }) => {
                assert_eq!(path, tmp.path().join("adapter_config.json"), "{field} = {value}: {detail}");
                assert!(detail.contains("r ") && detail.contains("lora_dropout"), "{detail}");
            }
            Err(e) => panic!("{field} = {value}: expected an adapter_config.json error, got: {e}"),
            Ok(_) => panic!("{field} = {value}: the adapter loaded"),
        }
    }
}
