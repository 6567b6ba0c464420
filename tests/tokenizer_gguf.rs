//! Tokenizers built from a GGUF file's `tokenizer.ggml.*` metadata (src/data/gguf_tokenizer.rs).
//!
//! Tiny files written here, with ids worked out by hand below, check the byte-level (`gpt2`)
//! and SentencePiece (`llama`, Gemma's rules) builds, BOS in the data stream and the prompt,
//! `Tokenizer::for_model` and the errors. The real files (Gemma 3 270M Q4_K_M and
//! SmolLM2-135M-Instruct Q4_1; `bash tools/fetch_assets.sh` fetches them into assets/, or set
//! POCKETTUNE_ASSETS) are checked against tests/fixtures/tokenizers/gguf_tokenizers.json, which
//! tools/make_tokenizer_fixture.py made with transformers' own GGUF conversion: the same merges,
//! vocabulary and added tokens (hashes), and the same ids and decoded text on English, code,
//! Chinese, Japanese, Korean, Cyrillic, Arabic, Devanagari, Greek, emoji and whitespace cases.

use pockettune::data::{Tokenizer, Tokens};
use pockettune::weights::gguf::{GgufFile, GgufWriter, MetaValue};
use std::path::{Path, PathBuf};

fn strs(items: &[&str]) -> MetaValue {
    MetaValue::Array(items.iter().map(|s| MetaValue::Str(s.to_string())).collect())
}

fn types(items: &[i32]) -> MetaValue {
    MetaValue::Array(items.iter().map(|&t| MetaValue::I32(t)).collect())
}

/// A byte-level vocabulary: "Ġ" is GPT-2's spelling of the space byte.
const BYTE_TOKENS: [&str; 10] = ["<|endoftext|>", "a", "b", "c", "Ġ", "ab", "Ġab", "\n", "<|im_end|>", "x y"];

fn byte_level_file() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::Str("llama".into()))
        .meta("tokenizer.ggml.model", MetaValue::Str("gpt2".into()))
        .meta("tokenizer.ggml.pre", MetaValue::Str("smollm".into()))
        .meta("tokenizer.ggml.tokens", strs(&BYTE_TOKENS))
        // "x y" is stored as raw text (a space is not in the byte alphabet); "<|im_end|>" is a
        // control token.
        .meta("tokenizer.ggml.token_type", types(&[3, 1, 1, 1, 1, 1, 1, 1, 3, 1]))
        .meta("tokenizer.ggml.merges", strs(&["a b", "Ġ ab"]))
        .meta("tokenizer.ggml.bos_token_id", MetaValue::U32(0))
        .meta("tokenizer.ggml.eos_token_id", MetaValue::U32(8))
        .meta("tokenizer.ggml.add_bos_token", MetaValue::Bool(false));
    w
}

/// A Gemma-style SentencePiece vocabulary with no merges: they come from the token order.
const SP_TOKENS: [&str; 13] = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<0x78>",
    "\u{2581}",
    "h",
    "i",
    "hi",
    "\u{2581}hi",
    "  ",
    "\n",
    "<start_of_turn>",
];

fn gemma_file() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::Str("gemma3".into()))
        .meta("tokenizer.ggml.model", MetaValue::Str("llama".into()))
        .meta("tokenizer.ggml.tokens", strs(&SP_TOKENS))
        .meta("tokenizer.ggml.scores", MetaValue::Array(vec![MetaValue::F32(0.0); SP_TOKENS.len()]))
        .meta("tokenizer.ggml.token_type", types(&[3, 3, 3, 3, 6, 1, 1, 1, 1, 1, 4, 4, 3]))
        .meta("tokenizer.ggml.bos_token_id", MetaValue::U32(2))
        .meta("tokenizer.ggml.eos_token_id", MetaValue::U32(1))
        .meta("tokenizer.ggml.unknown_token_id", MetaValue::U32(3))
        .meta("tokenizer.ggml.add_bos_token", MetaValue::Bool(true));
    w
}

fn open(w: &GgufWriter) -> Tokenizer {
    let file = GgufFile::from_bytes(Path::new("tiny.gguf"), &w.to_bytes()).unwrap();
    Tokenizer::from_gguf(&file).unwrap()
}

#[test]
fn byte_level_bpe_from_the_file_merges() {
    let tok = open(&byte_level_file());
    // "ab abc" pre-tokenizes (GPT-2 regex) into "ab" and " abc" = "Ġabc"; merge 0 (a b) gives
    // "ab" and "Ġ ab c", merge 1 (Ġ ab) then "Ġab c"; there is no merge for "Ġab c".
    assert_eq!(tok.encode("ab abc").unwrap(), vec![5, 6, 3]);
    // The control token is matched whole; "\n" is its own pre-token.
    assert_eq!(tok.encode("ab<|im_end|>\nc").unwrap(), vec![5, 8, 7, 3]);
    // "<|endoftext|>" is a control token too.
    assert_eq!(tok.encode("<|endoftext|>a").unwrap(), vec![0, 1]);
    assert_eq!(tok.decode(&[5, 6, 3]).unwrap(), "ab abc");
    assert_eq!(tok.eot(), 8, "end-of-text is the file's EOS");
    assert_eq!(tok.bos(), None, "add_bos_token is false");
    assert_eq!(tok.vocab_size(), BYTE_TOKENS.len());
    // A token stored as raw text is respelled in the byte alphabet (space: Ġ).
    assert_eq!(tok.inner().token_to_id("xĠy"), Some(9));
}

#[test]
fn gemma_sentencepiece_merges_follow_the_token_order() {
    let tok = open(&gemma_file());
    // Merges by position: "hi" (8) -> (h, i); "▁hi" (9) -> (▁, hi); "  " (10, respelled "▁▁")
    // -> (▁, ▁). "hi hi" normalizes to "hi▁hi": h i ▁ h i -> hi ▁ hi -> hi ▁hi.
    assert_eq!(tok.encode("hi hi").unwrap(), vec![8, 9]);
    // "  hi" = ▁ ▁ h i -> ▁ ▁ hi (rank 0) -> ▁ ▁hi (rank 1 beats (▁, ▁) at rank 2).
    assert_eq!(tok.encode("  hi").unwrap(), vec![5, 9]);
    // "  " alone merges (▁, ▁) into the respelled token 10.
    assert_eq!(tok.encode("  ").unwrap(), vec![10]);
    // Byte fallback: "x" is <0x78>; "é" has no byte tokens and is <unk>, two of them fused.
    assert_eq!(tok.encode("xéé").unwrap(), vec![4, 3]);
    // Control and user-defined tokens are matched whole in the text.
    assert_eq!(tok.encode("<start_of_turn>hi\n").unwrap(), vec![12, 8, 11]);
    assert_eq!(tok.encode("<bos><eos>").unwrap(), vec![2, 1]);
    assert_eq!(tok.encode("hi hi  hi").unwrap(), vec![8, 9, 5, 9]);
    assert_eq!(tok.decode(&[8, 9, 5, 9]).unwrap(), "hi hi  hi");
    assert_eq!(tok.decode(&[4]).unwrap(), "x");
    assert_eq!(tok.bos(), Some(2));
    assert_eq!(tok.eot(), 1);
}

#[test]
fn sentencepiece_llama_uses_the_scores_and_a_prefix_space() {
    let mut w = GgufWriter::new();
    let tokens = ["<unk>", "<s>", "</s>", "\u{2581}", "h", "i", "hi", "\u{2581}h", "\u{2581}hi"];
    // Scores make (▁, h) -> "▁h" (score -1) beat (h, i) -> "hi" (score -2); "▁hi" splits as
    // (▁h, i) and (▁, hi), both at score -3, the longer left part first.
    let scores = [0.0, 0.0, 0.0, -5.0, -5.0, -5.0, -2.0, -1.0, -3.0];
    w.meta("general.architecture", MetaValue::Str("llama".into()))
        .meta("tokenizer.ggml.model", MetaValue::Str("llama".into()))
        .meta("tokenizer.ggml.tokens", strs(&tokens))
        .meta("tokenizer.ggml.scores", MetaValue::Array(scores.iter().map(|&s| MetaValue::F32(s)).collect()))
        .meta("tokenizer.ggml.token_type", types(&[2, 3, 3, 1, 1, 1, 1, 1, 1]))
        .meta("tokenizer.ggml.bos_token_id", MetaValue::U32(1))
        .meta("tokenizer.ggml.eos_token_id", MetaValue::U32(2));
    let tok = open(&w);
    // Metaspace prepends ▁ to the first word: "hi" -> ▁ h i -> ▁h i -> ▁hi.
    assert_eq!(tok.encode("hi").unwrap(), vec![8]);
    // "hi hi" -> ▁ h i ▁ h i -> ▁h i ▁h i -> ▁hi ▁hi.
    assert_eq!(tok.encode("hi hi").unwrap(), vec![8, 8]);
    // A text that starts with a space gets no second ▁.
    assert_eq!(tok.encode(" hi").unwrap(), vec![8]);
    // The decoder drops the prefix space again.
    assert_eq!(tok.decode(&[8, 8]).unwrap(), "hi hi");
    // No add_bos_token key: a SentencePiece vocabulary gets BOS, as llama.cpp and transformers do.
    assert_eq!(tok.bos(), Some(1));
}

#[test]
fn documents_start_with_bos_when_the_model_wants_it() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = open(&gemma_file());
    let jsonl = tmp.path().join("d.jsonl");
    std::fs::write(
        &jsonl,
        "{\"text\": \"hi\"}\n{\"prompt\": \"hi\", \"completion\": \" hi\"}\n{\"text\": \"x\"}\n",
    )
    .unwrap();
    let t = Tokens::load(&jsonl, &tok).unwrap();
    // BOS hi | EOT BOS hi(prompt) ▁hi(completion) | EOT BOS x
    assert_eq!(t.ids, vec![2, 8, 1, 2, 8, 9, 1, 2, 4]);
    assert_eq!(t.counts, vec![false, true, true, false, false, true, true, false, true]);
    assert_eq!(pockettune::generate::prompt_ids(&tok, "hi").unwrap(), vec![2, 8]);
    assert_eq!(pockettune::generate::prompt_ids(&tok, "").unwrap(), vec![2]);

    // No BOS for a byte-level file that does not ask for one (GPT-2's behaviour).
    let tok = open(&byte_level_file());
    std::fs::write(&jsonl, "{\"text\": \"ab\"}\n{\"text\": \"c\"}\n").unwrap();
    assert_eq!(Tokens::load(&jsonl, &tok).unwrap().ids, vec![5, 8, 3]);
    assert_eq!(pockettune::generate::prompt_ids(&tok, "").unwrap(), vec![8]);
}

#[test]
fn for_model_takes_the_gguf_tokenizer_unless_overridden() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("m.gguf");
    gemma_file().write(&gguf).unwrap();
    let tok = Tokenizer::for_model(&gguf, None).unwrap();
    assert_eq!((tok.vocab_size(), tok.bos()), (SP_TOKENS.len(), Some(2)));

    // --tokenizer wins: a tokenizer.json, or another GGUF's tokenizer.
    let other = tmp.path().join("other.gguf");
    byte_level_file().write(&other).unwrap();
    assert_eq!(Tokenizer::for_model(&gguf, Some(&other)).unwrap().vocab_size(), BYTE_TOKENS.len());
    let dir = tmp.path().join("hf");
    std::fs::create_dir(&dir).unwrap();
    let json = tmp.path().join("tokenizer.json");
    Tokenizer::for_model(&other, None).unwrap().inner().save(&json, false).unwrap();
    let tok = Tokenizer::for_model(&gguf, Some(&json)).unwrap();
    assert_eq!((tok.vocab_size(), tok.bos()), (BYTE_TOKENS.len(), None));
    // A model directory has its tokenizer.json.
    std::fs::copy(&json, dir.join("tokenizer.json")).unwrap();
    assert_eq!(Tokenizer::for_model(&dir, None).unwrap().encode("ab abc").unwrap(), vec![5, 6, 3]);
}

#[test]
fn a_tokenizer_json_that_adds_bos_wants_bos() {
    // The Gemma build saved as tokenizer.json with a post-processor adding <bos>, as Gemma's own
    // tokenizer.json has.
    let tmp = tempfile::tempdir().unwrap();
    let tok = open(&gemma_file());
    let mut inner = tok.inner().clone();
    let template = tokenizers::processors::template::TemplateProcessing::builder()
        .try_single("<bos> $A")
        .unwrap()
        .special_tokens(vec![("<bos>", 2)])
        .build()
        .unwrap();
    inner.with_post_processor(Some(template));
    let json = tmp.path().join("tokenizer.json");
    inner.save(&json, false).unwrap();
    let loaded = Tokenizer::load(&json).unwrap();
    assert_eq!((loaded.bos(), loaded.eot()), (Some(2), 1));
    assert_eq!(loaded.encode("hi hi").unwrap(), vec![8, 9], "encode adds no special tokens");
}

fn expect_error(w: &GgufWriter, words: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bad.gguf");
    w.write(&path).unwrap();
    match Tokenizer::for_model(&path, None) {
        Ok(_) => panic!("expected an error containing {words:?}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains(&path.display().to_string()), "the error names the file: {msg}");
            for word in words {
                assert!(msg.contains(word), "{word:?} missing from: {msg}");
            }
        }
    }
}

#[test]
fn a_gguf_without_a_usable_tokenizer_is_a_clear_error() {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::Str("llama".into()));
    expect_error(&w, &["no tokenizer", "--tokenizer"]);

    let mut w = GgufWriter::new();
    w.meta("tokenizer.ggml.model", MetaValue::Str("bert".into())).meta("tokenizer.ggml.tokens", strs(&["a"]));
    expect_error(&w, &["\"bert\"", "--tokenizer"]);

    let gpt2 = |merges: &[&str], eos: u32| {
        let mut w = GgufWriter::new();
        w.meta("tokenizer.ggml.model", MetaValue::Str("gpt2".into()))
            .meta("tokenizer.ggml.tokens", strs(&["a", "b", "ab"]))
            .meta("tokenizer.ggml.merges", strs(merges))
            .meta("tokenizer.ggml.eos_token_id", MetaValue::U32(eos));
        w
    };
    expect_error(&gpt2(&["a c"], 0), &["merges do not fit", "c"]);
    expect_error(&gpt2(&["ab"], 0), &["tokenizer.ggml.merges[0]", "two tokens"]);
    expect_error(&gpt2(&["a b"], 7), &["eos_token_id", "vocabulary size 3"]);

    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::Str("gemma3".into()))
        .meta("tokenizer.ggml.model", MetaValue::Str("llama".into()))
        .meta("tokenizer.ggml.tokens", strs(&SP_TOKENS))
        .meta("tokenizer.ggml.token_type", types(&[1, 1]))
        .meta("tokenizer.ggml.eos_token_id", MetaValue::U32(1));
    expect_error(&w, &["token_type has 2 entries", "13 tokens"]);
}

#[test]
fn a_gguf_tokenizer_larger_than_the_model_does_not_belong_to_it() {
    let tok = open(&gemma_file());
    assert!(tok.check_model_vocab(SP_TOKENS.len()).is_ok());
    let err = tok.check_model_vocab(SP_TOKENS.len() - 1).unwrap_err().to_string();
    assert!(err.contains("do not belong together") && err.contains("tiny.gguf"), "{err}");
}

/// Random small vocabularies (repeated, empty and all-space tokens, bytes outside the byte
/// alphabet), random token types and merges, both tokenizer kinds: building fails with an error
/// or gives a tokenizer that encodes and decodes random text, never a panic.
#[test]
fn random_tokenizer_metadata_never_panics() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let pieces = ["a", "b", " ", "\u{2581}", "\n", "é", "中", "<", ">", "<0x61>", "<eos>", ""];
    let word = |rng: &mut rand::rngs::StdRng| -> String {
        (0..rng.random_range(0..4)).map(|_| pieces[rng.random_range(0..pieces.len())]).collect()
    };
    let mut built = 0;
    for case in 0..200 {
        let n = rng.random_range(1..24);
        let tokens: Vec<String> = (0..n).map(|_| word(&mut rng)).collect();
        let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let mut w = GgufWriter::new();
        let (kind, arch) = [("gpt2", "llama"), ("llama", "gemma3"), ("llama", "llama")][case % 3];
        w.meta("general.architecture", MetaValue::Str(arch.into()))
            .meta("tokenizer.ggml.model", MetaValue::Str(kind.into()))
            .meta("tokenizer.ggml.tokens", strs(&refs))
            .meta("tokenizer.ggml.eos_token_id", MetaValue::U32(rng.random_range(0..n as u32 + 1)))
            .meta("tokenizer.ggml.bos_token_id", MetaValue::U32(rng.random_range(0..n as u32 + 1)));
        if rng.random_bool(0.8) {
            let t: Vec<i32> = (0..n).map(|_| rng.random_range(1..7)).collect();
            w.meta("tokenizer.ggml.token_type", types(&t));
        }
        if rng.random_bool(0.7) {
            let s: Vec<MetaValue> = (0..n).map(|_| MetaValue::F32(rng.random_range(-10.0..0.0))).collect();
            w.meta("tokenizer.ggml.scores", MetaValue::Array(s));
        }
        if kind == "gpt2" || rng.random_bool(0.3) {
            let merges: Vec<String> = (0..rng.random_range(0..6))
                .map(|_| format!("{} {}", word(&mut rng), word(&mut rng)))
                .collect();
            let refs: Vec<&str> = merges.iter().map(String::as_str).collect();
            w.meta("tokenizer.ggml.merges", strs(&refs));
        }
        let file = GgufFile::from_bytes(Path::new("random.gguf"), &w.to_bytes()).unwrap();
        let Ok(tok) = Tokenizer::from_gguf(&file) else { continue };
        built += 1;
        for _ in 0..5 {
            let text: String = (0..rng.random_range(0..6)).map(|_| word(&mut rng)).collect();
            // An error is fine (a vocabulary without its unknown token fails on unknown text, as
            // with transformers); a panic is not.
            if let Ok(ids) = tok.encode(&text) {
                tok.decode(&ids).unwrap();
            }
        }
    }
    eprintln!("{built} of 200 random tokenizers built");
    assert!(built >= 50, "only {built} of 200 random files gave a tokenizer: the test exercises too little");
}

// ---- the real files, against transformers ----

fn assets() -> PathBuf {
    std::env::var_os("POCKETTUNE_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("assets"))
}

/// The FNV-1a 64-bit hash of the lines, as tools/make_tokenizer_fixture.py computes it.
fn fnv1a64<'a>(lines: impl Iterator<Item = String> + 'a) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for line in lines {
        for b in line.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
        }
    }
    format!("{h:016x}")
}

fn check_against_transformers(name: &str) {
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizers/gguf_tokenizers.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let want = &fixture["models"][name];
    let path = assets().join(want["file"].as_str().unwrap());
    assert!(path.exists(), "{} is missing: run `bash tools/fetch_assets.sh` first", path.display());
    let t0 = std::time::Instant::now();
    let tok = Tokenizer::for_model(&path, None).unwrap();
    eprintln!("{name}: tokenizer built in {:.1} s", t0.elapsed().as_secs_f64());

    assert_eq!(tok.vocab_size() as u64, want["vocab_size"].as_u64().unwrap(), "vocabulary size");
    assert_eq!(tok.eot() as u64, want["eos_token_id"].as_u64().unwrap(), "end-of-text = EOS");
    let bos = want["add_bos_token"].as_bool().unwrap().then(|| want["bos_token_id"].as_u64().unwrap() as u32);
    assert_eq!(tok.bos(), bos, "BOS");

    // The same BPE model and added vocabulary as transformers builds.
    let json: serde_json::Value = serde_json::from_str(&tok.inner().to_string(false).unwrap()).unwrap();
    let merges: Vec<String> = json["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => s.clone(),
            pair => format!("{} {}", pair[0].as_str().unwrap(), pair[1].as_str().unwrap()),
        })
        .collect();
    assert_eq!(merges.len() as u64, want["merges"].as_u64().unwrap(), "number of merges");
    let first: Vec<String> =
        want["first_merges"].as_array().unwrap().iter().map(|m| m.as_str().unwrap().into()).collect();
    assert_eq!(merges[..first.len()], first[..], "first merges");
    assert_eq!(
        fnv1a64(merges.iter().map(|m| format!("{m}\n"))),
        want["merges_fnv1a64"].as_str().unwrap(),
        "merges"
    );
    let mut vocab: Vec<(u64, String)> = json["model"]["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(t, i)| (i.as_u64().unwrap(), t.clone()))
        .collect();
    vocab.sort();
    assert_eq!(
        fnv1a64(vocab.iter().map(|(i, t)| format!("{i}\t{t}\n"))),
        want["vocab_fnv1a64"].as_str().unwrap(),
        "vocab"
    );
    let mut added: Vec<(u64, String)> = json["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let flag = |k: &str| u8::from(a[k].as_bool().unwrap());
            (
                a["id"].as_u64().unwrap(),
                format!("{}\t{}\t{}", a["content"].as_str().unwrap(), flag("special"), flag("normalized")),
            )
        })
        .collect();
    added.sort();
    assert_eq!(
        fnv1a64(added.iter().map(|(i, a)| format!("{i}\t{a}\n"))),
        want["added_fnv1a64"].as_str().unwrap(),
        "added tokens"
    );

    // The same ids and decoded text on every case.
    let mut failures = Vec::new();
    let cases = want["cases"].as_array().unwrap();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let ids: Vec<u32> =
            case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let got = tok.encode(text).unwrap();
        if got != ids {
            failures.push(format!("{text:?}: ids {got:?}, transformers {ids:?}"));
            continue;
        }
        let decoded = tok.decode(&ids).unwrap();
        if decoded != case["decoded"].as_str().unwrap() {
            failures.push(format!("{text:?}: decodes to {decoded:?}, transformers to {}", case["decoded"]));
        }
        if case["decoded"].as_str() == Some(text) {
            assert_eq!(decoded, text, "decode(encode(text)) == text as with transformers");
        }
        // What transformers adds with special tokens on is BOS (when wanted) before the ids.
        let special: Vec<u32> =
            case["ids_special"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(special, tok.bos().into_iter().chain(ids.iter().copied()).collect::<Vec<_>>(), "{text:?}");
    }
    assert!(
        failures.is_empty(),
        "{name}: {} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    eprintln!("{name}: {} cases match transformers", cases.len());
}

#[test]
#[ignore = "needs the Gemma 3 270M GGUF: bash tools/fetch_assets.sh"]
fn gemma3_270m_gguf_tokenizer_matches_transformers() {
    check_against_transformers("gemma3-270m");
}

#[test]
#[ignore = "needs the SmolLM2-135M GGUF: bash tools/fetch_assets.sh"]
fn smollm2_135m_gguf_tokenizer_matches_transformers() {
    check_against_transformers("smollm2-135m");
}
