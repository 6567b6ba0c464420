#!/usr/bin/env python3
"""Writes clipped.safetensors into parity fixtures (tests/fixtures/<name>/): the losses and the
global gradient norms (before clipping) of STEPS AdamW steps taken as `pockettune train` takes
them, with `torch.nn.utils.clip_grad_norm_` at MAX_NORM before each update. It starts from the
fixture's own model.safetensors and batch (expected.safetensors), with the fixture's AdamW
hyperparameters (adamw.json), so it checks clipping and nothing else new.

MAX_NORM is below every step's norm, so every step is clipped: the test then fails if the norm
or the coefficient is wrong anywhere (full fine-tuning under --memory-budget gathers gradients
on the host and clips them there; see tests/full_streaming.rs).

Usage: .venv/bin/python tools/make_clip_fixture.py [FIXTURE ...]   (gpt2-tiny gemma3-tiny by default)
"""
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
STEPS = 6
MAX_NORM = 0.5


def clipped(name):
    d = os.path.join(ROOT, name)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    ex = load_file(os.path.join(d, "expected.safetensors"))
    inputs, targets = ex["input_ids"], ex["targets"]
    with open(os.path.join(d, "adamw.json")) as f:
        hp = json.load(f)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=hp["lr"], betas=tuple(hp["betas"]), eps=hp["eps"],
                            weight_decay=hp["weight_decay"])
    losses, norms = [], []
    for _ in range(STEPS):
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        losses.append(loss.item())
        norms.append(norm.item())
        opt.step()
    assert min(norms) > MAX_NORM, f"{name}: a step is not clipped (norms {norms})"
    save_file({
        "clipped_losses": torch.tensor(losses, dtype=torch.float32),
        "grad_norms": torch.tensor(norms, dtype=torch.float32),
        "max_norm": torch.tensor([MAX_NORM], dtype=torch.float32),
    }, os.path.join(d, "clipped.safetensors"))
    print(f"wrote {name}/clipped.safetensors: losses {losses[0]:.6f} .. {losses[-1]:.6f}, "
          f"norms {norms[0]:.4f} .. {norms[-1]:.4f}")


if __name__ == "__main__":
    for name in sys.argv[1:] or ["gpt2-tiny", "gemma3-tiny"]:
        clipped(name)
