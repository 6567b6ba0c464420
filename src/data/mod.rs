//! Training data: text and JSONL files into fixed-length windows of token ids.
//!
//! Convention (also in the README): each document is `tokenizer.encode(text)` with no special
//! tokens added, preceded by the BOS token when the model wants one (Gemma: its tokenizer adds
//! BOS to every text, so the model was trained on documents that start with it; BOS is an
//! input, never a target); documents are joined by the tokenizer's end-of-text token (a GGUF
//! file's EOS token); training sequences are consecutive windows of `seq_len + 1` tokens
//! starting every `seq_len` tokens (inputs and targets shifted by one, so every token is a
//! target exactly once), in file order unless shuffled. Documents are a text file (one
//! document), every `.txt`/`.md`/`.jsonl` file of a directory (sorted by name), or JSONL lines
//! of `{"text": ...}` or `{"prompt": ..., "completion": ...}`; for the latter the loss is taken
//! on the completion tokens (and the end-of-text after them) only.

mod gguf_tokenizer;
mod tokenizer;

pub use tokenizer::Tokenizer;

use crate::error::{Error, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::Path;

/// Target value that takes no loss (PyTorch's ignore_index).
pub const IGNORE: i32 = -100;

pub(crate) fn bad_data(path: &Path, detail: impl Into<String>) -> Error {
    Error::Checkpoint { path: path.to_path_buf(), detail: detail.into() }
}

/// A token stream and, per token, whether it counts as a target.
#[derive(Clone, Debug, Default)]
pub struct Tokens {
    pub ids: Vec<u32>,
    pub counts: Vec<bool>,
}

impl Tokens {
    fn push(&mut self, id: u32, counted: bool) {
        self.ids.push(id);
        self.counts.push(counted);
    }

    /// Append a document: the end-of-text token closing the one before (a target when that
    /// document's last token was: after a completion or a text, not after a prompt), then BOS
    /// when the model wants one (an input only: nothing predicts the start of a document),
    /// then the document's tokens.
    fn push_doc(&mut self, tok: &Tokenizer, ids: &[u32], counted: bool) {
        if let Some(&last) = self.counts.last() {
            self.push(tok.eot(), last);
        }
        if let Some(bos) = tok.bos() {
            self.push(bos, false);
        }
        self.ids.extend_from_slice(ids);
        self.counts.extend(std::iter::repeat_n(counted, ids.len()));
    }

    /// Load a text file, a directory of them, or a JSONL file.
    pub fn load(path: &Path, tok: &Tokenizer) -> Result<Tokens> {
        let mut files = Vec::new();
        if path.is_dir() {
            let entries = std::fs::read_dir(path).map_err(|e| Error::Io { path: path.into(), cause: e })?;
            for e in entries {
                let p = e.map_err(|e| Error::Io { path: path.into(), cause: e })?.path();
                let ext = p.extension().and_then(|x| x.to_str()).unwrap_or("");
                if p.is_file() && matches!(ext, "txt" | "md" | "jsonl") {
                    files.push(p);
                }
            }
            files.sort();
            if files.is_empty() {
                return Err(bad_data(path, "the directory holds no .txt, .md or .jsonl file"));
            }
        } else if path.is_file() {
            files.push(path.to_path_buf());
        } else {
            return Err(bad_data(path, "no such file or directory"));
        }
        let mut out = Tokens::default();
        for f in &files {
            let text = std::fs::read_to_string(f).map_err(|e| Error::Io { path: f.clone(), cause: e })?;
            if f.extension().is_some_and(|e| e == "jsonl") {
                for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                    let v: serde_json::Value = serde_json::from_str(line)
                        .map_err(|e| bad_data(f, format!("line {}: not JSON: {e}", n + 1)))?;
                    match (v.get("text"), v.get("prompt"), v.get("completion")) {
                        (Some(t), _, _) => {
                            let t = t.as_str().ok_or_else(|| bad_data(f, format!("line {}: text is not a string", n + 1)))?;
                            out.push_doc(tok, &tok.encode(t)?, true);
                        }
                        (None, Some(p), Some(c)) => {
                            let (Some(p), Some(c)) = (p.as_str(), c.as_str()) else {
                                return Err(bad_data(f, format!("line {}: prompt and completion must be strings", n + 1)));
                            };
                            out.push_doc(tok, &tok.encode(p)?, false);
                            // The completion continues the prompt: no separator between them.
                            let c_ids = tok.encode(c)?;
                            out.counts.extend(std::iter::repeat_n(true, c_ids.len()));
                            out.ids.extend(c_ids);
                        }
                        _ => {
                            return Err(bad_data(
                                f,
                                format!("line {}: expected {{\"text\": ...}} or {{\"prompt\": ..., \"completion\": ...}}", n + 1),
                            ))
                        }
                    }
                }
            } else {
                out.push_doc(tok, &tok.encode(&text)?, true);
            }
        }
        if out.ids.is_empty() {
            return Err(bad_data(path, "the data holds no tokens"));
        }
        Ok(out)
    }

    /// The (inputs, targets) of window `w` of `seq` tokens.
    pub fn window(&self, w: usize, seq: usize) -> (Vec<u32>, Vec<i32>) {
        let s = w * seq;
        let inputs = self.ids[s..s + seq].to_vec();
        let targets =
            (s + 1..s + seq + 1).map(|j| if self.counts[j] { self.ids[j] as i32 } else { IGNORE }).collect();
        (inputs, targets)
    }

    pub fn windows(&self, seq: usize) -> usize {
        self.ids.len().saturating_sub(1) / seq.max(1)
    }

    /// Split off the last `fraction` of the windows (at least one) as held-out data.
    pub fn split_eval(self, fraction: f64, seq: usize) -> (Tokens, Tokens) {
        let n = self.windows(seq);
        let held = ((n as f64 * fraction).round() as usize).clamp(1, n.saturating_sub(1).max(1));
        let cut = (n - held) * seq;
        let eval = Tokens { ids: self.ids[cut..].to_vec(), counts: self.counts[cut..].to_vec() };
        let train = Tokens { ids: self.ids[..cut + 1].to_vec(), counts: self.counts[..cut + 1].to_vec() };
        (train, eval)
    }
}

/// Batches of windows in file order or a seeded shuffle per epoch; the position is what a
/// checkpoint records to resume exactly.
#[derive(Clone, Debug)]
pub struct Batches {
    windows: usize,
    batch: usize,
    seq: usize,
    shuffle: bool,
    seed: u64,
    pub epoch: usize,
    /// next batch within the epoch
    pub index: usize,
    order: Vec<usize>,
}

impl Batches {
    pub fn new(
        tokens: &Tokens,
        batch: usize,
        seq: usize,
        shuffle: bool,
        seed: u64,
        path: &Path,
    ) -> Result<Batches> {
        let windows = tokens.windows(seq);
        if windows < batch {
            return Err(bad_data(
                path,
                format!(
                    "the data has {} tokens: {windows} windows of {} tokens, fewer than one batch of {batch}; \
                     add data or lower --batch-size / --seq-len",
                    tokens.ids.len(),
                    seq + 1
                ),
            ));
        }
        let mut b = Batches { windows, batch, seq, shuffle, seed, epoch: 0, index: 0, order: Vec::new() };
        b.reorder();
        Ok(b)
    }

    fn reorder(&mut self) {
        self.order = (0..self.windows).collect();
        if self.shuffle {
            let mut rng =
                rand::rngs::StdRng::seed_from_u64(self.seed ^ (self.epoch as u64).wrapping_mul(0x9e37_79b9));
            self.order.shuffle(&mut rng);
        }
    }

    /// Full batches per epoch (a partial last batch is dropped).
    pub fn per_epoch(&self) -> usize {
        self.windows / self.batch
    }

    /// Move to a recorded position.
    pub fn seek(&mut self, epoch: usize, index: usize) {
        self.epoch = epoch;
        self.index = index;
        self.reorder();
    }

    /// The next batch: (inputs, targets), each batch * seq long.
    pub fn next(&mut self, tokens: &Tokens) -> (Vec<u32>, Vec<i32>) {
        if self.index >= self.per_epoch() {
            self.epoch += 1;
            self.index = 0;
            self.reorder();
        }
        let (mut ids, mut targets) = (Vec::new(), Vec::new());
        for k in 0..self.batch {
            let (i, t) = tokens.window(self.order[self.index * self.batch + k], self.seq);
            ids.extend(i);
            targets.extend(t);
        }
        self.index += 1;
        (ids, targets)
    }
}
