//! A tokenizer rebuilt from a GGUF file's `tokenizer.ggml.*` metadata, so that a `.gguf` model
//! needs no tokenizer.json. A GGUF stores the vocabulary (`tokens`, with `token_type` and
//! `scores`), the BPE `merges` when it has them, the special token ids and `add_bos_token`.
//!
//! The reference whose ids we match is transformers' GGUF conversion
//! (`integrations/gguf/gguf_tokenizer_mapping.py`, transformers 5.x), which hands the same
//! metadata to its Gemma, Llama and GPT-2 tokenizer classes:
//! - `gpt2` (byte-level BPE: SmolLM2, Qwen2, Llama 3): vocabulary spelled in GPT-2's byte
//!   alphabet, the file's merges, the `ByteLevel` pre-tokenizer (GPT-2's split regex) unless
//!   `tokenizer.ggml.pre` names a family with its own split regex (Llama 3, Qwen2, ...).
//! - `llama` (SentencePiece vocabularies as BPE with byte fallback): for Gemma, tokens made of
//!   spaces are respelled with `▁`, spaces become `▁` in a normalizer, and the merges (the file
//!   has none) are every split of a token into two tokens, best first by the token's position
//!   in the file; for other architectures `Metaspace` prepends `▁` to the text and the merges
//!   come from the file, else from the tokens' scores.
//!
//! Tokens of type CONTROL become special added tokens (matched whole in text) and USER_DEFINED
//! ones plain added tokens, as transformers adds them.

use crate::error::{Error, Result};
use crate::weights::gguf::{GgufFile, MetaValue};
use std::collections::HashMap;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// SentencePiece's word-start mark, which stands for a space.
const SPACE_MARK: char = '\u{2581}';

/// The pre-tokenizer split regexes of the byte-level families transformers knows by
/// `tokenizer.ggml.pre` (any other name, `smollm` and `default` included, keeps GPT-2's).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn split_regex(pre: &str) -> Option<&'static str> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2"
        | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3_SPLIT,
        "tekken" => TEKKEN_SPLIT,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2_SPLIT,
        "qwen35" => QWEN35_SPLIT,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O_SPLIT,
        _ => return None,
    })
}

/// What the file says about its tokenizer, ready for the rest of the crate.
pub(super) struct Built {
    pub inner: tokenizers::Tokenizer,
    /// The BOS id when the model wants one at the start of a text (`add_bos_token`).
    pub bos: Option<u32>,
    pub eos: u32,
}

/// Typed access to the `tokenizer.ggml.*` keys, with errors that name the file and the key.
struct Meta<'a> {
    file: &'a GgufFile,
}

impl Meta<'_> {
    fn err(&self, detail: impl Into<String>) -> Error {
        Error::Checkpoint { path: self.file.path().to_path_buf(), detail: detail.into() }
    }
    fn array(&self, key: &str) -> Result<Option<&[MetaValue]>> {
        match self.file.get(key) {
            None => Ok(None),
            Some(v) => v.as_array().map(Some).ok_or_else(|| self.err(format!("{key} is not an array"))),
        }
    }
    fn strings(&self, key: &str) -> Result<Option<Vec<&str>>> {
        let Some(items) = self.array(key)? else { return Ok(None) };
        let strs: Option<Vec<&str>> = items.iter().map(MetaValue::as_str).collect();
        strs.map(Some).ok_or_else(|| self.err(format!("{key} holds a value that is not a string")))
    }
    fn numbers<T>(
        &self,
        key: &str,
        n: usize,
        get: impl Fn(&MetaValue) -> Option<T>,
    ) -> Result<Option<Vec<T>>> {
        let Some(items) = self.array(key)? else { return Ok(None) };
        if items.len() != n {
            return Err(self.err(format!("{key} has {} entries but there are {n} tokens", items.len())));
        }
        let vals: Option<Vec<T>> = items.iter().map(get).collect();
        vals.map(Some).ok_or_else(|| self.err(format!("{key} holds a value that is not a number")))
    }
    /// A token id, checked against the vocabulary.
    fn id(&self, key: &str, n: usize) -> Result<Option<u32>> {
        let Some(v) = self.file.get(key) else { return Ok(None) };
        match v.as_u64() {
            Some(id) if (id as usize) < n => Ok(Some(id as u32)),
            _ => Err(self.err(format!("{key} = {v:?} is not a token id below the vocabulary size {n}"))),
        }
    }
    fn flag(&self, key: &str) -> Result<Option<bool>> {
        match self.file.get(key) {
            None => Ok(None),
            Some(v) => {
                v.as_bool().map(Some).ok_or_else(|| self.err(format!("{key} = {v:?} is not a boolean")))
            }
        }
    }
}

/// Build the tokenizer the file describes.
pub(super) fn build(file: &GgufFile) -> Result<Built> {
    let m = Meta { file };
    let kind = file.get("tokenizer.ggml.model").and_then(MetaValue::as_str);
    let (Some(kind), Some(tokens)) = (kind, m.strings("tokenizer.ggml.tokens")?) else {
        return Err(m.err(
            "the file carries no tokenizer (no tokenizer.ggml.model and tokenizer.ggml.tokens in its \
             metadata); pass the model's tokenizer.json with --tokenizer",
        ));
    };
    if tokens.is_empty() {
        return Err(m.err("tokenizer.ggml.tokens is empty"));
    }
    let n = tokens.len();
    let arch = file.get("general.architecture").and_then(MetaValue::as_str).unwrap_or("");
    let types = m.numbers("tokenizer.ggml.token_type", n, MetaValue::as_i64)?;
    let merges = match m.strings("tokenizer.ggml.merges")? {
        None => None,
        Some(list) => Some(split_merges(&m, &list)?),
    };
    let unsupported = |what: String| {
        m.err(format!(
            "{what}: pockettune cannot build this tokenizer from the file; pass the model's tokenizer.json \
             with --tokenizer"
        ))
    };
    let mut inner = match kind {
        "gpt2" => {
            let merges =
                merges.ok_or_else(|| m.err("a gpt2 tokenizer needs tokenizer.ggml.merges; it is missing"))?;
            let pre = file.get("tokenizer.ggml.pre").and_then(MetaValue::as_str).unwrap_or("default");
            byte_level(&m, &tokens, merges, pre)?
        }
        "llama" if matches!(arch, "gemma" | "gemma2" | "gemma3") => gemma(&m, &tokens)?,
        "llama" if arch == "phi3" => return Err(unsupported("a phi3 SentencePiece vocabulary".into())),
        "llama" => {
            let scores = m.numbers("tokenizer.ggml.scores", n, MetaValue::as_f64)?;
            llama(&m, &tokens, scores, merges)?
        }
        other => {
            return Err(unsupported(format!(
                "tokenizer.ggml.model = {other:?} (gpt2 and llama are supported)"
            )))
        }
    };
    if let Some(types) = &types {
        add_special_tokens(&mut inner, kind, &tokens, types);
    }

    // Older SentencePiece files have no add_bos_token and llama.cpp adds BOS to them.
    let add_bos = m.flag("tokenizer.ggml.add_bos_token")?.unwrap_or(kind == "llama");
    let bos = match (add_bos, m.id("tokenizer.ggml.bos_token_id", n)?) {
        (false, _) => None,
        (true, Some(id)) => Some(id),
        (true, None) => return Err(m.err("tokenizer.ggml.add_bos_token is set but there is no bos_token_id")),
    };
    let eos = m
        .id("tokenizer.ggml.eos_token_id", n)?
        .ok_or_else(|| m.err("no tokenizer.ggml.eos_token_id: the end-of-text token is unknown"))?;
    Ok(Built { inner, bos, eos })
}

/// `"left right"` merge strings into pairs.
fn split_merges(m: &Meta, list: &[&str]) -> Result<Vec<(String, String)>> {
    list.iter()
        .enumerate()
        .map(|(i, s)| match s.split_once(' ') {
            Some((l, r)) if !l.is_empty() && !r.is_empty() && !r.contains(' ') => {
                Ok((l.to_string(), r.to_string()))
            }
            _ => Err(
                m.err(format!("tokenizer.ggml.merges[{i}] = {s:?} is not two tokens separated by a space"))
            ),
        })
        .collect()
}

/// The vocabulary as `tokenizers` wants it: token -> id, the last id winning for a repeated
/// token (as a Python dict built from the list does).
fn vocab_of(tokens: &[String]) -> tokenizers::models::bpe::Vocab {
    tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect()
}

fn bpe(
    m: &Meta,
    tokens: &[String],
    merges: Vec<(String, String)>,
    sentencepiece: Option<&str>,
) -> Result<BPE> {
    let mut b = BPE::builder().vocab_and_merges(vocab_of(tokens), merges);
    b = match sentencepiece {
        Some(unk) => b.unk_token(unk.to_string()).fuse_unk(true).byte_fallback(true),
        None => b.continuing_subword_prefix(String::new()).end_of_word_suffix(String::new()),
    };
    b.build().map_err(|e| m.err(format!("the tokenizer's merges do not fit its vocabulary: {e}")))
}

/// GPT-2's reversible map of bytes to printable characters: printable Latin-1 bytes stand for
/// themselves, the other bytes take the code points from 256 up, in byte order.
fn byte_alphabet() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut next = 256u32;
    for (b, c) in out.iter_mut().enumerate() {
        let printable = matches!(b, 33..=126 | 161..=172 | 174..=255);
        *c = if printable {
            char::from(b as u8)
        } else {
            next += 1;
            char::from_u32(next - 1).expect("below the surrogates")
        };
    }
    out
}

fn byte_level(
    m: &Meta,
    tokens: &[&str],
    merges: Vec<(String, String)>,
    pre: &str,
) -> Result<tokenizers::Tokenizer> {
    let alphabet = byte_alphabet();
    // Files store byte-level tokens as spelled; one with characters outside the alphabet is
    // raw text and gets spelled byte by byte.
    let spelled: Vec<String> = tokens
        .iter()
        .map(|t| {
            if t.chars().all(|c| alphabet.contains(&c)) {
                t.to_string()
            } else {
                t.bytes().map(|b| alphabet[b as usize]).collect()
            }
        })
        .collect();
    let mut tok = tokenizers::Tokenizer::new(bpe(m, &spelled, merges, None)?);
    let pre_tokenizer: PreTokenizerWrapper = match split_regex(pre) {
        None => ByteLevel::new(false, true, true).into(),
        Some(re) => {
            let split = Split::new(SplitPattern::Regex(re.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| {
                m.err(format!("the split regex for tokenizer.ggml.pre = {pre:?} does not compile: {e}"))
            })?;
            PreSequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into()
        }
    };
    tok.with_pre_tokenizer(Some(pre_tokenizer));
    tok.with_decoder(Some(ByteLevel::default()));
    Ok(tok)
}

/// `str.isspace` of Python (Unicode White_Space plus the separators U+001C..U+001F).
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn sentencepiece_decoder(strip_first_space: bool) -> DecoderWrapper {
    let mut steps: Vec<DecoderWrapper> = vec![
        Replace::new(SPACE_MARK.to_string(), " ").expect("a plain string pattern").into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if strip_first_space {
        steps.push(Strip::new(' ', 1, 0).into());
    }
    DecoderSequence::new(steps).into()
}

fn unk_token(m: &Meta, tokens: &[&str]) -> String {
    // transformers' SentencePiece classes use "<unk>" whatever the file says; a file that names
    // another unknown token gets that one (it only shows when byte fallback fails too).
    match m.file.get("tokenizer.ggml.unknown_token_id").and_then(MetaValue::as_u64) {
        Some(id) if (id as usize) < tokens.len() => tokens[id as usize].to_string(),
        _ => "<unk>".into(),
    }
}

fn gemma(m: &Meta, tokens: &[&str]) -> Result<tokenizers::Tokenizer> {
    // Runs of spaces are stored as real spaces but looked up as `▁` runs after the normalizer.
    let spelled: Vec<String> = tokens
        .iter()
        .map(|t| {
            if t.contains(' ') && t.chars().all(py_isspace) {
                SPACE_MARK.to_string().repeat(t.chars().count())
            } else {
                t.to_string()
            }
        })
        .collect();
    // Gemma's scores do not follow its merge order; the tokens' order in the file does.
    let by_position: Vec<f64> = (0..spelled.len()).map(|i| -(i as f64)).collect();
    let merges = merges_from_vocab(&spelled, &by_position);
    let unk = unk_token(m, tokens);
    let mut tok = tokenizers::Tokenizer::new(bpe(m, &spelled, merges, Some(&unk))?);
    tok.with_normalizer(Some(Replace::new(" ", SPACE_MARK.to_string()).expect("a plain string pattern")));
    let split =
        Split::new(" ", SplitDelimiterBehavior::MergedWithPrevious, false).expect("a plain string pattern");
    tok.with_pre_tokenizer(Some(split));
    tok.with_decoder(Some(sentencepiece_decoder(false)));
    Ok(tok)
}

fn llama(
    m: &Meta,
    tokens: &[&str],
    scores: Option<Vec<f64>>,
    merges: Option<Vec<(String, String)>>,
) -> Result<tokenizers::Tokenizer> {
    let owned: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
    let merges = match (merges, scores) {
        (Some(merges), _) => merges,
        (None, Some(scores)) => merges_from_vocab(&owned, &scores),
        (None, None) => {
            return Err(m.err("a llama tokenizer needs tokenizer.ggml.merges or tokenizer.ggml.scores"))
        }
    };
    let unk = unk_token(m, tokens);
    let mut tok = tokenizers::Tokenizer::new(bpe(m, &owned, merges, Some(&unk))?);
    tok.with_pre_tokenizer(Some(Metaspace::new(SPACE_MARK, PrependScheme::First, false)));
    tok.with_decoder(Some(sentencepiece_decoder(true)));
    Ok(tok)
}

/// BPE merges implied by a vocabulary: every split of a token into two tokens of the
/// vocabulary, best first by the token's score; among one token's splits, the longer left part
/// first, then the longer right part, then by the parts' ids (transformers' `generate_merges`).
fn merges_from_vocab(tokens: &[String], scores: &[f64]) -> Vec<(String, String)> {
    let id: HashMap<&str, u32> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i as u32)).collect();
    // A repeated token counts once, where it first appears, with its last score (dict semantics).
    let mut score: HashMap<&str, f64> = HashMap::new();
    let mut order = Vec::new();
    for (t, &s) in tokens.iter().zip(scores) {
        if score.insert(t.as_str(), s).is_none() {
            order.push(t.as_str());
        }
    }
    struct Merge<'a> {
        score: f64,
        left: &'a str,
        right: &'a str,
        left_chars: usize,
        right_chars: usize,
    }
    let mut merges = Vec::new();
    for t in order {
        let mut local: Vec<(u32, u32, &str, &str)> = t
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (l, r) = t.split_at(at);
                Some((*id.get(l)?, *id.get(r)?, l, r))
            })
            .collect();
        local.sort_by_key(|&(il, ir, _, _)| (il, ir));
        let s = score[t];
        merges.extend(local.into_iter().map(|(_, _, left, right)| Merge {
            score: s,
            left,
            right,
            left_chars: left.chars().count(),
            right_chars: right.chars().count(),
        }));
    }
    // Descending and stable, as Python's sorted(..., reverse=True).
    merges.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(b.left_chars.cmp(&a.left_chars))
            .then(b.right_chars.cmp(&a.right_chars))
    });
    merges.into_iter().map(|x| (x.left.to_string(), x.right.to_string())).collect()
}

/// CONTROL tokens as special added tokens, USER_DEFINED ones that the vocabulary already spells
/// the same way as plain added tokens, both matched whole in text before normalization.
fn add_special_tokens(tok: &mut tokenizers::Tokenizer, kind: &str, tokens: &[&str], types: &[i64]) {
    let alphabet = byte_alphabet();
    let control: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|&(t, &ty)| {
            // In a byte-level vocabulary a control token outside the byte alphabet is a
            // mislabel; adding it would grow the vocabulary past the model's.
            ty == CONTROL && (kind != "gpt2" || t.chars().all(|c| alphabet.contains(&c)))
        })
        .map(|(t, _)| AddedToken::from(t.to_string(), true).normalized(false))
        .collect();
    if !control.is_empty() {
        tok.add_special_tokens(&control);
    }
    let user: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|&(t, &ty)| ty == USER_DEFINED && tok.token_to_id(t).is_some())
        .map(|(t, _)| AddedToken::from(t.to_string(), false).normalized(false))
        .collect();
    if !user.is_empty() {
        tok.add_tokens(&user);
    }
}
