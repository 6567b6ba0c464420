//! Text generation, to see what fine-tuning did: greedy decoding, or sampling with temperature,
//! top-k and top-p (nucleus), seeded. No KV cache yet: each new token runs the forward pass
//! over the context (the last `n_positions` tokens), which is slow for long outputs.

use crate::data::Tokenizer;
use crate::error::Result;
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

/// Pick the next token from `logits` (one row).
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut impl Rng) -> u32 {
    if s.temperature <= 0.0 {
        let best = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i);
        return best.unwrap_or(0) as u32;
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
            return i as u32;
        }
        r -= p;
    }
    *order.last().expect("at least one candidate") as u32
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
    let mut ids = tok.encode(prompt)?;
    if ids.is_empty() {
        ids.push(tok.eot());
    }
    let start = ids.len();
    let mut rng = rand::rngs::StdRng::seed_from_u64(s.seed);
    let vocab = model.vocab_size();
    for _ in 0..max_tokens {
        let ctx = &ids[ids.len().saturating_sub(model.max_positions())..];
        let (graph, logits) = model.logits_graph(store, 1, ctx.len())?;
        let run = graph.forward(store, &Model::inference_feed(ctx, 1, ctx.len()), &[logits])?;
        let all = run.read(logits)?;
        let next = sample(&all[all.len() - vocab..], s, &mut rng);
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
        assert_eq!(sample(&[0.1, 3.0, -1.0, 2.9], &s, &mut rng), 1);
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
                assert_eq!(sample(&logits, &s, &mut rng), 2);
            }
        }
    }

    #[test]
    fn sampling_follows_the_softmax() {
        // logits ln 1, ln 3: probabilities 1/4 and 3/4.
        let s = Sampling { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 0 };
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        let n = 20000;
        let ones = (0..n).filter(|_| sample(&[0.0, 3f32.ln()], &s, &mut rng) == 1).count();
        let frac = ones as f64 / n as f64;
        assert!((frac - 0.75).abs() < 0.02, "sampled {frac}");
    }
}
