#!/usr/bin/env bash
# The README's worked example on a fresh machine: fetch the GPT-2 tokenizer and Shakespeare,
# make a small random GPT-2, fine-tune it, evaluate it, sample from it.
# Usage: bash tools/example.sh [extra train options, e.g. --device cpu]
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/fetch_assets.sh assets gpt2 shakespeare
cargo build --release
B=./target/release/pockettune
mkdir -p runs
[ -d models/tiny ] || $B init --preset tiny --tokenizer assets/gpt2/tokenizer.json --out models/tiny
head -c 200000 assets/shakespeare/plays.txt > runs/shakespeare.txt
$B train --model models/tiny --data runs/shakespeare.txt --steps 30 --batch-size 4 --seq-len 64 \
    --lr 3e-3 --eval-fraction 0.1 --eval-every 10 --save-every 10 --out runs/shakespeare "$@"
$B eval --model runs/shakespeare/step-000030 --data runs/shakespeare.txt --seq-len 64 --max-batches 4 "$@"
$B generate --model runs/shakespeare/step-000030 --prompt "ROMEO:" --max-tokens 40 "$@"
