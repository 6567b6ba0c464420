#!/usr/bin/env python3
"""Writes the PyTorch parity fixtures under tests/fixtures/ (committed; each well under 5 MB).

For each fixture directory:
  config.json, model.safetensors   the randomly initialised model, as transformers saves it
  expected.safetensors             input_ids, targets (-100 = ignored), logits, loss, every
                                   parameter gradient as "grad.<hf name>", and "adamw_losses":
                                   the loss before each of 10 AdamW steps on the same batch

At a real vocabulary (above BIG_VOCAB: Qwen2.5's 151,936 rows, Gemma 3's 262,144) the full logits
and embedding gradients would be tens of MB, so the model is stored in bfloat16 (torch computes in
float32 on the same rounded values, as pockettune does) and every tensor with a vocabulary axis
(logits: last axis; embedding and LM-head gradients: first axis) keeps only the vocabulary rows
listed in "vocab_rows" (every input and target id, the rows around 2^16 and 2^17 and the last
ones, and SPREAD_ROWS rows spread over the vocabulary), with "sumsq.<name>" holding the sum of
squares of the whole tensor. The batch's last row then starts with those boundary ids, and
"adamw_losses" has BIG_VOCAB_STEPS steps (each takes seconds on lavapipe in a debug build).

Everything in float32 on the CPU, dropout off, eager attention. AdamW hyperparameters are in
ADAMW below; weight decay applies to every parameter (torch's default with model.parameters()).

Usage: python3 -m venv .venv && .venv/bin/pip install -r tools/requirements.txt
       .venv/bin/python tools/make_fixtures.py [FIXTURE ...]   (all of them without names)
       .venv/bin/python tools/make_fixtures.py --check-pockettune-adapter   (PEFT loads an adapter
           written by pockettune; make it with
           `cargo test --test lora -- --ignored write_pockettune_adapter_fixture`)
"""
import json
import os

import torch
from safetensors.torch import save_file
from transformers import (GPT2Config, GPT2LMHeadModel, Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM,
                          Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
STEPS = 10
BIG_VOCAB = 65536
BIG_VOCAB_STEPS = 5
SPREAD_ROWS = 1024


def boundary_ids(vocab):
    """Where a product over the vocabulary crosses 2^16 and 2^17 terms, and its last rows (not 0:
    Gemma's pad token, whose embedding row is zero and takes no gradient from a look-up)."""
    return [i for i in (65535, 65536, 65537, 131071, 131072, 131073) if i < vocab - 2] + [vocab - 2, vocab - 1]


def batch(vocab, b, t, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t + 1), generator=g)
    if vocab > BIG_VOCAB:
        edges = boundary_ids(vocab)
        ids[-1, : len(edges)] = torch.tensor(edges)
    inputs, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    targets[0, :3] = -100  # a masked prompt, as prompt/completion data produces
    return inputs, targets


def vocab_rows(vocab, inputs, targets):
    spread = torch.linspace(0, vocab - 1, SPREAD_ROWS, dtype=torch.float64).round().long()
    ids = [spread, inputs.flatten(), targets[targets >= 0], torch.tensor(boundary_ids(vocab))]
    return torch.cat(ids).unique(sorted=True)


def record(model, inputs, targets, out_dir, grad_name=lambda name: name):
    """Logits, loss and the gradient of every trainable parameter (named by `grad_name`) on
    one batch, then the losses of STEPS AdamW steps on the trainable parameters. Above BIG_VOCAB,
    tensors with a vocabulary axis keep the rows in "vocab_rows" (see the top of the file), and
    there are BIG_VOCAB_STEPS steps."""
    model.eval()  # no dropout (all p = 0 anyway)
    logits = model(input_ids=inputs).logits
    vocab = logits.shape[-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), ignore_index=-100)
    loss.backward()
    tensors = {
        "input_ids": inputs.to(torch.int64),
        "targets": targets.to(torch.int64),
        "loss": loss.detach().reshape(1),
    }
    rows = vocab_rows(vocab, inputs, targets) if vocab > BIG_VOCAB else None
    steps = STEPS if rows is None else BIG_VOCAB_STEPS

    def put(name, t, vocab_axis):
        t = t.detach()
        if rows is not None and t.shape[vocab_axis] == vocab:
            tensors["sumsq." + name] = t.double().square().sum().float().reshape(1)
            t = t.index_select(vocab_axis, rows)
        tensors[name] = t.contiguous()

    if rows is not None:
        tensors["vocab_rows"] = rows
    put("logits", logits, -1)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    for name, p in trainable:
        put("grad." + grad_name(name), p.grad, 0)

    opt = torch.optim.AdamW([p for _, p in trainable], **ADAMW)
    losses = []
    opt.zero_grad()
    for _ in range(steps):
        l = torch.nn.functional.cross_entropy(
            model(input_ids=inputs).logits.reshape(-1, vocab), targets.reshape(-1), ignore_index=-100
        )
        losses.append(l.item())
        opt.zero_grad()
        l.backward()
        opt.step()
    tensors["adamw_losses"] = torch.tensor(losses, dtype=torch.float32)
    save_file(tensors, os.path.join(out_dir, "expected.safetensors"))
    with open(os.path.join(out_dir, "adamw.json"), "w") as f:
        json.dump({"steps": steps, **{k: list(v) if isinstance(v, tuple) else v for k, v in ADAMW.items()}}, f, indent=1)


def gpt2_tiny():
    out_dir = os.path.join(ROOT, "gpt2-tiny")
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=251, n_positions=32, n_embd=64, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, bos_token_id=250, eos_token_id=250,
    )
    cfg._attn_implementation = "eager"
    model = GPT2LMHeadModel(cfg).float()
    # Non-trivial LayerNorm parameters and biases (they start at 1 and 0).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or ".ln_" in name or name.startswith("transformer.ln_f"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out_dir, safe_serialization=True)
    inputs, targets = batch(cfg.vocab_size, 2, 16, seed=1)
    record(model, inputs, targets, out_dir)


def perturb_norms_and_biases(model):
    """Norm weights start at 1 and biases at 0; make them non-trivial so their gradients and
    their place in the computation are checked."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name or ".ln_" in name or name.startswith("transformer.ln_f"):
                p.add_(0.1 * torch.randn_like(p))


def llama_family(name, config_cls, model_cls, qk_gain=1.0, storage=None, **kw):
    """A small random model of a Llama-like family; `qk_gain` multiplies the q and k projections
    (Gemma 2 has no q/k norms: with the default init its attention scores are ~0.03, too small
    for a soft cap to bend); `storage` (torch.bfloat16) is the dtype the weights are saved in."""
    out_dir = os.path.join(ROOT, name)
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    sizes = dict(vocab_size=251, hidden_size=64, intermediate_size=96, num_hidden_layers=kw.pop("layers", 2),
                 num_attention_heads=4, max_position_embeddings=64, bos_token_id=250, eos_token_id=250)
    cfg = config_cls(**{**sizes, **kw})
    cfg._attn_implementation = "eager"
    model = model_cls(cfg).float()
    perturb_norms_and_biases(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".q_proj." in name or ".k_proj." in name:
                p.mul_(qk_gain)
    if storage is None:
        model.save_pretrained(out_dir, safe_serialization=True)
    else:
        # torch then runs the model as loaded from the file, in float32: a model cast to
        # `storage` and back would keep rounded buffers (Gemma's embedding scale, sqrt(hidden)).
        model.to(storage).save_pretrained(out_dir, safe_serialization=True)
        model = model_cls.from_pretrained(out_dir, attn_implementation="eager", dtype=torch.float32)
    inputs, targets = batch(cfg.vocab_size, 2, 16, seed=1)
    record(model, inputs, targets, out_dir)


def lora_fixture(base_name, model_cls, targets, fan_in_fan_out):
    """A PEFT LoRA adapter (r 4, alpha 8, no dropout) on a fixture model, with B made non-zero
    so that the adapter changes the logits; expected.safetensors as for the base fixtures, the
    gradients being those of the adapter (named as in adapter_model.safetensors)."""
    from peft import LoraConfig, get_peft_model

    base_dir = os.path.join(ROOT, base_name)
    out_dir = os.path.join(ROOT, base_name + "-lora")
    os.makedirs(out_dir, exist_ok=True)
    model = model_cls.from_pretrained(base_dir, attn_implementation="eager", dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                     fan_in_fan_out=fan_in_fan_out, task_type="CAUSAL_LM")
    torch.manual_seed(3)
    pm = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    pm.save_pretrained(out_dir)
    # PEFT writes target_modules from a set, in an order that changes from run to run, and the
    # base as the absolute path it was loaded from (in adapter_config.json and in a model card,
    # README.md, that nothing reads); sorted and relative, without the card, the fixtures come
    # out byte-identical on every machine.
    os.remove(os.path.join(out_dir, "README.md"))
    cfg_path = os.path.join(out_dir, "adapter_config.json")
    with open(cfg_path) as f:
        written = json.load(f)
    written["target_modules"] = sorted(written["target_modules"])
    written["base_model_name_or_path"] = "../" + base_name
    with open(cfg_path, "w") as f:
        json.dump(written, f, indent=2, sort_keys=True)
        f.write("\n")
    inputs, labels = batch(model.config.vocab_size, 2, 16, seed=1)
    # Gradients named as in adapter_model.safetensors (PEFT drops the adapter name there).
    record(pm, inputs, labels, out_dir, grad_name=lambda name: name.replace(".default", ""))


def check_pockettune_adapter():
    """The other direction: an adapter trained and written by pockettune (see
    write_pockettune_adapter_fixture in tests/lora.rs) loads in PEFT and gives pockettune's
    logits on the fixture batch."""
    from peft import PeftModel
    from safetensors.torch import load_file

    adapter = os.path.join(ROOT, "gpt2-tiny-lora-pockettune")
    base = GPT2LMHeadModel.from_pretrained(os.path.join(ROOT, "gpt2-tiny"), attn_implementation="eager").float()
    inputs = load_file(os.path.join(ROOT, "gpt2-tiny", "expected.safetensors"))["input_ids"]
    ours = load_file(os.path.join(adapter, "pockettune_logits.safetensors"))["logits"]
    with torch.no_grad():
        plain = ((base(input_ids=inputs).logits - ours).abs().max() / ours.abs().max()).item()
        model = PeftModel.from_pretrained(base, adapter).eval()  # wraps `base` in place
        peft_logits = model(input_ids=inputs).logits
    err = ((peft_logits - ours).abs().max() / ours.abs().max()).item()
    print(f"PEFT on pockettune's adapter: logits rel err {err:.2e} (the base alone differs by {plain:.2e})")
    assert err <= 1e-4, err
    assert plain > 1e-3, "the adapter changes the logits"


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Every fixture, by directory name, in the order they are made (a -lora fixture loads its base).
FIXTURES = {
    "gpt2-tiny": gpt2_tiny,
    # Qwen2: bias on q/k/v, grouped-query attention (4 heads, 2 kv heads), tied embeddings.
    "qwen2-tiny": lambda: llama_family(
        "qwen2-tiny", Qwen2Config, Qwen2ForCausalLM, num_key_value_heads=2,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True),
    # Llama (SmolLM2's block): no bias, one kv head, untied LM head.
    "llama-tiny": lambda: llama_family(
        "llama-tiny", LlamaConfig, LlamaForCausalLM, num_key_value_heads=1,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False),
    # Gemma 3: (1 + w) norms, q/k norms, GeGLU, scaled embeddings; local layers with a sliding
    # window of 4 (shorter than the 16-token batch) and their own RoPE base, one global layer.
    "gemma3-tiny": lambda: llama_family(
        "gemma3-tiny", Gemma3TextConfig, Gemma3ForCausalLM, num_key_value_heads=2, head_dim=16,
        layers=3, sliding_window=4, query_pre_attn_scalar=16, rms_norm_eps=1e-6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
    # The same with logit soft-capping on (Gemma 3 ships with it off; the config allows it): caps
    # of the order of the scores (|scale q.k| reaches ~3) and of the logits (|logits| < 0.6), so
    # tanh bends both.
    "gemma3-tiny-softcap": lambda: llama_family(
        "gemma3-tiny-softcap", Gemma3TextConfig, Gemma3ForCausalLM, num_key_value_heads=2,
        head_dim=16, layers=3, sliding_window=4, query_pre_attn_scalar=16, rms_norm_eps=1e-6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        attn_logit_softcapping=1.0, final_logit_softcapping=0.5),
    # Gemma 2: no q/k norms, one RoPE base, both soft caps applied (as shipped: 50 and 30; here
    # of the order of the scores, |scale q.k| ~ 3 with qk_gain 8, and of the logits).
    "gemma2-tiny": lambda: llama_family(
        "gemma2-tiny", Gemma2Config, Gemma2ForCausalLM, num_key_value_heads=2, head_dim=16,
        layers=3, sliding_window=4, query_pre_attn_scalar=16, rms_norm_eps=1e-6, qk_gain=8.0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attn_logit_softcapping=1.0, final_logit_softcapping=0.5),
    # Real vocabularies, everything else tiny (hidden 8: the bfloat16 embedding alone is then
    # 2.4 and 4.2 MB). Qwen2.5's config vocab_size, 151,936 (its tokenizer has 151,665 tokens;
    # the checkpoints' embedding and LM head have the config's rows), tied as in Qwen2.5-0.5B.
    "qwen2-tiny-vocab151936": lambda: llama_family(
        "qwen2-tiny-vocab151936", Qwen2Config, Qwen2ForCausalLM, storage=torch.bfloat16,
        vocab_size=151936, hidden_size=8, intermediate_size=16, num_attention_heads=2,
        num_key_value_heads=1, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
        bos_token_id=151643, eos_token_id=151643),
    # Gemma 3 270M and 1B's vocab_size, 262,144 (transformers' Gemma3TextConfig defaults to the
    # multimodal 262,208; the tokenizer has 262,145 with <image_soft_token>): one local, one global layer.
    "gemma3-tiny-vocab262144": lambda: llama_family(
        "gemma3-tiny-vocab262144", Gemma3TextConfig, Gemma3ForCausalLM, storage=torch.bfloat16,
        vocab_size=262144, hidden_size=8, intermediate_size=16, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, sliding_window=4, query_pre_attn_scalar=8, rms_norm_eps=1e-6,
        layer_types=["sliding_attention", "full_attention"], bos_token_id=2, eos_token_id=1, pad_token_id=0),
    # LoRA with PEFT (peft in requirements.txt) on GPT-2's Conv1D layers and on Gemma 3.
    "gpt2-tiny-lora": lambda: lora_fixture("gpt2-tiny", GPT2LMHeadModel, ["c_attn", "c_proj", "c_fc"], True),
    "gemma3-tiny-lora": lambda: lora_fixture("gemma3-tiny", Gemma3ForCausalLM, LORA_TARGETS, False),
    "qwen2-tiny-vocab151936-lora": lambda: lora_fixture(
        "qwen2-tiny-vocab151936", Qwen2ForCausalLM, LORA_TARGETS, False),
    "gemma3-tiny-vocab262144-lora": lambda: lora_fixture(
        "gemma3-tiny-vocab262144", Gemma3ForCausalLM, LORA_TARGETS, False),
}

if __name__ == "__main__":
    import sys

    if "--check-pockettune-adapter" in sys.argv:
        check_pockettune_adapter()
        sys.exit(0)
    names = sys.argv[1:] or list(FIXTURES)
    unknown = [n for n in names if n not in FIXTURES]
    if unknown:
        sys.exit(f"no fixture {unknown}; the fixtures are: {' '.join(FIXTURES)}")
    for name in names:
        FIXTURES[name]()
        print("wrote", os.path.normpath(os.path.join(ROOT, name)))
