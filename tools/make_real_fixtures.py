#!/usr/bin/env python3
"""Writes tests/fixtures/real-gemma3-270m/ and tests/fixtures/real-smollm2-135m/: what
transformers computes with the REAL pretrained weights of the two GGUF files that
tools/fetch_assets.sh fetches (Gemma 3 270M Q4_K_M, SmolLM2-135M-Instruct Q4_1), for
tests/real_weights.rs.

transformers loads each GGUF file (`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`,
float32, eager attention): the `gguf` package dequantizes every block to float32 as ggml defines
it, Gemma's norm weights get their stored +1 taken off and Llama's Q/K rows are un-permuted, so
torch runs the very weights pockettune reads from the same file. The tokenizer is the one
transformers builds from the file's metadata.

The text is public-domain Shakespeare (Antony's funeral speech, Julius Caesar III.2, from the
fetched plays), written to text.txt. It is tokenized as pockettune's data convention says (one
document: BOS when the tokenizer adds one, i.e. for Gemma and not for SmolLM2, then the text's
ids without special tokens) and cut into windows of T + 1 = 129 tokens starting every T tokens.

Files per model:
  text.txt                       the text (the test feeds it through pockettune's tokenizer and
                                 data windows and checks it gets `tokens`)
  expected.safetensors
    tokens        (N,)           the document's ids; window w is tokens[w*T : w*T+T+1]
    input_ids     (1, T)         window 0's inputs, targets (1, T) its next tokens
    loss          (1,)           mean cross-entropy of window 0 with the base model
    logit_rows    (2, V)         the full logits at positions LOGIT_POSITIONS (Gemma's 262,144-
                                 wide rows are 1 MiB each: every position would be 134 MB)
    logit_positions (2,)
    logsumexp     (T,)           per position, over the whole vocabulary
    target_logit  (T,)           per position, the target token's logit (its log-probability
                                 is target_logit - logsumexp)
    sumsq         (T,)           per position, the sum of squared logits (the whole row's tail)
    top_ids, top_logits (T, TOP) per position, the TOP largest logits and their ids
    lora_losses   (STEPS,)       the loss of each of STEPS LoRA steps (before its update), step
                                 s on window s, batch 1 x T
    lora_grad_norms (STEPS,)     the adapter gradient's global L2 norm before clipping
    lora_loss_after (1,)         window 0's loss after the last update
    f64.loss, f64.logsumexp, f64.target_logit, f64.top_logits (at top_ids), f64.lora_losses,
    f64.lora_grad_norms, f64.lora_loss_after
                                 the same figures with torch in float64 (same weights, same
                                 adapter): how far float32 rounding alone moves them
  adapter/                       the initial PEFT adapter the LoRA steps start from
                                 (adapter_config.json, adapter_model.safetensors)
  meta.json                      versions, the GGUF file and its sha256, the config transformers
                                 built, the LoRA and AdamW settings, T, timings

LoRA: PEFT LoraConfig(r=8, lora_alpha=16, lora_dropout=0, q/k/v/o/gate/up/down on every layer);
A as PEFT initialises it (Kaiming-uniform) and B drawn from N(0, B_STD^2) (PEFT's B = 0 would
leave A without a gradient at step 1), both under torch.manual_seed(SEED) and rounded to
bfloat16 values, so that the adapter is stored in bfloat16 without loss (half the bytes: 3.8 and
4.9 MB instead of 7.6 and 9.8); the steps train in float32 from exactly those values. AdamW as
pockettune's `train` defaults for LoRA (lr 2e-4, constant; betas 0.9/0.999, eps 1e-8, weight
decay 0.01 on every adapter weight), gradients clipped to global norm 1.0 (torch's
clip_grad_norm_).

Why lr 2e-4 and not 1e-3: at 1e-3 Gemma's 5-step trajectory is chaotic at the level of float32
rounding (most likely because Adam moves every weight by about lr whatever the size of its
gradient, so a weight whose gradient is near zero moves by +-lr on the sign of rounding noise).
Two float32 torch runs that differ only in their thread count (1 or 2) ended 2.9 % apart in the
5th step's gradient norm and 1.6e-3 apart in the final loss, with float64 0.8 % and 3.8 % away
from them; pockettune's GPU and CPU paths fell in the same spread. At 2e-4 the two float32 runs
agree to 3e-6 in every loss and 6e-5 in the gradient norms, and float64 is within 4.3e-5 and
2e-4 of them: a check can then be tight enough to catch a real error in the step.

Loading a GGUF file takes minutes on 2 cores (mostly the tokenizer conversion); the converted
model and tokenizer are cached under CACHE/<model>/ (default assets/cache/real-fixtures, git-
ignored with assets/) so that a second run starts in seconds.

Usage: /work/fixvenv/bin/pip install -r tools/requirements.txt
       bash tools/fetch_assets.sh
       python tools/make_real_fixtures.py [gemma3-270m] [smollm2-135m] [--assets DIR] [--cache DIR]
"""
import argparse
import hashlib
import json
import os
import time

import torch
from safetensors.torch import load_file, save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODELS = {
    "gemma3-270m": "gemma-3-270m-Q4_K_M.gguf",
    "smollm2-135m": "SmolLM2-135M-Instruct.Q4_1.gguf",
}
T = 128
STEPS = 5
LOGIT_POSITIONS = [T // 2 - 1, T - 1]
TOP = 16
SEED = 7
B_STD = 0.01
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
ADAMW = dict(lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
MAX_GRAD_NORM = 1.0
# The speech runs ~110 lines from here; both tokenizers give more than STEPS windows.
SPEECH_START = "ANTONY.\nFriends, Romans, countrymen, lend me your ears;"
SPEECH_LINES = 130


def speech(assets):
    with open(os.path.join(assets, "shakespeare", "plays.txt"), encoding="utf-8") as f:
        plays = f.read()
    at = plays.find(SPEECH_START)
    assert at >= 0, "the plays do not hold Antony's speech: fetch them with tools/fetch_assets.sh"
    return "".join(plays[at:].splitlines(keepends=True)[:SPEECH_LINES])


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load(assets, cache, name, file):
    """The model (float32, eager) and tokenizer transformers builds from the GGUF file, through
    the cache. Returns (model, tokenizer, seconds, whether from the cache).

    transformers marks a model loaded from GGUF as quantized (its weights are plain float32
    nonetheless) and refuses to save it; the same weights go into a plain model made from the
    config, which is what runs, on the first run as on later ones."""
    from safetensors.torch import load_model, save_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    def plain(config):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
        return model

    t0 = time.time()
    cached = os.path.join(cache, name)
    weights = os.path.join(cached, "model.safetensors")
    if os.path.exists(os.path.join(cached, "done")):
        model = plain(AutoConfig.from_pretrained(cached))
        load_model(model, weights)
        tok = AutoTokenizer.from_pretrained(cached)
        return model, tok, time.time() - t0, True
    src = os.path.join(assets, name)
    loaded = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=file, dtype=torch.float32, attn_implementation="eager")
    config = loaded.config
    del config.quantization_config
    model = plain(config)
    model.load_state_dict(loaded.state_dict())
    del loaded
    tok = AutoTokenizer.from_pretrained(src, gguf_file=file)
    os.makedirs(cached, exist_ok=True)
    config.save_pretrained(cached)
    save_model(model, weights)
    tok.save_pretrained(cached)
    open(os.path.join(cached, "done"), "w").close()
    return model, tok, time.time() - t0, False


def cross_entropy(logits, targets):
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def window(tokens, w):
    ids = tokens[w * T: w * T + T + 1]
    return ids[:-1].unsqueeze(0), ids[1:].unsqueeze(0)


def base_logits(model, tokens, out):
    inputs, targets = window(tokens, 0)
    with torch.no_grad():
        logits = model(input_ids=inputs).logits[0]  # (T, V)
    lse = torch.logsumexp(logits.double(), dim=-1)
    target_logit = logits.gather(1, targets[0].unsqueeze(1))[:, 0]
    loss = cross_entropy(logits, targets[0])
    top = logits.topk(TOP, dim=-1)
    out.update({
        "input_ids": inputs.clone(),
        "targets": targets.clone(),
        "loss": loss.reshape(1),
        "logit_rows": logits[LOGIT_POSITIONS].contiguous(),
        "logit_positions": torch.tensor(LOGIT_POSITIONS, dtype=torch.int64),
        "logsumexp": lse.float(),
        "target_logit": target_logit.contiguous(),
        "sumsq": logits.double().square().sum(-1).float(),
        "top_ids": top.indices.contiguous(),
        "top_logits": top.values.contiguous(),
    })
    return loss.item()


def make_adapter(model, adapter_dir, gguf_name):
    """The PEFT model with the initial adapter (see the top of the file), saved to adapter_dir
    in bfloat16."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(SEED)
    pm = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, B_STD)
            if "lora_" in n:
                p.copy_(p.to(torch.bfloat16).float())
    pm.save_pretrained(adapter_dir)
    # bfloat16 on disk: the values are bfloat16 already, so nothing is lost.
    st = os.path.join(adapter_dir, "adapter_model.safetensors")
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(st).items()}, st)
    # As tools/make_fixtures.py does: no model card, sorted targets, no absolute path, so the
    # files come out the same on every machine.
    card = os.path.join(adapter_dir, "README.md")
    if os.path.exists(card):
        os.remove(card)
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg["base_model_name_or_path"] = gguf_name
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    return pm


def lora_steps(pm, tokens, tag=""):
    """STEPS AdamW steps on windows 0..STEPS-1; returns (losses, gradient norms, window 0's loss
    after the last step)."""
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, **ADAMW)
    losses, norms = [], []
    for step in range(STEPS):
        inputs, targets = window(tokens, step)
        loss = cross_entropy(pm(input_ids=inputs).logits, targets)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM).item())
        opt.step()
        print(f"  LoRA{tag} step {step + 1}: loss {losses[-1]:.7f}, grad norm {norms[-1]:.6f}", flush=True)
    inputs, targets = window(tokens, 0)
    with torch.no_grad():
        after = cross_entropy(pm(input_ids=inputs).logits, targets).item()
    print(f"  LoRA{tag}: window 0's loss after the steps {after:.7f}", flush=True)
    return losses, norms, after


def float64_run(assets, cache, name, tokens, adapter_dir, out):
    """Window 0's base figures and the LoRA steps again in float64 from the same weights and
    adapter, into out["f64.*"]: how far float32 rounding alone moves each figure (the test
    checks that the fixture's float32 run is that close to this one, i.e. that the figures are
    well conditioned, and holds the CPU path to the float64 figures)."""
    from peft import PeftModel

    model, _, _, _ = load(assets, cache, name, MODELS[name])
    model = model.to(torch.float64).eval()
    inputs, targets = window(tokens, 0)
    with torch.no_grad():
        logits = model(input_ids=inputs).logits[0]
    loss = cross_entropy(logits, targets[0]).item()
    print(f"  float64: base loss {loss:.7f}", flush=True)
    pm = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True).to(torch.float64)
    losses, norms, after = lora_steps(pm, tokens, " float64")
    f32 = lambda x: torch.tensor(x, dtype=torch.float32).reshape(-1)  # noqa: E731
    out.update({
        "f64.loss": f32(loss),
        "f64.logsumexp": torch.logsumexp(logits, dim=-1).float(),
        "f64.target_logit": logits.gather(1, targets[0].unsqueeze(1))[:, 0].float(),
        "f64.top_logits": logits.gather(1, out["top_ids"]).float(),  # at float32's top ids
        "f64.lora_losses": f32(losses), "f64.lora_grad_norms": f32(norms), "f64.lora_loss_after": f32(after),
    })
    return loss, losses, norms, after


def make(name, assets, cache):
    import peft
    import transformers

    file = MODELS[name]
    out_dir = os.path.join(ROOT, "tests", "fixtures", "real-" + name)
    os.makedirs(out_dir, exist_ok=True)
    text_path = os.path.join(out_dir, "text.txt")
    with open(text_path, "w", encoding="utf-8", newline="") as f:
        f.write(speech(assets))
    with open(text_path, encoding="utf-8", newline="") as f:
        text = f.read()

    model, tok, load_s, from_cache = load(assets, cache, name, file)
    model.eval()
    print(f"{name}: loaded in {load_s:.0f} s ({'cache' if from_cache else 'GGUF'})", flush=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with_special = tok(text)["input_ids"]
    # What the tokenizer adds in front (BOS for Gemma, nothing for SmolLM2): pockettune's data
    # convention puts the same in front of a document.
    prefix = with_special[: len(with_special) - len(ids)]
    assert with_special[len(prefix):] == ids, "the tokenizer adds tokens other than at the start"
    assert prefix in ([], [tok.bos_token_id]), prefix
    tokens = torch.tensor(prefix + ids, dtype=torch.int64)
    assert len(tokens) >= STEPS * T + 1, f"{len(tokens)} tokens: too few for {STEPS} windows of {T + 1}"

    out = {"tokens": tokens}
    t0 = time.time()
    loss = base_logits(model, tokens, out)
    print(f"  base loss {loss:.6f} on window 0 ({len(tokens)} tokens)", flush=True)
    adapter_dir = os.path.join(out_dir, "adapter")
    pm = make_adapter(model, adapter_dir, f"assets/{name}/{file}")
    pm.train()  # dropout is 0 everywhere (LoRA's and the models' own); train() changes nothing else
    losses, norms, after = lora_steps(pm, tokens)
    cfg = model.config.to_dict()
    del pm, model
    f32 = lambda x: torch.tensor(x, dtype=torch.float32).reshape(-1)  # noqa: E731
    out.update({"lora_losses": f32(losses), "lora_grad_norms": f32(norms), "lora_loss_after": f32(after)})
    loss64, losses64, norms64, after64 = float64_run(assets, cache, name, tokens, adapter_dir, out)
    run_s = time.time() - t0
    save_file(out, os.path.join(out_dir, "expected.safetensors"))

    keep = ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "rope_theta", "rope_parameters",
            "rope_local_base_freq", "query_pre_attn_scalar", "sliding_window", "layer_types",
            "tie_word_embeddings", "final_logit_softcapping", "attn_logit_softcapping", "hidden_act",
            "hidden_activation", "max_position_embeddings"]
    meta = {
        "made_by": "tools/make_real_fixtures.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "gguf": f"assets/{name}/{file}",
        "gguf_sha256": sha256(os.path.join(assets, name, file)),
        "text": "Shakespeare, Julius Caesar III.2 (public domain), from tools/fetch_assets.sh's plays.txt",
        "bos_prefix": prefix,
        "n_tokens": len(tokens),
        "seq_len": T,
        "batch_size": 1,
        "steps": STEPS,
        "lora": {**LORA, "b_std": B_STD, "seed": SEED, "stored": "bfloat16 (values rounded before training)"},
        "adamw": {k: list(v) if isinstance(v, tuple) else v for k, v in ADAMW.items()},
        "schedule": "constant",
        "max_grad_norm": MAX_GRAD_NORM,
        "loss": loss,
        "lora_losses": losses,
        "lora_grad_norms": norms,
        "lora_loss_after": after,
        "float64": {"loss": loss64, "lora_losses": losses64, "lora_grad_norms": norms64, "lora_loss_after": after64},
        "config": {k: cfg[k] for k in keep if k in cfg},
        "seconds": {"load": round(load_s, 1), "load_from_cache": from_cache, "forward_and_lora": round(run_s, 1)},
    }
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {os.path.normpath(out_dir)} in {load_s + run_s:.0f} s", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", default=list(MODELS))
    ap.add_argument("--assets", default=os.path.join(ROOT, "assets"))
    ap.add_argument("--cache", default=os.path.join(ROOT, "assets", "cache", "real-fixtures"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    for name in a.models:
        if name not in MODELS:
            raise SystemExit(f"no model {name}; the models are: {' '.join(MODELS)}")
        make(name, a.assets, a.cache)


if __name__ == "__main__":
    main()
