//! MMLU accuracy (Hendrycks et al., "Measuring Massive Multitask Language Understanding", ICLR
//! 2021) by the protocol of EleutherAI's lm-evaluation-harness `mmlu` task, so that figures
//! compare with published ones.
//!
//! The data is the Hugging Face copy of MMLU as Arrow IPC streams,
//! `DIR/<subject>/{dev,validation,test}/data-*.arrow` with fields question, choices (4 strings)
//! and answer (0-3); `tools/fetch_assets.sh` fetches it. The prompt is lm-eval's
//! (`lm_eval/tasks/mmlu/default/_default_template_yaml`, `_generate_configs.py`): the
//! description "The following are multiple choice questions (with answers) about {subject}.\n\n",
//! the first k `dev` questions each followed by " {letter}\n\n", then the question, each as
//! "{question.strip()}\nA. {c0}\nB. {c1}\nC. {c2}\nD. {c3}\nAnswer:". The model's choice is the
//! letter whose continuation (" A" ... " D") has the highest log-likelihood, and the
//! log-likelihoods are computed as lm-eval's Hugging Face backend does (`_encode_pair`,
//! `_loglikelihood_tokens`): the continuation's ids are those of `encode(context + continuation)`
//! after `encode(context)`'s length, the input is `(context + continuation)[:-1]` cut from the left
//! to the model's positions, and each continuation token adds its log-softmax. When the four
//! continuations share their input (one token each, the usual case) one forward pass serves all
//! four; inputs are batched, padded on the right (causal attention never looks right), and read
//! at each input's own positions. Accuracy is averaged over subjects (macro) and over questions
//! (micro, lm-eval's `mmlu` group figure).

use crate::data::Tokenizer;
use crate::error::{Error, Result};
use crate::graph::ParamStore;
use crate::models::Model;
use arrow_array::cast::AsArray;
use arrow_array::types::{
    Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type, UInt32Type, UInt64Type, UInt8Type,
};
use arrow_array::{Array, RecordBatch};
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The answer letters, in the order of `choices`.
pub const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

/// Values of one forward pass's activations at most (B x T x 4096 floats, 1 GiB): only the
/// positions that predict an answer get logits, so the batch is bounded by the activations.
const ACTIVATION_BUDGET: usize = 1 << 28;

/// One MMLU question.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Question {
    pub question: String,
    pub choices: Vec<String>,
    /// index into `choices` of the right answer
    pub answer: usize,
}

/// The split whose questions are scored (the few-shot examples always come from `dev`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Test,
    Validation,
}

impl Split {
    pub fn dir(self) -> &'static str {
        match self {
            Split::Test => "test",
            Split::Validation => "validation",
        }
    }
}

fn bad_file(path: &Path, detail: impl Into<String>) -> Error {
    Error::Checkpoint { path: path.to_path_buf(), detail: detail.into() }
}

/// The `data-*.arrow` files of `DIR/<subject>/<split>`, in order (Hugging Face splits large
/// splits into several files); empty when the folder is missing.
fn split_files(dir: &Path, subject: &str, split: &str) -> Result<Vec<PathBuf>> {
    let folder = dir.join(subject).join(split);
    if !folder.is_dir() {
        return Ok(Vec::new());
    }
    let entries = std::fs::read_dir(&folder).map_err(|e| Error::Io { path: folder.clone(), cause: e })?;
    let mut files = Vec::new();
    for e in entries {
        let p = e.map_err(|e| Error::Io { path: folder.clone(), cause: e })?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("data-") && name.ends_with(".arrow") {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// The subjects in `dir` that have `split` questions, sorted by name.
pub fn subjects(dir: &Path, split: Split) -> Result<Vec<String>> {
    if !dir.is_dir() {
        return Err(bad_file(
            dir,
            "no such MMLU directory (`tools/fetch_assets.sh` puts MMLU in assets/mmlu)",
        ));
    }
    let entries = std::fs::read_dir(dir).map_err(|e| Error::Io { path: dir.into(), cause: e })?;
    let mut found = Vec::new();
    for e in entries {
        let p = e.map_err(|e| Error::Io { path: dir.into(), cause: e })?.path();
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else { continue };
        if p.is_dir() && !split_files(dir, name, split.dir())?.is_empty() {
            found.push(name.to_string());
        }
    }
    found.sort();
    if found.is_empty() {
        return Err(bad_file(
            dir,
            format!(
                "no MMLU subjects here: expected <subject>/{}/data-00000-of-00001.arrow folders \
                 (as `tools/fetch_assets.sh` fetches them into assets/mmlu)",
                split.dir()
            ),
        ));
    }
    Ok(found)
}

/// The questions of one split of one subject, in file order.
pub fn read_split(dir: &Path, subject: &str, split: &str) -> Result<Vec<Question>> {
    let files = split_files(dir, subject, split)?;
    if files.is_empty() {
        return Err(bad_file(
            &dir.join(subject).join(split),
            "no data-*.arrow file: this subject has no such split",
        ));
    }
    let mut out = Vec::new();
    for f in files {
        out.extend(read_arrow(&f)?);
    }
    Ok(out)
}

/// The questions of one Arrow IPC stream file. Every row must have a question, 4 choices and an
/// answer in 0-3.
pub fn read_arrow(path: &Path) -> Result<Vec<Question>> {
    let bytes = std::fs::read(path).map_err(|e| Error::Io { path: path.into(), cause: e })?;
    let unreadable = |e: String| {
        bad_file(
            path,
            format!("not a readable Arrow IPC stream ({e}); is it truncated or corrupt? Fetch it again"),
        )
    };
    // A stream ends with an end-of-stream marker (0xFFFFFFFF, then a zero length; every writer
    // since Arrow 0.15 writes it): without it a file cut between two messages would read as
    // fewer rows. (The pre-0.15 marker, 4 zero bytes, cannot be told from a body's zero padding.)
    if !bytes.ends_with(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]) {
        return Err(unreadable("no end-of-stream marker at its end".into()));
    }
    // The push decoder over the bytes in memory, not arrow-ipc's StreamReader: the reader
    // allocates a message body of whatever length the message claims before reading it, so one
    // corrupt length aborted the process asking for hundreds of GB. arrow-ipc validates what it
    // decodes; a panic on bytes it did not foresee becomes the same error as a failed check.
    let read = std::panic::catch_unwind(move || -> std::result::Result<Vec<RecordBatch>, String> {
        let mut decoder = arrow_ipc::reader::StreamDecoder::new();
        let mut buffer = arrow_buffer::Buffer::from(bytes);
        let mut batches = Vec::new();
        while !buffer.is_empty() {
            batches.extend(decoder.decode(&mut buffer).map_err(|e| e.to_string())?);
        }
        decoder.finish().map_err(|e| e.to_string())?;
        Ok(batches)
    });
    let batches = match read {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return Err(unreadable(e)),
        Err(_) => return Err(unreadable("the Arrow decoder panicked on it".into())),
    };
    let mut out = Vec::new();
    for batch in &batches {
        let column = |name: &str| {
            batch.column_by_name(name).ok_or_else(|| {
                bad_file(path, format!("no `{name}` column; MMLU files have question, choices and answer"))
            })
        };
        let (questions, choices, answers) = (column("question")?, column("choices")?, column("answer")?);
        for i in 0..batch.num_rows() {
            let row = out.len();
            let at = |what: &str| format!("row {row}: {what}");
            let question = string_at(questions.as_ref(), i)
                .ok_or_else(|| bad_file(path, at("the question is missing or not a string")))?;
            let choices = string_list_at(choices.as_ref(), i)
                .ok_or_else(|| bad_file(path, at("choices is missing or not a list of strings")))?;
            if choices.len() != LETTERS.len() {
                return Err(bad_file(
                    path,
                    at(&format!("{} choices; MMLU questions have 4 (A-D)", choices.len())),
                ));
            }
            let answer = int_at(answers.as_ref(), i)
                .ok_or_else(|| bad_file(path, at("the answer is missing or not an integer")))?;
            if !(0..LETTERS.len() as i128).contains(&answer) {
                return Err(bad_file(path, at(&format!("answer {answer} is not a choice (0-3 for A-D)"))));
            }
            out.push(Question { question, choices, answer: answer as usize });
        }
    }
    Ok(out)
}

/// Row `i` of a string column (any of Arrow's string layouts); None if null or not strings.
fn string_at(a: &dyn Array, i: usize) -> Option<String> {
    if a.is_null(i) {
        return None;
    }
    if let Some(s) = a.as_string_opt::<i32>() {
        return Some(s.value(i).to_string());
    }
    if let Some(s) = a.as_string_opt::<i64>() {
        return Some(s.value(i).to_string());
    }
    a.as_string_view_opt().map(|s| s.value(i).to_string())
}

/// Row `i` of a list-of-strings column; None if null, not a list, or any item is not a string.
fn string_list_at(a: &dyn Array, i: usize) -> Option<Vec<String>> {
    if a.is_null(i) {
        return None;
    }
    let items = if let Some(l) = a.as_list_opt::<i32>() {
        l.value(i)
    } else if let Some(l) = a.as_list_opt::<i64>() {
        l.value(i)
    } else {
        a.as_fixed_size_list_opt()?.value(i)
    };
    (0..items.len()).map(|j| string_at(items.as_ref(), j)).collect()
}

/// Row `i` of an integer column of any width (Hugging Face stores ClassLabel as int64).
fn int_at(a: &dyn Array, i: usize) -> Option<i128> {
    if a.is_null(i) {
        return None;
    }
    macro_rules! try_type {
        ($($t:ty),*) => {$(
            if let Some(p) = a.as_primitive_opt::<$t>() {
                return Some(p.value(i) as i128);
            }
        )*};
    }
    try_type!(Int64Type, Int32Type, Int16Type, Int8Type, UInt64Type, UInt32Type, UInt16Type, UInt8Type);
    None
}

/// lm-eval's task description for `subject` (underscores as spaces).
pub fn description(subject: &str) -> String {
    format!(
        "The following are multiple choice questions (with answers) about {}.\n\n",
        subject.replace('_', " ")
    )
}

/// Python's `str.strip()`: Rust's `trim` plus the four ASCII separators (U+001C-U+001F) that
/// Python also counts as whitespace.
fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// One question as lm-eval's `doc_to_text` writes it (ending in "Answer:").
pub fn question_text(q: &Question) -> String {
    let mut s = py_strip(&q.question).to_string();
    for (letter, choice) in LETTERS.iter().zip(&q.choices) {
        s.push_str(&format!("\n{letter}. {choice}"));
    }
    s.push_str("\nAnswer:");
    s
}

/// The whole prompt for `q`: description, the `shots` examples with their answers, `q`.
pub fn prompt(subject: &str, shots: &[Question], q: &Question) -> String {
    let mut s = description(subject);
    for ex in shots {
        s.push_str(&question_text(ex));
        s.push(' ');
        s.push_str(LETTERS[ex.answer]);
        s.push_str("\n\n");
    }
    s.push_str(&question_text(q));
    s
}

/// THE place where text becomes the model's token ids for scoring: the tokenizer's ids, after
/// the BOS token when the model's tokenizer puts one before every text ([`Tokenizer::bos`]), as
/// lm-eval encodes with the tokenizer's special tokens: Gemma's `<bos>`, nothing for GPT-2.
fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let mut ids: Vec<u32> = tok.bos().into_iter().collect();
    ids.extend(tok.encode(text)?);
    Ok(ids)
}

/// A log-likelihood request: the continuation's ids after the context's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub context: Vec<u32>,
    pub continuation: Vec<u32>,
}

/// lm-eval's `_encode_pair`: trailing whitespace of the context moves to the continuation, the
/// continuation's ids are those of `encode(context + continuation)` past `encode(context)`.
pub fn encode_pair(tok: &Tokenizer, context: &str, continuation: &str) -> Result<Request> {
    let kept = context.trim_end();
    let continuation = format!("{}{continuation}", &context[kept.len()..]);
    let whole = encode(tok, &format!("{kept}{continuation}"))?;
    let context = encode(tok, kept)?;
    let continuation = whole.get(context.len()..).unwrap_or_default().to_vec();
    Ok(Request { context, continuation })
}

/// Log-likelihoods of a list of requests, and which were cut on the left to fit.
#[derive(Clone, Debug, Default)]
pub struct Scores {
    pub loglikelihoods: Vec<f64>,
    /// per request: whether its input lost its first tokens
    pub truncated: Vec<bool>,
    pub forward_passes: usize,
}

/// `log softmax(row)[token]`, in f64.
fn log_prob(row: &[f32], token: u32) -> Result<f64> {
    if let Some(i) = row.iter().position(|x| x.is_nan() || *x == f32::INFINITY) {
        return Err(Error::NonFiniteLogits { detail: format!("the logit of token {i} is {}", row[i]) });
    }
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    if max == f64::NEG_INFINITY {
        return Err(Error::NonFiniteLogits { detail: format!("no finite logit among {}", row.len()) });
    }
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    Ok(row[token as usize] as f64 - max - sum.ln())
}

/// The sum of the continuation tokens' log-softmax for every request. Requests with the same
/// input (context + continuation minus its last token) share one forward pass; inputs are sorted
/// by length, batched up to `batch` sequences (fewer when their activations would pass
/// `ACTIVATION_BUDGET`), padded on the right, and the logits computed only at the positions that
/// predict a continuation token. An input longer than
/// the model's positions loses its first tokens, as in lm-eval. `progress(done, total)` is called
/// after each forward pass, with counts of distinct inputs.
pub fn loglikelihoods(
    model: &Model,
    store: &ParamStore,
    requests: &[Request],
    batch: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Scores> {
    let (max, vocab) = (model.max_positions(), model.vocab_size());
    let mut inputs: Vec<Vec<u32>> = Vec::new();
    let mut index: HashMap<Vec<u32>, usize> = HashMap::new();
    // per request: (distinct input, position predicting the first continuation token)
    let mut plan = Vec::with_capacity(requests.len());
    let mut truncated = Vec::with_capacity(requests.len());
    for (n, r) in requests.iter().enumerate() {
        let cont = r.continuation.len();
        if cont == 0 || cont > max || r.context.is_empty() {
            return Err(Error::InvalidArgument {
                name: "log-likelihood request".into(),
                detail: format!(
                    "request {n} has {} context and {cont} continuation tokens; it needs at least one \
                     of each, and a continuation within the model's {max} positions",
                    r.context.len()
                ),
            });
        }
        let full: Vec<u32> = r.context.iter().chain(&r.continuation).copied().collect();
        let skip = full.len().saturating_sub(max + 1);
        truncated.push(skip > 0);
        let input = full[skip..full.len() - 1].to_vec();
        if let Some(&t) = r.continuation.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidArgument {
                name: "log-likelihood request".into(),
                detail: format!("token id {t} is outside the model's vocabulary of {vocab}"),
            });
        }
        let start = input.len() - cont;
        let id = *index.entry(input.clone()).or_insert_with(|| {
            inputs.push(input);
            inputs.len() - 1
        });
        plan.push((id, start));
    }
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); inputs.len()];
    for (r, &(id, _)) in plan.iter().enumerate() {
        users[id].push(r);
    }
    let mut order: Vec<usize> = (0..inputs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(inputs[i].len()));

    let mut lls = vec![0.0f64; requests.len()];
    let (mut done, mut passes) = (0, 0);
    while done < order.len() {
        let t = inputs[order[done]].len();
        let b = batch.min(ACTIVATION_BUDGET / (t * 4096)).clamp(1, order.len() - done);
        let chunk = &order[done..done + b];
        let mut ids = Vec::with_capacity(b * t);
        for &i in chunk {
            ids.extend_from_slice(&inputs[i]);
            // Right padding: causal attention keeps it out of every real position.
            ids.resize(ids.len() + t - inputs[i].len(), 0);
        }
        // Only the positions that predict a continuation token get logits (the LM head over
        // every position would cost up to B x T x vocabulary).
        let mut rows: Vec<u32> = Vec::new();
        let mut slot: HashMap<usize, usize> = HashMap::new();
        for (row, &i) in chunk.iter().enumerate() {
            for &r in &users[i] {
                for j in 0..requests[r].continuation.len() {
                    let at = row * t + plan[r].1 + j;
                    slot.entry(at).or_insert_with(|| {
                        rows.push(at as u32);
                        rows.len() - 1
                    });
                }
            }
        }
        let (graph, logits) = model.logits_graph_rows(store, b, t, rows.len())?;
        let feed = Model::inference_feed_rows(&ids, b, t, &rows);
        let all = graph.forward(store, &feed, &[logits])?.read(logits)?;
        for (row, &i) in chunk.iter().enumerate() {
            for &r in &users[i] {
                let start = plan[r].1;
                let mut sum = 0.0;
                for (j, &token) in requests[r].continuation.iter().enumerate() {
                    let at = slot[&(row * t + start + j)] * vocab;
                    sum += log_prob(&all[at..at + vocab], token)?;
                }
                lls[r] = sum;
            }
        }
        done += b;
        passes += 1;
        progress(done, order.len());
    }
    Ok(Scores { loglikelihoods: lls, truncated, forward_passes: passes })
}

/// What `evaluate` runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// few-shot examples, the first ones of `dev`
    pub shots: usize,
    /// subjects to run (None: every one in the directory)
    pub subjects: Option<Vec<String>>,
    pub split: Split,
    /// questions per subject at most (the first ones)
    pub limit: Option<usize>,
    /// sequences per forward pass at most
    pub batch_size: usize,
}

/// One scored question.
#[derive(Clone, Debug, Serialize)]
pub struct QuestionResult {
    /// the right letter
    pub answer: String,
    /// the letter of the highest log-likelihood (the first on a tie, as numpy's argmax)
    pub chosen: String,
    /// of " A", " B", " C", " D" after the prompt
    pub loglikelihoods: Vec<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SubjectResult {
    pub subject: String,
    pub accuracy: f64,
    pub correct: usize,
    pub count: usize,
    pub questions: Vec<QuestionResult>,
}

/// The results of a run; `--json` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub task: &'static str,
    pub split: Split,
    pub shots: usize,
    pub device: String,
    /// mean of the subjects' accuracies
    pub macro_accuracy: f64,
    /// correct answers over all questions (lm-eval's `mmlu` figure)
    pub micro_accuracy: f64,
    pub correct: usize,
    pub count: usize,
    /// questions whose prompt was cut on the left to fit the model's positions
    pub truncated: usize,
    pub forward_passes: usize,
    pub seconds: f64,
    pub subjects: Vec<SubjectResult>,
}

/// The subjects `opts` asks for, each checked against those in `dir`.
fn chosen_subjects(dir: &Path, opts: &Options) -> Result<Vec<String>> {
    let known = subjects(dir, opts.split)?;
    let Some(wanted) = &opts.subjects else { return Ok(known) };
    if wanted.is_empty() {
        return Err(Error::InvalidArgument {
            name: "--mmlu-subjects".into(),
            detail: "no subject named".into(),
        });
    }
    for s in wanted {
        if !known.contains(s) {
            return Err(Error::InvalidArgument {
                name: "--mmlu-subjects".into(),
                detail: format!("unknown subject {s:?}; {} has: {}", dir.display(), known.join(", ")),
            });
        }
    }
    Ok(wanted.clone())
}

/// Score `model` on MMLU in `dir`, subject by subject; with `show_progress` a progress bar and a
/// line per subject go to stderr (the lines are printed either way).
pub fn evaluate(
    model: &Model,
    store: &ParamStore,
    tok: &Tokenizer,
    dir: &Path,
    opts: &Options,
    show_progress: bool,
) -> Result<Report> {
    if opts.batch_size == 0 {
        return Err(Error::InvalidArgument {
            name: "--batch-size".into(),
            detail: "0; it must be at least 1".into(),
        });
    }
    let started = std::time::Instant::now();
    let names = chosen_subjects(dir, opts)?;
    let mut work = Vec::new();
    for s in &names {
        let mut questions = read_split(dir, s, opts.split.dir())?;
        questions.truncate(opts.limit.unwrap_or(usize::MAX));
        let dev = if opts.shots > 0 { read_split(dir, s, "dev")? } else { Vec::new() };
        if dev.len() < opts.shots {
            return Err(Error::InvalidArgument {
                name: "--mmlu-shots".into(),
                detail: format!(
                    "{}: {s} has {} dev questions, fewer than {} shots",
                    dir.display(),
                    dev.len(),
                    opts.shots
                ),
            });
        }
        work.push((s, questions, dev));
    }
    let total: usize = work.iter().map(|w| w.1.len()).sum();
    let bar = if show_progress {
        indicatif::ProgressBar::new(total as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} questions  {msg}  eta {eta}")
            .expect("valid template"),
    );
    let mut subjects_out = Vec::new();
    let (mut truncated, mut passes, mut base) = (0, 0, 0u64);
    for (subject, questions, dev) in work {
        bar.set_message(subject.clone());
        let mut requests = Vec::with_capacity(questions.len() * LETTERS.len());
        for q in &questions {
            let context = prompt(subject, &dev[..opts.shots], q);
            for letter in LETTERS {
                requests.push(encode_pair(tok, &context, &format!(" {letter}"))?);
            }
        }
        let n = questions.len() as u64;
        let scores = loglikelihoods(model, store, &requests, opts.batch_size, &mut |done, all| {
            bar.set_position(base + n * done as u64 / all.max(1) as u64)
        })?;
        base += n;
        truncated += scores.truncated.chunks(LETTERS.len()).filter(|q| q.contains(&true)).count();
        passes += scores.forward_passes;
        let mut results = Vec::with_capacity(questions.len());
        for (q, lls) in questions.iter().zip(scores.loglikelihoods.chunks(LETTERS.len())) {
            let best = (1..lls.len()).fold(0, |b, i| if lls[i] > lls[b] { i } else { b });
            results.push(QuestionResult {
                answer: LETTERS[q.answer].into(),
                chosen: LETTERS[best].into(),
                loglikelihoods: lls.to_vec(),
            });
        }
        let correct = results.iter().filter(|r| r.answer == r.chosen).count();
        let accuracy = if results.is_empty() { 0.0 } else { correct as f64 / results.len() as f64 };
        let line = format!("{subject:<40} accuracy {accuracy:.4} ({correct}/{})", results.len());
        if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
        subjects_out.push(SubjectResult {
            subject: subject.clone(),
            accuracy,
            correct,
            count: results.len(),
            questions: results,
        });
    }
    bar.finish_and_clear();
    let correct: usize = subjects_out.iter().map(|s| s.correct).sum();
    let count: usize = subjects_out.iter().map(|s| s.count).sum();
    let macro_accuracy =
        subjects_out.iter().map(|s| s.accuracy).sum::<f64>() / subjects_out.len().max(1) as f64;
    Ok(Report {
        task: "mmlu",
        split: opts.split,
        shots: opts.shots,
        device: store.device().name(),
        macro_accuracy,
        micro_accuracy: if count == 0 { 0.0 } else { correct as f64 / count as f64 },
        correct,
        count,
        truncated,
        forward_passes: passes,
        seconds: started.elapsed().as_secs_f64(),
        subjects: subjects_out,
    })
}
