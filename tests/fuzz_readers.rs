//! The readers of user files, fed truncated, random and mutated copies of valid files: model
//! weights (`model.safetensors`), every family's `config.json`, a PEFT adapter
//! (`adapter_config.json`, `adapter_model.safetensors`), `tokenizer.json` and JSONL/text data.
//! None may panic; each refusal is an error that names the file. A model that still loads runs
//! one forward pass on the CPU, which must not panic either.
//!
//! A seeded loop (no new dependency): a failure prints the reader, the case and the seed, and
//! `FUZZ_SEED=<seed> FUZZ_CASES=<n>` replays or widens the search.

#[allow(dead_code)]
mod common;

use pockettune::data::{Tokenizer, Tokens};
use pockettune::graph::Device;
use pockettune::models::Model;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn seed() -> u64 {
    std::env::var("FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_f122)
}

fn cases(default: usize) -> usize {
    std::env::var("FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// Numbers and values that sit on the edges of what readers expect.
fn odd_value(rng: &mut StdRng) -> Value {
    let pool = [
        json!(0),
        json!(1),
        json!(-1),
        json!(2),
        json!(3),
        json!(7),
        json!(255),
        json!(65536),
        json!(1u64 << 31),
        json!(1u64 << 53),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(0.5),
        json!(-0.0),
        json!(1e-300),
        json!(1e300),
        json!(null),
        json!(true),
        json!(""),
        json!("x"),
        json!("F64"),
        json!("I8"),
        json!([]),
        json!([0]),
        json!([1, 2, 3]),
        json!({}),
    ];
    pool[rng.random_range(0..pool.len())].clone()
}

/// `v` with one randomly chosen value anywhere inside replaced, removed or given a sibling.
fn mutate_json(rng: &mut StdRng, v: &mut Value) {
    let descend = rng.random_bool(0.7);
    match v {
        Value::Object(map) if !map.is_empty() => {
            let keys: Vec<String> = map.keys().cloned().collect();
            let key = &keys[rng.random_range(0..keys.len())];
            match rng.random_range(0..10) {
                0 => {
                    map.remove(key);
                }
                1 => {
                    map.insert(format!("{key}_extra"), odd_value(rng));
                }
                _ if descend => mutate_json(rng, map.get_mut(key).expect("a key of the map")),
                _ => {
                    map.insert(key.clone(), odd_value(rng));
                }
            }
        }
        Value::Array(items) if !items.is_empty() => {
            let i = rng.random_range(0..items.len());
            match rng.random_range(0..10) {
                0 => {
                    items.remove(i);
                }
                1 => items.push(odd_value(rng)),
                _ if descend => mutate_json(rng, &mut items[i]),
                _ => items[i] = odd_value(rng),
            }
        }
        other => *other = odd_value(rng),
    }
}

/// Byte-level damage: truncation, flipped bytes, inserted or deleted runs, or noise.
fn mutate_bytes(rng: &mut StdRng, bytes: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    match rng.random_range(0..5) {
        0 => b.truncate(rng.random_range(0..=b.len())),
        1 => {
            for _ in 0..rng.random_range(1..8) {
                if !b.is_empty() {
                    let i = rng.random_range(0..b.len());
                    b[i] = rng.random();
                }
            }
        }
        2 => {
            let at = rng.random_range(0..=b.len());
            let run: Vec<u8> = (0..rng.random_range(1..64)).map(|_| rng.random()).collect();
            b.splice(at..at, run);
        }
        3 => {
            let at = rng.random_range(0..=b.len());
            let end = (at + rng.random_range(1..256)).min(b.len());
            b.drain(at..end);
        }
        _ => b = (0..rng.random_range(0..256)).map(|_| rng.random()).collect(),
    }
    b
}

/// A damaged copy of a text file: mostly structured (JSON) changes, else byte damage.
fn mutate_text(rng: &mut StdRng, text: &str) -> Vec<u8> {
    match serde_json::from_str::<Value>(text) {
        Ok(mut v) if rng.random_bool(0.75) => {
            for _ in 0..rng.random_range(1..4) {
                mutate_json(rng, &mut v);
            }
            v.to_string().into_bytes()
        }
        _ => mutate_bytes(rng, text.as_bytes()),
    }
}

/// A damaged copy of a safetensors file: its 8-byte header length, its JSON header (shapes,
/// dtypes, offsets; rewritten with a correct length), or its bytes.
fn mutate_safetensors(rng: &mut StdRng, bytes: &[u8]) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    match rng.random_range(0..4) {
        0 => {
            let len = bytes.len() as u64;
            let pool = [
                0,
                1,
                2,
                7,
                8,
                n as u64 - 1,
                n as u64 + 1,
                len - 8,
                len,
                len + 1,
                u64::MAX,
                u64::MAX - 7,
                1 << 63,
            ];
            let mut b = bytes.to_vec();
            b[..8].copy_from_slice(&pool[rng.random_range(0..pool.len())].to_le_bytes());
            b
        }
        1 | 2 => {
            let mut header: Value = serde_json::from_slice(&bytes[8..8 + n]).expect("a JSON header");
            for _ in 0..rng.random_range(1..4) {
                mutate_json(rng, &mut header);
            }
            let h = header.to_string().into_bytes();
            let mut b = (h.len() as u64).to_le_bytes().to_vec();
            b.extend(h);
            b.extend(&bytes[8 + n..]);
            b
        }
        _ => mutate_bytes(rng, bytes),
    }
}

/// Run one reader on one damaged input: a panic fails with the case named; an error must
/// contain one of `files`.
fn expect_no_panic<T>(
    what: &str,
    case: usize,
    files: &[&Path],
    read: impl FnOnce() -> pockettune::Result<T>,
) -> Option<T> {
    match catch_unwind(AssertUnwindSafe(read)) {
        Err(_) => {
            // keep the input that did it
            let keep = std::env::temp_dir().join(format!("pockettune-fuzz-{}-{case}", seed()));
            std::fs::create_dir_all(&keep).unwrap();
            for f in files {
                std::fs::copy(f, keep.join(f.file_name().unwrap())).unwrap();
            }
            panic!("{what}: case {case} (FUZZ_SEED={}) panicked (input kept in {})", seed(), keep.display())
        }
        Ok(Err(e)) => {
            let msg = e.to_string();
            assert!(
                files.iter().any(|f| msg.contains(&f.display().to_string())),
                "{what}: case {case} (FUZZ_SEED={}): the error names none of {files:?}: {msg}",
                seed()
            );
            None
        }
        Ok(Ok(v)) => Some(v),
    }
}

/// A loaded model computes logits on the CPU without panicking (errors are allowed: a damaged
/// config may, say, allow fewer positions than the test feeds).
fn forward_does_not_panic(what: &str, case: usize, model: &Model, store: &pockettune::graph::ParamStore) {
    let t = 3.min(model.max_positions()).max(1);
    let ids: Vec<u32> = (0..t as u32).map(|i| i % model.vocab_size().max(1) as u32).collect();
    let run = catch_unwind(AssertUnwindSafe(|| -> pockettune::Result<Vec<f32>> {
        let (graph, logits) = model.logits_graph(store, 1, t)?;
        graph.forward(store, &Model::inference_feed(&ids, 1, t), &[logits])?.read(logits)
    }));
    assert!(run.is_ok(), "{what}: case {case} (FUZZ_SEED={}): the forward pass panicked", seed());
}

fn copy_dir(from: &Path, to: &Path, files: &[&str]) {
    std::fs::create_dir_all(to).unwrap();
    for f in files {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

#[test]
fn damaged_model_files_never_panic_and_errors_name_the_file() {
    let mut rng = StdRng::seed_from_u64(seed());
    let tmp = tempfile::tempdir().unwrap();
    for base in ["gpt2-tiny", "qwen2-tiny", "llama-tiny", "gemma3-tiny", "gemma2-tiny"] {
        let dir = tmp.path().join(base);
        copy_dir(&fixture(base), &dir, &["config.json", "model.safetensors"]);
        let (config_path, weights_path) = (dir.join("config.json"), dir.join("model.safetensors"));
        let config = std::fs::read_to_string(fixture(base).join("config.json")).unwrap();
        let weights = std::fs::read(fixture(base).join("model.safetensors")).unwrap();
        for case in 0..cases(40) {
            // config.json: the error may also name the weights that no longer match it
            std::fs::write(&config_path, mutate_text(&mut rng, &config)).unwrap();
            let what = format!("{base}/config.json");
            let files = [config_path.as_path(), weights_path.as_path()];
            if let Some((m, s)) = expect_no_panic(&what, case, &files, || Model::load(&dir, &Device::CPU_REF))
            {
                forward_does_not_panic(&what, case, &m, &s);
            }
            std::fs::write(&config_path, &config).unwrap();

            std::fs::write(&weights_path, mutate_safetensors(&mut rng, &weights)).unwrap();
            let what = format!("{base}/model.safetensors");
            let files = [weights_path.as_path()];
            if let Some((m, s)) = expect_no_panic(&what, case, &files, || Model::load(&dir, &Device::CPU_REF))
            {
                forward_does_not_panic(&what, case, &m, &s);
            }
            std::fs::write(&weights_path, &weights).unwrap();
        }
    }
}

#[test]
fn damaged_adapters_never_panic_and_errors_name_the_file() {
    let mut rng = StdRng::seed_from_u64(seed() ^ 1);
    let tmp = tempfile::tempdir().unwrap();
    for (base, adapter) in [("gpt2-tiny", "gpt2-tiny-lora"), ("gemma3-tiny", "gemma3-tiny-lora")] {
        let dir = tmp.path().join(adapter);
        copy_dir(&fixture(adapter), &dir, &["adapter_config.json", "adapter_model.safetensors"]);
        let (config_path, weights_path) =
            (dir.join("adapter_config.json"), dir.join("adapter_model.safetensors"));
        let config = std::fs::read_to_string(&config_path).unwrap();
        let weights = std::fs::read(&weights_path).unwrap();
        for case in 0..cases(40) {
            for part in 0..2 {
                let (path, damaged) = if part == 0 {
                    (&config_path, mutate_text(&mut rng, &config))
                } else {
                    (&weights_path, mutate_safetensors(&mut rng, &weights))
                };
                std::fs::write(path, damaged).unwrap();
                let what = format!("{adapter}/{}", path.file_name().unwrap().to_string_lossy());
                let (model, mut store) = Model::load(&fixture(base), &Device::CPU_REF).unwrap();
                // a damaged config may point at tensors that the weights then lack
                let files = [config_path.as_path(), weights_path.as_path()];
                let loaded =
                    expect_no_panic(&what, case, &files, || pockettune::lora::load(&dir, &model, &mut store));
                if loaded.is_some() {
                    forward_does_not_panic(&what, case, &model, &store);
                }
                std::fs::write(&config_path, &config).unwrap();
                std::fs::write(&weights_path, &weights).unwrap();
            }
        }
    }
}

#[test]
fn damaged_tokenizers_and_data_never_panic_and_errors_name_the_file() {
    let mut rng = StdRng::seed_from_u64(seed() ^ 2);
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    common::tiny_model_dir(&model, 1);
    let tokenizer = std::fs::read_to_string(model.join("tokenizer.json")).unwrap();
    let good = Tokenizer::load(&model.join("tokenizer.json")).unwrap();
    let damaged_tok = tmp.path().join("tokenizer.json");
    for case in 0..cases(60) {
        std::fs::write(&damaged_tok, mutate_text(&mut rng, &tokenizer)).unwrap();
        let tok = expect_no_panic("tokenizer.json", case, &[&damaged_tok], || Tokenizer::load(&damaged_tok));
        if let Some(tok) = tok {
            // a tokenizer that loads encodes and decodes without panicking
            let text = "It was the best of times. \u{e9}\u{1F600}\n\t<|endoftext|>";
            let ids = expect_no_panic("tokenizer.json encode", case, &[&damaged_tok], || tok.encode(text));
            if let Some(ids) = ids {
                expect_no_panic("tokenizer.json decode", case, &[&damaged_tok], || tok.decode(&ids));
            }
        }
    }

    let jsonl = "{\"text\": \"plain text\"}\n{\"prompt\": \"Q: 2+2?\", \"completion\": \" A: 4\"}\n\n";
    for (name, valid) in [("data.jsonl", jsonl), ("data.txt", "Some text.\nMore text.\n")] {
        let path = tmp.path().join(name);
        for case in 0..cases(100) {
            let damaged = if rng.random_bool(0.5) {
                // damage one line (JSONL) or the whole text
                let lines: Vec<&str> = valid.lines().collect();
                let i = rng.random_range(0..lines.len());
                let mut out = Vec::new();
                for (j, l) in lines.iter().enumerate() {
                    out.extend(if i == j { mutate_text(&mut rng, l) } else { l.as_bytes().to_vec() });
                    out.push(b'\n');
                }
                out
            } else {
                mutate_bytes(&mut rng, valid.as_bytes())
            };
            std::fs::write(&path, damaged).unwrap();
            expect_no_panic(name, case, &[&path], || Tokens::load(&path, &good));
        }
    }
}
