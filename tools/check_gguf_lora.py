#!/usr/bin/env python3
"""Check `pockettune export --format gguf-lora` against llama.cpp itself (issue 9, point 6).

For each base GGUF (by default the real SmolLM2-135M-Instruct Q4_1, a Llama model whose Q/K rows
llama.cpp permutes, and Gemma 3 270M Q4_K_M):
  1. the token ids `pockettune eval` feeds the model for a fixed text (examples/token_ids.rs:
     the same tokenizer and BOS convention as eval), printed next to llama.cpp's own
     tokenization of the text (informational: llama.cpp is then run on pockettune's ids, so
     both score exactly the same tokens);
  2. two LoRA adapters trained by `pockettune train --method lora` for a few steps on that text
     (so that their effect is visible), each exported with `pockettune export --format
     gguf-lora`: one on every projection (the default targets), and one on q_proj and k_proj
     only. The second is there because the first one's effect comes mostly from the MLP, V and
     O projections: exporting it with Llama's Q/K rows left unpermuted (wrong) moved llama.cpp's
     loss change by only 0.6% on SmolLM2, where it wrecks the Q/K-only adapter's change;
  3. the mean next-token loss over the text from `pockettune eval` (batch 1, one window that
     covers the text) and from llama.cpp (llama-cpp-python, logits of every position, the same
     targets), without and with each adapter (`lora_path`, scale 1);
  4. for a Llama-architecture base, a negative control: a copy of the Q/K-only adapter file with
     lora_b's rows put back in Hugging Face order (what an exporter that forgot llama.cpp's
     permutation would write, made here with the `gguf` package) must fail the tolerance, or
     the check itself is reported as unable to see that mistake.

Pass criteria, fixed before the first run:
  - base: |loss_llama.cpp - loss_pockettune| <= 0.03 nats/token. pockettune dequantizes the
    weights exactly and computes in f32; llama.cpp quantizes the activations to 8 bits (Q8_0 /
    Q8_1 / Q8_K blocks) inside every quantized matmul, which moves each logit by a fraction of
    a percent (its KV cache is set to F32 here so that this is the only difference).
  - each adapter: the change in loss from adding it has the same sign in both and
    |delta_llama.cpp - delta_pockettune| <= 10% of |delta_pockettune|, with |delta_pockettune|
    >= 0.05 so that the adapter's effect stands well above the base gap (a wrong permutation,
    a transposed factor or a wrong alpha/r scale changes the delta of the adapter it concerns by
    far more than 10%).

Run from the repository root after `cargo build --bin pockettune --example token_ids`:
    python tools/check_gguf_lora.py [--base FILE.gguf ...] [--device cpu] [--work runs/check_gguf_lora]
Needs numpy, gguf and llama-cpp-python (tools/requirements.txt). Exits 1 when a check fails.
"""

import argparse
import json
import math
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
BASES = [
    ROOT / "assets/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf",
    ROOT / "assets/gemma3-270m/gemma-3-270m-Q4_K_M.gguf",
]
TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a can of oil "
    "and a small brass key. From the gallery at the top he could see the whole bay: the fishing "
    "boats returning with their nets, the gulls circling above the harbour wall, and the long line "
    "of cliffs fading into the grey sea. He trimmed the wick, polished the great lens until it "
    "shone, and wrote the time and the state of the weather in a leather-bound log. On stormy "
    "nights he did not sleep at all, but sat by the lamp listening to the wind and the waves "
    "breaking on the rocks below."
)
BASE_TOL = 0.03
DELTA_REL_TOL = 0.10
DELTA_MIN = 0.05


def run(cmd):
    cmd = [str(c) for c in cmd]
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout


def pockettune_loss(a, base, adapter, text, seq):
    cmd = [a.pockettune, "eval", "--model", base, "--data", text, "--batch-size", 1, "--seq-len", seq,
           "--device", a.device, "--json"]
    if adapter:
        cmd += ["--adapter", adapter]
    return json.loads(run(cmd))["loss"]


def llama_cpp_loss(base, lora, ids, counts, threads):
    from llama_cpp import Llama

    n = len(ids)
    llm = Llama(model_path=str(base), n_ctx=max(n, 256), n_batch=n, n_ubatch=n, logits_all=True,
                n_threads=threads, lora_path=str(lora) if lora else None, type_k=0, type_v=0,  # F32 KV cache
                seed=0, verbose=False)
    llm.eval(ids)
    logits = np.array(llm.scores[:n], dtype=np.float64)
    m = logits.max(axis=1, keepdims=True)
    logp = logits - (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))
    nll = [-logp[j - 1, ids[j]] for j in range(1, n) if counts[j]]
    del llm
    return float(np.mean(nll))


def llama_cpp_tokens(base, text):
    from llama_cpp import Llama

    llm = Llama(model_path=str(base), vocab_only=True, verbose=False)
    # add_bos=True adds BOS only when the model's metadata asks for it (llama_tokenize's add_special)
    return llm.tokenize(text.encode(), add_bos=True, special=False)


ADAPTERS = [("every projection", None), ("q_proj,k_proj", "q_proj,k_proj")]


def unpermuted_copy(base, src, dst):
    """`src` with every attn_q / attn_k lora_b in Hugging Face row order (the wrong file an
    exporter that skips llama.cpp's per-head interleave would write)."""
    import gguf

    meta = gguf.GGUFReader(str(base)).fields
    heads = int(meta["llama.attention.head_count"].contents())
    kv = int(meta["llama.attention.head_count_kv"].contents()) if "llama.attention.head_count_kv" in meta else heads
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(r.fields["adapter.lora.alpha"].contents()))
    for t in r.tensors:
        m = np.array(t.data, dtype=np.float32)  # row-major (out, r) for lora_b
        kind = t.name.split(".")[2]
        if t.name.endswith(".lora_b") and kind in ("attn_q", "attn_k"):
            h = heads if kind == "attn_q" else kv
            rows, cols = m.shape
            # GGUF row (head, j, i) back to HF row (head, i, j)
            m = m.reshape(h, rows // h // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
        w.add_tensor(t.name, np.ascontiguousarray(m))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def check(a, base):
    name = base.stem
    work = pathlib.Path(a.work) / name
    work.mkdir(parents=True, exist_ok=True)
    text = work / "text.txt"
    text.write_text(TEXT)
    out = json.loads(run([a.token_ids, base, text]))
    ids, counts = out["ids"], out["counts"]
    theirs = llama_cpp_tokens(base, TEXT)
    print(f"[{name}] pockettune ids ({len(ids)}): {ids}")
    print(f"[{name}] llama.cpp  ids ({len(theirs)}): {theirs}")
    print(f"[{name}] same ids: {ids == theirs}")
    seq = len(ids) - 1

    pt_base = pockettune_loss(a, base, None, text, seq)
    cpp_base = llama_cpp_loss(base, None, ids, counts, a.threads)
    gap = cpp_base - pt_base
    ok_base = abs(gap) <= BASE_TOL
    print(f"[{name}] loss without adapter: pockettune {pt_base:.5f}, llama.cpp {cpp_base:.5f} (gap {gap:+.5f}, "
          f"tolerance {BASE_TOL}) {'ok' if ok_base else 'FAIL'}")
    r = {"base": name, "tokens": len(ids), "targets": sum(counts[1:]), "same_ids_as_llama_cpp_tokenizer": ids == theirs,
         "pockettune_base": pt_base, "llama_cpp_base": cpp_base, "base_gap": gap, "ok": ok_base, "adapters": []}

    adapters = [("given", pathlib.Path(a.adapter))] if a.adapter else []
    for label, targets in [] if a.adapter else ADAPTERS:
        run_dir = work / ("run-" + (targets or "all").replace(",", "-"))
        cmd = [a.pockettune, "train", "--model", base, "--method", "lora", "--data", text, "--steps", a.steps,
               "--lr", a.lr, "--batch-size", 1, "--seq-len", 64, "--out", run_dir, "--device", a.device]
        run(cmd + (["--lora-targets", targets] if targets else []))
        adapters.append((label, run_dir / (run_dir / "latest").read_text().strip()))
    for label, adapter in adapters:
        lora = work / f"adapter-{adapter.parent.name}.gguf"
        run([a.pockettune, "export", "--format", "gguf-lora", "--model", base, "--adapter", adapter, "--out", lora])
        pt_lora = pockettune_loss(a, base, adapter, text, seq)
        cpp_lora = llama_cpp_loss(base, lora, ids, counts, a.threads)
        d_pt, d_cpp = pt_lora - pt_base, cpp_lora - cpp_base
        rel = abs(d_cpp - d_pt) / abs(d_pt) if d_pt else math.inf
        ok = abs(d_pt) >= DELTA_MIN and (d_pt > 0) == (d_cpp > 0) and rel <= DELTA_REL_TOL
        r["ok"] = r["ok"] and ok
        r["adapters"].append({"adapter": label, "path": str(adapter), "pockettune": pt_lora, "llama_cpp": cpp_lora,
                              "pockettune_delta": d_pt, "llama_cpp_delta": d_cpp, "delta_rel_diff": rel, "ok": ok})
        print(f"[{name}] adapter on {label}: loss pockettune {pt_lora:.5f}, llama.cpp {cpp_lora:.5f}; change "
              f"pockettune {d_pt:+.5f}, llama.cpp {d_cpp:+.5f} (relative difference {rel:.2%}, tolerance "
              f"{DELTA_REL_TOL:.0%}, |change| >= {DELTA_MIN}) {'ok' if ok else 'FAIL'}")
        if label == "q_proj,k_proj" and base_arch(base) == "llama":
            wrong = work / "adapter-qk-unpermuted.gguf"
            unpermuted_copy(base, lora, wrong)
            d_wrong = llama_cpp_loss(base, wrong, ids, counts, a.threads) - cpp_base
            rel_wrong = abs(d_wrong - d_pt) / abs(d_pt)
            seen = rel_wrong > DELTA_REL_TOL
            r["ok"] = r["ok"] and seen
            r["negative_control"] = {"llama_cpp_delta": d_wrong, "delta_rel_diff": rel_wrong, "caught": seen}
            print(f"[{name}] negative control, Q/K lora_b left unpermuted: llama.cpp change {d_wrong:+.5f} "
                  f"(relative difference {rel_wrong:.0%}): {'caught' if seen else 'NOT caught: the check is blind'}")
    return r


def base_arch(base):
    import gguf

    return str(gguf.GGUFReader(str(base)).fields["general.architecture"].contents())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", action="append", help="base GGUF (repeatable; default: SmolLM2 and Gemma 3)")
    p.add_argument("--adapter", help="check this PEFT adapter instead of training two (only with one --base)")
    p.add_argument("--pockettune", default=str(ROOT / "target/debug/pockettune"))
    p.add_argument("--token-ids", default=str(ROOT / "target/debug/examples/token_ids"))
    p.add_argument("--device", default="cpu-ref", help="pockettune's --device (default: the CPU reference path, cpu-ref)")
    p.add_argument("--steps", default=3, type=int)
    p.add_argument("--lr", default=5e-3, type=float)
    p.add_argument("--threads", default=2, type=int, help="llama.cpp threads")
    p.add_argument("--work", default=str(ROOT / "runs/check_gguf_lora"))
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()
    bases = [pathlib.Path(b) for b in a.base] if a.base else BASES
    if a.adapter and len(bases) != 1:
        p.error("--adapter goes with exactly one --base")
    results = [check(a, b) for b in bases]
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    sys.exit(0 if all(r["ok"] for r in results) else 1)


if __name__ == "__main__":
    main()
