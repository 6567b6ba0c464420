//! The model's tokenizer: a Hugging Face `tokenizer.json`, or the tokenizer a GGUF file carries
//! in its metadata (see `gguf_tokenizer`), with the two special tokens the data convention needs:
//! the end-of-text token that joins documents and, for models trained with one, the BOS token
//! that starts each document.

use super::{bad_data, gguf_tokenizer};
use crate::error::{Error, Result};
use crate::weights::gguf::GgufFile;
use std::path::{Path, PathBuf};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eot: u32,
    bos: Option<u32>,
    path: PathBuf,
}

impl Tokenizer {
    /// The tokenizer of `model`: `tokenizer_override` if given (a tokenizer.json, or a GGUF file
    /// whose tokenizer to use), else the one a `.gguf` model carries, else `model/tokenizer.json`.
    pub fn for_model(model: &Path, tokenizer_override: Option<&Path>) -> Result<Tokenizer> {
        let path = tokenizer_override.unwrap_or(model);
        if crate::weights::is_gguf(path) {
            return Self::from_gguf(&GgufFile::open(path)?);
        }
        if tokenizer_override.is_some() {
            return Self::load(path);
        }
        Self::load(&model.join("tokenizer.json"))
    }

    /// A Hugging Face tokenizer.json. BOS is wanted when its post-processor adds one.
    pub fn load(path: &Path) -> Result<Tokenizer> {
        if !path.exists() {
            return Err(bad_data(path, "tokenizer.json not found (the model directory should contain it)"));
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: path.into(), cause: e })?;
        // tokenizers 0.22 panics instead of failing on a JSON syntax error inside "decoder"
        // (and on a bad Precompiled normalizer): check the syntax first, and turn any panic
        // left into an error.
        serde_json::from_str::<serde::de::IgnoredAny>(&text)
            .map_err(|e| bad_data(path, format!("not a readable tokenizer.json: not valid JSON: {e}")))?;
        let inner = match std::panic::catch_unwind(|| text.parse::<tokenizers::Tokenizer>()) {
            Ok(Ok(inner)) => inner,
            Ok(Err(e)) => return Err(bad_data(path, format!("not a readable tokenizer.json: {e}"))),
            Err(_) => {
                return Err(bad_data(
                    path,
                    "not a readable tokenizer.json (the tokenizers library panicked on it)",
                ))
            }
        };
        let eot = ["<|endoftext|>", "<eos>", "</s>", "<|end_of_text|>"]
            .iter()
            .find_map(|t| inner.token_to_id(t))
            .ok_or_else(|| {
                bad_data(path, "no end-of-text token (<|endoftext|>, <eos>, </s>) in the vocabulary")
            })?;
        let bos = added_bos(&inner);
        Ok(Tokenizer { inner, eot, bos, path: path.to_path_buf() })
    }

    /// The tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata; end-of-text is its
    /// EOS token.
    pub fn from_gguf(file: &GgufFile) -> Result<Tokenizer> {
        let built = gguf_tokenizer::build(file)?;
        Ok(Tokenizer { inner: built.inner, eot: built.eos, bos: built.bos, path: file.path().to_path_buf() })
    }

    /// This tokenizer as a Hugging Face tokenizer.json; one built from a GGUF file gets a
    /// post-processor that adds its BOS, so that the file alone says a BOS is wanted (see
    /// `added_bos`), as transformers' tokenizers of the same model do.
    pub fn to_json(&self) -> Result<String> {
        use tokenizers::processors::template::TemplateProcessing;
        let mut inner = self.inner.clone();
        if let (Some(bos), None) = (self.bos, inner.get_post_processor()) {
            let token = inner.id_to_token(bos).unwrap_or_default();
            let template = TemplateProcessing::builder()
                .try_single(format!("{token}:0 $A:0"))
                .and_then(|b| b.try_pair(format!("{token}:0 $A:0 {token}:1 $B:1")))
                .map_err(|e| bad_data(&self.path, format!("BOS template: {e}")))?
                .special_tokens(vec![(token, bos)])
                .build()
                .map_err(|e| bad_data(&self.path, format!("BOS template: {e}")))?;
            inner.with_post_processor(Some(template));
        }
        inner
            .to_string(true)
            .map_err(|e| bad_data(&self.path, format!("cannot be written as tokenizer.json: {e}")))
    }

    pub fn eot(&self) -> u32 {
        self.eot
    }
    /// The BOS token when the model wants one at the start of each text (Gemma), else None
    /// (GPT-2, SmolLM2, Qwen2).
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }
    /// Where the tokenizer came from (a tokenizer.json or a GGUF file).
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
    /// The ids of `text` with no special tokens added (special tokens spelled in the text are
    /// still recognised).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| bad_data(&self.path, format!("encoding failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| bad_data(&self.path, format!("decoding failed: {e}")))
    }
    /// The underlying `tokenizers` tokenizer (tests compare its parts with transformers').
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
    /// Refuse a tokenizer whose ids do not all fit the model's embedding.
    pub fn check_model_vocab(&self, model_vocab: usize) -> Result<()> {
        if self.vocab_size() > model_vocab {
            return Err(bad_data(
                &self.path,
                format!(
                    "the tokenizer has {} tokens but the model's vocabulary has {model_vocab}: they do not belong together \
                     (pass the model's own tokenizer with --tokenizer)",
                    self.vocab_size()
                ),
            ));
        }
        Ok(())
    }
}

/// The token a tokenizer.json's post-processor puts before a single text, if any: encode a
/// text with and without special tokens and see what comes first.
fn added_bos(inner: &tokenizers::Tokenizer) -> Option<u32> {
    let plain = inner.encode("a", false).ok()?;
    let with = inner.encode("a", true).ok()?;
    let (plain, with) = (plain.get_ids(), with.get_ids());
    let at = (0..with.len()).find(|&i| with[i..].starts_with(plain))?;
    (at > 0).then(|| with[0])
}
