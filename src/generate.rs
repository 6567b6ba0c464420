//! Text generation, to see what fine-tuning did: greedy decoding, or sampling with temperature,
//! top-k and top-p (nucleus), seeded. No KV cache yet: each new token runs the forward pass
//! over the context (the last `n_positions` tokens), which is slow for long outputs.

use crate::data::Tokenizer;
use crate::error::{Error, Result};
use crate::graph::ParamStore;
use crate::models::Model;
use rand::{Rng, SeedableRng};

#[derive(Clone, Debug)]
pub struct Sampling {
    /// 0 = greedy
    pub temperature: f32,
    /// keep the k most likely tokens (0 = all)
    pub top_k: usize,
    /// keep the smallest set of tokens whose probability reaches p (1 = all)
    pub top_p: f32,
    pub seed: u64,
}

impl Sampling {
    /// Refuse settings that sample nothing sensible (a NaN temperature made every probability
    /// NaN and panicked).
    pub fn check(&self) -> Result<()> {
        let bad = |name: &str, detail: String| Err(Error::InvalidArgument { name: name.into(), detail });
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(
                "--temperature",
                format!("{} must be a finite number, 0 (greedy) or more", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("--top-p", format!("{} must be in (0, 1] (1 keeps every token)", self.top_p));
        }
        Ok(())
    }
}

/// Pick the next token from `logits` (one row). Logits of -inf (tokens ruled out) are fine;
/// NaN or +inf, or nothing above -inf, mean the model computed garbage: an error, not a pick.
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut impl Rng) -> Result<u32> {
    s.check()?;
    let bad = logits.iter().position(|x| x.is_nan() || *x == f32::INFINITY);
    if bad.is_some() || !logits.iter().any(|x| x.is_finite()) {
        let detail = match bad {
            Some(i) => format!("the logit of token {i} is {}", logits[i]),
            None => format!("no finite logit among {}", logits.len()),
        };
        return Err(Error::NonFiniteLogits { detail });
    }
    if s.temperature == 0.0 {
        let best = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i);
        return Ok(best.unwrap_or(0) as u32);
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if s.top_k > 0 {
        order.truncate(s.top_k);
    }
    let max = logits[order[0]] as f64;
    let mut probs: Vec<f64> =
        order.iter().map(|&i| ((logits[i] as f64 - max) / s.temperature as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if s.top_p < 1.0 {
        let mut cum = 0.0;
        let keep = probs.iter().position(|p| {
            cum += p;
            cum >= s.top_p as f64
        });
        let keep = keep.map_or(probs.len(), |k| k + 1);
        probs.truncate(keep);
        order.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut r = rng.random_range(0.0..total);
    for (p, &i) in probs.iter().zip(&order) {
        if r < *p {
            return Ok(i as u32);
        }
        r -= p;
    }
    Ok(*order.last().expect("at least one candidate") as u32)
}

/// The prompt as the model saw texts in training (see `data`): BOS first when the model wants
/// one; an empty prompt without BOS starts after an end-of-text token, as a new document would.
pub fn prompt_ids(tok: &Tokenizer, prompt: &str) -> Result<Vec<u32>> {
    let mut ids: Vec<u32> = tok.bos().into_iter().collect();
    ids.extend(tok.encode(prompt)?);
    if ids.is_empty() {
        ids.push(tok.eot());
    }
    Ok(ids)
}

/// Continue `prompt` by up to `max_tokens` tokens (stopping at end-of-text); returns the text
/// generated after the prompt.
pub fn generate(
    model: &Model,
    store: &ParamStore,
    tok: &Tokenizer,
    prompt: &str,
    max_tokens: usize,
    s: &Sampling,
) -> Result<String> {
    s.check()?;
    if max_tokens == 0 {
        return Err(Error::InvalidArgument {
            name: "--max-tokens".into(),
            detail: "0 generates nothing; it must be at least 1".into(),
        });
    }
    let mut ids = prompt_ids(tok, prompt)?;
    let start = ids.len();
    let mut rng = rand::rngs::StdRng::seed_from_u64(s.seed);
    let vocab = model.vocab_size();
    for _ in 0..max_tokens {
        let ctx = &ids[ids.len().saturating_sub(model.max_positions())..];
        let t = ctx.len();
        let (graph, logits) = model.logits_graph_rows(store, 1, t, 1)?;
        let run = graph.forward(store, &Model::inference_feed_rows(ctx, 1, t, &[t as u32 - 1]), &[logits])?;
        let last = run.read(logits)?;
        let next = sample(&last[last.len() - vocab..], s, &mut rng)?;
        if next == tok.eot() {
            break;
        }
        ids.push(next);
    }
    tok.decode(&ids[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_largest_logit() {
        let s = Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 };
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        assert_eq!(sample(&[0.1, 3.0, -1.0, 2.9], &s, &mut rng).unwrap(), 1);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let logits = [0.5, 0.1, 2.0, 1.9];
        for s in [
            Sampling { temperature: 1.0, top_k: 1, top_p: 1.0, seed: 0 },
            Sampling { temperature: 1.0, top_k: 0, top_p: 1e-6, seed: 0 },
        ] {
            for _ in 0..20 {
                assert_eq!(sample(&logits, &s, &mut rng).unwrap(), 2);
            }
        }
    }

    /// Regression: `generate --temperature nan` made every probability NaN and panicked in the
    /// random draw; negative temperatures were silently greedy, top-p outside (0, 1] ignored.
    #[test]
    fn nan_or_negative_temperature_and_top_p_out_of_range_are_refused() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let ok = Sampling { temperature: 0.8, top_k: 0, top_p: 0.95, seed: 0 };
        for (s, flag) in [
            (Sampling { temperature: f32::NAN, ..ok.clone() }, "--temperature"),
            (Sampling { temperature: -1.0, ..ok.clone() }, "--temperature"),
            (Sampling { temperature: f32::INFINITY, ..ok.clone() }, "--temperature"),
            (Sampling { top_p: 0.0, ..ok.clone() }, "--top-p"),
            (Sampling { top_p: 1.5, ..ok.clone() }, "--top-p"),
            (Sampling { top_p: f32::NAN, ..ok.clone() }, "--top-p"),
        ] {
            match sample(&[0.0, 1.0], &s, &mut rng) {
                Err(Error::InvalidArgument { name, .. }) => assert_eq!(name, flag, "{s:?}"),
                other => panic!("{s:?}: expected an error about {flag}, got {other:?}"),
            }
        }
        assert!(sample(&[0.0, 1.0], &ok, &mut rng).is_ok());
    }

    /// Regression: NaN (or +inf) logits panicked in the random draw.
    #[test]
    fn non_finite_logits_are_an_error_not_a_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        for temperature in [0.0, 0.8] {
            let s = Sampling { temperature, top_k: 0, top_p: 0.9, seed: 0 };
            for logits in
                [vec![0.5, f32::NAN, 1.0], vec![f32::INFINITY, 0.0], vec![f32::NEG_INFINITY; 3], vec![]]
            {
                match sample(&logits, &s, &mut rng) {
                    Err(Error::NonFiniteLogits { detail }) => assert!(!detail.is_empty()),
                    other => panic!("{logits:?} at temperature {temperature}: {other:?}"),
                }
            }
            // -inf marks a ruled-out token: the others are still sampled.
            assert_eq!(sample(&[f32::NEG_INFINITY, 2.0], &s, &mut rng).unwrap(), 1);
        }
    }

    #[test]
    fn sampling_follows_the_softmax() {
        // logits ln 1, ln 3: probabilities 1/4 and 3/4.
        let s = Sampling { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 0 };
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        let n = 20000;
        let ones = (0..n).filter(|_| sample(&[0.0, 3f32.ln()], &s, &mut rng).unwrap() == 1).count();
        let frac = ones as f64 / n as f64;
        assert!((frac - 0.75).abs() < 0.02, "sampled {frac}");
    }
}
