#!/usr/bin/env python3
"""Writes the PyTorch parity fixtures under tests/fixtures/ (committed; each well under 5 MB).

For each fixture directory:
  config.json, model.safetensors   the randomly initialised model, as transformers saves it
  expected.safetensors             input_ids, targets (-100 = ignored), logits, loss, every
                                   parameter gradient as "grad.<hf name>", and "adamw_losses":
                                   the loss before each of 10 AdamW steps on the same batch

Everything in float32 on the CPU, dropout off, eager attention. AdamW hyperparameters are in
ADAMW below; weight decay applies to every parameter (torch's default with model.parameters()).

Usage: python3 -m venv .venv && .venv/bin/pip install -r tools/requirements.txt
       .venv/bin/python tools/make_fixtures.py
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


def batch(vocab, b, t, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t + 1), generator=g)
    inputs, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    targets[0, :3] = -100  # a masked prompt, as prompt/completion data produces
    return inputs, targets


def record(model, inputs, targets, out_dir, grad_name=lambda name: name):
    """Logits, loss and the gradient of every trainable parameter (named by `grad_name`) on
    one batch, then the losses of STEPS AdamW steps on the trainable parameters."""
    model.eval()  # no dropout (all p = 0 anyway)
    logits = model(input_ids=inputs).logits
    vocab = logits.shape[-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), ignore_index=-100)
    loss.backward()
    tensors = {
        "input_ids": inputs.to(torch.int64),
        "targets": targets.to(torch.int64),
        "logits": logits.detach().contiguous(),
        "loss": loss.detach().reshape(1),
    }
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    for name, p in trainable:
        tensors["grad." + grad_name(name)] = p.grad.detach().contiguous()

    opt = torch.optim.AdamW([p for _, p in trainable], **ADAMW)
    losses = []
    opt.zero_grad()
    for _ in range(STEPS):
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
        json.dump({"steps": STEPS, **{k: list(v) if isinstance(v, tuple) else v for k, v in ADAMW.items()}}, f, indent=1)


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


def llama_family(name, config_cls, model_cls, hidden_size=64, qk_gain=1.0, **kw):
    """A small random model of a Llama-like family; `qk_gain` multiplies the q and k projections
    (Gemma 2 has no q/k norms: with the default init its attention scores are ~0.03, too small
    for a soft cap to bend)."""
    out_dir = os.path.join(ROOT, name)
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    cfg = config_cls(
        vocab_size=251, hidden_size=hidden_size, intermediate_size=96, num_hidden_layers=kw.pop("layers", 2),
        num_attention_heads=4, max_position_embeddings=64, bos_token_id=250, eos_token_id=250, **kw
    )
    cfg._attn_implementation = "eager"
    model = model_cls(cfg).float()
    perturb_norms_and_biases(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".q_proj." in name or ".k_proj." in name:
                p.mul_(qk_gain)
    model.save_pretrained(out_dir, safe_serialization=True)
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
    model = model_cls.from_pretrained(base_dir, attn_implementation="eager").float()
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
    # base as the absolute path it was loaded from; sorted and relative, the fixtures come out
    # byte-identical on every machine.
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


if __name__ == "__main__":
    import sys

    if "--check-pockettune-adapter" in sys.argv:
        check_pockettune_adapter()
        sys.exit(0)
    gpt2_tiny()
    # Qwen2: bias on q/k/v, grouped-query attention (4 heads, 2 kv heads), tied embeddings.
    llama_family("qwen2-tiny", Qwen2Config, Qwen2ForCausalLM, num_key_value_heads=2,
                 rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True)
    # Llama (SmolLM2's block): no bias, one kv head, untied LM head.
    llama_family("llama-tiny", LlamaConfig, LlamaForCausalLM, num_key_value_heads=1,
                 rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False)
    # Gemma 3: (1 + w) norms, q/k norms, GeGLU, scaled embeddings; local layers with a sliding
    # window of 4 (shorter than the 16-token batch) and their own RoPE base, one global layer.
    llama_family("gemma3-tiny", Gemma3TextConfig, Gemma3ForCausalLM, num_key_value_heads=2, head_dim=16,
                 layers=3, sliding_window=4, query_pre_attn_scalar=16, rms_norm_eps=1e-6,
                 layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    # The same with logit soft-capping on (Gemma 3 ships with it off; the config allows it): caps
    # of the order of the scores (|scale q.k| reaches ~3) and of the logits (|logits| < 0.6), so
    # tanh bends both.
    llama_family("gemma3-tiny-softcap", Gemma3TextConfig, Gemma3ForCausalLM, num_key_value_heads=2,
                 head_dim=16, layers=3, sliding_window=4, query_pre_attn_scalar=16, rms_norm_eps=1e-6,
                 layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                 attn_logit_softcapping=1.0, final_logit_softcapping=0.5)
    # Gemma 2: no q/k norms, one RoPE base, both soft caps applied (as shipped: 50 and 30; here
    # of the order of the scores, |scale q.k| ~ 3 with qk_gain 8, and of the logits).
    llama_family("gemma2-tiny", Gemma2Config, Gemma2ForCausalLM, num_key_value_heads=2, head_dim=16,
                 layers=3, sliding_window=4, query_pre_attn_scalar=16, rms_norm_eps=1e-6, qk_gain=8.0,
                 layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                 attn_logit_softcapping=1.0, final_logit_softcapping=0.5)
    # LoRA with PEFT (peft in requirements.txt) on GPT-2's Conv1D layers and on Gemma 3.
    lora_fixture("gpt2-tiny", GPT2LMHeadModel, ["c_attn", "c_proj", "c_fc"], True)
    lora_fixture("gemma3-tiny", Gemma3ForCausalLM,
                 ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False)
    print("fixtures written under", os.path.normpath(ROOT))
