//! MMLU (issue 9 point 5). The Arrow reader and the prompts are checked against
//! `tools/make_mmlu_fixture.py`, which wrote the Arrow files with pyarrow and built every prompt in
//! Python from lm-evaluation-harness's template. The accuracy is checked against log-likelihoods
//! computed here from those Python-built prompts one (question, letter) at a time: no batching,
//! padding or sharing of inputs between letters, which `mmlu::evaluate` all does.

mod common;

use pockettune::data::Tokenizer;
use pockettune::graph::{Device, ParamStore};
use pockettune::mmlu::{self, Options, Split};
use pockettune::models::Model;
use pockettune::Error;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mmlu")
}

fn fixture_json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join(name)).unwrap()).unwrap()
}

const SUBJECTS: [&str; 2] = ["abstract_algebra", "us_foreign_policy"];

/// The byte-level tokenizer of `common::tiny_model_dir` (" A" is two tokens: space, letter),
/// optionally with merges making " A" ... " D" single tokens (ids 257-260) and a post-processor
/// that puts `<|endoftext|>` (256) before every text, as Gemma's puts `<bos>`.
fn tokenizer(dir: &Path, single_token_letters: bool, bos: bool) -> Tokenizer {
    common::tiny_model_dir(dir, 0);
    let path = dir.join("tokenizer.json");
    let mut t: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    if single_token_letters {
        for (i, l) in ["A", "B", "C", "D"].iter().enumerate() {
            t["model"]["vocab"][format!("\u{120}{l}")] = json!(257 + i);
            t["model"]["merges"].as_array_mut().unwrap().push(json!(format!("\u{120} {l}")));
        }
    }
    if bos {
        t["post_processor"] = json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [256], "tokens": ["<|endoftext|>"]}}
        });
    }
    std::fs::write(&path, t.to_string()).unwrap();
    let tok = Tokenizer::load(&path).unwrap();
    assert_eq!(tok.bos(), bos.then_some(256));
    tok
}

/// A random 2-layer GPT-2 over `vocab` tokens with `positions` positions.
fn model(dev: &Device, vocab: usize, positions: usize) -> (Model, ParamStore) {
    let cfg = json!({"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32,
                     "n_positions": positions, "vocab_size": vocab});
    Model::random(cfg, dev, 7).unwrap()
}

/// lm-eval's log-likelihood of `letter` after `prompt`, computed alone: encode context and
/// context + " X" (with the tokenizer's BOS), keep the last positions + 1 ids, run the model on
/// all but the last, sum the log-softmax of the continuation ids.
fn reference_ll(m: &Model, store: &ParamStore, tok: &Tokenizer, prompt: &str, letter: &str) -> f64 {
    let bos: Vec<u32> = tok.bos().into_iter().collect();
    let ctx: Vec<u32> = bos.iter().copied().chain(tok.encode(prompt).unwrap()).collect();
    let whole: Vec<u32> =
        bos.iter().copied().chain(tok.encode(&format!("{prompt} {letter}")).unwrap()).collect();
    let cont = &whole[ctx.len()..];
    assert!(!cont.is_empty());
    let full: Vec<u32> = ctx.iter().chain(cont).copied().collect();
    let keep = &full[full.len().saturating_sub(m.max_positions() + 1)..];
    let input = &keep[..keep.len() - 1];
    let t = input.len();
    let (graph, logits) = m.logits_graph(store, 1, t).unwrap();
    let all =
        graph.forward(store, &Model::inference_feed(input, 1, t), &[logits]).unwrap().read(logits).unwrap();
    let v = m.vocab_size();
    cont.iter()
        .enumerate()
        .map(|(j, &token)| {
            let row = &all[(t - cont.len() + j) * v..][..v];
            let max = row.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x as f64));
            let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
            row[token as usize] as f64 - lse
        })
        .sum()
}

#[test]
fn rows_read_as_pyarrow_wrote_them() {
    let rows = fixture_json("rows.json");
    for s in SUBJECTS {
        for split in ["dev", "validation", "test"] {
            let got = mmlu::read_split(&fixture().join("data"), s, split).unwrap();
            let want = rows[s][split].as_array().unwrap();
            assert_eq!(got.len(), want.len(), "{s}/{split}");
            for (g, w) in got.iter().zip(want) {
                assert_eq!(g.question, w["question"].as_str().unwrap());
                let choices: Vec<&str> =
                    w["choices"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
                assert_eq!(g.choices, choices);
                assert_eq!(g.answer as u64, w["answer"].as_u64().unwrap());
            }
        }
    }
    assert_eq!(mmlu::subjects(&fixture().join("data"), Split::Test).unwrap(), SUBJECTS);
}

#[test]
fn prompts_are_lm_evals() {
    let prompts = fixture_json("prompts.json");
    let data = fixture().join("data");
    let mut checked = 0;
    for s in SUBJECTS {
        let dev = mmlu::read_split(&data, s, "dev").unwrap();
        for split in ["test", "validation"] {
            let questions = mmlu::read_split(&data, s, split).unwrap();
            for (shots, want) in prompts[s][split].as_object().unwrap() {
                let k: usize = shots.parse().unwrap();
                for (q, w) in questions.iter().zip(want.as_array().unwrap()) {
                    assert_eq!(mmlu::prompt(s, &dev[..k], q), w.as_str().unwrap(), "{s}/{split}, {k} shots");
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, (5 + 2 + 3 + 1) * 3);
}

/// Runs `evaluate` and checks every log-likelihood, choice and average against `reference_ll`
/// on the Python-built prompts; returns the report.
fn check_against_reference(
    dev: &Device,
    (m, store): &(Model, ParamStore),
    tok: &Tokenizer,
    opts: &Options,
    tolerance: f64,
) -> mmlu::Report {
    let ref_dev_store;
    let (ref_m, ref_store) = match dev {
        Device::Cpu(pockettune::graph::CpuPath::Reference) => (m, store),
        Device::Gpu(_) | Device::Cpu(_) => {
            // The reference always runs on the CPU path (the judge of every other path).
            ref_dev_store = model(&Device::CPU_REF, m.vocab_size(), m.max_positions());
            (&ref_dev_store.0, &ref_dev_store.1)
        }
    };
    let report = mmlu::evaluate(m, store, tok, &fixture().join("data"), opts, false).unwrap();
    let prompts = fixture_json("prompts.json");
    let (mut correct, mut count, mut accuracies) = (0, 0, Vec::new());
    assert_eq!(report.subjects.len(), SUBJECTS.len());
    for (sub, name) in report.subjects.iter().zip(SUBJECTS) {
        assert_eq!(sub.subject, name);
        let want = prompts[name][opts.split.dir()][opts.shots.to_string()].as_array().unwrap();
        let want = &want[..want.len().min(opts.limit.unwrap_or(usize::MAX))];
        assert_eq!(sub.count, want.len());
        let mut sub_correct = 0;
        for (q, p) in sub.questions.iter().zip(want) {
            let lls: Vec<f64> = mmlu::LETTERS
                .iter()
                .map(|l| reference_ll(ref_m, ref_store, tok, p.as_str().unwrap(), l))
                .collect();
            for (got, want) in q.loglikelihoods.iter().zip(&lls) {
                assert!((got - want).abs() <= tolerance * want.abs().max(1.0), "{name}: {got} vs {want}");
            }
            let best = (1..4).fold(0, |b, i| if lls[i] > lls[b] { i } else { b });
            let mut sorted = lls.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            // A choice is compared where the reference's margin is above the tolerance.
            if sorted[0] - sorted[1] > 2.0 * tolerance * sorted[0].abs() {
                assert_eq!(q.chosen, mmlu::LETTERS[best], "{name}: {lls:?}");
            }
            sub_correct += usize::from(q.chosen == q.answer);
        }
        assert_eq!(sub.correct, sub_correct);
        assert_eq!(sub.accuracy, sub_correct as f64 / want.len() as f64);
        correct += sub_correct;
        count += want.len();
        accuracies.push(sub.accuracy);
    }
    assert_eq!((report.correct, report.count), (correct, count));
    assert_eq!(report.micro_accuracy, correct as f64 / count as f64);
    assert!((report.macro_accuracy - accuracies.iter().sum::<f64>() / accuracies.len() as f64).abs() < 1e-12);
    assert_eq!(report.shots, opts.shots);
    report
}

fn opts(shots: usize, split: Split, batch_size: usize) -> Options {
    Options { shots, subjects: None, split, limit: None, batch_size }
}

/// " A" is two byte tokens: the four letters share their input (context + space) and are read at
/// the last two positions; one forward pass per question, three per batch.
#[test]
fn cpu_accuracy_two_token_letters() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = tokenizer(tmp.path(), false, false);
    let m = model(&Device::CPU_REF, 257, 1024);
    let report = check_against_reference(&Device::CPU_REF, &m, &tok, &opts(2, Split::Test, 3), 1e-9);
    assert_eq!(report.truncated, 0);
    assert_eq!(report.forward_passes, 2 + 1, "5 and 3 questions in batches of 3");
}

/// " A" ... " D" single tokens after a BOS token: the prompt is the input of all four letters.
#[test]
fn cpu_accuracy_single_token_letters_with_bos() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = tokenizer(tmp.path(), true, true);
    let m = model(&Device::CPU_REF, 261, 1024);
    let report = check_against_reference(&Device::CPU_REF, &m, &tok, &opts(3, Split::Validation, 2), 1e-9);
    assert_eq!(report.forward_passes, 1 + 1, "2 and 1 questions in batches of 2");
    let limited = Options { limit: Some(1), ..opts(0, Split::Test, 8) };
    let report = check_against_reference(&Device::CPU_REF, &m, &tok, &limited, 1e-9);
    assert_eq!(report.count, 2);
}

/// Prompts longer than the model's 96 positions lose their first tokens, as in lm-eval.
#[test]
fn cpu_accuracy_of_prompts_cut_on_the_left() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = tokenizer(tmp.path(), false, true);
    let m = model(&Device::CPU_REF, 257, 96);
    let report = check_against_reference(&Device::CPU_REF, &m, &tok, &opts(2, Split::Test, 4), 1e-9);
    assert_eq!(report.truncated, 8, "every question");
}

#[test]
fn gpu_accuracy_matches_the_cpu_path() {
    let Some(gpu) = common::gpu() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let tok = tokenizer(tmp.path(), true, true);
    let dev = Device::Gpu(gpu.clone());
    let m = model(&dev, 261, 1024);
    let report = check_against_reference(&dev, &m, &tok, &opts(2, Split::Test, 3), 1e-5);
    assert_eq!(report.forward_passes, 2 + 1);
}

fn expect_file_error(r: pockettune::Result<impl std::fmt::Debug>, file: &Path, needles: &[&str]) {
    match r {
        Err(Error::Checkpoint { path, detail }) => {
            assert_eq!(path, file, "{detail}");
            for n in needles {
                assert!(detail.contains(n), "{detail:?} lacks {n:?}");
            }
        }
        other => panic!("expected an error naming {}, got {other:?}", file.display()),
    }
}

#[test]
fn bad_arrow_files_are_clear_errors() {
    let good = std::fs::read(fixture().join("data/abstract_algebra/test/data-00000-of-00001.arrow")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("abstract_algebra/test");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("data-00000-of-00001.arrow");
    let read = || mmlu::read_split(tmp.path(), "abstract_algebra", "test");
    // Cut anywhere, also between two messages (where only the missing end marker tells).
    for cut in [0, 8, 200, good.len() / 3, good.len() / 2, good.len() - 8, good.len() - 1] {
        std::fs::write(&file, &good[..cut]).unwrap();
        expect_file_error(read(), &file, &["not a readable Arrow IPC stream", "truncated or corrupt"]);
    }
    std::fs::write(&file, b"question,choices,answer\nnot arrow at all\n").unwrap();
    expect_file_error(read(), &file, &["not a readable Arrow IPC stream"]);
    // Regression: a corrupt body length made arrow-ipc's StreamReader allocate 708 GB and abort.
    // Every byte flipped in turn: an error or rows, never a panic.
    for at in 0..good.len() {
        let mut bad = good.clone();
        bad[at] ^= 0xa5;
        std::fs::write(&file, &bad).unwrap();
        if let Err(e) = read() {
            assert!(matches!(e, Error::Checkpoint { .. }), "byte {at}: {e}");
        }
    }
    let bad = fixture().join("bad_choices");
    let f = bad.join("abstract_algebra/test/data-00000-of-00001.arrow");
    expect_file_error(mmlu::read_split(&bad, "abstract_algebra", "test"), &f, &["row 3", "3 choices"]);
    let bad = fixture().join("bad_answer");
    let f = bad.join("abstract_algebra/test/data-00000-of-00001.arrow");
    expect_file_error(mmlu::read_split(&bad, "abstract_algebra", "test"), &f, &["row 2", "answer 4"]);
}

#[test]
fn bad_directories_and_options_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = tokenizer(&tmp.path().join("model"), false, false);
    let (m, store) = model(&Device::CPU_REF, 257, 64);
    let run = |dir: &Path, o: &Options| mmlu::evaluate(&m, &store, &tok, dir, o, false).map(|_| ());
    let missing = tmp.path().join("no-such-dir");
    expect_file_error(run(&missing, &opts(0, Split::Test, 1)), &missing, &["no such MMLU directory"]);
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(empty.join("astronomy/dev")).unwrap();
    expect_file_error(run(&empty, &opts(0, Split::Test, 1)), &empty, &["no MMLU subjects"]);
    let data = fixture().join("data");
    let unknown = Options { subjects: Some(vec!["astronomy".into()]), ..opts(0, Split::Test, 1) };
    match run(&data, &unknown) {
        Err(Error::InvalidArgument { name, detail }) => {
            assert_eq!(name, "--mmlu-subjects");
            assert!(
                detail.contains("\"astronomy\"") && detail.contains("abstract_algebra, us_foreign_policy"),
                "{detail}"
            );
        }
        other => panic!("{other:?}"),
    }
    match run(&data, &opts(4, Split::Test, 1)) {
        Err(Error::InvalidArgument { name, detail }) => {
            assert_eq!(name, "--mmlu-shots");
            assert!(detail.contains("3 dev questions"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    let bad = fixture().join("bad_answer");
    let f = bad.join("abstract_algebra/test/data-00000-of-00001.arrow");
    expect_file_error(run(&bad, &opts(1, Split::Test, 1)), &f, &["answer 4"]);
}
