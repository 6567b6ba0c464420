#!/usr/bin/env python3
"""Checks `pockettune eval --mmlu ... --json` against transformers on the same questions.

It reads pockettune's JSON (split, shots, and per subject the questions it scored with their
log-likelihoods and chosen letters), builds the same prompts from the same Arrow files
(`lm_eval_prompt` of tools/make_mmlu_fixture.py, lm-evaluation-harness's `mmlu` template), scores
" A" ... " D" with a transformers model the way lm-eval's Hugging Face backend does (tokenizer
with its own special tokens, so Gemma gets <bos>; continuation ids = encode(ctx + cont) past
encode(ctx); input cut on the left to the model's positions; sum of log-softmax), and prints per
question both choices and log-likelihoods. Exit status 1 if a choice differs where transformers'
margin between its best two letters is above --tolerance, or a log-likelihood differs by more.

Usage:
  pockettune eval --model M --mmlu assets/mmlu --mmlu-subjects a,b --limit 10 --json > out.json
  /work/fixvenv/bin/python tools/mmlu_check.py --model M [--gguf FILE.gguf] --mmlu assets/mmlu \\
      --pockettune out.json
  (a GGUF model: --model is its folder and --gguf its file name; transformers dequantizes it to
  float32, which takes 2-5 minutes on a 2-core machine.)
"""
import argparse
import json
import os
import sys

import pyarrow as pa
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_mmlu_fixture import LETTERS, lm_eval_prompt  # noqa: E402


def read_split(mmlu, subject, split):
    folder = os.path.join(mmlu, subject, split)
    rows = []
    for name in sorted(os.listdir(folder)):
        if name.startswith("data-") and name.endswith(".arrow"):
            with pa.OSFile(os.path.join(folder, name), "rb") as f:
                rows += pa.ipc.open_stream(f).read_all().to_pylist()
    return rows


def max_length(model, tok):
    """lm-eval's resolve_max_length: the config's n_positions, max_position_embeddings or n_ctx."""
    cfg = getattr(model.config, "text_config", None) or model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(cfg, attr, None):
            return getattr(cfg, attr)
    return 2048


def encode_pair(tok, context, continuation):
    n = len(context) - len(context.rstrip())
    if n:
        continuation, context = context[-n:] + continuation, context[:-n]
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return ctx, whole[len(ctx):]


_last = {}


@torch.no_grad()
def loglikelihood(model, limit, ctx, cont):
    full = (ctx + cont)[-(limit + 1):]
    inp = full[:-1]
    # The four letters usually share their input: keep the last forward pass.
    if _last.get("key") != (inp, len(cont)):
        logits = model(torch.tensor([inp])).logits[0, -len(cont):]
        _last.update(key=(inp, len(cont)), logp=torch.log_softmax(logits.double(), dim=-1))
    rows = _last["logp"]
    return float(sum(rows[j, t] for j, t in enumerate(cont)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="Hugging Face model folder (or the folder of --gguf)")
    ap.add_argument("--gguf", help="GGUF file name inside --model")
    ap.add_argument("--mmlu", required=True, help="the MMLU folder pockettune read")
    ap.add_argument("--pockettune", required=True, help="the JSON `pockettune eval --mmlu --json` printed")
    ap.add_argument("--tolerance", type=float, default=1e-3, help="largest log-likelihood difference allowed")
    args = ap.parse_args()

    with open(args.pockettune) as f:
        ours = json.load(f)
    kw = {"gguf_file": args.gguf} if args.gguf else {}
    tok = AutoTokenizer.from_pretrained(args.model, **kw)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager", **kw)
    model.eval()
    limit = max_length(model, tok)
    print(f"model {args.model} {args.gguf or ''}: {limit} positions; split {ours['split']}, {ours['shots']} shots")

    agree = total = bad = 0
    worst = 0.0
    for sub in ours["subjects"]:
        name = sub["subject"]
        dev = read_split(args.mmlu, name, "dev")
        docs = read_split(args.mmlu, name, ours["split"])[: sub["count"]]
        for i, (doc, q) in enumerate(zip(docs, sub["questions"])):
            prompt = lm_eval_prompt(name, dev, doc, ours["shots"])
            lls = [loglikelihood(model, limit, *encode_pair(tok, prompt, " " + letter)) for letter in LETTERS]
            best = max(range(4), key=lambda k: (lls[k], -k))
            chosen = LETTERS[best]
            diff = max(abs(a - b) for a, b in zip(lls, q["loglikelihoods"]))
            worst = max(worst, diff)
            margin = sorted(lls)[-1] - sorted(lls)[-2]
            same = chosen == q["chosen"]
            agree += same
            total += 1
            flag = ""
            if diff > args.tolerance or (not same and margin > args.tolerance):
                bad += 1
                flag = "  <-- MISMATCH"
            print(f"{name} {i}: answer {LETTERS[doc['answer']]}, transformers {chosen}, pockettune {q['chosen']}, "
                  f"max |ll diff| {diff:.2e}, margin {margin:.2e}{flag}")
    print(f"{agree}/{total} choices agree; largest log-likelihood difference {worst:.3e} "
          f"(tolerance {args.tolerance}); {bad} mismatches")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
