#!/usr/bin/env python3
"""The memory table of docs/perf.md: the GPU bytes one training step holds at its peak, by
category, for each model shape, method and memory option, from `pockettune bench step --plan`
(the engine's executor runs the step with every buffer counted and none created, so the figures
are exact for the engine's buffers and take seconds, not the minutes a lavapipe step takes).

Usage: python3 tools/memory_table.py [BINARY] [--batch-size 8] [--seq-len 128]
Prints a Markdown table on stdout. Measured peak RSS of real runs sits next to it in
docs/perf.md; on lavapipe the "GPU" is process memory, so RSS = these bytes + the runtime.
"""
import argparse
import json
import subprocess
import sys

MODELS = ["gpt2", "gpt2-medium", "qwen2.5-0.5b", "gemma3-270m", "gemma3-1b"]
# The paper's peak RSS (GB) for full fine-tuning on its CPU path, without and with its sharding.
PAPER = {"gpt2": "2.4 / 1.0", "gpt2-medium": "3.8 / 1.7", "gemma3-270m": "4.2 / 2.5", "gemma3-1b": "8.5 / 4.8"}
ALL = ["--fused-loss", "--flash-attention", "--checkpoint-activations"]
OPTIONS = [
    ("none", []),
    ("fused loss", ["--fused-loss"]),
    ("flash attention", ["--flash-attention"]),
    ("checkpointing", ["--checkpoint-activations"]),
    ("all three", ALL),
]
EXTRA = {
    # LoRA: the frozen base streams from the checkpoint under a budget (any budget that fits)
    "lora": [("all + streamed base", ALL + ["--memory-budget", "1T"])],
    "full": [("all + moments on host", ALL + ["--optimizer-offload", "host"])],
}
CATS = ["weights", "gradients", "optimizer_state", "activations", "logits_and_loss"]


def mib(x):
    return f"{x / 2**20:,.0f}"


def plan(binary, model, method, flags, b, t):
    cmd = [binary, "bench", "step", "--preset", model, "--method", method, "--batch-size", str(b),
           "--seq-len", str(t), "--no-cpu", "--plan", "--json"] + flags
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    r = json.loads(out.stdout)["results"][0]
    return r["memory"]["gpu"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary", nargs="?", default="target/release/pockettune")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--models", default=",".join(MODELS))
    a = ap.parse_args()
    print(f"GPU MiB held at the peak of one step, batch {a.batch_size} x {a.seq_len}, planned "
          "(`bench step --plan`); per category, each category's own peak.\n")
    print("| model | method | options | peak | weights | gradients | optimizer | activations | logits+loss | paper full FT GB (plain / sharded) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for model in a.models.split(","):
        for method in ["lora", "full"]:
            for name, flags in OPTIONS + EXTRA[method]:
                g = plan(a.binary, model, method, flags, a.batch_size, a.seq_len)
                cats = g["peak_live_by_category"]
                paper = PAPER.get(model, "") if method == "full" and name == "none" else ""
                row = [model, method, name, mib(g["peak_live_bytes"])] + [mib(cats[c]) for c in CATS] + [paper]
                print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
