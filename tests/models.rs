//! Bad checkpoints get errors that name the file and the tensor: an unsupported architecture, a
//! missing tensor, a wrong shape, a truncated file.

use pockettune::graph::Device;
use pockettune::models::Model;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A copy of a fixture model whose files can be spoiled.
fn copy(name: &str, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(name).join(f), to.join(f)).unwrap();
    }
}

fn load_err(dir: &Path) -> String {
    match Model::load(dir, &Device::CPU_REF) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unsupported_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    copy("gpt2-tiny", tmp.path());
    let config =
        std::fs::read_to_string(tmp.path().join("config.json")).unwrap().replace("\"gpt2\"", "\"mamba\"");
    std::fs::write(tmp.path().join("config.json"), config).unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("config.json") && err.contains("unsupported architecture") && err.contains("mamba"),
        "{err}"
    );
}

#[test]
fn missing_tensor_and_wrong_shape() {
    let tmp = tempfile::tempdir().unwrap();
    // Two layers in the file, three in the config: layer 2's tensors are missing.
    copy("qwen2-tiny", tmp.path());
    let config = std::fs::read_to_string(tmp.path().join("config.json"))
        .unwrap()
        .replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3");
    std::fs::write(tmp.path().join("config.json"), config).unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("model.safetensors") && err.contains("model.layers.2.") && err.contains("missing"),
        "{err}"
    );

    // A wider intermediate size than the file's: the first MLP weight has the wrong shape.
    copy("llama-tiny", tmp.path());
    let config = std::fs::read_to_string(tmp.path().join("config.json"))
        .unwrap()
        .replace("\"intermediate_size\": 96", "\"intermediate_size\": 100");
    std::fs::write(tmp.path().join("config.json"), config).unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("mlp.gate_proj.weight") && err.contains("[96, 64]") && err.contains("[100, 64]"),
        "{err}"
    );
}

#[test]
fn truncated_weights() {
    let tmp = tempfile::tempdir().unwrap();
    copy("gpt2-tiny", tmp.path());
    let path = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(tmp.path());
    assert!(err.contains("model.safetensors") && err.contains("truncated or corrupt"), "{err}");
}

/// Gemma configs that ask for what the model cannot do: a soft cap that is not a positive
/// number, biases Gemma checkpoints do not have, an untied LM head.
#[test]
fn gemma_config_errors_name_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("\"final_logit_softcapping\": 0.5", "\"final_logit_softcapping\": 0.0", "final_logit_softcapping"),
        ("\"attn_logit_softcapping\": 1.0", "\"attn_logit_softcapping\": -1.0", "attn_logit_softcapping"),
        ("\"attention_bias\": false", "\"attention_bias\": true", "attention_bias"),
        ("\"tie_word_embeddings\": true", "\"tie_word_embeddings\": false", "tie_word_embeddings"),
    ];
    for (from, to, field) in cases {
        copy("gemma2-tiny", tmp.path());
        let config = std::fs::read_to_string(tmp.path().join("config.json")).unwrap();
        assert!(config.contains(from), "the fixture config has {from}");
        std::fs::write(tmp.path().join("config.json"), config.replace(from, to)).unwrap();
        let err = load_err(tmp.path());
        assert!(err.contains("config.json") && err.contains(field), "{to}: {err}");
    }
}
