#!/usr/bin/env python3
"""The same training step in PyTorch and in pockettune, timed in one run, side by side.

The step is `pockettune bench step`'s: GPT-2 124M with random weights (or another preset shape
that transformers builds the same way), batch 4 x 128 random tokens, next-token cross-entropy,
global-norm clipping at 1.0, AdamW (lr 1e-4, betas 0.9/0.999, eps 1e-8, weight decay 0.01);
either full fine-tuning or LoRA rank 8, alpha 32, dropout 0.1 on every projection (GPT-2's
c_attn, attn.c_proj, c_fc, mlp.c_proj). PyTorch runs eager, fp32, on every CPU core
(`torch.set_num_threads`), and on CUDA with TF32 off when a CUDA device is present. pockettune
runs `bench step --json` (its GPU and, unless --no-cpu, its CPU path), in the same sitting, so the
ratios compare two programs on one machine in one state.

Versions: tools/requirements.txt (torch, transformers, peft).

    python3 tools/step_vs_torch.py --pockettune target/release/pockettune --method both
"""

import argparse
import json
import os
import subprocess
import sys
import time


def torch_step_times(preset, method, batch, seq, steps, device):
    """Seconds per step (after one warm-up step) of PyTorch's version of the step."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if preset not in ("gpt2", "gpt2-medium"):
        raise SystemExit(f"step_vs_torch: preset {preset!r} has no PyTorch twin here (gpt2, gpt2-medium)")
    width, layers, heads = (768, 12, 12) if preset == "gpt2" else (1024, 24, 16)
    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=width, n_layer=layers, n_head=heads, vocab_size=50257, n_positions=1024,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config).to(device).float()
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1,
                          target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
        model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    tokens = torch.randint(0, 50257, (batch, seq + 1), device=device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def step():
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return times


def pockettune_results(binary, preset, method, batch, seq, steps, no_cpu, extra):
    cmd = [binary, "bench", "step", "--json", "--preset", preset, "--method", method,
           "--batch-size", str(batch), "--seq-len", str(seq), "--steps", str(steps)]
    if no_cpu:
        cmd.append("--no-cpu")
    cmd += extra
    print("running:", " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out)["results"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pockettune", default="target/release/pockettune", help="the pockettune binary")
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--method", choices=["lora", "full", "both"], default="both")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--no-cpu", action="store_true", help="skip pockettune's CPU path")
    ap.add_argument("--no-pockettune", action="store_true", help="time PyTorch only")
    ap.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    ap.add_argument("extra", nargs="*", help="more `bench step` arguments (after --)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch_devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    methods = ["lora", "full"] if args.method == "both" else [args.method]
    tokens = args.batch_size * args.seq_len
    rows = []
    for method in methods:
        base = {}
        for dev in torch_devices:
            times = torch_step_times(args.preset, method, args.batch_size, args.seq_len, args.steps, dev)
            ms = 1000 * sum(times) / len(times)
            base[dev] = ms
            name = f"PyTorch {torch.__version__} {dev}" + (f" ({torch.get_num_threads()} threads)" if dev == "cpu" else " fp32")
            rows.append({"method": method, "program": name, "ms_step": ms, "tokens_per_s": tokens / ms * 1000})
            print(f"{method:<5} {name:<48} {ms:>10.0f} ms/step", file=sys.stderr, flush=True)
        if not args.no_pockettune:
            for r in pockettune_results(args.pockettune, args.preset, method, args.batch_size, args.seq_len,
                                        args.steps, args.no_cpu, args.extra):
                rows.append({"method": method, "program": f"pockettune {r['device']}", "ms_step": r["ms_step"],
                             "tokens_per_s": r["tokens_per_s"]})
        for row in rows:
            if row["method"] == method:
                row["vs_torch_cpu"] = base["cpu"] / row["ms_step"]
                if "cuda" in base:
                    row["vs_torch_cuda"] = base["cuda"] / row["ms_step"]

    out = sys.stderr if args.json else sys.stdout
    print(f"\n{args.preset}, batch {args.batch_size} x {args.seq_len}, clip 1.0, AdamW; "
          "speed relative to PyTorch (higher is faster):", file=out)
    cuda = "cuda" in torch_devices
    head = f"{'method':<6} {'program':<56} {'ms/step':>10} {'tokens/s':>10} {'x torch cpu':>12}"
    print(head + (f" {'x torch cuda':>13}" if cuda else ""), file=out)
    for row in rows:
        line = (f"{row['method']:<6} {row['program'][:56]:<56} {row['ms_step']:>10.0f} "
                f"{row['tokens_per_s']:>10.1f} {row['vs_torch_cpu']:>12.3f}")
        print(line + (f" {row['vs_torch_cuda']:>13.3f}" if cuda else ""), file=out)
    if args.json:
        print(json.dumps({"preset": args.preset, "batch_size": args.batch_size, "seq_len": args.seq_len,
                          "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
